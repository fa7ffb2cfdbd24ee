//! `/sync`: assembles the sections of a sync response and long-polls until something changes.
//!
//! The token (`next_batch`, `since`) is `s<P>_<E>`: `P` the global stream position the answer
//! is complete up to, `E` the ephemeral serial (typing) of this process it has seen.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use palpo_core::{Error, ErrorCode, Result};
use serde_json::Value;

use crate::{
    account_data::{AccountDataService, AccountDataSync},
    ephemeral::{EphemeralService, EphemeralSync},
    notifier::Notifier,
    rooms::{
        RoomService, SyncRequest, SyncRooms,
        sliding::{ConnectionState, SlidingRequest, SlidingResponse},
    },
};

/// Sliding sync connections idle longer than this are forgotten (the client starts over).
const CONNECTION_IDLE: Duration = Duration::from_secs(30 * 60);

/// A sliding sync connection: (user, device, conn_id).
type ConnectionKey = (String, String, String);
type Connections = HashMap<ConnectionKey, (Instant, Arc<tokio::sync::Mutex<ConnectionState>>)>;

/// Longest a client may ask a sync to wait.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncToken {
    pub stream: i64,
    pub ephemeral: u64,
}

impl SyncToken {
    pub fn parse(token: &str) -> Result<Self> {
        let invalid = || Error::invalid_param(format!("Invalid sync token {token:?}"));
        let rest = token.strip_prefix('s').ok_or_else(invalid)?;
        let (stream, ephemeral) = match rest.split_once('_') {
            Some((stream, ephemeral)) => (stream, Some(ephemeral)),
            None => (rest, None),
        };
        let stream = stream
            .parse::<i64>()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(invalid)?;
        let ephemeral = match ephemeral {
            Some(e) => e.parse::<u64>().map_err(|_| invalid())?,
            None => 0,
        };
        Ok(SyncToken { stream, ephemeral })
    }
}

impl std::fmt::Display for SyncToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}_{}", self.stream, self.ephemeral)
    }
}

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub since: Option<String>,
    pub timeout: Duration,
    pub rooms: SyncRequest,
}

#[derive(Debug, Clone)]
pub struct SyncResponse {
    pub next_batch: String,
    pub rooms: SyncRooms,
    /// Typing, receipts and unread counts of the joined rooms; presence.
    pub ephemeral: EphemeralSync,
    /// Global account data, and that of the rooms in `rooms`.
    pub account_data: AccountDataSync,
}

impl SyncResponse {
    fn is_empty(&self) -> bool {
        self.rooms.is_empty() && self.ephemeral.presence.is_empty() && self.account_data.is_empty()
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
    }
}

pub struct SyncService {
    rooms: Arc<RoomService>,
    notifier: Arc<Notifier>,
    /// Sliding sync connections of this process. A connection is bound to the process that
    /// serves it; elsewhere its `pos` is unknown and the client starts over (`M_UNKNOWN_POS`).
    connections: Mutex<Connections>,
    /// Typing, receipts, presence and unread counts; without it a sync has only rooms.
    ephemeral: Option<Arc<EphemeralService>>,
    /// Account data; without it a sync has none.
    account_data: Option<Arc<AccountDataService>>,
}

