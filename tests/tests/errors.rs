//! Error paths over HTTP: every failure is a Matrix error (`{"errcode","error"}`, JSON, the
//! right status), from malformed bodies to unknown routes, tokens, size and rate limits, CORS.
//!
//! Pure-HTTP checks run on SQLite; the token checks run on every backend.

use palpo_tests::{Backend, Config, TestApp, backend_matrix, run, run_with};
use reqwest::Method;
use serde_json::{Value, json};

const LOGIN: &str = "/_matrix/client/v3/login";
const REGISTER: &str = "/_matrix/client/v3/register";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_m_not_json() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let me = app.register("uma", "pw").await;
        for body in [
            "{",
            "{\"type\": \"m.login.password\",",
            "not json",
            "{'single': 1}",
        ] {
            for content_type in [Some("application/json"), None] {
                app.send_raw(Method::POST, LOGIN, content_type, body)
                    .await
                    .expect_error(400, "M_NOT_JSON");
            }
        }
        app.send_raw(Method::POST, REGISTER, Some("application/json"), "{]")
            .await
            .expect_error(400, "M_NOT_JSON");
        // On an authenticated endpoint too, with a valid token.
        app.send_raw_as(
            Method::PUT,
            &format!("/_matrix/client/v3/devices/{}", me.device_id),
            Some(&me.access_token),
            Some("application/json"),
            "{\"display_name\": ",
        )
        .await
        .expect_error(400, "M_NOT_JSON");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shape_is_m_bad_json() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let me = app.register("victor", "pw").await;
        for body in [
            json!({ "type": 5 }),
            json!([]),
            json!(["m.login.password"]),
            json!("m.login.password"),
            json!(42),
            json!({}),
            json!({ "type": "m.login.password", "identifier": "victor", "password": "pw" }),
            json!({ "type": "m.login.password", "user": "victor", "password": 7 }),
        ] {
            app.post(LOGIN, None, body)
                .await
                .expect_error(400, "M_BAD_JSON");
        }
        for body in [
            json!([]),
            json!({ "username": 5, "password": "pw" }),
            json!({ "username": "x", "password": 1234 }),
            json!({ "username": "x", "password": "pw", "device_id": true }),
            json!({ "username": "x", "password": "pw", "inhibit_login": "yes" }),
        ] {
            app.post(REGISTER, None, body)
                .await
                .expect_error(400, "M_BAD_JSON");
        }
        let device = format!("/_matrix/client/v3/devices/{}", me.device_id);
        app.put(
            &device,
            Some(&me.access_token),
            json!({ "display_name": 5 }),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
        app.put(&device, Some(&me.access_token), json!([]))
            .await
            .expect_error(400, "M_BAD_JSON");
        app.post(
            "/_matrix/client/v3/account/password",
            Some(&me.access_token),
            json!({ "logout_devices": false }),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
        app.post(
            "/_matrix/client/v3/account/password",
            Some(&me.access_token),
            json!({ "new_password": 12345678 }),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
        app.post(
            "/_matrix/client/v3/delete_devices",
            Some(&me.access_token),
            json!({ "devices": [me.device_id, 7] }),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
        // `auth` must be an object.
        app.post(
            REGISTER,
            None,
            json!({ "username": "x", "password": "pw", "auth": "m.login.dummy" }),
        )
        .await
        .expect_error(400, "M_BAD_JSON");
        // Nothing was changed by any of these.
        app.assert_token_valid(&me).await;
        app.login("victor", "pw").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_an_object_is_refused_even_where_the_body_is_optional() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let owner = app.register("wanda", "pw").await;
        let guest = app.register("xena", "pw").await;
        let room = app
            .create_room(&owner.access_token, json!({ "preset": "public_chat" }))
            .await;
        let join = app.room_path(&room, "/join");
        let members = app.room_path(&room, "/joined_members");
        // Join and leave take an optional body: `null`, arrays, strings and numbers are JSON
        // of the wrong shape, not "no body".
        for body in [json!(null), json!([]), json!("why"), json!(7), json!(true)] {
            app.post(&join, Some(&guest.access_token), body.clone())
                .await
                .expect_error(400, "M_BAD_JSON");
            for path in ["/_matrix/client/v3/logout", REGISTER] {
                let token = (path != REGISTER).then_some(guest.access_token.as_str());
                app.post(path, token, body.clone())
                    .await
                    .expect_error(400, "M_BAD_JSON");
            }
        }
        // Blank space around an object is still an object.
        app.send_raw_as(
            Method::POST,
            &join,
            Some(&guest.access_token),
            None,
            " \n{ \"reason\": \"hi\" } ",
        )
        .await
        .expect_ok();
        let joined = app.get(&members, Some(&owner.access_token)).await;
        assert!(
            joined.expect_ok()["joined"][&guest.user_id].is_object(),
            "{}",
            joined.text
        );
        // An empty body is no body.
        app.send_raw_as(
            Method::POST,
            &app.room_path(&room, "/leave"),
            Some(&guest.access_token),
            None,
            "",
        )
        .await
        .expect_ok();
        let left = app.get(&members, Some(&owner.access_token)).await;
        assert!(
            left.expect_ok()["joined"][&guest.user_id].is_null(),
            "{}",
            left.text
        );
        app.assert_token_valid(&guest).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoints_and_methods_are_m_unrecognized() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        for path in [
            "/_matrix/client/v3/nonexistent",
            "/_matrix/client/v3/account/whoamix",
            "/_matrix/client/v1/login",
            "/_matrix/client/r0/sync",
            "/_matrix/federation/v1/version",
            "/nothing/here",
            "/",
        ] {
            app.get(path, None)
                .await
                .expect_error(404, "M_UNRECOGNIZED");
            app.post(path, None, json!({}))
                .await
                .expect_error(404, "M_UNRECOGNIZED");
        }
        for (method, path) in [
            (Method::DELETE, LOGIN),
            (Method::PUT, LOGIN),
            (Method::PUT, "/_matrix/client/versions"),
            (Method::POST, "/_matrix/client/versions"),
            (Method::GET, "/_matrix/client/v3/logout"),
            (Method::GET, REGISTER),
            (Method::POST, WHOAMI),
            (Method::POST, "/_matrix/client/v3/devices"),
        ] {
            let resp = app.request(method.clone(), path, None, None).await;
            assert_eq!(resp.status, 405, "{method} {path}: {}", resp.text);
            resp.expect_error(405, "M_UNRECOGNIZED");
        }
        // A 405 names the methods the route answers (RFC 9110), parameters matched.
        for (method, path, allow) in [
            (Method::PUT, "/_matrix/client/versions", "GET"),
            (Method::PATCH, "/_matrix/client/v3/login", "GET, POST"),
            (
                Method::DELETE,
                "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1",
                "PUT",
            ),
            (
                Method::POST,
                "/_matrix/client/v3/devices/ABC",
                "GET, PUT, DELETE",
            ),
            (Method::POST, "/_palpo/openapi.json", "GET"),
            // The spec's trailing slash: served (and matched) without it.
            (Method::PUT, "/_matrix/client/v3/pushrules/", "GET"),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:x/state/m.room.name/",
                "GET, PUT",
            ),
        ] {
            let resp = app.request(method.clone(), path, None, None).await;
            assert_eq!(resp.status, 405, "{method} {path}: {}", resp.text);
            assert_eq!(resp.header("allow"), Some(allow), "{method} {path}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_m_too_large() {
    let tweak = |config: &mut Config| config.limits.max_request_bytes = 2048;
    run_with(Backend::Sqlite, false, tweak, async |app: &TestApp| {
        let login = |padding: usize| {
            json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "nobody" },
                "password": "pw",
                "padding": "x".repeat(padding),
            })
        };
        // Just under the limit: parsed and answered normally (403: no such user).
        let small = login(1800);
        assert!(small.to_string().len() < 2048);
        app.post(LOGIN, None, small)
            .await
            .expect_error(403, "M_FORBIDDEN");
        // Over it, with a Content-Length.
        let big = login(4000);
        app.post(LOGIN, None, big.clone())
            .await
            .expect_error(413, "M_TOO_LARGE");
        app.post(REGISTER, None, json!({ "username": "x".repeat(5000) }))
            .await
            .expect_error(413, "M_TOO_LARGE");

        // Over it, chunked (no Content-Length): the limit holds while streaming.
        let body = big.to_string();
        let mut request = format!(
            "POST {LOGIN} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        for chunk in body.as_bytes().chunks(500) {
            request.push_str(&format!("{:x}\r\n", chunk.len()));
            request.push_str(std::str::from_utf8(chunk).expect("ascii"));
            request.push_str("\r\n");
        }
        request.push_str("0\r\n\r\n");
        let raw = app.raw_http(request.as_bytes()).await;
        assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
        assert!(raw.contains("\"M_TOO_LARGE\""), "{raw}");
        assert!(
            raw.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{raw}"
        );

        // A small chunked body goes through.
        let body = login(10).to_string();
        let request = format!(
            "POST {LOGIN} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let raw = app.raw_http(request.as_bytes()).await;
        assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
        assert!(raw.contains("\"M_FORBIDDEN\""), "{raw}");
    })
    .await;
}

fn rate_limited(config: &mut Config) {
    config.rate_limit.enabled = true;
    // Three at once, then one per 100 s: the test never waits for a refill.
    config.rate_limit.login.burst = 3;
    config.rate_limit.login.per_second = 0.01;
    config.rate_limit.registration.burst = 2;
    config.rate_limit.registration.per_second = 0.01;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_m_limit_exceeded_with_retry_after() {
    run_with(
        Backend::Sqlite,
        false,
        rate_limited,
        async |app: &TestApp| {
            for _ in 0..3 {
                app.login_resp("wendy", "pw")
                    .await
                    .expect_error(403, "M_FORBIDDEN");
            }
            for _ in 0..2 {
                let resp = app.login_resp("wendy", "pw").await;
                let body = resp.expect_error(429, "M_LIMIT_EXCEEDED");
                let retry_ms = body["retry_after_ms"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no retry_after_ms: {}", resp.text));
                // The bucket refills one request per 100 s.
                assert!(
                    (90_000..=100_000).contains(&retry_ms),
                    "retry_after_ms = {retry_ms}"
                );
                let header: u64 = resp
                    .header("retry-after")
                    .unwrap_or_else(|| panic!("no Retry-After header: {:?}", resp.headers))
                    .parse()
                    .expect("Retry-After in seconds");
                assert_eq!(header, retry_ms.div_ceil(1000));
            }
            // Registration has its own bucket, which login did not use up.
            for _ in 0..2 {
                app.get(
                    "/_matrix/client/v3/register/available?username=xavier",
                    None,
                )
                .await
                .expect_ok();
            }
            app.get(
                "/_matrix/client/v3/register/available?username=xavier",
                None,
            )
            .await
            .expect_error(429, "M_LIMIT_EXCEEDED");
            app.post(
                REGISTER,
                None,
                json!({ "username": "xavier", "password": "pw" }),
            )
            .await
            .expect_error(429, "M_LIMIT_EXCEEDED");
            // Endpoints that are not rate-limited are not affected.
            app.get("/_matrix/client/versions", None).await.expect_ok();
            app.get(LOGIN, None).await.expect_ok();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_rate_limits_never_answer_429() {
    let tweak = |config: &mut Config| {
        rate_limited(config);
        config.rate_limit.enabled = false;
    };
    run_with(Backend::Sqlite, false, tweak, async |app: &TestApp| {
        for _ in 0..8 {
            app.login_resp("yvonne", "pw")
                .await
                .expect_error(403, "M_FORBIDDEN");
        }
        for _ in 0..6 {
            app.get(
                "/_matrix/client/v3/register/available?username=yvonne",
                None,
            )
            .await
            .expect_ok();
        }
        app.register("yvonne", "pw").await;
        app.login("yvonne", "pw").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_on_preflight_success_and_errors() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        let origin = "https://app.example.org";
        let allow_origin = |resp: &reqwest::Response| {
            resp.headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };

        let preflight = app
            .client
            .request(Method::OPTIONS, app.url(LOGIN))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
            .await
            .expect("preflight");
        assert!(preflight.status().is_success(), "{:?}", preflight.status());
        let allowed = allow_origin(&preflight);
        assert!(
            allowed.as_deref() == Some(origin) || allowed.as_deref() == Some("*"),
            "{allowed:?}"
        );
        let methods = preflight
            .headers()
            .get("access-control-allow-methods")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_uppercase();
        for method in ["GET", "POST", "PUT", "DELETE"] {
            assert!(methods.contains(method), "{method} not allowed: {methods}");
        }
        let headers = preflight
            .headers()
            .get("access-control-allow-headers")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        for header in ["authorization", "content-type"] {
            assert!(headers.contains(header), "{header} not allowed: {headers}");
        }

        // A success, and errors of several kinds, all carry the header.
        let cases: [(Method, &str, Option<&str>, u16); 5] = [
            (Method::GET, "/_matrix/client/versions", None, 200),
            (Method::GET, WHOAMI, None, 401),
            (Method::GET, "/_matrix/client/v3/nonexistent", None, 404),
            (Method::DELETE, LOGIN, None, 405),
            (Method::POST, LOGIN, Some("{"), 400),
        ];
        for (method, path, body, status) in cases {
            let mut req = app
                .client
                .request(method.clone(), app.url(path))
                .header("origin", origin);
            if let Some(body) = body {
                req = req.header("content-type", "application/json").body(body);
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status().as_u16(), status, "{method} {path}");
            let allowed = allow_origin(&resp);
            assert!(
                allowed.as_deref() == Some(origin) || allowed.as_deref() == Some("*"),
                "{method} {path}: access-control-allow-origin = {allowed:?}"
            );
        }
    })
    .await;
}

/// Token handling, on every backend: missing, unknown, revoked, and in the query string.
async fn access_token_errors(app: &TestApp) {
    app.get(WHOAMI, None)
        .await
        .expect_error(401, "M_MISSING_TOKEN");
    // An empty bearer token is no token.
    let resp = app
        .client
        .get(app.url(WHOAMI))
        .header("authorization", "Bearer ")
        .send()
        .await
        .expect("request");
    palpo_tests::Resp::read(resp)
        .await
        .expect_error(401, "M_MISSING_TOKEN");

    let bad = app.whoami("palpo_not-a-real-token").await;
    bad.expect_error(401, "M_UNKNOWN_TOKEN");
    assert_eq!(bad.json["soft_logout"], false, "{}", bad.text);

    let me = app.register("zara", "pw").await;
    // The token in the query string works like the header.
    let query = app
        .get(&format!("{WHOAMI}?access_token={}", me.access_token), None)
        .await;
    assert_eq!(query.expect_ok()["user_id"], me.user_id.as_str());
    app.get(&format!("{WHOAMI}?access_token=palpo_bogus"), None)
        .await
        .expect_error(401, "M_UNKNOWN_TOKEN");
    // The header wins over the query string.
    app.get(
        &format!("{WHOAMI}?access_token=palpo_bogus"),
        Some(&me.access_token),
    )
    .await
    .expect_ok();

    // Malformed and mis-shaped bodies on an authenticated endpoint, with a valid token.
    let device = format!("/_matrix/client/v3/devices/{}", me.device_id);
    app.send_raw(Method::POST, "/_matrix/client/v3/delete_devices", None, "{")
        .await
        .expect_error(400, "M_NOT_JSON");
    app.put(
        &device,
        Some(&me.access_token),
        json!({ "display_name": ["x"] }),
    )
    .await
    .expect_error(400, "M_BAD_JSON");

    // After logout, the token is unknown; by query string as well.
    app.post(
        "/_matrix/client/v3/logout",
        Some(&me.access_token),
        json!({}),
    )
    .await
    .expect_ok();
    app.assert_token_revoked(&me.access_token).await;
    app.get(&format!("{WHOAMI}?access_token={}", me.access_token), None)
        .await
        .expect_error(401, "M_UNKNOWN_TOKEN");
}
backend_matrix!(access_token_errors, access_token_errors);

/// NUL (U+0000) anywhere in a request is refused with a Matrix error on every backend
/// (PostgreSQL cannot store it: it was a 500 there), and nothing of the request is stored; an
/// escaped backslash before `u0000` is ordinary text and goes through.
async fn nul_characters_are_refused(app: &TestApp) {
    let me = app.register("nadia", "pw").await;
    let token = Some(me.access_token.as_str());
    let room_id = app
        .create_room(&me.access_token, json!({"preset": "private_chat"}))
        .await;
    let room = palpo_tests::enc(&room_id);
    let since = palpo_tests::next_batch(&palpo_tests::sync(app, &me.access_token, None, 0).await);

    let send = |txn: &str| format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    let profile = format!(
        "/_matrix/client/v3/profile/{}/displayname",
        palpo_tests::enc(&me.user_id)
    );
    let filter = palpo_tests::enc(r#"{"room":{"rooms":["!a\u0000:b"]}}"#);
    let refused = [
        (
            Method::PUT,
            send("t1"),
            Some(json!({"msgtype": "m.text", "body": "a\u{0}b"})),
            "M_BAD_JSON",
        ),
        (
            Method::PUT,
            send("t%00"),
            Some(json!({"msgtype": "m.text", "body": "x"})),
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/%00"),
            Some(json!({"topic": "t"})),
            "M_INVALID_PARAM",
        ),
        (
            Method::POST,
            "/_matrix/client/v3/createRoom".to_owned(),
            Some(json!({"room_alias_name": "a\u{0}"})),
            "M_BAD_JSON",
        ),
        (
            Method::PUT,
            profile,
            Some(json!({"displayname": "\u{0}"})),
            "M_BAD_JSON",
        ),
        (
            Method::GET,
            format!("/_matrix/client/v3/sync?filter={filter}"),
            None,
            "M_INVALID_PARAM",
        ),
    ];
    for (method, path, body, errcode) in refused {
        app.request(method, &path, token, body.as_ref())
            .await
            .expect_error(400, errcode);
    }

    // A backslash, then `u0000`: text, stored and read back as sent.
    app.put(
        &send("t2"),
        token,
        json!({"msgtype": "m.text", "body": "\\u0000"}),
    )
    .await
    .expect_ok();
    let response = palpo_tests::sync(app, &me.access_token, Some(&since), 0).await;
    let bodies: Vec<&Value> = response["rooms"]["join"][&room_id]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["type"] == "m.room.message")
                .map(|e| &e["content"]["body"])
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        bodies,
        [&json!("\\u0000")],
        "only the text message: {response}"
    );
    let profile = app
        .get(
            &format!(
                "/_matrix/client/v3/profile/{}",
                palpo_tests::enc(&me.user_id)
            ),
            token,
        )
        .await;
    assert_ne!(
        profile.expect_ok()["displayname"],
        "\u{0}",
        "{}",
        profile.text
    );
}
backend_matrix!(nul_characters_are_refused, nul_characters_are_refused);

/// Identifiers in the path have the sigil the document's `pattern` gives them (`!` room,
/// `@` user, `$` event, `#` alias): anything else is 400 `M_INVALID_PARAM` before the
/// endpoint runs, the same on every endpoint.
async fn identifiers_without_their_sigil_are_refused(app: &TestApp) {
    let me = app.register("iris", "pw").await;
    let token = Some(me.access_token.as_str());
    let room_id = app
        .create_room(&me.access_token, json!({"preset": "private_chat"}))
        .await;
    let room = palpo_tests::enc(&room_id);
    let event = palpo_tests::enc(&app.send_text(&me.access_token, &room_id, "hi").await);
    let user = palpo_tests::enc(&me.user_id);
    let refused = [
        (
            Method::GET,
            "/_matrix/client/v3/rooms/nosigil:test.local/members".to_owned(),
        ),
        (
            Method::GET,
            format!("/_matrix/client/v3/rooms/{room}/event/notanevent"),
        ),
        (
            Method::GET,
            "/_matrix/client/v3/profile/nobody:test.local".to_owned(),
        ),
        (
            Method::GET,
            "/_matrix/client/v3/directory/room/lobby:test.local".to_owned(),
        ),
        (
            Method::POST,
            "/_matrix/client/v3/join/lobby:test.local".to_owned(),
        ),
        (
            Method::GET,
            format!("/_matrix/client/v3/user/{user}/rooms/nosigil/account_data/m.tag"),
        ),
    ];
    for (method, path) in refused {
        let body = (method == Method::POST).then(|| json!({}));
        app.request(method, &path, token, body.as_ref())
            .await
            .expect_error(400, "M_INVALID_PARAM");
    }
    // With their sigils the same endpoints answer.
    app.get(&format!("/_matrix/client/v3/rooms/{room}/members"), token)
        .await
        .expect_ok();
    app.get(
        &format!("/_matrix/client/v3/rooms/{room}/event/{event}"),
        token,
    )
    .await
    .expect_ok();
    app.get(&format!("/_matrix/client/v3/profile/{user}"), token)
        .await
        .expect_ok();
}
backend_matrix!(
    identifiers_without_their_sigil_are_refused,
    identifiers_without_their_sigil_are_refused
);
