//! End-to-end encryption: `/keys/upload`, `/keys/query`, `/keys/claim`, `/keys/changes`,
//! cross-signing (`/keys/device_signing/upload`, `/keys/signatures/upload`); and
//! send-to-device messaging: `/sendToDevice/{eventType}/{txnId}`.

use std::{borrow::Cow, collections::BTreeMap, marker::PhantomData, sync::Arc};

use palpo_service::{
    e2ee::{CrossSigningUpload, KeysUpload},
    sync::SyncToken,
};
use poem::web::Data;
use poem_openapi::{
    Object, OpenApi,
    param::{Path, Query},
    payload::Json,
    registry::{MetaSchemaRef, Registry},
    types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type},
};
use serde_json::{Map, Value};

use crate::{
    ApiTags, AppState,
    auth::AccessToken,
    client::{rooms::JsonObject, session::EmptyResponse},
    error::ApiResult,
};

/// A JSON object kept exactly as sent (signatures cover every field, known or not), while the
/// document shows, and parsing checks, the schema of `T`.
#[derive(Debug, Clone)]
pub struct Verbatim<T> {
    pub value: Map<String, Value>,
    schema: PhantomData<fn() -> T>,
}

impl<T> Verbatim<T> {
    pub fn new(value: Map<String, Value>) -> Self {
        Verbatim {
            value,
            schema: PhantomData,
        }
    }
}

impl<T: Type> Type for Verbatim<T> {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        T::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry)
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl<T: ParseFromJSON> ParseFromJSON for Verbatim<T> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        let value = value.unwrap_or_default();
        T::parse_from_json(Some(value.clone())).map_err(ParseError::propagate)?;
        match value {
            Value::Object(map) => Ok(Verbatim::new(map)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl<T: ToJSON> ToJSON for Verbatim<T> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::Object(self.value.clone()))
    }
}

/// Device identity keys.
#[derive(Debug, Object)]
pub struct DeviceKeys {
    /// The ID of the user the device belongs to; must be the user of the access token.
    #[oai(deserialize_with = "crate::strict::string")]
    pub user_id: String,
    /// The ID of the device these keys belong to; must be the device of the access token.
    #[oai(deserialize_with = "crate::strict::string")]
    pub device_id: String,
    /// The encryption algorithms supported by this device.
    #[oai(deserialize_with = "crate::strict::string_list")]
    pub algorithms: Vec<String>,
    /// Public identity keys, `<algorithm>:<device_id>` → key.
    pub keys: BTreeMap<String, String>,
    /// Signatures of the key object: user ID → `<algorithm>:<device_id>` → signature.
    pub signatures: BTreeMap<String, BTreeMap<String, String>>,
}

/// Added by the server, not covered by the signatures.
#[derive(Debug, Object)]
pub struct UnsignedDeviceInfo {
    /// The display name which the user set on the device.
    pub device_display_name: Option<String>,
}

/// A device's identity keys as uploaded, with the `unsigned` data the server adds.
#[derive(Debug, Object)]
pub struct DeviceInformation {
    pub user_id: String,
    pub device_id: String,
    pub algorithms: Vec<String>,
    pub keys: BTreeMap<String, String>,
    pub signatures: BTreeMap<String, BTreeMap<String, String>>,
    pub unsigned: Option<UnsignedDeviceInfo>,
}

#[derive(Debug, Object)]
pub struct UploadKeysRequest {
    /// Identity keys for the device. May be absent if no new identity keys are required.
    #[oai(nullable)]
    pub device_keys: Option<Verbatim<DeviceKeys>>,
    /// One-time public keys for "pre-key" messages: `<algorithm>:<key_id>` → the key, a
    /// string or a signed key object `{"key", "signatures"}`.
    #[oai(nullable)]
    pub one_time_keys: Option<BTreeMap<String, Value>>,
    /// Keys to hand out once the one-time keys run out, at most one per algorithm, in the
    /// same format (signed ones with `"fallback": true`). Each replaces the device's fallback
    /// key of its algorithm.
    #[oai(nullable)]
    pub fallback_keys: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Object)]
pub struct UploadKeysResponse {
    /// For each key algorithm, the number of unclaimed one-time keys of that type held for
    /// this device. An algorithm that is not listed has none.
    pub one_time_key_counts: BTreeMap<String, i64>,
}

