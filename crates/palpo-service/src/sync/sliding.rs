//! Simplified sliding sync (MSC4186) connections, kept in the database so that any server
//! process sharing it can continue any connection.
//!
//! Every answer hands out a `pos`, `<connection key>_<position id>`: the connection's random
//! key (new each time the connection starts) and a position number. The database holds, per
//! position, the stream position the answer was complete up to and the room set: what the
//! connection had sent of each room ([`SentRooms`]). A request continuing from `pos` reads them
//! (a room set never changes once written, so this process remembers the last ones it read or
//! wrote), answers what changed since, and hands out the next position; an answer that changed
//! nothing keeps the same `pos`. A connection unused for [`CONNECTION_IDLE`] is unknown
//! (`M_UNKNOWN_POS`) and then deleted.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use palpo_core::{Error, Result, now_millis};
use palpo_storage::{
    SlidingSyncRepo,
    model::{NewSlidingPosition, SlidingPositionRecord, SlidingRoomRecord, SlidingRoomSet},
};

use super::{CONNECTION_IDLE, MAX_TIMEOUT, SlidingE2ee, SlidingSync, SyncService};
use crate::rooms::sliding::{
    SentRoom, SentRooms, SlidingRequest, SlidingResponse, StatePatterns, unknown_pos,
};

/// Longest `conn_id` accepted (it is part of a database key).
pub const MAX_CONN_ID: usize = 200;
/// Connections one device may hold; starting another drops its least recently used.
const CONNECTIONS_PER_DEVICE: usize = 32;
/// How often a process deletes idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(5 * 60);
/// Most idle connections one sweep deletes.
const SWEEP_BATCH: i64 = 1000;
/// Room sets this process remembers.
const ROOM_SETS_REMEMBERED: usize = 128;
/// An answer that hands out no new position marks the connection used when it was last marked
/// longer ago than this (ms).
const TOUCH_AFTER_MS: i64 = 60_000;

/// The connection key and position id of a `pos`.
fn parse_pos(pos: &str) -> Option<(i64, i64)> {
    let (key, position) = pos.split_once('_')?;
    let key = key.parse::<i64>().ok().filter(|k| *k > 0)?;
    let position = position.parse::<i64>().ok().filter(|p| *p > 0)?;
    Some((key, position))
}

fn format_pos(key: i64, position: i64) -> String {
    format!("{key}_{position}")
}

/// A connection's ids: (user, device, conn_id).
type ConnectionIds = (String, String, String);

/// Turn-taking, remembered room sets and the idle sweep of this process's connections.
pub(super) struct Connections {
    repo: Arc<dyn SlidingSyncRepo>,
    /// Requests on one connection (user, device, conn_id) take turns in this process.
    turns: Mutex<HashMap<ConnectionIds, Arc<Turn>>>,
    room_sets: Mutex<RoomSets>,
    last_sweep: Mutex<Option<Instant>>,
}

/// Requests on one connection take turns; a new one ends the long-poll of the one before (a
/// client sends another request only once it gave up on the previous one, which may still be
/// waiting if its cancellation went unnoticed).
#[derive(Default)]
struct Turn {
    lock: tokio::sync::Mutex<()>,
    next_waits: tokio::sync::Notify,
}

