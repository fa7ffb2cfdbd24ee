//! Versions, capabilities and `.well-known` over HTTP on every backend, with and without Redis.

use palpo_tests::{Config, TestApp, backend_matrix};

async fn versions_and_capabilities(app: &TestApp) {
    let versions = app.get("/_matrix/client/versions", None).await;
    let body = versions.expect_ok();
    let list: Vec<&str> = body["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for required in ["v1.1", "v1.11", "v1.19"] {
        assert!(list.contains(&required), "{required} missing: {list:?}");
    }
    assert!(body["unstable_features"].is_object(), "{body}");

    // Capabilities need a token.
    app.get("/_matrix/client/v3/capabilities", None)
        .await
        .expect_error(401, "M_MISSING_TOKEN");
    let me = app.register("rupert", "pw").await;
    let caps = app
        .get("/_matrix/client/v3/capabilities", Some(&me.access_token))
        .await;
    let caps = &caps.expect_ok()["capabilities"];
    assert_eq!(caps["m.change_password"]["enabled"], true, "{caps}");
    let room_versions = &caps["m.room_versions"];
    assert_eq!(room_versions["default"], "12", "{caps}");
    let available = room_versions["available"].as_object().expect("available");
    assert_eq!(available.get("12").and_then(|v| v.as_str()), Some("stable"));
    assert!(available.contains_key("1"), "{caps}");
}
backend_matrix!(versions_and_capabilities, versions_and_capabilities);

async fn well_known_defaults(app: &TestApp) {
    let client = app.get("/.well-known/matrix/client", None).await;
    // Defaults to the public base URL, which the harness sets to where it serves.
    assert_eq!(
        client.expect_ok()["m.homeserver"]["base_url"],
        app.base_url.as_str()
    );
    app.get("/.well-known/matrix/server", None)
        .await
        .expect_error(404, "M_NOT_FOUND");
}
backend_matrix!(well_known_defaults, well_known_defaults);

async fn well_known_configured(app: &TestApp) {
    let client = app.get("/.well-known/matrix/client", None).await;
    assert_eq!(
        client.expect_ok()["m.homeserver"]["base_url"],
        "https://matrix.test.example"
    );
    let server = app.get("/.well-known/matrix/server", None).await;
    assert_eq!(server.expect_ok()["m.server"], "matrix.test.example:443");
}
backend_matrix!(
    well_known_configured,
    well_known_configured,
    |config: &mut Config| {
        config.well_known.client = Some("https://matrix.test.example".to_owned());
        config.well_known.server = Some("matrix.test.example:443".to_owned());
    }
);
