//! Conformance of the reads a sync makes for many rooms at once, on every backend: for each
//! room they give what the one-room read gives (timeline windows, members, versions, state of
//! groups, unread candidates), with each room's own bounds and limits.

use palpo_storage::{
    Storage,
    model::Direction,
    testing::{self, event_on},
};

palpo_storage::conformance!(
    latest_events_in_rooms,
    timeline_between_rooms,
    stream_range_of_every_room,
    members_and_versions_of_rooms,
    states_of_groups,
    unread_candidates_in_rooms,
);

const ROOM_A: &str = "!a:test";
const ROOM_B: &str = "!b:test";
const ROOM_EMPTY: &str = "!empty:test";
const MESSAGE: &str = "m.room.message";

/// Two rooms interleaved in the stream, and one without events.
async fn two_rooms(s: &Storage) {
    testing::room_with_events(
        s,
        ROOM_A,
        "12",
        &[
            ("m.room.member", "@a:test", Some("join")),
            ("m.room.member", "@b:test", Some("join")),
            (MESSAGE, "@a:test", None),
        ],
    )
    .await;
    testing::room_with_events(
        s,
        ROOM_B,
        "11",
        &[
            ("m.room.member", "@a:test", Some("join")),
            (MESSAGE, "@a:test", None),
            ("m.room.member", "@c:test", Some("invite")),
        ],
    )
    .await;
    for n in 0..4 {
        let room = s.rooms.get_room(ROOM_A).await.expect("room").expect("room");
        s.rooms
            .persist_event(&event_on(
                &room,
                &format!("$a-more{n}"),
                MESSAGE,
                "@b:test",
                10 + n,
            ))
            .await
            .expect("persist");
    }
    testing::room_with_events(s, ROOM_EMPTY, "12", &[]).await;
}

fn rooms() -> Vec<String> {
    [ROOM_A, ROOM_B, ROOM_EMPTY, "!unknown:test"]
        .map(str::to_owned)
        .to_vec()
}

async fn latest_events_in_rooms(s: Storage) {
    two_rooms(&s).await;
    let max = s.rooms.max_stream_ordering().await.expect("max");
    for (before, limit) in [(max + 1, 3), (max + 1, 100), (max - 2, 2), (0, 5)] {
        let batched = s
            .rooms
            .latest_events_in(&rooms(), before, limit)
            .await
            .expect("batched");
        let mut one_by_one = Vec::new();
        for room in rooms() {
            one_by_one.extend(
                s.rooms
                    .room_events(&room, before, None, Direction::Backward, limit)
                    .await
                    .expect("room events"),
            );
        }
        assert_eq!(batched, one_by_one, "before {before}, limit {limit}");
    }
    let newest = s
        .rooms
        .latest_events_in(&rooms(), max + 1, 2)
        .await
        .expect("batched");
    let ids: Vec<&str> = newest.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, ["$a-more3", "$a-more2", "$!b:test2", "$!b:test1"]);
}

async fn timeline_between_rooms(s: Storage) {
    two_rooms(&s).await;
    let max = s.rooms.max_stream_ordering().await.expect("max");
    for (after, up_to) in [(0, max), (max - 3, max), (max - 3, max - 1), (max, max)] {
        let read = s
            .rooms
            .timeline_between(&rooms(), after, up_to)
            .await
            .expect("range");
        let mut one_by_one = Vec::new();
        for room in rooms() {
            one_by_one.extend(
                s.rooms
                    .room_events(&room, after, Some(up_to + 1), Direction::Forward, 1000)
                    .await
                    .expect("room events"),
            );
        }
        one_by_one.sort_by_key(|e| e.stream_ordering);
        let events: Vec<_> = read.iter().map(|(e, _)| e.clone()).collect();
        assert_eq!(events, one_by_one, "({after}, {up_to}]");
        assert!(read.iter().all(|(_, thread)| thread.is_none()));
    }
    // Only the rooms asked for.
    let only_b = s
        .rooms
        .timeline_between(&[ROOM_B.to_owned()], 0, max)
        .await
        .expect("range");
    assert_eq!(only_b.len(), 3);
    assert!(only_b.iter().all(|(e, _)| e.room_id == ROOM_B));
    assert!(
        s.rooms
            .timeline_between(&[], 0, max)
            .await
            .expect("none")
            .is_empty()
    );
}

