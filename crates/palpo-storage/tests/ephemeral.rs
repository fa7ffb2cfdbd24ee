//! Conformance of the ephemeral repository (receipts, typing, presence) on every backend:
//! each change takes the next position of the one global stream, and reads return what
//! changed in a range of it.

use palpo_storage::{
    Storage,
    model::{NewEvent, PresenceRecord, ReceiptRecord},
    testing::{self, event_on},
};

palpo_storage::conformance!(
    receipts,
    typing,
    typing_expiry,
    presence,
    one_stream_with_events,
    unread_candidates,
);

const ROOM: &str = "!room:test";

/// Creates `room_id` and persists `(type, sender, membership)` one after the other.
async fn room_with_events(s: &Storage, room_id: &str, events: &[(&str, &str, Option<&str>)]) {
    testing::room_with_events(s, room_id, "12", events).await;
}

fn receipt(receipt_type: &str, user: &str, thread: Option<&str>, event: &str) -> ReceiptRecord {
    ReceiptRecord {
        room_id: ROOM.to_owned(),
        receipt_type: receipt_type.to_owned(),
        user_id: user.to_owned(),
        thread_id: thread.map(str::to_owned),
        event_id: event.to_owned(),
        ts: 77,
        stream_position: 0,
    }
}

async fn receipts(s: Storage) {
    let rooms = vec![ROOM.to_owned(), "!other:test".to_owned()];
    let start = s.rooms.max_stream_ordering().await.expect("max");
    let p1 = s
        .ephemeral
        .put_receipt(&receipt("m.read", "@a:test", None, "$e1"))
        .await
        .expect("put");
    assert_eq!(p1, start + 1, "the next position of the global stream");
    let p2 = s
        .ephemeral
        .put_receipt(&receipt("m.read", "@a:test", Some("$root"), "$e2"))
        .await
        .expect("put threaded");
    let p3 = s
        .ephemeral
        .put_receipt(&receipt("m.read.private", "@b:test", None, "$e1"))
        .await
        .expect("put private");
    assert!(p1 < p2 && p2 < p3);
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), p3);

    let unthreaded = s
        .ephemeral
        .get_receipt(ROOM, "m.read", "@a:test", None)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(unthreaded.event_id, "$e1");
    assert_eq!(unthreaded.thread_id, None);
    assert_eq!(unthreaded.ts, 77);
    assert_eq!(unthreaded.stream_position, p1);
    let threaded = s
        .ephemeral
        .get_receipt(ROOM, "m.read", "@a:test", Some("$root"))
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(threaded.thread_id.as_deref(), Some("$root"));
    assert!(
        s.ephemeral
            .get_receipt(ROOM, "m.read", "@A:test", None)
            .await
            .expect("get")
            .is_none(),
        "user ids are case-sensitive"
    );

    let all = s
        .ephemeral
        .receipts_changed(&rooms, 0, p3)
        .await
        .expect("changed");
    assert_eq!(all.len(), 3);
    let positions: Vec<i64> = all.iter().map(|r| r.stream_position).collect();
    assert_eq!(positions, [p1, p2, p3], "in stream order");
    let later = s
        .ephemeral
        .receipts_changed(&rooms, p1, p2)
        .await
        .expect("changed");
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].event_id, "$e2");
    assert!(
        s.ephemeral
            .receipts_changed(&["!other:test".to_owned()], 0, p3)
            .await
            .expect("changed")
            .is_empty()
    );

    // A newer receipt replaces the old one of the same type, user and thread.
    let p4 = s
        .ephemeral
        .put_receipt(&receipt("m.read", "@a:test", None, "$e3"))
        .await
        .expect("replace");
    let all = s
        .ephemeral
        .receipts_changed(&rooms, 0, p4)
        .await
        .expect("changed");
    assert_eq!(all.len(), 3);
    let mine = s
        .ephemeral
        .receipts_of_user(ROOM, "@a:test")
        .await
        .expect("of user");
    assert_eq!(mine.len(), 2);
    assert!(
        mine.iter()
            .any(|r| r.event_id == "$e3" && r.stream_position == p4)
    );
    let changed = s
        .ephemeral
        .receipts_changed(&rooms, p3, p4)
        .await
        .expect("changed");
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].event_id, "$e3");

    // Many rooms at once (more than one IN-list chunk).
    let many: Vec<String> = (0..450)
        .map(|n| format!("!r{n}:test"))
        .chain([ROOM.to_owned()])
        .collect();
    assert_eq!(
        s.ephemeral
            .receipts_changed(&many, 0, p4)
            .await
            .expect("changed")
            .len(),
        3
    );
}

