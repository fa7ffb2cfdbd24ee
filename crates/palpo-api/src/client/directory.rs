//! Room aliases (`/directory/room/{roomAlias}`, `/rooms/{roomId}/aliases`) and the published
//! room directory (`/directory/list/room/{roomId}`, `/publicRooms`).

use crate::path_ids::{RoomAliasParam, RoomIdParam};
use std::sync::Arc;

use palpo_core::Error;
use palpo_service::rooms::{PublishedRoom, PublishedRoomsPage, PublishedRoomsQuery};
use poem::web::Data;
use poem_openapi::{
    Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};

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

#[derive(Debug, Object)]
pub struct DirectoryVisibility {
    /// `public` (listed in the published room directory) or `private`.
    pub visibility: String,
}

#[derive(Debug, Object)]
pub struct SetRoomVisibilityRequest {
    /// `public` or `private`; `public` when absent.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub visibility: Option<String>,
}

#[derive(Debug, Object)]
pub struct PublicRoomsFilter {
    /// Looked for in the rooms' names, topics, canonical aliases and ids (any case).
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub generic_search_term: Option<String>,
    /// Room types to list; `null` in the list stands for rooms without a type.
    #[oai(
        deserialize_with = "crate::strict::optional_nullable_string_list",
        nullable
    )]
    pub room_types: Option<Vec<Option<String>>>,
}

#[derive(Debug, Object)]
pub struct PublicRoomsRequest {
    /// Most rooms to answer (100 when absent, at most 500).
    #[oai(nullable)]
    pub limit: Option<i64>,
    /// A `next_batch` or `prev_batch` of an earlier answer.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub since: Option<String>,
    #[oai(nullable)]
    pub filter: Option<PublicRoomsFilter>,
    /// Application services' networks: this server has none, so it changes nothing.
    #[oai(nullable)]
    pub include_all_networks: Option<bool>,
    /// An application service network: this server has none, so nothing is listed.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub third_party_instance_id: Option<String>,
}

/// A room of the published room directory.
#[derive(Debug, Object)]
pub struct PublicRoomsChunk {
    pub room_id: String,
    pub num_joined_members: i64,
    pub world_readable: bool,
    pub guest_can_join: bool,
    #[oai(skip_serializing_if_is_none)]
    pub name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub topic: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub avatar_url: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub canonical_alias: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub join_rule: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub room_type: Option<String>,
}

#[derive(Debug, Object)]
pub struct PublicRoomsResponse {
    pub chunk: Vec<PublicRoomsChunk>,
    /// Where the next page starts; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_batch: Option<String>,
    /// Where the previous page starts; absent on the first page.
    #[oai(skip_serializing_if_is_none)]
    pub prev_batch: Option<String>,
    /// How many rooms the directory (with the filter) lists.
    pub total_room_count_estimate: i64,
}

impl From<PublishedRoom> for PublicRoomsChunk {
    fn from(room: PublishedRoom) -> Self {
        PublicRoomsChunk {
            room_id: room.room_id,
            num_joined_members: room.num_joined_members,
            world_readable: room.world_readable,
            guest_can_join: room.guest_can_join,
            name: room.name,
            topic: room.topic,
            avatar_url: room.avatar_url,
            canonical_alias: room.canonical_alias,
            join_rule: room.join_rule,
            room_type: room.room_type,
        }
    }
}

impl From<PublishedRoomsPage> for PublicRoomsResponse {
    fn from(page: PublishedRoomsPage) -> Self {
        PublicRoomsResponse {
            chunk: page.chunk.into_iter().map(Into::into).collect(),
            next_batch: page.next_batch,
            prev_batch: page.prev_batch,
            total_room_count_estimate: page.total_room_count_estimate,
        }
    }
}

/// Only this server's directory can be listed: others' need federation.
fn check_server(state: &AppState, server: Option<&str>) -> Result<(), Error> {
    match server {
        Some(server) if server != state.services.config.server_name => Err(Error::invalid_param(
            "Listing another server's room directory is not supported",
        )),
        _ => Ok(()),
    }
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

    /// Whether a room is listed in the published room directory (no access token needed).
    #[oai(
        path = "/_matrix/client/v3/directory/list/room/:roomId",
        method = "get",
        tag = "ApiTags::RoomDirectory",
        operation_id = "getRoomVisibilityOnDirectory"
    )]
    async fn room_visibility(
        &self,
        state: Data<&Arc<AppState>>,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
    ) -> ApiResult<Json<DirectoryVisibility>> {
        let visibility = state.services.rooms.room_visibility(&room_id.0).await?;
        Ok(Json(DirectoryVisibility {
            visibility: visibility.to_owned(),
        }))
    }

    /// Lists a room in the published room directory, or takes it out: for members who may
    /// change the room's canonical alias.
    #[oai(
        path = "/_matrix/client/v3/directory/list/room/:roomId",
        method = "put",
        tag = "ApiTags::RoomDirectory",
        operation_id = "setRoomVisibilityOnDirectory"
    )]
    async fn set_room_visibility(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<SetRoomVisibilityRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let visibility = body.0.visibility.as_deref().unwrap_or("public");
        state
            .services
            .rooms
            .set_room_visibility(&auth.0.user_id, &room_id.0, visibility)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Lists the published room directory, the most joined rooms first (no access token
    /// needed).
    #[oai(
        path = "/_matrix/client/v3/publicRooms",
        method = "get",
        tag = "ApiTags::RoomDirectory",
        operation_id = "getPublicRooms"
    )]
    async fn public_rooms(
        &self,
        state: Data<&Arc<AppState>>,
        limit: Query<Option<i64>>,
        since: Query<Option<String>>,
        server: Query<Option<String>>,
    ) -> ApiResult<Json<PublicRoomsResponse>> {
        check_server(&state, server.0.as_deref())?;
        let query = PublishedRoomsQuery {
            limit: limit.0,
            since: since.0,
            ..Default::default()
        };
        let page = state.services.rooms.published_rooms(query).await?;
        Ok(Json(page.into()))
    }

    /// Lists the published room directory with a filter: a search term and room types.
    #[oai(
        path = "/_matrix/client/v3/publicRooms",
        method = "post",
        tag = "ApiTags::RoomDirectory",
        operation_id = "queryPublicRooms"
    )]
    async fn query_public_rooms(
        &self,
        state: Data<&Arc<AppState>>,
        _auth: AccessToken,
        server: Query<Option<String>>,
        body: Json<PublicRoomsRequest>,
    ) -> ApiResult<Json<PublicRoomsResponse>> {
        check_server(&state, server.0.as_deref())?;
        let request = body.0;
        if request.third_party_instance_id.is_some() && request.include_all_networks == Some(true) {
            return Err(Error::invalid_param(
                "third_party_instance_id cannot be used with include_all_networks",
            )
            .into());
        }
        if request.third_party_instance_id.is_some() {
            // No application service networks here: none of their rooms to list.
            return Ok(Json(PublishedRoomsPage::default().into()));
        }
        let (search_term, room_types) = match request.filter {
            Some(filter) => (filter.generic_search_term, filter.room_types),
            None => (None, None),
        };
        let query = PublishedRoomsQuery {
            limit: request.limit,
            since: request.since,
            search_term,
            room_types,
        };
        let page = state.services.rooms.published_rooms(query).await?;
        Ok(Json(page.into()))
    }
}
