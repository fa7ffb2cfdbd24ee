//! Creating rooms and taking part in them: `/createRoom`, sending messages and state,
//! redactions, and reading events, state, `/messages`, `/context` and
//! `/timestamp_to_event`.

use crate::path_ids::{EventIdParam, RoomIdParam};
use std::{collections::BTreeMap, sync::Arc};

use palpo_core::Error;
use palpo_service::rooms::{
    CreateRoom, Direction, InitialState, MessagesPage, MessagesQuery, Preset, TimelineFilter,
};
use poem::web::Data;
use poem_openapi::{
    Enum, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
    types::{ParseError, ParseResult},
};
use serde_json::{Map, Value};

use crate::{
    ApiTags, AppState,
    auth::{AccessToken, RememberedAccessToken},
    error::ApiResult,
};

/// A free-form JSON object: event content, a profile, an override of power levels.
pub type JsonObject = BTreeMap<String, Value>;

/// `object` as a JSON value.
pub fn object_value(object: JsonObject) -> Value {
    Value::Object(object.into_iter().collect())
}

/// `value` as an object; anything else is an empty object.
pub fn value_object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map.into_iter().collect(),
        _ => JsonObject::new(),
    }
}

/// An optional array of JSON strings (poem-openapi's own parser would take `5` as `"5"`).
pub fn optional_string_list(value: Option<Value>) -> ParseResult<Option<Vec<String>>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => list.push(s),
                    other => return Err(ParseError::expected_type(other)),
                }
            }
            Ok(Some(list))
        }
        Some(other) => Err(ParseError::expected_type(other)),
    }
}

/// An event in the format the client-server API serves ("ClientEvent").
#[derive(Debug, Clone, Object)]
pub struct ClientEvent {
    /// The body of the event, as its type defines it.
    pub content: JsonObject,
    pub event_id: String,
    /// When the sending server sent the event, in milliseconds since the epoch.
    pub origin_server_ts: i64,
    pub room_id: String,
    pub sender: String,
    /// Present exactly when this is a state event.
    #[oai(skip_serializing_if_is_none)]
    pub state_key: Option<String>,
    #[oai(rename = "type")]
    pub event_type: String,
    /// Data about the event that is not part of it (e.g. `redacted_because`).
    #[oai(skip_serializing_if_is_none)]
    pub unsigned: Option<JsonObject>,
    /// For redactions: the event redacted. Part of the event in room versions before 11; from
    /// 11 on a copy of `content.redacts`, served for clients written before them.
    #[oai(skip_serializing_if_is_none)]
    pub redacts: Option<String>,
}

