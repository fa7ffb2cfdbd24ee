//! Creating local events: build the PDU on the room's current state, hash and sign it, run the
//! authorization rules, persist it with the next stream position.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use palpo_core::{Error, ErrorCode, Result, now_millis};
use palpo_storage::{
    RoomWriteLock, StorageError,
    model::{NewEvent, PersistedEvent, RoomRecord, StateMap, TokenCheck, TxnKey},
};
use ruma::{
    CanonicalJsonObject, OwnedEventId,
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    state_res,
};
use serde_json::{Map, Value, value::RawValue as RawJsonValue};

use super::{RoomService, internal, pdu::Pdu, room_version_rules};

/// Largest PDU the spec allows, in bytes of canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;
/// Most `prev_events` an event may cite.
const MAX_PREV_EVENTS: usize = 20;
/// Largest integer canonical JSON allows (2^53 - 1).
const MAX_SAFE_INT: i64 = 9_007_199_254_740_991;

/// What a local event says, before it is placed in the room's graph.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub event_type: String,
    pub state_key: Option<String>,
    pub content: Value,
    /// For redactions in room versions before 11 (later ones carry it in the content).
    pub redacts: Option<String>,
}

impl EventDraft {
    pub fn state(event_type: &str, state_key: &str, content: Value) -> Self {
        EventDraft {
            event_type: event_type.to_owned(),
            state_key: Some(state_key.to_owned()),
            content,
            redacts: None,
        }
    }

    pub fn message(event_type: &str, content: Value) -> Self {
        EventDraft {
            event_type: event_type.to_owned(),
            state_key: None,
            content,
            redacts: None,
        }
    }
}

/// A signed PDU ready to persist.
pub(super) struct BuiltEvent {
    pub event_id: String,
    pub json: String,
    pub pdu: Pdu,
    pub depth: i64,
}

/// A room's head as this process last saw it: what the next local event is built on. Valid
/// while the room's write version is `room.write_version` (every write moves it).
#[derive(Debug, Clone)]
pub(super) struct RoomHead {
    room: RoomRecord,
    /// Current state entries looked up so far (`None`: the room has no such state).
    state: HashMap<(String, String), Option<String>>,
}

impl RoomHead {
    /// The head after `built` was persisted on it.
    fn advance(&mut self, built: &BuiltEvent, draft: &EventDraft, state_group: Option<i64>) {
        let room = &mut self.room;
        let prev: HashSet<String> = built
            .pdu
            .prev_events
            .iter()
            .map(|id| id.to_string())
            .collect();
        room.forward_extremities.retain(|id| !prev.contains(id));
        room.forward_extremities.push(built.event_id.clone());
        room.forward_extremities.sort();
        room.max_depth = room.max_depth.max(built.depth);
        room.write_version += 1;
        room.state_group = state_group;
        if let Some(state_key) = &draft.state_key {
            self.state.insert(
                (draft.event_type.clone(), state_key.clone()),
                Some(built.event_id.clone()),
            );
        }
    }
}

/// Checks the limits on what a client may put into an event.
pub(super) fn check_draft(draft: &EventDraft) -> Result<()> {
    if draft.event_type.is_empty() || draft.event_type.len() > 255 {
        return Err(Error::bad_json("Event type must be 1 to 255 bytes"));
    }
    if draft.state_key.as_ref().is_some_and(|k| k.len() > 255) {
        return Err(Error::bad_json("State key must be at most 255 bytes"));
    }
    if !draft.content.is_object() {
        return Err(Error::bad_json("Event content must be a JSON object"));
    }
    Ok(())
}

impl RoomService {
    /// Builds, signs, authorizes and persists a local event; returns its id. With a
    /// transaction id, a retry returns the event the first attempt created.
    pub(crate) async fn append(
        &self,
        room_id: &str,
        sender: &str,
        draft: EventDraft,
        txn: Option<TxnKey>,
    ) -> Result<String> {
        self.append_checking(room_id, sender, draft, txn, None)
            .await
    }

