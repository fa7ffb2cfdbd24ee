//! The raw-limit probe: how fast the database itself commits rows shaped like Palpo's
//! `events` rows, one row per transaction, with the durability settings Palpo uses
//! (SQLite: WAL, `synchronous = NORMAL`, one writer connection; PostgreSQL: server defaults).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::matrix::check_loopback;
use crate::stats::Figures;

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

fn ddl(table: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE {table} (event_id VARCHAR(255) NOT NULL PRIMARY KEY, \
             room_id VARCHAR(255) NOT NULL, stream_ordering BIGINT NULL, depth BIGINT NOT NULL, \
             event_type VARCHAR(255) NOT NULL, state_key VARCHAR(255) NULL, \
             sender VARCHAR(255) NOT NULL, origin_server_ts BIGINT NOT NULL, \
             state_group BIGINT NULL, outlier BOOLEAN NOT NULL, soft_failed BOOLEAN NOT NULL, \
             rejected_reason TEXT NULL, redacted_by VARCHAR(255) NULL, pdu_json TEXT NOT NULL)"
        ),
        format!("CREATE UNIQUE INDEX {table}_stream ON {table} (stream_ordering)"),
        format!("CREATE INDEX {table}_room_stream ON {table} (room_id, stream_ordering)"),
        format!("CREATE INDEX {table}_room_ts ON {table} (room_id, origin_server_ts)"),
    ]
}

fn insert_sql(table: &str, postgres: bool) -> String {
    let ph: Vec<String> = (1..=10)
        .map(|i| {
            if postgres {
                format!("${i}")
            } else {
                "?".to_owned()
            }
        })
        .collect();
    format!(
        "INSERT INTO {table} (event_id, room_id, stream_ordering, depth, event_type, state_key, \
         sender, origin_server_ts, state_group, outlier, soft_failed, pdu_json) \
         VALUES ({}, {}, {}, {}, 'm.room.message', NULL, {}, {}, {}, {}, {}, {})",
        ph[0], ph[1], ph[2], ph[3], ph[4], ph[5], ph[6], ph[7], ph[8], ph[9]
    )
}

/// A PDU-sized JSON body (about the size of a signed `m.room.message`).
fn pdu(n: i64) -> String {
    format!(
        r#"{{"auth_events":["$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","$bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","$ccccccccccccccccccccccccccccccccccccccccccc"],"content":{{"body":"bench message {n}","msgtype":"m.text"}},"depth":{n},"hashes":{{"sha256":"dddddddddddddddddddddddddddddddddddddddddddd"}},"origin_server_ts":1700000000000,"prev_events":["$eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"],"room_id":"!room:localhost","sender":"@bench:localhost","signatures":{{"localhost":{{"ed25519:a":"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"}}}},"type":"m.room.message"}}"#
    )
}

async fn exec(pool: &Pool, sql: &str) -> Result<()> {
    match pool {
        Pool::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        Pool::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }?;
    Ok(())
}

async fn insert_one(pool: &Pool, sql: &str, n: i64, run: &str) -> Result<()> {
    let (id, room, sender) = (
        format!("${run}_{n}"),
        format!("!r{}:localhost", n % 8),
        "@bench:localhost",
    );
    let body = pdu(n);
    macro_rules! one {
        ($p:expr) => {{
            let mut tx = $p.begin().await?;
            sqlx::query(sql)
                .bind(&id)
                .bind(&room)
                .bind(n)
                .bind(n)
                .bind(sender)
                .bind(1_700_000_000_000i64 + n)
                .bind(n)
                .bind(false)
                .bind(false)
                .bind(&body)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }};
    }
    match pool {
        Pool::Sqlite(p) => one!(p),
        Pool::Postgres(p) => one!(p),
    }
    Ok(())
}

/// Inserts `rows` rows with `writers` concurrent tasks; returns rows per second.
async fn timed_inserts(
    pool: &Pool,
    sql: &str,
    rows: usize,
    writers: usize,
    next: &Arc<AtomicI64>,
    run: &str,
) -> Result<f64> {
    let per = rows.div_ceil(writers.max(1));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers.max(1) {
        let (pool, sql, next, run) = (pool.clone(), sql.to_owned(), next.clone(), run.to_owned());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let n = next.fetch_add(1, Ordering::Relaxed);
                insert_one(&pool, &sql, n, &run).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per * writers.max(1)) as f64 / t.elapsed().as_secs_f64())
}

pub async fn run(db_url: &str, rows: usize, writers: usize, run_id: &str) -> Result<Figures> {
    let pool = if db_url.starts_with("sqlite:") {
        let opts = SqliteConnectOptions::from_str(db_url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        // Palpo's SQLite writer pool has exactly one connection.
        Pool::Sqlite(
            SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await?,
        )
    } else if db_url.starts_with("postgres:") || db_url.starts_with("postgresql:") {
        check_loopback(db_url)?;
        Pool::Postgres(
            PgPoolOptions::new()
                .max_connections(writers.max(1) as u32)
                .connect(db_url)
                .await?,
        )
    } else {
        bail!("raw-db: --db-url must be sqlite:// or postgres://");
    };
    let backend = if matches!(pool, Pool::Sqlite(_)) {
        "sqlite"
    } else {
        "postgres"
    };
    let table = format!("palpo_bench_raw_{run_id}");
    for stmt in ddl(&table) {
        exec(&pool, &stmt).await?;
    }
    let sql = insert_sql(&table, matches!(pool, Pool::Postgres(_)));
    let next = Arc::new(AtomicI64::new(1));
    let mut f = Figures::default();
    let result = async {
        let one = timed_inserts(&pool, &sql, rows, 1, &next, run_id).await?;
        let many = timed_inserts(&pool, &sql, rows, writers, &next, run_id).await?;
        f.set("raw.insert_1_writer_per_s", one);
        f.set("raw.insert_c_writers_per_s", many);
        f.set("raw.writers", writers as f64);
        anyhow::Ok(())
    }
    .await;
    exec(&pool, &format!("DROP TABLE {table}")).await?;
    result?;
    eprintln!("raw-db ({backend}): {rows} rows per pass done");
    Ok(f)
}

#[cfg(test)]
mod tests {
    #[test]
    fn insert_binds_ten_values() {
        let pg = super::insert_sql("t", true);
        assert!(pg.contains("$10") && !pg.contains("$11"));
        assert_eq!(super::insert_sql("t", false).matches('?').count(), 10);
    }
}
