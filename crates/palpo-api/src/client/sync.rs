//! `GET /_matrix/client/v3/sync`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use palpo_core::Error;
use palpo_service::rooms::pdu::to_event_json;
use palpo_service::{
    Services,
    accounts::Caller,
    ephemeral::UnreadCounts,
    filter::SyncFilter,
    rooms::{InvitedRoom, JoinedRoom, LeftRoom, Timeline as RoomTimeline},
    sync::{SyncOptions, SyncResponse as ServiceResponse},
};
use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Query, types::Any};
use serde::Serialize;
use serde_json::Value;

use crate::{ApiTags, AppState, auth::RememberedAccessToken, error::ApiResult, payload::SerdeJson};

/// An event, as JSON text written into the answer as it is.
pub type EventJson = Any<palpo_service::rooms::EventJson>;

/// A list of events.
#[derive(Debug, Object, Serialize, Default)]
pub struct Events {
    pub events: Vec<EventJson>,
}

impl Events {
    fn raw(events: Vec<palpo_service::rooms::EventJson>) -> Self {
        Events {
            events: events.into_iter().map(Any).collect(),
        }
    }

    fn values(events: Vec<Value>) -> Self {
        Events::raw(events.iter().map(to_event_json).collect())
    }
}

#[derive(Debug, Object, Serialize)]
pub struct Timeline {
    pub events: Vec<EventJson>,
    /// True when events between the previous sync and this timeline were left out.
    pub limited: bool,
    /// Token to paginate `/messages` backwards from the start of this timeline.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_batch: Option<String>,
}

impl From<RoomTimeline> for Timeline {
    fn from(t: RoomTimeline) -> Self {
        Timeline {
            events: t.events.into_iter().map(Any).collect(),
            limited: t.limited,
            prev_batch: t.prev_batch,
        }
    }
}

/// Left empty by an incremental sync when the room's members did not change since the token.
#[derive(Debug, Object, Serialize, Default)]
pub struct RoomSummary {
    /// Members to name the room after when it has no name.
    #[oai(rename = "m.heroes", skip_serializing_if_is_none)]
    #[serde(rename = "m.heroes", skip_serializing_if = "Option::is_none")]
    pub heroes: Option<Vec<String>>,
    #[oai(rename = "m.joined_member_count", skip_serializing_if_is_none)]
    #[serde(
        rename = "m.joined_member_count",
        skip_serializing_if = "Option::is_none"
    )]
    pub joined_member_count: Option<i64>,
    #[oai(rename = "m.invited_member_count", skip_serializing_if_is_none)]
    #[serde(
        rename = "m.invited_member_count",
        skip_serializing_if = "Option::is_none"
    )]
    pub invited_member_count: Option<i64>,
}

#[derive(Debug, Object, Serialize, Default)]
pub struct UnreadNotificationCounts {
    pub highlight_count: i64,
    pub notification_count: i64,
}

impl From<UnreadCounts> for UnreadNotificationCounts {
    fn from(counts: UnreadCounts) -> Self {
        UnreadNotificationCounts {
            highlight_count: counts.highlight_count,
            notification_count: counts.notification_count,
        }
    }
}

#[derive(Debug, Object, Serialize)]
pub struct JoinedRoomSync {
    pub summary: RoomSummary,
    /// State up to the start of the timeline; absent with `use_state_after`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Events>,
    /// With `use_state_after`: the state up to the end of the timeline.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_after: Option<Events>,
    pub timeline: Timeline,
    pub ephemeral: Events,
    pub account_data: Events,
    /// Unread counts of the room; of its main timeline only when the filter asked for
    /// counts per thread.
    pub unread_notifications: UnreadNotificationCounts,
    /// Unread counts per thread (thread root id → counts), when the filter sets
    /// `room.timeline.unread_thread_notifications`; threads with none are left out.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unread_thread_notifications: Option<BTreeMap<String, UnreadNotificationCounts>>,
}

impl From<JoinedRoom> for JoinedRoomSync {
    fn from(room: JoinedRoom) -> Self {
        JoinedRoomSync {
            summary: room
                .summary
                .map(|summary| RoomSummary {
                    heroes: Some(summary.heroes),
                    joined_member_count: Some(summary.joined_member_count),
                    invited_member_count: Some(summary.invited_member_count),
                })
                .unwrap_or_default(),
            state: Some(Events::raw(room.state)),
            state_after: None,
            timeline: room.timeline.into(),
            ephemeral: Events::default(),
            account_data: Events::default(),
            unread_notifications: UnreadNotificationCounts::default(),
            unread_thread_notifications: None,
        }
    }
}

