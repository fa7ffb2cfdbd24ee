//! Records of receipts, typing notifications and presence.

use serde::{Deserialize, Serialize};

/// Where one of a user's read receipts points: what their unread counts start after.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadPosition {
    pub room_id: String,
    /// The thread root's event id, or `main`; `None` for an unthreaded receipt.
    pub thread_id: Option<String>,
    /// The stream position of the event the receipt is at.
    pub stream_ordering: i64,
}

/// A user's latest receipt of one type in a room (per thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    pub room_id: String,
    /// `m.read` or `m.read.private`.
    pub receipt_type: String,
    pub user_id: String,
    /// The thread root's event id, or `main`; `None` for an unthreaded receipt.
    pub thread_id: Option<String>,
    pub event_id: String,
    /// When the receipt was sent, in milliseconds since the epoch.
    pub ts: i64,
    /// The stream position of the change; ignored when writing.
    pub stream_position: i64,
}

/// Whether a user is typing in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingRecord {
    pub room_id: String,
    pub user_id: String,
    /// When the typing notification runs out, in milliseconds since the epoch; 0 once the
    /// user stopped typing (or the expiry was announced).
    pub expires_at: i64,
    pub stream_position: i64,
}

/// A user's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub user_id: String,
    /// `online`, `offline` or `unavailable`.
    pub state: String,
    pub status_msg: Option<String>,
    /// The last time the user did something, in milliseconds since the epoch.
    pub last_active_ts: i64,
    /// The stream position of the last change of state or status; ignored when writing.
    pub stream_position: i64,
}

/// Who asks for a [`SyncPosition`]: the user, the device whose inbox and keys to read too,
/// and an access token remembered without asking the database, to check it still belongs
/// to its device (see [`crate::EphemeralRepo::sync_positions`]).
#[derive(Debug, Clone, Copy)]
pub struct PositionAsk<'a> {
    pub user_id: &'a str,
    pub device_id: Option<&'a str>,
    pub token: Option<&'a super::TokenCheck>,
}

/// Where the stream is, read first by every sync, with the newest position of each kind of
/// change a sync section reads, in one statement (one snapshot): a section whose newest
/// change is not after the sync's `since` has nothing to say and is not read. `None`: no
/// change of that kind yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncPosition {
    /// The stream's position: the sync's `upto`.
    pub position: i64,
    /// A typing notification ran out by the time asked about (`expire_typing` announces it
    /// with a new position).
    pub typing_due: bool,
    /// When the first typing notification still running runs out (ms since the epoch), read
    /// with the position: a long-poll waits no longer. One that starts later takes a position
    /// and wakes the wait anyway.
    pub next_typing_expiry: Option<i64>,
    pub heads: StreamHeads,
    /// The device's key counts as [`E2eeRepo::key_counts`] reads them, when the device was
    /// asked about and its keys are all of the one algorithm clients use
    /// (`signed_curve25519`); `None` otherwise (then read them on their own).
    ///
    /// [`E2eeRepo::key_counts`]: crate::E2eeRepo::key_counts
    pub key_counts: Option<super::DeviceKeyCounts>,
}

/// The newest stream position of each kind of change: globally for room-scoped kinds, of the
/// user (or device) for the per-user ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamHeads {
    pub typing: Option<i64>,
    pub receipts: Option<i64>,
    pub presence: Option<i64>,
    /// Of the user's account data.
    pub account_data: Option<i64>,
    /// Of the device's to-device inbox.
    pub to_device: Option<i64>,
    pub device_lists: Option<i64>,
    /// Of any membership change (who shares a room with whom: device lists depend on it).
    pub memberships: Option<i64>,
}

impl StreamHeads {
    /// Whether a change of the kind `head` picks may lie after `since`: always when either is
    /// unknown (an initial sync, or heads not read).
    pub fn moved_after(
        heads: Option<&Self>,
        since: Option<i64>,
        head: fn(&Self) -> Option<i64>,
    ) -> bool {
        match (heads, since) {
            (Some(heads), Some(since)) => head(heads).is_some_and(|head| head > since),
            _ => true,
        }
    }
}
