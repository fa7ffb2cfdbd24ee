//! Device management over HTTP on every backend, with and without Redis.

use palpo_tests::{Session, TestApp, backend_matrix};
use serde_json::{Value, json};

const DEVICES: &str = "/_matrix/client/v3/devices";

fn device_path(device_id: &str) -> String {
    format!("{DEVICES}/{device_id}")
}

async fn device_ids(app: &TestApp, session: &Session) -> Vec<String> {
    let resp = app.get(DEVICES, Some(&session.access_token)).await;
    let mut ids: Vec<String> = resp.expect_ok()["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices array: {}", resp.text))
        .iter()
        .map(|d| d["device_id"].as_str().expect("device_id").to_owned())
        .collect();
    ids.sort();
    ids
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    ids.sort();
    ids
}

fn password_auth(user: &str, password: &str, session: Option<&str>) -> Value {
    let mut auth = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    });
    if let Some(session) = session {
        auth["session"] = json!(session);
    }
    auth
}

async fn list_get_rename(app: &TestApp) {
    let phone = app.register("mallory", "pw").await;
    let laptop = app.login("mallory", "pw").await;
    let other_user = app.register("niaj", "pw").await;

    assert_eq!(
        device_ids(app, &phone).await,
        sorted(&[&phone.device_id, &laptop.device_id])
    );
    assert_eq!(
        device_ids(app, &other_user).await,
        sorted(&[&other_user.device_id])
    );

    // Listing recorded when and from where each device was last seen.
    let list = app.get(DEVICES, Some(&phone.access_token)).await;
    for device in list.expect_ok()["devices"].as_array().expect("devices") {
        assert!(
            device["last_seen_ts"].as_i64().is_some_and(|ts| ts > 0),
            "{device}"
        );
        assert_eq!(device["last_seen_ip"], "127.0.0.1", "{device}");
    }

    let path = device_path(&laptop.device_id);
    let got = app.get(&path, Some(&phone.access_token)).await;
    assert_eq!(got.expect_ok()["device_id"], laptop.device_id.as_str());

    app.put(
        &path,
        Some(&phone.access_token),
        json!({ "display_name": "Work laptop" }),
    )
    .await
    .expect_ok();
    let got = app.get(&path, Some(&laptop.access_token)).await;
    assert_eq!(got.expect_ok()["display_name"], "Work laptop");
    // No display_name: nothing changes.
    app.put(&path, Some(&phone.access_token), json!({}))
        .await
        .expect_ok();
    let got = app.get(&path, Some(&laptop.access_token)).await;
    assert_eq!(got.expect_ok()["display_name"], "Work laptop");

    // Unknown devices, and another user's device, are 404 for every operation.
    for path in [
        device_path("NOSUCHDEVICE"),
        device_path(&other_user.device_id),
    ] {
        app.get(&path, Some(&phone.access_token))
            .await
            .expect_error(404, "M_NOT_FOUND");
        app.put(
            &path,
            Some(&phone.access_token),
            json!({ "display_name": "x" }),
        )
        .await
        .expect_error(404, "M_NOT_FOUND");
        app.delete(&path, Some(&phone.access_token), None)
            .await
            .expect_error(404, "M_NOT_FOUND");
    }
    // The other user's device is untouched.
    let theirs = app
        .get(
            &device_path(&other_user.device_id),
            Some(&other_user.access_token),
        )
        .await;
    assert!(
        theirs.expect_ok().get("display_name").is_none(),
        "{}",
        theirs.text
    );

    // Without a token, nothing.
    app.get(DEVICES, None)
        .await
        .expect_error(401, "M_MISSING_TOKEN");
}
backend_matrix!(list_get_rename, list_get_rename);

async fn delete_device_with_uia(app: &TestApp) {
    let phone = app.register("olivia", "pw").await;
    let laptop = app.login("olivia", "pw").await;
    let path = device_path(&laptop.device_id);

    // First round: 401 with the password flow; the device is still there.
    let session = app
        .delete(&path, Some(&phone.access_token), Some(json!({})))
        .await
        .expect_uia(&[&["m.login.password"]]);
    // Also without any body.
    app.delete(&path, Some(&phone.access_token), None)
        .await
        .expect_uia(&[&["m.login.password"]]);
    app.assert_token_valid(&laptop).await;

    // A wrong password: 401 again, with M_FORBIDDEN and the same session.
    let wrong = app
        .delete(
            &path,
            Some(&phone.access_token),
            Some(json!({ "auth": password_auth("olivia", "wrong", Some(&session)) })),
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text);
    assert_eq!(wrong.json["errcode"], "M_FORBIDDEN", "{}", wrong.text);
    assert_eq!(wrong.json["session"], session.as_str(), "{}", wrong.text);
    app.assert_token_valid(&laptop).await;

    // Another user's password does not authenticate Olivia.
    app.register("peggy", "peggy's pw").await;
    let impostor = app
        .delete(
            &path,
            Some(&phone.access_token),
            Some(json!({ "auth": password_auth("peggy", "peggy's pw", Some(&session)) })),
        )
        .await;
    assert_eq!(impostor.status, 401, "{}", impostor.text);
    app.assert_token_valid(&laptop).await;

    app.delete(
        &path,
        Some(&phone.access_token),
        Some(json!({ "auth": password_auth("olivia", "pw", Some(&session)) })),
    )
    .await
    .expect_ok();
    app.assert_token_revoked(&laptop.access_token).await;
    app.get(&path, Some(&phone.access_token))
        .await
        .expect_error(404, "M_NOT_FOUND");
    assert_eq!(device_ids(app, &phone).await, sorted(&[&phone.device_id]));

    // A completed session cannot be replayed.
    let third = app.login("olivia", "pw").await;
    let replay = app
        .delete(
            &device_path(&third.device_id),
            Some(&phone.access_token),
            Some(json!({ "auth": password_auth("olivia", "pw", Some(&session)) })),
        )
        .await;
    assert!(
        replay.status == 400 || replay.status == 401,
        "replayed session: {} {}",
        replay.status,
        replay.text
    );
    app.assert_token_valid(&third).await;
}
backend_matrix!(delete_device_with_uia, delete_device_with_uia);

async fn delete_devices(app: &TestApp) {
    let keep = app.register("quentin", "pw").await;
    let a = app.login("quentin", "pw").await;
    let b = app.login("quentin", "pw").await;
    let c = app.login("quentin", "pw").await;
    let path = "/_matrix/client/v3/delete_devices";
    let victims = json!([a.device_id, b.device_id, "NOSUCHDEVICE"]);

    let session = app
        .post(
            path,
            Some(&keep.access_token),
            json!({ "devices": victims }),
        )
        .await
        .expect_uia(&[&["m.login.password"]]);
    assert_eq!(device_ids(app, &keep).await.len(), 4);

    app.post(
        path,
        Some(&keep.access_token),
        json!({ "devices": victims, "auth": password_auth("quentin", "pw", Some(&session)) }),
    )
    .await
    .expect_ok();
    app.assert_token_revoked(&a.access_token).await;
    app.assert_token_revoked(&b.access_token).await;
    app.assert_token_valid(&c).await;
    app.assert_token_valid(&keep).await;
    assert_eq!(
        device_ids(app, &keep).await,
        sorted(&[&keep.device_id, &c.device_id])
    );

    // `devices` is required.
    let resp = app.post(path, Some(&keep.access_token), json!({})).await;
    resp.expect_error(400, "M_BAD_JSON");
}
backend_matrix!(delete_devices, delete_devices);
