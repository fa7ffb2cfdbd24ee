//! User data: sync filters, account data (global and per room) and room tags, and their part
//! of `/sync`.
//!
//! Account data lives in the database and every write takes the next position of the global
//! stream, so one sync token orders it with the events, and an incremental sync reads what
//! changed in `(since, now]`. After each write the notifier is told, which wakes long-polling
//! syncs (here, and through it in the other processes). Tags are the room's `m.tag` account
//! data: `{"tags": {"<tag>": {"order": 0.5}}}`.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use palpo_core::{Error, ErrorCode, Result, now_millis};
use palpo_storage::{Storage, model::AccountDataRecord};
use serde_json::{Map, Value, json};

use crate::{internal, notifier::Notifier};

mod push_rules;

pub use push_rules::PUSH_RULES;
pub(crate) use push_rules::custom_ruleset;

/// The room account data type that holds the room's tags.
pub const TAG: &str = "m.tag";
/// Types the server controls: clients set them through other endpoints (`/read_markers`,
/// `/pushrules`), never through `PUT .../account_data/{type}`.
pub const SERVER_CONTROLLED: &[&str] = &["m.fully_read", "m.push_rules"];
/// Longest account data type (the database column's size).
const MAX_TYPE_BYTES: usize = 255;

/// The account data part of a sync, read up to the sync's stream position.
#[derive(Debug, Clone, Default)]
pub struct AccountDataSync {
    /// Global account data, as `{"type", "content"}` events.
    pub global: Vec<Value>,
    /// Account data per room, as `{"type", "content"}` events.
    pub rooms: BTreeMap<String, Vec<Value>>,
}

impl AccountDataSync {
    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.rooms.is_empty()
    }

    /// Keeps the per-room account data of the rooms in `keep` only (those the response
    /// carries), so that data of other rooms does not count as news.
    pub fn retain_rooms(&mut self, keep: &HashSet<&String>) {
        self.rooms.retain(|room_id, _| keep.contains(room_id));
    }
}

pub struct AccountDataService {
    storage: Storage,
    notifier: Arc<Notifier>,
    /// Tag and push rule changes read, modify and write one account data content
    /// ([`AccountDataService::modify`]): one at a time in this process, so that they seldom
    /// have to read again (only when another process wrote meanwhile).
    read_modify_write: tokio::sync::Mutex<()>,
}

/// Only the user themselves may read or write their account data, tags and filters.
fn check_owner(user: &str, target: &str) -> Result<()> {
    if user != target {
        return Err(Error::forbidden(
            "You may only access your own account data",
        ));
    }
    Ok(())
}

fn check_room_id(room_id: &str) -> Result<()> {
    ruma::RoomId::parse(room_id)
        .map(|_| ())
        .map_err(|_| Error::invalid_param(format!("Invalid room id {room_id:?}")))
}

fn check_type(data_type: &str) -> Result<()> {
    if data_type.is_empty() || data_type.len() > MAX_TYPE_BYTES {
        return Err(Error::invalid_param(format!(
            "The account data type must have 1 to {MAX_TYPE_BYTES} bytes"
        )));
    }
    Ok(())
}

/// How often a read-modify-write reads again when another writer overtook it.
const MODIFY_ATTEMPTS: usize = 16;

/// The content of a stored record, as JSON.
fn content_of(record: &AccountDataRecord) -> Result<Value> {
    serde_json::from_str(&record.content).map_err(Error::internal)
}

/// The tags of a room's `m.tag` content (none when there is none, or it holds no tag object).
fn tags_of(content: Option<Value>) -> Map<String, Value> {
    match content {
        Some(Value::Object(mut content)) => match content.remove("tags") {
            Some(Value::Object(tags)) => tags,
            _ => Map::new(),
        },
        _ => Map::new(),
    }
}

