//! How many SQL statements one incremental `/sync` pass issues (a user woken by a new message in
//! one of their rooms), and one message's send. Every statement is a round trip (on SQLite a
//! hand-off to the connection's thread), listeners sync hundreds of times a second and every
//! send waits for its batch's, so the counts are kept low on purpose; this test lists the
//! statements and fails when they grow.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use palpo_tests::{Backend, TestApp, enc, next_batch, run, sync};
use serde_json::json;
use tracing::field::{Field, Visit};
use tracing_subscriber::{Layer, layer::SubscriberExt};

/// The statements sqlx logs (target `sqlx::query`) while recording is on.
#[derive(Clone, Default)]
struct Recorder {
    on: Arc<AtomicBool>,
    statements: Arc<Mutex<Vec<String>>>,
}

struct Summary(String);

impl Visit for Summary {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "db.statement" && !value.trim().is_empty() {
            self.0 = value.split_whitespace().collect::<Vec<_>>().join(" ");
        } else if field.name() == "summary" && self.0.is_empty() {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" && self.0.is_empty() {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" || !self.on.load(Ordering::SeqCst) {
            return;
        }
        let mut summary = Summary(String::new());
        event.record(&mut summary);
        if let Ok(mut statements) = self.statements.lock() {
            statements.push(summary.0);
        }
    }
}

impl Recorder {
    fn start(&self) {
        if let Ok(mut statements) = self.statements.lock() {
            statements.clear();
        }
        self.on.store(true, Ordering::SeqCst);
    }