#[derive(Debug, Object, Serialize)]
pub struct InvitedRoomSync {
    /// Stripped state of the room, and the invite itself.
    pub invite_state: Events,
}

#[derive(Debug, Object, Serialize)]
pub struct KnockedRoomSync {
    /// Stripped state of the room, and the knock itself.
    pub knock_state: Events,
}

#[derive(Debug, Object, Serialize)]
pub struct LeftRoomSync {
    /// State up to the start of the timeline; absent with `use_state_after`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Events>,
    /// With `use_state_after`: the state up to the end of the timeline.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_after: Option<Events>,
    pub timeline: Timeline,
    pub account_data: Events,
}

impl From<LeftRoom> for LeftRoomSync {
    fn from(room: LeftRoom) -> Self {
        LeftRoomSync {
            state: Some(Events::raw(room.state)),
            state_after: None,
            timeline: room.timeline.into(),
            account_data: Events::default(),
        }
    }
}

#[derive(Debug, Object, Serialize, Default)]
pub struct Rooms {
    pub join: BTreeMap<String, JoinedRoomSync>,
    pub invite: BTreeMap<String, InvitedRoomSync>,
    pub leave: BTreeMap<String, LeftRoomSync>,
    pub knock: BTreeMap<String, KnockedRoomSync>,
}

#[derive(Debug, Object, Serialize, Default)]
pub struct DeviceLists {
    pub changed: Vec<String>,
    pub left: Vec<String>,
}

#[derive(Debug, Object, Serialize)]
pub struct SyncResponse {
    /// Token to pass as `since` to the next sync.
    pub next_batch: String,
    pub rooms: Rooms,
    pub account_data: Events,
    pub presence: Events,
    pub to_device: Events,
    pub device_lists: DeviceLists,
    pub device_one_time_keys_count: BTreeMap<String, i64>,
    pub device_unused_fallback_key_types: Vec<String>,
}

impl From<ServiceResponse> for SyncResponse {
    fn from(response: ServiceResponse) -> Self {
        let rooms = response.rooms;
        let mut ephemeral = response.ephemeral;
        let mut account_data = response.account_data;
        let invited = |map: BTreeMap<String, InvitedRoom>| {
            map.into_iter()
                .map(|(id, room)| (id, room.invite_state))
                .collect::<BTreeMap<_, _>>()
        };
        SyncResponse {
            next_batch: response.next_batch,
            rooms: Rooms {
                join: rooms
                    .join
                    .into_iter()
                    .map(|(id, r)| {
                        let mut room = JoinedRoomSync::from(r);
                        room.ephemeral =
                            Events::values(ephemeral.rooms.remove(&id).unwrap_or_default());
                        room.account_data =
                            Events::values(account_data.rooms.remove(&id).unwrap_or_default());
                        if let Some(unread) = ephemeral.unread.remove(&id) {
                            room.unread_notifications = unread.into();
                        }
                        if let Some(threads) = ephemeral.unread_threads.remove(&id) {
                            room.unread_thread_notifications =
                                Some(threads.into_iter().map(|(t, c)| (t, c.into())).collect());
                        }
                        (id, room)
                    })
                    .collect(),
                invite: invited(rooms.invite)
                    .into_iter()
                    .map(|(id, events)| {
                        (
                            id,
                            InvitedRoomSync {
                                invite_state: Events::values(events),
                            },
                        )
                    })
                    .collect(),
                leave: rooms
                    .leave
                    .into_iter()
                    .map(|(id, r)| {
                        let mut room = LeftRoomSync::from(r);
                        room.account_data =
                            Events::values(account_data.rooms.remove(&id).unwrap_or_default());
                        (id, room)
                    })
                    .collect(),
                knock: invited(rooms.knock)
                    .into_iter()
                    .map(|(id, events)| {
                        (
                            id,
                            KnockedRoomSync {
                                knock_state: Events::values(events),
                            },
                        )
                    })
                    .collect(),
            },
            account_data: Events::values(account_data.global),
            presence: Events::values(ephemeral.presence),
            to_device: Events::values(response.e2ee.to_device.events),
            device_lists: DeviceLists {
                changed: response.e2ee.device_lists.changed,
                left: response.e2ee.device_lists.left,
            },
            device_one_time_keys_count: response.e2ee.one_time_keys_count,
            device_unused_fallback_key_types: response.e2ee.unused_fallback_key_types,
        }
    }
}

