//! Membership changes: join, invite, leave, kick, ban, unban, knock, forget; and the
//! profile data a member event carries.

use palpo_core::{Error, Result};
use palpo_storage::model::{TokenCheck, TxnKey};
use serde_json::Value;

use super::{RoomService, create::member_draft, internal, timeline::EventDraft};

impl RoomService {
    /// Display name and avatar for a member event of `user` (local users only).
    pub(super) async fn member_profile(
        &self,
        user: &str,
    ) -> Result<(Option<String>, Option<String>)> {
        let profile = self
            .storage
            .profiles
            .get_profile(user)
            .await
            .map_err(internal)?;
        Ok(profile
            .map(|p| (p.displayname, p.avatar_url))
            .unwrap_or_else(|| (localpart(user).map(str::to_owned), None)))
    }

    /// Resolves `#alias:server` to a room id; a room id passes through.
    pub async fn resolve_room(&self, room_id_or_alias: &str) -> Result<String> {
        if room_id_or_alias.starts_with('#') {
            let alias = self
                .storage
                .aliases
                .get_alias(room_id_or_alias)
                .await
                .map_err(internal)?
                .ok_or_else(|| Error::not_found("Room alias not found"))?;
            return Ok(alias.room_id);
        }
        if !room_id_or_alias.starts_with('!') {
            return Err(Error::invalid_param("Not a room id or alias"));
        }
        Ok(room_id_or_alias.to_owned())
    }

    async fn require_room(&self, room_id: &str) -> Result<()> {
        match self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
        {
            Some(_) => Ok(()),
            // Joining rooms on other servers arrives with federation.
            None => Err(Error::not_found("No known room with that id")),
        }
    }

    async fn change_membership(
        &self,
        room_id: &str,
        sender: &str,
        target: &str,
        membership: &str,
        reason: Option<String>,
    ) -> Result<String> {
        self.require_room(room_id).await?;
        ruma::UserId::parse(target).map_err(|_| Error::invalid_param("Invalid user id"))?;
        let profile = match membership {
            "join" | "invite" | "knock" => self.member_profile(target).await?,
            _ => (None, None),
        };
        self.append(
            room_id,
            sender,
            member_draft(target, membership, profile, reason, false),
            None,
        )
        .await
    }

    pub async fn join(
        &self,
        user: &str,
        room_id_or_alias: &str,
        reason: Option<String>,
    ) -> Result<String> {
        let room_id = self.resolve_room(room_id_or_alias).await?;
        self.change_membership(&room_id, user, user, "join", reason)
            .await?;
        Ok(room_id)
    }

    pub async fn knock(
        &self,
        user: &str,
        room_id_or_alias: &str,
        reason: Option<String>,
    ) -> Result<String> {
        let room_id = self.resolve_room(room_id_or_alias).await?;
        self.change_membership(&room_id, user, user, "knock", reason)
            .await?;
        Ok(room_id)
    }

    pub async fn invite(
        &self,
        sender: &str,
        room_id: &str,
        target: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let current = self
            .storage
            .rooms
            .membership(room_id, target)
            .await
            .map_err(internal)?;
        if current.as_ref().is_some_and(|m| m.membership == "join") {
            return Err(Error::forbidden("The user is already in the room"));
        }
        self.change_membership(room_id, sender, target, "invite", reason)
            .await?;
        Ok(())
    }

    /// Leaves a room, rejects an invite or withdraws a knock.
    pub async fn leave(&self, user: &str, room_id: &str, reason: Option<String>) -> Result<()> {
        let current = self
            .storage
            .rooms
            .membership(room_id, user)
            .await
            .map_err(internal)?;
        match current.as_ref().map(|m| m.membership.as_str()) {
            Some("join" | "invite" | "knock") => {}
            // Leaving again is a no-op, as in other servers.
            Some("leave") => return Ok(()),
            _ => return Err(Error::forbidden("You are not in this room")),
        }
        self.change_membership(room_id, user, user, "leave", reason)
            .await?;
        Ok(())
    }

    pub async fn kick(
        &self,
        sender: &str,
        room_id: &str,
        target: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let current = self
            .storage
            .rooms
            .membership(room_id, target)
            .await
            .map_err(internal)?;
        if !current
            .as_ref()
            .is_some_and(|m| matches!(m.membership.as_str(), "join" | "invite" | "knock"))
        {
            return Err(Error::forbidden("The user is not in the room"));
        }
        self.change_membership(room_id, sender, target, "leave", reason)
            .await?;
        Ok(())
    }

