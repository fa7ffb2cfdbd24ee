//! Accounts over HTTP on every backend, with and without Redis: registration, availability,
//! login, whoami, logout, password change, deactivation, registration tokens.

use palpo_tests::{Config, TestApp, backend_matrix};
use serde_json::json;

const REGISTER: &str = "/_matrix/client/v3/register";
const LOGIN: &str = "/_matrix/client/v3/login";

fn available(localpart: &str) -> String {
    format!("/_matrix/client/v3/register/available?username={localpart}")
}

async fn register_login_whoami(app: &TestApp) {
    let alice = app.register("alice", "correct horse").await;
    assert_eq!(alice.user_id, "@alice:test.local");
    let me = app.whoami(&alice.access_token).await;
    let body = me.expect_ok();
    assert_eq!(body["user_id"], "@alice:test.local");
    assert_eq!(body["device_id"], alice.device_id.as_str());
    assert_eq!(body["is_guest"], false);

    // A second user gets a different token and device; each token names its own owner.
    let bob = app.register("bob", "battery staple").await;
    assert_ne!(bob.access_token, alice.access_token);
    app.assert_token_valid(&bob).await;
    app.assert_token_valid(&alice).await;

    // Registering a taken name fails, before and after authentication.
    app.post(
        REGISTER,
        None,
        json!({ "username": "alice", "password": "x" }),
    )
    .await
    .expect_error(400, "M_USER_IN_USE");
}
backend_matrix!(register_login_whoami, register_login_whoami);

async fn register_completes_in_one_request_and_honours_device_fields(app: &TestApp) {
    // A client may complete the only stage up front, without a session.
    let resp = app
        .post(
            REGISTER,
            None,
            json!({
                "username": "carol",
                "password": "pw",
                "device_id": "CAROLPHONE",
                "initial_device_display_name": "Carol's phone",
                "auth": { "type": "m.login.dummy" },
            }),
        )
        .await;
    let body = resp.expect_ok();
    assert_eq!(body["user_id"], "@carol:test.local");
    assert_eq!(body["device_id"], "CAROLPHONE");
    assert_eq!(body["home_server"], "test.local");
    let token = body["access_token"].as_str().expect("token").to_owned();
    let device = app
        .get("/_matrix/client/v3/devices/CAROLPHONE", Some(&token))
        .await;
    assert_eq!(device.expect_ok()["display_name"], "Carol's phone");

    // inhibit_login: the account exists, but no token or device is handed out.
    let resp = app
        .post(
            REGISTER,
            None,
            json!({
                "username": "dave",
                "password": "pw",
                "inhibit_login": true,
                "auth": { "type": "m.login.dummy" },
            }),
        )
        .await;
    let body = resp.expect_ok();
    assert_eq!(body["user_id"], "@dave:test.local");
    assert!(body.get("access_token").is_none(), "{body}");
    assert!(body.get("device_id").is_none(), "{body}");
    let dave = app.login("dave", "pw").await;
    let devices = app
        .get("/_matrix/client/v3/devices", Some(&dave.access_token))
        .await;
    assert_eq!(
        devices.expect_ok()["devices"].as_array().map(Vec::len),
        Some(1),
        "only the login's device"
    );
}
backend_matrix!(
    register_in_one_request,
    register_completes_in_one_request_and_honours_device_fields
);

async fn username_availability(app: &TestApp) {
    let resp = app.get(&available("newbie"), None).await;
    assert_eq!(resp.expect_ok()["available"], true);

    app.register("taken", "pw").await;
    app.get(&available("taken"), None)
        .await
        .expect_error(400, "M_USER_IN_USE");

    for bad in ["Upper", "sp%20ace", "emoji%F0%9F%98%80", "a:b", "%40at"] {
        app.get(&available(bad), None)
            .await
            .expect_error(400, "M_INVALID_USERNAME");
    }
    // Registering an invalid name fails the same way, without starting authentication.
    app.post(
        REGISTER,
        None,
        json!({ "username": "Upper", "password": "pw" }),
    )
    .await
    .expect_error(400, "M_INVALID_USERNAME");
    // The query parameter is required.
    let resp = app.get("/_matrix/client/v3/register/available", None).await;
    assert_eq!(resp.status, 400, "{}", resp.text);
    assert!(resp.json["errcode"].is_string(), "{}", resp.text);
}
backend_matrix!(username_availability, username_availability);

