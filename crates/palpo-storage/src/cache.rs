//! Redis read-through cache in front of the repositories.
//!
//! Cached: [`DeviceRepo::find_token`] (every authenticated request) and
//! [`UserRepo::get_user`]. Devices are not cached: `touch_device` rewrites them on every request,
//! so their entries would be invalidated as fast as they are filled, and they are read rarely.
//! Misses are never cached, so a new token or account works at once.
//!
//! Keys are `<namespace>:v1:<kind>:<id>` (`v1`: bump when a cached record's shape changes).
//!
//! Correctness rules:
//! - Every write invalidates after the inner write returns (committed). Invalidation writes a
//!   short-lived *tombstone* rather than deleting, and fills use `SET NX` and are dropped when
//!   the database read took longer than [`FILL_DEADLINE`]. So a reader that read the old row
//!   before a write committed cannot put it back after the write's invalidation.
//! - Redis is optional: every failure (down, slow, refused) is logged, rate-limited, and the
//!   call falls through to the database. Each Redis round trip is bounded by [`OP_TIMEOUT`];
//!   after a failure Redis is left alone for [`RETRY_AFTER`], so a dead Redis costs requests
//!   nothing.
//! - An invalidation that could not be written is remembered; until it has been written, no
//!   read is served from Redis, so an entry a write made stale is never served (a revoked
//!   token keeps failing) even across a Redis outage.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bb8_redis::RedisConnectionManager;
use palpo_core::config::{CacheConfig, redact_url};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    error::{Result, StorageError},
    model::{DeviceLogin, DeviceRecord, NewUser, Removed, TokenOwner, UiaSession, UserRecord},
    repo::{DeviceRepo, UiaRepo, UserRepo},
};

/// Longest we wait for Redis on one operation (pool checkout included).
pub const OP_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failure, Redis is not tried again for this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A database read older than this is not put into the cache (see [`TOMBSTONE_TTL_SECS`]).
pub const FILL_DEADLINE: Duration = Duration::from_secs(1);
/// How long a tombstone blocks fills. Must exceed `FILL_DEADLINE + OP_TIMEOUT`, so that a
/// fill from a read that began before a write always meets that write's tombstone.
pub const TOMBSTONE_TTL_SECS: u64 = 10;
/// At most one "Redis unavailable" warning per this period.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// Invalidations remembered one by one during an outage; beyond, the namespace is wiped.
const MAX_PENDING: usize = 10_000;
/// Not JSON, so it cannot be mistaken for a cached record.
const TOMBSTONE: &str = "~tombstone";
/// The key schema version.
const KEY_VERSION: &str = "v1";

/// Why a Redis operation failed. Never leaves this module: callers fall back to the database.
#[derive(Debug, thiserror::Error)]
enum CacheError {
    #[error("no connection: {0}")]
    Pool(String),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A Redis connection pool plus the bookkeeping that keeps the cache correct when Redis fails.
pub struct RedisCache {
    pool: bb8::Pool<RedisConnectionManager>,
    /// `<namespace>:v1`
    prefix: String,
    ttl_secs: u64,
    state: Mutex<State>,
    /// Set while Redis is failing, to log once when it is back.
    failing: AtomicBool,
}

#[derive(Default)]
struct State {
    /// No Redis traffic before this instant.
    down_until: Option<Instant>,
    /// Keys whose invalidation could not be written. Reads skip Redis while non-empty.
    pending: HashSet<String>,
    /// Too many pending keys: the whole namespace must be wiped before reads resume.
    wipe: bool,
    /// Bumped on every invalidation recorded while `wipe` is set, so a wipe that raced with
    /// a newer failed invalidation does not clear the flag.
    wipe_epoch: u64,
    last_warning: Option<Instant>,
    suppressed_warnings: u64,
}

/// What a lookup found.
enum Lookup<T> {
    Hit(T),
    /// Not cached: read the database and fill.
    Miss,
    /// Read the database, do not fill (tombstone, Redis unavailable, invalidations pending).
    Bypass,
}

/// One request: a command or a pipeline.
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl RedisCache {
    /// The cache of `config`, or `None` when `cache.redis_url` is unset. Does not connect:
    /// a Redis that is down at start only means reads go to the database.
    pub fn from_config(config: &CacheConfig) -> Result<Option<Self>> {
        match &config.redis_url {
            Some(url) if !url.trim().is_empty() => {
                Self::new(url, &config.namespace, config.ttl_secs).map(Some)
            }
            _ => Ok(None),
        }
    }

    pub fn new(url: &str, namespace: &str, ttl_secs: u64) -> Result<Self> {
        let manager = RedisConnectionManager::new(url).map_err(|e| {
            StorageError::Connect(format!("cache.redis_url {}: {e}", redact_url(url)))
        })?;
        let pool = bb8::Pool::builder()
            .max_size(8)
            .connection_timeout(OP_TIMEOUT)
            // Redis refusing connections will not change within one request: fail fast.
            .retry_connection(false)
            // A pooled connection is dead after Redis restarts; the checkout PING finds out.
            .test_on_check_out(true)
            .build_unchecked(manager);
        Ok(RedisCache {
            pool,
            prefix: format!("{namespace}:{KEY_VERSION}"),
            // `SET ... EX 0` is an error.
            ttl_secs: ttl_secs.max(1),
            state: Mutex::new(State::default()),
            failing: AtomicBool::new(false),
        })
    }

    /// `<namespace>:v1:<kind>:<id>`
    pub fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    /// Whether Redis answers now. For a startup log line; the cache works either way.
    pub async fn ping(&self) -> bool {
        let result = self
            .request::<String>(Request::Cmd(&redis::cmd("PING")))
            .await;
        match result {
            Ok(_) => true,
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock guards plain bookkeeping that no code path leaves half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn request<T: redis::FromRedisValue>(
        &self,
        request: Request<'_>,
    ) -> std::result::Result<T, CacheError> {
        let attempt = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| CacheError::Pool(e.to_string()))?;
            let value = match request {
                Request::Cmd(cmd) => cmd.query_async(&mut *conn).await?,
                Request::Pipe(pipe) => pipe.query_async(&mut *conn).await?,
            };
            Ok(value)
        };
        let result = tokio::time::timeout(OP_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(CacheError::Timeout(OP_TIMEOUT)));
        if result.is_ok() && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis cache reachable again");
        }
        result
    }

