//! Presence on `/sync`: a steady stream of syncs neither reads nor writes the user's presence
//! between touches, and still moves it (state and last active time) when due.

mod common;

use std::time::Duration;

use palpo_core::now_millis;
use palpo_service::ephemeral::{EphemeralService, PresenceState};
use palpo_storage::{Storage, model::PresenceRecord};

on_every_backend!(syncs_touch_presence_now_and_then);

async fn stored_state(storage: &Storage, user: &str) -> (String, i64) {
    let record = storage
        .ephemeral
        .get_presence(user)
        .await
        .expect("get presence")
        .expect("presence stored");
    (record.state, record.last_active_ts)
}

async fn syncs_touch_presence_now_and_then(storage: Storage) {
    let services = common::services(storage.clone());
    let alice = common::user(&services, "alice").await;
    // Idle after 2 s: syncs touch the last active time every 500 ms.
    let ephemeral = EphemeralService::new(
        storage.clone(),
        services.rooms.clone(),
        services.notifier.clone(),
    )
    .with_idle_timeout(Duration::from_secs(2));
    ephemeral
        .presence_on_sync(&alice, None)
        .await
        .expect("first sync");
    let (state, first_active) = stored_state(&storage, &alice).await;
    assert_eq!(state, "online");

    // Another process marks her unavailable behind this one's back.
    storage
        .ephemeral
        .set_presence(&PresenceRecord {
            user_id: alice.clone(),
            state: "unavailable".to_owned(),
            status_msg: None,
            last_active_ts: now_millis(),
            stream_position: 0,
        })
        .await
        .expect("set presence");
    // Syncs right after: this process knows she is online and active just now, so it neither
    // reads nor writes her presence.
    for _ in 0..3 {
        ephemeral
            .presence_on_sync(&alice, None)
            .await
            .expect("sync");
    }
    assert_eq!(
        stored_state(&storage, &alice).await.0,
        "unavailable",
        "presence is not read nor rewritten on every sync"
    );

    // Once the touch is due, a sync reads it and marks her online again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    ephemeral
        .presence_on_sync(&alice, None)
        .await
        .expect("sync");
    let (state, active) = stored_state(&storage, &alice).await;
    assert_eq!(state, "online", "the sync after the touch interval updates");
    assert!(active > first_active);

    // Still online later: only the last active time moves, when due.
    tokio::time::sleep(Duration::from_millis(600)).await;
    ephemeral
        .presence_on_sync(&alice, None)
        .await
        .expect("sync");
    let (state, touched) = stored_state(&storage, &alice).await;
    assert_eq!(state, "online");
    assert!(touched >= active + 500, "touched: {touched}, was {active}");

    // This process's own `PUT /presence` is seen by the next sync at once.
    ephemeral
        .set_presence(&alice, &alice, PresenceState::Unavailable, None)
        .await
        .expect("put presence");
    assert_eq!(stored_state(&storage, &alice).await.0, "unavailable");
    ephemeral
        .presence_on_sync(&alice, None)
        .await
        .expect("sync");
    assert_eq!(stored_state(&storage, &alice).await.0, "online");
    // And a sync setting another state is not answered from memory either.
    ephemeral
        .presence_on_sync(&alice, Some("unavailable"))
        .await
        .expect("sync");
    assert_eq!(stored_state(&storage, &alice).await.0, "unavailable");
}