async fn login_variants(app: &TestApp) {
    let registered = app.register("erin", "s3cret").await;

    // By localpart, by full user id, and with the deprecated top-level `user` field.
    let by_localpart = app.login("erin", "s3cret").await;
    let by_user_id = app.login("@erin:test.local", "s3cret").await;
    let deprecated = app
        .post(
            LOGIN,
            None,
            json!({ "type": "m.login.password", "user": "erin", "password": "s3cret" }),
        )
        .await;
    let deprecated_body = deprecated.expect_ok();
    assert_eq!(deprecated_body["user_id"], "@erin:test.local");
    assert_eq!(deprecated_body["home_server"], "test.local");

    // Every login is a new device with its own token, all valid at once.
    let sessions = [&registered, &by_localpart, &by_user_id];
    for (i, a) in sessions.iter().enumerate() {
        assert_eq!(a.user_id, "@erin:test.local");
        app.assert_token_valid(a).await;
        for b in &sessions[i + 1..] {
            assert_ne!(a.device_id, b.device_id);
            assert_ne!(a.access_token, b.access_token);
        }
    }

    // Logging in with a chosen device id reuses that device and replaces its token.
    let first = app
        .post(
            LOGIN,
            None,
            json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "erin" },
                "password": "s3cret",
                "device_id": "LAPTOP",
            }),
        )
        .await;
    let first_token = first.expect_ok()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let second = app
        .post(
            LOGIN,
            None,
            json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "erin" },
                "password": "s3cret",
                "device_id": "LAPTOP",
            }),
        )
        .await;
    assert_eq!(second.expect_ok()["device_id"], "LAPTOP");
    app.assert_token_revoked(&first_token).await;

    // Wrong password, unknown user, other server: all the same 403.
    app.login_resp("erin", "wrong")
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.login_resp("nobody", "s3cret")
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.login_resp("@erin:elsewhere.example", "s3cret")
        .await
        .expect_error(403, "M_FORBIDDEN");

    // Login flows advertise password login.
    let flows = app.get(LOGIN, None).await;
    assert_eq!(
        flows.expect_ok()["flows"],
        json!([{ "type": "m.login.password" }])
    );
}
backend_matrix!(login_variants, login_variants);

async fn logout(app: &TestApp) {
    let first = app.register("frank", "pw").await;
    let second = app.login("frank", "pw").await;

    app.post(
        "/_matrix/client/v3/logout",
        Some(&second.access_token),
        json!({}),
    )
    .await
    .expect_ok();
    app.assert_token_revoked(&second.access_token).await;
    // Logging out again with the same token: the token is unknown now.
    app.post(
        "/_matrix/client/v3/logout",
        Some(&second.access_token),
        json!({}),
    )
    .await
    .expect_error(401, "M_UNKNOWN_TOKEN");
    // The other session is untouched, and the logged-out device is gone.
    app.assert_token_valid(&first).await;
    let devices = app
        .get("/_matrix/client/v3/devices", Some(&first.access_token))
        .await;
    let ids: Vec<&str> = devices.expect_ok()["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert_eq!(ids, [first.device_id.as_str()]);
}
backend_matrix!(logout, logout);

async fn logout_all(app: &TestApp) {
    let sessions = [
        app.register("grace", "pw").await,
        app.login("grace", "pw").await,
        app.login("grace", "pw").await,
    ];
    let heidi = app.register("heidi", "pw").await;
    app.post(
        "/_matrix/client/v3/logout/all",
        Some(&sessions[1].access_token),
        json!({}),
    )
    .await
    .expect_ok();
    for session in &sessions {
        app.assert_token_revoked(&session.access_token).await;
    }
    // Another user's session is not affected.
    app.assert_token_valid(&heidi).await;
    // Grace can log in again, with a single device.
    let again = app.login("grace", "pw").await;
    let devices = app
        .get("/_matrix/client/v3/devices", Some(&again.access_token))
        .await;
    assert_eq!(
        devices.expect_ok()["devices"].as_array().map(Vec::len),
        Some(1)
    );
}
backend_matrix!(logout_all, logout_all);

async fn change_password(app: &TestApp) {
    let current = app.register("ivan", "old password").await;
    let other = app.login("ivan", "old password").await;
    let path = "/_matrix/client/v3/account/password";

    // First round: the flows. A wrong password is refused and the password is unchanged.
    let challenge = app
        .post(
            path,
            Some(&current.access_token),
            json!({ "new_password": "new password" }),
        )
        .await;
    let session = challenge.expect_uia(&[&["m.login.password"]]);
    let wrong = app
        .post(
            path,
            Some(&current.access_token),
            json!({
                "new_password": "new password",
                "auth": {
                    "type": "m.login.password",
                    "identifier": { "type": "m.id.user", "user": "ivan" },
                    "password": "not it",
                    "session": session,
                },
            }),
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text);
    assert_eq!(wrong.json["errcode"], "M_FORBIDDEN", "{}", wrong.text);
    assert!(wrong.json["flows"].is_array(), "{}", wrong.text);
    app.login("ivan", "old password").await;

    app.post(
        path,
        Some(&current.access_token),
        json!({
            "new_password": "new password",
            "auth": {
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "ivan" },
                "password": "old password",
                "session": session,
            },
        }),
    )
    .await
    .expect_ok();

    app.login_resp("ivan", "old password")
        .await
        .expect_error(403, "M_FORBIDDEN");
    app.login("ivan", "new password").await;
    // By default every other device is logged out; the current one stays.
    app.assert_token_valid(&current).await;
    app.assert_token_revoked(&other.access_token).await;

    // With logout_devices = false, other devices stay logged in.
    let kept = app.login("ivan", "new password").await;
    app.post(
        path,
        Some(&current.access_token),
        json!({
            "new_password": "third password",
            "logout_devices": false,
            "auth": {
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "@ivan:test.local" },
                "password": "new password",
            },
        }),
    )
    .await
    .expect_ok();
    app.assert_token_valid(&kept).await;
    app.assert_token_valid(&current).await;
    app.login("ivan", "third password").await;
}
backend_matrix!(change_password, change_password);