impl From<Value> for ClientEvent {
    fn from(value: Value) -> Self {
        let mut map = match value {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let mut text = |key: &str| match map.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let event_id = text("event_id").unwrap_or_default();
        let room_id = text("room_id").unwrap_or_default();
        let sender = text("sender").unwrap_or_default();
        let state_key = text("state_key");
        let event_type = text("type").unwrap_or_default();
        let redacts = text("redacts");
        ClientEvent {
            content: map.remove("content").map(value_object).unwrap_or_default(),
            event_id,
            origin_server_ts: map
                .get("origin_server_ts")
                .and_then(Value::as_i64)
                .unwrap_or_default(),
            room_id,
            sender,
            state_key,
            event_type,
            unsigned: match map.remove("unsigned") {
                Some(Value::Object(unsigned)) => Some(unsigned.into_iter().collect()),
                _ => None,
            },
            redacts,
        }
    }
}

/// Service events (JSON) as wire events.
pub fn client_events(events: Vec<Value>) -> Vec<ClientEvent> {
    events.into_iter().map(ClientEvent::from).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum RoomPreset {
    /// Invite only; guests may join.
    PrivateChat,
    /// Anyone may join; no guests.
    PublicChat,
    /// As `private_chat`, and every invitee gets the creator's power.
    TrustedPrivateChat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum RoomVisibility {
    /// Published in the room directory.
    Public,
    /// Not published (the default).
    Private,
}

/// One event of `initial_state`.
#[derive(Debug, Object)]
pub struct InitialStateEvent {
    #[oai(rename = "type", deserialize_with = "crate::strict::string")]
    pub event_type: String,
    /// Defaults to the empty string.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub state_key: Option<String>,
    pub content: JsonObject,
}

#[derive(Debug, Object)]
pub struct CreateRoomRequest {
    /// `public` also publishes the room in the directory; default `private`.
    #[oai(nullable)]
    pub visibility: Option<RoomVisibility>,
    /// The localpart of an alias to create for the room (`#<name>:<server>`).
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub room_alias_name: Option<String>,
    /// Sent as an `m.room.name` event.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub name: Option<String>,
    /// Sent as an `m.room.topic` event.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub topic: Option<String>,
    /// Users to invite.
    #[oai(deserialize_with = "optional_string_list", nullable)]
    pub invite: Option<Vec<String>>,
    /// The room version; default the server's (see `m.room_versions` in `/capabilities`).
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub room_version: Option<String>,
    /// Extra keys of the `m.room.create` content.
    #[oai(nullable)]
    pub creation_content: Option<JsonObject>,
    /// State events sent after the preset's and before name and topic.
    #[oai(nullable)]
    pub initial_state: Option<Vec<InitialStateEvent>>,
    /// Default: `public_chat` for public rooms, `private_chat` otherwise.
    #[oai(nullable)]
    pub preset: Option<RoomPreset>,
    /// Marks the invites as direct chats.
    #[oai(nullable)]
    pub is_direct: Option<bool>,
    /// Keys that replace those of the default `m.room.power_levels` content.
    #[oai(nullable)]
    pub power_level_content_override: Option<JsonObject>,
}

#[derive(Debug, Object)]
pub struct RoomIdResponse {
    pub room_id: String,
}

#[derive(Debug, Object)]
pub struct EventIdResponse {
    pub event_id: String,
}

#[derive(Debug, Object)]
pub struct RedactRequest {
    /// Why the event is redacted.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum StateFormat {
    /// Only the content of the state event (the default).
    Content,
    /// The whole event.
    Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub enum PaginationDirection {
    /// Backwards in time: newest first.
    #[oai(rename = "b")]
    Backward,
    /// Forwards in time: oldest first.
    #[oai(rename = "f")]
    Forward,
}

impl From<PaginationDirection> for Direction {
    fn from(dir: PaginationDirection) -> Self {
        match dir {
            PaginationDirection::Backward => Direction::Backward,
            PaginationDirection::Forward => Direction::Forward,
        }
    }
}

#[derive(Debug, Object)]
pub struct MessagesResponse {
    /// The events, in the order of `dir`.
    pub chunk: Vec<ClientEvent>,
    /// The token the page starts at (`from`, or where the timeline starts when absent).
    pub start: String,
    /// The token to pass as `from` for the next page; absent when there is nothing more.
    #[oai(skip_serializing_if_is_none)]
    pub end: Option<String>,
}

impl From<MessagesPage> for MessagesResponse {
    fn from(page: MessagesPage) -> Self {
        MessagesResponse {
            chunk: client_events(page.chunk),
            start: page.start,
            end: page.end,
        }
    }
}

#[derive(Debug, Object)]
pub struct ContextResponse {
    /// The event asked for.
    pub event: ClientEvent,
    /// Events just before it, newest first.
    pub events_before: Vec<ClientEvent>,
    /// Events just after it, oldest first.
    pub events_after: Vec<ClientEvent>,
    /// A token to paginate backwards from with `/messages`.
    pub start: String,
    /// A token to paginate forwards from with `/messages`.
    pub end: String,
    /// The state of the room at the event.
    pub state: Vec<ClientEvent>,
}

#[derive(Debug, Object)]
pub struct TimestampToEventResponse {
    pub event_id: String,
    /// The event's timestamp, in milliseconds since the epoch.
    pub origin_server_ts: i64,
}

/// A `filter` query parameter: a JSON `RoomEventFilter`, of which the type, sender and room
/// lists, `contains_url` and `limit` are honoured.
fn parse_filter(filter: Option<&str>) -> Result<(TimelineFilter, Option<i64>), Error> {
    let Some(text) = filter else {
        return Ok((TimelineFilter::default(), None));
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Error::bad_json(format!("filter is not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(Error::bad_json("filter must be a JSON object"));
    };
    room_event_filter(&object)
}

/// A `RoomEventFilter` object: the type, sender and room lists, `contains_url`, and `limit`.
pub(crate) fn room_event_filter(
    object: &serde_json::Map<String, Value>,
) -> Result<(TimelineFilter, Option<i64>), Error> {
    palpo_service::filter::parse_room_event_filter(object)
}

/// A `limit` query parameter: 1 or more.
fn check_limit(limit: Option<i64>) -> Result<Option<i64>, Error> {
    match limit {
        Some(limit) if limit < 0 => Err(Error::invalid_param("limit must not be negative")),
        other => Ok(other),
    }
}

pub struct RoomsApi;

#[OpenApi]
impl RoomsApi {
    /// Creates a room: the create event, the creator's membership, power levels, the
    /// preset's rules, `initial_state`, name, topic and alias, then the invites.
    #[oai(
        path = "/_matrix/client/v3/createRoom",
        method = "post",
        tag = "ApiTags::RoomCreation",
        operation_id = "createRoom"
    )]
    async fn create_room(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<CreateRoomRequest>,
    ) -> ApiResult<Json<RoomIdResponse>> {
        let body = body.0;
        let request = CreateRoom {
            preset: body.preset.map(|preset| match preset {
                RoomPreset::PrivateChat => Preset::PrivateChat,
                RoomPreset::PublicChat => Preset::PublicChat,
                RoomPreset::TrustedPrivateChat => Preset::TrustedPrivateChat,
            }),
            is_public: body.visibility == Some(RoomVisibility::Public),
            room_version: body.room_version,
            creation_content: body
                .creation_content
                .map(|content| content.into_iter().collect()),
            initial_state: body
                .initial_state
                .unwrap_or_default()
                .into_iter()
                .map(|event| InitialState {
                    event_type: event.event_type,
                    state_key: event.state_key.unwrap_or_default(),
                    content: object_value(event.content),
                })
                .collect(),
            invite: body.invite.unwrap_or_default(),
            is_direct: body.is_direct.unwrap_or(false),
            name: body.name,
            topic: body.topic,
            room_alias_name: body.room_alias_name,
            power_level_content_override: body
                .power_level_content_override
                .map(|content| content.into_iter().collect()),
        };
        let room_id = state
            .services
            .rooms
            .create_room(&auth.0.user_id, request)
            .await?;
        Ok(Json(RoomIdResponse { room_id }))
    }

    /// Sends a message event. The same transaction id from the same device returns the
    /// event the first request created.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/send/:eventType/:txnId",
        method = "put",
        tag = "ApiTags::RoomParticipation",
        operation_id = "sendMessage"
    )]
    async fn send_message(
        &self,
        state: Data<&Arc<AppState>>,
        auth: RememberedAccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventType")] event_type: Path<String>,
        #[oai(name = "txnId")] txn_id: Path<String>,
        body: Json<JsonObject>,
    ) -> ApiResult<Json<EventIdResponse>> {
        let (services, caller) = (&state.services, &auth.0);
        let content = object_value(body.0);
        // A remembered token is checked in the event's own transaction.
        let sent = match &caller.unchecked {
            Some(token) => {
                services
                    .rooms
                    .send_message_checking(token, &room_id.0, &event_type.0, &txn_id.0, content)
                    .await
            }
            None => {
                services
                    .rooms
                    .send_message(
                        &caller.authed.user_id,
                        &caller.authed.device_id,
                        &room_id.0,
                        &event_type.0,
                        &txn_id.0,
                        content,
                    )
                    .await
            }
        };
        let event_id = services.accounts.settle(caller, sent).await?;
        Ok(Json(EventIdResponse { event_id }))
    }

    /// Sends a state event. `m.room.member` is changed through the membership endpoints.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/state/:eventType/:stateKey",
        method = "put",
        tag = "ApiTags::RoomParticipation",
        operation_id = "setRoomStateWithKey"
    )]
    async fn set_state(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventType")] event_type: Path<String>,
        #[oai(name = "stateKey")] state_key: Path<String>,
        body: Json<JsonObject>,
    ) -> ApiResult<Json<EventIdResponse>> {
        let event_id = state
            .services
            .rooms
            .send_state(
                &auth.0.user_id,
                &room_id.0,
                &event_type.0,
                &state_key.0,
                object_value(body.0),
            )
            .await?;
        Ok(Json(EventIdResponse { event_id }))
    }

