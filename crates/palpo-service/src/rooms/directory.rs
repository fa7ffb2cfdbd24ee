//! Room aliases, user profiles and the user directory. A profile change is announced in every
//! room the user has joined, as a new `m.room.member` event carrying the new display name and
//! avatar.

use palpo_core::{Error, ErrorCode, Result};
use palpo_storage::{
    StorageError,
    model::{AliasRecord, DirectoryUser, ProfileRecord},
};
use serde_json::{Map, Value};

use super::{RoomService, create::member_draft, internal};

/// Largest size of one profile field value, in bytes of JSON.
const MAX_PROFILE_FIELD_BYTES: usize = 4096;

/// Users a user directory search answers when the request sets no `limit` (the spec's default).
const DEFAULT_DIRECTORY_RESULTS: i64 = 10;
/// Most users one user directory search answers.
pub const MAX_DIRECTORY_RESULTS: i64 = 50;

impl RoomService {
    /// 403 `M_FORBIDDEN` with `refusal` unless `user` is joined to the room.
    pub(crate) async fn check_joined(
        &self,
        room_id: &str,
        user: &str,
        refusal: &str,
    ) -> Result<()> {
        let membership = self
            .storage
            .rooms
            .membership(room_id, user)
            .await
            .map_err(internal)?;
        if membership.as_ref().is_none_or(|m| m.membership != "join") {
            return Err(Error::forbidden(refusal));
        }
        Ok(())
    }

