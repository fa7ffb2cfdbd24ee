//! Group commit on every backend: several events of several rooms persisted in one
//! transaction, each exactly as it would be alone; conflicting ones write nothing and leave
//! the others be; a failing transaction writes nothing at all.

use palpo_storage::{
    Backend, LockTurn, Storage, StorageError,
    db::{CHECKPOINT_EVERY_EVENTS, Pool},
    model::{NewEvent, RoomRecord, TokenCheck, TxnKey},
    testing::{self, event_on},
};

palpo_storage::conformance!(
    batch_writes_events_of_several_rooms,
    conflicting_events_write_nothing,
    failed_batch_writes_nothing,
    redaction_of_an_event_in_the_same_batch,
    the_writer_checkpoints_the_log_after_enough_events,
    events_sent_with_a_revoked_token_write_nothing,
    a_batch_locks_its_rooms_after_the_batch_before,
    a_batch_of_messages_takes_consecutive_positions,
);

const ROOM_A: &str = "!a:test";
const ROOM_B: &str = "!b:test";
const MESSAGE: &str = "m.room.message";

async fn two_rooms(s: &Storage) -> (RoomRecord, RoomRecord) {
    let join = [("m.room.member", "@a:test", Some("join"))];
    testing::room_with_events(s, ROOM_A, "12", &join).await;
    testing::room_with_events(s, ROOM_B, "12", &join).await;
    (room(s, ROOM_A).await, room(s, ROOM_B).await)
}

async fn room(s: &Storage, room_id: &str) -> RoomRecord {
    s.rooms
        .get_room(room_id)
        .await
        .expect("get room")
        .expect("room exists")
}

fn txn(txn_id: &str) -> TxnKey {
    TxnKey {
        user_id: "@a:test".into(),
        device_id: "DEV".into(),
        txn_id: txn_id.into(),
    }
}

fn is_conflict<T: std::fmt::Debug>(outcome: &Result<T, StorageError>, what: &str) -> bool {
    matches!(outcome, Err(StorageError::Conflict(w)) if w.contains(what))
}

