//! Simplified sliding sync (MSC4186):
//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use palpo_core::Error;
use palpo_service::{
    rooms::sliding::{RoomDetails, SlidingExtensions, SlidingList, SlidingRequest, SlidingRoom},
    sync::SlidingSync,
};
use poem::web::Data;
use poem_openapi::{Object, OpenApi, param::Query, payload::Json};
use serde_json::{Value, json};

use crate::{ApiTags, AppState, auth::AccessToken, error::ApiResult};

/// Most timeline events per room a request may ask for.
const MAX_TIMELINE_LIMIT: u64 = 500;
/// Most rooms one range may cover.
const MAX_RANGE: u64 = 1000;

/// Which rooms a list holds: every filter given must match; one left out (or an empty list)
/// matches every room.
#[derive(Debug, Object)]
pub struct ListFilters {
    /// Only invites (`true`) or no invites (`false`).
    #[oai(nullable)]
    pub is_invite: Option<bool>,
    /// The later name of `is_invite`; either may be given.
    #[oai(nullable)]
    pub is_invited: Option<bool>,
    /// Only rooms in (`true`) or not in (`false`) the user's `m.direct` account data.
    #[oai(nullable)]
    pub is_dm: Option<bool>,
    /// Only rooms with (`true`) or without (`false`) an `m.room.encryption` state event.
    #[oai(nullable)]
    pub is_encrypted: Option<bool>,
    /// Only rooms whose `m.room.create` event has one of these `type`s (`null`: no type).
    #[oai(
        deserialize_with = "crate::strict::optional_nullable_string_list",
        nullable
    )]
    pub room_types: Option<Vec<Option<String>>>,
    /// No rooms whose `m.room.create` event has one of these `type`s (`null`: no type); wins
    /// over `room_types`.
    #[oai(
        deserialize_with = "crate::strict::optional_nullable_string_list",
        nullable
    )]
    pub not_room_types: Option<Vec<Option<String>>>,
    /// Only rooms with one of these tags.
    #[oai(deserialize_with = "crate::strict::optional_string_list", nullable)]
    pub tags: Option<Vec<String>>,
    /// No rooms with one of these tags; wins over `tags`.
    #[oai(deserialize_with = "crate::strict::optional_string_list", nullable)]
    pub not_tags: Option<Vec<String>>,
    /// Only rooms that are `m.space.child` of one of these spaces (the user must be joined to
    /// the space; subspaces are not followed).
    #[oai(deserialize_with = "crate::strict::optional_string_list", nullable)]
    pub spaces: Option<Vec<String>>,
}

impl From<ListFilters> for palpo_service::rooms::sliding::ListFilters {
    fn from(f: ListFilters) -> Self {
        palpo_service::rooms::sliding::ListFilters {
            is_dm: f.is_dm,
            is_encrypted: f.is_encrypted,
            is_invite: f.is_invite.or(f.is_invited),
            room_types: f.room_types.unwrap_or_default(),
            not_room_types: f.not_room_types.unwrap_or_default(),
            tags: f.tags.unwrap_or_default(),
            not_tags: f.not_tags.unwrap_or_default(),
            spaces: f.spaces.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Object)]
pub struct ListRequest {
    /// Inclusive `[start, end]` index ranges into the list, sorted by recency.
    #[oai(default)]
    pub ranges: Vec<Vec<u64>>,
    /// `[event type, state key]` pairs; `*` wildcards, `$ME` and `$LAZY` keys.
    #[oai(default)]
    pub required_state: Vec<Vec<String>>,
    #[oai(default)]
    pub timeline_limit: u64,
    #[oai(nullable)]
    pub filters: Option<ListFilters>,
}

#[derive(Debug, Object)]
pub struct RoomSubscriptionRequest {
    #[oai(default)]
    pub required_state: Vec<Vec<String>>,
    #[oai(default)]
    pub timeline_limit: u64,
}

#[derive(Debug, Object)]
pub struct SlidingSyncRequest {
    /// Names the connection (at most 200 characters); one device may hold several.
    #[oai(deserialize_with = "crate::strict::optional_string", nullable)]
    pub conn_id: Option<String>,
    /// Echoed in the response.
    #[oai(nullable)]
    pub txn_id: Option<String>,
    #[oai(default)]
    pub lists: BTreeMap<String, ListRequest>,
    #[oai(default)]
    pub room_subscriptions: BTreeMap<String, RoomSubscriptionRequest>,
    /// Extension requests by name, each `{"enabled": bool, ...}`: `account_data`, `receipts`,
    /// `typing`, `e2ee` (device-list changes since `pos`, one-time key counts, unused fallback
    /// key types) and `to_device` (`since`: the previous `next_batch`, which acknowledges the
    /// messages up to it; `limit`: most messages to return).
    #[oai(nullable)]
    pub extensions: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Object)]
