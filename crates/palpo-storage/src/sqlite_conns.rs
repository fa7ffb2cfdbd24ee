//! SQLite's connections: the writer in a sqlx pool (transactions need one), the readers kept
//! here instead.
//!
//! sqlx pings every connection it takes back into a pool, to flush the rollback a dropped
//! transaction may have left. On SQLite each ping is a hand-off to the connection's thread and
//! back, as many hand-offs as the queries themselves; under load every hand-off waits for a
//! core, and a sync pass is nine reads. Readers never open a transaction, so there is nothing
//! to flush: a reader goes straight back to the idle list. One whose connection broke (an I/O
//! error, its thread gone) is closed instead.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{
    StreamExt, TryStreamExt,
    future::BoxFuture,
    stream::{self, BoxStream},
};
use sqlx::{
    Connection, Describe, Either, Execute, Executor, Sqlite, SqliteConnection,
    sqlite::{
        SqliteConnectOptions, SqlitePool, SqliteQueryResult, SqliteRow, SqliteStatement,
        SqliteTypeInfo,
    },
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connections of a SQLite pool: sqlx's (the writer) or [`SqliteReaders`].
#[derive(Debug, Clone)]
pub enum SqliteConns {
    Pool(SqlitePool),
    Readers(SqliteReaders),
}

impl SqliteConns {
    /// sqlx's pool, for what needs one (transactions, migrations): the writer's.
    pub fn pool(&self) -> Option<&SqlitePool> {
        match self {
            SqliteConns::Pool(pool) => Some(pool),
            SqliteConns::Readers(_) => None,
        }
    }

    pub fn max_connections(&self) -> u32 {
        match self {
            SqliteConns::Pool(pool) => pool.options().get_max_connections(),
            SqliteConns::Readers(readers) => readers.inner.max,
        }
    }

    pub async fn close(&self) {
        match self {
            SqliteConns::Pool(pool) => pool.close().await,
            SqliteConns::Readers(readers) => readers.close().await,
        }
    }
}

/// Read-only connections to one SQLite file, at most `max` open, opened on demand and kept.
#[derive(Clone)]
pub struct SqliteReaders {
    inner: Arc<Readers>,
}

struct Readers {
    options: SqliteConnectOptions,
    idle: Mutex<Vec<SqliteConnection>>,
    permits: Arc<Semaphore>,
    max: u32,
    acquire_timeout: Duration,
}

impl fmt::Debug for SqliteReaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteReaders")
            .field("max", &self.inner.max)
            .field("idle", &self.idle().len())
            .finish()
    }
}

