//! Room aliases: `/directory/room/{roomAlias}` and `/rooms/{roomId}/aliases`.

use crate::path_ids::{RoomAliasParam, RoomIdParam};
use std::sync::Arc;

use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Path, payload::Json};

use crate::{
    ApiTags, AppState, auth::AccessToken, client::session::EmptyResponse, error::ApiResult,
};

#[derive(Debug, Object)]
pub struct SetAliasRequest {
    /// The room the alias points to.
    #[oai(deserialize_with = "crate::strict::string")]
    pub room_id: String,
}

#[derive(Debug, Object)]
pub struct AliasResponse {
    /// The room the alias points to.
    pub room_id: String,
    /// Servers that know the room, to join it through.
    pub servers: Vec<String>,
}

#[derive(Debug, Object)]
pub struct AliasesResponse {
    /// The room's local aliases.
    pub aliases: Vec<String>,
}

pub struct DirectoryApi;

#[OpenApi]
impl DirectoryApi {
    /// Creates an alias on this server for a room the user has joined. An alias that exists
    /// is 409.
    #[oai(
        path = "/_matrix/client/v3/directory/room/:roomAlias",
        method = "put",
        tag = "ApiTags::RoomDirectory",
        operation_id = "setRoomAlias"
    )]
    async fn set_alias(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomAlias")] room_alias: Path<RoomAliasParam>,
        body: Json<SetAliasRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .rooms
            .create_alias(&auth.0.user_id, &room_alias.0, &body.0.room_id)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Resolves an alias to its room (no access token needed).
    #[oai(
        path = "/_matrix/client/v3/directory/room/:roomAlias",
        method = "get",
        tag = "ApiTags::RoomDirectory",
        operation_id = "getRoomIdByAlias"
    )]
    async fn get_alias(
        &self,
        state: Data<&Arc<AppState>>,
        #[oai(name = "roomAlias")] room_alias: Path<RoomAliasParam>,
    ) -> ApiResult<Json<AliasResponse>> {
        let (room_id, servers) = state.services.rooms.lookup_alias(&room_alias.0).await?;
        Ok(Json(AliasResponse { room_id, servers }))
    }

    /// Removes an alias: its creator, or someone with power over the room's state.
    #[oai(
        path = "/_matrix/client/v3/directory/room/:roomAlias",
        method = "delete",
        tag = "ApiTags::RoomDirectory",
        operation_id = "deleteRoomAlias"
    )]
    async fn delete_alias(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomAlias")] room_alias: Path<RoomAliasParam>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .rooms
            .delete_alias(&auth.0.user_id, &room_alias.0)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Lists the local aliases of a room.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/aliases",
        method = "get",
        tag = "ApiTags::RoomDirectory",
        operation_id = "getLocalAliases"
    )]
    async fn room_aliases(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
    ) -> ApiResult<Json<AliasesResponse>> {
        let aliases = state
            .services
            .rooms
            .room_aliases(&auth.0.user_id, &room_id.0)
            .await?;
        Ok(Json(AliasesResponse { aliases }))
    }
}
