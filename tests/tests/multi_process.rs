//! Several server processes on one database and one Redis: a message sent through one process
//! wakes a client long-polling `/sync` on another within milliseconds, through Redis pub/sub.
//! Without Redis on either side, the same long-poll only answers at its timeout, which shows the
//! wake-up comes from Redis.
//!
//! PostgreSQL and MySQL only, except `alternating_senders`: SQLite is a single-process
//! database, but two processes taking turns on one file must still write a linear timeline.

use std::{
    panic::{AssertUnwindSafe, resume_unwind},
    time::{Duration, Instant},
};

use futures::FutureExt;
use palpo_tests::{Backend, Session, TestApp, enc, run};
use serde_json::{Value, json};

/// The loose bound on a cross-process wake-up (it takes milliseconds).
const WAKES_WITHIN: Duration = Duration::from_secs(2);

mod wakes_across_processes {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::wakes_across_processes(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::wakes_across_processes(super::Backend::MySql).await;
    }
}

mod the_wake_comes_from_redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::the_wake_comes_from_redis(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::the_wake_comes_from_redis(super::Backend::MySql).await;
    }
}

mod concurrent_senders {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        super::concurrent_senders(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mysql() {
        super::concurrent_senders(super::Backend::MySql).await;
    }
}

mod alternating_senders {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::alternating_senders(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::alternating_senders(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::alternating_senders(super::Backend::MySql).await;
    }
}

mod logout_elsewhere {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::logout_elsewhere(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::logout_elsewhere(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::logout_elsewhere(super::Backend::MySql).await;
    }
}

mod tags_and_push_rules_across_processes {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        super::tags_and_push_rules_across_processes(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        super::tags_and_push_rules_across_processes(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mysql() {
        super::tags_and_push_rules_across_processes(super::Backend::MySql).await;
    }
}

/// Runs `scenario` on `a` (with Redis) and peers on its database, one per entry of
/// `peers_with_redis`; tears them all down, panic or not.
async fn with_processes<F>(backend: Backend, peers_with_redis: &[bool], scenario: F)
where
    F: AsyncFnOnce(&TestApp, &[TestApp]),
{
    run(backend, true, async |a: &TestApp| {
        let mut peers = Vec::new();
        for &with_redis in peers_with_redis {
            let peer = a
                .spawn_peer(|config| {
                    if !with_redis {
                        config.cache.redis_url = None;
                    }
                })
                .await;
            peers.push(peer);
        }
        let result = AssertUnwindSafe(scenario(a, &peers)).catch_unwind().await;
        for peer in peers {
            peer.teardown().await;
        }
        if let Err(panic) = result {
            resume_unwind(panic);
        }
    })
    .await;
}

/// `since` for `session` on `app`: an initial sync there.
async fn initial_since(app: &TestApp, session: &Session) -> String {
    let resp = app
        .get(
            "/_matrix/client/v3/sync?timeout=0",
            Some(&session.access_token),
        )
        .await;
    resp.expect_ok()["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned()
}

/// A long-poll on `app` that has started waiting: the response and when it arrived.
async fn start_long_poll(
    app: &TestApp,
    session: &Session,
    since: &str,
    timeout: Duration,
) -> tokio::task::JoinHandle<(Value, Instant)> {
    let client = app.client.clone();
    let url = app.url(&format!(
        "/_matrix/client/v3/sync?timeout={}&since={}",
        timeout.as_millis(),
        enc(since)
    ));
    let token = session.access_token.clone();
    let poll = tokio::spawn(async move {
        let response = client
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("sync")
            .json::<Value>()
            .await
            .expect("json");
        (response, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the sync waits while nothing happens");
    poll
}

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

/// Alice on `a`, Bob on `b`, both in a room Alice created on `a` and Bob joined on `b`.
async fn chat(a: &TestApp, b: &TestApp) -> (Session, Session, String) {
    let alice = a.register("alice", "pw").await;
    let bob = b.register("bob", "pw").await;
    let room_id = a
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    b.join_room(&bob.access_token, &room_id).await;
    (alice, bob, room_id)
}

/// Sends `body` through `sender_app` while `session` long-polls `poll_app` (timeout
/// `timeout`); returns the messages of the answer and how long after the send returned it came.
async fn send_during_long_poll(
    poll_app: &TestApp,
    session: &Session,
    sender_app: &TestApp,
    sender: &Session,
    room_id: &str,
    body: &str,
    timeout: Duration,
) -> (Vec<String>, Duration) {
    let since = initial_since(poll_app, session).await;
    let poll = start_long_poll(poll_app, session, &since, timeout).await;
    sender_app
        .send_text(&sender.access_token, room_id, body)
        .await;
    let sent = Instant::now();
    let (response, arrived) = poll.await.expect("long-poll task");
    (
        messages(&response, room_id),
        arrived.saturating_duration_since(sent),
    )
}

async fn wakes_across_processes(backend: Backend) {
    with_processes(backend, &[true], async |a: &TestApp, peers: &[TestApp]| {
        let b = &peers[0];
        let (alice, bob, room_id) = chat(a, b).await;
        let mut delays = Vec::new();
        for round in 0..5 {
            // Bob long-polls on B, Alice sends through A; and the other way round.
            let body = format!("from A {round}");
            let (got, delay) =
                send_during_long_poll(b, &bob, a, &alice, &room_id, &body, Duration::from_secs(20))
                    .await;
            assert_eq!(got, [body], "round {round}: B answers with A's message");
            delays.push(delay);
            assert!(
                delay < WAKES_WITHIN,
                "A → B took {delay:?}; so far {delays:?}"
            );
            let body = format!("from B {round}");
            let (got, delay) =
                send_during_long_poll(a, &alice, b, &bob, &room_id, &body, Duration::from_secs(20))
                    .await;
            assert_eq!(got, [body], "round {round}: A answers with B's message");
            delays.push(delay);
            assert!(
                delay < WAKES_WITHIN,
                "B → A took {delay:?}; so far {delays:?}"
            );
        }
        println!(
            "{}: cross-process wake-up after the send returned: {delays:?}",
            backend.name()
        );
    })
    .await;
}

async fn the_wake_comes_from_redis(backend: Backend) {
    // A and B use Redis, C does not.
    with_processes(
        backend,
        &[true, false],
        async |a: &TestApp, peers: &[TestApp]| {
            let (b, c) = (&peers[0], &peers[1]);
            let (alice, bob, room_id) = chat(a, b).await;
            let timeout = Duration::from_secs(2);
            // The long-poll started 300 ms before the send: at its timeout, about 1.7 s after.
            let at_timeout = Duration::from_millis(1200);

            // With Redis on both sides: at once.
            let (got, delay) =
                send_during_long_poll(b, &bob, a, &alice, &room_id, "redis", timeout).await;
            assert_eq!(got, ["redis"]);
            assert!(delay < Duration::from_millis(1000), "took {delay:?}");
            println!("{}: with Redis, woke after {delay:?}", backend.name());

            // The listener has no Redis: the message only comes with the timeout.
            let (got, delay) =
                send_during_long_poll(c, &bob, a, &alice, &room_id, "deaf", timeout).await;
            assert_eq!(got, ["deaf"], "the last check at the timeout finds it");
            assert!(
                delay >= at_timeout,
                "a process without Redis woke after {delay:?}: not from Redis?"
            );

            // The sender has no Redis: likewise.
            let (got, delay) =
                send_during_long_poll(b, &bob, c, &alice, &room_id, "mute", timeout).await;
            assert_eq!(got, ["mute"]);
            assert!(
                delay >= at_timeout,
                "woke after {delay:?} though the sender has no Redis"
            );
            println!(
                "{}: without Redis on one side, answered at the timeout",
                backend.name()
            );
        },
    )
    .await;
}

/// Two processes on one database, users sending into one room through both at once: one
/// linear timeline (a single forward extremity), every message in `/messages` exactly once.
async fn concurrent_senders(backend: Backend) {
    const PER_SENDER: usize = 15;
    with_processes(backend, &[true], async |a: &TestApp, peers: &[TestApp]| {
        let b = &peers[0];
        let (alice, bob, room_id) = chat(a, b).await;
        let send_all = async |app: &TestApp, session: &Session, who: &str| {
            for n in 0..PER_SENDER {
                app.send_text(&session.access_token, &room_id, &format!("{who} {n}"))
                    .await;
            }
        };
        tokio::join!(send_all(a, &alice, "alice"), send_all(b, &bob, "bob"));

        let room = a
            .storage()
            .rooms
            .get_room(&room_id)
            .await
            .expect("room")
            .expect("exists");
        assert_eq!(
            room.forward_extremities.len(),
            1,
            "forked: {:?}",
            room.forward_extremities
        );
        let path = format!(
            "{}?dir=b&limit=1000&filter={}",
            a.room_path(&room_id, "/messages"),
            palpo_tests::enc(r#"{"types":["m.room.message"]}"#)
        );
        let page = b.get(&path, Some(&bob.access_token)).await;
        let bodies: Vec<String> = page.expect_ok()["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(bodies.len(), 2 * PER_SENDER, "{bodies:?}");
        let unique: std::collections::BTreeSet<&String> = bodies.iter().collect();
        assert_eq!(unique.len(), bodies.len(), "no duplicates");
        // Each sender's messages keep their order.
        for who in ["alice", "bob"] {
            let mine: Vec<&String> = bodies.iter().rev().filter(|b| b.starts_with(who)).collect();
            let expected: Vec<String> = (0..PER_SENDER).map(|n| format!("{who} {n}")).collect();
            assert_eq!(mine, expected.iter().collect::<Vec<_>>());
        }
    })
    .await;
}

/// Two processes taking turns sending into one room: each builds on the event the other just
/// wrote, although it last saw the room before that (a process keeps the head of the rooms it
/// sends to), so every event cites the one before it.
async fn alternating_senders(backend: Backend) {
    with_processes(backend, &[true], async |a: &TestApp, peers: &[TestApp]| {
        let b = &peers[0];
        let (alice, bob, room_id) = chat(a, b).await;
        let mut sent = Vec::new();
        for n in 0..6 {
            let (app, session) = if n % 2 == 0 { (a, &alice) } else { (b, &bob) };
            sent.push(
                app.send_text(&session.access_token, &room_id, &format!("m{n}"))
                    .await,
            );
        }
        for pair in sent.windows(2) {
            let event = a
                .storage()
                .rooms
                .get_event(&pair[1])
                .await
                .expect("read")
                .expect("stored");
            let pdu: Value = serde_json::from_str(&event.pdu_json).expect("JSON");
            assert_eq!(pdu["prev_events"], json!([pair[0]]), "{pdu}");
        }
        let room = b
            .storage()
            .rooms
            .get_room(&room_id)
            .await
            .expect("room")
            .expect("exists");
        assert_eq!(room.forward_extremities, [sent[5].clone()]);
    })
    .await;
}

/// Devices logged out through another process while this one remembers their tokens (sends
/// and syncs take them from memory): the first request of each here is refused with 401
/// `M_UNKNOWN_TOKEN`, whichever way it first touches the database (a new message checked in
/// its write, a retried transaction id, a long-poll's next pass), and nothing is written.
async fn logout_elsewhere(backend: Backend) {
    with_processes(backend, &[true], async |a: &TestApp, peers: &[TestApp]| {
        let b = &peers[0];
        let (alice, bob, room_id) = chat(a, b).await;
        let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
        let send_path = |txn: &str| a.room_path(&room_id, &format!("/send/m.room.message/{txn}"));
        let (phone, tablet, laptop) = (
            a.login("alice", "pw").await,
            a.login("alice", "pw").await,
            a.login("alice", "pw").await,
        );
        // Each sends (or syncs) through `a` first: its token is remembered there.
        for (device, txn) in [(&phone, "phone"), (&tablet, "tablet")] {
            a.put(&send_path(txn), Some(&device.access_token), text(txn))
                .await
                .expect_ok();
        }
        let since = initial_since(a, &laptop).await;
        let poll = start_long_poll(a, &laptop, &since, Duration::from_secs(5)).await;
        // The laptop first: each logout is a device-list change for Alice, which wakes the
        // long-poll (an answer while its token still stood would be right, and end it).
        for device in [&laptop, &phone, &tablet] {
            b.post(
                "/_matrix/client/v3/logout",
                Some(&device.access_token),
                json!({}),
            )
            .await
            .expect_ok();
        }

        let refused = |resp: palpo_tests::Resp| {
            resp.expect_error(401, "M_UNKNOWN_TOKEN");
            assert_eq!(resp.json["soft_logout"], false, "{}", resp.text);
        };
        // A new message from the tablet: checked in the write's transaction.
        refused(
            a.put(
                &send_path("tablet-2"),
                Some(&tablet.access_token),
                text("after"),
            )
            .await,
        );
        // The long-poll's next pass read the position and checked the token with it.
        let (answer, _) = poll.await.expect("long-poll");
        assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN", "{answer}");

        // Alice's first device still sends; then she leaves.
        a.send_text(&alice.access_token, &room_id, "still here")
            .await;
        a.post(
            &a.room_path(&room_id, "/leave"),
            Some(&alice.access_token),
            json!({}),
        )
        .await
        .expect_ok();
        // A retry of the transaction id the phone used, which can no longer be built (Alice
        // left): the event the id created is not handed to a revoked token.
        refused(
            a.put(
                &send_path("phone"),
                Some(&phone.access_token),
                text("again"),
            )
            .await,
        );
        for device in [&phone, &tablet, &laptop] {
            refused(
                a.get("/_matrix/client/v3/sync", Some(&device.access_token))
                    .await,
            );
        }
        // Nothing was written with the revoked tokens.
        let seen = b
            .get("/_matrix/client/v3/sync", Some(&bob.access_token))
            .await;
        assert_eq!(
            messages(seen.expect_ok(), &room_id),
            ["phone", "tablet", "still here"]
        );
    })
    .await;
}

/// Tags and push rules are each one piece of account data, which a change reads, modifies and
/// writes back. Changes made at once through two processes all stay: none writes over
/// another's with what it read before it.
async fn tags_and_push_rules_across_processes(backend: Backend) {
    const CHANGES: usize = 8;
    with_processes(backend, &[true], async |a: &TestApp, peers: &[TestApp]| {
        let b = &peers[0];
        let on_a = a.register("alice", "pw").await;
        let on_b = b.login("alice", "pw").await;
        let room_id = a
            .create_room(&on_a.access_token, json!({"preset": "private_chat"}))
            .await;
        let user_path = &format!("/_matrix/client/v3/user/{}", enc(&on_a.user_id));
        let (room_id, on_a, on_b) = (&room_id, &on_a, &on_b);
        let changes =
            (0..CHANGES)
                .flat_map(|n| [(n, true), (n, false)])
                .map(|(n, is_tag)| async move {
                    let (app, session) = if n % 2 == 0 { (a, on_a) } else { (b, on_b) };
                    let token = Some(session.access_token.as_str());
                    if is_tag {
                        let path = format!("{user_path}/rooms/{}/tags/u.t{n}", enc(room_id));
                        app.put(&path, token, json!({"order": n})).await
                    } else {
                        let path = format!("/_matrix/client/v3/pushrules/global/content/r{n}");
                        let rule = json!({"pattern": format!("word{n}"), "actions": ["notify"]});
                        app.put(&path, token, rule).await
                    }
                });
        for resp in futures::future::join_all(changes).await {
            resp.expect_ok();
        }

        let tags = a
            .get(
                &format!("{user_path}/rooms/{}/tags", enc(room_id)),
                Some(&on_a.access_token),
            )
            .await;
        let mut names: Vec<&String> = tags.expect_ok()["tags"]
            .as_object()
            .expect("tags")
            .keys()
            .collect();
        names.sort();
        let expected: Vec<String> = (0..CHANGES).map(|n| format!("u.t{n}")).collect();
        assert_eq!(names, expected.iter().collect::<Vec<_>>(), "{}", tags.text);

        let rules = b
            .get(
                "/_matrix/client/v3/pushrules/global/",
                Some(&on_b.access_token),
            )
            .await;
        let mut ids: Vec<&str> = rules.expect_ok()["content"]
            .as_array()
            .expect("content rules")
            .iter()
            .filter(|rule| rule["default"] == false)
            .filter_map(|rule| rule["rule_id"].as_str())
            .collect();
        ids.sort_unstable();
        let expected: Vec<String> = (0..CHANGES).map(|n| format!("r{n}")).collect();
        assert_eq!(ids, expected.iter().map(String::as_str).collect::<Vec<_>>());
    })
    .await;
}
