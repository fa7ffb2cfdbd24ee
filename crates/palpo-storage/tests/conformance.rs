//! Conformance: every behaviour of the repository traits, on every backend, with and without
//! the Redis cache. Each scenario becomes one test per backend and cache mode, named
//! `<scenario>::<backend>[_cached]`, so a failure names the backend.
//!
//! Backends: `PALPO_TEST_BACKENDS` (default all). A backend that is down fails its tests.

use palpo_storage::{
    Storage, StorageError,
    model::{DeviceLogin, NewUser, Removed, TokenOwner, UiaSession},
};

palpo_storage::conformance!(cached:
    users,
    user_ids_are_case_sensitive,
    passwords,
    deactivation,
    login_creates_and_replaces,
    token_hashes_are_unique,
    device_list_order,
    device_display_names,
    delete_devices,
    delete_all_devices,
    touch_device,
    uia_sessions,
    unicode_round_trips,
);

fn new_user(user_id: &str, password_hash: Option<&str>) -> NewUser {
    NewUser {
        user_id: user_id.to_owned(),
        password_hash: password_hash.map(str::to_owned),
        is_admin: false,
        created_at: 1_700_000_000_000,
    }
}

fn login(user_id: &str, device_id: &str, token_hash: &str, name: Option<&str>) -> DeviceLogin {
    DeviceLogin {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        display_name: name.map(str::to_owned),
        token_hash: token_hash.to_owned(),
        ip: Some("192.0.2.1".to_owned()),
        now: 1_700_000_000_123,
    }
}