async fn typing(s: Storage) {
    let rooms = vec![ROOM.to_owned()];
    let now = 1_000_000;
    let p1 = s
        .ephemeral
        .set_typing(ROOM, "@a:test", now + 10_000)
        .await
        .expect("typing");
    let rows = s
        .ephemeral
        .typing_changed(&rooms, p1 - 1, p1, now)
        .await
        .expect("changed");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].user_id, "@a:test");
    assert_eq!(rows[0].stream_position, p1);
    // After the change, still there as a current typer.
    let rows = s
        .ephemeral
        .typing_changed(&rooms, p1, p1, now)
        .await
        .expect("current");
    assert_eq!(rows.len(), 1);
    // But not once it ran out.
    assert!(
        s.ephemeral
            .typing_changed(&rooms, p1, p1, now + 20_000)
            .await
            .expect("current")
            .is_empty()
    );

    // Extending a running notification takes no position.
    assert!(
        s.ephemeral
            .extend_typing(ROOM, "@a:test", now + 15_000, now)
            .await
            .expect("extend")
    );
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), p1);
    assert!(
        !s.ephemeral
            .extend_typing(ROOM, "@b:test", now + 15_000, now)
            .await
            .expect("extend"),
        "b is not typing"
    );
    assert!(
        !s.ephemeral
            .extend_typing(ROOM, "@a:test", now + 30_000, now + 20_000)
            .await
            .expect("extend"),
        "ran out already"
    );

    // Stopping is a change with a position; the row says so.
    let p2 = s
        .ephemeral
        .set_typing(ROOM, "@a:test", 0)
        .await
        .expect("stop");
    assert!(p2 > p1);
    let rows = s
        .ephemeral
        .typing_changed(&rooms, p1, p2, now)
        .await
        .expect("changed");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].expires_at, 0);
    assert!(
        s.ephemeral
            .typing_changed(&rooms, p2, p2, now)
            .await
            .expect("changed")
            .is_empty()
    );
}

/// The stream's position and whether a typing notification ran out by `now`, as a sync reads
/// them.
async fn due(s: &Storage, now: i64) -> (i64, bool) {
    let read = s
        .ephemeral
        .sync_position(now, "@a:test", None, None)
        .await
        .expect("position");
    (read.position, read.typing_due)
}

