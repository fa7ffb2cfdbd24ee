//! `/sync` filters over HTTP on every backend, with and without Redis: lazy-loaded members
//! (and redundant ones), the `state`, `account_data`, `presence` and `ephemeral` filters,
//! `event_fields` and `event_format`, timeline limits counted after the filter, and malformed
//! filters (400 `M_BAD_JSON`).

use std::collections::BTreeSet;

use palpo_tests::{Config, Session, TestApp, backend_matrix, enc, next_batch};
use ruma::api::IncomingResponseExt;
use serde_json::{Value, json};

/// `/sync` with an inline filter (`None`: no filter).
async fn sync_filtered(
    app: &TestApp,
    token: &str,
    since: Option<&str>,
    filter: Option<&Value>,
) -> Value {
    let mut path = "/_matrix/client/v3/sync?timeout=0".to_owned();
    if let Some(filter) = filter {
        path.push_str(&format!("&filter={}", enc(&filter.to_string())));
    }
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    app.get(&path, Some(token)).await.expect_ok().clone()
}

fn events(section: &Value) -> &Vec<Value> {
    section["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {section}"))
}

/// The user ids of the `m.room.member` events of a room's `state`.
fn state_members(response: &Value, room_id: &str) -> BTreeSet<String> {
    events(&response["rooms"]["join"][room_id]["state"])
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().expect("state_key").to_owned())
        .collect()
}

/// The event types of a room's `state`.
fn state_types(response: &Value, room_id: &str) -> BTreeSet<String> {
    events(&response["rooms"]["join"][room_id]["state"])
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .collect()
}

