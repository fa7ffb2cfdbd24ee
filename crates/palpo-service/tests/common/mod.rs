//! Shared by the service tests: services on a test database, users, a per-backend macro.

#![allow(dead_code)]

use std::sync::Arc;

use palpo_core::Config;
use palpo_service::Services;
use palpo_storage::Storage;

pub const SERVER: &str = "test.local";

/// The services of one server named [`SERVER`] on `storage`.
pub fn services(storage: Storage) -> Services {
    let env = vec![("PALPO__SERVER_NAME".to_owned(), SERVER.to_owned())];
    let config = Config::load_from(None, env).expect("config");
    Services::new(Arc::new(config), storage)
}

/// Creates `@name:test.local` (password `pw`) and returns its id.
pub async fn user(services: &Services, name: &str) -> String {
    let user_id = format!("@{name}:{SERVER}");
    services
        .accounts
        .create_account(&user_id, Some("pw".into()), false)
        .await
        .expect("create user");
    user_id
}

/// For each `async fn name(Storage)`, a module `name` with one test per backend.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use palpo_storage::{Backend, testing::with_storage};
                #[tokio::test]
                async fn sqlite() { with_storage(Backend::Sqlite, super::$name).await }
                #[tokio::test]
                async fn postgres() { with_storage(Backend::Postgres, super::$name).await }
                #[tokio::test]
                async fn mysql() { with_storage(Backend::MySql, super::$name).await }
            }
        )*
    };
}
