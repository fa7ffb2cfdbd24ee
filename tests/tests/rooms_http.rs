//! Rooms over HTTP on every backend, with and without Redis: creating rooms, state, sending
//! and reading messages, membership, history visibility, redactions, aliases and profiles.

use std::borrow::Cow;

use palpo_tests::{
    Backend, Resp, TestApp, backend_matrix, enc, next_txn_id,
    ruma_client::{describe, exchange, ok, parse},
    run,
};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomAliasId, OwnedRoomOrAliasId, TransactionId, UInt,
    api::{
        Direction, IncomingResponseExt, OutgoingRequestExt, SupportedVersions,
        auth_scheme::SendAccessToken,
        client::{
            alias::{create_alias, delete_alias, get_alias},
            context::get_context,
            discovery::get_supported_versions,
            filter::RoomEventFilter,
            knock::knock_room,
            membership::{
                ban_user, forget_room, get_member_events, invite_user, join_room_by_id,
                join_room_by_id_or_alias, joined_members, joined_rooms, kick_user, leave_room,
                unban_user,
            },
            message::{get_message_events, send_message_event},
            profile::{
                ProfileFieldName, ProfileFieldValue, delete_profile_field, get_profile,
                get_profile_field, set_profile_field,
            },
            redact::redact_event,
            room::{Visibility, aliases, create_room, get_event_by_timestamp, get_room_event},
            state::{get_state_event_for_key, get_state_events, send_state_event},
        },
        error::{ErrorKind, FromHttpResponseError},
    },
    events::{
        AnyTimelineEvent, StateEventType,
        room::{message::RoomMessageEventContent, topic::RoomTopicEventContent},
    },
};
use serde_json::{Value, json};

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_owned()
        })
        .collect()
}

