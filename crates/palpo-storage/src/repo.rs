//! Repository traits: what the services may ask of storage. One trait per aggregate.
//!
//! Implemented by the sqlx backends (`sql`), and decorated by the Redis cache (`cache`).
//! Services hold `Arc<dyn Trait>`, never a pool.

use async_trait::async_trait;

use crate::{
    db::{LockTurn, RoomWriteLock},
    error::Result,
    model::{
        AliasRecord, DeviceLogin, DeviceRecord, Direction, EventRecord, MembershipRecord, NewEvent,
        NewRoom, NewUser, PersistedEvent, ProfileRecord, Removed, RoomRecord, SigningKeyRecord,
        StateMap, TokenOwner, TxnKey, UiaSession, UserRecord,
    },
};

#[async_trait]
pub trait UserRepo: Send + Sync {
    /// Creates an account; [`crate::StorageError::Conflict`] when the id is taken.
    async fn create_user(&self, user: &NewUser) -> Result<()>;
    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>>;
    /// Sets or clears the password hash. Returns false when the user does not exist.
    async fn set_password_hash(&self, user_id: &str, hash: Option<&str>) -> Result<bool>;
    /// Marks the account deactivated and clears its password. The id stays reserved forever.
    async fn deactivate_user(&self, user_id: &str) -> Result<()>;
    async fn count_users(&self) -> Result<i64>;
}

#[async_trait]
pub trait DeviceRepo: Send + Sync {
    /// Creates the device (or reuses it) and gives it a new access token, replacing any
    /// previous token of that device, in one transaction. Returns the replaced tokens' hashes.
    async fn login_device(&self, login: &DeviceLogin) -> Result<Vec<String>>;
    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceRecord>>;
    /// The user's devices, ordered by device id.
    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>>;
    /// Returns false when the device does not exist.
    async fn set_device_display_name(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<bool>;
    /// Deletes the devices and their tokens. Unknown ids are ignored.
    async fn delete_devices(&self, user_id: &str, device_ids: &[String]) -> Result<Removed>;
    /// Deletes every device of the user (and their tokens) except `keep`.
    async fn delete_all_devices(&self, user_id: &str, keep: Option<&str>) -> Result<Removed>;
    /// Who owns the token with this hash. Always answered from the primary: a token
    /// that was just revoked must stop working at once.
    async fn find_token(&self, token_hash: &str) -> Result<Option<TokenOwner>>;
    /// Records when and from where a device was last used.
    async fn touch_device(
        &self,
        user_id: &str,
        device_id: &str,
        ip: Option<&str>,
        ts: i64,
    ) -> Result<()>;
}

#[async_trait]
pub trait UiaRepo: Send + Sync {
    async fn create_session(&self, session: &UiaSession) -> Result<()>;
    async fn get_session(&self, session_id: &str) -> Result<Option<UiaSession>>;
    /// Replaces the completed stages and data of a session.
    async fn update_session(&self, session: &UiaSession) -> Result<()>;
    async fn delete_session(&self, session_id: &str) -> Result<()>;
    /// Deletes sessions created before `before`; returns how many.
    async fn delete_sessions_before(&self, before: i64) -> Result<u64>;
}

/// Rooms, events, state and membership.
#[async_trait]
pub trait RoomRepo: Send + Sync {
    /// Creates the room row, before its create event is persisted. Conflict when it exists.
    async fn create_room(&self, room: &NewRoom) -> Result<()>;
    /// The room as the primary sees it (event creation builds on it).
    async fn get_room(&self, room_id: &str) -> Result<Option<RoomRecord>>;
    /// Publishes the room in the room directory (`is_public`), or takes it out (nothing for
    /// a room that does not exist).
    async fn set_room_published(&self, room_id: &str, published: bool) -> Result<()>;
    /// The rooms published in the room directory, each with its joined member count: the
    /// most joined first, then by room id.
    async fn published_rooms(&self) -> Result<Vec<(String, i64)>>;
    /// Takes the room's write lock, which every process on the database honours: take it
    /// before reading the room to build an event, and hand it to
    /// [`RoomRepo::persist_event_locked`].
    async fn lock_room_writes(&self, room_id: &str) -> Result<RoomWriteLock>;
    /// Persists an event and everything it changes (edges, extremities, state group, current
    /// state, membership, transaction id, redaction mark) in one transaction, and gives it the
    /// next stream position. Conflict when the room's write version moved (rebuild and retry)
    /// or when the transaction id was used already.
    async fn persist_event(&self, event: &NewEvent) -> Result<PersistedEvent> {
        self.persist_event_locked(event, None).await
    }
    /// As [`RoomRepo::persist_event`], in the transaction of the room's write `lock`.
    async fn persist_event_locked(
        &self,
        event: &NewEvent,
        lock: Option<RoomWriteLock>,
    ) -> Result<PersistedEvent>;
    /// Persists several events in one transaction (group commit), each as
    /// [`RoomRepo::persist_event`] would, in order: events of one room must come in the order
    /// they were built (each on the write version the one before leaves). An event that
    /// conflicts writes nothing and does not stop the others; its outcome says so. `Err` when
    /// the transaction as a whole failed (nothing is written then).
    async fn persist_events(&self, events: &[NewEvent]) -> Result<Vec<Result<PersistedEvent>>> {
        self.persist_events_in_turn(events, LockTurn::default())
            .await
    }
    /// As [`RoomRepo::persist_events`], locking the rooms' rows in `turn`.
    async fn persist_events_in_turn(
        &self,
        events: &[NewEvent],
        turn: LockTurn,
    ) -> Result<Vec<Result<PersistedEvent>>>;

