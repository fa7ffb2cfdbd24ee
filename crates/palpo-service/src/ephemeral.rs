//! Typing notifications, receipts (threaded and private), read markers, presence and unread
//! notification counts, and their part of `/sync`.
//!
//! Everything is kept in the database, so every server process sharing it sees it, and every
//! change takes the next position of the global stream, so one sync token orders it with the
//! events. After each write the notifier is told, which wakes long-polling syncs (here, and
//! through it in the other processes).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use palpo_core::{Error, Result, now_millis};
use palpo_storage::{
    Storage,
    model::{
        DeviceKeyCounts, EventRecord, PresenceRecord, ReceiptRecord, StreamHeads, TokenCheck,
        TypingRecord,
    },
};
use serde_json::{Map, Value, json};

use crate::{RoomService, internal, notifier::Notifier};

mod position_reads;
mod unread;

/// Longest a typing notification lasts, whatever the client asks for.
pub const MAX_TYPING_TIMEOUT_MS: u64 = 30_000;
/// An online user inactive this long is `unavailable` (`presence.idle_timeout_secs`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Syncs move a user's last active time at most this often (without a stream position), and
/// at least a few times per idle timeout.
const TOUCH_EVERY_MS: i64 = 10_000;
/// Users whose presence this process remembers before it forgets the stale ones.
const PRESENCE_MEMORY: usize = 100_000;
/// The presence expiry task checks at most this often.
const MIN_EXPIRY_CHECK: Duration = Duration::from_millis(100);
/// Longest thread id a receipt may carry (the database column's size).
const MAX_THREAD_ID: usize = 200;
/// What unread notification counts count.
const NOTIFYING_TYPES: &[&str] = &["m.room.message", "m.room.encrypted"];

pub const PUBLIC_READ: &str = "m.read";
pub const PRIVATE_READ: &str = "m.read.private";
pub const FULLY_READ: &str = "m.fully_read";

/// A presence state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceState {
    Online,
    Offline,
    Unavailable,
}

impl PresenceState {
    pub fn parse(state: &str) -> Result<Self> {
        match state {
            "online" => Ok(PresenceState::Online),
            "offline" => Ok(PresenceState::Offline),
            "unavailable" => Ok(PresenceState::Unavailable),
            other => Err(Error::invalid_param(format!(
                "presence must be online, offline or unavailable, not {other:?}"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Offline => "offline",
            PresenceState::Unavailable => "unavailable",
        }
    }
}

/// A user's presence as `GET /presence/{userId}/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub presence: String,
    pub last_active_ago: Option<i64>,
    pub status_msg: Option<String>,
    pub currently_active: Option<bool>,
}

/// Unread notification counts of a joined room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    pub notification_count: i64,
    pub highlight_count: i64,
}

/// The ephemeral part of a sync: per joined room its ephemeral events (`m.typing`,
/// `m.receipt`) and unread counts, and the presence of the user and their room-mates.
#[derive(Debug, Clone, Default)]
pub struct EphemeralSync {
    pub rooms: BTreeMap<String, Vec<Value>>,
    /// Per room, the unread counts of the main timeline (events in no thread).
    pub unread: BTreeMap<String, UnreadCounts>,
    /// Per room, the unread counts of each thread with any (thread root id → counts).
    pub unread_threads: BTreeMap<String, BTreeMap<String, UnreadCounts>>,
    pub presence: Vec<Value>,
}

impl EphemeralSync {
    /// Adds each room's thread counts to its main counts, for clients that did not ask for
    /// counts per thread.
    pub fn fold_thread_counts(&mut self) {
        for (room_id, threads) in std::mem::take(&mut self.unread_threads) {
            let counts = self.unread.entry(room_id).or_default();
            for thread in threads.values() {
                counts.notification_count += thread.notification_count;
                counts.highlight_count += thread.highlight_count;
            }
        }
    }
}

/// A sync's read of the stream position ([`EphemeralService::sync_position`]).
#[derive(Debug, Clone)]
pub struct PositionRead {
    pub position: i64,
    /// The newest change of each kind, when read with the position.
    pub heads: Option<StreamHeads>,
    /// When the first typing notification still running runs out (ms since the epoch; `None`
    /// inside: none running), when read with the position.
    pub next_typing_expiry: Option<Option<i64>>,
    /// The device's key counts, when read with the position (as
    /// [`palpo_storage::model::SyncPosition::key_counts`]).
    pub key_counts: Option<DeviceKeyCounts>,
}

pub struct EphemeralService {
    storage: Storage,
    rooms: Arc<RoomService>,
    notifier: Arc<Notifier>,
    /// An online user inactive this long is `unavailable`.
    idle_timeout_ms: i64,
    /// Unread counts kept between syncs.
    unread: unread::UnreadCache,
    /// User → the presence state this process last stored or read for them, and its last
    /// active time: while that is recent, a sync setting the same state neither reads nor
    /// writes presence (see [`EphemeralService::presence_on_sync`]).
    presence_seen: Mutex<HashMap<String, (PresenceState, i64)>>,
    /// The syncs' reads of the position, shared by those that ask at once.
    position_reads: position_reads::PositionReads,
}

impl EphemeralService {
    pub fn new(storage: Storage, rooms: Arc<RoomService>, notifier: Arc<Notifier>) -> Self {
        EphemeralService {
            storage,
            rooms,
            notifier,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT.as_millis() as i64,
            unread: unread::UnreadCache::default(),
            presence_seen: Mutex::new(HashMap::new()),
            position_reads: position_reads::PositionReads::default(),
        }
    }