async fn batch_writes_events_of_several_rooms(s: Storage) {
    let (a, b) = two_rooms(&s).await;
    let used = NewEvent {
        txn: Some(txn("used")),
        ..event_on(&a, "$a-used", MESSAGE, "@a:test", 5)
    };
    s.rooms.persist_event(&used).await.expect("persist alone");
    let a = room(&s, ROOM_A).await;
    let before = s.rooms.max_stream_ordering().await.expect("max");

    let a1 = NewEvent {
        txn: Some(txn("fresh")),
        ..event_on(&a, "$a1", MESSAGE, "@a:test", 10)
    };
    let b1 = NewEvent {
        state_key: Some("@d:test".into()),
        membership: Some("join".into()),
        ..event_on(&b, "$b1", "m.room.member", "@d:test", 10)
    };
    // Built on $a1, as the next event of the room.
    let a2 = NewEvent {
        prev_events: vec!["$a1".into()],
        expected_write_version: a.write_version + 1,
        ..event_on(&a, "$a2", MESSAGE, "@a:test", 11)
    };
    // Built on room B as it was before $b1: the room moved on.
    let b_stale = event_on(&b, "$b-stale", MESSAGE, "@a:test", 10);
    // Its transaction id was used by $a-used.
    let a_retry = NewEvent {
        txn: Some(txn("used")),
        prev_events: vec!["$a2".into()],
        expected_write_version: a.write_version + 2,
        ..event_on(&a, "$a-retry", MESSAGE, "@a:test", 12)
    };
    // Its transaction id is $a1's, in the same batch.
    let a_dup = NewEvent {
        txn: Some(txn("fresh")),
        prev_events: vec!["$a2".into()],
        expected_write_version: a.write_version + 2,
        ..event_on(&a, "$a-dup", MESSAGE, "@a:test", 12)
    };
    let outcomes = s
        .rooms
        .persist_events(&[a1, b1, a2, b_stale, a_retry, a_dup])
        .await
        .expect("batch");
    assert_eq!(outcomes.len(), 6);
    assert!(
        is_conflict(&outcomes[5], "transaction id"),
        "{:?}",
        outcomes[5]
    );
    assert!(
        is_conflict(&outcomes[3], "room changed"),
        "{:?}",
        outcomes[3]
    );
    assert!(
        is_conflict(&outcomes[4], "transaction id"),
        "{:?}",
        outcomes[4]
    );
    let [a1, b1, a2] = [0, 1, 2].map(|i| *outcomes[i].as_ref().expect("written"));
    // Consecutive positions in the order given, right after what was there.
    assert_eq!(
        [a1, b1, a2].map(|p| p.stream_ordering),
        [before + 1, before + 2, before + 3]
    );
    assert_eq!(
        s.rooms.max_stream_ordering().await.expect("max"),
        before + 3
    );
    // Messages keep their room's state group; the member event starts one numbered by its
    // position, holding the room's earlier state as well.
    assert_eq!(a1.state_group, a.state_group);
    assert_eq!(a2.state_group, a.state_group);
    assert_eq!(b1.state_group, Some(b1.stream_ordering));
    let state = s
        .rooms
        .state_at_group(b1.stream_ordering)
        .await
        .expect("state");
    assert_eq!(
        state.get(&("m.room.member".into(), "@d:test".into())),
        Some(&"$b1".to_owned())
    );
    assert_eq!(
        state.get(&("m.room.member".into(), "@a:test".into())),
        Some(&format!("${ROOM_B}0"))
    );

    let a_now = room(&s, ROOM_A).await;
    assert_eq!(a_now.write_version, a.write_version + 2);
    assert_eq!(a_now.forward_extremities, vec!["$a2".to_owned()]);
    assert_eq!(a_now.max_depth, 12);
    assert_eq!(a_now.state_group, a.state_group);
    let b_now = room(&s, ROOM_B).await;
    assert_eq!(b_now.write_version, b.write_version + 1);
    assert_eq!(b_now.forward_extremities, vec!["$b1".to_owned()]);
    assert_eq!(b_now.state_group, Some(b1.stream_ordering));
    let current = s.rooms.current_state(ROOM_B).await.expect("current state");
    assert_eq!(current, state);
    let member = s
        .rooms
        .membership(ROOM_B, "@d:test")
        .await
        .expect("membership")
        .expect("member");
    assert_eq!(
        (member.membership.as_str(), member.stream_ordering),
        ("join", b1.stream_ordering)
    );

    // What conflicted is not there; the transaction ids point where they should.
    for id in ["$b-stale", "$a-retry", "$a-dup"] {
        assert!(s.rooms.get_event(id).await.expect("get").is_none(), "{id}");
    }
    let stored = s
        .rooms
        .get_event("$a2")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored.stream_ordering, Some(a2.stream_ordering));
    assert_eq!(
        s.rooms.txn_event(&txn("used")).await.expect("txn"),
        Some("$a-used".into())
    );
    assert_eq!(
        s.rooms.txn_event(&txn("fresh")).await.expect("txn"),
        Some("$a1".into())
    );
}

async fn conflicting_events_write_nothing(s: Storage) {
    let (a, _) = two_rooms(&s).await;
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let stale = NewEvent {
        expected_write_version: a.write_version - 1,
        ..event_on(&a, "$stale", MESSAGE, "@a:test", 3)
    };
    let unknown = NewEvent {
        room_id: "!unknown:test".into(),
        ..event_on(&a, "$unknown", MESSAGE, "@a:test", 3)
    };
    // The write version matches, but the event was built on one that was never written (a
    // head that went ahead of the commits).
    let on_a_ghost = NewEvent {
        prev_events: vec!["$ghost".into()],
        ..event_on(&a, "$on-a-ghost", MESSAGE, "@a:test", 3)
    };
    let outcomes = s
        .rooms
        .persist_events(&[stale, unknown, on_a_ghost])
        .await
        .expect("batch");
    assert!(
        is_conflict(&outcomes[2], "room changed"),
        "{:?}",
        outcomes[2]
    );
    assert!(
        is_conflict(&outcomes[0], "room changed"),
        "{:?}",
        outcomes[0]
    );
    assert!(is_conflict(&outcomes[1], "no room"), "{:?}", outcomes[1]);
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), before);
    assert_eq!(room(&s, ROOM_A).await, a);
    assert!(s.rooms.persist_events(&[]).await.expect("empty").is_empty());
    // Rolled back: the next batch writes.
    let fine = event_on(&a, "$after-conflicts", MESSAGE, "@a:test", 3);
    let outcomes = s.rooms.persist_events(&[fine]).await.expect("next batch");
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
}

