//! The Matrix error: what every failure a client can see turns into.
//!
//! `{"errcode": "M_...", "error": "..."}` with the status code the spec gives for that code.
//! Services return [`Error`]; the api crate renders it. Internal failures are logged with
//! their cause and shown to the client only as a generic `M_UNKNOWN`.

use serde_json::{Map, Value};

/// The `errcode` values Palpo emits (client-server spec, "Standard error response").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Forbidden,
    UnknownToken,
    MissingToken,
    UserLocked,
    UserSuspended,
    BadJson,
    NotJson,
    NotFound,
    LimitExceeded,
    Unrecognized,
    Unknown,
    Unauthorized,
    UserDeactivated,
    UserInUse,
    InvalidUsername,
    RoomInUse,
    InvalidRoomState,
    InvalidParam,
    MissingParam,
    TooLarge,
    Exclusive,
    WeakPassword,
    ServerNotTrusted,
    UnsupportedRoomVersion,
    IncompatibleRoomVersion,
    BadState,
    GuestAccessForbidden,
    ResourceLimitExceeded,
    CannotLeaveServerNoticeRoom,
    /// Sliding sync: the connection position is not known (any more); start over.
    UnknownPos,
    /// A cross-signing key or signature does not verify.
    InvalidSignature,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Forbidden => "M_FORBIDDEN",
            UnknownToken => "M_UNKNOWN_TOKEN",
            MissingToken => "M_MISSING_TOKEN",
            UserLocked => "M_USER_LOCKED",
            UserSuspended => "M_USER_SUSPENDED",
            BadJson => "M_BAD_JSON",
            NotJson => "M_NOT_JSON",
            NotFound => "M_NOT_FOUND",
            LimitExceeded => "M_LIMIT_EXCEEDED",
            Unrecognized => "M_UNRECOGNIZED",
            Unknown => "M_UNKNOWN",
            Unauthorized => "M_UNAUTHORIZED",
            UserDeactivated => "M_USER_DEACTIVATED",
            UserInUse => "M_USER_IN_USE",
            InvalidUsername => "M_INVALID_USERNAME",
            RoomInUse => "M_ROOM_IN_USE",
            InvalidRoomState => "M_INVALID_ROOM_STATE",
            InvalidParam => "M_INVALID_PARAM",
            MissingParam => "M_MISSING_PARAM",
            TooLarge => "M_TOO_LARGE",
            Exclusive => "M_EXCLUSIVE",
            WeakPassword => "M_WEAK_PASSWORD",
            ServerNotTrusted => "M_SERVER_NOT_TRUSTED",
            UnsupportedRoomVersion => "M_UNSUPPORTED_ROOM_VERSION",
            IncompatibleRoomVersion => "M_INCOMPATIBLE_ROOM_VERSION",
            BadState => "M_BAD_STATE",
            GuestAccessForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            ResourceLimitExceeded => "M_RESOURCE_LIMIT_EXCEEDED",
            CannotLeaveServerNoticeRoom => "M_CANNOT_LEAVE_SERVER_NOTICE_ROOM",
            UnknownPos => "M_UNKNOWN_POS",
            InvalidSignature => "M_INVALID_SIGNATURE",
        }
    }

    /// The HTTP status the spec pairs with this code when nothing more specific applies.
    pub fn default_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            Forbidden | UserDeactivated | GuestAccessForbidden | CannotLeaveServerNoticeRoom => 403,
            UnknownToken | MissingToken | Unauthorized | UserLocked => 401,
            UserSuspended => 403,
            NotFound | Unrecognized => 404,
            LimitExceeded => 429,
            TooLarge => 413,
            Unknown => 500,
            _ => 400,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure as a client sees it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Matrix error with its code, status and any extra fields (`retry_after_ms`, `soft_logout`).
    #[error("{code}: {message}")]
    Matrix {
        status: u16,
        code: ErrorCode,
        message: String,
        extra: Map<String, Value>,
    },
    /// User-interactive authentication must continue: 401 with this exact body
    /// (`flows`, `params`, `session`, `completed`, and `errcode`/`error` after a failed stage).
    #[error("user-interactive authentication required")]
    UiaRequired(Value),
    /// Something broke inside the server. The cause is logged, never shown to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with the code's default status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::with_status(code.default_status(), code, message)
    }

    pub fn with_status(status: u16, code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Matrix {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Error::Internal(cause.to_string())
    }

    /// Adds a field beside `errcode` and `error` (for example `soft_logout`).
    pub fn with_field(mut self, key: &str, value: Value) -> Self {
        if let Error::Matrix { extra, .. } = &mut self {
            extra.insert(key.to_owned(), value);
        }
        self
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadJson, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParam, message)
    }
    pub fn missing_param(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MissingParam, message)
    }
    pub fn unrecognized(status: u16, message: impl Into<String>) -> Self {
        Self::with_status(status, ErrorCode::Unrecognized, message)
    }
    /// 401 `M_UNKNOWN_TOKEN` for an access token that does not exist (any more): a hard
    /// logout (`soft_logout: false`), the client must log in again.
    pub fn unknown_token() -> Self {
        Self::new(ErrorCode::UnknownToken, "Unknown access token")
            .with_field("soft_logout", Value::Bool(false))
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(ErrorCode::LimitExceeded, "Too many requests")
            .with_field("retry_after_ms", Value::from(retry_after_ms))
    }

    pub fn status(&self) -> u16 {
        match self {
            Error::Matrix { status, .. } => *status,
            Error::UiaRequired(_) => 401,
            Error::Internal(_) => 500,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Matrix { code, .. } => *code,
            Error::UiaRequired(_) => ErrorCode::Unauthorized,
            Error::Internal(_) => ErrorCode::Unknown,
        }
    }

    /// The JSON body a client receives. Internal causes are replaced by a generic message.
    pub fn to_json(&self) -> Value {
        let mut body = Map::new();
        match self {
            Error::Matrix {
                code,
                message,
                extra,
                ..
            } => {
                body.insert("errcode".into(), code.as_str().into());
                body.insert("error".into(), message.as_str().into());
                for (k, v) in extra {
                    body.insert(k.clone(), v.clone());
                }
            }
            Error::UiaRequired(value) => return value.clone(),
            Error::Internal(_) => {
                body.insert("errcode".into(), ErrorCode::Unknown.as_str().into());
                body.insert("error".into(), "Internal server error".into());
            }
        }
        Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_cause() {
        let err = Error::internal("password=hunter2 connection refused");
        let body = err.to_json();
        assert_eq!(body["errcode"], "M_UNKNOWN");
        assert!(!body.to_string().contains("hunter2"));
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn extra_fields_sit_beside_errcode() {
        let body = Error::limit_exceeded(1500).to_json();
        assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
        assert_eq!(body["retry_after_ms"], 1500);
        assert_eq!(Error::limit_exceeded(1).status(), 429);
    }
}
