//! Unread notification counts: the messages of others a member has not read, and of those
//! the ones that mention them, per room and per thread.
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
    sync::Mutex,
};

use lru::LruCache;
use palpo_core::Result;
use palpo_storage::model::{EventRecord, ReadPosition, StreamHeads};
use serde_json::Value;

use crate::rooms::RecentEvents;

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

/// A user's read positions in `rooms` and mention names as last read, with the heads
/// (`StreamHeads`, read with the sync's position before them) they were read at. Every
/// receipt and every membership change takes a stream position and positions commit in
/// order, so while the receipts head has not moved no receipt changed, and the positions
/// are exact; while the membership head has not moved the names are too (a display name
/// change is stored before the member events that announce it to the user's rooms).
#[derive(Clone)]
struct Inputs {
    receipts_head: Option<i64>,
    memberships_head: Option<i64>,
    /// The rooms `positions` hold the receipts of (sorted).
    rooms: Vec<String>,
    positions: Vec<ReadPosition>,
    mentions: Vec<String>,
}

/// The counts of one user in one room over `(start, counted_to]`.
#[derive(Debug, Clone)]
struct Counted {
    start: Floors,
    names: Vec<String>,
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
        let (mentions, positions) = self.count_inputs(user, room_ids, heads).await?;
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
                    self.kept_or_new(user, room_id, floors, up_to, &mentions),
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
        for (room_id, counted) in &mut counts {
            if counted.counted_to < up_to {
                let candidates = by_room.remove(room_id.as_str()).unwrap_or_default();
                count_more(user, counted, candidates, up_to, &mentions);
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
    /// mention names: kept from earlier syncs while `heads` say they cannot have changed (see
    /// [`Inputs`]).
    async fn count_inputs(
        &self,
        user: &str,
        room_ids: Vec<String>,
        heads: Option<&StreamHeads>,
    ) -> Result<(Vec<String>, Vec<ReadPosition>)> {
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
        let kept_mentions = kept
            .as_ref()
            .filter(|(heads, i)| i.memberships_head == heads.memberships)
            .map(|(_, i)| i.mentions.clone());
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
        let mentions = async {
            match kept_mentions {
                Some(mentions) => Ok(mentions),
                None => self.mention_names(user).await,
            }
        };
        let (mentions, read) = futures::try_join!(mentions, read)?;
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
                        rooms,
                        positions: positions.clone(),
                        mentions: mentions.clone(),
                    },
                );
        }
        Ok((mentions, positions))
    }

    /// What a message body must contain to mention `user`: their localpart and display name.
    async fn mention_names(&self, user: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        if let Some(localpart) = user
            .strip_prefix('@')
            .and_then(|rest| rest.split(':').next())
            .filter(|l| !l.is_empty())
        {
            names.push(localpart.to_lowercase());
        }
        if let Some(name) = self
            .storage
            .profiles
            .get_profile(user)
            .await
            .map_err(internal)?
            .and_then(|p| p.displayname)
            .filter(|n| !n.trim().is_empty())
        {
            names.push(name.to_lowercase());
        }
        Ok(names)
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
        mentions: &[String],
    ) -> Counted {
        let key = (user.to_owned(), room_id.to_owned());
        let kept = self
            .unread
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|c| c.start == floors && c.names == mentions && c.counted_to <= up_to)
            .cloned();
        kept.unwrap_or_else(|| Counted {
            // The main timeline may start before the threads do (a `main` receipt older than
            // the join), and the other way round.
            counted_to: floors.base().min(floors.main()),
            start: floors,
            names: mentions.to_vec(),
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
    mentions: &[String],
) {
    let read_to = match candidates.last_read {
        Some(last) if candidates.read >= MAX_UNREAD_READ => last,
        _ => up_to,
    };
    let base = counted.start.base();
    let main_floor = counted.start.main();
    for (event, thread) in candidates.visible {
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
        counts.notification_count += 1;
        if mentions_user(&event, user, mentions) {
            counts.highlight_count += 1;
        }
    }
    counted.counted_to = read_to;
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
