//! Cross-signing: `/keys/device_signing/upload`, `/keys/signatures/upload`, and the
//! cross-signing keys and uploaded signatures that `/keys/query` returns.
//!
//! Keys are checked (owner, usage, one ed25519 key) and signatures verified (ed25519 over the
//! canonical JSON without `signatures` and `unsigned`): self-signing and user-signing keys by
//! the master key, the user's devices by the self-signing key, the master key by the user's
//! devices, other users' master keys by the user-signing key. Uploaded signatures are stored
//! apart and merged into the signed key when read; a signature of another user's key is shown
//! to its signer only.

use std::collections::BTreeMap;

use palpo_core::{Error, ErrorCode, Result};
use palpo_storage::model::{CrossSigningKeyRecord, KeySignatureRecord};
use serde_json::{Map, Value, json};

use super::{E2eeService, KeysQueryResult, internal, server_of};
use crate::uia::{self, UiaRequest};

pub const MASTER: &str = "master";
pub const SELF_SIGNING: &str = "self_signing";
pub const USER_SIGNING: &str = "user_signing";
/// Column size of key ids (`ed25519:<unpadded base64 public key>` is 51 bytes).
const MAX_KEY_ID_BYTES: usize = 128;

/// Cross-signing keys a user publishes (`POST /keys/device_signing/upload`).
#[derive(Debug, Clone, Default)]
pub struct CrossSigningUpload {
    pub master_key: Option<Map<String, Value>>,
    pub self_signing_key: Option<Map<String, Value>>,
    pub user_signing_key: Option<Map<String, Value>>,
    /// User-interactive authentication, needed to replace existing keys.
    pub auth: Option<Value>,
}

/// The cross-signing part of `/keys/query`.
#[derive(Debug, Clone, Default)]
pub struct CrossSigningQuery {
    pub master_keys: BTreeMap<String, Value>,
    pub self_signing_keys: BTreeMap<String, Value>,
    pub user_signing_keys: BTreeMap<String, Value>,
}

fn invalid_signature(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidSignature, message)
}

/// The ed25519 public key of a cross-signing key object of `user` for `usage`:
/// `(key id, public key)`.
fn public_key(key: &Map<String, Value>, user: &str, usage: &str) -> Result<(String, String)> {
    if key.get("user_id").and_then(Value::as_str) != Some(user) {
        return Err(Error::invalid_param(format!(
            "The {usage} key's user_id must be {user}"
        )));
    }
    let usages = key.get("usage").and_then(Value::as_array);
    if !usages.is_some_and(|u| u.iter().any(|v| v.as_str() == Some(usage))) {
        return Err(Error::invalid_param(format!(
            "The {usage} key's usage must include {usage:?}"
        )));
    }
    public_key_of(key).ok_or_else(|| {
        Error::invalid_param(format!(
            "The {usage} key must have exactly one key, ed25519:<public key>"
        ))
    })
}

/// `(ed25519:<public key>, public key)` of a key object with exactly one ed25519 key.
fn public_key_of(key: &Map<String, Value>) -> Option<(String, String)> {
    let keys = key.get("keys")?.as_object()?;
    if keys.len() != 1 {
        return None;
    }
    let (key_id, public) = keys.iter().next()?;
    let public = public.as_str()?;
    let named = key_id.strip_prefix("ed25519:")?;
    (named == public && !public.is_empty() && key_id.len() <= MAX_KEY_ID_BYTES)
        .then(|| (key_id.clone(), public.to_owned()))
}

/// Whether `signature` (unpadded base64) by `public` (unpadded base64 ed25519 key) signs
/// `object`.
fn signature_verifies(object: &Map<String, Value>, public: &str, signature: &str) -> bool {
    type B64 = ruma::serde::Base64<ruma::serde::base64::Standard, Vec<u8>>;
    let (Ok(public), Ok(signature)) = (B64::parse(public), B64::parse(signature)) else {
        return false;
    };
    let Ok(canonical) = ruma::canonical_json::try_from_json_map(object.clone()) else {
        return false;
    };
    let Ok(text) = ruma::signatures::to_canonical_json_string_for_signing(&canonical) else {
        return false;
    };
    ruma::signatures::verify_canonical_json_bytes(
        &ruma::SigningKeyAlgorithm::Ed25519,
        public.as_bytes(),
        signature.as_bytes(),
        text.as_bytes(),
    )
    .is_ok()
}

/// The signature of `signer`'s key `key_id` in `object`, if any.
fn signature_of<'a>(object: &'a Map<String, Value>, signer: &str, key_id: &str) -> Option<&'a str> {
    object.get("signatures")?.get(signer)?.get(key_id)?.as_str()
}

