//! Rooms: creating and authorizing events, membership, and reading timelines and state with
//! history visibility enforced.
//!
//! Local events are created one at a time per room: an in-process lock per room, and, across
//! processes sharing a database, an optimistic check of the room's write version inside the
//! persisting transaction (rebuilt under the room's database lock on conflict). Events of
//! different rooms are committed together when they are sent at once (group commit, see
//! `persister`).

mod create;
mod directory;
mod lazy;
mod membership;
pub mod pdu;
mod persister;
mod prefetch;
mod read;
mod resolve;
pub mod sliding;
mod stream_tail;
mod sync;
mod threads;
mod timeline;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use palpo_core::{Config, Error, Result};
use palpo_storage::Storage;
use ruma::{RoomVersionId, room_version_rules::RoomVersionRules};

pub use create::{CreateRoom, InitialState, Preset};
pub use directory::{PublishedRoom, PublishedRoomsPage, PublishedRoomsQuery};
pub use lazy::LazyMembers;
pub use palpo_storage::model::Direction;
pub use pdu::EventJson;
pub use prefetch::{RECENT_RANGE, RecentEvents};
pub use read::{MessagesPage, MessagesQuery, TimelineFilter, parse_token, token};
pub use sync::{InvitedRoom, JoinedRoom, LeftRoom, RoomSummary, SyncRequest, SyncRooms, Timeline};
pub use timeline::EventDraft;

use crate::{internal, keys::ServerKeys, notifier::Notifier};

/// Room versions this server understands, as `(version, stable)`.
pub const ROOM_VERSIONS: &[&str] = &[
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12",
];

/// Rooms whose head a process keeps.
const ROOM_HEADS: std::num::NonZeroUsize = crate::cache_capacity(1024);

/// Rooms whose version a process keeps.
const KEPT_ROOM_VERSIONS: std::num::NonZeroUsize = crate::cache_capacity(4096);

/// A user's memberships and the membership head they were read at.
type KeptMemberships = (Option<i64>, Vec<palpo_storage::model::MembershipRecord>);

/// Users whose memberships a process keeps between syncs.
const KEPT_MEMBERSHIPS: std::num::NonZeroUsize = crate::cache_capacity(4096);

/// (state group, user) pairs whose visibility facts a process keeps.
const GROUP_VISIBILITY: std::num::NonZeroUsize = crate::cache_capacity(16_384);

/// Auth events kept parsed (create, power levels, join rules and members of busy rooms).
const AUTH_EVENT_CACHE: std::num::NonZeroUsize = crate::cache_capacity(4096);

pub struct RoomService {
    config: Arc<Config>,
    storage: Storage,
    /// Loaded (or created) on first use; `palpo serve` does that at start-up.
    keys: tokio::sync::OnceCell<Arc<ServerKeys>>,
    /// Told of every persisted event, so long-polling syncs wake.
    notifier: Arc<Notifier>,
    /// One async lock per room, so local events of a room are built one at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Recently used auth events, parsed. Events never change once stored (a redaction marks
    /// the row but leaves the PDU), so every process may keep its own copy; sending into a
    /// room re-reads the same create, power levels and member events every time otherwise.
    auth_events: Mutex<lru::LruCache<String, Arc<pdu::Pdu>>>,
    /// The `type` of rooms' create events (which never change), for sliding sync's filters.
    room_types: Mutex<HashMap<String, Option<String>>>,
    /// The head of rooms this process sent to recently, to build the next event on without
    /// reading the room again (see [`timeline::RoomHead`]).
    heads: Mutex<lru::LruCache<String, timeline::RoomHead>>,
    /// Rooms' versions, which never change.
    versions: Mutex<lru::LruCache<String, String>>,
    /// Per state group and user, the room's history visibility and the user's membership in
    /// that state (both immutable): what deciding whether they see an event needs.
    group_visibility: Mutex<lru::LruCache<(i64, String), (String, String)>>,
    /// Per user, their memberships as last read for a sync and the membership head they were
    /// read at (see [`RoomService::memberships_at_head`]).
    user_memberships: Mutex<lru::LruCache<String, KeptMemberships>>,
    /// The newest timeline events of every room, shared by this process's woken syncs.
    stream_tail: stream_tail::StreamTail,
    /// Writes local events, several to a transaction.
    persister: persister::Persister,
    /// Room write locks held at once by this process (each holds a pool connection while its
    /// event is built; see `timeline`): fewer than the pool has connections, with room left
    /// for the persister's transactions and the reads building an event makes.
    held_room_locks: tokio::sync::Semaphore,
}

