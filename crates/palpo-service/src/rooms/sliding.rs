//! Simplified sliding sync (MSC4186): lists of the user's rooms sorted by recency, filtered and
//! windowed by range, explicit room subscriptions, and per room the requested state, a timeline
//! and counts.
//!
//! A connection remembers, per room, what it has sent ([`SentRooms`]): whether the client is
//! up to date with the room as of the connection's position, or only up to an older stream
//! position (the room changed while in none of the lists), and with which `required_state`.
//! One pass reads that for the position the client continues from and answers with the rooms
//! that are new to the client or changed since the client last got them, and what the
//! connection has sent afterwards. [`crate::sync::SyncService`] keeps it in the database.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use palpo_core::{Error, ErrorCode, Result};
use palpo_storage::model::{Direction, MembershipRecord, StateMap};
use serde_json::Value;

use super::{RoomService, internal, read::Visibility};

/// `(event type, state key)` patterns: `*` matches any type or key, `$ME` is the user,
/// `$LAZY` members are sent like `*` (no lazy-loading yet).
pub type StatePatterns = Vec<(String, String)>;

/// The room details a list or a subscription asks for.
#[derive(Debug, Clone, Default)]
pub struct RoomDetails {
    pub required_state: StatePatterns,
    pub timeline_limit: usize,
}

/// Which rooms a list holds. Every filter set must match (AND); an unset or empty one matches
/// every room.
#[derive(Debug, Clone, Default)]
pub struct ListFilters {
    /// Only rooms in (`true`) or not in (`false`) the user's `m.direct` account data.
    pub is_dm: Option<bool>,
    /// Only rooms with (`true`) or without (`false`) an `m.room.encryption` state event.
    pub is_encrypted: Option<bool>,
    /// `Some(true)`: only invites; `Some(false)`: no invites.
    pub is_invite: Option<bool>,
    /// Only rooms whose create event's `type` is one of these (`None`: rooms without a type).
    pub room_types: Vec<Option<String>>,
    /// No rooms whose create event's `type` is one of these; wins over `room_types`.
    pub not_room_types: Vec<Option<String>>,
    /// Only rooms with one of these tags (`m.tag` room account data).
    pub tags: Vec<String>,
    /// No rooms with one of these tags; wins over `tags`.
    pub not_tags: Vec<String>,
    /// Only rooms that are `m.space.child` of one of these spaces (those the user is joined
    /// to; subspaces are not followed).
    pub spaces: Vec<String>,
}

impl ListFilters {
    fn needs_types(&self) -> bool {
        !self.room_types.is_empty() || !self.not_room_types.is_empty()
    }