    fn check_local_alias(&self, alias: &str) -> Result<()> {
        let (local, server) = alias
            .strip_prefix('#')
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| Error::invalid_param("Room alias must look like #name:server"))?;
        if local.is_empty() || alias.len() > 255 {
            return Err(Error::invalid_param("Invalid room alias"));
        }
        if server != self.config.server_name {
            return Err(Error::invalid_param("Room alias is not on this server"));
        }
        Ok(())
    }

    /// `PUT /directory/room/{roomAlias}`: the creator must be joined to the room.
    pub async fn create_alias(&self, user: &str, alias: &str, room_id: &str) -> Result<()> {
        self.check_local_alias(alias)?;
        self.check_joined(room_id, user, "You must be joined to the room to alias it")
            .await?;
        self.storage
            .aliases
            .create_alias(&AliasRecord {
                room_alias: alias.to_owned(),
                room_id: room_id.to_owned(),
                creator: user.to_owned(),
            })
            .await
            .map_err(|e| match e {
                StorageError::Conflict(_) => {
                    Error::with_status(409, ErrorCode::Unknown, "Room alias already exists")
                }
                other => internal(other),
            })
    }

    /// `GET /directory/room/{roomAlias}`: (room id, servers).
    pub async fn lookup_alias(&self, alias: &str) -> Result<(String, Vec<String>)> {
        if !alias.starts_with('#') || !alias.contains(':') {
            return Err(Error::invalid_param(
                "Room alias must look like #name:server",
            ));
        }
        let record = self
            .storage
            .aliases
            .get_alias(alias)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        Ok((record.room_id, vec![self.config.server_name.clone()]))
    }

    /// `DELETE /directory/room/{roomAlias}`: its creator, or someone with power to change the
    /// room's canonical alias.
    pub async fn delete_alias(&self, user: &str, alias: &str) -> Result<()> {
        let record = self
            .storage
            .aliases
            .get_alias(alias)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        if record.creator != user {
            let power = self.power_of(&record.room_id, user).await?;
            let needed = self
                .power_needed(&record.room_id, "state_default", 50)
                .await?;
            if power < needed {
                return Err(Error::forbidden("You may not remove this alias"));
            }
        }
        self.storage
            .aliases
            .delete_alias(alias)
            .await
            .map_err(internal)?;
        Ok(())
    }

    /// `GET /rooms/{roomId}/aliases`: for members, or anyone if the room is world-readable.
    pub async fn room_aliases(&self, user: &str, room_id: &str) -> Result<Vec<String>> {
        self.visible_state(user, room_id).await?;
        self.storage
            .aliases
            .aliases_of_room(room_id)
            .await
            .map_err(internal)
    }

    /// `POST /user_directory/search`: the users `searcher` may find (those sharing a joined
    /// room with them, and members of rooms published in the room directory) whose user id
    /// or display name contains `term`, ignoring case; at most `limit` (10 by default, at most
    /// [`MAX_DIRECTORY_RESULTS`]), and whether more matched.
    pub async fn search_user_directory(
        &self,
        searcher: &str,
        term: &str,
        limit: Option<i64>,
    ) -> Result<(Vec<DirectoryUser>, bool)> {
        let limit = match limit {
            None => DEFAULT_DIRECTORY_RESULTS,
            Some(limit) if limit < 0 => {
                return Err(Error::invalid_param("limit must not be negative"));
            }
            Some(limit) => limit.min(MAX_DIRECTORY_RESULTS),
        };
        // One more than asked for tells whether the answer is `limited`.
        let mut found = self
            .storage
            .profiles
            .search_user_directory(searcher, term, limit + 1)
            .await
            .map_err(internal)?;
        let limited = found.len() as i64 > limit;
        found.truncate(usize::try_from(limit).unwrap_or_default());
        Ok((found, limited))
    }

    /// `GET /profile/{userId}`: display name, avatar and custom fields, as one JSON object.
    pub async fn profile(&self, user_id: &str) -> Result<Map<String, Value>> {
        let known_user = self
            .storage
            .users
            .get_user(user_id)
            .await
            .map_err(internal)?;
        if known_user.is_none() {
            return Err(Error::not_found("Profile not found"));
        }
        let profile = self
            .storage
            .profiles
            .get_profile(user_id)
            .await
            .map_err(internal)?
            .unwrap_or_default();
        let mut out: Map<String, Value> = serde_json::from_str(&profile.fields).unwrap_or_default();
        if let Some(name) = profile.displayname {
            out.insert("displayname".into(), name.into());
        }
        if let Some(avatar) = profile.avatar_url {
            out.insert("avatar_url".into(), avatar.into());
        }
        Ok(out)
    }

    /// `PUT /profile/{userId}/{keyName}` (a `None` value deletes the field). Changes of
    /// `displayname` and `avatar_url` are sent to every joined room.
    pub async fn set_profile_field(
        &self,
        user_id: &str,
        key: &str,
        value: Option<Value>,
    ) -> Result<()> {
        if key.is_empty() || key.len() > 255 {
            return Err(Error::invalid_param("Invalid profile field name"));
        }
        if value
            .as_ref()
            .is_some_and(|v| v.to_string().len() > MAX_PROFILE_FIELD_BYTES)
        {
            return Err(Error::new(
                ErrorCode::TooLarge,
                "Profile field value is too large",
            ));
        }
        let mut profile = self
            .storage
            .profiles
            .get_profile(user_id)
            .await
            .map_err(internal)?
            .unwrap_or_else(|| ProfileRecord {
                fields: "{}".into(),
                ..ProfileRecord::default()
            });
        match key {
            "displayname" | "avatar_url" => {
                let text = match value {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s),
                    Some(_) => return Err(Error::bad_json(format!("{key} must be a string"))),
                };
                if key == "displayname" {
                    profile.displayname = text;
                } else {
                    profile.avatar_url = text;
                }
            }
            _ => {
                let mut fields: Map<String, Value> =
                    serde_json::from_str(&profile.fields).unwrap_or_default();
                match value {
                    Some(value) => fields.insert(key.to_owned(), value),
                    None => fields.remove(key),
                };
                profile.fields = Value::Object(fields).to_string();
            }
        }
        self.storage
            .profiles
            .set_profile(user_id, &profile)
            .await
            .map_err(internal)?;
        if matches!(key, "displayname" | "avatar_url") {
            self.announce_profile(user_id, &profile).await;
        }
        Ok(())
    }

    /// Sends the new member event into every joined room. A room that refuses it (e.g. the
    /// user lacks power there) keeps the old profile; the change itself still stands.
    async fn announce_profile(&self, user_id: &str, profile: &ProfileRecord) {
        let rooms = match self.storage.rooms.rooms_for_user(user_id, "join").await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::warn!(error = %e, "could not list rooms to announce a profile change");
                return;
            }
        };
        for room_id in rooms {
            let draft = member_draft(
                user_id,
                "join",
                (profile.displayname.clone(), profile.avatar_url.clone()),
                None,
                false,
            );
            if let Err(e) = self.append(&room_id, user_id, draft, None).await {
                tracing::warn!(%room_id, error = %e, "profile change not announced in room");
            }
        }
    }
}

