//! Account registration and management: `/register`, `/register/available`,
//! `/account/whoami`, `/account/password`, `/account/deactivate`.

use std::sync::Arc;

use palpo_service::accounts::Registration;
use poem::Request;
use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Query, payload::Json};
use serde_json::Value;

use crate::{
    ApiTags, AppState,
    auth::{AccessToken, client_ip},
    client::session::EmptyResponse,
    error::ApiResult,
    middleware::Limited,
};

#[derive(Debug, Object)]
pub struct RegisterRequest {
    /// The localpart to register; the server picks one when absent.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub username: Option<String>,
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub password: Option<String>,
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub device_id: Option<String>,
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub initial_device_display_name: Option<String>,
    /// When true, no device or access token is created.
    #[oai(default)]
    pub inhibit_login: bool,
    /// Whether the client supports refresh tokens (none are issued yet).
    #[oai(nullable)]
    pub refresh_token: Option<bool>,
    /// User-interactive authentication data (`type`, `session`, stage parameters).
    #[oai(nullable)]
    pub auth: Option<Value>,
}

#[derive(Debug, Object)]
pub struct RegisterResponse {
    pub user_id: String,
    #[oai(skip_serializing_if_is_none)]
    pub access_token: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub device_id: Option<String>,
    /// Deprecated by the spec; the server name.
    pub home_server: String,
}

#[derive(Debug, Object)]
pub struct AvailableResponse {
    /// Always true when the name is available; otherwise an error is returned.
    pub available: bool,
}

#[derive(Debug, Object)]
pub struct WhoamiResponse {
    pub user_id: String,
    pub device_id: String,
    pub is_guest: bool,
}

#[derive(Debug, Object)]
pub struct ChangePasswordRequest {
    #[oai(deserialize_with = "crate::strict::string")]
    pub new_password: String,
    /// Whether the user's other devices are logged out (default true).
    #[oai(default = "default_true")]
    pub logout_devices: bool,
    /// User-interactive authentication data.
    #[oai(nullable)]
    pub auth: Option<Value>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Object)]
pub struct DeactivateRequest {
    /// User-interactive authentication data.
    #[oai(nullable)]
    pub auth: Option<Value>,
    /// Identity server to unbind from (identity servers are not supported).
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub id_server: Option<String>,
    /// Whether to erase the user's data (not yet supported; the account is deactivated).
    #[oai(nullable)]
    pub erase: Option<bool>,
}

#[derive(Debug, Object)]
pub struct DeactivateResponse {
    /// `no-support`: this server does not talk to identity servers.
    pub id_server_unbind_result: String,
}

pub struct AccountApi;

#[OpenApi]
impl AccountApi {
    /// Registers an account (user-interactive: `m.login.dummy`, or
    /// `m.login.registration_token` when the server requires a token).
    #[oai(
        path = "/_matrix/client/v3/register",
        method = "post",
        tag = "ApiTags::AccountRegistration",
        operation_id = "register"
    )]
    async fn register(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        /// `user` (default) or `guest` (not supported).
        kind: Query<Option<String>>,
        body: Json<Option<RegisterRequest>>,
    ) -> ApiResult<Json<RegisterResponse>> {
        let ip = client_ip(req);
        state.limits.check(Limited::Registration, ip.as_deref())?;
        let guest = match kind.0.as_deref() {
            None | Some("user") => false,
            Some("guest") => true,
            Some(other) => {
                return Err(palpo_core::Error::invalid_param(format!(
                    "Unknown kind {other}: use user or guest"
                ))
                .into());
            }
        };
        let registration = match body.0 {
            Some(body) => Registration {
                username: body.username,
                password: body.password,
                device_id: body.device_id,
                initial_device_display_name: body.initial_device_display_name,
                inhibit_login: body.inhibit_login,
                guest,
                auth: body.auth,
            },
            None => Registration {
                guest,
                ..Registration::default()
            },
        };
        let session = state
            .services
            .accounts
            .register(registration, ip.as_deref())
            .await?;
        Ok(Json(RegisterResponse {
            user_id: session.user_id,
            access_token: session.access_token,
            device_id: session.device_id,
            home_server: state.services.config.server_name.clone(),
        }))
    }

    /// Checks whether a username is available and valid.
    #[oai(
        path = "/_matrix/client/v3/register/available",
        method = "get",
        tag = "ApiTags::AccountRegistration",
        operation_id = "checkUsernameAvailability"
    )]
    async fn available(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        /// The localpart to check.
        username: Query<String>,
    ) -> ApiResult<Json<AvailableResponse>> {
        state
            .limits
            .check(Limited::Registration, client_ip(req).as_deref())?;
        state
            .services
            .accounts
            .username_available(&username.0)
            .await?;
        Ok(Json(AvailableResponse { available: true }))
    }

    /// Gets information about the owner of an access token.
    #[oai(
        path = "/_matrix/client/v3/account/whoami",
        method = "get",
        tag = "ApiTags::AccountManagement",
        operation_id = "getTokenOwner"
    )]
    async fn whoami(&self, auth: AccessToken) -> ApiResult<Json<WhoamiResponse>> {
        Ok(Json(WhoamiResponse {
            user_id: auth.0.user_id,
            device_id: auth.0.device_id,
            is_guest: false,
        }))
    }

    /// Changes the password (user-interactive: `m.login.password`).
    #[oai(
        path = "/_matrix/client/v3/account/password",
        method = "post",
        tag = "ApiTags::AccountManagement",
        operation_id = "changePassword"
    )]
    async fn change_password(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<ChangePasswordRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .accounts
            .change_password(
                &auth.0,
                body.new_password,
                body.logout_devices,
                body.auth.as_ref(),
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Deactivates the account (user-interactive: `m.login.password`). The user id stays
    /// reserved; every device and token is removed.
    #[oai(
        path = "/_matrix/client/v3/account/deactivate",
        method = "post",
        tag = "ApiTags::AccountManagement",
        operation_id = "deactivateAccount"
    )]
    async fn deactivate(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<Option<DeactivateRequest>>,
    ) -> ApiResult<Json<DeactivateResponse>> {
        let auth_data = body.0.and_then(|b| b.auth);
        state
            .services
            .accounts
            .deactivate(&auth.0, auth_data.as_ref())
            .await?;
        Ok(Json(DeactivateResponse {
            id_server_unbind_result: "no-support".to_owned(),
        }))
    }
}
