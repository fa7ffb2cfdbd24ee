//! Test support: a throwaway database on any backend, and Redis for cache tests.
//!
//! Enabled by the `testing` feature. Used by this crate's tests and by other crates' tests
//! (add `palpo-storage = { workspace = true, features = ["testing"] }` to `[dev-dependencies]`).
//!
//! Environment:
//! - `PALPO_TEST_BACKENDS`: comma list of `sqlite`, `postgres`, `mysql` (default: all three).
//! - `PALPO_TEST_POSTGRES_URL`: a server where we may create databases
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - `PALPO_TEST_MYSQL_URL`: likewise (default `mysql://root@127.0.0.1:3306/test`).
//! - `PALPO_TEST_REDIS_URL`: a shared Redis (default `redis://127.0.0.1:6379`).
//! - `PALPO_TEST_REDIS_SERVER`: the `redis-server` binary for [`PrivateRedis`].
//!
//! A backend that is asked for but unreachable makes the test panic: a test must fail, never
//! silently skip, when its database is down.

use std::{
    future::Future,
    net::TcpListener,
    panic::{AssertUnwindSafe, resume_unwind},
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::FutureExt;
use palpo_core::config::{CacheConfig, DatabaseConfig, redact_url};
use rand::{Rng, distributions::Alphanumeric};
use sqlx::{Connection, mysql::MySqlConnection, postgres::PgConnection};

use crate::{
    Storage,
    db::Backend,
    model::{DeviceLogin, NewEvent, NewUser, RoomRecord},
};

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How long we wait for a test server before declaring it down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The backends the tests should run on: `PALPO_TEST_BACKENDS`, default all three.
///
/// Panics on an unknown name, so a typo cannot silently disable a backend.
pub fn backends_under_test() -> Vec<Backend> {
    let Ok(list) = std::env::var("PALPO_TEST_BACKENDS") else {
        return vec![Backend::Sqlite, Backend::Postgres, Backend::MySql];
    };
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| match name.to_ascii_lowercase().as_str() {
            "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" | "pg" => Backend::Postgres,
            "mysql" | "mariadb" => Backend::MySql,
            other => panic!(
                "PALPO_TEST_BACKENDS: unknown backend {other:?} (expected sqlite, postgres, mysql)"
            ),
        })
        .collect()
}

/// Whether `backend` is among [`backends_under_test`]. Per-backend tests return early (and say
/// so) when it is not: that is the operator's explicit choice, unlike a server being down.
pub fn backend_enabled(backend: Backend) -> bool {
    let enabled = backends_under_test().contains(&backend);
    if !enabled {
        eprintln!("{} not in PALPO_TEST_BACKENDS: not run", backend.name());
    }
    enabled
}

/// A random lowercase name, `<prefix><12 chars>`, valid as a database name on every backend.
pub fn unique_name(prefix: &str) -> String {
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(12)
        .map(|b| char::from(b).to_ascii_lowercase())
        .collect();
    format!("{prefix}{suffix}")
}