    /// Sends a state event with an empty state key.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/state/:eventType",
        method = "put",
        tag = "ApiTags::RoomParticipation",
        operation_id = "setRoomStateWithEmptyKey"
    )]
    async fn set_state_empty_key(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventType")] event_type: Path<String>,
        body: Json<JsonObject>,
    ) -> ApiResult<Json<EventIdResponse>> {
        let event_id = state
            .services
            .rooms
            .send_state(
                &auth.0.user_id,
                &room_id.0,
                &event_type.0,
                "",
                object_value(body.0),
            )
            .await?;
        Ok(Json(EventIdResponse { event_id }))
    }

    /// Gets one state event: its content, or with `format=event` the whole event. Joined
    /// users see the current state, former members the state when they left.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/state/:eventType/:stateKey",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getRoomStateWithKey"
    )]
    async fn get_state(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventType")] event_type: Path<String>,
        #[oai(name = "stateKey")] state_key: Path<String>,
        /// `content` (default) or `event`.
        format: Query<Option<StateFormat>>,
    ) -> ApiResult<Json<JsonObject>> {
        state_event(
            &state,
            &auth,
            &room_id.0,
            &event_type.0,
            &state_key.0,
            format.0,
        )
        .await
    }

    /// Gets one state event with an empty state key.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/state/:eventType",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getRoomStateWithEmptyKey"
    )]
    async fn get_state_empty_key(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventType")] event_type: Path<String>,
        /// `content` (default) or `event`.
        format: Query<Option<StateFormat>>,
    ) -> ApiResult<Json<JsonObject>> {
        state_event(&state, &auth, &room_id.0, &event_type.0, "", format.0).await
    }

    /// Gets every state event of the room (current, or as it was when the user left).
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/state",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getRoomState"
    )]
    async fn room_state(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
    ) -> ApiResult<Json<Vec<ClientEvent>>> {
        let events = state
            .services
            .rooms
            .room_state(&auth.0.user_id, &room_id.0)
            .await?;
        Ok(Json(client_events(events)))
    }

    /// Redacts an event: the sender may redact their own events, others need the room's
    /// `redact` power.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/redact/:eventId/:txnId",
        method = "put",
        tag = "ApiTags::RoomParticipation",
        operation_id = "redactEvent"
    )]
    async fn redact(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventId")] event_id: Path<EventIdParam>,
        #[oai(name = "txnId")] txn_id: Path<String>,
        body: Json<Option<RedactRequest>>,
    ) -> ApiResult<Json<EventIdResponse>> {
        let reason = body.0.and_then(|b| b.reason);
        let event_id = state
            .services
            .rooms
            .redact(
                &auth.0.user_id,
                &auth.0.device_id,
                &room_id.0,
                &event_id.0,
                &txn_id.0,
                reason,
            )
            .await?;
        Ok(Json(EventIdResponse { event_id }))
    }

    /// Gets one event, if the user may see it.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/event/:eventId",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getOneRoomEvent"
    )]
    async fn event(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventId")] event_id: Path<EventIdParam>,
    ) -> ApiResult<Json<ClientEvent>> {
        let event = state
            .services
            .rooms
            .event(&auth.0.user_id, &room_id.0, &event_id.0)
            .await?;
        Ok(Json(event.into()))
    }

    /// Pages through the room's timeline, with history visibility enforced.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/messages",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getRoomEvents"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn messages(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        /// The token to start from; default the newest (`b`) or oldest (`f`) visible event.
        from: Query<Option<String>>,
        /// The token to stop at.
        to: Query<Option<String>>,
        /// `b` (backwards) or `f` (forwards).
        dir: Query<PaginationDirection>,
        /// How many events at most (default 10).
        limit: Query<Option<i64>>,
        /// A JSON `RoomEventFilter` (`types`, `not_types`, `senders`, `not_senders`, `limit`).
        filter: Query<Option<String>>,
    ) -> ApiResult<Json<MessagesResponse>> {
        let (filter, filter_limit) = parse_filter(filter.0.as_deref())?;
        let limit = check_limit(limit.0)?.or(filter_limit).unwrap_or(10);
        let query = MessagesQuery {
            from: from.0,
            to: to.0,
            dir: dir.0.into(),
            limit,
            filter,
        };
        let page = state
            .services
            .rooms
            .messages(&auth.0.user_id, &room_id.0, &query)
            .await?;
        Ok(Json(page.into()))
    }

    /// Gets an event with the events around it and the room state at it.
    #[oai(
        path = "/_matrix/client/v3/rooms/:roomId/context/:eventId",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getEventContext"
    )]
    async fn context(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "eventId")] event_id: Path<EventIdParam>,
        /// How many surrounding events at most, split before and after (default 10).
        limit: Query<Option<i64>>,
    ) -> ApiResult<Json<ContextResponse>> {
        let limit = check_limit(limit.0)?.unwrap_or(10);
        let (event, before, after, room_state) = state
            .services
            .rooms
            .context(&auth.0.user_id, &room_id.0, &event_id.0, limit)
            .await?;
        Ok(Json(ContextResponse {
            event: event.into(),
            start: before.end.unwrap_or(before.start),
            end: after.end.unwrap_or(after.start),
            events_before: client_events(before.chunk),
            events_after: client_events(after.chunk),
            state: client_events(room_state),
        }))
    }

    /// Finds the event closest to a point in time, in the given direction.
    #[oai(
        path = "/_matrix/client/v1/rooms/:roomId/timestamp_to_event",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getEventByTimestamp"
    )]
    async fn timestamp_to_event(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        /// The point in time, in milliseconds since the epoch.
        ts: Query<i64>,
        /// `f`: the first event at or after `ts`; `b`: the last event at or before it.
        dir: Query<PaginationDirection>,
    ) -> ApiResult<Json<TimestampToEventResponse>> {
        let (event_id, origin_server_ts) = state
            .services
            .rooms
            .timestamp_to_event(&auth.0.user_id, &room_id.0, ts.0, dir.0.into())
            .await?;
        Ok(Json(TimestampToEventResponse {
            event_id,
            origin_server_ts,
        }))
    }
}