/// The message bodies of a room's timeline.
fn bodies(response: &Value, room_id: &str) -> Vec<String> {
    events(&response["rooms"]["join"][room_id]["timeline"])
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

async fn register_all(app: &TestApp, names: &[&str]) -> Vec<Session> {
    let mut sessions = Vec::new();
    for name in names {
        sessions.push(app.register(name, "pw").await);
    }
    sessions
}

// ---------------------------------------------------------------------------------------------
// Lazy-loaded members

backend_matrix!(lazy_loaded_members, lazy_members_scenario);

async fn lazy_members_scenario(app: &TestApp) {
    let users = register_all(app, &["alice", "bob", "u1", "u2", "u3", "u4", "u5", "u6"]).await;
    let (alice, bob) = (&users[0], &users[1]);
    let room_id = app
        .create_room(
            &alice.access_token,
            json!({"preset": "public_chat", "name": "crowd"}),
        )
        .await;
    // Joined in this order: alice, u1..u6, bob. The heroes are the first five after alice
    // (including her), whatever Bob's place.
    for user in &users[2..] {
        app.join_room(&user.access_token, &room_id).await;
    }
    app.join_room(&bob.access_token, &room_id).await;
    let u5 = &users[6];
    let u6 = &users[7];
    app.send_text(&u6.access_token, &room_id, "u6 speaks").await;

    let lazy = json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 1}}});
    let initial = sync_filtered(app, &bob.access_token, None, Some(&lazy)).await;
    let room = &initial["rooms"]["join"][&room_id];
    assert_eq!(bodies(&initial, &room_id), ["u6 speaks"]);
    let heroes: Vec<String> = users[..6]
        .iter()
        .filter(|u| u.user_id != bob.user_id)
        .map(|u| u.user_id.clone())
        .collect();
    assert_eq!(room["summary"]["m.heroes"], json!(heroes), "{room}");
    assert_eq!(room["summary"]["m.joined_member_count"], 8);
    assert_eq!(room["summary"]["m.invited_member_count"], 0);
    // The sender, the heroes and Bob himself; not u5.
    let mut expected: BTreeSet<String> = heroes.iter().cloned().collect();
    expected.insert(u6.user_id.clone());
    expected.insert(bob.user_id.clone());
    assert_eq!(state_members(&initial, &room_id), expected, "{room}");
    // The rest of the state is all there.
    for kind in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.name",
    ] {
        assert!(
            state_types(&initial, &room_id).contains(kind),
            "{kind}: {room}"
        );
    }
    // Without lazy loading, every member.
    let eager = json!({"room": {"timeline": {"limit": 1}}});
    let full = sync_filtered(app, &bob.access_token, None, Some(&eager)).await;
    assert_eq!(state_members(&full, &room_id).len(), 8);

    // The same filter later: u6's member event, sent already, is not sent again.
    let since = next_batch(&initial);
    app.send_text(&u5.access_token, &room_id, "u5 speaks").await;
    app.send_text(&u6.access_token, &room_id, "u6 again").await;
    let lazy3 = json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 3}}});
    let next = sync_filtered(app, &bob.access_token, Some(&since), Some(&lazy)).await;
    assert_eq!(bodies(&next, &room_id), ["u6 again"]);
    assert_eq!(next["rooms"]["join"][&room_id]["timeline"]["limited"], true);
    let members = state_members(&next, &room_id);
    assert!(!members.contains(&u6.user_id), "u6 is redundant: {next}");
    // Limited: u5's message is in the gap, but u5's membership did not change there.
    assert!(!members.contains(&u5.user_id), "{next}");
    let since = next_batch(&next);
    app.send_text(&u5.access_token, &room_id, "u5 again").await;
    let next = sync_filtered(app, &bob.access_token, Some(&since), Some(&lazy3)).await;
    assert_eq!(bodies(&next, &room_id), ["u5 again"]);
    assert!(
        state_members(&next, &room_id).contains(&u5.user_id),
        "another filter, another sequence: {next}"
    );
    // Same filter again: u5 is known now.
    let since = next_batch(&next);
    app.send_text(&u5.access_token, &room_id, "u5 thrice").await;
    let next = sync_filtered(app, &bob.access_token, Some(&since), Some(&lazy3)).await;
    assert_eq!(bodies(&next, &room_id), ["u5 thrice"]);
    assert!(state_members(&next, &room_id).is_empty(), "{next}");
    // A retry from an older token (the answer got lost) gets u5 again.
    let retry = sync_filtered(app, &bob.access_token, Some(&since), Some(&lazy3)).await;
    assert!(state_members(&retry, &room_id).is_empty(), "{retry}");
    let older = next_batch(&initial);
    let retry = sync_filtered(app, &bob.access_token, Some(&older), Some(&lazy3)).await;
    assert!(
        state_members(&retry, &room_id).is_superset(&[u5.user_id.clone()].into()),
        "{retry}"
    );

    // include_redundant_members: every sender's member event, each time.
    let redundant = json!({"room": {"state": {"lazy_load_members": true,
        "include_redundant_members": true}, "timeline": {"limit": 3}}});
    let first = sync_filtered(app, &bob.access_token, None, Some(&redundant)).await;
    let since = next_batch(&first);
    app.send_text(&u6.access_token, &room_id, "u6 once more")
        .await;
    let next = sync_filtered(app, &bob.access_token, Some(&since), Some(&redundant)).await;
    assert!(
        state_members(&next, &room_id).contains(&u6.user_id),
        "{next}"
    );

    // A membership change in a gap is sent, though its member sends nothing.
    let since = next_batch(&next);
    app.set_displayname(u5, "Five").await;
    for n in 0..3 {
        app.send_text(&u6.access_token, &room_id, &format!("u6 {n}"))
            .await;
    }
    let next = sync_filtered(app, &bob.access_token, Some(&since), Some(&lazy)).await;
    assert_eq!(next["rooms"]["join"][&room_id]["timeline"]["limited"], true);
    let five = events(&next["rooms"]["join"][&room_id]["state"])
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == u5.user_id.as_str())
        .unwrap_or_else(|| panic!("u5's new member event: {next}"));
    assert_eq!(five["content"]["displayname"], "Five");

    // A room joined since the token comes with the user's own membership.
    let since = next_batch(&next);
    let other = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &other).await;
    let next = sync_filtered(app, &bob.access_token, Some(&since), Some(&lazy)).await;
    assert!(
        state_members(&next, &other).contains(&bob.user_id)
            || events(&next["rooms"]["join"][&other]["timeline"])
                .iter()
                .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str()),
        "{next}"
    );
    assert!(
        state_members(&next, &other).contains(&alice.user_id),
        "{next}"
    );
}

