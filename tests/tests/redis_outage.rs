//! Redis dies mid-test: every answer must stay what it would be without Redis. Above all, a
//! logout while Redis is down must still revoke the token, and nothing may answer 500.
//!
//! The same client script runs twice per backend: against a server without Redis, and against
//! one whose private `redis-server` is killed halfway. The two transcripts must be identical.

use std::panic::{AssertUnwindSafe, resume_unwind};

use futures::FutureExt;
use palpo_core::config::CacheConfig;
use palpo_tests::{
    Backend, TestApp,
    testing::{PrivateRedis, backend_enabled, namespace_keys, unique_namespace},
};
use serde_json::json;

/// One step of the script: what was asked, the status, and the `errcode` if any.
type Step = (&'static str, u16, Option<String>);

fn step(name: &'static str, resp: &palpo_tests::Resp) -> Step {
    assert!(
        resp.status < 500,
        "{name}: server error {}: {}",
        resp.status,
        resp.text
    );
    (
        name,
        resp.status,
        resp.json["errcode"].as_str().map(str::to_owned),
    )
}

/// The client's script. `redis` is killed after the warm-up when given.
async fn script(app: &TestApp, redis: Option<&mut PrivateRedis>) -> Vec<Step> {
    let mut log = Vec::new();
    let desk = app.register("trent", "pw").await;
    let phone = app.login("trent", "pw").await;
    // Warm the cache: token lookups and the user record.
    for session in [&desk, &phone] {
        app.assert_token_valid(session).await;
        app.assert_token_valid(session).await;
    }

    if let Some(redis) = redis {
        // The cache really was in use, or killing Redis would prove nothing.
        let keys = namespace_keys(&redis.url(), &app.config.cache.namespace).await;
        assert!(
            keys.iter().any(|k| k.contains(":token:")),
            "no token was cached before the kill: {keys:?}"
        );
        redis.kill();
    }

    let whoami = app.whoami(&desk.access_token).await;
    log.push(step("whoami desk", &whoami));
    assert_eq!(whoami.json["user_id"], desk.user_id.as_str());
    assert_eq!(whoami.json["device_id"], desk.device_id.as_str());

    let devices = app
        .get("/_matrix/client/v3/devices", Some(&phone.access_token))
        .await;
    log.push(step("devices", &devices));
    assert_eq!(devices.json["devices"].as_array().map(Vec::len), Some(2));

    let logout = app
        .post(
            "/_matrix/client/v3/logout",
            Some(&phone.access_token),
            json!({}),
        )
        .await;
    log.push(step("logout phone", &logout));
    assert_eq!(logout.status, 200, "{}", logout.text);
    // Revoked at once (inside the cache's back-off window) ...
    let revoked = app.whoami(&phone.access_token).await;
    log.push(step("whoami phone after logout", &revoked));
    assert_eq!(revoked.status, 401, "{}", revoked.text);
    assert_eq!(revoked.json["errcode"], "M_UNKNOWN_TOKEN");
    assert_eq!(revoked.json["soft_logout"], false);
    // ... and still after the back-off, when the cache tries Redis again.
    tokio::time::sleep(palpo_storage::cache::RETRY_AFTER + std::time::Duration::from_millis(100))
        .await;
    let revoked = app.whoami(&phone.access_token).await;
    log.push(step("whoami phone after back-off", &revoked));
    assert_eq!(revoked.status, 401, "{}", revoked.text);

    let wrong = app.login_resp("trent", "wrong").await;
    log.push(step("login with a wrong password", &wrong));
    assert_eq!(wrong.status, 403, "{}", wrong.text);

    let login = app.login_resp("trent", "pw").await;
    log.push(step("login", &login));
    let laptop_token = login.json["access_token"].as_str().unwrap_or_default();
    let whoami = app.whoami(laptop_token).await;
    log.push(step("whoami laptop", &whoami));
    assert_eq!(whoami.json["user_id"], desk.user_id.as_str());

    // A password change logs out the other devices and must take effect at once.
    let change = app
        .post(
            "/_matrix/client/v3/account/password",
            Some(&desk.access_token),
            json!({
                "new_password": "new pw",
                "auth": {
                    "type": "m.login.password",
                    "identifier": { "type": "m.id.user", "user": "trent" },
                    "password": "pw",
                },
            }),
        )
        .await;
    log.push(step("change password", &change));
    log.push(step(
        "whoami laptop after password change",
        &app.whoami(laptop_token).await,
    ));
    log.push(step("whoami desk", &app.whoami(&desk.access_token).await));
    log.push(step(
        "login with the old password",
        &app.login_resp("trent", "pw").await,
    ));
    log.push(step(
        "login with the new password",
        &app.login_resp("trent", "new pw").await,
    ));

    let logout_all = app
        .post(
            "/_matrix/client/v3/logout/all",
            Some(&desk.access_token),
            json!({}),
        )
        .await;
    log.push(step("logout all", &logout_all));
    log.push(step(
        "whoami desk after logout all",
        &app.whoami(&desk.access_token).await,
    ));
    log
}

async fn run_script(app: TestApp, redis: Option<&mut PrivateRedis>) -> Vec<Step> {
    let result = AssertUnwindSafe(script(&app, redis)).catch_unwind().await;
    app.teardown().await;
    result.unwrap_or_else(|panic| resume_unwind(panic))
}

async fn redis_killed_mid_test(backend: Backend) {
    if !backend_enabled(backend) {
        return;
    }
    let without_redis = run_script(TestApp::spawn(backend, false).await, None).await;

    let mut redis = PrivateRedis::start().await;
    let cache = CacheConfig {
        redis_url: Some(redis.url()),
        namespace: unique_namespace(),
        ttl_secs: 300,
    };
    let app = TestApp::spawn_with_cache(backend, Some(cache), |_| {}).await;
    let with_dead_redis = run_script(app, Some(&mut redis)).await;
    assert!(!redis.is_running());

    assert_eq!(with_dead_redis, without_redis);
    // And the transcript is the right one, not merely the same.
    let statuses: Vec<(&str, u16)> = with_dead_redis.iter().map(|(s, c, _)| (*s, *c)).collect();
    assert_eq!(
        statuses,
        [
            ("whoami desk", 200),
            ("devices", 200),
            ("logout phone", 200),
            ("whoami phone after logout", 401),
            ("whoami phone after back-off", 401),
            ("login with a wrong password", 403),
            ("login", 200),
            ("whoami laptop", 200),
            ("change password", 200),
            ("whoami laptop after password change", 401),
            ("whoami desk", 200),
            ("login with the old password", 403),
            ("login with the new password", 200),
            ("logout all", 200),
            ("whoami desk after logout all", 401),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_sqlite() {
    redis_killed_mid_test(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_postgres() {
    redis_killed_mid_test(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_mysql() {
    redis_killed_mid_test(Backend::MySql).await;
}