/// `object` without `signatures` and `unsigned`: what a signature covers.
fn signed_part(object: &Map<String, Value>) -> Map<String, Value> {
    let mut part = object.clone();
    part.remove("signatures");
    part.remove("unsigned");
    part
}

/// Adds uploaded signatures of `target_key_id` to a key object.
fn merge_signatures(key: &mut Value, target_key_id: &str, signatures: &[KeySignatureRecord]) {
    let Some(object) = key.as_object_mut() else {
        return;
    };
    for sig in signatures
        .iter()
        .filter(|s| s.target_key_id == target_key_id)
    {
        let all = object
            .entry("signatures")
            .or_insert_with(|| Value::Object(Map::new()));
        if !all.is_object() {
            *all = Value::Object(Map::new());
        }
        if let Some(all) = all.as_object_mut() {
            let by_signer = all
                .entry(sig.signer_user_id.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(by_signer) = by_signer.as_object_mut() {
                by_signer.insert(sig.signer_key_id.clone(), json!(sig.signature));
            }
        }
    }
}

fn failure(errcode: ErrorCode, error: &str) -> Value {
    json!({"errcode": errcode.as_str(), "error": error})
}

/// A user's stored cross-signing keys, parsed, by type.
type StoredKeys = BTreeMap<String, Map<String, Value>>;

impl E2eeService {
    async fn stored_cross_signing_keys(&self, user: &str) -> Result<StoredKeys> {
        let records = self
            .storage
            .e2ee
            .cross_signing_keys(user)
            .await
            .map_err(internal)?;
        let mut keys = BTreeMap::new();
        for record in records {
            if let Ok(Value::Object(key)) = serde_json::from_str(&record.key_json) {
                keys.insert(record.key_type, key);
            }
        }
        Ok(keys)
    }

    /// `POST /keys/device_signing/upload`. User-interactive authentication is needed unless
    /// the user has no master key yet, or the request brings exactly the keys stored.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn upload_cross_signing_keys(
        &self,
        user: &str,
        upload: CrossSigningUpload,
    ) -> Result<()> {
        let stored = self.stored_cross_signing_keys(user).await?;
        let proposed = [
            (MASTER, upload.master_key),
            (SELF_SIGNING, upload.self_signing_key),
            (USER_SIGNING, upload.user_signing_key),
        ];
        let unchanged = |key_type: &str, key: &Map<String, Value>| {
            stored.get(key_type).is_some_and(|stored| stored == key)
        };
        let replaces_nothing = match (&proposed[0].1, stored.get(MASTER)) {
            (_, None) => true,
            (Some(_), Some(_)) => proposed
                .iter()
                .all(|(key_type, key)| key.as_ref().is_none_or(|k| unchanged(key_type, k))),
            (None, Some(_)) => false,
        };
        if !replaces_nothing {
            self.uia
                .check(UiaRequest {
                    purpose: "device_signing_upload",
                    user_id: Some(user),
                    flows: vec![vec![uia::PASSWORD]],
                    auth: upload.auth.as_ref(),
                })
                .await?;
        }

        // The master key the others must be signed by: the new one, or the stored one.
        let master = match &proposed[0].1 {
            Some(master) => master,
            None => match stored.get(MASTER) {
                Some(master) => master,
                None if proposed.iter().any(|(_, key)| key.is_some()) => {
                    return Err(Error::missing_param("No master signing key is available"));
                }
                None => return Ok(()),
            },
        };
        let (master_key_id, master_public) = public_key(master, user, MASTER)?;
        let devices = self
            .storage
            .devices
            .list_devices(user)
            .await
            .map_err(internal)?;
        let mut changed = Vec::new();
        for (key_type, key) in &proposed {
            let Some(key) = key else {
                continue;
            };
            let (_, public) = public_key(key, user, key_type)?;
            if devices.iter().any(|d| d.device_id == public) {
                return Err(Error::forbidden("Key ID in use by a device"));
            }
            if *key_type != MASTER {
                let signed = signature_of(key, user, &master_key_id)
                    .is_some_and(|sig| signature_verifies(key, &master_public, sig));
                if !signed {
                    return Err(invalid_signature(format!(
                        "The {key_type} key is not signed by the master key"
                    )));
                }
            }
            if !unchanged(key_type, key) {
                changed.push(CrossSigningKeyRecord {
                    key_type: (*key_type).to_owned(),
                    key_json: Value::Object(key.clone()).to_string(),
                });
            }
        }
        let position = self
            .storage
            .e2ee
            .put_cross_signing_keys(user, &changed)
            .await
            .map_err(internal)?;
        if let Some(position) = position {
            self.notifier.stream_advanced(position);
        }
        Ok(())
    }

    /// `POST /keys/signatures/upload`: verifies and stores the signatures; returns the
    /// failures by user and key id.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn upload_signatures(
        &self,
        user: &str,
        signed: BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
    ) -> Result<BTreeMap<String, BTreeMap<String, Value>>> {
        let mut failures: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        let mut accepted = Vec::new();
        let own = self.stored_cross_signing_keys(user).await?;
        for (target_user, keys) in signed {
            let server = server_of(&target_user)?;
            if !self.is_local(server) {
                for key_id in keys.keys() {
                    failures.entry(target_user.clone()).or_default().insert(
                        key_id.clone(),
                        failure(ErrorCode::Unknown, "Federation is not supported"),
                    );
                }
                continue;
            }
            for (key_id, object) in keys {
                match self
                    .check_signatures(user, &own, &target_user, &key_id, &object)
                    .await?
                {
                    Ok(mut found) => accepted.append(&mut found),
                    Err(why) => {
                        failures
                            .entry(target_user.clone())
                            .or_default()
                            .insert(key_id, why);
                    }
                }
            }
        }
        let position = self
            .storage
            .e2ee
            .add_key_signatures(&accepted)
            .await
            .map_err(internal)?;
        if let Some(position) = position {
            self.notifier.stream_advanced(position);
        }
        Ok(failures)
    }

    /// The valid new signatures by `user` in `object`, the key `key_id` of `target_user`; or
    /// why there are none.
    async fn check_signatures(
        &self,
        user: &str,
        own: &StoredKeys,
        target_user: &str,
        key_id: &str,
        object: &Map<String, Value>,
    ) -> Result<std::result::Result<Vec<KeySignatureRecord>, Value>> {
        let record = |signer_key_id: &str, signature: &str| KeySignatureRecord {
            target_user_id: target_user.to_owned(),
            target_key_id: key_id.to_owned(),
            signer_user_id: user.to_owned(),
            signer_key_id: signer_key_id.to_owned(),
            signature: signature.to_owned(),
        };
        let not_found = || failure(ErrorCode::NotFound, "Unknown key");
        let mismatch = || {
            failure(
                ErrorCode::InvalidParam,
                "The signed object does not match the stored key",
            )
        };
        let bad = || failure(ErrorCode::InvalidSignature, "Invalid signature");
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID_BYTES {
            return Ok(Err(not_found()));
        }
        let target_keys = if target_user == user {
            own.clone()
        } else {
            self.stored_cross_signing_keys(target_user).await?
        };
        let target_master = target_keys
            .get(MASTER)
            .and_then(|master| Some((master, public_key_of(master)?)));

        // A master key: the user's, signed by their devices; another user's, signed by the
        // user's user-signing key.
        if let Some((master, (_, public))) = target_master
            && public == key_id
        {
            if signed_part(master) != signed_part(object) {
                return Ok(Err(mismatch()));
            }
            let mut found = Vec::new();
            if target_user == user {
                let devices = self
                    .storage
                    .e2ee
                    .device_keys(user, &[])
                    .await
                    .map_err(internal)?;
                for device in devices {
                    let signer_key_id = format!("ed25519:{}", device.device_id);
                    let Some(signature) = signature_of(object, user, &signer_key_id) else {
                        continue;
                    };
                    let device_keys: Value =
                        serde_json::from_str(&device.key_json).map_err(Error::internal)?;
                    let Some(device_public) = device_keys["keys"][&signer_key_id].as_str() else {
                        continue;
                    };
                    if !signature_verifies(object, device_public, signature) {
                        return Ok(Err(bad()));
                    }
                    found.push(record(&signer_key_id, signature));
                }
            } else {
                let Some((signer_key_id, public)) = own.get(USER_SIGNING).and_then(public_key_of)
                else {
                    return Ok(Err(failure(
                        ErrorCode::MissingParam,
                        "You have no user-signing key",
                    )));
                };
                if let Some(signature) = signature_of(object, user, &signer_key_id) {
                    if !signature_verifies(object, &public, signature) {
                        return Ok(Err(bad()));
                    }
                    found.push(record(&signer_key_id, signature));
                }
            }
            return Ok(if found.is_empty() {
                Err(bad())
            } else {
                Ok(found)
            });
        }

        // One of the user's devices, signed by their self-signing key.
        if target_user != user {
            return Ok(Err(not_found()));
        }
        let devices = self
            .storage
            .e2ee
            .device_keys(user, &[key_id.to_owned()])
            .await
            .map_err(internal)?;
        let Some(device) = devices.into_iter().next() else {
            return Ok(Err(not_found()));
        };
        let stored: Map<String, Value> = match serde_json::from_str(&device.key_json) {
            Ok(Value::Object(stored)) => stored,
            _ => return Ok(Err(not_found())),
        };
        if signed_part(&stored) != signed_part(object) {
            return Ok(Err(mismatch()));
        }
        let Some((signer_key_id, public)) = own.get(SELF_SIGNING).and_then(public_key_of) else {
            return Ok(Err(failure(
                ErrorCode::MissingParam,
                "You have no self-signing key",
            )));
        };
        match signature_of(object, user, &signer_key_id) {
            Some(signature) if signature_verifies(object, &public, signature) => {
                Ok(Ok(vec![record(&signer_key_id, signature)]))
            }
            _ => Ok(Err(bad())),
        }
    }

    /// Adds the uploaded signatures `viewer` may see to the queried device keys, and returns
    /// the cross-signing keys of the queried local users (user-signing: the viewer's own only).
    pub(super) async fn cross_signing_query(
        &self,
        viewer: &str,
        result: &mut KeysQueryResult,
        users: &[String],
    ) -> Result<CrossSigningQuery> {
        let mut query = CrossSigningQuery::default();
        for user in users {
            let signatures = self
                .storage
                .e2ee
                .key_signatures(user, viewer)
                .await
                .map_err(internal)?;
            if let Some(devices) = result.device_keys.get_mut(user) {
                for (device_id, keys) in devices.iter_mut() {
                    merge_signatures(keys, device_id, &signatures);
                }
            }
            let keys = self.stored_cross_signing_keys(user).await?;
            for (key_type, key) in keys {
                let mut key = Value::Object(key);
                match key_type.as_str() {
                    MASTER => {
                        if let Some((_, public)) = key.as_object().and_then(public_key_of) {
                            merge_signatures(&mut key, &public, &signatures);
                        }
                        query.master_keys.insert(user.clone(), key);
                    }
                    SELF_SIGNING => {
                        query.self_signing_keys.insert(user.clone(), key);
                    }
                    USER_SIGNING if user == viewer => {
                        query.user_signing_keys.insert(user.clone(), key);
                    }
                    _ => {}
                }
            }
        }
        Ok(query)
    }
}

