//! Filters, account data (global and per room) and room tags over HTTP, on every backend with
//! and without Redis: they round-trip, only their owner may use them, `/sync` carries them
//! (whole in an initial sync, exactly what changed in an incremental one), stored filters
//! apply to `/sync`, and a change wakes a long-poll. ruma builds the requests and reads the
//! answers.

use std::{
    borrow::Cow,
    time::{Duration, Instant},
};

use palpo_tests::{
    Backend, Session, TestApp, backend_matrix, enc, long_poll, next_batch,
    ruma_client::{exchange, ok},
    run,
};
use ruma::api::{
    OutgoingRequestExt, SupportedVersions,
    auth_scheme::SendAccessToken,
    client::{
        config::{
            get_global_account_data, get_room_account_data, set_global_account_data,
            set_room_account_data,
        },
        discovery::get_supported_versions,
        filter::{FilterDefinition, create_filter, get_filter},
        sync::sync_events,
        tag::{create_tag, delete_tag, get_tags},
    },
};
use serde_json::{Value, json};

/// `GET /sync` with `since` (none: initial), a timeout in ms and extra query text
/// (`&filter=...`); panics unless 200.
async fn sync_with(
    app: &TestApp,
    token: &str,
    since: Option<&str>,
    timeout_ms: u64,
    extra: &str,
) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}{extra}");
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    app.get(&path, Some(token)).await.expect_ok().clone()
}

async fn sync(app: &TestApp, token: &str, since: Option<&str>) -> Value {
    sync_with(app, token, since, 0, "").await
}

/// `type → content` of a list of account data events (`{"events": [...]}`); panics on a type
/// that comes twice.
fn by_type(section: &Value) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for event in section["events"].as_array().into_iter().flatten() {
        let kind = event["type"]
            .as_str()
            .unwrap_or_else(|| panic!("account data without a type: {event}"));
        let previous = out.insert(kind.to_owned(), event["content"].clone());
        assert!(previous.is_none(), "{kind} twice in {section}");
    }
    out
}

fn global(response: &Value) -> serde_json::Map<String, Value> {
    by_type(&response["account_data"])
}

fn room_data(response: &Value, room_id: &str) -> serde_json::Map<String, Value> {
    by_type(&response["rooms"]["join"][room_id]["account_data"])
}

fn joined(response: &Value) -> Vec<String> {
    response["rooms"]["join"]
        .as_object()
        .map(|j| j.keys().cloned().collect())
        .unwrap_or_default()
}

fn user_path(session: &Session, rest: &str) -> String {
    format!("/_matrix/client/v3/user/{}{rest}", enc(&session.user_id))
}

