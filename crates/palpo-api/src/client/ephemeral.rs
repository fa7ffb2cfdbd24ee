//! Typing notifications, receipts, read markers and presence.

use crate::path_ids::{EventIdParam, RoomIdParam, UserIdParam};
use std::sync::Arc;

use palpo_service::ephemeral::PresenceState as ServicePresence;
use poem::web::Data;
use poem_openapi::{Enum, Object, OpenApi, param::Path, payload::Json};

use crate::{
    ApiTags, AppState, auth::AccessToken, client::session::EmptyResponse, error::ApiResult,
};

#[derive(Debug, Object)]
pub struct TypingRequest {
    /// Whether the user is typing. When `false`, `timeout` may be left out.
    pub typing: bool,
    /// How long the user is typing for, in milliseconds (at most 30 000, also the default).
    #[oai(nullable)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Object)]
pub struct ReceiptRequest {
    /// The thread root's event id (or `main`) the receipt is for; absent: unthreaded.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub thread_id: Option<String>,
}

#[derive(Debug, Object)]
pub struct ReadMarkersRequest {
    /// The event the fully read marker goes to (`m.fully_read` room account data).
    #[oai(
        rename = "m.fully_read",
        deserialize_with = "crate::strict::optional_string"
    )]
    #[oai(nullable)]
    pub fully_read: Option<String>,
    /// The event of the public read receipt, as `/receipt/m.read/{eventId}`.
    #[oai(
        rename = "m.read",
        deserialize_with = "crate::strict::optional_string",
        nullable
    )]
    pub read: Option<String>,
    /// The event of the private read receipt, as `/receipt/m.read.private/{eventId}`.
    #[oai(
        rename = "m.read.private",
        deserialize_with = "crate::strict::optional_string"
    )]
    #[oai(nullable)]
    pub read_private: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum PresenceState {
    Online,
    Offline,
    Unavailable,
}

impl From<PresenceState> for ServicePresence {
    fn from(state: PresenceState) -> Self {
        match state {
            PresenceState::Online => ServicePresence::Online,
            PresenceState::Offline => ServicePresence::Offline,
            PresenceState::Unavailable => ServicePresence::Unavailable,
        }
    }
}

#[derive(Debug, Object)]
pub struct SetPresenceRequest {
    /// The new presence state.
    pub presence: PresenceState,
    /// A status message to go with it.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub status_msg: Option<String>,
}

#[derive(Debug, Object)]
pub struct PresenceResponse {
    /// `online`, `offline` or `unavailable`.
    pub presence: String,
    /// Milliseconds since the user last did something.
    #[oai(skip_serializing_if_is_none)]
    pub last_active_ago: Option<i64>,
    /// The user's status message, if they set one.
    #[oai(skip_serializing_if_is_none)]
    pub status_msg: Option<String>,
    /// Whether the user is active right now.
    #[oai(skip_serializing_if_is_none)]
    pub currently_active: Option<bool>,
}

pub struct EphemeralApi;

#[OpenApi]
impl EphemeralApi {
    /// Tells the server that the user is typing in a room for the next `timeout`
    /// milliseconds, or that they stopped. Only for oneself, in a joined room.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/typing/:userId",
        method = "put",
        tag = "ApiTags::RoomParticipation",
        operation_id = "setTyping"
    )]
    async fn set_typing(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        body: Json<TypingRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .ephemeral
            .set_typing(
                &auth.0.user_id,
                &user_id.0,
                &room_id.0,
                body.0.typing,
                body.0.timeout,
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Moves the user's receipt of `receiptType` (`m.read`, `m.read.private`, or
    /// `m.fully_read`, which sets the read marker) to an event of the room. Private receipts
    /// are shown to their owner only.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/receipt/:receiptType/:eventId",
        method = "post",
        tag = "ApiTags::RoomParticipation",
        operation_id = "postReceipt"
    )]
    async fn post_receipt(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "receiptType")] receipt_type: Path<String>,
        #[oai(name = "eventId")] event_id: Path<EventIdParam>,
        body: Json<Option<ReceiptRequest>>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let thread_id = body.0.and_then(|b| b.thread_id);
        state
            .services
            .ephemeral
            .post_receipt(
                &auth.0.user_id,
                &room_id.0,
                &receipt_type.0,
                &event_id.0,
                thread_id.as_deref(),
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Sets the read marker (`m.fully_read`) of a room, and optionally the public and private
    /// read receipts.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/read_markers",
        method = "post",
        tag = "ApiTags::RoomParticipation",
        operation_id = "setReadMarker"
    )]
    async fn set_read_markers(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        body: Json<ReadMarkersRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .ephemeral
            .set_read_markers(
                &auth.0.user_id,
                &room_id.0,
                body.fully_read.as_deref(),
                body.read.as_deref(),
                body.read_private.as_deref(),
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Sets the user's own presence state and status message.
    #[oai(
        path = "/_matrix/client/v3/presence/:userId/status",
        method = "put",
        tag = "ApiTags::Presence",
        operation_id = "setPresence"
    )]
    async fn set_presence(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        body: Json<SetPresenceRequest>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let body = body.0;
        state
            .services
            .ephemeral
            .set_presence(
                &auth.0.user_id,
                &user_id.0,
                body.presence.into(),
                body.status_msg,
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Gets the presence of the user, or of a user who shares a room with them.
    #[oai(
        path = "/_matrix/client/v3/presence/:userId/status",
        method = "get",
        tag = "ApiTags::Presence",
        operation_id = "getPresence"
    )]
    async fn get_presence(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
    ) -> ApiResult<Json<PresenceResponse>> {
        let presence = state
            .services
            .ephemeral
            .presence(&auth.0.user_id, &user_id.0)
            .await?;
        Ok(Json(PresenceResponse {
            presence: presence.presence,
            last_active_ago: presence.last_active_ago,
            status_msg: presence.status_msg,
            currently_active: presence.currently_active,
        }))
    }
}
