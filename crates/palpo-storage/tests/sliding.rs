//! Conformance of `SlidingSyncRepo` (simplified sliding sync connections) on every backend:
//! positions and room sets round-trip, positions the client moved past are deleted, a
//! restarted or idle connection forgets everything, and a device's connections are bounded.

use palpo_storage::{
    Storage,
    model::{NewSlidingPosition, SlidingRoomRecord, SlidingRoomSet},
};

palpo_storage::conformance!(
    positions_and_room_sets_round_trip,
    acknowledged_positions_delete_older_ones,
    restart_forgets_the_connection,
    idle_connections_are_deleted,
    devices_hold_a_bounded_number_of_connections,
    room_account_data_of_one_type,
    concurrent_connections_all_succeed,
);

const ALICE: &str = "@alice:test";

fn room(id: &str, sent_upto: Option<i64>, required_state: &str) -> SlidingRoomRecord {
    SlidingRoomRecord {
        room_id: id.to_owned(),
        membership: "join".to_owned(),
        sent_upto,
        required_state: required_state.to_owned(),
    }
}

fn sorted(mut rooms: Vec<SlidingRoomRecord>) -> Vec<SlidingRoomRecord> {
    rooms.sort_by(|a, b| a.room_id.cmp(&b.room_id));
    rooms
}

async fn add(
    s: &Storage,
    key: i64,
    acknowledged: Option<i64>,
    stream_position: i64,
    rooms: SlidingRoomSet,
) -> palpo_storage::model::SlidingPositionRecord {
    s.sliding
        .add_sliding_position(&NewSlidingPosition {
            connection_key: key,
            acknowledged,
            stream_position,
            rooms,
            now: 1000 + stream_position,
        })
        .await
        .expect("add position")
        .expect("the connection exists")
}

async fn positions_and_room_sets_round_trip(s: Storage) {
    let repo = &s.sliding;
    let key = repo
        .start_sliding_connection(ALICE, "DEV", "main", 1000, 10)
        .await
        .expect("start");
    let names = r#"[["m.room.name",""]]"#;
    let everything = r#"[["*","*"]]"#;
    let rooms = vec![
        room("!a:test", None, names),
        room("!b:test", Some(7), names),
        SlidingRoomRecord {
            membership: "invite".to_owned(),
            ..room("!c:test", None, everything)
        },
    ];
    let first = add(&s, key, None, 10, SlidingRoomSet::New(rooms.clone())).await;
    assert_eq!(first.stream_position, 10);
    let found = repo
        .sliding_position(ALICE, "DEV", "main", key, first.position_id, 0)
        .await
        .expect("read")
        .expect("known");
    assert_eq!(found.stream_position, 10);
    assert_eq!(found.room_set, first.room_set);
    assert_eq!(
        sorted(
            repo.sliding_rooms(key, found.room_set)
                .await
                .expect("rooms")
        ),
        sorted(rooms.clone())
    );

    // Someone else's connection, another device or conn_id, an idle connection: unknown.
    for (user, device, conn) in [
        ("@bob:test", "DEV", "main"),
        (ALICE, "OTHER", "main"),
        (ALICE, "DEV", "other"),
    ] {
        assert!(
            repo.sliding_position(user, device, conn, key, first.position_id, 0)
                .await
                .expect("read")
                .is_none()
        );
    }
    assert!(
        repo.sliding_position(ALICE, "DEV", "main", key, first.position_id, 5000)
            .await
            .expect("read")
            .is_none(),
        "not used since"
    );
    assert!(
        repo.sliding_position(ALICE, "DEV", "main", key, first.position_id + 1, 0)
            .await
            .expect("read")
            .is_none(),
        "never handed out"
    );

    // An answer that changed no room shares the set.
    let second = add(
        &s,
        key,
        Some(first.position_id),
        12,
        SlidingRoomSet::Same(first.room_set),
    )
    .await;
    assert!(second.position_id > first.position_id);
    assert_eq!(second.room_set, first.room_set);
    // A changed set: a new one.
    let mut changed = rooms.clone();
    changed[0].sent_upto = Some(12);
    changed.push(room("!d:test", None, everything));
    let third = add(
        &s,
        key,
        Some(second.position_id),
        15,
        SlidingRoomSet::New(changed.clone()),
    )
    .await;
    assert_ne!(third.room_set, first.room_set);
    assert_eq!(
        sorted(
            repo.sliding_rooms(key, third.room_set)
                .await
                .expect("rooms")
        ),
        sorted(changed)
    );
    // The set of the acknowledged position is still there (the client may ask again).
    let again = repo
        .sliding_position(ALICE, "DEV", "main", key, second.position_id, 0)
        .await
        .expect("read")
        .expect("the acknowledged position is kept");
    assert_eq!(
        sorted(
            repo.sliding_rooms(key, again.room_set)
                .await
                .expect("rooms")
        ),
        sorted(rooms)
    );
    // Big sets round-trip too (several statements' worth).
    let many: Vec<_> = (0..450)
        .map(|n| room(&format!("!r{n:04}:test"), (n % 3 == 0).then_some(n), names))
        .collect();
    let big = add(
        &s,
        key,
        Some(third.position_id),
        20,
        SlidingRoomSet::New(many.clone()),
    )
    .await;
    assert_eq!(
        sorted(repo.sliding_rooms(key, big.room_set).await.expect("rooms")),
        sorted(many)
    );
}

