//! Records the repositories store and return. Plain data, serializable so the cache can hold them.

use serde::{Deserialize, Serialize};

mod account_data;
mod e2ee;
mod ephemeral;
mod rooms;
mod sliding;
pub use account_data::*;
pub use e2ee::*;
pub use ephemeral::*;
pub use rooms::*;
pub use sliding::*;

/// A local account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Full Matrix user id, `@localpart:server_name`.
    pub user_id: String,
    /// Argon2 PHC string; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub is_deactivated: bool,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

/// A new account to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub created_at: i64,
}

/// A device of a local user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub user_id: String,
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ip: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub created_at: i64,
}

/// A login: the device to create (or reuse) and the hash of its new access token.
#[derive(Debug, Clone)]
pub struct DeviceLogin {
    pub user_id: String,
    pub device_id: String,
    /// Applied to a new device; to an existing one only when `Some`.
    pub display_name: Option<String>,
    /// SHA-256 of the access token, hex; the token itself is never stored.
    pub token_hash: String,
    pub ip: Option<String>,
    pub now: i64,
}

/// Whom an access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenOwner {
    pub user_id: String,
    pub device_id: String,
}

/// An access token a process took on trust from its memory: where the request first touches
/// the database it is checked to still belong to `user_id`'s `device_id` (in the same
/// statement or transaction, so that a token revoked by any process is refused exactly).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenCheck {
    pub token_hash: String,
    pub user_id: String,
    pub device_id: String,
}

/// What a delete removed, so that caches can forget it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    pub device_ids: Vec<String>,
    pub token_hashes: Vec<String>,
}

/// A user-interactive authentication session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UiaSession {
    pub session_id: String,
    /// The user it authenticates, when known (not for registration).
    pub user_id: Option<String>,
    /// What the session was started for (`register`, `delete_device`...); a session
    /// cannot be replayed against another operation.
    pub purpose: String,
    /// Stages completed so far, in order.
    pub completed: Vec<String>,
    /// Free-form data the operation keeps between rounds (e.g. the registration request).
    pub data: String,
    pub created_at: i64,
}
