//! End-to-end encryption key management and to-device messaging: `/keys/upload`,
//! `/keys/query`, `/keys/claim`, `/keys/changes`, `/sendToDevice`, and their part of `/sync`
//! (to-device events, device-list changes, one-time key counts, unused fallback key types).
//!
//! Device-list changes (identity keys uploaded or changed, a device deleted) and to-device
//! messages take the next position of the global stream, so the sync token orders them with
//! everything else, and the notifier wakes long-polling syncs (here, and in the other
//! processes) when they are written. A device's to-device messages stay in its inbox until a
//! sync whose token is past them: the client has them then.
//!
//! Only local users have keys and inboxes: there is no federation yet, so users of other
//! servers are reported under `failures` (query, claim) or dropped (to-device).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use palpo_core::{Config, Error, Result, now_millis};
use palpo_storage::{
    Storage, StorageError,
    model::{
        DeviceKeyCounts, DeviceTarget, KeyUpload, OneTimeKeyRecord, SIGNED_CURVE25519, StreamHeads,
        ToDeviceBatch, ToDeviceMessage,
    },
};
use serde_json::{Map, Value, json};

use crate::{internal, notifier::Notifier, uia::Uia};

pub mod cross_signing;

pub use cross_signing::CrossSigningUpload;

/// To-device messages one sync hands a device at most; the rest wait for the next.
pub const TO_DEVICE_LIMIT: usize = 100;
/// Column sizes.
const MAX_ALGORITHM_BYTES: usize = 64;
const MAX_KEY_ID_BYTES: usize = 128;
const MAX_ID_BYTES: usize = 255;

/// Keys a device publishes (`POST /keys/upload`).
#[derive(Debug, Clone, Default)]
pub struct KeysUpload {
    /// The device's identity keys, as the client signed them.
    pub device_keys: Option<Map<String, Value>>,
    /// `<algorithm>:<key id>` → key (a string or a signed key object).
    pub one_time_keys: BTreeMap<String, Value>,
    /// As `one_time_keys`; at most one per algorithm.
    pub fallback_keys: BTreeMap<String, Value>,
}

/// The answer of `/keys/query`.
#[derive(Debug, Clone, Default)]
pub struct KeysQueryResult {
    /// User id → device id → the device's keys, with `unsigned.device_display_name` and the
    /// uploaded signatures the caller may see.
    pub device_keys: BTreeMap<String, BTreeMap<String, Value>>,
    /// Server name → why its users could not be asked.
    pub failures: BTreeMap<String, Value>,
    /// User id → master key, with the uploaded signatures the caller may see.
    pub master_keys: BTreeMap<String, Value>,
    /// User id → self-signing key.
    pub self_signing_keys: BTreeMap<String, Value>,
    /// The caller's own user-signing key, when they asked for themselves.
    pub user_signing_keys: BTreeMap<String, Value>,
}

/// The answer of `/keys/claim`.
#[derive(Debug, Clone, Default)]
pub struct KeysClaimResult {
    /// User id → device id → `<algorithm>:<key id>` → key.
    pub one_time_keys: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>>,
    pub failures: BTreeMap<String, Value>,
}

/// `device_lists` of a sync, and the answer of `/keys/changes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceLists {
    /// Users whose devices or identity keys changed, or who now share a room with the user.
    pub changed: Vec<String>,
    /// Users who no longer share any room with the user.
    pub left: Vec<String>,
}

impl DeviceLists {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.left.is_empty()
    }
}

/// The to-device messages a sync hands one device.
#[derive(Debug, Clone, Default)]
pub struct ToDeviceSync {
    /// `{"type", "sender", "content"}` events, oldest first.
    pub events: Vec<Value>,
    /// The position the device has its messages up to: the sync's position, or less when
    /// more messages wait than one sync hands out.
    pub upto: i64,
}

/// The end-to-end encryption part of a sync, for one device.
#[derive(Debug, Clone, Default)]
pub struct E2eeSync {
    pub to_device: ToDeviceSync,
    /// Empty on an initial sync.
    pub device_lists: DeviceLists,
    /// Algorithm → unclaimed one-time keys of the device.
    pub one_time_keys_count: BTreeMap<String, i64>,
    /// Algorithms whose fallback key no claim has used yet.
    pub unused_fallback_key_types: Vec<String>,
}

impl E2eeSync {
    /// Whether the sync has news for the client (key counts are not news).
    pub fn is_empty(&self) -> bool {
        self.to_device.events.is_empty() && self.device_lists.is_empty()
    }
}

