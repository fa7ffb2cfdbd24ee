//! `GET /_matrix/client/versions`, `GET /.well-known/matrix/client`, `GET /.well-known/matrix/server`.

use std::{collections::BTreeMap, sync::Arc};

use poem::web::Data;
use poem_openapi::{Object, OpenApi, payload::Json};

use crate::{
    ApiTags, AppState,
    error::{ApiResult, MatrixError},
};

/// Spec versions this server implements.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8",
    "v1.9", "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16", "v1.17", "v1.18",
    "v1.19",
];

#[derive(Debug, Object)]
pub struct VersionsResponse {
    /// The spec versions supported.
    pub versions: Vec<String>,
    /// Unstable features supported, by name.
    pub unstable_features: BTreeMap<String, bool>,
}

#[derive(Debug, Object)]
pub struct HomeserverInfo {
    /// The base URL of the homeserver for client-server connections.
    pub base_url: String,
}

#[derive(Debug, Object)]
pub struct ClientWellKnown {
    #[oai(rename = "m.homeserver")]
    pub homeserver: HomeserverInfo,
}

#[derive(Debug, Object)]
pub struct ServerWellKnown {
    /// Where federation traffic for this server name goes: `host[:port]`.
    #[oai(rename = "m.server")]
    pub server: String,
}

pub struct DiscoveryApi;

#[OpenApi]
impl DiscoveryApi {
    /// Gets the versions of the specification supported by the server.
    #[oai(
        path = "/_matrix/client/versions",
        method = "get",
        tag = "ApiTags::ServerDiscovery",
        operation_id = "getVersions"
    )]
    async fn versions(&self) -> ApiResult<Json<VersionsResponse>> {
        Ok(Json(VersionsResponse {
            versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
            unstable_features: BTreeMap::new(),
        }))
    }

    /// Gets Matrix server discovery information about the domain, for clients.
    #[oai(
        path = "/.well-known/matrix/client",
        method = "get",
        tag = "ApiTags::ServerDiscovery",
        operation_id = "getWellknown"
    )]
    async fn well_known_client(
        &self,
        state: Data<&Arc<AppState>>,
    ) -> ApiResult<Json<ClientWellKnown>> {
        let config = &state.services.config;
        let base_url = config
            .well_known
            .client
            .clone()
            .unwrap_or_else(|| config.public_base_url());
        Ok(Json(ClientWellKnown {
            homeserver: HomeserverInfo { base_url },
        }))
    }

    /// Gets the delegated server name for federation. 404 when none is configured.
    #[oai(
        path = "/.well-known/matrix/server",
        method = "get",
        tag = "ApiTags::ServerDiscovery",
        operation_id = "getWellKnownServer"
    )]
    async fn well_known_server(
        &self,
        state: Data<&Arc<AppState>>,
    ) -> ApiResult<Json<ServerWellKnown>> {
        match &state.services.config.well_known.server {
            Some(server) => Ok(Json(ServerWellKnown {
                server: server.clone(),
            })),
            None => Err(MatrixError::from(palpo_core::Error::not_found(
                "No server delegation is configured",
            ))),
        }
    }
}