pub struct ListCount {
    /// How many rooms match the list.
    pub count: u64,
}

#[derive(Debug, Object)]
pub struct Hero {
    pub user_id: String,
}

#[derive(Debug, Object)]
pub struct SlidingRoomResponse {
    #[oai(skip_serializing_if_is_none)]
    pub name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub avatar: Option<String>,
    /// True the first time this connection sends the room.
    pub initial: bool,
    #[oai(skip_serializing_if_is_none)]
    pub invite_state: Option<Vec<Value>>,
    pub required_state: Vec<Value>,
    pub timeline: Vec<Value>,
    #[oai(skip_serializing_if_is_none)]
    pub prev_batch: Option<String>,
    pub limited: bool,
    pub joined_count: u64,
    pub invited_count: u64,
    /// How many timeline events are new since the previous response.
    pub num_live: u64,
    /// Stream position of the room's latest event: the sort key of the lists.
    pub bump_stamp: u64,
    pub heroes: Vec<Hero>,
    pub notification_count: u64,
    pub highlight_count: u64,
}

impl From<SlidingRoom> for SlidingRoomResponse {
    fn from(room: SlidingRoom) -> Self {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        SlidingRoomResponse {
            name: room.name,
            avatar: room.avatar,
            initial: room.initial,
            invite_state: room.invite_state,
            required_state: room.required_state,
            timeline: room.timeline,
            prev_batch: room.prev_batch,
            limited: room.limited,
            joined_count: count(room.joined_count),
            invited_count: count(room.invited_count),
            num_live: count(room.num_live),
            bump_stamp: count(room.bump_stamp),
            heroes: room
                .heroes
                .into_iter()
                .map(|user_id| Hero { user_id })
                .collect(),
            notification_count: 0,
            highlight_count: 0,
        }
    }
}

#[derive(Debug, Object)]
pub struct SlidingSyncResponse {
    /// Pass as `pos` with the next request of this connection.
    pub pos: String,
    #[oai(skip_serializing_if_is_none)]
    pub txn_id: Option<String>,
    pub lists: BTreeMap<String, ListCount>,
    pub rooms: BTreeMap<String, SlidingRoomResponse>,
    pub extensions: BTreeMap<String, Value>,
}

fn required_state(pairs: Vec<Vec<String>>) -> Result<Vec<(String, String)>, Error> {
    pairs
        .into_iter()
        .map(|pair| match <[String; 2]>::try_from(pair) {
            Ok([kind, key]) => Ok((kind, key)),
            Err(_) => Err(Error::bad_json(
                "required_state entries are [type, state_key] pairs",
            )),
        })
        .collect()
}

fn timeline_limit(limit: u64) -> usize {
    limit.min(MAX_TIMELINE_LIMIT) as usize
}