async fn acknowledged_positions_delete_older_ones(s: Storage) {
    let repo = &s.sliding;
    let key = repo
        .start_sliding_connection(ALICE, "DEV", "main", 1000, 10)
        .await
        .expect("start");
    let first = add(
        &s,
        key,
        None,
        1,
        SlidingRoomSet::New(vec![room("!a:test", None, "[]")]),
    )
    .await;
    let second = add(
        &s,
        key,
        Some(first.position_id),
        2,
        SlidingRoomSet::New(vec![room("!b:test", None, "[]")]),
    )
    .await;
    // The client retries `second` twice (it lost the answers): both answers stay usable.
    let third = add(
        &s,
        key,
        Some(second.position_id),
        3,
        SlidingRoomSet::Same(second.room_set),
    )
    .await;
    let retry = add(
        &s,
        key,
        Some(second.position_id),
        3,
        SlidingRoomSet::New(vec![room("!c:test", None, "[]")]),
    )
    .await;
    let known = async |position: i64| {
        repo.sliding_position(ALICE, "DEV", "main", key, position, 0)
            .await
            .expect("read")
            .is_some()
    };
    assert!(
        !known(first.position_id).await,
        "older than the acknowledged"
    );
    assert!(known(second.position_id).await);
    assert!(known(third.position_id).await);
    assert!(known(retry.position_id).await);
    // Moving on from `retry` forgets the rest, and the room sets only they used.
    let fourth = add(
        &s,
        key,
        Some(retry.position_id),
        4,
        SlidingRoomSet::Same(retry.room_set),
    )
    .await;
    assert!(!known(second.position_id).await);
    assert!(!known(third.position_id).await);
    assert!(known(retry.position_id).await);
    assert!(known(fourth.position_id).await);
    assert!(
        repo.sliding_rooms(key, second.room_set)
            .await
            .expect("rooms")
            .is_empty(),
        "no position uses it"
    );
    // Continuing from a position that is gone hands out nothing.
    let stale = repo
        .add_sliding_position(&NewSlidingPosition {
            connection_key: key,
            acknowledged: Some(second.position_id),
            stream_position: 5,
            rooms: SlidingRoomSet::Same(second.room_set),
            now: 2000,
        })
        .await
        .expect("add");
    assert_eq!(stale, None);
    // Retrying one position many times keeps only the last few answers.
    let mut last = fourth;
    for n in 0..20 {
        last = add(
            &s,
            key,
            Some(fourth.position_id),
            10 + n,
            SlidingRoomSet::Same(fourth.room_set),
        )
        .await;
    }
    assert!(
        known(fourth.position_id).await,
        "the acknowledged one stays"
    );
    assert!(known(last.position_id).await);
    assert!(!known(last.position_id - 10).await);
}

async fn restart_forgets_the_connection(s: Storage) {
    let repo = &s.sliding;
    let key = repo
        .start_sliding_connection(ALICE, "DEV", "main", 1000, 10)
        .await
        .expect("start");
    let first = add(
        &s,
        key,
        None,
        1,
        SlidingRoomSet::New(vec![room("!a:test", None, "[]")]),
    )
    .await;
    let other = repo
        .start_sliding_connection(ALICE, "DEV", "other", 1000, 10)
        .await
        .expect("start");
    let others = add(&s, other, None, 1, SlidingRoomSet::New(Vec::new())).await;
    let restarted = repo
        .start_sliding_connection(ALICE, "DEV", "main", 1001, 10)
        .await
        .expect("restart");
    assert_ne!(restarted, key);
    assert!(
        repo.sliding_position(ALICE, "DEV", "main", key, first.position_id, 0)
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        repo.sliding_rooms(key, first.room_set)
            .await
            .expect("rooms")
            .is_empty()
    );
    assert_eq!(
        repo.add_sliding_position(&NewSlidingPosition {
            connection_key: key,
            acknowledged: Some(first.position_id),
            stream_position: 2,
            rooms: SlidingRoomSet::Same(first.room_set),
            now: 1002,
        })
        .await
        .expect("add"),
        None,
        "the old connection is gone"
    );
    // Other connections are untouched.
    assert!(
        repo.sliding_position(ALICE, "DEV", "other", other, others.position_id, 0)
            .await
            .expect("read")
            .is_some()
    );
    // Concurrent starts of one connection: one wins, none fails.
    let starts = (0..4).map(|_| {
        let repo = s.sliding.clone();
        async move {
            repo.start_sliding_connection(ALICE, "DEV", "race", 1000, 10)
                .await
                .expect("start")
        }
    });
    futures::future::join_all(starts).await;
}

