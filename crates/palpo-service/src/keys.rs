//! The server's ed25519 signing key: generated at first start, stored in the database so
//! that every server process signs with the same key, and published later by federation.

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use palpo_core::{Error, Result, now_millis};
use palpo_storage::{Storage, StorageError, model::SigningKeyRecord};
use ruma::signatures::Ed25519KeyPair;

use crate::credentials::random_string;

/// How long published keys are announced as valid; refreshed when served (federation).
const KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

pub struct ServerKeys {
    pub server_name: String,
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded base64 of the public key.
    pub public_key: String,
    pair: Ed25519KeyPair,
}

impl ServerKeys {
    /// Loads the oldest own key, generating and storing one when there is none. Two processes
    /// starting together may both store a key; both then use the oldest.
    pub async fn load_or_create(storage: &Storage, server_name: &str) -> Result<Self> {
        if let Some(keys) = Self::load(storage, server_name).await? {
            return Ok(keys);
        }
        let der = Ed25519KeyPair::generate();
        let version = format!("a_{}", random_string(4));
        let pair = Ed25519KeyPair::from_der(&der, version.clone()).map_err(Error::internal)?;
        let now = now_millis();
        let record = SigningKeyRecord {
            server_name: server_name.to_owned(),
            key_id: format!("ed25519:{version}"),
            public_key: STANDARD_NO_PAD.encode(pair.public_key()),
            private_key: Some(STANDARD_NO_PAD.encode(der.as_slice())),
            valid_until_ts: now + KEY_VALIDITY_MS,
            expired_ts: None,
            created_at: now,
        };
        match storage.keys.insert_signing_key(&record).await {
            Ok(()) | Err(StorageError::Conflict(_)) => {}
            Err(e) => return Err(Error::internal(e)),
        }
        tracing::info!(key_id = %record.key_id, "generated the server signing key");
        Self::load(storage, server_name)
            .await?
            .ok_or_else(|| Error::internal("signing key vanished after insert"))
    }

    async fn load(storage: &Storage, server_name: &str) -> Result<Option<Self>> {
        let keys = storage
            .keys
            .own_signing_keys(server_name)
            .await
            .map_err(Error::internal)?;
        let Some(record) = keys.into_iter().find(|k| k.expired_ts.is_none()) else {
            return Ok(None);
        };
        let der = STANDARD_NO_PAD
            .decode(record.private_key.as_deref().unwrap_or_default())
            .map_err(|e| Error::internal(format!("stored signing key is not base64: {e}")))?;
        let version = record
            .key_id
            .strip_prefix("ed25519:")
            .ok_or_else(|| Error::internal("stored signing key id is not ed25519"))?
            .to_owned();
        let pair = Ed25519KeyPair::from_der(&der, version).map_err(Error::internal)?;
        Ok(Some(ServerKeys {
            server_name: server_name.to_owned(),
            key_id: record.key_id,
            public_key: record.public_key,
            pair,
        }))
    }

    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }
}
