//! Simplified sliding sync (MSC4186): lists of the user's rooms sorted by recency, windows of
//! them by range, explicit room subscriptions, and per room the requested state, a timeline
//! and counts. A connection remembers which rooms it has sent, so later responses carry only
//! what changed since `pos`.

use std::collections::{BTreeMap, HashMap, HashSet};

use palpo_core::{Error, ErrorCode, Result};
use palpo_storage::model::StateMap;
use serde_json::Value;

use super::{RoomService, internal, read::Visibility};

/// The room details a list or a subscription asks for.
#[derive(Debug, Clone, Default)]
pub struct RoomDetails {
    /// `(event type, state key)` patterns: `*` matches any type or key, `$ME` is the user,
    /// `$LAZY` members are sent like `*` (no lazy-loading yet).
    pub required_state: Vec<(String, String)>,
    pub timeline_limit: usize,
}

#[derive(Debug, Clone, Default)]
pub struct SlidingList {
    pub ranges: Vec<(usize, usize)>,
    pub details: RoomDetails,
    /// `Some(true)`: only invites; `Some(false)`: no invites.
    pub is_invite: Option<bool>,
}

/// Which sliding sync extensions the client enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlidingExtensions {
    pub account_data: bool,
    pub receipts: bool,
    pub typing: bool,
    /// Device-list changes since `pos`, one-time key counts, unused fallback key types.
    pub e2ee: bool,
    /// The device's to-device messages after `to_device_since`.
    pub to_device: bool,
    /// The `next_batch` of the previous `to_device` extension answer: messages up to it are
    /// acknowledged (deleted).
    pub to_device_since: Option<i64>,
    /// Most to-device messages to hand out (the server's own limit when 0 or above it).
    pub to_device_limit: usize,
}

#[derive(Debug, Clone, Default)]
pub struct SlidingRequest {
    /// The stream position of the previous response of this connection.
    pub pos: Option<i64>,
    pub conn_id: String,
    pub lists: BTreeMap<String, SlidingList>,
    pub room_subscriptions: BTreeMap<String, RoomDetails>,
    pub extensions: SlidingExtensions,
}

#[derive(Debug, Clone, Default)]
pub struct SlidingRoom {
    pub name: Option<String>,
    pub avatar: Option<String>,
    pub initial: bool,
    pub invite_state: Option<Vec<Value>>,
    pub required_state: Vec<Value>,
    pub timeline: Vec<Value>,
    pub prev_batch: Option<String>,
    pub limited: bool,
    pub joined_count: i64,
    pub invited_count: i64,
    pub num_live: i64,
    pub bump_stamp: i64,
    pub heroes: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SlidingResponse {
    pub pos: i64,
    /// List name → number of rooms matching it.
    pub lists: BTreeMap<String, usize>,
    pub rooms: BTreeMap<String, SlidingRoom>,
}

impl SlidingResponse {
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// What one connection has sent.
#[derive(Debug, Default)]
pub struct ConnectionState {
    sent: HashSet<String>,
    /// List name → the room ids its windows held last time.
    windows: HashMap<String, Vec<String>>,
}

fn matches_pattern(pattern: &(String, String), key: &(String, String), user: &str) -> bool {
    let type_ok = pattern.0 == "*" || pattern.0 == key.0;
    let key_ok = match pattern.1.as_str() {
        "*" | "$LAZY" => true,
        "$ME" => key.1 == user,
        other => other == key.1,
    };
    type_ok && key_ok
}

impl RoomService {
    /// One pass of a sliding sync for `user` on connection `state` (no waiting).
    pub async fn sliding_sync(
        &self,
        user: &str,
        request: &SlidingRequest,
        state: &mut ConnectionState,
    ) -> Result<SlidingResponse> {
        if request.pos.is_none() {
            *state = ConnectionState::default();
        }
        let upto = self
            .storage
            .rooms
            .max_stream_ordering()
            .await
            .map_err(internal)?;
        let memberships = self
            .storage
            .rooms
            .memberships_of_user(user)
            .await
            .map_err(internal)?;
        let candidates: Vec<_> = memberships
            .iter()
            .filter(|m| {
                !m.forgotten && matches!(m.membership.as_str(), "join" | "invite" | "knock")
            })
            .filter(|m| m.stream_ordering <= upto)
            .collect();
        let ids: Vec<String> = candidates.iter().map(|m| m.room_id.clone()).collect();
        let latest: HashMap<String, i64> = self
            .storage
            .rooms
            .latest_positions(&ids)
            .await
            .map_err(internal)?
            .into_iter()
            .collect();
        // Most recent first; ties broken by room id so windows are stable.
        let mut sorted: Vec<(&str, i64, &str)> = candidates
            .iter()
            .map(|m| {
                let bump = latest.get(&m.room_id).copied().unwrap_or(0).min(upto);
                (m.room_id.as_str(), bump, m.membership.as_str())
            })
            .collect();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));

