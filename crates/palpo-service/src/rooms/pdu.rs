//! A stored PDU as the auth rules and state resolution read it, and its client format.

use ruma::{
    CanonicalJsonObject, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, UserId, events::TimelineEventType, room_version_rules::RedactionRules,
};
use serde::Deserialize;
use serde_json::{Map, Value, value::RawValue as RawJsonValue};

/// An event reference: a bare id (room versions 3+), or `[id, {hashes}]` (versions 1 and 2).
#[derive(Deserialize)]
#[serde(untagged)]
enum EventRef {
    Id(OwnedEventId),
    WithHashes(OwnedEventId, serde::de::IgnoredAny),
}

impl EventRef {
    fn into_id(self) -> OwnedEventId {
        match self {
            EventRef::Id(id) | EventRef::WithHashes(id, _) => id,
        }
    }
}

fn event_refs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<OwnedEventId>, D::Error> {
    Ok(Vec::<EventRef>::deserialize(d)?
        .into_iter()
        .map(EventRef::into_id)
        .collect())
}

#[derive(Deserialize)]
struct RawPdu {
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawJsonValue>,
    state_key: Option<String>,
    #[serde(deserialize_with = "event_refs")]
    prev_events: Vec<OwnedEventId>,
    #[serde(deserialize_with = "event_refs")]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
}

/// A PDU, with the fields event authorization and state resolution need.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    /// From the top level (room versions before 11) or the content (11 and later).
    pub redacts: Option<OwnedEventId>,
    pub rejected: bool,
}

impl Pdu {
    /// Parses stored PDU JSON. `event_id` is passed in: in room versions 3+ it is not a field.
    pub fn parse(event_id: &str, json: &str, rejected: bool) -> Result<Self, String> {
        let raw: RawPdu = serde_json::from_str(json).map_err(|e| format!("malformed PDU: {e}"))?;
        let event_id = EventId::parse(event_id).map_err(|e| format!("bad event id: {e}"))?;
        let redacts = raw.redacts.or_else(|| {
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            serde_json::from_str::<Redacts>(raw.content.get())
                .ok()
                .and_then(|r| r.redacts)
        });
        Ok(Pdu {
            event_id,
            room_id: raw.room_id,
            sender: raw.sender,
            origin_server_ts: raw.origin_server_ts,
            kind: raw.kind,
            content: raw.content,
            state_key: raw.state_key,
            prev_events: raw.prev_events,
            auth_events: raw.auth_events,
            redacts,
            rejected,
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawJsonValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}

/// The federation format of a stored PDU (`event_format: "federation"`): the PDU itself,
/// redacted when the event was redacted.
pub fn federation_event(
    pdu_json: &str,
    redacted_by: Option<&str>,
    redaction_rules: Option<&RedactionRules>,
) -> Value {
    let pdu: Map<String, Value> = serde_json::from_str(pdu_json).unwrap_or_default();
    if let (Some(_), Some(rules)) = (redacted_by, redaction_rules)
        && let Ok(mut object) =
            serde_json::from_value::<CanonicalJsonObject>(Value::Object(pdu.clone()))
        && ruma::canonical_json::redact_in_place(&mut object, rules, None).is_ok()
        && let Ok(redacted) = serde_json::to_value(object)
    {
        return redacted;
    }
    Value::Object(pdu)
}

/// The client-server format of a stored PDU ("ClientEvent"): federation fields dropped,
/// `room_id` and `event_id` present, the content redacted when the event was redacted.
pub fn client_event(
    event_id: &str,
    room_id: &str,
    pdu_json: &str,
    redacted_by: Option<&str>,
    redaction_rules: Option<&RedactionRules>,
) -> Value {
    let mut pdu: Map<String, Value> = serde_json::from_str(pdu_json).unwrap_or_default();
    if let (Some(redacted_by), Some(rules)) = (redacted_by, redaction_rules)
        && let Ok(mut object) =
            serde_json::from_value::<CanonicalJsonObject>(Value::Object(pdu.clone()))
        && ruma::canonical_json::redact_in_place(&mut object, rules, None).is_ok()
        && let Ok(Value::Object(redacted)) = serde_json::to_value(object)
    {
        pdu = redacted;
        let unsigned = pdu
            .entry("unsigned")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(unsigned) = unsigned {
            unsigned.insert(
                "redacted_because".into(),
                serde_json::json!({ "event_id": redacted_by }),
            );
        }
    }
    let mut out = Map::new();
    for key in [
        "content",
        "origin_server_ts",
        "sender",
        "type",
        "state_key",
        "unsigned",
        "redacts",
    ] {
        if let Some(value) = pdu.remove(key) {
            out.insert(key.to_owned(), value);
        }
    }
    if !out.contains_key("content") {
        out.insert("content".into(), Value::Object(Map::new()));
    }
    out.insert("event_id".into(), event_id.into());
    out.insert("room_id".into(), room_id.into());
    Value::Object(out)
}
