//! Login and logout: `GET/POST /login`, `POST /logout`, `POST /logout/all`.

use std::sync::Arc;

use palpo_core::{Error, ErrorCode};
use palpo_service::accounts::PasswordLogin;
use poem::Request;
use poem::web::Data;
use poem_openapi::{Object, OpenApi, payload::Json};

use crate::{
    ApiTags, AppState,
    auth::{AccessToken, client_ip},
    error::ApiResult,
    middleware::Limited,
};

#[derive(Debug, Object)]
pub struct LoginFlow {
    /// The login type, e.g. `m.login.password`.
    #[oai(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Object)]
pub struct LoginFlowsResponse {
    pub flows: Vec<LoginFlow>,
}

/// Who is logging in.
#[derive(Debug, Object)]
pub struct UserIdentifier {
    /// `m.id.user` is supported.
    #[oai(rename = "type", deserialize_with = "crate::strict::string")]
    pub kind: String,
    /// A localpart or a full user id.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub user: Option<String>,
}

#[derive(Debug, Object)]
pub struct LoginRequest {
    /// The login type; `m.login.password` is supported.
    #[oai(rename = "type", deserialize_with = "crate::strict::string")]
    pub kind: String,
    #[oai(nullable)]
    pub identifier: Option<UserIdentifier>,
    /// Deprecated by the spec in favour of `identifier`.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub user: Option<String>,
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub password: Option<String>,
    /// Reuse this device instead of making a new one.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub device_id: Option<String>,
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub initial_device_display_name: Option<String>,
    /// Whether the client supports refresh tokens (none are issued yet).
    #[oai(nullable)]
    pub refresh_token: Option<bool>,
}

#[derive(Debug, Object)]
pub struct LoginResponse {
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    /// Deprecated by the spec; the server name.
    pub home_server: String,
}

#[derive(Debug, Object)]
pub struct EmptyResponse {}

pub struct SessionApi;

#[OpenApi]
impl SessionApi {
    /// Gets the login types the server supports.
    #[oai(
        path = "/_matrix/client/v3/login",
        method = "get",
        tag = "ApiTags::SessionManagement",
        operation_id = "getLoginFlows"
    )]
    async fn login_flows(&self) -> ApiResult<Json<LoginFlowsResponse>> {
        Ok(Json(LoginFlowsResponse {
            flows: vec![LoginFlow {
                kind: "m.login.password".to_owned(),
            }],
        }))
    }

    /// Authenticates the user and issues an access token.
    #[oai(
        path = "/_matrix/client/v3/login",
        method = "post",
        tag = "ApiTags::SessionManagement",
        operation_id = "login"
    )]
    async fn login(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: Json<LoginRequest>,
    ) -> ApiResult<Json<LoginResponse>> {
        let ip = client_ip(req);
        state.limits.check(Limited::Login, ip.as_deref())?;
        let body = body.0;
        if body.kind != "m.login.password" {
            return Err(Error::with_status(
                400,
                ErrorCode::Unknown,
                format!("Unsupported login type {}", body.kind),
            )
            .into());
        }
        let user = match (&body.identifier, &body.user) {
            (Some(identifier), _) if identifier.kind != "m.id.user" => {
                return Err(Error::with_status(
                    400,
                    ErrorCode::Unknown,
                    format!("Unsupported identifier type {}", identifier.kind),
                )
                .into());
            }
            (
                Some(UserIdentifier {
                    user: Some(user), ..
                }),
                _,
            ) => user.clone(),
            (_, Some(user)) => user.clone(),
            _ => return Err(Error::missing_param("Missing user identifier").into()),
        };
        let password = body
            .password
            .ok_or_else(|| Error::missing_param("Missing password"))?;
        let session = state
            .services
            .accounts
            .login_password(
                PasswordLogin {
                    user,
                    password,
                    device_id: body.device_id,
                    initial_device_display_name: body.initial_device_display_name,
                },
                ip.as_deref(),
            )
            .await?;
        Ok(Json(LoginResponse {
            user_id: session.user_id,
            access_token: session.access_token.unwrap_or_default(),
            device_id: session.device_id.unwrap_or_default(),
            home_server: state.services.config.server_name.clone(),
        }))
    }

    /// Invalidates the access token and deletes its device.
    #[oai(
        path = "/_matrix/client/v3/logout",
        method = "post",
        tag = "ApiTags::SessionManagement",
        operation_id = "logout"
    )]
    async fn logout(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
    ) -> ApiResult<Json<EmptyResponse>> {
        state.services.accounts.logout(&auth.0).await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Invalidates every access token of the user and deletes all their devices.
    #[oai(
        path = "/_matrix/client/v3/logout/all",
        method = "post",
        tag = "ApiTags::SessionManagement",
        operation_id = "logout_all"
    )]
    async fn logout_all(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
    ) -> ApiResult<Json<EmptyResponse>> {
        state.services.accounts.logout_all(&auth.0).await?;
        Ok(Json(EmptyResponse {}))
    }
}
