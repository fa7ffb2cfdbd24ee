//! SQLite write transactions. Every query on SQLite is a hand-off to the connection's thread
//! and back, and under load each hand-off waits for a core; the event writer's batches,
//! which every send waits for, therefore begin and commit inside their first and last
//! queries instead of in queries of their own ([`SqliteBatch`]).

use sqlx::{Sqlite, SqliteConnection, pool::PoolConnection};

use crate::error::Result;

/// A write transaction on the SQLite writer connection.
pub enum SqliteTx {
    /// Begun, committed and rolled back by sqlx, each a query of its own.
    Sqlx(sqlx::Transaction<'static, Sqlite>),
    /// Begun by its first query and committed by its last: see [`SqliteBatch`].
    Batch(SqliteBatch),
}

impl SqliteTx {
    /// The statement the transaction's first query must run before its own: `BEGIN
    /// IMMEDIATE` for a batch not yet begun (which then counts as begun), none otherwise.
    pub(crate) fn take_begin(&mut self) -> Option<&'static str> {
        match self {
            SqliteTx::Batch(batch) if batch.state == BatchState::NotBegun => {
                // Counted as begun even should the query fail: a rollback of a transaction
                // that never began fails harmlessly, a forgotten one would not.
                batch.state = BatchState::Open;
                Some("BEGIN IMMEDIATE")
            }
            _ => None,
        }
    }

    /// The connection, for the transaction's queries.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        match self {
            SqliteTx::Sqlx(tx) => tx,
            SqliteTx::Batch(batch) => &mut batch.conn,
        }
    }

    pub(crate) async fn commit(self) -> Result<()> {
        match self {
            SqliteTx::Sqlx(tx) => tx.commit().await?,
            SqliteTx::Batch(batch) => batch.end("COMMIT").await?,
        }
        Ok(())
    }

    pub(crate) async fn rollback(self) -> Result<()> {
        match self {
            SqliteTx::Sqlx(tx) => tx.rollback().await?,
            SqliteTx::Batch(batch) => batch.end("ROLLBACK").await?,
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchState {
    /// No query sent yet: the first one must carry [`SqliteTx::take_begin`].
    NotBegun,
    /// A `BEGIN` was sent; a `COMMIT` or `ROLLBACK` is owed.
    Open,
    /// Committed or rolled back.
    Ended,
}

/// A write transaction sqlx does not know about: its `BEGIN IMMEDIATE` is sent with its first
/// query ([`SqliteTx::take_begin`]) and its `COMMIT` with its last writes
/// (`DeferredWrites::flush_last`), two hand-offs fewer than sqlx's. `IMMEDIATE` takes
/// the database's write lock at once, so another process's write cannot slip in between this
/// transaction's reads and its writes. Dropped while open (an error part-way), its connection
/// is closed, which rolls the transaction back, instead of going back to the pool inside it.
pub struct SqliteBatch {
    conn: PoolConnection<Sqlite>,
    state: BatchState,
}

impl SqliteBatch {
    pub(crate) fn new(conn: PoolConnection<Sqlite>) -> Self {
        SqliteBatch {
            conn,
            state: BatchState::NotBegun,
        }
    }

    /// Marks the transaction committed by a query that ended with `COMMIT`.
    pub(crate) fn committed(&mut self) {
        self.state = BatchState::Ended;
    }

    async fn end(mut self, statement: &str) -> Result<()> {
        if self.state == BatchState::Open {
            let conn: &mut SqliteConnection = &mut self.conn;
            sqlx::query(statement).execute(conn).await?;
        }
        self.state = BatchState::Ended;
        Ok(())
    }
}

impl Drop for SqliteBatch {
    fn drop(&mut self) {
        if self.state == BatchState::Open {
            self.conn.close_on_drop();
        }
    }
}