// ---------------------------------------------------------------------------------------------
// State filter, event_fields, event_format

backend_matrix!(state_filter_fields_and_format, state_filter_scenario);

async fn state_filter_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let room_id = app
        .create_room(
            token,
            json!({"preset": "private_chat", "name": "named", "topic": "t"}),
        )
        .await;
    app.send_text(token, &room_id, "hello").await;

    let only = json!({"room": {"timeline": {"limit": 1},
        "state": {"types": ["m.room.name", "m.room.member"]}}});
    let response = sync_filtered(app, token, None, Some(&only)).await;
    assert_eq!(
        state_types(&response, &room_id),
        ["m.room.member", "m.room.name"].map(str::to_owned).into(),
        "{response}"
    );
    let not = json!({"room": {"timeline": {"limit": 1},
        "state": {"not_types": ["m.room.member", "m.room.p*"]}}});
    let response = sync_filtered(app, token, None, Some(&not)).await;
    let types = state_types(&response, &room_id);
    assert!(
        types.contains("m.room.create") && types.contains("m.room.topic"),
        "{types:?}"
    );
    assert!(
        !types.contains("m.room.member") && !types.contains("m.room.power_levels"),
        "{types:?}"
    );
    let senders = json!({"room": {"timeline": {"limit": 1},
        "state": {"not_senders": [alice.user_id]}}});
    let response = sync_filtered(app, token, None, Some(&senders)).await;
    assert!(state_types(&response, &room_id).is_empty(), "{response}");

    // event_fields: only those fields (nested ones too).
    let fields =
        json!({"event_fields": ["type", "content.body"], "room": {"timeline": {"limit": 2}}});
    let response = sync_filtered(app, token, None, Some(&fields)).await;
    let room = &response["rooms"]["join"][&room_id];
    let message = events(&room["timeline"])
        .iter()
        .find(|e| e["type"] == "m.room.message")
        .unwrap_or_else(|| panic!("{room}"));
    assert_eq!(
        message,
        &json!({"type": "m.room.message", "content": {"body": "hello"}})
    );
    for event in events(&room["state"]) {
        let keys: Vec<&String> = event.as_object().expect("object").keys().collect();
        assert!(
            keys.iter().all(|k| *k == "type" || *k == "content"),
            "{event}"
        );
    }

    // event_format: federation sends the PDUs.
    let federation = json!({"event_format": "federation", "room": {"timeline": {"limit": 2}}});
    let response = sync_filtered(app, token, None, Some(&federation)).await;
    let room = &response["rooms"]["join"][&room_id];
    for event in events(&room["timeline"])
        .iter()
        .chain(events(&room["state"]))
    {
        for field in [
            "auth_events",
            "prev_events",
            "hashes",
            "signatures",
            "depth",
        ] {
            assert!(event.get(field).is_some(), "{field} in {event}");
        }
    }
    let client = sync_filtered(app, token, None, None).await;
    for event in events(&client["rooms"]["join"][&room_id]["timeline"]) {
        assert!(
            event.get("event_id").is_some() && event.get("hashes").is_none(),
            "{event}"
        );
    }

    // Malformed filters are refused with 400 M_BAD_JSON.
    for bad in [
        json!({"room": {"state": {"lazy_load_members": "yes"}}}),
        json!({"room": {"state": {"types": "m.room.name"}}}),
        json!({"room": {"ephemeral": {"not_types": [1]}}}),
        json!({"room": {"account_data": {"limit": -1}}}),
        json!({"presence": {"senders": "@a:x"}}),
        json!({"account_data": []}),
        json!({"event_format": "xml"}),
        json!({"event_fields": ["content..body"]}),
        json!({"room": {"timeline": {"unread_thread_notifications": 1}}}),
    ] {
        let path = format!("/_matrix/client/v3/sync?filter={}", enc(&bad.to_string()));
        app.get(&path, Some(token))
            .await
            .expect_error(400, "M_BAD_JSON");
        // Uploading it is refused alike.
        let upload = format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id));
        app.post(&upload, Some(token), bad)
            .await
            .expect_error(400, "M_BAD_JSON");
    }
    app.get("/_matrix/client/v3/sync?filter=%7Bnot%20json", Some(token))
        .await
        .expect_error(400, "M_BAD_JSON");

    // use_state_after: the state at the end of the timeline, in `state_after`.
    let after = |since: Option<&str>| {
        let mut path = "/_matrix/client/v3/sync?use_state_after=true&filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1%7D%7D%7D".to_owned();
        if let Some(since) = since {
            path.push_str(&format!("&since={}", enc(since)));
        }
        async move { app.get(&path, Some(token)).await.expect_ok().clone() }
    };
    let initial = after(None).await;
    let room = &initial["rooms"]["join"][&room_id];
    assert!(room.get("state").is_none(), "{room}");
    let kinds: BTreeSet<&str> = events(&room["state_after"])
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(
        kinds.contains("m.room.name") && kinds.contains("m.room.member"),
        "{room}"
    );
    let since = next_batch(&initial);
    let name_path = app.room_path(&room_id, "/state/m.room.name/");
    app.put(&name_path, Some(token), json!({"name": "later"}))
        .await
        .expect_ok();
    app.send_text(token, &room_id, "after the rename").await;
    let next = after(Some(&since)).await;
    let room = &next["rooms"]["join"][&room_id];
    assert!(room.get("state").is_none(), "{room}");
    assert_eq!(bodies(&next, &room_id), ["after the rename"]);
    let state_after = events(&room["state_after"]);
    assert_eq!(state_after.len(), 1, "{room}");
    assert_eq!(state_after[0]["content"]["name"], "later");
    // Nothing changed in the state: `state_after` is there, empty.
    let since = next_batch(&next);
    app.send_text(token, &room_id, "plain").await;
    let next = after(Some(&since)).await;
    assert!(
        events(&next["rooms"]["join"][&room_id]["state_after"]).is_empty(),
        "{next}"
    );
    // Without it, `state` as before.
    let plain = sync_filtered(app, token, Some(&since), None).await;
    let room = &plain["rooms"]["join"][&room_id];
    assert!(
        room.get("state_after").is_none() && room["state"].is_object(),
        "{room}"
    );
}

