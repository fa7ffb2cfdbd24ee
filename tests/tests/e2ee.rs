//! End-to-end encryption keys and to-device messages over HTTP, on every backend with and
//! without Redis: upload, query and claim between users (one-time keys, then the fallback key),
//! counts in `/sync`, device-list changes in `/sync` and `/keys/changes`, to-device messages
//! delivered once to the right devices, `*` fan-out, transaction ids, long-polls woken, device
//! deletion, the sliding sync extensions, errors with the spec's statuses, and ruma reading it
//! all.

use std::{borrow::Cow, collections::BTreeMap, time::Duration};

use palpo_tests::{
    Backend, Session, TestApp, backend_matrix, enc, long_poll, next_batch,
    ruma_client::{exchange, ok},
    run, sync,
};
use ruma::{
    OwnedDeviceId, OwnedOneTimeKeyId, OwnedUserId, TransactionId,
    api::{
        OutgoingRequestExt, SupportedVersions,
        auth_scheme::SendAccessToken,
        client::{
            discovery::get_supported_versions,
            keys::{claim_keys, get_key_changes, get_keys, upload_keys},
            sync::sync_events,
            to_device::send_event_to_device,
        },
    },
    encryption::OneTimeKey,
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::{Value, json};

const UPLOAD: &str = "/_matrix/client/v3/keys/upload";
const QUERY: &str = "/_matrix/client/v3/keys/query";
const CLAIM: &str = "/_matrix/client/v3/keys/claim";
const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// The identity keys of a session's device, with a field the server does not know (kept, as
/// the signature covers it).
fn device_keys(session: &Session, curve: &str) -> Value {
    let device = &session.device_id;
    json!({
        "user_id": session.user_id,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): curve,
            format!("ed25519:{device}"): format!("ed-{device}"),
        },
        "signatures": {session.user_id.clone(): {format!("ed25519:{device}"): "c2lnbmF0dXJl"}},
        "org.example.extra": true,
    })
}

/// Signed one-time keys `signed_curve25519:<prefix><n>` for `n` in `range`.
fn one_time_keys(session: &Session, prefix: &str, range: std::ops::Range<u32>) -> Value {
    let keys: serde_json::Map<String, Value> = range
        .map(|n| {
            (
                format!("signed_curve25519:{prefix}{n:03}"),
                signed_key(session, &format!("{prefix}-key-{n}"), false),
            )
        })
        .collect();
    Value::Object(keys)
}

fn signed_key(session: &Session, key: &str, fallback: bool) -> Value {
    let mut value = json!({
        "key": key,
        "signatures": {
            session.user_id.clone(): {format!("ed25519:{}", session.device_id): "c2lnbmF0dXJl"}
        },
    });
    if fallback {
        value["fallback"] = json!(true);
    }
    value
}

async fn upload(app: &TestApp, session: &Session, body: Value) -> Value {
    app.post(UPLOAD, Some(&session.access_token), body)
        .await
        .expect_ok()
        .clone()
}

async fn claim(app: &TestApp, session: &Session, of: &Session) -> Value {
    app.post(
        CLAIM,
        Some(&session.access_token),
        json!({"one_time_keys": {of.user_id.clone(): {of.device_id.clone(): "signed_curve25519"}}}),
    )
    .await
    .expect_ok()
    .clone()
}

/// The single claimed key of `of`'s device: `(key id, key)`.
fn claimed<'a>(response: &'a Value, of: &Session) -> (&'a String, &'a Value) {
    let keys = response["one_time_keys"][&of.user_id][&of.device_id]
        .as_object()
        .unwrap_or_else(|| panic!("no key claimed: {response}"));
    assert_eq!(keys.len(), 1, "{response}");
    keys.iter().next().expect("one key")
}

async fn send_to_device(app: &TestApp, from: &Session, txn_id: &str, messages: Value) {
    app.put(
        &format!(
            "/_matrix/client/v3/sendToDevice/m.test.message/{}",
            enc(txn_id)
        ),
        Some(&from.access_token),
        json!({ "messages": messages }),
    )
    .await
    .expect_ok();
}

fn to_device_events(response: &Value) -> Vec<Value> {
    response["to_device"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no to_device.events: {response}"))
        .clone()
}

fn bodies(response: &Value) -> Vec<String> {
    to_device_events(response)
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `value` as ruma's raw JSON of any type.
fn raw<T>(value: Value) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(&value).expect("raw json"))
}

/// Alice and Bob, joined to a room Alice created.
async fn two_in_a_room(app: &TestApp) -> (Session, Session, String) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &room_id).await;
    (alice, bob, room_id)
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(keys_upload_query_claim, keys_upload_query_claim_scenario);