    fn stop(&self) -> Vec<String> {
        self.on.store(false, Ordering::SeqCst);
        self.statements
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

/// Statements one incremental sync (position with the token check and the key counts; the
/// news of the user's rooms, unread counts' messages among them) may issue.
const MAX_STATEMENTS: usize = 2;

/// The access token's own lookup: a repeated send or sync takes the token from memory and
/// checks it with its own work instead.
const TOKEN_LOOKUP: &str = "SELECT user_id, device_id FROM access_tokens";

/// The statements of one incremental sync woken by a message, and of a long-poll from where
/// the stream stands that waits 50 ms for nothing.
async fn woken_by_a_message(app: &TestApp, recorder: &Recorder) -> (Vec<String>, Vec<String>) {
    let alice = app.register("alice", "pw").await;
    let bob = app.register("bob", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    app.join_room(&bob.access_token, &room_id).await;
    let mut since = next_batch(&sync(app, &alice.access_token, None, 0).await);
    // A few rounds, so that what is kept between passes is warm, as for a listener.
    let mut statements = Vec::new();
    for round in 0..3 {
        app.send_text(&bob.access_token, &room_id, &format!("hi {round}"))
            .await;
        recorder.start();
        let response = sync(app, &alice.access_token, Some(&since), 0).await;
        statements = recorder.stop();
        assert!(
            timeline_has(&response, &room_id, &format!("hi {round}")),
            "the message is in the sync: {response}"
        );
        since = next_batch(&response);
    }
    // Nothing new: a long-poll that waits (50 ms) and answers empty.
    recorder.start();
    let response = sync(app, &alice.access_token, Some(&since), 50).await;
    let idle = recorder.stop();
    assert_eq!(next_batch(&response), since, "nothing new: {response}");
    let list = numbered(&idle);
    assert!(
        !idle
            .iter()
            .any(|s| s.contains("MIN(expires_at)") && !s.starts_with("SELECT counter_value")),
        "when typing runs out next is read with the position, not on its own:\n{list}"
    );
    (statements, idle)
}

/// The statements of the last of a few sends of a message into a room (warm, as under load).
/// Before it, an event the auth rules refuse: a refused event leaves the room's head as it was,
/// so the next send still reads nothing before building.
async fn sending_a_message(app: &TestApp, recorder: &Recorder) -> Vec<String> {
    let alice = app.register("carol", "pw").await;
    let room_id = app
        .create_room(&alice.access_token, json!({"preset": "public_chat"}))
        .await;
    let mut statements = Vec::new();
    for round in 0..3 {
        if round == 2 {
            // A second create event: built on the head, then refused by the auth rules.
            let path = format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.create/",
                enc(&room_id)
            );
            let refused = app.put(&path, Some(&alice.access_token), json!({})).await;
            assert_eq!(refused.status, 403, "{}", refused.text);
        }
        recorder.start();
        app.send_text(&alice.access_token, &room_id, &format!("sent {round}"))
            .await;
        statements = recorder.stop();
    }
    statements
}

/// The statements of a burst of messages sent at once into two rooms by two users, which the
/// event writer takes in batches of several events, rooms, transaction ids and tokens.
async fn a_burst_of_messages(app: &TestApp, recorder: &Recorder) -> Vec<String> {
    let dave = app.register("dave", "pw").await;
    let erin = app.register("erin", "pw").await;
    let mut rooms = Vec::new();
    for _ in 0..2 {
        let room_id = app
            .create_room(&dave.access_token, json!({"preset": "public_chat"}))
            .await;
        app.join_room(&erin.access_token, &room_id).await;
        rooms.push(room_id);
    }
    let sends: Vec<(usize, &str, &str)> = (0..12)
        .map(|n| {
            let sender = if n % 2 == 0 { &dave } else { &erin };
            (n, sender.access_token.as_str(), rooms[n % 4 / 2].as_str())
        })
        .collect();
    recorder.start();
    futures::future::join_all(sends.iter().map(|(n, token, room_id)| async move {
        app.send_text(token, room_id, &format!("burst {n}")).await
    }))
    .await;
    recorder.stop()
}

/// The statements while one message wakes four long-polls of four users in its room: the
/// syncs woken together read the stream's position together (one read each would be four).
async fn four_woken_at_once(app: &TestApp, recorder: &Recorder) -> Vec<String> {
    let owner = app.register("frank", "pw").await;
    let room_id = app
        .create_room(&owner.access_token, json!({"preset": "public_chat"}))
        .await;
    let mut tokens = Vec::new();
    for n in 0..4 {
        let listener = app.register(&format!("listener{n}"), "pw").await;
        app.join_room(&listener.access_token, &room_id).await;
        tokens.push(listener.access_token);
    }
    // Every join done, and every listener online (its first sync's presence): each
    // long-poll starts where the stream stands.
    let mut listeners = Vec::new();
    for token in tokens {
        let since = next_batch(&sync(app, &token, None, 0).await);
        listeners.push((token, since));
    }
    for (token, since) in &mut listeners {
        *since = next_batch(&sync(app, token, Some(since), 0).await);
    }
    let polls = futures::future::join_all(
        listeners
            .iter()
            .map(|(token, since)| sync(app, token, Some(since), 10_000)),
    );
    let send = async {
        // Long enough for every long-poll to be waiting.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        recorder.start();
        app.send_text(&owner.access_token, &room_id, "wake up")
            .await;
    };
    let (responses, ()) = tokio::join!(polls, send);
    let statements = recorder.stop();
    for response in responses {
        assert!(
            timeline_has(&response, &room_id, "wake up"),
            "every listener has the message: {response}"
        );
    }
    statements
}

/// Whether the sync `response` has a message `body` in the timeline of `room_id`.
fn timeline_has(response: &serde_json::Value, room_id: &str, body: &str) -> bool {
    response["rooms"]["join"][room_id]["timeline"]["events"]
        .as_array()
        .is_some_and(|events| events.iter().any(|e| e["content"]["body"] == body))
}

fn numbered(statements: &[String]) -> String {
    statements
        .iter()
        .enumerate()
        .map(|(n, s)| format!("{:>3}. {s}", n + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_sync_pass_issues_few_statements() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let recorder = recorder.clone();
        run(backend, false, async move |app: &TestApp| {
            let sent = sending_a_message(app, &recorder).await;
            let list = numbered(&sent);
            println!("{backend:?}: a send, {} statements\n{list}", sent.len());
            assert!(
                !sent.iter().any(|s| s.starts_with(TOKEN_LOOKUP)),
                "{backend:?}: the token is checked in the batch, not looked up:\n{list}"
            );
            if backend == Backend::Sqlite {
                // The batch: its reads (the token's check among them) begin the transaction
                // and its writes commit it (the batch was 7 queries before its reads became
                // one, 4 before the BEGIN and COMMIT went with them; the token was looked up
                // on its own before it was remembered).
                assert_eq!(sent.len(), 2, "SQLite send:\n{list}");
                assert!(
                    sent[0].starts_with("BEGIN IMMEDIATE;")
                        && sent[0].contains("UNION ALL")
                        && sent[0].contains("FROM access_tokens"),
                    "the reads begin the batch and check the token:\n{list}"
                );
                assert!(
                    sent[1].starts_with("INSERT") && sent[1].ends_with("COMMIT"),
                    "the writes commit the batch:\n{list}"
                );
            }
            if backend == Backend::Postgres {
                // The rooms locked with the reads; every write, the stream counter taken by
                // it (a message changes no state), COMMIT (12 before the reads after the lock became one statement and the
                // writes on either side of the counter one statement each; 6 before the
                // counter was locked with the rooms and the extremities checked by the
                // write).
                assert_eq!(sent.len(), 3, "PostgreSQL send:\n{list}");
                assert!(
                    sent[0].contains("FOR UPDATE")
                        && !sent[0].contains("id_counters")
                        && sent[0].contains("FROM access_tokens"),
                    "the first statement locks the room, not the stream counter, and checks \
                     the token:\n{list}"
                );
                assert!(
                    sent[1].starts_with("WITH ")
                        && sent[1].contains("INSERT INTO events")
                        && sent[1].contains("UPDATE id_counters"),
                    "the writes go as data-modifying WITH parts of one statement:\n{list}"
                );
                // Batches of any size send the same two texts (arrays, not lists), so that
                // each connection parses and plans them once. (A batch written again the
                // usual way after a conflict sends other statements; they are left out.)
                let burst = a_burst_of_messages(app, &recorder).await;
                let batch_statements: Vec<&String> = burst
                    .iter()
                    .filter(|s| s.starts_with("WITH locked AS") || s.contains("RETURNING 1"))
                    .collect();
                assert!(
                    batch_statements.len() >= 2,
                    "the burst's batches:\n{}",
                    numbered(&burst)
                );
                for statement in batch_statements {
                    assert!(
                        statement == &sent[0] || statement == &sent[1],
                        "a batch statement of another text than one message's:\n{statement}\n\
                         one message's:\n{list}"
                    );
                }
            }

            let woken = four_woken_at_once(app, &recorder).await;
            let shared = woken
                .iter()
                .filter(|s| s.starts_with("SELECT counter_value"))
                .count();
            assert!(
                // Four alone; how many share the first read depends on when each woken
                // task runs.
                (1..=3).contains(&shared),
                "{backend:?}: {shared} position reads for four syncs woken at once:\n{}",
                numbered(&woken)
            );

            let (statements, idle) = woken_by_a_message(app, &recorder).await;
            let positions = idle
                .iter()
                .filter(|s| s.starts_with("SELECT counter_value"))
                .count();
            // SQLite's one process knows when nothing was written since the token (the last
            // sync read that position): the long-poll waits first and reads once, at its end.
            // Another process may write to PostgreSQL or MySQL: it reads before it waits too.
            let expected = if backend == Backend::Sqlite { 1 } else { 2 };
            assert_eq!(
                positions,
                expected,
                "{backend:?}: position reads of a long-poll from the stream's head:\n{}",
                numbered(&idle)
            );
            let list = numbered(&statements);
            println!("{backend:?}: {} statements\n{list}", statements.len());
            // 22 before the user's rooms were read once, the key counts, device lists,
            // to-device inbox and the position with the typing check became one statement
            // each, the summary was left out when unchanged and presence was remembered;
            // 15 before the sections with nothing new (per the heads read with the
            // position) were skipped; 9 before the user's memberships, read positions and
            // display name were kept while the heads of memberships and receipts stood still;
            // 6 before the token was checked by the position's read instead of looked up;
            // 5 before the rooms that moved, their windows and the messages the unread counts
            // count came from one read of the user's rooms' events since the token; 3 before
            // the device's key counts came with the position.
            assert!(
                !statements.iter().any(|s| s.starts_with(TOKEN_LOOKUP)),
                "{backend:?}: the token is checked with the position, not looked up:\n{list}"
            );
            assert!(
                statements.len() <= MAX_STATEMENTS,
                "{backend:?}: {} statements, at most {MAX_STATEMENTS} expected:\n{list}",
                statements.len()
            );
            assert!(
                !statements.iter().any(|s| s.contains("FROM presence WHERE")),
                "{backend:?}: a steady sync neither reads nor writes the user's presence:\n{list}"
            );
            assert!(
                !statements
                    .iter()
                    .any(|s| s.contains("FROM room_memberships WHERE room_id")),
                "{backend:?}: members unchanged, no summary read:\n{list}"
            );
            for separate in ["SELECT DISTINCT room_id FROM events", "AND sender <> "] {
                assert!(
                    !statements.iter().any(|s| s.contains(separate)),
                    "{backend:?}: news read once, `{separate}` not read on its own:\n{list}"
                );
            }
            for unchanged in [
                "FROM room_memberships WHERE user_id",
                "FROM profiles WHERE user_id",
                "FROM receipts r",
                "FROM account_data WHERE user_id",
                "FROM to_device_messages WHERE user_id",
                "FROM device_list_changes c",
                "FROM typing WHERE room_id",
                "FROM receipts WHERE room_id",
                "FROM presence p",
                "SELECT 'o' AS kind",
            ] {
                assert!(
                    !statements
                        .iter()
                        .filter(|s| !s.starts_with("SELECT counter_value"))
                        .any(|s| s.contains(unchanged)),
                    "{backend:?}: only a message is new, `{unchanged}` not read:\n{list}"
                );
            }
        })
        .await;
    }
}
