//! `/sync`: assembles the sections of a sync response and long-polls until something changes.
//!
//! The token (`next_batch`, `since`) is `s<P>_<E>`: `P` the global stream position the answer
//! is complete up to, `E` the ephemeral serial (typing) of this process it has seen. When a
//! device has more to-device messages waiting than one answer hands out, the token is
//! `s<P>_<E>_<D>`: its to-device messages are delivered up to `D` only (`D < P`), and the next
//! sync continues from there.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use palpo_core::{Error, Result};
use palpo_storage::model::{StreamHeads, TokenCheck};
use serde_json::Value;

mod sliding;

use crate::{
    account_data::{AccountDataService, AccountDataSync},
    e2ee::{DeviceLists, E2eeService, E2eeSync, ToDeviceSync},
    ephemeral::{EphemeralService, EphemeralSync, PositionRead},
    filter::{SyncFilter, project_fields},
    notifier::Notifier,
    rooms::{
        EventJson, LazyMembers, RoomService, SyncRequest, SyncRooms, pdu::to_event_json,
        sliding::SlidingResponse,
    },
};

/// Sliding sync connections idle longer than this are forgotten (the client starts over).
const CONNECTION_IDLE: Duration = Duration::from_secs(30 * 60);

/// Lazy-loaded members sent, per (user, device, filter).
type LazyKey = (String, String, String);
type LazyMemory = HashMap<LazyKey, (Instant, Arc<LazyMembers>)>;

/// Longest a client may ask a sync to wait.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncToken {
    pub stream: i64,
    pub ephemeral: u64,
    /// Where the device's to-device messages were delivered up to, when short of `stream`.
    pub to_device: Option<i64>,
}

impl SyncToken {
    pub fn parse(token: &str) -> Result<Self> {
        let invalid = || Error::invalid_param(format!("Invalid sync token {token:?}"));
        let rest = token.strip_prefix('s').ok_or_else(invalid)?;
        let mut parts = rest.split('_');
        let stream = parts
            .next()
            .and_then(|p| p.parse::<i64>().ok())
            .filter(|p| *p >= 0)
            .ok_or_else(invalid)?;
        let ephemeral = match parts.next() {
            Some(e) => e.parse::<u64>().map_err(|_| invalid())?,
            None => 0,
        };
        let to_device = match parts.next() {
            Some(d) => Some(
                d.parse::<i64>()
                    .ok()
                    .filter(|d| (0..=stream).contains(d))
                    .ok_or_else(invalid)?,
            ),
            None => None,
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(SyncToken {
            stream,
            ephemeral,
            to_device,
        })
    }

    /// Where the device's to-device messages were delivered up to.
    pub fn to_device_position(&self) -> i64 {
        self.to_device.unwrap_or(self.stream)
    }
}

impl std::fmt::Display for SyncToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}_{}", self.stream, self.ephemeral)?;
        match self.to_device {
            Some(d) if d < self.stream => write!(f, "_{d}"),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    pub since: Option<String>,
    pub timeout: Duration,
    pub rooms: SyncRequest,
    /// The filter: its room part is in `rooms` already; presence, account data, ephemeral,
    /// event fields and thread counts are applied from here.
    pub filter: SyncFilter,
    /// `(device, filter)` of the request: lazy-loaded members already sent to that device
    /// with that filter are not sent again. `None`: no memory, members are sent every time.
    pub lazy_members_key: Option<(String, String)>,
}

