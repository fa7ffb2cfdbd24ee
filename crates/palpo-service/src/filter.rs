//! Filters: what `POST /user/{userId}/filter` stores and `/sync?filter=` applies.
//!
//! A filter is read once per request into a [`SyncFilter`]. Anything this server applies
//! must be well formed (400 `M_BAD_JSON` otherwise); fields it does not know are ignored, as
//! the spec allows.

use serde_json::{Map, Value};

use palpo_core::{Error, Result};

use crate::rooms::TimelineFilter;

/// Timeline events a sync returns per room when the filter does not say.
pub const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// Most timeline events per room a filter may ask for.
pub const MAX_TIMELINE_LIMIT: usize = 500;

/// How events are formatted (`event_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// The client format (`ClientEvent`), the default.
    #[default]
    Client,
    /// The PDU, as it travels between servers.
    Federation,
}

/// An `EventFilter`: which non-room events (presence, global account data) are sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub limit: Option<usize>,
}

impl EventFilter {
    /// Whether an event of `event_type` from `sender` passes. An event without a sender (account
    /// data, receipts) does not pass a `senders` list.
    pub fn matches(&self, event_type: &str, sender: Option<&str>) -> bool {
        type_allowed(&self.types, &self.not_types, event_type)
            && match sender {
                Some(sender) => {
                    self.senders
                        .as_ref()
                        .is_none_or(|s| s.iter().any(|x| x == sender))
                        && !self.not_senders.iter().any(|x| x == sender)
                }
                None => self.senders.is_none(),
            }
    }

    /// Whether no event of `event_type` can pass (so it need not be read at all).
    pub fn excludes_type(&self, event_type: &str) -> bool {
        !type_allowed(&self.types, &self.not_types, event_type)
            || self.limit == Some(0)
            || self.senders.as_ref().is_some_and(Vec::is_empty)
    }

    /// Keeps the events (`{"type", "sender"?...}`, oldest first) that pass, the newest
    /// `limit` of them.
    pub fn apply(&self, mut events: Vec<Value>) -> Vec<Value> {
        events.retain(|event| {
            self.matches(
                event["type"].as_str().unwrap_or_default(),
                event["sender"].as_str(),
            )
        });
        if let Some(limit) = self.limit
            && events.len() > limit
        {
            events.drain(..events.len() - limit);
        }
        events
    }
}

/// A `RoomEventFilter`: the event lists (and rooms, `contains_url`) as a [`TimelineFilter`],
/// the limit, and the flags that only some sections read.
#[derive(Debug, Clone, Default)]
pub struct RoomEventFilter {
    pub events: TimelineFilter,
    pub limit: Option<usize>,
    /// `state` only: send the members the timeline needs rather than all of them.
    pub lazy_load_members: bool,
    /// `state` only, with `lazy_load_members`: send them even when this device has them.
    pub include_redundant_members: bool,
    /// `timeline` only: unread counts per thread.
    pub unread_thread_notifications: bool,
}

impl RoomEventFilter {
    /// Whether an event of `event_type` (no sender: ephemeral events, account data) in
    /// `room_id` passes.
    pub fn matches_unsent(&self, room_id: &str, event_type: &str) -> bool {
        let f = &self.events;
        type_allowed(&f.types, &f.not_types, event_type)
            && f.senders.is_none()
            && f.allows_room(room_id)
    }

    /// Keeps the events of `room_id` (oldest first) that pass, the newest `limit` of them.
    pub fn apply_unsent(&self, room_id: &str, mut events: Vec<Value>) -> Vec<Value> {
        events.retain(|e| self.matches_unsent(room_id, e["type"].as_str().unwrap_or_default()));
        if let Some(limit) = self.limit
            && events.len() > limit
        {
            events.drain(..events.len() - limit);
        }
        events
    }
}

/// `room` of a filter.
#[derive(Debug, Clone, Default)]
pub struct RoomFilter {
    /// Rooms to include (all when absent); applied before the other room filters.
    pub rooms: Option<Vec<String>>,
    /// Rooms to leave out, even when in `rooms`.
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: RoomEventFilter,
    pub state: RoomEventFilter,
    pub ephemeral: RoomEventFilter,
    pub account_data: RoomEventFilter,
}