/// The server URL tests create databases on, for PostgreSQL and MySQL.
pub fn server_url(backend: Backend) -> Option<String> {
    let (var, default) = match backend {
        Backend::Postgres => ("PALPO_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        Backend::MySql => ("PALPO_TEST_MYSQL_URL", DEFAULT_MYSQL_URL),
        Backend::Sqlite => return None,
    };
    Some(std::env::var(var).unwrap_or_else(|_| default.to_owned()))
}

/// A fresh, uniquely named, empty database. Call [`TestDatabase::drop_database`] when done
/// (or use [`with_database`]); if it is forgotten, `Drop` removes the database as a fallback.
pub struct TestDatabase {
    backend: Backend,
    name: String,
    url: String,
    /// PostgreSQL/MySQL: the server URL we created the database through.
    server_url: Option<String>,
    /// SQLite: the directory holding the file; `None` once removed.
    dir: Mutex<Option<tempfile::TempDir>>,
    dropped: std::sync::atomic::AtomicBool,
}

impl TestDatabase {
    /// Creates the database. Panics, naming the server, when it cannot.
    pub async fn create(backend: Backend) -> TestDatabase {
        let name = unique_name("palpo_t_");
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("palpo-test-")
                    .tempdir()
                    .unwrap_or_else(|e| panic!("cannot create a temp dir for SQLite: {e}"));
                let url = format!("sqlite://{}/{name}.db", dir.path().display());
                TestDatabase::new(backend, name, url, None, Some(dir))
            }
            Backend::Postgres | Backend::MySql => {
                let server = server_url(backend).unwrap_or_default();
                admin_execute(backend, &server, &format!("CREATE DATABASE {name}")).await;
                let url = replace_db_name(&server, &name);
                TestDatabase::new(backend, name, url, Some(server), None)
            }
        }
    }

    fn new(
        backend: Backend,
        name: String,
        url: String,
        server_url: Option<String>,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        TestDatabase {
            backend,
            name,
            url,
            server_url,
            dir: Mutex::new(dir),
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database's name (PostgreSQL/MySQL) or file stem (SQLite).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL to connect to this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A configuration for [`Storage::open`] on this database.
    pub fn config(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.url.clone(),
            replica_urls: Vec::new(),
            max_connections: 5,
            acquire_timeout_secs: 10,
        }
    }

    /// Connects and migrates. Panics on failure.
    pub async fn storage(&self) -> Storage {
        Storage::open(&self.config()).await.unwrap_or_else(|e| {
            panic!(
                "cannot open {} test database {}: {e}",
                self.backend.name(),
                redact_url(&self.url)
            )
        })
    }

    /// Another handle on the same database, for a second server (process) on it. It never
    /// drops the database: the original handle does.
    pub fn shared_handle(&self) -> TestDatabase {
        TestDatabase {
            backend: self.backend,
            name: self.name.clone(),
            url: self.url.clone(),
            server_url: self.server_url.clone(),
            dir: Mutex::new(None),
            dropped: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// As [`TestDatabase::storage`], with the Redis cache of `cache` in front.
    pub async fn storage_with_cache(&self, cache: &CacheConfig) -> Storage {
        Storage::open_with_cache(&self.config(), cache)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot open {} test database {} with cache: {e}",
                    self.backend.name(),
                    redact_url(&self.url)
                )
            })
    }

    /// Removes the database: PostgreSQL `DROP DATABASE ... WITH (FORCE)` (ends open sessions),
    /// MySQL `DROP DATABASE`, SQLite removes the temp dir. Idempotent.
    pub async fn drop_database(&self) {
        if self.dropped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match self.backend {
            Backend::Sqlite => {
                let dir = self.dir.lock().ok().and_then(|mut dir| dir.take());
                if let Some(dir) = dir
                    && let Err(e) = dir.close()
                {
                    eprintln!("cannot remove SQLite test dir: {e}");
                }
            }
            Backend::Postgres => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                admin_execute(self.backend, self.server(), &sql).await;
            }
            Backend::MySql => {
                let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
                admin_execute(self.backend, self.server(), &sql).await;
            }
        }
    }

    fn server(&self) -> &str {
        self.server_url.as_deref().unwrap_or_default()
    }
}

impl Drop for TestDatabase {
    // Fallback for a forgotten `drop_database`: do it on a thread with its own runtime, since
    // we may be inside (or outside) a Tokio runtime here.
    fn drop(&mut self) {
        if self.dropped.load(std::sync::atomic::Ordering::SeqCst) || self.backend == Backend::Sqlite
        {
            // SQLite's TempDir removes itself when dropped.
            return;
        }
        let this = TestDatabase {
            backend: self.backend,
            name: std::mem::take(&mut self.name),
            url: std::mem::take(&mut self.url),
            server_url: self.server_url.take(),
            dir: Mutex::new(None),
            dropped: std::sync::atomic::AtomicBool::new(false),
        };
        let dropper =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(this.drop_database()),
                    Err(e) => eprintln!("cannot drop test database {}: {e}", this.name),
                }
            });
        // A panic here would abort during unwinding; report instead.
        if dropper.join().is_err() {
            eprintln!("dropping a test database failed");
        }
    }
}