fn owner(user_id: &str, device_id: &str) -> Option<TokenOwner> {
    Some(TokenOwner {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
    })
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn users(s: Storage) {
    assert_eq!(s.users.count_users().await.expect("count"), 0);
    assert_eq!(s.users.get_user("@alice:x").await.expect("get"), None);

    let mut alice = new_user("@alice:x", Some("$argon2id$hash"));
    alice.is_admin = true;
    s.users.create_user(&alice).await.expect("create alice");
    s.users
        .create_user(&new_user("@bob:x", None))
        .await
        .expect("create bob");

    let got = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("alice exists");
    assert_eq!(got.user_id, "@alice:x");
    assert_eq!(got.password_hash.as_deref(), Some("$argon2id$hash"));
    assert!(got.is_admin);
    assert!(!got.is_deactivated);
    assert_eq!(got.created_at, 1_700_000_000_000);
    let bob = s
        .users
        .get_user("@bob:x")
        .await
        .expect("get")
        .expect("bob exists");
    assert_eq!(bob.password_hash, None);
    assert!(!bob.is_admin);

    let again = s.users.create_user(&new_user("@alice:x", None)).await;
    assert!(
        matches!(again, Err(StorageError::Conflict(_))),
        "duplicate id must be a conflict, got {again:?}"
    );
    // The failed insert changed nothing.
    let still = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(still, got);
    assert_eq!(s.users.count_users().await.expect("count"), 2);
}

async fn user_ids_are_case_sensitive(s: Storage) {
    s.users
        .create_user(&new_user("@Alice:x", Some("upper")))
        .await
        .expect("create @Alice");
    assert_eq!(s.users.get_user("@alice:x").await.expect("get"), None);
    // MySQL with a case-insensitive collation would call this a duplicate.
    s.users
        .create_user(&new_user("@alice:x", Some("lower")))
        .await
        .expect("@alice is another user than @Alice");
    let upper = s
        .users
        .get_user("@Alice:x")
        .await
        .expect("get")
        .expect("exists");
    let lower = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(upper.password_hash.as_deref(), Some("upper"));
    assert_eq!(lower.password_hash.as_deref(), Some("lower"));
    assert_eq!(s.users.count_users().await.expect("count"), 2);

    // Devices and tokens too.
    s.devices
        .login_device(&login("@alice:x", "DEV", "hash-lower", None))
        .await
        .expect("login");
    assert_eq!(
        s.devices.get_device("@Alice:x", "DEV").await.expect("get"),
        None
    );
    assert!(
        s.devices
            .list_devices("@Alice:x")
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        s.devices.find_token("HASH-LOWER").await.expect("find"),
        None
    );
    s.devices
        .login_device(&login("@alice:x", "dev", "hash-lower-2", None))
        .await
        .expect("device `dev` is not `DEV`");
    assert_eq!(
        s.devices
            .list_devices("@alice:x")
            .await
            .expect("list")
            .len(),
        2
    );
}

async fn passwords(s: Storage) {
    s.users
        .create_user(&new_user("@alice:x", None))
        .await
        .expect("create");
    assert!(
        s.users
            .set_password_hash("@alice:x", Some("h1"))
            .await
            .expect("set")
    );
    let user = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(user.password_hash.as_deref(), Some("h1"));

    // Same value again: the user exists, so true (MySQL counts only changed rows by default).
    assert!(
        s.users
            .set_password_hash("@alice:x", Some("h1"))
            .await
            .expect("set")
    );
    assert!(
        s.users
            .set_password_hash("@alice:x", Some("h2"))
            .await
            .expect("set")
    );
    let user = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(user.password_hash.as_deref(), Some("h2"));

    assert!(
        s.users
            .set_password_hash("@alice:x", None)
            .await
            .expect("clear")
    );
    assert!(
        s.users
            .set_password_hash("@alice:x", None)
            .await
            .expect("clear again")
    );
    let user = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(user.password_hash, None);

    assert!(
        !s.users
            .set_password_hash("@nobody:x", Some("h"))
            .await
            .expect("set")
    );
    assert_eq!(s.users.get_user("@nobody:x").await.expect("get"), None);
}

async fn deactivation(s: Storage) {
    s.users
        .create_user(&new_user("@alice:x", Some("secret")))
        .await
        .expect("create");
    s.users
        .create_user(&new_user("@bob:x", Some("bob-secret")))
        .await
        .expect("create");
    // Read once first, so a cache in front holds the active record.
    let before = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("exists");
    assert!(!before.is_deactivated);

    s.users
        .deactivate_user("@alice:x")
        .await
        .expect("deactivate");
    let after = s
        .users
        .get_user("@alice:x")
        .await
        .expect("get")
        .expect("id stays reserved");
    assert!(after.is_deactivated);
    assert_eq!(after.password_hash, None);
    assert_eq!(after.created_at, before.created_at);
    // Idempotent, and the id can never be registered again.
    s.users
        .deactivate_user("@alice:x")
        .await
        .expect("deactivate again");
    assert!(matches!(
        s.users.create_user(&new_user("@alice:x", None)).await,
        Err(StorageError::Conflict(_))
    ));
    let bob = s
        .users
        .get_user("@bob:x")
        .await
        .expect("get")
        .expect("exists");
    assert!(!bob.is_deactivated, "only alice is deactivated");
    assert_eq!(bob.password_hash.as_deref(), Some("bob-secret"));
    assert_eq!(s.users.count_users().await.expect("count"), 2);
    // Unknown users: nothing happens.
    s.users.deactivate_user("@nobody:x").await.expect("no-op");
    assert_eq!(s.users.get_user("@nobody:x").await.expect("get"), None);
}

async fn login_creates_and_replaces(s: Storage) {
    assert_eq!(s.devices.find_token("t1").await.expect("find"), None);
    let replaced = s
        .devices
        .login_device(&login("@alice:x", "PHONE", "t1", Some("My phone")))
        .await
        .expect("login");
    assert!(replaced.is_empty(), "a new device replaces no token");
    assert_eq!(
        s.devices.find_token("t1").await.expect("find"),
        owner("@alice:x", "PHONE")
    );

    let device = s
        .devices
        .get_device("@alice:x", "PHONE")
        .await
        .expect("get")
        .expect("created");
    assert_eq!(device.user_id, "@alice:x");
    assert_eq!(device.device_id, "PHONE");
    assert_eq!(device.display_name.as_deref(), Some("My phone"));
    assert_eq!(device.last_seen_ip.as_deref(), Some("192.0.2.1"));
    assert_eq!(device.last_seen_ts, Some(1_700_000_000_123));
    assert_eq!(device.created_at, 1_700_000_000_123);

    // Re-login on the same device: new token, the old one is returned and stops working,
    // and a login without a display name keeps the old one.
    let mut relogin = login("@alice:x", "PHONE", "t2", None);
    relogin.now = 1_800_000_000_000;
    let replaced = s.devices.login_device(&relogin).await.expect("re-login");
    assert_eq!(replaced, ids(&["t1"]));
    assert_eq!(s.devices.find_token("t1").await.expect("find"), None);
    assert_eq!(
        s.devices.find_token("t2").await.expect("find"),
        owner("@alice:x", "PHONE")
    );
    let device = s
        .devices
        .get_device("@alice:x", "PHONE")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(device.display_name.as_deref(), Some("My phone"));
    assert_eq!(
        device.created_at, 1_700_000_000_123,
        "still the same device"
    );
    assert_eq!(
        s.devices
            .list_devices("@alice:x")
            .await
            .expect("list")
            .len(),
        1
    );

    // A display name given at re-login replaces the old one.
    let replaced = s
        .devices
        .login_device(&login("@alice:x", "PHONE", "t3", Some("Renamed")))
        .await
        .expect("re-login");
    assert_eq!(replaced, ids(&["t2"]));
    let device = s
        .devices
        .get_device("@alice:x", "PHONE")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(device.display_name.as_deref(), Some("Renamed"));

    // Another device of the same user has its own token.
    let replaced = s
        .devices
        .login_device(&login("@alice:x", "LAPTOP", "t4", None))
        .await
        .expect("login");
    assert!(replaced.is_empty());
    assert_eq!(
        s.devices.find_token("t3").await.expect("find"),
        owner("@alice:x", "PHONE")
    );
    assert_eq!(
        s.devices.find_token("t4").await.expect("find"),
        owner("@alice:x", "LAPTOP")
    );
    let laptop = s
        .devices
        .get_device("@alice:x", "LAPTOP")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(laptop.display_name, None);
    assert_eq!(
        s.devices
            .get_device("@alice:x", "TABLET")
            .await
            .expect("get"),
        None
    );
}

async fn token_hashes_are_unique(s: Storage) {
    s.devices
        .login_device(&login("@alice:x", "A", "same", None))
        .await
        .expect("login");
    let clash = s
        .devices
        .login_device(&login("@bob:x", "B", "same", None))
        .await;
    assert!(
        matches!(clash, Err(StorageError::Conflict(_))),
        "a token hash belongs to one device, got {clash:?}"
    );
    // The failed login was rolled back entirely: no device for bob, alice's token intact.
    assert_eq!(
        s.devices.get_device("@bob:x", "B").await.expect("get"),
        None
    );
    assert_eq!(
        s.devices.find_token("same").await.expect("find"),
        owner("@alice:x", "A")
    );
}

async fn device_list_order(s: Storage) {
    // Mixed case and digits: the order must be the same on every backend (bytewise), not
    // whatever the database's collation says.
    for (device_id, token) in [
        ("b", "t1"),
        ("C", "t2"),
        ("a", "t3"),
        ("A", "t4"),
        ("10", "t5"),
        ("9", "t6"),
    ] {
        s.devices
            .login_device(&login("@alice:x", device_id, token, None))
            .await
            .expect("login");
    }
    s.devices
        .login_device(&login("@bob:x", "0", "t7", None))
        .await
        .expect("login");
    let listed: Vec<String> = s
        .devices
        .list_devices("@alice:x")
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(listed, ids(&["10", "9", "A", "C", "a", "b"]));
    assert!(
        s.devices
            .list_devices("@nobody:x")
            .await
            .expect("list")
            .is_empty()
    );
}

async fn device_display_names(s: Storage) {
    s.devices
        .login_device(&login("@alice:x", "D", "t1", Some("first")))
        .await
        .expect("login");
    let name = |s: &Storage| {
        let s = s.clone();
        async move {
            s.devices
                .get_device("@alice:x", "D")
                .await
                .expect("get")
                .expect("exists")
                .display_name
        }
    };
    assert!(
        s.devices
            .set_device_display_name("@alice:x", "D", Some("second"))
            .await
            .expect("set")
    );
    assert_eq!(name(&s).await.as_deref(), Some("second"));
    // Unchanged name: the device exists, so true.
    assert!(
        s.devices
            .set_device_display_name("@alice:x", "D", Some("second"))
            .await
            .expect("set")
    );
    assert_eq!(name(&s).await.as_deref(), Some("second"));
    assert!(
        s.devices
            .set_device_display_name("@alice:x", "D", None)
            .await
            .expect("clear")
    );
    assert_eq!(name(&s).await, None);
    assert!(
        s.devices
            .set_device_display_name("@alice:x", "D", None)
            .await
            .expect("clear again")
    );

    assert!(
        !s.devices
            .set_device_display_name("@alice:x", "NOPE", Some("x"))
            .await
            .expect("set")
    );
    assert!(
        !s.devices
            .set_device_display_name("@bob:x", "D", Some("x"))
            .await
            .expect("set")
    );
    assert_eq!(
        s.devices.get_device("@bob:x", "D").await.expect("get"),
        None
    );
    assert_eq!(
        s.devices.get_device("@alice:x", "NOPE").await.expect("get"),
        None
    );
}

async fn delete_devices(s: Storage) {
    for (device, token) in [("A", "ta"), ("B", "tb"), ("C", "tc")] {
        s.devices
            .login_device(&login("@alice:x", device, token, None))
            .await
            .expect("login");
    }
    s.devices
        .login_device(&login("@bob:x", "A", "bob-a", None))
        .await
        .expect("login");
    // Warm a cache in front, if any.
    assert_eq!(
        s.devices.find_token("ta").await.expect("find"),
        owner("@alice:x", "A")
    );
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );

    let removed = s
        .devices
        .delete_devices("@alice:x", &ids(&["A", "B", "UNKNOWN"]))
        .await
        .expect("delete");
    assert_eq!(
        sorted(removed),
        Removed {
            device_ids: ids(&["A", "B"]),
            token_hashes: ids(&["ta", "tb"]),
        }
    );
    assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
    assert_eq!(s.devices.find_token("tb").await.expect("find"), None);
    assert_eq!(
        s.devices.find_token("tc").await.expect("find"),
        owner("@alice:x", "C")
    );
    assert_eq!(
        s.devices.find_token("bob-a").await.expect("find"),
        owner("@bob:x", "A")
    );
    let left: Vec<String> = s
        .devices
        .list_devices("@alice:x")
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(left, ids(&["C"]));
    assert!(
        s.devices
            .get_device("@bob:x", "A")
            .await
            .expect("get")
            .is_some()
    );

    // Deleting again removes nothing.
    let removed = s
        .devices
        .delete_devices("@alice:x", &ids(&["A"]))
        .await
        .expect("delete");
    assert_eq!(removed, Removed::default());
    let removed = s
        .devices
        .delete_devices("@alice:x", &[])
        .await
        .expect("delete none");
    assert_eq!(removed, Removed::default());
}

