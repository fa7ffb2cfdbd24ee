//! The client-server API, one module per chapter of the spec.

pub mod account;
pub mod capabilities;
pub mod devices;
pub mod directory;
pub mod discovery;
pub mod ephemeral;
pub mod keys;
pub mod membership;
pub mod profile;
pub mod push_rules;
pub mod rooms;
pub mod session;
pub mod sliding_sync;
pub mod sync;
pub mod user_data;
