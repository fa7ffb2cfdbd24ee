//! The rooms part of `/sync`: which rooms changed since a token, and for each its timeline
//! (limited, with `prev_batch`), the state before it, and a summary. Incremental syncs read
//! the event stream over `(since, now]` only, so they cost what changed, not the history or
//! the number of quiet rooms. `SyncService` long-polls around it.
//!
//! The filter's `room.timeline` lists pick the timeline events, and its limit counts the
//! events picked. `room.state` filters the state, and with `lazy_load_members` the state
//! carries only the members the timeline needs (its senders), the heroes, and the user's own
//! membership when the room is new to the client; members this device and filter already
//! have are not repeated ([`LazyMembers`]), except those whose membership changed in a gap.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use futures::StreamExt;
use palpo_core::{Error, Result};
use palpo_storage::model::{Direction, EventRecord, MembershipRecord, StateMap};
use ruma::room_version_rules::RedactionRules;
use serde_json::{Value, json};

use super::{
    RoomService, internal,
    lazy::LazyMembers,
    pdu::{EventJson, client_event_json, federation_event, to_event_json},
    prefetch::{Prefetched, RecentEvents},
    read::{TimelineFilter, Visibility, token},
};
use crate::filter::{DEFAULT_TIMELINE_LIMIT, EventFormat, SyncFilter};

/// Most events a sync reads of one room to fill a filtered timeline. Past this the timeline
/// is `limited` and the client paginates for more.
const MAX_SCAN: usize = 1000;

/// The state event type of members.
const MEMBER: &str = "m.room.member";

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
    /// How many timeline events (that pass `timeline_filter`) a room sends at most.
    pub timeline_limit: usize,
    pub include_leave: bool,
    /// `room.timeline` of the filter: which timeline events are sent.
    pub timeline_filter: TimelineFilter,
    /// `room.state` of the filter: which state events are sent.
    pub state_filter: TimelineFilter,
    /// `room.state.lazy_load_members`.
    pub lazy_load_members: bool,
    /// With lazy loading, what this device and filter were sent already (`None`: send the
    /// members every time, as `include_redundant_members` asks).
    pub lazy_members: Option<Arc<LazyMembers>>,
    pub event_format: EventFormat,
    /// `use_state_after`: the state is that at the end of the timeline (`state_after`), not
    /// at its start.
    pub use_state_after: bool,
    /// `room.rooms` / `room.not_rooms` of the filter.
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
}

impl Default for SyncRequest {
    fn default() -> Self {
        SyncRequest {
            full_state: false,
            timeline_limit: DEFAULT_TIMELINE_LIMIT,
            include_leave: false,
            timeline_filter: TimelineFilter::default(),
            state_filter: TimelineFilter::default(),
            lazy_load_members: false,
            lazy_members: None,
            event_format: EventFormat::Client,
            use_state_after: false,
            rooms: None,
            not_rooms: Vec::new(),
        }
    }
}

impl SyncRequest {
    /// The rooms part of a sync with `filter`. Redundant lazy-loaded members are sent until
    /// the caller sets [`SyncRequest::lazy_members`].
    pub fn from_filter(filter: &SyncFilter, full_state: bool) -> Self {
        let room = &filter.room;
        SyncRequest {
            full_state,
            timeline_limit: filter.timeline_limit(),
            include_leave: room.include_leave,
            timeline_filter: room.timeline.events.clone(),
            state_filter: room.state.events.clone(),
            lazy_load_members: room.state.lazy_load_members,
            lazy_members: None,
            event_format: filter.event_format,
            use_state_after: false,
            rooms: room.rooms.clone(),
            not_rooms: room.not_rooms.clone(),
        }
    }

    fn wants_room(&self, room_id: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|r| r.iter().any(|id| id == room_id))
            && !self.not_rooms.iter().any(|id| id == room_id)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// In the format the filter asked for, as JSON text.
    pub events: Vec<EventJson>,
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
    pub state: Vec<EventJson>,
    /// `None` when the members may not have changed since the token (the spec lets the
    /// summary's fields be left out when unchanged): it is read only for a room new to the
    /// client, a full state, or a window whose state may have changed.
    pub summary: Option<RoomSummary>,
    /// The stream position of the user's current membership event (where unread counts
    /// start without a read receipt).
    pub joined_at: i64,
}