    /// Sets how long an online user may be inactive before they are `unavailable`.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX).max(1);
        self
    }

    async fn require_joined(&self, user: &str, room_id: &str) -> Result<()> {
        self.rooms
            .check_joined(room_id, user, "You are not joined to this room")
            .await
    }

    // -----------------------------------------------------------------------------------------
    // Typing

    /// `PUT /rooms/{roomId}/typing/{userId}`: `timeout_ms` is capped at
    /// [`MAX_TYPING_TIMEOUT_MS`] (which is also the default).
    pub async fn set_typing(
        &self,
        user: &str,
        target: &str,
        room_id: &str,
        typing: bool,
        timeout_ms: Option<u64>,
    ) -> Result<()> {
        if user != target {
            return Err(Error::forbidden("You may only set your own typing state"));
        }
        self.require_joined(user, room_id).await?;
        let now = now_millis();
        let timeout = timeout_ms
            .unwrap_or(MAX_TYPING_TIMEOUT_MS)
            .min(MAX_TYPING_TIMEOUT_MS) as i64;
        if typing && timeout > 0 {
            let expires_at = now + timeout;
            // Already typing: only the expiry moves, the typers did not change.
            let extended = self
                .storage
                .ephemeral
                .extend_typing(room_id, user, expires_at, now)
                .await
                .map_err(internal)?;
            if !extended {
                let position = self
                    .storage
                    .ephemeral
                    .set_typing(room_id, user, expires_at)
                    .await
                    .map_err(internal)?;
                self.notifier.stream_advanced(position);
            }
            return Ok(());
        }
        let rooms = [room_id.to_owned()];
        let typing_now = self
            .storage
            .ephemeral
            .typing_changed(&rooms, i64::MAX, i64::MAX, now)
            .await
            .map_err(internal)?
            .iter()
            .any(|row| row.user_id == user);
        if typing_now {
            let position = self
                .storage
                .ephemeral
                .set_typing(room_id, user, 0)
                .await
                .map_err(internal)?;
            self.notifier.stream_advanced(position);
        }
        Ok(())
    }

    /// Announces the typing notifications that ran out (one stream position for all).
    pub async fn expire_typing(&self) -> Result<()> {
        if let Some(position) = self
            .storage
            .ephemeral
            .expire_typing(now_millis())
            .await
            .map_err(internal)?
        {
            self.notifier.stream_advanced(position);
        }
        Ok(())
    }