async fn keys_upload_query_claim_scenario(app: &TestApp) {
    let (alice, bob, _room) = two_in_a_room(app).await;
    let alice_since = next_batch(&sync(app, &alice.access_token, None, 0).await);

    // Alice publishes identity keys, 3 one-time keys and a fallback key.
    let uploaded = upload(
        app,
        &alice,
        json!({
            "device_keys": device_keys(&alice, "curve-1"),
            "one_time_keys": one_time_keys(&alice, "A", 0..3),
            "fallback_keys": {
                "signed_curve25519:F1": signed_key(&alice, "fallback-1", true),
            },
        }),
    )
    .await;
    assert_eq!(
        uploaded,
        json!({"one_time_key_counts": {"signed_curve25519": 3}})
    );

    // Bob queries Alice's devices: the keys as uploaded, with the device's display name.
    app.put(
        &format!("/_matrix/client/v3/devices/{}", enc(&alice.device_id)),
        Some(&alice.access_token),
        json!({"display_name": "Alice's laptop"}),
    )
    .await
    .expect_ok();
    let query = app
        .post(
            QUERY,
            Some(&bob.access_token),
            json!({"device_keys": {alice.user_id.clone(): []}}),
        )
        .await;
    let query = query.expect_ok();
    assert_eq!(query["failures"], json!({}));
    let keys = &query["device_keys"][&alice.user_id][&alice.device_id];
    let mut expected = device_keys(&alice, "curve-1");
    expected["unsigned"] = json!({"device_display_name": "Alice's laptop"});
    assert_eq!(keys, &expected, "returned as uploaded");
    // Asking for one device, an unknown device, an unknown user.
    let query = app
        .post(
            QUERY,
            Some(&bob.access_token),
            json!({"device_keys": {
                alice.user_id.clone(): [alice.device_id.clone(), "NOSUCHDEVICE"],
                app.user_id("nobody"): [],
                bob.user_id.clone(): [],
            }}),
        )
        .await;
    let devices = query.expect_ok()["device_keys"].clone();
    assert_eq!(
        devices
            .as_object()
            .map(|d| d.keys().cloned().collect::<Vec<_>>()),
        Some(vec![alice.user_id.clone()]),
        "unknown users and users without keys are left out: {devices}"
    );
    assert_eq!(
        devices[&alice.user_id]
            .as_object()
            .map(|d| d.keys().cloned().collect::<Vec<_>>()),
        Some(vec![alice.device_id.clone()])
    );

    // Alice's sync shows her counts and her unused fallback key.
    let response = sync(app, &alice.access_token, Some(&alice_since), 0).await;
    assert_eq!(
        response["device_one_time_keys_count"]["signed_curve25519"],
        3
    );
    assert_eq!(
        response["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    let alice_since = next_batch(&response);

    // Bob claims: the oldest one-time key, once; Alice's count goes down.
    let first = claim(app, &bob, &alice).await;
    assert_eq!(first["failures"], json!({}));
    let (key_id, key) = claimed(&first, &alice);
    assert_eq!(key_id, "signed_curve25519:A000");
    assert_eq!(key, &signed_key(&alice, "A-key-0", false));
    let response = sync(app, &alice.access_token, Some(&alice_since), 0).await;
    assert_eq!(
        response["device_one_time_keys_count"]["signed_curve25519"],
        2
    );
    let mut seen = vec![key_id.clone()];
    for _ in 0..2 {
        let next = claim(app, &bob, &alice).await;
        let (key_id, _) = claimed(&next, &alice);
        assert!(!seen.contains(key_id), "{key_id} handed out twice");
        seen.push(key_id.clone());
    }
    let response = sync(app, &alice.access_token, None, 0).await;
    assert_eq!(
        response["device_one_time_keys_count"],
        json!({"signed_curve25519": 0}),
        "listed at zero"
    );

    // None left: the fallback key, as often as asked; it is then reported used.
    for _ in 0..2 {
        let fallback = claim(app, &bob, &alice).await;
        let (key_id, key) = claimed(&fallback, &alice);
        assert_eq!(key_id, "signed_curve25519:F1");
        assert_eq!(key, &signed_key(&alice, "fallback-1", true));
    }
    let response = sync(app, &alice.access_token, None, 0).await;
    assert_eq!(response["device_unused_fallback_key_types"], json!([]));

    // A device with nothing to claim is left out; so is an unknown one.
    let bob_keys = app
        .post(
            CLAIM,
            Some(&alice.access_token),
            json!({"one_time_keys": {bob.user_id.clone(): {bob.device_id.clone(): "signed_curve25519", "NOPE": "signed_curve25519"}}}),
        )
        .await;
    assert_eq!(
        bob_keys.expect_ok()["one_time_keys"],
        json!({}),
        "{}",
        bob_keys.text
    );

    // A new upload (with a new fallback key) refills both.
    let counts = upload(
        app,
        &alice,
        json!({
            "one_time_keys": one_time_keys(&alice, "B", 0..2),
            "fallback_keys": {"signed_curve25519:F2": signed_key(&alice, "fallback-2", true)},
        }),
    )
    .await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 2);
    let response = sync(app, &alice.access_token, None, 0).await;
    assert_eq!(
        response["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    // Uploading the very same keys again is harmless.
    let counts = upload(
        app,
        &alice,
        json!({"one_time_keys": one_time_keys(&alice, "B", 0..2)}),
    )
    .await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 2);

    // Keys of another algorithm are counted too (read apart from the sync's position).
    upload(
        app,
        &alice,
        json!({
            "one_time_keys": {"curve25519:C1": "unsigned-key"},
            "fallback_keys": {"curve25519:CF": "unsigned-fallback"},
        }),
    )
    .await;
    let response = sync(app, &alice.access_token, None, 0).await;
    assert_eq!(
        response["device_one_time_keys_count"],
        json!({"curve25519": 1, "signed_curve25519": 2})
    );
    assert_eq!(
        response["device_unused_fallback_key_types"],
        json!(["curve25519", "signed_curve25519"])
    );
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(device_list_changes, device_list_changes_scenario);

async fn device_list_changes_scenario(app: &TestApp) {
    let (alice, bob, room_id) = two_in_a_room(app).await;
    let carol = app.register("carol", "pw").await;
    let bob_since = next_batch(&sync(app, &bob.access_token, None, 0).await);
    let carol_since = next_batch(&sync(app, &carol.access_token, None, 0).await);

    // Alice uploads keys: Bob, her room-mate, hears of it, and so does she; Carol does not.
    upload(
        app,
        &alice,
        json!({"device_keys": device_keys(&alice, "curve-1")}),
    )
    .await;
    let response = sync(app, &bob.access_token, Some(&bob_since), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["changed"]),
        [alice.user_id.as_str()],
        "{response}"
    );
    let bob_next = next_batch(&response);
    let response = sync(app, &carol.access_token, Some(&carol_since), 1000).await;
    assert_eq!(response["device_lists"]["changed"], json!([]));
    let keys_changes = |from: String, to: String, token: String| async move {
        app.get(
            &format!(
                "/_matrix/client/v3/keys/changes?from={}&to={}",
                enc(&from),
                enc(&to)
            ),
            Some(&token),
        )
        .await
        .expect_ok()
        .clone()
    };
    let changes = keys_changes(
        bob_since.clone(),
        bob_next.clone(),
        bob.access_token.clone(),
    )
    .await;
    assert_eq!(strings(&changes["changed"]), [alice.user_id.as_str()]);
    assert_eq!(changes["left"], json!([]));
    let changes = keys_changes(bob_next.clone(), bob_next.clone(), bob.access_token.clone()).await;
    assert_eq!(changes["changed"], json!([]));

    // The same keys again are no change; the next sync has nothing to say.
    upload(
        app,
        &alice,
        json!({"device_keys": device_keys(&alice, "curve-1")}),
    )
    .await;
    let response = sync(app, &bob.access_token, Some(&bob_next), 300).await;
    assert_eq!(response["device_lists"]["changed"], json!([]));

    // A long-poll of Bob is woken by Alice's new keys.
    let poll = long_poll(app, &bob.access_token, &bob_next, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "waits while nothing changes");
    let started = std::time::Instant::now();
    upload(
        app,
        &alice,
        json!({"device_keys": device_keys(&alice, "curve-2")}),
    )
    .await;
    let woke = poll.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        strings(&woke["device_lists"]["changed"]),
        [alice.user_id.as_str()],
        "{woke}"
    );
    let bob_next = next_batch(&woke);

    // Alice logs in a second device and logs it out again: each is a change of her list, and
    // the deleted device's keys are gone.
    let phone = app.login("alice", "pw").await;
    upload(
        app,
        &phone,
        json!({
            "device_keys": device_keys(&phone, "curve-phone"),
            "one_time_keys": one_time_keys(&phone, "P", 0..2),
        }),
    )
    .await;
    let response = sync(app, &bob.access_token, Some(&bob_next), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["changed"]),
        [alice.user_id.as_str()]
    );
    let bob_next = next_batch(&response);
    app.post(
        "/_matrix/client/v3/logout",
        Some(&phone.access_token),
        json!({}),
    )
    .await
    .expect_ok();
    let response = sync(app, &bob.access_token, Some(&bob_next), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["changed"]),
        [alice.user_id.as_str()],
        "a deleted device is a change"
    );
    let bob_next = next_batch(&response);
    let query = app
        .post(
            QUERY,
            Some(&bob.access_token),
            json!({"device_keys": {alice.user_id.clone(): []}}),
        )
        .await;
    let devices = query.expect_ok()["device_keys"][&alice.user_id].clone();
    assert_eq!(
        devices
            .as_object()
            .map(|d| d.keys().cloned().collect::<Vec<_>>()),
        Some(vec![alice.device_id.clone()]),
        "{devices}"
    );
    let claimed = claim(app, &bob, &phone).await;
    assert_eq!(claimed["one_time_keys"], json!({}));

    // Carol joins the room: she is news to Bob, and Bob and Alice to her.
    let carol_since = next_batch(&sync(app, &carol.access_token, None, 0).await);
    app.join_room(&carol.access_token, &room_id).await;
    let response = sync(app, &bob.access_token, Some(&bob_next), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["changed"]),
        [carol.user_id.as_str()]
    );
    let bob_next = next_batch(&response);
    let response = sync(app, &carol.access_token, Some(&carol_since), 0).await;
    let mut expected = vec![alice.user_id.clone(), bob.user_id.clone()];
    expected.sort();
    assert_eq!(strings(&response["device_lists"]["changed"]), expected);

    // Carol leaves: she shares no room with Bob any more.
    app.post(
        &app.room_path(&room_id, "/leave"),
        Some(&carol.access_token),
        json!({}),
    )
    .await
    .expect_ok();
    let response = sync(app, &bob.access_token, Some(&bob_next), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["left"]),
        [carol.user_id.as_str()],
        "{response}"
    );
    let changes = keys_changes(bob_next, next_batch(&response), bob.access_token.clone()).await;
    assert_eq!(strings(&changes["left"]), [carol.user_id.as_str()]);
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(to_device_messages, to_device_messages_scenario);

