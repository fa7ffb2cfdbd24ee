//! A stored PDU as the auth rules and state resolution read it, and its client format.

use ruma::{
    CanonicalJsonObject, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, UserId, events::TimelineEventType, room_version_rules::RedactionRules,
};
use serde::{Deserialize, Serialize};
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

/// An event as JSON text, ready to be written into an answer as it is.
pub type EventJson = Box<RawJsonValue>;

/// The fields of a PDU its client format keeps, as the PDU's own JSON text, plus the two it
/// adds. Declared in sorted order, the order a `Value` object writes its keys in.
#[derive(Deserialize, Serialize)]
struct ClientFields<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a RawJsonValue>,
    #[serde(skip_deserializing)]
    event_id: &'a str,
    #[serde(borrow, default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_server_ts: Option<&'a RawJsonValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redacts: Option<&'a RawJsonValue>,
    #[serde(skip_deserializing)]
    room_id: &'a str,
    #[serde(borrow, default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<&'a RawJsonValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_key: Option<&'a RawJsonValue>,
    #[serde(borrow, default, deserialize_with = "present", rename = "type")]
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a RawJsonValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    unsigned: Option<&'a RawJsonValue>,
}

/// A field that is there, whatever its value: `null` included, which `Option`'s own
/// deserializer would take for a missing field.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawJsonValue>, D::Error> {
    <&RawJsonValue>::deserialize(d).map(Some)
}

/// [`client_event`] as JSON text. An event that was not redacted is written from its PDU's
/// text, field by field, without building a `Value` tree: a sync sends every new event to
/// every listener, and the tree's allocations were most of its cost.
pub fn client_event_json(
    event_id: &str,
    room_id: &str,
    pdu_json: &str,
    redacted_by: Option<&str>,
    redaction_rules: Option<&RedactionRules>,
) -> EventJson {
    let fields = match redacted_by {
        None => serde_json::from_str::<ClientFields>(pdu_json).ok(),
        Some(_) => None,
    };
    // A redaction whose `redacts` is only in its content (room versions 11 and later) gets the
    // top-level copy `client_event` adds; redactions are too rare to write that path twice.
    let fields = fields.filter(|f| f.redacts.is_some() || !is_redaction(f.kind));
    let Some(mut fields) = fields else {
        let value = client_event(event_id, room_id, pdu_json, redacted_by, redaction_rules);
        return to_event_json(&value);
    };
    // A PDU without content (never one of ours) shows `{}`, as `client_event` does.
    fields.content = fields.content.or_else(|| serde_json::from_str("{}").ok());
    fields.event_id = event_id;
    fields.room_id = room_id;
    // Writes the fields' text as it is; it is not parsed again.
    serde_json::value::to_raw_value(&fields)
        .unwrap_or_else(|_| to_event_json(&client_event(event_id, room_id, pdu_json, None, None)))
}

fn is_redaction(kind: Option<&RawJsonValue>) -> bool {
    kind.is_some_and(|kind| kind.get() == "\"m.room.redaction\"")
}