    /// The stream's position for a sync of `user` (on `device`), after typing notifications
    /// that ran out became a change, and the newest change of each kind the sync's sections
    /// read (`None` when typing ran out: the position moved after they were read, so every
    /// section is read), and when the next running typing notification runs out (what a
    /// long-poll needs before it waits). With `token`, the same statement checks it still
    /// belongs to the device (401 `M_UNKNOWN_TOKEN` if not).
    pub async fn sync_position(
        &self,
        user: &str,
        device: Option<&str>,
        token: Option<&TokenCheck>,
    ) -> Result<PositionRead> {
        let read = self
            .position_reads
            .read(&self.storage.ephemeral, user, device, token)
            .await?;
        if !read.typing_due {
            return Ok(PositionRead {
                position: read.position,
                heads: Some(read.heads),
                next_typing_expiry: Some(read.next_typing_expiry),
                key_counts: read.key_counts,
            });
        }
        if let Some(expired) = self
            .storage
            .ephemeral
            .expire_typing(now_millis())
            .await
            .map_err(internal)?
        {
            self.notifier.stream_advanced(expired);
        }
        // Read again: the position of the expiry, this process's or another's.
        Ok(PositionRead {
            position: self.rooms.stream_position().await?,
            heads: None,
            next_typing_expiry: None,
            key_counts: read.key_counts,
        })
    }

    /// How long until the next typing notification runs out, if one is running: from
    /// `known` (ms since the epoch, as read with a sync's position) when given, else read.
    pub async fn until_next_typing_expiry(
        &self,
        known: Option<Option<i64>>,
    ) -> Result<Option<std::time::Duration>> {
        let next = match known {
            Some(next) => next,
            None => self
                .storage
                .ephemeral
                .next_typing_expiry()
                .await
                .map_err(internal)?,
        };
        Ok(next.map(|at| std::time::Duration::from_millis((at - now_millis()).max(0) as u64)))
    }

    // -----------------------------------------------------------------------------------------
    // Receipts and read markers

    /// `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}`.
    pub async fn post_receipt(
        &self,
        user: &str,
        room_id: &str,
        receipt_type: &str,
        event_id: &str,
        thread_id: Option<&str>,
    ) -> Result<()> {
        match receipt_type {
            PUBLIC_READ | PRIVATE_READ => {}
            FULLY_READ if thread_id.is_some() => {
                return Err(Error::invalid_param(
                    "thread_id cannot be used with m.fully_read",
                ));
            }
            FULLY_READ => {}
            other => {
                return Err(Error::invalid_param(format!(
                    "Unknown receipt type {other:?}"
                )));
            }
        }
        if let Some(thread_id) = thread_id {
            if thread_id.is_empty() {
                return Err(Error::invalid_param(
                    "thread_id field must be a non-empty string",
                ));
            }
            if thread_id.len() > MAX_THREAD_ID {
                return Err(Error::invalid_param("thread_id is too long"));
            }
        }
        self.require_joined(user, room_id).await?;
        let event = self.visible_event(user, room_id, event_id).await?;
        if receipt_type == FULLY_READ {
            return self.set_fully_read(user, room_id, event_id).await;
        }
        self.put_receipt(user, &event, receipt_type, thread_id)
            .await
    }

    /// `POST /rooms/{roomId}/read_markers`: any of the fully read marker, the public and the
    /// private read receipt.
    pub async fn set_read_markers(
        &self,
        user: &str,
        room_id: &str,
        fully_read: Option<&str>,
        read: Option<&str>,
        read_private: Option<&str>,
    ) -> Result<()> {
        self.require_joined(user, room_id).await?;
        // Every event is checked before anything is written.
        let mut checked = Vec::new();
        for (kind, event_id) in [
            (FULLY_READ, fully_read),
            (PUBLIC_READ, read),
            (PRIVATE_READ, read_private),
        ] {
            if let Some(event_id) = event_id {
                let event = self.visible_event(user, room_id, event_id).await?;
                checked.push((kind, event));
            }
        }
        for (kind, event) in checked {
            match kind {
                FULLY_READ => self.set_fully_read(user, room_id, &event.event_id).await?,
                _ => self.put_receipt(user, &event, kind, None).await?,
            }
        }
        Ok(())
    }

