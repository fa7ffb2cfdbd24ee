//! Palpo storage: repository traits, their sqlx implementation for PostgreSQL, MySQL/MariaDB
//! and SQLite, an optional Redis read-through cache, primary/replica read routing, and
//! cross-process wake-ups over Redis pub/sub ([`wakeups`]).
//!
//! ```text
//! services ──▶ Arc<dyn Repo> ──▶ [cache::Cached (Redis)] ──▶ sql::SqlStore ──▶ db::Db
//!                                                                            ├─ primary pool
//!                                                                            └─ ReadRouter (replicas / SQLite readers)
//! ```
//! All SQL of the project lives in this crate.

pub mod cache;
pub mod conns;
pub mod db;
pub mod error;
pub mod model;
pub mod replica;
pub mod repo;
pub mod sql;
pub mod sqlite_tx;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wakeups;

use std::sync::Arc;

use palpo_core::config::{CacheConfig, DatabaseConfig};

pub use cache::{Cached, RedisCache};
pub use db::{Backend, Db, LockTurn, RoomWriteLock};
pub use error::{Result, StorageError};
pub use repo::EphemeralRepo;
pub use repo::{
    AccountDataRepo, AliasRepo, DeviceRepo, E2eeRepo, KeyRepo, ProfileRepo, RoomRepo,
    SlidingSyncRepo, UiaRepo, UserRepo,
};
pub use wakeups::{Subscription, Wakeup, Wakeups};

/// Every repository the services use, ready to share.
#[derive(Clone)]
pub struct Storage {
    pub users: Arc<dyn UserRepo>,
    pub devices: Arc<dyn DeviceRepo>,
    pub uia: Arc<dyn UiaRepo>,
    pub rooms: Arc<dyn RoomRepo>,
    pub aliases: Arc<dyn AliasRepo>,
    pub profiles: Arc<dyn ProfileRepo>,
    pub keys: Arc<dyn KeyRepo>,
    /// Receipts, typing and presence; not cached (sync reads them by stream position).
    pub ephemeral: Arc<dyn EphemeralRepo>,
    pub account_data: Arc<dyn AccountDataRepo>,
    /// Device keys, one-time keys, device-list changes, to-device messages; not cached (sync
    /// reads them by stream position, and claims must see every write).
    pub e2ee: Arc<dyn E2eeRepo>,
    /// Sliding sync connections; not cached (any process may continue a connection, so the
    /// database is the truth).
    pub sliding: Arc<dyn SlidingSyncRepo>,
    db: Arc<Db>,
    wakeups: Wakeups,
}

impl Storage {
    /// Connects to the database and applies pending migrations.
    pub async fn open(config: &DatabaseConfig) -> Result<Self> {
        let db = Db::connect(config).await?;
        db.migrate().await?;
        Ok(Self::from_db(Arc::new(db)))
    }

    /// As [`Storage::open`], with the Redis read-through cache in front of the repositories
    /// and cross-process [`Wakeups`] when `cache.redis_url` is set. A Redis that is down only
    /// logs a warning: the cache falls back to the database until Redis answers.
    pub async fn open_with_cache(config: &DatabaseConfig, cache: &CacheConfig) -> Result<Self> {
        // Checked before connecting to the database, so a bad URL fails fast.
        let redis = RedisCache::from_config(cache)?;
        let wakeups = Wakeups::from_config(cache)?;
        let db = Db::connect(config).await?;
        db.migrate().await?;
        let db = Arc::new(db);
        match redis {
            Some(redis) => {
                let redis = Arc::new(redis);
                if redis.ping().await {
                    tracing::info!(namespace = %cache.namespace, "Redis cache enabled");
                }
                Ok(Self::from_db_with_cache(db, redis).with_wakeups(wakeups))
            }
            None => Ok(Self::from_db(db)),
        }
    }

    /// The repositories on the database, read through `cache`.
    pub fn from_db_with_cache(db: Arc<Db>, cache: Arc<RedisCache>) -> Self {
        let sql = Arc::new(sql::SqlStore::new(db.clone()));
        let store = Arc::new(Cached::new(sql::SqlStore::new(db.clone()), cache));
        Storage {
            users: store.clone(),
            devices: store.clone(),
            uia: store,
            // Not cached yet: events and state are immutable once written, and will be
            // cached by id when the read paths that need it (sync) arrive.
            rooms: sql.clone(),
            ephemeral: sql.clone(),
            aliases: sql.clone(),
            profiles: sql.clone(),
            keys: sql.clone(),
            // Not cached: sync reads it by stream position, which must match the database.
            account_data: sql.clone(),
            e2ee: sql.clone(),
            sliding: sql,
            db,
            wakeups: Wakeups::default(),
        }
    }

    /// The repositories straight on the database, without a cache.
    pub fn from_db(db: Arc<Db>) -> Self {
        let store = Arc::new(sql::SqlStore::new(db.clone()));
        Storage {
            users: store.clone(),
            devices: store.clone(),
            uia: store.clone(),
            rooms: store.clone(),
            ephemeral: store.clone(),
            aliases: store.clone(),
            profiles: store.clone(),
            keys: store.clone(),
            account_data: store.clone(),
            e2ee: store.clone(),
            sliding: store,
            db,
            wakeups: Wakeups::default(),
        }
    }

    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// These repositories, announcing stream positions to (and hearing them from) the other
    /// processes on the same database through `wakeups`.
    pub fn with_wakeups(mut self, wakeups: Wakeups) -> Self {
        self.wakeups = wakeups;
        self
    }

    /// Cross-process wake-ups: disabled unless opened with a Redis URL.
    pub fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }
}