/// A whole filter, as `/sync` applies it.
#[derive(Debug, Clone, Default)]
pub struct SyncFilter {
    /// Dot-separated paths of the fields to keep in room events, split into their parts.
    pub event_fields: Option<Vec<Vec<String>>>,
    pub event_format: EventFormat,
    pub presence: EventFilter,
    /// Global account data.
    pub account_data: EventFilter,
    pub room: RoomFilter,
}

impl SyncFilter {
    /// Reads a filter (`M_BAD_JSON` when what this server applies of it is malformed).
    pub fn parse(value: &Value) -> Result<Self> {
        let filter = value
            .as_object()
            .ok_or_else(|| Error::bad_json("filter must be a JSON object"))?;
        let event_fields = string_list(filter, "event_fields", "event_fields")?
            .map(|fields| fields.iter().map(|f| field_path(f)).collect())
            .transpose()?;
        let event_format = match filter.get("event_format") {
            None | Some(Value::Null) => EventFormat::Client,
            Some(Value::String(s)) if s == "client" => EventFormat::Client,
            Some(Value::String(s)) if s == "federation" => EventFormat::Federation,
            Some(_) => {
                return Err(Error::bad_json(
                    "event_format must be \"client\" or \"federation\"",
                ));
            }
        };
        let presence = event_filter(object(filter, "presence", "presence")?, "presence")?;
        let account_data = event_filter(
            object(filter, "account_data", "account_data")?,
            "account_data",
        )?;
        let room = match object(filter, "room", "room")? {
            Some(room) => RoomFilter {
                rooms: string_list(room, "rooms", "room.rooms")?,
                not_rooms: string_list(room, "not_rooms", "room.not_rooms")?.unwrap_or_default(),
                include_leave: boolean(room, "include_leave", "room.include_leave")?,
                timeline: room_event_filter(
                    object(room, "timeline", "room.timeline")?,
                    "room.timeline",
                )?,
                state: room_event_filter(object(room, "state", "room.state")?, "room.state")?,
                ephemeral: room_event_filter(
                    object(room, "ephemeral", "room.ephemeral")?,
                    "room.ephemeral",
                )?,
                account_data: room_event_filter(
                    object(room, "account_data", "room.account_data")?,
                    "room.account_data",
                )?,
            },
            None => RoomFilter::default(),
        };
        Ok(SyncFilter {
            event_fields,
            event_format,
            presence,
            account_data,
            room,
        })
    }

    /// The timeline limit of a sync: the filter's, else the default, within bounds.
    pub fn timeline_limit(&self) -> usize {
        self.room
            .timeline
            .limit
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .clamp(1, MAX_TIMELINE_LIMIT)
    }
}

/// Parses a `RoomEventFilter` object on its own (`/messages`, `/context`): the event lists and
/// the limit, which must be at least 1 there.
pub fn parse_room_event_filter(
    object: &Map<String, Value>,
) -> Result<(TimelineFilter, Option<i64>)> {
    let limit = match object.get("limit") {
        None | Some(Value::Null) => None,
        Some(limit) => Some(
            limit
                .as_i64()
                .filter(|l| *l > 0)
                .ok_or_else(|| Error::bad_json("filter limit must be a positive integer"))?,
        ),
    };
    let mut lists = object.clone();
    lists.remove("limit");
    Ok((room_event_filter(Some(&lists), "filter")?.events, limit))
}

fn type_allowed(types: &Option<Vec<String>>, not_types: &[String], event_type: &str) -> bool {
    types
        .as_ref()
        .is_none_or(|t| t.iter().any(|p| glob_match(p, event_type)))
        && !not_types.iter().any(|p| glob_match(p, event_type))
}

/// Matrix filter type patterns: `*` matches any run of characters.
pub(crate) fn glob_match(pattern: &str, value: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == value,
        Some((prefix, rest)) => {
            value.starts_with(prefix)
                && (0..=value.len() - prefix.len()).any(|i| {
                    value.is_char_boundary(prefix.len() + i)
                        && glob_match(rest, &value[prefix.len() + i..])
                })
        }
    }
}

fn object<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(Error::bad_json(format!("filter {path} must be an object"))),
    }
}

fn boolean(object: &Map<String, Value>, key: &str, path: &str) -> Result<bool> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::bad_json(format!("filter {path} must be a boolean"))),
    }
}

/// A list of strings; `None` when absent.
pub fn string_list(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<Vec<String>>> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::bad_json(format!("filter {path}: strings only")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(Error::bad_json(format!(
            "filter {path} must be an array of strings"
        ))),
    }
}