    /// The event, when it is in the room and the user may see it; else 404.
    async fn visible_event(
        &self,
        user: &str,
        room_id: &str,
        event_id: &str,
    ) -> Result<EventRecord> {
        // Checks existence, room and history visibility.
        self.rooms.event(user, room_id, event_id).await?;
        self.storage
            .rooms
            .get_event(event_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Event not found"))
    }

    /// Stores a receipt, unless the user's receipt of that type (and thread) is already at a
    /// later event: receipts only move forward.
    async fn put_receipt(
        &self,
        user: &str,
        event: &EventRecord,
        receipt_type: &str,
        thread_id: Option<&str>,
    ) -> Result<()> {
        let previous = self
            .storage
            .ephemeral
            .get_receipt(&event.room_id, receipt_type, user, thread_id)
            .await
            .map_err(internal)?;
        if let Some(previous) = previous {
            if previous.event_id == event.event_id {
                return Ok(());
            }
            let previous_at = self
                .storage
                .rooms
                .get_event(&previous.event_id)
                .await
                .map_err(internal)?
                .and_then(|e| e.stream_ordering);
            if previous_at.is_some_and(|at| Some(at) > event.stream_ordering) {
                return Ok(());
            }
        }
        let position = self
            .storage
            .ephemeral
            .put_receipt(&ReceiptRecord {
                room_id: event.room_id.clone(),
                receipt_type: receipt_type.to_owned(),
                user_id: user.to_owned(),
                thread_id: thread_id.map(str::to_owned),
                event_id: event.event_id.clone(),
                ts: now_millis(),
                stream_position: 0,
            })
            .await
            .map_err(internal)?;
        self.notifier.stream_advanced(position);
        Ok(())
    }

    /// The fully read marker: room account data of type `m.fully_read`.
    async fn set_fully_read(&self, user: &str, room_id: &str, event_id: &str) -> Result<()> {
        let content = json!({ "event_id": event_id }).to_string();
        let position = self
            .storage
            .account_data
            .put_account_data(user, Some(room_id), FULLY_READ, &content)
            .await
            .map_err(internal)?;
        self.notifier.stream_advanced(position);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Presence

    /// `PUT /presence/{userId}/status`.
    pub async fn set_presence(
        &self,
        user: &str,
        target: &str,
        state: PresenceState,
        status_msg: Option<String>,
    ) -> Result<()> {
        if user != target {
            return Err(Error::forbidden("You may only set your own presence"));
        }
        self.forget_presence(user);
        let position = self
            .storage
            .ephemeral
            .set_presence(&PresenceRecord {
                user_id: user.to_owned(),
                state: state.as_str().to_owned(),
                status_msg,
                last_active_ts: now_millis(),
                stream_position: 0,
            })
            .await
            .map_err(internal)?;
        self.notifier.stream_advanced(position);
        Ok(())
    }

    /// `GET /presence/{userId}/status`: the user's own, or that of a user sharing a joined
    /// room with them (403 otherwise). A user who never set any is offline.
    pub async fn presence(&self, user: &str, target: &str) -> Result<Presence> {
        if user != target && !self.share_a_room(user, target).await? {
            return Err(Error::forbidden(
                "You are not allowed to see their presence",
            ));
        }
        let record = self
            .storage
            .ephemeral
            .get_presence(target)
            .await
            .map_err(internal)?;
        Ok(match record {
            Some(record) => presence_view(&record, now_millis(), self.idle_timeout_ms),
            None => Presence {
                presence: PresenceState::Offline.as_str().to_owned(),
                last_active_ago: None,
                status_msg: None,
                currently_active: None,
            },
        })
    }

    async fn share_a_room(&self, a: &str, b: &str) -> Result<bool> {
        let mine: HashSet<String> = self
            .storage
            .rooms
            .rooms_for_user(a, "join")
            .await
            .map_err(internal)?
            .into_iter()
            .collect();
        Ok(self
            .storage
            .rooms
            .rooms_for_user(b, "join")
            .await
            .map_err(internal)?
            .iter()
            .any(|room| mine.contains(room)))
    }

    /// Whether [`EphemeralService::presence_on_sync`] may touch the database (it has not
    /// recorded this presence recently); an invalid `set_presence` is left to it.
    pub fn presence_on_sync_due(&self, user: &str, set_presence: Option<&str>) -> bool {
        match set_presence.map(PresenceState::parse).transpose() {
            Ok(state) => self.presence_write_due(user, state.unwrap_or(PresenceState::Online)),
            Err(_) => true,
        }
    }

    /// Whether a sync asking for `state` has presence to record: not for `offline` (left
    /// alone), nor while this process recorded the same state within the touch interval.
    fn presence_write_due(&self, user: &str, state: PresenceState) -> bool {
        state != PresenceState::Offline
            && !self.presence_is_fresh(user, state, now_millis(), self.touch_every_ms())
    }

    /// The `set_presence` parameter of `/sync`: absent or `online` marks the user online,
    /// `unavailable` idle, `offline` leaves their presence alone. A change of state takes a
    /// stream position; otherwise only the last active time moves, at most every few seconds
    /// and without one, so that syncing does not wake every room-mate's sync.
    ///
    /// Between those moves a sync does not even read the presence: this process remembers the
    /// state it last stored or read for the user and its last active time, and while that is
    /// younger than the touch interval and the state asked for is the same, there is nothing
    /// to do. Another process changing the user's presence meanwhile (`PUT /presence` there)
    /// is noticed at the next touch, a few seconds later at most, as the last active time was
    /// already; this process's own `PUT /presence` forgets what it remembered.
    pub async fn presence_on_sync(&self, user: &str, set_presence: Option<&str>) -> Result<()> {
        let state = match set_presence {
            None => PresenceState::Online,
            Some(state) => PresenceState::parse(state)?,
        };
        if !self.presence_write_due(user, state) {
            return Ok(());
        }
        let now = now_millis();
        let touch_every = self.touch_every_ms();
        let current = self
            .storage
            .ephemeral
            .get_presence(user)
            .await
            .map_err(internal)?;
        match current {
            Some(current) if current.state == state.as_str() => {
                let mut last_active = current.last_active_ts;
                if now - current.last_active_ts >= touch_every {
                    self.storage
                        .ephemeral
                        .touch_presence(user, now)
                        .await
                        .map_err(internal)?;
                    last_active = now;
                }
                self.remember_presence(user, state, last_active, now, touch_every);
            }
            current => {
                let position = self
                    .storage
                    .ephemeral
                    .set_presence(&PresenceRecord {
                        user_id: user.to_owned(),
                        state: state.as_str().to_owned(),
                        status_msg: current.and_then(|c| c.status_msg),
                        last_active_ts: now,
                        stream_position: 0,
                    })
                    .await
                    .map_err(internal)?;
                self.remember_presence(user, state, now, now, touch_every);
                self.notifier.stream_advanced(position);
            }
        }
        Ok(())
    }

    /// How often syncs move a user's last active time: every few seconds, and at least a few
    /// times per idle timeout (so that a syncing user never goes idle).
    fn touch_every_ms(&self) -> i64 {
        TOUCH_EVERY_MS.min(self.idle_timeout_ms / 4)
    }

    fn presence_memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PresenceState, i64)>> {
        match self.presence_seen.lock() {
            Ok(memory) => memory,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether this process stored or read `state` for the user with a last active time less
    /// than `touch_every` before `now`.
    fn presence_is_fresh(
        &self,
        user: &str,
        state: PresenceState,
        now: i64,
        touch_every: i64,
    ) -> bool {
        self.presence_memory()
            .get(user)
            .is_some_and(|(seen, last_active)| {
                *seen == state && (0..touch_every).contains(&(now - last_active))
            })
    }

    fn remember_presence(
        &self,
        user: &str,
        state: PresenceState,
        last_active: i64,
        now: i64,
        touch_every: i64,
    ) {
        let mut memory = self.presence_memory();
        if memory.len() >= PRESENCE_MEMORY {
            memory.retain(|_, (_, seen)| now - *seen < touch_every);
        }
        memory.insert(user.to_owned(), (state, last_active));
    }

    fn forget_presence(&self, user: &str) {
        self.presence_memory().remove(user);
    }

    /// Moves the online users who have been inactive for the idle timeout to `unavailable`
    /// (one stream position for all, which wakes the syncs that show it). Returns how long
    /// until the next one may go idle.
    pub async fn expire_presence(&self) -> Result<Duration> {
        let idle = self.idle_timeout_ms;
        let now = now_millis();
        if let Some(position) = self
            .storage
            .ephemeral
            .expire_presence(now - idle)
            .await
            .map_err(internal)?
        {
            self.notifier.stream_advanced(position);
        }
        let idle_duration = Duration::from_millis(idle as u64);
        let next = self
            .storage
            .ephemeral
            .oldest_online_activity()
            .await
            .map_err(internal)?;
        Ok(match next {
            // A little after, so that it has run out.
            Some(last_active) => {
                Duration::from_millis((last_active + idle - now + 10).max(0) as u64)
                    .clamp(MIN_EXPIRY_CHECK, idle_duration)
            }
            // Whoever comes online next goes idle an idle timeout from now at the earliest.
            None => idle_duration.max(MIN_EXPIRY_CHECK),
        })
    }

    /// Runs [`EphemeralService::expire_presence`] in the background, each time the next user
    /// may go idle, for as long as the service lives. Every process does so; the first to get
    /// there announces it, the others find nothing left to do.
    pub fn spawn_presence_expiry(self: &Arc<Self>) {
        let service: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = service.upgrade() else {
                    return;
                };
                let wait = match this.expire_presence().await {
                    Ok(wait) => wait,
                    Err(e) => {
                        tracing::warn!(error = %e, "presence expiry failed; retrying");
                        Duration::from_secs(5)
                    }
                };
                drop(this);
                tokio::time::sleep(wait).await;
            }
        });
    }

