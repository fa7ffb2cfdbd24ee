//! The Redis read-through cache, against a real Redis (no mocks), on every backend.
//!
//! - The shared Redis (`PALPO_TEST_REDIS_URL`) with a fresh namespace per test, for hits and
//!   invalidation.
//! - A private `redis-server` per test ([`PrivateRedis`]) where the test kills or pauses it.

use std::{
    panic::{AssertUnwindSafe, resume_unwind},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use futures::FutureExt;
use palpo_core::config::CacheConfig;
use palpo_storage::{
    Backend, Storage,
    model::{TokenOwner, UserRecord},
    on_pool,
    testing::{
        PrivateRedis, TestDatabase, backend_enabled, delete_namespace, device_login as login,
        new_user as user, redis_connection, redis_url, test_cache_config, unique_namespace,
        with_database,
    },
};

macro_rules! per_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use palpo_storage::Backend;

            #[tokio::test]
            async fn sqlite() {
                super::run(Backend::Sqlite, super::$scenario).await
            }
            #[tokio::test]
            async fn postgres() {
                super::run(Backend::Postgres, super::$scenario).await
            }
            #[tokio::test]
            async fn mysql() {
                super::run(Backend::MySql, super::$scenario).await
            }
        }
    )*};
}

per_backend!(
    hits_are_served_from_redis,
    misses_are_not_cached,
    every_write_invalidates,
    redis_killed_mid_test_changes_no_result,
    redis_stalled_during_logout_never_serves_the_revoked_token,
    lost_invalidation_is_written_before_redis_serves_again,
    redis_down_from_the_start,
);

async fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Arc<TestDatabase>) -> Fut,
    Fut: Future<Output = ()>,
{
    if backend_enabled(backend) {
        with_database(backend, scenario).await
    }
}

/// Cached storage on the shared Redis; `body` gets it and its namespace, which is deleted
/// afterwards, also when the body panics.
async fn on_shared_redis<F, Fut>(db: &TestDatabase, body: F)
where
    F: FnOnce(Storage, CacheConfig) -> Fut,
    Fut: Future<Output = ()>,
{
    let cache = test_cache_config(&redis_url());
    let storage = db.storage_with_cache(&cache).await;
    let result = AssertUnwindSafe(body(storage.clone(), cache.clone()))
        .catch_unwind()
        .await;
    storage.db().close().await;
    delete_namespace(&redis_url(), &cache.namespace).await;
    if let Err(panic) = result {
        resume_unwind(panic);
    }
}

fn cache_on(url: &str) -> CacheConfig {
    CacheConfig {
        redis_url: Some(url.to_owned()),
        namespace: unique_namespace(),
        ttl_secs: 300,
    }
}

fn owner(user_id: &str, device_id: &str) -> Option<TokenOwner> {
    Some(TokenOwner {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
    })
}

fn token_key(cache: &CacheConfig, hash: &str) -> String {
    format!("{}:v1:token:{hash}", cache.namespace)
}

fn user_key(cache: &CacheConfig, user_id: &str) -> String {
    format!("{}:v1:user:{user_id}", cache.namespace)
}

async fn redis_get(url: &str, key: &str) -> Option<String> {
    let mut conn = redis_connection(url).await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("GET")
}

/// A cached record (not a tombstone) under `key`.
async fn cached<T: serde::de::DeserializeOwned>(url: &str, key: &str) -> Option<T> {
    redis_get(url, key)
        .await
        .and_then(|value| serde_json::from_str(&value).ok())
}

/// Changes the database behind the cache's back.
async fn raw_execute(storage: &Storage, sql: &str, arg: &str) {
    on_pool!(storage.db().primary(), sql, |p, sql| {
        sqlx::query(sql)
            .bind(arg)
            .execute(p)
            .await
            .expect("raw statement");
    });
}

async fn get_user(storage: &Storage, user_id: &str) -> UserRecord {
    storage
        .users
        .get_user(user_id)
        .await
        .expect("get_user")
        .expect("user exists")
}

