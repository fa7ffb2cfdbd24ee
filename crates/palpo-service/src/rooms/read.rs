//! Reading rooms: state, single events, `/messages`, `/context`, members, with membership and
//! history visibility enforced on every read.

use std::collections::{BTreeMap, HashMap};

use palpo_core::{Error, Result};
use palpo_storage::model::{Direction, EventRecord, MembershipRecord, StateMap};
use ruma::{
    OwnedUserId,
    events::room::power_levels::{
        RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource,
    },
    push::PushConditionPowerLevelsCtx,
    room_version_rules::RedactionRules,
};
use serde_json::Value;

use super::{RoomService, internal, pdu::client_event, room_version_rules};
use crate::filter::glob_match;

/// A page of `/messages`.
#[derive(Debug, Clone)]
pub struct MessagesPage {
    pub chunk: Vec<Value>,
    pub start: String,
    /// Absent when there is nothing further in that direction.
    pub end: Option<String>,
}

/// What `/messages` asks for.
#[derive(Debug, Clone)]
pub struct MessagesQuery {
    /// Token to start from; default: the newest event (backward) or the oldest (forward).
    pub from: Option<String>,
    /// Token to stop at.
    pub to: Option<String>,
    pub dir: Direction,
    pub limit: i64,
    pub filter: TimelineFilter,
}

/// The event lists of a room event filter (`RoomEventFilter` without its limit and flags).
#[derive(Debug, Clone, Default)]
pub struct TimelineFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    /// Rooms to include (all when absent).
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    /// Only events whose content has a `url` (true), or only those without one (false).
    pub contains_url: Option<bool>,
}

impl TimelineFilter {
    pub(crate) fn matches(&self, event: &EventRecord) -> bool {
        let type_ok =
            |patterns: &[String]| patterns.iter().any(|p| glob_match(p, &event.event_type));
        self.types.as_ref().is_none_or(|t| type_ok(t))
            && !type_ok(&self.not_types)
            && self
                .senders
                .as_ref()
                .is_none_or(|s| s.contains(&event.sender))
            && !self.not_senders.contains(&event.sender)
            && self.allows_room(&event.room_id)
            && self.contains_url.is_none_or(|wanted| {
                let has_url = serde_json::from_str::<Value>(&event.pdu_json)
                    .ok()
                    .is_some_and(|pdu| pdu["content"].get("url").is_some());
                has_url == wanted
            })
    }

    /// Whether events of `room_id` may pass (`rooms` / `not_rooms`).
    pub(crate) fn allows_room(&self, room_id: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|r| r.iter().any(|id| id == room_id))
            && !self.not_rooms.iter().any(|id| id == room_id)
    }
}

/// Pagination tokens: `s<N>` is the point just after stream position N.
pub fn parse_token(token: &str) -> Result<i64> {
    token
        .strip_prefix('s')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| Error::invalid_param(format!("Invalid pagination token {token:?}")))
}

pub fn token(position: i64) -> String {
    format!("s{position}")
}

/// The `content` of a stored event's PDU.
fn event_content(event: &EventRecord) -> Option<Value> {
    serde_json::from_str::<Value>(&event.pdu_json)
        .ok()
        .and_then(|mut v| v.get_mut("content").map(Value::take))
}

/// How a user may read a room.
enum Access {
    /// Currently joined: everything up to now.
    Joined,
    /// Was in the room: up to the stream position where they left.
    Until(i64),
    /// Not a member, but the room is world-readable.
    WorldReadable,
}

/// Memo of which state groups a user may see events in.
pub(super) struct Visibility<'a> {
    pub(super) user: &'a str,
    pub(super) joined_now: bool,
    pub(super) by_group: HashMap<i64, bool>,
}

impl RoomService {
    fn redaction_rules(version: &str) -> Option<RedactionRules> {
        room_version_rules(version)
            .ok()
            .map(|(_, rules)| rules.redaction)
    }

