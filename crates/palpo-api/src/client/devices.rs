//! Device management: `/devices`, `/devices/{deviceId}`, `/delete_devices`.

use std::sync::Arc;

use palpo_service::accounts::DeviceRecord;
use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Path, payload::Json};
use serde_json::Value;

use crate::{
    ApiTags, AppState, auth::AccessToken, client::session::EmptyResponse, error::ApiResult,
};

#[derive(Debug, Object)]
pub struct Device {
    pub device_id: String,
    #[oai(skip_serializing_if_is_none)]
    pub display_name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub last_seen_ip: Option<String>,
    /// Milliseconds since the epoch.
    #[oai(skip_serializing_if_is_none)]
    pub last_seen_ts: Option<i64>,
}

impl From<DeviceRecord> for Device {
    fn from(d: DeviceRecord) -> Self {
        Device {
            device_id: d.device_id,
            display_name: d.display_name,
            last_seen_ip: d.last_seen_ip,
            last_seen_ts: d.last_seen_ts,
        }
    }
}

#[derive(Debug, Object)]
pub struct DevicesResponse {
    pub devices: Vec<Device>,
}

#[derive(Debug, Object)]
pub struct UpdateDeviceRequest {
    /// The new display name; absent leaves it unchanged.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub display_name: Option<String>,
}

#[derive(Debug, Object)]
pub struct DeleteDeviceRequest {
    /// User-interactive authentication data.
    #[oai(nullable)]
    pub auth: Option<Value>,
}

#[derive(Debug, Object)]
pub struct DeleteDevicesRequest {
    /// The devices to delete.
    #[oai(deserialize_with = "crate::strict::string_list")]
    pub devices: Vec<String>,
    /// User-interactive authentication data.
    #[oai(nullable)]
    pub auth: Option<Value>,
}

pub struct DevicesApi;

#[OpenApi]
impl DevicesApi {
    /// Lists the user's devices.
    #[oai(
        path = "/_matrix/client/v3/devices",
        method = "get",
        tag = "ApiTags::DeviceManagement",
        operation_id = "getDevices"
    )]
    async fn devices(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
    ) -> ApiResult<Json<DevicesResponse>> {
        let devices = state.services.accounts.devices(&auth.0).await?;
        Ok(Json(DevicesResponse {
            devices: devices.into_iter().map(Device::from).collect(),
        }))
    }

    /// Gets one device of the user.
    #[oai(
        path = "/_matrix/client/v3/devices/:deviceId",
        method = "get",
        tag = "ApiTags::DeviceManagement",
        operation_id = "getDevice"
    )]
    async fn device(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "deviceId")] device_id: Path<String>,
    ) -> ApiResult<Json<Device>> {
        let device = state
            .services
            .accounts
            .device(&auth.0, &device_id.0)
            .await?;
        Ok(Json(device.into()))
    }

    /// Updates the display name of a device.
    #[oai(
        path = "/_matrix/client/v3/devices/:deviceId",
        method = "put",
        tag = "ApiTags::DeviceManagement",
        operation_id = "updateDevice"
    )]
    async fn update_device(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "deviceId")] device_id: Path<String>,
        body: Json<UpdateDeviceRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let accounts = &state.services.accounts;
        match body.0.display_name {
            Some(name) => {
                accounts
                    .rename_device(&auth.0, &device_id.0, Some(&name))
                    .await?
            }
            // Nothing to change, but an unknown device is still 404.
            None => {
                accounts.device(&auth.0, &device_id.0).await?;
            }
        }
        Ok(Json(EmptyResponse {}))
    }

    /// Deletes a device and its access token (user-interactive: `m.login.password`).
    #[oai(
        path = "/_matrix/client/v3/devices/:deviceId",
        method = "delete",
        tag = "ApiTags::DeviceManagement",
        operation_id = "deleteDevice"
    )]
    async fn delete_device(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "deviceId")] device_id: Path<String>,
        body: Json<Option<DeleteDeviceRequest>>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let accounts = &state.services.accounts;
        // 404 before asking for a password, for a device that does not exist.
        accounts.device(&auth.0, &device_id.0).await?;
        let auth_data = body.0.and_then(|b| b.auth);
        accounts
            .delete_devices(&auth.0, &[device_id.0], auth_data.as_ref())
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Deletes several devices (user-interactive: `m.login.password`).
    #[oai(
        path = "/_matrix/client/v3/delete_devices",
        method = "post",
        tag = "ApiTags::DeviceManagement",
        operation_id = "deleteDevices"
    )]
    async fn delete_devices(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<DeleteDevicesRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .accounts
            .delete_devices(&auth.0, &body.devices, body.auth.as_ref())
            .await?;
        Ok(Json(EmptyResponse {}))
    }
}
