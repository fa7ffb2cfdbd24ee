//! User data: sync filters (`/user/{userId}/filter`), account data, global and per room
//! (`/user/{userId}[/rooms/{roomId}]/account_data/{type}`), and room tags
//! (`/user/{userId}/rooms/{roomId}/tags`). Only the user themselves may use them.

use crate::path_ids::{RoomIdParam, UserIdParam};
use std::{collections::BTreeMap, sync::Arc};

use palpo_core::Error;
use poem::web::Data;
use poem_openapi::{ApiResponse, Object, OpenApi, param::Path, payload::Json};
use serde_json::{Map, Value};

use crate::{
    ApiTags, AppState,
    auth::AccessToken,
    client::{
        rooms::{JsonObject, object_value, value_object},
        session::EmptyResponse,
        sync::parse_filter,
    },
    error::{ApiResult, ErrorBody},
};

#[derive(Debug, Object)]
pub struct FilterIdResponse {
    /// The id of the new filter, to pass as `filter` to `/sync`. Never starts with `{`.
    pub filter_id: String,
}

/// A room tag.
#[derive(Debug, Object)]
pub struct Tag {
    /// The position of the room under this tag, a number in `[0, 1]` (lower first).
    #[oai(skip_serializing_if_is_none, nullable)]
    pub order: Option<f64>,
}

#[derive(Debug, Object)]
pub struct TagsResponse {
    /// The user's tags on the room, by name (`m.favourite`, `m.lowpriority`, `u.work`...).
    pub tags: BTreeMap<String, Tag>,
}

/// The answer to setting account data.
#[derive(Debug, ApiResponse)]
pub enum SetAccountDataResponse {
    /// The account data was stored.
    #[oai(status = 200)]
    Ok(Json<EmptyResponse>),
    /// This type is controlled by the server and cannot be set here (`M_BAD_JSON`):
    /// `m.fully_read` is set through `/read_markers`, `m.push_rules` through `/pushrules`.
    #[oai(status = 405)]
    ServerControlled(Json<ErrorBody>),
}

impl SetAccountDataResponse {
    /// The service's answer: 405 errors are this operation's own response, not a 400.
    // The same result type as every handler's (`ApiResult`), which it is returned from.
    #[allow(clippy::result_large_err)]
    fn from_result(result: Result<(), Error>) -> ApiResult<Self> {
        match result {
            Ok(()) => Ok(SetAccountDataResponse::Ok(Json(EmptyResponse {}))),
            Err(err) if err.status() == 405 => {
                let body = err.to_json();
                Ok(SetAccountDataResponse::ServerControlled(Json(ErrorBody {
                    errcode: err.code().as_str().to_owned(),
                    error: body["error"].as_str().unwrap_or_default().to_owned(),
                    retry_after_ms: None,
                    soft_logout: None,
                })))
            }
            Err(err) => Err(err.into()),
        }
    }
}

pub struct UserDataApi;

