//! Shared domain types for Palpo: configuration, the Matrix error type, small pure helpers.
//! Every other crate depends on this one; it depends on none of them.

pub mod config;
pub mod error;

pub use config::{Config, ConfigError};
pub use error::{Error, ErrorCode, Result};

/// Milliseconds since the Unix epoch, the unit of every Matrix timestamp.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