impl SqliteReaders {
    /// Opens one connection with `options` (so a bad file fails here) and keeps it.
    pub async fn connect(
        options: SqliteConnectOptions,
        max: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let first = SqliteConnection::connect_with(&options).await?;
        Ok(SqliteReaders {
            inner: Arc::new(Readers {
                options,
                idle: Mutex::new(vec![first]),
                permits: Arc::new(Semaphore::new(max as usize)),
                max,
                acquire_timeout,
            }),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<SqliteConnection>> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn acquire(&self) -> Result<Reader, sqlx::Error> {
        let permit = tokio::time::timeout(
            self.inner.acquire_timeout,
            self.inner.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
        .map_err(|_| sqlx::Error::PoolClosed)?;
        let kept = self.idle().pop();
        let conn = match kept {
            Some(conn) => conn,
            None => SqliteConnection::connect_with(&self.inner.options).await?,
        };
        Ok(Reader {
            conn: Some(conn),
            readers: self.clone(),
            _permit: permit,
        })
    }

    /// Refuses new reads and closes the idle connections (those in use close when dropped).
    async fn close(&self) {
        self.inner.permits.close();
        let idle = std::mem::take(&mut *self.idle());
        for conn in idle {
            let _ = conn.close().await;
        }
    }
}

/// A reader in use; back to the idle list when dropped, unless its connection broke.
struct Reader {
    conn: Option<SqliteConnection>,
    readers: SqliteReaders,
    _permit: OwnedSemaphorePermit,
}

impl Reader {
    fn conn(&mut self) -> Result<&mut SqliteConnection, sqlx::Error> {
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Drops the connection when `result` says it can no longer be trusted.
    fn check<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if let Err(
            sqlx::Error::Io(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolClosed,
        ) = &result
        {
            self.conn = None;
        }
        result
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !self.readers.inner.permits.is_closed()
        {
            self.readers.idle().push(conn);
        }
    }
}

type Rows = Either<SqliteQueryResult, SqliteRow>;

impl<'c> Executor<'c> for &'_ SqliteConns {
    type Database = Sqlite;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Rows, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Sqlite>,
    {
        match self {
            SqliteConns::Pool(pool) => pool.fetch_many(query),
            SqliteConns::Readers(readers) => {
                let readers = readers.clone();
                // Collected before the reader goes back: the stream cannot hold both.
                stream::once(async move {
                    let mut reader = readers.acquire().await?;
                    let rows: Result<Vec<Rows>, sqlx::Error> =
                        reader.conn()?.fetch_many(query).try_collect().await;
                    reader.check(rows)
                })
                .map_ok(|rows| stream::iter(rows.into_iter().map(Ok)))
                .try_flatten()
                .boxed()
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<SqliteRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Sqlite>,
    {
        let conns = self.clone();
        Box::pin(async move {
            match conns {
                SqliteConns::Pool(pool) => (&pool).fetch_optional(query).await,
                SqliteConns::Readers(readers) => {
                    let mut reader = readers.acquire().await?;
                    let row = reader.conn()?.fetch_optional(query).await;
                    reader.check(row)
                }
            }
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [SqliteTypeInfo],
    ) -> BoxFuture<'e, Result<SqliteStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        let conns = self.clone();
        Box::pin(async move {
            match conns {
                SqliteConns::Pool(pool) => (&pool).prepare_with(sql, parameters).await,
                SqliteConns::Readers(readers) => {
                    let mut reader = readers.acquire().await?;
                    let statement = reader.conn()?.prepare_with(sql, parameters).await;
                    reader.check(statement)
                }
            }
        })
    }

    #[doc(hidden)]
    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Sqlite>, sqlx::Error>>
    where
        'c: 'e,
    {
        let conns = self.clone();
        Box::pin(async move {
            match conns {
                SqliteConns::Pool(pool) => (&pool).describe(sql).await,
                SqliteConns::Readers(readers) => {
                    let mut reader = readers.acquire().await?;
                    let described = reader.conn()?.describe(sql).await;
                    reader.check(described)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn readers(dir: &tempfile::TempDir, max: u32) -> SqliteConns {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("readers.db"))
            .create_if_missing(true);
        let mut writer = SqliteConnection::connect_with(&options)
            .await
            .expect("open writer");
        sqlx::query("CREATE TABLE t (n INTEGER)")
            .execute(&mut writer)
            .await
            .expect("create");
        sqlx::query("INSERT INTO t (n) VALUES (1), (2), (3)")
            .execute(&mut writer)
            .await
            .expect("insert");
        let readers =
            SqliteReaders::connect(options.read_only(true), max, Duration::from_millis(200))
                .await
                .expect("open readers");
        SqliteConns::Readers(readers)
    }

    fn idle(conns: &SqliteConns) -> usize {
        match conns {
            SqliteConns::Readers(r) => r.idle().len(),
            SqliteConns::Pool(_) => 0,
        }
    }

    #[tokio::test]
    async fn readers_are_kept_and_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conns = readers(&dir, 2).await;
        // Every way of running a query goes through the reader and back.
        let all: Vec<i64> = sqlx::query_scalar("SELECT n FROM t ORDER BY n")
            .fetch_all(&conns)
            .await
            .expect("fetch all");
        assert_eq!(all, vec![1, 2, 3]);
        let one: Option<i64> = sqlx::query_scalar("SELECT n FROM t WHERE n = 2")
            .fetch_optional(&conns)
            .await
            .expect("fetch optional");
        assert_eq!(one, Some(2));
        assert_eq!(idle(&conns), 1, "sequential reads reuse one connection");

        // Twenty reads at once on two connections: they take turns, none is refused.
        let counts = futures::future::try_join_all(
            (0..20)
                .map(|_| sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM t").fetch_one(&conns)),
        )
        .await
        .expect("concurrent reads");
        assert!(counts.iter().all(|&c| c == 3));
        assert!(idle(&conns) <= 2, "never more connections than the maximum");

        // A write is refused (read-only), and the reader survives the error.
        let write = sqlx::query("INSERT INTO t (n) VALUES (4)")
            .execute(&conns)
            .await;
        assert!(matches!(write, Err(sqlx::Error::Database(_))), "{write:?}");
        let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&conns)
            .await
            .expect("read after a failed write");
        assert_eq!(after, 3);
    }

    #[tokio::test]
    async fn a_busy_set_times_out_and_a_closed_one_refuses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conns = readers(&dir, 1).await;
        let SqliteConns::Readers(set) = &conns else {
            panic!("readers expected");
        };
        let held = set.acquire().await.expect("first reader");
        let waited = sqlx::query("SELECT 1").execute(&conns).await;
        assert!(
            matches!(waited, Err(sqlx::Error::PoolTimedOut)),
            "{waited:?}"
        );
        drop(held);
        sqlx::query("SELECT 1")
            .execute(&conns)
            .await
            .expect("free again");
        conns.close().await;
        let closed = sqlx::query("SELECT 1").execute(&conns).await;
        assert!(matches!(closed, Err(sqlx::Error::PoolClosed)), "{closed:?}");
        assert_eq!(idle(&conns), 0);
    }
}