async fn hits_are_served_from_redis(db: Arc<TestDatabase>) {
    on_shared_redis(&db, |s, cache| async move {
        let url = redis_url();
        s.users
            .create_user(&user("@alice:x"))
            .await
            .expect("create");
        s.devices
            .login_device(&login("@alice:x", "D", "h1"))
            .await
            .expect("login");

        assert_eq!(
            s.devices.find_token("h1").await.expect("find"),
            owner("@alice:x", "D")
        );
        let key = token_key(&cache, "h1");
        assert_eq!(
            cached::<TokenOwner>(&url, &key).await,
            owner("@alice:x", "D")
        );
        let mut conn = redis_connection(&url).await;
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("TTL");
        assert!(
            (1..=300).contains(&ttl),
            "TTL from cache.ttl_secs, got {ttl}"
        );

        // Gone from the database behind the cache's back: still served, so from Redis.
        raw_execute(&s, "DELETE FROM access_tokens WHERE token_hash = ?", "h1").await;
        assert_eq!(
            s.devices.find_token("h1").await.expect("find"),
            owner("@alice:x", "D")
        );

        // Same for users, until a write through the cache invalidates.
        let before = get_user(&s, "@alice:x").await;
        assert!(!before.is_admin);
        assert!(
            cached::<UserRecord>(&url, &user_key(&cache, "@alice:x"))
                .await
                .is_some()
        );
        raw_execute(
            &s,
            "UPDATE users SET password_hash = 'changed' WHERE user_id = ?",
            "@alice:x",
        )
        .await;
        assert_eq!(
            get_user(&s, "@alice:x").await,
            before,
            "served from the cache"
        );
        assert!(
            s.users
                .set_password_hash("@alice:x", Some("hash-1"))
                .await
                .expect("set")
        );
        let after = get_user(&s, "@alice:x").await;
        assert_eq!(after.password_hash.as_deref(), Some("hash-1"));
    })
    .await
}

async fn misses_are_not_cached(db: Arc<TestDatabase>) {
    on_shared_redis(&db, |s, cache| async move {
        let url = redis_url();
        assert_eq!(s.devices.find_token("new").await.expect("find"), None);
        assert_eq!(s.users.get_user("@new:x").await.expect("get"), None);
        assert_eq!(redis_get(&url, &token_key(&cache, "new")).await, None);
        assert_eq!(redis_get(&url, &user_key(&cache, "@new:x")).await, None);
        // So a token and an account work the moment they exist.
        s.users.create_user(&user("@new:x")).await.expect("create");
        s.devices
            .login_device(&login("@new:x", "D", "new"))
            .await
            .expect("login");
        assert_eq!(
            s.devices.find_token("new").await.expect("find"),
            owner("@new:x", "D")
        );
        assert_eq!(get_user(&s, "@new:x").await.user_id, "@new:x");
    })
    .await
}

async fn every_write_invalidates(db: Arc<TestDatabase>) {
    on_shared_redis(&db, |s, cache| async move {
        let url = redis_url();
        let warm_token = |hash: &'static str, expected: Option<TokenOwner>| {
            let s = s.clone();
            let key = token_key(&cache, hash);
            let url = url.clone();
            async move {
                assert_eq!(s.devices.find_token(hash).await.expect("find"), expected);
                // Cached now: the write below must really invalidate, not just miss.
                assert_eq!(cached::<TokenOwner>(&url, &key).await, expected);
            }
        };
        s.users
            .create_user(&user("@alice:x"))
            .await
            .expect("create");
        for (device, hash) in [("A", "ta"), ("B", "tb"), ("C", "tc"), ("D", "td")] {
            s.devices
                .login_device(&login("@alice:x", device, hash))
                .await
                .expect("login");
        }

        // Re-login replaces the token.
        warm_token("ta", owner("@alice:x", "A")).await;
        s.devices
            .login_device(&login("@alice:x", "A", "ta2"))
            .await
            .expect("re-login");
        assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
        assert_eq!(
            s.devices.find_token("ta2").await.expect("find"),
            owner("@alice:x", "A")
        );

        // Logout (delete one device).
        warm_token("tb", owner("@alice:x", "B")).await;
        s.devices
            .delete_devices("@alice:x", &["B".to_owned()])
            .await
            .expect("delete");
        assert_eq!(s.devices.find_token("tb").await.expect("find"), None);

        // Logout everywhere but one.
        warm_token("tc", owner("@alice:x", "C")).await;
        warm_token("td", owner("@alice:x", "D")).await;
        s.devices
            .delete_all_devices("@alice:x", Some("D"))
            .await
            .expect("delete all but D");
        assert_eq!(s.devices.find_token("tc").await.expect("find"), None);
        assert_eq!(s.devices.find_token("ta2").await.expect("find"), None);
        assert_eq!(
            s.devices.find_token("td").await.expect("find"),
            owner("@alice:x", "D")
        );
        s.devices
            .delete_all_devices("@alice:x", None)
            .await
            .expect("delete all");
        assert_eq!(s.devices.find_token("td").await.expect("find"), None);

        // Password change.
        let key = user_key(&cache, "@alice:x");
        assert_eq!(
            get_user(&s, "@alice:x").await.password_hash.as_deref(),
            Some("hash-0")
        );
        assert!(cached::<UserRecord>(&url, &key).await.is_some());
        assert!(
            s.users
                .set_password_hash("@alice:x", Some("hash-1"))
                .await
                .expect("set")
        );
        assert_eq!(
            get_user(&s, "@alice:x").await.password_hash.as_deref(),
            Some("hash-1")
        );

        // Right after a write, its tombstone keeps the fresh record out of Redis for a few
        // seconds, so nothing stale can be filled in by a read that began before it.
        assert_eq!(redis_get(&url, &key).await.as_deref(), Some("~tombstone"));

        // Deactivation (bob: his record is cached, alice's is tombstoned).
        s.users.create_user(&user("@bob:x")).await.expect("create");
        let key = user_key(&cache, "@bob:x");
        assert!(!get_user(&s, "@bob:x").await.is_deactivated);
        assert_eq!(
            cached::<UserRecord>(&url, &key)
                .await
                .map(|u| u.is_deactivated),
            Some(false)
        );
        s.users.deactivate_user("@bob:x").await.expect("deactivate");
        let gone = get_user(&s, "@bob:x").await;
        assert!(gone.is_deactivated);
        assert_eq!(gone.password_hash, None);
    })
    .await
}

