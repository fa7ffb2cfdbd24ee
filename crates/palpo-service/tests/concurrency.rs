//! Two server processes on one database send into one room at the same time. Each "process"
//! here is a separate `Services` with its own connection pool and its own in-process room
//! locks, so only the database coordinates them — as with two `palpo serve` processes.
//! Expected: one linear timeline, no duplicate depth, no forked extremities, nothing lost.

use std::{collections::HashSet, sync::Arc};

use palpo_core::Config;
use palpo_service::{
    Services,
    rooms::{CreateRoom, MessagesQuery, Preset, TimelineFilter},
};
use palpo_storage::{Backend, Storage, model::Direction, testing::with_database};
use serde_json::{Value, json};

const SERVER: &str = "test.local";
const PER_SENDER: usize = 25;

fn config() -> Arc<Config> {
    let env = vec![("PALPO__SERVER_NAME".to_owned(), SERVER.to_owned())];
    Arc::new(Config::load_from(None, env).expect("config"))
}

async fn two_processes_one_room(backend: Backend) {
    with_database(backend, |db| async move {
        let process_a = Services::new(config(), db.storage().await);
        let process_b = Services::new(config(), db.storage().await);
        let mut users = Vec::new();
        for name in ["alice", "bob", "carol", "dave"] {
            let user_id = format!("@{name}:{SERVER}");
            process_a
                .accounts
                .create_account(&user_id, Some("pw".into()), false)
                .await
                .expect("user");
            users.push(user_id);
        }
        let room_id = process_a
            .rooms
            .create_room(
                &users[0],
                CreateRoom {
                    preset: Some(Preset::PublicChat),
                    ..CreateRoom::default()
                },
            )
            .await
            .expect("room");
        for user in &users[1..] {
            process_b
                .rooms
                .join(user, &room_id, None)
                .await
                .expect("join");
        }
        // Each user sends from both processes at once.
        let mut tasks = Vec::new();
        for (i, user) in users.iter().enumerate() {
            for (p, process) in [&process_a, &process_b].into_iter().enumerate() {
                let rooms = process.rooms.clone();
                let (user, room_id) = (user.clone(), room_id.clone());
                tasks.push(tokio::spawn(async move {
                    for n in 0..PER_SENDER {
                        rooms
                            .send_message(
                                &user,
                                &format!("P{p}"),
                                &room_id,
                                "m.room.message",
                                &format!("{i}-{p}-{n}"),
                                json!({ "msgtype": "m.text", "body": format!("{i}-{p}-{n}") }),
                            )
                            .await
                            .expect("send");
                    }
                }));
            }
        }
        for task in tasks {
            task.await.expect("sender task");
        }

        let storage = db.storage().await;
        assert_linear_timeline(&storage, &room_id, users.len() * 2 * PER_SENDER).await;

        // Every message is readable through /messages, exactly once.
        let page = process_b
            .rooms
            .messages(
                &users[1],
                &room_id,
                &MessagesQuery {
                    from: None,
                    to: None,
                    dir: Direction::Backward,
                    limit: 1000,
                    filter: TimelineFilter {
                        types: Some(vec!["m.room.message".into()]),
                        ..TimelineFilter::default()
                    },
                },
            )
            .await
            .expect("messages");
        let bodies: HashSet<String> = page
            .chunk
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(page.chunk.len(), users.len() * 2 * PER_SENDER);
        assert_eq!(bodies.len(), page.chunk.len(), "no duplicates");
    })
    .await
}

// SQLite serves one process (one writer connection); several processes need a server database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_one_room_postgres() {
    two_processes_one_room(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_one_room_mysql() {
    two_processes_one_room(Backend::MySql).await
}

/// The room's timeline is one chain in stream order (each event cites the one before it, depth
/// grows), with one forward extremity and `expected_messages` messages.
async fn assert_linear_timeline(storage: &Storage, room_id: &str, expected_messages: usize) {
    let room = storage
        .rooms
        .get_room(room_id)
        .await
        .expect("room")
        .expect("exists");
    assert_eq!(
        room.forward_extremities.len(),
        1,
        "timeline forked: {:?}",
        room.forward_extremities
    );

    // Walk the whole timeline in stream order.
    let events = storage
        .rooms
        .room_events(room_id, 0, None, Direction::Forward, 100_000)
        .await
        .expect("events");
    let mut depths = HashSet::new();
    let mut previous: Option<(String, i64)> = None;
    for event in &events {
        assert!(
            depths.insert(event.depth),
            "duplicate depth {}",
            event.depth
        );
        let pdu: Value = serde_json::from_str(&event.pdu_json).expect("json");
        if let Some((prev_id, prev_depth)) = &previous {
            assert!(
                event.depth > *prev_depth,
                "depth must grow along the stream"
            );
            assert_eq!(
                pdu["prev_events"],
                json!([prev_id]),
                "each event follows the last one"
            );
        }
        previous = Some((event.event_id.clone(), event.depth));
    }
    let messages = events
        .iter()
        .filter(|e| e.event_type == "m.room.message")
        .count();
    assert_eq!(messages, expected_messages);
}

/// Every user sends into every room at once, from one process (SQLite) or two: events of
/// several rooms are committed together, and each room's timeline stays one chain.
async fn several_rooms_at_once(backend: Backend) {
    with_database(backend, |db| async move {
        let first = Services::new(config(), db.storage().await);
        // SQLite serves one process.
        let second = match backend {
            Backend::Sqlite => None,
            _ => Some(Services::new(config(), db.storage().await)),
        };
        let processes: Vec<&Services> = std::iter::once(&first).chain(second.as_ref()).collect();
        let mut users = Vec::new();
        for name in ["alice", "bob", "carol"] {
            let user_id = format!("@{name}:{SERVER}");
            first
                .accounts
                .create_account(&user_id, Some("pw".into()), false)
                .await
                .expect("user");
            users.push(user_id);
        }
        let mut room_ids = Vec::new();
        for _ in 0..4 {
            let room_id = first
                .rooms
                .create_room(
                    &users[0],
                    CreateRoom {
                        preset: Some(Preset::PublicChat),
                        ..CreateRoom::default()
                    },
                )
                .await
                .expect("room");
            for user in &users[1..] {
                first.rooms.join(user, &room_id, None).await.expect("join");
            }
            room_ids.push(room_id);
        }
        let mut tasks = Vec::new();
        for (p, process) in processes.iter().enumerate() {
            for user in &users {
                for room_id in &room_ids {
                    let rooms = process.rooms.clone();
                    let (user, room_id) = (user.clone(), room_id.clone());
                    tasks.push(tokio::spawn(async move {
                        for n in 0..10 {
                            let txn = format!("{room_id}-{p}-{n}");
                            rooms
                                .send_message(
                                    &user,
                                    "DEV",
                                    &room_id,
                                    "m.room.message",
                                    &txn,
                                    json!({ "msgtype": "m.text", "body": txn }),
                                )
                                .await
                                .expect("send");
                        }
                    }));
                }
            }
        }
        for task in tasks {
            task.await.expect("sender task");
        }
        let storage = db.storage().await;
        for room_id in &room_ids {
            assert_linear_timeline(&storage, room_id, processes.len() * users.len() * 10).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_rooms_at_once_sqlite() {
    several_rooms_at_once(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_rooms_at_once_postgres() {
    several_rooms_at_once(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_rooms_at_once_mysql() {
    several_rooms_at_once(Backend::MySql).await
}
