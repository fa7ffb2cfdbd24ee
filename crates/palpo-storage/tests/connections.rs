//! The primary's readers (`Db::fresh`) on every backend: kept outside sqlx's pool, they go
//! back idle without a ping, so a read dropped half-way must leave its connection answering
//! the next read with that read's own rows, and a burst of reads must share the set.

use std::time::Duration;

use palpo_storage::{Storage, db::Pool, model::NewUser, on_pool};

palpo_storage::conformance!(
    a_read_dropped_half_way_leaves_its_connection_usable,
    concurrent_reads_share_the_readers,
);

/// Counts the cube of `?` rows (MariaDB stops a recursion at 1000 rows): long enough to be
/// dropped while it runs, short enough for the next read to wait for.
const SLOW_COUNT: &str = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c \
                          WHERE n < ?) SELECT COUNT(*) FROM c a, c b, c d";

async fn echo(pool: &Pool, value: i64) -> i64 {
    // PostgreSQL types a bare parameter as text unless told.
    let query = match pool {
        Pool::Postgres(_) => "SELECT CAST(? AS BIGINT)",
        _ => "SELECT ?",
    };
    on_pool!(pool, query, |p, sql| {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(value)
            .fetch_one(p)
            .await
            .expect("echo")
    })
}

async fn a_read_dropped_half_way_leaves_its_connection_usable(s: Storage) {
    let fresh = s.db().fresh();
    // Warm: the set keeps one idle connection, the one the next reads take.
    assert_eq!(echo(fresh, 1).await, 1);
    for round in 0..3_i64 {
        let slow = async {
            on_pool!(fresh, SLOW_COUNT, |p, sql| {
                sqlx::query_scalar::<_, i64>(sql)
                    .bind(200_i64)
                    .fetch_one(p)
                    .await
            })
        };
        let dropped = tokio::time::timeout(Duration::from_millis(30), slow).await;
        assert!(dropped.is_err(), "the slow count finished in 30 ms");
        // The same connection answers next: with this read's value, not the count.
        let value = 1000 + round;
        let answered = tokio::time::timeout(Duration::from_secs(120), echo(fresh, value))
            .await
            .expect("the read after a dropped one never finished");
        assert_eq!(answered, value);
    }
    // Writes through the primary still show in the readers at once.
    let counted = |pool: &Pool| {
        let pool = pool.clone();
        async move {
            on_pool!(&pool, "SELECT COUNT(*) FROM users", |p, sql| {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(p)
                    .await
                    .expect("count users")
            })
        }
    };
    let before = counted(fresh).await;
    s.users
        .create_user(&NewUser {
            user_id: "@readers:test".into(),
            password_hash: None,
            is_admin: false,
            created_at: 0,
        })
        .await
        .expect("create user");
    assert_eq!(counted(fresh).await, before + 1);
}

async fn concurrent_reads_share_the_readers(s: Storage) {
    let fresh = s.db().fresh();
    let max = fresh.max_connections() as i64;
    // Many more reads than connections at once: they take turns, none is refused.
    let reads = (0..max * 8).map(|i| echo(fresh, i));
    let answers = futures::future::join_all(reads).await;
    assert_eq!(answers, (0..max * 8).collect::<Vec<_>>());
}