/// Every operation must be correct after Redis dies, and none may stall.
async fn redis_killed_mid_test_changes_no_result(db: Arc<TestDatabase>) {
    let mut redis = PrivateRedis::start().await;
    let cache = cache_on(&redis.url());
    let s = db.storage_with_cache(&cache).await;

    s.users
        .create_user(&user("@alice:x"))
        .await
        .expect("create");
    s.users.create_user(&user("@bob:x")).await.expect("create");
    s.devices
        .login_device(&login("@alice:x", "A", "ta"))
        .await
        .expect("login");
    s.devices
        .login_device(&login("@alice:x", "B", "tb"))
        .await
        .expect("login");
    s.devices
        .login_device(&login("@bob:x", "A", "bob"))
        .await
        .expect("login");
    assert_eq!(
        s.devices.find_token("ta").await.expect("find"),
        owner("@alice:x", "A")
    );
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );
    assert!(!get_user(&s, "@alice:x").await.is_deactivated);
    assert!(
        cached::<TokenOwner>(&redis.url(), &token_key(&cache, "ta"))
            .await
            .is_some()
    );

    redis.kill();
    assert!(!redis.is_running());

    let started = Instant::now();
    let timed = |what: &str, at: Instant| {
        let took = at.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{what} took {took:?} with Redis dead"
        );
    };

    let at = Instant::now();
    assert_eq!(
        s.devices.find_token("ta").await.expect("find"),
        owner("@alice:x", "A")
    );
    timed("find_token", at);
    let at = Instant::now();
    s.devices
        .delete_devices("@alice:x", &["A".to_owned()])
        .await
        .expect("logout");
    timed("logout", at);
    assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );

    let replaced = s
        .devices
        .login_device(&login("@alice:x", "B", "tb2"))
        .await
        .expect("re-login");
    assert_eq!(replaced, vec!["tb".to_owned()]);
    assert_eq!(s.devices.find_token("tb").await.expect("find"), None);
    assert_eq!(
        s.devices.find_token("tb2").await.expect("find"),
        owner("@alice:x", "B")
    );

    assert!(
        s.users
            .set_password_hash("@alice:x", Some("hash-1"))
            .await
            .expect("set")
    );
    assert_eq!(
        get_user(&s, "@alice:x").await.password_hash.as_deref(),
        Some("hash-1")
    );
    s.users
        .deactivate_user("@alice:x")
        .await
        .expect("deactivate");
    assert!(get_user(&s, "@alice:x").await.is_deactivated);
    assert!(!get_user(&s, "@bob:x").await.is_deactivated);

    let removed = s
        .devices
        .delete_all_devices("@alice:x", None)
        .await
        .expect("delete all");
    assert_eq!(removed.token_hashes, vec!["tb2".to_owned()]);
    assert_eq!(s.devices.find_token("tb2").await.expect("find"), None);
    assert_eq!(
        s.devices.find_token("bob").await.expect("find"),
        owner("@bob:x", "A")
    );
    assert_eq!(s.users.count_users().await.expect("count"), 2);

    // Well after the back-off, Redis is tried again (and fails again) without stalling.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at = Instant::now();
    assert_eq!(
        s.devices.find_token("bob").await.expect("find"),
        owner("@bob:x", "A")
    );
    timed("find_token after back-off", at);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "operations with Redis dead took {:?}",
        started.elapsed()
    );
    s.db().close().await;
}

