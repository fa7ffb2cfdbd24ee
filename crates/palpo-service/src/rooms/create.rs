//! `POST /createRoom`: the create event, the creator's join, power levels, the preset's
//! rules, initial state, name and topic, then invites — in the order the spec gives.

use palpo_core::{Error, ErrorCode, Result, now_millis};
use palpo_storage::{
    StorageError,
    model::{AliasRecord, NewRoom},
};
use ruma::room_version_rules::RoomIdFormatVersion;
use serde_json::{Map, Value, json};

use super::{RoomService, internal, room_version_rules, timeline::EventDraft};
use crate::credentials::random_string;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    PublicChat,
    TrustedPrivateChat,
}

/// One event of `initial_state`.
#[derive(Debug, Clone)]
pub struct InitialState {
    pub event_type: String,
    pub state_key: String,
    pub content: Value,
}

#[derive(Debug, Clone, Default)]
pub struct CreateRoom {
    pub preset: Option<Preset>,
    /// `public` publishes the room in the directory.
    pub is_public: bool,
    pub room_version: Option<String>,
    pub creation_content: Option<Map<String, Value>>,
    pub initial_state: Vec<InitialState>,
    pub invite: Vec<String>,
    pub is_direct: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub room_alias_name: Option<String>,
    pub power_level_content_override: Option<Map<String, Value>>,
}

impl RoomService {
    #[tracing::instrument(skip_all, fields(creator = %creator))]
    pub async fn create_room(&self, creator: &str, request: CreateRoom) -> Result<String> {
        let version = request
            .room_version
            .clone()
            .unwrap_or_else(|| self.default_room_version().to_owned());
        let (_, rules) = room_version_rules(&version)?;
        for invitee in &request.invite {
            ruma::UserId::parse(invitee.as_str()).map_err(|_| {
                Error::invalid_param(format!("Invalid user id to invite: {invitee}"))
            })?;
        }
        let alias = match &request.room_alias_name {
            Some(name) => {
                if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
                    return Err(Error::invalid_param("Invalid room_alias_name"));
                }
                let alias = format!("#{name}:{}", self.config.server_name);
                if alias.len() > 255 {
                    return Err(Error::invalid_param("Room alias is too long"));
                }
                if self
                    .storage
                    .aliases
                    .get_alias(&alias)
                    .await
                    .map_err(internal)?
                    .is_some()
                {
                    return Err(Error::new(ErrorCode::RoomInUse, "Room alias already taken"));
                }
                Some(alias)
            }
            None => None,
        };
        let preset = request.preset.unwrap_or(if request.is_public {
            Preset::PublicChat
        } else {
            Preset::PrivateChat
        });