// ---------------------------------------------------------------------------------------------
// The timeline limit counts filtered events

backend_matrix!(filtered_timeline_limits, filtered_limit_scenario);

async fn filtered_limit_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let room_id = app
        .create_room(token, json!({"preset": "private_chat", "name": "busy"}))
        .await;
    for n in 0..7 {
        app.send_text(token, &room_id, &format!("m{n}")).await;
    }
    for n in 0..12 {
        app.send_event(token, &room_id, "org.example.noise", json!({"n": n}))
            .await;
    }
    let messages = json!({"room": {"timeline": {"types": ["m.room.message"], "limit": 5}}});
    let initial = sync_filtered(app, token, None, Some(&messages)).await;
    let timeline = &initial["rooms"]["join"][&room_id]["timeline"];
    assert_eq!(bodies(&initial, &room_id), ["m2", "m3", "m4", "m5", "m6"]);
    assert_eq!(timeline["limited"], true, "m0 and m1 are left out");
    // prev_batch continues where the timeline starts.
    let prev_batch = timeline["prev_batch"].as_str().expect("prev_batch");
    let filter = json!({"types": ["m.room.message"]});
    let path = app.room_path(
        &room_id,
        &format!(
            "/messages?dir=b&limit=10&from={}&filter={}",
            enc(prev_batch),
            enc(&filter.to_string())
        ),
    );
    let page = app.get(&path, Some(token)).await;
    let older: Vec<&str> = page.expect_ok()["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(older, ["m1", "m0"]);

    // All seven fit: not limited, though there are older events (of other types).
    let roomy = json!({"room": {"timeline": {"types": ["m.room.message"], "limit": 7}}});
    let all = sync_filtered(app, token, None, Some(&roomy)).await;
    assert_eq!(bodies(&all, &room_id).len(), 7);
    assert_eq!(all["rooms"]["join"][&room_id]["timeline"]["limited"], false);

    // Incremental: the newest two of three, behind noise; limited.
    let since = next_batch(&initial);
    for n in 7..10 {
        app.send_text(token, &room_id, &format!("m{n}")).await;
        app.send_event(token, &room_id, "org.example.noise", json!({"n": n}))
            .await;
    }
    let two = json!({"room": {"timeline": {"types": ["m.room.message"], "limit": 2}}});
    let next = sync_filtered(app, token, Some(&since), Some(&two)).await;
    assert_eq!(bodies(&next, &room_id), ["m8", "m9"]);
    assert_eq!(next["rooms"]["join"][&room_id]["timeline"]["limited"], true);
    // The filtered-out events still change the state the client is told about.
    let since = next_batch(&next);
    let name_path = app.room_path(&room_id, "/state/m.room.name/");
    app.put(&name_path, Some(token), json!({"name": "renamed"}))
        .await
        .expect_ok();
    app.send_text(token, &room_id, "m10").await;
    let next = sync_filtered(app, token, Some(&since), Some(&two)).await;
    let room = &next["rooms"]["join"][&room_id];
    assert_eq!(bodies(&next, &room_id), ["m10"]);
    assert_eq!(room["timeline"]["limited"], false);
    let name = events(&room["state"])
        .iter()
        .find(|e| e["type"] == "m.room.name")
        .unwrap_or_else(|| panic!("the new name, in state: {next}"));
    assert_eq!(name["content"]["name"], "renamed");
    // Unfiltered, the rename is in the timeline and not in state.
    let plain = sync_filtered(app, token, Some(&since), None).await;
    assert!(
        events(&plain["rooms"]["join"][&room_id]["state"]).is_empty(),
        "{plain}"
    );
}