fn to_request(body: SlidingSyncRequest, pos: Option<String>) -> Result<SlidingRequest, Error> {
    let mut lists = BTreeMap::new();
    for (name, list) in body.lists {
        let mut ranges = Vec::new();
        for range in list.ranges {
            match range.as_slice() {
                [start, end] if start <= end => {
                    ranges.push((*start as usize, (*end).min(start + MAX_RANGE) as usize))
                }
                _ => {
                    return Err(Error::bad_json(
                        "ranges are [start, end] pairs with start <= end",
                    ));
                }
            }
        }
        lists.insert(
            name,
            SlidingList {
                ranges,
                details: RoomDetails {
                    required_state: required_state(list.required_state)?,
                    timeline_limit: timeline_limit(list.timeline_limit),
                },
                filters: list.filters.map(Into::into).unwrap_or_default(),
            },
        );
    }
    let mut room_subscriptions = BTreeMap::new();
    for (room_id, sub) in body.room_subscriptions {
        room_subscriptions.insert(
            room_id,
            RoomDetails {
                required_state: required_state(sub.required_state)?,
                timeline_limit: timeline_limit(sub.timeline_limit),
            },
        );
    }
    let enabled = |name: &str| {
        body.extensions
            .as_ref()
            .and_then(|e| e.get(name))
            .and_then(|e| e["enabled"].as_bool())
            .unwrap_or(false)
    };
    let to_device = body.extensions.as_ref().and_then(|e| e.get("to_device"));
    let to_device_since = match to_device.map(|t| &t["since"]) {
        None | Some(Value::Null) => None,
        Some(Value::String(since)) => Some(
            since
                .parse::<i64>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| Error::invalid_param("Invalid to_device.since"))?,
        ),
        Some(_) => return Err(Error::bad_json("to_device.since must be a string")),
    };
    let to_device_limit = match to_device.map(|t| &t["limit"]) {
        None | Some(Value::Null) => 0,
        Some(limit) => limit
            .as_u64()
            .ok_or_else(|| Error::bad_json("to_device.limit must be a non-negative integer"))?
            .min(usize::MAX as u64) as usize,
    };
    let extensions = SlidingExtensions {
        account_data: enabled("account_data"),
        receipts: enabled("receipts"),
        typing: enabled("typing"),
        e2ee: enabled("e2ee"),
        to_device: enabled("to_device"),
        to_device_since,
        to_device_limit,
    };
    Ok(SlidingRequest {
        pos,
        conn_id: body.conn_id.unwrap_or_default(),
        lists,
        room_subscriptions,
        extensions,
    })
}

/// The `extensions` object of a response, in the MSC's shapes.
fn extensions_json(wanted: SlidingExtensions, answer: &SlidingSync) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Some(account_data) = &answer.account_data {
        out.insert(
            "account_data".to_owned(),
            json!({ "global": account_data.global, "rooms": account_data.rooms }),
        );
    }
    if wanted.receipts {
        out.insert("receipts".to_owned(), json!({ "rooms": answer.receipts }));
    }
    if wanted.typing {
        out.insert("typing".to_owned(), json!({ "rooms": answer.typing }));
    }
    if let Some(e2ee) = &answer.e2ee {
        out.insert(
            "e2ee".to_owned(),
            json!({
                "device_lists": {
                    "changed": e2ee.device_lists.changed,
                    "left": e2ee.device_lists.left,
                },
                "device_one_time_keys_count": e2ee.one_time_keys_count,
                "device_unused_fallback_key_types": e2ee.unused_fallback_key_types,
            }),
        );
    }
    if let Some(to_device) = &answer.to_device {
        out.insert(
            "to_device".to_owned(),
            json!({
                "next_batch": to_device.upto.to_string(),
                "events": to_device.events,
            }),
        );
    }
    out
}

pub struct SlidingSyncApi;

#[OpenApi]
impl SlidingSyncApi {
    /// Simplified sliding sync (MSC4186): windows of the user's rooms sorted by recency, and
    /// subscribed rooms, with only what changed since `pos`.
    #[oai(
        path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        method = "post",
        tag = "ApiTags::Sync",
        operation_id = "slidingSync"
    )]
    async fn sliding_sync(
        &self,
        state: Data<&Arc<AppState>>,
        auth: AccessToken,
        /// The `pos` of this connection's previous response.
        pos: Query<Option<String>>,
        /// Milliseconds to wait for something new.
        timeout: Query<Option<u64>>,
        body: Json<SlidingSyncRequest>,
    ) -> ApiResult<Json<SlidingSyncResponse>> {
        let body = body.0;
        let txn_id = body.txn_id.clone();
        // Opaque to the client; one the server does not know is `M_UNKNOWN_POS`.
        let request = to_request(body, pos.0)?;
        let wanted = request.extensions;
        let answer = state
            .services
            .sync
            .sliding_sync(
                &auth.0.user_id,
                &auth.0.device_id,
                &request,
                Duration::from_millis(timeout.0.unwrap_or(0)),
            )
            .await?;
        let extensions = extensions_json(wanted, &answer);
        let response = answer.response;
        Ok(Json(SlidingSyncResponse {
            pos: response.pos,
            txn_id,
            lists: response
                .lists
                .into_iter()
                .map(|(name, count)| {
                    (
                        name,
                        ListCount {
                            count: count as u64,
                        },
                    )
                })
                .collect(),
            rooms: response
                .rooms
                .into_iter()
                .map(|(id, r)| (id, r.into()))
                .collect(),
            extensions,
        }))
    }
}