    pub(super) async fn room_rules(&self, room_id: &str) -> Result<Option<RedactionRules>> {
        let version = self
            .room_version(room_id)
            .await?
            .ok_or_else(|| Error::forbidden("You are not allowed to see this room"))?;
        Ok(Self::redaction_rules(&version))
    }

    pub(super) fn to_client(rules: Option<&RedactionRules>, event: &EventRecord) -> Value {
        client_event(
            &event.event_id,
            &event.room_id,
            &event.pdu_json,
            event.redacted_by.as_deref(),
            rules,
        )
    }

    /// The content of one state event of a state map.
    pub(super) async fn state_content(
        &self,
        state: &StateMap,
        kind: &str,
        key: &str,
    ) -> Result<Option<Value>> {
        let Some(id) = state.get(&(kind.to_owned(), key.to_owned())) else {
            return Ok(None);
        };
        let event = self.storage.rooms.get_event(id).await.map_err(internal)?;
        match event {
            Some(event) => self.content_as_seen(&event).await,
            None => Ok(None),
        }
    }

    /// The contents of several state events of a state map, read at once, by (type, state
    /// key); entries whose event is missing are left out.
    pub(super) async fn state_contents(
        &self,
        state: &StateMap,
    ) -> Result<HashMap<(String, String), Value>> {
        let ids: Vec<String> = state.values().cloned().collect();
        let events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?;
        let mut by_id: HashMap<&str, Value> = HashMap::with_capacity(events.len());
        for event in &events {
            if let Some(content) = self.content_as_seen(event).await? {
                by_id.insert(event.event_id.as_str(), content);
            }
        }
        Ok(state
            .iter()
            .filter_map(|(key, id)| Some((key.clone(), by_id.remove(id.as_str())?)))
            .collect())
    }

    /// A stored event's content as clients see it: once redacted, what the room version's
    /// redaction leaves of it (a join rule, a history visibility), never the name or topic
    /// it had.
    async fn content_as_seen(&self, event: &EventRecord) -> Result<Option<Value>> {
        if event.redacted_by.is_none() {
            return Ok(event_content(event));
        }
        let rules = self.room_rules(&event.room_id).await?;
        let mut client = Self::to_client(rules.as_ref(), event);
        Ok(client.get_mut("content").map(Value::take))
    }