/// Runs `body` on a fresh database of `backend`, then drops the database, also when the
/// body panics (the panic is then resumed, so the test still fails).
pub async fn with_database<F, Fut, T>(backend: Backend, body: F) -> T
where
    F: FnOnce(Arc<TestDatabase>) -> Fut,
    Fut: Future<Output = T>,
{
    let db = Arc::new(TestDatabase::create(backend).await);
    let result = AssertUnwindSafe(body(db.clone())).catch_unwind().await;
    db.drop_database().await;
    match result {
        Ok(value) => value,
        Err(panic) => resume_unwind(panic),
    }
}

/// Runs `body` with migrated [`Storage`] on a fresh database of `backend` (no cache); closes
/// the pools and drops the database afterwards, panic or not.
pub async fn with_storage<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Storage) -> Fut,
    Fut: Future<Output = ()>,
{
    with_database(backend, |db| async move {
        let storage = db.storage().await;
        let result = AssertUnwindSafe(body(storage.clone())).catch_unwind().await;
        storage.db().close().await;
        if let Err(panic) = result {
            resume_unwind(panic);
        }
    })
    .await
}

/// As [`with_storage`], with the Redis cache (shared test Redis, a fresh namespace) in front.
/// The namespace's keys are deleted afterwards.
pub async fn with_cached_storage<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Storage, CacheConfig) -> Fut,
    Fut: Future<Output = ()>,
{
    let cache = test_cache_config(&redis_url());
    assert_redis_reachable(&redis_url()).await;
    let result = AssertUnwindSafe(with_database(backend, |db| {
        let cache = cache.clone();
        async move {
            let storage = db.storage_with_cache(&cache).await;
            let result = AssertUnwindSafe(body(storage.clone(), cache))
                .catch_unwind()
                .await;
            storage.db().close().await;
            if let Err(panic) = result {
                resume_unwind(panic);
            }
        }
    }))
    .catch_unwind()
    .await;
    delete_namespace(&redis_url(), &cache.namespace).await;
    if let Err(panic) = result {
        resume_unwind(panic);
    }
}

/// Runs one statement on the server (not in the test database). Panics when unreachable.
async fn admin_execute(backend: Backend, server: &str, sql: &str) {
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        panic!(
            "{} test server {} {what}: {e}\n(start it, point {} at it, or leave `{}` out of \
             PALPO_TEST_BACKENDS)",
            backend.name(),
            redact_url(server),
            match backend {
                Backend::Postgres => "PALPO_TEST_POSTGRES_URL",
                _ => "PALPO_TEST_MYSQL_URL",
            },
            backend.name(),
        )
    };
    let timed_out: &dyn std::fmt::Display = &"timed out";
    match backend {
        Backend::Postgres => {
            let mut conn =
                match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(server)).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => fail("is unreachable", &e),
                    Err(_) => fail("is unreachable", timed_out),
                };
            if let Err(e) = sqlx::raw_sql(sql).execute(&mut conn).await {
                fail(&format!("refused `{sql}`"), &e);
            }
            let _ = conn.close().await;
        }
        Backend::MySql => {
            let mut conn =
                match tokio::time::timeout(CONNECT_TIMEOUT, MySqlConnection::connect(server)).await
                {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => fail("is unreachable", &e),
                    Err(_) => fail("is unreachable", timed_out),
                };
            if let Err(e) = sqlx::raw_sql(sql).execute(&mut conn).await {
                fail(&format!("refused `{sql}`"), &e);
            }
            let _ = conn.close().await;
        }
        Backend::Sqlite => {}
    }
}

/// `scheme://user@host:port/old?query` → the same with `/name` as the path.
fn replace_db_name(server: &str, name: &str) -> String {
    let mut url = url::Url::from_str(server)
        .unwrap_or_else(|e| panic!("bad test server URL {}: {e}", redact_url(server)));
    url.set_path(&format!("/{name}"));
    url.to_string()
}

