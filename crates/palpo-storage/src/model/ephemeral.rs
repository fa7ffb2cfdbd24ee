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