// ---------------------------------------------------------------------------------------------
// Account data, presence and ephemeral filters

backend_matrix!(
    account_data_presence_ephemeral_filters,
    other_filters_scenario
);

async fn other_filters_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &room_id).await;
    let token = bob.access_token.as_str();
    let user = enc(&bob.user_id);
    for kind in ["org.one", "org.two", "org.three"] {
        let path = format!("/_matrix/client/v3/user/{user}/account_data/{kind}");
        app.put(&path, Some(token), json!({"k": kind}))
            .await
            .expect_ok();
        let path = format!(
            "/_matrix/client/v3/user/{user}/rooms/{}/account_data/{kind}",
            enc(&room_id)
        );
        app.put(&path, Some(token), json!({"k": kind}))
            .await
            .expect_ok();
    }
    let status =
        |who: &Session| format!("/_matrix/client/v3/presence/{}/status", enc(&who.user_id));
    app.put(
        &status(&alice),
        Some(&alice.access_token),
        json!({"presence": "online"}),
    )
    .await
    .expect_ok();
    let message = app.send_text(&alice.access_token, &room_id, "hi").await;
    let receipt = app.room_path(&room_id, &format!("/receipt/m.read/{}", enc(&message)));
    app.post(&receipt, Some(&alice.access_token), json!({}))
        .await
        .expect_ok();
    let typing = app.room_path(&room_id, &format!("/typing/{}", enc(&alice.user_id)));
    app.put(
        &typing,
        Some(&alice.access_token),
        json!({"typing": true, "timeout": 20000}),
    )
    .await
    .expect_ok();

    let types = |section: &Value| -> Vec<String> {
        events(section)
            .iter()
            .map(|e| e["type"].as_str().expect("type").to_owned())
            .collect()
    };
    let filter = json!({
        "account_data": {"types": ["org.*"], "not_types": ["org.two"]},
        "room": {
            "account_data": {"types": ["org.two"]},
            "ephemeral": {"types": ["m.receipt"]},
        },
        "presence": {"senders": [alice.user_id]},
    });
    let response = sync_filtered(app, token, None, Some(&filter)).await;
    assert_eq!(types(&response["account_data"]), ["org.one", "org.three"]);
    let room = &response["rooms"]["join"][&room_id];
    assert_eq!(types(&room["account_data"]), ["org.two"]);
    assert_eq!(types(&room["ephemeral"]), ["m.receipt"], "{room}");
    let presence = events(&response["presence"]);
    assert_eq!(presence.len(), 1, "{presence:?}");
    assert_eq!(presence[0]["sender"], alice.user_id.as_str());

    // Limits keep the newest.
    let limited = json!({
        "account_data": {"limit": 1},
        "room": {"account_data": {"limit": 2}},
        "presence": {"not_types": ["m.presence"]},
    });
    let response = sync_filtered(app, token, None, Some(&limited)).await;
    assert_eq!(types(&response["account_data"]), ["org.three"]);
    assert_eq!(
        types(&response["rooms"]["join"][&room_id]["account_data"]),
        ["org.two", "org.three"]
    );
    assert!(events(&response["presence"]).is_empty());

    // What the filter drops is no news: a room whose only change is filtered out stays out.
    let quiet = json!({"room": {"ephemeral": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}},
        "presence": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}});
    let since = next_batch(&response);
    app.put(&typing, Some(&alice.access_token), json!({"typing": false}))
        .await
        .expect_ok();
    let path = format!(
        "/_matrix/client/v3/user/{user}/rooms/{}/account_data/org.four",
        enc(&room_id)
    );
    app.put(&path, Some(token), json!({})).await.expect_ok();
    let next = sync_filtered(app, token, Some(&since), Some(&quiet)).await;
    assert!(
        next["rooms"]["join"]
            .as_object()
            .is_none_or(|j| j.is_empty()),
        "{next}"
    );
    let next = sync_filtered(app, token, Some(&since), None).await;
    let room = &next["rooms"]["join"][&room_id];
    assert_eq!(types(&room["ephemeral"]), ["m.typing"], "{next}");
    assert_eq!(types(&room["account_data"]), ["org.four"], "{next}");
}

