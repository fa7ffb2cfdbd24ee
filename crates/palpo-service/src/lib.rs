//! Palpo's Matrix logic. No HTTP, no SQL: services take plain requests, talk to storage through
//! the repository traits, and answer with domain values or a [`palpo_core::Error`].

pub mod account_data;
pub mod accounts;
pub mod credentials;
pub mod e2ee;
pub mod ephemeral;
pub mod filter;
pub mod keys;
pub mod notifier;
pub mod rooms;
pub mod sync;
pub mod uia;

use std::sync::Arc;

use palpo_core::Config;
use palpo_storage::Storage;

pub use account_data::AccountDataService;
pub use accounts::{AccountService, Authed};
pub use e2ee::E2eeService;
pub use ephemeral::EphemeralService;
pub use rooms::RoomService;
pub use sync::SyncService;

/// The capacity of an in-process LRU cache (at least 1).
/// A storage failure as a Matrix error: an access token found gone (checked where the request
/// first touched the database) is 401 `M_UNKNOWN_TOKEN`; anything else is internal.
pub(crate) fn internal(err: palpo_storage::StorageError) -> palpo_core::Error {
    match err {
        palpo_storage::StorageError::UnknownToken => palpo_core::Error::unknown_token(),
        err => palpo_core::Error::internal(err),
    }
}

pub(crate) const fn cache_capacity(entries: usize) -> std::num::NonZeroUsize {
    match std::num::NonZeroUsize::new(entries) {
        Some(n) => n,
        None => std::num::NonZeroUsize::MIN,
    }
}

/// Every service, wired together. Built once at start-up and shared by the api layer.
#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    pub accounts: Arc<AccountService>,
    pub rooms: Arc<RoomService>,
    pub sync: Arc<SyncService>,
    /// Filters, account data and room tags.
    pub account_data: Arc<AccountDataService>,
    /// Typing, receipts, read markers, presence.
    pub ephemeral: Arc<EphemeralService>,
    /// Device keys, one-time keys, to-device messages.
    pub e2ee: Arc<E2eeService>,
    /// Wakes long-polling syncs; fed by every service that writes to the stream, and by the
    /// other processes on the same database (through Redis).
    pub notifier: Arc<notifier::Notifier>,
}

impl Services {
    pub fn new(config: Arc<Config>, storage: Storage) -> Self {
        // Other processes on the same database hear of our writes, and we of theirs (a no-op
        // without Redis).
        let wakeups = storage.wakeups().clone();
        let notifier =
            notifier::Notifier::with_publisher(move |position| wakeups.publish(position));
        // SQLite serves one process (its room locks are in-process ones).
        let notifier = Arc::new(
            if storage.db().backend() == palpo_storage::Backend::Sqlite {
                notifier.sole_writer()
            } else {
                notifier
            },
        );
        notifier.relay_from(storage.wakeups().subscribe(), storage.rooms.clone());
        let e2ee = Arc::new(E2eeService::new(
            config.clone(),
            storage.clone(),
            notifier.clone(),
        ));
        let accounts =
            Arc::new(AccountService::new(config.clone(), storage.clone()).with_e2ee(e2ee.clone()));
        let rooms = Arc::new(RoomService::new(
            config.clone(),
            storage.clone(),
            notifier.clone(),
        ));
        let account_data = Arc::new(AccountDataService::new(storage.clone(), notifier.clone()));
        let ephemeral = Arc::new(
            EphemeralService::new(storage, rooms.clone(), notifier.clone()).with_idle_timeout(
                std::time::Duration::from_secs(config.presence.idle_timeout_secs),
            ),
        );
        ephemeral.spawn_presence_expiry();
        let sync = Arc::new(
            SyncService::new(rooms.clone(), notifier.clone())
                .with_ephemeral(ephemeral.clone())
                .with_account_data(account_data.clone())
                .with_e2ee(e2ee.clone()),
        );
        Services {
            config,
            accounts,
            rooms,
            sync,
            account_data,
            ephemeral,
            e2ee,
            notifier,
        }
    }
}