    pub(super) async fn history_visibility(&self, state: &StateMap) -> Result<String> {
        Ok(self
            .state_content(state, "m.room.history_visibility", "")
            .await?
            .and_then(|c| {
                c.get("history_visibility")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "shared".to_owned()))
    }

    /// May `user` read `room_id`, and up to where? 403 when not.
    async fn access(
        &self,
        user: &str,
        room_id: &str,
    ) -> Result<(Access, Option<MembershipRecord>)> {
        let membership = self
            .storage
            .rooms
            .membership(room_id, user)
            .await
            .map_err(internal)?;
        match membership.as_ref().map(|m| m.membership.as_str()) {
            Some("join") => return Ok((Access::Joined, membership)),
            Some("leave" | "ban") => {
                let until = membership
                    .as_ref()
                    .map(|m| m.stream_ordering)
                    .unwrap_or_default();
                return Ok((Access::Until(until), membership));
            }
            _ => {}
        }
        // Only what decides access: whether the room exists, and its history visibility.
        let state = self
            .current_entries(
                room_id,
                &[("m.room.create", ""), ("m.room.history_visibility", "")],
            )
            .await?;
        if state.is_empty() {
            return Err(Error::forbidden("You are not allowed to see this room"));
        }
        if self.history_visibility(&state).await? == "world_readable" {
            return Ok((Access::WorldReadable, membership));
        }
        Err(Error::forbidden("You are not a member of this room"))
    }

    /// The state the user may see: current state, or the state when they left.
    pub(super) async fn visible_state(&self, user: &str, room_id: &str) -> Result<StateMap> {
        let (access, membership) = self.access(user, room_id).await?;
        match access {
            Access::Joined | Access::WorldReadable => self
                .storage
                .rooms
                .current_state(room_id)
                .await
                .map_err(internal),
            Access::Until(_) => {
                let event_id = membership.map(|m| m.event_id).unwrap_or_default();
                let event = self
                    .storage
                    .rooms
                    .get_event(&event_id)
                    .await
                    .map_err(internal)?;
                match event.and_then(|e| e.state_group) {
                    Some(group) => self
                        .storage
                        .rooms
                        .state_at_group(group)
                        .await
                        .map_err(internal),
                    None => Ok(StateMap::new()),
                }
            }
        }
    }

    /// `GET /rooms/{roomId}/state`.
    pub async fn room_state(&self, user: &str, room_id: &str) -> Result<Vec<Value>> {
        let state = self.visible_state(user, room_id).await?;
        let rules = self.room_rules(room_id).await?;
        let ids: Vec<String> = state.values().cloned().collect();
        let mut events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?;
        events.sort_by_key(|e| e.stream_ordering);
        Ok(events
            .iter()
            .map(|e| Self::to_client(rules.as_ref(), e))
            .collect())
    }

    /// `GET /rooms/{roomId}/state/{eventType}/{stateKey}`: the content.
    pub async fn state_event_content(
        &self,
        user: &str,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Value> {
        let mut client = self
            .state_event(user, room_id, event_type, state_key)
            .await?;
        Ok(client
            .get_mut("content")
            .map(Value::take)
            .unwrap_or_default())
    }

    /// `GET /rooms/{roomId}/state/{eventType}/{stateKey}?format=event`: the whole event.
    pub async fn state_event(
        &self,
        user: &str,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Value> {
        let state = self.visible_state(user, room_id).await?;
        let id = state
            .get(&(event_type.to_owned(), state_key.to_owned()))
            .ok_or_else(|| Error::not_found("Event not found"))?;
        let event = self
            .storage
            .rooms
            .get_event(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Event not found"))?;
        let rules = self.room_rules(room_id).await?;
        Ok(Self::to_client(rules.as_ref(), &event))
    }

    /// Whether `user` may see `event` under the room's history visibility.
    pub(super) async fn can_see(
        &self,
        vis: &mut Visibility<'_>,
        event: &EventRecord,
    ) -> Result<bool> {
        // Users always see their own membership changes.
        if event.event_type == "m.room.member" && event.state_key.as_deref() == Some(vis.user) {
            return Ok(true);
        }
        let Some(group) = event.state_group else {
            return Ok(false);
        };
        if let Some(seen) = vis.by_group.get(&group) {
            return Ok(*seen);
        }
        let (visibility, membership) = self.group_visibility(group, vis.user).await?;
        let allowed = visibility == "world_readable"
            || membership == "join"
            || (visibility == "shared" && vis.joined_now)
            || (visibility == "invited" && membership == "invite");
        vis.by_group.insert(group, allowed);
        Ok(allowed)
    }

    /// The room's history visibility and the user's membership in state group `group` (kept
    /// once read: a group's state and the events in it never change).
    async fn group_visibility(&self, group: i64, user: &str) -> Result<(String, String)> {
        let mut learned = self
            .learn_group_visibility(&[group], user, &HashMap::new())
            .await?;
        Ok(learned.remove(&group).unwrap_or_default())
    }

    /// Reads and keeps the visibility facts (see [`RoomService::group_visibility`]) of those
    /// of `groups` not kept yet, all at once: one read of their states (except those in
    /// `states`, read already) and one of the events the facts come from. Returns the facts
    /// of every group asked for.
    pub(super) async fn learn_group_visibility(
        &self,
        groups: &[i64],
        user: &str,
        states: &HashMap<i64, StateMap>,
    ) -> Result<HashMap<i64, (String, String)>> {
        let mut learned = HashMap::with_capacity(groups.len());
        let mut missing = Vec::new();
        {
            let mut kept = self
                .group_visibility
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for group in groups {
                match kept.get(&(*group, user.to_owned())) {
                    Some(facts) => {
                        learned.insert(*group, facts.clone());
                    }
                    None => missing.push(*group),
                }
            }
        }
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(learned);
        }
        let unread: Vec<i64> = missing
            .iter()
            .copied()
            .filter(|group| !states.contains_key(group))
            .collect();
        let read = if unread.is_empty() {
            HashMap::new()
        } else {
            self.storage
                .rooms
                .states_at_groups(&unread)
                .await
                .map_err(internal)?
        };
        let visibility_key = ("m.room.history_visibility".to_owned(), String::new());
        let member_key = ("m.room.member".to_owned(), user.to_owned());
        // Per group: the ids of its history visibility and member events.
        let sources: Vec<(i64, Option<&String>, Option<&String>)> = missing
            .iter()
            .map(|group| {
                let state = states.get(group).or_else(|| read.get(group));
                (
                    *group,
                    state.and_then(|s| s.get(&visibility_key)),
                    state.and_then(|s| s.get(&member_key)),
                )
            })
            .collect();
        let mut ids: Vec<String> = sources
            .iter()
            .flat_map(|(_, v, m)| [*v, *m])
            .flatten()
            .cloned()
            .collect();
        ids.sort();
        ids.dedup();
        let contents: HashMap<String, Value> = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?
            .iter()
            .filter_map(|e| Some((e.event_id.clone(), event_content(e)?)))
            .collect();
        let field = |id: Option<&String>, name: &str| {
            id.and_then(|id| contents.get(id))
                .and_then(|c| c.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let mut kept = self
            .group_visibility
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (group, visibility, member) in sources {
            let facts = (
                field(visibility, "history_visibility").unwrap_or_else(|| "shared".to_owned()),
                field(member, "membership").unwrap_or_else(|| "leave".to_owned()),
            );
            kept.put((group, user.to_owned()), facts.clone());
            learned.insert(group, facts);
        }
        Ok(learned)
    }

    /// `GET /rooms/{roomId}/event/{eventId}`.
    pub async fn event(&self, user: &str, room_id: &str, event_id: &str) -> Result<Value> {
        let (access, _) = self.access(user, room_id).await?;
        let event = self
            .storage
            .rooms
            .get_event(event_id)
            .await
            .map_err(internal)?
            .filter(|e| e.room_id == room_id && e.rejected_reason.is_none() && !e.soft_failed)
            .ok_or_else(|| Error::not_found("Event not found"))?;
        let mut vis = Visibility {
            user,
            joined_now: matches!(access, Access::Joined),
            by_group: HashMap::new(),
        };
        let beyond =
            matches!(access, Access::Until(until) if event.stream_ordering.unwrap_or(0) > until);
        if beyond || !self.can_see(&mut vis, &event).await? {
            return Err(Error::not_found("Event not found"));
        }
        let rules = self.room_rules(room_id).await?;
        Ok(Self::to_client(rules.as_ref(), &event))
    }

    /// `GET /rooms/{roomId}/messages`.
    pub async fn messages(
        &self,
        user: &str,
        room_id: &str,
        query: &MessagesQuery,
    ) -> Result<MessagesPage> {
        let MessagesQuery {
            from,
            to,
            dir,
            limit,
            filter,
        } = query;
        let (from, to, dir, limit) = (from.as_deref(), to.as_deref(), *dir, *limit);
        let (access, _) = self.access(user, room_id).await?;
        let limit = limit.clamp(1, 1000);
        let latest = self
            .storage
            .rooms
            .max_stream_ordering()
            .await
            .map_err(internal)?;
        let ceiling = match access {
            Access::Until(until) => until,
            _ => latest,
        };
        let from = match from {
            Some(token) => parse_token(token)?,
            None => match dir {
                Direction::Backward => ceiling,
                Direction::Forward => 0,
            },
        }
        .min(ceiling);
        let to = to.map(parse_token).transpose()?;
        let mut vis = Visibility {
            user,
            joined_now: matches!(access, Access::Joined),
            by_group: HashMap::new(),
        };
        let rules = self.room_rules(room_id).await?;
        let mut chunk = Vec::new();
        let mut cursor = from;
        let mut exhausted = false;
        // Filtered-out events do not count towards the limit; keep reading a bounded while.
        for _ in 0..20 {
            let (after, bound) = match dir {
                Direction::Backward => (cursor + 1, to),
                Direction::Forward => {
                    (cursor, to.map(|t| t.min(ceiling) + 1).or(Some(ceiling + 1)))
                }
            };
            let want = limit - chunk.len() as i64;
            let events = self
                .storage
                .rooms
                .room_events(room_id, after, bound, dir, want)
                .await
                .map_err(internal)?;
            if (events.len() as i64) < want {
                exhausted = true;
            }
            for event in &events {
                let position = event.stream_ordering.unwrap_or_default();
                cursor = match dir {
                    Direction::Backward => position - 1,
                    Direction::Forward => position,
                };
                if filter.matches(event) && self.can_see(&mut vis, event).await? {
                    chunk.push(Self::to_client(rules.as_ref(), event));
                }
            }
            if exhausted || chunk.len() as i64 >= limit {
                break;
            }
        }
        Ok(MessagesPage {
            chunk,
            start: token(from),
            end: (!exhausted).then(|| token(cursor)),
        })
    }

    /// `GET /rooms/{roomId}/context/{eventId}`: the event, what surrounds it, and the state.
    /// Both pages always carry an `end`: the token to go on paginating backwards (events
    /// before) and forwards (events after) from, also when the page reached an end of the
    /// timeline.
    pub async fn context(
        &self,
        user: &str,
        room_id: &str,
        event_id: &str,
        limit: i64,
    ) -> Result<(Value, MessagesPage, MessagesPage, Vec<Value>)> {
        let event_json = self.event(user, room_id, event_id).await?;
        let event = self
            .storage
            .rooms
            .get_event(event_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Event not found"))?;
        let position = event.stream_ordering.unwrap_or_default();
        // Read before the pages: a forward token at this point misses nothing sent meanwhile.
        let latest = self
            .storage
            .rooms
            .max_stream_ordering()
            .await
            .map_err(internal)?;
        let limit = limit.clamp(0, 100);
        let half = limit / 2;
        let mut before = if half > 0 {
            let query = MessagesQuery {
                from: Some(token(position - 1)),
                to: None,
                dir: Direction::Backward,
                limit: half,
                filter: TimelineFilter::default(),
            };
            self.messages(user, room_id, &query).await?
        } else {
            empty_page(position - 1)
        };
        let mut after = if limit - half > 0 {
            let query = MessagesQuery {
                from: Some(token(position)),
                to: None,
                dir: Direction::Forward,
                limit: limit - half,
                filter: TimelineFilter::default(),
            };
            self.messages(user, room_id, &query).await?
        } else {
            empty_page(position)
        };
        before.end.get_or_insert_with(|| token(0));
        after.end.get_or_insert_with(|| token(latest.max(position)));
        let state = match event.state_group {
            Some(group) => self
                .storage
                .rooms
                .state_at_group(group)
                .await
                .map_err(internal)?,
            None => StateMap::new(),
        };
        let rules = self.room_rules(room_id).await?;
        let ids: Vec<String> = state.values().cloned().collect();
        let state_events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?
            .iter()
            .map(|e| Self::to_client(rules.as_ref(), e))
            .collect();
        Ok((event_json, before, after, state_events))
    }

    /// `GET /rooms/{roomId}/members`: member events, current or at a token, filtered.
    pub async fn members(
        &self,
        user: &str,
        room_id: &str,
        at: Option<&str>,
        membership: Option<&str>,
        not_membership: Option<&str>,
    ) -> Result<Vec<Value>> {
        let (access, _) = self.access(user, room_id).await?;
        let state = match (at, access) {
            (None, Access::Joined | Access::WorldReadable) => self
                .storage
                .rooms
                .current_state(room_id)
                .await
                .map_err(internal)?,
            (at, access) => {
                let mut position = at.map(parse_token).transpose()?.unwrap_or(i64::MAX);
                if let Access::Until(until) = access {
                    position = position.min(until);
                }
                self.state_at_position(room_id, position).await?
            }
        };
        let ids: Vec<String> = state
            .iter()
            .filter(|((kind, _), _)| kind == "m.room.member")
            .map(|(_, id)| id.clone())
            .collect();
        let rules = self.room_rules(room_id).await?;
        let mut events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?;
        events.sort_by(|a, b| a.state_key.cmp(&b.state_key));
        Ok(events
            .iter()
            .map(|e| Self::to_client(rules.as_ref(), e))
            .filter(|e| {
                let m = e["content"]["membership"].as_str().unwrap_or_default();
                membership.is_none_or(|want| want == m) && not_membership.is_none_or(|not| not != m)
            })
            .collect())
    }

    /// `GET /rooms/{roomId}/joined_members`: user id → (display name, avatar URL).
    pub async fn joined_members(
        &self,
        user: &str,
        room_id: &str,
    ) -> Result<BTreeMap<String, (Option<String>, Option<String>)>> {
        let (access, _) = self.access(user, room_id).await?;
        if !matches!(access, Access::Joined) {
            return Err(Error::forbidden("You are not joined to this room"));
        }
        let members = self
            .storage
            .rooms
            .room_members(room_id, Some("join"))
            .await
            .map_err(internal)?;
        let ids: Vec<String> = members.iter().map(|m| m.event_id.clone()).collect();
        let events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?;
        Ok(events
            .into_iter()
            .filter_map(|e| {
                let content: Value =
                    serde_json::from_str::<Value>(&e.pdu_json).ok()?["content"].take();
                let name = content["displayname"].as_str().map(str::to_owned);
                let avatar = content["avatar_url"].as_str().map(str::to_owned);
                Some((e.state_key?, (name, avatar)))
            })
            .collect())
    }

    /// `GET /joined_rooms`.
    pub async fn joined_rooms(&self, user: &str) -> Result<Vec<String>> {
        self.storage
            .rooms
            .rooms_for_user(user, "join")
            .await
            .map_err(internal)
    }

    /// `GET /rooms/{roomId}/timestamp_to_event`: (event id, its timestamp).
    pub async fn timestamp_to_event(
        &self,
        user: &str,
        room_id: &str,
        ts: i64,
        dir: Direction,
    ) -> Result<(String, i64)> {
        let (access, _) = self.access(user, room_id).await?;
        let mut vis = Visibility {
            user,
            joined_now: matches!(access, Access::Joined),
            by_group: HashMap::new(),
        };
        let event = self
            .storage
            .rooms
            .event_near_ts(room_id, ts, dir)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("No event found in that direction"))?;
        if !self.can_see(&mut vis, &event).await? {
            return Err(Error::not_found("No event found in that direction"));
        }
        Ok((event.event_id, event.origin_server_ts))
    }

    /// Some entries of the room's current state, without reading the rest.
    async fn current_entries(&self, room_id: &str, keys: &[(&str, &str)]) -> Result<StateMap> {
        let keys: Vec<(String, String)> = keys
            .iter()
            .map(|(kind, key)| ((*kind).to_owned(), (*key).to_owned()))
            .collect();
        self.storage
            .rooms
            .current_state_entries(room_id, &keys)
            .await
            .map_err(internal)
    }

    /// The create and power levels entries of the current state.
    async fn power_state(&self, room_id: &str) -> Result<StateMap> {
        self.current_entries(
            room_id,
            &[("m.room.create", ""), ("m.room.power_levels", "")],
        )
        .await
    }

    /// The power level of `user` in the room's current state. Room creators of versions with
    /// privileged creators have unlimited power.
    pub(super) async fn power_of(&self, room_id: &str, user: &str) -> Result<i64> {
        let state = self.power_state(room_id).await?;
        let room = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?;
        if let Some(room) = &room
            && let Ok((_, rules)) = room_version_rules(&room.room_version)
            && rules.authorization.explicitly_privilege_room_creators
        {
            let create = self.state_content(&state, "m.room.create", "").await?;
            let additional = create
                .as_ref()
                .and_then(|c| c.get("additional_creators"))
                .and_then(Value::as_array)
                .is_some_and(|list| list.iter().any(|u| u.as_str() == Some(user)));
            if room.creator == user || additional {
                return Ok(i64::MAX);
            }
        }
        let Some(levels) = self
            .state_content(&state, "m.room.power_levels", "")
            .await?
        else {
            // No power levels yet: the creator has 100, everyone else 0.
            return Ok(if room.is_some_and(|r| r.creator == user) {
                100
            } else {
                0
            });
        };
        Ok(levels["users"][user]
            .as_i64()
            .or_else(|| levels["users_default"].as_i64())
            .unwrap_or(0))
    }

    /// The room's current power levels as push rules read them, to tell whether a sender may
    /// notify the whole room (`@room`); `None` for a room this server does not know or whose
    /// version it does not support, or whose power levels cannot be read (no one may then
    /// notify the room).
    pub(crate) async fn push_power_levels(
        &self,
        room_id: &str,
    ) -> Result<Option<PushConditionPowerLevelsCtx>> {
        let Some(room) = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
        else {
            return Ok(None);
        };
        let Ok((_, rules)) = room_version_rules(&room.room_version) else {
            return Ok(None);
        };
        let state = self.power_state(room_id).await?;
        // Additional creators only count in the versions that privilege creators.
        let create = match rules.authorization.explicitly_privilege_room_creators {
            true => self.state_content(&state, "m.room.create", "").await?,
            false => None,
        };
        let additional = create
            .as_ref()
            .and_then(|c| c.get("additional_creators"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        let creators: Vec<OwnedUserId> = std::iter::once(room.creator.as_str())
            .chain(additional)
            .filter_map(|user| OwnedUserId::try_from(user).ok())
            .collect();
        let source = match self
            .state_content(&state, "m.room.power_levels", "")
            .await?
        {
            None => RoomPowerLevelsSource::None,
            Some(content) => match serde_json::from_value::<RoomPowerLevelsEventContent>(content) {
                Ok(content) => RoomPowerLevelsSource::Original(content),
                Err(error) => {
                    tracing::warn!(room_id, %error, "unreadable power levels");
                    return Ok(None);
                }
            },
        };
        Ok(Some(
            RoomPowerLevels::new(source, &rules.authorization, creators).into(),
        ))
    }

    /// The level a power-levels key (`redact`, `kick`...) requires.
    pub(super) async fn power_needed(&self, room_id: &str, key: &str, default: i64) -> Result<i64> {
        let state = self.power_state(room_id).await?;
        Ok(self
            .state_content(&state, "m.room.power_levels", "")
            .await?
            .and_then(|levels| levels[key].as_i64())
            .unwrap_or(default))
    }

    /// The level sending a state event of `event_type` requires: the power levels' `events`
    /// entry for it, else their `state_default`, else 50.
    pub(super) async fn power_needed_for_state(
        &self,
        room_id: &str,
        event_type: &str,
    ) -> Result<i64> {
        let state = self.power_state(room_id).await?;
        let levels = self
            .state_content(&state, "m.room.power_levels", "")
            .await?
            .unwrap_or_default();
        Ok(levels["events"][event_type]
            .as_i64()
            .or_else(|| levels["state_default"].as_i64())
            .unwrap_or(50))
    }
}

/// A page that read nothing: it ends where it starts.
fn empty_page(position: i64) -> MessagesPage {
    MessagesPage {
        chunk: Vec::new(),
        start: token(position),
        end: Some(token(position)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns_glob() {
        assert!(glob_match("m.room.*", "m.room.message"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("m.room.*", "m.reaction"));
        assert!(glob_match("m.room.message", "m.room.message"));
    }

    #[test]
    fn tokens_round_trip() {
        assert_eq!(parse_token(&token(42)).expect("parses"), 42);
        assert!(parse_token("x1").is_err());
        assert!(parse_token("s-1").is_err());
    }
}