async fn to_device_messages_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let bob2 = app.login("bob", "pw").await;
    let since1 = next_batch(&sync(app, &bob.access_token, None, 0).await);
    let since2 = next_batch(&sync(app, &bob2.access_token, None, 0).await);

    // To one device: that device gets it once, the other never.
    send_to_device(
        app,
        &alice,
        "t1",
        json!({bob.user_id.clone(): {bob.device_id.clone(): {"body": "for one"}}}),
    )
    .await;
    let response = sync(app, &bob.access_token, Some(&since1), 0).await;
    let events = to_device_events(&response);
    assert_eq!(events.len(), 1, "{response}");
    assert_eq!(events[0]["type"], "m.test.message");
    assert_eq!(events[0]["sender"], alice.user_id.as_str());
    assert_eq!(events[0]["content"], json!({"body": "for one"}));
    // Not again once the next sync acknowledged it; meanwhile a retry of the same sync
    // (same `since`) gets it again.
    let again = sync(app, &bob.access_token, Some(&since1), 0).await;
    assert_eq!(bodies(&again), ["for one"], "not acknowledged yet");
    let since1 = next_batch(&response);
    let response = sync(app, &bob.access_token, Some(&since1), 0).await;
    assert!(bodies(&response).is_empty(), "{response}");
    let since1 = next_batch(&response);
    let other = sync(app, &bob2.access_token, Some(&since2), 0).await;
    assert!(bodies(&other).is_empty(), "{other}");
    let since2 = next_batch(&other);
    // Acknowledged messages are deleted.
    let inbox = app
        .storage()
        .e2ee
        .to_device_messages(&bob.user_id, &bob.device_id, 0, i64::MAX, 100)
        .await
        .expect("inbox");
    assert!(inbox.is_empty(), "{inbox:?}");

    // `*`: every device of the user; the same transaction again sends nothing.
    for _ in 0..2 {
        send_to_device(
            app,
            &alice,
            "t2",
            json!({bob.user_id.clone(): {"*": {"body": "for all"}}}),
        )
        .await;
    }
    let response = sync(app, &bob.access_token, Some(&since1), 0).await;
    assert_eq!(bodies(&response), ["for all"]);
    let response = sync(app, &bob.access_token, Some(&next_batch(&response)), 0).await;
    assert!(bodies(&response).is_empty(), "acknowledged");
    let since1 = next_batch(&response);
    let response = sync(app, &bob2.access_token, Some(&since2), 0).await;
    assert_eq!(bodies(&response), ["for all"]);
    let since2 = next_batch(&response);
    // The same transaction id from another device of the sender is another request.
    let alice2 = app.login("alice", "pw").await;
    send_to_device(
        app,
        &alice2,
        "t2",
        json!({bob.user_id.clone(): {bob2.device_id.clone(): {"body": "from the phone"}}}),
    )
    .await;
    let response = sync(app, &bob2.access_token, Some(&since2), 0).await;
    assert_eq!(bodies(&response), ["from the phone"]);

    // Messages wait for a device that is offline, in order, and an initial sync gets them.
    for n in 0..3 {
        send_to_device(
            app,
            &alice,
            &format!("queue{n}"),
            json!({bob.user_id.clone(): {bob.device_id.clone(): {"body": format!("queued {n}")}}}),
        )
        .await;
    }
    let initial = sync(app, &bob.access_token, None, 0).await;
    assert_eq!(bodies(&initial), ["queued 0", "queued 1", "queued 2"]);
    let response = sync(app, &bob.access_token, Some(&next_batch(&initial)), 0).await;
    assert!(bodies(&response).is_empty());

    // Unknown users and devices, and users of other servers, are dropped quietly.
    send_to_device(
        app,
        &alice,
        "t3",
        json!({
            app.user_id("nobody"): {"*": {"body": "x"}},
            bob.user_id.clone(): {"NOSUCHDEVICE": {"body": "x"}},
            "@someone:elsewhere.example": {"*": {"body": "x"}},
        }),
    )
    .await;
    let response = sync(app, &bob.access_token, Some(&since1), 0).await;
    assert!(bodies(&response).is_empty(), "{response}");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(
    to_device_wakes_long_poll,
    to_device_wakes_long_poll_scenario
);