    /// Called by the event writer once it has answered a batch's sends, with the number of
    /// events the batch wrote: see [`crate::db::Db::checkpoint_if_due`]. Returns at once.
    fn after_batch(&self, events: usize);
    async fn get_event(&self, event_id: &str) -> Result<Option<EventRecord>>;
    /// The events with these ids that exist, in no particular order.
    async fn get_events(&self, event_ids: &[String]) -> Result<Vec<EventRecord>>;
    /// The full state of a state group (parent chain merged); empty for an unknown group.
    async fn state_at_group(&self, state_group: i64) -> Result<StateMap> {
        Ok(self
            .states_at_groups(&[state_group])
            .await?
            .remove(&state_group)
            .unwrap_or_default())
    }
    /// The full state of each of several state groups, in one round trip per hundred
    /// groups. Unknown groups are absent.
    async fn states_at_groups(
        &self,
        state_groups: &[i64],
    ) -> Result<std::collections::HashMap<i64, StateMap>>;
    /// The room's current state, from the primary.
    async fn current_state(&self, room_id: &str) -> Result<StateMap>;
    /// The current state entries of a room for the given `(type, state key)` pairs only.
    async fn current_state_entries(
        &self,
        room_id: &str,
        keys: &[(String, String)],
    ) -> Result<StateMap>;
    /// Timeline events of a room strictly after `from` (forward) or before it (backward), in
    /// that direction's order, up to `limit`; `to` bounds the walk (exclusive). Rejected,
    /// soft-failed and outlier events are never part of the timeline.
    async fn room_events(
        &self,
        room_id: &str,
        from: i64,
        to: Option<i64>,
        dir: Direction,
        limit: i64,
    ) -> Result<Vec<EventRecord>>;
    /// For each room, its newest `limit` timeline events before stream position `before`,
    /// newest first: what `room_events(room, before, None, Backward, limit)` reads for each,
    /// in one statement per fifty rooms. The rooms come in order of room id.
    async fn latest_events_in(
        &self,
        room_ids: &[String],
        before: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>>;
    /// The latest stream position committed.
    async fn max_stream_ordering(&self) -> Result<i64>;
    /// The timeline event of a room closest to `ts` in the given direction.
    async fn event_near_ts(
        &self,
        room_id: &str,
        ts: i64,
        dir: Direction,
    ) -> Result<Option<EventRecord>>;
    async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<MembershipRecord>>;
    /// Current memberships of a room (all, or only those with `membership`).
    async fn room_members(
        &self,
        room_id: &str,
        membership: Option<&str>,
    ) -> Result<Vec<MembershipRecord>>;
    /// Current memberships (all states) of several rooms, by room then user id.
    async fn members_of_rooms(&self, room_ids: &[String]) -> Result<Vec<MembershipRecord>>;
    /// `(room id, room version)` of the rooms that exist among `room_ids`.
    async fn room_versions(&self, room_ids: &[String]) -> Result<Vec<(String, String)>>;
    /// Rooms where the user's current membership is `membership`.
    async fn rooms_for_user(&self, user_id: &str, membership: &str) -> Result<Vec<String>>;
    /// Marks a left room as forgotten for the user.
    async fn forget_room(&self, room_id: &str, user_id: &str) -> Result<bool>;
    /// The event a client transaction produced, if it ran already.
    async fn txn_event(&self, txn: &TxnKey) -> Result<Option<String>>;
    /// Every membership of the user (all states), including forgotten rooms.
    async fn memberships_of_user(&self, user_id: &str) -> Result<Vec<MembershipRecord>>;
    /// Rooms that have timeline events with a stream position in `(after, up_to]`. Reads the
    /// stream index over that range only, so it costs what changed, not the history.
    async fn rooms_changed_between(&self, after: i64, up_to: i64) -> Result<Vec<String>>;
    /// The timeline events of `room_ids` with a stream position in `(after, up_to]`, in stream
    /// order, each with its thread (`None`: the main timeline). Reads every such event: for
    /// the short range a woken sync catches up on (callers bound it), where one read serves
    /// the timeline windows and the unread counts of all the user's rooms.
    async fn timeline_between(
        &self,
        room_ids: &[String],
        after: i64,
        up_to: i64,
    ) -> Result<Vec<(EventRecord, Option<String>)>>;
    /// Every room's timeline events with a stream position in `(after, up_to]`, in stream
    /// order, each with its thread: at most `limit` of them, the oldest. What a process keeps
    /// of the stream's newest events to share among its syncs reads it.
    async fn stream_range(
        &self,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<(EventRecord, Option<String>)>>;
    /// The stream position of each room's latest timeline event (rooms with none are absent).
    async fn latest_positions(&self, room_ids: &[String]) -> Result<Vec<(String, i64)>>;
    /// The thread (root event id) the event belongs to; `None` for the main timeline or an
    /// unknown event.
    async fn thread_of_event(&self, event_id: &str) -> Result<Option<String>>;
}

/// Room aliases.
#[async_trait]
pub trait AliasRepo: Send + Sync {
    /// Conflict when the alias exists.
    async fn create_alias(&self, alias: &AliasRecord) -> Result<()>;
    async fn get_alias(&self, room_alias: &str) -> Result<Option<AliasRecord>>;
    /// Returns false when there was no such alias.
    async fn delete_alias(&self, room_alias: &str) -> Result<bool>;
    async fn aliases_of_room(&self, room_id: &str) -> Result<Vec<String>>;
}

/// User profiles.
#[async_trait]
pub trait ProfileRepo: Send + Sync {
    async fn get_profile(&self, user_id: &str) -> Result<Option<ProfileRecord>>;
    async fn set_profile(&self, user_id: &str, profile: &ProfileRecord) -> Result<()>;
    /// The user directory as `searcher` sees it: users who share a joined room with them, and
    /// members of rooms published in the room directory or whose join rule is public or
    /// history world-readable; active accounts only (users this server knows nothing else of
    /// count as active). Those whose user id or global display name contains `term`, ignoring
    /// case as the database's `LOWER` folds it (SQLite, and PostgreSQL with a C locale, fold
    /// ASCII letters only), ordered by user id, at most `limit`.
    async fn search_user_directory(
        &self,
        searcher: &str,
        term: &str,
        limit: i64,
    ) -> Result<Vec<crate::model::DirectoryUser>>;
}

/// Server signing keys.
#[async_trait]
pub trait KeyRepo: Send + Sync {
    /// This server's signing keys (those with a private key), oldest first.
    async fn own_signing_keys(&self, server_name: &str) -> Result<Vec<SigningKeyRecord>>;
    /// Stores a key; Conflict when that key id exists.
    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> Result<()>;
}

/// Receipts, typing notifications and presence. Every change takes the next position of the
/// global stream (the one events use), so one sync token orders everything and every server
/// process sharing the database sees every change.
#[async_trait]
pub trait EphemeralRepo: Send + Sync {
    /// Stores a receipt, replacing the user's previous one of that type (and thread) in the
    /// room. Returns its stream position.
    async fn put_receipt(&self, receipt: &crate::model::ReceiptRecord) -> Result<i64>;
    /// The user's receipt of `receipt_type` in the room for `thread_id` (`None`: unthreaded).
    async fn get_receipt(
        &self,
        room_id: &str,
        receipt_type: &str,
        user_id: &str,
        thread_id: Option<&str>,
    ) -> Result<Option<crate::model::ReceiptRecord>>;
    /// Every receipt of the user in the room (all types and threads).
    async fn receipts_of_user(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Vec<crate::model::ReceiptRecord>>;
    /// Receipts of these rooms that changed in `(after, up_to]`.
    async fn receipts_changed(
        &self,
        room_ids: &[String],
        after: i64,
        up_to: i64,
    ) -> Result<Vec<crate::model::ReceiptRecord>>;

    /// Marks the user as typing until `expires_at` (ms), or as not typing with 0. Returns the
    /// stream position of the change.
    async fn set_typing(&self, room_id: &str, user_id: &str, expires_at: i64) -> Result<i64>;
    /// Moves the expiry of a user who is typing (expiry after `now`) without a stream
    /// position: the typers did not change. False when the user was not typing.
    async fn extend_typing(
        &self,
        room_id: &str,
        user_id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool>;
    /// Typing rows of these rooms that changed in `(after, up_to]`, and those of users typing
    /// at `now`.
    async fn typing_changed(
        &self,
        room_ids: &[String],
        after: i64,
        up_to: i64,
        now: i64,
    ) -> Result<Vec<crate::model::TypingRecord>>;
    /// Ends the typing notifications that ran out by `now`, with one new stream position,
    /// which is returned (`None` when none ran out).
    async fn expire_typing(&self, now: i64) -> Result<Option<i64>>;
    /// When the next typing notification runs out, if any is running.
    async fn next_typing_expiry(&self) -> Result<Option<i64>>;
    /// The global stream's position, whether a typing notification ran out by `now` (which
    /// [`EphemeralRepo::expire_typing`] would announce), and the newest change of each kind a
    /// sync of `user_id` (and `device_id`) reads, in one statement: what every sync asks first.
    /// With `token`, the same statement checks the access token still belongs to the device
    /// ([`StorageError::UnknownToken`](crate::StorageError::UnknownToken) if not); with
    /// `device_id`, it also counts the device's keys
    /// ([`SyncPosition::key_counts`](crate::model::SyncPosition::key_counts)).
    async fn sync_position(
        &self,
        now: i64,
        user_id: &str,
        device_id: Option<&str>,
        token: Option<&crate::model::TokenCheck>,
    ) -> Result<crate::model::SyncPosition> {
        let ask = crate::model::PositionAsk {
            user_id,
            device_id,
            token,
        };
        self.sync_positions(now, &[ask])
            .await?
            .pop()
            .unwrap_or_else(|| Err(crate::StorageError::Corrupt("no position read".into())))
    }
    /// [`EphemeralRepo::sync_position`] for several syncs at once, a few statements for all:
    /// the answers in the order of `asks`, each as that sync alone would have had it from a
    /// read started after this call began (a token no longer its device's fails only its
    /// own ask; a failed statement fails the call).
    async fn sync_positions(
        &self,
        now: i64,
        asks: &[crate::model::PositionAsk<'_>],
    ) -> Result<Vec<Result<crate::model::SyncPosition>>>;

    async fn get_presence(&self, user_id: &str) -> Result<Option<crate::model::PresenceRecord>>;
    /// Stores the user's presence (state, status message, last active time). Returns its
    /// stream position.
    async fn set_presence(&self, presence: &crate::model::PresenceRecord) -> Result<i64>;
    /// Moves the user's last active time without a stream position. False when the user has
    /// no presence yet.
    async fn touch_presence(&self, user_id: &str, last_active_ts: i64) -> Result<bool>;
    /// Presence that changed in `(after, up_to]` of `user_id` and of the users who share a
    /// joined room with them.
    async fn presence_changed(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<crate::model::PresenceRecord>>;

    /// Moves the online users last active before `idle_before` (ms) to `unavailable`, with one
    /// new stream position, which is returned (`None` when nobody went idle).
    async fn expire_presence(&self, idle_before: i64) -> Result<Option<i64>>;
    /// The oldest last active time of an online user, if any is online: when the next one
    /// goes idle is that plus the idle timeout.
    async fn oldest_online_activity(&self) -> Result<Option<i64>>;

    /// For each `(room, after)` of `ranges`: the messages (`event_types`) of that room in
    /// `(after, up_to]` not sent by `user_id`, in the timeline, oldest first, at most `limit`
    /// per room, each with its thread (`None`: the main timeline): what unread notification
    /// counts count. One statement per fifty rooms; the result is in stream order.
    async fn unread_candidates(
        &self,
        ranges: &[(String, i64)],
        user_id: &str,
        event_types: &[&str],
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<(crate::model::EventRecord, Option<String>)>>;
    /// Where the user's receipts of `receipt_types` in these rooms point: per receipt its room,
    /// thread (`None`: unthreaded) and the stream position of its event. Receipts at events
    /// without a position are left out.
    async fn read_positions(
        &self,
        user_id: &str,
        room_ids: &[String],
        receipt_types: &[&str],
    ) -> Result<Vec<crate::model::ReadPosition>>;
}

/// Sync filters and account data (global and per room) of users.
#[async_trait]
pub trait AccountDataRepo: Send + Sync {
    /// Stores a filter and returns its id, the next of the user's ids (`"0"`, `"1"`...).
    async fn create_filter(&self, user_id: &str, filter_json: &str, now: i64) -> Result<String>;
    /// The filter JSON, when the user has a filter with that id.
    async fn get_filter(&self, user_id: &str, filter_id: &str) -> Result<Option<String>>;
    /// Sets (or replaces) one piece of account data (global when `room_id` is `None`) in one
    /// transaction, at the next position of the global stream, which it returns.
    async fn put_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
    ) -> Result<i64>;
    /// As [`AccountDataRepo::put_account_data`], for a read-modify-write: only when the
    /// stored piece is still the one read, the one written at `read_at` (its
    /// `stream_position`; `None`: there was none). When another writer, in this process or
    /// another, wrote it since, nothing is written and the answer is `None`: read again.
    async fn replace_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
        read_at: Option<i64>,
    ) -> Result<Option<i64>>;
    async fn get_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
    ) -> Result<Option<crate::model::AccountDataRecord>>;
    /// The user's account data (global and per room) written at a stream position in
    /// `(after, up_to]`, in stream order. Positions start at 1, so `after = 0` reads all of it.
    async fn account_data_since(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<crate::model::AccountDataRecord>>;
}

/// End-to-end encryption: device identity keys, one-time and fallback keys, the device-list
/// change stream and the to-device inbox. Device-list changes and to-device messages take the
/// next position of the global stream, so one sync token orders them with everything else.
#[async_trait]
pub trait E2eeRepo: Send + Sync {
    /// Stores what one `/keys/upload` brings, in one transaction: the identity keys (a
    /// device-list change when they are new or differ), one-time keys (one already stored
    /// with the same id and content is kept; with other content the whole upload fails with
    /// [`crate::StorageError::Conflict`]), and fallback keys (each replaces the device's key of
    /// its algorithm, unused, unless it is the same key).
    async fn upload_keys(
        &self,
        upload: &crate::model::KeyUpload,
    ) -> Result<crate::model::KeyUploadOutcome>;
    /// The identity keys of the user's existing devices (all of them when `device_ids` is
    /// empty), ordered by device id.
    async fn device_keys(
        &self,
        user_id: &str,
        device_ids: &[String],
    ) -> Result<Vec<crate::model::DeviceKeysRecord>>;
    /// The device's unclaimed one-time keys, counted per algorithm.
    async fn one_time_key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Vec<(String, i64)>>;
    /// Claims a key of `algorithm` of the device: its oldest one-time key, which is deleted
    /// (two claims never get the same key), or, when none is left, its fallback key, which is
    /// marked used and stays. `None` when the device has neither.
    async fn claim_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
    ) -> Result<Option<crate::model::ClaimedKey>>;
    /// The algorithms of the device's fallback keys that no claim has used yet.
    async fn unused_fallback_key_types(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Vec<String>>;
    /// Forgets the keys, fallback keys, one-time keys, signatures, to-device inbox and
    /// to-device transaction ids of the devices, and records a device-list change of the user.
    /// Returns the change's stream position (`None` when `device_ids` is empty).
    async fn delete_device_keys(&self, user_id: &str, device_ids: &[String])
    -> Result<Option<i64>>;
    /// What a sync tells the device about its keys, in one statement: its unclaimed one-time
    /// keys counted per algorithm (as [`E2eeRepo::one_time_key_counts`]) and the algorithms of
    /// its unused fallback keys (as [`E2eeRepo::unused_fallback_key_types`]).
    async fn key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<crate::model::DeviceKeyCounts>;
    /// The device-list changes `user_id` is told of for `(after, up_to]`, in one statement.
    /// `changed`: users whose device list changed in the range who are `user_id` or share a
    /// joined room with them, and users who started sharing a joined room with them in that
    /// range (they joined one of the user's rooms, or the user joined one of theirs).
    /// `left`: users who stopped sharing any joined room with `user_id` in the range (their
    /// membership in one of the user's rooms became leave or ban, or the user left a room
    /// they are in) and share none now. Both sorted.
    async fn device_list_updates(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<crate::model::DeviceListUpdates>;
    /// The `changed` part of [`E2eeRepo::device_list_updates`].
    async fn device_lists_changed(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<String>> {
        Ok(self
            .device_list_updates(user_id, after, up_to)
            .await?
            .changed)
    }
    /// The `left` part of [`E2eeRepo::device_list_updates`].
    async fn device_lists_left(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<String>> {
        Ok(self.device_list_updates(user_id, after, up_to).await?.left)
    }
    /// Stores the messages of a `/sendToDevice` at the next stream position, which it returns;
    /// `None` when the sender's device already used the transaction id (nothing is stored).
    /// Messages to devices (or users) that do not exist are dropped.
    async fn send_to_device(&self, batch: &crate::model::ToDeviceBatch) -> Result<Option<i64>>;
    /// The device's messages with a position in `(after, up_to]`, oldest first, at most
    /// `limit`.
    async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<crate::model::ToDeviceRecord>>;
    /// What a sync hands the device from its inbox, in one read: its messages with a position
    /// in `(after, up_to]`, oldest first, at most `limit`; those up to `after` (the client has
    /// them) are deleted, by a second statement only when there are any.
    async fn to_device_inbox(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<crate::model::ToDeviceRecord>>;
    /// The user's cross-signing keys, by key type.
    async fn cross_signing_keys(
        &self,
        user_id: &str,
    ) -> Result<Vec<crate::model::CrossSigningKeyRecord>>;
    /// Stores cross-signing keys (each replaces the user's key of its type) and records a
    /// device-list change, whose position it returns (`None` when `keys` is empty).
    async fn put_cross_signing_keys(
        &self,
        user_id: &str,
        keys: &[crate::model::CrossSigningKeyRecord],
    ) -> Result<Option<i64>>;
    /// Stores signatures (each replaces the same signer key's signature of the same key) and
    /// records a device-list change of every signed user, at one position, which it returns
    /// (`None` when `signatures` is empty).
    async fn add_key_signatures(
        &self,
        signatures: &[crate::model::KeySignatureRecord],
    ) -> Result<Option<i64>>;
    /// The uploaded signatures of the user's keys that `viewer` may see: the user's own, and
    /// the viewer's.
    async fn key_signatures(
        &self,
        user_id: &str,
        viewer: &str,
    ) -> Result<Vec<crate::model::KeySignatureRecord>>;
    /// Deletes the device's messages with a position up to `up_to` (the client has them).
    async fn delete_to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        up_to: i64,
    ) -> Result<u64>;
}

/// Simplified sliding sync (MSC4186): connections and what each has sent, kept in the database
/// so that any process sharing it can continue a connection; and the per-room facts the list
/// filters need, read for many rooms at once.
#[async_trait]
pub trait SlidingSyncRepo: Send + Sync {
    /// Starts the connection `(user_id, device_id, conn_id)` under a new random key, which it
    /// returns, deleting an earlier connection with these ids and everything it held. When the
    /// device then has more than `max_per_device` connections, the least recently used go.
    async fn start_sliding_connection(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        now: i64,
        max_per_device: usize,
    ) -> Result<i64>;
    /// Position `position_id` of the connection with key `connection_key`, when that is the
    /// connection `(user_id, device_id, conn_id)`, it was last used at or after `used_since`,
    /// and the position is still kept.
    #[allow(clippy::too_many_arguments)]
    async fn sliding_position(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        connection_key: i64,
        position_id: i64,
        used_since: i64,
    ) -> Result<Option<crate::model::SlidingPositionRecord>>;
    /// The rooms of a room set of a connection.
    async fn sliding_rooms(
        &self,
        connection_key: i64,
        room_set: i64,
    ) -> Result<Vec<crate::model::SlidingRoomRecord>>;
    /// Hands out the connection's next position, in one transaction: its room set (new or
    /// shared), and deletes the positions before the acknowledged one (and all but the last
    /// few), the room sets no position refers to any more, and unused `required_state`
    /// configurations. Marks the connection used. `None` when the connection no longer exists
    /// (it expired meanwhile, or another request restarted it).
    async fn add_sliding_position(
        &self,
        new: &crate::model::NewSlidingPosition,
    ) -> Result<Option<crate::model::SlidingPositionRecord>>;
    /// Marks the connection used at `now` (an answer that handed out no new position).
    async fn touch_sliding_connection(&self, connection_key: i64, now: i64) -> Result<()>;
    /// Deletes the connections last used before `before`, at most `limit` of them, with
    /// everything they hold. Returns how many went.
    async fn delete_idle_sliding_connections(&self, before: i64, limit: i64) -> Result<u64>;

    /// The event id of the current `(event_type, state_key)` state of each of these rooms that
    /// has it.
    async fn current_state_ids(
        &self,
        room_ids: &[String],
        event_type: &str,
        state_key: &str,
    ) -> Result<Vec<(String, String)>>;
    /// The user's room account data of one type, in every room that has it.
    async fn room_account_data_of_type(
        &self,
        user_id: &str,
        data_type: &str,
    ) -> Result<Vec<crate::model::AccountDataRecord>>;
}