async fn failed_batch_writes_nothing(s: Storage) {
    let (a, b) = two_rooms(&s).await;
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let fine = NewEvent {
        txn: Some(txn("fine")),
        ..event_on(&b, "$fine", MESSAGE, "@a:test", 3)
    };
    // The id of an event already stored: the batch's insert fails.
    let duplicate = event_on(&a, &format!("${ROOM_A}0"), MESSAGE, "@a:test", 3);
    let error = s
        .rooms
        .persist_events(&[fine.clone(), duplicate])
        .await
        .expect_err("duplicate event id");
    assert!(matches!(error, StorageError::Conflict(_)), "{error:?}");
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), before);
    assert!(s.rooms.get_event("$fine").await.expect("get").is_none());
    assert_eq!(s.rooms.txn_event(&txn("fine")).await.expect("txn"), None);
    assert_eq!(room(&s, ROOM_A).await, a);
    assert_eq!(room(&s, ROOM_B).await, b);
    // The transaction was ended (on SQLite by closing its connection): the next batch writes.
    let outcomes = s.rooms.persist_events(&[fine]).await.expect("next batch");
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    assert!(s.rooms.get_event("$fine").await.expect("get").is_some());
}

async fn redaction_of_an_event_in_the_same_batch(s: Storage) {
    let (a, _) = two_rooms(&s).await;
    let earlier = format!("${ROOM_A}0");
    let message = event_on(&a, "$message", MESSAGE, "@a:test", 3);
    // Redacts the message (in this batch) and an event stored before it.
    let redact_message = NewEvent {
        redacts: Some("$message".into()),
        prev_events: vec!["$message".into()],
        expected_write_version: a.write_version + 1,
        ..event_on(&a, "$redact-message", "m.room.redaction", "@a:test", 4)
    };
    let redact_earlier = NewEvent {
        redacts: Some(earlier.clone()),
        prev_events: vec!["$redact-message".into()],
        expected_write_version: a.write_version + 2,
        ..event_on(&a, "$redact-earlier", "m.room.redaction", "@a:test", 5)
    };
    let outcomes = s
        .rooms
        .persist_events(&[message, redact_message, redact_earlier])
        .await
        .expect("batch");
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    for (id, by) in [
        ("$message", "$redact-message"),
        (&earlier, "$redact-earlier"),
    ] {
        let event = s.rooms.get_event(id).await.expect("get").expect("stored");
        assert_eq!(event.redacted_by.as_deref(), Some(by), "{id}");
    }
    assert_eq!(
        room(&s, ROOM_A).await.forward_extremities,
        vec!["$redact-earlier".to_owned()]
    );
}

/// Persists `n` messages into room A, one transaction each, telling the writer after each.
async fn messages_one_by_one(s: &Storage, n: usize, tag: &str) {
    for i in 0..n {
        let a = room(s, ROOM_A).await;
        let event = event_on(&a, &format!("${tag}{i}"), MESSAGE, "@a:test", 10 + i as i64);
        let outcomes = s.rooms.persist_events(&[event]).await.expect("persist");
        assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
        s.rooms.after_batch(1);
    }
}

/// SQLite: the frames in the write-ahead log (and how many of them are checkpointed), read
/// by checkpointing it.
async fn log_frames(s: &Storage) -> (i64, i64) {
    let Pool::Sqlite(conns) = s.db().primary() else {
        unreachable!("SQLite only")
    };
    let writer = conns.pool().expect("the writer is a pool");
    let (_busy, log, checkpointed): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(writer)
            .await
            .expect("checkpoint");
    (log, checkpointed)
}