#[cfg(test)]
mod tests {
    use ruma::signatures::{Ed25519KeyPair, KeyPair};

    use super::*;

    fn b64(bytes: &[u8]) -> String {
        use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
        STANDARD_NO_PAD.encode(bytes)
    }

    #[test]
    fn signatures_verify_over_the_canonical_json() {
        let der = Ed25519KeyPair::generate();
        let pair = Ed25519KeyPair::from_der(&der, "v".into()).expect("pair");
        let public = b64(&pair.public_key());
        let object = json!({"b": 1, "a": "x", "unsigned": {"ignored": true}});
        let Value::Object(object) = object else {
            unreachable!()
        };
        let canonical = ruma::canonical_json::try_from_json_map(object.clone()).expect("json");
        let text =
            ruma::signatures::to_canonical_json_string_for_signing(&canonical).expect("text");
        let signature = pair.sign(text.as_bytes()).base64();
        assert!(signature_verifies(&object, &public, &signature));
        let mut changed = object.clone();
        changed.insert("b".into(), json!(2));
        assert!(!signature_verifies(&changed, &public, &signature));
        assert!(!signature_verifies(&object, "not base64!", &signature));
    }

    #[test]
    fn cross_signing_keys_have_one_ed25519_key_of_their_owner() {
        let key = |value: Value| value.as_object().cloned().expect("object");
        let good =
            key(json!({"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:PUB": "PUB"}}));
        assert_eq!(
            public_key(&good, "@a:x", MASTER).expect("valid"),
            ("ed25519:PUB".to_owned(), "PUB".to_owned())
        );
        assert!(public_key(&good, "@b:x", MASTER).is_err());
        assert!(public_key(&good, "@a:x", SELF_SIGNING).is_err());
        for bad in [
            json!({"user_id": "@a:x", "usage": ["master"], "keys": {}}),
            json!({"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:A": "A", "ed25519:B": "B"}}),
            json!({"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:A": "B"}}),
            json!({"user_id": "@a:x", "usage": ["master"], "keys": {"curve25519:A": "A"}}),
        ] {
            assert!(public_key(&key(bad), "@a:x", MASTER).is_err());
        }
    }
}