    // -----------------------------------------------------------------------------------------
    // Sync

    /// The ephemeral part of a sync over `(since, up_to]` (everything current when `since` is
    /// `None`): `m.typing` for joined rooms whose typers changed (initially: where someone
    /// types), `m.receipt` with the receipts that changed (initially: all; private receipts
    /// only the user's own), and the presence of the user and their room-mates. Rooms where
    /// nothing visible changed are left out. Unread counts are added by
    /// [`EphemeralService::add_unread_counts`] once the joined rooms are known.
    pub async fn sync(&self, user: &str, since: Option<i64>, up_to: i64) -> Result<EphemeralSync> {
        self.sync_in(user, None, since, up_to, None).await
    }

    /// As [`EphemeralService::sync`], for the rooms the user has joined when the caller read
    /// them already (`None`: read here). With the `heads` read with `up_to`, the kinds with
    /// nothing newer than `since` are not read.
    pub async fn sync_in(
        &self,
        user: &str,
        joined: Option<Vec<String>>,
        since: Option<i64>,
        up_to: i64,
        heads: Option<&StreamHeads>,
    ) -> Result<EphemeralSync> {
        let after = since.unwrap_or(0);
        let mut out = EphemeralSync::default();
        if after >= up_to && since.is_some() {
            return Ok(out);
        }
        let moved = |head| StreamHeads::moved_after(heads, since, head);
        let (typing_moved, receipts_moved, presence_moved) = (
            moved(|h| h.typing),
            moved(|h| h.receipts),
            moved(|h| h.presence),
        );
        let now = now_millis();
        let storage = &self.storage.ephemeral;
        // Independent reads at once: a long-poll woken by an event waits for the longest chain.
        let in_rooms = async {
            let joined = match joined {
                Some(joined) => joined,
                None => self
                    .storage
                    .rooms
                    .rooms_for_user(user, "join")
                    .await
                    .map_err(internal)?,
            };
            if joined.is_empty() {
                return Ok((Vec::new(), Vec::new()));
            }
            futures::try_join!(
                async {
                    if !typing_moved {
                        return Ok(Vec::new());
                    }
                    storage
                        .typing_changed(&joined, after, up_to, now)
                        .await
                        .map_err(internal)
                },
                async {
                    if !receipts_moved {
                        return Ok(Vec::new());
                    }
                    storage
                        .receipts_changed(&joined, after, up_to)
                        .await
                        .map_err(internal)
                },
            )
        };
        let presence = async {
            if !presence_moved {
                return Ok(Vec::new());
            }
            storage
                .presence_changed(user, after, up_to)
                .await
                .map_err(internal)
        };
        let ((typing, receipts), presence) = futures::try_join!(in_rooms, presence)?;
        typing_events(typing, since, up_to, now, &mut out);
        receipt_events(user, receipts, &mut out);
        out.presence = presence
            .iter()
            .map(|record| presence_event(record, now, self.idle_timeout_ms))
            .collect();
        Ok(out)
    }
}