    fn needs_tags(&self) -> bool {
        !self.tags.is_empty() || !self.not_tags.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
pub struct SlidingList {
    pub ranges: Vec<(usize, usize)>,
    pub details: RoomDetails,
    pub filters: ListFilters,
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
    /// The `pos` of the previous response of this connection, as the client sent it.
    pub pos: Option<String>,
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
    /// The `pos` to continue from (set by [`crate::sync::SyncService`]).
    pub pos: String,
    /// The global stream position the answer is complete up to.
    pub stream_position: i64,
    /// List name → number of rooms matching it.
    pub lists: BTreeMap<String, usize>,
    pub rooms: BTreeMap<String, SlidingRoom>,
}

impl SlidingResponse {
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// What a connection has sent of one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRoom {
    /// The user's membership when the room was last sent: `join`, or `invite`/`knock` (only
    /// stripped state was sent).
    pub membership: String,
    /// `None`: the client is up to date with the room as of the connection's position.
    /// `Some(p)`: the client has the room up to stream position `p` only.
    pub sent_upto: Option<i64>,
    /// The `required_state` patterns the client keeps up to date (sorted, no duplicates).
    pub required_state: Arc<StatePatterns>,
}

/// Room id → what the connection has sent of it.
pub type SentRooms = HashMap<String, SentRoom>;

/// One pass of a sliding sync.
#[derive(Debug, Clone, Default)]
pub struct SlidingPass {
    pub response: SlidingResponse,
    /// What the connection has sent after this answer; `None` when that is unchanged.
    pub sent: Option<SentRooms>,
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

fn matches_any(patterns: &[(String, String)], key: &(String, String), user: &str) -> bool {
    patterns.iter().any(|p| matches_pattern(p, key, user))
}

/// Patterns sorted and without duplicates, so equal configurations compare equal.
pub fn normalized(patterns: &[(String, String)]) -> StatePatterns {
    let mut out = patterns.to_vec();
    out.sort();
    out.dedup();
    out
}

/// One of the user's rooms, as the lists see it.
struct Candidate<'a> {
    membership: &'a MembershipRecord,
    /// The sort key: the latest event's position for joined rooms, the membership's otherwise.
    bump: i64,
}

/// The per-room facts the lists' filters need, read once per pass and only when a list uses
/// them.
#[derive(Default)]
struct FilterFacts {
    direct: HashSet<String>,
    encrypted: HashSet<String>,
    types: HashMap<String, Option<String>>,
    tags: HashMap<String, HashSet<String>>,
    space_children: HashSet<String>,
}

impl FilterFacts {
    fn admits(&self, filters: &ListFilters, room_id: &str, membership: &str) -> bool {
        if let Some(is_invite) = filters.is_invite
            && (membership == "invite") != is_invite
        {
            return false;
        }
        if let Some(is_dm) = filters.is_dm
            && self.direct.contains(room_id) != is_dm
        {
            return false;
        }
        if let Some(is_encrypted) = filters.is_encrypted
            && self.encrypted.contains(room_id) != is_encrypted
        {
            return false;
        }
        if filters.needs_types() {
            let room_type = self.types.get(room_id).cloned().flatten();
            if filters.not_room_types.contains(&room_type) {
                return false;
            }
            if !filters.room_types.is_empty() && !filters.room_types.contains(&room_type) {
                return false;
            }
        }
        if filters.needs_tags() {
            let tags = self.tags.get(room_id);
            let has = |tag: &String| tags.is_some_and(|t| t.contains(tag));
            if filters.not_tags.iter().any(has) {
                return false;
            }
            if !filters.tags.is_empty() && !filters.tags.iter().any(has) {
                return false;
            }
        }
        if !filters.spaces.is_empty() && !self.space_children.contains(room_id) {
            return false;
        }
        true
    }
}

/// The content of a stored PDU.
fn pdu_content(pdu_json: &str) -> Option<Value> {
    serde_json::from_str::<Value>(pdu_json)
        .ok()
        .and_then(|mut v| v.get_mut("content").map(Value::take))
}

impl RoomService {
    /// One pass of a sliding sync for `user` (no waiting): the connection continues from the
    /// stream position `since` (`None`: a new connection), having sent `sent`.
    pub async fn sliding_sync(
        &self,
        user: &str,
        request: &SlidingRequest,
        since: Option<i64>,
        sent: &SentRooms,
    ) -> Result<SlidingPass> {
        // The position first: what is read after it is cut at it, so nothing committed up to
        // it is missed, and the next pass starts there.
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
        let joined: Vec<String> = memberships
            .iter()
            .filter(|m| m.membership == "join")
            .map(|m| m.room_id.clone())
            .collect();
        let latest: HashMap<String, i64> = self
            .storage
            .rooms
            .latest_positions(&joined)
            .await
            .map_err(internal)?
            .into_iter()
            .collect();
        let mut candidates: Vec<Candidate> = memberships
            .iter()
            .filter(|m| {
                // Rooms left (or banned from) only when this connection has sent them: the
                // client learns that it left.
                !m.forgotten
                    && m.stream_ordering <= upto
                    && match m.membership.as_str() {
                        "join" | "invite" | "knock" => true,
                        "leave" | "ban" => sent.contains_key(&m.room_id),
                        _ => false,
                    }
            })
            .map(|m| Candidate {
                membership: m,
                bump: if m.membership == "join" {
                    latest
                        .get(&m.room_id)
                        .copied()
                        .unwrap_or(m.stream_ordering)
                        .min(upto)
                } else {
                    m.stream_ordering
                },
            })
            .collect();
        // Most recent first; ties broken by room id so windows are stable.
        candidates.sort_by(|a, b| {
            b.bump
                .cmp(&a.bump)
                .then(a.membership.room_id.cmp(&b.membership.room_id))
        });
        let facts = self.filter_facts(user, request, &candidates).await?;

        let mut response = SlidingResponse {
            stream_position: upto,
            ..SlidingResponse::default()
        };
        // Which rooms to send, with the details asked for (the widest wins when several ask).
        let mut wanted: BTreeMap<String, RoomDetails> = BTreeMap::new();
        let mut merge = |room_id: &str, details: &RoomDetails| {
            let entry = wanted.entry(room_id.to_owned()).or_default();
            entry.timeline_limit = entry.timeline_limit.max(details.timeline_limit);
            entry
                .required_state
                .extend(details.required_state.iter().cloned());
        };
        for (name, list) in &request.lists {
            let members: Vec<&Candidate> = candidates
                .iter()
                .filter(|c| {
                    facts.admits(
                        &list.filters,
                        &c.membership.room_id,
                        &c.membership.membership,
                    )
                })
                .collect();
            response.lists.insert(name.clone(), members.len());
            for &(start, end) in &list.ranges {
                for candidate in members
                    .iter()
                    .skip(start)
                    .take(end.saturating_sub(start) + 1)
                {
                    merge(&candidate.membership.room_id, &list.details);
                }
            }
        }
        let member_of: HashMap<&str, &Candidate> = candidates
            .iter()
            .map(|c| (c.membership.room_id.as_str(), c))
            .collect();
        for (room_id, details) in &request.room_subscriptions {
            // Subscriptions to rooms the user is not in are ignored, as the MSC says.
            if member_of.contains_key(room_id.as_str()) {
                merge(room_id, details);
            }
        }

        let mut next = sent.clone();
        let mut changed_sent = false;
        for (room_id, details) in wanted {
            let Some(candidate) = member_of.get(room_id.as_str()) else {
                continue;
            };
            let membership = candidate.membership.membership.as_str();
            let required_state = Arc::new(normalized(&details.required_state));
            let previous = sent.get(&room_id);
            // What the client has of the room: nothing (a new room, or one it saw with another
            // membership: it gets the room afresh, except that a joined room it left continues
            // up to the leave), or the room up to a position.
            let known_upto = previous
                .filter(|p| {
                    p.membership == membership
                        || (p.membership == "join" && matches!(membership, "leave" | "ban"))
                })
                .and_then(|p| p.sent_upto.or(since));
            let room_changed = match known_upto {
                None => true,
                Some(known) => {
                    self.changed_after(candidate, known, upto, latest.get(&room_id))
                        .await?
                }
            };
            let expanded = previous.is_some_and(|p| {
                membership == "join"
                    && required_state
                        .iter()
                        .any(|pattern| !p.required_state.contains(pattern))
            });
            if !room_changed && !expanded {
                continue;
            }
            let details = RoomDetails {
                required_state: required_state.to_vec(),
                timeline_limit: if room_changed {
                    details.timeline_limit
                } else {
                    0
                },
            };
            let known_state = known_upto
                .and(previous)
                .map(|p| p.required_state.as_slice());
            let mut room = self
                .sliding_room(
                    user,
                    &room_id,
                    candidate.membership,
                    known_upto,
                    upto,
                    &details,
                    known_state,
                )
                .await?;
            let sent_upto = if !room_changed && room.room.required_state.is_empty() {
                // A wider `required_state` that matched nothing new: nothing to send, but the
                // client now keeps the wider one.
                previous.and_then(|p| p.sent_upto)
            } else {
                room.room.initial = known_upto.is_none();
                room.room.bump_stamp = candidate.bump;
                room.room.num_live = match since {
                    Some(since) => room.num_live_after(since),
                    None => 0,
                };
                response.rooms.insert(room_id.clone(), room.room);
                None
            };
            let now_sent = SentRoom {
                membership: membership.to_owned(),
                sent_upto,
                required_state,
            };
            if previous != Some(&now_sent) {
                next.insert(room_id, now_sent);
                changed_sent = true;
            }
        }
        // Rooms the client was up to date with that changed without being sent: from now on
        // the client has them up to the previous position only.
        if let Some(since) = since {
            for (room_id, previous) in sent {
                if previous.sent_upto.is_some() || response.rooms.contains_key(room_id) {
                    continue;
                }
                let changed = match member_of.get(room_id.as_str()) {
                    Some(candidate) => {
                        self.changed_after(candidate, since, upto, latest.get(room_id))
                            .await?
                    }
                    // Left or forgotten: its membership changed.
                    None => memberships
                        .iter()
                        .any(|m| &m.room_id == room_id && m.stream_ordering > since),
                };
                if changed && let Some(entry) = next.get_mut(room_id) {
                    entry.sent_upto = Some(since);
                    changed_sent = true;
                }
            }
        }
        Ok(SlidingPass {
            response,
            sent: changed_sent.then_some(next),
        })
    }

    /// Whether a room changed for the user in `(after, upto]`: an event of a joined room, the
    /// membership of another.
    async fn changed_after(
        &self,
        candidate: &Candidate<'_>,
        after: i64,
        upto: i64,
        latest: Option<&i64>,
    ) -> Result<bool> {
        let m = candidate.membership;
        if m.membership != "join" {
            return Ok(m.stream_ordering > after);
        }
        match latest {
            None => Ok(m.stream_ordering > after),
            Some(&latest) if latest <= after => Ok(false),
            Some(&latest) if latest <= upto => Ok(true),
            // The latest event came after `upto`: is there one in `(after, upto]`?
            Some(_) => Ok(!self
                .storage
                .rooms
                .room_events(
                    &m.room_id,
                    after,
                    Some(upto.saturating_add(1)),
                    Direction::Forward,
                    1,
                )
                .await
                .map_err(internal)?
                .is_empty()),
        }
    }

    /// What the lists' filters need to know of the candidate rooms.
    async fn filter_facts(
        &self,
        user: &str,
        request: &SlidingRequest,
        candidates: &[Candidate<'_>],
    ) -> Result<FilterFacts> {
        let filters: Vec<&ListFilters> = request.lists.values().map(|l| &l.filters).collect();
        let ids: Vec<String> = candidates
            .iter()
            .map(|c| c.membership.room_id.clone())
            .collect();
        let mut facts = FilterFacts::default();
        if filters.iter().any(|f| f.is_dm.is_some()) {
            let direct = self
                .storage
                .account_data
                .get_account_data(user, None, "m.direct")
                .await
                .map_err(internal)?;
            if let Some(Value::Object(by_user)) =
                direct.and_then(|d| serde_json::from_str::<Value>(&d.content).ok())
            {
                facts.direct = by_user
                    .values()
                    .filter_map(Value::as_array)
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
            }
        }
        if filters.iter().any(|f| f.is_encrypted.is_some()) {
            facts.encrypted = self
                .storage
                .sliding
                .current_state_ids(&ids, "m.room.encryption", "")
                .await
                .map_err(internal)?
                .into_iter()
                .map(|(room_id, _)| room_id)
                .collect();
        }
        if filters.iter().any(|f| f.needs_types()) {
            facts.types = self.room_types(&ids).await?;
        }
        if filters.iter().any(|f| f.needs_tags()) {
            let records = self
                .storage
                .sliding
                .room_account_data_of_type(user, "m.tag")
                .await
                .map_err(internal)?;
            for record in records {
                let Some(room_id) = record.room_id else {
                    continue;
                };
                let tags = serde_json::from_str::<Value>(&record.content)
                    .ok()
                    .and_then(|c| c.get("tags").and_then(Value::as_object).cloned())
                    .map(|tags| tags.keys().cloned().collect())
                    .unwrap_or_default();
                facts.tags.insert(room_id, tags);
            }
        }
        let spaces: HashSet<&String> = filters.iter().flat_map(|f| &f.spaces).collect();
        for space in spaces {
            let joined = candidates
                .iter()
                .any(|c| &c.membership.room_id == space && c.membership.membership == "join");
            if joined {
                facts
                    .space_children
                    .extend(self.space_children(space).await?);
            }
        }
        Ok(facts)
    }

    /// The `type` of each room's create event (`None`: no type). Create events never change,
    /// so the answers are remembered.
    async fn room_types(&self, room_ids: &[String]) -> Result<HashMap<String, Option<String>>> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let known = match self.room_types.lock() {
                Ok(known) => known,
                Err(poisoned) => poisoned.into_inner(),
            };
            for room_id in room_ids {
                match known.get(room_id) {
                    Some(room_type) => {
                        out.insert(room_id.clone(), room_type.clone());
                    }
                    None => missing.push(room_id.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let creates = self
            .storage
            .sliding
            .current_state_ids(&missing, "m.room.create", "")
            .await
            .map_err(internal)?;
        let event_ids: Vec<String> = creates.iter().map(|(_, id)| id.clone()).collect();
        let events = self
            .storage
            .rooms
            .get_events(&event_ids)
            .await
            .map_err(internal)?;
        let mut found = Vec::new();
        for event in events {
            let room_type = pdu_content(&event.pdu_json)
                .and_then(|c| c.get("type").and_then(Value::as_str).map(str::to_owned));
            found.push((event.room_id, room_type));
        }
        let mut known = match self.room_types.lock() {
            Ok(known) => known,
            Err(poisoned) => poisoned.into_inner(),
        };
        if known.len() + found.len() > ROOM_TYPES_REMEMBERED {
            known.clear();
        }
        for (room_id, room_type) in found {
            known.insert(room_id.clone(), room_type.clone());
            out.insert(room_id, room_type);
        }
        Ok(out)
    }

    /// The rooms a space lists as `m.space.child` (with a non-empty `via`).
    async fn space_children(&self, space: &str) -> Result<Vec<String>> {
        let state = self
            .storage
            .rooms
            .current_state(space)
            .await
            .map_err(internal)?;
        let ids: Vec<String> = state
            .iter()
            .filter(|((kind, _), _)| kind == "m.space.child")
            .map(|(_, id)| id.clone())
            .collect();
        let events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?;
        Ok(events
            .into_iter()
            .filter(|e| {
                pdu_content(&e.pdu_json)
                    .and_then(|c| {
                        c.get("via")
                            .and_then(Value::as_array)
                            .map(|v| !v.is_empty())
                    })
                    .unwrap_or(false)
            })
            .filter_map(|e| e.state_key)
            .collect())
    }

    /// A room of the answer. With `since` (the client has the room up to there), the timeline
    /// after it and the state that changed since; the state matching `required_state` but not
    /// `known_state` (what the client keeps) is sent whole. A room the user left or was banned
    /// from ends at that membership change; one they were only invited to or knocked on (or
    /// that is new to the client) has stripped state only.
    #[allow(clippy::too_many_arguments)]
    async fn sliding_room(
        &self,
        user: &str,
        room_id: &str,
        membership: &MembershipRecord,
        since: Option<i64>,
        upto: i64,
        details: &RoomDetails,
        known_state: Option<&[(String, String)]>,
    ) -> Result<BuiltRoom> {
        let summary = self.summary(user, room_id).await?;
        let left = matches!(membership.membership.as_str(), "leave" | "ban");
        let stripped = match membership.membership.as_str() {
            "join" => false,
            "leave" | "ban" => since.is_none(),
            _ => true,
        };
        // What the user sees: the room now, or as they left it.
        let (current, upto) = if left && !stripped {
            let at = membership.stream_ordering.min(upto);
            (self.state_at_position(room_id, at).await?, at)
        } else {
            let current = self
                .storage
                .rooms
                .current_state(room_id)
                .await
                .map_err(internal)?;
            (current, upto)
        };
        let name = self.state_text(&current, "m.room.name", "name").await?;
        let avatar = self.state_text(&current, "m.room.avatar", "url").await?;
        let mut built = BuiltRoom {
            room: SlidingRoom {
                name,
                avatar,
                joined_count: summary.joined_member_count,
                invited_count: summary.invited_member_count,
                heroes: summary.heroes,
                ..SlidingRoom::default()
            },
            positions: Vec::new(),
        };
        if stripped {
            built.room.invite_state = Some(self.stripped_state(room_id, membership).await?);
            return Ok(built);
        }
        if details.timeline_limit > 0 {
            let (records, limited) = self
                .timeline_window(room_id, since, upto, details.timeline_limit)
                .await?;
            let rules = self.room_rules(room_id).await?;
            let mut vis = Visibility {
                user,
                joined_now: !left,
                by_group: HashMap::new(),
            };
            for record in &records {
                if self.can_see(&mut vis, record).await? {
                    built
                        .room
                        .timeline
                        .push(Self::to_client(rules.as_ref(), record));
                    built.positions.push(record.stream_ordering.unwrap_or(0));
                }
            }
            built.room.limited = limited;
            let start = records
                .first()
                .and_then(|e| e.stream_ordering)
                .map(|p| p - 1)
                .unwrap_or(upto);
            built.room.prev_batch = Some(super::read::token(start));
        }
        // Requested state: what changed since the client got the room, and all of what matches
        // patterns it did not keep before.
        let before: StateMap = match since {
            Some(pos) => self.state_at_position(room_id, pos).await?,
            None => StateMap::new(),
        };
        let ids: Vec<String> = current
            .iter()
            .filter(|(key, id)| {
                matches_any(&details.required_state, key, user)
                    && (before.get(*key) != Some(*id)
                        || !known_state.is_some_and(|known| matches_any(known, key, user)))
            })
            .map(|(_, id)| id.clone())
            .collect();
        built.room.required_state = self.state_events(room_id, ids).await?;
        Ok(built)
    }

    /// A string field of a current state event's content (`m.room.name` → `name`...).
    pub(super) async fn state_text(
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

/// Room types remembered before the memo starts over.
const ROOM_TYPES_REMEMBERED: usize = 100_000;

/// A room of an answer, with the stream positions of its timeline events.
struct BuiltRoom {
    room: SlidingRoom,
    positions: Vec<i64>,
}

impl BuiltRoom {
    /// How many timeline events came after `since` (the previous answer): the live ones.
    fn num_live_after(&self, since: i64) -> i64 {
        self.positions.iter().filter(|p| **p > since).count() as i64
    }
}

/// An unknown or expired `pos`: the client starts a new connection.
pub fn unknown_pos() -> Error {
    Error::new(
        ErrorCode::UnknownPos,
        "Unknown position: start a new connection",
    )
}

#[cfg(test)]
mod tests {
    use super::{ListFilters, matches_pattern, normalized};

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
        assert_eq!(
            normalized(&[key("b", ""), key("a", ""), key("b", "")]),
            vec![key("a", ""), key("b", "")]
        );
    }

    #[test]
    fn filters_combine_with_and() {
        let mut facts = super::FilterFacts::default();
        facts.direct.insert("!dm".to_owned());
        facts.encrypted.insert("!dm".to_owned());
        facts
            .types
            .insert("!space".to_owned(), Some("m.space".to_owned()));
        facts.tags.insert(
            "!dm".to_owned(),
            ["m.favourite".to_owned()].into_iter().collect(),
        );
        let admits = |filters: &ListFilters, room: &str, membership: &str| {
            facts.admits(filters, room, membership)
        };
        let none = ListFilters::default();
        assert!(admits(&none, "!any", "join"));
        let dm_only = ListFilters {
            is_dm: Some(true),
            ..ListFilters::default()
        };
        assert!(admits(&dm_only, "!dm", "join"));
        assert!(!admits(&dm_only, "!room", "join"));
        let no_spaces = ListFilters {
            not_room_types: vec![Some("m.space".to_owned())],
            ..ListFilters::default()
        };
        assert!(!admits(&no_spaces, "!space", "join"));
        assert!(admits(&no_spaces, "!room", "join"));
        let untyped = ListFilters {
            room_types: vec![None],
            ..ListFilters::default()
        };
        assert!(admits(&untyped, "!room", "join"));
        assert!(!admits(&untyped, "!space", "join"));
        let encrypted_invites = ListFilters {
            is_encrypted: Some(true),
            is_invite: Some(true),
            ..ListFilters::default()
        };
        assert!(admits(&encrypted_invites, "!dm", "invite"));
        assert!(!admits(&encrypted_invites, "!dm", "join"));
        assert!(!admits(&encrypted_invites, "!room", "invite"));
        let favourites_not_low = ListFilters {
            tags: vec!["m.favourite".to_owned()],
            not_tags: vec!["m.lowpriority".to_owned()],
            ..ListFilters::default()
        };
        assert!(admits(&favourites_not_low, "!dm", "join"));
        assert!(!admits(&favourites_not_low, "!room", "join"));
    }
}