fn room_data_path(session: &Session, room_id: &str, rest: &str) -> String {
    user_path(session, &format!("/rooms/{}{rest}", enc(room_id)))
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(filters, filters_scenario);

async fn filters_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let path = user_path(&alice, "/filter");
    let definition = json!({
        "room": {"timeline": {"limit": 2}, "state": {"types": ["m.room.*"]}},
        "presence": {"not_types": ["*"]},
        "event_fields": ["type", "content", "sender"],
    });
    let first = app.post(&path, Some(a), definition.clone()).await;
    let first = first.expect_ok()["filter_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no filter_id: {}", first.text))
        .to_owned();
    assert!(!first.is_empty() && !first.starts_with('{'), "{first}");
    let second = app.post(&path, Some(a), json!({})).await.expect_ok()["filter_id"]
        .as_str()
        .expect("filter_id")
        .to_owned();
    assert_ne!(first, second);
    let got = app.get(&format!("{path}/{}", enc(&first)), Some(a)).await;
    assert_eq!(got.expect_ok(), &definition);
    let got = app.get(&format!("{path}/{}", enc(&second)), Some(a)).await;
    assert_eq!(got.expect_ok(), &json!({}));
    app.get(&format!("{path}/nope"), Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");

    // Only Alice may upload or read her filters; Bob's ids are his own.
    app.get(&format!("{path}/{}", enc(&first)), Some(b))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.post(&path, Some(b), json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    let bobs = app
        .post(&user_path(&bob, "/filter"), Some(b), json!({"room": {}}))
        .await
        .expect_ok()["filter_id"]
        .as_str()
        .expect("filter_id")
        .to_owned();
    let got = app
        .get(
            &user_path(&bob, &format!("/filter/{}", enc(&bobs))),
            Some(b),
        )
        .await;
    assert_eq!(got.expect_ok(), &json!({"room": {}}));

    // A filter is a JSON object, and what the server applies must be well-formed.
    app.post(&path, Some(a), json!([1]))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.post(
        &path,
        Some(a),
        json!({"room": {"timeline": {"limit": "x"}}}),
    )
    .await
    .expect_error(400, "M_BAD_JSON");
    app.post(&path, None, json!({}))
        .await
        .expect_error(401, "M_MISSING_TOKEN");

    // A stored filter applies to /sync: two timeline events, limited.
    let room_id = app
        .create_room(a, json!({"preset": "private_chat", "name": "filtered"}))
        .await;
    for n in 0..4 {
        app.send_text(a, &room_id, &format!("m{n}")).await;
    }
    let filtered = sync_with(app, a, None, 0, &format!("&filter={}", enc(&first))).await;
    let timeline = &filtered["rooms"]["join"][&room_id]["timeline"];
    let bodies: Vec<&str> = timeline["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["m2", "m3"], "{filtered}");
    assert_eq!(timeline["limited"], true);
    // The default filter (another stored one) sends more.
    let unfiltered = sync_with(app, a, None, 0, &format!("&filter={}", enc(&second))).await;
    assert!(
        unfiltered["rooms"]["join"][&room_id]["timeline"]["events"]
            .as_array()
            .expect("events")
            .len()
            > 2
    );
    // An unknown id (or another user's) is refused; inline JSON still works.
    for unknown in ["nope", "99"] {
        let resp = app
            .get(
                &format!("/_matrix/client/v3/sync?filter={}", enc(unknown)),
                Some(a),
            )
            .await;
        resp.expect_error(400, "M_INVALID_PARAM");
    }
    let inline = enc(r#"{"room":{"timeline":{"limit":1}}}"#);
    let one = sync_with(app, a, None, 0, &format!("&filter={inline}")).await;
    assert_eq!(
        one["rooms"]["join"][&room_id]["timeline"]["events"]
            .as_array()
            .expect("events")
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(account_data, account_data_scenario);

async fn account_data_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let room_id = app
        .create_room(a, json!({"preset": "private_chat", "name": "data"}))
        .await;
    let quiet_room = app.create_room(a, json!({"preset": "private_chat"})).await;

    let global_path = user_path(&alice, "/account_data/org.example.config");
    let room_path = room_data_path(&alice, &room_id, "/account_data/org.example.room");
    app.get(&global_path, Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");
    app.get(&room_path, Some(a))
        .await
        .expect_error(404, "M_NOT_FOUND");
    assert_eq!(
        app.put(&global_path, Some(a), json!({"theme": "dark", "n": 1}))
            .await
            .expect_ok(),
        &json!({})
    );
    app.put(&room_path, Some(a), json!({"pinned": true}))
        .await
        .expect_ok();
    assert_eq!(
        app.get(&global_path, Some(a)).await.expect_ok(),
        &json!({"theme": "dark", "n": 1})
    );
    assert_eq!(
        app.get(&room_path, Some(a)).await.expect_ok(),
        &json!({"pinned": true})
    );
    // Global and room data of one type are separate.
    app.get(
        &user_path(&alice, "/account_data/org.example.room"),
        Some(a),
    )
    .await
    .expect_error(404, "M_NOT_FOUND");

    // Only Alice reads or writes her data.
    app.get(&global_path, Some(b))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(&global_path, Some(b), json!({"theme": "light"}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.get(&room_path, Some(b))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(&room_path, Some(b), json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    // The content is a JSON object; the room id must be one; server-controlled types refused.
    app.put(&global_path, Some(a), json!([1, 2]))
        .await
        .expect_error(400, "M_BAD_JSON");
    app.put(
        &room_data_path(&alice, "not-a-room", "/account_data/org.example.room"),
        Some(a),
        json!({}),
    )
    .await
    .expect_error(400, "M_INVALID_PARAM");
    app.put(
        &room_data_path(&alice, &room_id, "/account_data/m.fully_read"),
        Some(a),
        json!({"event_id": "$x"}),
    )
    .await
    .expect_error(405, "M_BAD_JSON");
    app.put(
        &user_path(&alice, "/account_data/m.push_rules"),
        Some(a),
        json!({"global": {}}),
    )
    .await
    .expect_error(405, "M_BAD_JSON");

    // An initial sync has all of it.
    let initial = sync(app, a, None).await;
    assert_eq!(
        global(&initial).get("org.example.config"),
        Some(&json!({"theme": "dark", "n": 1})),
        "{initial}"
    );
    assert_eq!(
        room_data(&initial, &room_id).get("org.example.room"),
        Some(&json!({"pinned": true})),
        "{initial}"
    );
    assert!(room_data(&initial, &quiet_room).is_empty());
    // Bob sees none of it: his initial sync has only his (default) push rules.
    let bobs = sync(app, b, None).await;
    let bobs_types: Vec<String> = global(&bobs).keys().cloned().collect();
    assert_eq!(bobs_types, ["m.push_rules"], "{bobs}");
    let mut since = next_batch(&initial);

    // Nothing changed: an incremental sync has no account data, and no rooms.
    let quiet = sync(app, a, Some(&since)).await;
    assert!(global(&quiet).is_empty(), "{quiet}");
    assert!(joined(&quiet).is_empty(), "{quiet}");
    since = next_batch(&quiet);

    // A change is sent once, alone: the other piece of data is not sent again.
    app.put(&global_path, Some(a), json!({"theme": "light"}))
        .await
        .expect_ok();
    let changed = sync(app, a, Some(&since)).await;
    assert_eq!(
        global(&changed),
        json!({"org.example.config": {"theme": "light"}})
            .as_object()
            .cloned()
            .expect("object"),
        "{changed}"
    );
    assert!(joined(&changed).is_empty(), "{changed}");
    since = next_batch(&changed);
    let again = sync(app, a, Some(&since)).await;
    assert!(global(&again).is_empty(), "{again}");

    // A room whose only change is account data is in `join`, with just that.
    app.put(&room_path, Some(a), json!({"pinned": false}))
        .await
        .expect_ok();
    let room_changed = sync(app, a, Some(&since)).await;
    assert_eq!(joined(&room_changed), [room_id.as_str()], "{room_changed}");
    assert_eq!(
        room_data(&room_changed, &room_id),
        json!({"org.example.room": {"pinned": false}})
            .as_object()
            .cloned()
            .expect("object")
    );
    let room = &room_changed["rooms"]["join"][&room_id];
    assert_eq!(room["timeline"]["events"], json!([]), "{room_changed}");
    // The members did not change since the token: the summary is left out (the spec allows
    // it), saving the members' read.
    assert_eq!(room["summary"], json!({}), "{room_changed}");
    assert!(global(&room_changed).is_empty());
    since = next_batch(&room_changed);

    // Data of a room Alice is not in is stored but never synced.
    let bobs_room = app.create_room(b, json!({"preset": "private_chat"})).await;
    app.put(
        &room_data_path(&alice, &bobs_room, "/account_data/org.example.room"),
        Some(a),
        json!({"elsewhere": 1}),
    )
    .await
    .expect_ok();
    let elsewhere = sync(app, a, Some(&since)).await;
    assert!(joined(&elsewhere).is_empty(), "{elsewhere}");
    let initial = sync(app, a, None).await;
    assert!(!joined(&initial).contains(&bobs_room));

    // A message and account data of one room arrive together.
    app.send_text(a, &room_id, "hello").await;
    app.put(&room_path, Some(a), json!({"pinned": 3}))
        .await
        .expect_ok();
    let both = sync(app, a, Some(&next_batch(&elsewhere))).await;
    assert_eq!(
        room_data(&both, &room_id).get("org.example.room"),
        Some(&json!({"pinned": 3}))
    );
    let events = both["rooms"]["join"][&room_id]["timeline"]["events"]
        .as_array()
        .expect("events")
        .len();
    assert_eq!(events, 1, "{both}");
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(tags, tags_scenario);

async fn tags_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let (a, b) = (alice.access_token.as_str(), bob.access_token.as_str());
    let room_id = app.create_room(a, json!({"preset": "public_chat"})).await;
    let tags_path = room_data_path(&alice, &room_id, "/tags");
    assert_eq!(
        app.get(&tags_path, Some(a)).await.expect_ok(),
        &json!({"tags": {}})
    );
    let initial = sync(app, a, None).await;
    let since = next_batch(&initial);

    app.put(
        &format!("{tags_path}/m.favourite"),
        Some(a),
        json!({"order": 0.25}),
    )
    .await
    .expect_ok();
    app.put(&format!("{tags_path}/u.work"), Some(a), json!({}))
        .await
        .expect_ok();
    app.put(
        &format!("{tags_path}/{}", enc("u.ü 🎉")),
        Some(a),
        json!({"order": 1}),
    )
    .await
    .expect_ok();
    assert_eq!(
        app.get(&tags_path, Some(a)).await.expect_ok(),
        &json!({"tags": {"m.favourite": {"order": 0.25}, "u.work": {}, "u.ü 🎉": {"order": 1.0}}})
    );
    // Setting a tag again changes its order.
    app.put(
        &format!("{tags_path}/m.favourite"),
        Some(a),
        json!({"order": 0.5}),
    )
    .await
    .expect_ok();

    // Tags are the room's m.tag account data in /sync.
    let tagged = sync(app, a, Some(&since)).await;
    assert_eq!(joined(&tagged), [room_id.as_str()], "{tagged}");
    assert_eq!(
        room_data(&tagged, &room_id).get("m.tag"),
        Some(
            &json!({"tags": {"m.favourite": {"order": 0.5}, "u.work": {}, "u.ü 🎉": {"order": 1.0}}})
        ),
        "{tagged}"
    );
    let fresh = sync(app, a, None).await;
    assert_eq!(
        room_data(&fresh, &room_id)["m.tag"]["tags"]["m.favourite"],
        json!({"order": 0.5})
    );
    assert_eq!(
        app.get(
            &room_data_path(&alice, &room_id, "/account_data/m.tag"),
            Some(a)
        )
        .await
        .expect_ok()["tags"]["u.work"],
        json!({})
    );

    // Deleting removes the tag; deleting a tag that is not there is fine and changes nothing.
    app.delete(&format!("{tags_path}/u.work"), Some(a), None)
        .await
        .expect_ok();
    assert_eq!(
        app.get(&tags_path, Some(a)).await.expect_ok(),
        &json!({"tags": {"m.favourite": {"order": 0.5}, "u.ü 🎉": {"order": 1.0}}})
    );
    let since = next_batch(&tagged);
    let untagged = sync(app, a, Some(&since)).await;
    assert_eq!(
        room_data(&untagged, &room_id).get("m.tag"),
        Some(&json!({"tags": {"m.favourite": {"order": 0.5}, "u.ü 🎉": {"order": 1.0}}}))
    );
    let since = next_batch(&untagged);
    app.delete(&format!("{tags_path}/u.missing"), Some(a), None)
        .await
        .expect_ok();
    let quiet = sync(app, a, Some(&since)).await;
    assert!(joined(&quiet).is_empty(), "{quiet}");

    // Only Alice; a well-formed order; a room id.
    app.get(&tags_path, Some(b))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(&format!("{tags_path}/u.x"), Some(b), json!({}))
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.delete(&format!("{tags_path}/m.favourite"), Some(b), None)
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.put(
        &format!("{tags_path}/u.x"),
        Some(a),
        json!({"order": "high"}),
    )
    .await
    .expect_error(400, "M_BAD_JSON");
    app.get(&room_data_path(&alice, "nope", "/tags"), Some(a))
        .await
        .expect_error(400, "M_INVALID_PARAM");
    // Bob's tags on the same room are his own.
    app.join_room(b, &room_id).await;
    assert_eq!(
        app.get(&room_data_path(&bob, &room_id, "/tags"), Some(b))
            .await
            .expect_ok(),
        &json!({"tags": {}})
    );
}

// ---------------------------------------------------------------------------------------------

backend_matrix!(long_poll_wakes, long_poll_wakes_scenario);

async fn long_poll_wakes_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let a = alice.access_token.as_str();
    let room_id = app.create_room(a, json!({"preset": "private_chat"})).await;
    let since = next_batch(&sync(app, a, None).await);

    // Global account data ends a long-poll.
    let started = Instant::now();
    let poll = long_poll(app, a, &since, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the sync waits while nothing happens");
    app.put(
        &user_path(&alice, "/account_data/org.example.wake"),
        Some(a),
        json!({"up": true}),
    )
    .await
    .expect_ok();
    let woke = poll.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        global(&woke).get("org.example.wake"),
        Some(&json!({"up": true})),
        "{woke}"
    );

    // So does a tag, with the room in `join`.
    let since = next_batch(&woke);
    let started = Instant::now();
    let poll = long_poll(app, a, &since, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the sync waits while nothing happens");
    app.put(
        &room_data_path(&alice, &room_id, "/tags/m.lowpriority"),
        Some(a),
        json!({}),
    )
    .await
    .expect_ok();
    let woke = poll.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        room_data(&woke, &room_id).get("m.tag"),
        Some(&json!({"tags": {"m.lowpriority": {}}})),
        "{woke}"
    );

    // Account data of a room Alice is not in does not end the wait.
    let since = next_batch(&woke);
    let poll = long_poll(app, a, &since, 1_500);
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.put(
        &room_data_path(
            &alice,
            "!elsewhere:test.local",
            "/account_data/org.example.x",
        ),
        Some(a),
        json!({}),
    )
    .await
    .expect_ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "nothing Alice can see changed");
    let timed_out = poll.await.expect("task");
    assert!(joined(&timed_out).is_empty() && global(&timed_out).is_empty());
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_round_trip() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let a = alice.access_token.as_str();
        let room_id = app.create_room(a, json!({"preset": "private_chat"})).await;
        let req = get_supported_versions::Request::new()
            .try_into_http_request::<Vec<u8>>(&app.base_url, SendAccessToken::None, ())
            .expect("request");
        let versions: get_supported_versions::Response = ok(&exchange(app, req).await);
        let supported =
            SupportedVersions::from_parts(&versions.versions, &versions.unstable_features);
        let v = Cow::Borrowed(&supported);
        let token = SendAccessToken::IfRequired(a);
        let user = ruma::UserId::parse(alice.user_id.as_str()).expect("user id");
        let room = ruma::RoomId::parse(room_id.as_str()).expect("room id");

        // Filters.
        let mut definition = FilterDefinition::default();
        definition.room.timeline.limit = Some(ruma::UInt::from(3u32));
        let req = create_filter::v3::Request::new(user.clone(), definition)
            .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
            .expect("request");
        let created: create_filter::v3::Response = ok(&exchange(app, req).await);
        let req = get_filter::v3::Request::new(user.clone(), created.filter_id.clone())
            .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
            .expect("request");
        let got: get_filter::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(got.filter.room.timeline.limit, Some(ruma::UInt::from(3u32)));

        // Global and room account data.
        let data: ruma::serde::Raw<ruma::events::AnyGlobalAccountDataEventContent> =
            ruma::serde::Raw::from_json(
                serde_json::value::to_raw_value(&json!({"custom": "value"})).expect("raw"),
            );
        let req = set_global_account_data::v3::Request::new_raw(
            user.clone(),
            "org.example.custom".into(),
            data,
        )
        .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
        .expect("request");
        let _: set_global_account_data::v3::Response = ok(&exchange(app, req).await);
        let req =
            get_global_account_data::v3::Request::new(user.clone(), "org.example.custom".into())
                .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
                .expect("request");
        let got: get_global_account_data::v3::Response = ok(&exchange(app, req).await);
        let got: Value = serde_json::from_str(got.account_data.json().get()).expect("json");
        assert_eq!(got, json!({"custom": "value"}));

        let data: ruma::serde::Raw<ruma::events::AnyRoomAccountDataEventContent> =
            ruma::serde::Raw::from_json(
                serde_json::value::to_raw_value(&json!({"room": 1})).expect("raw"),
            );
        let req = set_room_account_data::v3::Request::new_raw(
            user.clone(),
            room.clone(),
            "org.example.room".into(),
            data,
        )
        .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
        .expect("request");
        let _: set_room_account_data::v3::Response = ok(&exchange(app, req).await);
        let req = get_room_account_data::v3::Request::new(
            user.clone(),
            room.clone(),
            "org.example.room".into(),
        )
        .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
        .expect("request");
        let got: get_room_account_data::v3::Response = ok(&exchange(app, req).await);
        let got: Value = serde_json::from_str(got.account_data.json().get()).expect("json");
        assert_eq!(got, json!({"room": 1}));

        // Tags.
        let mut info = ruma::events::tag::TagInfo::new();
        info.order = Some(0.5);
        for (name, info) in [
            (ruma::events::tag::TagName::Favorite, info),
            ("u.work".into(), ruma::events::tag::TagInfo::new()),
        ] {
            let req = create_tag::v3::Request::new(
                user.clone(),
                room.clone(),
                name.as_ref().to_owned(),
                info,
            )
            .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
            .expect("request");
            let _: create_tag::v3::Response = ok(&exchange(app, req).await);
        }
        let req = delete_tag::v3::Request::new(user.clone(), room.clone(), "u.work".to_owned())
            .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
            .expect("request");
        let _: delete_tag::v3::Response = ok(&exchange(app, req).await);
        let req = get_tags::v3::Request::new(user.clone(), room.clone())
            .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
            .expect("request");
        let tags: get_tags::v3::Response = ok(&exchange(app, req).await);
        assert_eq!(tags.tags.len(), 1);
        assert_eq!(
            tags.tags[&ruma::events::tag::TagName::Favorite].order,
            Some(0.5)
        );

        // ruma reads the account data of a sync, and applies the stored filter.
        let mut request = sync_events::v3::Request::new();
        request.filter = Some(sync_events::v3::Filter::FilterId(created.filter_id));
        let req = request
            .try_into_http_request::<Vec<u8>>(&app.base_url, token, v.clone())
            .expect("request");
        let resp: sync_events::v3::Response = ok(&exchange(app, req).await);
        let kinds: Vec<String> = resp
            .account_data
            .events
            .iter()
            .map(|raw| {
                raw.deserialize()
                    .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", raw.json().get()))
                    .event_type()
                    .to_string()
            })
            .collect();
        // The push rules first (the defaults, older than anything stored): ruma reads them.
        assert_eq!(kinds, ["m.push_rules", "org.example.custom"]);
        let joined = resp.rooms.join.get(&room).expect("joined room");
        assert!(joined.timeline.events.len() <= 3);
        let mut room_kinds = Vec::new();
        for raw in &joined.account_data.events {
            let parsed = raw
                .deserialize()
                .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", raw.json().get()));
            room_kinds.push(parsed.event_type().to_string());
            if let ruma::events::AnyRoomAccountDataEvent::Tag(tag) = parsed {
                assert_eq!(
                    tag.content.tags[&ruma::events::tag::TagName::Favorite].order,
                    Some(0.5)
                );
            }
        }
        room_kinds.sort();
        assert_eq!(room_kinds, ["m.tag", "org.example.room"]);
    })
    .await;
}
