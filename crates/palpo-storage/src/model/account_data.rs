//! Records of user data: sync filters and account data.

use serde::{Deserialize, Serialize};

/// One piece of account data of a user: global (`room_id` is `None`) or for a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDataRecord {
    pub user_id: String,
    pub room_id: Option<String>,
    /// The event type, e.g. `m.tag` or `org.example.config`.
    pub data_type: String,
    /// The content, a JSON object.
    pub content: String,
    /// The position in the global stream the last write took.
    pub stream_position: i64,
}