#[derive(Debug, Object)]
pub struct QueryKeysRequest {
    /// Milliseconds to wait for remote servers (accepted; only local users are known).
    #[oai(nullable)]
    pub timeout: Option<u64>,
    /// The keys to download: user ID → device IDs, or an empty list for all of the user's
    /// devices.
    pub device_keys: BTreeMap<String, Vec<String>>,
}

/// A cross-signing key.
#[derive(Debug, Object)]
pub struct CrossSigningKey {
    /// The ID of the user the key belongs to.
    #[oai(deserialize_with = "crate::strict::string")]
    pub user_id: String,
    /// What the key is used for: `master`, `self_signing` or `user_signing`.
    #[oai(deserialize_with = "crate::strict::string_list")]
    pub usage: Vec<String>,
    /// The public key: exactly one property, `ed25519:<public key>` → public key.
    pub keys: BTreeMap<String, String>,
    /// Signatures of the key. Optional for the master key; the others must be signed by the
    /// master key.
    #[oai(nullable)]
    pub signatures: Option<BTreeMap<String, BTreeMap<String, String>>>,
}

#[derive(Debug, Object)]
pub struct QueryKeysResponse {
    /// Servers that could not be reached, by server name.
    pub failures: BTreeMap<String, JsonObject>,
    /// User ID → device ID → the device's keys as uploaded, with an `unsigned` property and
    /// the signatures uploaded since that the user may see.
    pub device_keys: BTreeMap<String, BTreeMap<String, Verbatim<DeviceInformation>>>,
    /// User ID → master key, with the signatures uploaded since that the user may see.
    pub master_keys: BTreeMap<String, Verbatim<CrossSigningKey>>,
    /// User ID → self-signing key.
    pub self_signing_keys: BTreeMap<String, Verbatim<CrossSigningKey>>,
    /// The user's own user-signing key, when they queried themselves.
    pub user_signing_keys: BTreeMap<String, Verbatim<CrossSigningKey>>,
}

#[derive(Debug, Object)]
pub struct UploadCrossSigningKeysRequest {
    /// The user's master key.
    #[oai(nullable)]
    pub master_key: Option<Verbatim<CrossSigningKey>>,
    /// The user's self-signing key, signed by the master key (this one or the stored one).
    #[oai(nullable)]
    pub self_signing_key: Option<Verbatim<CrossSigningKey>>,
    /// The user's user-signing key, signed by the master key (this one or the stored one).
    #[oai(nullable)]
    pub user_signing_key: Option<Verbatim<CrossSigningKey>>,
    /// User-interactive authentication, needed to replace keys the user has.
    #[oai(nullable)]
    pub auth: Option<Value>,
}

#[derive(Debug, Object)]
pub struct UploadSignaturesResponse {
    /// User ID → key ID → the error of a signature that was refused (`M_INVALID_SIGNATURE`
    /// when it does not verify).
    pub failures: BTreeMap<String, BTreeMap<String, JsonObject>>,
}

#[derive(Debug, Object)]
pub struct ClaimKeysRequest {
    /// Milliseconds to wait for remote servers (accepted; only local users are known).
    #[oai(nullable)]
    pub timeout: Option<u64>,
    /// The keys to claim: user ID → device ID → algorithm.
    pub one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Object)]
pub struct ClaimKeysResponse {
    /// Servers that could not be reached, by server name.
    pub failures: BTreeMap<String, JsonObject>,
    /// User ID → device ID → `<algorithm>:<key_id>` → the key: a one-time key, or the
    /// device's fallback key when it has no one-time key left.
    pub one_time_keys: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>>,
}

#[derive(Debug, Object)]
pub struct KeyChangesResponse {
    /// Users who updated their device identity keys (or deleted a device) since `from`.
    pub changed: Vec<String>,
    /// Users who may have left all the rooms they shared with the user.
    pub left: Vec<String>,
}

#[derive(Debug, Object)]
pub struct SendToDeviceRequest {
    /// The messages: user ID → device ID (or `*`, every device of the user) → content.
    pub messages: BTreeMap<String, BTreeMap<String, JsonObject>>,
}

fn object(value: JsonObject) -> Map<String, Value> {
    value.into_iter().collect()
}

/// Key objects by user, as the wire types.
fn verbatim_keys<T>(keys: BTreeMap<String, Value>) -> BTreeMap<String, Verbatim<T>> {
    keys.into_iter()
        .filter_map(|(user_id, key)| match key {
            Value::Object(map) => Some((user_id, Verbatim::new(map))),
            _ => None,
        })
        .collect()
}