/// A limit: a non-negative integer (a sync clamps it to its bounds).
fn limit(object: &Map<String, Value>, path: &str) -> Result<Option<usize>> {
    match object.get("limit") {
        None | Some(Value::Null) => Ok(None),
        Some(limit) => limit
            .as_u64()
            .map(|l| Some(usize::try_from(l).unwrap_or(usize::MAX)))
            .ok_or_else(|| {
                Error::bad_json(format!(
                    "filter {path}.limit must be a non-negative integer"
                ))
            }),
    }
}

fn event_filter(object: Option<&Map<String, Value>>, path: &str) -> Result<EventFilter> {
    let Some(object) = object else {
        return Ok(EventFilter::default());
    };
    Ok(EventFilter {
        types: string_list(object, "types", &format!("{path}.types"))?,
        not_types: string_list(object, "not_types", &format!("{path}.not_types"))?
            .unwrap_or_default(),
        senders: string_list(object, "senders", &format!("{path}.senders"))?,
        not_senders: string_list(object, "not_senders", &format!("{path}.not_senders"))?
            .unwrap_or_default(),
        limit: limit(object, path)?,
    })
}

fn room_event_filter(object: Option<&Map<String, Value>>, path: &str) -> Result<RoomEventFilter> {
    let Some(object) = object else {
        return Ok(RoomEventFilter::default());
    };
    let lists = event_filter(Some(object), path)?;
    let contains_url = match object.get("contains_url") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(Error::bad_json(format!(
                "filter {path}.contains_url must be a boolean"
            )));
        }
    };
    Ok(RoomEventFilter {
        events: TimelineFilter {
            types: lists.types,
            not_types: lists.not_types,
            senders: lists.senders,
            not_senders: lists.not_senders,
            rooms: string_list(object, "rooms", &format!("{path}.rooms"))?,
            not_rooms: string_list(object, "not_rooms", &format!("{path}.not_rooms"))?
                .unwrap_or_default(),
            contains_url,
        },
        limit: lists.limit,
        lazy_load_members: boolean(
            object,
            "lazy_load_members",
            &format!("{path}.lazy_load_members"),
        )?,
        include_redundant_members: boolean(
            object,
            "include_redundant_members",
            &format!("{path}.include_redundant_members"),
        )?,
        unread_thread_notifications: boolean(
            object,
            "unread_thread_notifications",
            &format!("{path}.unread_thread_notifications"),
        )?,
    })
}

/// A dot-separated property path (`content.body`; `\.` is a literal dot, `\\` a backslash),
/// split into its parts.
fn field_path(path: &str) -> Result<Vec<String>> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ ('.' | '\\')) => current.push(escaped),
                Some(other) => {
                    current.push('\\');
                    current.push(other);
                }
                None => current.push('\\'),
            },
            '.' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    if parts.iter().any(String::is_empty) {
        return Err(Error::bad_json(format!(
            "event_fields: {path:?} is not a dot-separated property path"
        )));
    }
    Ok(parts)
}

/// The event with only the fields at `paths` (those it has).
pub fn project_fields(event: &Value, paths: &[Vec<String>]) -> Value {
    let mut out = Map::new();
    for path in paths {
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        let mut source = event;
        let mut found = true;
        for part in parents {
            match source.get(part) {
                Some(inner) if inner.is_object() => source = inner,
                _ => {
                    found = false;
                    break;
                }
            }
        }
        let Some(value) = source.get(last).filter(|_| found) else {
            continue;
        };
        insert_at(&mut out, parents, last, value.clone());
    }
    Value::Object(out)
}