// ---------------------------------------------------------------------------------------------
// Redis

/// The shared test Redis: `PALPO_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("PALPO_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// A unique cache namespace, so concurrent tests sharing one Redis never see each other's keys.
pub fn unique_namespace() -> String {
    unique_name("palpo_t_")
}

/// A cache configuration on `redis_url` with a fresh namespace and a 300 s TTL.
pub fn test_cache_config(redis_url: &str) -> CacheConfig {
    CacheConfig {
        redis_url: Some(redis_url.to_owned()),
        namespace: unique_namespace(),
        ttl_secs: 300,
    }
}

/// A plain connection to `url`. Panics, naming the server, when it is unreachable.
pub async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url)
        .unwrap_or_else(|e| panic!("bad Redis URL {}: {e}", redact_url(url)));
    match tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "test Redis {} is unreachable: {e} (start it or set PALPO_TEST_REDIS_URL)",
            redact_url(url)
        ),
        Err(_) => panic!("test Redis {} is unreachable: timed out", redact_url(url)),
    }
}

/// Panics unless Redis at `url` answers PING.
pub async fn assert_redis_reachable(url: &str) {
    let mut conn = redis_connection(url).await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("test Redis {} does not answer PING: {e}", redact_url(url)));
    assert_eq!(pong, "PONG");
}

/// Every key of `namespace` (`<namespace>:*`).
pub async fn namespace_keys(url: &str, namespace: &str) -> Vec<String> {
    let mut conn = redis_connection(url).await;
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("SCAN on test Redis failed: {e}"));
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Deletes every key of `namespace`. Best effort: a Redis that is gone has nothing to clean.
pub async fn delete_namespace(url: &str, namespace: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(Ok(mut conn)) =
        tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await
    else {
        return;
    };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, batch)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !batch.is_empty() {
            let _: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(&batch).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// A `redis-server` of our own on a free port, so a test can kill it mid-run.
/// No persistence; killed (SIGKILL) on drop.
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts the server and waits until it answers PING. Panics when it cannot.
    pub async fn start() -> PrivateRedis {
        let binary =
            std::env::var("PALPO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("palpo-redis-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for redis-server: {e}"));
        // The port is free when we pick it but may be taken before redis binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {binary} (set PALPO_TEST_REDIS_SERVER): {e}")
                });
            let url = format!("redis://127.0.0.1:{port}");
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: most likely the port was taken
                }
                if ping(&url).await {
                    return PrivateRedis {
                        child: Some(child),
                        port,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("{binary} did not come up on a free port");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again (empty) on the same port, after [`PrivateRedis::kill`], and
    /// waits until it answers PING. Panics when it cannot.
    pub async fn restart(&mut self) {
        self.kill();
        let binary =
            std::env::var("PALPO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let mut child = Command::new(&binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self._dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot restart {binary}: {e}"));
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{binary} exited on restart ({status}): port {} taken?",
                    self.port
                );
            }
            if ping(&self.url()).await {
                self.child = Some(child);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{binary} did not come back on port {}", self.port);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(pong)) if pong == "PONG"
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// Runs a repository scenario on `backend` (through the Redis cache when `cached`); returns at
/// once when `backend` is not under test. Used by [`conformance!`](crate::conformance).
pub async fn run_scenario<F, Fut>(backend: Backend, cached: bool, scenario: F)
where
    F: FnOnce(Storage) -> Fut,
    Fut: Future<Output = ()>,
{
    if !backend_enabled(backend) {
        return;
    }
    if cached {
        with_cached_storage(backend, |storage, _| scenario(storage)).await
    } else {
        with_storage(backend, scenario).await
    }
}

/// For each `async fn scenario(Storage)`, a module `scenario` with one test per backend
/// (`sqlite`, `postgres`, `mysql`), and with `cached` also one per backend through Redis
/// (`sqlite_cached`...).
#[macro_export]
macro_rules! conformance {
    (cached: $($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use $crate::{Backend, testing::run_scenario};
            #[tokio::test]
            async fn sqlite() { run_scenario(Backend::Sqlite, false, super::$scenario).await }
            #[tokio::test]
            async fn postgres() { run_scenario(Backend::Postgres, false, super::$scenario).await }
            #[tokio::test]
            async fn mysql() { run_scenario(Backend::MySql, false, super::$scenario).await }
            #[tokio::test]
            async fn sqlite_cached() { run_scenario(Backend::Sqlite, true, super::$scenario).await }
            #[tokio::test]
            async fn postgres_cached() { run_scenario(Backend::Postgres, true, super::$scenario).await }
            #[tokio::test]
            async fn mysql_cached() { run_scenario(Backend::MySql, true, super::$scenario).await }
        }
    )*};
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use $crate::{Backend, testing::run_scenario};
            #[tokio::test]
            async fn sqlite() { run_scenario(Backend::Sqlite, false, super::$scenario).await }
            #[tokio::test]
            async fn postgres() { run_scenario(Backend::Postgres, false, super::$scenario).await }
            #[tokio::test]
            async fn mysql() { run_scenario(Backend::MySql, false, super::$scenario).await }
        }
    )*};
}

