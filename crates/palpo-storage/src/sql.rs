//! The sqlx implementation of the repository traits, one code path for all three backends.

mod account_data;
mod accounts;
mod e2ee;
mod ephemeral;
mod rooms;
mod sliding;

pub(crate) use rooms::lock_room_row;

use std::sync::Arc;

use crate::db::Db;

/// Implements every repository trait on top of [`Db`].
#[derive(Clone)]
pub struct SqlStore {
    db: Arc<Db>,
}

impl SqlStore {
    pub fn new(db: Arc<Db>) -> Self {
        SqlStore { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}
