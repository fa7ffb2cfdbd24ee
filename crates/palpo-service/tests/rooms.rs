//! The rooms service against every database backend: created events verify with ruma,
//! authorization refuses what the rules refuse, reads respect membership and visibility.

use std::collections::BTreeMap;

use palpo_core::ErrorCode;
use palpo_service::rooms::{CreateRoom, EventDraft, MessagesQuery, Preset, TimelineFilter};
use palpo_storage::{Storage, model::Direction};
use ruma::{
    CanonicalJsonObject, RoomVersionId,
    signatures::{PublicKeyMap, PublicKeySet, Verified, verify_event},
};
use serde_json::{Value, json};

mod common;
use common::{SERVER, services, user};

fn code(err: palpo_core::Error) -> ErrorCode {
    err.code()
}

on_every_backend!(
    events_verify_with_ruma,
    messages_and_state,
    membership_rules,
    idempotent_transactions,
    redaction,
    state_resolution,
);

async fn events_verify_with_ruma(storage: Storage) {
    let services = services(storage.clone());
    let alice = user(&services, "alice").await;
    for version in ["12", "10"] {
        let room_id = services
            .rooms
            .create_room(
                &alice,
                CreateRoom {
                    room_version: Some(version.into()),
                    name: Some("Verify".into()),
                    ..CreateRoom::default()
                },
            )
            .await
            .expect("create room");
        let event_id = services
            .rooms
            .send_message(
                &alice,
                "DEV",
                &room_id,
                "m.room.message",
                "t1",
                json!({"body": "hi", "msgtype": "m.text"}),
            )
            .await
            .expect("send");
        let keys = services.rooms.signing_keys().await.expect("keys");
        let mut key_set = PublicKeySet::new();
        key_set.insert(
            keys.key_id.clone(),
            ruma::serde::Base64::parse(&keys.public_key).expect("b64"),
        );
        let mut key_map = PublicKeyMap::new();
        key_map.insert(SERVER.to_owned(), key_set);
        let version_id = RoomVersionId::try_from(version).expect("version");
        let rules = version_id.rules().expect("rules");
        let state = storage.rooms.current_state(&room_id).await.expect("state");
        let mut ids: Vec<String> = state.values().cloned().collect();
        ids.push(event_id.clone());
        for record in storage.rooms.get_events(&ids).await.expect("events") {
            let object: CanonicalJsonObject =
                serde_json::from_str(&record.pdu_json).expect("canonical");
            assert_eq!(
                verify_event(&key_map, &object, &rules).expect("verifies"),
                Verified::All
            );
            let hash = ruma::signatures::reference_hash(&object, &rules).expect("hash");
            assert_eq!(
                record.event_id,
                format!("${hash}"),
                "event id is the reference hash"
            );
        }
        if version == "12" {
            let create_id = state
                .get(&("m.room.create".to_owned(), String::new()))
                .expect("create event");
            assert_eq!(
                room_id,
                format!("!{}", &create_id[1..]),
                "v12 room id derives from the create event"
            );
        }
    }
}

