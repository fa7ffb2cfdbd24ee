//! Conformance of the end-to-end encryption repository on every backend: device keys, one-time
//! keys (claimed atomically, oldest upload first), fallback keys, the device-list change
//! stream and the to-device inbox.

use std::collections::BTreeSet;

use palpo_storage::{
    Storage, StorageError,
    model::{
        CrossSigningKeyRecord, DeviceKeyCounts, DeviceLogin, DeviceTarget, KeySignatureRecord,
        KeyUpload, NewEvent, NewRoom, OneTimeKeyRecord, ToDeviceBatch, ToDeviceMessage,
    },
    testing::event_on,
};

palpo_storage::conformance!(
    device_keys,
    one_time_keys,
    concurrent_claims_never_share_a_key,
    fallback_keys,
    device_lists,
    to_device_inbox,
    to_device_inbox_in_one_read,
    to_device_fan_out_and_idempotency,
    deleting_devices_forgets_their_keys,
    cross_signing_keys_and_signatures,
);

const ALICE: &str = "@alice:test";
const BOB: &str = "@bob:test";

async fn device(s: &Storage, user_id: &str, device_id: &str) {
    s.devices
        .login_device(&DeviceLogin {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            display_name: Some(format!("{device_id} of {user_id}")),
            token_hash: format!("{user_id}/{device_id}"),
            ip: None,
            now: 1,
        })
        .await
        .expect("login");
}

fn otk(algorithm: &str, key_id: &str) -> OneTimeKeyRecord {
    OneTimeKeyRecord {
        algorithm: algorithm.to_owned(),
        key_id: key_id.to_owned(),
        key_json: format!(r#"{{"key":"{key_id}-public"}}"#),
    }
}

fn upload(user_id: &str, device_id: &str) -> KeyUpload {
    KeyUpload {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        ..KeyUpload::default()
    }
}

fn device_keys_json(user_id: &str, device_id: &str, curve: &str) -> String {
    serde_json::json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {format!("curve25519:{device_id}"): curve},
        "signatures": {},
    })
    .to_string()
}

async fn device_keys(s: Storage) {
    device(&s, ALICE, "A1").await;
    device(&s, ALICE, "A2").await;
    let start = s.rooms.max_stream_ordering().await.expect("max");

    let mut first = upload(ALICE, "A1");
    first.device_keys = Some(device_keys_json(ALICE, "A1", "c1"));
    let outcome = s.e2ee.upload_keys(&first).await.expect("upload");
    let p1 = outcome
        .device_list_position
        .expect("new keys are a device-list change");
    assert_eq!(p1, start + 1, "the next position of the global stream");
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), p1);

    // The same keys again (another key order): no change.
    let same = serde_json::json!({
        "signatures": {},
        "keys": {"curve25519:A1": "c1"},
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "device_id": "A1",
        "user_id": ALICE,
    });
    let mut again = upload(ALICE, "A1");
    again.device_keys = Some(same.to_string());
    let outcome = s.e2ee.upload_keys(&again).await.expect("upload again");
    assert_eq!(outcome.device_list_position, None);

    let mut other = upload(ALICE, "A2");
    other.device_keys = Some(device_keys_json(ALICE, "A2", "c2"));
    let p2 = s
        .e2ee
        .upload_keys(&other)
        .await
        .expect("upload")
        .device_list_position
        .expect("change");
    assert!(p2 > p1);

    let all = s.e2ee.device_keys(ALICE, &[]).await.expect("query");
    assert_eq!(
        all.iter().map(|k| k.device_id.as_str()).collect::<Vec<_>>(),
        ["A1", "A2"]
    );
    assert_eq!(all[0].display_name.as_deref(), Some("A1 of @alice:test"));
    let keys: serde_json::Value = serde_json::from_str(&all[0].key_json).expect("json");
    assert_eq!(keys["keys"]["curve25519:A1"], "c1");

    let some = s
        .e2ee
        .device_keys(ALICE, &["A2".to_owned(), "NOPE".to_owned()])
        .await
        .expect("query");
    assert_eq!(some.len(), 1);
    assert_eq!(some[0].device_id, "A2");
    assert!(
        s.e2ee
            .device_keys(BOB, &[])
            .await
            .expect("query")
            .is_empty()
    );
    // Case matters.
    assert!(
        s.e2ee
            .device_keys("@ALICE:test", &[])
            .await
            .expect("query")
            .is_empty()
    );

    // Changed keys are a new change.
    let mut changed = upload(ALICE, "A1");
    changed.device_keys = Some(device_keys_json(ALICE, "A1", "c1-new"));
    let p3 = s
        .e2ee
        .upload_keys(&changed)
        .await
        .expect("upload")
        .device_list_position
        .expect("change");
    assert!(p3 > p2);
    let keys = s
        .e2ee
        .device_keys(ALICE, &["A1".to_owned()])
        .await
        .expect("query");
    assert!(keys[0].key_json.contains("c1-new"));
}