    /// [`RoomService::append`] for a sender taken on trust from memory: the event is written
    /// only if `sent_with` (the send's access token) still belongs to the sender's device,
    /// checked in the write's transaction; else 401 `M_UNKNOWN_TOKEN`.
    pub(crate) async fn append_checking(
        &self,
        room_id: &str,
        sender: &str,
        draft: EventDraft,
        txn: Option<TxnKey>,
        sent_with: Option<&TokenCheck>,
    ) -> Result<String> {
        check_draft(&draft)?;
        // Transaction ids are not looked up before building: a retry is rare, and the write
        // itself detects a used one (the id's insert conflicts, nothing is written). A retry
        // that can no longer be built (the sender left the room, say) still gets the event
        // the first attempt created.
        match self
            .append_once(room_id, sender, draft, txn.as_ref(), sent_with)
            .await
        {
            Err(e) if e.code() == ErrorCode::UnknownToken => Err(e),
            Err(e) if txn.is_some() => match self.txn_event(txn.as_ref()).await? {
                Some(event_id) => {
                    // Answered without writing: the token is checked on its own.
                    if let Some(token) = sent_with {
                        self.check_token(token).await?;
                    }
                    Ok(event_id)
                }
                None => Err(e),
            },
            outcome => outcome,
        }
    }

    /// 401 `M_UNKNOWN_TOKEN` unless the access token still belongs to the checked device.
    pub(crate) async fn check_token(&self, token: &TokenCheck) -> Result<()> {
        crate::credentials::check_token(&self.storage, token).await
    }

    /// The event a transaction id already created, if any.
    async fn txn_event(&self, txn: Option<&TxnKey>) -> Result<Option<String>> {
        match txn {
            Some(txn) => self.storage.rooms.txn_event(txn).await.map_err(internal),
            None => Ok(None),
        }
    }

    async fn append_once(
        &self,
        room_id: &str,
        sender: &str,
        draft: EventDraft,
        txn: Option<&TxnKey>,
        sent_with: Option<&TokenCheck>,
    ) -> Result<String> {
        let lock = self.room_lock(room_id);
        // The first attempt builds on the head this process kept and is written with other
        // sends' events (group commit); the write version check inside that transaction
        // catches another process having written to the room meanwhile. Then the event is
        // built again under the room's write lock, which every process on the database
        // honours, so the room cannot move on between our read and our write and processes
        // take turns instead of racing (SQLite has no cross-process lock: it serves one
        // process).
        for attempt in 0..16 {
            let guard = lock.lock().await;
            let (db_lock, _lock_permit) = if attempt == 0 {
                (None, None)
            } else {
                // A held room lock keeps a connection while the event is built, which may
                // read on others: only so many at once, or they could take the whole pool.
                let permit = self
                    .held_room_locks
                    .acquire()
                    .await
                    .map_err(Error::internal)?;
                let db_lock = self
                    .storage
                    .rooms
                    .lock_room_writes(room_id)
                    .await
                    .map_err(internal)?;
                (Some(db_lock), Some(permit))
            };
            let locked_version = db_lock.as_ref().and_then(RoomWriteLock::locked_version);
            let mut head = self.room_head(room_id, locked_version).await?;
            let prepared = async {
                let (_, rules) = room_version_rules(&head.room.room_version)?;
                // Only the state the auth rules look at, not the whole room state.
                let state = self.auth_state(&mut head, &rules, sender, &draft).await?;
                let built = self
                    .build_on(&head.room, &rules, sender, &draft, &state)
                    .await?;
                self.authorize(&rules, &built.pdu, &state).await?;
                let event = self
                    .new_event(&head.room, &built, &draft, txn.cloned(), sent_with.cloned())
                    .await?;
                Ok::<_, Error>((built, event))
            }
            .await;
            let (built, event) = match prepared {
                Ok(prepared) => prepared,
                Err(e) => {
                    // Refused or malformed: nothing moved, so the head is still the room's.
                    self.keep_head(head);
                    return Err(e);
                }
            };
            // The head goes back to the cache once the event is queued (messages) or written
            // (state); `None` once given back.
            let mut head = Some(head);
            let outcome = match db_lock {
                Some(lock) if lock.holds_room() => {
                    let outcome = self
                        .storage
                        .rooms
                        .persist_event_locked(&event, Some(lock))
                        .await;
                    // Written here, not by the persister (which wakes the syncs itself).
                    if let Ok(persisted) = &outcome {
                        self.notifier.stream_advanced(persisted.stream_ordering);
                    }
                    outcome
                }
                _ if draft.state_key.is_none() => {
                    // A message leaves the room's state as it is, so the room's next event
                    // can be built on it while it waits for its commit: once queued, the
                    // head moves on and the room is free. Should it fail, events built on
                    // it fail their write version check and are built again.
                    let committed = self.persister.submit(event);
                    if let Some(mut head) = head.take() {
                        let state_group = head.room.state_group;
                        head.advance(&built, &draft, state_group);
                        self.keep_head(head);
                    }
                    drop(guard);
                    committed.await
                }
                _ => self.persister.submit(event).await,
            };
            match outcome {
                Ok(persisted) => {
                    if let Some(mut head) = head {
                        head.advance(&built, &draft, persisted.state_group);
                        self.keep_head(head);
                    }
                    return Ok(built.event_id);
                }
                Err(StorageError::UnknownToken) => {
                    // Nothing was written; events built on this one are built again.
                    self.forget_head(room_id);
                    return Err(Error::unknown_token());
                }
                Err(StorageError::Conflict(what)) if what == "transaction id" => {
                    // A retry of a send that was written: `append` answers with its event.
                    self.forget_head(room_id);
                    return Err(Error::internal("transaction id used by an earlier send"));
                }
                Err(StorageError::Conflict(_)) => {
                    // Another process wrote to the room (or an event this one was built on
                    // failed): read it again.
                    self.forget_head(room_id);
                    continue;
                }
                Err(e) if e.is_transient() => {
                    // The database broke a deadlock (MySQL's gap locks between rooms' rows of
                    // one index) by rolling this write back: nothing was written.
                    tracing::debug!(error = %e, "event write rolled back; trying again");
                    self.forget_head(room_id);
                    continue;
                }
                Err(e) => {
                    self.forget_head(room_id);
                    return Err(internal(e));
                }
            }
        }
        Err(Error::internal(format!(
            "room {room_id} kept changing while sending"
        )))
    }

