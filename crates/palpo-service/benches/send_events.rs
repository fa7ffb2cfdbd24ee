//! Sends N events into one room and reports persisted events per second, per backend.
//!
//! ```text
//! cargo bench -p palpo-service --bench send_events -- [--events N] [--senders C] [--backends sqlite,postgres,mysql]
//! ```
//! Each backend gets a fresh database (the test servers of `palpo_storage::testing`). Senders
//! are concurrent users of one room, each sending `N / C` messages; the figure includes event
//! building, signing, authorization and the persisting transaction.

use std::{sync::Arc, time::Instant};

use palpo_core::Config;
use palpo_service::{
    Services,
    rooms::{CreateRoom, Preset},
};
use palpo_storage::{Backend, testing::with_database};
use serde_json::json;

struct Options {
    events: usize,
    senders: usize,
    backends: Vec<Backend>,
}

fn options() -> Options {
    let mut options = Options {
        events: 1000,
        senders: 8,
        backends: vec![Backend::Sqlite, Backend::Postgres, Backend::MySql],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events" => {
                options.events = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(options.events)
            }
            "--senders" => {
                options.senders = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(options.senders)
                    .max(1)
            }
            "--backends" => {
                options.backends = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|b| match b {
                        "sqlite" => Some(Backend::Sqlite),
                        "postgres" => Some(Backend::Postgres),
                        "mysql" => Some(Backend::MySql),
                        _ => None,
                    })
                    .collect()
            }
            // `cargo bench` passes `--bench`.
            _ => {}
        }
    }
    options
}

async fn run(backend: Backend, events: usize, senders: usize) -> f64 {
    with_database(backend, |db| async move {
        let env = vec![("PALPO__SERVER_NAME".to_owned(), "bench.local".to_owned())];
        let config = Arc::new(Config::load_from(None, env).expect("config"));
        let services = Services::new(config, db.storage().await);
        let mut users = Vec::new();
        for i in 0..senders {
            let user_id = format!("@user{i}:bench.local");
            services
                .accounts
                .create_account(&user_id, None, false)
                .await
                .expect("user");
            users.push(user_id);
        }
        let room_id = services
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
            services
                .rooms
                .join(user, &room_id, None)
                .await
                .expect("join");
        }
        let per_sender = events / senders;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for user in users {
            let rooms = services.rooms.clone();
            let room_id = room_id.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..per_sender {
                    rooms
                        .send_message(
                            &user,
                            "BENCH",
                            &room_id,
                            "m.room.message",
                            &n.to_string(),
                            json!({"msgtype": "m.text", "body": format!("message {n}")}),
                        )
                        .await
                        .expect("send");
                }
            }));
        }
        for task in tasks {
            task.await.expect("sender");
        }
        (per_sender * senders) as f64 / started.elapsed().as_secs_f64()
    })
    .await
}

#[tokio::main]
async fn main() {
    let options = options();
    println!(
        "events: {}, concurrent senders: {}",
        options.events, options.senders
    );
    println!("{:<10} {:>12}", "backend", "events/s");
    for backend in &options.backends {
        let rate = run(*backend, options.events, options.senders).await;
        println!("{:<10} {:>12.0}", backend.name(), rate);
    }
}