/// A `Value` as [`EventJson`].
pub fn to_event_json(value: &Value) -> EventJson {
    // Writing a `Value` cannot fail (its keys are strings).
    serde_json::value::to_raw_value(value).unwrap_or_default()
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
    // Room versions 11 and later carry `redacts` in the content only. MSC2174 asks servers to
    // copy it to the top level for clients written before them (matrix-nio, for one, drops a
    // redaction without it); the copy is not part of the signed event.
    if !out.contains_key("redacts")
        && out.get("type").and_then(Value::as_str) == Some("m.room.redaction")
        && let Some(redacts) = out["content"].get("redacts").filter(|r| r.is_string())
    {
        let redacts = redacts.clone();
        out.insert("redacts".into(), redacts);
    }
    out.insert("event_id".into(), event_id.into());
    out.insert("room_id".into(), room_id.into());
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use ruma::RoomVersionId;
    use serde_json::{Value, json};

    use super::{client_event, client_event_json};

    fn both(event_id: &str, pdu: &Value, redacted_by: Option<&str>) -> (Value, Value) {
        let rules = RoomVersionId::V11.rules().map(|r| r.redaction);
        let text = pdu.to_string();
        let tree = client_event(event_id, "!r:x", &text, redacted_by, rules.as_ref());
        let raw = client_event_json(event_id, "!r:x", &text, redacted_by, rules.as_ref());
        let raw: Value = serde_json::from_str(raw.get()).expect("valid JSON");
        (tree, raw)
    }

    #[test]
    fn client_json_text_is_the_client_event() {
        let message = json!({
            "room_id": "!r:x", "sender": "@a:x", "type": "m.room.message", "depth": 7,
            "content": {"body": "h\u{e9}llo \"quoted\" \\ \n", "msgtype": "m.text"},
            "origin_server_ts": 1_700_000_000_000_i64, "prev_events": ["$p"],
            "auth_events": ["$a", "$b"], "hashes": {"sha256": "x"},
            "signatures": {"x": {"ed25519:1": "sig"}}, "unsigned": {"age": 5},
        });
        let state = json!({
            "room_id": "!r:x", "sender": "@a:x", "type": "m.room.name", "state_key": "",
            "content": {"name": "N"}, "origin_server_ts": 1, "depth": 2,
            "prev_events": [], "auth_events": [],
        });
        let redaction = json!({
            "room_id": "!r:x", "sender": "@a:x", "type": "m.room.redaction", "redacts": "$m",
            "content": {}, "origin_server_ts": 1, "depth": 3,
            "prev_events": [], "auth_events": [],
        });
        let no_content = json!({"sender": "@a:x", "type": "m.x", "origin_server_ts": 1});
        // Room version 11 carries `redacts` in the content.
        let redaction_v11 = json!({
            "room_id": "!r:x", "sender": "@a:x", "type": "m.room.redaction",
            "content": {"redacts": "$m"}, "origin_server_ts": 1, "depth": 3,
        });
        // Fields stored as `null` stay `null` (a client tells state events by `state_key`).
        let nulls = json!({
            "sender": "@a:x", "type": "m.x", "origin_server_ts": 1, "content": null,
            "state_key": null, "unsigned": null, "redacts": null,
        });
        for (id, pdu) in [
            ("$m", &message),
            ("$s", &state),
            ("$r", &redaction),
            ("$r11", &redaction_v11),
            ("$\"odd\\id", &no_content),
            ("$n", &nulls),
        ] {
            let (tree, raw) = both(id, pdu, None);
            assert_eq!(raw, tree, "{id}");
            assert_eq!(raw["event_id"], id);
        }
        // Room version 11's redaction is served with the top-level copy older clients read,
        // also once it is itself redacted (the v11 rules keep `content.redacts`).
        for redacted_by in [None, Some("$r2")] {
            let (tree, raw) = both("$r11", &redaction_v11, redacted_by);
            assert_eq!(raw, tree);
            assert_eq!(raw["redacts"], "$m", "{redacted_by:?}");
            assert_eq!(raw["content"]["redacts"], "$m");
        }
        // A redacted event keeps the redaction's path: content stripped, the reason given.
        let (tree, raw) = both("$m", &message, Some("$r"));
        assert_eq!(raw, tree);
        assert_eq!(raw["content"], json!({}));
        assert_eq!(raw["unsigned"]["redacted_because"]["event_id"], "$r");
        let (_, raw) = both("$n", &nulls, None);
        assert!(raw["state_key"].is_null() && raw.get("state_key").is_some());
        // Duplicate keys: what `client_event` makes of them (the last one wins).
        let text = r#"{"type":"m.x","sender":"@a:x","content":{"a":1},"content":{"b":2}}"#;
        let tree = client_event("$d", "!r:x", text, None, None);
        let raw = client_event_json("$d", "!r:x", text, None, None);
        assert_eq!(serde_json::from_str::<Value>(raw.get()).ok(), Some(tree));
        // Unreadable stored JSON gives what `client_event` gives, not an error.
        let rules = RoomVersionId::V11.rules().map(|r| r.redaction);
        let raw = client_event_json("$b", "!r:x", "{not json", None, rules.as_ref());
        let tree = client_event("$b", "!r:x", "{not json", None, rules.as_ref());
        assert_eq!(serde_json::from_str::<Value>(raw.get()).ok(), Some(tree));
    }
}
