//! Unread notification counts: the messages of others a member has not read that notify
//! them, and of those the ones that highlight (mention them), per room and per thread.
//!
//! What notifies is what the member's push rules say. A member who never changed a rule has
//! the server's defaults, which the counts follow without evaluating them (ruma's evaluation
//! parses every message, and a first sync counts up to 100 in each room): notices and edits
//! are quiet, every other message notifies, and one that mentions the member (in
//! `m.mentions`, or by name in a message without it) highlights, as does one that mentions
//! the whole room (`m.mentions.room`, or `@room` in a message without `m.mentions`) from a
//! sender the room's current power levels let notify it. A member with rules of their own
//! (`m.push_rules` account data) has them evaluated, message by message, by ruma, with the
//! same power levels. The power levels are read only for rooms where a message may mention
//! the whole room.
//!
//! Counting reads events, so a sync would cost as much as the backlog of unread messages. Each
//! process therefore keeps, per user and room, what it counted and up to which stream
//! position; the next sync only counts the events after that. Kept counts are only reused
//! while what they start after is unchanged (the user's read receipts, their membership
//! position and the names a mention looks for), and events below a committed stream position
//! never appear later (positions commit in order), so they are exact, whichever process wrote
//! what in between.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use lru::LruCache;
use palpo_core::Result;
use palpo_storage::model::{EventRecord, ReadPosition, StreamHeads};
use ruma::{
    OwnedRoomId, OwnedUserId, UInt, UserId,
    power_levels::NotificationPowerLevelsKey,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};
use serde_json::Value;

use crate::{
    account_data::{PUSH_RULES, custom_ruleset},
    rooms::RecentEvents,
};

use super::{
    EphemeralService, EphemeralSync, NOTIFYING_TYPES, PRIVATE_READ, PUBLIC_READ, UnreadCounts,
    internal,
};

/// Events one count reads at most; a longer backlog is counted over the following syncs.
const MAX_UNREAD_READ: i64 = 1000;
/// Users × rooms whose counts a process keeps.
const KEPT_COUNTS: usize = 16_384;

/// Users whose count inputs a process keeps.
const KEPT_INPUTS: usize = 4096;

/// Counts kept between syncs, per (user, room), and what they start from, per user.
pub(super) struct UnreadCache {
    kept: Mutex<LruCache<(String, String), Counted>>,
    inputs: Mutex<LruCache<String, Inputs>>,
}

impl Default for UnreadCache {
    fn default() -> Self {
        UnreadCache {
            kept: Mutex::new(LruCache::new(crate::cache_capacity(KEPT_COUNTS))),
            inputs: Mutex::new(LruCache::new(crate::cache_capacity(KEPT_INPUTS))),
        }
    }
}

/// A user's read positions in `rooms` and rules as last read, with the heads (`StreamHeads`,
/// read with the sync's position before them) they were read at. Every receipt, membership
/// change and account data change takes a stream position and positions commit in order, so
/// while the receipts head has not moved no receipt changed, and the positions are exact;
/// while the membership head has not moved the names are exact (a display name change is
/// stored before the member events that announce it to the user's rooms), and while the
/// user's account data head has not moved so are their push rules.
#[derive(Clone)]
struct Inputs {
    receipts_head: Option<i64>,
    memberships_head: Option<i64>,
    account_data_head: Option<i64>,
    /// The rooms `positions` hold the receipts of (sorted).
    rooms: Vec<String>,
    positions: Vec<ReadPosition>,
    rules: Rules,
}

/// What decides which messages notify a user and which highlight.
#[derive(Debug, Clone)]
struct Rules {
    /// What a message body must contain to mention the user (lowercase): their localpart and
    /// display name. For the server's default rules.
    names: Vec<String>,
    /// For the `contains_display_name` conditions of the user's own rules: their display
    /// name, else their localpart (read with `names`).
    display_name: String,
    /// The user's own push rules, when they have any stored; `None`: the server's defaults.
    custom: Option<Arc<CustomRules>>,
}

#[derive(Debug)]
struct CustomRules {
    /// The stream position of the change that stored them, which tells them apart.
    changed_at: i64,
    ruleset: Ruleset,
}

impl PartialEq for Rules {
    fn eq(&self, other: &Self) -> bool {
        let changed_at = |rules: &Rules| rules.custom.as_ref().map(|c| c.changed_at);
        self.names == other.names && changed_at(self) == changed_at(other)
    }
}

/// Whether a message notifies, and whether it highlights.
#[derive(Debug, Clone, Copy, Default)]
struct Verdict {
    notify: bool,
    highlight: bool,
}