async fn deactivate(app: &TestApp) {
    let judy = app.register("judy", "pw").await;
    let other = app.login("judy", "pw").await;
    let path = "/_matrix/client/v3/account/deactivate";

    let session = app
        .post(path, Some(&judy.access_token), json!({}))
        .await
        .expect_uia(&[&["m.login.password"]]);
    // Still active after the first round.
    app.assert_token_valid(&judy).await;
    let resp = app
        .post(
            path,
            Some(&judy.access_token),
            json!({
                "auth": {
                    "type": "m.login.password",
                    "identifier": { "type": "m.id.user", "user": "judy" },
                    "password": "pw",
                    "session": session,
                },
            }),
        )
        .await;
    assert_eq!(resp.expect_ok()["id_server_unbind_result"], "no-support");

    app.assert_token_revoked(&judy.access_token).await;
    app.assert_token_revoked(&other.access_token).await;
    app.login_resp("judy", "pw")
        .await
        .expect_error(403, "M_USER_DEACTIVATED");
    app.get(&available("judy"), None)
        .await
        .expect_error(400, "M_USER_IN_USE");
    app.post(
        REGISTER,
        None,
        json!({ "username": "judy", "password": "pw" }),
    )
    .await
    .expect_error(400, "M_USER_IN_USE");
}
backend_matrix!(deactivate, deactivate);

async fn registration_token(app: &TestApp) {
    let first = app
        .post(
            REGISTER,
            None,
            json!({ "username": "kim", "password": "pw" }),
        )
        .await;
    let session = first.expect_uia(&[&["m.login.registration_token"]]);
    // The dummy stage is not offered, so it is not accepted.
    let dummy = app
        .post(
            REGISTER,
            None,
            json!({
                "username": "kim",
                "password": "pw",
                "auth": { "type": "m.login.dummy", "session": session },
            }),
        )
        .await;
    assert!(
        dummy.status == 400 || dummy.status == 401,
        "dummy must not register: {} {}",
        dummy.status,
        dummy.text
    );
    assert!(dummy.json["errcode"].is_string(), "{}", dummy.text);

    let wrong = app
        .post(
            REGISTER,
            None,
            json!({
                "username": "kim",
                "password": "pw",
                "auth": {
                    "type": "m.login.registration_token",
                    "token": "not the token",
                    "session": session,
                },
            }),
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text);
    assert_eq!(wrong.json["errcode"], "M_UNAUTHORIZED", "{}", wrong.text);
    assert!(wrong.json["error"].is_string(), "{}", wrong.text);
    assert_eq!(wrong.json["session"], session.as_str(), "{}", wrong.text);
    app.get(&available("kim"), None).await.expect_ok();

    let right = app
        .post(
            REGISTER,
            None,
            json!({
                "username": "kim",
                "password": "pw",
                "auth": {
                    "type": "m.login.registration_token",
                    "token": "let-me-in",
                    "session": session,
                },
            }),
        )
        .await;
    assert_eq!(right.expect_ok()["user_id"], "@kim:test.local");
    app.login("kim", "pw").await;
}
backend_matrix!(
    registration_token,
    registration_token,
    |config: &mut Config| {
        config.registration.token = Some("let-me-in".to_owned());
    }
);

async fn registration_disabled(app: &TestApp) {
    for body in [
        json!({ "username": "leo", "password": "pw" }),
        json!({ "username": "leo", "password": "pw", "auth": { "type": "m.login.dummy" } }),
    ] {
        app.post(REGISTER, None, body)
            .await
            .expect_error(403, "M_FORBIDDEN");
    }
    app.login_resp("leo", "pw")
        .await
        .expect_error(403, "M_FORBIDDEN");
}
backend_matrix!(
    registration_disabled,
    registration_disabled,
    |config: &mut Config| {
        config.registration.enabled = false;
    }
);