#[derive(Debug, Clone, Default)]
pub struct InvitedRoom {
    pub invite_state: Vec<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct LeftRoom {
    pub timeline: Timeline,
    pub state: Vec<EventJson>,
}

/// Rooms whose sync sections are built at the same time (bounded by the pool's connections).
const ROOMS_AT_ONCE: usize = 8;

/// One room's section of a sync answer, with the member events it sent (lazy loading).
enum SyncSection {
    Join(String, JoinedRoom, Vec<(String, String)>),
    Invite(String, InvitedRoom),
    Knock(String, InvitedRoom),
    Leave(String, LeftRoom, Vec<(String, String)>),
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
        let upto = self.stream_position().await?;
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
        self.sync_rooms_of(user, None, None, since, upto, request, also)
            .await
    }

    /// Every membership of the user (what [`RoomService::sync_rooms_of`] starts from), for a
    /// caller that needs the user's rooms too and passes them on.
    pub async fn memberships_of_user(&self, user: &str) -> Result<Vec<MembershipRecord>> {
        self.storage
            .rooms
            .memberships_of_user(user)
            .await
            .map_err(internal)
    }

    /// The user's memberships, given `head`: the newest membership change anywhere, as read
    /// with the sync's position (`StreamHeads::memberships`). While it has not moved, the
    /// copy this process read last is still exact: every membership change takes a stream
    /// position and positions commit in order, so an unchanged head means no membership row
    /// changed since. (Forgetting a room takes no position: this process drops its copy when
    /// it forgets one; another process's forget shows here once any membership changes, and
    /// only matters to a sync whose token lies before the leave.)
    pub async fn memberships_at_head(
        &self,
        user: &str,
        head: Option<i64>,
    ) -> Result<Vec<MembershipRecord>> {
        let kept = self
            .user_memberships
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .filter(|(kept_head, _)| *kept_head == head)
            .map(|(_, memberships)| memberships.clone());
        if let Some(memberships) = kept {
            return Ok(memberships);
        }
        let memberships = self.memberships_of_user(user).await?;
        self.user_memberships
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(user.to_owned(), (head, memberships.clone()));
        Ok(memberships)
    }