/// Splits `<algorithm>:<key id>`.
fn split_key_name(name: &str) -> Result<(&str, &str)> {
    let invalid = || {
        Error::invalid_param(format!(
            "Invalid key name {name:?}: expected <algorithm>:<key id>"
        ))
    };
    let (algorithm, key_id) = name.split_once(':').ok_or_else(invalid)?;
    if algorithm.is_empty()
        || key_id.is_empty()
        || algorithm.len() > MAX_ALGORITHM_BYTES
        || key_id.len() > MAX_KEY_ID_BYTES
    {
        return Err(invalid());
    }
    Ok((algorithm, key_id))
}

/// The keys of an upload as records: valid names, each a string or a key object.
fn key_records(keys: &BTreeMap<String, Value>, what: &str) -> Result<Vec<OneTimeKeyRecord>> {
    keys.iter()
        .map(|(name, key)| {
            let (algorithm, key_id) = split_key_name(name)?;
            match key {
                Value::String(_) => {}
                Value::Object(object) if object.get("key").is_some_and(Value::is_string) => {}
                _ => {
                    return Err(Error::bad_json(format!(
                        "{what} {name:?} must be a string or an object with a string `key`"
                    )));
                }
            }
            Ok(OneTimeKeyRecord {
                algorithm: algorithm.to_owned(),
                key_id: key_id.to_owned(),
                key_json: key.to_string(),
            })
        })
        .collect()
}