async fn idle_connections_are_deleted(s: Storage) {
    let repo = &s.sliding;
    let idle = repo
        .start_sliding_connection(ALICE, "DEV", "idle", 1000, 10)
        .await
        .expect("start");
    let idle_pos = add(
        &s,
        idle,
        None,
        1,
        SlidingRoomSet::New(vec![room("!a:test", None, "[]")]),
    )
    .await;
    let busy = repo
        .start_sliding_connection(ALICE, "DEV", "busy", 1000, 10)
        .await
        .expect("start");
    let busy_pos = add(
        &s,
        busy,
        None,
        1,
        SlidingRoomSet::New(vec![room("!a:test", None, "[]")]),
    )
    .await;
    repo.touch_sliding_connection(busy, 9000)
        .await
        .expect("touch");
    assert_eq!(
        repo.delete_idle_sliding_connections(5000, 100)
            .await
            .expect("delete"),
        1
    );
    assert!(
        repo.sliding_position(ALICE, "DEV", "idle", idle, idle_pos.position_id, 0)
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        repo.sliding_rooms(idle, idle_pos.room_set)
            .await
            .expect("rooms")
            .is_empty()
    );
    let kept = repo
        .sliding_position(ALICE, "DEV", "busy", busy, busy_pos.position_id, 0)
        .await
        .expect("read")
        .expect("used recently");
    assert_eq!(kept.last_used_ts, 9000);
    assert_eq!(
        repo.sliding_rooms(busy, kept.room_set)
            .await
            .expect("rooms")
            .len(),
        1
    );
}

async fn devices_hold_a_bounded_number_of_connections(s: Storage) {
    let repo = &s.sliding;
    let mut keys = Vec::new();
    for n in 0..5 {
        let key = repo
            .start_sliding_connection(ALICE, "DEV", &format!("c{n}"), 1000 + n, 3)
            .await
            .expect("start");
        repo.touch_sliding_connection(key, 2000 + n)
            .await
            .expect("touch");
        keys.push(key);
    }
    // Another device's connections do not count.
    repo.start_sliding_connection(ALICE, "OTHER", "c0", 1000, 3)
        .await
        .expect("start");
    let mut alive = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        let pos = repo
            .add_sliding_position(&NewSlidingPosition {
                connection_key: *key,
                acknowledged: None,
                stream_position: 1,
                rooms: SlidingRoomSet::New(Vec::new()),
                now: 3000,
            })
            .await
            .expect("add");
        if pos.is_some() {
            alive.push(n);
        }
    }
    assert_eq!(alive, [2, 3, 4], "the three most recently used");
}

async fn room_account_data_of_one_type(s: Storage) {
    s.account_data
        .put_account_data(ALICE, Some("!a:test"), "m.tag", r#"{"tags":{"u.x":{}}}"#)
        .await
        .expect("put");
    s.account_data
        .put_account_data(ALICE, Some("!b:test"), "m.other", "{}")
        .await
        .expect("put");
    s.account_data
        .put_account_data(ALICE, None, "m.tag", "{}")
        .await
        .expect("put");
    s.account_data
        .put_account_data("@bob:test", Some("!a:test"), "m.tag", "{}")
        .await
        .expect("put");
    let tags = s
        .sliding
        .room_account_data_of_type(ALICE, "m.tag")
        .await
        .expect("read");
    assert_eq!(tags.len(), 1, "{tags:?}");
    assert_eq!(tags[0].room_id.as_deref(), Some("!a:test"));
    assert_eq!(tags[0].content, r#"{"tags":{"u.x":{}}}"#);
}

/// Many connections answering at once (each writing a new room set and deleting the old one)
/// never fail: on MySQL their gap locks can deadlock, and the transaction is retried.
async fn concurrent_connections_all_succeed(s: Storage) {
    let mut keys = Vec::new();
    for n in 0..16 {
        keys.push(
            s.sliding
                .start_sliding_connection(ALICE, &format!("D{n}"), "main", 1000, 10)
                .await
                .expect("start"),
        );
    }
    let runs = keys.into_iter().enumerate().map(|(n, key)| {
        let repo = s.sliding.clone();
        async move {
            let mut acknowledged = None;
            for round in 0..30i64 {
                // Some rounds empty: a connection without rows locks the gap up to its
                // neighbour's.
                let count = if (round + n as i64) % 3 == 0 { 0 } else { 20 };
                let rooms = (0..count)
                    .map(|r| room(&format!("!r{r}:test"), (r % 2 == 0).then_some(round), "[]"))
                    .collect();
                let position = repo
                    .add_sliding_position(&NewSlidingPosition {
                        connection_key: key,
                        acknowledged,
                        stream_position: round,
                        rooms: SlidingRoomSet::New(rooms),
                        now: 2000 + round,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("connection {n}, round {round}: {e}"))
                    .expect("the connection exists");
                acknowledged = Some(position.position_id);
            }
        }
    });
    futures::future::join_all(runs).await;
}