        // 1. The create event, which for room version 12 also names the room.
        let mut create_content = request.creation_content.clone().unwrap_or_default();
        create_content.insert("room_version".into(), version.clone().into());
        if !rules.authorization.use_room_create_sender {
            create_content.insert("creator".into(), creator.into());
        }
        let create = EventDraft::state("m.room.create", "", Value::Object(create_content));
        super::timeline::check_draft(&create)?;
        let derived = rules.room_id_format == RoomIdFormatVersion::V2;
        // Two identical create events in the same millisecond (one user creating rooms in
        // parallel) have the same id, and in room version 12 the same room id: the second
        // finds the room taken and builds again a millisecond later.
        let mut attempts = 0;
        let (built, room_id) = loop {
            attempts += 1;
            let pre_room_id = format!("!{}:{}", random_string(18), self.config.server_name);
            let built = self
                .build_pdu(
                    &rules,
                    (!derived).then_some(pre_room_id.as_str()),
                    creator,
                    &create,
                    &[],
                    &[],
                    1,
                )
                .await?;
            let room_id = if derived {
                format!("!{}", built.event_id.trim_start_matches('$'))
            } else {
                pre_room_id
            };
            let created = self
                .storage
                .rooms
                .create_room(&NewRoom {
                    room_id: room_id.clone(),
                    room_version: version.clone(),
                    creator: creator.to_owned(),
                    is_public: request.is_public,
                    created_at: now_millis(),
                })
                .await;
            match created {
                Ok(()) => break (built, room_id),
                Err(StorageError::Conflict(_)) if attempts < 10 => {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(StorageError::Conflict(_)) => {
                    return Err(Error::new(ErrorCode::RoomInUse, "Room id collision"));
                }
                Err(other) => return Err(internal(other)),
            }
        };
        let room = self
            .storage
            .rooms
            .get_room(&room_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::internal("room vanished after creation"))?;
        self.persist(&room, &built, &create).await?;

        // 2. The creator joins.
        let profile = self.member_profile(creator).await?;
        self.append(
            &room_id,
            creator,
            member_draft(creator, "join", profile, None, false),
            None,
        )
        .await?;

        // 3. Power levels, with the client's override on top.
        let mut power = default_power_levels(creator, preset, &request.invite, &rules);
        if let Some(overrides) = request.power_level_content_override {
            for (key, value) in overrides {
                power.insert(key, value);
            }
        }
        self.append(
            &room_id,
            creator,
            EventDraft::state("m.room.power_levels", "", Value::Object(power)),
            None,
        )
        .await?;

        // 4. The canonical alias.
        if let Some(alias) = &alias {
            self.storage
                .aliases
                .create_alias(&AliasRecord {
                    room_alias: alias.clone(),
                    room_id: room_id.clone(),
                    creator: creator.to_owned(),
                })
                .await
                .map_err(|e| match e {
                    StorageError::Conflict(_) => {
                        Error::new(ErrorCode::RoomInUse, "Room alias already taken")
                    }
                    other => internal(other),
                })?;
            self.append(
                &room_id,
                creator,
                EventDraft::state("m.room.canonical_alias", "", json!({ "alias": alias })),
                None,
            )
            .await?;
        }

        // 5. What the preset implies, unless initial_state says otherwise.
        let (join_rule, guest_access) = match preset {
            Preset::PublicChat => ("public", "forbidden"),
            Preset::PrivateChat | Preset::TrustedPrivateChat => ("invite", "can_join"),
        };
        let overridden = |kind: &str| {
            request
                .initial_state
                .iter()
                .any(|s| s.event_type == kind && s.state_key.is_empty())
        };
        for (kind, content) in [
            ("m.room.join_rules", json!({ "join_rule": join_rule })),
            (
                "m.room.history_visibility",
                json!({ "history_visibility": "shared" }),
            ),
            (
                "m.room.guest_access",
                json!({ "guest_access": guest_access }),
            ),
        ] {
            if !overridden(kind) {
                self.append(
                    &room_id,
                    creator,
                    EventDraft::state(kind, "", content),
                    None,
                )
                .await?;
            }
        }

        // 6. initial_state, then 7. name and topic.
        for state in request.initial_state {
            self.append(
                &room_id,
                creator,
                EventDraft::state(&state.event_type, &state.state_key, state.content),
                None,
            )
            .await?;
        }
        if let Some(name) = request.name {
            self.append(
                &room_id,
                creator,
                EventDraft::state("m.room.name", "", json!({ "name": name })),
                None,
            )
            .await?;
        }
        if let Some(topic) = request.topic {
            self.append(
                &room_id,
                creator,
                EventDraft::state("m.room.topic", "", json!({ "topic": topic })),
                None,
            )
            .await?;
        }

        // 8. Invites.
        for invitee in &request.invite {
            let profile = self.member_profile(invitee).await?;
            self.append(
                &room_id,
                creator,
                member_draft(invitee, "invite", profile, None, request.is_direct),
                None,
            )
            .await?;
        }
        tracing::info!(%room_id, %version, "room created");
        Ok(room_id)
    }
}

/// The `m.room.member` event for `user`.
pub(super) fn member_draft(
    user: &str,
    membership: &str,
    profile: (Option<String>, Option<String>),
    reason: Option<String>,
    is_direct: bool,
) -> EventDraft {
    let mut content = Map::new();
    content.insert("membership".into(), membership.into());
    if let Some(name) = profile.0 {
        content.insert("displayname".into(), name.into());
    }
    if let Some(avatar) = profile.1 {
        content.insert("avatar_url".into(), avatar.into());
    }
    if let Some(reason) = reason {
        content.insert("reason".into(), reason.into());
    }
    if is_direct {
        content.insert("is_direct".into(), true.into());
    }
    EventDraft::state("m.room.member", user, Value::Object(content))
}

fn default_power_levels(
    creator: &str,
    preset: Preset,
    invitees: &[String],
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Map<String, Value> {
    let mut users = Map::new();
    // From room version 12 creators hold unlimited power and must not be listed.
    if !rules.authorization.explicitly_privilege_room_creators {
        users.insert(creator.to_owned(), 100.into());
    }
    if preset == Preset::TrustedPrivateChat {
        for invitee in invitees {
            users.insert(invitee.clone(), 100.into());
        }
    }
    let mut power = Map::new();
    power.insert("users".into(), Value::Object(users));
    power.insert("users_default".into(), 0.into());
    power.insert(
        "events".into(),
        json!({
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        }),
    );
    power.insert("events_default".into(), 0.into());
    power.insert("state_default".into(), 50.into());
    power.insert("ban".into(), 50.into());
    power.insert("kick".into(), 50.into());
    power.insert("redact".into(), 50.into());
    power.insert("invite".into(), 0.into());
    power.insert("notifications".into(), json!({ "room": 50 }));
    power
}
