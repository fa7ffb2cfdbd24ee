//! The rooms part of `/sync` on every backend: incremental syncs deliver each event exactly
//! once and in order, limited timelines can be back-filled, leaves and invites show in their
//! sections, and a long-poll wakes when a message is sent.

use std::time::Duration;

use palpo_service::{
    Services,
    rooms::{
        CreateRoom, Direction, EventJson, MessagesQuery, Preset, SyncRequest, SyncRooms,
        TimelineFilter,
    },
    sync::{SyncOptions, SyncToken},
};
use palpo_storage::Storage;
use serde_json::{Value, json};

mod common;
use common::{services, user};

fn request(limit: usize) -> SyncRequest {
    SyncRequest {
        timeline_limit: limit,
        ..SyncRequest::default()
    }
}

/// One pass of the rooms part of a sync after `since`.
async fn sync(
    services: &Services,
    user: &str,
    since: Option<&SyncRooms>,
    limit: usize,
) -> SyncRooms {
    services
        .rooms
        .sync_rooms(user, since.map(|s| s.position), &request(limit))
        .await
        .expect("sync")
}

/// Events of a sync answer, parsed.
fn values(events: &[EventJson]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::from_str(e.get()).expect("event JSON"))
        .collect()
}

/// `(type, body)` of the room's messages and redactions in the timeline (the body `None`
/// when the content has none: redacted).
fn timeline(rooms: &SyncRooms, room_id: &str) -> Vec<(String, Option<String>)> {
    rooms
        .join
        .get(room_id)
        .map(|r| {
            values(&r.timeline.events)
                .iter()
                .filter(|e| e["type"] == "m.room.message" || e["type"] == "m.room.redaction")
                .map(|e| {
                    (
                        e["type"].as_str().unwrap_or_default().to_owned(),
                        e["content"]["body"].as_str().map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The bodies of the room's messages in the timeline.
fn bodies(rooms: &SyncRooms, room_id: &str) -> Vec<String> {
    timeline(rooms, room_id)
        .into_iter()
        .filter(|(kind, _)| kind == "m.room.message")
        .filter_map(|(_, body)| body)
        .collect()
}

async fn send(services: &Services, user: &str, room_id: &str, body: &str) {
    services
        .rooms
        .send_message(
            user,
            "DEV",
            room_id,
            "m.room.message",
            body,
            json!({"msgtype": "m.text", "body": body}),
        )
        .await
        .expect("send");
}

/// A public room `creator` made.
async fn public_room(services: &Services, creator: &str) -> String {
    services
        .rooms
        .create_room(
            creator,
            CreateRoom {
                preset: Some(Preset::PublicChat),
                ..CreateRoom::default()
            },
        )
        .await
        .expect("room")
}

async fn join(services: &Services, user: &str, room_id: &str) {
    services
        .rooms
        .join(user, room_id, None)
        .await
        .expect("join");
}

on_every_backend!(
    chat_is_delivered_once_in_order,
    limited_gaps_backfill,
    leave_and_invite_sections,
    long_poll_wakes_on_send,
    woken_syncs_share_the_stream_tail
);

async fn chat_is_delivered_once_in_order(storage: Storage) {
    let services = services(storage);
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let room_id = services
        .rooms
        .create_room(
            &alice,
            CreateRoom {
                preset: Some(Preset::PublicChat),
                name: Some("chat".into()),
                ..CreateRoom::default()
            },
        )
        .await
        .expect("room");
    services
        .rooms
        .join(&bob, &room_id, None)
        .await
        .expect("join");
    let initial = sync(&services, &bob, None, 10).await;
    let room = initial
        .join
        .get(&room_id)
        .expect("joined room in initial sync");
    assert!(
        values(&room.state)
            .iter()
            .chain(&values(&room.timeline.events))
            .any(|e| e["type"] == "m.room.create"),
        "create event present"
    );
    let summary = room.summary.as_ref().expect("initial sync has a summary");
    assert_eq!(summary.joined_member_count, 2);
    assert_eq!(summary.heroes, vec![alice.clone()]);

    let mut received = Vec::new();
    let mut last = initial;
    for round in 0..4 {
        for n in 0..3 {
            let sender = if n % 2 == 0 { &alice } else { &bob };
            send(&services, sender, &room_id, &format!("r{round}m{n}")).await;
        }
        let next = sync(&services, &bob, Some(&last), 10).await;
        let room = next.join.get(&room_id).expect("room changed");
        assert!(!room.timeline.limited);
        assert!(
            room.state.is_empty(),
            "unlimited incremental timelines carry no state"
        );
        received.extend(bodies(&next, &room_id));
        last = next;
    }
    let expected: Vec<String> = (0..4)
        .flat_map(|r| (0..3).map(move |n| format!("r{r}m{n}")))
        .collect();
    assert_eq!(received, expected, "every message once, in order");
    // Nothing new: nothing returned.
    let quiet = sync(&services, &bob, Some(&last), 10).await;
    assert!(quiet.is_empty());
}

async fn limited_gaps_backfill(storage: Storage) {
    let services = services(storage);
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let room_id = public_room(&services, &alice).await;
    join(&services, &bob, &room_id).await;
    let first = sync(&services, &bob, None, 10).await;
    for n in 0..12 {
        send(&services, &alice, &room_id, &format!("m{n}")).await;
    }
    services
        .rooms
        .send_state(
            &alice,
            &room_id,
            "m.room.topic",
            "",
            json!({"topic": "new"}),
        )
        .await
        .expect("topic");
    for n in 12..15 {
        send(&services, &alice, &room_id, &format!("m{n}")).await;
    }
    let next = sync(&services, &bob, Some(&first), 3).await;
    let room = next.join.get(&room_id).expect("room");
    assert!(room.timeline.limited);
    assert_eq!(bodies(&next, &room_id), ["m12", "m13", "m14"]);
    assert!(
        values(&room.state)
            .iter()
            .any(|e| e["type"] == "m.room.topic" && e["content"]["topic"] == "new"),
        "state delta before the gap"
    );
    // Back-fill the gap from prev_batch to the previous sync's position.
    let page = services
        .rooms
        .messages(
            &bob,
            &room_id,
            &MessagesQuery {
                from: room.timeline.prev_batch.clone(),
                to: Some(format!("s{}", first.position)),
                dir: Direction::Backward,
                limit: 100,
                filter: TimelineFilter {
                    types: Some(vec!["m.room.message".into()]),
                    ..TimelineFilter::default()
                },
            },
        )
        .await
        .expect("backfill");
    let gap: Vec<&str> = page
        .chunk
        .iter()
        .rev()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    let expected: Vec<String> = (0..12).map(|n| format!("m{n}")).collect();
    assert_eq!(gap, expected);
}

async fn leave_and_invite_sections(storage: Storage) {
    let services = services(storage);
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let room_id = services
        .rooms
        .create_room(
            &alice,
            CreateRoom {
                preset: Some(Preset::PrivateChat),
                name: Some("secret".into()),
                ..CreateRoom::default()
            },
        )
        .await
        .expect("room");
    let before = sync(&services, &bob, None, 10).await;
    assert!(before.join.is_empty() && before.invite.is_empty());
    services
        .rooms
        .invite(&alice, &room_id, &bob, None)
        .await
        .expect("invite");
    let invited = sync(&services, &bob, Some(&before), 10).await;
    let invite = invited.invite.get(&room_id).expect("invite section");
    assert!(
        invite
            .invite_state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "secret")
    );
    assert!(
        invite
            .invite_state
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str())
    );
    services
        .rooms
        .join(&bob, &room_id, None)
        .await
        .expect("join");
    let joined = sync(&services, &bob, Some(&invited), 10).await;
    let room = joined.join.get(&room_id).expect("joined section");
    assert!(
        values(&room.state)
            .iter()
            .chain(&values(&room.timeline.events))
            .any(|e| e["type"] == "m.room.name"),
        "newly joined room comes whole"
    );
    send(&services, &alice, &room_id, "before ban").await;
    services
        .rooms
        .ban(&alice, &room_id, &bob, Some("bye".into()))
        .await
        .expect("ban");
    send(&services, &alice, &room_id, "after ban").await;
    let banned = sync(&services, &bob, Some(&joined), 10).await;
    assert!(!banned.join.contains_key(&room_id));
    let left = banned.leave.get(&room_id).expect("leave section");
    let left_events = values(&left.timeline.events);
    let seen: Vec<&str> = left_events
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(seen, ["before ban"], "nothing after the ban");
    assert_eq!(
        left_events
            .last()
            .map(|e| e["content"]["membership"].clone()),
        Some(Value::from("ban"))
    );
    send(&services, &alice, &room_id, "later").await;
    let after = sync(&services, &bob, Some(&banned), 10).await;
    assert!(after.is_empty(), "a banned user gets nothing more");
}

async fn long_poll_wakes_on_send(storage: Storage) {
    let services = services(storage);
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let room_id = public_room(&services, &alice).await;
    join(&services, &bob, &room_id).await;
    let first = sync(&services, &bob, None, 10).await;
    let sync_service = services.sync.clone();
    let waiting_for = bob.clone();
    let options = SyncOptions {
        since: Some(
            SyncToken {
                stream: first.position,
                ephemeral: 0,
                to_device: None,
            }
            .to_string(),
        ),
        timeout: Duration::from_secs(20),
        rooms: request(10),
        ..SyncOptions::default()
    };
    let started = std::time::Instant::now();
    let poll = tokio::spawn(async move { sync_service.sync(&waiting_for, &options).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished(), "nothing to say yet: the sync waits");
    send(&services, &alice, &room_id, "wake up").await;
    let woke = poll.await.expect("task").expect("sync").rooms;
    // Loose bound: the figure that matters is measured by the benchmark.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(bodies(&woke, &room_id), ["wake up"]);
}

/// A sync pass of `SyncService` (the one that reads the rooms' news once for all of them,
/// through the process's stream tail) from `since`, not waiting.
async fn full_sync(services: &Services, user: &str, since: Option<&str>) -> (String, SyncRooms) {
    let options = SyncOptions {
        since: since.map(str::to_owned),
        rooms: request(50),
        ..SyncOptions::default()
    };
    let response = services.sync.sync(user, &options).await.expect("sync");
    (response.next_batch, response.rooms)
}

/// Syncs from different tokens over the same range (which the process reads once and
/// keeps) each get their own rooms' events of their own range; a redaction in a range makes
/// every later sync over the redacted event see it redacted.
async fn woken_syncs_share_the_stream_tail(storage: Storage) {
    let services = services(storage);
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let carol = user(&services, "carol").await;
    let room_id = public_room(&services, &alice).await;
    let carols_room = public_room(&services, &carol).await;
    join(&services, &bob, &room_id).await;
    let (bob_start, _) = full_sync(&services, &bob, None).await;
    let (carol_start, _) = full_sync(&services, &carol, None).await;
    send(&services, &alice, &room_id, "m1").await;
    send(&services, &carol, &carols_room, "c1").await;
    let (bob_after_m1, _) = full_sync(&services, &bob, Some(&bob_start)).await;
    send(&services, &bob, &room_id, "m2").await;

    let (_, bobs) = full_sync(&services, &bob, Some(&bob_start)).await;
    let message = |body: &str| ("m.room.message".to_owned(), Some(body.to_owned()));
    assert_eq!(timeline(&bobs, &room_id), [message("m1"), message("m2")]);
    assert!(!bobs.join.contains_key(&carols_room), "not bob's room");
    let (_, carols) = full_sync(&services, &carol, Some(&carol_start)).await;
    assert_eq!(timeline(&carols, &carols_room), [message("c1")]);
    assert!(!carols.join.contains_key(&room_id), "not carol's room");
    let (_, later) = full_sync(&services, &bob, Some(&bob_after_m1)).await;
    assert_eq!(
        timeline(&later, &room_id),
        [message("m2")],
        "from its own token"
    );

    // Redact m1, which the ranges read so far hold unredacted.
    let (_, first) = full_sync(&services, &alice, None).await;
    let m1 = values(&first.join[&room_id].timeline.events)
        .iter()
        .find(|e| e["content"]["body"] == "m1")
        .and_then(|e| e["event_id"].as_str())
        .expect("m1 in alice's timeline")
        .to_owned();
    services
        .rooms
        .redact(&alice, "DEV", &room_id, &m1, "r1", None)
        .await
        .expect("redact");
    send(&services, &alice, &room_id, "m3").await;
    let (_, again) = full_sync(&services, &bob, Some(&bob_start)).await;
    let redaction = ("m.room.redaction".to_owned(), None);
    assert_eq!(
        timeline(&again, &room_id),
        [
            ("m.room.message".to_owned(), None),
            message("m2"),
            redaction.clone(),
            message("m3")
        ],
        "m1 redacted, for a token from before it"
    );
    let (_, next) = full_sync(&services, &bob, Some(&bob_after_m1)).await;
    assert_eq!(
        timeline(&next, &room_id),
        [message("m2"), redaction, message("m3")]
    );
}

mod sliding {
    use std::collections::BTreeMap;

    use palpo_service::rooms::sliding::{RoomDetails, SlidingList, SlidingRequest};

    use super::*;

    fn list_request(pos: Option<&str>, end: usize) -> SlidingRequest {
        let details = RoomDetails {
            required_state: vec![("m.room.name".into(), String::new())],
            timeline_limit: 2,
        };
        SlidingRequest {
            pos: pos.map(str::to_owned),
            conn_id: "main".into(),
            lists: BTreeMap::from([(
                "all".to_owned(),
                SlidingList {
                    ranges: vec![(0, end)],
                    details,
                    filters: Default::default(),
                },
            )]),
            room_subscriptions: BTreeMap::new(),
            extensions: Default::default(),
        }
    }

    async fn recency_lists_and_updates(storage: Storage) {
        let services = services(storage);
        let alice = user(&services, "alice").await;
        let mut rooms = Vec::new();
        for n in 0..3 {
            let room_id = services
                .rooms
                .create_room(
                    &alice,
                    CreateRoom {
                        name: Some(format!("room {n}")),
                        ..CreateRoom::default()
                    },
                )
                .await
                .expect("room");
            rooms.push(room_id);
        }
        // Room 0 gets the latest message: it sorts first.
        send(&services, &alice, &rooms[0], "newest").await;
        let first = services
            .sync
            .sliding_sync(&alice, "DEV", &list_request(None, 1), Duration::ZERO)
            .await
            .expect("sliding sync")
            .response;
        assert_eq!(first.lists["all"], 3);
        let window: Vec<&String> = first.rooms.keys().collect();
        assert_eq!(first.rooms.len(), 2, "range [0, 1] holds two rooms");
        assert!(
            first.rooms.contains_key(&rooms[0]) && first.rooms.contains_key(&rooms[2]),
            "{window:?}"
        );
        let room0 = &first.rooms[&rooms[0]];
        assert!(room0.initial);
        assert_eq!(room0.name.as_deref(), Some("room 0"));
        assert_eq!(room0.timeline.len(), 2);
        assert!(room0.limited);
        assert_eq!(room0.required_state.len(), 1);
        assert_eq!(
            room0.timeline.last().map(|e| e["content"]["body"].clone()),
            Some(json!("newest"))
        );

        // A message in room 1 moves it to the top; the next response carries only it.
        send(&services, &alice, &rooms[1], "bump").await;
        let next = services
            .sync
            .sliding_sync(
                &alice,
                "DEV",
                &list_request(Some(&first.pos), 1),
                Duration::ZERO,
            )
            .await
            .expect("sliding sync")
            .response;
        assert_eq!(next.rooms.keys().collect::<Vec<_>>(), vec![&rooms[1]]);
        assert!(
            next.rooms[&rooms[1]].initial,
            "first time this connection sees room 1"
        );

        send(&services, &alice, &rooms[1], "again").await;
        let third = services
            .sync
            .sliding_sync(
                &alice,
                "DEV",
                &list_request(Some(&next.pos), 1),
                Duration::ZERO,
            )
            .await
            .expect("sliding sync")
            .response;
        let room1 = &third.rooms[&rooms[1]];
        assert!(!room1.initial);
        assert_eq!(room1.timeline.len(), 1, "only what is new");
        assert!(room1.required_state.is_empty(), "the name did not change");

        // Unknown positions make the client start over.
        let err = services
            .sync
            .sliding_sync(
                &alice,
                "OTHER",
                &list_request(Some(&third.pos), 1),
                Duration::ZERO,
            )
            .await
            .expect_err("unknown connection");
        assert_eq!(err.code(), palpo_core::ErrorCode::UnknownPos);
    }

    on_every_backend!(recency_lists_and_updates);
}