async fn typing_expiry(s: Storage) {
    let rooms = vec![ROOM.to_owned(), "!b:test".to_owned()];
    let now = 5_000_000;
    assert_eq!(s.ephemeral.next_typing_expiry().await.expect("next"), None);
    assert_eq!(s.ephemeral.expire_typing(now).await.expect("expire"), None);
    s.ephemeral
        .set_typing(ROOM, "@a:test", now + 100)
        .await
        .expect("typing");
    let p = s
        .ephemeral
        .set_typing("!b:test", "@b:test", now + 5_000)
        .await
        .expect("typing");
    assert_eq!(
        s.ephemeral.next_typing_expiry().await.expect("next"),
        Some(now + 100)
    );
    assert_eq!(
        s.ephemeral.expire_typing(now).await.expect("expire"),
        None,
        "nothing ran out yet"
    );
    // The position and whether any ran out, in one read.
    assert_eq!(due(&s, now).await, (p, false));
    assert_eq!(due(&s, now + 200).await, (p, true));
    let expired = s
        .ephemeral
        .expire_typing(now + 200)
        .await
        .expect("expire")
        .expect("one ran out");
    assert!(expired > p);
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), expired);
    let rows = s
        .ephemeral
        .typing_changed(&rooms, p, expired, now + 200)
        .await
        .expect("changed");
    let mut rows: Vec<(String, i64)> = rows
        .into_iter()
        .map(|r| (r.user_id, r.expires_at))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("@a:test".to_owned(), 0),
            ("@b:test".to_owned(), now + 5_000)
        ]
    );
    assert_eq!(
        s.ephemeral.expire_typing(now + 200).await.expect("again"),
        None
    );
    assert_eq!(
        due(&s, now + 200).await,
        (expired, false),
        "announced already"
    );
    assert_eq!(
        s.ephemeral.next_typing_expiry().await.expect("next"),
        Some(now + 5_000)
    );
}

fn presence_of(user: &str, state: &str, status: Option<&str>, ts: i64) -> PresenceRecord {
    PresenceRecord {
        user_id: user.to_owned(),
        state: state.to_owned(),
        status_msg: status.map(str::to_owned),
        last_active_ts: ts,
        stream_position: 0,
    }
}

async fn presence(s: Storage) {
    room_with_events(
        &s,
        ROOM,
        &[
            ("m.room.member", "@alice:test", Some("join")),
            ("m.room.member", "@bob:test", Some("join")),
            ("m.room.member", "@dave:test", Some("invite")),
        ],
    )
    .await;
    assert!(
        s.ephemeral
            .get_presence("@alice:test")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        !s.ephemeral
            .touch_presence("@alice:test", 5)
            .await
            .expect("touch"),
        "no presence yet"
    );
    let before = s.rooms.max_stream_ordering().await.expect("max");
    let pa = s
        .ephemeral
        .set_presence(&presence_of("@alice:test", "online", Some("hi ✨"), 10))
        .await
        .expect("set");
    assert_eq!(pa, before + 1);
    let pb = s
        .ephemeral
        .set_presence(&presence_of("@bob:test", "unavailable", None, 11))
        .await
        .expect("set");
    let pc = s
        .ephemeral
        .set_presence(&presence_of("@carol:test", "online", None, 12))
        .await
        .expect("set");
    let pd = s
        .ephemeral
        .set_presence(&presence_of("@dave:test", "online", None, 13))
        .await
        .expect("set");
    let alice = s
        .ephemeral
        .get_presence("@alice:test")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(alice.state, "online");
    assert_eq!(alice.status_msg.as_deref(), Some("hi ✨"));
    assert_eq!(alice.stream_position, pa);

    // Alice sees herself and Bob (joined together), not Carol (no shared room) nor Dave
    // (only invited).
    let seen: Vec<String> = s
        .ephemeral
        .presence_changed("@alice:test", 0, pd)
        .await
        .expect("changed")
        .into_iter()
        .map(|p| p.user_id)
        .collect();
    assert_eq!(seen, ["@alice:test", "@bob:test"]);
    let seen = s
        .ephemeral
        .presence_changed("@alice:test", pa, pc)
        .await
        .expect("changed");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].user_id, "@bob:test");
    assert_eq!(seen[0].state, "unavailable");
    // Carol shares no room but sees her own.
    let seen = s
        .ephemeral
        .presence_changed("@carol:test", 0, pd)
        .await
        .expect("changed");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].user_id, "@carol:test");
    assert!(pb < pc);

    // Touching moves the last active time (forwards only) without a position.
    assert!(
        s.ephemeral
            .touch_presence("@alice:test", 50)
            .await
            .expect("touch")
    );
    assert!(
        !s.ephemeral
            .touch_presence("@alice:test", 40)
            .await
            .expect("touch")
    );
    let alice = s
        .ephemeral
        .get_presence("@alice:test")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!((alice.last_active_ts, alice.stream_position), (50, pa));
    assert_eq!(s.rooms.max_stream_ordering().await.expect("max"), pd);

    // A new state replaces the row with a new position.
    let pa2 = s
        .ephemeral
        .set_presence(&presence_of("@alice:test", "offline", None, 60))
        .await
        .expect("set");
    let alice = s
        .ephemeral
        .get_presence("@alice:test")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(alice.state, "offline");
    assert_eq!(alice.status_msg, None);
    assert_eq!(alice.stream_position, pa2);
}

