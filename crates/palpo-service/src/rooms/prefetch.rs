//! Batched reads for a sync over many rooms. An initial sync needs, for every room, the same
//! few things: its newest events, its members, its version, the state at the start of its
//! timeline, and what history visibility lets the user see. Read one room at a time that is
//! about ten statements per room; read here for all rooms at once it is a handful in all. The
//! per-room code of `sync.rs` consults [`Prefetched`] first and reads the database only for
//! what is not in it (a filter that skips events, a room with no events yet...), so the two
//! paths give the same answer.
//!
//! A sync woken by news reads the other way round: not every room's newest events, but every
//! event since its token of all its joined rooms ([`RecentEvents`]), one statement while the
//! token is recent. The rooms that moved, their timeline windows and the messages their
//! unread counts count all come from that one read.

use std::collections::{HashMap, HashSet};

use palpo_core::Result;
use palpo_storage::model::{EventRecord, MembershipRecord, StateMap};

use super::{RoomService, internal, sync::SyncRequest};

/// The state event type of members.
const MEMBER: &str = "m.room.member";

/// How far behind the stream (in positions) a sync's token may be for [`RecentEvents`]: the
/// read returns every event of the range, so this bounds it. Further behind, the rooms that
/// moved are found first and each one's window read on its own.
pub const RECENT_RANGE: i64 = 256;

/// The timeline events of a user's joined rooms in `(after, upto]`, read at once.
pub struct RecentEvents {
    after: i64,
    upto: i64,
    /// Every room asked for, with its events in stream order (none: nothing new) and the
    /// thread of each.
    rooms: HashMap<String, Vec<(EventRecord, Option<String>)>>,
}

impl RecentEvents {
    /// The rooms read.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.keys().map(String::as_str)
    }

    /// The rooms with timeline events in the range.
    pub fn moved(&self) -> HashSet<String> {
        self.rooms
            .iter()
            .filter(|(_, events)| !events.is_empty())
            .map(|(room_id, _)| room_id.clone())
            .collect()
    }

    /// The events of `room_id` in `(after, upto]` (stream order, with their threads), when
    /// this read holds that whole range of that room.
    pub fn covering(
        &self,
        room_id: &str,
        after: i64,
        upto: i64,
    ) -> Option<impl Iterator<Item = &(EventRecord, Option<String>)>> {
        if after < self.after || upto != self.upto {
            return None;
        }
        let events = self.rooms.get(room_id)?;
        Some(
            events
                .iter()
                .filter(move |(e, _)| e.stream_ordering.is_some_and(|p| p > after)),
        )
    }
}

/// What a sync pass read for several rooms at once.
#[derive(Default)]
pub(super) struct Prefetched {
    /// The token (`None`: none), stream position and count the windows were read for: each
    /// room's newest `count` events in `(token, position]` (the first read of a window).
    window_read: Option<(Option<i64>, i64, usize)>,
    /// Per room asked for: those events, newest first.
    windows: HashMap<String, Vec<EventRecord>>,
    /// Per room asked for: its current memberships.
    members: HashMap<String, Vec<MembershipRecord>>,
    /// The state of the state groups the windows are in.
    states: HashMap<i64, StateMap>,
    /// State events the rooms' sections will send.
    events: HashMap<String, EventRecord>,
}

impl Prefetched {
    /// The newest `count` events of `room_id` in `(since, upto]`, newest first, when read.
    pub(super) fn window(
        &self,
        room_id: &str,
        since: Option<i64>,
        upto: i64,
        count: usize,
    ) -> Option<&[EventRecord]> {
        if self.window_read != Some((since, upto, count)) {
            return None;
        }
        self.windows.get(room_id).map(Vec::as_slice)
    }

    pub(super) fn members(&self, room_id: &str) -> Option<&[MembershipRecord]> {
        self.members.get(room_id).map(Vec::as_slice)
    }

    pub(super) fn state(&self, group: i64) -> Option<&StateMap> {
        self.states.get(&group)
    }

    pub(super) fn event(&self, event_id: &str) -> Option<&EventRecord> {
        self.events.get(event_id)
    }

    /// The first windows of an incremental sync over `(recent.after, recent.upto]`, from
    /// what `recent` read: each room's newest `count` events of the range.
    pub(super) fn from_recent(recent: &RecentEvents, count: usize) -> Self {
        let windows = recent
            .rooms
            .iter()
            .map(|(room_id, events)| {
                let window = events
                    .iter()
                    .rev()
                    .take(count)
                    .map(|(e, _)| e.clone())
                    .collect();
                (room_id.clone(), window)
            })
            .collect();
        Prefetched {
            window_read: Some((Some(recent.after), recent.upto, count)),
            windows,
            ..Prefetched::default()
        }
    }
}