async fn delete_all_devices(s: Storage) {
    for (device, token) in [("A", "ta"), ("B", "tb"), ("C", "tc")] {
        s.devices
            .login_device(&login("@alice:x", device, token, None))
            .await
            .expect("login");
        assert!(s.devices.find_token(token).await.expect("find").is_some());
    }
    s.devices
        .login_device(&login("@bob:x", "B", "bob-b", None))
        .await
        .expect("login");

    let removed = s
        .devices
        .delete_all_devices("@alice:x", Some("B"))
        .await
        .expect("delete all but B");
    assert_eq!(
        sorted(removed),
        Removed {
            device_ids: ids(&["A", "C"]),
            token_hashes: ids(&["ta", "tc"]),
        }
    );
    assert_eq!(s.devices.find_token("ta").await.expect("find"), None);
    assert_eq!(s.devices.find_token("tc").await.expect("find"), None);
    assert_eq!(
        s.devices.find_token("tb").await.expect("find"),
        owner("@alice:x", "B")
    );
    let left: Vec<String> = s
        .devices
        .list_devices("@alice:x")
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(left, ids(&["B"]));

    let removed = s
        .devices
        .delete_all_devices("@alice:x", None)
        .await
        .expect("delete all");
    assert_eq!(
        removed,
        Removed {
            device_ids: ids(&["B"]),
            token_hashes: ids(&["tb"]),
        }
    );
    assert_eq!(s.devices.find_token("tb").await.expect("find"), None);
    assert!(
        s.devices
            .list_devices("@alice:x")
            .await
            .expect("list")
            .is_empty()
    );
    // Bob is untouched.
    assert_eq!(
        s.devices.find_token("bob-b").await.expect("find"),
        owner("@bob:x", "B")
    );
}

