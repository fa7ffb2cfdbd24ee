//! Simplified sliding sync (MSC4186) over HTTP: connections kept in the database (a client
//! continues on another server process sharing it; unknown, replaced and expired positions are
//! `M_UNKNOWN_POS`), what a connection sends of rooms that left and re-entered the window, a
//! wider `required_state`, invites turned into joins, and the list filters. Ruma reads every
//! answer.

use std::{
    collections::BTreeSet,
    panic::{AssertUnwindSafe, resume_unwind},
    time::Duration,
};

use futures::FutureExt;
use palpo_tests::{Backend, Resp, TestApp, backend_matrix, enc, run};
use serde_json::{Value, json};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// The raw answer of a sliding sync on `app` continuing from `pos`.
async fn sliding_resp(
    app: &TestApp,
    token: &str,
    pos: Option<&str>,
    timeout_ms: u64,
    body: &Value,
) -> Resp {
    let mut path = format!("{PATH}?timeout={timeout_ms}");
    if let Some(pos) = pos {
        path.push_str(&format!("&pos={}", enc(pos)));
    }
    app.post(&path, Some(token), body.clone()).await
}

/// A sliding sync that must succeed, and that ruma must read.
#[track_caller]
fn sliding<'a>(
    app: &'a TestApp,
    token: &'a str,
    pos: Option<&'a str>,
    body: &'a Value,
) -> impl Future<Output = Value> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let resp = sliding_resp(app, token, pos, 0, body).await;
        assert_eq!(resp.status, 200, "{caller}: {}", resp.text);
        ruma_reads(&resp);
        resp.json
    }
}

fn ruma_reads(resp: &Resp) {
    use ruma::api::IncomingResponseExt;
    let http = http::Response::builder()
        .status(resp.status)
        .header("content-type", "application/json")
        .body(resp.text.as_bytes())
        .expect("response");
    ruma::api::client::sync::sync_events::v5::Response::try_from_http_response(http)
        .unwrap_or_else(|e| panic!("ruma cannot read {}: {e}", resp.text));
}

fn pos(response: &Value) -> String {
    response["pos"]
        .as_str()
        .unwrap_or_else(|| panic!("no pos: {response}"))
        .to_owned()
}

fn rooms(response: &Value) -> BTreeSet<String> {
    response["rooms"]
        .as_object()
        .map(|rooms| rooms.keys().cloned().collect())
        .unwrap_or_default()
}