async fn one_time_keys(s: Storage) {
    device(&s, ALICE, "A1").await;
    assert!(
        s.e2ee
            .one_time_key_counts(ALICE, "A1")
            .await
            .expect("counts")
            .is_empty()
    );
    let mut first = upload(ALICE, "A1");
    first.one_time_keys = vec![
        otk("signed_curve25519", "k2"),
        otk("signed_curve25519", "k1"),
        otk("curve25519", "c1"),
    ];
    let outcome = s.e2ee.upload_keys(&first).await.expect("upload");
    assert_eq!(
        outcome.device_list_position, None,
        "one-time keys do not change the device list"
    );
    let mut second = upload(ALICE, "A1");
    second.one_time_keys = vec![otk("signed_curve25519", "k0")];
    s.e2ee.upload_keys(&second).await.expect("upload");
    assert_eq!(
        s.e2ee
            .one_time_key_counts(ALICE, "A1")
            .await
            .expect("counts"),
        [
            ("curve25519".to_owned(), 1),
            ("signed_curve25519".to_owned(), 3)
        ]
    );

    // The same key again is fine; the same id with another key is refused, and nothing of
    // that upload is stored.
    s.e2ee.upload_keys(&second).await.expect("same again");
    let mut clash = upload(ALICE, "A1");
    clash.one_time_keys = vec![
        otk("signed_curve25519", "k9"),
        OneTimeKeyRecord {
            key_json: r#"{"key":"other"}"#.to_owned(),
            ..otk("signed_curve25519", "k1")
        },
    ];
    assert!(matches!(
        s.e2ee.upload_keys(&clash).await,
        Err(StorageError::Conflict(_))
    ));
    assert_eq!(
        s.e2ee
            .one_time_key_counts(ALICE, "A1")
            .await
            .expect("counts"),
        [
            ("curve25519".to_owned(), 1),
            ("signed_curve25519".to_owned(), 3)
        ]
    );

    // Oldest upload first (within one upload, by id); each key once.
    let mut claimed = Vec::new();
    for _ in 0..3 {
        let key = s
            .e2ee
            .claim_key(ALICE, "A1", "signed_curve25519")
            .await
            .expect("claim")
            .expect("a key");
        assert!(!key.fallback);
        assert_eq!(key.key.algorithm, "signed_curve25519");
        claimed.push(key.key.key_id);
    }
    assert_eq!(claimed, ["k1", "k2", "k0"]);
    assert_eq!(
        s.e2ee
            .claim_key(ALICE, "A1", "signed_curve25519")
            .await
            .expect("claim"),
        None,
        "none left and no fallback key"
    );
    assert_eq!(
        s.e2ee
            .one_time_key_counts(ALICE, "A1")
            .await
            .expect("counts"),
        [("curve25519".to_owned(), 1)]
    );
    let c1 = s
        .e2ee
        .claim_key(ALICE, "A1", "curve25519")
        .await
        .expect("claim")
        .expect("a key");
    assert_eq!(c1.key.key_json, r#"{"key":"c1-public"}"#);
    assert_eq!(
        s.e2ee
            .claim_key(ALICE, "NOPE", "curve25519")
            .await
            .expect("claim"),
        None
    );
}

async fn concurrent_claims_never_share_a_key(s: Storage) {
    device(&s, ALICE, "A1").await;
    let mut keys = upload(ALICE, "A1");
    keys.one_time_keys = (0..20)
        .map(|n| otk("signed_curve25519", &format!("k{n:02}")))
        .collect();
    s.e2ee.upload_keys(&keys).await.expect("upload");

    // 30 claims at once for 20 keys: 20 distinct keys, 10 with nothing.
    let claims = (0..30).map(|_| {
        let s = s.clone();
        tokio::spawn(async move {
            s.e2ee
                .claim_key(ALICE, "A1", "signed_curve25519")
                .await
                .expect("claim")
        })
    });
    let results = futures::future::join_all(claims).await;
    let mut got = BTreeSet::new();
    let mut none = 0;
    for result in results {
        match result.expect("task") {
            Some(key) => assert!(got.insert(key.key.key_id), "a key was handed out twice"),
            None => none += 1,
        }
    }
    assert_eq!(got.len(), 20);
    assert_eq!(none, 10);
    assert!(
        s.e2ee
            .one_time_key_counts(ALICE, "A1")
            .await
            .expect("counts")
            .is_empty()
    );
}

/// The key counts a sync's position read gives for the device (see `SyncPosition::key_counts`).
async fn counts_with_position(s: &Storage, user: &str, device: &str) -> Option<DeviceKeyCounts> {
    s.ephemeral
        .sync_position(0, user, Some(device), None)
        .await
        .expect("sync position")
        .key_counts
}

async fn fallback_keys(s: Storage) {
    device(&s, ALICE, "A1").await;
    let mut with_fallback = upload(ALICE, "A1");
    with_fallback.one_time_keys = vec![otk("signed_curve25519", "k1")];
    with_fallback.fallback_keys = vec![otk("signed_curve25519", "f1")];
    s.e2ee.upload_keys(&with_fallback).await.expect("upload");
    assert_eq!(
        s.e2ee
            .unused_fallback_key_types(ALICE, "A1")
            .await
            .expect("types"),
        ["signed_curve25519"]
    );
    // Keys of the one algorithm clients use: counted with the position, as on their own.
    let counts = s.e2ee.key_counts(ALICE, "A1").await.expect("counts");
    assert_eq!(counts.one_time_keys, [("signed_curve25519".to_owned(), 1)]);
    assert_eq!(
        counts_with_position(&s, ALICE, "A1").await,
        Some(counts),
        "counted with the position"
    );
    // Both counts in one read, agreeing with the separate ones.
    let mut more = upload(ALICE, "A1");
    more.one_time_keys = vec![otk("signed_curve25519", "k2"), otk("curve25519", "c1")];
    more.fallback_keys = vec![otk("curve25519", "cf")];
    s.e2ee.upload_keys(&more).await.expect("upload");
    let counts = s.e2ee.key_counts(ALICE, "A1").await.expect("counts");
    assert_eq!(
        counts.one_time_keys,
        [
            ("curve25519".to_owned(), 1),
            ("signed_curve25519".to_owned(), 2)
        ]
    );
    assert_eq!(
        counts.unused_fallback_key_types,
        ["curve25519", "signed_curve25519"]
    );
    assert_eq!(
        counts.one_time_keys,
        s.e2ee.one_time_key_counts(ALICE, "A1").await.expect("otks")
    );
    assert_eq!(
        counts_with_position(&s, ALICE, "A1").await,
        None,
        "another algorithm: read on their own"
    );
    assert_eq!(
        s.e2ee.key_counts(BOB, "B1").await.expect("none"),
        Default::default(),
        "a device without keys"
    );
    assert_eq!(
        counts_with_position(&s, BOB, "B1").await,
        Some(Default::default())
    );
    assert_eq!(
        s.ephemeral
            .sync_position(0, ALICE, None, None)
            .await
            .expect("position")
            .key_counts,
        None,
        "no device asked about"
    );
    s.e2ee
        .claim_key(ALICE, "A1", "curve25519")
        .await
        .expect("claim")
        .expect("c1");
    s.e2ee
        .claim_key(ALICE, "A1", "curve25519")
        .await
        .expect("claim")
        .expect("cf");
    s.e2ee
        .claim_key(ALICE, "A1", "signed_curve25519")
        .await
        .expect("claim")
        .expect("k2 or k1");
    let counts = s.e2ee.key_counts(ALICE, "A1").await.expect("counts");
    assert_eq!(counts.one_time_keys, [("signed_curve25519".to_owned(), 1)]);
    assert_eq!(counts.unused_fallback_key_types, ["signed_curve25519"]);
    assert_eq!(counts_with_position(&s, ALICE, "A1").await, Some(counts));

    // A one-time key first, then the fallback key, marked used, as often as asked.
    let first = s
        .e2ee
        .claim_key(ALICE, "A1", "signed_curve25519")
        .await
        .expect("claim")
        .expect("key");
    assert!(!first.fallback);
    for _ in 0..2 {
        let fallback = s
            .e2ee
            .claim_key(ALICE, "A1", "signed_curve25519")
            .await
            .expect("claim")
            .expect("fallback");
        assert_eq!(
            (fallback.key.key_id.as_str(), fallback.fallback),
            ("f1", true)
        );
        assert_eq!(fallback.key.key_json, r#"{"key":"f1-public"}"#);
    }
    assert!(
        s.e2ee
            .unused_fallback_key_types(ALICE, "A1")
            .await
            .expect("types")
            .is_empty()
    );
    assert_eq!(
        counts_with_position(&s, ALICE, "A1").await,
        Some(Default::default()),
        "a used fallback key is not counted"
    );

    // Uploading the same fallback key keeps it used; a new one replaces it, unused.
    let mut same = upload(ALICE, "A1");
    same.fallback_keys = vec![otk("signed_curve25519", "f1")];
    s.e2ee.upload_keys(&same).await.expect("upload");
    assert!(
        s.e2ee
            .unused_fallback_key_types(ALICE, "A1")
            .await
            .expect("types")
            .is_empty()
    );
    let mut new = upload(ALICE, "A1");
    new.fallback_keys = vec![otk("signed_curve25519", "f2")];
    s.e2ee.upload_keys(&new).await.expect("upload");
    assert_eq!(
        s.e2ee
            .unused_fallback_key_types(ALICE, "A1")
            .await
            .expect("types"),
        ["signed_curve25519"]
    );
    let replaced = s
        .e2ee
        .claim_key(ALICE, "A1", "signed_curve25519")
        .await
        .expect("claim")
        .expect("fallback");
    assert_eq!(replaced.key.key_id, "f2");
}

/// Creates `room_id` with the given memberships, persisted one after the other.
async fn room_with_members(s: &Storage, room_id: &str, members: &[(&str, &str)]) {
    s.rooms
        .create_room(&NewRoom {
            room_id: room_id.to_owned(),
            room_version: "12".to_owned(),
            creator: ALICE.to_owned(),
            is_public: false,
            created_at: 1,
        })
        .await
        .expect("create room");
    for (user, membership) in members {
        member(s, room_id, user, membership).await;
    }
}

/// Persists a membership event; returns its stream position.
async fn member(s: &Storage, room_id: &str, user: &str, membership: &str) -> i64 {
    let room = s
        .rooms
        .get_room(room_id)
        .await
        .expect("room")
        .expect("room");
    let n = s.rooms.max_stream_ordering().await.expect("max");
    s.rooms
        .persist_event(&NewEvent {
            state_key: Some(user.to_owned()),
            membership: Some(membership.to_owned()),
            ..event_on(&room, &format!("${room_id}{n}"), "m.room.member", user, n)
        })
        .await
        .expect("persist")
        .stream_ordering
}

async fn change_keys(s: &Storage, user: &str, device_id: &str, curve: &str) -> i64 {
    let mut keys = upload(user, device_id);
    keys.device_keys = Some(device_keys_json(user, device_id, curve));
    s.e2ee
        .upload_keys(&keys)
        .await
        .expect("upload")
        .device_list_position
        .expect("change")
}

async fn device_lists(s: Storage) {
    const CAROL: &str = "@carol:test";
    const DAVE: &str = "@dave:test";
    for user in [ALICE, BOB, CAROL, DAVE] {
        device(&s, user, "D").await;
    }
    room_with_members(&s, "!shared:test", &[(ALICE, "join"), (BOB, "join")]).await;
    room_with_members(&s, "!other:test", &[(CAROL, "join")]).await;
    let since = s.rooms.max_stream_ordering().await.expect("max");

    change_keys(&s, BOB, "D", "b1").await;
    change_keys(&s, CAROL, "D", "c1").await;
    change_keys(&s, ALICE, "D", "a1").await;
    let now = s.rooms.max_stream_ordering().await.expect("max");
    assert_eq!(
        s.e2ee
            .device_lists_changed(ALICE, since, now)
            .await
            .expect("changed"),
        [ALICE, BOB],
        "themself and room-mates, not strangers"
    );
    assert!(
        s.e2ee
            .device_lists_changed(ALICE, now, now)
            .await
            .expect("changed")
            .is_empty()
    );
    assert_eq!(
        s.e2ee
            .device_lists_changed(CAROL, since, now)
            .await
            .expect("changed"),
        [CAROL]
    );

    // Dave joins Alice's room: he is news to Alice (and she to him).
    let before_join = now;
    member(&s, "!shared:test", DAVE, "join").await;
    let now = s.rooms.max_stream_ordering().await.expect("max");
    assert_eq!(
        s.e2ee
            .device_lists_changed(ALICE, before_join, now)
            .await
            .expect("changed"),
        [DAVE]
    );
    assert_eq!(
        s.e2ee
            .device_lists_changed(DAVE, before_join, now)
            .await
            .expect("changed"),
        [ALICE, BOB]
    );

    // Bob leaves: he left Alice's lists; Dave, still in the room, did not.
    let before_leave = now;
    member(&s, "!shared:test", BOB, "leave").await;
    let now = s.rooms.max_stream_ordering().await.expect("max");
    assert_eq!(
        s.e2ee
            .device_lists_left(ALICE, before_leave, now)
            .await
            .expect("left"),
        [BOB]
    );
    assert!(
        s.e2ee
            .device_lists_left(ALICE, now, now)
            .await
            .expect("left")
            .is_empty()
    );
    // To Bob, everyone he shared the room with is gone.
    assert_eq!(
        s.e2ee
            .device_lists_left(BOB, before_leave, now)
            .await
            .expect("left"),
        [ALICE, DAVE]
    );
    // Bob's later key changes no longer reach Alice.
    change_keys(&s, BOB, "D", "b2").await;
    let later = s.rooms.max_stream_ordering().await.expect("max");
    assert!(
        s.e2ee
            .device_lists_changed(ALICE, now, later)
            .await
            .expect("changed")
            .is_empty()
    );

    // Someone who still shares another room has not left.
    room_with_members(&s, "!both:test", &[(ALICE, "join"), (DAVE, "join")]).await;
    let before = s.rooms.max_stream_ordering().await.expect("max");
    member(&s, "!shared:test", DAVE, "leave").await;
    let now = s.rooms.max_stream_ordering().await.expect("max");
    assert!(
        s.e2ee
            .device_lists_left(ALICE, before, now)
            .await
            .expect("left")
            .is_empty()
    );
}

fn message(user_id: &str, target: DeviceTarget, body: &str) -> ToDeviceMessage {
    ToDeviceMessage {
        user_id: user_id.to_owned(),
        target,
        content: format!(r#"{{"body":"{body}"}}"#),
    }
}

fn batch(txn_id: &str, messages: Vec<ToDeviceMessage>) -> ToDeviceBatch {
    ToDeviceBatch {
        sender: ALICE.to_owned(),
        sender_device: "A1".to_owned(),
        txn_id: txn_id.to_owned(),
        event_type: "m.test".to_owned(),
        messages,
        now: 5,
    }
}

async fn to_device_inbox(s: Storage) {
    device(&s, ALICE, "A1").await;
    device(&s, BOB, "B1").await;
    device(&s, BOB, "B2").await;
    let start = s.rooms.max_stream_ordering().await.expect("max");
    let p1 = s
        .e2ee
        .send_to_device(&batch(
            "t1",
            vec![message(BOB, DeviceTarget::Device("B1".into()), "one")],
        ))
        .await
        .expect("send")
        .expect("new transaction");
    assert_eq!(p1, start + 1, "the next position of the global stream");
    let p2 = s
        .e2ee
        .send_to_device(&batch(
            "t2",
            vec![message(BOB, DeviceTarget::Device("B1".into()), "two")],
        ))
        .await
        .expect("send")
        .expect("new transaction");

    let inbox = s
        .e2ee
        .to_device_messages(BOB, "B1", 0, p2, 100)
        .await
        .expect("inbox");
    assert_eq!(inbox.len(), 2);
    assert_eq!(inbox[0].stream_position, p1);
    assert_eq!(inbox[0].sender, ALICE);
    assert_eq!(inbox[0].event_type, "m.test");
    assert_eq!(inbox[0].content, r#"{"body":"one"}"#);
    assert_eq!(inbox[1].stream_position, p2);
    // Bounded by position and by the limit.
    assert_eq!(
        s.e2ee
            .to_device_messages(BOB, "B1", p1, p2, 100)
            .await
            .expect("inbox")
            .len(),
        1
    );
    assert_eq!(
        s.e2ee
            .to_device_messages(BOB, "B1", 0, p1, 100)
            .await
            .expect("inbox")
            .len(),
        1
    );
    assert_eq!(
        s.e2ee
            .to_device_messages(BOB, "B1", 0, p2, 1)
            .await
            .expect("inbox")[0]
            .stream_position,
        p1
    );
    // Only that device.
    assert!(
        s.e2ee
            .to_device_messages(BOB, "B2", 0, p2, 100)
            .await
            .expect("inbox")
            .is_empty()
    );

    // Acknowledged messages go.
    assert_eq!(
        s.e2ee
            .delete_to_device_messages(BOB, "B1", p1)
            .await
            .expect("delete"),
        1
    );
    assert_eq!(
        s.e2ee
            .delete_to_device_messages(BOB, "B1", p1)
            .await
            .expect("delete"),
        0
    );
    let left = s
        .e2ee
        .to_device_messages(BOB, "B1", 0, p2, 100)
        .await
        .expect("inbox");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].stream_position, p2);
}

async fn to_device_inbox_in_one_read(s: Storage) {
    device(&s, ALICE, "A1").await;
    device(&s, BOB, "B1").await;
    let mut positions = Vec::new();
    for n in 0..3 {
        positions.push(
            s.e2ee
                .send_to_device(&batch(
                    &format!("t{n}"),
                    vec![message(
                        BOB,
                        DeviceTarget::Device("B1".into()),
                        &format!("m{n}"),
                    )],
                ))
                .await
                .expect("send")
                .expect("new transaction"),
        );
    }
    let (p0, p1, p2) = (positions[0], positions[1], positions[2]);
    let bodies = |records: &[palpo_storage::model::ToDeviceRecord]| {
        records
            .iter()
            .map(|r| r.content.clone())
            .collect::<Vec<_>>()
    };
    // An initial sync: everything up to `up_to`, oldest first, at most `limit`.
    let first = s
        .e2ee
        .to_device_inbox(BOB, "B1", 0, p1, 100)
        .await
        .expect("inbox");
    assert_eq!(bodies(&first), [r#"{"body":"m0"}"#, r#"{"body":"m1"}"#]);
    assert_eq!(first[1].stream_position, p1);
    let limited = s
        .e2ee
        .to_device_inbox(BOB, "B1", 0, p2, 1)
        .await
        .expect("inbox");
    assert_eq!(bodies(&limited), [r#"{"body":"m0"}"#]);
    // The next one, after `p0`: the new ones, and those up to `p0` are gone.
    let next = s
        .e2ee
        .to_device_inbox(BOB, "B1", p0, p2, 100)
        .await
        .expect("inbox");
    assert_eq!(bodies(&next), [r#"{"body":"m1"}"#, r#"{"body":"m2"}"#]);
    let all = s
        .e2ee
        .to_device_messages(BOB, "B1", 0, p2, 100)
        .await
        .expect("inbox");
    assert_eq!(bodies(&all), [r#"{"body":"m1"}"#, r#"{"body":"m2"}"#]);
    // Everything delivered: nothing new, and the inbox is empty.
    assert!(
        s.e2ee
            .to_device_inbox(BOB, "B1", p2, p2, 100)
            .await
            .expect("inbox")
            .is_empty()
    );
    assert!(
        s.e2ee
            .to_device_messages(BOB, "B1", 0, p2, 100)
            .await
            .expect("inbox")
            .is_empty()
    );
}

async fn to_device_fan_out_and_idempotency(s: Storage) {
    device(&s, ALICE, "A1").await;
    device(&s, BOB, "B1").await;
    device(&s, BOB, "B2").await;
    let p = s
        .e2ee
        .send_to_device(&batch(
            "fan",
            vec![
                message(BOB, DeviceTarget::All, "all"),
                message(BOB, DeviceTarget::Device("B2".into()), "just b2"),
                message(BOB, DeviceTarget::Device("GONE".into()), "nobody"),
                message("@nobody:test", DeviceTarget::All, "nobody"),
            ],
        ))
        .await
        .expect("send")
        .expect("new");
    let bodies = |records: Vec<palpo_storage::model::ToDeviceRecord>| {
        records
            .into_iter()
            .map(|r| r.content)
            .collect::<Vec<String>>()
    };
    assert_eq!(
        bodies(
            s.e2ee
                .to_device_messages(BOB, "B1", 0, p, 100)
                .await
                .expect("inbox")
        ),
        [r#"{"body":"all"}"#]
    );
    assert_eq!(
        bodies(
            s.e2ee
                .to_device_messages(BOB, "B2", 0, p, 100)
                .await
                .expect("inbox")
        ),
        [r#"{"body":"all"}"#, r#"{"body":"just b2"}"#]
    );

    // The same transaction again stores nothing; another device's same id is its own.
    assert_eq!(
        s.e2ee
            .send_to_device(&batch(
                "fan",
                vec![message(BOB, DeviceTarget::All, "again")]
            ))
            .await
            .expect("send"),
        None
    );
    let mut from_other_device = batch("fan", vec![message(BOB, DeviceTarget::All, "other")]);
    from_other_device.sender_device = "A2".to_owned();
    let p2 = s
        .e2ee
        .send_to_device(&from_other_device)
        .await
        .expect("send")
        .expect("another device's transaction");
    assert_eq!(
        s.e2ee
            .to_device_messages(BOB, "B1", 0, p2, 100)
            .await
            .expect("inbox")
            .len(),
        2
    );

    // Two sends of one transaction at once: one stores.
    let sends = (0..4).map(|_| {
        let s = s.clone();
        tokio::spawn(async move {
            s.e2ee
                .send_to_device(&batch(
                    "race",
                    vec![message(BOB, DeviceTarget::Device("B1".into()), "race")],
                ))
                .await
                .expect("send")
        })
    });
    let stored = futures::future::join_all(sends)
        .await
        .into_iter()
        .filter(|r| r.as_ref().expect("task").is_some())
        .count();
    assert_eq!(stored, 1);
    let now = s.rooms.max_stream_ordering().await.expect("max");
    assert_eq!(
        s.e2ee
            .to_device_messages(BOB, "B1", p2, now, 100)
            .await
            .expect("inbox")
            .len(),
        1
    );
}

async fn deleting_devices_forgets_their_keys(s: Storage) {
    device(&s, ALICE, "A1").await;
    device(&s, ALICE, "A2").await;
    device(&s, BOB, "B1").await;
    for device_id in ["A1", "A2"] {
        let mut keys = upload(ALICE, device_id);
        keys.device_keys = Some(device_keys_json(ALICE, device_id, "c"));
        keys.one_time_keys = vec![otk("signed_curve25519", "k1")];
        keys.fallback_keys = vec![otk("signed_curve25519", "f1")];
        s.e2ee.upload_keys(&keys).await.expect("upload");
    }
    let mut to_alice = batch("t", vec![message(ALICE, DeviceTarget::All, "hi")]);
    to_alice.sender = BOB.to_owned();
    to_alice.sender_device = "B1".to_owned();
    s.e2ee
        .send_to_device(&to_alice)
        .await
        .expect("send")
        .expect("new");
    let before = s.rooms.max_stream_ordering().await.expect("max");

    assert_eq!(
        s.e2ee
            .delete_device_keys(ALICE, &[])
            .await
            .expect("nothing"),
        None
    );
    let position = s
        .e2ee
        .delete_device_keys(ALICE, &["A1".to_owned()])
        .await
        .expect("delete")
        .expect("a change");
    assert!(position > before);
    assert_eq!(
        s.e2ee
            .device_lists_changed(ALICE, before, position)
            .await
            .expect("changed"),
        [ALICE]
    );
    let left = s.e2ee.device_keys(ALICE, &[]).await.expect("query");
    assert_eq!(
        left.iter()
            .map(|k| k.device_id.as_str())
            .collect::<Vec<_>>(),
        ["A2"]
    );
    assert!(
        s.e2ee
            .one_time_key_counts(ALICE, "A1")
            .await
            .expect("counts")
            .is_empty()
    );
    assert!(
        s.e2ee
            .unused_fallback_key_types(ALICE, "A1")
            .await
            .expect("types")
            .is_empty()
    );
    assert!(
        s.e2ee
            .to_device_messages(ALICE, "A1", 0, position, 100)
            .await
            .expect("inbox")
            .is_empty()
    );
    // The other device keeps everything.
    assert_eq!(
        s.e2ee
            .one_time_key_counts(ALICE, "A2")
            .await
            .expect("counts"),
        [("signed_curve25519".to_owned(), 1)]
    );
    assert_eq!(
        s.e2ee
            .to_device_messages(ALICE, "A2", 0, position, 100)
            .await
            .expect("inbox")
            .len(),
        1
    );
}

fn cross_key(key_type: &str, public: &str) -> CrossSigningKeyRecord {
    CrossSigningKeyRecord {
        key_type: key_type.to_owned(),
        key_json: format!(r#"{{"usage":["{key_type}"],"keys":{{"ed25519:{public}":"{public}"}}}}"#),
    }
}

fn signature(
    target: &str,
    key: &str,
    signer: &str,
    signer_key: &str,
    sig: &str,
) -> KeySignatureRecord {
    KeySignatureRecord {
        target_user_id: target.to_owned(),
        target_key_id: key.to_owned(),
        signer_user_id: signer.to_owned(),
        signer_key_id: signer_key.to_owned(),
        signature: sig.to_owned(),
    }
}

async fn cross_signing_keys_and_signatures(s: Storage) {
    device(&s, ALICE, "A1").await;
    assert!(
        s.e2ee
            .cross_signing_keys(ALICE)
            .await
            .expect("keys")
            .is_empty()
    );
    assert_eq!(
        s.e2ee
            .put_cross_signing_keys(ALICE, &[])
            .await
            .expect("nothing"),
        None
    );
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let p1 = s
        .e2ee
        .put_cross_signing_keys(
            ALICE,
            &[cross_key("master", "M1"), cross_key("self_signing", "S1")],
        )
        .await
        .expect("put")
        .expect("a change");
    assert_eq!(p1, before + 1, "the next position of the global stream");
    assert_eq!(
        s.e2ee
            .device_lists_changed(ALICE, before, p1)
            .await
            .expect("changed"),
        [ALICE]
    );
    // Replacing one type leaves the others.
    s.e2ee
        .put_cross_signing_keys(ALICE, &[cross_key("self_signing", "S2")])
        .await
        .expect("put");
    let keys = s.e2ee.cross_signing_keys(ALICE).await.expect("keys");
    assert_eq!(
        keys.iter().map(|k| k.key_type.as_str()).collect::<Vec<_>>(),
        ["master", "self_signing"]
    );
    assert!(keys[1].key_json.contains("S2"));

    // Signatures: Alice's own are seen by all, Bob's of Alice's key by Bob only.
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let p2 = s
        .e2ee
        .add_key_signatures(&[
            signature(ALICE, "A1", ALICE, "ed25519:S2", "sig-1"),
            signature(ALICE, "M1", BOB, "ed25519:U1", "sig-2"),
            signature(BOB, "BM", ALICE, "ed25519:U2", "sig-3"),
        ])
        .await
        .expect("add")
        .expect("a change");
    assert!(p2 > before);
    assert_eq!(
        s.e2ee
            .device_lists_changed(ALICE, before, p2)
            .await
            .expect("changed"),
        [ALICE],
        "the signed user's list changed (Bob shares no room with Alice)"
    );
    assert_eq!(
        s.e2ee
            .device_lists_changed(BOB, before, p2)
            .await
            .expect("changed"),
        [BOB]
    );
    let seen_by = |viewer: &'static str| {
        let s = s.clone();
        async move {
            s.e2ee
                .key_signatures(ALICE, viewer)
                .await
                .expect("signatures")
                .into_iter()
                .map(|sig| sig.signature)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(seen_by(ALICE).await, ["sig-1"]);
    assert_eq!(seen_by(BOB).await, ["sig-1", "sig-2"]);
    assert_eq!(seen_by("@carol:test").await, ["sig-1"]);
    // The same signer key again replaces its signature.
    s.e2ee
        .add_key_signatures(&[signature(ALICE, "A1", ALICE, "ed25519:S2", "sig-1b")])
        .await
        .expect("add");
    assert_eq!(seen_by(ALICE).await, ["sig-1b"]);

    // A deleted device takes its signatures along.
    s.e2ee
        .delete_device_keys(ALICE, &["A1".to_owned()])
        .await
        .expect("delete");
    assert!(seen_by(ALICE).await.is_empty());
    assert_eq!(seen_by(BOB).await, ["sig-2"]);
}