fn failures(failures: BTreeMap<String, Value>) -> BTreeMap<String, JsonObject> {
    failures
        .into_iter()
        .map(|(server, failure)| {
            let failure = match failure {
                Value::Object(map) => map.into_iter().collect(),
                _ => JsonObject::new(),
            };
            (server, failure)
        })
        .collect()
}

pub struct KeysApi;

#[OpenApi]
impl KeysApi {
    /// Publishes end-to-end encryption keys for the device: identity keys, one-time keys,
    /// fallback keys. Returns how many one-time keys the server holds for it.
    #[oai(
        path = "/_matrix/client/v3/keys/upload",
        method = "post",
        tag = "ApiTags::EndToEndEncryption",
        operation_id = "uploadKeys"
    )]
    async fn upload_keys(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<UploadKeysRequest>,
    ) -> ApiResult<Json<UploadKeysResponse>> {
        let body = body.0;
        let upload = KeysUpload {
            device_keys: body.device_keys.map(|keys| keys.value),
            one_time_keys: body.one_time_keys.unwrap_or_default(),
            fallback_keys: body.fallback_keys.unwrap_or_default(),
        };
        let one_time_key_counts = state
            .services
            .e2ee
            .upload_keys(&auth.0.user_id, &auth.0.device_id, upload)
            .await?;
        Ok(Json(UploadKeysResponse {
            one_time_key_counts,
        }))
    }

    /// Returns the current devices and identity keys of the given users.
    #[oai(
        path = "/_matrix/client/v3/keys/query",
        method = "post",
        tag = "ApiTags::EndToEndEncryption",
        operation_id = "queryKeys"
    )]
    async fn query_keys(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<QueryKeysRequest>,
    ) -> ApiResult<Json<QueryKeysResponse>> {
        let result = state
            .services
            .e2ee
            .query_keys(&auth.0.user_id, &body.0.device_keys)
            .await?;
        let device_keys = result
            .device_keys
            .into_iter()
            .map(|(user_id, devices)| {
                let devices = devices
                    .into_iter()
                    .filter_map(|(device_id, keys)| match keys {
                        Value::Object(map) => Some((device_id, Verbatim::new(map))),
                        _ => None,
                    })
                    .collect();
                (user_id, devices)
            })
            .collect();
        Ok(Json(QueryKeysResponse {
            failures: failures(result.failures),
            device_keys,
            master_keys: verbatim_keys(result.master_keys),
            self_signing_keys: verbatim_keys(result.self_signing_keys),
            user_signing_keys: verbatim_keys(result.user_signing_keys),
        }))
    }

    /// Claims one-time keys for use in pre-key messages: one per device asked for, a one-time
    /// key while the device has some, else its fallback key. Each one-time key is handed out
    /// at most once.
    #[oai(
        path = "/_matrix/client/v3/keys/claim",
        method = "post",
        tag = "ApiTags::EndToEndEncryption",
        operation_id = "claimKeys"
    )]
    async fn claim_keys(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<ClaimKeysRequest>,
    ) -> ApiResult<Json<ClaimKeysResponse>> {
        let result = state
            .services
            .e2ee
            .claim_keys(&auth.0.user_id, &body.0.one_time_keys)
            .await?;
        Ok(Json(ClaimKeysResponse {
            failures: failures(result.failures),
            one_time_keys: result.one_time_keys,
        }))
    }

    /// Lists the users who updated their device identity keys (or deleted a device) between
    /// two sync tokens, among those sharing a room with the user, and those who left all the
    /// rooms they shared.
    #[oai(
        path = "/_matrix/client/v3/keys/changes",
        method = "get",
        tag = "ApiTags::EndToEndEncryption",
        operation_id = "getKeysChanges"
    )]
    async fn key_changes(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        /// The start point: a `next_batch` of an earlier `/sync`.
        from: Query<String>,
        /// The end point: a `next_batch` of a recent `/sync`.
        to: Query<String>,
    ) -> ApiResult<Json<KeyChangesResponse>> {
        let from = SyncToken::parse(&from.0)?;
        let to = SyncToken::parse(&to.0)?;
        let lists = state
            .services
            .e2ee
            .key_changes(&auth.0.user_id, from.stream, to.stream)
            .await?;
        Ok(Json(KeyChangesResponse {
            changed: lists.changed,
            left: lists.left,
        }))
    }

    /// Publishes the user's cross-signing keys. Needs user-interactive authentication unless
    /// the user has no master key yet or the request brings exactly the stored keys.
    #[oai(
        path = "/_matrix/client/v3/keys/device_signing/upload",
        method = "post",
        tag = "ApiTags::EndToEndEncryption",
        operation_id = "uploadCrossSigningKeys"
    )]
    async fn upload_cross_signing_keys(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<UploadCrossSigningKeysRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        let upload = CrossSigningUpload {
            master_key: body.master_key.map(|k| k.value),
            self_signing_key: body.self_signing_key.map(|k| k.value),
            user_signing_key: body.user_signing_key.map(|k| k.value),
            auth: body.auth,
        };
        state
            .services
            .e2ee
            .upload_cross_signing_keys(&auth.0.user_id, upload)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Publishes signatures of keys: of the user's devices (by the self-signing key), of the
    /// user's master key (by their devices), of other users' master keys (by the user-signing
    /// key). The signed objects must be the stored keys with the new signatures.
    #[oai(
        path = "/_matrix/client/v3/keys/signatures/upload",
        method = "post",
        tag = "ApiTags::EndToEndEncryption",
        operation_id = "uploadCrossSigningSignatures"
    )]
    async fn upload_signatures(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        /// User ID → key ID (a device ID, or a master key's public key) → the signed object.
        body: Json<BTreeMap<String, BTreeMap<String, JsonObject>>>,
    ) -> ApiResult<Json<UploadSignaturesResponse>> {
        let signed = body
            .0
            .into_iter()
            .map(|(user_id, keys)| {
                let keys = keys
                    .into_iter()
                    .map(|(key_id, signed)| (key_id, object(signed)))
                    .collect();
                (user_id, keys)
            })
            .collect();
        let failures = state
            .services
            .e2ee
            .upload_signatures(&auth.0.user_id, signed)
            .await?
            .into_iter()
            .map(|(user_id, keys)| {
                let keys = keys
                    .into_iter()
                    .map(|(key_id, error)| {
                        let error = match error {
                            Value::Object(map) => map.into_iter().collect(),
                            _ => JsonObject::new(),
                        };
                        (key_id, error)
                    })
                    .collect();
                (user_id, keys)
            })
            .collect();
        Ok(Json(UploadSignaturesResponse { failures }))
    }

    /// Sends an event to a set of devices: each message goes to one device of a user, or to
    /// every device of the user (`*`). Retrying with the same transaction id (from the same
    /// device) sends nothing again.
    #[oai(
        path = "/_matrix/client/v3/sendToDevice/:eventType/:txnId",
        method = "put",
        tag = "ApiTags::SendToDevice",
        operation_id = "sendToDevice"
    )]
    async fn send_to_device(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        /// The type of event to send.
        #[oai(name = "eventType")]
        event_type: Path<String>,
        /// The transaction ID of this request.
        #[oai(name = "txnId")]
        txn_id: Path<String>,
        body: Json<SendToDeviceRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let messages = body
            .0
            .messages
            .into_iter()
            .map(|(user_id, devices)| {
                let devices = devices
                    .into_iter()
                    .map(|(device_id, content)| (device_id, object(content)))
                    .collect();
                (user_id, devices)
            })
            .collect();
        state
            .services
            .e2ee
            .send_to_device(
                &auth.0.user_id,
                &auth.0.device_id,
                &event_type.0,
                &txn_id.0,
                messages,
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn verbatim_keeps_every_field_and_checks_the_schema() {
        let keys = json!({
            "user_id": "@a:x",
            "device_id": "D",
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {"curve25519:D": "k"},
            "signatures": {"@a:x": {"ed25519:D": "s"}},
            "dehydrated": true,
        });
        let parsed = Verbatim::<DeviceKeys>::parse_from_json(Some(keys.clone())).expect("valid");
        assert_eq!(parsed.to_json(), Some(keys));
        for bad in [
            json!({"user_id": "@a:x"}),
            json!({"user_id": 5, "device_id": "D", "algorithms": [], "keys": {}, "signatures": {}}),
            json!("keys"),
        ] {
            assert!(Verbatim::<DeviceKeys>::parse_from_json(Some(bad)).is_err());
        }
    }
}