async fn state_event(
    state: &AppState,
    auth: &AccessToken,
    room_id: &str,
    event_type: &str,
    state_key: &str,
    format: Option<StateFormat>,
) -> ApiResult<Json<JsonObject>> {
    let rooms = &state.services.rooms;
    let user = &auth.0.user_id;
    let value = match format.unwrap_or(StateFormat::Content) {
        StateFormat::Content => {
            rooms
                .state_event_content(user, room_id, event_type, state_key)
                .await?
        }
        StateFormat::Event => {
            rooms
                .state_event(user, room_id, event_type, state_key)
                .await?
        }
    };
    Ok(Json(value_object(value)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_parse_or_fail_as_bad_json() {
        let (filter, limit) = parse_filter(Some(
            r#"{"types":["m.room.*"],"not_senders":["@a:x"],"limit":3}"#,
        ))
        .expect("valid filter");
        assert_eq!(filter.types, Some(vec!["m.room.*".to_owned()]));
        assert_eq!(filter.not_senders, vec!["@a:x".to_owned()]);
        assert_eq!(limit, Some(3));
        for bad in [
            "nope",
            "[1]",
            r#"{"types":"m.room.message"}"#,
            r#"{"senders":[1]}"#,
        ] {
            let err = parse_filter(Some(bad)).expect_err(bad);
            assert_eq!(err.to_json()["errcode"], "M_BAD_JSON", "{bad}");
        }
    }

    #[test]
    fn client_events_keep_their_fields() {
        let event = ClientEvent::from(json!({
            "content": { "body": "hi" },
            "event_id": "$e",
            "origin_server_ts": 5,
            "room_id": "!r:x",
            "sender": "@a:x",
            "type": "m.room.message",
            "unsigned": { "age": 1 },
        }));
        assert_eq!(event.content["body"], "hi");
        assert_eq!(event.origin_server_ts, 5);
        assert_eq!(event.event_type, "m.room.message");
        assert!(event.state_key.is_none());
        assert!(event.unsigned.is_some());
    }
}
