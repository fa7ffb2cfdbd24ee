use thiserror::Error;

/// A storage failure. Callers branch only on [`StorageError::Conflict`] and
/// [`StorageError::UnknownToken`]; the rest are internal.
#[derive(Debug, Error)]
pub enum StorageError {
    /// A unique key already exists (user id taken, device id reused...).
    #[error("already exists: {0}")]
    Conflict(String),
    /// The access token a write or read was asked to check (a [`TokenCheck`]) is gone: its
    /// device logged out (in any process). Nothing was written for it.
    ///
    /// [`TokenCheck`]: crate::model::TokenCheck
    #[error("the access token is no longer valid")]
    UnknownToken,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    #[error("cannot open database: {0}")]
    Connect(String),
}

impl StorageError {
    /// Whether the database rolled the transaction back to break a deadlock or a
    /// serialization conflict (SQLSTATE 40001, PostgreSQL's 40P01; MySQL's 1213 is 40001):
    /// nothing was written, and the same work may succeed when tried again.
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Database(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("40001" | "40P01")))
    }

    /// Maps a unique-constraint violation to [`StorageError::Conflict`].
    pub(crate) fn conflict_or(err: sqlx::Error, what: impl Into<String>) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            return StorageError::Conflict(what.into());
        }
        StorageError::Database(err)
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