impl SyncResponse {
    /// With `use_state_after`, the rooms' state is the state after their timeline: it goes in
    /// `state_after`, and `state` is left out.
    fn state_after(mut self) -> Self {
        for room in self.rooms.join.values_mut() {
            room.state_after = room.state.take();
        }
        for room in self.rooms.leave.values_mut() {
            room.state_after = room.state.take();
        }
        self
    }
}

/// Reads an inline JSON filter.
fn parse_inline_filter(filter: &str) -> Result<SyncFilter, Error> {
    let value: Value = serde_json::from_str(filter)
        .map_err(|e| Error::bad_json(format!("filter is not valid JSON: {e}")))?;
    parse_filter(&value)
}

/// Reads a filter, inline or stored (`M_BAD_JSON` when what this server applies of it is
/// malformed). Unknown fields are ignored, as the spec allows.
pub(crate) fn parse_filter(value: &Value) -> Result<SyncFilter, Error> {
    SyncFilter::parse(value)
}

pub struct SyncApi;

#[OpenApi]
impl SyncApi {
    /// Synchronises the client's state with the server: the rooms that changed since `since`
    /// (all of them when absent), waiting up to `timeout` milliseconds for something new.
    #[oai(
        path = "/_matrix/client/v3/sync",
        method = "get",
        tag = "ApiTags::Sync",
        operation_id = "sync"
    )]
    // poem-openapi takes each query parameter as an argument.
    #[allow(clippy::too_many_arguments)]
    async fn sync(
        &self,
        state: Data<&Arc<AppState>>,
        auth: RememberedAccessToken,
        /// A token from a previous sync's `next_batch`.
        since: Query<Option<String>>,
        /// Milliseconds to wait for something new (default 0).
        timeout: Query<Option<u64>>,
        /// Send the full state of every joined room.
        #[oai(default)]
        full_state: Query<bool>,
        /// `online` (the default) or `unavailable` mark the user so; `offline` leaves their
        /// presence alone.
        set_presence: Query<Option<String>>,
        /// A filter id or an inline JSON filter.
        filter: Query<Option<String>>,
        /// Send the state as of the end of each timeline, in `state_after`, instead of `state`
        /// (the state before it).
        #[oai(default)]
        use_state_after: Query<bool>,
    ) -> ApiResult<SerdeJson<SyncResponse>> {
        let (services, caller) = (&state.services, &auth.0);
        // A remembered token is checked by the sync's first read of the position; errors
        // before that are reported once it is checked.
        let synced = async {
            if let Some(presence) = set_presence.0.as_deref()
                && !matches!(presence, "online" | "offline" | "unavailable")
            {
                return Err(Error::invalid_param(
                    "set_presence must be online, offline or unavailable",
                ));
            }
            let parsed = match filter.0.as_deref() {
                Some(inline) if inline.trim_start().starts_with('{') => {
                    parse_inline_filter(inline)?
                }
                // A stored filter of the user; an unknown id is 400 `M_INVALID_PARAM`.
                Some(filter_id) => parse_filter(
                    &services
                        .account_data
                        .sync_filter(&caller.authed.user_id, filter_id)
                        .await?,
                )?,
                None => SyncFilter::default(),
            };
            sync_as(
                services,
                caller,
                SyncParams {
                    since: since.0,
                    timeout: timeout.0,
                    full_state: full_state.0,
                    set_presence: set_presence.0,
                    filter_key: filter.0.unwrap_or_default(),
                    filter: parsed,
                    use_state_after: use_state_after.0,
                },
            )
            .await
        }
        .await;
        Ok(SerdeJson(services.accounts.settle(caller, synced).await?))
    }
}

/// The parameters of a `/sync`, once its filter is parsed.
struct SyncParams {
    since: Option<String>,
    timeout: Option<u64>,
    full_state: bool,
    set_presence: Option<String>,
    /// The filter as the client gave it (id or inline JSON): lazy-loaded members are
    /// remembered per device and filter.
    filter_key: String,
    filter: SyncFilter,
    use_state_after: bool,
}

