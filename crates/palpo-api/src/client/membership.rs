//! Room membership: joining, inviting, leaving, forgetting, kicking, banning, knocking; and
//! who is in a room (`/members`, `/joined_members`, `/joined_rooms`).

use crate::path_ids::{RoomIdOrAliasParam, RoomIdParam};
use std::{collections::BTreeMap, sync::Arc};

use poem::web::Data;
use poem_openapi::{
    Enum, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};

use crate::{
    ApiTags, AppState,
    auth::AccessToken,
    client::{
        rooms::{ClientEvent, RoomIdResponse, client_events},
        session::EmptyResponse,
    },
    error::ApiResult,
};

#[derive(Debug, Object)]
pub struct ReasonRequest {
    /// Why; shown to the other members in the membership event.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub reason: Option<String>,
}

#[derive(Debug, Object)]
pub struct TargetRequest {
    /// The user whose membership changes.
    #[oai(deserialize_with = "crate::strict::string")]
    pub user_id: String,
    /// Why; shown to the other members in the membership event.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub reason: Option<String>,
}

#[derive(Debug, Object)]
pub struct JoinedRoomsResponse {
    /// The rooms the user has joined.
    pub joined_rooms: Vec<String>,
}

#[derive(Debug, Object)]
pub struct MembersResponse {
    /// The `m.room.member` events.
    pub chunk: Vec<ClientEvent>,
}

#[derive(Debug, Object)]
pub struct RoomMember {
    #[oai(skip_serializing_if_is_none)]
    pub display_name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub avatar_url: Option<String>,
}

#[derive(Debug, Object)]
pub struct JoinedMembersResponse {
    /// The joined members, by user id.
    pub joined: BTreeMap<String, RoomMember>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Membership {
    Join,
    Invite,
    Knock,
    Leave,
    Ban,
}

impl Membership {
    fn as_str(self) -> &'static str {
        match self {
            Membership::Join => "join",
            Membership::Invite => "invite",
            Membership::Knock => "knock",
            Membership::Leave => "leave",
            Membership::Ban => "ban",
        }
    }
}

fn reason(body: Json<Option<ReasonRequest>>) -> Option<String> {
    body.0.and_then(|b| b.reason)
}

pub struct MembershipApi;

#[OpenApi]
impl MembershipApi {
    /// Lists the rooms the user has joined.
    #[oai(
        path = "/_matrix/client/v3/joined_rooms",
        method = "get",
        tag = "ApiTags::RoomMembership",
        operation_id = "getJoinedRooms"
    )]
    async fn joined_rooms(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
    ) -> ApiResult<Json<JoinedRoomsResponse>> {
        let joined_rooms = state.services.rooms.joined_rooms(&auth.0.user_id).await?;
        Ok(Json(JoinedRoomsResponse { joined_rooms }))
    }

    /// Lists the member events of a room, now or at a pagination token.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/members",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getMembersByRoom"
    )]
    async fn members(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        /// A pagination token: the members at that point.
        at: Query<Option<String>>,
        /// Only members with this membership.
        membership: Query<Option<Membership>>,
        /// No members with this membership.
        not_membership: Query<Option<Membership>>,
    ) -> ApiResult<Json<MembersResponse>> {
        let events = state
            .services
            .rooms
            .members(
                &auth.0.user_id,
                &room_id.0,
                at.0.as_deref(),
                membership.0.map(Membership::as_str),
                not_membership.0.map(Membership::as_str),
            )
            .await?;
        Ok(Json(MembersResponse {
            chunk: client_events(events),
        }))
    }

    /// Lists the joined members of a room with their display names and avatars.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/joined_members",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getJoinedMembersByRoom"
    )]
    async fn joined_members(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
    ) -> ApiResult<Json<JoinedMembersResponse>> {
        let members = state
            .services
            .rooms
            .joined_members(&auth.0.user_id, &room_id.0)
            .await?;
        Ok(Json(JoinedMembersResponse {
            joined: members
                .into_iter()
                .map(|(user, (display_name, avatar_url))| {
                    (
                        user,
                        RoomMember {
                            display_name,
                            avatar_url,
                        },
                    )
                })
                .collect(),
        }))
    }

    /// Joins a room by its id.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/join",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "joinRoomById"
    )]
    async fn join_by_id(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<Option<ReasonRequest>>,
    ) -> ApiResult<Json<RoomIdResponse>> {
        let room_id = state
            .services
            .rooms
            .join(&auth.0.user_id, &room_id.0, reason(body))
            .await?;
        Ok(Json(RoomIdResponse { room_id }))
    }

    /// Joins a room by its id or one of its aliases.
    #[oai(
        path = "/_matrix/client/v3/join/:roomIdOrAlias",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "joinRoom"
    )]
    async fn join(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomIdOrAlias")] room_id_or_alias: Path<RoomIdOrAliasParam>,
        body: Json<Option<ReasonRequest>>,
    ) -> ApiResult<Json<RoomIdResponse>> {
        let room_id = state
            .services
            .rooms
            .join(&auth.0.user_id, &room_id_or_alias.0, reason(body))
            .await?;
        Ok(Json(RoomIdResponse { room_id }))
    }

    /// Asks to join a room whose join rule is `knock`.
    #[oai(
        path = "/_matrix/client/v3/knock/:roomIdOrAlias",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "knockRoom"
    )]
    async fn knock(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomIdOrAlias")] room_id_or_alias: Path<RoomIdOrAliasParam>,
        body: Json<Option<ReasonRequest>>,
    ) -> ApiResult<Json<RoomIdResponse>> {
        let room_id = state
            .services
            .rooms
            .knock(&auth.0.user_id, &room_id_or_alias.0, reason(body))
            .await?;
        Ok(Json(RoomIdResponse { room_id }))
    }

    /// Invites a user into a room.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/invite",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "inviteUser"
    )]
    async fn invite(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<TargetRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .rooms
            .invite(&auth.0.user_id, &room_id.0, &body.user_id, body.reason)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Leaves a room, rejects an invite, or withdraws a knock.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/leave",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "leaveRoom"
    )]
    async fn leave(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<Option<ReasonRequest>>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .rooms
            .leave(&auth.0.user_id, &room_id.0, reason(body))
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Forgets a room the user has left: it no longer shows among their rooms.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/forget",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "forgetRoom"
    )]
    async fn forget(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .rooms
            .forget(&auth.0.user_id, &room_id.0)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Kicks a user out of a room (needs the room's `kick` power).
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/kick",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "kick"
    )]
    async fn kick(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<TargetRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .rooms
            .kick(&auth.0.user_id, &room_id.0, &body.user_id, body.reason)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Bans a user from a room (needs the room's `ban` power).
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/ban",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "ban"
    )]
    async fn ban(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<TargetRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .rooms
            .ban(&auth.0.user_id, &room_id.0, &body.user_id, body.reason)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Lifts a ban (needs the room's `ban` power).
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/unban",
        method = "post",
        tag = "ApiTags::RoomMembership",
        operation_id = "unban"
    )]
    async fn unban(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<TargetRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .rooms
            .unban(&auth.0.user_id, &room_id.0, &body.user_id, body.reason)
            .await?;
        Ok(Json(EmptyResponse {}))
    }
}
