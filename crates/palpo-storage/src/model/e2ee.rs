//! Records of end-to-end encryption: device keys, one-time and fallback keys, to-device
//! messages.

use serde::{Deserialize, Serialize};

/// A one-time or fallback key: `<algorithm>:<key_id>` and the key (a JSON string or a signed
/// key object), as uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimeKeyRecord {
    pub algorithm: String,
    pub key_id: String,
    /// The key as JSON text: `"base64"` or `{"key": ..., "signatures": ...}`.
    pub key_json: String,
}

/// What one `/keys/upload` stores for a device, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct KeyUpload {
    pub user_id: String,
    pub device_id: String,
    /// The device's identity keys as JSON text, when uploaded.
    pub device_keys: Option<String>,
    pub one_time_keys: Vec<OneTimeKeyRecord>,
    /// At most one per algorithm; each replaces the device's fallback key of its algorithm.
    pub fallback_keys: Vec<OneTimeKeyRecord>,
}

/// What a key upload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUploadOutcome {
    /// The stream position of the device-list change, when the identity keys are new or
    /// differ from those stored.
    pub device_list_position: Option<i64>,
}

/// A device's identity keys, with the device's display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeysRecord {
    pub user_id: String,
    pub device_id: String,
    pub key_json: String,
    pub display_name: Option<String>,
}

/// A claimed key: a one-time key (now deleted) or the device's fallback key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKey {
    pub key: OneTimeKeyRecord,
    pub fallback: bool,
}

/// Who a to-device message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    /// Every device the user has when the message is sent (`*`).
    All,
    /// One device; nothing is stored when the user has no such device.
    Device(String),
}

/// One message of a `/sendToDevice` request.
#[derive(Debug, Clone)]
pub struct ToDeviceMessage {
    pub user_id: String,
    pub target: DeviceTarget,
    /// The content, a JSON object as text.
    pub content: String,
}

/// A `/sendToDevice` request: messages of one type from one device, under a transaction id.
#[derive(Debug, Clone)]
pub struct ToDeviceBatch {
    pub sender: String,
    pub sender_device: String,
    pub txn_id: String,
    pub event_type: String,
    pub messages: Vec<ToDeviceMessage>,
    pub now: i64,
}

/// A to-device message waiting in a device's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToDeviceRecord {
    pub stream_position: i64,
    pub sender: String,
    pub event_type: String,
    pub content: String,
}

/// The one-time key algorithm clients use (Olm's signed Curve25519 keys).
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

/// The key counts a sync tells a device: its unclaimed one-time keys per algorithm, and the
/// algorithms of its fallback keys no claim has used yet. Both sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeyCounts {
    pub one_time_keys: Vec<(String, i64)>,
    pub unused_fallback_key_types: Vec<String>,
}

/// The device-list changes a sync tells a user of: whose device lists changed (or who started
/// sharing a room with them), and who stopped sharing any room with them. Both sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceListUpdates {
    pub changed: Vec<String>,
    pub left: Vec<String>,
}

/// A cross-signing key of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrossSigningKeyRecord {
    /// `master`, `self_signing` or `user_signing`.
    pub key_type: String,
    /// The key object as uploaded.
    pub key_json: String,
}

/// A signature uploaded through `/keys/signatures/upload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySignatureRecord {
    pub target_user_id: String,
    /// The device id, or the public key of a master key.
    pub target_key_id: String,
    pub signer_user_id: String,
    /// `ed25519:<device id or public key>`.
    pub signer_key_id: String,
    pub signature: String,
}