async fn touch_device(s: Storage) {
    let mut first = login("@alice:x", "D", "t1", None);
    first.ip = None;
    s.devices.login_device(&first).await.expect("login");
    let device = s
        .devices
        .get_device("@alice:x", "D")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(device.last_seen_ip, None);

    s.devices
        .touch_device("@alice:x", "D", Some("2001:db8::1"), 1_900_000_000_000)
        .await
        .expect("touch");
    let device = s
        .devices
        .get_device("@alice:x", "D")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(device.last_seen_ip.as_deref(), Some("2001:db8::1"));
    assert_eq!(device.last_seen_ts, Some(1_900_000_000_000));
    assert_eq!(device.created_at, 1_700_000_000_123);
    let listed = s.devices.list_devices("@alice:x").await.expect("list");
    assert_eq!(listed, vec![device]);

    s.devices
        .touch_device("@alice:x", "D", None, 1_900_000_000_001)
        .await
        .expect("touch");
    let device = s
        .devices
        .get_device("@alice:x", "D")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(device.last_seen_ip, None);
    assert_eq!(device.last_seen_ts, Some(1_900_000_000_001));

    // Unknown device: nothing happens, nothing is created.
    s.devices
        .touch_device("@alice:x", "NOPE", Some("192.0.2.9"), 1)
        .await
        .expect("touch unknown");
    assert_eq!(
        s.devices.get_device("@alice:x", "NOPE").await.expect("get"),
        None
    );
}

