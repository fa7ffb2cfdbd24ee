//! Conformance of what per-thread unread counts and presence expiry read and write, on every
//! backend: events remember their thread, unread candidates carry their thread, receipts are
//! found at their events' positions, and idle online users move to `unavailable` at one
//! position.

use palpo_storage::{
    Storage,
    model::{NewEvent, NewRoom, PresenceRecord, ReceiptRecord},
    testing::event_on,
};

palpo_storage::conformance!(
    threads_of_events,
    unread_candidates_with_threads,
    read_positions,
    presence_expiry
);

const ROOM: &str = "!threads:test";

/// Creates the room and persists `(event id, type, sender, thread)` one after the other;
/// returns their stream positions.
async fn room_with(s: &Storage, events: &[(&str, &str, &str, Option<&str>)]) -> Vec<i64> {
    s.rooms
        .create_room(&NewRoom {
            room_id: ROOM.to_owned(),
            room_version: "12".to_owned(),
            creator: "@a:test".to_owned(),
            is_public: false,
            created_at: 1,
        })
        .await
        .expect("create room");
    let mut positions = Vec::new();
    for (n, (event_id, event_type, sender, thread)) in events.iter().enumerate() {
        let room = s.rooms.get_room(ROOM).await.expect("room").expect("room");
        let persisted = s
            .rooms
            .persist_event(&NewEvent {
                thread_id: thread.map(str::to_owned),
                ..event_on(&room, event_id, event_type, sender, n as i64)
            })
            .await
            .expect("persist");
        positions.push(persisted.stream_ordering);
    }
    positions
}

const MESSAGE: &str = "m.room.message";

async fn threads_of_events(s: Storage) {
    room_with(
        &s,
        &[
            ("$root", MESSAGE, "@a:test", None),
            ("$reply", MESSAGE, "@a:test", Some("$root")),
        ],
    )
    .await;
    assert_eq!(
        s.rooms.thread_of_event("$reply").await.expect("thread"),
        Some("$root".to_owned())
    );
    assert_eq!(
        s.rooms.thread_of_event("$root").await.expect("thread"),
        None
    );
    assert_eq!(
        s.rooms.thread_of_event("$nope").await.expect("thread"),
        None
    );
}

fn read(user: &str, thread: Option<&str>, event: &str, kind: &str) -> ReceiptRecord {
    ReceiptRecord {
        room_id: ROOM.to_owned(),
        receipt_type: kind.to_owned(),
        user_id: user.to_owned(),
        thread_id: thread.map(str::to_owned),
        event_id: event.to_owned(),
        ts: 1,
        stream_position: 0,
    }
}

async fn unread_candidates_with_threads(s: Storage) {
    let positions = room_with(
        &s,
        &[
            ("$root", MESSAGE, "@a:test", None),
            ("$t1", MESSAGE, "@a:test", Some("$root")),
            ("$t2", MESSAGE, "@a:test", Some("$root")),
            ("$mine", MESSAGE, "@b:test", Some("$root")),
            ("$react", "m.reaction", "@a:test", Some("$root")),
            ("$other1", MESSAGE, "@a:test", Some("$other")),
            ("$main", MESSAGE, "@a:test", None),
        ],
    )
    .await;
    let max = *positions.last().expect("positions");
    let types = [MESSAGE];
    let ids = |events: &[(palpo_storage::model::EventRecord, Option<String>)]| {
        events
            .iter()
            .map(|(e, t)| (e.event_id.clone(), t.clone()))
            .collect::<Vec<_>>()
    };
    let thread = |id: &str, t: Option<&str>| (id.to_owned(), t.map(str::to_owned));
    let all = s
        .ephemeral
        .unread_candidates(&[(ROOM.to_owned(), 0)], "@b:test", &types, max, 100)
        .await
        .expect("candidates");
    assert_eq!(
        ids(&all),
        [
            thread("$root", None),
            thread("$t1", Some("$root")),
            thread("$t2", Some("$root")),
            thread("$other1", Some("$other")),
            thread("$main", None),
        ],
        "messages of others, oldest first, each with its thread"
    );
    // The range read of a woken sync carries the threads too (every event, every sender).
    let range = s
        .rooms
        .timeline_between(&[ROOM.to_owned()], positions[0], positions[4])
        .await
        .expect("range");
    assert_eq!(
        ids(&range),
        [
            thread("$t1", Some("$root")),
            thread("$t2", Some("$root")),
            thread("$mine", Some("$root")),
            thread("$react", Some("$root")),
        ]
    );
    let after_t2 = s
        .ephemeral
        .unread_candidates(
            &[(ROOM.to_owned(), positions[2])],
            "@b:test",
            &types,
            max,
            100,
        )
        .await
        .expect("candidates");
    assert_eq!(
        ids(&after_t2),
        [thread("$other1", Some("$other")), thread("$main", None)]
    );
    let one = s
        .ephemeral
        .unread_candidates(&[(ROOM.to_owned(), 0)], "@b:test", &types, max, 1)
        .await
        .expect("candidates");
    assert_eq!(ids(&one), [thread("$root", None)]);
}