/// `m.typing` for the rooms whose typers changed in `(since, up_to]` (initially: where
/// someone types), from the typing rows of the user's rooms.
fn typing_events(
    rows: Vec<TypingRecord>,
    since: Option<i64>,
    up_to: i64,
    now: i64,
    out: &mut EphemeralSync,
) {
    let mut rooms: BTreeMap<&str, (bool, Vec<&str>)> = BTreeMap::new();
    for row in &rows {
        let entry = rooms.entry(row.room_id.as_str()).or_default();
        let in_range =
            since.is_none_or(|since| row.stream_position > since) && row.stream_position <= up_to;
        entry.0 |= in_range;
        if row.expires_at > now {
            entry.1.push(row.user_id.as_str());
        }
    }
    for (room_id, (changed, typers)) in rooms {
        // Initially, only where someone types; later, wherever the typers changed.
        let send = match since {
            None => !typers.is_empty(),
            Some(_) => changed,
        };
        if send {
            out.rooms
                .entry(room_id.to_owned())
                .or_default()
                .push(json!({
                    "type": "m.typing",
                    "content": { "user_ids": typers },
                }));
        }
    }
}

/// `m.receipt` per room from the receipts that changed (private ones only the user's own).
fn receipt_events(user: &str, receipts: Vec<ReceiptRecord>, out: &mut EphemeralSync) {
    // room → event → receipt type → user → receipt
    let mut rooms: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for receipt in receipts {
        if receipt.receipt_type == PRIVATE_READ && receipt.user_id != user {
            continue;
        }
        let mut data = Map::new();
        data.insert("ts".to_owned(), json!(receipt.ts));
        if let Some(thread_id) = &receipt.thread_id {
            data.insert("thread_id".to_owned(), json!(thread_id));
        }
        let by_event = rooms.entry(receipt.room_id).or_default();
        let by_type = by_event
            .entry(receipt.event_id)
            .or_insert_with(|| json!({}));
        let by_user = &mut by_type[receipt.receipt_type.as_str()];
        if !by_user.is_object() {
            *by_user = json!({});
        }
        by_user[receipt.user_id.as_str()] = Value::Object(data);
    }
    for (room_id, content) in rooms {
        out.rooms.entry(room_id).or_default().push(json!({
            "type": "m.receipt",
            "content": content,
        }));
    }
}