/// See [`RoomService::held_room_locks`]: the primary pool's connections less the
/// persister's transactions ([`persister::MAX_WRITERS`]) and one for reads, at least one.
fn held_room_locks(storage: &Storage) -> usize {
    let pool = usize::try_from(storage.db().primary().max_connections()).unwrap_or(usize::MAX);
    pool.saturating_sub(persister::MAX_WRITERS + 1).max(1)
}

impl RoomService {
    pub fn new(config: Arc<Config>, storage: Storage, notifier: Arc<Notifier>) -> Self {
        let held_locks = held_room_locks(&storage);
        let persister = persister::Persister::new(&storage, notifier.clone());
        RoomService {
            config,
            keys: tokio::sync::OnceCell::new(),
            notifier,
            locks: Mutex::new(HashMap::new()),
            auth_events: Mutex::new(lru::LruCache::new(AUTH_EVENT_CACHE)),
            room_types: Mutex::new(HashMap::new()),
            heads: Mutex::new(lru::LruCache::new(ROOM_HEADS)),
            versions: Mutex::new(lru::LruCache::new(KEPT_ROOM_VERSIONS)),
            group_visibility: Mutex::new(lru::LruCache::new(GROUP_VISIBILITY)),
            user_memberships: Mutex::new(lru::LruCache::new(KEPT_MEMBERSHIPS)),
            stream_tail: stream_tail::StreamTail::default(),
            persister,
            held_room_locks: tokio::sync::Semaphore::new(held_locks),
            storage,
        }
    }

    /// The server's signing key, generated and stored on first use.
    pub async fn signing_keys(&self) -> Result<Arc<ServerKeys>> {
        self.keys
            .get_or_try_init(|| async {
                ServerKeys::load_or_create(&self.storage, &self.config.server_name)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }

    fn room_lock(&self, room_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(locks) => locks,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Forget the locks nobody holds or waits for, so the map follows the rooms being
        // written to now rather than every room ever written to.
        if locks.len() >= 1024 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(room_id.to_owned()).or_default().clone()
    }

    /// The room's version (kept once read: it never changes); `None` for an unknown room.
    pub(crate) async fn room_version(&self, room_id: &str) -> Result<Option<String>> {
        if let Some(version) = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(room_id)
        {
            return Ok(Some(version.clone()));
        }
        let Some(room) = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
        else {
            return Ok(None);
        };
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(room_id.to_owned(), room.room_version.clone());
        Ok(Some(room.room_version))
    }

    /// Keeps rooms' versions read along with something else.
    fn keep_versions(&self, versions: Vec<(String, String)>) {
        let mut kept = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        for (room_id, version) in versions {
            kept.put(room_id, version);
        }
    }

    /// The latest committed position of the global stream.
    pub async fn stream_position(&self) -> Result<i64> {
        self.storage
            .rooms
            .max_stream_ordering()
            .await
            .map_err(internal)
    }

    /// Where sliding sync connections are kept.
    pub(crate) fn sliding_repo(&self) -> Arc<dyn palpo_storage::SlidingSyncRepo> {
        self.storage.sliding.clone()
    }

    pub fn server_name(&self) -> &str {
        &self.config.server_name
    }

    /// The version new rooms get.
    pub fn default_room_version(&self) -> &str {
        &self.config.rooms.default_version
    }
}

/// The rules of a room version this server understands.
pub fn room_version_rules(version: &str) -> Result<(RoomVersionId, RoomVersionRules)> {
    let id = RoomVersionId::try_from(version).map_err(|_| unsupported_version(version))?;
    let rules = id.rules().ok_or_else(|| unsupported_version(version))?;
    if !ROOM_VERSIONS.contains(&version) {
        return Err(unsupported_version(version));
    }
    Ok((id, rules))
}

fn unsupported_version(version: &str) -> Error {
    Error::new(
        palpo_core::ErrorCode::UnsupportedRoomVersion,
        format!("Room version {version} is not supported"),
    )
}