        let mut response = SlidingResponse {
            pos: upto,
            ..SlidingResponse::default()
        };
        // Which rooms to send, with the details asked for (the widest wins when several ask).
        let mut wanted: BTreeMap<String, RoomDetails> = BTreeMap::new();
        let mut merge = |room_id: &str, details: &RoomDetails| {
            let entry = wanted.entry(room_id.to_owned()).or_default();
            entry.timeline_limit = entry.timeline_limit.max(details.timeline_limit);
            for pattern in &details.required_state {
                if !entry.required_state.contains(pattern) {
                    entry.required_state.push(pattern.clone());
                }
            }
        };
        for (name, list) in &request.lists {
            let members: Vec<&(&str, i64, &str)> = sorted
                .iter()
                .filter(|(_, _, membership)| match list.is_invite {
                    Some(true) => *membership == "invite",
                    Some(false) => *membership != "invite",
                    None => true,
                })
                .collect();
            response.lists.insert(name.clone(), members.len());
            let mut window = Vec::new();
            for &(start, end) in &list.ranges {
                for (room_id, _, _) in members
                    .iter()
                    .skip(start)
                    .take(end.saturating_sub(start) + 1)
                {
                    window.push((*room_id).to_owned());
                    merge(room_id, &list.details);
                }
            }
            state.windows.insert(name.clone(), window);
        }
        let member_of: HashMap<&str, &str> = sorted
            .iter()
            .map(|(id, _, membership)| (*id, *membership))
            .collect();
        for (room_id, details) in &request.room_subscriptions {
            // Subscriptions to rooms the user is not in are ignored, as the MSC says.
            if member_of.contains_key(room_id.as_str()) {
                merge(room_id, details);
            }
        }

        let changed: HashSet<String> = match request.pos {
            Some(pos) if pos < upto => self
                .storage
                .rooms
                .rooms_changed_between(pos, upto)
                .await
                .map_err(internal)?
                .into_iter()
                .collect(),
            _ => HashSet::new(),
        };
        for (room_id, details) in wanted {
            let membership = member_of.get(room_id.as_str()).copied().unwrap_or("join");
            let initial = !state.sent.contains(&room_id);
            let membership_changed = request.pos.is_some_and(|pos| {
                candidates
                    .iter()
                    .any(|m| m.room_id == room_id && m.stream_ordering > pos)
            });
            if !initial && !changed.contains(&room_id) && !membership_changed {
                continue;
            }
            let since = if initial { None } else { request.pos };
            let room = self
                .sliding_room(user, &room_id, membership, since, upto, &details)
                .await?;
            let mut room = room;
            room.initial = initial;
            room.bump_stamp = latest.get(&room_id).copied().unwrap_or(0);
            state.sent.insert(room_id.clone());
            response.rooms.insert(room_id, room);
        }
        Ok(response)
    }