async fn stream_range_of_every_room(s: Storage) {
    two_rooms(&s).await;
    let max = s.rooms.max_stream_ordering().await.expect("max");
    for (after, up_to) in [(0, max), (max - 3, max), (max - 3, max - 1), (max, max)] {
        let range = s
            .rooms
            .stream_range(after, up_to, 1000)
            .await
            .expect("range");
        let of_rooms = s
            .rooms
            .timeline_between(&rooms(), after, up_to)
            .await
            .expect("range of rooms");
        assert_eq!(range, of_rooms, "every room: ({after}, {up_to}]");
    }
    // The oldest `limit`, in stream order.
    let all = s.rooms.stream_range(0, max, 1000).await.expect("all");
    assert!(all.len() > 3);
    let first = s.rooms.stream_range(0, max, 3).await.expect("first");
    assert_eq!(first, all[..3]);
}

async fn members_and_versions_of_rooms(s: Storage) {
    two_rooms(&s).await;
    let batched = s.rooms.members_of_rooms(&rooms()).await.expect("members");
    let mut one_by_one = Vec::new();
    for room in rooms() {
        one_by_one.extend(s.rooms.room_members(&room, None).await.expect("members"));
    }
    assert_eq!(batched.len(), 4);
    let key = |m: &palpo_storage::model::MembershipRecord| {
        (
            m.room_id.clone(),
            m.user_id.clone(),
            m.membership.clone(),
            m.event_id.clone(),
        )
    };
    assert_eq!(
        batched.iter().map(key).collect::<Vec<_>>(),
        one_by_one.iter().map(key).collect::<Vec<_>>()
    );
    let mut versions = s.rooms.room_versions(&rooms()).await.expect("versions");
    versions.sort();
    assert_eq!(
        versions,
        [
            (ROOM_A.to_owned(), "12".to_owned()),
            (ROOM_B.to_owned(), "11".to_owned()),
            (ROOM_EMPTY.to_owned(), "12".to_owned()),
        ]
    );
    assert!(
        s.rooms
            .members_of_rooms(&[])
            .await
            .expect("none")
            .is_empty()
    );
}

async fn states_of_groups(s: Storage) {
    two_rooms(&s).await;
    let mut groups: Vec<i64> = Vec::new();
    for room in [ROOM_A, ROOM_B] {
        for event in s
            .rooms
            .room_events(room, i64::MAX, None, Direction::Backward, 100)
            .await
            .expect("events")
        {
            groups.extend(event.state_group);
        }
    }
    groups.sort_unstable();
    groups.dedup();
    assert!(
        groups.len() >= 4,
        "each member event makes a group: {groups:?}"
    );
    let mut asked = groups.clone();
    asked.push(i64::MAX);
    asked.push(groups[0]);
    let batched = s.rooms.states_at_groups(&asked).await.expect("states");
    assert_eq!(batched.len(), groups.len(), "unknown groups are absent");
    for group in &groups {
        let one = s.rooms.state_at_group(*group).await.expect("state");
        assert!(!one.is_empty());
        assert_eq!(batched.get(group), Some(&one), "group {group}");
    }
    let room_a = s.rooms.get_room(ROOM_A).await.expect("room").expect("room");
    let state_a = &batched[&room_a.state_group.expect("group")];
    assert_eq!(
        state_a.keys().cloned().collect::<Vec<_>>(),
        [
            ("m.room.member".to_owned(), "@a:test".to_owned()),
            ("m.room.member".to_owned(), "@b:test".to_owned()),
        ]
    );
    assert!(
        s.rooms
            .state_at_group(i64::MAX)
            .await
            .expect("unknown")
            .is_empty()
    );
}

async fn unread_candidates_in_rooms(s: Storage) {
    two_rooms(&s).await;
    let max = s.rooms.max_stream_ordering().await.expect("max");
    let a_first = s
        .rooms
        .room_events(ROOM_A, 0, None, Direction::Forward, 100)
        .await
        .expect("events")
        .into_iter()
        .find(|e| e.event_type == MESSAGE)
        .and_then(|e| e.stream_ordering)
        .expect("message");
    let ranges = [
        (ROOM_A.to_owned(), a_first),
        (ROOM_B.to_owned(), 0),
        (ROOM_EMPTY.to_owned(), 0),
    ];
    let found = s
        .ephemeral
        .unread_candidates(&ranges, "@b:test", &[MESSAGE], max, 3)
        .await
        .expect("candidates");
    let ids: Vec<&str> = found.iter().map(|(e, _)| e.event_id.as_str()).collect();
    // Room A after its first message, not @b's, at most 3; room B's one message; in stream
    // order.
    assert_eq!(ids, ["$!b:test1"]);
    let found = s
        .ephemeral
        .unread_candidates(&ranges, "@c:test", &[MESSAGE], max, 3)
        .await
        .expect("candidates");
    let ids: Vec<&str> = found.iter().map(|(e, _)| e.event_id.as_str()).collect();
    assert_eq!(ids, ["$!b:test1", "$a-more0", "$a-more1", "$a-more2"]);
}
