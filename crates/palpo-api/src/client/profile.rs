//! User profiles: `/profile/{userId}` and `/profile/{userId}/{keyName}`. A new display name
//! or avatar is announced in every room the user has joined. The user directory:
//! `/user_directory/search`.

use crate::path_ids::UserIdParam;
use std::sync::Arc;

use palpo_core::Error;
use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Path, payload::Json};

use crate::{
    ApiTags, AppState,
    auth::AccessToken,
    client::{rooms::JsonObject, session::EmptyResponse},
    error::ApiResult,
};

/// Only the user themselves may change their profile.
fn check_owner(auth: &AccessToken, user_id: &str) -> Result<(), Error> {
    if auth.0.user_id != user_id {
        return Err(Error::forbidden("You may only change your own profile"));
    }
    Ok(())
}

#[derive(Debug, Object)]
pub struct UserDirectorySearchRequest {
    /// What to look for in user ids and display names (any case).
    #[oai(deserialize_with = "crate::strict::string")]
    pub search_term: String,
    /// Most users to answer: 10 when absent, at most 50.
    #[oai(nullable)]
    pub limit: Option<i64>,
}

#[derive(Debug, Object)]
pub struct UserDirectoryResponse {
    /// Whether more users matched than the answer holds.
    pub limited: bool,
    pub results: Vec<DirectoryUserEntry>,
}

/// A user found, with their profile.
#[derive(Debug, Object)]
pub struct DirectoryUserEntry {
    pub user_id: String,
    #[oai(skip_serializing_if_is_none)]
    pub display_name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub avatar_url: Option<String>,
}

pub struct ProfileApi;

#[OpenApi]
impl ProfileApi {
    /// Gets a user's profile: `displayname`, `avatar_url` and custom fields (no access token
    /// needed).
    #[oai(
        path = "/_matrix/client/v3/profile/:userId",
        method = "get",
        tag = "ApiTags::UserData",
        operation_id = "getUserProfile"
    )]
    async fn profile(
        &self,
        state: Data<&Arc<AppState>>,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
    ) -> ApiResult<Json<JsonObject>> {
        let profile = state.services.rooms.profile(&user_id.0).await?;
        Ok(Json(profile.into_iter().collect()))
    }

    /// Gets one field of a user's profile, as `{keyName: value}` (no access token needed).
    #[oai(
        path = "/_matrix/client/v3/profile/:userId/:keyName",
        method = "get",
        tag = "ApiTags::UserData",
        operation_id = "getProfileField"
    )]
    async fn profile_field(
        &self,
        state: Data<&Arc<AppState>>,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "keyName")] key_name: Path<String>,
    ) -> ApiResult<Json<JsonObject>> {
        let mut profile = state.services.rooms.profile(&user_id.0).await?;
        let value = profile
            .remove(&key_name.0)
            .ok_or_else(|| Error::not_found("The user has no such profile field"))?;
        Ok(Json(JsonObject::from([(key_name.0, value)])))
    }

    /// Sets one field of the user's own profile; the body is `{keyName: value}`.
    #[oai(
        path = "/_matrix/client/v3/profile/:userId/:keyName",
        method = "put",
        tag = "ApiTags::UserData",
        operation_id = "setProfileField"
    )]
    async fn set_profile_field(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "keyName")] key_name: Path<String>,
        body: Json<JsonObject>,
    ) -> ApiResult<Json<EmptyResponse>> {
        check_owner(&auth, &user_id.0)?;
        let mut body = body.0;
        let value = body.remove(&key_name.0).ok_or_else(|| {
            Error::missing_param(format!("The body must have the field {}", key_name.0))
        })?;
        state
            .services
            .rooms
            .set_profile_field(&user_id.0, &key_name.0, Some(value))
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Removes one field of the user's own profile.
    #[oai(
        path = "/_matrix/client/v3/profile/:userId/:keyName",
        method = "delete",
        tag = "ApiTags::UserData",
        operation_id = "deleteProfileField"
    )]
    async fn delete_profile_field(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        #[oai(name = "userId")] user_id: Path<UserIdParam>,
        #[oai(name = "keyName")] key_name: Path<String>,
    ) -> ApiResult<Json<EmptyResponse>> {
        check_owner(&auth, &user_id.0)?;
        state
            .services
            .rooms
            .set_profile_field(&user_id.0, &key_name.0, None)
            .await?;
        Ok(Json(EmptyResponse {}))
    }

    /// Searches the user directory: users sharing a room with the caller and members of
    /// rooms published in the room directory, by user id or display name (any case).
    #[oai(
        path = "/_matrix/client/v3/user_directory/search",
        method = "post",
        tag = "ApiTags::UserData",
        operation_id = "searchUserDirectory"
    )]
    async fn search_user_directory(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        body: Json<UserDirectorySearchRequest>,
    ) -> ApiResult<Json<UserDirectoryResponse>> {
        let (found, limited) = state
            .services
            .rooms
            .search_user_directory(&auth.0.user_id, &body.0.search_term, body.0.limit)
            .await?;
        let results = found
            .into_iter()
            .map(|user| DirectoryUserEntry {
                user_id: user.user_id,
                display_name: user.displayname,
                avatar_url: user.avatar_url,
            })
            .collect();
        Ok(Json(UserDirectoryResponse { limited, results }))
    }
}