async fn the_writer_checkpoints_the_log_after_enough_events(s: Storage) {
    two_rooms(&s).await;
    // Every backend accepts the call; only SQLite has a log of its own to checkpoint.
    messages_one_by_one(&s, CHECKPOINT_EVERY_EVENTS, "first").await;
    if s.db().backend() != Backend::Sqlite {
        return;
    }
    // The writer had the log checkpointed after the last of those (beside it, on a
    // connection of its own: waited for here), so the next commit started the log over: it
    // holds that one transaction's frames, not the 41 transactions' (each commit writes at
    // least one frame). Left to SQLite (1000 pages, here 10 000) it would hold all.
    s.db().checkpoints_settled().await;
    messages_one_by_one(&s, 1, "next").await;
    let (log, checkpointed) = log_frames(&s).await;
    assert!(
        log < CHECKPOINT_EVERY_EVENTS as i64,
        "the log holds {log} frames ({checkpointed} checkpointed)"
    );
    // Below the threshold nothing is checkpointed: the log grows.
    messages_one_by_one(&s, CHECKPOINT_EVERY_EVENTS / 2, "more").await;
    let (grown, _) = log_frames(&s).await;
    assert!(
        grown > log,
        "{grown} frames after more events, {log} before"
    );
}

/// Logs `user_id`'s device `device_id` in with the token hashed `token_hash`.
async fn logged_in(s: &Storage, user_id: &str, device_id: &str, token_hash: &str) -> TokenCheck {
    s.users
        .create_user(&testing::new_user(user_id))
        .await
        .expect("create user");
    s.devices
        .login_device(&testing::device_login(user_id, device_id, token_hash))
        .await
        .expect("login");
    TokenCheck {
        token_hash: token_hash.to_owned(),
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
    }
}

/// Events whose sender was remembered from an access token: the batch writes those whose token
/// still belongs to the device and refuses the others (`UnknownToken`, nothing written), and
/// the sync position read checks the token the same way.
async fn events_sent_with_a_revoked_token_write_nothing(s: Storage) {
    let (a, b) = two_rooms(&s).await;
    let live = logged_in(&s, "@a:test", "LIVE", "live-hash").await;
    let revoked = logged_in(&s, "@d:test", "GONE", "gone-hash").await;
    s.devices
        .delete_devices("@d:test", &["GONE".to_owned()])
        .await
        .expect("log out");
    // A token that exists, but is another device's than the one remembered.
    let wrong_device = TokenCheck {
        device_id: "OTHER".into(),
        ..live.clone()
    };
    let before = s.rooms.max_stream_ordering().await.expect("max");

    let ok = NewEvent {
        sent_with: Some(live.clone()),
        ..event_on(&a, "$live", MESSAGE, "@a:test", 10)
    };
    let refused = NewEvent {
        sent_with: Some(revoked.clone()),
        ..event_on(&b, "$revoked", MESSAGE, "@d:test", 10)
    };
    let misattributed = NewEvent {
        sent_with: Some(wrong_device.clone()),
        prev_events: vec!["$live".into()],
        expected_write_version: a.write_version + 1,
        ..event_on(&a, "$wrong-device", MESSAGE, "@a:test", 11)
    };
    let outcomes = s
        .rooms
        .persist_events(&[ok, refused, misattributed])
        .await
        .expect("batch");
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    assert!(
        matches!(outcomes[1], Err(StorageError::UnknownToken)),
        "{:?}",
        outcomes[1]
    );
    assert!(
        matches!(outcomes[2], Err(StorageError::UnknownToken)),
        "{:?}",
        outcomes[2]
    );
    assert!(s.rooms.get_event("$live").await.expect("read").is_some());
    for refused in ["$revoked", "$wrong-device"] {
        assert!(
            s.rooms.get_event(refused).await.expect("read").is_none(),
            "{refused} was written"
        );
    }
    assert_eq!(
        s.rooms.max_stream_ordering().await.expect("max"),
        before + 1
    );
    // Room B did not move: its next event builds on its head as it was.
    let b_after = room(&s, ROOM_B).await;
    assert_eq!(b_after.write_version, b.write_version);

    // The sync's position read checks the token in the same statement.
    let read = s
        .ephemeral
        .sync_position(1, "@a:test", Some("LIVE"), Some(&live))
        .await
        .expect("live token");
    assert!(read.position > before, "{read:?}");
    for gone in [&revoked, &wrong_device] {
        assert!(matches!(
            s.ephemeral
                .sync_position(1, &gone.user_id, Some(&gone.device_id), Some(gone))
                .await,
            Err(StorageError::UnknownToken)
        ));
    }
}

