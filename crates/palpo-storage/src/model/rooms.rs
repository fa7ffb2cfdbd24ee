//! Records of rooms and events, as the rooms repository stores and returns them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Room state as a map from `(event type, state key)` to event id.
pub type StateMap = BTreeMap<(String, String), String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub room_id: String,
    pub room_version: String,
    pub creator: String,
    pub is_public: bool,
    /// The state group of the room's current state; `None` before the create event.
    pub state_group: Option<i64>,
    pub max_depth: i64,
    /// Bumped by every persisted event; event creation checks it did not move meanwhile.
    pub write_version: i64,
    /// Events with no successor yet: the `prev_events` of the next event.
    pub forward_extremities: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct NewRoom {
    pub room_id: String,
    pub room_version: String,
    pub creator: String,
    pub is_public: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: String,
    pub room_id: String,
    /// Position in the global event stream; `None` for outliers.
    pub stream_ordering: Option<i64>,
    pub depth: i64,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: i64,
    /// The state after this event.
    pub state_group: Option<i64>,
    pub outlier: bool,
    pub soft_failed: bool,
    pub rejected_reason: Option<String>,
    pub redacted_by: Option<String>,
    /// The full PDU as canonical JSON.
    pub pdu_json: String,
}

/// A client's transaction id, scoped to its device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxnKey {
    pub user_id: String,
    pub device_id: String,
    pub txn_id: String,
}

/// An event to persist, with what its persistence changes.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub room_id: String,
    pub depth: i64,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub pdu_json: String,
    pub prev_events: Vec<String>,
    pub outlier: bool,
    pub soft_failed: bool,
    pub rejected_reason: Option<String>,
    /// The room's `write_version` the event was built against. If the room moved on since,
    /// persisting fails with a conflict and the caller rebuilds the event.
    pub expected_write_version: i64,
    /// Built as the room's next event on its forward extremities (a local event): persisting
    /// also checks that `prev_events` are still among them. Write versions alone can match
    /// by coincidence once events are built on events not committed yet (one that then fails
    /// leaves a head whose version another writer may reach).
    pub extends_head: bool,
    /// For `m.room.member`: the new membership of the user in `state_key`.
    pub membership: Option<String>,
    /// For `m.room.redaction`: the event it redacts.
    pub redacts: Option<String>,
    pub txn: Option<TxnKey>,
    /// The thread (root event id) the event belongs to; `None` for the main timeline.
    pub thread_id: Option<String>,
    /// The access token of the send, when the sender was taken on trust from memory: the
    /// event is written only if the token still belongs to that device, checked in the
    /// write's transaction (else the outcome is [`StorageError::UnknownToken`]).
    ///
    /// [`StorageError::UnknownToken`]: crate::StorageError::UnknownToken
    pub sent_with: Option<super::TokenCheck>,
}

impl NewEvent {
    /// Whether persisting this event changes the room's state.
    pub fn changes_state(&self) -> bool {
        self.state_key.is_some()
            && !self.outlier
            && !self.soft_failed
            && self.rejected_reason.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistedEvent {
    pub stream_ordering: i64,
    pub state_group: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRecord {
    pub room_id: String,
    pub user_id: String,
    pub membership: String,
    pub event_id: String,
    pub sender: String,
    pub stream_ordering: i64,
    pub forgotten: bool,
}

/// Which way `/messages` walks the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// A signing key of a server. `private_key` is set only for this server's own keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub server_name: String,
    pub key_id: String,
    /// Unpadded standard base64.
    pub public_key: String,
    /// PKCS#8 document, unpadded standard base64.
    pub private_key: Option<String>,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    /// Custom fields, a JSON object.
    pub fields: String,
}

/// A user found by a user directory search, with their global profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryUser {
    pub user_id: String,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRecord {
    pub room_alias: String,
    pub room_id: String,
    pub creator: String,
}
