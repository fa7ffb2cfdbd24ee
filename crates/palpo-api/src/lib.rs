//! Palpo's HTTP surface: poem-openapi operations grouped by chapter of the Matrix spec.
//!
//! Handlers are thin: they parse (typed by poem-openapi, so the generated OpenAPI document
//! shows every request and response schema), authenticate, call a service, and map errors to
//! Matrix JSON. No SQL and no Redis are reachable from here: this crate does not depend on
//! sqlx or redis, only on the services.
//!
//! Wire types are poem-openapi objects; tests prove each against ruma's type for the same
//! endpoint by round-tripping real requests and responses (see `tests/ruma_roundtrip.rs`).

pub mod auth;
pub mod client;
pub mod error;
pub mod middleware;
pub mod path_ids;
pub mod payload;
pub mod strict;

use std::sync::{Arc, OnceLock};

use palpo_service::Services;
use poem::{
    Endpoint, EndpointExt, Response, Route,
    endpoint::{BoxEndpoint, make_sync},
    http::Method,
    middleware::Cors,
    web::Html,
};
use poem_openapi::{OpenApiService, Tags};

use crate::client::ephemeral::EphemeralApi;
use crate::client::keys::KeysApi;
use crate::client::push_rules::PushRulesApi;
use crate::client::user_data::UserDataApi;
use crate::{
    client::{
        account::AccountApi, capabilities::CapabilitiesApi, devices::DevicesApi,
        directory::DirectoryApi, discovery::DiscoveryApi, membership::MembershipApi,
        profile::ProfileApi, rooms::RoomsApi, session::SessionApi, sliding_sync::SlidingSyncApi,
        sync::SyncApi,
    },
    error::render_error,
    middleware::RateLimits,
};

/// The chapters of the client-server spec, as OpenAPI tags.
#[derive(Tags)]
pub enum ApiTags {
    /// Server discovery: supported versions and `.well-known` delegation.
    ServerDiscovery,
    /// Capabilities the server advertises.
    Capabilities,
    /// Login, logout and access tokens.
    SessionManagement,
    /// Creating accounts.
    AccountRegistration,
    /// Managing an account: whoami, password, deactivation.
    AccountManagement,
    /// Listing, renaming and deleting devices.
    DeviceManagement,
    /// Creating rooms.
    RoomCreation,
    /// Sending and reading events and state in rooms.
    RoomParticipation,
    /// Joining, inviting, leaving, kicking, banning, knocking.
    RoomMembership,
    /// Room aliases.
    RoomDirectory,
    /// User profiles.
    UserData,
    /// Whether users are online, and their status messages.
    Presence,
    /// Synchronising: `/sync`.
    Sync,
    /// End-to-end encryption: device keys, one-time and fallback keys, key changes.
    EndToEndEncryption,
    /// Send-to-device messaging.
    SendToDevice,
    /// Push rules: which events notify the user, and how.
    PushNotifications,
}

/// What every operation shares.
pub struct AppState {
    pub services: Services,
    pub limits: RateLimits,
}

/// Where the interactive docs and the raw document are served.
pub const DOCS_PATH: &str = "/_palpo/docs";
pub const SPEC_PATH: &str = "/_palpo/openapi.json";

type ClientApis = (
    DiscoveryApi,
    CapabilitiesApi,
    SessionApi,
    AccountApi,
    DevicesApi,
    RoomsApi,
    MembershipApi,
    DirectoryApi,
    ProfileApi,
    UserDataApi,
    PushRulesApi,
    EphemeralApi,
    SyncApi,
    SlidingSyncApi,
    KeysApi,
);

/// The client-server API. Operations find the shared [`AppState`] in the request data, so the
/// document can be generated without a database (`palpo openapi`).
fn client_service() -> OpenApiService<ClientApis, ()> {
    let apis = (
        DiscoveryApi,
        CapabilitiesApi,
        SessionApi,
        AccountApi,
        DevicesApi,
        RoomsApi,
        MembershipApi,
        DirectoryApi,
        ProfileApi,
        UserDataApi,
        PushRulesApi,
        EphemeralApi,
        SyncApi,
        SlidingSyncApi,
        KeysApi,
    );
    OpenApiService::new(apis, "Palpo Client-Server API", env!("CARGO_PKG_VERSION"))
        .description(
            "The Matrix Client-Server API as served by Palpo. Every error is a Matrix error \
             object `{\"errcode\", \"error\"}`.",
        )
        .external_document("https://spec.matrix.org/v1.19/client-server-api/")
}

/// The whole HTTP application: Matrix routes, docs, CORS, body limits, errors, tracing.
pub fn build_app(services: Services) -> BoxEndpoint<'static> {
    let max_bytes = services.config.limits.max_request_bytes;
    let state = Arc::new(AppState {
        limits: RateLimits::new(&services.config.rate_limit),
        services: services.clone(),
    });
    let api = client_service();
    let cors = Cors::new()
        .allow_origins_fn(|_| true)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            "authorization",
            "content-type",
            "x-requested-with",
            "accept",
            "origin",
        ])
        .allow_credentials(false);
    Route::new()
        .nest("/", api)
        .at(DOCS_PATH, poem::get(make_sync(|_| Html(docs_html()))))
        .at(
            format!("{DOCS_PATH}/"),
            poem::get(make_sync(|_| Html(docs_html()))),
        )
        .at(
            SPEC_PATH,
            poem::get(make_sync(|_| {
                Response::builder()
                    .content_type("application/json")
                    .body(spec_json())
            })),
        )
        .around(|ep, mut req| async move {
            middleware::trim_trailing_slash(&mut req);
            ep.call(req).await
        })
        .data(services)
        .data(state)
        .around(move |ep, req| async move { Ok(middleware::guard_body(ep, req, max_bytes).await) })
        .catch_all_error(|err| async move { render_error(err) })
        .around(|ep, req| middleware::allow_on_405(ep, req, allowed_methods))
        .with(cors)
        .around(middleware::trace_request)
        .boxed()
}

// The docs page inlines the Swagger UI bundle (about 3 MB) and the document (0.5 MB): built on
// the first request for them rather than held by every idle server.
static DOCS_HTML: OnceLock<String> = OnceLock::new();
static SPEC_JSON: OnceLock<String> = OnceLock::new();

fn docs_html() -> &'static str {
    DOCS_HTML.get_or_init(|| client_service().swagger_ui_html())
}

// Built on the first 405 from the checked-in document (`tests/openapi_drift.rs` keeps it equal
// to the generated one), not by generating the document again: that would cost ~3 MB of RSS.
static ALLOWED_METHODS: OnceLock<middleware::AllowedMethods> = OnceLock::new();

const CHECKED_IN_SPEC: &str = include_str!("../../../openapi/client-server.json");

fn allowed_methods() -> &'static middleware::AllowedMethods {
    ALLOWED_METHODS.get_or_init(|| {
        let docs = format!("{DOCS_PATH}/");
        let served = [
            (DOCS_PATH, "GET"),
            (docs.as_str(), "GET"),
            (SPEC_PATH, "GET"),
        ];
        middleware::AllowedMethods::from_spec(CHECKED_IN_SPEC, &served)
    })
}

fn spec_json() -> &'static str {
    SPEC_JSON.get_or_init(|| client_service().spec())
}

/// The generated OpenAPI documents, as `(file name, pretty JSON)`: what `openapi/` holds.
pub fn openapi_documents() -> Vec<(String, String)> {
    vec![("client-server.json".to_owned(), client_service().spec())]
}