    /// The room's head to build on: the one this process kept when it is still the room's
    /// (its write version is the one `locked_version` locked), else read from the database.
    /// Without a locked version (SQLite) the kept head is trusted, and persisting checks the
    /// write version: a stale head then fails with a conflict and is read again.
    ///
    /// The kept head is taken out, not copied: the caller holds the room's lock, so no other
    /// send of this process wants it until the caller gives back the head it moved on (or the
    /// same head, when the event is refused before it is written). A send whose write fails,
    /// or whose request is dropped meanwhile, leaves none: the next one reads the room.
    async fn room_head(&self, room_id: &str, locked_version: Option<i64>) -> Result<RoomHead> {
        let kept = self
            .heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(room_id)
            .filter(|head| locked_version.is_none_or(|v| v == head.room.write_version));
        if let Some(head) = kept {
            return Ok(head);
        }
        let room = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        Ok(RoomHead {
            room,
            state: HashMap::new(),
        })
    }

    fn keep_head(&self, head: RoomHead) {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(head.room.room_id.clone(), head);
    }

    fn forget_head(&self, room_id: &str) {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(room_id);
    }

    /// The current state entries an event of `draft` is authorized against (and cites in
    /// `auth_events`), plus the create event: from the head's entries, reading the missing
    /// ones.
    async fn auth_state(
        &self,
        head: &mut RoomHead,
        rules: &RoomVersionRules,
        sender: &str,
        draft: &EventDraft,
    ) -> Result<StateMap> {
        let content = RawJsonValue::from_string(draft.content.to_string())
            .map_err(|e| Error::bad_json(e.to_string()))?;
        let sender = ruma::UserId::parse(sender).map_err(Error::internal)?;
        let mut keys: Vec<(String, String)> = state_res::auth_types_for_event(
            &draft.event_type.as_str().into(),
            &sender,
            draft.state_key.as_deref(),
            &content,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?
        .into_iter()
        .map(|(kind, key)| (kind.to_string(), key))
        .collect();
        keys.push(("m.room.create".into(), String::new()));
        let missing: Vec<(String, String)> = keys
            .iter()
            .filter(|key| !head.state.contains_key(*key))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let found = self
                .storage
                .rooms
                .current_state_entries(&head.room.room_id, &missing)
                .await
                .map_err(internal)?;
            for key in missing {
                let event_id = found.get(&key).cloned();
                head.state.insert(key, event_id);
            }
        }
        Ok(keys
            .into_iter()
            .filter_map(|key| {
                let event_id = head.state.get(&key).cloned().flatten()?;
                Some((key, event_id))
            })
            .collect())
    }