fn bodies(response: &Value, room_id: &str) -> Vec<String> {
    response["rooms"][room_id]["timeline"]
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

fn state_types(response: &Value, room_id: &str) -> Vec<String> {
    response["rooms"][room_id]["required_state"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn set(ids: &[&String]) -> BTreeSet<String> {
    ids.iter().map(|id| (*id).clone()).collect()
}

fn all_rooms(timeline_limit: u64) -> Value {
    json!({
        "conn_id": "main",
        "lists": {"all": {
            "ranges": [[0, 20]],
            "required_state": [["m.room.name", ""]],
            "timeline_limit": timeline_limit,
        }},
    })
}

// ---------------------------------------------------------------------------------------------
// Several processes

mod continues_on_another_process {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::continues_on_another_process(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::continues_on_another_process(super::Backend::MySql).await;
    }
}

/// A connection started on process A continues on process B with the same `pos` and gets only
/// what is new; a position retried on the other process answers the same; positions the
/// client moved past are gone everywhere; a long-poll on B wakes for a message sent on A.
async fn continues_on_another_process(backend: Backend) {
    run(backend, true, async |a: &TestApp| {
        let b = a.spawn_peer(|_| {}).await;
        let result = AssertUnwindSafe(across(a, &b)).catch_unwind().await;
        b.teardown().await;
        if let Err(panic) = result {
            resume_unwind(panic);
        }
    })
    .await;
}

async fn across(a: &TestApp, b: &TestApp) {
    let alice = a.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let room = a.create_room(token, json!({"name": "across"})).await;
    a.send_text(token, &room, "one").await;
    let body = all_rooms(10);

    let first = sliding(a, token, None, &body).await;
    assert_eq!(first["rooms"][&room]["initial"], true, "{first}");
    assert_eq!(bodies(&first, &room), ["one"]);

    a.send_text(token, &room, "two").await;
    let second = sliding(b, token, Some(&pos(&first)), &body).await;
    assert_eq!(
        bodies(&second, &room),
        ["two"],
        "B: only what is new; {second}"
    );
    assert_eq!(second["rooms"][&room]["initial"], false);
    assert_eq!(second["rooms"][&room]["num_live"], 1);
    assert_eq!(
        second["rooms"][&room]["required_state"],
        json!([]),
        "the name did not change"
    );

    b.send_text(token, &room, "three").await;
    let third = sliding(a, token, Some(&pos(&second)), &body).await;
    assert_eq!(bodies(&third, &room), ["three"], "{third}");
    // The client lost that answer and retries on B: the same answer.
    let retried = sliding(b, token, Some(&pos(&second)), &body).await;
    assert_eq!(bodies(&retried, &room), ["three"], "{retried}");

    // Continuing from the retry: positions before it are gone, on both processes.
    a.send_text(token, &room, "four").await;
    let fourth = sliding(a, token, Some(&pos(&retried)), &body).await;
    assert_eq!(bodies(&fourth, &room), ["four"], "{fourth}");
    for app in [a, b] {
        sliding_resp(app, token, Some(&pos(&second)), 0, &body)
            .await
            .expect_error(400, "M_UNKNOWN_POS");
    }

    // Nothing new: an empty answer (on either process), and the same position still works.
    let quiet = sliding(b, token, Some(&pos(&fourth)), &body).await;
    assert!(rooms(&quiet).is_empty(), "{quiet}");
    let quiet_again = sliding(a, token, Some(&pos(&quiet)), &body).await;
    assert!(rooms(&quiet_again).is_empty(), "{quiet_again}");

    // A long-poll on B wakes when A sends.
    let poll = {
        let client = b.client.clone();
        let url = b.url(&format!(
            "{PATH}?timeout=20000&pos={}",
            enc(&pos(&quiet_again))
        ));
        let token = token.to_owned();
        let body = body.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("sliding sync")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "waits while nothing changes");
    let started = std::time::Instant::now();
    a.send_text(token, &room, "five").await;
    let woke = poll.await.expect("task");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(bodies(&woke, &room), ["five"], "{woke}");

    // Starting the connection again on B makes A forget the old positions too.
    let restarted = sliding(b, token, None, &body).await;
    assert_eq!(restarted["rooms"][&room]["initial"], true);
    sliding_resp(a, token, Some(&pos(&woke)), 0, &body)
        .await
        .expect_error(400, "M_UNKNOWN_POS");
    let after = sliding(a, token, Some(&pos(&restarted)), &body).await;
    assert!(rooms(&after).is_empty(), "{after}");
}

// ---------------------------------------------------------------------------------------------
// Positions

backend_matrix!(unknown_positions, unknown_positions_scenario);

/// Positions of another connection, of a replaced or idle connection, and garbage, are
/// `M_UNKNOWN_POS`; an over-long `conn_id` is the client's error.
async fn unknown_positions_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    app.create_room(token, json!({"name": "r"})).await;
    let body = all_rooms(1);
    let first = sliding(app, token, None, &body).await;
    let other = json!({"conn_id": "other"});
    for garbage in ["1", "x", "1_x", "0_0", &pos(&first)] {
        sliding_resp(app, token, Some(garbage), 0, &other)
            .await
            .expect_error(400, "M_UNKNOWN_POS");
    }
    // Another device of the same user.
    let phone = app.login("alice", "pw").await;
    sliding_resp(app, &phone.access_token, Some(&pos(&first)), 0, &body)
        .await
        .expect_error(400, "M_UNKNOWN_POS");
    // Still fine for its own connection.
    let next = sliding(app, token, Some(&pos(&first)), &body).await;

    // Unused for longer than connections are kept: unknown.
    palpo_storage::on_pool!(
        app.storage().db().primary(),
        "UPDATE sliding_sync_connections SET last_used_ts = ?",
        |p, sql| {
            sqlx::query(sql)
                .bind(palpo_core::now_millis() - 31 * 60 * 1000)
                .execute(p)
                .await
                .expect("age the connections")
                .rows_affected()
        }
    );
    sliding_resp(app, token, Some(&pos(&next)), 0, &body)
        .await
        .expect_error(400, "M_UNKNOWN_POS");
    // The client starts over.
    let again = sliding(app, token, None, &body).await;
    assert_eq!(rooms(&again).len(), 1);

    let long = json!({"conn_id": "x".repeat(201)});
    sliding_resp(app, token, None, 0, &long)
        .await
        .expect_error(400, "M_INVALID_PARAM");
    let wrong = json!({"conn_id": 5});
    sliding_resp(app, token, None, 0, &wrong)
        .await
        .expect_error(400, "M_BAD_JSON");
}

// ---------------------------------------------------------------------------------------------
// Rooms

backend_matrix!(rooms_leaving_the_window, rooms_leaving_the_window_scenario);

/// A room that changed while out of the window comes back with everything since the client
/// last got it; only what came after the previous answer is live.
async fn rooms_leaving_the_window_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let token = alice.access_token.as_str();
    let b = app.create_room(token, json!({"name": "b"})).await;
    let a = app.create_room(token, json!({"name": "a"})).await;
    let body = json!({
        "conn_id": "main",
        "lists": {"top": {"ranges": [[0, 0]], "timeline_limit": 10}},
    });
    let first = sliding(app, token, None, &body).await;
    assert_eq!(rooms(&first), set(&[&a]), "{first}");

    app.send_text(token, &b, "b1").await;
    let second = sliding(app, token, Some(&pos(&first)), &body).await;
    assert_eq!(rooms(&second), set(&[&b]), "{second}");
    assert_eq!(second["rooms"][&b]["initial"], true);
    assert_eq!(
        second["rooms"][&b]["num_live"], 1,
        "b1 came after the previous answer"
    );

    // `a` changes while `b` stays on top: not sent.
    app.send_text(token, &a, "a1").await;
    app.send_text(token, &b, "b2").await;
    let third = sliding(app, token, Some(&pos(&second)), &body).await;
    assert_eq!(rooms(&third), set(&[&b]), "{third}");
    assert_eq!(bodies(&third, &b), ["b2"]);

    // Back on top: everything since it was last sent, a2 alone live.
    app.send_text(token, &a, "a2").await;
    let fourth = sliding(app, token, Some(&pos(&third)), &body).await;
    assert_eq!(rooms(&fourth), set(&[&a]), "{fourth}");
    assert_eq!(fourth["rooms"][&a]["initial"], false);
    assert_eq!(bodies(&fourth, &a), ["a1", "a2"], "{fourth}");
    assert_eq!(fourth["rooms"][&a]["num_live"], 1);
    assert_eq!(fourth["lists"]["top"]["count"], 2);

    // The same through a subscription, which needs no window.
    let subscribed = json!({
        "conn_id": "main",
        "room_subscriptions": {(b.clone()): {"timeline_limit": 10}},
    });
    app.send_text(token, &b, "b3").await;
    let fifth = sliding(app, token, Some(&pos(&fourth)), &subscribed).await;
    assert_eq!(rooms(&fifth), set(&[&b]), "{fifth}");
    assert_eq!(bodies(&fifth, &b), ["b3"]);
}

backend_matrix!(wider_state_and_joins, wider_state_and_joins_scenario);

/// A wider `required_state` sends the state it adds at once; an invite the client got that
/// became a join is sent afresh.
async fn wider_state_and_joins_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let token = alice.access_token.as_str();
    let room = app
        .create_room(token, json!({"name": "named", "topic": "a topic"}))
        .await;
    let subscribe = |required_state: Value| {
        json!({
            "conn_id": "main",
            "room_subscriptions": {(room.clone()): {
                "required_state": required_state,
                "timeline_limit": 1,
            }},
        })
    };
    let names = subscribe(json!([["m.room.name", ""]]));
    let first = sliding(app, token, None, &names).await;
    assert_eq!(state_types(&first, &room), ["m.room.name"], "{first}");

    let wider = subscribe(json!([["m.room.name", ""], ["m.room.topic", ""]]));
    let second = sliding(app, token, Some(&pos(&first)), &wider).await;
    assert_eq!(second["rooms"][&room]["initial"], false, "{second}");
    assert_eq!(state_types(&second, &room), ["m.room.topic"], "{second}");
    assert_eq!(second["rooms"][&room]["timeline"], json!([]));
    let third = sliding(app, token, Some(&pos(&second)), &wider).await;
    assert!(rooms(&third).is_empty(), "nothing new: {third}");
    // Narrower: the topic changes, the client is not kept up to date with it; wider again:
    // the topic is sent again.
    let fourth = sliding(app, token, Some(&pos(&third)), &names).await;
    assert!(rooms(&fourth).is_empty(), "{fourth}");
    app.put(
        &app.room_path(&room, "/state/m.room.topic"),
        Some(token),
        json!({"topic": "another topic"}),
    )
    .await
    .expect_ok();
    let fifth = sliding(app, token, Some(&pos(&fourth)), &names).await;
    assert_eq!(state_types(&fifth, &room), Vec::<String>::new(), "{fifth}");
    let sixth = sliding(app, token, Some(&pos(&fifth)), &wider).await;
    assert_eq!(state_types(&sixth, &room), ["m.room.topic"], "{sixth}");
    assert_eq!(
        sixth["rooms"][&room]["required_state"][0]["content"]["topic"],
        "another topic"
    );

    // Bob is invited: stripped state. He joins: the whole room, as new.
    let party = app
        .create_room(token, json!({"name": "party", "invite": [bob.user_id]}))
        .await;
    let bobs = all_rooms(5);
    let invited = sliding(app, &bob.access_token, None, &bobs).await;
    assert!(
        invited["rooms"][&party]["invite_state"].is_array(),
        "{invited}"
    );
    app.join_room(&bob.access_token, &party).await;
    let joined = sliding(app, &bob.access_token, Some(&pos(&invited)), &bobs).await;
    let entry = &joined["rooms"][&party];
    assert_eq!(entry["initial"], true, "{joined}");
    assert!(entry.get("invite_state").is_none(), "{joined}");
    assert_eq!(state_types(&joined, &party), ["m.room.name"]);
    assert!(
        entry["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["type"] == "m.room.member")),
        "{joined}"
    );
}

backend_matrix!(rooms_left, rooms_left_scenario);

/// A room the connection has sent that the user is kicked from comes once more, up to the
/// kick; a new connection does not list it; forgetting it takes it out of the lists.
async fn rooms_left_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room = app
        .create_room(
            &alice.access_token,
            json!({"preset": "public_chat", "name": "club"}),
        )
        .await;
    app.join_room(&bob.access_token, &room).await;
    let body = json!({
        "conn_id": "main",
        "lists": {"all": {
            "ranges": [[0, 9]],
            "required_state": [["m.room.member", "$ME"]],
            "timeline_limit": 5,
        }},
    });
    let token = bob.access_token.as_str();
    let first = sliding(app, token, None, &body).await;
    assert_eq!(rooms(&first), set(&[&room]));

    app.send_text(&alice.access_token, &room, "before").await;
    app.post(
        &app.room_path(&room, "/kick"),
        Some(&alice.access_token),
        json!({"user_id": bob.user_id, "reason": "bye"}),
    )
    .await
    .expect_ok();
    app.send_text(&alice.access_token, &room, "after").await;
    let second = sliding(app, token, Some(&pos(&first)), &body).await;
    let entry = &second["rooms"][&room];
    assert_eq!(entry["initial"], false, "{second}");
    assert_eq!(
        bodies(&second, &room),
        ["before"],
        "not what came after: {second}"
    );
    let timeline = entry["timeline"].as_array().expect("timeline");
    assert_eq!(
        timeline.last().map(|e| e["content"]["membership"].clone()),
        Some(json!("leave")),
        "{second}"
    );
    assert_eq!(
        entry["required_state"][0]["content"]["membership"], "leave",
        "{second}"
    );
    assert_eq!(second["lists"]["all"]["count"], 1);

    // Nothing more to say about it.
    app.send_text(&alice.access_token, &room, "later").await;
    let third = sliding(app, token, Some(&pos(&second)), &body).await;
    assert!(rooms(&third).is_empty(), "{third}");

    // A new connection does not list it.
    let fresh = json!({"conn_id": "fresh", "lists": body["lists"].clone()});
    let other = sliding(app, token, None, &fresh).await;
    assert!(rooms(&other).is_empty(), "{other}");
    assert_eq!(other["lists"]["all"]["count"], 0);

    // Forgotten: out of the lists.
    app.post(&app.room_path(&room, "/forget"), Some(token), json!({}))
        .await
        .expect_ok();
    let fourth = sliding(app, token, Some(&pos(&third)), &body).await;
    assert_eq!(fourth["lists"]["all"]["count"], 0, "{fourth}");
}