async fn to_device_wakes_long_poll_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let bob2 = app.login("bob", "pw").await;
    let since = next_batch(&sync(app, &bob.access_token, None, 0).await);
    let poll = long_poll(app, &bob.access_token, &since, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A message for another device of Bob does not answer this one.
    send_to_device(
        app,
        &alice,
        "other",
        json!({bob.user_id.clone(): {bob2.device_id.clone(): {"body": "not yours"}}}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "still waiting");
    let started = std::time::Instant::now();
    send_to_device(
        app,
        &alice,
        "wake",
        json!({bob.user_id.clone(): {bob.device_id.clone(): {"body": "wake up"}}}),
    )
    .await;
    let woke = poll.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(bodies(&woke), ["wake up"], "{woke}");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(sliding_sync_extensions, sliding_sync_extensions_scenario);

async fn sliding_sync_extensions_scenario(app: &TestApp) {
    let (alice, bob, _room) = two_in_a_room(app).await;
    upload(
        app,
        &bob,
        json!({
            "one_time_keys": one_time_keys(&bob, "K", 0..4),
            "fallback_keys": {"signed_curve25519:F": signed_key(&bob, "fb", true)},
        }),
    )
    .await;
    let request = |to_device_since: Option<&str>| {
        let mut to_device = json!({"enabled": true});
        if let Some(since) = to_device_since {
            to_device["since"] = json!(since);
        }
        json!({
            "conn_id": "e2ee",
            "lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 1}},
            "extensions": {"to_device": to_device, "e2ee": {"enabled": true}},
        })
    };
    let first = app
        .post(SLIDING, Some(&bob.access_token), request(None))
        .await;
    let first = first.expect_ok().clone();
    let e2ee = &first["extensions"]["e2ee"];
    assert_eq!(
        e2ee["device_one_time_keys_count"]["signed_curve25519"], 4,
        "{first}"
    );
    assert_eq!(
        e2ee["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    let to_device = &first["extensions"]["to_device"];
    assert_eq!(to_device["events"], json!([]));
    let next = to_device["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let pos = first["pos"].as_str().expect("pos").to_owned();

    // A to-device message and a key change of Alice: both in the next answer.
    send_to_device(
        app,
        &alice,
        "s1",
        json!({bob.user_id.clone(): {bob.device_id.clone(): {"body": "sliding"}}}),
    )
    .await;
    upload(
        app,
        &alice,
        json!({"device_keys": device_keys(&alice, "curve")}),
    )
    .await;
    let second = app
        .post(
            &format!("{SLIDING}?pos={pos}&timeout=5000"),
            Some(&bob.access_token),
            request(Some(&next)),
        )
        .await;
    let second = second.expect_ok().clone();
    let to_device = &second["extensions"]["to_device"];
    assert_eq!(
        strings(
            &to_device["events"]
                .as_array()
                .expect("events")
                .iter()
                .map(|e| e["content"]["body"].clone())
                .collect::<Value>()
        ),
        ["sliding"],
        "{second}"
    );
    assert_eq!(
        strings(&second["extensions"]["e2ee"]["device_lists"]["changed"]),
        [alice.user_id.as_str()]
    );
    let next = to_device["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let pos = second["pos"].as_str().expect("pos").to_owned();

    // Acknowledged with `since`: not again.
    let third = app
        .post(
            &format!("{SLIDING}?pos={pos}"),
            Some(&bob.access_token),
            request(Some(&next)),
        )
        .await;
    assert_eq!(
        third.expect_ok()["extensions"]["to_device"]["events"],
        json!([])
    );

    // A bad `since` is the client's error.
    app.post(
        SLIDING,
        Some(&bob.access_token),
        json!({"conn_id": "bad", "extensions": {"to_device": {"enabled": true, "since": "x"}}}),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
}

// ---------------------------------------------------------------------------------------------

/// Malformed requests: Matrix errors with the spec's statuses, never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_matrix_errors() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let bob = app.register("bob", "pw").await;
        let token = Some(alice.access_token.as_str());

        // Identity keys of someone else, or of another device.
        let mut not_mine = device_keys(&alice, "c");
        not_mine["user_id"] = json!(bob.user_id);
        app.post(UPLOAD, token, json!({"device_keys": not_mine}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        let mut other_device = device_keys(&alice, "c");
        other_device["device_id"] = json!("OTHERDEVICE");
        app.post(UPLOAD, token, json!({"device_keys": other_device}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        // Malformed identity keys.
        for bad in [
            json!("keys"),
            json!({"user_id": alice.user_id}),
            json!({"user_id": 5, "device_id": alice.device_id, "algorithms": [], "keys": {}, "signatures": {}}),
        ] {
            app.post(UPLOAD, token, json!({"device_keys": bad}))
                .await
                .expect_error(400, "M_BAD_JSON");
        }
        // Malformed one-time and fallback keys.
        app.post(UPLOAD, token, json!({"one_time_keys": {"nocolon": "k"}}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        app.post(UPLOAD, token, json!({"one_time_keys": {"curve25519:A": 5}}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(UPLOAD, token, json!({"one_time_keys": ["k"]}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(
            UPLOAD,
            token,
            json!({"fallback_keys": {"signed_curve25519:F1": "a", "signed_curve25519:F2": "b"}}),
        )
        .await
        .expect_error(400, "M_INVALID_PARAM");
        // The same one-time key id with another key.
        upload(app, &alice, json!({"one_time_keys": {"curve25519:K": "one"}})).await;
        app.post(UPLOAD, token, json!({"one_time_keys": {"curve25519:K": "two"}}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        app.post(UPLOAD, token, Value::Null)
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(UPLOAD, None, json!({}))
            .await
            .expect_error(401, "M_MISSING_TOKEN");

        // Query and claim.
        app.post(QUERY, token, json!({}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(QUERY, token, json!({"device_keys": {"not-a-user": []}}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        app.post(QUERY, token, json!({"device_keys": {alice.user_id.clone(): "D"}}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(CLAIM, token, json!({"one_time_keys": {alice.user_id.clone(): ["D"]}}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(CLAIM, token, json!({"one_time_keys": {"nobody": {"D": "signed_curve25519"}}}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        // Users of other servers: failures, not errors.
        let remote = app
            .post(
                QUERY,
                token,
                json!({"device_keys": {"@someone:elsewhere.example": []}}),
            )
            .await;
        let remote = remote.expect_ok();
        assert!(remote["failures"]["elsewhere.example"].is_object(), "{remote}");
        assert_eq!(remote["device_keys"], json!({}));
        let remote = app
            .post(
                CLAIM,
                token,
                json!({"one_time_keys": {"@someone:elsewhere.example": {"D": "signed_curve25519"}}}),
            )
            .await;
        assert!(remote.expect_ok()["failures"]["elsewhere.example"].is_object());

        // Key changes: both tokens required and valid.
        app.get("/_matrix/client/v3/keys/changes?from=s1_0", token)
            .await
            .expect_status(400);
        app.get("/_matrix/client/v3/keys/changes?from=nope&to=s1_0", token)
            .await
            .expect_error(400, "M_INVALID_PARAM");
        app.get("/_matrix/client/v3/keys/changes?from=s1_0&to=s1_0", None)
            .await
            .expect_error(401, "M_MISSING_TOKEN");

        // Send-to-device.
        let path = "/_matrix/client/v3/sendToDevice/m.test/bad1";
        app.put(path, token, json!({}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.put(path, token, json!({"messages": {bob.user_id.clone(): {"D": "text"}}}))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.put(path, token, json!({"messages": {"bob": {"D": {}}}}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        let long_txn = format!("/_matrix/client/v3/sendToDevice/m.test/{}", "t".repeat(300));
        app.put(&long_txn, token, json!({"messages": {}}))
            .await
            .expect_error(400, "M_INVALID_PARAM");
        app.put(path, None, json!({"messages": {}}))
            .await
            .expect_error(401, "M_MISSING_TOKEN");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------

/// ruma builds the requests and reads the answers: keys, to-device, and the sync sections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_round_trip() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let (alice, bob, _room) = two_in_a_room(app).await;
        let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
        let req = get_supported_versions::Request::new()
            .try_into_http_request::<Vec<u8>>(&app.base_url, SendAccessToken::None, ())
            .expect("request");
        let versions: get_supported_versions::Response = ok(&exchange(app, req).await);
        let supported =
            SupportedVersions::from_parts(&versions.versions, &versions.unstable_features);
        let v = Cow::Borrowed(&supported);
        let alice_id = OwnedUserId::try_from(alice.user_id.as_str()).expect("user id");
        let bob_id = OwnedUserId::try_from(bob.user_id.as_str()).expect("user id");
        let alice_device = OwnedDeviceId::from(alice.device_id.as_str());
        let bob_device = OwnedDeviceId::from(bob.device_id.as_str());
        let bob_since = next_batch(&sync(app, b, None, 0).await);
        app.put(
            &format!("/_matrix/client/v3/devices/{}", enc(&alice.device_id)),
            Some(a),
            json!({"display_name": "Alice's laptop"}),
        )
        .await
        .expect_ok();

        // Upload.
        let mut upload = upload_keys::v3::Request::new();
        upload.device_keys = Some(raw(device_keys(&alice, "curve")));
        // ruma wants real (base64) keys.
        const KEY: &str = "zKbLg+NrIjpnagy+pIY6uPL4ZwEG2v+8F9lmgsnlZzs";
        upload.one_time_keys = ["signed_curve25519:R000", "signed_curve25519:R001"]
            .into_iter()
            .map(|id| {
                (
                    OwnedOneTimeKeyId::try_from(id).expect("key id"),
                    raw(signed_key(&alice, KEY, false)),
                )
            })
            .collect();
        upload.fallback_keys = BTreeMap::from([(
            OwnedOneTimeKeyId::try_from("signed_curve25519:FB").expect("key id"),
            raw(signed_key(&alice, KEY, true)),
        )]);
        let req = upload
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(a),
                v.clone(),
            )
            .expect("request");
        let uploaded: upload_keys::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(
            uploaded
                .one_time_key_counts
                .get(&ruma::OneTimeKeyAlgorithm::SignedCurve25519)
                .map(|n| u64::from(*n)),
            Some(2)
        );

        // Query.
        let mut query = get_keys::v3::Request::new();
        query.device_keys = BTreeMap::from([(alice_id.clone(), Vec::new())]);
        let req = query
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let queried: get_keys::v3::Response = ok(&exchange(app, req).await);
        let keys = queried.device_keys[&alice_id][&alice_device]
            .deserialize()
            .expect("ruma reads the device keys");
        assert_eq!(keys.device_id, alice_device);
        assert!(keys.unsigned.device_display_name.is_some());

        // Claim.
        let claim = claim_keys::v3::Request::new(BTreeMap::from([(
            alice_id.clone(),
            BTreeMap::from([(
                alice_device.clone(),
                ruma::OneTimeKeyAlgorithm::SignedCurve25519,
            )]),
        )]));
        let req = claim
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let claimed: claim_keys::v3::Response = ok(&exchange(app, req).await);
        let (key_id, key) = claimed.one_time_keys[&alice_id][&alice_device]
            .iter()
            .next()
            .expect("a key");
        assert_eq!(key_id.as_str(), "signed_curve25519:R000");
        assert!(matches!(
            key.deserialize().expect("ruma reads the key"),
            OneTimeKey::SignedKey(_)
        ));

        // Send to device.
        let messages = BTreeMap::from([(
            bob_id.clone(),
            BTreeMap::from([(
                DeviceIdOrAllDevices::DeviceId(bob_device.clone()),
                raw(json!({"body": "hello"})),
            )]),
        )]);
        let req = send_event_to_device::v3::Request::new_raw(
            "m.test.message".into(),
            TransactionId::new(),
            messages,
        )
        .try_into_http_request::<Vec<u8>>(&app.base_url, SendAccessToken::IfRequired(a), v.clone())
        .expect("request");
        let _: send_event_to_device::v3::Response = ok(&exchange(app, req).await);

        // Bob's sync, read by ruma: the message, Alice's key change, his counts.
        let mut sync_req = sync_events::v3::Request::new();
        sync_req.since = Some(bob_since.clone());
        let req = sync_req
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let synced: sync_events::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(synced.to_device.events.len(), 1);
        let event = synced.to_device.events[0]
            .deserialize()
            .expect("ruma reads the to-device event");
        assert_eq!(event.sender(), alice_id);
        assert_eq!(synced.device_lists.changed, vec![alice_id.clone()]);
        assert_eq!(
            synced.device_unused_fallback_key_types,
            Some(Vec::new()),
            "Bob has no fallback key"
        );

        // Key changes.
        let req = get_key_changes::v3::Request::new(bob_since, synced.next_batch.clone())
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let changes: get_key_changes::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(changes.changed, vec![alice_id]);
        assert!(changes.left.is_empty());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------

/// More to-device messages than one sync hands out: the token says where the next continues
/// (`s<P>_<E>_<D>`), and nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_backlog_spans_syncs() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let bob = app.register("bob", "pw").await;
        let since = next_batch(&sync(app, &bob.access_token, None, 0).await);
        // Two messages per request for Bob's device: `*` and the device itself.
        for n in 0..60 {
            send_to_device(
                app,
                &alice,
                &format!("backlog{n}"),
                json!({bob.user_id.clone(): {
                    "*": {"body": format!("{n:02} all")},
                    bob.device_id.clone(): {"body": format!("{n:02} one")},
                }}),
            )
            .await;
        }
        let first = sync(app, &bob.access_token, Some(&since), 0).await;
        let got = bodies(&first);
        assert_eq!(got.len(), 100, "one sync hands out 100");
        let token = next_batch(&first);
        assert_eq!(
            token.matches('_').count(),
            2,
            "the token marks the to-device backlog: {token}"
        );
        // Retried with the same token: the same messages again.
        assert_eq!(
            bodies(&sync(app, &bob.access_token, Some(&since), 0).await),
            got
        );
        let second = sync(app, &bob.access_token, Some(&token), 0).await;
        let rest = bodies(&second);
        assert_eq!(rest.len(), 20);
        let mut all: Vec<String> = got.into_iter().chain(rest).collect();
        let sent = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), sent, "none twice");
        assert_eq!(sent, 120, "none lost");
        let token = next_batch(&second);
        assert_eq!(token.matches('_').count(), 1, "caught up: {token}");
        let third = sync(app, &bob.access_token, Some(&token), 0).await;
        assert!(bodies(&third).is_empty());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------

mod to_device_wakes_another_process {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::to_device_wakes_another_process(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::to_device_wakes_another_process(super::Backend::MySql).await;
    }
}

/// Bob long-polls on one process; Alice's to-device message and key upload go through another
/// process on the same database: each wakes the poll at once, through Redis.
async fn to_device_wakes_another_process(backend: Backend) {
    run(backend, true, async |a: &TestApp| {
        let b = a.spawn_peer(|_| {}).await;
        let result = std::panic::AssertUnwindSafe(async {
            let alice = b.register("alice", "pw").await;
            let bob = a.register("bob", "pw").await;
            let room_id = b
                .create_room(&alice.access_token, json!({"preset": "public_chat"}))
                .await;
            a.join_room(&bob.access_token, &room_id).await;
            let since = next_batch(&sync(a, &bob.access_token, None, 0).await);

            let poll = long_poll(a, &bob.access_token, &since, 20_000);
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!poll.is_finished(), "waits while nothing changes");
            send_to_device(
                &b,
                &alice,
                "across",
                json!({bob.user_id.clone(): {bob.device_id.clone(): {"body": "across"}}}),
            )
            .await;
            let sent = std::time::Instant::now();
            let woke = poll.await.expect("task");
            assert!(
                sent.elapsed() < Duration::from_secs(2),
                "{:?}",
                sent.elapsed()
            );
            assert_eq!(bodies(&woke), ["across"]);

            let poll = long_poll(a, &bob.access_token, &next_batch(&woke), 20_000);
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!poll.is_finished(), "waits while nothing changes");
            upload(&b, &alice, json!({"device_keys": device_keys(&alice, "c")})).await;
            let sent = std::time::Instant::now();
            let woke = poll.await.expect("task");
            assert!(
                sent.elapsed() < Duration::from_secs(2),
                "{:?}",
                sent.elapsed()
            );
            assert_eq!(
                strings(&woke["device_lists"]["changed"]),
                [alice.user_id.as_str()]
            );
        });
        let result = futures::FutureExt::catch_unwind(result).await;
        b.teardown().await;
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Cross-signing

const DEVICE_SIGNING: &str = "/_matrix/client/v3/keys/device_signing/upload";
const SIGNATURES: &str = "/_matrix/client/v3/keys/signatures/upload";

/// An ed25519 key pair whose key id is `ed25519:<name>` (a device id, or the public key).
struct Signer {
    pair: ruma::signatures::Ed25519KeyPair,
    public: String,
}

impl Signer {
    /// A cross-signing key pair: named after its public key.
    fn cross_signing() -> Signer {
        let der = ruma::signatures::Ed25519KeyPair::generate();
        let probe = ruma::signatures::Ed25519KeyPair::from_der(&der, "probe".into()).expect("key");
        let public = ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(
            probe.public_key().to_vec(),
        )
        .encode();
        let pair = ruma::signatures::Ed25519KeyPair::from_der(&der, public.clone()).expect("key");
        Signer { pair, public }
    }

    /// A device's key pair: named after the device.
    fn device(device_id: &str) -> Signer {
        let der = ruma::signatures::Ed25519KeyPair::generate();
        let pair =
            ruma::signatures::Ed25519KeyPair::from_der(&der, device_id.to_owned()).expect("key");
        let public = ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(
            pair.public_key().to_vec(),
        )
        .encode();
        Signer { pair, public }
    }

    fn key_id(&self) -> String {
        format!("ed25519:{}", self.public)
    }

    /// `value` signed by this key as `user`.
    fn sign(&self, user: &str, value: &Value) -> Value {
        let mut object: ruma::CanonicalJsonObject =
            serde_json::from_value(value.clone()).expect("canonical JSON");
        ruma::signatures::sign_json(user, &self.pair, &mut object).expect("sign");
        serde_json::to_value(object).expect("JSON")
    }
}

fn cross_signing_key(user: &str, usage: &str, key: &Signer) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {key.key_id(): key.public}})
}

/// A user's three cross-signing keys, and the upload body (the others signed by the master).
struct CrossSigning {
    master: Signer,
    self_signing: Signer,
    user_signing: Signer,
    body: Value,
}

fn cross_signing(user: &str) -> CrossSigning {
    let (master, self_signing, user_signing) = (
        Signer::cross_signing(),
        Signer::cross_signing(),
        Signer::cross_signing(),
    );
    let body = json!({
        "master_key": cross_signing_key(user, "master", &master),
        "self_signing_key": master.sign(user, &cross_signing_key(user, "self_signing", &self_signing)),
        "user_signing_key": master.sign(user, &cross_signing_key(user, "user_signing", &user_signing)),
    });
    CrossSigning {
        master,
        self_signing,
        user_signing,
        body,
    }
}

/// Device keys signed by the device's own ed25519 key, as clients upload them.
fn signed_device_keys(session: &Session, device: &Signer) -> Value {
    let keys = json!({
        "user_id": session.user_id,
        "device_id": session.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", session.device_id): "Y3VydmU",
            format!("ed25519:{}", session.device_id): device.public,
        },
    });
    device.sign(&session.user_id, &keys)
}

async fn query_one(app: &TestApp, viewer: &Session, of: &Session) -> Value {
    app.post(
        QUERY,
        Some(&viewer.access_token),
        json!({"device_keys": {of.user_id.clone(): []}}),
    )
    .await
    .expect_ok()
    .clone()
}

backend_matrix!(cross_signing_keys, cross_signing_scenario);

async fn cross_signing_scenario(app: &TestApp) {
    let (alice, bob, _room) = two_in_a_room(app).await;
    let alice_device = Signer::device(&alice.device_id);
    let alice_keys = signed_device_keys(&alice, &alice_device);
    upload(app, &alice, json!({"device_keys": alice_keys})).await;
    let bob_since = next_batch(&sync(app, &bob.access_token, None, 0).await);

    // Alice's first cross-signing keys need no authentication; the same again neither.
    let alice_cs = cross_signing(&alice.user_id);
    for _ in 0..2 {
        app.post(
            DEVICE_SIGNING,
            Some(&alice.access_token),
            alice_cs.body.clone(),
        )
        .await
        .expect_ok();
    }
    let response = sync(app, &bob.access_token, Some(&bob_since), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["changed"]),
        [alice.user_id.as_str()],
        "new cross-signing keys are a device-list change"
    );
    let bob_since = next_batch(&response);

    // Everyone sees Alice's master and self-signing keys; only she her user-signing key.
    let seen = query_one(app, &bob, &alice).await;
    assert_eq!(
        seen["master_keys"][&alice.user_id],
        alice_cs.body["master_key"]
    );
    assert_eq!(
        seen["self_signing_keys"][&alice.user_id],
        alice_cs.body["self_signing_key"]
    );
    assert_eq!(seen["user_signing_keys"], json!({}));
    let own = query_one(app, &alice, &alice).await;
    assert_eq!(
        own["user_signing_keys"][&alice.user_id],
        alice_cs.body["user_signing_key"]
    );

    // Alice signs her device with her self-signing key, and her master key with her device.
    let device_signed = alice_cs.self_signing.sign(&alice.user_id, &alice_keys);
    let master_signed = alice_device.sign(&alice.user_id, &alice_cs.body["master_key"]);
    let uploaded = app
        .post(
            SIGNATURES,
            Some(&alice.access_token),
            json!({alice.user_id.clone(): {
                alice.device_id.clone(): device_signed,
                alice_cs.master.public.clone(): master_signed,
            }}),
        )
        .await;
    assert_eq!(
        uploaded.expect_ok()["failures"],
        json!({}),
        "{}",
        uploaded.text
    );
    let seen = query_one(app, &bob, &alice).await;
    let signatures =
        &seen["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id];
    assert!(
        signatures[alice_cs.self_signing.key_id()].is_string()
            && signatures[format!("ed25519:{}", alice.device_id)].is_string(),
        "the device keys carry the new signature beside their own: {seen}"
    );
    assert!(
        seen["master_keys"][&alice.user_id]["signatures"][&alice.user_id]
            [format!("ed25519:{}", alice.device_id)]
        .is_string(),
        "{seen}"
    );
    let response = sync(app, &bob.access_token, Some(&bob_since), 0).await;
    assert_eq!(
        strings(&response["device_lists"]["changed"]),
        [alice.user_id.as_str()],
        "new signatures are a device-list change"
    );

    // Bob verifies Alice: his user-signing key signs her master key; only he sees it.
    let bob_cs = cross_signing(&bob.user_id);
    app.post(DEVICE_SIGNING, Some(&bob.access_token), bob_cs.body.clone())
        .await
        .expect_ok();
    let verified = bob_cs
        .user_signing
        .sign(&bob.user_id, &alice_cs.body["master_key"]);
    let uploaded = app
        .post(
            SIGNATURES,
            Some(&bob.access_token),
            json!({alice.user_id.clone(): {alice_cs.master.public.clone(): verified}}),
        )
        .await;
    assert_eq!(
        uploaded.expect_ok()["failures"],
        json!({}),
        "{}",
        uploaded.text
    );
    let by_bob = &query_one(app, &bob, &alice).await["master_keys"][&alice.user_id]["signatures"];
    assert!(
        by_bob[&bob.user_id][bob_cs.user_signing.key_id()].is_string(),
        "{by_bob}"
    );
    let by_alice =
        &query_one(app, &alice, &alice).await["master_keys"][&alice.user_id]["signatures"];
    assert!(by_alice.get(&bob.user_id).is_none(), "{by_alice}");

    // Signatures that do not verify, or of keys that do not match, are failures.
    let forged = Signer::cross_signing();
    let mut bad = alice_cs.self_signing.sign(&alice.user_id, &alice_keys);
    bad["signatures"][&alice.user_id][alice_cs.self_signing.key_id()] = forged
        .sign(&alice.user_id, &alice_keys)["signatures"][&alice.user_id][forged.key_id()]
    .clone();
    let mut altered = alice_keys.clone();
    altered["algorithms"] = json!(["m.megolm.v1.aes-sha2"]);
    let altered = alice_cs.self_signing.sign(&alice.user_id, &altered);
    let refused = app
        .post(
            SIGNATURES,
            Some(&alice.access_token),
            json!({alice.user_id.clone(): {alice.device_id.clone(): bad}}),
        )
        .await;
    assert_eq!(
        refused.expect_ok()["failures"][&alice.user_id][&alice.device_id]["errcode"],
        "M_INVALID_SIGNATURE"
    );
    let refused = app
        .post(
            SIGNATURES,
            Some(&alice.access_token),
            json!({alice.user_id.clone(): {alice.device_id.clone(): altered, "NOSUCHKEY": {"signatures": {}}}}),
        )
        .await;
    let failures = &refused.expect_ok()["failures"][&alice.user_id];
    assert!(
        failures[&alice.device_id]["errcode"].is_string(),
        "{failures}"
    );
    assert_eq!(failures["NOSUCHKEY"]["errcode"], "M_NOT_FOUND");

    // Replacing keys needs the password.
    let replacement = cross_signing(&alice.user_id);
    let session = app
        .post(
            DEVICE_SIGNING,
            Some(&alice.access_token),
            replacement.body.clone(),
        )
        .await
        .expect_uia(&[&["m.login.password"]]);
    let mut with_auth = replacement.body.clone();
    with_auth["auth"] = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": alice.user_id},
        "password": "pw",
        "session": session,
    });
    app.post(DEVICE_SIGNING, Some(&alice.access_token), with_auth)
        .await
        .expect_ok();
    let seen = query_one(app, &bob, &alice).await;
    assert_eq!(
        seen["master_keys"][&alice.user_id]["keys"],
        replacement.body["master_key"]["keys"]
    );
}

/// Cross-signing keys that are malformed or not signed by the master key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cross_signing_keys_are_refused() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let token = Some(alice.access_token.as_str());
        let cs = cross_signing(&alice.user_id);

        // No master key anywhere.
        app.post(
            DEVICE_SIGNING,
            token,
            json!({"self_signing_key": cs.body["self_signing_key"]}),
        )
        .await
        .expect_error(400, "M_MISSING_PARAM");
        // Not signed by the master key.
        let unsigned = json!({
            "master_key": cs.body["master_key"],
            "self_signing_key": cross_signing_key(&alice.user_id, "self_signing", &cs.self_signing),
        });
        app.post(DEVICE_SIGNING, token, unsigned)
            .await
            .expect_error(400, "M_INVALID_SIGNATURE");
        // Someone else's, the wrong usage, two keys, not an object.
        let mut other = cs.body.clone();
        other["master_key"]["user_id"] = json!("@bob:test.local");
        app.post(DEVICE_SIGNING, token, other)
            .await
            .expect_error(400, "M_INVALID_PARAM");
        let mut usage = cs.body.clone();
        usage["master_key"]["usage"] = json!(["self_signing"]);
        app.post(DEVICE_SIGNING, token, usage)
            .await
            .expect_error(400, "M_INVALID_PARAM");
        let mut two = cs.body.clone();
        two["master_key"]["keys"]["ed25519:other"] = json!("other");
        app.post(DEVICE_SIGNING, token, two)
            .await
            .expect_error(400, "M_INVALID_PARAM");
        app.post(DEVICE_SIGNING, token, json!({"master_key": "key"}))
            .await
            .expect_error(400, "M_BAD_JSON");
        // A key named like one of the user's devices.
        let squatter = json!({"master_key": {
            "user_id": alice.user_id, "usage": ["master"],
            "keys": {format!("ed25519:{}", alice.device_id): alice.device_id},
        }});
        app.post(DEVICE_SIGNING, token, squatter)
            .await
            .expect_error(403, "M_FORBIDDEN");
        // Signatures: not a map of objects; of another server's user.
        app.post(
            SIGNATURES,
            token,
            json!({alice.user_id.clone(): {"K": "x"}}),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
        let remote = app
            .post(
                SIGNATURES,
                token,
                json!({"@bob:elsewhere.example": {"K": {"signatures": {}}}}),
            )
            .await;
        assert!(
            remote.expect_ok()["failures"]["@bob:elsewhere.example"]["K"]["errcode"].is_string()
        );
        // Nothing was stored by the refused uploads: the first real one needs no password.
        app.post(DEVICE_SIGNING, token, cs.body.clone())
            .await
            .expect_ok();
    })
    .await;
}