/// The counts of one user in one room over `(start, counted_to]`.
#[derive(Debug, Clone)]
struct Counted {
    start: Floors,
    rules: Rules,
    counted_to: i64,
    main: UnreadCounts,
    threads: BTreeMap<String, UnreadCounts>,
}

/// What a member's counts in a room start after: their read receipts (thread, position;
/// sorted) and, when no unthreaded receipt exists, the position of their membership.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Floors {
    reads: Vec<(Option<String>, i64)>,
    joined_at: i64,
}

impl Floors {
    /// The floors of a member: their read receipts (thread, position) and the position of
    /// their membership. With an unthreaded receipt the join is no floor, so it is left out:
    /// a profile change (a new membership event) must not throw kept counts away.
    fn new(mut reads: Vec<(Option<String>, i64)>, joined_at: i64) -> Self {
        reads.sort();
        let unthreaded = reads.iter().any(|(thread, _)| thread.is_none());
        Floors {
            reads,
            joined_at: if unthreaded { 0 } else { joined_at },
        }
    }

    fn latest_read(&self, thread: Option<&str>) -> Option<i64> {
        self.reads
            .iter()
            .filter(|(t, _)| t.as_deref() == thread)
            .map(|(_, position)| *position)
            .max()
    }

    /// Thread messages at or before this are read, whatever their thread's receipt says:
    /// the latest unthreaded receipt, or else the join.
    fn base(&self) -> i64 {
        self.latest_read(None).unwrap_or(self.joined_at)
    }

    /// Main-timeline messages at or before this are read: the later of the unthreaded and
    /// the `main` receipt, or else the join.
    fn main(&self) -> i64 {
        match (self.latest_read(None), self.latest_read(Some("main"))) {
            (None, None) => self.joined_at,
            (a, b) => a.max(b).unwrap_or(self.joined_at),
        }
    }
}

impl EphemeralService {
    /// Adds the unread counts of `rooms` (the joined rooms of the response, each with the
    /// stream position of the user's membership) as of `up_to`, and drops the ephemeral events
    /// of rooms that are not among them.
    pub async fn add_unread_counts<'a>(
        &self,
        user: &str,
        rooms: impl IntoIterator<Item = (&'a String, i64)>,
        up_to: i64,
        heads: Option<&StreamHeads>,
        recent: Option<&RecentEvents>,
        out: &mut EphemeralSync,
    ) -> Result<()> {
        let rooms: Vec<(&String, i64)> = rooms.into_iter().collect();
        let keep: std::collections::HashSet<&str> = rooms.iter().map(|(r, _)| r.as_str()).collect();
        out.rooms.retain(|room, _| keep.contains(room.as_str()));
        if let Some(recent) = recent {
            self.carry_quiet_counts(user, recent, up_to);
        }
        if rooms.is_empty() {
            return Ok(());
        }
        let mut room_ids: Vec<String> = rooms.iter().map(|(r, _)| (*r).clone()).collect();
        room_ids.sort_unstable();
        let (rules, positions) = self.count_inputs(user, room_ids, heads).await?;
        let mut reads: HashMap<String, Vec<(Option<String>, i64)>> = HashMap::new();
        for ReadPosition {
            room_id,
            thread_id,
            stream_ordering,
        } in positions
        {
            reads
                .entry(room_id)
                .or_default()
                .push((thread_id, stream_ordering));
        }
        let mut counts: Vec<(&String, Counted)> = rooms
            .iter()
            .map(|(room_id, joined_at)| {
                let floors = Floors::new(
                    reads.remove(room_id.as_str()).unwrap_or_default(),
                    *joined_at,
                );
                (
                    *room_id,
                    self.kept_or_new(user, room_id, floors, up_to, &rules),
                )
            })
            .collect();
        // The events after each count: taken from what the sync read already where that
        // covers them, else read for all the other rooms at once.
        let mut candidates: Vec<(EventRecord, Option<String>)> = Vec::new();
        let mut ranges: Vec<(String, i64)> = Vec::new();
        for (room_id, counted) in &counts {
            if counted.counted_to >= up_to {
                continue;
            }
            match recent.and_then(|r| r.covering(room_id, counted.counted_to, up_to)) {
                Some(events) => candidates.extend(
                    events
                        .filter(|(e, _)| {
                            e.sender != user && NOTIFYING_TYPES.contains(&e.event_type.as_str())
                        })
                        .take(MAX_UNREAD_READ as usize)
                        .cloned(),
                ),
                None => ranges.push(((*room_id).clone(), counted.counted_to)),
            }
        }
        if !ranges.is_empty() {
            candidates.extend(
                self.storage
                    .ephemeral
                    .unread_candidates(&ranges, user, NOTIFYING_TYPES, up_to, MAX_UNREAD_READ)
                    .await
                    .map_err(internal)?,
            );
            candidates.sort_by_key(|(event, _)| event.stream_ordering);
        }
        // What the user may see, for all rooms at once (one read of visibility facts).
        let events: Vec<&EventRecord> = candidates.iter().map(|(event, _)| event).collect();
        let visible = self.rooms.visible_to_member(user, &events).await?;
        let mut by_room: HashMap<String, Candidates> = HashMap::new();
        for ((event, thread), visible) in candidates.into_iter().zip(visible) {
            let room = by_room.entry(event.room_id.clone()).or_default();
            // The last one read, seen or not, is where a read that hit its limit stopped.
            room.last_read = event.stream_ordering;
            room.read += 1;
            if !visible {
                continue;
            }
            room.visible.push((event, thread));
        }
        let levels = self.room_mention_levels(&by_room).await?;
        if let Some(custom) = &rules.custom {
            self.apply_push_rules(user, custom, &rules.display_name, &levels, &mut by_room)
                .await?;
        }
        for (room_id, counted) in &mut counts {
            if counted.counted_to < up_to {
                let candidates = by_room.remove(room_id.as_str()).unwrap_or_default();
                let levels = levels.get(room_id.as_str());
                count_more(user, counted, candidates, up_to, &rules.names, levels);
                self.unread
                    .kept
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put((user.to_owned(), (*room_id).clone()), counted.clone());
            }
            out.unread.insert((*room_id).clone(), counted.main);
            if !counted.threads.is_empty() {
                out.unread_threads
                    .insert((*room_id).clone(), counted.threads.clone());
            }
        }
        Ok(())
    }