    /// What persisting a built event writes, expecting the room at `room.write_version`.
    async fn new_event(
        &self,
        room: &RoomRecord,
        built: &BuiltEvent,
        draft: &EventDraft,
        txn: Option<TxnKey>,
        sent_with: Option<TokenCheck>,
    ) -> Result<NewEvent> {
        let membership = (draft.event_type == "m.room.member")
            .then(|| draft.content.get("membership").and_then(Value::as_str))
            .flatten()
            .map(str::to_owned);
        let thread_id = self.thread_of(&draft.content).await.map_err(internal)?;
        Ok(NewEvent {
            event_id: built.event_id.clone(),
            room_id: room.room_id.clone(),
            depth: built.depth,
            event_type: draft.event_type.clone(),
            state_key: draft.state_key.clone(),
            sender: built.pdu.sender.to_string(),
            origin_server_ts: i64::from(built.pdu.origin_server_ts.0),
            pdu_json: built.json.clone(),
            prev_events: built
                .pdu
                .prev_events
                .iter()
                .map(ToString::to_string)
                .collect(),
            outlier: false,
            soft_failed: false,
            rejected_reason: None,
            expected_write_version: room.write_version,
            extends_head: true,
            membership,
            redacts: built.pdu.redacts.as_ref().map(ToString::to_string),
            txn,
            thread_id,
            sent_with,
        })
    }

    /// Persists a built event (with other sends' events), expecting the room at
    /// `room.write_version`; the persister wakes the syncs waiting for it.
    pub(super) async fn persist(
        &self,
        room: &RoomRecord,
        built: &BuiltEvent,
        draft: &EventDraft,
    ) -> Result<PersistedEvent> {
        let event = self.new_event(room, built, draft, None, None).await?;
        self.persister.submit(event).await.map_err(internal)
    }

    /// Builds an event on top of the room's forward extremities and current state.
    pub(super) async fn build_on(
        &self,
        room: &RoomRecord,
        rules: &RoomVersionRules,
        sender: &str,
        draft: &EventDraft,
        state: &StateMap,
    ) -> Result<BuiltEvent> {
        let content_raw = RawJsonValue::from_string(draft.content.to_string())
            .map_err(|e| Error::bad_json(e.to_string()))?;
        let sender_id = ruma::UserId::parse(sender).map_err(Error::internal)?;
        let auth_types = state_res::auth_types_for_event(
            &draft.event_type.as_str().into(),
            &sender_id,
            draft.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth_events: Vec<String> = auth_types
            .iter()
            .filter_map(|(kind, key)| state.get(&(kind.to_string(), key.clone())).cloned())
            .collect();
        auth_events.sort();
        auth_events.dedup();
        let mut prev_events = room.forward_extremities.clone();
        prev_events.truncate(MAX_PREV_EVENTS);
        let depth = (room.max_depth + 1).min(MAX_SAFE_INT);
        self.build_pdu(
            rules,
            Some(&room.room_id),
            sender,
            draft,
            &prev_events,
            &auth_events,
            depth,
        )
        .await
    }

    /// Assembles, hashes and signs a PDU. `room_id` is `None` only for the create event of a
    /// room version whose room id is derived from that event.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn build_pdu(
        &self,
        rules: &RoomVersionRules,
        room_id: Option<&str>,
        sender: &str,
        draft: &EventDraft,
        prev_events: &[String],
        auth_events: &[String],
        depth: i64,
    ) -> Result<BuiltEvent> {
        if rules.event_id_format == EventIdFormatVersion::V1 {
            return Err(Error::new(
                ErrorCode::UnsupportedRoomVersion,
                "Events cannot be created in room versions 1 and 2",
            ));
        }
        let mut object = Map::new();
        if let Some(room_id) = room_id {
            object.insert("room_id".into(), room_id.into());
        }
        object.insert("sender".into(), sender.into());
        object.insert("type".into(), draft.event_type.clone().into());
        if let Some(state_key) = &draft.state_key {
            object.insert("state_key".into(), state_key.clone().into());
        }
        object.insert("content".into(), draft.content.clone());
        object.insert("origin_server_ts".into(), now_millis().into());
        object.insert("depth".into(), depth.into());
        object.insert("prev_events".into(), prev_events.to_vec().into());
        object.insert("auth_events".into(), auth_events.to_vec().into());
        if let Some(redacts) = &draft.redacts
            && !rules.redaction.content_field_redacts
        {
            object.insert("redacts".into(), redacts.clone().into());
        }
        let keys = self.signing_keys().await?;
        let mut object: CanonicalJsonObject = ruma::canonical_json::try_from_json_map(object)
            .map_err(|e| Error::bad_json(format!("Event is not canonical JSON: {e}")))?;
        ruma::signatures::hash_and_sign_event(
            &self.config.server_name,
            keys.pair(),
            &mut object,
            &rules.redaction,
        )
        .map_err(|e| too_large_or_bad(e.to_string()))?;
        let hash = ruma::signatures::reference_hash(&object, rules)
            .map_err(|e| too_large_or_bad(e.to_string()))?;
        let event_id = format!("${hash}");
        let json = serde_json::to_string(&object).map_err(Error::internal)?;
        if json.len() > MAX_PDU_BYTES {
            return Err(Error::new(
                ErrorCode::TooLarge,
                format!("Event is larger than {MAX_PDU_BYTES} bytes"),
            ));
        }
        let pdu = Pdu::parse(&event_id, &json, false).map_err(Error::internal)?;
        Ok(BuiltEvent {
            event_id,
            json,
            pdu,
            depth,
        })
    }

