//! Read routing: which pool serves a read.
//!
//! - SQLite: reads go to a pool of read-only connections (WAL lets them run beside the writer).
//! - PostgreSQL with replicas: reads go to a replica, round-robin, unless the reading user has
//!   written something the replica has not replayed yet. After each write we remember a primary
//!   WAL position at or past that write's commit record for that user; a read for that user
//!   goes to a replica only once the replica's replay position has reached it, else to the
//!   primary. Every routed read asks the replica for its position first, so a replica that is
//!   down, or not answering, is never handed out: it is skipped, and left alone for a short
//!   back-off before it is asked again. So a user never misses their own write, however far a
//!   replica lags, and a dead replica does not fail reads.
//! - Otherwise: the primary.
//!
//! What remains: a replica that dies between that check and the query fails that one query.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::postgres::PgPool;

use crate::db::{Conns, Pool};

/// How long to wait for a replica to report its replay position before skipping it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a replica that failed to answer is skipped before it is asked again.
const DOWN_BACKOFF: Duration = Duration::from_secs(3);
/// How recent every replica's known position must be for pending writes to be forgotten.
const FORGET_WINDOW: Duration = Duration::from_secs(1);
/// A pending write whose WAL position could not be read: resolved at the next read.
const UNKNOWN_LSN: u64 = u64::MAX;

/// How many reads each kind of pool has served, since start. For operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Reads served by a PostgreSQL replica.
    pub replica_reads: u64,
    /// Reads served by the SQLite read-only pool.
    pub sqlite_reader_reads: u64,
    /// Reads served by the primary (no replicas, or none usable for that read).
    pub primary_reads: u64,
    /// Of `primary_reads`: reads with replicas configured where every replica that answered
    /// had not replayed the reader's last write yet.
    pub lagging_fallbacks: u64,
    /// Replica position checks that failed (replica down, not answering, or not a replica).
    pub replica_errors: u64,
}