    /// The user's read positions in `room_ids` (perhaps with those of other rooms) and their
    /// rules: kept from earlier syncs while `heads` say they cannot have changed (see
    /// [`Inputs`]).
    async fn count_inputs(
        &self,
        user: &str,
        room_ids: Vec<String>,
        heads: Option<&StreamHeads>,
    ) -> Result<(Rules, Vec<ReadPosition>)> {
        let kept = heads.and_then(|heads| {
            let inputs = self
                .unread
                .inputs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(user)
                .cloned()?;
            Some((heads, inputs))
        });
        // Positions kept for some rooms stay exact while no receipt moved: only the rooms not
        // among them are read (a pass's rooms are those with news, a different few each time).
        let (mut rooms, mut positions) = kept
            .as_ref()
            .filter(|(heads, i)| i.receipts_head == heads.receipts)
            .map(|(_, i)| (i.rooms.clone(), i.positions.clone()))
            .unwrap_or_default();
        let missing: Vec<String> = room_ids
            .into_iter()
            .filter(|r| rooms.binary_search(r).is_err())
            .collect();
        let kept_names = kept
            .as_ref()
            .filter(|(heads, i)| i.memberships_head == heads.memberships)
            .map(|(_, i)| (i.rules.names.clone(), i.rules.display_name.clone()));
        let kept_push_rules = kept
            .as_ref()
            .filter(|(heads, i)| i.account_data_head == heads.account_data)
            .map(|(_, i)| i.rules.custom.clone());
        let read = async {
            if missing.is_empty() {
                return Ok(Vec::new());
            }
            self.storage
                .ephemeral
                .read_positions(user, &missing, &[PUBLIC_READ, PRIVATE_READ])
                .await
                .map_err(internal)
        };
        let names = async {
            match kept_names {
                Some(names) => Ok(names),
                None => self.mention_names(user).await,
            }
        };
        let custom = async {
            match kept_push_rules {
                Some(custom) => Ok(custom),
                None => self.custom_rules(user).await,
            }
        };
        let ((names, display_name), custom, read) = futures::try_join!(names, custom, read)?;
        let rules = Rules {
            names,
            display_name,
            custom,
        };
        positions.extend(read);
        rooms.extend(missing);
        rooms.sort_unstable();
        if let Some(heads) = heads {
            self.unread
                .inputs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(
                    user.to_owned(),
                    Inputs {
                        receipts_head: heads.receipts,
                        memberships_head: heads.memberships,
                        account_data_head: heads.account_data,
                        rooms,
                        positions: positions.clone(),
                        rules: rules.clone(),
                    },
                );
        }
        Ok((rules, positions))
    }

    /// What a message body must contain to mention `user` (lowercase): their localpart and
    /// display name; and the display name as it is, else the localpart.
    async fn mention_names(&self, user: &str) -> Result<(Vec<String>, String)> {
        let display_name = self
            .storage
            .profiles
            .get_profile(user)
            .await
            .map_err(internal)?
            .and_then(|p| p.displayname)
            .filter(|n| !n.trim().is_empty());
        let mut names: Vec<String> = localpart(user).iter().map(|l| l.to_lowercase()).collect();
        names.extend(display_name.iter().map(|n| n.to_lowercase()));
        let display_name = display_name
            .or_else(|| localpart(user).map(str::to_owned))
            .unwrap_or_default();
        Ok((names, display_name))
    }

