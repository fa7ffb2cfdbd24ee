//! State resolution for forked room graphs, with ruma's implementation of the room version's
//! algorithm (v2, or v2.1 from room version 12). Local events never fork (they are serialized
//! per room); forks arrive with federation, which this is the ground for.

use std::collections::{HashMap, HashSet, VecDeque};

use palpo_core::{Error, Result};
use palpo_storage::model::{NewEvent, StateMap};
use ruma::{
    OwnedEventId,
    events::StateEventType,
    state_res::{self, utils::event_id_set::EventIdSet},
};

use super::{RoomService, internal, pdu::Pdu, room_version_rules, timeline::EventDraft};

impl RoomService {
    /// Builds and signs an event at an explicit place in the graph (`prev_events`), authorized
    /// against `state`, and stores it as an outlier: known, but not part of the timeline or
    /// the current state until resolution places it.
    pub async fn create_outlier_at(
        &self,
        room_id: &str,
        sender: &str,
        draft: EventDraft,
        prev_events: Vec<String>,
        state: &StateMap,
    ) -> Result<String> {
        super::timeline::check_draft(&draft)?;
        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        let room = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let (_, rules) = room_version_rules(&room.room_version)?;
        let mut at = room.clone();
        at.forward_extremities = prev_events;
        let built = self.build_on(&at, &rules, sender, &draft, state).await?;
        self.authorize(&rules, &built.pdu, state).await?;
        self.storage
            .rooms
            .persist_event(&NewEvent {
                event_id: built.event_id.clone(),
                room_id: room_id.to_owned(),
                depth: built.depth,
                event_type: draft.event_type.clone(),
                state_key: draft.state_key.clone(),
                sender: sender.to_owned(),
                origin_server_ts: i64::from(built.pdu.origin_server_ts.0),
                pdu_json: built.json.clone(),
                prev_events: at.forward_extremities.clone(),
                outlier: true,
                soft_failed: false,
                rejected_reason: None,
                expected_write_version: room.write_version,
                extends_head: false,
                membership: None,
                redacts: None,
                txn: None,
                thread_id: None,
                sent_with: None,
            })
            .await
            .map_err(internal)?;
        Ok(built.event_id)
    }

    /// Resolves forked states of a room into one.
    pub async fn resolve_state(&self, room_id: &str, states: &[StateMap]) -> Result<StateMap> {
        let room = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let (_, rules) = room_version_rules(&room.room_version)?;
        let v2 = rules
            .state_res
            .v2_rules()
            .ok_or_else(|| Error::internal("state resolution v1 is not implemented"))?;

        // Every event of the states and of their auth chains, loaded once.
        let mut events: HashMap<OwnedEventId, Pdu> = HashMap::new();
        let mut auth_chains = Vec::with_capacity(states.len());
        for state in states {
            let roots: Vec<String> = state.values().cloned().collect();
            let chain = self.auth_chain(&roots, &mut events).await?;
            auth_chains.push(chain.into_iter().collect::<EventIdSet<OwnedEventId>>());
        }
        let ruma_states: Vec<state_res::StateMap<OwnedEventId>> = states
            .iter()
            .map(|state| {
                state
                    .iter()
                    .filter_map(|((kind, key), id)| {
                        let id = OwnedEventId::try_from(id.as_str()).ok()?;
                        Some(((StateEventType::from(kind.as_str()), key.clone()), id))
                    })
                    .collect()
            })
            .collect();
        let resolved = state_res::resolve(
            &rules.authorization,
            v2,
            &ruma_states,
            auth_chains,
            |id| events.get(id).cloned(),
            |conflicted| Some(conflicted_subgraph(conflicted, &events)),
        )
        .map_err(|e| Error::internal(format!("state resolution failed: {e}")))?;
        Ok(resolved
            .into_iter()
            .map(|((kind, key), id)| ((kind.to_string(), key), id.to_string()))
            .collect())
    }

    /// The events in `roots` and, recursively, everything they cite in `auth_events`.
    async fn auth_chain(
        &self,
        roots: &[String],
        events: &mut HashMap<OwnedEventId, Pdu>,
    ) -> Result<HashSet<OwnedEventId>> {
        let mut chain = HashSet::new();
        let mut frontier: Vec<String> = roots.to_vec();
        while !frontier.is_empty() {
            let missing: Vec<String> = frontier
                .iter()
                .filter(|id| {
                    OwnedEventId::try_from(id.as_str())
                        .map(|id| !events.contains_key(&id))
                        .unwrap_or(false)
                })
                .cloned()
                .collect();
            for record in self
                .storage
                .rooms
                .get_events(&missing)
                .await
                .map_err(internal)?
            {
                let pdu = Pdu::parse(
                    &record.event_id,
                    &record.pdu_json,
                    record.rejected_reason.is_some(),
                )
                .map_err(Error::internal)?;
                events.insert(pdu.event_id.clone(), pdu);
            }
            let mut next = Vec::new();
            for id in frontier {
                let Ok(id) = OwnedEventId::try_from(id.as_str()) else {
                    continue;
                };
                let Some(pdu) = events.get(&id) else {
                    return Err(Error::internal(format!("auth chain event {id} is missing")));
                };
                for auth in &pdu.auth_events {
                    if chain.insert(auth.clone()) {
                        next.push(auth.to_string());
                    }
                }
            }
            frontier = next;
        }
        Ok(chain)
    }
}

/// The conflicted state subgraph (room version 12): events on some auth path from one
/// conflicted event to another — ancestors of a conflicted event that themselves descend from
/// a conflicted event — plus the conflicted events.
fn conflicted_subgraph(
    conflicted: &state_res::StateMap<Vec<OwnedEventId>>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> EventIdSet<OwnedEventId> {
    let conflicted_ids: HashSet<&OwnedEventId> = conflicted.values().flatten().collect();
    // Ancestors (through auth_events) of the conflicted events.
    let mut ancestors: HashSet<&OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<&OwnedEventId> = conflicted_ids.iter().copied().collect();
    while let Some(id) = queue.pop_front() {
        if let Some(pdu) = events.get(id) {
            for auth in &pdu.auth_events {
                if ancestors.insert(auth) {
                    queue.push_back(auth);
                }
            }
        }
    }
    // Descendants of the conflicted events, within what is loaded.
    let mut children: HashMap<&OwnedEventId, Vec<&OwnedEventId>> = HashMap::new();
    for (id, pdu) in events {
        for auth in &pdu.auth_events {
            children.entry(auth).or_default().push(id);
        }
    }
    let mut descendants: HashSet<&OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<&OwnedEventId> = conflicted_ids.iter().copied().collect();
    while let Some(id) = queue.pop_front() {
        for child in children.get(id).into_iter().flatten() {
            if descendants.insert(child) {
                queue.push_back(child);
            }
        }
    }
    ancestors
        .intersection(&descendants)
        .copied()
        .chain(conflicted_ids.iter().copied())
        .cloned()
        .collect()
}
