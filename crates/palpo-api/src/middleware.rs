//! Request-wide behaviour: body limits and JSON checks, per-request tracing, rate limits.

use std::{
    num::NonZeroU32,
    time::{Duration, Instant},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use palpo_core::{
    Error, ErrorCode,
    config::{RateLimit, RateLimitConfig},
};
use poem::{
    Endpoint, IntoResponse, Request, Response,
    http::{HeaderValue, Method, StatusCode, Uri, header, uri::PathAndQuery},
};
use poem_openapi::OperationId;
use tracing::Instrument;

use crate::error::{MatrixError, render_error};

/// Paths the spec writes with a trailing slash, which poem-openapi routes cannot end in: the
/// empty state key (`/rooms/{roomId}/state/{eventType}/`) and the push rule listings
/// (`/pushrules/`, `/pushrules/global/`). Such a request is served as the path without the
/// slash, which is how the OpenAPI document names those operations.
pub fn trim_trailing_slash(req: &mut Request) {
    let path = req.uri().path();
    let trimmed = served_path(path);
    if trimmed.len() == path.len() {
        return;
    }
    let path_and_query = match req.uri().query() {
        Some(query) => format!("{trimmed}?{query}"),
        None => trimmed.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    let Ok(path_and_query) = PathAndQuery::try_from(path_and_query) else {
        return;
    };
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The path a request for `path` is served at: without the trailing slash of the paths
/// [`trim_trailing_slash`] trims, else `path`.
fn served_path(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(trimmed) if ends_in_slash_by_spec(trimmed) => trimmed,
        _ => path,
    }
}

/// Whether `path` + `/` is one of the paths [`trim_trailing_slash`] serves without the slash.
fn ends_in_slash_by_spec(path: &str) -> bool {
    if matches!(
        path,
        "/_matrix/client/v3/pushrules" | "/_matrix/client/v3/pushrules/global"
    ) {
        return true;
    }
    let Some(rest) = path.strip_prefix("/_matrix/client/v3/rooms/") else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    matches!(
        segments.as_slice(),
        [room, "state", event_type] if !room.is_empty() && !event_type.is_empty()
    )
}

fn matrix_error_response(err: Error) -> Response {
    render_error(MatrixError::from(err).into())
}

/// Enforces the body size limit (413 `M_TOO_LARGE`) and, for Matrix JSON endpoints, that a
/// non-empty body is JSON (400 `M_NOT_JSON`) and a JSON object (400 `M_BAD_JSON`). A missing
/// `Content-Type` on such a request is taken as JSON, as many clients and tools omit it.
/// Refuses the NUL character anywhere in a Matrix request (see [`nul_in_uri`],
/// [`has_escaped_nul`]).
pub async fn guard_body<E: Endpoint>(next: E, mut req: Request, max_bytes: usize) -> Response {
    if req.uri().path().starts_with("/_matrix/") && nul_in_uri(req.uri()) {
        return matrix_error_response(Error::new(
            ErrorCode::InvalidParam,
            "The path and query may not contain the NUL character (U+0000)",
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max_bytes) {
        return too_large(max_bytes);
    }
    let has_body = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if has_body && req.uri().path().starts_with("/_matrix/") {
        let bytes = match req.take_body().into_bytes_limit(max_bytes).await {
            Ok(bytes) => bytes,
            Err(poem::error::ReadBodyError::PayloadTooLarge) => return too_large(max_bytes),
            Err(e) => {
                return matrix_error_response(Error::new(
                    ErrorCode::BadJson,
                    format!("Could not read the request body: {e}"),
                ));
            }
        };
        if !bytes.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
            return matrix_error_response(Error::new(
                ErrorCode::NotJson,
                "The request body is not valid JSON",
            ));
        }
        // Every JSON body of the Matrix APIs is an object: anything else is valid JSON of the
        // wrong shape (`M_BAD_JSON`). Checked here because an operation whose body is optional
        // would otherwise take `null` as no body at all.
        if !bytes.is_empty() && !is_json_object(&bytes) {
            return matrix_error_response(Error::new(
                ErrorCode::BadJson,
                "The request body must be a JSON object",
            ));
        }
        if has_escaped_nul(&bytes) {
            return matrix_error_response(Error::new(
                ErrorCode::BadJson,
                "Strings may not contain the NUL character (U+0000)",
            ));
        }
        // Matrix bodies are JSON whatever the client labels them (`curl -d` says form data).
        // Also for an empty body: operations whose body is optional (`DELETE /devices/{id}`,
        // `/account/deactivate`...) are often called with none, and poem-openapi refuses any
        // body parameter, even an optional one, without a JSON `Content-Type`.
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        req.set_body(bytes);
    }
    match next.call(req).await {
        Ok(resp) => resp.into_response(),
        Err(err) => render_error(err),
    }
}

/// Whether `json`, known to be valid JSON text, is an object (its first non-blank byte is `{`).
fn is_json_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

// NUL (U+0000) is refused in whatever a client sends, the same on every backend: PostgreSQL
// cannot store it in any text column (a 500 there, stored on SQLite and MySQL, which would
// also make such a database impossible to move to PostgreSQL). No client sends it on purpose.

/// Whether JSON text holds the escape `\u0000`, which parses to NUL (a raw NUL byte is not
/// valid JSON). `\\u0000` is an escaped backslash followed by text, not a NUL.
fn has_escaped_nul(json: &[u8]) -> bool {
    const ESCAPE: &[u8] = b"\\u0000";
    json.windows(ESCAPE.len())
        .enumerate()
        .filter(|(_, window)| *window == ESCAPE)
        .any(|(at, _)| {
            let backslashes_before = json[..at].iter().rev().take_while(|&&b| b == b'\\').count();
            backslashes_before % 2 == 0
        })
}

/// Whether the path or the query holds a NUL once decoded: `%00` in the path; in the query,
/// `%00` or a JSON `\u0000` (a `filter` parameter is JSON).
fn nul_in_uri(uri: &poem::http::Uri) -> bool {
    if uri.path().contains("%00") {
        return true;
    }
    let Some(query) = uri.query() else {
        return false;
    };
    url::form_urlencoded::parse(query.as_bytes()).any(|(name, value)| {
        [name, value]
            .iter()
            .any(|text| text.contains('\0') || has_escaped_nul(text.as_bytes()))
    })
}

fn too_large(max_bytes: usize) -> Response {
    matrix_error_response(Error::new(
        ErrorCode::TooLarge,
        format!("The request body is larger than {max_bytes} bytes"),
    ))
}

/// The methods each route answers, for the `Allow` header a 405 must carry (RFC 9110).
pub struct AllowedMethods {
    /// Path templates split at `/` (`None`: a `{parameter}` segment), with their `Allow` value.
    routes: Vec<(Vec<Option<String>>, HeaderValue)>,
}

impl AllowedMethods {
    /// From an OpenAPI document's `paths`, plus `extra` routes served outside it. Only the
    /// paths and their method names are read out of the document.
    pub fn from_spec(spec: &str, extra: &[(&str, &str)]) -> Self {
        #[derive(serde::Deserialize, Default)]
        struct Document {
            paths: std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<String, serde::de::IgnoredAny>,
            >,
        }
        let spec: Document = serde_json::from_str(spec).unwrap_or_default();
        let mut routes = Vec::new();
        let documented = spec.paths.into_iter().map(|(path, operations)| {
            let methods: Vec<String> = ["get", "put", "post", "delete", "patch"]
                .iter()
                .filter(|m| operations.contains_key(**m))
                .map(|m| m.to_uppercase())
                .collect();
            (path, methods.join(", "))
        });
        let extra = extra
            .iter()
            .map(|(p, m)| ((*p).to_owned(), (*m).to_owned()));
        for (path, methods) in documented.chain(extra) {
            let Ok(allow) = HeaderValue::from_str(&methods) else {
                continue;
            };
            let segments = path
                .split('/')
                .map(|segment| (!segment.starts_with('{')).then(|| segment.to_owned()))
                .collect();
            routes.push((segments, allow));
        }
        AllowedMethods { routes }
    }

    /// The `Allow` value of the route `path` belongs to.
    fn of(&self, path: &str) -> Option<&HeaderValue> {
        let segments: Vec<&str> = path.split('/').collect();
        self.routes
            .iter()
            .find(|(template, _)| {
                template.len() == segments.len()
                    && template
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| t.as_deref().is_none_or(|t| t == *s))
            })
            .map(|(_, allow)| allow)
    }
}

/// Adds `Allow` to a 405 answer, naming the methods of the route the path belongs to.
/// `allowed` is only called then (the table is built from the OpenAPI document on first use).
pub async fn allow_on_405<E: Endpoint>(
    next: E,
    req: Request,
    allowed: fn() -> &'static AllowedMethods,
) -> poem::Result<Response> {
    let uri = req.uri().clone();
    let mut resp = next.call(req).await?.into_response();
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = allowed().of(served_path(uri.path()))
    {
        resp.headers_mut().insert(header::ALLOW, allow.clone());
    }
    Ok(resp)
}

/// One span per request: method, operation (the path template), status and latency.
pub async fn trace_request<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        operation = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    let started = Instant::now();
    let resp = async { next.call(req).await.map(IntoResponse::into_response) }
        .instrument(span.clone())
        .await;
    let status = match &resp {
        Ok(resp) => resp.status(),
        Err(err) => err.status(),
    };
    let operation = match &resp {
        Ok(resp) => resp.data::<OperationId>().map(|op| op.0),
        Err(err) => err.data::<OperationId>().map(|op| op.0),
    };
    span.record("operation", operation.unwrap_or("-"));
    span.record("status", status.as_u16());
    span.record("latency_ms", started.elapsed().as_secs_f64() * 1000.0);
    let _enter = span.enter();
    if status.is_server_error() {
        tracing::warn!("request failed");
    } else {
        tracing::info!("request");
    }
    resp
}

/// Which limit an operation falls under.
#[derive(Debug, Clone, Copy)]
pub enum Limited {
    Login,
    Registration,
}

/// Per-client-address token buckets for the operations the spec marks as rate-limited.
pub struct RateLimits {
    login: Option<DefaultKeyedRateLimiter<String>>,
    registration: Option<DefaultKeyedRateLimiter<String>>,
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> Self {
        let build = |limit: RateLimit| {
            config.enabled.then(|| {
                let period = Duration::from_secs_f64(1.0 / limit.per_second);
                let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(period)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                    .allow_burst(burst);
                RateLimiter::keyed(quota)
            })
        };
        RateLimits {
            login: build(config.login),
            registration: build(config.registration),
        }
    }

    /// `Err(M_LIMIT_EXCEEDED)` with the wait when `client` has used up its bucket.
    pub fn check(&self, which: Limited, client: Option<&str>) -> Result<(), Error> {
        let limiter = match which {
            Limited::Login => &self.login,
            Limited::Registration => &self.registration,
        };
        let Some(limiter) = limiter else {
            return Ok(());
        };
        let key = client.unwrap_or("unknown").to_owned();
        match limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                // Forget idle clients now and then, so the map does not grow without bound.
                if limiter.len() > 10_000 {
                    limiter.retain_recent();
                }
                Err(Error::limit_exceeded(wait.as_millis().max(1) as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slashes_the_spec_writes_are_trimmed() {
        let rewrite = |uri: &'static str| {
            let mut req = Request::builder().uri(Uri::from_static(uri)).finish();
            trim_trailing_slash(&mut req);
            req.uri().to_string()
        };
        assert_eq!(
            rewrite("/_matrix/client/v3/rooms/%21r%3Ax/state/m.room.name/?format=event"),
            "/_matrix/client/v3/rooms/%21r%3Ax/state/m.room.name?format=event"
        );
        assert_eq!(
            rewrite("/_matrix/client/v3/rooms/!r:x/state/m.room.name/"),
            "/_matrix/client/v3/rooms/!r:x/state/m.room.name"
        );
        assert_eq!(
            rewrite("/_matrix/client/v3/pushrules/"),
            "/_matrix/client/v3/pushrules"
        );
        assert_eq!(
            rewrite("/_matrix/client/v3/pushrules/global/"),
            "/_matrix/client/v3/pushrules/global"
        );
        for untouched in [
            "/_matrix/client/v3/rooms/!r:x/state/m.room.name/key",
            "/_matrix/client/v3/rooms/!r:x/state/m.room.name",
            "/_matrix/client/v3/rooms/!r:x/state/",
            "/_matrix/client/v3/rooms/!r:x/send/m.room.message/",
            "/_matrix/client/v3/devices/",
            "/_matrix/client/v3/pushrules/global/override/",
            "/_matrix/client/v3/pushrules",
        ] {
            assert_eq!(rewrite(untouched), untouched);
        }
    }

    #[test]
    fn escaped_nul_is_found_and_escaped_backslashes_are_not_taken_for_it() {
        assert!(has_escaped_nul(br#"{"body": "a\u0000b"}"#));
        assert!(has_escaped_nul(br#"{"a\u0000": 1}"#));
        // `\\\u0000`: an escaped backslash, then the escape.
        assert!(has_escaped_nul(br#"{"body": "\\\u0000"}"#));
        // `\\u0000`: an escaped backslash, then the text `u0000`.
        assert!(!has_escaped_nul(br#"{"body": "\\u0000"}"#));
        assert!(!has_escaped_nul(br#"{"body": "\u0001 u0000 \\"}"#));
        assert!(!has_escaped_nul(b""));
    }

    #[test]
    fn nul_in_the_path_or_query_is_found_once_decoded() {
        let uri = |text: &str| text.parse::<poem::http::Uri>().expect("uri");
        assert!(nul_in_uri(&uri("/_matrix/client/v3/rooms/%00/state/x")));
        assert!(nul_in_uri(&uri("/_matrix/client/v3/sync?since=s1%00")));
        assert!(nul_in_uri(&uri(
            "/_matrix/client/v3/sync?filter=%7B%22a%22%3A%22%5Cu0000%22%7D"
        )));
        assert!(!nul_in_uri(&uri(
            "/_matrix/client/v3/sync?filter=%7B%22a%22%3A%22%5C%5Cu0000%22%7D&since=s100"
        )));
        assert!(!nul_in_uri(&uri(
            "/_matrix/client/v3/rooms/%21a%3Ab/state/x%20y"
        )));
    }
}