/// A test user `user_id` (created at 1, no admin, a placeholder password hash).
pub fn new_user(user_id: &str) -> NewUser {
    NewUser {
        user_id: user_id.to_owned(),
        password_hash: Some("hash-0".to_owned()),
        is_admin: false,
        created_at: 1,
    }
}

/// A login of `user_id`'s device `device_id` with the token hashed `token_hash`, at 1.
pub fn device_login(user_id: &str, device_id: &str, token_hash: &str) -> DeviceLogin {
    DeviceLogin {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        display_name: None,
        token_hash: token_hash.to_owned(),
        ip: None,
        now: 1,
    }
}

/// The `n`th test event of `room`, built on its current head: a `{}` PDU with no state key,
/// membership, relation or transaction (set those with struct update syntax).
pub fn event_on(
    room: &RoomRecord,
    event_id: &str,
    event_type: &str,
    sender: &str,
    n: i64,
) -> NewEvent {
    NewEvent {
        event_id: event_id.to_owned(),
        room_id: room.room_id.clone(),
        depth: n + 1,
        event_type: event_type.to_owned(),
        state_key: None,
        sender: sender.to_owned(),
        origin_server_ts: 1000 + n,
        pdu_json: "{}".to_owned(),
        prev_events: room.forward_extremities.clone(),
        outlier: false,
        soft_failed: false,
        rejected_reason: None,
        expected_write_version: room.write_version,
        extends_head: true,
        membership: None,
        redacts: None,
        txn: None,
        thread_id: None,
        sent_with: None,
    }
}

/// Creates `room_id` (room version `version`) and persists, one after the other, events of
/// `(type, sender, membership)` with ids `${room_id}{n}`: member events are state keyed by
/// their sender, the others messages.
pub async fn room_with_events(
    storage: &crate::Storage,
    room_id: &str,
    version: &str,
    events: &[(&str, &str, Option<&str>)],
) {
    storage
        .rooms
        .create_room(&crate::model::NewRoom {
            room_id: room_id.to_owned(),
            room_version: version.to_owned(),
            creator: "@alice:test".to_owned(),
            is_public: false,
            created_at: 1,
        })
        .await
        .expect("create room");
    for (n, (event_type, sender, membership)) in events.iter().enumerate() {
        let room = storage
            .rooms
            .get_room(room_id)
            .await
            .expect("room")
            .expect("room");
        let is_member = *event_type == "m.room.member";
        storage
            .rooms
            .persist_event(&NewEvent {
                state_key: is_member.then(|| (*sender).to_owned()),
                membership: membership.map(str::to_owned),
                ..event_on(
                    &room,
                    &format!("${room_id}{n}"),
                    event_type,
                    sender,
                    n as i64,
                )
            })
            .await
            .expect("persist");
    }
}