/// Rooms one `/publicRooms` page holds when the request sets no `limit`, and at most.
const DEFAULT_PUBLISHED_PAGE: usize = 100;
const MAX_PUBLISHED_PAGE: usize = 500;

/// A room of the published room directory, as `/publicRooms` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedRoom {
    pub room_id: String,
    pub num_joined_members: i64,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub avatar_url: Option<String>,
    pub canonical_alias: Option<String>,
    pub join_rule: Option<String>,
    pub room_type: Option<String>,
    pub world_readable: bool,
    pub guest_can_join: bool,
}

impl PublishedRoom {
    /// Whether `term` (lowercase) is in the room's name, topic, canonical alias or id.
    fn matches(&self, term: &str) -> bool {
        [&self.name, &self.topic, &self.canonical_alias]
            .into_iter()
            .flatten()
            .chain(std::iter::once(&self.room_id))
            .any(|text| text.to_lowercase().contains(term))
    }
}

/// One page of the published room directory.
#[derive(Debug, Default)]
pub struct PublishedRoomsPage {
    pub chunk: Vec<PublishedRoom>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total_room_count_estimate: i64,
}

/// What `/publicRooms` asks for.
#[derive(Debug, Default)]
pub struct PublishedRoomsQuery {
    pub limit: Option<i64>,
    pub since: Option<String>,
    /// Words to look for in the rooms' names, topics and aliases (any case).
    pub search_term: Option<String>,
    /// Room types to list (`None` in the list: rooms without a type); all when absent.
    pub room_types: Option<Vec<Option<String>>>,
}

/// A `/publicRooms` pagination token: the offset in the (filtered) directory.
fn page_token(offset: usize) -> String {
    format!("p{offset}")
}

fn parse_page_token(token: &str) -> Result<usize> {
    token
        .strip_prefix('p')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid_param("Unknown pagination token"))
}

