//! The sqlx implementation of the repository traits, one code path for all three backends.

mod account_data;
mod accounts;
mod e2ee;
mod ephemeral;
mod rooms;
mod sliding;

pub(crate) use rooms::lock_room_row;

/// `?, ?, ?` for `n` parameters.
pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// One statement for several rooms: `per_room` (a `SELECT` with its own `ORDER BY ... LIMIT`,
/// its parameters bound once per room, in order) for each of `rooms`, joined by `UNION ALL`.
/// Each part runs on the `(room_id, stream_ordering)` index and stops at its limit, which a
/// window function over the rooms' whole history would not; every backend runs this form
/// (SQLite wants each limited part wrapped as a subquery, PostgreSQL and MySQL want it named).
fn per_room_union(rooms: usize, per_room: &str) -> String {
    (0..rooms)
        .map(|n| format!("SELECT * FROM ({per_room}) AS part{n}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Rooms per [`per_room_union`] statement: well within SQLite's 500 compound parts and every
/// backend's parameter limit.
const ROOMS_PER_UNION: usize = 50;

/// Parts of one chunked read in flight at once: enough to use a few connections, few enough
/// that one large read (a sync over thousands of rooms) leaves the pool to other requests.
const PARTS_AT_ONCE: usize = 4;

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
