//! The raw-limit probe: how fast the database itself commits rows shaped like Palpo's
//! `events` rows, one row per transaction, with the durability settings Palpo uses
//! (SQLite: WAL, `synchronous = NORMAL`, one writer connection; PostgreSQL: server defaults).
//!
//! Each row is one autocommit `INSERT` (its own transaction: one round trip, one commit) on a
//! connection the writer holds. No client pool sits in between: sqlx's pool would add a
//! round trip per row (a ping whenever a connection goes back to it) and an explicit
//! `BEGIN`/`COMMIT` two more, and the probe would measure the client instead of the database.
//! PostgreSQL's own `pgbench`, given the same insert, reaches about the same rate (see
//! docs/benchmarks.md).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, PgConnection, SqliteConnection};
use tokio::sync::Mutex;

use crate::matrix::check_loopback;
use crate::stats::Figures;

/// Where the probe connects: every PostgreSQL writer opens its own connection; SQLite's
/// writers share one, as Palpo's writes do.
enum Target {
    Sqlite(Arc<Mutex<SqliteConnection>>),
    Postgres(Box<PgConnectOptions>),
}

/// One writer's connection.
enum Conn {
    Sqlite(Arc<Mutex<SqliteConnection>>),
    Postgres(PgConnection),
}

impl Target {
    async fn connect(&self) -> Result<Conn> {
        Ok(match self {
            Target::Sqlite(conn) => Conn::Sqlite(conn.clone()),
            Target::Postgres(options) => Conn::Postgres(PgConnection::connect_with(options).await?),
        })
    }
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

/// Runs `$body` with `$c` bound to the writer's `&mut` connection (SQLite's shared one
/// locked for it).
macro_rules! on_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            Conn::Sqlite(shared) => {
                let $c = &mut *shared.lock().await;
                $body
            }
            Conn::Postgres(own) => {
                let $c = &mut *own;
                $body
            }
        }
    };
}

async fn exec(conn: &mut Conn, sql: &str) -> Result<()> {
    on_conn!(conn, |c| sqlx::query(sql).execute(c).await.map(|_| ()))?;
    Ok(())
}

async fn insert_one(conn: &mut Conn, sql: &str, n: i64, run: &str) -> Result<()> {
    let (id, room, sender) = (
        format!("${run}_{n}"),
        format!("!r{}:localhost", n % 8),
        "@bench:localhost",
    );
    let body = pdu(n);
    on_conn!(conn, |c| sqlx::query(sql)
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
        .execute(c)
        .await
        .map(|_| ()))?;
    Ok(())
}

/// Inserts rows with `writers` concurrent writers for `seconds`; returns rows per second
/// (connecting is not timed).
async fn timed_inserts(
    target: &Target,
    sql: &str,
    seconds: f64,
    writers: usize,
    next: &Arc<AtomicI64>,
    run: &str,
) -> Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..writers.max(1) {
        conns.push(target.connect().await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds.max(0.1));
    let mut tasks = Vec::new();
    for mut conn in conns {
        let (sql, next, run) = (sql.to_owned(), next.clone(), run.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut rows = 0u64;
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                insert_one(&mut conn, &sql, n, &run).await?;
                rows += 1;
            }
            anyhow::Ok(rows)
        }));
    }
    let mut rows = 0;
    for t in tasks {
        rows += t.await??;
    }
    Ok(rows as f64 / start.elapsed().as_secs_f64())
}

pub async fn run(db_url: &str, seconds: f64, writers: usize, run_id: &str) -> Result<Figures> {
    let target = if db_url.starts_with("sqlite:") {
        let opts = SqliteConnectOptions::from_str(db_url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        // Palpo's SQLite writer is exactly one connection.
        Target::Sqlite(Arc::new(Mutex::new(
            SqliteConnection::connect_with(&opts).await?,
        )))
    } else if db_url.starts_with("postgres:") || db_url.starts_with("postgresql:") {
        check_loopback(db_url)?;
        Target::Postgres(Box::new(PgConnectOptions::from_str(db_url)?))
    } else {
        bail!("raw-db: --db-url must be sqlite:// or postgres://");
    };
    let postgres = matches!(target, Target::Postgres(_));
    let backend = if postgres { "postgres" } else { "sqlite" };
    let table = format!("palpo_bench_raw_{run_id}");
    let mut admin = target.connect().await?;
    for stmt in ddl(&table) {
        exec(&mut admin, &stmt).await?;
    }
    let sql = insert_sql(&table, postgres);
    let next = Arc::new(AtomicI64::new(1));
    let mut f = Figures::default();
    let result = async {
        let one = timed_inserts(&target, &sql, seconds, 1, &next, run_id).await?;
        let many = timed_inserts(&target, &sql, seconds, writers, &next, run_id).await?;
        f.set("raw.insert_1_writer_per_s", one);
        f.set("raw.insert_c_writers_per_s", many);
        f.set("raw.writers", writers as f64);
        anyhow::Ok(())
    }
    .await;
    exec(&mut admin, &format!("DROP TABLE {table}")).await?;
    result?;
    eprintln!("raw-db ({backend}): two passes of {seconds} s done");
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
