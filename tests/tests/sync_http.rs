//! `/sync` over HTTP on every backend, with and without Redis: two users chat and each sees
//! every message of the other exactly once, in order; long-polls wake on a message; ruma reads
//! the responses.

use std::time::{Duration, Instant};

use palpo_tests::{Backend, TestApp, backend_matrix, enc, run, sync};
use ruma::api::IncomingResponseExt;
use serde_json::{Value, json};

fn messages(response: &Value, room_id: &str) -> Vec<String> {
    response["rooms"]["join"][room_id]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

backend_matrix!(two_users_chat, two_users_chat_scenario);

async fn two_users_chat_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(
            &alice.access_token,
            json!({"preset": "public_chat", "name": "chat"}),
        )
        .await;
    app.join_room(&bob.access_token, &room_id).await;

    let initial = sync(app, &bob.access_token, None, 0).await;
    let room = &initial["rooms"]["join"][&room_id];
    assert!(
        room.is_object(),
        "joined room in the initial sync: {initial}"
    );
    assert_eq!(room["summary"]["m.joined_member_count"], 2);
    let mut since = initial["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();

    let mut seen_by_bob = Vec::new();
    for round in 0..3 {
        for n in 0..2 {
            let (token, body) = if n == 0 {
                (&alice.access_token, format!("alice {round}"))
            } else {
                (&bob.access_token, format!("bob {round}"))
            };
            app.send_text(token, &room_id, &body).await;
        }
        let next = sync(app, &bob.access_token, Some(&since), 0).await;
        assert_eq!(
            next["rooms"]["join"][&room_id]["timeline"]["limited"],
            false
        );
        seen_by_bob.extend(messages(&next, &room_id));
        since = next["next_batch"].as_str().expect("next_batch").to_owned();
    }
    let expected: Vec<String> = (0..3)
        .flat_map(|r| [format!("alice {r}"), format!("bob {r}")])
        .collect();
    assert_eq!(seen_by_bob, expected);

    // A long-poll started before a message returns it soon after it is sent.
    let started = Instant::now();
    let poll = {
        let client = app.client.clone();
        let url = app.url(&format!(
            "/_matrix/client/v3/sync?timeout=20000&since={}",
            enc(&since)
        ));
        let token = bob.access_token.clone();
        tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("sync")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the sync waits while nothing happens");
    app.send_text(&alice.access_token, &room_id, "wake").await;
    let woke = poll.await.expect("task");
    assert_eq!(messages(&woke, &room_id), ["wake"]);
    assert!(started.elapsed() < Duration::from_secs(10));

    // A quiet incremental sync with no timeout answers at once, with nothing.
    let since = woke["next_batch"].as_str().expect("next_batch").to_owned();
    let quiet = sync(app, &bob.access_token, Some(&since), 0).await;
    assert!(
        quiet["rooms"]["join"]
            .as_object()
            .is_none_or(|j| j.is_empty()),
        "{quiet}"
    );
    // A quiet long-poll answers at its timeout, empty, with a token for the same place.
    let since = quiet["next_batch"].as_str().expect("next_batch").to_owned();
    let started = Instant::now();
    let timed_out = sync(app, &bob.access_token, Some(&since), 400).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(
        timed_out["rooms"]["join"]
            .as_object()
            .is_none_or(|j| j.is_empty()),
        "{timed_out}"
    );
    assert_eq!(timed_out["next_batch"], since.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruma_reads_sync_responses() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let bob = app.register("bob", "pw").await;
        let room_id = app
            .create_room(
                &alice.access_token,
                json!({"preset": "private_chat", "invite": [bob.user_id]}),
            )
            .await;
        app.send_text(&alice.access_token, &room_id, "hi").await;
        for (token, section) in [(&alice.access_token, "join"), (&bob.access_token, "invite")] {
            let resp = app.get("/_matrix/client/v3/sync", Some(token)).await;
            assert!(
                resp.json["rooms"][section][&room_id].is_object(),
                "{}",
                resp.text
            );
            let http = http::Response::builder()
                .status(resp.status)
                .header("content-type", "application/json")
                .body(resp.text.as_bytes())
                .expect("response");
            let parsed =
                ruma::api::client::sync::sync_events::v3::Response::try_from_http_response(http)
                    .unwrap_or_else(|e| {
                        panic!("ruma cannot read the sync response: {e}: {}", resp.text)
                    });
            assert!(!parsed.next_batch.is_empty());
            match section {
                "join" => {
                    let room_id = ruma::RoomId::parse(room_id.as_str()).expect("room id");
                    let room = parsed.rooms.join.get(&room_id).expect("joined room");
                    for raw in &room.timeline.events {
                        raw.deserialize().unwrap_or_else(|e| {
                            panic!("ruma cannot read {}: {e}", raw.json().get())
                        });
                    }
                }
                _ => assert_eq!(parsed.rooms.invite.len(), 1),
            }
        }
        // Errors: a bad token and a bad filter are Matrix errors.
        app.get(
            "/_matrix/client/v3/sync?since=nonsense",
            Some(&alice.access_token),
        )
        .await
        .expect_error(400, "M_INVALID_PARAM");
        app.get(
            "/_matrix/client/v3/sync?filter=%7Bnot%20json",
            Some(&alice.access_token),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
    })
    .await;
}

backend_matrix!(sliding_sync_lists, sliding_sync_scenario);

/// Simplified sliding sync over HTTP: a list sorted by recency returns the right rooms and
/// counts, and updates when a message arrives; ruma reads every response.
async fn sliding_sync_scenario(app: &TestApp) {
    const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let alice = app.register("alice", "pw").await;
    let mut rooms = Vec::new();
    for n in 0..3 {
        let room_id = app
            .create_room(&alice.access_token, json!({"name": format!("room {n}")}))
            .await;
        rooms.push(room_id);
    }
    app.send_text(&alice.access_token, &rooms[0], "latest")
        .await;
    let body = json!({
        "conn_id": "main",
        "lists": {"all": {"ranges": [[0, 0]], "required_state": [["m.room.name", ""]], "timeline_limit": 1}},
    });
    let parse = |resp: &palpo_tests::Resp| {
        let http = http::Response::builder()
            .status(resp.status)
            .header("content-type", "application/json")
            .body(resp.text.as_bytes())
            .expect("response");
        ruma::api::client::sync::sync_events::v5::Response::try_from_http_response(http)
            .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", resp.text))
    };
    let first = app
        .post(PATH, Some(&alice.access_token), body.clone())
        .await;
    first.expect_ok();
    let parsed = parse(&first);
    assert_eq!(parsed.lists["all"].count, ruma::UInt::from(3u32));
    let ids: Vec<String> = parsed.rooms.keys().map(|id| id.to_string()).collect();
    assert_eq!(ids, vec![rooms[0].clone()], "the most recent room first");
    let room = &first.json["rooms"][&rooms[0]];
    assert_eq!(room["name"], "room 0");
    assert_eq!(room["timeline"][0]["content"]["body"], "latest");

    // A message in room 2 moves it into the window.
    app.send_text(&alice.access_token, &rooms[2], "bump").await;
    let pos = first.json["pos"].as_str().expect("pos").to_owned();
    let next = app
        .post(
            &format!("{PATH}?pos={pos}&timeout=0"),
            Some(&alice.access_token),
            body.clone(),
        )
        .await;
    let parsed = parse(&next);
    let ids: Vec<String> = parsed.rooms.keys().map(|id| id.to_string()).collect();
    assert_eq!(ids, vec![rooms[2].clone()]);

    // A long-poll wakes when a message arrives in the window.
    let pos = next.json["pos"].as_str().expect("pos").to_owned();
    let poll = {
        let client = app.client.clone();
        let url = app.url(&format!("{PATH}?pos={pos}&timeout=20000"));
        let token = alice.access_token.clone();
        let body = body.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("sync")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "waits while nothing changes");
    app.send_text(&alice.access_token, &rooms[2], "live").await;
    let woke = poll.await.expect("task");
    assert_eq!(
        woke["rooms"][&rooms[2]]["timeline"][0]["content"]["body"],
        "live"
    );

    // Extensions: account data, typing and receipts changed since `pos`, read by ruma too.
    let with_extensions = json!({
        "conn_id": "main",
        "lists": {"all": {"ranges": [[0, 0]], "timeline_limit": 1}},
        "extensions": {
            "account_data": {"enabled": true},
            "typing": {"enabled": true},
            "receipts": {"enabled": true},
            "e2ee": {"enabled": true},
        },
    });
    let pos = woke["pos"].as_str().expect("pos").to_owned();
    let user = enc(&alice.user_id);
    app.put(
        &format!("/_matrix/client/v3/user/{user}/account_data/org.example.setting"),
        Some(&alice.access_token),
        json!({"on": true}),
    )
    .await
    .expect_ok();
    app.put(
        &app.room_path(&rooms[2], &format!("/typing/{user}")),
        Some(&alice.access_token),
        json!({"typing": true, "timeout": 10000}),
    )
    .await
    .expect_ok();
    let with = app
        .post(
            &format!("{PATH}?pos={pos}"),
            Some(&alice.access_token),
            with_extensions,
        )
        .await;
    let parsed = parse(&with);
    let extensions = &with.json["extensions"];
    assert!(
        extensions["account_data"]["global"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["type"] == "org.example.setting")),
        "{extensions}"
    );
    assert_eq!(
        extensions["typing"]["rooms"][&rooms[2]]["content"]["user_ids"],
        json!([alice.user_id]),
        "{extensions}"
    );
    assert_eq!(parsed.extensions.account_data.global.len(), 1);
    assert!(parsed.extensions.typing.rooms.len() == 1);

    // A position this server does not know: start over.
    app.post(
        &format!("{PATH}?pos=1"),
        Some(&alice.access_token),
        json!({"conn_id": "other"}),
    )
    .await
    .expect_error(400, "M_UNKNOWN_POS");
}

/// `room.timeline` event filters and `room.rooms` / `room.not_rooms` in a sync filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_filters_rooms_and_timeline_events() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let token = alice.access_token.as_str();
        let kept = app.create_room(token, json!({"name": "kept"})).await;
        let dropped = app.create_room(token, json!({"name": "dropped"})).await;
        app.send_text(token, &kept, "hello").await;
        app.send_text(token, &dropped, "hello").await;
        let filter = json!({
            "room": {
                "rooms": [kept],
                "timeline": {"types": ["m.room.message"], "limit": 20},
            }
        });
        let path = format!(
            "/_matrix/client/v3/sync?filter={}",
            enc(&filter.to_string())
        );
        let response = app.get(&path, Some(token)).await;
        let join = response.expect_ok()["rooms"]["join"].clone();
        assert!(
            join.get(&dropped).is_none(),
            "room.rooms leaves other rooms out: {join}"
        );
        let timeline = join[&kept]["timeline"]["events"]
            .as_array()
            .expect("timeline");
        assert!(!timeline.is_empty());
        assert!(
            timeline.iter().all(|e| e["type"] == "m.room.message"),
            "{timeline:?}"
        );

        let not_rooms = json!({"room": {"not_rooms": [kept]}});
        let path = format!(
            "/_matrix/client/v3/sync?filter={}",
            enc(&not_rooms.to_string())
        );
        let response = app.get(&path, Some(token)).await;
        let join = response.expect_ok()["rooms"]["join"].clone();
        assert!(
            join.get(&kept).is_none() && join.get(&dropped).is_some(),
            "{join}"
        );

        let bad = json!({"room": {"timeline": {"types": "m.room.message"}}});
        let path = format!("/_matrix/client/v3/sync?filter={}", enc(&bad.to_string()));
        app.get(&path, Some(token))
            .await
            .expect_error(400, "M_BAD_JSON");
    })
    .await;
}