fn session(id: &str, created_at: i64) -> UiaSession {
    UiaSession {
        session_id: id.to_owned(),
        user_id: Some("@alice:x".to_owned()),
        purpose: "delete_device".to_owned(),
        completed: Vec::new(),
        data: r#"{"devices":["A"]}"#.to_owned(),
        created_at,
    }
}

async fn uia_sessions(s: Storage) {
    assert_eq!(s.uia.get_session("s1").await.expect("get"), None);
    let mut s1 = session("s1", 1_000);
    s.uia.create_session(&s1).await.expect("create");
    assert_eq!(
        s.uia.get_session("s1").await.expect("get"),
        Some(s1.clone())
    );
    assert!(matches!(
        s.uia.create_session(&session("s1", 5)).await,
        Err(StorageError::Conflict(_))
    ));

    let mut registration = session("s2", 2_000);
    registration.user_id = None;
    registration.purpose = "register".to_owned();
    s.uia.create_session(&registration).await.expect("create");
    assert_eq!(
        s.uia.get_session("s2").await.expect("get"),
        Some(registration.clone())
    );

    s1.completed = ids(&["m.login.dummy", "m.login.password"]);
    s1.data = r#"{"devices":["A","B"]}"#.to_owned();
    s.uia.update_session(&s1).await.expect("update");
    assert_eq!(
        s.uia.get_session("s1").await.expect("get"),
        Some(s1.clone())
    );
    // Updating an unknown session is a no-op, not a create.
    s.uia
        .update_session(&session("ghost", 1))
        .await
        .expect("update unknown");
    assert_eq!(s.uia.get_session("ghost").await.expect("get"), None);

    s.uia
        .create_session(&session("s3", 3_000))
        .await
        .expect("create");
    // Strictly before: s2 (2000) stays.
    assert_eq!(
        s.uia.delete_sessions_before(2_000).await.expect("expire"),
        1
    );
    assert_eq!(s.uia.get_session("s1").await.expect("get"), None);
    assert_eq!(
        s.uia.get_session("s2").await.expect("get"),
        Some(registration)
    );
    assert_eq!(s.uia.delete_sessions_before(0).await.expect("expire"), 0);

    s.uia.delete_session("s2").await.expect("delete");
    assert_eq!(s.uia.get_session("s2").await.expect("get"), None);
    s.uia.delete_session("s2").await.expect("delete again");
    assert!(s.uia.get_session("s3").await.expect("get").is_some());
    assert_eq!(
        s.uia
            .delete_sessions_before(i64::MAX)
            .await
            .expect("expire"),
        1
    );
    assert_eq!(s.uia.get_session("s3").await.expect("get"), None);
}

async fn unicode_round_trips(s: Storage) {
    // 4-byte UTF-8 (emoji, needs utf8mb4 on MySQL), combining marks, CJK, RTL.
    let names = [
        "Alice's 📱 phone 🚀",
        "👩‍👩‍👧‍👦 family",
        "e\u{301}te\u{301} – 日本語 – עברית",
        "𝕌𝕟𝕚𝕔𝕠𝕕𝕖",
    ];
    s.devices
        .login_device(&login("@alice:x", "D", "t1", Some(names[0])))
        .await
        .expect("login");
    let device = s
        .devices
        .get_device("@alice:x", "D")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(device.display_name.as_deref(), Some(names[0]));
    for name in &names[1..] {
        assert!(
            s.devices
                .set_device_display_name("@alice:x", "D", Some(name))
                .await
                .expect("set")
        );
        let listed = s.devices.list_devices("@alice:x").await.expect("list");
        assert_eq!(listed[0].display_name.as_deref(), Some(*name));
    }

    let mut uia = session("🔑", 1);
    uia.completed = ids(&["m.login.émoji 🎉"]);
    uia.data = r#"{"display_name":"Zoë 🦊"}"#.to_owned();
    s.uia.create_session(&uia).await.expect("create");
    assert_eq!(s.uia.get_session("🔑").await.expect("get"), Some(uia));

    let hash = "$argon2id$v=19$ünïcødé🔒";
    s.users
        .create_user(&new_user("@zoë:x", Some(hash)))
        .await
        .expect("create");
    let user = s
        .users
        .get_user("@zoë:x")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(user.password_hash.as_deref(), Some(hash));
    // Not folded to another normalization or case.
    assert_eq!(s.users.get_user("@ZOË:x").await.expect("get"), None);
}

fn sorted(mut removed: Removed) -> Removed {
    removed.device_ids.sort();
    removed.token_hashes.sort();
    removed
}
