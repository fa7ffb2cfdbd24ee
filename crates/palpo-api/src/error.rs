//! Matrix errors on the wire: the documented error responses of every operation, and the
//! conversion of any failure (ours, poem's, poem-openapi's) into `{"errcode","error"}`.

use palpo_core::{Error, ErrorCode};
use poem::{
    Response,
    error::{MethodNotAllowedError, NotFoundError},
    http::StatusCode,
};
use poem_openapi::{
    ApiResponse, Object,
    error::{
        AuthorizationError, ContentTypeError, ParseParamError, ParsePathError,
        ParseRequestPayloadError,
    },
    types::ParseFromJSON,
};
use serde_json::Value;

/// A Matrix error body.
#[derive(Debug, Clone, Object)]
pub struct ErrorBody {
    /// An error code, e.g. `M_FORBIDDEN`.
    pub errcode: String,
    /// A human-readable explanation.
    pub error: String,
    /// For `M_LIMIT_EXCEEDED`: how long to wait before retrying, in milliseconds.
    #[oai(skip_serializing_if_is_none)]
    pub retry_after_ms: Option<u64>,
    /// For `M_UNKNOWN_TOKEN`: whether the client may log in again without wiping its data.
    #[oai(skip_serializing_if_is_none)]
    pub soft_logout: Option<bool>,
}

/// A flow of user-interactive authentication.
#[derive(Debug, Clone, Object)]
pub struct AuthFlow {
    /// The stages, in order, that complete this flow.
    pub stages: Vec<String>,
}

/// 401 body: either a Matrix error, or the state of user-interactive authentication
/// (`flows`, `session`, `completed`, and `errcode`/`error` after a failed stage).
#[derive(Debug, Clone, Object)]
pub struct AuthErrorBody {
    #[oai(skip_serializing_if_is_none)]
    pub errcode: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub soft_logout: Option<bool>,
    /// The flows the server accepts.
    #[oai(skip_serializing_if_is_none)]
    pub flows: Option<Vec<AuthFlow>>,
    /// Parameters for the stages, by stage type.
    #[oai(skip_serializing_if_is_none)]
    pub params: Option<std::collections::BTreeMap<String, Value>>,
    /// The session to send back in `auth.session`.
    #[oai(skip_serializing_if_is_none)]
    pub session: Option<String>,
    /// The stages completed so far.
    #[oai(skip_serializing_if_is_none)]
    pub completed: Option<Vec<String>>,
}

/// Every error status a Matrix operation can answer with.
#[derive(Debug, ApiResponse)]
pub enum MatrixError {
    /// The request is malformed (`M_NOT_JSON`, `M_BAD_JSON`, `M_INVALID_PARAM`, ...).
    #[oai(status = 400)]
    BadRequest(poem_openapi::payload::Json<ErrorBody>),
    /// The access token is missing or unknown, or user-interactive authentication continues.
    #[oai(status = 401)]
    Unauthorized(poem_openapi::payload::Json<AuthErrorBody>),
    /// Not allowed (`M_FORBIDDEN`, `M_USER_DEACTIVATED`, ...).
    #[oai(status = 403)]
    Forbidden(poem_openapi::payload::Json<ErrorBody>),
    /// Not found (`M_NOT_FOUND`, `M_UNRECOGNIZED`).
    #[oai(status = 404)]
    NotFound(poem_openapi::payload::Json<ErrorBody>),
    /// The request conflicts with what exists (e.g. a room alias that is already taken).
    #[oai(status = 409)]
    Conflict(poem_openapi::payload::Json<ErrorBody>),
    /// The request body is too large (`M_TOO_LARGE`).
    #[oai(status = 413)]
    TooLarge(poem_openapi::payload::Json<ErrorBody>),
    /// Rate limited (`M_LIMIT_EXCEEDED`).
    #[oai(status = 429)]
    LimitExceeded(
        poem_openapi::payload::Json<ErrorBody>,
        /// Seconds to wait before retrying.
        #[oai(header = "Retry-After")]
        Option<u64>,
    ),
    /// The server failed (`M_UNKNOWN`).
    #[oai(status = 500)]
    Internal(poem_openapi::payload::Json<ErrorBody>),
}

