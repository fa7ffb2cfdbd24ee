//! Conformance of `EphemeralRepo::sync_position` on every backend: with the stream's position
//! it reads the newest change of each kind a sync section reads, so that a sync can skip the
//! sections with nothing new. A head that lags behind its kind's writes would make syncs miss
//! changes, so each writer is checked to move its head (and only its own).

use palpo_storage::{
    Storage, StorageError,
    model::{
        DeviceLogin, DeviceTarget, KeyUpload, OneTimeKeyRecord, PositionAsk, ReceiptRecord,
        StreamHeads, SyncPosition, ToDeviceBatch, ToDeviceMessage, TokenCheck,
    },
    testing,
};

palpo_storage::conformance!(
    each_writer_moves_its_head,
    a_batch_answers_each_ask_as_alone
);

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

/// The token `login` gave `user_id`'s `device_id`.
fn token_of(user_id: &str, device_id: &str) -> TokenCheck {
    TokenCheck {
        token_hash: format!("{user_id}/{device_id}"),
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
    }
}

/// Syncs that ask at once share a read: each answer is what that sync alone reads (its own
/// account data, inbox, token and key counts; the stream's heads), a token that is not its
/// device's fails only its own ask, and more asks than one statement takes are all answered.
async fn a_batch_answers_each_ask_as_alone(s: Storage) {
    testing::room_with_events(&s, ROOM, "12", &[("m.room.member", ALICE, Some("join"))]).await;
    login(&s, ALICE, "A1").await;
    login(&s, ALICE, "A2").await;
    login(&s, BOB, "B1").await;
    s.e2ee
        .upload_keys(&KeyUpload {
            user_id: ALICE.to_owned(),
            device_id: "A1".to_owned(),
            device_keys: None,
            one_time_keys: (0..3)
                .map(|n| OneTimeKeyRecord {
                    algorithm: "signed_curve25519".to_owned(),
                    key_id: format!("k{n}"),
                    key_json: r#""key""#.to_owned(),
                })
                .collect(),
            fallback_keys: Vec::new(),
        })
        .await
        .expect("Alice's keys");
    s.account_data
        .put_account_data(BOB, None, "m.test", "{}")
        .await
        .expect("Bob's account data");
    s.e2ee
        .send_to_device(&to_device(ALICE, "A1", "t1"))
        .await
        .expect("to A1");
    s.ephemeral.set_typing(ROOM, BOB, 10).await.expect("typing");

    let (alice_a1, alice_a2, bob_b1) = (
        token_of(ALICE, "A1"),
        token_of(ALICE, "A2"),
        token_of(BOB, "B1"),
    );
    // A1's token presented as A2's: not that device's.
    let misattributed = TokenCheck {
        device_id: "A2".to_owned(),
        ..alice_a1.clone()
    };
    let pattern = [
        PositionAsk {
            user_id: ALICE,
            device_id: Some("A1"),
            token: Some(&alice_a1),
        },
        PositionAsk {
            user_id: BOB,
            device_id: None,
            token: None,
        },
        PositionAsk {
            user_id: ALICE,
            device_id: Some("A2"),
            token: Some(&misattributed),
        },
        PositionAsk {
            user_id: BOB,
            device_id: Some("B1"),
            token: Some(&bob_b1),
        },
        PositionAsk {
            user_id: ALICE,
            device_id: Some("A2"),
            token: Some(&alice_a2),
        },
    ];
    // More asks than one statement takes (8).
    let asks: Vec<PositionAsk<'_>> = pattern.iter().chain(&pattern).copied().collect();
    for now in [1, 11] {
        let answers = s
            .ephemeral
            .sync_positions(now, &asks)
            .await
            .expect("batch read");
        assert_eq!(answers.len(), asks.len(), "an answer per ask");
        for (n, (ask, answer)) in asks.iter().zip(answers).enumerate() {
            let alone = s
                .ephemeral
                .sync_position(now, ask.user_id, ask.device_id, ask.token)
                .await;
            match (answer, alone) {
                (Ok(answer), Ok(alone)) => assert_eq!(answer, alone, "ask {n} at {now}"),
                (Err(StorageError::UnknownToken), Err(StorageError::UnknownToken)) => {
                    assert_eq!(n % pattern.len(), 2, "only the misattributed token fails")
                }
                (answer, alone) => {
                    panic!("ask {n} at {now}: {answer:?} in the batch, {alone:?} alone")
                }
            }
        }
    }
    // The answers differ where the asks do, so the comparison above tells them apart.
    let answers = s
        .ephemeral
        .sync_positions(11, &asks[..2])
        .await
        .expect("two asks");
    let (Ok(alice), Ok(bob)) = (&answers[0], &answers[1]) else {
        panic!("both answered: {answers:?}");
    };
    assert!(alice.typing_due && bob.typing_due, "typing ran out at 10");
    assert!(alice.heads.to_device.is_some() && bob.heads.to_device.is_none());
    assert!(alice.heads.account_data.is_none() && bob.heads.account_data.is_some());
    assert_eq!(
        alice.key_counts.as_ref().map(|k| k.one_time_keys.clone()),
        Some([("signed_curve25519".to_owned(), 3)].into_iter().collect()),
        "A1's keys counted"
    );
    assert_eq!(bob.key_counts, None, "no device asked about");
    assert!(
        s.ephemeral
            .sync_positions(1, &[])
            .await
            .expect("no asks")
            .is_empty()
    );
}