async fn read_positions(s: Storage) {
    let positions = room_with(
        &s,
        &[
            ("$root", MESSAGE, "@a:test", None),
            ("$t1", MESSAGE, "@a:test", Some("$root")),
            ("$main", MESSAGE, "@a:test", None),
        ],
    )
    .await;
    let receipts = ["m.read", "m.read.private"];
    let rooms = [ROOM.to_owned(), "!elsewhere:test".to_owned()];
    assert!(
        s.ephemeral
            .read_positions("@b:test", &rooms, &receipts)
            .await
            .expect("positions")
            .is_empty()
    );
    for receipt in [
        read("@b:test", None, "$main", "m.read"),
        read("@b:test", Some("$root"), "$t1", "m.read.private"),
        read("@b:test", Some("main"), "$root", "m.read"),
        // Another user, another type, and an event with no position: left out.
        read("@c:test", None, "$main", "m.read"),
        read("@b:test", None, "$t1", "m.fully_read"),
        read("@b:test", Some("$x"), "$unknown", "m.read"),
    ] {
        s.ephemeral.put_receipt(&receipt).await.expect("receipt");
    }
    let found = s
        .ephemeral
        .read_positions("@b:test", &rooms, &receipts)
        .await
        .expect("positions");
    let found: Vec<(Option<&str>, i64)> = found
        .iter()
        .inspect(|p| assert_eq!(p.room_id, ROOM))
        .map(|p| (p.thread_id.as_deref(), p.stream_ordering))
        .collect();
    let mut expected = vec![
        (None, positions[2]),
        (Some("$root"), positions[1]),
        (Some("main"), positions[0]),
    ];
    expected.sort();
    assert_eq!(found, expected);
    assert!(
        s.ephemeral
            .read_positions("@b:test", &rooms[1..], &receipts)
            .await
            .expect("positions")
            .is_empty()
    );
}

fn presence(user: &str, state: &str, last_active_ts: i64) -> PresenceRecord {
    PresenceRecord {
        user_id: user.to_owned(),
        state: state.to_owned(),
        status_msg: Some("hello".to_owned()),
        last_active_ts,
        stream_position: 0,
    }
}

async fn presence_expiry(s: Storage) {
    assert_eq!(
        s.ephemeral.oldest_online_activity().await.expect("oldest"),
        None
    );
    assert_eq!(
        s.ephemeral.expire_presence(1_000).await.expect("expire"),
        None
    );
    s.ephemeral
        .set_presence(&presence("@a:test", "online", 100))
        .await
        .expect("set");
    s.ephemeral
        .set_presence(&presence("@b:test", "online", 500))
        .await
        .expect("set");
    let offline = s
        .ephemeral
        .set_presence(&presence("@c:test", "offline", 50))
        .await
        .expect("set");
    assert_eq!(
        s.ephemeral.oldest_online_activity().await.expect("oldest"),
        Some(100)
    );
    // Nobody inactive since before 100.
    assert_eq!(
        s.ephemeral.expire_presence(100).await.expect("expire"),
        None
    );
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let at = s
        .ephemeral
        .expire_presence(200)
        .await
        .expect("expire")
        .expect("alice went idle");
    assert_eq!(at, before + 1);
    let alice = s
        .ephemeral
        .get_presence("@a:test")
        .await
        .expect("get")
        .expect("alice");
    assert_eq!(alice.state, "unavailable");
    assert_eq!(alice.stream_position, at);
    assert_eq!(alice.last_active_ts, 100, "activity is not moved");
    assert_eq!(alice.status_msg.as_deref(), Some("hello"));
    let bob = s
        .ephemeral
        .get_presence("@b:test")
        .await
        .expect("get")
        .expect("bob");
    assert_eq!(bob.state, "online");
    let carol = s
        .ephemeral
        .get_presence("@c:test")
        .await
        .expect("get")
        .expect("carol");
    assert_eq!(
        (carol.state.as_str(), carol.stream_position),
        ("offline", offline)
    );
    assert_eq!(
        s.ephemeral.oldest_online_activity().await.expect("oldest"),
        Some(500)
    );
    // Again: nothing left to do, and no position taken.
    assert_eq!(
        s.ephemeral.expire_presence(200).await.expect("expire"),
        None
    );
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), at);
}