#[OpenApi]
impl UserDataApi {
    /// Uploads a filter for `/sync`; returns its id. The filter must be a JSON object, and the
    /// parts of it this server applies (`room.timeline.limit`) must be well-formed.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/filter",
        method = "post",
        tag = "ApiTags::RoomParticipation",
        operation_id = "defineFilter"
    )]
    async fn define_filter(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        body: Json<JsonObject>,
    ) -> ApiResult<Json<FilterIdResponse>> {
        let filter = object_value(body.0);
        parse_filter(&filter)?;
        let filter_id = state
            .services
            .account_data
            .create_filter(&auth.0.user_id, &user_id.0, &filter)
            .await?;
        Ok(Json(FilterIdResponse { filter_id }))
    }

    /// Downloads a filter the user uploaded.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/filter/:filterId",
        method = "get",
        tag = "ApiTags::RoomParticipation",
        operation_id = "getFilter"
    )]
    async fn get_filter(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "filterId")] filter_id: Path<String>,
    ) -> ApiResult<Json<JsonObject>> {
        let filter = state
            .services
            .account_data
            .filter(&auth.0.user_id, &user_id.0, &filter_id.0)
            .await?;
        Ok(Json(value_object(filter)))
    }

    /// Sets global account data of the user: the body is its content. Clients receive it in
    /// the top-level `account_data` of `/sync`.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/account_data/:type",
        method = "put",
        tag = "ApiTags::UserData",
        operation_id = "setAccountData"
    )]
    async fn set_account_data(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "type")] data_type: Path<String>,
        body: Json<JsonObject>,
    ) -> ApiResult<SetAccountDataResponse> {
        let result = state
            .services
            .account_data
            .set(
                &auth.0.user_id,
                &user_id.0,
                None,
                &data_type.0,
                &object_value(body.0),
            )
            .await;
        SetAccountDataResponse::from_result(result)
    }

    /// Gets global account data of the user: its content.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/account_data/:type",
        method = "get",
        tag = "ApiTags::UserData",
        operation_id = "getAccountData"
    )]
    async fn get_account_data(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "type")] data_type: Path<String>,
    ) -> ApiResult<Json<JsonObject>> {
        let content = state
            .services
            .account_data
            .get(&auth.0.user_id, &user_id.0, None, &data_type.0)
            .await?;
        Ok(Json(value_object(content)))
    }

    /// Sets account data of the user for a room: the body is its content. Clients receive it
    /// in the room's `account_data` in `/sync`.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/rooms/:roomId/account_data/:type",
        method = "put",
        tag = "ApiTags::UserData",
        operation_id = "setAccountDataPerRoom"
    )]
    async fn set_room_account_data(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "type")] data_type: Path<String>,
        body: Json<JsonObject>,
    ) -> ApiResult<SetAccountDataResponse> {
        let result = state
            .services
            .account_data
            .set(
                &auth.0.user_id,
                &user_id.0,
                Some(&room_id.0),
                &data_type.0,
                &object_value(body.0),
            )
            .await;
        SetAccountDataResponse::from_result(result)
    }

    /// Gets account data of the user for a room: its content.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/rooms/:roomId/account_data/:type",
        method = "get",
        tag = "ApiTags::UserData",
        operation_id = "getAccountDataPerRoom"
    )]
    async fn get_room_account_data(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        #[oai(name = "type")] data_type: Path<String>,
    ) -> ApiResult<Json<JsonObject>> {
        let content = state
            .services
            .account_data
            .get(&auth.0.user_id, &user_id.0, Some(&room_id.0), &data_type.0)
            .await?;
        Ok(Json(value_object(content)))
    }

    /// Lists the user's tags on a room.
    #[oai(
        path = "/_matrix/client/v3/user/:userId/rooms/:roomId/tags",
        method = "get",
        tag = "ApiTags::UserData",
        operation_id = "getRoomTags"
    )]
    async fn get_tags(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
    ) -> ApiResult<Json<TagsResponse>> {
        let tags = state
            .services
            .account_data
            .tags(&auth.0.user_id, &user_id.0, &room_id.0)
            .await?;
        let tags = tags
            .into_iter()
            .map(|(name, tag)| {
                let order = tag.get("order").and_then(Value::as_f64);
                (name, Tag { order })
            })
            .collect();
        Ok(Json(TagsResponse { tags }))
    }

    /// Adds a tag to a room (or changes its order).
    #[oai(
        path = "/_matrix/client/v3/user/:userId/rooms/:roomId/tags/:tag",
        method = "put",
        tag = "ApiTags::UserData",
        operation_id = "setRoomTag"
    )]
    async fn set_tag(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        tag: Path<String>,
        body: Json<Tag>,
    ) -> ApiResult<Json<EmptyResponse>> {
        let mut value = Map::new();
        if let Some(order) = body.0.order {
            value.insert("order".to_owned(), Value::from(order));
        }
        state
            .services
            .account_data
            .set_tag(
                &auth.0.user_id,
                &user_id.0,
                &room_id.0,
                &tag.0,
                &Value::Object(value),
            )
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Removes a tag from a room (removing a tag the room does not have is no error).
    #[oai(
        path = "/_matrix/client/v3/user/:userId/rooms/:roomId/tags/:tag",
        method = "delete",
        tag = "ApiTags::UserData",
        operation_id = "deleteRoomTag"
    )]
    async fn delete_tag(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "roomId")] room_id: Path<RoomIdParam>,
        tag: Path<String>,
    ) -> ApiResult<Json<EmptyResponse>> {
        state
            .services
            .account_data
            .delete_tag(&auth.0.user_id, &user_id.0, &room_id.0, &tag.0)
            .await?;
        Ok(Json(EmptyResponse {}))
    }
}