impl SyncOptions {
    /// A sync with `filter` (and `full_state`).
    pub fn new(
        since: Option<String>,
        timeout: Duration,
        full_state: bool,
        filter: SyncFilter,
    ) -> Self {
        SyncOptions {
            since,
            timeout,
            rooms: SyncRequest::from_filter(&filter, full_state),
            filter,
            lazy_members_key: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncResponse {
    pub next_batch: String,
    pub rooms: SyncRooms,
    /// Typing, receipts and unread counts of the joined rooms; presence.
    pub ephemeral: EphemeralSync,
    /// Global account data, and that of the rooms in `rooms`.
    pub account_data: AccountDataSync,
    /// To-device messages, device-list changes and key counts of the syncing device.
    pub e2ee: E2eeSync,
}

impl SyncResponse {
    fn is_empty(&self) -> bool {
        self.rooms.is_empty()
            && self.ephemeral.presence.is_empty()
            && self.account_data.is_empty()
            && self.e2ee.is_empty()
    }
}

/// A sliding sync answer: the rooms, and the extensions the client enabled.
#[derive(Debug, Clone, Default)]
pub struct SlidingSync {
    pub response: SlidingResponse,
    /// Global account data and that of the user's rooms, changed since `pos`.
    pub account_data: Option<AccountDataSync>,
    /// Room id → `m.receipt` event with the receipts changed since `pos`.
    pub receipts: BTreeMap<String, Value>,
    /// Room id → `m.typing` event, for rooms whose typing changed since `pos`.
    pub typing: BTreeMap<String, Value>,
    /// The `to_device` extension: the device's messages after its `since`; `upto` is its
    /// `next_batch`.
    pub to_device: Option<ToDeviceSync>,
    /// The `e2ee` extension: device-list changes since `pos`, the device's key counts.
    pub e2ee: Option<SlidingE2ee>,
}

/// The `e2ee` extension of a sliding sync.
#[derive(Debug, Clone, Default)]
pub struct SlidingE2ee {
    pub device_lists: DeviceLists,
    pub one_time_keys_count: BTreeMap<String, i64>,
    pub unused_fallback_key_types: Vec<String>,
}

impl SlidingSync {
    fn is_empty(&self) -> bool {
        self.response.is_empty()
            && self
                .account_data
                .as_ref()
                .is_none_or(AccountDataSync::is_empty)
            && self.receipts.is_empty()
            && self.typing.is_empty()
            && self.to_device.as_ref().is_none_or(|t| t.events.is_empty())
            && self.e2ee.as_ref().is_none_or(|e| e.device_lists.is_empty())
    }
}

pub struct SyncService {
    rooms: Arc<RoomService>,
    notifier: Arc<Notifier>,
    /// Sliding sync connections, kept in the database (any process continues any of them).
    sliding: sliding::Connections,
    /// Typing, receipts, presence and unread counts; without it a sync has only rooms.
    ephemeral: Option<Arc<EphemeralService>>,
    /// Account data; without it a sync has none.
    account_data: Option<Arc<AccountDataService>>,
    /// To-device messages, device lists and key counts; without it a sync has none.
    e2ee: Option<Arc<E2eeService>>,
    /// Lazy-loaded members sent to each device and filter, in this process.
    lazy: Mutex<LazyMemory>,
    /// The last stream position a sync read, with when the next typing notification then
    /// running ran out: what a long-poll needs to wait without reading it again.
    last_read: Mutex<Option<(i64, Option<i64>)>>,
}

impl SyncService {
    pub fn new(rooms: Arc<RoomService>, notifier: Arc<Notifier>) -> Self {
        let sliding = sliding::Connections::new(rooms.sliding_repo());
        SyncService {
            rooms,
            notifier,
            sliding,
            ephemeral: None,
            account_data: None,
            lazy: Mutex::new(HashMap::new()),
            e2ee: None,
            last_read: Mutex::new(None),
        }
    }

    /// Adds to-device messages, device-list changes and key counts to `/sync`.
    pub fn with_e2ee(mut self, e2ee: Arc<E2eeService>) -> Self {
        self.e2ee = Some(e2ee);
        self
    }

    /// The end-to-end encryption part of a sync of `device` up to `upto` (nothing without a
    /// device or the service).
    async fn e2ee_pass(
        &self,
        user: &str,
        device: Option<&str>,
        since: Option<SyncToken>,
        read: &PositionRead,
    ) -> Result<E2eeSync> {
        let upto = read.position;
        match (&self.e2ee, device) {
            (Some(e2ee), Some(device)) => {
                e2ee.sync(
                    user,
                    device,
                    since.map(|s| s.stream),
                    since.map(|s| s.to_device_position()),
                    upto,
                    read.heads.as_ref(),
                    read.key_counts.clone(),
                )
                .await
            }
            _ => Ok(E2eeSync {
                to_device: ToDeviceSync {
                    events: Vec::new(),
                    upto,
                },
                ..E2eeSync::default()
            }),
        }
    }

    /// Adds typing, receipts, presence and unread counts to `/sync`.
    pub fn with_ephemeral(mut self, ephemeral: Arc<EphemeralService>) -> Self {
        self.ephemeral = Some(ephemeral);
        self
    }

    /// Adds account data (global and per room, tags included) to `/sync`.
    pub fn with_account_data(mut self, account_data: Arc<AccountDataService>) -> Self {
        self.account_data = Some(account_data);
        self
    }

    /// The account data written in `(since, upto]` (all of it up to `upto` for an initial sync).
    /// Not read when the user's account data has nothing newer than `since` (per `heads`).
    async fn account_data_pass(
        &self,
        user: &str,
        since: Option<i64>,
        upto: i64,
        heads: Option<&StreamHeads>,
    ) -> Result<AccountDataSync> {
        if !StreamHeads::moved_after(heads, since, |h| h.account_data) {
            return Ok(AccountDataSync::default());
        }
        match &self.account_data {
            Some(account_data) => account_data.sync(user, since, upto).await,
            None => Ok(AccountDataSync::default()),
        }
    }

    /// One pass of `/sync` over `(since, now]`: the rooms, and the ephemeral sections read up
    /// to the same position. Rooms whose only change is ephemeral are in `join` too.
    /// Likewise account data: the joined rooms whose account data changed are in `join`, and
    /// the response carries the account data of the rooms it carries.
    async fn sync_pass(
        &self,
        user: &str,
        since: Option<i64>,
        request: &SyncRequest,
        filter: &SyncFilter,
        upto: i64,
        heads: Option<&StreamHeads>,
    ) -> Result<(SyncRooms, EphemeralSync, AccountDataSync)> {
        let Some(ephemeral) = &self.ephemeral else {
            let rooms = self
                .rooms
                .sync_rooms_at(
                    user,
                    since,
                    upto,
                    request,
                    &std::collections::HashSet::new(),
                )
                .await?;
            let mut account_data = self.account_data_pass(user, since, upto, heads).await?;
            filter_account_data(filter, &mut account_data);
            account_data.retain_rooms(&rooms.join.keys().chain(rooms.leave.keys()).collect());
            return Ok((rooms, EphemeralSync::default(), account_data));
        };
        // The user's rooms, read once: the ephemeral part needs the joined ones, the rooms
        // part all of them. Independent reads at once: a pass's latency is its longest chain
        // of queries. With a token close behind the stream, the joined rooms' events since, in
        // one read, give the rooms that moved, their timelines and the unread counts' messages.
        let rooms_and_extra = async {
            let memberships = match heads {
                Some(heads) => {
                    self.rooms
                        .memberships_at_head(user, heads.memberships)
                        .await?
                }
                None => self.rooms.memberships_of_user(user).await?,
            };
            let joined: Vec<String> = memberships
                .iter()
                .filter(|m| m.membership == "join")
                .map(|m| m.room_id.clone())
                .collect();
            let (recent, extra) = futures::try_join!(
                self.rooms.recent_events(&joined, since, upto),
                ephemeral.sync_in(user, Some(joined.clone()), since, upto, heads)
            )?;
            Ok::<_, Error>((memberships, recent, extra))
        };
        let ((memberships, recent, mut extra), mut account_data) = futures::try_join!(
            rooms_and_extra,
            self.account_data_pass(user, since, upto, heads)
        )?;
        // Filtered out before choosing rooms: what the filter drops is no news.
        filter_ephemeral(filter, &mut extra);
        filter_account_data(filter, &mut account_data);
        let also = extra
            .rooms
            .keys()
            .chain(account_data.rooms.keys())
            .cloned()
            .collect();
        let rooms = self
            .rooms
            .sync_rooms_of(
                user,
                Some(memberships),
                recent.as_ref(),
                since,
                upto,
                request,
                &also,
            )
            .await?;
        ephemeral
            .add_unread_counts(
                user,
                rooms.join.iter().map(|(id, room)| (id, room.joined_at)),
                upto,
                heads,
                recent.as_ref(),
                &mut extra,
            )
            .await?;
        if !filter.room.timeline.unread_thread_notifications {
            extra.fold_thread_counts();
        }
        account_data.retain_rooms(&rooms.join.keys().chain(rooms.leave.keys()).collect());
        Ok((rooms, extra, account_data))
    }

    /// The stream's position, after typing notifications that ran out became a change.
    /// Every change of every section takes a position, so an unchanged position means there
    /// is nothing new. With it, when known, the newest change of each kind a section reads:
    /// the pass skips the sections with nothing after its `since`.
    async fn current_position(
        &self,
        user: &str,
        device: Option<&str>,
        token: Option<&TokenCheck>,
    ) -> Result<PositionRead> {
        match &self.ephemeral {
            Some(ephemeral) => {
                let read = ephemeral.sync_position(user, device, token).await?;
                if let Some(next_typing_expiry) = read.next_typing_expiry {
                    *self.last_read.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((read.position, next_typing_expiry));
                }
                Ok(read)
            }
            None => {
                if let Some(token) = token {
                    self.rooms.check_token(token).await?;
                }
                Ok(PositionRead {
                    position: self.rooms.stream_position().await?,
                    heads: None,
                    next_typing_expiry: None,
                    key_counts: None,
                })
            }
        }
    }

    /// When the next typing notification runs out, as read with stream position `position`
    /// by the last sync that read it; `None` when the last read was of another position.
    fn typing_expiry_read_at(&self, position: i64) -> Option<Option<i64>> {
        self.last_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|(read, _)| *read == position)
            .map(|(_, next_typing_expiry)| next_typing_expiry)
    }

    /// How long a long-poll may wait: until `deadline`, or until the next typing notification
    /// runs out (which the next pass announces), whichever comes first. `typing_expiry`: that
    /// moment as read with the position (`None`: not read, read here).
    async fn wait_time(
        &self,
        left: Duration,
        typing_expiry: Option<Option<i64>>,
    ) -> Result<Duration> {
        let Some(ephemeral) = &self.ephemeral else {
            return Ok(left);
        };
        Ok(
            match ephemeral.until_next_typing_expiry(typing_expiry).await? {
                // A little after, so that it has run out; never a busy loop.
                Some(until) => {
                    left.min((until + Duration::from_millis(20)).max(Duration::from_millis(100)))
                }
                None => left,
            },
        )
    }

    /// The rooms request of a sync, with the memory of the lazy-loaded members this device
    /// and filter were sent (a fresh one for an initial sync: the client starts over).
    fn with_lazy_members(&self, user: &str, options: &SyncOptions, initial: bool) -> SyncRequest {
        let mut request = options.rooms.clone();
        let Some((device, filter)) = &options.lazy_members_key else {
            return request;
        };
        if !request.lazy_load_members || options.filter.room.state.include_redundant_members {
            return request;
        }
        let mut memory = match self.lazy.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        if memory.len() > 10_000 {
            memory.retain(|_, (used, _)| now.duration_since(*used) < CONNECTION_IDLE);
        }
        let key = (user.to_owned(), device.clone(), filter.clone());
        let entry = memory
            .entry(key)
            .or_insert_with(|| (now, Arc::new(LazyMembers::new())));
        if initial {
            entry.1 = Arc::new(LazyMembers::new());
        }
        entry.0 = now;
        request.lazy_members = Some(entry.1.clone());
        request
    }

    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn sync(&self, user: &str, options: &SyncOptions) -> Result<SyncResponse> {
        self.sync_device(user, None, options, None).await
    }

    /// `/sync` for a device: as [`SyncService::sync`], with the device's to-device messages,
    /// device-list changes and key counts. With `token` (an access token remembered without
    /// asking the database), every read of the position checks it still belongs to the
    /// device, so a token revoked meanwhile ends the sync with 401 `M_UNKNOWN_TOKEN`.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn sync_device(
        &self,
        user: &str,
        device: Option<&str>,
        options: &SyncOptions,
        token: Option<&TokenCheck>,
    ) -> Result<SyncResponse> {
        let since = options.since.as_deref().map(SyncToken::parse).transpose()?;
        let deadline = tokio::time::Instant::now() + options.timeout.min(MAX_TIMEOUT);
        let request = self.with_lazy_members(user, options, since.is_none());
        // A long-poll from where the stream stands, known without reading it (see
        // `Notifier::unchanged_since`), waits first; what a pass reads is read once woken.
        // The token is checked by that read too, as for a long-poll already waiting.
        if let Some(since) = since
            && since.to_device.is_none()
            && !options.rooms.full_state
            && self.notifier.unchanged_since(since.stream, since.ephemeral)
            && let Some(next_typing_expiry) = self.typing_expiry_read_at(since.stream)
            && tokio::time::Instant::now() < deadline
        {
            let wait = self
                .wait_time(
                    deadline - tokio::time::Instant::now(),
                    Some(next_typing_expiry),
                )
                .await?;
            self.notifier
                .wait(since.stream, since.ephemeral, wait)
                .await;
        }
        loop {
            // Read the serial first: a change after this point wakes the wait below.
            let ephemeral = self.notifier.ephemeral_serial();
            // A long-poll that starts where the stream is has nothing to answer yet: wait
            // without reading every section first.
            let read = self.current_position(user, device, token).await?;
            let (upto, heads) = (read.position, read.heads);
            if let Some(since) = since
                && upto == since.stream
                && since.ephemeral == ephemeral
                && since.to_device.is_none()
                && !options.rooms.full_state
                && tokio::time::Instant::now() < deadline
            {
                let wait = self
                    .wait_time(
                        deadline - tokio::time::Instant::now(),
                        read.next_typing_expiry,
                    )
                    .await?;
                self.notifier.wait(since.stream, ephemeral, wait).await;
                continue;
            }
            let ((mut rooms, extra, account_data), e2ee) = futures::try_join!(
                self.sync_pass(
                    user,
                    since.map(|s| s.stream),
                    &request,
                    &options.filter,
                    upto,
                    heads.as_ref(),
                ),
                self.e2ee_pass(user, device, since, &read)
            )?;
            if let Some(fields) = &options.filter.event_fields {
                project_room_events(&mut rooms, fields);
            }
            let response = SyncResponse {
                next_batch: SyncToken {
                    stream: rooms.position,
                    ephemeral,
                    to_device: Some(e2ee.to_device.upto),
                }
                .to_string(),
                rooms,
                ephemeral: extra,
                account_data,
                e2ee,
            };
            let now = tokio::time::Instant::now();
            if since.is_none()
                || !response.is_empty()
                || options.rooms.full_state
                || now >= deadline
            {
                return Ok(response);
            }
            let position = response.rooms.position;
            let wait = self
                .wait_time(deadline - now, read.next_typing_expiry)
                .await?;
            if !self.notifier.wait(position, ephemeral, wait).await {
                // Timed out; the loop answers (empty) at once, having checked one last time.
                continue;
            }
        }
    }
}

/// Applies the filter's `room.ephemeral` and `presence` parts.
fn filter_ephemeral(filter: &SyncFilter, extra: &mut EphemeralSync) {
    let room_filter = &filter.room.ephemeral;
    for (room_id, events) in extra.rooms.iter_mut() {
        *events = room_filter.apply_unsent(room_id, std::mem::take(events));
    }
    extra.rooms.retain(|_, events| !events.is_empty());
    extra.presence = filter.presence.apply(std::mem::take(&mut extra.presence));
}

/// Applies the filter's `account_data` and `room.account_data` parts.
fn filter_account_data(filter: &SyncFilter, account_data: &mut AccountDataSync) {
    account_data.global = filter
        .account_data
        .apply(std::mem::take(&mut account_data.global));
    let room_filter = &filter.room.account_data;
    for (room_id, events) in account_data.rooms.iter_mut() {
        *events = room_filter.apply_unsent(room_id, std::mem::take(events));
    }
    account_data.rooms.retain(|_, events| !events.is_empty());
}

/// Keeps only the `event_fields` of the filter in the rooms' timeline and state events.
fn project_room_events(rooms: &mut SyncRooms, fields: &[Vec<String>]) {
    let project = |events: &mut Vec<EventJson>| {
        for event in events.iter_mut() {
            let value: Value = serde_json::from_str(event.get()).unwrap_or_default();
            *event = to_event_json(&project_fields(&value, fields));
        }
    };
    for room in rooms.join.values_mut() {
        project(&mut room.timeline.events);
        project(&mut room.state);
    }
    for room in rooms.leave.values_mut() {
        project(&mut room.timeline.events);
        project(&mut room.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_accept_the_short_form() {
        let token = SyncToken {
            stream: 42,
            ephemeral: 7,
            to_device: None,
        };
        assert_eq!(token.to_string(), "s42_7");
        assert_eq!(SyncToken::parse(&token.to_string()).expect("parses"), token);
        assert_eq!(
            SyncToken::parse("s5").expect("parses"),
            SyncToken {
                stream: 5,
                ephemeral: 0,
                to_device: None,
            }
        );
        assert!(SyncToken::parse("x5").is_err());
        assert!(SyncToken::parse("s-1_0").is_err());
        assert!(SyncToken::parse("s1_x").is_err());
        // To-device messages delivered short of the stream position.
        let short = SyncToken {
            stream: 42,
            ephemeral: 7,
            to_device: Some(40),
        };
        assert_eq!(short.to_string(), "s42_7_40");
        assert_eq!(SyncToken::parse("s42_7_40").expect("parses"), short);
        assert_eq!(short.to_device_position(), 40);
        assert_eq!(token.to_device_position(), 42);
        // Delivered up to the stream position is the plain form.
        let full = SyncToken {
            to_device: Some(42),
            ..token
        };
        assert_eq!(full.to_string(), "s42_7");
        assert!(SyncToken::parse("s42_7_43").is_err(), "past the stream");
        assert!(SyncToken::parse("s42_7_x").is_err());
        assert!(SyncToken::parse("s42_7_40_1").is_err());
    }
}