/// (connection key, room set) → its rooms; the oldest go first.
#[derive(Default)]
struct RoomSets {
    sets: HashMap<(i64, i64), Arc<SentRooms>>,
    order: VecDeque<(i64, i64)>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Connections {
    pub(super) fn new(repo: Arc<dyn SlidingSyncRepo>) -> Self {
        Connections {
            repo,
            turns: Mutex::new(HashMap::new()),
            room_sets: Mutex::new(RoomSets::default()),
            last_sweep: Mutex::new(None),
        }
    }

    fn turn(&self, user: &str, device: &str, conn_id: &str) -> Arc<Turn> {
        let mut turns = locked(&self.turns);
        // Forget the turns nobody holds or waits for.
        if turns.len() >= 1024 {
            turns.retain(|_, turn| Arc::strong_count(turn) > 1);
        }
        turns
            .entry((user.to_owned(), device.to_owned(), conn_id.to_owned()))
            .or_default()
            .clone()
    }

    /// The rooms of a room set: remembered, or read.
    async fn room_set(&self, key: i64, room_set: i64) -> Result<Arc<SentRooms>> {
        if let Some(rooms) = locked(&self.room_sets).sets.get(&(key, room_set)) {
            return Ok(rooms.clone());
        }
        let records = self
            .repo
            .sliding_rooms(key, room_set)
            .await
            .map_err(Error::internal)?;
        let rooms = Arc::new(from_records(records)?);
        self.remember(key, room_set, rooms.clone());
        Ok(rooms)
    }

    fn remember(&self, key: i64, room_set: i64, rooms: Arc<SentRooms>) {
        let mut cache = locked(&self.room_sets);
        if cache.sets.insert((key, room_set), rooms).is_none() {
            cache.order.push_back((key, room_set));
        }
        while cache.order.len() > ROOM_SETS_REMEMBERED {
            if let Some(oldest) = cache.order.pop_front() {
                cache.sets.remove(&oldest);
            }
        }
    }

    /// Hands out the `pos` of an answer that continued from `base` (`None`: the connection's
    /// first), is complete up to `stream_position` and left the connection having sent `sent`
    /// (`None`: as at `base`).
    async fn hand_out(
        &self,
        key: i64,
        base: Option<SlidingPositionRecord>,
        sent: Option<SentRooms>,
        stream_position: i64,
    ) -> Result<String> {
        let now = now_millis();
        if let Some(base) = base
            && sent.is_none()
            && stream_position == base.stream_position
        {
            if now - base.last_used_ts > TOUCH_AFTER_MS {
                self.repo
                    .touch_sliding_connection(key, now)
                    .await
                    .map_err(Error::internal)?;
            }
            return Ok(format_pos(key, base.position_id));
        }
        let (rooms, new_set) = match (sent, base) {
            (Some(sent), _) => (SlidingRoomSet::New(to_records(&sent)), Some(Arc::new(sent))),
            (None, Some(base)) => (SlidingRoomSet::Same(base.room_set), None),
            (None, None) => (
                SlidingRoomSet::New(Vec::new()),
                Some(Arc::new(SentRooms::new())),
            ),
        };
        let position = self
            .repo
            .add_sliding_position(&NewSlidingPosition {
                connection_key: key,
                acknowledged: base.map(|b| b.position_id),
                stream_position,
                rooms,
                now,
            })
            .await
            .map_err(Error::internal)?
            // Restarted or expired meanwhile (by a request on another process).
            .ok_or_else(unknown_pos)?;
        if let Some(rooms) = new_set {
            self.remember(key, position.room_set, rooms);
        }
        Ok(format_pos(key, position.position_id))
    }

    /// Deletes idle connections in the background, at most every [`SWEEP_EVERY`].
    fn sweep(&self) {
        {
            let mut last = locked(&self.last_sweep);
            if last.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let repo = self.repo.clone();
        let before = now_millis() - CONNECTION_IDLE.as_millis() as i64;
        tokio::spawn(async move {
            match repo
                .delete_idle_sliding_connections(before, SWEEP_BATCH)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(n, "deleted idle sliding sync connections"),
                Err(e) => tracing::warn!("cannot delete idle sliding sync connections: {e}"),
            }
        });
    }
}

fn to_records(sent: &SentRooms) -> Vec<SlidingRoomRecord> {
    sent.iter()
        .map(|(room_id, room)| SlidingRoomRecord {
            room_id: room_id.clone(),
            membership: room.membership.clone(),
            sent_upto: room.sent_upto,
            required_state: serde_json::to_string(room.required_state.as_slice())
                .unwrap_or_else(|_| "[]".to_owned()),
        })
        .collect()
}

fn from_records(records: Vec<SlidingRoomRecord>) -> Result<SentRooms> {
    // Rooms sent with the same configuration share it.
    let mut configurations: HashMap<String, Arc<StatePatterns>> = HashMap::new();
    let mut sent = SentRooms::with_capacity(records.len());
    for record in records {
        let required_state = match configurations.get(&record.required_state) {
            Some(patterns) => patterns.clone(),
            None => {
                let patterns: StatePatterns = serde_json::from_str(&record.required_state)
                    .map_err(|e| Error::internal(format!("stored required_state: {e}")))?;
                let patterns = Arc::new(patterns);
                configurations.insert(record.required_state, patterns.clone());
                patterns
            }
        };
        sent.insert(
            record.room_id,
            SentRoom {
                membership: record.membership,
                sent_upto: record.sent_upto,
                required_state,
            },
        );
    }
    Ok(sent)
}

impl SyncService {
    /// Simplified sliding sync (MSC4186), long-polling up to `timeout` when nothing changed.
    #[tracing::instrument(skip_all, fields(user = %user))]
    pub async fn sliding_sync(
        &self,
        user: &str,
        device: &str,
        request: &SlidingRequest,
        timeout: Duration,
    ) -> Result<SlidingSync> {
        if request.conn_id.chars().count() > MAX_CONN_ID {
            return Err(Error::invalid_param(format!(
                "conn_id is longer than {MAX_CONN_ID} characters"
            )));
        }
        let turn = self.sliding.turn(user, device, &request.conn_id);
        turn.next_waits.notify_waiters();
        let _turn = turn.lock.lock().await;
        // From here on, a later request on the connection ends this one's waiting.
        let superseded = turn.next_waits.notified();
        tokio::pin!(superseded);
        superseded.as_mut().enable();
        self.sliding.sweep();
        let repo = &self.sliding.repo;
        let (key, base, sent) = match &request.pos {
            None => {
                let key = repo
                    .start_sliding_connection(
                        user,
                        device,
                        &request.conn_id,
                        now_millis(),
                        CONNECTIONS_PER_DEVICE,
                    )
                    .await
                    .map_err(Error::internal)?;
                (key, None, Arc::new(SentRooms::new()))
            }
            Some(pos) => {
                let (key, position) = parse_pos(pos).ok_or_else(unknown_pos)?;
                let used_since = now_millis() - CONNECTION_IDLE.as_millis() as i64;
                let base = repo
                    .sliding_position(user, device, &request.conn_id, key, position, used_since)
                    .await
                    .map_err(Error::internal)?
                    .ok_or_else(unknown_pos)?;
                let sent = self.sliding.room_set(key, base.room_set).await?;
                (key, Some(base), sent)
            }
        };
        let since = base.map(|b| b.stream_position);
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_TIMEOUT);
        let (mut answer, now_sent) = loop {
            let ephemeral = self.notifier.ephemeral_serial();
            if let Some(service) = &self.ephemeral {
                service.expire_typing().await?;
            }
            let pass = self.rooms.sliding_sync(user, request, since, &sent).await?;
            let answer = self
                .sliding_extensions(user, device, request, since, pass.response)
                .await?;
            let now = tokio::time::Instant::now();
            if since.is_none() || !answer.is_empty() || now >= deadline {
                break (answer, pass.sent);
            }
            let wait = self.wait_time(deadline - now, None).await?;
            tokio::select! {
                _ = self.notifier.wait(answer.response.stream_position, ephemeral, wait) => {}
                _ = superseded.as_mut() => break (answer, pass.sent),
            }
        };
        answer.response.pos = self
            .sliding
            .hand_out(key, base, now_sent, answer.response.stream_position)
            .await?;
        Ok(answer)
    }