    pub async fn ban(
        &self,
        sender: &str,
        room_id: &str,
        target: &str,
        reason: Option<String>,
    ) -> Result<()> {
        self.change_membership(room_id, sender, target, "ban", reason)
            .await?;
        Ok(())
    }

    pub async fn unban(
        &self,
        sender: &str,
        room_id: &str,
        target: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let current = self
            .storage
            .rooms
            .membership(room_id, target)
            .await
            .map_err(internal)?;
        if current.as_ref().is_none_or(|m| m.membership != "ban") {
            return Err(Error::forbidden("The user is not banned"));
        }
        self.change_membership(room_id, sender, target, "leave", reason)
            .await?;
        Ok(())
    }

    /// Forgets a room the user has left.
    pub async fn forget(&self, user: &str, room_id: &str) -> Result<()> {
        let current = self
            .storage
            .rooms
            .membership(room_id, user)
            .await
            .map_err(internal)?;
        match current.as_ref().map(|m| m.membership.as_str()) {
            Some("leave" | "ban") => {
                self.storage
                    .rooms
                    .forget_room(room_id, user)
                    .await
                    .map_err(internal)?;
                // It takes no stream position: the copy kept for syncs would not notice.
                self.user_memberships
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop(user);
                Ok(())
            }
            Some(_) => Err(Error::with_status(
                400,
                palpo_core::ErrorCode::Unknown,
                "You must leave the room before forgetting it",
            )),
            None => Err(Error::not_found("You have never been in this room")),
        }
    }

    /// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`.
    pub async fn send_message(
        &self,
        sender: &str,
        device_id: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
        content: Value,
    ) -> Result<String> {
        let draft = EventDraft::message(event_type, content);
        self.append(room_id, sender, draft, Some(txn(sender, device_id, txn_id)))
            .await
    }

    /// [`RoomService::send_message`] for a sender remembered from its access token without
    /// asking the database: the event is written only if `token` still belongs to its
    /// device, checked in the event's transaction (401 `M_UNKNOWN_TOKEN` if not).
    pub async fn send_message_checking(
        &self,
        token: &TokenCheck,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
        content: Value,
    ) -> Result<String> {
        let (sender, device_id) = (&token.user_id, &token.device_id);
        let draft = EventDraft::message(event_type, content);
        let txn = txn(sender, device_id, txn_id);
        self.append_checking(room_id, sender, draft, Some(txn), Some(token))
            .await
    }

    /// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}`.
    pub async fn send_state(
        &self,
        sender: &str,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String> {
        if event_type == "m.room.member" {
            return Err(Error::forbidden(
                "Use the membership endpoints to change m.room.member",
            ));
        }
        self.append(
            room_id,
            sender,
            EventDraft::state(event_type, state_key, content),
            None,
        )
        .await
    }

    /// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`. The sender must have sent the event or
    /// hold the room's `redact` power.
    pub async fn redact(
        &self,
        sender: &str,
        device_id: &str,
        room_id: &str,
        event_id: &str,
        txn_id: &str,
        reason: Option<String>,
    ) -> Result<String> {
        let target = self
            .storage
            .rooms
            .get_event(event_id)
            .await
            .map_err(internal)?
            .filter(|e| e.room_id == room_id)
            .ok_or_else(|| Error::not_found("Event not found"))?;
        if target.sender != sender {
            let power = self.power_of(room_id, sender).await?;
            let needed = self.power_needed(room_id, "redact", 50).await?;
            if power < needed {
                return Err(Error::forbidden("You may not redact other users' events"));
            }
        }
        let room = self
            .storage
            .rooms
            .get_room(room_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let (_, rules) = super::room_version_rules(&room.room_version)?;
        let mut content = serde_json::Map::new();
        if let Some(reason) = reason {
            content.insert("reason".into(), reason.into());
        }
        if rules.redaction.content_field_redacts {
            content.insert("redacts".into(), event_id.into());
        }
        let draft = EventDraft {
            event_type: "m.room.redaction".into(),
            state_key: None,
            content: Value::Object(content),
            redacts: Some(event_id.to_owned()),
        };
        self.append(room_id, sender, draft, Some(txn(sender, device_id, txn_id)))
            .await
    }
}

fn txn(user_id: &str, device_id: &str, txn_id: &str) -> TxnKey {
    TxnKey {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        txn_id: txn_id.to_owned(),
    }
}

fn localpart(user: &str) -> Option<&str> {
    user.strip_prefix('@')
        .and_then(|rest| rest.split(':').next())
}