async fn messages_and_state(storage: Storage) {
    let services = services(storage);
    let rooms = &services.rooms;
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let room_id = rooms
        .create_room(
            &alice,
            CreateRoom {
                preset: Some(Preset::PublicChat),
                topic: Some("t".into()),
                ..CreateRoom::default()
            },
        )
        .await
        .expect("create");
    for i in 0..5 {
        rooms
            .send_message(
                &alice,
                "DEV",
                &room_id,
                "m.room.message",
                &format!("txn{i}"),
                json!({"body": format!("m{i}"), "msgtype": "m.text"}),
            )
            .await
            .expect("send");
    }
    // Bob is not in the room: reading is refused.
    let err = rooms
        .messages(
            &bob,
            &room_id,
            &MessagesQuery {
                from: None,
                to: None,
                dir: Direction::Backward,
                limit: 10,
                filter: TimelineFilter::default(),
            },
        )
        .await
        .expect_err("non-member");
    assert_eq!(code(err), ErrorCode::Forbidden);
    rooms
        .join(&bob, &room_id, None)
        .await
        .expect("join public room");
    // Shared history: Bob now sees what was said before he joined.
    let filter = TimelineFilter {
        types: Some(vec!["m.room.message".into()]),
        ..TimelineFilter::default()
    };
    let page = rooms
        .messages(
            &bob,
            &room_id,
            &MessagesQuery {
                from: None,
                to: None,
                dir: Direction::Backward,
                limit: 3,
                filter: filter.clone(),
            },
        )
        .await
        .expect("messages");
    let bodies: Vec<&str> = page
        .chunk
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(bodies, ["m4", "m3", "m2"]);
    let next = page.end.clone().expect("more to read");
    let page2 = rooms
        .messages(
            &bob,
            &room_id,
            &MessagesQuery {
                from: Some(next.clone()),
                to: None,
                dir: Direction::Backward,
                limit: 10,
                filter: filter.clone(),
            },
        )
        .await
        .expect("page 2");
    let bodies: Vec<&str> = page2
        .chunk
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(bodies, ["m1", "m0"]);
    assert!(page2.end.is_none(), "start of the room reached");
    let topic = rooms
        .state_event_content(&bob, &room_id, "m.room.topic", "")
        .await
        .expect("topic");
    assert_eq!(topic, json!({"topic": "t"}));
    let err = rooms
        .state_event_content(&bob, &room_id, "m.room.avatar", "")
        .await
        .expect_err("absent");
    assert_eq!(code(err), ErrorCode::NotFound);
    // Empty state keys and custom state.
    rooms
        .send_state(&alice, &room_id, "org.example.custom", "", json!({"k": 1}))
        .await
        .expect("state");
    let all = rooms.room_state(&bob, &room_id).await.expect("state");
    assert!(all.iter().any(|e| e["type"] == "org.example.custom"));
    let joined: BTreeMap<_, _> = rooms
        .joined_members(&alice, &room_id)
        .await
        .expect("joined");
    assert_eq!(
        joined.keys().cloned().collect::<Vec<_>>(),
        vec![alice.clone(), bob.clone()]
    );
    assert_eq!(
        rooms.joined_rooms(&bob).await.expect("joined rooms"),
        vec![room_id.clone()]
    );
}

async fn membership_rules(storage: Storage) {
    let services = services(storage);
    let rooms = &services.rooms;
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let carol = user(&services, "carol").await;
    let room_id = rooms
        .create_room(
            &alice,
            CreateRoom {
                preset: Some(Preset::PrivateChat),
                ..CreateRoom::default()
            },
        )
        .await
        .expect("create");
    // Private room: no join without an invite, no sending as a non-member.
    assert_eq!(
        code(
            rooms
                .join(&bob, &room_id, None)
                .await
                .expect_err("invite only")
        ),
        ErrorCode::Forbidden
    );
    let err = rooms
        .send_message(
            &bob,
            "D",
            &room_id,
            "m.room.message",
            "x",
            json!({"body": "x"}),
        )
        .await
        .expect_err("non-member send");
    assert_eq!(code(err), ErrorCode::Forbidden);
    rooms
        .invite(&alice, &room_id, &bob, None)
        .await
        .expect("invite");
    rooms
        .join(&bob, &room_id, None)
        .await
        .expect("join after invite");
    // Bob (power 0) may not kick or ban.
    rooms
        .invite(&alice, &room_id, &carol, None)
        .await
        .expect("invite carol");
    assert_eq!(
        code(
            rooms
                .kick(&bob, &room_id, &carol, None)
                .await
                .expect_err("no power")
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            rooms
                .ban(&bob, &room_id, &alice, None)
                .await
                .expect_err("no power")
        ),
        ErrorCode::Forbidden
    );
    // Alice bans Bob; he cannot come back until unbanned.
    rooms
        .ban(&alice, &room_id, &bob, Some("spam".into()))
        .await
        .expect("ban");
    assert_eq!(
        code(rooms.join(&bob, &room_id, None).await.expect_err("banned")),
        ErrorCode::Forbidden
    );
    rooms
        .unban(&alice, &room_id, &bob, None)
        .await
        .expect("unban");
    rooms
        .invite(&alice, &room_id, &bob, None)
        .await
        .expect("re-invite");
    rooms.join(&bob, &room_id, None).await.expect("rejoin");
    rooms.leave(&bob, &room_id, None).await.expect("leave");
    rooms.forget(&bob, &room_id).await.expect("forget");
    assert!(rooms.joined_rooms(&bob).await.expect("rooms").is_empty());
}