    /// The enabled extensions of a sliding sync, read over `(since, response's position]`.
    async fn sliding_extensions(
        &self,
        user: &str,
        device: &str,
        request: &SlidingRequest,
        since: Option<i64>,
        response: SlidingResponse,
    ) -> Result<SlidingSync> {
        let upto = response.stream_position;
        let mut answer = SlidingSync {
            response,
            ..SlidingSync::default()
        };
        let wanted = request.extensions;
        self.sliding_e2ee(user, device, request, since, &mut answer)
            .await?;
        if wanted.account_data {
            answer.account_data = Some(self.account_data_pass(user, since, upto, None).await?);
        }
        if (wanted.receipts || wanted.typing)
            && let Some(ephemeral) = &self.ephemeral
        {
            let extra = ephemeral.sync(user, since, upto).await?;
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

    /// The `to_device` and `e2ee` extensions of a sliding sync, read up to `answer`'s position.
    async fn sliding_e2ee(
        &self,
        user: &str,
        device: &str,
        request: &SlidingRequest,
        since: Option<i64>,
        answer: &mut SlidingSync,
    ) -> Result<()> {
        let Some(e2ee) = &self.e2ee else {
            return Ok(());
        };
        let wanted = request.extensions;
        let upto = answer.response.stream_position;
        if wanted.to_device {
            answer.to_device = Some(
                e2ee.to_device(
                    user,
                    device,
                    wanted.to_device_since,
                    upto,
                    wanted.to_device_limit,
                )
                .await?,
            );
        }
        if wanted.e2ee {
            let (device_lists, one_time_keys_count, unused_fallback_key_types) =
                e2ee.keys_sync(user, device, since, upto, None).await?;
            answer.e2ee = Some(SlidingE2ee {
                device_lists,
                one_time_keys_count,
                unused_fallback_key_types,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{format_pos, parse_pos};

    #[test]
    fn positions_round_trip_and_reject_garbage() {
        assert_eq!(parse_pos(&format_pos(42, 7)), Some((42, 7)));
        assert_eq!(parse_pos(&format_pos(i64::MAX, 1)), Some((i64::MAX, 1)));
        for bad in [
            "", "12", "_1", "1_", "0_1", "1_0", "-1_1", "a_1", "1_2_3", "12 ",
        ] {
            assert_eq!(parse_pos(bad), None, "{bad:?}");
        }
    }
}