fn error_body(value: &Value) -> ErrorBody {
    ErrorBody {
        errcode: value["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned(),
        error: value["error"].as_str().unwrap_or_default().to_owned(),
        retry_after_ms: value["retry_after_ms"].as_u64(),
        soft_logout: value["soft_logout"].as_bool(),
    }
}

impl From<Error> for MatrixError {
    fn from(err: Error) -> Self {
        use poem_openapi::payload::Json;
        if let Error::Internal(cause) = &err {
            tracing::error!(%cause, "internal error");
        }
        let body = err.to_json();
        match err.status() {
            401 => MatrixError::Unauthorized(Json(
                <AuthErrorBody as ParseFromJSON>::parse_from_json(Some(body)).unwrap_or_else(
                    |_| AuthErrorBody {
                        errcode: Some("M_UNKNOWN".into()),
                        error: None,
                        soft_logout: None,
                        flows: None,
                        params: None,
                        session: None,
                        completed: None,
                    },
                ),
            )),
            403 => MatrixError::Forbidden(Json(error_body(&body))),
            404 => MatrixError::NotFound(Json(error_body(&body))),
            409 => MatrixError::Conflict(Json(error_body(&body))),
            413 => MatrixError::TooLarge(Json(error_body(&body))),
            429 => {
                let body = error_body(&body);
                let secs = body.retry_after_ms.map(|ms| ms.div_ceil(1000));
                MatrixError::LimitExceeded(Json(body), secs)
            }
            500..=599 => MatrixError::Internal(Json(error_body(&body))),
            _ => MatrixError::BadRequest(Json(error_body(&body))),
        }
    }
}

/// The result type of every operation.
pub type ApiResult<T> = Result<T, MatrixError>;

/// Turns a failure from anywhere in the stack into the Matrix error a client expects.
/// Errors that already carry a Matrix body (ours) pass through untouched.
pub fn render_error(err: poem::Error) -> Response {
    if err.is_from_response() {
        return err.into_response();
    }
    let (status, code, message) = classify(&err);
    let body = Error::with_status(status.as_u16(), code, message).to_json();
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(body.to_string())
}

fn classify(err: &poem::Error) -> (StatusCode, ErrorCode, String) {
    let status = err.status();
    if err.is::<NotFoundError>() || (status == StatusCode::NOT_FOUND && !err.has_source()) {
        return (
            StatusCode::NOT_FOUND,
            ErrorCode::Unrecognized,
            "Unrecognized request".into(),
        );
    }
    if err.is::<MethodNotAllowedError>() || status == StatusCode::METHOD_NOT_ALLOWED {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unrecognized,
            "Method not allowed for this endpoint".into(),
        );
    }
    if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
        return (StatusCode::BAD_REQUEST, ErrorCode::BadJson, e.to_string());
    }
    if let Some(e) = err.downcast_ref::<ContentTypeError>() {
        return (StatusCode::BAD_REQUEST, ErrorCode::NotJson, e.to_string());
    }
    if let Some(e) = err.downcast_ref::<ParseParamError>() {
        return (
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidParam,
            e.to_string(),
        );
    }
    if let Some(e) = err.downcast_ref::<ParsePathError>() {
        return (
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidParam,
            e.to_string(),
        );
    }
    if err.is::<AuthorizationError>() {
        return (
            StatusCode::UNAUTHORIZED,
            ErrorCode::MissingToken,
            "Missing access token".into(),
        );
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return (status, ErrorCode::TooLarge, "Request body too large".into());
    }
    if status.is_server_error() {
        tracing::error!(error = %err, "unhandled error");
        return (status, ErrorCode::Unknown, "Internal server error".into());
    }
    let code = match status {
        StatusCode::UNAUTHORIZED => ErrorCode::MissingToken,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::LimitExceeded,
        _ => ErrorCode::Unknown,
    };
    (status, code, err.to_string())
}