impl AccountDataService {
    pub fn new(storage: Storage, notifier: Arc<Notifier>) -> Self {
        AccountDataService {
            storage,
            notifier,
            read_modify_write: tokio::sync::Mutex::new(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Filters

    /// `POST /user/{userId}/filter`: stores the filter (a JSON object) and returns its id.
    pub async fn create_filter(&self, user: &str, target: &str, filter: &Value) -> Result<String> {
        check_owner(user, target)?;
        if !filter.is_object() {
            return Err(Error::bad_json("A filter must be a JSON object"));
        }
        self.storage
            .account_data
            .create_filter(target, &filter.to_string(), now_millis())
            .await
            .map_err(internal)
    }

    /// `GET /user/{userId}/filter/{filterId}`; 404 `M_NOT_FOUND` for an unknown id.
    pub async fn filter(&self, user: &str, target: &str, filter_id: &str) -> Result<Value> {
        check_owner(user, target)?;
        self.stored_filter(target, filter_id)
            .await?
            .ok_or_else(|| Error::not_found("Unknown filter"))
    }

    /// The user's filter named in a `/sync` request: 400 `M_INVALID_PARAM` for an unknown id
    /// (the request is what is wrong, not a resource that went away).
    pub async fn sync_filter(&self, user: &str, filter_id: &str) -> Result<Value> {
        self.stored_filter(user, filter_id)
            .await?
            .ok_or_else(|| Error::invalid_param(format!("Unknown filter {filter_id:?}")))
    }

    async fn stored_filter(&self, user: &str, filter_id: &str) -> Result<Option<Value>> {
        let json = self
            .storage
            .account_data
            .get_filter(user, filter_id)
            .await
            .map_err(internal)?;
        json.map(|json| serde_json::from_str(&json).map_err(Error::internal))
            .transpose()
    }

    // -----------------------------------------------------------------------------------------
    // Account data

    /// `PUT /user/{userId}[/rooms/{roomId}]/account_data/{type}`. Types the server controls
    /// are refused with 405 `M_BAD_JSON`.
    pub async fn set(
        &self,
        user: &str,
        target: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &Value,
    ) -> Result<()> {
        check_owner(user, target)?;
        if let Some(room_id) = room_id {
            check_room_id(room_id)?;
        }
        check_type(data_type)?;
        if SERVER_CONTROLLED.contains(&data_type) {
            return Err(Error::with_status(
                405,
                ErrorCode::BadJson,
                format!("Cannot set {data_type} through this API"),
            ));
        }
        if !content.is_object() {
            return Err(Error::bad_json("Content must be a JSON object"));
        }
        self.put(target, room_id, data_type, content).await
    }

    /// `GET /user/{userId}[/rooms/{roomId}]/account_data/{type}`: the content; 404
    /// `M_NOT_FOUND` when there is none.
    pub async fn get(
        &self,
        user: &str,
        target: &str,
        room_id: Option<&str>,
        data_type: &str,
    ) -> Result<Value> {
        check_owner(user, target)?;
        if let Some(room_id) = room_id {
            check_room_id(room_id)?;
        }
        let content = self.content(target, room_id, data_type).await?;
        // The push rules read as `/pushrules/` and `/sync` show them, defaults included.
        if room_id.is_none() && data_type == PUSH_RULES {
            return push_rules::client_content(target, content);
        }
        content.ok_or_else(|| Error::not_found("Account data not found"))
    }

    async fn content(
        &self,
        user: &str,
        room_id: Option<&str>,
        data_type: &str,
    ) -> Result<Option<Value>> {
        let record = self
            .storage
            .account_data
            .get_account_data(user, room_id, data_type)
            .await
            .map_err(internal)?;
        record.as_ref().map(content_of).transpose()
    }

    /// Changes one piece of account data from its stored content (`None`: there is none):
    /// `change` answers the new content, or `None` to leave it as it is. Other requests, here
    /// or in another process, may change it at the same time: a write that one of them
    /// overtook is refused by the database, and `change` runs again on the newer content.
    async fn modify(
        &self,
        user: &str,
        room_id: Option<&str>,
        data_type: &str,
        mut change: impl FnMut(Option<Value>) -> Result<Option<Value>>,
    ) -> Result<()> {
        let repo = &self.storage.account_data;
        let _one_at_a_time = self.read_modify_write.lock().await;
        for _ in 0..MODIFY_ATTEMPTS {
            let record = repo
                .get_account_data(user, room_id, data_type)
                .await
                .map_err(internal)?;
            let read_at = record.as_ref().map(|record| record.stream_position);
            let content = record.as_ref().map(content_of).transpose()?;
            let Some(content) = change(content)? else {
                return Ok(());
            };
            let written = repo
                .replace_account_data(user, room_id, data_type, &content.to_string(), read_at)
                .await
                .map_err(internal)?;
            if let Some(position) = written {
                self.notifier.stream_advanced(position);
                return Ok(());
            }
        }
        Err(Error::internal(format!(
            "{data_type} of {user} changed by others {MODIFY_ATTEMPTS} times while being changed"
        )))
    }

    /// Writes, and wakes the syncs.
    async fn put(
        &self,
        user: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &Value,
    ) -> Result<()> {
        let position = self
            .storage
            .account_data
            .put_account_data(user, room_id, data_type, &content.to_string())
            .await
            .map_err(internal)?;
        self.notifier.stream_advanced(position);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Tags

    /// `GET /user/{userId}/rooms/{roomId}/tags`: tag name → tag object (`{"order": 0.5}`).
    pub async fn tags(
        &self,
        user: &str,
        target: &str,
        room_id: &str,
    ) -> Result<Map<String, Value>> {
        check_owner(user, target)?;
        check_room_id(room_id)?;
        self.current_tags(target, room_id).await
    }

    async fn current_tags(&self, user: &str, room_id: &str) -> Result<Map<String, Value>> {
        Ok(tags_of(self.content(user, Some(room_id), TAG).await?))
    }

    /// `PUT /user/{userId}/rooms/{roomId}/tags/{tag}`: adds (or replaces) a tag. `tag` is the
    /// tag object, whose `order`, when present, must be a number.
    pub async fn set_tag(
        &self,
        user: &str,
        target: &str,
        room_id: &str,
        tag: &str,
        value: &Value,
    ) -> Result<()> {
        check_owner(user, target)?;
        check_room_id(room_id)?;
        if tag.is_empty() {
            return Err(Error::invalid_param("The tag must not be empty"));
        }
        let Value::Object(object) = value else {
            return Err(Error::bad_json("A tag must be a JSON object"));
        };
        if object.get("order").is_some_and(|order| !order.is_number()) {
            return Err(Error::bad_json("The tag's order must be a number"));
        }
        self.modify(target, Some(room_id), TAG, |content| {
            let mut tags = tags_of(content);
            tags.insert(tag.to_owned(), value.clone());
            Ok(Some(json!({ "tags": tags })))
        })
        .await
    }

    /// `DELETE /user/{userId}/rooms/{roomId}/tags/{tag}`: removes a tag (a tag that is not
    /// there is no error, and changes nothing).
    pub async fn delete_tag(
        &self,
        user: &str,
        target: &str,
        room_id: &str,
        tag: &str,
    ) -> Result<()> {
        check_owner(user, target)?;
        check_room_id(room_id)?;
        self.modify(target, Some(room_id), TAG, |content| {
            let mut tags = tags_of(content);
            Ok(tags.remove(tag).is_some().then(|| json!({ "tags": tags })))
        })
        .await
    }

    // -----------------------------------------------------------------------------------------
    // Sync

    /// The user's account data written in `(since, upto]` (all of it up to `upto` for an
    /// initial sync), global and per room.
    pub async fn sync(&self, user: &str, since: Option<i64>, upto: i64) -> Result<AccountDataSync> {
        let mut out = AccountDataSync::default();
        let after = since.unwrap_or(0);
        let records = if after < upto {
            self.storage
                .account_data
                .account_data_since(user, after, upto)
                .await
                .map_err(internal)?
        } else {
            Vec::new()
        };
        let mut push_rules_seen = false;
        for record in records {
            let mut content = content_of(&record)?;
            if record.room_id.is_none() && record.data_type == PUSH_RULES {
                content = push_rules::client_content(user, Some(content))?;
                push_rules_seen = true;
            }
            let event = json!({ "type": record.data_type, "content": content });
            match record.room_id {
                Some(room_id) => out.rooms.entry(room_id).or_default().push(event),
                None => out.global.push(event),
            }
        }
        // Clients take their push rules from the initial sync (or ask `/pushrules/`): an
        // account that never changed one has the server's defaults, which come first, as
        // older than anything stored (a filter's `limit` keeps the newest).
        if since.is_none() && !push_rules_seen {
            let content = push_rules::client_content(user, None)?;
            out.global
                .insert(0, json!({ "type": PUSH_RULES, "content": content }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_and_types_are_checked() {
        assert!(check_room_id("!abc:example.org").is_ok());
        for bad in ["", "abc", "#alias:example.org", "@user:example.org"] {
            let err = check_room_id(bad).expect_err(bad);
            assert_eq!(err.code(), ErrorCode::InvalidParam);
            assert_eq!(err.status(), 400);
        }
        assert!(check_type("org.example").is_ok());
        assert!(check_type("").is_err());
        assert!(check_type(&"x".repeat(256)).is_err());
        assert_eq!(
            check_owner("@a:x", "@b:x")
                .expect_err("other user")
                .status(),
            403
        );
    }
}