impl RoomService {
    /// `GET /directory/list/room/{roomId}`: `public` or `private`; 404 for an unknown room.
    pub async fn room_visibility(&self, room_id: &str) -> Result<&'static str> {
        let room = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Room not found"))?;
        Ok(if room.is_public { "public" } else { "private" })
    }

    /// `PUT /directory/list/room/{roomId}`: publishes the room or takes it out. Only a member
    /// who may change the room's canonical alias may (as Synapse asks); 404 for an unknown
    /// room, 400 for a visibility other than `public` or `private`.
    pub async fn set_room_visibility(
        &self,
        user: &str,
        room_id: &str,
        visibility: &str,
    ) -> Result<()> {
        let published = match visibility {
            "public" => true,
            "private" => false,
            other => {
                return Err(Error::invalid_param(format!(
                    "Unknown visibility {other:?}: public or private"
                )));
            }
        };
        if self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
            .is_none()
        {
            return Err(Error::not_found("Room not found"));
        }
        self.check_joined(
            room_id,
            user,
            "You must be joined to the room to publish it",
        )
        .await?;
        let needed = self
            .power_needed_for_state(room_id, "m.room.canonical_alias")
            .await?;
        if self.power_of(room_id, user).await? < needed {
            return Err(Error::forbidden(
                "Your power level is too low to publish the room",
            ));
        }
        self.storage
            .rooms
            .set_room_published(room_id, published)
            .await
            .map_err(internal)
    }

    /// `GET`/`POST /publicRooms`: the published rooms, the most joined first, a page at a time.
    /// With a search term or room types the directory's rooms are all read to filter them
    /// (directories are small); otherwise only the page's.
    pub async fn published_rooms(&self, query: PublishedRoomsQuery) -> Result<PublishedRoomsPage> {
        let limit = match query.limit {
            None => DEFAULT_PUBLISHED_PAGE,
            Some(limit) if limit < 0 => {
                return Err(Error::invalid_param("limit must not be negative"));
            }
            Some(limit) => usize::try_from(limit)
                .unwrap_or(MAX_PUBLISHED_PAGE)
                .min(MAX_PUBLISHED_PAGE),
        };
        let offset = query
            .since
            .as_deref()
            .map(parse_page_token)
            .transpose()?
            .unwrap_or(0);
        let listed = self
            .storage
            .rooms
            .published_rooms()
            .await
            .map_err(internal)?;
        let total = listed.len();
        let term = query
            .search_term
            .as_deref()
            .map(str::trim)
            .filter(|term| !term.is_empty())
            .map(str::to_lowercase);
        // An empty list of room types filters nothing (as Synapse reads it).
        let room_types = query.room_types.filter(|types| !types.is_empty());
        let (rooms, matched) = if term.is_some() || room_types.is_some() {
            let mut rooms = Vec::with_capacity(listed.len());
            for (room_id, joined) in listed {
                rooms.push(self.published_room(room_id, joined).await?);
            }
            rooms.retain(|room| {
                term.as_deref().is_none_or(|term| room.matches(term))
                    && room_types
                        .as_ref()
                        .is_none_or(|types| types.contains(&room.room_type))
            });
            let matched = rooms.len();
            let page = rooms.into_iter().skip(offset).take(limit).collect();
            (page, matched)
        } else {
            let mut page = Vec::with_capacity(limit.min(total));
            for (room_id, joined) in listed.into_iter().skip(offset).take(limit) {
                page.push(self.published_room(room_id, joined).await?);
            }
            (page, total)
        };
        let end = offset + rooms.len();
        Ok(PublishedRoomsPage {
            // Never where this page started: a client following it would loop (`limit` 0).
            next_batch: (end < matched && end > offset).then(|| page_token(end)),
            chunk: rooms,
            prev_batch: (offset > 0).then(|| page_token(offset.saturating_sub(limit))),
            total_room_count_estimate: i64::try_from(matched).unwrap_or(i64::MAX),
        })
    }

    /// A published room's entry, from its current state.
    async fn published_room(&self, room_id: String, joined: i64) -> Result<PublishedRoom> {
        let keys: Vec<(String, String)> = [
            "m.room.create",
            "m.room.name",
            "m.room.topic",
            "m.room.avatar",
            "m.room.canonical_alias",
            "m.room.join_rules",
            "m.room.history_visibility",
            "m.room.guest_access",
        ]
        .into_iter()
        .map(|kind| (kind.to_owned(), String::new()))
        .collect();
        let state = self
            .storage
            .rooms
            .current_state_entries(&room_id, &keys)
            .await
            .map_err(internal)?;
        // One read for all of them.
        let contents = self.state_contents(&state).await?;
        let text = |kind: &str, field: &str| {
            contents
                .get(&(kind.to_owned(), String::new()))
                .and_then(|content| content.get(field))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Ok(PublishedRoom {
            name: text("m.room.name", "name"),
            topic: text("m.room.topic", "topic"),
            avatar_url: text("m.room.avatar", "url"),
            canonical_alias: text("m.room.canonical_alias", "alias"),
            // Without a join rules event no one may join: said, as an absent rule reads
            // as public.
            join_rule: Some(
                text("m.room.join_rules", "join_rule").unwrap_or_else(|| "invite".to_owned()),
            ),
            room_type: text("m.room.create", "type"),
            world_readable: text("m.room.history_visibility", "history_visibility").as_deref()
                == Some("world_readable"),
            guest_can_join: text("m.room.guest_access", "guest_access").as_deref()
                == Some("can_join"),
            num_joined_members: joined,
            room_id,
        })
    }
}