/// Sends an `m.room.message` with `body` from `device` under transaction id `txn`.
async fn send_text(
    rooms: &palpo_service::rooms::RoomService,
    sender: &str,
    device: &str,
    room_id: &str,
    txn: &str,
    body: &str,
) -> palpo_core::Result<String> {
    rooms
        .send_message(
            sender,
            device,
            room_id,
            "m.room.message",
            txn,
            json!({"body": body, "msgtype": "m.text"}),
        )
        .await
}

async fn idempotent_transactions(storage: Storage) {
    let services = services(storage.clone());
    let rooms = &services.rooms;
    let alice = user(&services, "alice").await;
    let room_id = rooms
        .create_room(&alice, CreateRoom::default())
        .await
        .expect("create");
    let first = send_text(rooms, &alice, "DEV", &room_id, "same", "once")
        .await
        .expect("send");
    let again = send_text(rooms, &alice, "DEV", &room_id, "same", "once")
        .await
        .expect("retry");
    assert_eq!(first, again);
    let other_device = send_text(rooms, &alice, "DEV2", &room_id, "same", "once")
        .await
        .expect("other device");
    assert_ne!(
        first, other_device,
        "transaction ids are scoped to the device"
    );
    let page = rooms
        .messages(
            &alice,
            &room_id,
            &MessagesQuery {
                from: None,
                to: None,
                dir: Direction::Backward,
                limit: 50,
                filter: TimelineFilter {
                    types: Some(vec!["m.room.message".into()]),
                    ..TimelineFilter::default()
                },
            },
        )
        .await
        .expect("messages");
    assert_eq!(page.chunk.len(), 2);
    // The retry's event was built and thrown away: the room's next send builds on what was
    // written.
    let next = send_text(rooms, &alice, "DEV", &room_id, "next", "next")
        .await
        .expect("next send");
    assert_ne!(next, first);
    // A retry that could no longer be sent (the sender left) still answers with its event.
    rooms.leave(&alice, &room_id, None).await.expect("leave");
    let late_retry = send_text(rooms, &alice, "DEV", &room_id, "same", "once")
        .await
        .expect("late retry");
    assert_eq!(late_retry, first);
    let refused = send_text(rooms, &alice, "DEV", &room_id, "new", "new").await;
    assert!(refused.is_err(), "a new send after leaving is refused");
}

async fn redaction(storage: Storage) {
    let services = services(storage);
    let rooms = &services.rooms;
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    let room_id = rooms
        .create_room(
            &alice,
            CreateRoom {
                preset: Some(Preset::PublicChat),
                ..CreateRoom::default()
            },
        )
        .await
        .expect("create");
    rooms.join(&bob, &room_id, None).await.expect("join");
    let target = rooms
        .send_message(
            &alice,
            "D",
            &room_id,
            "m.room.message",
            "1",
            json!({"body": "secret", "msgtype": "m.text"}),
        )
        .await
        .expect("send");
    let err = rooms
        .redact(&bob, "B", &room_id, &target, "r1", None)
        .await
        .expect_err("not his event");
    assert_eq!(code(err), ErrorCode::Forbidden);
    rooms
        .redact(&alice, "D", &room_id, &target, "r2", Some("oops".into()))
        .await
        .expect("redact own");
    let event: Value = rooms.event(&bob, &room_id, &target).await.expect("event");
    assert!(
        event["content"].get("body").is_none(),
        "content redacted: {event}"
    );
    assert!(event["unsigned"]["redacted_because"].is_object());
}