#[derive(Default)]
struct Counters {
    replica_reads: AtomicU64,
    sqlite_reader_reads: AtomicU64,
    primary_reads: AtomicU64,
    lagging_fallbacks: AtomicU64,
    replica_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub struct ReadRouter {
    /// The primary's readers ([`crate::db::Db::fresh`]).
    primary_readers: Pool,
    replicas: Vec<Replica>,
    next_replica: AtomicUsize,
    /// user id → primary WAL position (LSN) at or past that user's latest write, while not
    /// yet known to be replayed by every replica. Entries are dropped once all replicas are
    /// seen past them.
    pending: Mutex<HashMap<String, u64>>,
    counters: Counters,
}

impl ReadRouter {
    pub(crate) fn new(primary_readers: Pool, replicas: Vec<PgPool>) -> Self {
        ReadRouter {
            primary_readers,
            replicas: replicas.into_iter().map(Replica::new).collect(),
            next_replica: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    pub fn has_replicas(&self) -> bool {
        !self.replicas.is_empty()
    }

    /// How many reads each kind of pool has served so far.
    pub fn stats(&self) -> RouteStats {
        let c = &self.counters;
        RouteStats {
            replica_reads: c.replica_reads.load(Ordering::Relaxed),
            sqlite_reader_reads: c.sqlite_reader_reads.load(Ordering::Relaxed),
            primary_reads: c.primary_reads.load(Ordering::Relaxed),
            lagging_fallbacks: c.lagging_fallbacks.load(Ordering::Relaxed),
            replica_errors: c.replica_errors.load(Ordering::Relaxed),
        }
    }

    /// How many users have writes not yet known to be replayed by every replica.
    pub fn pending_writers(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// The pool a read for `user_id` should use.
    pub async fn pool_for(&self, user_id: &str) -> Pool {
        if let Pool::Sqlite(_) = &self.primary_readers {
            bump(&self.counters.sqlite_reader_reads);
            return self.primary_readers.clone();
        }
        if self.replicas.is_empty() {
            bump(&self.counters.primary_reads);
            return self.primary_readers.clone();
        }
        let Some(needed) = self.needed_lsn(user_id).await else {
            // The user's last write has no known position and the primary cannot say one.
            bump(&self.counters.primary_reads);
            return self.primary_readers.clone();
        };
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let mut lagging = false;
        for i in 0..self.replicas.len() {
            let replica = &self.replicas[(start + i) % self.replicas.len()];
            match replica.position().await {
                Probe::Down => {}
                Probe::Failed => bump(&self.counters.replica_errors),
                Probe::At(applied) if applied >= needed => {
                    self.forget_replayed();
                    bump(&self.counters.replica_reads);
                    return Pool::Postgres(Conns::Pool(replica.pool.clone()));
                }
                Probe::At(_) => lagging = true,
            }
        }
        tracing::debug!(
            user_id,
            lagging,
            "replicas behind or down; reading from the primary"
        );
        bump(&self.counters.primary_reads);
        if lagging {
            bump(&self.counters.lagging_fallbacks);
        }
        self.primary_readers.clone()
    }

    /// Remembers a primary WAL position at or past `user_id`'s write that just committed.
    pub async fn note_write(&self, user_id: &str) {
        if self.replicas.is_empty() {
            return;
        }
        let Pool::Postgres(primary) = &self.primary_readers else {
            return;
        };
        let lsn = match primary_lsn(primary).await {
            Some(lsn) => lsn,
            // Unknown position: the next read of this user asks the primary again (its
            // position then is past this write), or reads from the primary.
            None => UNKNOWN_LSN,
        };
        if let Ok(mut pending) = self.pending.lock() {
            let entry = pending.entry(user_id.to_owned()).or_insert(0);
            *entry = (*entry).max(lsn);
        }
    }

    /// The replay position a replica needs for a read of `user_id`; `None` when it cannot be
    /// known (the read must go to the primary).
    async fn needed_lsn(&self, user_id: &str) -> Option<u64> {
        let pending = self
            .pending
            .lock()
            .ok()
            .and_then(|pending| pending.get(user_id).copied());
        match pending {
            None => Some(0),
            Some(UNKNOWN_LSN) => {
                let Pool::Postgres(primary) = &self.primary_readers else {
                    return None;
                };
                // The write committed before this call, so today's position is past it.
                let lsn = primary_lsn(primary).await?;
                if let Ok(mut pending) = self.pending.lock()
                    && let Some(entry) = pending.get_mut(user_id)
                    && *entry == UNKNOWN_LSN
                {
                    *entry = lsn;
                }
                Some(lsn)
            }
            Some(lsn) => Some(lsn),
        }
    }

    /// Drops every pending entry all replicas have replayed, judged by positions read within
    /// [`FORGET_WINDOW`] (a replica that restarts may come back behind a position it once had).
    fn forget_replayed(&self) {
        let mut low = u64::MAX;
        for replica in &self.replicas {
            match replica.recent_position(FORGET_WINDOW) {
                Some(applied) => low = low.min(applied),
                None => return,
            }
        }
        if let Ok(mut pending) = self.pending.lock() {
            pending.retain(|_, lsn| *lsn > low);
        }
    }

    pub(crate) async fn close(&self) {
        self.primary_readers.close().await;
        for replica in &self.replicas {
            replica.pool.close().await;
        }
    }
}

/// The answer of a replica to "how far have you replayed?".
enum Probe {
    /// Replayed up to this position.
    At(u64),
    /// Did not answer now.
    Failed,
    /// Failed recently; not asked during the back-off.
    Down,
}

#[derive(Default)]
struct ReplicaState {
    /// (when read, replay position) of the last successful check.
    seen: Option<(Instant, u64)>,
    /// Skip the replica until then.
    down_until: Option<Instant>,
}

/// A replica, and what we last learned about it.
struct Replica {
    pool: PgPool,
    state: Mutex<ReplicaState>,
}

impl Replica {
    fn new(pool: PgPool) -> Self {
        Replica {
            pool,
            state: Mutex::new(ReplicaState::default()),
        }
    }

    /// Asks the replica how far it has replayed, unless it failed within the back-off.
    async fn position(&self) -> Probe {
        let down = self
            .state
            .lock()
            .ok()
            .and_then(|state| state.down_until)
            .is_some_and(|until| Instant::now() < until);
        if down {
            return Probe::Down;
        }
        let fresh = tokio::time::timeout(PROBE_TIMEOUT, replay_lsn(&self.pool))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!("replica did not answer within {PROBE_TIMEOUT:?}");
                None
            });
        if let Ok(mut state) = self.state.lock() {
            let now = Instant::now();
            match fresh {
                Some(lsn) => {
                    state.seen = Some((now, lsn));
                    state.down_until = None;
                }
                None => {
                    state.seen = None;
                    state.down_until = Some(now + DOWN_BACKOFF);
                }
            }
        }
        match fresh {
            Some(lsn) => Probe::At(lsn),
            None => Probe::Failed,
        }
    }

    /// The last replay position read, when it was read within `window`.
    fn recent_position(&self, window: Duration) -> Option<u64> {
        let (at, lsn) = self.state.lock().ok()?.seen?;
        (at.elapsed() < window).then_some(lsn)
    }
}

/// A primary WAL position at or past the commit record of every transaction that has
/// committed so far.
///
/// With `synchronous_commit` on (any level but `off`), a commit returns only once its record
/// is flushed, so the flush position is past it, and it is an end-of-record position a replica
/// reaches exactly. With `off`, the record may not be flushed (nor written) yet: then the
/// insert position, which may lie just past a page header a replica reports only once the next
/// record arrives; such a user reads from the primary a little longer.
async fn primary_lsn(primary: &Conns<sqlx::Postgres>) -> Option<u64> {
    let row = sqlx::query_as::<_, (String, String, String)>(
        "SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text, \
         current_setting('synchronous_commit')",
    )
    .fetch_one(primary)
    .await
    .map_err(|e| tracing::warn!(error = %e, "cannot read the primary's WAL position"))
    .ok()?;
    let (flush, insert, synchronous_commit) = row;
    if synchronous_commit == "off" {
        parse_lsn(&insert)
    } else {
        parse_lsn(&flush)
    }
}

/// The WAL position a replica has replayed, or `None` when it cannot say (down, or not a
/// replica at all).
async fn replay_lsn(replica: &PgPool) -> Option<u64> {
    let text = sqlx::query_scalar::<_, Option<String>>("SELECT pg_last_wal_replay_lsn()::text")
        .fetch_one(replica)
        .await
        .map_err(|e| tracing::warn!(error = %e, "replica did not answer"))
        .ok()?;
    if text.is_none() {
        tracing::warn!("a configured replica is not in recovery; not reading from it");
    }
    parse_lsn(&text?)
}

/// `"16/B374D848"` → a comparable number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    Some((high << 32) | low)
}

#[cfg(test)]
mod tests {
    use super::parse_lsn;

    #[test]
    fn lsns_compare_as_numbers() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert!(parse_lsn("1/0").expect("parses") > parse_lsn("0/FFFFFFFF").expect("parses"));
        assert_eq!(parse_lsn("garbage"), None);
    }
}
