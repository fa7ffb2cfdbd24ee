//! Records of simplified sliding sync (MSC4186) connections.

use serde::{Deserialize, Serialize};

/// A position a sliding sync connection handed out (a `pos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingPositionRecord {
    pub connection_key: i64,
    pub position_id: i64,
    /// The global stream position the answer was complete up to.
    pub stream_position: i64,
    /// The room set holding what the client had been sent as of this position.
    pub room_set: i64,
    /// When the connection was last used (ms).
    pub last_used_ts: i64,
}

/// What a connection has sent of one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingRoomRecord {
    pub room_id: String,
    /// The user's membership when the room was last sent (`join`, `invite`, `knock`).
    pub membership: String,
    /// `None`: the client is up to date with the room as of the position's stream position.
    /// `Some(p)`: the client has the room up to stream position `p` only.
    pub sent_upto: Option<i64>,
    /// The `required_state` the room was last sent with, as JSON.
    pub required_state: String,
}

/// The rooms of a new position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlidingRoomSet {
    /// Those of an existing room set of the connection (the answer changed no room).
    Same(i64),
    /// A new room set with exactly these rooms.
    New(Vec<SlidingRoomRecord>),
}

/// A position to hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSlidingPosition {
    pub connection_key: i64,
    /// The position the request continued from: the client has its answer, so older positions
    /// are deleted.
    pub acknowledged: Option<i64>,
    pub stream_position: i64,
    pub rooms: SlidingRoomSet,
    pub now: i64,
}