// ---------------------------------------------------------------------------------------------
// Unread counts per thread

backend_matrix!(thread_notification_counts, threads_scenario);

/// A room's `unread_notifications` as `(notifications, highlights)`.
fn unread(response: &Value, room_id: &str) -> (i64, i64) {
    let counts = &response["rooms"]["join"][room_id]["unread_notifications"];
    (
        counts["notification_count"]
            .as_i64()
            .expect("notification_count"),
        counts["highlight_count"].as_i64().expect("highlight_count"),
    )
}

async fn threads_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &room_id).await;
    let a = alice.access_token.as_str();
    let root = app.send_text(a, &room_id, "root").await;
    let in_thread = |body: &str| {
        json!({"msgtype": "m.text", "body": body,
            "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
    };
    let t1 = app
        .send_event(a, &room_id, "m.room.message", in_thread("t1"))
        .await;
    let mut mention = in_thread("t2");
    mention["m.mentions"] = json!({"user_ids": [bob.user_id]});
    let t2 = app.send_event(a, &room_id, "m.room.message", mention).await;
    let main = app.send_text(a, &room_id, "main").await;
    // A reaction is in the thread too, but is no message.
    app.send_event(
        a,
        &room_id,
        "m.reaction",
        json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": t1, "key": "+1"}}),
    )
    .await;

    let threads = json!({"room": {"timeline": {"unread_thread_notifications": true}}});
    let b = bob.access_token.as_str();
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    let room = &response["rooms"]["join"][&room_id];
    assert_eq!(unread(&response, &room_id), (2, 0), "root and main: {room}");
    assert_eq!(
        room["unread_thread_notifications"],
        json!({ root.as_str(): {"notification_count": 2, "highlight_count": 1} }),
        "{room}"
    );
    // ruma reads the counts per thread, and its own lazy-loading filter is accepted.
    let ruma_filter = {
        use ruma::api::client::filter::{FilterDefinition, LazyLoadOptions, RoomEventFilter};
        let mut filter = FilterDefinition::default();
        filter.room.state = RoomEventFilter::with_lazy_loading();
        filter.room.state.lazy_load_options = LazyLoadOptions::Enabled {
            include_redundant_members: true,
        };
        filter.room.timeline.unread_thread_notifications = true;
        serde_json::to_value(&filter).expect("serializes")
    };
    let resp = sync_filtered(app, b, None, Some(&ruma_filter)).await;
    let text = resp.to_string();
    let http = http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(text.as_bytes())
        .expect("response");
    let parsed = ruma::api::client::sync::sync_events::v3::Response::try_from_http_response(http)
        .unwrap_or_else(|e| panic!("ruma cannot read the sync response: {e}: {resp}"));
    let ruma_room = ruma::RoomId::parse(room_id.as_str()).expect("room id");
    let ruma_root = ruma::EventId::parse(root.as_str()).expect("event id");
    let joined = parsed.rooms.join.get(&ruma_room).expect("joined room");
    let counts = joined
        .unread_thread_notifications
        .get(&ruma_root)
        .expect("thread counts");
    assert_eq!(counts.notification_count, Some(2u32.into()));
    assert_eq!(counts.highlight_count, Some(1u32.into()));
    assert_eq!(
        joined.unread_notifications.notification_count,
        Some(2u32.into())
    );

    // Without the flag: all of it in one count, and no counts per thread.
    let plain = sync_filtered(app, b, None, None).await;
    assert_eq!(unread(&plain, &room_id), (4, 1));
    assert!(
        plain["rooms"]["join"][&room_id]
            .get("unread_thread_notifications")
            .is_none(),
        "{plain}"
    );

    // A receipt in the thread reads the thread up to there; one for `main`, the main
    // timeline.
    let receipt = |kind: &str, event: &str| {
        app.room_path(&room_id, &format!("/receipt/{kind}/{}", enc(event)))
    };
    app.post(&receipt("m.read", &t1), Some(b), json!({"thread_id": root}))
        .await
        .expect_ok();
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    assert_eq!(unread(&response, &room_id), (2, 0));
    assert_eq!(
        response["rooms"]["join"][&room_id]["unread_thread_notifications"][&root],
        json!({"notification_count": 1, "highlight_count": 1})
    );
    app.post(
        &receipt("m.read", &main),
        Some(b),
        json!({"thread_id": "main"}),
    )
    .await
    .expect_ok();
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    assert_eq!(unread(&response, &room_id), (0, 0));
    assert_eq!(
        response["rooms"]["join"][&room_id]["unread_thread_notifications"][&root]["notification_count"],
        1
    );
    assert_eq!(
        unread(&sync_filtered(app, b, None, None).await, &room_id),
        (1, 1),
        "the thread's message, counted in the room's total"
    );

    // An edit is quiet (the default push rules' `.m.rule.suppress_edits`); another relation
    // to a thread message is in the thread.
    app.send_event(
        a,
        &room_id,
        "m.room.message",
        json!({"msgtype": "m.text", "body": "* t2!", "m.new_content": {"msgtype": "m.text",
            "body": "t2!"}, "m.relates_to": {"rel_type": "m.replace", "event_id": t2}}),
    )
    .await;
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    assert_eq!(
        response["rooms"]["join"][&room_id]["unread_thread_notifications"][&root]["notification_count"],
        1
    );
    let reference = app
        .send_event(
            a,
            &room_id,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "about t2",
                "m.relates_to": {"rel_type": "m.reference", "event_id": t2}}),
        )
        .await;
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    assert_eq!(unread(&response, &room_id), (0, 0));
    assert_eq!(
        response["rooms"]["join"][&room_id]["unread_thread_notifications"][&root]["notification_count"],
        2
    );
    // An unthreaded receipt reads everything before it, threads included.
    app.post(&receipt("m.read.private", &reference), Some(b), json!({}))
        .await
        .expect_ok();
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    assert_eq!(unread(&response, &room_id), (0, 0));
    assert!(
        response["rooms"]["join"][&room_id]
            .get("unread_thread_notifications")
            .is_none(),
        "{response}"
    );
    // What comes after counts again, per thread.
    app.send_event(a, &room_id, "m.room.message", in_thread("t3"))
        .await;
    app.send_text(a, &room_id, "later").await;
    let response = sync_filtered(app, b, None, Some(&threads)).await;
    assert_eq!(unread(&response, &room_id), (1, 0));
    assert_eq!(
        response["rooms"]["join"][&room_id]["unread_thread_notifications"][&root]["notification_count"],
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Presence goes idle

backend_matrix!(
    presence_goes_idle,
    presence_idle_scenario,
    |config: &mut Config| {
        config.presence.idle_timeout_secs = 1;
    }
);

/// The `m.presence` content of `user` in a sync response.
fn presence_of(response: &Value, user: &str) -> Option<Value> {
    events(&response["presence"])
        .iter()
        .find(|e| e["sender"] == user)
        .map(|e| e["content"].clone())
}

async fn presence_idle_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &room_id).await;
    let status = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
    app.put(
        &status,
        Some(&alice.access_token),
        json!({"presence": "online", "status_msg": "here"}),
    )
    .await
    .expect_ok();
    // Bob syncs without marking himself online.
    let bob_sync = |since: Option<String>, timeout: u64| {
        let mut path = format!("/_matrix/client/v3/sync?set_presence=offline&timeout={timeout}");
        if let Some(since) = since {
            path.push_str(&format!("&since={}", enc(&since)));
        }
        let token = bob.access_token.clone();
        async move { app.get(&path, Some(&token)).await.expect_ok().clone() }
    };
    let initial = bob_sync(None, 0).await;
    let seen = presence_of(&initial, &alice.user_id).expect("alice's presence");
    assert_eq!(seen["presence"], "online", "{seen}");
    assert_eq!(seen["currently_active"], true);
    assert!(presence_of(&initial, &bob.user_id).is_none(), "{initial}");

    // A second later Alice is idle: a long-poll of Bob hears of it.
    let started = std::time::Instant::now();
    let woke = bob_sync(Some(next_batch(&initial)), 10_000).await;
    let elapsed = started.elapsed();
    let seen = presence_of(&woke, &alice.user_id).unwrap_or_else(|| panic!("{woke}"));
    assert_eq!(seen["presence"], "unavailable", "{seen}");
    assert_eq!(seen["currently_active"], false);
    assert_eq!(seen["status_msg"], "here");
    assert!(seen["last_active_ago"].as_i64().expect("last_active_ago") >= 1000);
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    let got = app.get(&status, Some(&bob.access_token)).await;
    let got = got.expect_ok();
    assert_eq!(got["presence"], "unavailable");
    assert_eq!(got["currently_active"], false);

    // Alice syncs: online again, which Bob sees.
    let since = next_batch(&woke);
    app.get(
        "/_matrix/client/v3/sync?timeout=0",
        Some(&alice.access_token),
    )
    .await
    .expect_ok();
    let next = bob_sync(Some(since), 0).await;
    let seen = presence_of(&next, &alice.user_id).unwrap_or_else(|| panic!("{next}"));
    assert_eq!(seen["presence"], "online");
    assert_eq!(seen["currently_active"], true);
    // set_presence=unavailable on her sync.
    let since = next_batch(&next);
    app.get(
        "/_matrix/client/v3/sync?timeout=0&set_presence=unavailable",
        Some(&alice.access_token),
    )
    .await
    .expect_ok();
    let next = bob_sync(Some(since), 0).await;
    let seen = presence_of(&next, &alice.user_id).unwrap_or_else(|| panic!("{next}"));
    assert_eq!(seen["presence"], "unavailable");
    assert_eq!(seen["currently_active"], false);
}