    /// As [`RoomService::sync_rooms_at`], from the user's memberships when the caller read
    /// them already ([`RoomService::memberships_of_user`]; `None`: read here) and the
    /// timeline events of their joined rooms since `since` when read
    /// ([`RoomService::recent_events`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn sync_rooms_of(
        &self,
        user: &str,
        memberships: Option<Vec<MembershipRecord>>,
        recent: Option<&RecentEvents>,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
        also: &HashSet<String>,
    ) -> Result<SyncRooms> {
        let mut out = SyncRooms {
            position: upto,
            ..SyncRooms::default()
        };
        // The user's rooms, and those whose timeline moved since the token (all of them on an
        // initial sync), read at once.
        let changed = async {
            Ok::<_, Error>(match since {
                Some(since) if since < upto => Some(match recent {
                    Some(recent) => recent.moved(),
                    None => self
                        .storage
                        .rooms
                        .rooms_changed_between(since, upto)
                        .await
                        .map_err(internal)?
                        .into_iter()
                        .collect::<HashSet<String>>(),
                }),
                Some(_) => Some(HashSet::new()),
                None => None,
            })
        };
        let memberships = async {
            match memberships {
                Some(memberships) => Ok(memberships),
                None => self.memberships_of_user(user).await,
            }
        };
        let (memberships, changed) = futures::try_join!(memberships, changed)?;
        // Without a token every joined room is sent whole: read what they need at once.
        let prefetched = match (since, recent) {
            (None, _) => {
                let joined: Vec<String> = memberships
                    .iter()
                    .filter(|m| {
                        m.membership == "join"
                            && m.stream_ordering <= upto
                            && !m.forgotten
                            && request.wants_room(&m.room_id)
                    })
                    .map(|m| m.room_id.clone())
                    .collect();
                self.prefetch(user, &joined, upto, request).await?
            }
            // One more than the limit, as a window's first read asks for.
            (Some(_), Some(recent)) => Prefetched::from_recent(recent, request.timeline_limit + 1),
            (Some(_), None) => Prefetched::default(),
        };
        // Rooms are independent: read several at once, so that an initial sync over many rooms
        // costs the database's latency a few times, not once per query per room.
        let sections: Vec<Result<Option<SyncSection>>> =
            futures::stream::iter(memberships.into_iter().map(|membership| {
                self.sync_room(
                    user,
                    membership,
                    since,
                    upto,
                    request,
                    also,
                    changed.as_ref(),
                    &prefetched,
                )
            }))
            .buffered(ROOMS_AT_ONCE)
            .collect()
            .await;
        for section in sections {
            match section? {
                Some(SyncSection::Join(room_id, room, members_sent)) => {
                    if let Some(lazy) = &request.lazy_members {
                        lazy.record(&room_id, &members_sent, upto);
                    }
                    out.join.insert(room_id, room);
                }
                Some(SyncSection::Invite(room_id, room)) => {
                    out.invite.insert(room_id, room);
                }
                Some(SyncSection::Knock(room_id, room)) => {
                    out.knock.insert(room_id, room);
                }
                Some(SyncSection::Leave(room_id, room, members_sent)) => {
                    if let Some(lazy) = &request.lazy_members {
                        lazy.record(&room_id, &members_sent, upto);
                    }
                    out.leave.insert(room_id, room);
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// One room's part of a sync answer, or `None` when the room has nothing to say.
    #[allow(clippy::too_many_arguments)]
    async fn sync_room(
        &self,
        user: &str,
        membership: MembershipRecord,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
        also: &HashSet<String>,
        changed: Option<&HashSet<String>>,
        prefetched: &Prefetched,
    ) -> Result<Option<SyncSection>> {
        // Changes after `upto` belong to the next sync.
        if membership.stream_ordering > upto
            || membership.forgotten
            || !request.wants_room(&membership.room_id)
        {
            return Ok(None);
        }
        let newly = since.is_none_or(|since| membership.stream_ordering > since);
        let room_id = membership.room_id.clone();
        Ok(match membership.membership.as_str() {
            "join" => {
                let moved = changed.is_none_or(|c| c.contains(&room_id)) || also.contains(&room_id);
                if !(moved || newly || request.full_state) {
                    return Ok(None);
                }
                // A room joined since the token is new to the client: send it whole. (A
                // newer join event of a member, e.g. a profile change, is not a new join.)
                let newly_joined = match since {
                    Some(since) if newly => !self.was_joined_at(user, &room_id, since).await?,
                    _ => newly,
                };
                let room_since = if newly_joined { None } else { since };
                let (room, members_sent) = self
                    .joined_room(user, &membership, room_since, upto, request, prefetched)
                    .await?;
                (room_since.is_none()
                    || !room.timeline.events.is_empty()
                    || !room.state.is_empty()
                    || also.contains(&room_id))
                .then_some(SyncSection::Join(room_id, room, members_sent))
            }
            "invite" if newly || request.full_state => {
                let invite_state = self.stripped_state(&room_id, &membership).await?;
                Some(SyncSection::Invite(room_id, InvitedRoom { invite_state }))
            }
            "knock" if newly || request.full_state => {
                let invite_state = self.stripped_state(&room_id, &membership).await?;
                Some(SyncSection::Knock(room_id, InvitedRoom { invite_state }))
            }
            "leave" | "ban"
                if (newly && since.is_some()) || (since.is_none() && request.include_leave) =>
            {
                let (room, members_sent) = self
                    .left_room(user, &membership, since, request, prefetched)
                    .await?;
                Some(SyncSection::Leave(room_id, room, members_sent))
            }
            _ => None,
        })
    }

    /// Whether `user`, joined to their rooms now, may see each of `events` (timeline events
    /// of any of those rooms) under the rooms' history visibility.
    pub async fn visible_to_member(
        &self,
        user: &str,
        events: &[&EventRecord],
    ) -> Result<Vec<bool>> {
        let groups: Vec<i64> = events.iter().filter_map(|e| e.state_group).collect();
        self.learn_group_visibility(&groups, user, &HashMap::new())
            .await?;
        let mut vis = Visibility {
            user,
            joined_now: true,
            by_group: HashMap::new(),
        };
        let mut visible = Vec::with_capacity(events.len());
        for event in events {
            visible.push(self.can_see(&mut vis, event).await?);
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

    /// The state at `point` of a timeline window (its start, or its end): from the events
    /// the window read when they tell, else read.
    async fn state_at_window_point(
        &self,
        room_id: &str,
        point: i64,
        window: &Window,
        prefetched: &Prefetched,
    ) -> Result<StateMap> {
        match window.group_at(point) {
            Some(None) => Ok(StateMap::new()),
            Some(Some(group)) => match prefetched.state(group) {
                Some(state) => Ok(state.clone()),
                None => self
                    .storage
                    .rooms
                    .state_at_group(group)
                    .await
                    .map_err(internal),
            },
            None => self.state_at_position(room_id, point).await,
        }
    }

    /// The events with these ids that exist, from those read already where they are.
    async fn events_by_id(
        &self,
        ids: &[String],
        prefetched: &Prefetched,
    ) -> Result<Vec<EventRecord>> {
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match prefetched.event(id) {
                Some(event) => found.push(event.clone()),
                None => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            found.extend(
                self.storage
                    .rooms
                    .get_events(&missing)
                    .await
                    .map_err(internal)?,
            );
        }
        Ok(found)
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

    /// The newest `limit` timeline events of `room_id` in `(since, upto]` that pass `filter`
    /// and that the user may see, oldest first. Events that do not pass do not count: older
    /// events are read, in growing batches, until `limit` passed or [`MAX_SCAN`] were read.
    #[allow(clippy::too_many_arguments)]
    async fn filtered_window(
        &self,
        room_id: &str,
        since: Option<i64>,
        upto: i64,
        limit: usize,
        filter: &TimelineFilter,
        vis: &mut Visibility<'_>,
        prefetched: &Prefetched,
    ) -> Result<Window> {
        // Newest first while reading.
        let mut picked: Vec<EventRecord> = Vec::new();
        // Positions of the state events read and not picked.
        let mut skipped_state: Vec<i64> = Vec::new();
        // Position and state group of every event read, newest first.
        let mut read: Vec<(i64, Option<i64>)> = Vec::new();
        let mut before = upto.saturating_add(1);
        let mut scanned = 0usize;
        let mut batch = limit + 1;
        let mut exhausted = false;
        // One more than `limit` tells whether older ones were left out.
        while !exhausted && scanned < MAX_SCAN && picked.len() <= limit {
            let want = batch.min(MAX_SCAN - scanned);
            let first_read = scanned == 0;
            let events = match prefetched
                .window(room_id, since, upto, want)
                .filter(|_| first_read)
            {
                Some(events) => events.to_vec(),
                None => self
                    .storage
                    .rooms
                    .room_events(room_id, before, since, Direction::Backward, want as i64)
                    .await
                    .map_err(internal)?,
            };
            exhausted = events.len() < want;
            // Only the groups of events the filter lets through are ever asked about.
            let groups: Vec<i64> = events
                .iter()
                .filter(|e| filter.matches(e))
                .filter_map(|e| e.state_group)
                .collect();
            self.learn_group_visibility(&groups, vis.user, &HashMap::new())
                .await?;
            for event in events {
                scanned += 1;
                let position = event.stream_ordering.unwrap_or_default();
                before = position;
                read.push((position, event.state_group));
                if picked.len() <= limit
                    && filter.matches(&event)
                    && self.can_see(vis, &event).await?
                {
                    picked.push(event);
                } else if event.state_key.is_some() {
                    skipped_state.push(position);
                }
            }
            batch = (batch * 2).clamp(50, 500);
        }
        let limited = picked.len() > limit || !exhausted;
        if picked.len() > limit {
            skipped_state.extend(
                picked
                    .drain(limit..)
                    .filter(|e| e.state_key.is_some())
                    .filter_map(|e| e.stream_ordering),
            );
        }
        picked.reverse();
        let first = picked.first().and_then(|e| e.stream_ordering);
        let start = first.map(|p| p - 1).unwrap_or(upto);
        // State events in the range the client does not get (skipped by the filter or history
        // visibility, left out by the limit, or not read at all).
        let unread_range = !exhausted;
        let hidden_state_before = unread_range
            || skipped_state
                .iter()
                .any(|p| first.is_none_or(|first| *p < first));
        let state_changed = unread_range
            || !skipped_state.is_empty()
            || picked.iter().any(|e| e.state_key.is_some());
        Ok(Window {
            events: picked,
            limited,
            start,
            hidden_state_before,
            state_changed,
            read,
            read_all: exhausted && since.is_none(),
        })
    }

    /// An event in the format the filter asks for.
    fn formatted(
        rules: Option<&RedactionRules>,
        event: &EventRecord,
        format: EventFormat,
    ) -> EventJson {
        match format {
            EventFormat::Client => client_event_json(
                &event.event_id,
                &event.room_id,
                &event.pdu_json,
                event.redacted_by.as_deref(),
                rules,
            ),
            EventFormat::Federation => to_event_json(&federation_event(
                &event.pdu_json,
                event.redacted_by.as_deref(),
                rules,
            )),
        }
    }

    /// Timeline and the state before it: whole for a new room (or `full_state`), else the
    /// entries that changed between the token and the start of the timeline (only when the
    /// client misses events in between; otherwise the timeline itself shows every change).
    /// Also returns the member events sent (state and timeline), for lazy loading.
    #[allow(clippy::too_many_arguments)]
    async fn timeline_and_state(
        &self,
        user: &str,
        room_id: &str,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
        joined_now: bool,
        members: Option<&[MembershipRecord]>,
        heroes: &[String],
        prefetched: &Prefetched,
    ) -> Result<RoomSection> {
        let mut vis = Visibility {
            user,
            joined_now,
            by_group: HashMap::new(),
        };
        let window = self
            .filtered_window(
                room_id,
                since,
                upto,
                request.timeline_limit,
                &request.timeline_filter,
                &mut vis,
                prefetched,
            )
            .await?;
        let start = window.start;
        let rules = self.room_rules(room_id).await?;
        // The state is sent as of the start of the timeline, or its end (`use_state_after`).
        let (point, changed) = if request.use_state_after {
            (upto, window.state_changed)
        } else {
            (start, window.hidden_state_before)
        };
        let mut at_point: Option<StateMap> = None;
        // The state entries to send before lazy loading. Member changes in a gap are always
        // sent, so that joins, leaves and profile changes the client skipped are not lost.
        let mut state_ids: Vec<String> = match since {
            Some(since) if !request.full_state => {
                if changed {
                    let before = self.state_at_position(room_id, since).await?;
                    let now = self
                        .state_at_window_point(room_id, point, &window, prefetched)
                        .await?;
                    let changed = now
                        .iter()
                        .filter(|(key, id)| before.get(*key) != Some(*id))
                        .map(|(_, id)| id.clone())
                        .collect();
                    at_point = Some(now);
                    changed
                } else {
                    Vec::new()
                }
            }
            _ => {
                let state = self
                    .state_at_window_point(room_id, point, &window, prefetched)
                    .await?;
                let ids = state
                    .iter()
                    .filter(|((kind, _), _)| !(request.lazy_load_members && kind == MEMBER))
                    .map(|(_, id)| id.clone())
                    .collect();
                at_point = Some(state);
                ids
            }
        };
        if request.lazy_load_members {
            let lazy = self
                .lazy_members(
                    user,
                    room_id,
                    since,
                    request,
                    &window.events,
                    heroes,
                    point,
                    at_point.as_ref(),
                    members,
                    &state_ids,
                )
                .await?;
            state_ids.extend(lazy);
        }
        let mut state_records = self.events_by_id(&state_ids, prefetched).await?;
        state_records.retain(|e| request.state_filter.matches(e));
        state_records.sort_by_key(|e| e.stream_ordering);
        let mut members_sent: Vec<(String, String)> = Vec::new();
        for record in state_records.iter().chain(&window.events) {
            if record.event_type == MEMBER
                && let Some(member) = &record.state_key
            {
                members_sent.push((member.clone(), record.event_id.clone()));
            }
        }
        let format = request.event_format;
        Ok(RoomSection {
            timeline: Timeline {
                events: window
                    .events
                    .iter()
                    .map(|e| Self::formatted(rules.as_ref(), e, format))
                    .collect(),
                limited: window.limited,
                prev_batch: Some(token(start)),
            },
            state: state_records
                .iter()
                .map(|e| Self::formatted(rules.as_ref(), e, format))
                .collect(),
            members_sent,
            state_changed: window.state_changed,
        })
    }

    /// Lazy loading: the member events (at `point`: the start of the timeline, or its end with
    /// `use_state_after`) the client needs and
    /// does not have among `already` — those of the timeline's senders and the heroes, and
    /// the user's own when the room is new to the client (or `full_state`). In an incremental
    /// sync, those this device and filter were sent already are left out.
    #[allow(clippy::too_many_arguments)]
    async fn lazy_members(
        &self,
        user: &str,
        room_id: &str,
        since: Option<i64>,
        request: &SyncRequest,
        timeline: &[EventRecord],
        heroes: &[String],
        point: i64,
        at_point: Option<&StateMap>,
        members: Option<&[MembershipRecord]>,
        already: &[String],
    ) -> Result<Vec<String>> {
        let incremental = since.filter(|_| !request.full_state);
        let mut wanted: Vec<&str> = Vec::new();
        for sender in timeline
            .iter()
            .map(|e| e.sender.as_str())
            .chain(heroes.iter().map(String::as_str))
        {
            if !wanted.contains(&sender) {
                wanted.push(sender);
            }
        }
        if incremental.is_none() && !wanted.contains(&user) {
            wanted.push(user);
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut fetched: Option<StateMap> = None;
        let mut out = Vec::new();
        for member in wanted {
            let key = (MEMBER.to_owned(), member.to_owned());
            // The current member event is the one at `point` when it is not newer;
            // otherwise the state at `point` says.
            let current = members.and_then(|m| m.iter().find(|r| r.user_id == member));
            let event_id = match (at_point, current) {
                (Some(state), _) => state.get(&key).cloned(),
                (None, Some(record)) if record.stream_ordering <= point => {
                    Some(record.event_id.clone())
                }
                (None, None) if members.is_some() => None,
                (None, _) => {
                    if fetched.is_none() {
                        fetched = Some(self.state_at_position(room_id, point).await?);
                    }
                    fetched.as_ref().and_then(|state| state.get(&key).cloned())
                }
            };
            let Some(event_id) = event_id else {
                continue;
            };
            if already.contains(&event_id) || out.contains(&event_id) {
                continue;
            }
            if let (Some(since), Some(lazy)) = (incremental, &request.lazy_members)
                && lazy.known(room_id, member, &event_id, since)
            {
                continue;
            }
            out.push(event_id);
        }
        Ok(out)
    }

    async fn joined_room(
        &self,
        user: &str,
        membership: &MembershipRecord,
        since: Option<i64>,
        upto: i64,
        request: &SyncRequest,
        prefetched: &Prefetched,
    ) -> Result<(JoinedRoom, Vec<(String, String)>)> {
        let room_id = membership.room_id.as_str();
        let members = async {
            match prefetched.members(room_id) {
                Some(members) => Ok(members.to_vec()),
                None => self
                    .storage
                    .rooms
                    .room_members(room_id, None)
                    .await
                    .map_err(internal),
            }
        };
        // Lazy loading picks members by the summary's heroes; otherwise the members are read
        // for the summary only, which an incremental sync leaves out unless the room's state
        // may have changed in its window (its members among it).
        let (summary, section) = if request.lazy_load_members {
            let members = members.await?;
            let summary = summary_of(user, &members);
            let section = self
                .timeline_and_state(
                    user,
                    room_id,
                    since,
                    upto,
                    request,
                    true,
                    Some(&members),
                    &summary.heroes,
                    prefetched,
                )
                .await?;
            (Some(summary), section)
        } else {
            let section = self.timeline_and_state(
                user,
                room_id,
                since,
                upto,
                request,
                true,
                None,
                &[],
                prefetched,
            );
            let section = section.await?;
            let summary = if since.is_none() || request.full_state || section.state_changed {
                Some(summary_of(user, &members.await?))
            } else {
                None
            };
            (summary, section)
        };
        Ok((
            JoinedRoom {
                timeline: section.timeline,
                state: section.state,
                summary,
                joined_at: membership.stream_ordering,
            },
            section.members_sent,
        ))
    }

    /// A room the user left or was banned from: the timeline up to that moment.
    async fn left_room(
        &self,
        user: &str,
        membership: &MembershipRecord,
        since: Option<i64>,
        request: &SyncRequest,
        prefetched: &Prefetched,
    ) -> Result<(LeftRoom, Vec<(String, String)>)> {
        let section = self
            .timeline_and_state(
                user,
                &membership.room_id,
                since,
                membership.stream_ordering,
                request,
                false,
                None,
                &[],
                prefetched,
            )
            .await?;
        Ok((
            LeftRoom {
                timeline: section.timeline,
                state: section.state,
            },
            section.members_sent,
        ))
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
        Ok(summary_of(user, &members))
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

/// A room's timeline and state in a sync, with the member events they carry.
struct RoomSection {
    timeline: Timeline,
    state: Vec<EventJson>,
    /// `(member, event id)` of the member events in the state and the timeline.
    members_sent: Vec<(String, String)>,
    /// Whether the state may have changed between the token and the end of the timeline.
    state_changed: bool,
}

/// The timeline events picked for a room.
struct Window {
    /// Oldest first.
    events: Vec<EventRecord>,
    limited: bool,
    /// The position just before the first event (`prev_batch`); `upto` when there is none.
    start: i64,
    /// Whether state may have changed between the token and `start` in events the client
    /// does not get.
    hidden_state_before: bool,
    /// Whether state may have changed anywhere between the token and the end.
    state_changed: bool,
    /// Position and state group of each event read (newest first): the newest event up to
    /// the end of the window, and every one before it back to the oldest read.
    read: Vec<(i64, Option<i64>)>,
    /// Whether every event of the room up to the end was read.
    read_all: bool,
}

impl Window {
    /// The state group after the room's last event at or before `position` (`Some(None)`:
    /// there is none, or it has no group), when the events read tell; `position` must not be
    /// past the end of the window.
    fn group_at(&self, position: i64) -> Option<Option<i64>> {
        match self.read.iter().find(|(p, _)| *p <= position) {
            Some((_, group)) => Some(*group),
            None => self.read_all.then_some(None),
        }
    }
}

/// A room's summary from its members: the counts, and as heroes the first five other joined
/// or invited members by when they became so (the left and banned ones when there are none).
fn summary_of(user: &str, members: &[MembershipRecord]) -> RoomSummary {
    let joined = members.iter().filter(|m| m.membership == "join").count() as i64;
    let invited = members.iter().filter(|m| m.membership == "invite").count() as i64;
    let mut others: Vec<&MembershipRecord> = members.iter().filter(|m| m.user_id != user).collect();
    others.sort_by(|a, b| {
        a.stream_ordering
            .cmp(&b.stream_ordering)
            .then_with(|| a.user_id.cmp(&b.user_id))
    });
    let present: Vec<&&MembershipRecord> = others
        .iter()
        .filter(|m| matches!(m.membership.as_str(), "join" | "invite"))
        .collect();
    let heroes = if present.is_empty() {
        others
            .iter()
            .filter(|m| matches!(m.membership.as_str(), "leave" | "ban"))
            .take(5)
            .map(|m| m.user_id.clone())
            .collect()
    } else {
        present.iter().take(5).map(|m| m.user_id.clone()).collect()
    };
    RoomSummary {
        heroes,
        joined_member_count: joined,
        invited_member_count: invited,
    }
}
