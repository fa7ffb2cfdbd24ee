//! Read-your-writes against a real PostgreSQL streaming replica: each test builds its own
//! primary + hot standby pair (see `support/pg_replica.rs`), runs the migrations on the
//! primary, and reads through [`Storage`] while the replica is caught up, paused, or down.
//!
//! These tests need the PostgreSQL server binaries (`initdb`, `pg_ctl`, `pg_basebackup`);
//! without them they fail, they do not skip.

#[path = "support/pg_replica.rs"]
mod pg_replica;

use std::time::{Duration, Instant};

use palpo_core::config::DatabaseConfig;
use palpo_storage::{
    Storage,
    db::Pool,
    model::{DeviceLogin, NewUser},
    replica::RouteStats,
};
use pg_replica::PgPair;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// A pair, the storage on it, and direct connections to each server.
struct Setup {
    pair: PgPair,
    storage: Storage,
    primary: PgPool,
    replica: PgPool,
}

async fn setup() -> Setup {
    setup_with("").await
}

/// `url_suffix` is appended to the primary's URL (e.g. `?options=...`).
async fn setup_with(url_suffix: &str) -> Setup {
    let pair = PgPair::start().unwrap_or_else(|e| {
        panic!("cannot start a PostgreSQL primary + streaming replica pair: {e}")
    });
    eprintln!("primary + replica started in {:?}", pair.startup);
    let config = DatabaseConfig {
        url: format!("{}{url_suffix}", pair.primary_url()),
        replica_urls: vec![pair.replica_url()],
        max_connections: 5,
        acquire_timeout_secs: 5,
    };
    let storage = Storage::open(&config).await.expect("connect and migrate");
    let primary = direct(&pair.primary_url()).await;
    let replica = direct(&pair.replica_url()).await;
    let setup = Setup {
        pair,
        storage,
        primary,
        replica,
    };
    setup.wait_replayed().await;
    let migrated: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&setup.replica)
        .await
        .expect("the replica has the migrations table");
    let on_primary: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&setup.primary)
        .await
        .expect("the primary has the migrations table");
    assert!(
        migrated > 0,
        "the replica has not replayed the migrations ({migrated} of {on_primary})"
    );
    setup
}

