//! Conformance of `EphemeralRepo::sync_position` on every backend: with the stream's position
//! it reads the newest change of each kind a sync section reads, so that a sync can skip the
//! sections with nothing new. A head that lags behind its kind's writes would make syncs miss
//! changes, so each writer is checked to move its head (and only its own).

use palpo_storage::{
    Storage,
    model::{
        DeviceLogin, DeviceTarget, KeyUpload, ReceiptRecord, StreamHeads, SyncPosition,
        ToDeviceBatch, ToDeviceMessage,
    },
    testing,
};

palpo_storage::conformance!(each_writer_moves_its_head);

const ROOM: &str = "!room:test";
const ALICE: &str = "@alice:test";
const BOB: &str = "@bob:test";

async fn position(s: &Storage) -> SyncPosition {
    s.ephemeral
        .sync_position(1, ALICE, Some("A1"), None)
        .await
        .expect("sync position")
}

/// Checks that the `what` write moved the stream, and its kind's head to the new position.
fn moved_to(
    what: &str,
    before: &SyncPosition,
    after: &SyncPosition,
    head: fn(&StreamHeads) -> Option<i64>,
) {
    assert!(after.position > before.position, "{what}: took a position");
    assert_eq!(head(&after.heads), Some(after.position), "{what}: its head");
}

async fn login(s: &Storage, user_id: &str, device_id: &str) {
    s.devices
        .login_device(&DeviceLogin {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            display_name: None,
            token_hash: format!("{user_id}/{device_id}"),
            ip: None,
            now: 1,
        })
        .await
        .expect("login");
}

fn to_device(user_id: &str, device_id: &str, txn_id: &str) -> ToDeviceBatch {
    ToDeviceBatch {
        sender: BOB.to_owned(),
        sender_device: "B1".to_owned(),
        txn_id: txn_id.to_owned(),
        event_type: "m.test".to_owned(),
        messages: vec![ToDeviceMessage {
            user_id: user_id.to_owned(),
            target: DeviceTarget::Device(device_id.to_owned()),
            content: "{}".to_owned(),
        }],
        now: 1,
    }
}

async fn each_writer_moves_its_head(s: Storage) {
    let empty = position(&s).await;
    assert_eq!(empty.heads, StreamHeads::default(), "nothing written yet");
    assert!(!empty.typing_due);
    assert_eq!(empty.next_typing_expiry, None, "no typing notification");

    testing::room_with_events(&s, ROOM, "12", &[("m.room.member", ALICE, Some("join"))]).await;
    let joined = position(&s).await;
    moved_to("joined", &empty, &joined, |h| h.memberships);

    login(&s, ALICE, "A1").await;
    login(&s, ALICE, "A2").await;
    login(&s, BOB, "B1").await;
    s.e2ee
        .upload_keys(&KeyUpload {
            user_id: BOB.to_owned(),
            device_id: "B1".to_owned(),
            device_keys: Some(r#"{"keys":{}}"#.to_owned()),
            one_time_keys: Vec::new(),
            fallback_keys: Vec::new(),
        })
        .await
        .expect("device keys");
    let logged_in = position(&s).await;
    moved_to("device keys", &joined, &logged_in, |h| h.device_lists);

    s.ephemeral
        .put_receipt(&ReceiptRecord {
            room_id: ROOM.to_owned(),
            receipt_type: "m.read".to_owned(),
            user_id: BOB.to_owned(),
            thread_id: None,
            event_id: "$x".to_owned(),
            ts: 1,
            stream_position: 0,
        })
        .await
        .expect("receipt");
    let receipt = position(&s).await;
    moved_to("receipt", &logged_in, &receipt, |h| h.receipts);

    s.ephemeral.set_typing(ROOM, BOB, 10).await.expect("typing");
    let typing = position(&s).await;
    moved_to("typing", &receipt, &typing, |h| h.typing);
    assert_eq!(
        typing.next_typing_expiry,
        Some(10),
        "read with the position"
    );
    let later = s
        .ephemeral
        .sync_position(11, ALICE, Some("A1"), None)
        .await
        .expect("later");
    assert!(later.typing_due, "the typing notification runs out at 10");
    assert_eq!(later.next_typing_expiry, None, "none running after 10");

    s.ephemeral
        .set_presence(&palpo_storage::model::PresenceRecord {
            user_id: BOB.to_owned(),
            state: "online".to_owned(),
            status_msg: None,
            last_active_ts: 1,
            stream_position: 0,
        })
        .await
        .expect("presence");
    let presence = position(&s).await;
    moved_to("presence", &typing, &presence, |h| h.presence);

    // Per-user and per-device heads: another user's account data and another device's
    // message take positions without moving Alice's (A1) heads.
    s.account_data
        .put_account_data(BOB, None, "m.test", "{}")
        .await
        .expect("Bob's account data");
    s.e2ee
        .send_to_device(&to_device(ALICE, "A2", "t1"))
        .await
        .expect("to A2");
    let others = position(&s).await;
    assert!(others.position > presence.position);
    assert_eq!(others.heads.account_data, None);
    assert_eq!(others.heads.to_device, None);

    s.account_data
        .put_account_data(ALICE, None, "m.test", "{}")
        .await
        .expect("Alice's account data");
    let account_data = position(&s).await;
    moved_to("account_data", &others, &account_data, |h| h.account_data);

    s.e2ee
        .send_to_device(&to_device(ALICE, "A1", "t2"))
        .await
        .expect("to A1");
    let inbox = position(&s).await;
    moved_to("inbox", &account_data, &inbox, |h| h.to_device);
    // The other heads stayed where their last write put them.
    assert_eq!(
        inbox.heads,
        StreamHeads {
            account_data: account_data.heads.account_data,
            to_device: Some(inbox.position),
            ..presence.heads
        }
    );
}