    /// The user's own push rules ([`custom_ruleset`]), with the position of their last change.
    async fn custom_rules(&self, user: &str) -> Result<Option<Arc<CustomRules>>> {
        let Some(record) = self
            .storage
            .account_data
            .get_account_data(user, None, PUSH_RULES)
            .await
            .map_err(internal)?
        else {
            return Ok(None);
        };
        let content = serde_json::from_str(&record.content).ok();
        Ok(custom_ruleset(user, content)?.map(|ruleset| {
            Arc::new(CustomRules {
                changed_at: record.stream_position,
                ruleset,
            })
        }))
    }

    /// The current power levels of the rooms where a message of `by_room` may mention the
    /// whole room (`@room`), which only notifies when its sender may notify the room. Read
    /// for those rooms only: most messages mention no one.
    async fn room_mention_levels(
        &self,
        by_room: &HashMap<String, Candidates>,
    ) -> Result<HashMap<String, PushConditionPowerLevelsCtx>> {
        let mut levels = HashMap::new();
        for (room_id, candidates) in by_room {
            if !candidates
                .visible
                .iter()
                .any(|(event, _)| may_mention_room(&event.pdu_json))
            {
                continue;
            }
            if let Some(room_levels) = self.rooms.push_power_levels(room_id).await? {
                levels.insert(room_id.clone(), room_levels);
            }
        }
        Ok(levels)
    }

    /// Evaluates `custom` on the messages each room's `candidates` hold, in the room's context:
    /// its joined members (counted in one read for all the rooms) and, where a message may
    /// mention the whole room, its power `levels` (without them no one may notify the room).
    async fn apply_push_rules(
        &self,
        user: &str,
        custom: &CustomRules,
        display_name: &str,
        levels: &HashMap<String, PushConditionPowerLevelsCtx>,
        by_room: &mut HashMap<String, Candidates>,
    ) -> Result<()> {
        let rooms: Vec<String> = by_room
            .iter()
            .filter(|(_, candidates)| !candidates.visible.is_empty())
            .map(|(room_id, _)| room_id.clone())
            .collect();
        if rooms.is_empty() {
            return Ok(());
        }
        let members = self
            .storage
            .rooms
            .members_of_rooms(&rooms)
            .await
            .map_err(internal)?;
        let mut joined: HashMap<&str, u64> = HashMap::new();
        for member in members.iter().filter(|m| m.membership == "join") {
            *joined.entry(member.room_id.as_str()).or_default() += 1;
        }
        // Ids that do not parse (never ours) leave their rooms to the built-in verdicts.
        let Ok(user_id) = OwnedUserId::try_from(user) else {
            tracing::warn!(user, "push rules not evaluated: unreadable user id");
            return Ok(());
        };
        for room_id in &rooms {
            let Some(candidates) = by_room.get_mut(room_id) else {
                continue;
            };
            let Ok(room) = OwnedRoomId::try_from(room_id.as_str()) else {
                tracing::warn!(room_id, "push rules not evaluated: unreadable room id");
                continue;
            };
            let member_count =
                UInt::new_saturating(joined.get(room_id.as_str()).copied().unwrap_or(0));
            let mut context = PushConditionRoomCtx::new(
                room,
                member_count,
                user_id.clone(),
                display_name.to_owned(),
            );
            if let Some(levels) = levels.get(room_id.as_str()) {
                context = context.with_power_levels(levels.clone());
            }
            let mut verdicts = Vec::with_capacity(candidates.visible.len());
            for (event, _) in &candidates.visible {
                let verdict = match serde_json::value::RawValue::from_string(event.pdu_json.clone())
                {
                    Ok(raw) => {
                        let actions = custom
                            .ruleset
                            .get_actions(&Raw::<Value>::from_json(raw), &context)
                            .await;
                        Verdict {
                            notify: actions.iter().any(Action::should_notify),
                            highlight: actions.iter().any(Action::is_highlight),
                        }
                    }
                    Err(_) => Verdict::default(),
                };
                verdicts.push(verdict);
            }
            candidates.verdicts = Some(verdicts);
        }
        Ok(())
    }