fn check_length(value: &str, what: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_ID_BYTES {
        return Err(Error::invalid_param(format!(
            "{what} must have 1 to {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The server name of a valid user id; 400 `M_INVALID_PARAM` otherwise.
fn server_of(user_id: &str) -> Result<&str> {
    if user_id.len() > MAX_ID_BYTES || ruma::UserId::parse(user_id).is_err() {
        return Err(Error::invalid_param(format!("Invalid user id {user_id:?}")));
    }
    user_id
        .split_once(':')
        .map(|(_, server)| server)
        .ok_or_else(|| Error::invalid_param(format!("Invalid user id {user_id:?}")))
}

/// What `failures` says of a server this one cannot reach (there is no federation yet).
fn unreachable() -> Value {
    json!({"status": 503, "message": "Federation is not supported by this server"})
}

pub struct E2eeService {
    config: Arc<Config>,
    storage: Storage,
    notifier: Arc<Notifier>,
    /// Replacing cross-signing keys needs user-interactive authentication.
    uia: Uia,
}

impl E2eeService {
    pub fn new(config: Arc<Config>, storage: Storage, notifier: Arc<Notifier>) -> Self {
        let uia = Uia::new(
            storage.clone(),
            config.server_name.clone(),
            config.registration.token.clone(),
        );
        E2eeService {
            config,
            storage,
            notifier,
            uia,
        }
    }

    fn is_local(&self, server: &str) -> bool {
        server == self.config.server_name
    }

    /// `POST /keys/upload`: stores the device's keys; returns its one-time key counts.
    #[tracing::instrument(skip_all, fields(user = %user, device = %device))]
    pub async fn upload_keys(
        &self,
        user: &str,
        device: &str,
        upload: KeysUpload,
    ) -> Result<BTreeMap<String, i64>> {
        let device_keys = match upload.device_keys {
            Some(mut keys) => {
                if keys.get("user_id").and_then(Value::as_str) != Some(user) {
                    return Err(Error::invalid_param(
                        "device_keys.user_id does not match the user of the access token",
                    ));
                }
                if keys.get("device_id").and_then(Value::as_str) != Some(device) {
                    return Err(Error::invalid_param(
                        "device_keys.device_id does not match the device of the access token",
                    ));
                }
                // Added by servers on the way out, never stored.
                keys.remove("unsigned");
                Some(Value::Object(keys).to_string())
            }
            None => None,
        };
        let one_time_keys = key_records(&upload.one_time_keys, "one-time key")?;
        let fallback_keys = key_records(&upload.fallback_keys, "fallback key")?;
        let mut algorithms = BTreeSet::new();
        for key in &fallback_keys {
            if !algorithms.insert(key.algorithm.as_str()) {
                return Err(Error::invalid_param(format!(
                    "At most one fallback key per algorithm ({})",
                    key.algorithm
                )));
            }
        }
        let outcome = self
            .storage
            .e2ee
            .upload_keys(&KeyUpload {
                user_id: user.to_owned(),
                device_id: device.to_owned(),
                device_keys,
                one_time_keys,
                fallback_keys,
            })
            .await
            .map_err(|e| match e {
                StorageError::Conflict(what) => {
                    Error::invalid_param(format!("The {what} is already uploaded with another key"))
                }
                other => internal(other),
            })?;
        if let Some(position) = outcome.device_list_position {
            self.notifier.stream_advanced(position);
        }
        self.one_time_key_counts(user, device).await
    }

    /// The device's unclaimed one-time keys per algorithm (`signed_curve25519` always listed).
    pub async fn one_time_key_counts(
        &self,
        user: &str,
        device: &str,
    ) -> Result<BTreeMap<String, i64>> {
        let mut counts: BTreeMap<String, i64> = self
            .storage
            .e2ee
            .one_time_key_counts(user, device)
            .await
            .map_err(internal)?
            .into_iter()
            .collect();
        counts.entry(SIGNED_CURVE25519.to_owned()).or_insert(0);
        Ok(counts)
    }

    /// `POST /keys/query`: the identity keys of the devices asked for (all of a user's with an
    /// empty list), and the users' cross-signing keys. Unknown users and devices are left
    /// out; other servers are `failures`.
    pub async fn query_keys(
        &self,
        user: &str,
        request: &BTreeMap<String, Vec<String>>,
    ) -> Result<KeysQueryResult> {
        let mut result = KeysQueryResult::default();
        let mut local_users = Vec::new();
        for (user_id, device_ids) in request {
            let server = server_of(user_id)?;
            if !self.is_local(server) {
                result.failures.insert(server.to_owned(), unreachable());
                continue;
            }
            local_users.push(user_id.clone());
            let records = self
                .storage
                .e2ee
                .device_keys(user_id, device_ids)
                .await
                .map_err(internal)?;
            let mut devices = BTreeMap::new();
            for record in records {
                let mut keys: Value =
                    serde_json::from_str(&record.key_json).map_err(Error::internal)?;
                if let (Some(name), Some(object)) = (record.display_name, keys.as_object_mut()) {
                    object.insert(
                        "unsigned".to_owned(),
                        json!({ "device_display_name": name }),
                    );
                }
                devices.insert(record.device_id, keys);
            }
            // Unknown users (and users without keys) are left out, as the spec asks.
            if !devices.is_empty() {
                result.device_keys.insert(user_id.clone(), devices);
            }
        }
        let cross_signing = self
            .cross_signing_query(user, &mut result, &local_users)
            .await?;
        result.master_keys = cross_signing.master_keys;
        result.self_signing_keys = cross_signing.self_signing_keys;
        result.user_signing_keys = cross_signing.user_signing_keys;
        Ok(result)
    }

    /// `POST /keys/claim`: one key of the asked algorithm per device, a one-time key while the
    /// device has some, else its fallback key. Devices with neither are left out.
    pub async fn claim_keys(
        &self,
        _user: &str,
        request: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<KeysClaimResult> {
        let mut result = KeysClaimResult::default();
        for (user_id, devices) in request {
            let server = server_of(user_id)?;
            if !self.is_local(server) {
                result.failures.insert(server.to_owned(), unreachable());
                continue;
            }
            let mut claimed = BTreeMap::new();
            for (device_id, algorithm) in devices {
                if algorithm.is_empty() || algorithm.len() > MAX_ALGORITHM_BYTES {
                    return Err(Error::invalid_param(format!(
                        "Invalid key algorithm {algorithm:?}"
                    )));
                }
                let Some(key) = self
                    .storage
                    .e2ee
                    .claim_key(user_id, device_id, algorithm)
                    .await
                    .map_err(internal)?
                else {
                    continue;
                };
                let value: Value =
                    serde_json::from_str(&key.key.key_json).map_err(Error::internal)?;
                claimed.insert(
                    device_id.clone(),
                    BTreeMap::from([(format!("{}:{}", key.key.algorithm, key.key.key_id), value)]),
                );
            }
            if !claimed.is_empty() {
                result.one_time_keys.insert(user_id.clone(), claimed);
            }
        }
        Ok(result)
    }

    /// `GET /keys/changes`: whose device lists changed after the stream position `from`
    /// (`to` is a hint: everything up to now is reported, which a later sync would report
    /// anyway).
    pub async fn key_changes(&self, user: &str, from: i64, to: i64) -> Result<DeviceLists> {
        let now = self
            .storage
            .rooms
            .max_stream_ordering()
            .await
            .map_err(internal)?;
        self.device_lists(user, from, now.max(to)).await
    }

    async fn device_lists(&self, user: &str, after: i64, upto: i64) -> Result<DeviceLists> {
        if upto <= after {
            // Nothing happened since the token (a long-poll passing again, most often).
            return Ok(DeviceLists::default());
        }
        let updates = self
            .storage
            .e2ee
            .device_list_updates(user, after, upto)
            .await
            .map_err(internal)?;
        Ok(DeviceLists {
            changed: updates.changed,
            left: updates.left,
        })
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}`: stores the messages in the inboxes of the
    /// devices (`*`: every device of the user) and wakes their syncs. A transaction id the
    /// sending device used already sends nothing again.
    #[tracing::instrument(skip_all, fields(user = %user, device = %device, txn_id = %txn_id))]
    pub async fn send_to_device(
        &self,
        user: &str,
        device: &str,
        event_type: &str,
        txn_id: &str,
        messages: BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
    ) -> Result<()> {
        check_length(event_type, "The event type")?;
        check_length(txn_id, "The transaction id")?;
        let mut batch = Vec::new();
        for (user_id, devices) in messages {
            let server = server_of(&user_id)?;
            let local = self.is_local(server);
            if !local {
                tracing::debug!(%user_id, "to-device message for another server dropped: no federation");
            }
            for (device_id, content) in devices {
                let target = if device_id == "*" {
                    DeviceTarget::All
                } else {
                    check_length(&device_id, "A device id")?;
                    DeviceTarget::Device(device_id)
                };
                if local {
                    batch.push(ToDeviceMessage {
                        user_id: user_id.clone(),
                        target,
                        content: Value::Object(content).to_string(),
                    });
                }
            }
        }
        let sent = self
            .storage
            .e2ee
            .send_to_device(&ToDeviceBatch {
                sender: user.to_owned(),
                sender_device: device.to_owned(),
                txn_id: txn_id.to_owned(),
                event_type: event_type.to_owned(),
                messages: batch,
                now: now_millis(),
            })
            .await
            .map_err(internal)?;
        if let Some(position) = sent {
            self.notifier.stream_advanced(position);
        }
        Ok(())
    }

    /// Forgets the keys and inboxes of deleted devices, and tells the user's room-mates.
    pub async fn devices_deleted(&self, user: &str, device_ids: &[String]) -> Result<()> {
        let position = self
            .storage
            .e2ee
            .delete_device_keys(user, device_ids)
            .await
            .map_err(internal)?;
        if let Some(position) = position {
            self.notifier.stream_advanced(position);
        }
        Ok(())
    }

    /// The device's to-device messages after `after` up to `upto`, at most `limit` (and
    /// [`TO_DEVICE_LIMIT`]); those up to `after` are deleted first (the client has them).
    pub async fn to_device(
        &self,
        user: &str,
        device: &str,
        after: Option<i64>,
        upto: i64,
        limit: usize,
    ) -> Result<ToDeviceSync> {
        let limit = if limit == 0 {
            TO_DEVICE_LIMIT
        } else {
            limit.min(TO_DEVICE_LIMIT)
        };
        let after = after.unwrap_or(0);
        // Those up to `after` are deleted on the way.
        let mut records = self
            .storage
            .e2ee
            .to_device_inbox(user, device, after, upto, limit as i64 + 1)
            .await
            .map_err(internal)?;
        let mut delivered_upto = upto;
        if records.len() > limit {
            // More wait: hand out whole positions only, and say where the next sync resumes.
            let cut = records[limit].stream_position;
            records.truncate(limit);
            let whole = records.iter().filter(|r| r.stream_position < cut).count();
            if whole > 0 {
                records.truncate(whole);
            } else {
                // One position holds more than the limit (a `*` and the device itself): all
                // of it, since the next sync resumes after it.
                records = self
                    .storage
                    .e2ee
                    .to_device_messages(user, device, after, cut, TO_DEVICE_LIMIT as i64)
                    .await
                    .map_err(internal)?;
            }
            delivered_upto = records.last().map_or(after, |r| r.stream_position);
        }
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            let content: Value = serde_json::from_str(&record.content).map_err(Error::internal)?;
            events.push(json!({
                "type": record.event_type,
                "sender": record.sender,
                "content": content,
            }));
        }
        Ok(ToDeviceSync {
            events,
            upto: delivered_upto,
        })
    }

    /// The key counts and fallback key types of the device (`known` when read with the
    /// sync's position, else read here), and the device-list changes in `(since, upto]`
    /// (none without `since`).
    pub async fn keys_sync(
        &self,
        user: &str,
        device: &str,
        since: Option<i64>,
        upto: i64,
        known: Option<DeviceKeyCounts>,
    ) -> Result<(DeviceLists, BTreeMap<String, i64>, Vec<String>)> {
        // Independent reads, on every sync: at once rather than one round trip after another.
        let device_lists = async {
            match since {
                Some(since) => self.device_lists(user, since, upto).await,
                None => Ok(DeviceLists::default()),
            }
        };
        // Both key counts in one statement.
        let counts = async {
            match known {
                Some(counts) => Ok(counts),
                None => self
                    .storage
                    .e2ee
                    .key_counts(user, device)
                    .await
                    .map_err(internal),
            }
        };
        let (device_lists, counts) = tokio::try_join!(device_lists, counts)?;
        let mut one_time: BTreeMap<String, i64> = counts.one_time_keys.into_iter().collect();
        // Listed even when zero: some clients only upload keys when they see it (the spec
        // lets a missing algorithm mean zero, but older clients rely on this).
        one_time.entry(SIGNED_CURVE25519.to_owned()).or_insert(0);
        Ok((device_lists, one_time, counts.unused_fallback_key_types))
    }

    /// The end-to-end encryption part of a `/sync` of `device` over `(since, upto]`:
    /// to-device messages after `to_device_since` (the token's to-device part), device-list
    /// changes after `since` (none on an initial sync), key counts.
    ///
    /// With the `heads` read with `upto`, an empty inbox is not read, nor are device lists
    /// when neither devices nor memberships changed after `since`; nor are the key counts
    /// when read with them (`key_counts`).
    #[allow(clippy::too_many_arguments)]
    pub async fn sync(
        &self,
        user: &str,
        device: &str,
        since: Option<i64>,
        to_device_since: Option<i64>,
        upto: i64,
        heads: Option<&StreamHeads>,
        key_counts: Option<DeviceKeyCounts>,
    ) -> Result<E2eeSync> {
        // Delivered messages are deleted by the read after the one that acknowledges them,
        // so any message in the inbox, new or delivered, calls for a read: only an empty
        // inbox (the usual case) is skipped.
        let inbox_moved = heads.is_none_or(|h| h.to_device.is_some());
        let lists_moved = StreamHeads::moved_after(heads, since, |h| h.device_lists)
            || StreamHeads::moved_after(heads, since, |h| h.memberships);
        let to_device = async {
            if !inbox_moved {
                return Ok(ToDeviceSync {
                    events: Vec::new(),
                    upto,
                });
            }
            self.to_device(user, device, to_device_since, upto, TO_DEVICE_LIMIT)
                .await
        };
        let since_for_lists = if lists_moved { since } else { None };
        let (to_device, (device_lists, one_time_keys_count, unused_fallback_key_types)) = tokio::try_join!(
            to_device,
            self.keys_sync(user, device, since_for_lists, upto, key_counts)
        )?;
        Ok(E2eeSync {
            to_device,
            device_lists,
            one_time_keys_count,
            unused_fallback_key_types,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_algorithm_and_id() {
        assert_eq!(
            split_key_name("signed_curve25519:AAAAHg").expect("valid"),
            ("signed_curve25519", "AAAAHg")
        );
        assert_eq!(split_key_name("a:b:c").expect("valid"), ("a", "b:c"));
        for bad in ["", "nocolon", ":id", "alg:"] {
            assert!(split_key_name(bad).is_err(), "{bad:?}");
        }
        assert!(split_key_name(&format!("{}:x", "a".repeat(65))).is_err());
    }

    #[test]
    fn keys_are_strings_or_key_objects() {
        let keys = BTreeMap::from([
            ("curve25519:1".to_owned(), json!("abc")),
            (
                "signed_curve25519:2".to_owned(),
                json!({"key": "def", "signatures": {}}),
            ),
        ]);
        let records = key_records(&keys, "one-time key").expect("valid");
        assert_eq!(records[0].key_json, r#""abc""#);
        assert_eq!(records[1].algorithm, "signed_curve25519");
        for bad in [json!(5), json!({"nokey": 1}), json!(null)] {
            let keys = BTreeMap::from([("a:b".to_owned(), bad)]);
            assert!(key_records(&keys, "one-time key").is_err());
        }
    }

    #[test]
    fn user_ids_are_checked() {
        assert_eq!(server_of("@a:example.org").expect("valid"), "example.org");
        assert!(server_of("nobody").is_err());
        assert!(server_of("!room:example.org").is_err());
    }
}