/// Two batches written at once, the second's event built on the first's: started first, the
/// second still waits for the first to lock its room (its turn), and so finds the room as
/// the first left it instead of a write version short.
async fn a_batch_locks_its_rooms_after_the_batch_before(s: Storage) {
    let (a, _) = two_rooms(&s).await;
    let first_event = event_on(&a, "$first", MESSAGE, "@a:test", 5);
    let built_on_it = NewEvent {
        prev_events: vec!["$first".into()],
        expected_write_version: a.write_version + 1,
        ..event_on(&a, "$built-on-first", MESSAGE, "@a:test", 6)
    };
    let mut first_turn = LockTurn::default();
    let second_turn = first_turn.then();
    let rooms = s.rooms.clone();
    let second = tokio::spawn(async move {
        rooms
            .persist_events_in_turn(&[built_on_it], second_turn)
            .await
    });
    // Long enough for the second batch to have locked the room, had it not waited.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "the second batch did not wait");
    let first = s
        .rooms
        .persist_events_in_turn(&[first_event], first_turn)
        .await
        .expect("first batch");
    let second = second.await.expect("join").expect("second batch");
    let [first, second] = [&first[0], &second[0]].map(|o| o.as_ref().expect("written"));
    assert_eq!(second.stream_ordering, first.stream_ordering + 1);
    let room = room(&s, ROOM_A).await;
    assert_eq!(room.forward_extremities, vec!["$built-on-first".to_owned()]);
    assert_eq!(room.write_version, a.write_version + 2);

    // A turn whose batch before ended without locking anything comes all the same.
    let mut dropped = LockTurn::default();
    let after_dropped = dropped.then();
    drop(dropped);
    let next = event_on(&room, "$after-dropped", MESSAGE, "@a:test", 7);
    let outcomes = s
        .rooms
        .persist_events_in_turn(&[next], after_dropped)
        .await
        .expect("batch after a dropped turn");
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
}

/// A batch of messages only (on PostgreSQL its write statement takes the stream counter and
/// the events read their positions from it): consecutive positions in the order given, right
/// after what was there, stored as answered; the rooms keep their state groups and move on
/// by as many writes as they got, whatever took the counter.
async fn a_batch_of_messages_takes_consecutive_positions(s: Storage) {
    let (a, b) = two_rooms(&s).await;
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let a1 = event_on(&a, "$m-a1", MESSAGE, "@a:test", 10);
    let b1 = event_on(&b, "$m-b1", MESSAGE, "@a:test", 10);
    let a2 = NewEvent {
        prev_events: vec!["$m-a1".into()],
        expected_write_version: a.write_version + 1,
        ..event_on(&a, "$m-a2", MESSAGE, "@a:test", 11)
    };
    let outcomes = s.rooms.persist_events(&[a1, b1, a2]).await.expect("batch");
    let written: Vec<_> = outcomes
        .iter()
        .map(|o| *o.as_ref().expect("written"))
        .collect();
    assert_eq!(
        written
            .iter()
            .map(|p| p.stream_ordering)
            .collect::<Vec<_>>(),
        [before + 1, before + 2, before + 3]
    );
    assert_eq!(
        written.iter().map(|p| p.state_group).collect::<Vec<_>>(),
        [a.state_group, b.state_group, a.state_group]
    );
    for (event_id, position) in [("$m-a1", 1), ("$m-b1", 2), ("$m-a2", 3)] {
        let stored = s
            .rooms
            .get_event(event_id)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(
            stored.stream_ordering,
            Some(before + position),
            "{event_id}"
        );
    }
    assert_eq!(
        s.rooms.max_stream_ordering().await.expect("max"),
        before + 3
    );
    assert_eq!(room(&s, ROOM_A).await.write_version, a.write_version + 2);
    assert_eq!(room(&s, ROOM_B).await.write_version, b.write_version + 1);
    // The next batch goes on from there.
    let a3 = NewEvent {
        prev_events: vec!["$m-a2".into()],
        expected_write_version: a.write_version + 2,
        ..event_on(&a, "$m-a3", MESSAGE, "@a:test", 12)
    };
    let next = s.rooms.persist_events(&[a3]).await.expect("next batch");
    assert_eq!(
        next[0].as_ref().expect("written").stream_ordering,
        before + 4
    );
}