fn insert_at(target: &mut Map<String, Value>, parents: &[String], last: &str, value: Value) {
    match parents.split_first() {
        None => {
            target.insert(last.to_owned(), value);
        }
        Some((first, rest)) => {
            let entry = target
                .entry(first.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = entry {
                insert_at(inner, rest, last, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn whole_filters_parse() {
        let filter = SyncFilter::parse(&json!({
            "event_fields": ["type", "content.body", "content.m\\.relates_to"],
            "event_format": "federation",
            "presence": {"not_types": ["*"]},
            "account_data": {"types": ["m.push_rules"], "limit": 2},
            "room": {
                "rooms": ["!a:x"],
                "include_leave": true,
                "timeline": {"limit": 5, "types": ["m.room.message"], "unread_thread_notifications": true},
                "state": {"lazy_load_members": true, "not_types": ["m.room.topic"]},
                "ephemeral": {"types": ["m.receipt"]},
                "account_data": {"not_types": ["m.tag"]},
            },
        }))
        .expect("parses");
        assert_eq!(filter.event_format, EventFormat::Federation);
        assert_eq!(
            filter.event_fields,
            Some(vec![
                vec!["type".to_owned()],
                vec!["content".to_owned(), "body".to_owned()],
                vec!["content".to_owned(), "m.relates_to".to_owned()],
            ])
        );
        assert!(filter.presence.excludes_type("m.presence"));
        assert_eq!(filter.account_data.limit, Some(2));
        assert_eq!(filter.timeline_limit(), 5);
        assert!(filter.room.include_leave);
        assert!(filter.room.timeline.unread_thread_notifications);
        assert!(filter.room.state.lazy_load_members);
        assert!(!filter.room.state.include_redundant_members);
        assert!(filter.room.ephemeral.matches_unsent("!a:x", "m.receipt"));
        assert!(!filter.room.ephemeral.matches_unsent("!a:x", "m.typing"));
        assert!(!filter.room.account_data.matches_unsent("!a:x", "m.tag"));
        assert_eq!(
            SyncFilter::parse(&json!({}))
                .expect("empty")
                .timeline_limit(),
            10
        );
    }

    #[test]
    fn malformed_filters_are_bad_json() {
        for bad in [
            json!([1]),
            json!({"room": {"timeline": {"limit": "x"}}}),
            json!({"room": {"timeline": {"limit": -1}}}),
            json!({"room": {"state": {"lazy_load_members": "yes"}}}),
            json!({"room": {"state": {"types": "m.room.name"}}}),
            json!({"room": {"ephemeral": []}}),
            json!({"presence": {"senders": [1]}}),
            json!({"event_format": "xml"}),
            json!({"event_fields": ["content..body"]}),
            json!({"room": "x"}),
            json!({"room": {"include_leave": 1}}),
        ] {
            let err = SyncFilter::parse(&bad).expect_err(&bad.to_string());
            assert_eq!(err.code(), palpo_core::ErrorCode::BadJson, "{bad}");
        }
    }

    #[test]
    fn event_filters_match_types_senders_and_limits() {
        let filter = EventFilter {
            types: Some(vec!["m.*".into()]),
            not_senders: vec!["@b:x".into()],
            limit: Some(1),
            ..EventFilter::default()
        };
        let events = vec![
            json!({"type": "m.presence", "sender": "@a:x", "n": 1}),
            json!({"type": "m.presence", "sender": "@b:x", "n": 2}),
            json!({"type": "m.presence", "sender": "@c:x", "n": 3}),
            json!({"type": "org.other", "sender": "@a:x", "n": 4}),
        ];
        assert_eq!(
            filter.apply(events),
            vec![json!({"type": "m.presence", "sender": "@c:x", "n": 3})]
        );
        let senders = EventFilter {
            senders: Some(vec!["@a:x".into()]),
            ..EventFilter::default()
        };
        assert!(senders.matches("m.presence", Some("@a:x")));
        assert!(!senders.matches("m.presence", Some("@c:x")));
        assert!(!senders.matches("m.push_rules", None));
    }

    #[test]
    fn fields_are_projected() {
        let event = json!({
            "type": "m.room.message",
            "event_id": "$e",
            "content": {"body": "hi", "msgtype": "m.text", "m.relates_to": {"rel_type": "x"}},
            "unsigned": {"age": 1},
        });
        let paths = [
            field_path("type").expect("path"),
            field_path("content.body").expect("path"),
            field_path("content.m\\.relates_to").expect("path"),
            field_path("content.nope.deeper").expect("path"),
            field_path("type.inner").expect("path"),
        ];
        assert_eq!(
            project_fields(&event, &paths),
            json!({
                "type": "m.room.message",
                "content": {"body": "hi", "m.relates_to": {"rel_type": "x"}},
            })
        );
        assert!(field_path("").is_err());
        assert!(field_path("a.").is_err());
    }

    #[test]
    fn type_patterns_glob() {
        assert!(glob_match("m.*", "m.room.message"));
        assert!(glob_match("*", ""));
        assert!(glob_match("m.*.message", "m.room.message"));
        assert!(!glob_match("m.room", "m.room.message"));
    }
}