impl RoomService {
    /// The timeline events of `joined` (the user's joined rooms) since `since`, up to
    /// `upto`: `None` without a token, or one further behind than [`RECENT_RANGE`].
    pub async fn recent_events(
        &self,
        joined: &[String],
        since: Option<i64>,
        upto: i64,
    ) -> Result<Option<RecentEvents>> {
        let Some(after) = since.filter(|s| *s <= upto && upto - *s <= RECENT_RANGE) else {
            return Ok(None);
        };
        let mut rooms: HashMap<String, Vec<(EventRecord, Option<String>)>> =
            joined.iter().map(|r| (r.clone(), Vec::new())).collect();
        if after < upto && !joined.is_empty() {
            let rooms_repo = &*self.storage.rooms;
            let events = match self
                .stream_tail
                .events(rooms_repo, joined, after, upto)
                .await
                .map_err(internal)?
            {
                Some(events) => events,
                None => rooms_repo
                    .timeline_between(joined, after, upto)
                    .await
                    .map_err(internal)?,
            };
            for (event, thread) in events {
                if let Some(list) = rooms.get_mut(&event.room_id) {
                    list.push((event, thread));
                }
            }
        }
        Ok(Some(RecentEvents { after, upto, rooms }))
    }

    /// Reads at once, for the joined `rooms` of `user` synced without a token up to `upto`:
    /// the timeline windows `request` asks for, the members, the versions (kept), the states
    /// of the windows' state groups, the visibility facts of those groups (kept), and the
    /// state events at the start of each window.
    pub(super) async fn prefetch(
        &self,
        user: &str,
        rooms: &[String],
        upto: i64,
        request: &SyncRequest,
    ) -> Result<Prefetched> {
        if rooms.is_empty() {
            return Ok(Prefetched::default());
        }
        // One more than the limit tells whether the timeline is limited, and is the event
        // just before the timeline: its state group is the state at the timeline's start.
        let count = request.timeline_limit + 1;
        let storage = &self.storage.rooms;
        let (events, members, versions) = futures::try_join!(
            async {
                storage
                    .latest_events_in(rooms, upto.saturating_add(1), count as i64)
                    .await
                    .map_err(internal)
            },
            async { storage.members_of_rooms(rooms).await.map_err(internal) },
            async { storage.room_versions(rooms).await.map_err(internal) },
        )?;
        self.keep_versions(versions);
        let mut out = Prefetched {
            window_read: Some((None, upto, count)),
            windows: rooms.iter().map(|r| (r.clone(), Vec::new())).collect(),
            members: rooms.iter().map(|r| (r.clone(), Vec::new())).collect(),
            ..Prefetched::default()
        };
        for event in events {
            if let Some(window) = out.windows.get_mut(&event.room_id) {
                window.push(event);
            }
        }
        for member in members {
            if let Some(list) = out.members.get_mut(&member.room_id) {
                list.push(member);
            }
        }
        let mut groups: Vec<i64> = out
            .windows
            .values()
            .flatten()
            .filter_map(|e| e.state_group)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        out.states = storage.states_at_groups(&groups).await.map_err(internal)?;
        // The state at the start of each full window, as the room's section will send it:
        // with lazy loading, only the members the timeline needs (its senders and the user).
        let mut wanted: Vec<String> = Vec::new();
        for window in out.windows.values() {
            let Some(state) = window
                .last()
                .filter(|_| window.len() == count)
                .and_then(|e| e.state_group)
                .and_then(|g| out.states.get(&g))
            else {
                continue;
            };
            let senders: HashSet<&str> = window
                .iter()
                .map(|e| e.sender.as_str())
                .chain([user])
                .collect();
            wanted.extend(
                state
                    .iter()
                    .filter(|((kind, key), _)| {
                        !request.lazy_load_members
                            || kind != MEMBER
                            || senders.contains(key.as_str())
                    })
                    .map(|(_, id)| id.clone()),
            );
        }
        let (_, events) = futures::try_join!(
            self.learn_group_visibility(&groups, user, &out.states),
            async { storage.get_events(&wanted).await.map_err(internal) },
        )?;
        out.events = events
            .into_iter()
            .map(|e| (e.event_id.clone(), e))
            .collect();
        Ok(out)
    }
}