    /// Records a failure: back off, and warn unless we warned recently.
    fn failed(&self, error: &CacheError) {
        self.failing.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let mut state = self.state();
        state.down_until = Some(now + RETRY_AFTER);
        if state
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            tracing::warn!(
                %error,
                suppressed = state.suppressed_warnings,
                "Redis cache unavailable; using the database"
            );
            state.last_warning = Some(now);
            state.suppressed_warnings = 0;
        } else {
            state.suppressed_warnings += 1;
        }
    }

    /// Whether reads may use Redis now. Writes any invalidations left over from an outage
    /// first; until they are written, the answer is no.
    async fn ready(&self) -> bool {
        let (pending, wipe, epoch) = {
            let state = self.state();
            if state.down_until.is_some_and(|until| Instant::now() < until) {
                return false;
            }
            if state.pending.is_empty() && !state.wipe {
                return true;
            }
            let pending: Vec<String> = state.pending.iter().cloned().collect();
            (pending, state.wipe, state.wipe_epoch)
        };
        let flushed = if wipe {
            self.wipe_namespace().await
        } else {
            self.write_tombstones(&pending).await
        };
        if let Err(e) = flushed {
            self.failed(&e);
            return false;
        }
        let mut state = self.state();
        for key in &pending {
            state.pending.remove(key);
        }
        if wipe && state.wipe_epoch == epoch {
            state.wipe = false;
            state.pending.clear();
        }
        state.pending.is_empty() && !state.wipe
    }

    async fn lookup<T: DeserializeOwned>(&self, key: &str) -> Lookup<T> {
        if !self.ready().await {
            return Lookup::Bypass;
        }
        let found = self
            .request::<Option<String>>(Request::Cmd(redis::cmd("GET").arg(key)))
            .await;
        match found {
            Ok(None) => Lookup::Miss,
            Ok(Some(value)) if value == TOMBSTONE => Lookup::Bypass,
            Ok(Some(value)) => match serde_json::from_str(&value) {
                Ok(record) => Lookup::Hit(record),
                Err(e) => {
                    // Unreadable: drop it so the next read fills a good one.
                    tracing::warn!(key, error = %e, "malformed cache entry");
                    self.invalidate(vec![key.to_owned()]).await;
                    Lookup::Bypass
                }
            },
            Err(e) => {
                self.failed(&e);
                Lookup::Bypass
            }
        }
    }

    /// Caches `value`, read from the database starting at `read_started`, unless the read was
    /// slow or the key holds a tombstone or a value already.
    async fn fill<T: Serialize>(&self, key: &str, value: &T, read_started: Instant) {
        if read_started.elapsed() > FILL_DEADLINE {
            return;
        }
        let Ok(json) = serde_json::to_string(value) else {
            return;
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(json)
            .arg("EX")
            .arg(self.ttl_secs)
            .arg("NX");
        if let Err(e) = self.request::<redis::Value>(Request::Cmd(&cmd)).await {
            self.failed(&e);
        }
    }

    /// Makes `keys` stale everywhere. Called after the write committed.
    async fn invalidate(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        if self.ready().await {
            match self.write_tombstones(&keys).await {
                Ok(()) => return,
                Err(e) => self.failed(&e),
            }
        }
        let mut state = self.state();
        if state.wipe {
            state.wipe_epoch += 1;
        } else if state.pending.len() + keys.len() > MAX_PENDING {
            state.wipe = true;
            state.wipe_epoch += 1;
            state.pending.clear();
        } else {
            state.pending.extend(keys);
        }
    }

    async fn write_tombstones(&self, keys: &[String]) -> std::result::Result<(), CacheError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(key)
                .arg(TOMBSTONE)
                .arg("EX")
                .arg(TOMBSTONE_TTL_SECS)
                .ignore();
        }
        self.request::<()>(Request::Pipe(&pipe)).await
    }

    /// Deletes every key of this namespace and version.
    async fn wipe_namespace(&self) -> std::result::Result<(), CacheError> {
        let pattern = format!("{}:*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = self.request(Request::Cmd(&scan)).await?;
            if !keys.is_empty() {
                self.request::<()>(Request::Cmd(redis::cmd("DEL").arg(&keys)))
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Read-through: the cached record under `key`, else `load()` (filling the cache when it
    /// found something).
    async fn read_through<T, F, Fut>(&self, key: &str, load: F) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let fill = match self.lookup::<T>(key).await {
            Lookup::Hit(record) => return Ok(Some(record)),
            Lookup::Miss => true,
            Lookup::Bypass => false,
        };
        let started = Instant::now();
        let record = load().await?;
        if fill && let Some(record) = &record {
            self.fill(key, record, started).await;
        }
        Ok(record)
    }

    fn user_key(&self, user_id: &str) -> String {
        self.key("user", user_id)
    }

    fn token_keys(&self, token_hashes: &[String]) -> Vec<String> {
        token_hashes
            .iter()
            .map(|hash| self.key("token", hash))
            .collect()
    }
}

/// The repositories of `inner`, read through `cache`.
pub struct Cached<S> {
    inner: S,
    cache: Arc<RedisCache>,
}

impl<S> Cached<S> {
    pub fn new(inner: S, cache: Arc<RedisCache>) -> Self {
        Cached { inner, cache }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn cache(&self) -> &Arc<RedisCache> {
        &self.cache
    }
}

#[async_trait]
impl<S: UserRepo> UserRepo for Cached<S> {
    // Misses are not cached, so a new account has nothing to invalidate.
    async fn create_user(&self, user: &NewUser) -> Result<()> {
        self.inner.create_user(user).await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>> {
        let key = self.cache.user_key(user_id);
        self.cache
            .read_through(&key, || self.inner.get_user(user_id))
            .await
    }

    async fn set_password_hash(&self, user_id: &str, hash: Option<&str>) -> Result<bool> {
        let result = self.inner.set_password_hash(user_id, hash).await;
        // Also on error: a failed commit acknowledgement may hide a committed write.
        self.cache
            .invalidate(vec![self.cache.user_key(user_id)])
            .await;
        result
    }

    async fn deactivate_user(&self, user_id: &str) -> Result<()> {
        let result = self.inner.deactivate_user(user_id).await;
        self.cache
            .invalidate(vec![self.cache.user_key(user_id)])
            .await;
        result
    }

    async fn count_users(&self) -> Result<i64> {
        self.inner.count_users().await
    }
}

#[async_trait]
impl<S: DeviceRepo> DeviceRepo for Cached<S> {
    async fn login_device(&self, login: &DeviceLogin) -> Result<Vec<String>> {
        let replaced = self.inner.login_device(login).await?;
        self.cache
            .invalidate(self.cache.token_keys(&replaced))
            .await;
        Ok(replaced)
    }

    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceRecord>> {
        self.inner.get_device(user_id, device_id).await
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>> {
        self.inner.list_devices(user_id).await
    }

    async fn set_device_display_name(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<bool> {
        self.inner
            .set_device_display_name(user_id, device_id, display_name)
            .await
    }

    async fn delete_devices(&self, user_id: &str, device_ids: &[String]) -> Result<Removed> {
        let removed = self.inner.delete_devices(user_id, device_ids).await?;
        self.cache
            .invalidate(self.cache.token_keys(&removed.token_hashes))
            .await;
        Ok(removed)
    }

    async fn delete_all_devices(&self, user_id: &str, keep: Option<&str>) -> Result<Removed> {
        let removed = self.inner.delete_all_devices(user_id, keep).await?;
        self.cache
            .invalidate(self.cache.token_keys(&removed.token_hashes))
            .await;
        Ok(removed)
    }

    async fn find_token(&self, token_hash: &str) -> Result<Option<TokenOwner>> {
        let key = self.cache.key("token", token_hash);
        self.cache
            .read_through(&key, || self.inner.find_token(token_hash))
            .await
    }

    async fn touch_device(
        &self,
        user_id: &str,
        device_id: &str,
        ip: Option<&str>,
        ts: i64,
    ) -> Result<()> {
        self.inner.touch_device(user_id, device_id, ip, ts).await
    }
}

/// UIA sessions change on every round and are read once per round: not worth caching.
#[async_trait]
impl<S: UiaRepo> UiaRepo for Cached<S> {
    async fn create_session(&self, session: &UiaSession) -> Result<()> {
        self.inner.create_session(session).await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<UiaSession>> {
        self.inner.get_session(session_id).await
    }

    async fn update_session(&self, session: &UiaSession) -> Result<()> {
        self.inner.update_session(session).await
    }

    async fn delete_session(&self, session_id: &str) -> Result<()> {
        self.inner.delete_session(session_id).await
    }

    async fn delete_sessions_before(&self, before: i64) -> Result<u64> {
        self.inner.delete_sessions_before(before).await
    }
}