    /// The parsed events with these ids, from the cache or the database (then cached).
    async fn auth_pdus(&self, ids: &[String]) -> Result<Vec<Arc<Pdu>>> {
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        {
            let mut cache = self.auth_events.lock().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                match cache.get(id) {
                    Some(pdu) => found.push(pdu.clone()),
                    None => missing.push(id.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let records = self
            .storage
            .rooms
            .get_events(&missing)
            .await
            .map_err(internal)?;
        let mut parsed = Vec::with_capacity(records.len());
        for record in records {
            let pdu = Pdu::parse(
                &record.event_id,
                &record.pdu_json,
                record.rejected_reason.is_some(),
            )
            .map_err(Error::internal)?;
            parsed.push((record.event_id, Arc::new(pdu)));
        }
        let mut cache = self.auth_events.lock().unwrap_or_else(|e| e.into_inner());
        for (id, pdu) in parsed {
            cache.put(id, pdu.clone());
            found.push(pdu);
        }
        Ok(found)
    }

    /// Runs the authorization rules against the room's current state: 403 when they refuse.
    pub(super) async fn authorize(
        &self,
        rules: &RoomVersionRules,
        pdu: &Pdu,
        state: &StateMap,
    ) -> Result<()> {
        let auth_types = state_res::auth_types_for_event(
            &pdu.kind,
            &pdu.sender,
            pdu.state_key.as_deref(),
            &pdu.content,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut wanted: Vec<(String, String)> = auth_types
            .into_iter()
            .map(|(kind, key)| (kind.to_string(), key))
            .collect();
        wanted.push(("m.room.create".into(), String::new()));
        let ids: Vec<String> = wanted
            .iter()
            .filter_map(|k| state.get(k).cloned())
            .collect();
        let mut by_id: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        let mut by_state: HashMap<(String, String), Arc<Pdu>> = HashMap::new();
        for pdu in self.auth_pdus(&ids).await? {
            if let Some(key) = &pdu.state_key {
                by_state.insert((pdu.kind.to_string(), key.clone()), pdu.clone());
            }
            by_id.insert(pdu.event_id.clone(), pdu);
        }
        state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| {
            by_id.get(id).cloned()
        })
        .map_err(|reason| Error::forbidden(format!("Event not authorized: {reason}")))?;
        state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |kind, key| {
            by_state.get(&(kind.to_string(), key.to_owned())).cloned()
        })
        .map_err(|reason| Error::forbidden(format!("Event not authorized: {reason}")))?;
        Ok(())
    }
}

fn too_large_or_bad(message: String) -> Error {
    if message.to_lowercase().contains("too large") {
        Error::new(ErrorCode::TooLarge, message)
    } else {
        Error::bad_json(message)
    }
}