// ---------------------------------------------------------------------------------------------
// Filters

backend_matrix!(list_filters, list_filters_scenario);

/// Each filter alone, and several together (AND).
async fn list_filters_scenario(app: &TestApp) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let token = alice.access_token.as_str();
    let user = enc(&alice.user_id);

    let plain = app.create_room(token, json!({"name": "plain"})).await;
    let dm = app
        .create_room(token, json!({"is_direct": true, "invite": [bob.user_id]}))
        .await;
    app.put(
        &format!("/_matrix/client/v3/user/{user}/account_data/m.direct"),
        Some(token),
        json!({(bob.user_id.clone()): [dm]}),
    )
    .await
    .expect_ok();
    let encrypted = app
        .create_room(
            token,
            json!({"initial_state": [{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }]}),
        )
        .await;
    let space = app
        .create_room(token, json!({"creation_content": {"type": "m.space"}}))
        .await;
    let child = app.create_room(token, json!({"name": "child"})).await;
    app.put(
        &app.room_path(&space, &format!("/state/m.space.child/{}", enc(&child))),
        Some(token),
        json!({"via": ["test.local"]}),
    )
    .await
    .expect_ok();
    // A child entry without `via` does not count.
    app.put(
        &app.room_path(&space, &format!("/state/m.space.child/{}", enc(&plain))),
        Some(token),
        json!({}),
    )
    .await
    .expect_ok();
    let favourite = app.create_room(token, json!({"name": "fav"})).await;
    let low = app.create_room(token, json!({"name": "low"})).await;
    for (room, tag) in [(&favourite, "m.favourite"), (&low, "m.lowpriority")] {
        app.put(
            &format!(
                "/_matrix/client/v3/user/{user}/rooms/{}/tags/{tag}",
                enc(room)
            ),
            Some(token),
            json!({}),
        )
        .await
        .expect_ok();
    }
    let invite = app
        .create_room(
            &bob.access_token,
            json!({"name": "invite", "invite": [alice.user_id]}),
        )
        .await;

    let every = [
        &plain, &dm, &encrypted, &space, &child, &favourite, &low, &invite,
    ];
    let except = |left_out: &[&String]| -> BTreeSet<String> {
        every
            .iter()
            .filter(|id| !left_out.contains(id))
            .map(|id| (*id).clone())
            .collect()
    };
    let cases: Vec<(Value, BTreeSet<String>)> = vec![
        (json!({}), except(&[])),
        (json!({"is_dm": true}), set(&[&dm])),
        (json!({"is_dm": false}), except(&[&dm])),
        (json!({"is_invite": true}), set(&[&invite])),
        (json!({"is_invited": true}), set(&[&invite])),
        (json!({"is_invite": false}), except(&[&invite])),
        (json!({"is_encrypted": true}), set(&[&encrypted])),
        (json!({"is_encrypted": false}), except(&[&encrypted])),
        (json!({"room_types": ["m.space"]}), set(&[&space])),
        (json!({"room_types": [null]}), except(&[&space])),
        (json!({"not_room_types": ["m.space"]}), except(&[&space])),
        (
            json!({"room_types": ["m.space", null], "not_room_types": ["m.space"]}),
            except(&[&space]),
        ),
        (json!({"tags": ["m.favourite"]}), set(&[&favourite])),
        (json!({"not_tags": ["m.lowpriority"]}), except(&[&low])),
        (
            json!({"tags": ["m.favourite", "m.lowpriority"], "not_tags": ["m.lowpriority"]}),
            set(&[&favourite]),
        ),
        (json!({"spaces": [space]}), set(&[&child])),
        (json!({"spaces": ["!unknown:test.local"]}), set(&[])),
        (
            json!({"is_encrypted": false, "not_room_types": ["m.space"], "is_invite": false, "is_dm": false}),
            set(&[&plain, &child, &favourite, &low]),
        ),
    ];
    for (n, (filters, expected)) in cases.into_iter().enumerate() {
        let body = json!({
            "conn_id": format!("case{n}"),
            "lists": {"list": {"ranges": [[0, 20]], "timeline_limit": 0, "filters": filters}},
        });
        let answer = sliding(app, token, None, &body).await;
        assert_eq!(rooms(&answer), expected, "{filters}: {answer}");
        assert_eq!(
            answer["lists"]["list"]["count"],
            expected.len(),
            "{filters}: {answer}"
        );
    }
    // A list that leaves a room out, beside one that has it: the room is sent once.
    let body = json!({
        "conn_id": "two",
        "lists": {
            "dms": {"ranges": [[0, 20]], "timeline_limit": 0, "filters": {"is_dm": true}},
            "rest": {"ranges": [[0, 20]], "timeline_limit": 0, "filters": {"is_dm": false}},
        },
    });
    let answer = sliding(app, token, None, &body).await;
    assert_eq!(rooms(&answer), except(&[]));
    assert_eq!(answer["lists"]["dms"]["count"], 1);
    assert_eq!(answer["lists"]["rest"]["count"], 7);

    // Filters must have their types.
    for bad in [
        json!({"room_types": "m.space"}),
        json!({"room_types": [5]}),
        json!({"tags": [true]}),
        json!({"is_dm": "yes"}),
    ] {
        let body = json!({
            "conn_id": "bad",
            "lists": {"list": {"ranges": [[0, 1]], "timeline_limit": 0, "filters": bad}},
        });
        let resp = sliding_resp(app, token, None, 0, &body).await;
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text);
        assert_eq!(resp.json["errcode"], "M_BAD_JSON", "{bad}: {}", resp.text);
    }
}

/// A client that cancels a long-poll to send a new request on the same connection (to change
/// its lists) gets its answer at once: the cancelled request does not hold the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_long_poll_does_not_hold_the_connection() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let alice = app.register("alice", "pw").await;
        let token = alice.access_token.as_str();
        app.create_room(token, json!({"name": "r"})).await;
        let body = all_rooms(1);
        let first = sliding(app, token, None, &body).await;
        let poll = {
            // A client of its own, so that cancelling closes its connection.
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            let url = app.url(&format!("{PATH}?timeout=20000&pos={}", enc(&pos(&first))));
            let token = token.to_owned();
            let body = body.clone();
            tokio::spawn(async move {
                let _ = client.post(url).bearer_auth(token).json(&body).send().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!poll.is_finished(), "waits while nothing changes");
        poll.abort();
        let _ = poll.await;
        let started = std::time::Instant::now();
        let wider = all_rooms(5);
        let again = sliding(app, token, Some(&pos(&first)), &wider).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(rooms(&again).is_empty(), "{again}");
    })
    .await;
}