/// `/sync` for `caller`, with its filter parsed.
async fn sync_as(
    services: &Services,
    caller: &Caller,
    params: SyncParams,
) -> palpo_core::Result<SyncResponse> {
    let user_id = &caller.authed.user_id;
    let presence = params.set_presence.as_deref();
    // Marking the user present writes; a remembered token is checked before, unless the
    // presence was recorded recently (then nothing is written).
    if services.ephemeral.presence_on_sync_due(user_id, presence) {
        services.accounts.check_token(caller).await?;
    }
    let mut options = SyncOptions::new(
        params.since,
        Duration::from_millis(params.timeout.unwrap_or(0)),
        params.full_state,
        params.filter,
    );
    options.rooms.use_state_after = params.use_state_after;
    options.lazy_members_key = Some((caller.authed.device_id.clone(), params.filter_key));
    services
        .ephemeral
        .presence_on_sync(user_id, presence)
        .await?;
    let response: SyncResponse = services
        .sync
        .sync_device(
            user_id,
            Some(&caller.authed.device_id),
            &options,
            caller.unchecked.as_ref(),
        )
        .await?
        .into();
    Ok(if params.use_state_after {
        response.state_after()
    } else {
        response
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_filters_set_the_timeline_limit() {
        let filter =
            parse_inline_filter(r#"{"room":{"timeline":{"limit":3},"include_leave":true}}"#)
                .expect("parses");
        assert_eq!(filter.timeline_limit(), 3);
        assert!(filter.room.include_leave);
        assert!(parse_inline_filter("[1]").is_err());
        assert!(parse_inline_filter(r#"{"room":{"timeline":{"limit":"x"}}}"#).is_err());
    }

    fn events(values: &[Value]) -> Events {
        Events::values(values.to_vec())
    }

    /// The body serde writes is the document poem-openapi describes: every field of every
    /// object of the answer set, optional ones both present and absent.
    #[test]
    fn serde_writes_what_the_schema_describes() {
        use poem_openapi::types::ToJSON;
        let event = serde_json::json!({"type": "m.room.message", "content": {"body": "\"hi\""}});
        let timeline = |prev_batch: Option<&str>| Timeline {
            events: events(std::slice::from_ref(&event)).events,
            limited: true,
            prev_batch: prev_batch.map(str::to_owned),
        };
        let counts = || UnreadNotificationCounts {
            highlight_count: 1,
            notification_count: 2,
        };
        let joined = |full: bool| JoinedRoomSync {
            summary: RoomSummary {
                heroes: full.then(|| vec!["@b:x".to_owned()]),
                joined_member_count: full.then_some(2),
                invited_member_count: full.then_some(0),
            },
            state: full.then(|| events(std::slice::from_ref(&event))),
            state_after: (!full).then(|| events(std::slice::from_ref(&event))),
            timeline: timeline(full.then_some("t1")),
            ephemeral: events(std::slice::from_ref(&event)),
            account_data: events(&[]),
            unread_notifications: counts(),
            unread_thread_notifications: full
                .then(|| BTreeMap::from([("$thread".to_owned(), counts())])),
        };
        let response = SyncResponse {
            next_batch: "s1_2".into(),
            rooms: Rooms {
                join: BTreeMap::from([
                    ("!a:x".to_owned(), joined(true)),
                    ("!b:x".to_owned(), joined(false)),
                ]),
                invite: BTreeMap::from([(
                    "!c:x".to_owned(),
                    InvitedRoomSync {
                        invite_state: events(std::slice::from_ref(&event)),
                    },
                )]),
                leave: BTreeMap::from([
                    (
                        "!d:x".to_owned(),
                        LeftRoomSync {
                            state: None,
                            state_after: Some(events(&[])),
                            timeline: timeline(None),
                            account_data: events(std::slice::from_ref(&event)),
                        },
                    ),
                    (
                        "!f:x".to_owned(),
                        LeftRoomSync {
                            state: Some(events(std::slice::from_ref(&event))),
                            state_after: None,
                            timeline: timeline(Some("t2")),
                            account_data: events(&[]),
                        },
                    ),
                ]),
                knock: BTreeMap::from([(
                    "!e:x".to_owned(),
                    KnockedRoomSync {
                        knock_state: events(std::slice::from_ref(&event)),
                    },
                )]),
            },
            account_data: events(std::slice::from_ref(&event)),
            presence: events(&[]),
            to_device: events(std::slice::from_ref(&event)),
            device_lists: DeviceLists {
                changed: vec!["@c:x".into()],
                left: vec![],
            },
            device_one_time_keys_count: BTreeMap::from([("signed_curve25519".to_owned(), 3)]),
            device_unused_fallback_key_types: vec!["signed_curve25519".into()],
        };
        let written = serde_json::to_value(&response).expect("serializes");
        assert_eq!(Some(written.clone()), response.to_json());
        assert_eq!(
            written["rooms"]["join"]["!a:x"]["timeline"]["events"][0],
            event
        );
        assert!(
            written["rooms"]["join"]["!b:x"]["summary"]
                .as_object()
                .is_some_and(|s| s.is_empty())
        );
    }
}