    /// Moves on to `up_to` the kept counts of the rooms where `recent` shows no event after
    /// them: a count stays exact over a range without events. So a room without news keeps
    /// pace with the user's syncs, and when news comes its count goes on from what `recent`
    /// read, not from a read of its own.
    fn carry_quiet_counts(&self, user: &str, recent: &RecentEvents, up_to: i64) {
        let mut kept = self.unread.kept.lock().unwrap_or_else(|e| e.into_inner());
        for room_id in recent.rooms() {
            let key = (user.to_owned(), room_id.to_owned());
            let Some(counted) = kept.peek_mut(&key) else {
                continue;
            };
            if counted.counted_to < up_to
                && recent
                    .covering(room_id, counted.counted_to, up_to)
                    .is_some_and(|mut events| events.next().is_none())
            {
                counted.counted_to = up_to;
            }
        }
    }

    /// Messages of others the user may see and has not read, and of those the ones that
    /// mention them: in the main timeline, after their latest read receipt (public or private)
    /// that is unthreaded or for `main`; in each thread, after their latest unthreaded receipt
    /// or receipt for that thread. Without a receipt, after their join. Continues the counts
    /// kept from an earlier sync when they start from the same place; otherwise starts anew.
    fn kept_or_new(
        &self,
        user: &str,
        room_id: &str,
        floors: Floors,
        up_to: i64,
        rules: &Rules,
    ) -> Counted {
        let key = (user.to_owned(), room_id.to_owned());
        let kept = self
            .unread
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|c| c.start == floors && c.rules == *rules && c.counted_to <= up_to)
            .cloned();
        kept.unwrap_or_else(|| Counted {
            // The main timeline may start before the threads do (a `main` receipt older than
            // the join), and the other way round.
            counted_to: floors.base().min(floors.main()),
            start: floors,
            rules: rules.clone(),
            main: UnreadCounts::default(),
            threads: BTreeMap::new(),
        })
    }
}

/// The events of one room after a kept count, as read for it.
#[derive(Default)]
struct Candidates {
    /// Those the user may see, oldest first, each with its thread.
    visible: Vec<(EventRecord, Option<String>)>,
    /// What the user's own push rules say of each of `visible`; `None`: the defaults'.
    verdicts: Option<Vec<Verdict>>,
    /// How many were read, and the position of the last.
    read: i64,
    last_read: Option<i64>,
}

/// Counts `candidates` (read after `counted.counted_to`) into `counted`, and moves it on to
/// `up_to`, or to the last event read when the read stopped at its limit (a longer backlog
/// is counted on next time).
fn count_more(
    user: &str,
    counted: &mut Counted,
    candidates: Candidates,
    up_to: i64,
    names: &[String],
    levels: Option<&PushConditionPowerLevelsCtx>,
) {
    let read_to = match candidates.last_read {
        Some(last) if candidates.read >= MAX_UNREAD_READ => last,
        _ => up_to,
    };
    let base = counted.start.base();
    let main_floor = counted.start.main();
    let verdicts = candidates.verdicts;
    debug_assert!(
        verdicts
            .as_ref()
            .is_none_or(|v| v.len() == candidates.visible.len())
    );
    for (index, (event, thread)) in candidates.visible.into_iter().enumerate() {
        let position = event.stream_ordering.unwrap_or_default();
        let counts = match thread {
            None if position > main_floor => &mut counted.main,
            None => continue,
            Some(thread) => {
                let read = counted.start.latest_read(Some(&thread));
                if position <= base || read.is_some_and(|read| position <= read) {
                    continue;
                }
                counted.threads.entry(thread).or_default()
            }
        };
        let verdict = match &verdicts {
            Some(verdicts) => verdicts.get(index).copied().unwrap_or_default(),
            None => default_verdict(&event, user, names, levels),
        };
        if !verdict.notify {
            continue;
        }
        counts.notification_count += 1;
        if verdict.highlight {
            counts.highlight_count += 1;
        }
    }
    counted.counted_to = read_to;
}

/// What the server's default push rules say of a message (`m.room.message` or
/// `m.room.encrypted`), without evaluating them, in their order: a notice is quiet
/// (`.m.rule.suppress_notices`); a message that mentions `user` notifies and highlights
/// (`.m.rule.is_user_mention`, and the body's names as the deprecated name rules did), as does
/// one that mentions the whole room from a sender the room's power `levels` let notify it
/// (`.m.rule.is_room_mention`, `.m.rule.roomnotif`; without `levels`, no one); an edit is
/// quiet (`.m.rule.suppress_edits`); any other message notifies.
fn default_verdict(
    event: &EventRecord,
    user: &str,
    names: &[String],
    levels: Option<&PushConditionPowerLevelsCtx>,
) -> Verdict {
    let (notice, edit) = notice_or_edit(&event.pdu_json);
    if notice {
        return Verdict::default();
    }
    let highlight = mentions_user(event, user, names)
        || levels.is_some_and(|levels| {
            mentions_room(&event.pdu_json) && may_notify_room(levels, &event.sender)
        });
    Verdict {
        notify: highlight || !edit,
        highlight,
    }
}