impl SyncService {
    pub fn new(rooms: Arc<RoomService>, notifier: Arc<Notifier>) -> Self {
        SyncService {
            rooms,
            notifier,
            connections: Mutex::new(HashMap::new()),
            ephemeral: None,
            account_data: None,
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
    async fn account_data_pass(
        &self,
        user: &str,
        since: Option<i64>,
        upto: i64,
    ) -> Result<AccountDataSync> {
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
    ) -> Result<(SyncRooms, EphemeralSync, AccountDataSync)> {
        let Some(ephemeral) = &self.ephemeral else {
            let rooms = self.rooms.sync_rooms(user, since, request).await?;
            let mut account_data = self.account_data_pass(user, since, rooms.position).await?;
            account_data.retain_rooms(&rooms.join.keys().chain(rooms.leave.keys()).collect());
            return Ok((rooms, EphemeralSync::default(), account_data));
        };
        // Typing notifications that ran out become a change of the stream first.
        ephemeral.expire_typing().await?;
        let upto = ephemeral.stream_position().await?;
        let mut extra = ephemeral.sync(user, since, upto).await?;
        let mut account_data = self.account_data_pass(user, since, upto).await?;
        let also = extra
            .rooms
            .keys()
            .chain(account_data.rooms.keys())
            .cloned()
            .collect();
        let rooms = self
            .rooms
            .sync_rooms_at(user, since, upto, request, &also)
            .await?;
        ephemeral
            .add_unread_counts(user, rooms.join.keys(), upto, &mut extra)
            .await?;
        account_data.retain_rooms(&rooms.join.keys().chain(rooms.leave.keys()).collect());
        Ok((rooms, extra, account_data))
    }

    /// How long a long-poll may wait: until `deadline`, or until the next typing notification
    /// runs out (which the next pass announces), whichever comes first.
    async fn wait_time(&self, left: Duration) -> Result<Duration> {
        let Some(ephemeral) = &self.ephemeral else {
            return Ok(left);
        };
        Ok(match ephemeral.until_next_typing_expiry().await? {
            // A little after, so that it has run out; never a busy loop.
            Some(until) => {
                left.min((until + Duration::from_millis(20)).max(Duration::from_millis(100)))
            }
            None => left,
        })
    }

    /// The state of a sliding sync connection; `None` when `pos` refers to one we do not know.
    fn connection(
        &self,
        key: ConnectionKey,
        has_pos: bool,
    ) -> Option<Arc<tokio::sync::Mutex<ConnectionState>>> {
        let mut connections = match self.connections.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        if connections.len() > 10_000 {
            connections.retain(|_, (used, _)| now.duration_since(*used) < CONNECTION_IDLE);
        }
        match connections.get_mut(&key) {
            Some((used, state)) => {
                *used = now;
                Some(state.clone())
            }
            None if has_pos => None,
            None => {
                let state = Arc::new(tokio::sync::Mutex::new(ConnectionState::default()));
                connections.insert(key, (now, state.clone()));
                Some(state)
            }
        }
    }

    /// Simplified sliding sync (MSC4186), long-polling up to `timeout` when nothing changed.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn sliding_sync(
        &self,
        user: &str,
        device: &str,
        request: &SlidingRequest,
        timeout: Duration,
    ) -> Result<SlidingSync> {
        let key = (user.to_owned(), device.to_owned(), request.conn_id.clone());
        let state = self.connection(key, request.pos.is_some()).ok_or_else(|| {
            Error::new(
                ErrorCode::UnknownPos,
                "Unknown position: start a new connection",
            )
        })?;
        // Requests on one connection take turns.
        let mut state = state.lock().await;
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_TIMEOUT);
        loop {
            let ephemeral = self.notifier.ephemeral_serial();
            if let Some(service) = &self.ephemeral {
                service.expire_typing().await?;
            }
            let response = self.rooms.sliding_sync(user, request, &mut state).await?;
            let answer = self.sliding_extensions(user, request, response).await?;
            let now = tokio::time::Instant::now();
            if request.pos.is_none() || !answer.is_empty() || now >= deadline {
                return Ok(answer);
            }
            let wait = self.wait_time(deadline - now).await?;
            self.notifier
                .wait(answer.response.pos, ephemeral, wait)
                .await;
        }
    }

    /// The enabled extensions of a sliding sync, read over `(pos, response.pos]`.
    async fn sliding_extensions(
        &self,
        user: &str,
        request: &SlidingRequest,
        response: SlidingResponse,
    ) -> Result<SlidingSync> {
        let upto = response.pos;
        let mut answer = SlidingSync {
            response,
            ..SlidingSync::default()
        };
        let wanted = request.extensions;
        if wanted.account_data {
            answer.account_data = Some(self.account_data_pass(user, request.pos, upto).await?);
        }
        if (wanted.receipts || wanted.typing)
            && let Some(ephemeral) = &self.ephemeral
        {
            let extra = ephemeral.sync(user, request.pos, upto).await?;
            for (room_id, events) in extra.rooms {
                for event in events {
                    match event["type"].as_str() {
                        Some("m.receipt") if wanted.receipts => {
                            answer.receipts.insert(room_id.clone(), event);
                        }
                        Some("m.typing") if wanted.typing => {
                            answer.typing.insert(room_id.clone(), event);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(answer)
    }

    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn sync(&self, user: &str, options: &SyncOptions) -> Result<SyncResponse> {
        let since = options.since.as_deref().map(SyncToken::parse).transpose()?;
        let deadline = tokio::time::Instant::now() + options.timeout.min(MAX_TIMEOUT);
        loop {
            // Read the serial first: a change after this point wakes the wait below.
            let ephemeral = self.notifier.ephemeral_serial();
            let (rooms, extra, account_data) = self
                .sync_pass(user, since.map(|s| s.stream), &options.rooms)
                .await?;
            let response = SyncResponse {
                next_batch: SyncToken {
                    stream: rooms.position,
                    ephemeral,
                }
                .to_string(),
                rooms,
                ephemeral: extra,
                account_data,
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
            let wait = self.wait_time(deadline - now).await?;
            if !self.notifier.wait(position, ephemeral, wait).await {
                // Timed out; the loop answers (empty) at once, having checked one last time.
                continue;
            }
        }
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
        };
        assert_eq!(SyncToken::parse(&token.to_string()).expect("parses"), token);
        assert_eq!(
            SyncToken::parse("s5").expect("parses"),
            SyncToken {
                stream: 5,
                ephemeral: 0
            }
        );
        assert!(SyncToken::parse("x5").is_err());
        assert!(SyncToken::parse("s-1_0").is_err());
        assert!(SyncToken::parse("s1_x").is_err());
    }
}
