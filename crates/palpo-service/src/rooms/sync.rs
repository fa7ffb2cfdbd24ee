//! The rooms part of `/sync`: which rooms changed since a token, and for each its timeline
//! (limited, with `prev_batch`), the state before it, and a summary. Incremental syncs read
//! the event stream over `(since, now]` only, so they cost what changed, not the history or
//! the number of quiet rooms. `SyncService` long-polls around it.

use std::collections::{BTreeMap, HashMap, HashSet};

use palpo_core::Result;
use palpo_storage::model::{Direction, EventRecord, MembershipRecord, StateMap};
use serde_json::{Value, json};

use super::{
    RoomService, internal,
    read::{TimelineFilter, Visibility, token},
};

/// State types shown to invitees and knockers ("stripped state").
const STRIPPED_STATE: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub full_state: bool,
    pub timeline_limit: usize,
    pub include_leave: bool,
    /// `room.timeline` of the filter: which timeline events are sent (the limit counts events
    /// before this filter).
    pub timeline_filter: TimelineFilter,
    /// `room.rooms` / `room.not_rooms` of the filter.
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
}

impl SyncRequest {
    fn wants_room(&self, room_id: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|r| r.iter().any(|id| id == room_id))
            && !self.not_rooms.iter().any(|id| id == room_id)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub events: Vec<Value>,
    pub limited: bool,
    pub prev_batch: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct RoomSummary {
    pub heroes: Vec<String>,
    pub joined_member_count: i64,
    pub invited_member_count: i64,
}

#[derive(Debug, Clone, Default)]
pub struct JoinedRoom {
    pub timeline: Timeline,
    pub state: Vec<Value>,
    pub summary: RoomSummary,
}

#[derive(Debug, Clone, Default)]
pub struct InvitedRoom {
    pub invite_state: Vec<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct LeftRoom {
    pub timeline: Timeline,
    pub state: Vec<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct SyncRooms {
    pub join: BTreeMap<String, JoinedRoom>,
    pub invite: BTreeMap<String, InvitedRoom>,
    pub leave: BTreeMap<String, LeftRoom>,
    pub knock: BTreeMap<String, InvitedRoom>,
    /// The stream position this answer is complete up to (`next_batch`).
    pub position: i64,
}

impl SyncRooms {
    pub fn is_empty(&self) -> bool {
        self.join.is_empty()
            && self.invite.is_empty()
            && self.leave.is_empty()
            && self.knock.is_empty()
    }
}

impl RoomService {
    /// The rooms part of a sync: what changed in `(since, now]` (everything when `since` is
    /// `None`). Does not wait; `SyncService` long-polls around it.
    pub async fn sync_rooms(
        &self,
        user: &str,
        since: Option<i64>,
        request: &SyncRequest,
    ) -> Result<SyncRooms> {
        let upto = self
            .storage
            .rooms
            .max_stream_ordering()
            .await
            .map_err(internal)?;
        self.sync_rooms_at(user, since, upto, request, &HashSet::new())
            .await
    }

    /// As [`RoomService::sync_rooms`], up to stream position `upto` (read by the caller, so
    /// that the other sections of the sync cover the same range). The joined rooms in `also`
    /// are sent even when their timeline and state did not change (their ephemeral events
    /// did, for example).
    pub async fn sync_rooms_at(
        &self,
        user: &str,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
        also: &HashSet<String>,
    ) -> Result<SyncRooms> {
        let mut out = SyncRooms {
            position: upto,
            ..SyncRooms::default()
        };
        let memberships = self
            .storage
            .rooms
            .memberships_of_user(user)
            .await
            .map_err(internal)?;
        // Rooms whose timeline moved since the token (all of them on an initial sync).
        let changed: Option<HashSet<String>> = match since {
            Some(since) if since < upto => Some(
                self.storage
                    .rooms
                    .rooms_changed_between(since, upto)
                    .await
                    .map_err(internal)?
                    .into_iter()
                    .collect(),
            ),
            Some(_) => Some(HashSet::new()),
            None => None,
        };
        for membership in memberships {
            // Changes after `upto` belong to the next sync.
            if membership.stream_ordering > upto
                || membership.forgotten
                || !request.wants_room(&membership.room_id)
            {
                continue;
            }
            let newly = since.is_none_or(|since| membership.stream_ordering > since);
            let room_id = membership.room_id.clone();
            match membership.membership.as_str() {
                "join" => {
                    let moved = changed.as_ref().is_none_or(|c| c.contains(&room_id))
                        || also.contains(&room_id);
                    if !(moved || newly || request.full_state) {
                        continue;
                    }
                    // A room joined since the token is new to the client: send it whole. (A
                    // newer join event of a member, e.g. a profile change, is not a new join.)
                    let newly_joined = match since {
                        Some(since) if newly => !self.was_joined_at(user, &room_id, since).await?,
                        _ => newly,
                    };
                    let room_since = if newly_joined { None } else { since };
                    let room = self
                        .joined_room(user, &room_id, room_since, upto, request)
                        .await?;
                    if room_since.is_none()
                        || !room.timeline.events.is_empty()
                        || !room.state.is_empty()
                        || also.contains(&room_id)
                    {
                        out.join.insert(room_id, room);
                    }
                }
                "invite" if newly || request.full_state => {
                    let invite_state = self.stripped_state(&room_id, &membership).await?;
                    out.invite.insert(room_id, InvitedRoom { invite_state });
                }
                "knock" if newly || request.full_state => {
                    let knock_state = self.stripped_state(&room_id, &membership).await?;
                    out.knock.insert(
                        room_id,
                        InvitedRoom {
                            invite_state: knock_state,
                        },
                    );
                }
                "leave" | "ban"
                    if (newly && since.is_some()) || (since.is_none() && request.include_leave) =>
                {
                    let room = self.left_room(user, &membership, since, request).await?;
                    out.leave.insert(room_id, room);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Which of `events` (of one room, in the timeline) `user`, joined to it now, may see under
    /// the room's history visibility.
    pub async fn visible_to_member(
        &self,
        user: &str,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>> {
        let mut vis = Visibility {
            user,
            joined_now: true,
            by_group: HashMap::new(),
        };
        let mut visible = Vec::with_capacity(events.len());
        for event in events {
            if self.can_see(&mut vis, &event).await? {
                visible.push(event);
            }
        }
        Ok(visible)
    }

    /// Timeline events of `room_id` in `(after, upto]`, newest `limit`, in stream order,
    /// with whether older ones were left out.
    pub(super) async fn timeline_window(
        &self,
        room_id: &str,
        after: Option<i64>,
        upto: i64,
        limit: usize,
    ) -> Result<(Vec<EventRecord>, bool)> {
        let mut events = self
            .storage
            .rooms
            .room_events(
                room_id,
                upto.saturating_add(1),
                after,
                Direction::Backward,
                limit as i64 + 1,
            )
            .await
            .map_err(internal)?;
        let limited = events.len() > limit;
        events.truncate(limit);
        events.reverse();
        Ok((events, limited))
    }

    /// The state of a room as of stream position `position` (after the last event at or
    /// before it).
    pub(super) async fn state_at_position(&self, room_id: &str, position: i64) -> Result<StateMap> {
        let last = self
            .storage
            .rooms
            .room_events(
                room_id,
                position.saturating_add(1),
                None,
                Direction::Backward,
                1,
            )
            .await
            .map_err(internal)?;
        match last.first().and_then(|e| e.state_group) {
            Some(group) => self
                .storage
                .rooms
                .state_at_group(group)
                .await
                .map_err(internal),
            None => Ok(StateMap::new()),
        }
    }

    pub(super) async fn state_events(&self, room_id: &str, ids: Vec<String>) -> Result<Vec<Value>> {
        let rules = self.room_rules(room_id).await?;
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

    /// Timeline and the state before it: whole for a new room (or `full_state`), else the
    /// entries that changed between the token and the start of the timeline (only when the
    /// timeline is limited; otherwise the timeline itself shows every change).
    async fn timeline_and_state(
        &self,
        user: &str,
        room_id: &str,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
        joined_now: bool,
    ) -> Result<(Timeline, Vec<Value>)> {
        let (records, limited) = self
            .timeline_window(room_id, since, upto, request.timeline_limit)
            .await?;
        let start = records
            .first()
            .and_then(|e| e.stream_ordering)
            .map(|p| p - 1)
            .unwrap_or(upto);
        let rules = self.room_rules(room_id).await?;
        let mut vis = Visibility {
            user,
            joined_now,
            by_group: HashMap::new(),
        };
        let mut events = Vec::with_capacity(records.len());
        for record in &records {
            if request.timeline_filter.matches(record) && self.can_see(&mut vis, record).await? {
                events.push(Self::to_client(rules.as_ref(), record));
            }
        }
        let state_ids: Vec<String> = match since {
            None => self
                .state_at_position(room_id, start)
                .await?
                .into_values()
                .collect(),
            Some(_) if request.full_state => self
                .state_at_position(room_id, start)
                .await?
                .into_values()
                .collect(),
            Some(since) if limited => {
                let before = self.state_at_position(room_id, since).await?;
                let now = self.state_at_position(room_id, start).await?;
                now.into_iter()
                    .filter(|(key, id)| before.get(key) != Some(id))
                    .map(|(_, id)| id)
                    .collect()
            }
            Some(_) => Vec::new(),
        };
        let state = self.state_events(room_id, state_ids).await?;
        let timeline = Timeline {
            events,
            limited,
            prev_batch: Some(token(start)),
        };
        Ok((timeline, state))
    }

    async fn joined_room(
        &self,
        user: &str,
        room_id: &str,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
    ) -> Result<JoinedRoom> {
        let (timeline, state) = self
            .timeline_and_state(user, room_id, since, upto, request, true)
            .await?;
        let summary = self.summary(user, room_id).await?;
        Ok(JoinedRoom {
            timeline,
            state,
            summary,
        })
    }

    /// A room the user left or was banned from: the timeline up to that moment.
    async fn left_room(
        &self,
        user: &str,
        membership: &MembershipRecord,
        since: Option<i64>,
        request: &SyncRequest,
    ) -> Result<LeftRoom> {
        let (timeline, state) = self
            .timeline_and_state(
                user,
                &membership.room_id,
                since,
                membership.stream_ordering,
                request,
                false,
            )
            .await?;
        Ok(LeftRoom { timeline, state })
    }

    async fn was_joined_at(&self, user: &str, room_id: &str, position: i64) -> Result<bool> {
        let state = self.state_at_position(room_id, position).await?;
        let membership = self.state_content(&state, "m.room.member", user).await?;
        Ok(membership
            .and_then(|c| {
                c.get("membership")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .is_some_and(|m| m == "join"))
    }

    pub(super) async fn summary(&self, user: &str, room_id: &str) -> Result<RoomSummary> {
        let members = self
            .storage
            .rooms
            .room_members(room_id, None)
            .await
            .map_err(internal)?;
        let joined = members.iter().filter(|m| m.membership == "join").count() as i64;
        let invited = members.iter().filter(|m| m.membership == "invite").count() as i64;
        let heroes = members
            .iter()
            .filter(|m| m.user_id != user && matches!(m.membership.as_str(), "join" | "invite"))
            .take(5)
            .map(|m| m.user_id.clone())
            .collect();
        Ok(RoomSummary {
            heroes,
            joined_member_count: joined,
            invited_member_count: invited,
        })
    }

    /// What an invitee or knocker may see of a room: a few state events, stripped to
    /// `type`, `state_key`, `content` and `sender`, plus their own membership event.
    pub(super) async fn stripped_state(
        &self,
        room_id: &str,
        membership: &MembershipRecord,
    ) -> Result<Vec<Value>> {
        let state = self
            .storage
            .rooms
            .current_state(room_id)
            .await
            .map_err(internal)?;
        let mut ids: Vec<String> = STRIPPED_STATE
            .iter()
            .filter_map(|kind| state.get(&((*kind).to_owned(), String::new())).cloned())
            .collect();
        ids.push(membership.event_id.clone());
        let events = self
            .storage
            .rooms
            .get_events(&ids)
            .await
            .map_err(internal)?;
        Ok(events
            .iter()
            .filter_map(|e| {
                let pdu: Value = serde_json::from_str(&e.pdu_json).ok()?;
                Some(json!({
                    "type": e.event_type,
                    "state_key": e.state_key,
                    "sender": e.sender,
                    "content": pdu.get("content").cloned().unwrap_or_else(|| json!({})),
                }))
            })
            .collect())
    }
}