async fn one_stream_with_events(s: Storage) {
    room_with_events(&s, ROOM, &[("m.room.member", "@a:test", Some("join"))]).await;
    let event = s.rooms.max_stream_ordering().await.expect("max");
    let receipt_at = s
        .ephemeral
        .put_receipt(&receipt("m.read", "@a:test", None, "$x"))
        .await
        .expect("receipt");
    let typing_at = s
        .ephemeral
        .set_typing(ROOM, "@a:test", 99)
        .await
        .expect("typing");
    let presence_at = s
        .ephemeral
        .set_presence(&presence_of("@a:test", "online", None, 1))
        .await
        .expect("presence");
    assert_eq!(
        [receipt_at, typing_at, presence_at],
        [event + 1, event + 2, event + 3]
    );
    let room = s.rooms.get_room(ROOM).await.expect("room").expect("room");
    let persisted = s
        .rooms
        .persist_event(&NewEvent {
            origin_server_ts: 5,
            ..event_on(&room, "$after", "m.room.message", "@a:test", 1)
        })
        .await
        .expect("persist");
    assert_eq!(persisted.stream_ordering, event + 4);
    // Receipts, typing and presence are not timeline events.
    assert_eq!(
        s.rooms
            .rooms_changed_between(event, event + 3)
            .await
            .expect("changed"),
        Vec::<String>::new()
    );
}

async fn unread_candidates(s: Storage) {
    room_with_events(
        &s,
        ROOM,
        &[
            ("m.room.member", "@a:test", Some("join")),
            ("m.room.member", "@b:test", Some("join")),
            ("m.room.message", "@a:test", None),
            ("m.room.message", "@b:test", None),
            ("m.reaction", "@a:test", None),
            ("m.room.encrypted", "@a:test", None),
            ("m.room.message", "@a:test", None),
        ],
    )
    .await;
    let max = s.rooms.max_stream_ordering().await.expect("max");
    let types = ["m.room.message", "m.room.encrypted"];
    let all = s
        .ephemeral
        .unread_candidates(&[(ROOM.to_owned(), 0)], "@b:test", &types, max, 100)
        .await
        .expect("candidates");
    let kinds: Vec<&str> = all.iter().map(|(e, _)| e.event_type.as_str()).collect();
    assert_eq!(
        kinds,
        ["m.room.message", "m.room.encrypted", "m.room.message"],
        "messages of others, oldest first"
    );
    let after_first = all[0].0.stream_ordering.expect("position");
    let rest = s
        .ephemeral
        .unread_candidates(
            &[(ROOM.to_owned(), after_first)],
            "@b:test",
            &types,
            max,
            100,
        )
        .await
        .expect("candidates");
    assert_eq!(rest.len(), 2);
    let limited = s
        .ephemeral
        .unread_candidates(&[(ROOM.to_owned(), 0)], "@b:test", &types, max, 1)
        .await
        .expect("candidates");
    assert_eq!(limited.len(), 1);
    assert!(
        s.ephemeral
            .unread_candidates(&[(ROOM.to_owned(), 0)], "@b:test", &[], max, 10)
            .await
            .expect("candidates")
            .is_empty()
    );
}
