//! `GET /_matrix/client/v3/capabilities`.

use std::{collections::BTreeMap, sync::Arc};

use palpo_service::rooms::ROOM_VERSIONS;
use poem::web::Data;
use poem_openapi::{Object, OpenApi, payload::Json};

use crate::{ApiTags, AppState, auth::AccessToken, error::ApiResult};

/// A capability that is simply on or off.
#[derive(Debug, Object)]
pub struct BooleanCapability {
    pub enabled: bool,
}

#[derive(Debug, Object)]
pub struct RoomVersionsCapability {
    /// The version new rooms get.
    pub default: String,
    /// Every version the server understands, with its stability (`stable` or `unstable`).
    pub available: BTreeMap<String, String>,
}

#[derive(Debug, Object)]
pub struct Capabilities {
    #[oai(rename = "m.change_password")]
    pub change_password: BooleanCapability,
    #[oai(rename = "m.room_versions")]
    pub room_versions: RoomVersionsCapability,
    #[oai(rename = "m.set_displayname")]
    pub set_displayname: BooleanCapability,
    #[oai(rename = "m.set_avatar_url")]
    pub set_avatar_url: BooleanCapability,
    #[oai(rename = "m.3pid_changes")]
    pub third_party_id_changes: BooleanCapability,
    #[oai(rename = "m.get_login_token")]
    pub get_login_token: BooleanCapability,
}

#[derive(Debug, Object)]
pub struct CapabilitiesResponse {
    pub capabilities: Capabilities,
}

pub struct CapabilitiesApi;

#[OpenApi]
impl CapabilitiesApi {
    /// Gets information about the server's capabilities.
    #[oai(
        path = "/_matrix/client/v3/capabilities",
        method = "get",
        tag = "ApiTags::Capabilities",
        operation_id = "getCapabilities"
    )]
    async fn capabilities(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AccessToken,
    ) -> ApiResult<Json<CapabilitiesResponse>> {
        // Versions 1 and 2 are understood, but events cannot be created in them.
        let available = ROOM_VERSIONS
            .iter()
            .map(|v| {
                let stability = if matches!(*v, "1" | "2") {
                    "unstable"
                } else {
                    "stable"
                };
                ((*v).to_owned(), stability.to_owned())
            })
            .collect();
        let off = || BooleanCapability { enabled: false };
        let on = || BooleanCapability { enabled: true };
        Ok(Json(CapabilitiesResponse {
            capabilities: Capabilities {
                change_password: on(),
                room_versions: RoomVersionsCapability {
                    default: state.services.rooms.default_room_version().to_owned(),
                    available,
                },
                set_displayname: on(),
                set_avatar_url: on(),
                third_party_id_changes: off(),
                get_login_token: off(),
            },
        }))
    }
}
