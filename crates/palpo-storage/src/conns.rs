//! Connections outside sqlx's pool for the statements that run outside a transaction.
//!
//! sqlx pings every connection it takes back into a pool, to flush the rollback a dropped
//! transaction may have left: one more round trip to the database per query (on SQLite a
//! hand-off to the connection's thread and back). Under load that is as many round trips as
//! the queries themselves, each a wake-up of the server process and of ours; a sync pass is
//! several reads. A statement outside a transaction leaves nothing to flush (a read dropped
//! half-way is drained by the connection before its next statement), so a [`Readers`]
//! connection goes straight back to the idle list. One whose connection broke (an I/O error,
//! its thread gone) is closed instead. Transactions keep sqlx's pool, which the ping is for.

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
use sqlx::{ConnectOptions, Connection, Database, Describe, Either, Execute, Executor, Pool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connections of one database: sqlx's pool (transactions need one) or [`Readers`].
#[derive(Debug)]
pub enum Conns<DB: Database> {
    Pool(Pool<DB>),
    Readers(Readers<DB>),
}

impl<DB: Database> Clone for Conns<DB> {
    fn clone(&self) -> Self {
        match self {
            Conns::Pool(pool) => Conns::Pool(pool.clone()),
            Conns::Readers(readers) => Conns::Readers(readers.clone()),
        }
    }
}

impl<DB: Database> Conns<DB> {
    /// sqlx's pool, for what needs one (transactions, migrations).
    pub fn pool(&self) -> Option<&Pool<DB>> {
        match self {
            Conns::Pool(pool) => Some(pool),
            Conns::Readers(_) => None,
        }
    }

    pub fn max_connections(&self) -> u32 {
        match self {
            Conns::Pool(pool) => pool.options().get_max_connections(),
            Conns::Readers(readers) => readers.inner.max,
        }
    }

    pub async fn close(&self) {
        match self {
            Conns::Pool(pool) => pool.close().await,
            Conns::Readers(readers) => readers.close().await,
        }
    }
}

/// Connections to one database for statements outside transactions (on SQLite read-only
/// ones), at most `max` open, opened on demand and kept.
pub struct Readers<DB: Database> {
    inner: Arc<Kept<DB>>,
}

impl<DB: Database> Clone for Readers<DB> {
    fn clone(&self) -> Self {
        Readers {
            inner: self.inner.clone(),
        }
    }
}

struct Kept<DB: Database> {
    options: <DB::Connection as Connection>::Options,
    idle: Mutex<Vec<DB::Connection>>,
    permits: Arc<Semaphore>,
    max: u32,
    acquire_timeout: Duration,
}

impl<DB: Database> fmt::Debug for Readers<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readers")
            .field("max", &self.inner.max)
            .field("idle", &self.idle().len())
            .finish()
    }
}

impl<DB: Database> Readers<DB> {
    /// Opens one connection with `options` (so a bad address or file fails here) and keeps
    /// it.
    pub async fn connect(
        options: <DB::Connection as Connection>::Options,
        max: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let first = options.connect().await?;
        Ok(Readers {
            inner: Arc::new(Kept {
                options,
                idle: Mutex::new(vec![first]),
                permits: Arc::new(Semaphore::new(max as usize)),
                max,
                acquire_timeout,
            }),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<DB::Connection>> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn acquire(&self) -> Result<Reader<DB>, sqlx::Error> {
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
            None => self.inner.options.connect().await?,
        };
        Ok(Reader {
            conn: Some(conn),
            readers: self.clone(),
            _permit: permit,
        })
    }

    /// Refuses new statements and closes the idle connections (those in use close when
    /// dropped).
    async fn close(&self) {
        self.inner.permits.close();
        let idle = std::mem::take(&mut *self.idle());
        for conn in idle {
            let _ = conn.close().await;
        }
    }
}

/// A connection in use; back to the idle list when dropped, unless it broke.
struct Reader<DB: Database> {
    conn: Option<DB::Connection>,
    readers: Readers<DB>,
    _permit: OwnedSemaphorePermit,
}

impl<DB: Database> Reader<DB> {
    fn conn(&mut self) -> Result<&mut DB::Connection, sqlx::Error> {
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

impl<DB: Database> Drop for Reader<DB> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !self.readers.inner.permits.is_closed()
        {
            self.readers.idle().push(conn);
        }
    }
}

type Rows<DB> = Either<<DB as Database>::QueryResult, <DB as Database>::Row>;

impl<'c, DB: Database> Executor<'c> for &'_ Conns<DB>
where
    for<'a> &'a mut DB::Connection: Executor<'a, Database = DB>,
{
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Rows<DB>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        match self {
            Conns::Pool(pool) => pool.fetch_many(query),
            Conns::Readers(readers) => {
                let readers = readers.clone();
                // Collected before the reader goes back: the stream cannot hold both.
                stream::once(async move {
                    let mut reader = readers.acquire().await?;
                    let rows: Result<Vec<Rows<DB>>, sqlx::Error> =
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
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let conns = self.clone();
        Box::pin(async move {
            match conns {
                Conns::Pool(pool) => (&pool).fetch_optional(query).await,
                Conns::Readers(readers) => {
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
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        let conns = self.clone();
        Box::pin(async move {
            match conns {
                Conns::Pool(pool) => (&pool).prepare_with(sql, parameters).await,
                Conns::Readers(readers) => {
                    let mut reader = readers.acquire().await?;
                    let statement = reader.conn()?.prepare_with(sql, parameters).await;
                    reader.check(statement)
                }
            }
        })
    }

    #[doc(hidden)]
    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<DB>, sqlx::Error>>
    where
        'c: 'e,
    {
        let conns = self.clone();
        Box::pin(async move {
            match conns {
                Conns::Pool(pool) => (&pool).describe(sql).await,
                Conns::Readers(readers) => {
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
    use sqlx::{Sqlite, SqliteConnection, sqlite::SqliteConnectOptions};

    use super::*;

    async fn readers(dir: &tempfile::TempDir, max: u32) -> Conns<Sqlite> {
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
            Readers::<Sqlite>::connect(options.read_only(true), max, Duration::from_millis(200))
                .await
                .expect("open readers");
        Conns::Readers(readers)
    }

    fn idle(conns: &Conns<Sqlite>) -> usize {
        match conns {
            Conns::Readers(r) => r.idle().len(),
            Conns::Pool(_) => 0,
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
        let Conns::Readers(set) = &conns else {
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
