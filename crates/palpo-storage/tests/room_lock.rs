//! The room write lock is held across processes (two pools on one database), released by
//! `release` and by drop, and independent between rooms. The lock is the room's row, so the
//! rooms exist first.

use std::time::Duration;

use palpo_storage::{Backend, Storage, model::NewRoom, testing::with_database};

async fn create_room(storage: &Storage, room_id: &str) {
    storage
        .rooms
        .create_room(&NewRoom {
            room_id: room_id.to_owned(),
            room_version: "12".to_owned(),
            creator: "@a:test.local".to_owned(),
            is_public: false,
            created_at: 0,
        })
        .await
        .expect("room");
}

async fn room_lock_excludes_other_processes(backend: Backend) {
    with_database(backend, |db| async move {
        let process_a = db.storage().await;
        let process_b = db.storage().await;
        create_room(&process_a, "!room:test.local").await;
        create_room(&process_a, "!other:test.local").await;
        let held = process_a
            .rooms
            .lock_room_writes("!room:test.local")
            .await
            .expect("lock");

        // Another room is not blocked.
        let other = process_b
            .rooms
            .lock_room_writes("!other:test.local")
            .await
            .expect("other room");
        other.release().await.expect("release other");

        // The same room waits for the holder.
        let waiter = {
            let rooms = process_b.rooms.clone();
            tokio::spawn(async move { rooms.lock_room_writes("!room:test.local").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "second process got a held room lock");
        held.release().await.expect("release");
        let second = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("lock granted after release")
            .expect("task")
            .expect("lock");

        // Dropped without release (a cancelled request): the lock still frees.
        drop(second);
        let third = tokio::time::timeout(
            Duration::from_secs(10),
            process_a.rooms.lock_room_writes("!room:test.local"),
        )
        .await
        .expect("lock freed by drop")
        .expect("lock");
        third.release().await.expect("release");
    })
    .await
}

// SQLite serves one process, where the in-process lock suffices; the call must still work.
#[tokio::test]
async fn sqlite_lock_is_a_no_op() {
    with_database(Backend::Sqlite, |db| async move {
        let storage = db.storage().await;
        let a = storage.rooms.lock_room_writes("!r:t").await.expect("lock");
        let b = storage.rooms.lock_room_writes("!r:t").await.expect("lock");
        a.release().await.expect("release");
        b.release().await.expect("release");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    room_lock_excludes_other_processes(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql() {
    room_lock_excludes_other_processes(Backend::MySql).await
}