/// Redis stops answering (but keeps its data) while a logout happens: the invalidation cannot
/// be written, and the cached owner of the revoked token must never be served again.
async fn redis_stalled_during_logout_never_serves_the_revoked_token(db: Arc<TestDatabase>) {
    let redis = PrivateRedis::start().await;
    let cache = cache_on(&redis.url());
    let s = db.storage_with_cache(&cache).await;
    s.devices
        .login_device(&login("@alice:x", "A", "ta"))
        .await
        .expect("login");
    assert_eq!(
        s.devices.find_token("ta").await.expect("find"),
        owner("@alice:x", "A")
    );
    assert!(
        cached::<TokenOwner>(&redis.url(), &token_key(&cache, "ta"))
            .await
            .is_some()
    );

    let mut admin = redis_connection(&redis.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("CLIENT PAUSE");

    let at = Instant::now();
    s.devices
        .delete_devices("@alice:x", &["A".to_owned()])
        .await
        .expect("logout");
    assert!(
        at.elapsed() < Duration::from_secs(1),
        "logout stalled: {:?}",
        at.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    // Before, during and after the pause ends.
    while Instant::now() < deadline {
        assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redis is back and the cache uses it again.
    s.devices
        .login_device(&login("@alice:x", "B", "tb"))
        .await
        .expect("login");
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );
    assert_eq!(
        cached::<TokenOwner>(&redis.url(), &token_key(&cache, "tb")).await,
        owner("@alice:x", "B")
    );
    assert_eq!(
        cached::<TokenOwner>(&redis.url(), &token_key(&cache, "ta")).await,
        None
    );
    s.db().close().await;
}

/// A cache URL where nothing listens: opening works, and so does everything else.
async fn redis_down_from_the_start(db: Arc<TestDatabase>) {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let cache = cache_on(&format!("redis://127.0.0.1:{port}"));
    let started = Instant::now();
    let s = db.storage_with_cache(&cache).await;
    s.users
        .create_user(&user("@alice:x"))
        .await
        .expect("create");
    s.devices
        .login_device(&login("@alice:x", "A", "ta"))
        .await
        .expect("login");
    for _ in 0..20 {
        assert_eq!(
            s.devices.find_token("ta").await.expect("find"),
            owner("@alice:x", "A")
        );
        assert_eq!(
            get_user(&s, "@alice:x").await.password_hash.as_deref(),
            Some("hash-0")
        );
    }
    s.devices
        .delete_devices("@alice:x", &["A".to_owned()])
        .await
        .expect("logout");
    assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a dead Redis stalled requests: {:?}",
        started.elapsed()
    );
    s.db().close().await;
}

/// A TCP proxy in front of Redis that can cut the network (dropping every connection and
/// refusing new ones) while Redis keeps running with its data: a partition, not a crash.
struct Partition {
    port: u16,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Partition {
    async fn start(upstream_port: u16) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let cut = cut.clone();
            let links = links.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: connection closed at once
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut server) =
                            TcpStream::connect(("127.0.0.1", upstream_port)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    links.lock().expect("links").push(link);
                }
            }
        });
        Partition {
            port,
            cut,
            links,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The network to Redis fails during a logout, so the invalidation never reaches Redis, which
/// keeps the revoked token's entry. When the network heals, that entry must not be served.
async fn lost_invalidation_is_written_before_redis_serves_again(db: Arc<TestDatabase>) {
    let redis = PrivateRedis::start().await;
    let proxy = Partition::start(redis.port()).await;
    let cache = cache_on(&proxy.url());
    let s = db.storage_with_cache(&cache).await;
    s.devices
        .login_device(&login("@alice:x", "A", "ta"))
        .await
        .expect("login");
    s.devices
        .login_device(&login("@alice:x", "B", "tb"))
        .await
        .expect("login");
    assert_eq!(
        s.devices.find_token("ta").await.expect("find"),
        owner("@alice:x", "A")
    );
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );
    let key = token_key(&cache, "ta");
    assert!(cached::<TokenOwner>(&redis.url(), &key).await.is_some());

    proxy.cut();
    s.devices
        .delete_devices("@alice:x", &["A".to_owned()])
        .await
        .expect("logout");
    assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
    // The invalidation was lost: Redis still holds the revoked token's owner.
    assert_eq!(
        cached::<TokenOwner>(&redis.url(), &key).await,
        owner("@alice:x", "A")
    );

    proxy.heal();
    // Past the back-off, Redis is used again; the remembered invalidation goes first.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
    }
    assert_eq!(
        cached::<TokenOwner>(&redis.url(), &key).await,
        None,
        "invalidation written"
    );
    // And the cache serves again: tb is answered from Redis (gone from the database).
    raw_execute(&s, "DELETE FROM access_tokens WHERE token_hash = ?", "tb").await;
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );
    s.db().close().await;
}