/// The `body`s of the `m.room.message` events of a chunk, in order.
fn bodies(resp: &Resp) -> Vec<String> {
    resp.expect_ok()["chunk"]
        .as_array()
        .unwrap_or_else(|| panic!("no chunk: {}", resp.text))
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn names(prefix: &str, range: impl Iterator<Item = usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

async fn messages(app: &TestApp, token: &str, room_id: &str, query: &str) -> Resp {
    app.get(
        &app.room_path(room_id, &format!("/messages?{query}")),
        Some(token),
    )
    .await
}

fn filter_query(filter: &Value) -> String {
    format!("filter={}", enc(&filter.to_string()))
}

async fn state_get(app: &TestApp, token: &str, room_id: &str, rest: &str) -> Resp {
    app.get(
        &app.room_path(room_id, &format!("/state/{rest}")),
        Some(token),
    )
    .await
}

// ---------------------------------------------------------------------------------------------

async fn create_state_send(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let room = app
        .create_room(
            token,
            json!({
                "preset": "public_chat",
                "visibility": "public",
                "name": "The Lobby",
                "topic": "Say hi",
                "room_alias_name": "lobby",
            }),
        )
        .await;

    // State: one event by type (with and without the trailing slash of the empty key),
    // the whole event on request, and every state event.
    let name = state_get(app, token, &room, "m.room.name").await;
    assert_eq!(name.expect_ok(), &json!({ "name": "The Lobby" }));
    let name = state_get(app, token, &room, "m.room.name/").await;
    assert_eq!(name.expect_ok(), &json!({ "name": "The Lobby" }));
    let topic = state_get(app, token, &room, "m.room.topic").await;
    assert_eq!(topic.expect_ok()["topic"], "Say hi");
    let rules = state_get(app, token, &room, "m.room.join_rules").await;
    assert_eq!(rules.expect_ok()["join_rule"], "public");
    let alias = state_get(app, token, &room, "m.room.canonical_alias").await;
    assert_eq!(alias.expect_ok()["alias"], "#lobby:test.local");
    let full = state_get(app, token, &room, "m.room.name?format=event").await;
    let full = full.expect_ok();
    assert_eq!(full["type"], "m.room.name");
    assert_eq!(full["state_key"], "");
    assert_eq!(full["room_id"], room.as_str());
    assert_eq!(full["sender"], alice.user_id.as_str());
    assert_eq!(full["content"]["name"], "The Lobby");
    assert!(
        full["event_id"]
            .as_str()
            .is_some_and(|id| id.starts_with('$'))
    );
    let member = state_get(
        app,
        token,
        &room,
        &format!("m.room.member/{}", enc(&alice.user_id)),
    )
    .await;
    assert_eq!(member.expect_ok()["membership"], "join");

    let all = app.get(&app.room_path(&room, "/state"), Some(token)).await;
    assert_eq!(all.status, 200, "{}", all.text);
    let types: Vec<&str> = all
        .json
        .as_array()
        .unwrap_or_else(|| panic!("state is not an array: {}", all.text))
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default())
        .collect();
    for wanted in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.canonical_alias",
        "m.room.name",
        "m.room.topic",
    ] {
        assert!(types.contains(&wanted), "{wanted} missing from {types:?}");
    }

    // Setting state: the empty-key form, the keyed form, and a missing key.
    let put = app
        .put(
            &app.room_path(&room, "/state/m.room.topic"),
            Some(token),
            json!({ "topic": "New topic" }),
        )
        .await;
    assert!(
        put.expect_ok()["event_id"]
            .as_str()
            .is_some_and(|id| id.starts_with('$'))
    );
    let topic = state_get(app, token, &room, "m.room.topic/").await;
    assert_eq!(topic.expect_ok()["topic"], "New topic");
    app.put(
        &app.room_path(&room, "/state/org.example.thing/some%2Fkey"),
        Some(token),
        json!({ "value": 1 }),
    )
    .await
    .expect_ok();
    let thing = state_get(app, token, &room, "org.example.thing/some%2Fkey").await;
    assert_eq!(thing.expect_ok(), &json!({ "value": 1 }));
    state_get(app, token, &room, "org.example.thing")
        .await
        .expect_error(404, "M_NOT_FOUND");
    state_get(app, token, &room, "org.example.thing/other")
        .await
        .expect_error(404, "M_NOT_FOUND");
    // Membership goes through the membership endpoints.
    app.put(
        &app.room_path(
            &room,
            &format!("/state/m.room.member/{}", enc(&alice.user_id)),
        ),
        Some(token),
        json!({ "membership": "join" }),
    )
    .await
    .expect_error(403, "M_FORBIDDEN");

    // Sending: a retried transaction gives the first event back; a new one a new event; the
    // same transaction id from another device is another transaction.
    let txn = next_txn_id();
    let path = app.room_path(&room, &format!("/send/m.room.message/{txn}"));
    let content = json!({ "msgtype": "m.text", "body": "hello" });
    let first = app.put(&path, Some(token), content.clone()).await;
    let first_id = first.expect_ok()["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned();
    let again = app.put(&path, Some(token), content.clone()).await;
    assert_eq!(again.expect_ok()["event_id"], first_id.as_str());
    let other = app.send_text(token, &room, "hello").await;
    assert_ne!(other, first_id);
    let laptop = app.login("alice", "pw").await;
    let elsewhere = app.put(&path, Some(&laptop.access_token), content).await;
    assert_ne!(elsewhere.expect_ok()["event_id"], first_id.as_str());

    // The event by id, its id percent-encoded in the path.
    let event = app
        .get(
            &app.room_path(&room, &format!("/event/{}", enc(&first_id))),
            Some(token),
        )
        .await;
    let event = event.expect_ok();
    assert_eq!(event["event_id"], first_id.as_str());
    assert_eq!(event["type"], "m.room.message");
    assert_eq!(event["content"]["body"], "hello");
    assert_eq!(event["sender"], alice.user_id.as_str());
    assert!(event["origin_server_ts"].as_i64().is_some_and(|ts| ts > 0));
    assert!(event.get("state_key").is_none(), "{event}");
    app.get(&app.room_path(&room, "/event/%24nope"), Some(token))
        .await
        .expect_error(404, "M_NOT_FOUND");

    // Bodies that are not event content.
    let path = app.room_path(&room, &format!("/send/m.room.message/{}", next_txn_id()));
    app.put(&path, Some(token), json!(["not", "an", "object"]))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.put(&path, None, json!({ "body": "x" }))
        .await
        .expect_error(401, "M_MISSING_TOKEN");

    // createRoom refusals.
    let create = "/_matrix/client/v3/createRoom";
    app.post(create, Some(token), json!({ "preset": "party" }))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.post(create, Some(token), json!({ "visibility": "secret" }))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.post(create, Some(token), json!({ "name": 5 }))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.post(create, Some(token), json!({ "room_version": "99" }))
        .await
        .expect_error(400, "M_UNSUPPORTED_ROOM_VERSION");
    app.post(create, Some(token), json!({ "room_version": "1" }))
        .await
        .expect_error(400, "M_UNSUPPORTED_ROOM_VERSION");
    app.post(create, Some(token), json!({ "room_alias_name": "lobby" }))
        .await
        .expect_error(400, "M_ROOM_IN_USE");
    app.post(create, Some(token), json!({ "invite": ["not-a-user"] }))
        .await
        .expect_error(400, "M_INVALID_PARAM");

    // initial_state, creation_content, power level overrides, invites, room version.
    let bob = app.register("bob", "pw").await;
    let custom = app
        .create_room(
            token,
            json!({
                "room_version": "11",
                "creation_content": { "m.federate": false },
                "initial_state": [
                    { "type": "m.room.guest_access", "content": { "guest_access": "forbidden" } },
                    { "type": "org.example.init", "state_key": "k", "content": { "x": true } },
                ],
                "power_level_content_override": { "events_default": 10 },
                "invite": [bob.user_id],
                "is_direct": true,
            }),
        )
        .await;
    let create_content = state_get(app, token, &custom, "m.room.create").await;
    let create_content = create_content.expect_ok();
    assert_eq!(create_content["room_version"], "11");
    assert_eq!(create_content["m.federate"], false);
    let guest = state_get(app, token, &custom, "m.room.guest_access").await;
    assert_eq!(guest.expect_ok()["guest_access"], "forbidden");
    let init = state_get(app, token, &custom, "org.example.init/k").await;
    assert_eq!(init.expect_ok()["x"], true);
    let power = state_get(app, token, &custom, "m.room.power_levels").await;
    assert_eq!(power.expect_ok()["events_default"], 10);
    let rules = state_get(app, token, &custom, "m.room.join_rules").await;
    assert_eq!(rules.expect_ok()["join_rule"], "invite");
    let invite = state_get(
        app,
        token,
        &custom,
        &format!("m.room.member/{}", enc(&bob.user_id)),
    )
    .await;
    let invite = invite.expect_ok();
    assert_eq!(invite["membership"], "invite");
    assert_eq!(invite["is_direct"], true);

    // Unknown rooms.
    let nowhere = "!nowhere:test.local";
    let path = app.room_path(nowhere, &format!("/send/m.room.message/{}", next_txn_id()));
    app.put(&path, Some(token), json!({ "body": "x" }))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.join_resp(token, nowhere)
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.join_resp(token, "#nowhere:test.local")
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.post(
        &app.room_path(nowhere, "/invite"),
        Some(token),
        json!({ "user_id": bob.user_id }),
    )
    .await
    .expect_error(404, "M_NOT_FOUND");
    // Reading a room one cannot see is refused alike whether it exists or not.
    state_get(app, token, nowhere, "m.room.name")
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.get(&app.room_path(nowhere, "/messages?dir=b"), Some(token))
        .await
        .expect_error(403, "M_FORBIDDEN");

    // Capabilities: profiles can be changed; versions 1 and 2 are not for new rooms.
    let caps = app
        .get("/_matrix/client/v3/capabilities", Some(token))
        .await;
    let caps = &caps.expect_ok()["capabilities"];
    assert_eq!(caps["m.set_displayname"]["enabled"], true);
    assert_eq!(caps["m.set_avatar_url"]["enabled"], true);
    let versions = &caps["m.room_versions"];
    assert_eq!(versions["default"], "12");
    assert_eq!(versions["available"]["1"], "unstable");
    assert_eq!(versions["available"]["2"], "unstable");
    for v in 3..=12 {
        assert_eq!(versions["available"][v.to_string()], "stable", "{versions}");
    }
}

/// The document marks optional request fields `nullable`: `null` is taken as absent.
async fn null_optional_fields(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let room = app
        .create_room(
            token,
            json!({
                "visibility": null, "room_alias_name": null, "name": null, "topic": null,
                "invite": null, "room_version": null, "creation_content": null,
                "initial_state": null, "preset": null, "is_direct": null,
                "power_level_content_override": null,
            }),
        )
        .await;
    // As with none of them: a private room, no name.
    let rules = state_get(app, token, &room, "m.room.join_rules").await;
    assert_eq!(rules.expect_ok()["join_rule"], "invite");
    assert_eq!(
        state_get(app, token, &room, "m.room.name").await.status,
        404
    );
    let event = app.send_text(token, &room, "to redact").await;
    let redact = app
        .put(
            &app.room_path(&room, &format!("/redact/{}/{}", enc(&event), next_txn_id())),
            Some(token),
            json!({ "reason": null }),
        )
        .await;
    redact.expect_ok();
    let left = app
        .post(
            &app.room_path(&room, "/leave"),
            Some(token),
            json!({ "reason": null }),
        )
        .await;
    left.expect_ok();
}

/// Event ids of room version 3 are standard base64: `/` and `+` must survive the path.
async fn room_version_3_event_ids(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let room = app
        .create_room(
            token,
            json!({ "room_version": "3", "preset": "public_chat" }),
        )
        .await;
    let mut tricky = Vec::new();
    for i in 0..30 {
        let id = app
            .send_text(token, &room, &format!("v3 message {i}"))
            .await;
        if id.contains('/') || id.contains('+') {
            tricky.push((id, i));
        }
        if tricky.len() >= 3 {
            break;
        }
    }
    assert!(
        !tricky.is_empty(),
        "30 event ids without / or +: improbable"
    );
    for (id, i) in tricky {
        let event = app
            .get(
                &app.room_path(&room, &format!("/event/{}", enc(&id))),
                Some(token),
            )
            .await;
        let event = event.expect_ok();
        assert_eq!(event["event_id"], id.as_str());
        assert_eq!(event["content"]["body"], format!("v3 message {i}"));
        let context = app
            .get(
                &app.room_path(&room, &format!("/context/{}", enc(&id))),
                Some(token),
            )
            .await;
        assert_eq!(context.expect_ok()["event"]["event_id"], id.as_str());
        let redact = app
            .put(
                &app.room_path(&room, &format!("/redact/{}/{}", enc(&id), next_txn_id())),
                Some(token),
                json!({}),
            )
            .await;
        redact.expect_ok();
    }
}

async fn messages_and_context(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let room = app.create_room(a, json!({ "preset": "public_chat" })).await;
    let mut ids = Vec::new();
    for i in 0..15 {
        ids.push(app.send_text(a, &room, &format!("m{i}")).await);
    }
    let only_messages = filter_query(&json!({ "types": ["m.room.message"] }));

    // Backwards, five at a time, following `end`.
    let page = messages(app, a, &room, &format!("dir=b&limit=5&{only_messages}")).await;
    assert_eq!(bodies(&page), names("m", (10..15).rev()));
    let mut end = page.json["end"].as_str().expect("end").to_owned();
    assert!(page.json["start"].is_string(), "{}", page.text);
    let first_end = end.clone();
    for expected in [names("m", (5..10).rev()), names("m", (0..5).rev())] {
        let page = messages(
            app,
            a,
            &room,
            &format!("dir=b&limit=5&from={}&{only_messages}", enc(&end)),
        )
        .await;
        assert_eq!(bodies(&page), expected);
        assert_eq!(page.json["start"], end.as_str());
        end = page.json["end"].as_str().expect("end").to_owned();
    }
    // Only the room's set-up is left, and the filter drops it: nothing more, no `end`.
    let page = messages(
        app,
        a,
        &room,
        &format!("dir=b&limit=5&from={}&{only_messages}", enc(&end)),
    )
    .await;
    assert_eq!(bodies(&page), Vec::<String>::new());
    assert!(page.json.get("end").is_none(), "{}", page.text);

    // Without a filter the set-up events come too, oldest first going forwards.
    let page = messages(app, a, &room, "dir=f&limit=3").await;
    let chunk = page.expect_ok()["chunk"].as_array().expect("chunk").clone();
    assert_eq!(chunk.len(), 3);
    assert_eq!(chunk[0]["type"], "m.room.create");
    assert_eq!(chunk[1]["type"], "m.room.member");
    // The default limit is 10.
    let page = messages(app, a, &room, "dir=b").await;
    assert_eq!(page.expect_ok()["chunk"].as_array().map(Vec::len), Some(10));

    // Forwards from the start, then on from `end`.
    let page = messages(app, a, &room, &format!("dir=f&limit=5&{only_messages}")).await;
    assert_eq!(bodies(&page), names("m", 0..5));
    let end = page.json["end"].as_str().expect("end").to_owned();
    let page = messages(
        app,
        a,
        &room,
        &format!("dir=f&limit=5&from={}&{only_messages}", enc(&end)),
    )
    .await;
    assert_eq!(bodies(&page), names("m", 5..10));

    // `to` bounds the walk: backwards from now to where the first page ended.
    let page = messages(
        app,
        a,
        &room,
        &format!("dir=b&limit=50&to={}&{only_messages}", enc(&first_end)),
    )
    .await;
    assert_eq!(bodies(&page), names("m", (10..15).rev()));

    // Other filters: not_types, senders, not_senders.
    let not_messages = filter_query(&json!({ "not_types": ["m.room.message"] }));
    let page = messages(app, a, &room, &format!("dir=b&limit=4&{not_messages}")).await;
    let chunk = page.expect_ok()["chunk"].as_array().expect("chunk").clone();
    assert_eq!(chunk.len(), 4);
    assert!(
        chunk.iter().all(|e| e["type"] != "m.room.message"),
        "{}",
        page.text
    );
    app.join_room(b, &room).await;
    app.send_text(b, &room, "from bob").await;
    let from_bob = filter_query(&json!({ "senders": [bob.user_id], "types": ["m.room.message"] }));
    let page = messages(app, a, &room, &format!("dir=b&{from_bob}")).await;
    assert_eq!(bodies(&page), vec!["from bob".to_owned()]);
    let not_alice = filter_query(&json!({ "not_senders": [alice.user_id] }));
    let page = messages(app, a, &room, &format!("dir=b&limit=5&{not_alice}")).await;
    let chunk = page.expect_ok()["chunk"].as_array().expect("chunk").clone();
    assert_eq!(chunk.len(), 2, "bob's join and message: {}", page.text);
    assert!(chunk.iter().all(|e| e["sender"] == bob.user_id.as_str()));
    // A glob in types, and the filter's own limit.
    let globbed = filter_query(&json!({ "types": ["m.room.mess*"], "limit": 2 }));
    let page = messages(app, a, &room, &format!("dir=b&{globbed}")).await;
    assert_eq!(bodies(&page), vec!["from bob".to_owned(), "m14".to_owned()]);

    // Malformed queries.
    messages(app, a, &room, "dir=b&filter=notjson")
        .await
        .expect_error(400, "M_BAD_JSON");
    messages(
        app,
        a,
        &room,
        &format!(
            "dir=b&{}",
            filter_query(&json!({ "types": "m.room.message" }))
        ),
    )
    .await
    .expect_error(400, "M_BAD_JSON");
    messages(app, a, &room, "dir=sideways")
        .await
        .expect_error(400, "M_INVALID_PARAM");
    let missing_dir = messages(app, a, &room, "limit=5").await;
    assert_eq!(missing_dir.status, 400, "{}", missing_dir.text);
    messages(app, a, &room, "dir=b&limit=many")
        .await
        .expect_error(400, "M_INVALID_PARAM");
    messages(app, a, &room, "dir=b&limit=-1")
        .await
        .expect_error(400, "M_INVALID_PARAM");
    messages(app, a, &room, "dir=b&from=garbage")
        .await
        .expect_error(400, "M_INVALID_PARAM");

    // Context around m7: two before (newest first), two after, the state, and tokens that
    // go on paginating from either side.
    let path = app.room_path(&room, &format!("/context/{}?limit=4", enc(&ids[7])));
    let context = app.get(&path, Some(a)).await;
    let context = context.expect_ok();
    assert_eq!(context["event"]["event_id"], ids[7].as_str());
    assert_eq!(context["event"]["content"]["body"], "m7");
    let body_of = |e: &Value| e["content"]["body"].as_str().unwrap_or_default().to_owned();
    let before: Vec<String> = context["events_before"]
        .as_array()
        .expect("before")
        .iter()
        .map(body_of)
        .collect();
    let after: Vec<String> = context["events_after"]
        .as_array()
        .expect("after")
        .iter()
        .map(body_of)
        .collect();
    assert_eq!(before, vec!["m6", "m5"]);
    assert_eq!(after, vec!["m8", "m9"]);
    let state_types: Vec<&str> = context["state"]
        .as_array()
        .expect("state")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default())
        .collect();
    assert!(state_types.contains(&"m.room.create"), "{state_types:?}");
    assert!(
        state_types.contains(&"m.room.power_levels"),
        "{state_types:?}"
    );
    let start = context["start"].as_str().expect("start");
    let end = context["end"].as_str().expect("end");
    let page = messages(
        app,
        a,
        &room,
        &format!("dir=b&limit=2&from={}&{only_messages}", enc(start)),
    )
    .await;
    assert_eq!(bodies(&page), vec!["m4", "m3"]);
    let page = messages(
        app,
        a,
        &room,
        &format!("dir=f&limit=2&from={}&{only_messages}", enc(end)),
    )
    .await;
    assert_eq!(bodies(&page), vec!["m10", "m11"]);
    // At the newest event: nothing after, and `end` still continues forwards.
    let newest = app.send_text(a, &room, "newest").await;
    let path = app.room_path(&room, &format!("/context/{}", enc(&newest)));
    let context = app.get(&path, Some(a)).await;
    let context = context.expect_ok();
    assert_eq!(context["events_after"], json!([]));
    assert_eq!(context["events_before"].as_array().map(Vec::len), Some(5));
    let end = context["end"].as_str().expect("end").to_owned();
    app.send_text(a, &room, "later").await;
    let page = messages(app, a, &room, &format!("dir=f&from={}", enc(&end))).await;
    assert_eq!(bodies(&page), vec!["later"]);
    app.get(&app.room_path(&room, "/context/%24unknown"), Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");

    // timestamp_to_event.
    let ts_path = |ts: i64, dir: &str| {
        format!(
            "/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir={dir}",
            enc(&room)
        )
    };
    let create = state_get(app, a, &room, "m.room.create?format=event").await;
    let create_id = create.expect_ok()["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned();
    let found = app.get(&ts_path(0, "f"), Some(a)).await;
    assert_eq!(found.expect_ok()["event_id"], create_id.as_str());
    let found = app
        .get(&ts_path(i64::from(i32::MAX) * 1_000_000, "b"), Some(a))
        .await;
    let found = found.expect_ok();
    let last = app
        .get(
            &app.room_path(
                &room,
                &format!("/event/{}", enc(found["event_id"].as_str().expect("id"))),
            ),
            Some(a),
        )
        .await;
    assert_eq!(last.expect_ok()["content"]["body"], "later");
    let m7 = app
        .get(
            &app.room_path(&room, &format!("/event/{}", enc(&ids[7]))),
            Some(a),
        )
        .await;
    let m7_ts = m7.expect_ok()["origin_server_ts"].as_i64().expect("ts");
    for dir in ["f", "b"] {
        let found = app.get(&ts_path(m7_ts, dir), Some(a)).await;
        assert_eq!(
            found.expect_ok()["origin_server_ts"],
            m7_ts,
            "{dir}: {}",
            found.text
        );
    }
    app.get(&ts_path(i64::from(i32::MAX) * 1_000_000, "f"), Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.get(&ts_path(0, "x"), Some(a))
        .await
        .expect_error(400, "M_INVALID_PARAM");
    let carol = app.register("carol", "pw").await;
    app.get(&ts_path(0, "f"), Some(&carol.access_token))
        .await
        .expect_error(403, "M_FORBIDDEN");
}

async fn membership(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let carol = app.register("carol", "pw").await;
    let (a, b, c) = (
        alice.access_token.as_str(),
        bob.access_token.as_str(),
        carol.access_token.as_str(),
    );
    let joined_rooms = async |token: &str| {
        let resp = app
            .get("/_matrix/client/v3/joined_rooms", Some(token))
            .await;
        let mut rooms = strings(&resp.expect_ok()["joined_rooms"]);
        rooms.sort();
        rooms
    };
    let post = async |token: &str, room: &str, action: &str, body: Value| {
        app.post(
            &app.room_path(room, &format!("/{action}")),
            Some(token),
            body,
        )
        .await
    };

    // A private room: joining needs an invite.
    let private = app
        .create_room(a, json!({ "preset": "private_chat", "name": "Secret" }))
        .await;
    assert_eq!(joined_rooms(a).await, vec![private.clone()]);
    assert_eq!(joined_rooms(b).await, Vec::<String>::new());
    post(b, &private, "join", json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    // Not a member: no sending, no reading.
    let path = app.room_path(&private, &format!("/send/m.room.message/{}", next_txn_id()));
    app.put(&path, Some(c), json!({ "msgtype": "m.text", "body": "hi" }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.get(&app.room_path(&private, "/members"), Some(c))
        .await
        .expect_error(403, "M_FORBIDDEN");
    messages(app, c, &private, "dir=b")
        .await
        .expect_error(403, "M_FORBIDDEN");

    post(
        a,
        &private,
        "invite",
        json!({ "user_id": bob.user_id, "reason": "welcome" }),
    )
    .await
    .expect_ok();
    let invite = state_get(
        app,
        a,
        &private,
        &format!("m.room.member/{}", enc(&bob.user_id)),
    )
    .await;
    let invite = invite.expect_ok();
    assert_eq!(invite["membership"], "invite");
    assert_eq!(invite["reason"], "welcome");
    assert_eq!(joined_rooms(b).await, Vec::<String>::new());
    let joined = post(b, &private, "join", json!({ "reason": "thanks" })).await;
    assert_eq!(joined.expect_ok()["room_id"], private.as_str());
    assert_eq!(joined_rooms(b).await, vec![private.clone()]);
    // Inviting someone already there.
    post(a, &private, "invite", json!({ "user_id": bob.user_id }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    post(a, &private, "invite", json!({}))
        .await
        .expect_error(400, "M_BAD_JSON");

    // Who is in the room.
    let members = app.get(&app.room_path(&private, "/members"), Some(b)).await;
    let chunk = members.expect_ok()["chunk"]
        .as_array()
        .expect("chunk")
        .clone();
    let mut users: Vec<(String, String)> = chunk
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "m.room.member");
            (
                e["state_key"].as_str().unwrap_or_default().to_owned(),
                e["content"]["membership"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    users.sort();
    assert_eq!(
        users,
        vec![
            (alice.user_id.clone(), "join".to_owned()),
            (bob.user_id.clone(), "join".to_owned())
        ]
    );
    post(a, &private, "invite", json!({ "user_id": carol.user_id }))
        .await
        .expect_ok();
    let invited = app
        .get(
            &app.room_path(&private, "/members?membership=invite"),
            Some(a),
        )
        .await;
    let chunk = invited.expect_ok()["chunk"]
        .as_array()
        .expect("chunk")
        .clone();
    assert_eq!(chunk.len(), 1);
    assert_eq!(chunk[0]["state_key"], carol.user_id.as_str());
    let not_joined = app
        .get(
            &app.room_path(&private, "/members?not_membership=join"),
            Some(a),
        )
        .await;
    assert_eq!(
        not_joined.expect_ok()["chunk"].as_array().map(Vec::len),
        Some(1)
    );
    app.get(
        &app.room_path(&private, "/members?membership=lurking"),
        Some(a),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    let joined_members = app
        .get(&app.room_path(&private, "/joined_members"), Some(a))
        .await;
    let joined = &joined_members.expect_ok()["joined"];
    assert_eq!(joined.as_object().map(|m| m.len()), Some(2), "{joined}");
    assert_eq!(joined[alice.user_id.as_str()]["display_name"], "alice");
    assert_eq!(joined[bob.user_id.as_str()]["display_name"], "bob");
    // Carol, only invited, may not list the joined members.
    app.get(&app.room_path(&private, "/joined_members"), Some(c))
        .await
        .expect_error(403, "M_FORBIDDEN");
    // Carol rejects the invite.
    post(c, &private, "leave", json!({})).await.expect_ok();
    let rejected = state_get(
        app,
        a,
        &private,
        &format!("m.room.member/{}", enc(&carol.user_id)),
    )
    .await;
    assert_eq!(rejected.expect_ok()["membership"], "leave");

    // Without power, no kicking and no banning.
    post(b, &private, "kick", json!({ "user_id": alice.user_id }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    post(b, &private, "ban", json!({ "user_id": alice.user_id }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    post(b, &private, "kick", json!({ "user_id": carol.user_id }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    // The creator kicks bob, who cannot come back uninvited.
    post(
        a,
        &private,
        "kick",
        json!({ "user_id": bob.user_id, "reason": "bye" }),
    )
    .await
    .expect_ok();
    let kicked = state_get(
        app,
        a,
        &private,
        &format!("m.room.member/{}", enc(&bob.user_id)),
    )
    .await;
    let kicked = kicked.expect_ok();
    assert_eq!(kicked["membership"], "leave");
    assert_eq!(kicked["reason"], "bye");
    assert_eq!(joined_rooms(b).await, Vec::<String>::new());
    post(b, &private, "join", json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");

    // A public room joined by alias; bans keep a user out until unbanned.
    let public = app
        .create_room(
            a,
            json!({ "preset": "public_chat", "room_alias_name": "town" }),
        )
        .await;
    assert_eq!(app.join_room(c, "#town:test.local").await, public);
    post(
        a,
        &public,
        "ban",
        json!({ "user_id": carol.user_id, "reason": "spam" }),
    )
    .await
    .expect_ok();
    let banned = state_get(
        app,
        a,
        &public,
        &format!("m.room.member/{}", enc(&carol.user_id)),
    )
    .await;
    assert_eq!(banned.expect_ok()["membership"], "ban");
    app.join_resp(c, &public)
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.join_resp(c, "#town:test.local")
        .await
        .expect_error(403, "M_FORBIDDEN");
    post(b, &public, "unban", json!({ "user_id": carol.user_id }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    post(a, &public, "unban", json!({ "user_id": carol.user_id }))
        .await
        .expect_ok();
    post(a, &public, "unban", json!({ "user_id": carol.user_id }))
        .await
        .expect_error(403, "M_FORBIDDEN");
    assert_eq!(app.join_room(c, &public).await, public);

    // Leaving, then forgetting. A former member reads up to their leave and no further.
    let bob_public = post(b, &public, "join", json!({})).await;
    assert_eq!(bob_public.expect_ok()["room_id"], public.as_str());
    app.send_text(a, &public, "while bob is here").await;
    post(b, &public, "forget", json!({}))
        .await
        .expect_error(400, "M_UNKNOWN");
    post(b, &public, "leave", json!({ "reason": "gone" }))
        .await
        .expect_ok();
    app.send_text(a, &public, "after bob left").await;
    assert!(!joined_rooms(b).await.contains(&public));
    let only_messages = filter_query(&json!({ "types": ["m.room.message"] }));
    let page = messages(app, b, &public, &format!("dir=b&{only_messages}")).await;
    assert_eq!(bodies(&page), vec!["while bob is here"]);
    let path = app.room_path(&public, &format!("/send/m.room.message/{}", next_txn_id()));
    app.put(
        &path,
        Some(b),
        json!({ "msgtype": "m.text", "body": "ghost" }),
    )
    .await
    .expect_error(403, "M_FORBIDDEN");
    // Leaving again changes nothing.
    post(b, &public, "leave", json!({})).await.expect_ok();
    post(b, &public, "forget", json!({})).await.expect_ok();
    // Forgetting a room one was never in.
    let never = app.create_room(a, json!({})).await;
    post(b, &never, "forget", json!({}))
        .await
        .expect_error(404, "M_NOT_FOUND");
    // Leaving a room one is not in.
    post(b, &never, "leave", json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");

    // Knocking on a room whose join rule is `knock`, and being let in.
    let knockable = app
        .create_room(
            a,
            json!({
                "preset": "private_chat",
                "initial_state": [
                    { "type": "m.room.join_rules", "content": { "join_rule": "knock" } }
                ],
            }),
        )
        .await;
    let knock = app
        .post(
            &format!("/_matrix/client/v3/knock/{}", enc(&knockable)),
            Some(b),
            json!({ "reason": "let me in" }),
        )
        .await;
    assert_eq!(knock.expect_ok()["room_id"], knockable.as_str());
    let knocking = app
        .get(
            &app.room_path(&knockable, "/members?membership=knock"),
            Some(a),
        )
        .await;
    let chunk = knocking.expect_ok()["chunk"]
        .as_array()
        .expect("chunk")
        .clone();
    assert_eq!(chunk.len(), 1);
    assert_eq!(chunk[0]["state_key"], bob.user_id.as_str());
    assert_eq!(chunk[0]["content"]["reason"], "let me in");
    post(a, &knockable, "invite", json!({ "user_id": bob.user_id }))
        .await
        .expect_ok();
    assert_eq!(app.join_room(b, &knockable).await, knockable);
    // Knocking on a public room is not how one gets in.
    app.post(
        &format!("/_matrix/client/v3/knock/{}", enc(&public)),
        Some(c),
        json!({}),
    )
    .await
    .expect_error(403, "M_FORBIDDEN");
}

async fn history_visibility(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let only_messages = filter_query(&json!({ "types": ["m.room.message"] }));

    // `joined`: a new member sees nothing from before they joined.
    let room = app.create_room(a, json!({ "preset": "public_chat" })).await;
    let put = app
        .put(
            &app.room_path(&room, "/state/m.room.history_visibility/"),
            Some(a),
            json!({ "history_visibility": "joined" }),
        )
        .await;
    put.expect_ok();
    let secret = app.send_text(a, &room, "before bob").await;
    app.join_room(b, &room).await;
    app.send_text(a, &room, "after bob").await;
    let page = messages(app, b, &room, &format!("dir=b&{only_messages}")).await;
    assert_eq!(bodies(&page), vec!["after bob"]);
    let page = messages(app, a, &room, &format!("dir=b&{only_messages}")).await;
    assert_eq!(bodies(&page), vec!["after bob", "before bob"]);
    let hidden = app.room_path(&room, &format!("/event/{}", enc(&secret)));
    app.get(&hidden, Some(b))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.get(&hidden, Some(a)).await.expect_ok();
    let context = app.room_path(&room, &format!("/context/{}", enc(&secret)));
    app.get(&context, Some(b))
        .await
        .expect_error(404, "M_NOT_FOUND");

    // `shared` (the default): members see the whole history.
    let shared = app.create_room(a, json!({ "preset": "public_chat" })).await;
    app.send_text(a, &shared, "early").await;
    app.join_room(b, &shared).await;
    let page = messages(app, b, &shared, &format!("dir=b&{only_messages}")).await;
    assert_eq!(bodies(&page), vec!["early"]);

    // `world_readable`: anyone may read without joining; others may not.
    let carol = app.register("carol", "pw").await;
    let readable = app
        .create_room(
            a,
            json!({
                "preset": "public_chat",
                "initial_state": [{
                    "type": "m.room.history_visibility",
                    "content": { "history_visibility": "world_readable" },
                }],
            }),
        )
        .await;
    app.send_text(a, &readable, "for everyone").await;
    let page = messages(
        app,
        &carol.access_token,
        &readable,
        &format!("dir=b&{only_messages}"),
    )
    .await;
    assert_eq!(bodies(&page), vec!["for everyone"]);
    messages(app, &carol.access_token, &shared, "dir=b")
        .await
        .expect_error(403, "M_FORBIDDEN");
}

async fn redactions(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let room = app.create_room(a, json!({ "preset": "public_chat" })).await;
    app.join_room(b, &room).await;
    let bobs = app.send_text(b, &room, "oops").await;
    let alices = app.send_text(a, &room, "mine").await;
    let bobs_second = app.send_text(b, &room, "spam").await;
    let redact_path =
        |event: &str, txn: &str| app.room_path(&room, &format!("/redact/{}/{txn}", enc(event)));

    // Bob redacts his own event; a retry gives the same redaction.
    let txn = next_txn_id();
    let first = app
        .put(
            &redact_path(&bobs, &txn),
            Some(b),
            json!({ "reason": "typo" }),
        )
        .await;
    let redaction = first.expect_ok()["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned();
    let again = app
        .put(
            &redact_path(&bobs, &txn),
            Some(b),
            json!({ "reason": "typo" }),
        )
        .await;
    assert_eq!(again.expect_ok()["event_id"], redaction.as_str());
    let event = app
        .get(
            &app.room_path(&room, &format!("/event/{}", enc(&bobs))),
            Some(a),
        )
        .await;
    let event = event.expect_ok();
    assert_eq!(event["content"], json!({}), "{event}");
    assert_eq!(
        event["unsigned"]["redacted_because"]["event_id"],
        redaction.as_str()
    );
    let redaction_event = app
        .get(
            &app.room_path(&room, &format!("/event/{}", enc(&redaction))),
            Some(a),
        )
        .await;
    let redaction_event = redaction_event.expect_ok();
    assert_eq!(redaction_event["type"], "m.room.redaction");
    assert_eq!(redaction_event["content"]["reason"], "typo");
    assert_eq!(redaction_event["content"]["redacts"], bobs.as_str());

    // Not someone else's without power; the creator may.
    app.put(&redact_path(&alices, &next_txn_id()), Some(b), json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(
        &redact_path(&bobs_second, &next_txn_id()),
        Some(a),
        json!({}),
    )
    .await
    .expect_ok();
    let event = app
        .get(
            &app.room_path(&room, &format!("/event/{}", enc(&bobs_second))),
            Some(b),
        )
        .await;
    assert_eq!(event.expect_ok()["content"], json!({}));
    // No body at all is fine; unknown events are 404.
    let no_body = app
        .request(
            reqwest::Method::PUT,
            &redact_path(&alices, &next_txn_id()),
            Some(a),
            None,
        )
        .await;
    no_body.expect_ok();
    app.put(&redact_path("$unknown", &next_txn_id()), Some(a), json!({}))
        .await
        .expect_error(404, "M_NOT_FOUND");
}

async fn aliases(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let room = app
        .create_room(
            a,
            json!({ "preset": "public_chat", "room_alias_name": "main" }),
        )
        .await;
    let directory = |alias: &str| format!("/_matrix/client/v3/directory/room/{}", enc(alias));
    let extra = "#extra:test.local";

    app.put(&directory(extra), Some(a), json!({ "room_id": room }))
        .await
        .expect_ok();
    // Resolving needs no token.
    let resolved = app.get(&directory(extra), None).await;
    let resolved = resolved.expect_ok();
    assert_eq!(resolved["room_id"], room.as_str());
    assert_eq!(resolved["servers"], json!(["test.local"]));
    app.get(&directory("#missing:test.local"), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    // Taken already.
    app.put(&directory(extra), Some(a), json!({ "room_id": room }))
        .await
        .expect_error(409, "M_UNKNOWN");
    app.put(
        &directory("#main:test.local"),
        Some(a),
        json!({ "room_id": room }),
    )
    .await
    .expect_error(409, "M_UNKNOWN");
    // Not on this server, not an alias, not a member.
    app.put(
        &directory("#x:elsewhere.example"),
        Some(a),
        json!({ "room_id": room }),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    app.put(&directory("nohash"), Some(a), json!({ "room_id": room }))
        .await
        .expect_error(400, "M_INVALID_PARAM");
    app.put(
        &directory("#bobs:test.local"),
        Some(b),
        json!({ "room_id": room }),
    )
    .await
    .expect_error(403, "M_FORBIDDEN");
    app.put(
        &directory("#tok:test.local"),
        None,
        json!({ "room_id": room }),
    )
    .await
    .expect_error(401, "M_MISSING_TOKEN");

    // Listing: members only.
    let list = app.get(&app.room_path(&room, "/aliases"), Some(a)).await;
    let mut listed = strings(&list.expect_ok()["aliases"]);
    listed.sort();
    assert_eq!(
        listed,
        vec![extra.to_owned(), "#main:test.local".to_owned()]
    );
    app.get(&app.room_path(&room, "/aliases"), Some(b))
        .await
        .expect_error(403, "M_FORBIDDEN");

    // Joining by the new alias, then deleting: not bob's to delete, alice's to delete.
    assert_eq!(app.join_room(b, extra).await, room);
    app.delete(&directory(extra), Some(b), None)
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.delete(&directory(extra), Some(a), None)
        .await
        .expect_ok();
    app.get(&directory(extra), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.delete(&directory(extra), Some(a), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.join_resp(b, extra)
        .await
        .expect_error(404, "M_NOT_FOUND");
    let list = app.get(&app.room_path(&room, "/aliases"), Some(b)).await;
    assert_eq!(
        strings(&list.expect_ok()["aliases"]),
        vec!["#main:test.local"]
    );
    // Bob's own alias, which he may delete again.
    app.put(
        &directory("#bobs:test.local"),
        Some(b),
        json!({ "room_id": room }),
    )
    .await
    .expect_ok();
    app.delete(&directory("#bobs:test.local"), Some(b), None)
        .await
        .expect_ok();
}

async fn profiles(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let profile = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
    let field = |key: &str| format!("{profile}/{}", enc(key));

    // New accounts are named after their localpart; reading needs no token.
    let got = app.get(&profile, None).await;
    assert_eq!(got.expect_ok(), &json!({ "displayname": "alice" }));
    app.get(&field("avatar_url"), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.get("/_matrix/client/v3/profile/%40nobody%3Atest.local", None)
        .await
        .expect_error(404, "M_NOT_FOUND");

    let room = app.create_room(a, json!({ "preset": "public_chat" })).await;
    let other_room = app.create_room(a, json!({ "preset": "public_chat" })).await;
    app.join_room(b, &room).await;

    // Only alice changes alice's profile.
    app.put(
        &field("displayname"),
        Some(b),
        json!({ "displayname": "Mallory" }),
    )
    .await
    .expect_error(403, "M_FORBIDDEN");
    app.delete(&field("displayname"), Some(b), None)
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(
        &field("displayname"),
        None,
        json!({ "displayname": "Nobody" }),
    )
    .await
    .expect_error(401, "M_MISSING_TOKEN");
    app.put(
        &field("displayname"),
        Some(a),
        json!({ "avatar_url": "mxc://x/y" }),
    )
    .await
    .expect_error(400, "M_MISSING_PARAM");
    app.put(&field("displayname"), Some(a), json!({ "displayname": 7 }))
        .await
        .expect_error(400, "M_BAD_JSON");

    app.put(
        &field("displayname"),
        Some(a),
        json!({ "displayname": "Alice W" }),
    )
    .await
    .expect_ok();
    app.put(
        &field("avatar_url"),
        Some(a),
        json!({ "avatar_url": "mxc://test.local/abc" }),
    )
    .await
    .expect_ok();
    let got = app.get(&field("displayname"), None).await;
    assert_eq!(got.expect_ok(), &json!({ "displayname": "Alice W" }));
    let got = app.get(&profile, Some(b)).await;
    assert_eq!(
        got.expect_ok(),
        &json!({ "displayname": "Alice W", "avatar_url": "mxc://test.local/abc" })
    );

    // Announced in every joined room, as a new member event.
    for room in [&room, &other_room] {
        let member = state_get(
            app,
            b,
            room,
            &format!("m.room.member/{}", enc(&alice.user_id)),
        )
        .await;
        if room == &other_room {
            // Bob is not in that one; alice reads it.
            member.expect_error(403, "M_FORBIDDEN");
            let member = state_get(
                app,
                a,
                room,
                &format!("m.room.member/{}", enc(&alice.user_id)),
            )
            .await;
            assert_eq!(member.expect_ok()["displayname"], "Alice W");
            continue;
        }
        let member = member.expect_ok();
        assert_eq!(member["membership"], "join");
        assert_eq!(member["displayname"], "Alice W");
        assert_eq!(member["avatar_url"], "mxc://test.local/abc");
    }
    let joined = app
        .get(&app.room_path(&room, "/joined_members"), Some(b))
        .await;
    let me = &joined.expect_ok()["joined"][alice.user_id.as_str()];
    assert_eq!(me["display_name"], "Alice W");
    assert_eq!(me["avatar_url"], "mxc://test.local/abc");

    // Custom fields, and deleting.
    app.put(
        &field("org.example.pet"),
        Some(a),
        json!({ "org.example.pet": { "name": "Rex" } }),
    )
    .await
    .expect_ok();
    app.put(&field("m.tz"), Some(a), json!({ "m.tz": "Europe/Paris" }))
        .await
        .expect_ok();
    let got = app.get(&profile, None).await;
    let got = got.expect_ok();
    assert_eq!(got["org.example.pet"]["name"], "Rex");
    assert_eq!(got["m.tz"], "Europe/Paris");
    app.delete(&field("org.example.pet"), Some(a), None)
        .await
        .expect_ok();
    app.get(&field("org.example.pet"), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.delete(&field("avatar_url"), Some(a), None)
        .await
        .expect_ok();
    app.get(&field("avatar_url"), None)
        .await
        .expect_error(404, "M_NOT_FOUND");
    let member = state_get(
        app,
        b,
        &room,
        &format!("m.room.member/{}", enc(&alice.user_id)),
    )
    .await;
    let member = member.expect_ok();
    assert_eq!(member["displayname"], "Alice W");
    assert!(member.get("avatar_url").is_none(), "{member}");
}

// ---------------------------------------------------------------------------------------------
// The room endpoints against ruma: requests built by ruma, answers parsed by ruma.

/// The Matrix error of a failed request, parsed by ruma: (status, kind).
#[track_caller]
fn failure<R>(resp: &http::Response<Vec<u8>>) -> (u16, ErrorKind)
where
    R: IncomingResponseExt<EndpointError = ruma::api::error::Error> + std::fmt::Debug,
{
    match parse::<R>(resp) {
        Err(FromHttpResponseError::Server(error)) => {
            let kind = error
                .error_kind()
                .cloned()
                .unwrap_or_else(|| panic!("not a Matrix error: {}", describe(resp)));
            (error.status_code.as_u16(), kind)
        }
        other => panic!("expected an error, got {other:?} from {}", describe(resp)),
    }
}

/// Builds the HTTP request with ruma (paths chosen from the server's versions, the token sent
/// when ruma thinks the endpoint needs one) and sends it.
macro_rules! call {
    ($app:expr, $versions:expr, $token:expr, $request:expr) => {{
        let request = $request
            .try_into_http_request::<Vec<u8>>(
                &$app.base_url,
                SendAccessToken::IfRequired($token),
                $versions.clone(),
            )
            .expect("request");
        exchange($app, request).await
    }};
}

/// Every event of a list, deserialized by ruma (a panic shows the one it cannot read).
macro_rules! deserialize_all {
    ($events:expr) => {
        $events
            .iter()
            .map(|raw| {
                raw.deserialize()
                    .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", raw.json().get()))
            })
            .collect::<Vec<_>>()
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_round_trip_of_room_endpoints() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let bob = app.register("bob", "pw").await;
        let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
        let alice_id = ruma::UserId::parse(alice.user_id.as_str()).expect("user id");
        let bob_id = ruma::UserId::parse(bob.user_id.as_str()).expect("user id");

        let req = get_supported_versions::Request::new()
            .try_into_http_request::<Vec<u8>>(&app.base_url, SendAccessToken::None, ())
            .expect("request");
        let versions: get_supported_versions::Response = ok(&exchange(app, req).await);
        let supported =
            SupportedVersions::from_parts(&versions.versions, &versions.unstable_features);
        let v = Cow::Borrowed(&supported);

        // Creating, sending, state.
        let mut create = create_room::v3::Request::new();
        create.name = Some("Ruma room".to_owned());
        create.topic = Some("typed".to_owned());
        create.preset = Some(create_room::v3::RoomPreset::PublicChat);
        create.visibility = Visibility::Public;
        create.room_alias_name = Some("typed".to_owned());
        let created: create_room::v3::Response = ok(&call!(app, v, a, create));
        let room_id = created.room_id;

        let content = RoomMessageEventContent::text_plain("hello ruma");
        let txn = TransactionId::new();
        let send = || {
            send_message_event::v3::Request::new(room_id.clone(), txn.clone(), &content)
                .expect("request")
        };
        let sent: send_message_event::v3::Response = ok(&call!(app, v, a, send()));
        let again: send_message_event::v3::Response = ok(&call!(app, v, a, send()));
        assert_eq!(sent.event_id, again.event_id);

        let topic = RoomTopicEventContent::new("retyped".to_owned());
        let req = send_state_event::v3::Request::new(
            room_id.clone(),
            &ruma::events::EmptyStateKey,
            &topic,
        )
        .expect("request");
        let _: send_state_event::v3::Response = ok(&call!(app, v, a, req));
        let req = get_state_event_for_key::v3::Request::new(
            room_id.clone(),
            StateEventType::RoomTopic,
            String::new(),
        );
        let got: get_state_event_for_key::v3::Response = ok(&call!(app, v, a, req));
        let got: Value = serde_json::from_str(got.event_or_content.get()).expect("json");
        assert_eq!(got["topic"], "retyped");
        let req = get_state_events::v3::Request::new(room_id.clone());
        let state: get_state_events::v3::Response = ok(&call!(app, v, a, req));
        assert!(deserialize_all!(state.room_state).len() >= 8);

        // Reading.
        let req = get_room_event::v3::Request::new(room_id.clone(), sent.event_id.clone());
        let event: get_room_event::v3::Response = ok(&call!(app, v, a, req));
        let event = event.event.deserialize().expect("timeline event");
        assert!(
            matches!(event, AnyTimelineEvent::MessageLike(_)),
            "{event:?}"
        );
        for _ in 0..4 {
            let content = RoomMessageEventContent::text_plain("more");
            let req = send_message_event::v3::Request::new(
                room_id.clone(),
                TransactionId::new(),
                &content,
            )
            .expect("request");
            let _: send_message_event::v3::Response = ok(&call!(app, v, a, req));
        }
        let mut req = get_message_events::v3::Request::backward(room_id.clone());
        req.limit = UInt::from(3u32);
        let mut filter = RoomEventFilter::default();
        filter.types = Some(vec!["m.room.message".to_owned()]);
        req.filter = filter.clone();
        let page: get_message_events::v3::Response = ok(&call!(app, v, a, req));
        assert_eq!(deserialize_all!(page.chunk).len(), 3);
        let mut req = get_message_events::v3::Request::backward(room_id.clone());
        req.from = page.end.clone();
        req.filter = filter;
        let page: get_message_events::v3::Response = ok(&call!(app, v, a, req));
        assert_eq!(deserialize_all!(page.chunk).len(), 2);
        let req = get_message_events::v3::Request::forward(room_id.clone());
        let page: get_message_events::v3::Response = ok(&call!(app, v, a, req));
        assert_eq!(deserialize_all!(page.chunk).len(), 10);

        let mut req = get_context::v3::Request::new(room_id.clone(), sent.event_id.clone());
        req.limit = UInt::from(4u32);
        let context: get_context::v3::Response = ok(&call!(app, v, a, req));
        assert!(context.event.is_some());
        assert_eq!(deserialize_all!(context.events_before).len(), 2);
        assert_eq!(deserialize_all!(context.events_after).len(), 2);
        assert!(!deserialize_all!(context.state).is_empty());
        assert!(context.start.is_some() && context.end.is_some());

        let req = get_event_by_timestamp::v1::Request::new(
            room_id.clone(),
            MilliSecondsSinceUnixEpoch(UInt::MIN),
            Direction::Forward,
        );
        let found: get_event_by_timestamp::v1::Response = ok(&call!(app, v, a, req));
        assert!(found.origin_server_ts.get() > UInt::MIN);

        let req = redact_event::v3::Request::new(
            room_id.clone(),
            sent.event_id.clone(),
            TransactionId::new(),
        );
        let _: redact_event::v3::Response = ok(&call!(app, v, a, req));

        // Membership.
        let alias: OwnedRoomAliasId = "#typed:test.local".try_into().expect("alias");
        let req =
            join_room_by_id_or_alias::v3::Request::new(OwnedRoomOrAliasId::from(alias.clone()));
        let joined: join_room_by_id_or_alias::v3::Response = ok(&call!(app, v, b, req));
        assert_eq!(joined.room_id, room_id);
        let req = joined_rooms::v3::Request::new();
        let rooms: joined_rooms::v3::Response = ok(&call!(app, v, b, req));
        assert_eq!(rooms.joined_rooms, vec![room_id.clone()]);
        let req = get_member_events::v3::Request::new(room_id.clone());
        let members: get_member_events::v3::Response = ok(&call!(app, v, a, req));
        assert_eq!(deserialize_all!(members.chunk).len(), 2);
        let req = joined_members::v3::Request::new(room_id.clone());
        let joined: joined_members::v3::Response = ok(&call!(app, v, a, req));
        assert_eq!(
            joined
                .joined
                .get(&bob_id)
                .and_then(|m| m.display_name.as_deref()),
            Some("bob")
        );

        let req = kick_user::v3::Request::new(room_id.clone(), alice_id.clone());
        let (status, kind) = failure::<kick_user::v3::Response>(&call!(app, v, b, req));
        assert_eq!((status, kind), (403, ErrorKind::Forbidden));
        let req = kick_user::v3::Request::new(room_id.clone(), bob_id.clone());
        let _: kick_user::v3::Response = ok(&call!(app, v, a, req));
        let req = join_room_by_id::v3::Request::new(room_id.clone());
        let _: join_room_by_id::v3::Response = ok(&call!(app, v, b, req));
        let req = ban_user::v3::Request::new(room_id.clone(), bob_id.clone());
        let _: ban_user::v3::Response = ok(&call!(app, v, a, req));
        let req = join_room_by_id::v3::Request::new(room_id.clone());
        let (status, kind) = failure::<join_room_by_id::v3::Response>(&call!(app, v, b, req));
        assert_eq!((status, kind), (403, ErrorKind::Forbidden));
        let req = unban_user::v3::Request::new(room_id.clone(), bob_id.clone());
        let _: unban_user::v3::Response = ok(&call!(app, v, a, req));
        let req = forget_room::v3::Request::new(room_id.clone());
        let _: forget_room::v3::Response = ok(&call!(app, v, b, req));

        let private = app
            .create_room(a, json!({ "preset": "private_chat" }))
            .await;
        let private_id = ruma::RoomId::parse(private.as_str()).expect("room id");
        let req = invite_user::v3::Request::new(
            private_id.clone(),
            invite_user::v3::InviteUserId::new(bob_id.clone()).into(),
        );
        let _: invite_user::v3::Response = ok(&call!(app, v, a, req));
        let req = leave_room::v3::Request::new(private_id.clone());
        let _: leave_room::v3::Response = ok(&call!(app, v, b, req));
        let req = knock_room::v3::Request::new(OwnedRoomOrAliasId::from(private_id.clone()));
        let (status, kind) = failure::<knock_room::v3::Response>(&call!(app, v, b, req));
        assert_eq!((status, kind), (403, ErrorKind::Forbidden));

        // Aliases.
        let extra: OwnedRoomAliasId = "#typed2:test.local".try_into().expect("alias");
        let req = create_alias::v3::Request::new(extra.clone(), room_id.clone());
        let _: create_alias::v3::Response = ok(&call!(app, v, a, req));
        let req = create_alias::v3::Request::new(extra.clone(), room_id.clone());
        let (status, kind) = failure::<create_alias::v3::Response>(&call!(app, v, a, req));
        assert_eq!(status, 409, "{kind:?}");
        let req = get_alias::v3::Request::new(extra.clone());
        let resolved: get_alias::v3::Response = ok(&call!(app, v, "", req));
        assert_eq!(resolved.room_id, room_id);
        let req = aliases::v3::Request::new(room_id.clone());
        let listed: aliases::v3::Response = ok(&call!(app, v, a, req));
        assert_eq!(listed.aliases.len(), 2);
        let req = delete_alias::v3::Request::new(extra.clone());
        let _: delete_alias::v3::Response = ok(&call!(app, v, a, req));
        let req = get_alias::v3::Request::new(extra);
        let (status, kind) = failure::<get_alias::v3::Response>(&call!(app, v, "", req));
        assert_eq!((status, kind), (404, ErrorKind::NotFound));

        // Profiles.
        let set =
            |value: ProfileFieldValue| set_profile_field::v3::Request::new(alice_id.clone(), value);
        let name = || ProfileFieldValue::DisplayName("Alice R".to_owned());
        let _: set_profile_field::v3::Response = ok(&call!(app, v, a, set(name())));
        let avatar = ruma::OwnedMxcUri::from("mxc://test.local/avatar");
        let _: set_profile_field::v3::Response = ok(&call!(
            app,
            v,
            a,
            set(ProfileFieldValue::AvatarUrl(avatar.clone()))
        ));
        let _: set_profile_field::v3::Response = ok(&call!(
            app,
            v,
            a,
            set(ProfileFieldValue::TimeZone("Europe/Paris".to_owned()))
        ));
        let req =
            get_profile_field::v3::Request::new(alice_id.clone(), ProfileFieldName::DisplayName);
        let got: get_profile_field::v3::Response = ok(&call!(app, v, "", req));
        assert_eq!(got.value, Some(name()));
        let req = get_profile::v3::Request::new(alice_id.clone());
        let profile: get_profile::v3::Response = ok(&call!(app, v, "", req));
        assert_eq!(
            profile.get("avatar_url"),
            Some(&json!("mxc://test.local/avatar"))
        );
        assert_eq!(profile.get("m.tz"), Some(&json!("Europe/Paris")));
        let req =
            delete_profile_field::v3::Request::new(alice_id.clone(), ProfileFieldName::TimeZone);
        let _: delete_profile_field::v3::Response = ok(&call!(app, v, a, req));
        let req = get_profile_field::v3::Request::new(alice_id.clone(), ProfileFieldName::TimeZone);
        let (status, kind) = failure::<get_profile_field::v3::Response>(&call!(app, v, "", req));
        assert_eq!((status, kind), (404, ErrorKind::NotFound));
        let (status, kind) =
            failure::<set_profile_field::v3::Response>(&call!(app, v, b, set(name())));
        assert_eq!((status, kind), (403, ErrorKind::Forbidden));
    })
    .await;
}

backend_matrix!(create_state_send_http, create_state_send);
backend_matrix!(null_optional_fields_http, null_optional_fields);
backend_matrix!(room_version_3_event_ids_http, room_version_3_event_ids);
backend_matrix!(messages_and_context_http, messages_and_context);
backend_matrix!(membership_http, membership);
backend_matrix!(history_visibility_http, history_visibility);
backend_matrix!(redactions_http, redactions);
backend_matrix!(aliases_http, aliases);
backend_matrix!(profiles_http, profiles);
backend_matrix!(user_directory_http, user_directory);
backend_matrix!(published_room_directory_http, published_room_directory);

/// The published room directory: `/directory/list/room/{roomId}` reads and sets whether a
/// room is listed (members who may set its canonical alias), `/publicRooms` lists the listed
/// rooms with what their state says of them, the most joined first, a page at a time,
/// filtered by a search term and room types.
async fn published_room_directory(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let cooking = app
        .create_room(
            a,
            json!({
                "preset": "public_chat", "visibility": "public", "name": "Cooking Club",
                "topic": "Recipes and more", "room_alias_name": "cooking",
            }),
        )
        .await;
    app.join_room(b, &cooking).await;
    let space = app
        .create_room(
            a,
            json!({
                "preset": "public_chat", "visibility": "public", "name": "Knitting",
                "creation_content": {"type": "m.space"},
            }),
        )
        .await;
    let private = app.create_room(a, json!({"preset": "private_chat"})).await;
    let list = |room_id: &str| format!("/_matrix/client/v3/directory/list/room/{}", enc(room_id));
    let public_rooms = "/_matrix/client/v3/publicRooms";
    let ids = |answer: &Value| -> Vec<String> {
        answer["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .map(|room| room["room_id"].as_str().expect("room_id").to_owned())
            .collect()
    };

    // Visibility, read without a token.
    let visibility = |room_id: &str| {
        let path = list(room_id);
        async move { app.get(&path, None).await.expect_ok()["visibility"].clone() }
    };
    assert_eq!(visibility(&cooking).await, "public");
    assert_eq!(visibility(&private).await, "private");
    app.get(&list("!nowhere:test.local"), None)
        .await
        .expect_error(404, "M_NOT_FOUND");

    // The directory, without a token: the most joined first, with the rooms' state.
    let answer = app.get(public_rooms, None).await.expect_ok().clone();
    assert_eq!(ids(&answer), [cooking.clone(), space.clone()], "{answer}");
    assert_eq!(answer["total_room_count_estimate"], 2);
    assert!(answer.get("next_batch").is_none() && answer.get("prev_batch").is_none());
    let first = &answer["chunk"][0];
    assert_eq!(first["name"], "Cooking Club");
    assert_eq!(first["topic"], "Recipes and more");
    assert_eq!(first["canonical_alias"], "#cooking:test.local");
    assert_eq!(first["join_rule"], "public");
    assert_eq!(first["num_joined_members"], 2);
    assert_eq!(first["world_readable"], false);
    assert_eq!(first["guest_can_join"], false);
    assert!(first.get("room_type").is_none(), "{first}");
    assert_eq!(answer["chunk"][1]["room_type"], "m.space");

    // A page at a time.
    let page = app
        .get(&format!("{public_rooms}?limit=1"), None)
        .await
        .expect_ok()
        .clone();
    assert_eq!(ids(&page), [cooking.as_str()]);
    let next = page["next_batch"].as_str().expect("next_batch");
    let page = app
        .get(&format!("{public_rooms}?limit=1&since={}", enc(next)), None)
        .await
        .expect_ok()
        .clone();
    assert_eq!(ids(&page), [space.as_str()]);
    assert!(page.get("next_batch").is_none(), "{page}");
    let prev = page["prev_batch"].as_str().expect("prev_batch");
    let back = app
        .get(&format!("{public_rooms}?limit=1&since={}", enc(prev)), None)
        .await;
    assert_eq!(ids(back.expect_ok()), [cooking.as_str()]);

    // Filtered.
    let filtered = async |filter: Value| {
        let resp = app
            .post(public_rooms, Some(b), json!({"filter": filter}))
            .await;
        ids(resp.expect_ok())
    };
    assert_eq!(
        filtered(json!({"generic_search_term": "RECIPES"})).await,
        [cooking.as_str()]
    );
    assert_eq!(
        filtered(json!({"generic_search_term": "#cooking"})).await,
        [cooking.as_str()]
    );
    assert!(
        filtered(json!({"generic_search_term": "sailing"}))
            .await
            .is_empty()
    );
    assert_eq!(
        filtered(json!({"room_types": [null]})).await,
        [cooking.as_str()]
    );
    assert_eq!(
        filtered(json!({"room_types": ["m.space"]})).await,
        [space.as_str()]
    );
    assert_eq!(filtered(json!({})).await.len(), 2);
    assert_eq!(
        filtered(json!({"room_types": []})).await.len(),
        2,
        "no filter"
    );
    let nothing = app.get(&format!("{public_rooms}?limit=0"), None).await;
    assert_eq!(ids(nothing.expect_ok()), Vec::<String>::new());
    assert!(
        nothing.expect_ok().get("next_batch").is_none(),
        "{}",
        nothing.text
    );

    // A redacted topic is gone from the directory too.
    let state = app
        .get(&app.room_path(&cooking, "/state"), Some(a))
        .await
        .json;
    let topic_id = state
        .as_array()
        .expect("state")
        .iter()
        .find(|event| event["type"] == "m.room.topic")
        .and_then(|event| event["event_id"].as_str())
        .expect("topic event")
        .to_owned();
    let redact = app.room_path(&cooking, &format!("/redact/{}/r1", enc(&topic_id)));
    app.put(&redact, Some(a), json!({})).await.expect_ok();
    let answer = app.get(public_rooms, None).await.expect_ok().clone();
    assert_eq!(answer["chunk"][0]["room_id"], cooking.as_str());
    assert!(answer["chunk"][0].get("topic").is_none(), "{answer}");
    assert_eq!(answer["chunk"][0]["name"], "Cooking Club");

    // Listing and unlisting: Bob (0) may not; Alice may.
    app.put(&list(&cooking), Some(b), json!({"visibility": "private"}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(&list(&private), Some(b), json!({"visibility": "public"}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(&list(&private), Some(a), json!({}))
        .await
        .expect_ok();
    app.put(&list(&cooking), Some(a), json!({"visibility": "private"}))
        .await
        .expect_ok();
    assert_eq!(visibility(&cooking).await, "private");
    let answer = app.get(public_rooms, None).await.expect_ok().clone();
    let mut listed = ids(&answer);
    listed.sort();
    let mut expected = vec![space.clone(), private.clone()];
    expected.sort();
    assert_eq!(listed, expected);

    // Bad requests.
    app.put(&list(&cooking), Some(a), json!({"visibility": "secret"}))
        .await
        .expect_error(400, "M_INVALID_PARAM");
    app.put(&list("!nowhere:test.local"), Some(a), json!({}))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.put(&list(&cooking), None, json!({}))
        .await
        .expect_error(401, "M_MISSING_TOKEN");
    app.post(public_rooms, None, json!({}))
        .await
        .expect_error(401, "M_MISSING_TOKEN");
    app.get(&format!("{public_rooms}?since=x"), None)
        .await
        .expect_error(400, "M_INVALID_PARAM");
    app.get(&format!("{public_rooms}?limit=-1"), None)
        .await
        .expect_error(400, "M_INVALID_PARAM");
    app.get(&format!("{public_rooms}?server=elsewhere.example"), None)
        .await
        .expect_error(400, "M_INVALID_PARAM");
    app.post(
        public_rooms,
        Some(a),
        json!({"filter": {"room_types": [3]}}),
    )
    .await
    .expect_error(400, "M_BAD_JSON");
    let both = json!({"include_all_networks": true, "third_party_instance_id": "irc"});
    app.post(public_rooms, Some(a), both)
        .await
        .expect_error(400, "M_INVALID_PARAM");
}

/// `POST /user_directory/search`: users sharing a room with the searcher and members of
/// published rooms, found by user id or display name in any case, wildcards taken literally,
/// deactivated accounts left out, `limit` and `limited` honoured.
async fn user_directory(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let carol = app.register("carol", "pw").await;
    let dave = app.register("dave", "pw").await;
    let erin = app.register("erin", "pw").await;
    let a = alice.access_token.as_str();
    // Bob shares a private room with Alice; Carol and Dave are in a published room; Erin is in
    // a private room of her own.
    let private = app
        .create_room(
            a,
            json!({"preset": "private_chat", "invite": [bob.user_id]}),
        )
        .await;
    app.join_room(&bob.access_token, &private).await;
    let published = app
        .create_room(
            &carol.access_token,
            json!({"preset": "public_chat", "visibility": "public"}),
        )
        .await;
    app.join_room(&dave.access_token, &published).await;
    app.create_room(&erin.access_token, json!({"preset": "private_chat"}))
        .await;
    // Frank's room is not published, but anyone may join it; Grace's history is
    // world-readable: the spec has their members found too.
    let frank = app.register("frank", "pw").await;
    let grace = app.register("grace", "pw").await;
    app.create_room(&frank.access_token, json!({"preset": "public_chat"}))
        .await;
    let world_readable = json!({
        "type": "m.room.history_visibility", "state_key": "",
        "content": {"history_visibility": "world_readable"},
    });
    app.create_room(
        &grace.access_token,
        json!({"preset": "private_chat", "initial_state": [world_readable]}),
    )
    .await;
    // Henry's room only looks public to a text search: its join rule is `invite`.
    let henry = app.register("henry", "pw").await;
    let disguised = json!({
        "type": "m.room.join_rules", "state_key": "",
        "content": {"join_rule": "invite", "x": {"join_rule": "public"}},
    });
    app.create_room(
        &henry.access_token,
        json!({"preset": "private_chat", "initial_state": [disguised]}),
    )
    .await;
    app.set_displayname(&bob, "Bobby Tables").await;
    app.set_displayname(&dave, "Dåve_100%").await;

    let path = "/_matrix/client/v3/user_directory/search";
    let search = async |body: Value| {
        let resp = app.post(path, Some(a), body).await;
        let answer = resp.expect_ok();
        let ids: Vec<String> = answer["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|user| user["user_id"].as_str().expect("user_id").to_owned())
            .collect();
        (
            ids,
            answer["limited"].as_bool().expect("limited"),
            answer.clone(),
        )
    };
    let found = async |term: &str| search(json!({"search_term": term})).await.0;

    let (ids, limited, answer) = search(json!({"search_term": "TABLES"})).await;
    assert_eq!((ids, limited), (vec![bob.user_id.clone()], false));
    assert_eq!(
        answer["results"][0]["display_name"], "Bobby Tables",
        "{answer}"
    );
    assert_eq!(found("bob").await, [bob.user_id.as_str()]);
    assert_eq!(
        found("carol").await,
        [carol.user_id.as_str()],
        "in a published room"
    );
    assert!(found("erin").await.is_empty(), "shares no room with Alice");
    assert!(found("henry").await.is_empty(), "in an invite-only room");
    assert_eq!(
        found("frank").await,
        [frank.user_id.as_str()],
        "in a public room"
    );
    assert_eq!(
        found("grace").await,
        [grace.user_id.as_str()],
        "in a world-readable room"
    );
    // `%` and `_` are themselves, not wildcards.
    assert_eq!(found("e_1").await, [dave.user_id.as_str()]);
    assert_eq!(found("100%").await, [dave.user_id.as_str()]);
    assert!(found("%").await.len() == 1 && found("_").await.len() == 1);
    assert!(found("b!b").await.is_empty());

    // Everyone Alice may find, in user id order; `limit` cuts and says so.
    let everyone = vec![
        alice.user_id.clone(),
        bob.user_id.clone(),
        carol.user_id.clone(),
        dave.user_id.clone(),
        frank.user_id.clone(),
        grace.user_id.clone(),
    ];
    assert_eq!(search(json!({"search_term": ":"})).await.0, everyone);
    let (ids, limited, _) = search(json!({"search_term": ":", "limit": 2})).await;
    assert_eq!((ids, limited), (everyone[..2].to_vec(), true));
    let (ids, limited, _) = search(json!({"search_term": ":", "limit": 6})).await;
    assert_eq!((ids, limited), (everyone.clone(), false));

    // A deactivated account is no longer found.
    let deactivate = "/_matrix/client/v3/account/deactivate";
    let session = app
        .post(deactivate, Some(&dave.access_token), json!({}))
        .await
        .expect_uia(&[&["m.login.password"]]);
    let auth = json!({"auth": {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "dave"},
        "password": "pw",
        "session": session,
    }});
    app.post(deactivate, Some(&dave.access_token), auth)
        .await
        .expect_ok();
    assert!(found("dave").await.is_empty());

    // Bad requests.
    app.post(path, None, json!({"search_term": "bob"}))
        .await
        .expect_error(401, "M_MISSING_TOKEN");
    app.post(path, Some(a), json!({}))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.post(path, Some(a), json!({"search_term": 3}))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.post(path, Some(a), json!({"search_term": "bob", "limit": -1}))
        .await
        .expect_error(400, "M_INVALID_PARAM");
}