/// A forked graph: from one state, Alice demotes Bob while Bob changes the topic. Resolution
/// applies the power change first, so Bob's topic fails auth and the old topic stays (the
/// spec's worked example of v2 resolution). Concurrent valid topic changes resolve to the one
/// ordered last (timestamp, then event id).
async fn state_resolution(storage: Storage) {
    let services = services(storage.clone());
    let rooms = &services.rooms;
    let alice = user(&services, "alice").await;
    let bob = user(&services, "bob").await;
    for version in ["12", "10"] {
        let room_id = rooms
            .create_room(
                &alice,
                CreateRoom {
                    room_version: Some(version.into()),
                    preset: Some(Preset::PublicChat),
                    topic: Some("original".into()),
                    ..CreateRoom::default()
                },
            )
            .await
            .expect("create");
        rooms.join(&bob, &room_id, None).await.expect("join");
        let mut power: Value = rooms
            .state_event_content(&alice, &room_id, "m.room.power_levels", "")
            .await
            .expect("power levels");
        power["users"][&bob] = json!(50);
        rooms
            .send_state(&alice, &room_id, "m.room.power_levels", "", power.clone())
            .await
            .expect("promote bob");
        let base = storage.rooms.current_state(&room_id).await.expect("state");
        let fork_point = storage
            .rooms
            .get_room(&room_id)
            .await
            .expect("room")
            .expect("exists")
            .forward_extremities;
        let key = |kind: &str| (kind.to_owned(), String::new());

        // Branch 1: Alice demotes Bob. Branch 2: Bob changes the topic.
        power["users"][&bob] = json!(0);
        let demotion = rooms
            .create_outlier_at(
                &room_id,
                &alice,
                EventDraft::state("m.room.power_levels", "", power.clone()),
                fork_point.clone(),
                &base,
            )
            .await
            .expect("demotion");
        let bobs_topic = rooms
            .create_outlier_at(
                &room_id,
                &bob,
                EventDraft::state("m.room.topic", "", json!({"topic": "bob's"})),
                fork_point.clone(),
                &base,
            )
            .await
            .expect("bob's topic is valid in his branch");
        let mut branch1 = base.clone();
        branch1.insert(key("m.room.power_levels"), demotion.clone());
        let mut branch2 = base.clone();
        branch2.insert(key("m.room.topic"), bobs_topic.clone());
        let resolved = rooms
            .resolve_state(&room_id, &[branch1, branch2])
            .await
            .expect("resolve");
        assert_eq!(
            resolved.get(&key("m.room.power_levels")),
            Some(&demotion),
            "v{version}: power change wins"
        );
        assert_eq!(
            resolved.get(&key("m.room.topic")),
            base.get(&key("m.room.topic")),
            "v{version}: bob's topic fails auth after the demotion"
        );
        assert_eq!(resolved.len(), base.len());

        // Two valid concurrent topic changes: the later (timestamp, then id) wins.
        let alices = rooms
            .create_outlier_at(
                &room_id,
                &alice,
                EventDraft::state("m.room.topic", "", json!({"topic": "alice's"})),
                fork_point.clone(),
                &base,
            )
            .await
            .expect("alice's topic");
        let mut a = base.clone();
        a.insert(key("m.room.topic"), alices.clone());
        let mut b = base.clone();
        b.insert(key("m.room.topic"), bobs_topic.clone());
        let resolved = rooms
            .resolve_state(&room_id, &[a, b])
            .await
            .expect("resolve");
        let expected = {
            let ea = storage
                .rooms
                .get_event(&alices)
                .await
                .expect("event")
                .expect("exists");
            let eb = storage
                .rooms
                .get_event(&bobs_topic)
                .await
                .expect("event")
                .expect("exists");
            if (eb.origin_server_ts, &eb.event_id) > (ea.origin_server_ts, &ea.event_id) {
                bobs_topic.clone()
            } else {
                alices.clone()
            }
        };
        assert_eq!(
            resolved.get(&key("m.room.topic")),
            Some(&expected),
            "v{version}: last in order wins"
        );
    }
}

/// One user creating identical rooms at once: room version 12 derives the room id from the
/// create event, so same-millisecond twins must not collide.
async fn parallel_identical_creates(storage: Storage) {
    let services = services(storage);
    let alice = user(&services, "alice").await;
    let creates = (0..32).map(|_| {
        let rooms = services.rooms.clone();
        let alice = alice.clone();
        tokio::spawn(async move { rooms.create_room(&alice, CreateRoom::default()).await })
    });
    let mut ids = std::collections::BTreeSet::new();
    for task in creates {
        ids.insert(task.await.expect("task").expect("created"));
    }
    assert_eq!(ids.len(), 32, "every create made its own room");
}

on_every_backend!(parallel_identical_creates);