async fn direct(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

impl Setup {
    fn stats(&self) -> RouteStats {
        self.storage.db().reads().stats()
    }

    /// Waits until the replica has replayed everything written on the primary so far.
    async fn wait_replayed(&self) {
        // A synchronous commit that wrote WAL flushes all WAL before it, asynchronous commits
        // included. (`SELECT txid_current()` would not do: a commit that wrote nothing else
        // is not flushed.)
        self.tick().await;
        let target: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
            .fetch_one(&self.primary)
            .await
            .expect("primary WAL position");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done: Option<bool> =
                sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                    .bind(&target)
                    .fetch_one(&self.replica)
                    .await
                    .expect("replica replay position");
            if done == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not replay up to {target} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A small committed write on the primary, with synchronous commit.
    async fn tick(&self) {
        for sql in [
            "CREATE TABLE IF NOT EXISTS replica_test_tick (n INT)",
            "INSERT INTO replica_test_tick VALUES (1)",
        ] {
            sqlx::query(sql)
                .execute(&self.primary)
                .await
                .expect("write on the primary");
        }
    }

    async fn pause_replay(&self) {
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(&self.replica)
            .await
            .expect("pause replay");
        // Replay pauses before its next record; it reports `paused` once it does, or right
        // away when it has nothing to replay. Either way no later record gets applied.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state: String = sqlx::query_scalar("SELECT pg_get_wal_replay_pause_state()")
                .fetch_one(&self.replica)
                .await
                .expect("pause state");
            if state == "paused" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replay still {state:?} after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn resume_replay(&self) {
        sqlx::query("SELECT pg_wal_replay_resume()")
            .execute(&self.replica)
            .await
            .expect("resume replay");
    }

    /// Whether the pool the router picks for `user_id` is a server in recovery (a replica).
    async fn routed_to_replica(&self, user_id: &str) -> bool {
        in_recovery(&self.storage.db().read_pool(user_id).await).await
    }

    /// Counts rows of `sql` (one `$1` bind) directly on the replica.
    async fn on_replica(&self, sql: &str, bind: &str) -> i64 {
        sqlx::query_scalar(sql)
            .bind(bind)
            .fetch_one(&self.replica)
            .await
            .expect("query the replica")
    }
}

async fn in_recovery(pool: &Pool) -> bool {
    let Pool::Postgres(pool) = pool else {
        panic!("not a PostgreSQL pool: {:?}", pool.backend());
    };
    sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(pool)
        .await
        .expect("pg_is_in_recovery")
}

fn new_user(user_id: &str) -> NewUser {
    NewUser {
        user_id: user_id.to_owned(),
        password_hash: Some("$argon2id$test".to_owned()),
        is_admin: false,
        created_at: 1_700_000_000_000,
    }
}

fn login(user_id: &str, device_id: &str, name: &str, token_hash: &str) -> DeviceLogin {
    DeviceLogin {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        display_name: Some(name.to_owned()),
        token_hash: token_hash.to_owned(),
        ip: Some("127.0.0.1".to_owned()),
        now: 1_700_000_000_000,
    }
}

/// Creates a user straight on the primary, so the router does not know anyone wrote it.
async fn insert_unrecorded(primary: &PgPool, user_id: &str) {
    sqlx::query(
        "INSERT INTO users (user_id, password_hash, is_admin, is_deactivated, created_at) \
         VALUES ($1, NULL, FALSE, FALSE, 1)",
    )
    .bind(user_id)
    .execute(primary)
    .await
    .expect("insert a user on the primary");
}

const BOB: &str = "@bob:test";

#[tokio::test]
async fn reads_go_to_a_caught_up_replica() {
    let s = setup().await;
    assert!(s.storage.db().reads().has_replicas());
    assert!(
        !in_recovery(s.storage.db().primary()).await,
        "the primary is a standby?"
    );

    insert_unrecorded(&s.primary, BOB).await;
    s.wait_replayed().await;

    // Bob never wrote through this storage: his reads go to the replica, which has his row.
    let before = s.stats();
    let bob = s.storage.users.get_user(BOB).await.expect("read bob");
    assert_eq!(bob.map(|u| u.user_id).as_deref(), Some(BOB));
    let after = s.stats();
    assert_eq!(
        after.replica_reads,
        before.replica_reads + 1,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.primary_reads, before.primary_reads,
        "{before:?} → {after:?}"
    );
    assert!(
        s.routed_to_replica(BOB).await,
        "bob's read was not routed to the replica"
    );

    // A writer is back on the replica once it has replayed the write.
    s.storage
        .users
        .create_user(&new_user("@alice:test"))
        .await
        .expect("create alice");
    s.wait_replayed().await;
    assert!(s.routed_to_replica("@alice:test").await);
    assert_eq!(s.storage.db().reads().pending_writers(), 0);
    let alice = s
        .storage
        .users
        .get_user("@alice:test")
        .await
        .expect("read alice");
    assert!(alice.is_some());
    assert_eq!(s.stats().primary_reads, after.primary_reads);
}

/// Reads `user_id`'s account and devices `times` times; each must show the expected state.
async fn read_back(storage: &Storage, user_id: &str, device_id: &str, name: &str, times: usize) {
    for i in 0..times {
        let user = storage.users.get_user(user_id).await.expect("get_user");
        assert!(
            user.is_some(),
            "read {i}: {user_id} does not see their own account"
        );
        let device = storage
            .devices
            .get_device(user_id, device_id)
            .await
            .expect("get_device")
            .unwrap_or_else(|| panic!("read {i}: {user_id} does not see device {device_id}"));
        assert_eq!(device.display_name.as_deref(), Some(name), "read {i}");
        let devices = storage
            .devices
            .list_devices(user_id)
            .await
            .expect("list_devices");
        assert!(
            devices
                .iter()
                .any(|d| d.device_id == device_id && d.display_name.as_deref() == Some(name)),
            "read {i}: {user_id}'s device list is stale: {devices:?}"
        );
    }
}

#[tokio::test]
async fn a_lagging_replica_never_hides_a_users_own_writes() {
    let s = setup().await;
    let storage = &s.storage;
    insert_unrecorded(&s.primary, BOB).await;
    s.wait_replayed().await;

    s.pause_replay().await;

    // Create, log in, rename: each read right after must see the write.
    let alice = "@alice:test";
    storage
        .users
        .create_user(&new_user(alice))
        .await
        .expect("create alice");
    for i in 0..10 {
        let user = storage.users.get_user(alice).await.expect("get_user");
        assert!(
            user.is_some(),
            "read {i}: alice does not see her new account"
        );
    }
    storage
        .devices
        .login_device(&login(alice, "PHONE", "Phone", "hash-1"))
        .await
        .expect("log in");
    read_back(storage, alice, "PHONE", "Phone", 10).await;
    assert!(
        storage
            .devices
            .set_device_display_name(alice, "PHONE", Some("Work phone"))
            .await
            .expect("rename")
    );
    read_back(storage, alice, "PHONE", "Work phone", 10).await;
    assert!(
        !s.routed_to_replica(alice).await,
        "alice's reads must go to the primary"
    );

    // The replica really is behind: none of it is there.
    let users = s
        .on_replica("SELECT COUNT(*) FROM users WHERE user_id = $1", alice)
        .await;
    let devices = s
        .on_replica("SELECT COUNT(*) FROM devices WHERE user_id = $1", alice)
        .await;
    assert_eq!(
        (users, devices),
        (0, 0),
        "replay was paused, yet the replica has alice"
    );

    // Someone who has not written still reads from the (stale) replica.
    let before = s.stats();
    assert!(
        storage
            .users
            .get_user(BOB)
            .await
            .expect("read bob")
            .is_some()
    );
    let after = s.stats();
    assert_eq!(
        after.replica_reads,
        before.replica_reads + 1,
        "{before:?} → {after:?}"
    );
    assert!(s.routed_to_replica(BOB).await);
    // ...and alice's reads were counted as fallbacks from a lagging replica.
    let before = s.stats();
    assert!(
        storage
            .users
            .get_user(alice)
            .await
            .expect("read alice")
            .is_some()
    );
    let after = s.stats();
    assert_eq!(
        after.lagging_fallbacks,
        before.lagging_fallbacks + 1,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.replica_reads, before.replica_reads,
        "{before:?} → {after:?}"
    );
    assert_eq!(after.replica_errors, 0, "{after:?}");

    // Once the replica catches up, alice reads from it again, and sees it all there.
    s.resume_replay().await;
    s.wait_replayed().await;
    let before = s.stats();
    read_back(storage, alice, "PHONE", "Work phone", 1).await;
    let after = s.stats();
    assert_eq!(
        after.replica_reads,
        before.replica_reads + 3,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.primary_reads, before.primary_reads,
        "{before:?} → {after:?}"
    );
    assert!(s.routed_to_replica(alice).await);
    assert_eq!(storage.db().reads().pending_writers(), 0);
}

#[tokio::test]
async fn read_your_writes_holds_with_asynchronous_commit() {
    // With synchronous_commit off a commit returns before its WAL is flushed.
    let s = setup_with("?options=-c%20synchronous_commit%3Doff").await;
    let setting: String = match s.storage.db().primary() {
        Pool::Postgres(p) => sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(p)
            .await
            .expect("show"),
        other => panic!("not PostgreSQL: {:?}", other.backend()),
    };
    assert_eq!(setting, "off", "the connection option did not apply");
    insert_unrecorded(&s.primary, BOB).await;
    s.wait_replayed().await;
    s.pause_replay().await;

    for n in 0..20 {
        let user_id = format!("@user{n}:test");
        s.storage
            .users
            .create_user(&new_user(&user_id))
            .await
            .expect("create");
        let seen = s.storage.users.get_user(&user_id).await.expect("read");
        assert!(seen.is_some(), "{user_id} does not see their own account");
    }
    let on_replica = s
        .on_replica("SELECT COUNT(*) FROM users WHERE user_id LIKE $1", "@user%")
        .await;
    assert_eq!(
        on_replica, 0,
        "replay was paused, yet the replica has the new users"
    );
    assert!(s.routed_to_replica(BOB).await);

    s.resume_replay().await;
    // The writers return to the replica once it has replayed past their writes (which may
    // take until the next WAL record when the last one ended on a page boundary).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.routed_to_replica("@user19:test").await {
        assert!(
            Instant::now() < deadline,
            "the last writer never returned to the replica"
        );
        s.tick().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stopped_replica_never_fails_a_read() {
    let mut s = setup().await;
    let alice = "@alice:test";
    s.storage
        .users
        .create_user(&new_user(alice))
        .await
        .expect("create alice");
    s.storage
        .devices
        .login_device(&login(alice, "PHONE", "Phone", "hash-1"))
        .await
        .expect("log in");
    insert_unrecorded(&s.primary, BOB).await;
    s.wait_replayed().await;
    // The replica is in use, with pooled connections, when it dies.
    assert!(
        s.storage
            .users
            .get_user(BOB)
            .await
            .expect("read bob")
            .is_some()
    );
    read_back(&s.storage, alice, "PHONE", "Phone", 1).await;
    let before = s.stats();
    assert!(before.replica_reads >= 4, "{before:?}");

    s.pair.stop_replica().expect("stop the replica");

    // Reads right after the crash, by a non-writer and a writer, all succeed.
    let started = Instant::now();
    for _ in 0..5 {
        let bob = s
            .storage
            .users
            .get_user(BOB)
            .await
            .expect("read bob with the replica down");
        assert!(bob.is_some());
        read_back(&s.storage, alice, "PHONE", "Phone", 1).await;
    }
    let elapsed = started.elapsed();
    let after = s.stats();
    assert_eq!(
        after.replica_reads, before.replica_reads,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.primary_reads,
        before.primary_reads + 20,
        "{before:?} → {after:?}"
    );
    // One failed check, then the replica is left alone for the back-off, not probed per read.
    assert_eq!(
        after.replica_errors,
        before.replica_errors + 1,
        "{before:?} → {after:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "20 reads took {elapsed:?}"
    );
    assert!(!s.routed_to_replica(BOB).await);

    // Writes go on, and are read back.
    s.storage
        .devices
        .set_device_display_name(alice, "PHONE", Some("Work phone"))
        .await
        .expect("rename");
    read_back(&s.storage, alice, "PHONE", "Work phone", 2).await;

    // Back up: once the back-off is over, reads return to the replica.
    s.pair.start_replica().expect("restart the replica");
    s.wait_replayed().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = s.stats();
        let bob = s.storage.users.get_user(BOB).await.expect("read bob");
        assert!(bob.is_some());
        if s.stats().replica_reads > before.replica_reads {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads never returned to the restarted replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s.routed_to_replica(BOB).await);
    read_back(&s.storage, alice, "PHONE", "Work phone", 1).await;
}

#[tokio::test]
async fn a_write_of_unknown_position_is_read_from_the_primary_until_known() {
    let s = setup().await;
    // A role that may use the tables but not read the primary's WAL position.
    for sql in [
        "CREATE ROLE limited LOGIN",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO limited",
        "REVOKE EXECUTE ON FUNCTION pg_current_wal_flush_lsn() FROM PUBLIC",
    ] {
        sqlx::query(sql).execute(&s.primary).await.expect(sql);
    }
    s.wait_replayed().await;
    let as_limited = |url: String| url.replacen("postgres://postgres@", "postgres://limited@", 1);
    let config = DatabaseConfig {
        url: as_limited(s.pair.primary_url()),
        replica_urls: vec![as_limited(s.pair.replica_url())],
        max_connections: 5,
        acquire_timeout_secs: 5,
    };
    let db = palpo_storage::Db::connect(&config)
        .await
        .expect("connect as limited");
    let storage = Storage::from_db(std::sync::Arc::new(db));
    let stats = || storage.db().reads().stats();

    let alice = "@alice:test";
    storage
        .users
        .create_user(&new_user(alice))
        .await
        .expect("create alice");
    assert_eq!(storage.db().reads().pending_writers(), 1);
    s.wait_replayed().await;
    // Even with the replica caught up, the router cannot know it: primary.
    let before = stats();
    assert!(storage.users.get_user(alice).await.expect("read").is_some());
    let after = stats();
    assert_eq!(
        after.primary_reads,
        before.primary_reads + 1,
        "{before:?} → {after:?}"
    );
    assert_eq!(
        after.replica_reads, before.replica_reads,
        "{before:?} → {after:?}"
    );

    // Once the position can be read again, the next read learns one past the write, and the
    // writer returns to the replica when it has replayed that far (not never).
    sqlx::query("GRANT EXECUTE ON FUNCTION pg_current_wal_flush_lsn() TO PUBLIC")
        .execute(&s.primary)
        .await
        .expect("grant");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        s.wait_replayed().await;
        let before = stats();
        assert!(storage.users.get_user(alice).await.expect("read").is_some());
        if stats().replica_reads > before.replica_reads {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's reads never returned to the replica"
        );
    }
    assert_eq!(storage.db().reads().pending_writers(), 0);
}