/// A user's presence as of `now`: an online user inactive for `idle_ms` is `unavailable`
/// (whether or not the expiry task has stored that yet), and only an online user is
/// `currently_active`.
fn presence_view(record: &PresenceRecord, now: i64, idle_ms: i64) -> Presence {
    let ago = (now - record.last_active_ts).max(0);
    let online = PresenceState::Online.as_str();
    let presence = if record.state == online && ago >= idle_ms {
        PresenceState::Unavailable.as_str().to_owned()
    } else {
        record.state.clone()
    };
    Presence {
        currently_active: Some(presence == online),
        presence,
        last_active_ago: Some(ago),
        status_msg: record.status_msg.clone(),
    }
}

/// An `m.presence` event of the sync response.
fn presence_event(record: &PresenceRecord, now: i64, idle_ms: i64) -> Value {
    let view = presence_view(record, now, idle_ms);
    let mut content = Map::new();
    content.insert("presence".to_owned(), json!(view.presence));
    if let Some(ago) = view.last_active_ago {
        content.insert("last_active_ago".to_owned(), json!(ago));
    }
    if let Some(active) = view.currently_active {
        content.insert("currently_active".to_owned(), json!(active));
    }
    if let Some(status) = view.status_msg {
        content.insert("status_msg".to_owned(), json!(status));
    }
    json!({
        "type": "m.presence",
        "sender": record.user_id,
        "content": content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_states_parse() {
        assert_eq!(
            PresenceState::parse("unavailable").expect("parses"),
            PresenceState::Unavailable
        );
        assert!(PresenceState::parse("busy").is_err());
        let record = PresenceRecord {
            user_id: "@a:x".into(),
            state: "online".into(),
            status_msg: Some("here".into()),
            last_active_ts: 1_000,
            stream_position: 3,
        };
        let idle = DEFAULT_IDLE_TIMEOUT.as_millis() as i64;
        let event = presence_event(&record, 2_000, idle);
        assert_eq!(event["content"]["presence"], "online");
        assert_eq!(event["content"]["last_active_ago"], 1_000);
        assert_eq!(event["content"]["currently_active"], true);
        assert_eq!(event["content"]["status_msg"], "here");
        let later = presence_view(&record, 1_000 + idle, idle);
        assert_eq!(later.presence, "unavailable", "idle for the timeout");
        assert_eq!(later.currently_active, Some(false));
        assert_eq!(later.last_active_ago, Some(idle));
        let offline = PresenceRecord {
            state: "offline".into(),
            ..record
        };
        assert_eq!(
            presence_view(&offline, 1_000 + idle, idle).presence,
            "offline"
        );
    }
}