    async fn sliding_room(
        &self,
        user: &str,
        room_id: &str,
        membership: &str,
        since: Option<i64>,
        upto: i64,
        details: &RoomDetails,
    ) -> Result<SlidingRoom> {
        let summary = self.summary(user, room_id).await?;
        let current = self
            .storage
            .rooms
            .current_state(room_id)
            .await
            .map_err(internal)?;
        let name = self.state_text(&current, "m.room.name", "name").await?;
        let avatar = self.state_text(&current, "m.room.avatar", "url").await?;
        let mut room = SlidingRoom {
            name,
            avatar,
            joined_count: summary.joined_member_count,
            invited_count: summary.invited_member_count,
            heroes: summary.heroes,
            ..SlidingRoom::default()
        };
        if membership != "join" {
            let record = self
                .storage
                .rooms
                .membership(room_id, user)
                .await
                .map_err(internal)?
                .ok_or_else(|| Error::new(ErrorCode::Unknown, "membership vanished"))?;
            room.invite_state = Some(self.stripped_state(room_id, &record).await?);
            return Ok(room);
        }
        if details.timeline_limit > 0 {
            let (records, limited) = self
                .timeline_window(room_id, since, upto, details.timeline_limit)
                .await?;
            let rules = self.room_rules(room_id).await?;
            let mut vis = Visibility {
                user,
                joined_now: true,
                by_group: HashMap::new(),
            };
            for record in &records {
                if self.can_see(&mut vis, record).await? {
                    room.timeline.push(Self::to_client(rules.as_ref(), record));
                }
            }
            room.num_live = if since.is_some() {
                room.timeline.len() as i64
            } else {
                0
            };
            room.limited = limited;
            let start = records
                .first()
                .and_then(|e| e.stream_ordering)
                .map(|p| p - 1)
                .unwrap_or(upto);
            room.prev_batch = Some(super::read::token(start));
        }
        // Requested state: all of it the first time, what changed since `pos` afterwards.
        let before: StateMap = match since {
            Some(pos) => self.state_at_position(room_id, pos).await?,
            None => StateMap::new(),
        };
        let ids: Vec<String> = current
            .iter()
            .filter(|(key, id)| {
                before.get(*key) != Some(*id)
                    && details
                        .required_state
                        .iter()
                        .any(|p| matches_pattern(p, key, user))
            })
            .map(|(_, id)| id.clone())
            .collect();
        room.required_state = self.state_events(room_id, ids).await?;
        Ok(room)
    }

    /// A string field of a current state event's content (`m.room.name` → `name`...).
    async fn state_text(
        &self,
        state: &StateMap,
        kind: &str,
        field: &str,
    ) -> Result<Option<String>> {
        Ok(self
            .state_content(state, kind, "")
            .await?
            .and_then(|c| c.get(field).and_then(Value::as_str).map(str::to_owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::matches_pattern;

    #[test]
    fn required_state_patterns() {
        let key = |t: &str, k: &str| (t.to_owned(), k.to_owned());
        assert!(matches_pattern(
            &key("m.room.name", ""),
            &key("m.room.name", ""),
            "@a:x"
        ));
        assert!(matches_pattern(
            &key("*", "*"),
            &key("m.room.topic", ""),
            "@a:x"
        ));
        assert!(matches_pattern(
            &key("m.room.member", "$ME"),
            &key("m.room.member", "@a:x"),
            "@a:x"
        ));
        assert!(!matches_pattern(
            &key("m.room.member", "$ME"),
            &key("m.room.member", "@b:x"),
            "@a:x"
        ));
        assert!(matches_pattern(
            &key("m.room.member", "$LAZY"),
            &key("m.room.member", "@b:x"),
            "@a:x"
        ));
        assert!(!matches_pattern(
            &key("m.room.name", ""),
            &key("m.room.topic", ""),
            "@a:x"
        ));
    }
}