/// Whether a message is a notice, and whether it is an edit. Parsed only when its text has
/// either word.
fn notice_or_edit(pdu_json: &str) -> (bool, bool) {
    if !pdu_json.contains("m.notice") && !pdu_json.contains("m.replace") {
        return (false, false);
    }
    let Ok(pdu) = serde_json::from_str::<Value>(pdu_json) else {
        return (false, false);
    };
    let content = &pdu["content"];
    (
        content["msgtype"] == "m.notice",
        content["m.relates_to"]["rel_type"] == "m.replace",
    )
}

/// The localpart of a user id.
fn localpart(user: &str) -> Option<&str> {
    user.strip_prefix('@')
        .and_then(|rest| rest.split(':').next())
        .filter(|l| !l.is_empty())
}

/// Whether a message mentions `user`: listed in `m.mentions.user_ids` or, when the message
/// has no `m.mentions`, its body contains one of `names` (lowercase).
fn mentions_user(event: &EventRecord, user: &str, names: &[String]) -> bool {
    if !may_mention(&event.pdu_json, names) {
        return false;
    }
    let Ok(pdu) = serde_json::from_str::<Value>(&event.pdu_json) else {
        return false;
    };
    let content = &pdu["content"];
    if let Some(mentions) = content.get("m.mentions") {
        return mentions["user_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id.as_str() == Some(user)));
    }
    let Some(body) = content["body"].as_str() else {
        return false;
    };
    let body = body.to_lowercase();
    names.iter().any(|name| body.contains(name.as_str()))
}

/// Whether a message mentions the whole room: `m.mentions.room` is true or, when the message
/// has no `m.mentions`, its body has the word `@room` (any case, as ruma matches it).
fn mentions_room(pdu_json: &str) -> bool {
    if !may_mention_room(pdu_json) {
        return false;
    }
    let Ok(pdu) = serde_json::from_str::<Value>(pdu_json) else {
        return false;
    };
    let content = &pdu["content"];
    if let Some(mentions) = content.get("m.mentions") {
        return mentions["room"] == true;
    }
    content["body"].as_str().is_some_and(has_room_word)
}

/// Whether `body` has `@room` (any case) not followed by a word character.
fn has_room_word(body: &str) -> bool {
    const WORD: &[u8] = b"@room";
    let bytes = body.as_bytes();
    bytes.windows(WORD.len()).enumerate().any(|(at, window)| {
        window.eq_ignore_ascii_case(WORD)
            && bytes
                .get(at + WORD.len())
                .is_none_or(|&next| !(next.is_ascii_alphanumeric() || next == b'_'))
    })
}

/// A cheap test on the stored JSON before parsing it: a message can only mention the whole
/// room with `"room":true` (stored PDUs are canonical JSON, without spaces) or with `@room` in
/// its text. Most messages have neither (while most of today's have an `m.mentions`).
fn may_mention_room(pdu_json: &str) -> bool {
    pdu_json.contains("\"room\":true")
        || pdu_json
            .as_bytes()
            .windows(5)
            .any(|window| window.eq_ignore_ascii_case(b"@room"))
}

/// Whether the room's power `levels` let `sender` notify the whole room.
fn may_notify_room(levels: &PushConditionPowerLevelsCtx, sender: &str) -> bool {
    UserId::parse(sender).is_ok_and(|sender| {
        levels.has_sender_notification_permission(&sender, &NotificationPowerLevelsKey::Room)
    })
}

/// A cheap test on the stored JSON before parsing it: most messages mention nobody, and
/// parsing each one was most of a count's cost. A message can only mention the user when it
/// has `m.mentions` or its text holds one of `names`. Stored PDUs are canonical JSON, which
/// escapes only `"`, `\` and control characters, so a name without those appears in the JSON
/// as it appears in the body.
fn may_mention(pdu_json: &str, names: &[String]) -> bool {
    if pdu_json.contains("m.mentions") {
        return true;
    }
    let escaped = |name: &String| {
        name.chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
    };
    if names.iter().any(escaped) {
        return true;
    }
    let lower = pdu_json.to_lowercase();
    names.iter().any(|name| lower.contains(name.as_str()))
}

#[cfg(test)]
mod tests {
    use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsSource};
    use serde_json::json;

    use super::*;

    #[test]
    fn mention_prefilter_never_hides_a_mention() {
        let names = vec!["bob".to_owned(), "@bob:test".to_owned()];
        // A name in the body, whatever its case, or any `m.mentions`: parse.
        assert!(may_mention(r#"{"content":{"body":"Hi BOB"}}"#, &names));
        assert!(may_mention(
            r#"{"content":{"body":"x","m.mentions":{}}}"#,
            &names
        ));
        // Neither: no need to parse.
        assert!(!may_mention(r#"{"content":{"body":"hello all"}}"#, &names));
        // A name JSON would escape cannot be found in the raw text: always parse.
        let quoted = vec!["\"bob\"".to_owned()];
        assert!(may_mention(r#"{"content":{"body":"hello"}}"#, &quoted));
    }

    fn message(content: Value) -> EventRecord {
        EventRecord {
            event_id: "$e".into(),
            room_id: "!r:x".into(),
            stream_ordering: Some(1),
            depth: 1,
            event_type: "m.room.message".into(),
            state_key: None,
            sender: "@a:x".into(),
            origin_server_ts: 1,
            state_group: Some(1),
            outlier: false,
            soft_failed: false,
            rejected_reason: None,
            redacted_by: None,
            pdu_json: json!({ "content": content }).to_string(),
        }
    }

    #[test]
    fn mentions_by_list_or_by_name() {
        let names = vec!["bob".to_owned(), "bobby tables".to_owned()];
        let user = "@bob:x";
        assert!(mentions_user(
            &message(json!({"body": "hi", "m.mentions": {"user_ids": ["@bob:x"]}})),
            user,
            &names
        ));
        assert!(
            !mentions_user(
                &message(json!({"body": "hi bob", "m.mentions": {}})),
                user,
                &names
            ),
            "m.mentions present: the body does not count"
        );
        assert!(mentions_user(
            &message(json!({"body": "Hey BOB!"})),
            user,
            &names
        ));
        assert!(mentions_user(
            &message(json!({"body": "ask Bobby Tables"})),
            user,
            &names
        ));
        assert!(!mentions_user(
            &message(json!({"body": "hello"})),
            user,
            &names
        ));
    }

    #[test]
    fn notices_and_edits_are_quiet_by_default() {
        let names = vec!["bob".to_owned()];
        let verdict = |content: Value| default_verdict(&message(content), "@bob:x", &names, None);
        let notice = verdict(json!({"msgtype": "m.notice", "body": "hi bob"}));
        assert!(!notice.notify && !notice.highlight);
        let edit = verdict(json!({
            "msgtype": "m.text", "body": "* hi there",
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$e"},
        }));
        assert!(!edit.notify && !edit.highlight);
        // The name rules came before `.m.rule.suppress_edits`: an edit naming the user in a
        // message without `m.mentions` is a mention.
        let named_edit = verdict(json!({
            "msgtype": "m.text", "body": "* hi bob",
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$e"},
        }));
        assert!(named_edit.notify && named_edit.highlight);
        // The words elsewhere do not make a message quiet.
        let text = verdict(json!({"msgtype": "m.text", "body": "m.notice m.replace bob"}));
        assert!(text.notify && text.highlight);
        let reply = verdict(json!({
            "msgtype": "m.text", "body": "yes",
            "m.relates_to": {"m.in_reply_to": {"event_id": "$e"}},
        }));
        assert!(reply.notify && !reply.highlight);
        // An edit that mentions the user is a mention first.
        let mentioning_edit = verdict(json!({
            "msgtype": "m.text", "body": "* hi", "m.mentions": {"user_ids": ["@bob:x"]},
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$e"},
        }));
        assert!(mentioning_edit.notify && mentioning_edit.highlight);
    }

    /// The built-in verdicts are what ruma's evaluation of the server-default rules gives,
    /// for every message that does not mention the user by name only (the deprecated name
    /// rules, which the built-in verdicts keep and ruma's defaults no longer have): without
    /// the room's power levels, and with levels that do or do not let the sender notify the
    /// room.
    #[test]
    fn built_in_verdicts_are_the_default_rules() {
        let user = "@bob:x";
        let ruleset = Ruleset::server_default(&OwnedUserId::try_from(user).expect("user"));
        let context = PushConditionRoomCtx::new(
            OwnedRoomId::try_from("!r:x").expect("room"),
            UInt::from(3_u32),
            OwnedUserId::try_from(user).expect("user"),
            "Bob".to_owned(),
        );
        // No power levels event: the creator has 100, everyone else 0; `@room` needs 50.
        let rules = ruma::RoomVersionId::V11.rules().expect("v11").authorization;
        let created_by = |creator: &str| -> PushConditionPowerLevelsCtx {
            let creator = OwnedUserId::try_from(creator).expect("user");
            RoomPowerLevels::new(RoomPowerLevelsSource::None, &rules, [creator]).into()
        };
        let (sender_may, sender_may_not) = (created_by("@a:x"), created_by("@carol:x"));
        let edit = json!({"rel_type": "m.replace", "event_id": "$e"});
        let mention = json!({"user_ids": [user]});
        let other = json!({"user_ids": ["@carol:x"]});
        let room = json!({"room": true});
        let contents = [
            json!({"msgtype": "m.text", "body": "hello"}),
            json!({"msgtype": "m.notice", "body": "hello"}),
            json!({"msgtype": "m.notice", "body": "hi", "m.mentions": mention}),
            json!({"msgtype": "m.text", "body": "* hello", "m.relates_to": edit}),
            json!({"msgtype": "m.text", "body": "* hi", "m.relates_to": edit, "m.mentions": mention}),
            json!({"msgtype": "m.text", "body": "* hi", "m.relates_to": edit, "m.mentions": other}),
            json!({"msgtype": "m.text", "body": "hi", "m.mentions": mention}),
            json!({"msgtype": "m.text", "body": "hi", "m.mentions": other}),
            json!({"msgtype": "m.emote", "body": "waves", "m.mentions": {}}),
            // The whole room, by `m.mentions` (the body's word does not count with it).
            json!({"msgtype": "m.text", "body": "all", "m.mentions": room}),
            json!({"msgtype": "m.text", "body": "@room all", "m.mentions": {}}),
            json!({"msgtype": "m.text", "body": "@roomba and @room_x"}),
            json!({"msgtype": "m.notice", "body": "@room", "m.mentions": room}),
            json!({"msgtype": "m.text", "body": "* all", "m.relates_to": edit, "m.mentions": room}),
        ];
        for levels in [None, Some(&sender_may), Some(&sender_may_not)] {
            let context = match levels {
                Some(levels) => context.clone().with_power_levels(levels.clone()),
                None => context.clone(),
            };
            for content in &contents {
                let mut event = message(content.clone());
                event.pdu_json = json!({
                    "type": "m.room.message", "room_id": "!r:x", "sender": "@a:x",
                    "content": content,
                })
                .to_string();
                let built_in = default_verdict(&event, user, &["bob".to_owned()], levels);
                let raw =
                    serde_json::value::RawValue::from_string(event.pdu_json.clone()).expect("JSON");
                let actions = futures::executor::block_on(
                    ruleset.get_actions(&Raw::<Value>::from_json(raw), &context),
                );
                let notify = actions.iter().any(Action::should_notify);
                let highlight = actions.iter().any(Action::is_highlight);
                assert_eq!(
                    (built_in.notify, built_in.highlight),
                    (notify, highlight),
                    "{content} with levels: {}",
                    levels.is_some()
                );
            }
        }
        // The cases above do reach both sides of the sender's permission.
        let names = ["bob".to_owned()];
        let highlights = |content: Value, levels| {
            let verdict = default_verdict(&message(content), user, &names, levels);
            assert!(verdict.notify);
            verdict.highlight
        };
        let all = json!({"body": "all", "m.mentions": room});
        assert!(highlights(all.clone(), Some(&sender_may)));
        assert!(!highlights(all, Some(&sender_may_not)));
        // Without `m.mentions`, the word `@room` in the body mentions the whole room as the
        // deprecated `.m.rule.roomnotif` did (ruma's defaults no longer have it; the built-in
        // verdicts keep it, as they keep the name rules, for clients that do not send
        // `m.mentions`).
        for body in [
            "hey @room",
            "HEY @Room!",
            "x@room, then",
            "@roomy @room",
            "* @room",
        ] {
            assert!(
                highlights(json!({"body": body}), Some(&sender_may)),
                "{body}"
            );
            assert!(
                !highlights(json!({"body": body}), Some(&sender_may_not)),
                "{body}"
            );
            assert!(!highlights(json!({"body": body}), None), "{body}");
        }
        for body in ["@roomba", "@room_x", "room", "@ room"] {
            assert!(
                !highlights(json!({"body": body}), Some(&sender_may)),
                "{body}"
            );
        }
    }

    #[test]
    fn floors_follow_the_receipts() {
        let joined = Floors {
            reads: vec![],
            joined_at: 5,
        };
        assert_eq!((joined.base(), joined.main()), (5, 5));
        let reads = Floors {
            reads: vec![
                (None, 10),
                (Some("$t".into()), 30),
                (Some("main".into()), 20),
            ],
            joined_at: 5,
        };
        assert_eq!(reads.base(), 10, "the unthreaded receipt");
        assert_eq!(reads.main(), 20, "the later of unthreaded and main");
        assert_eq!(reads.latest_read(Some("$t")), Some(30));
        let main_only = Floors {
            reads: vec![(Some("main".into()), 20)],
            joined_at: 5,
        };
        assert_eq!((main_only.base(), main_only.main()), (5, 20));
    }
}
