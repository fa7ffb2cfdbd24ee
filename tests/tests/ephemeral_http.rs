//! Typing notifications, receipts, read markers, presence and unread counts over HTTP, on
//! every backend with and without Redis: each shows in the other users' `/sync` (and only to
//! whom it should), wakes long-polls, and is seen by another server process on the same
//! database. ruma builds the requests and reads the answers.

use std::{
    borrow::Cow,
    time::{Duration, Instant},
};

use palpo_tests::{
    Backend, Session, TestApp, backend_matrix, enc, long_poll, next_batch,
    ruma_client::{exchange, ok},
    run, sync,
};
use ruma::api::{
    OutgoingRequestExt, SupportedVersions,
    auth_scheme::SendAccessToken,
    client::{
        discovery::get_supported_versions,
        presence::{get_presence, set_presence},
        read_marker::set_read_marker,
        receipt::create_receipt,
        sync::sync_events,
        typing::create_typing_event,
    },
};
use serde_json::{Value, json};

/// The ephemeral events of type `kind` of a joined room in a sync response.
fn ephemeral<'a>(response: &'a Value, room_id: &str, kind: &str) -> Vec<&'a Value> {
    response["rooms"]["join"][room_id]["ephemeral"]["events"]
        .as_array()
        .map(|events| events.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

/// The user ids of the room's `m.typing` event, `None` when there is none.
fn typing(response: &Value, room_id: &str) -> Option<Vec<String>> {
    let events = ephemeral(response, room_id, "m.typing");
    assert!(events.len() <= 1, "one m.typing at most: {response}");
    events.first().map(|e| {
        e["content"]["user_ids"]
            .as_array()
            .unwrap_or_else(|| panic!("user_ids: {e}"))
            .iter()
            .map(|u| u.as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

/// The merged content of the room's `m.receipt` events.
fn receipts(response: &Value, room_id: &str) -> Value {
    let mut merged = serde_json::Map::new();
    for event in ephemeral(response, room_id, "m.receipt") {
        for (event_id, by_type) in event["content"].as_object().expect("content") {
            merged.insert(event_id.clone(), by_type.clone());
        }
    }
    Value::Object(merged)
}

fn unread(response: &Value, room_id: &str) -> (i64, i64) {
    let counts = &response["rooms"]["join"][room_id]["unread_notifications"];
    (
        counts["notification_count"]
            .as_i64()
            .unwrap_or_else(|| panic!("no notification_count: {response}")),
        counts["highlight_count"]
            .as_i64()
            .unwrap_or_else(|| panic!("no highlight_count: {response}")),
    )
}

fn presence_of<'a>(response: &'a Value, user_id: &str) -> Option<&'a Value> {
    response["presence"]["events"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["type"] == "m.presence" && e["sender"] == user_id)
}

fn joined(response: &Value) -> Vec<String> {
    response["rooms"]["join"]
        .as_object()
        .map(|j| j.keys().cloned().collect())
        .unwrap_or_default()
}

async fn set_typing(app: &TestApp, session: &Session, room_id: &str, body: Value) {
    let path = app.room_path(room_id, &format!("/typing/{}", enc(&session.user_id)));
    app.put(&path, Some(&session.access_token), body)
        .await
        .expect_ok();
}

async fn post_receipt(
    app: &TestApp,
    session: &Session,
    room_id: &str,
    kind: &str,
    event_id: &str,
    body: Value,
) -> palpo_tests::Resp {
    let path = app.room_path(room_id, &format!("/receipt/{kind}/{}", enc(event_id)));
    app.post(&path, Some(&session.access_token), body).await
}

/// Alice and Bob, joined to a public room Alice created; `since` of Bob after it all.
async fn two_in_a_room(app: &TestApp) -> (Session, Session, String, String) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &room_id).await;
    let since = next_batch(&sync(app, &bob.access_token, None, 0).await);
    (alice, bob, room_id, since)
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(typing_shows_in_sync, typing_scenario);

async fn typing_scenario(app: &TestApp) {
    let (alice, bob, room_id, since) = two_in_a_room(app).await;

    set_typing(
        app,
        &alice,
        &room_id,
        json!({"typing": true, "timeout": 20000}),
    )
    .await;
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(
        typing(&next, &room_id),
        Some(vec![alice.user_id.clone()]),
        "{next}"
    );
    assert_eq!(
        next["rooms"]["join"][&room_id]["timeline"]["events"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "the room is in `join` for its typing alone: {next}"
    );
    let since = next_batch(&next);

    // Typing again while typing changes nothing: a quiet sync.
    set_typing(
        app,
        &alice,
        &room_id,
        json!({"typing": true, "timeout": 20000}),
    )
    .await;
    let quiet = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(typing(&quiet, &room_id), None, "{quiet}");

    // An initial sync shows who types now.
    let initial = sync(app, &bob.access_token, None, 0).await;
    assert_eq!(
        typing(&initial, &room_id),
        Some(vec![alice.user_id.clone()])
    );

    // Stopping wakes a long-poll.
    let started = Instant::now();
    let poll = long_poll(app, &bob.access_token, &since, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "nothing happened yet: the sync waits");
    set_typing(app, &alice, &room_id, json!({"typing": false})).await;
    let woke = poll.await.expect("task");
    assert_eq!(typing(&woke, &room_id), Some(vec![]), "{woke}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let since = next_batch(&woke);

    // A typing notification that runs out ends a long-poll too.
    set_typing(
        app,
        &alice,
        &room_id,
        json!({"typing": true, "timeout": 800}),
    )
    .await;
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(typing(&next, &room_id), Some(vec![alice.user_id.clone()]));
    let started = Instant::now();
    let expired = sync(app, &bob.access_token, Some(&next_batch(&next)), 15_000).await;
    assert_eq!(typing(&expired, &room_id), Some(vec![]), "{expired}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "ended by the expiry, not the timeout: {:?}",
        started.elapsed()
    );

    // Forbidden: for someone else, or in a room one is not in.
    let path = app.room_path(&room_id, &format!("/typing/{}", enc(&bob.user_id)));
    app.put(&path, Some(&alice.access_token), json!({"typing": true}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    let carol = app.register("carol", "pw").await;
    let path = app.room_path(&room_id, &format!("/typing/{}", enc(&carol.user_id)));
    app.put(&path, Some(&carol.access_token), json!({"typing": true}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(&path, Some(&carol.access_token), json!({"typing": "yes"}))
        .await
        .expect_error(400, "M_BAD_JSON");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(receipts_show_in_sync, receipts_scenario);

async fn receipts_scenario(app: &TestApp) {
    let (alice, bob, room_id, _) = two_in_a_room(app).await;
    let first = app.send_text(&alice.access_token, &room_id, "one").await;
    let second = app.send_text(&alice.access_token, &room_id, "two").await;
    let alice_since = next_batch(&sync(app, &alice.access_token, None, 0).await);
    let bob_since = next_batch(&sync(app, &bob.access_token, None, 0).await);

    // A public receipt: Alice sees it, with its timestamp.
    post_receipt(app, &bob, &room_id, "m.read", &first, json!({}))
        .await
        .expect_ok();
    let next = sync(app, &alice.access_token, Some(&alice_since), 0).await;
    let seen = receipts(&next, &room_id);
    assert!(
        seen[&first]["m.read"][&bob.user_id]["ts"].is_i64(),
        "{next}"
    );
    assert!(seen[&first]["m.read"][&bob.user_id]["thread_id"].is_null());
    let alice_since = next_batch(&next);

    // A private receipt: only Bob sees it.
    post_receipt(app, &bob, &room_id, "m.read.private", &second, json!({}))
        .await
        .expect_ok();
    let next = sync(app, &alice.access_token, Some(&alice_since), 0).await;
    assert!(
        !joined(&next).contains(&room_id),
        "Alice has nothing new in the room: {next}"
    );
    let alice_since = next_batch(&next);
    let bobs = sync(app, &bob.access_token, Some(&bob_since), 0).await;
    let seen = receipts(&bobs, &room_id);
    assert!(
        seen[&second]["m.read.private"][&bob.user_id]["ts"].is_i64(),
        "{bobs}"
    );
    let initial = sync(app, &alice.access_token, None, 0).await;
    assert!(
        receipts(&initial, &room_id)[&second]["m.read.private"].is_null(),
        "{initial}"
    );
    assert!(receipts(&initial, &room_id)[&first]["m.read"][&bob.user_id].is_object());

    // A threaded receipt carries its thread.
    post_receipt(
        app,
        &bob,
        &room_id,
        "m.read",
        &second,
        json!({"thread_id": "main"}),
    )
    .await
    .expect_ok();
    let next = sync(app, &alice.access_token, Some(&alice_since), 0).await;
    assert_eq!(
        receipts(&next, &room_id)[&second]["m.read"][&bob.user_id]["thread_id"],
        "main",
        "{next}"
    );

    // A receipt does not move back to an older event.
    let alice_since = next_batch(&next);
    post_receipt(app, &bob, &room_id, "m.read", &second, json!({}))
        .await
        .expect_ok();
    post_receipt(app, &bob, &room_id, "m.read", &first, json!({}))
        .await
        .expect_ok();
    let next = sync(app, &alice.access_token, Some(&alice_since), 0).await;
    let seen = receipts(&next, &room_id);
    assert!(seen[&second]["m.read"][&bob.user_id].is_object(), "{next}");
    assert!(seen[&first].is_null(), "{next}");

    // Errors.
    post_receipt(app, &bob, &room_id, "m.read", "$nope:test.local", json!({}))
        .await
        .expect_error(404, "M_NOT_FOUND");
    post_receipt(app, &bob, &room_id, "m.unknown", &first, json!({}))
        .await
        .expect_error(400, "M_INVALID_PARAM");
    post_receipt(
        app,
        &bob,
        &room_id,
        "m.read",
        &first,
        json!({"thread_id": ""}),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    post_receipt(
        app,
        &bob,
        &room_id,
        "m.fully_read",
        &first,
        json!({"thread_id": "main"}),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    let carol = app.register("carol", "pw").await;
    post_receipt(app, &carol, &room_id, "m.read", &first, json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    // An event of another room is not found in this one.
    let other = app
        .create_room(&bob.access_token, json!({"preset": "private_chat"}))
        .await;
    let elsewhere = app.send_text(&bob.access_token, &other, "elsewhere").await;
    post_receipt(app, &bob, &room_id, "m.read", &elsewhere, json!({}))
        .await
        .expect_error(404, "M_NOT_FOUND");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(unread_counts_and_read_markers, unread_scenario);

async fn unread_scenario(app: &TestApp) {
    let (alice, bob, room_id, since) = two_in_a_room(app).await;
    app.send_text(&alice.access_token, &room_id, "hello").await;
    let second = app.send_text(&alice.access_token, &room_id, "hi bob").await;
    let mention = json!({
        "msgtype": "m.text",
        "body": "ping",
        "m.mentions": {"user_ids": [bob.user_id]},
    });
    app.send_event(&alice.access_token, &room_id, "m.room.message", mention)
        .await;
    // Bob's own messages and other event types do not count.
    app.send_text(&bob.access_token, &room_id, "mine").await;
    app.send_event(&alice.access_token, &room_id, "m.reaction", json!({}))
        .await;

    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (3, 2), "{next}");
    let initial = sync(app, &bob.access_token, None, 0).await;
    assert_eq!(unread(&initial, &room_id), (3, 2));
    // Alice's counts are her own: Bob's message.
    let alice_initial = sync(app, &alice.access_token, None, 0).await;
    assert_eq!(unread(&alice_initial, &room_id), (1, 0), "{alice_initial}");
    let since = next_batch(&next);

    // A read receipt: only what follows it counts.
    post_receipt(app, &bob, &room_id, "m.read", &second, json!({}))
        .await
        .expect_ok();
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (1, 1), "{next}");
    let since = next_batch(&next);

    // New messages count again; a private receipt clears them too.
    let third = app.send_text(&alice.access_token, &room_id, "more").await;
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (2, 1), "{next}");
    post_receipt(app, &bob, &room_id, "m.read.private", &third, json!({}))
        .await
        .expect_ok();
    let next = sync(app, &bob.access_token, Some(&next_batch(&next)), 0).await;
    assert_eq!(unread(&next, &room_id), (0, 0), "{next}");
    let since = next_batch(&next);

    // Read markers: the fully read marker (room account data) and a public receipt.
    let last = app.send_text(&alice.access_token, &room_id, "last").await;
    let path = app.room_path(&room_id, "/read_markers");
    app.post(
        &path,
        Some(&bob.access_token),
        json!({"m.fully_read": last, "m.read": last}),
    )
    .await
    .expect_ok();
    let marker = app
        .storage()
        .account_data
        .get_account_data(&bob.user_id, Some(&room_id), "m.fully_read")
        .await
        .expect("account data")
        .expect("m.fully_read is set");
    let content: Value = serde_json::from_str(&marker.content).expect("JSON");
    assert_eq!(content["event_id"], last.as_str());
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (0, 0), "{next}");
    let alice_view = sync(app, &alice.access_token, None, 0).await;
    assert!(
        receipts(&alice_view, &room_id)[&last]["m.read"][&bob.user_id].is_object(),
        "{alice_view}"
    );
    // m.fully_read through the receipt endpoint is the same marker.
    post_receipt(app, &bob, &room_id, "m.fully_read", &third, json!({}))
        .await
        .expect_ok();
    let marker = app
        .storage()
        .account_data
        .get_account_data(&bob.user_id, Some(&room_id), "m.fully_read")
        .await
        .expect("account data")
        .expect("m.fully_read is set");
    assert!(marker.content.contains(&third), "{}", marker.content);
    app.post(
        &path,
        Some(&bob.access_token),
        json!({"m.fully_read": "$unknown:test.local"}),
    )
    .await
    .expect_error(404, "M_NOT_FOUND");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(presence_set_get_and_sync, presence_scenario);

async fn presence_scenario(app: &TestApp) {
    let (alice, bob, _room_id, since) = two_in_a_room(app).await;
    let carol = app.register("carol", "pw").await;
    let status = |user: &str| format!("/_matrix/client/v3/presence/{}/status", enc(user));

    app.put(
        &status(&alice.user_id),
        Some(&alice.access_token),
        json!({"presence": "unavailable", "status_msg": "lunch 🥪"}),
    )
    .await
    .expect_ok();
    let got = app
        .get(&status(&alice.user_id), Some(&bob.access_token))
        .await;
    let got = got.expect_ok();
    assert_eq!(got["presence"], "unavailable");
    assert_eq!(got["status_msg"], "lunch 🥪");
    assert!(got["last_active_ago"].as_i64().is_some_and(|ago| ago >= 0));
    assert_eq!(got["currently_active"], false);
    // Her own, too.
    app.get(&status(&alice.user_id), Some(&alice.access_token))
        .await
        .expect_ok();

    // Bob's sync (with set_presence=offline, so that it does not change his own) shows it.
    let path = format!(
        "/_matrix/client/v3/sync?timeout=0&set_presence=offline&since={}",
        enc(&since)
    );
    let next = app.get(&path, Some(&bob.access_token)).await;
    let next = next.expect_ok();
    let event = presence_of(next, &alice.user_id).unwrap_or_else(|| panic!("{next}"));
    assert_eq!(event["content"]["presence"], "unavailable");
    assert_eq!(event["content"]["status_msg"], "lunch 🥪");
    assert!(
        presence_of(next, &carol.user_id).is_none(),
        "Carol shares no room with Bob"
    );
    let since = next_batch(next);

    // A sync marks its user online (default `set_presence`); room-mates see it.
    sync(app, &alice.access_token, None, 0).await;
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    let event = presence_of(&next, &alice.user_id).unwrap_or_else(|| panic!("{next}"));
    assert_eq!(event["content"]["presence"], "online");
    assert_eq!(event["content"]["currently_active"], true);
    assert_eq!(
        event["content"]["status_msg"], "lunch 🥪",
        "the status message stays"
    );
    let since = next_batch(&next);
    // Syncing again while online changes nothing others see.
    sync(app, &alice.access_token, None, 0).await;
    let quiet = app
        .get(
            &format!(
                "/_matrix/client/v3/sync?timeout=0&set_presence=offline&since={}",
                enc(&since)
            ),
            Some(&bob.access_token),
        )
        .await;
    assert!(
        presence_of(quiet.expect_ok(), &alice.user_id).is_none(),
        "{}",
        quiet.text
    );
    // set_presence=unavailable marks idle.
    let path = "/_matrix/client/v3/sync?timeout=0&set_presence=unavailable";
    app.get(path, Some(&alice.access_token)).await.expect_ok();
    let got = app
        .get(&status(&alice.user_id), Some(&bob.access_token))
        .await;
    assert_eq!(got.expect_ok()["presence"], "unavailable");

    // Forbidden: someone else's presence, or the presence of a stranger.
    app.put(
        &status(&bob.user_id),
        Some(&alice.access_token),
        json!({"presence": "online"}),
    )
    .await
    .expect_error(403, "M_FORBIDDEN");
    app.get(&status(&alice.user_id), Some(&carol.access_token))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(
        &status(&alice.user_id),
        Some(&alice.access_token),
        json!({"presence": "busy"}),
    )
    .await
    .expect_error(400, "M_BAD_JSON");
    app.get(
        "/_matrix/client/v3/sync?set_presence=busy",
        Some(&alice.access_token),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(seen_across_processes, cross_process_scenario);

/// Two server processes on one database: what one writes, the other's syncs show.
async fn cross_process_scenario(app: &TestApp) {
    let peer = app.spawn_peer(|_| {}).await;
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let (alice, bob, room_id, since) = two_in_a_room(app).await;
        // Typing through A, read through B.
        set_typing(
            app,
            &alice,
            &room_id,
            json!({"typing": true, "timeout": 20000}),
        )
        .await;
        let next = sync(&peer, &bob.access_token, Some(&since), 0).await;
        assert_eq!(
            typing(&next, &room_id),
            Some(vec![alice.user_id.clone()]),
            "{next}"
        );
        let since = next_batch(&next);

        // A receipt through B, read through A.
        let event = app.send_text(&alice.access_token, &room_id, "hi").await;
        post_receipt(&peer, &bob, &room_id, "m.read", &event, json!({}))
            .await
            .expect_ok();
        let alice_view = sync(app, &alice.access_token, None, 0).await;
        assert!(
            receipts(&alice_view, &room_id)[&event]["m.read"][&bob.user_id].is_object(),
            "{alice_view}"
        );

        // With Redis, a long-poll on B wakes when A stops the typing.
        if app.config.cache.redis_url.is_some() {
            let next = sync(&peer, &bob.access_token, Some(&since), 0).await;
            let since = next_batch(&next);
            let started = Instant::now();
            let poll = long_poll(&peer, &bob.access_token, &since, 20_000);
            tokio::time::sleep(Duration::from_millis(300)).await;
            set_typing(app, &alice, &room_id, json!({"typing": false})).await;
            let woke = poll.await.expect("task");
            assert_eq!(typing(&woke, &room_id), Some(vec![]), "{woke}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "woken after {:?}",
                started.elapsed()
            );
        } else {
            set_typing(app, &alice, &room_id, json!({"typing": false})).await;
            let next = sync(&peer, &bob.access_token, Some(&since), 0).await;
            assert_eq!(typing(&next, &room_id), Some(vec![]), "{next}");
        }
    }))
    .await;
    peer.teardown().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

backend_matrix!(unread_after_a_main_receipt, main_receipt_scenario);

/// A receipt for the main timeline only (no unthreaded one): the main timeline's unread
/// messages count from it, even when the user's membership event is newer (a profile change).
async fn main_receipt_scenario(app: &TestApp) {
    let (alice, bob, room_id, since) = two_in_a_room(app).await;
    let first = app.send_text(&alice.access_token, &room_id, "one").await;
    app.send_text(&alice.access_token, &room_id, "two").await;
    post_receipt(
        app,
        &bob,
        &room_id,
        "m.read",
        &first,
        json!({"thread_id": "main"}),
    )
    .await
    .expect_ok();
    app.set_displayname(&bob, "Robert").await;
    let next = sync(app, &bob.access_token, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (1, 0), "{next}");
    let initial = sync(app, &bob.access_token, None, 0).await;
    assert_eq!(unread(&initial, &room_id), (1, 0), "{initial}");
}

backend_matrix!(unread_counts_follow_push_rules, push_rules_scenario);

/// The counts follow the user's push rules: the defaults keep notices and edits quiet; a rule
/// of the user's own (a keyword that highlights, a room muted the way Element mutes one) is
/// evaluated, changes the counts of messages already unread, and stops when it is removed.
async fn push_rules_scenario(app: &TestApp) {
    let (alice, bob, room_id, since) = two_in_a_room(app).await;
    let a = alice.access_token.as_str();
    let b = bob.access_token.as_str();
    let notice = json!({"msgtype": "m.notice", "body": "a bot says hi bob"});
    app.send_event(a, &room_id, "m.room.message", notice).await;
    let hello = app.send_text(a, &room_id, "hello").await;
    let edit = json!({
        "msgtype": "m.text",
        "body": "* hello there",
        "m.new_content": {"msgtype": "m.text", "body": "hello there"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": hello},
    });
    app.send_event(a, &room_id, "m.room.message", edit).await;
    app.send_text(a, &room_id, "I like cake").await;
    let next = sync(app, b, Some(&since), 0).await;
    assert_eq!(
        unread(&next, &room_id),
        (2, 0),
        "notices and edits are quiet: {next}"
    );
    let since = next_batch(&next);

    // A keyword of Bob's highlights.
    let rule =
        |kind: &str, id: &str| format!("/_matrix/client/v3/pushrules/global/{kind}/{}", enc(id));
    app.put(
        &rule("content", "cake"),
        Some(b),
        json!({"pattern": "cake", "actions": ["notify", {"set_tweak": "highlight"}]}),
    )
    .await
    .expect_ok();
    // A change of rules alone is no news for the room: the next sync that carries it counts
    // with the new rules.
    let initial = sync(app, b, None, 0).await;
    assert_eq!(unread(&initial, &room_id), (2, 1), "{initial}");

    // Muted, as Element mutes a room: an override rule on the room id without actions.
    let mute = json!({
        "actions": [],
        "conditions": [{"kind": "event_match", "key": "room_id", "pattern": room_id}],
    });
    app.put(&rule("override", &room_id), Some(b), mute)
        .await
        .expect_ok();
    app.send_text(a, &room_id, "more cake").await;
    let next = sync(app, b, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (0, 0), "{next}");
    let since = next_batch(&next);

    // Unmuted: the unread messages count again, the new one included.
    app.delete(&rule("override", &room_id), Some(b), None)
        .await
        .expect_ok();
    app.send_text(a, &room_id, "no cake").await;
    let next = sync(app, b, Some(&since), 0).await;
    assert_eq!(unread(&next, &room_id), (4, 3), "{next}");
    // Alice's counts do not follow Bob's rules.
    app.send_text(b, &room_id, "cake for everyone").await;
    let alices = sync(app, a, None, 0).await;
    assert_eq!(unread(&alices, &room_id), (1, 0), "{alices}");
}

backend_matrix!(
    room_mentions_need_the_power_to_notify,
    room_mentions_scenario
);

/// A message that mentions the whole room (`m.mentions.room`, or `@room` in the body of one
/// without `m.mentions`) highlights when its sender's power level lets them notify the room
/// (50 unless the power levels say otherwise), with the default rules and with rules of the
/// user's own; from a sender without that power it only notifies.
async fn room_mentions_scenario(app: &TestApp) {
    let (alice, bob, room_id, bobs_since) = two_in_a_room(app).await;
    let a = alice.access_token.as_str();
    let b = bob.access_token.as_str();
    let alices_since = next_batch(&sync(app, a, None, 0).await);
    let room_mention =
        |body: &str| json!({"msgtype": "m.text", "body": body, "m.mentions": {"room": true}});
    let legacy = |body: &str| json!({"msgtype": "m.text", "body": body});

    // Alice created the room (100): her mentions of the room highlight for Bob.
    app.send_event(a, &room_id, "m.room.message", room_mention("all hands"))
        .await;
    app.send_event(a, &room_id, "m.room.message", legacy("@room meeting now"))
        .await;
    app.send_event(a, &room_id, "m.room.message", legacy("@roomba is charging"))
        .await;
    let next = sync(app, b, Some(&bobs_since), 0).await;
    assert_eq!(unread(&next, &room_id), (3, 2), "{next}");
    let bobs_since = next_batch(&next);

    // Bob (0) may not notify the room: his only notify Alice.
    app.send_event(b, &room_id, "m.room.message", room_mention("hey all"))
        .await;
    app.send_event(b, &room_id, "m.room.message", legacy("@room please"))
        .await;
    let next = sync(app, a, Some(&alices_since), 0).await;
    assert_eq!(unread(&next, &room_id), (2, 0), "{next}");
    let alices_since = next_batch(&next);

    // Once the power levels give him 50, they highlight.
    let levels_path = app.room_path(&room_id, "/state/m.room.power_levels/");
    let mut levels = app.get(&levels_path, Some(a)).await.expect_ok().clone();
    levels["users"][bob.user_id.as_str()] = json!(50);
    app.put(&levels_path, Some(a), levels).await.expect_ok();
    app.send_event(
        b,
        &room_id,
        "m.room.message",
        room_mention("now with power"),
    )
    .await;
    let next = sync(app, a, Some(&alices_since), 0).await;
    assert_eq!(unread(&next, &room_id), (3, 1), "{next}");

    // With rules of his own, evaluated by ruma on all his unread messages, Bob still gets
    // Alice's `m.mentions` of the room. ruma's defaults no longer have the deprecated
    // `.m.rule.roomnotif`, so her `@room` without `m.mentions` then only notifies.
    let rule = "/_matrix/client/v3/pushrules/global/content/cake";
    let cake = json!({"pattern": "cake", "actions": ["notify"]});
    app.put(rule, Some(b), cake).await.expect_ok();
    app.send_event(a, &room_id, "m.room.message", room_mention("cake time"))
        .await;
    let next = sync(app, b, Some(&bobs_since), 0).await;
    assert_eq!(unread(&next, &room_id), (4, 2), "{next}");
}

backend_matrix!(
    unread_counts_across_processes,
    unread_across_processes_scenario
);

/// A process keeps the unread counts it counted and continues them at the next sync; what
/// another process writes in between (messages, a receipt) must still show, exactly.
async fn unread_across_processes_scenario(app: &TestApp) {
    let peer = app.spawn_peer(|_| {}).await;
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let (alice, bob, room_id, since) = two_in_a_room(app).await;
        let first = sync(app, &bob.access_token, Some(&since), 0).await;
        let since = next_batch(&first);
        peer.send_text(&alice.access_token, &room_id, "one").await;
        let second = peer.send_text(&alice.access_token, &room_id, "two").await;
        let next = sync(app, &bob.access_token, Some(&since), 0).await;
        assert_eq!(unread(&next, &room_id), (2, 0), "{next}");

        app.send_text(&alice.access_token, &room_id, "hi bob").await;
        let next = sync(app, &bob.access_token, Some(&next_batch(&next)), 0).await;
        assert_eq!(unread(&next, &room_id), (3, 1), "{next}");

        // A receipt through the other process moves where the counts start.
        post_receipt(&peer, &bob, &room_id, "m.read", &second, json!({}))
            .await
            .expect_ok();
        let next = sync(app, &bob.access_token, Some(&next_batch(&next)), 0).await;
        assert_eq!(unread(&next, &room_id), (1, 1), "{next}");

        peer.send_text(&alice.access_token, &room_id, "four").await;
        let next = sync(app, &bob.access_token, Some(&next_batch(&next)), 0).await;
        assert_eq!(unread(&next, &room_id), (2, 1), "{next}");
        // Both processes agree, whatever each kept.
        let initial = sync(&peer, &bob.access_token, None, 0).await;
        assert_eq!(unread(&initial, &room_id), (2, 1), "{initial}");
        let initial = sync(app, &bob.access_token, None, 0).await;
        assert_eq!(unread(&initial, &room_id), (2, 1), "{initial}");

        // A display name set through the other process is what mentions look for from then
        // on, though this process kept the names it read before.
        let since = next_batch(&next);
        peer.set_displayname(&bob, "Robert Tables").await;
        peer.send_text(&alice.access_token, &room_id, "hey Robert Tables")
            .await;
        let next = sync(app, &bob.access_token, Some(&since), 0).await;
        assert_eq!(unread(&next, &room_id), (3, 2), "{next}");
    }))
    .await;
    peer.teardown().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(
    unread_counts_over_quiet_rooms_and_gaps,
    quiet_rooms_scenario
);

/// The bodies of a joined room's timeline in a sync response.
fn timeline_bodies(response: &Value, room_id: &str) -> Vec<String> {
    response["rooms"]["join"][room_id]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A sync woken by news reads its rooms' events since its token once, and counts unread
/// messages from that read: the kept counts of rooms without news move on with each sync,
/// and a token further behind than one such read covers is caught up room by room. Either
/// way the counts and timelines are what a process that kept nothing finds.
async fn quiet_rooms_scenario(app: &TestApp) {
    let fresh = app.spawn_peer(|_| {}).await;
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let (alice, bob, room_a, _) = two_in_a_room(app).await;
        let room_b = app
            .create_room(&alice.access_token, json!({"preset": "public_chat"}))
            .await;
        app.join_room(&bob.access_token, &room_b).await;
        // Alice's alone: its messages move the stream, not Bob's rooms.
        let elsewhere = app.create_room(&alice.access_token, json!({})).await;
        let mut since = next_batch(&sync(app, &bob.access_token, None, 0).await);
        let mut step = async |via: &TestApp, room_id: &str, bodies: &[&str], expected| {
            let next = sync(via, &bob.access_token, Some(&since), 0).await;
            let other = if room_id == room_a { &room_b } else { &room_a };
            assert_eq!(timeline_bodies(&next, room_id), bodies, "{next}");
            assert!(next["rooms"]["join"][other].is_null(), "{next}");
            assert!(next["rooms"]["join"][&elsewhere].is_null(), "{next}");
            assert_eq!(unread(&next, room_id), expected, "{next}");
            let from_scratch = sync(&fresh, &bob.access_token, None, 0).await;
            assert_eq!(unread(&from_scratch, room_id), expected, "{from_scratch}");
            since = next_batch(&next);
        };

        app.send_text(&alice.access_token, &room_a, "a1").await;
        step(app, &room_a, &["a1"], (1, 0)).await;
        app.send_text(&alice.access_token, &room_b, "b1").await;
        app.send_text(&alice.access_token, &room_b, "b2").await;
        step(app, &room_b, &["b1", "b2"], (2, 0)).await;
        // Room A had no news meanwhile: its count goes on from what it was.
        app.send_text(&alice.access_token, &room_a, "a2").await;
        step(app, &room_a, &["a2"], (2, 0)).await;
        // The token falls further behind than one read of news covers.
        let gap = palpo_service::rooms::RECENT_RANGE + 10;
        for n in 0..gap {
            app.send_text(&alice.access_token, &elsewhere, &format!("x{n}"))
                .await;
        }
        app.send_text(&alice.access_token, &room_a, "a3").await;
        step(app, &room_a, &["a3"], (3, 0)).await;
        app.send_text(&alice.access_token, &room_b, "b3").await;
        step(app, &room_b, &["b3"], (3, 0)).await;
        // A sync through the other process moves the token past news this process never
        // counted: its kept count of room B is behind the next token, and is counted on from
        // where it is, not from the token.
        app.send_text(&alice.access_token, &room_b, "b4").await;
        step(&fresh, &room_b, &["b4"], (4, 0)).await;
        app.send_text(&alice.access_token, &room_b, "b5").await;
        step(app, &room_b, &["b5"], (5, 0)).await;
    }))
    .await;
    fresh.teardown().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_round_trip() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let (alice, bob, room_id, since) = two_in_a_room(app).await;
        let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
        let req = get_supported_versions::Request::new()
            .try_into_http_request::<Vec<u8>>(&app.base_url, SendAccessToken::None, ())
            .expect("request");
        let versions: get_supported_versions::Response = ok(&exchange(app, req).await);
        let supported =
            SupportedVersions::from_parts(&versions.versions, &versions.unstable_features);
        let v = Cow::Borrowed(&supported);
        let alice_id = ruma::UserId::parse(alice.user_id.as_str()).expect("user id");
        let bob_id = ruma::UserId::parse(bob.user_id.as_str()).expect("user id");
        let room = ruma::RoomId::parse(room_id.as_str()).expect("room id");
        let event_id = app.send_text(a, &room_id, "read me").await;
        let event = ruma::EventId::parse(event_id.as_str()).expect("event id");

        let typing = create_typing_event::v3::Typing::Yes(
            create_typing_event::v3::TypingInfo::new(Duration::from_secs(10)),
        );
        let req = create_typing_event::v3::Request::new(alice_id.clone(), room.clone(), typing)
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(a),
                v.clone(),
            )
            .expect("request");
        let _: create_typing_event::v3::Response = ok(&exchange(app, req).await);

        let mut receipt = create_receipt::v3::Request::new(
            room.clone(),
            create_receipt::v3::ReceiptType::Read,
            event.clone(),
        );
        receipt.thread = ruma::events::receipt::ReceiptThread::Main;
        let req = receipt
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let _: create_receipt::v3::Response = ok(&exchange(app, req).await);

        let mut markers = set_read_marker::v3::Request::new(room.clone());
        markers.fully_read = Some(event.clone());
        markers.private_read_receipt = Some(event.clone());
        let req = markers
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let _: set_read_marker::v3::Response = ok(&exchange(app, req).await);

        let mut presence =
            set_presence::v3::Request::new(alice_id.clone(), ruma::presence::PresenceState::Online);
        presence.status_msg = Some("here".to_owned());
        let req = presence
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(a),
                v.clone(),
            )
            .expect("request");
        let _: set_presence::v3::Response = ok(&exchange(app, req).await);
        let req = get_presence::v3::Request::new(alice_id.clone())
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let got: get_presence::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(got.presence, ruma::presence::PresenceState::Online);
        assert_eq!(got.status_msg.as_deref(), Some("here"));
        assert_eq!(got.currently_active, Some(true));

        // ruma reads the ephemeral sections of a sync.
        let mut request = sync_events::v3::Request::new();
        request.since = Some(since);
        request.set_presence = ruma::presence::PresenceState::Offline;
        let req = request
            .try_into_http_request::<Vec<u8>>(
                &app.base_url,
                SendAccessToken::IfRequired(b),
                v.clone(),
            )
            .expect("request");
        let resp: sync_events::v3::Response = ok(&exchange(app, req).await);
        let joined = resp.rooms.join.get(&room).expect("joined room");
        let mut kinds = Vec::new();
        for raw in &joined.ephemeral.events {
            let parsed = raw
                .deserialize()
                .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", raw.json().get()));
            kinds.push(parsed.event_type().to_string());
            if let ruma::events::AnySyncEphemeralRoomEvent::Receipt(receipt) = parsed {
                use ruma::events::receipt::{ReceiptThread, ReceiptType};
                let receipts = receipt
                    .content
                    .0
                    .get(&event)
                    .expect("receipts of the event");
                let public = &receipts[&ReceiptType::Read][&bob_id];
                assert_eq!(public.thread, ReceiptThread::Main);
                assert!(public.ts.is_some());
                assert!(receipts[&ReceiptType::ReadPrivate].contains_key(&bob_id));
            }
        }
        kinds.sort();
        assert_eq!(kinds, ["m.receipt", "m.typing"]);
        assert_eq!(
            joined.unread_notifications.notification_count,
            Some(0u32.into())
        );
        let presence: Vec<_> = resp
            .presence
            .events
            .iter()
            .map(|raw| {
                raw.deserialize()
                    .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", raw.json().get()))
            })
            .collect();
        assert!(
            presence.iter().any(|p| p.sender == alice_id),
            "{:?}",
            presence
        );
    })
    .await;
}
