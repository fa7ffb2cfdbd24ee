//! The served documentation: `/_palpo/docs` (Swagger UI) and `/_palpo/openapi.json` list every
//! endpoint, agree with `palpo_api::openapi_documents()`, and every documented operation is
//! really routed by the server.

use palpo_tests::{Backend, TestApp, run};
use reqwest::Method;
use serde_json::{Value, json};

/// Every operation Palpo serves, as `(method, path)` in OpenAPI syntax.
const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/_matrix/client/versions"),
    ("get", "/.well-known/matrix/client"),
    ("get", "/.well-known/matrix/server"),
    ("get", "/_matrix/client/v3/capabilities"),
    ("get", "/_matrix/client/v3/login"),
    ("post", "/_matrix/client/v3/login"),
    ("post", "/_matrix/client/v3/logout"),
    ("post", "/_matrix/client/v3/logout/all"),
    ("post", "/_matrix/client/v3/register"),
    ("get", "/_matrix/client/v3/register/available"),
    ("get", "/_matrix/client/v3/account/whoami"),
    ("post", "/_matrix/client/v3/account/password"),
    ("post", "/_matrix/client/v3/account/deactivate"),
    ("get", "/_matrix/client/v3/devices"),
    ("get", "/_matrix/client/v3/devices/{deviceId}"),
    ("put", "/_matrix/client/v3/devices/{deviceId}"),
    ("delete", "/_matrix/client/v3/devices/{deviceId}"),
    ("post", "/_matrix/client/v3/delete_devices"),
    ("post", "/_matrix/client/v3/createRoom"),
    (
        "put",
        "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}",
    ),
    (
        "put",
        "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}",
    ),
    (
        "get",
        "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}",
    ),
    ("put", "/_matrix/client/v3/rooms/{roomId}/state/{eventType}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/state/{eventType}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/state"),
    (
        "put",
        "/_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}",
    ),
    ("get", "/_matrix/client/v3/rooms/{roomId}/event/{eventId}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/messages"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/context/{eventId}"),
    (
        "get",
        "/_matrix/client/v1/rooms/{roomId}/timestamp_to_event",
    ),
    ("get", "/_matrix/client/v3/joined_rooms"),
    ("get", "/_matrix/client/v3/sync"),
    (
        "post",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
    ),
    ("get", "/_matrix/client/v3/rooms/{roomId}/members"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/joined_members"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/join"),
    ("post", "/_matrix/client/v3/join/{roomIdOrAlias}"),
    ("post", "/_matrix/client/v3/knock/{roomIdOrAlias}"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/invite"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/leave"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/forget"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/kick"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/ban"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/unban"),
    ("put", "/_matrix/client/v3/directory/room/{roomAlias}"),
    ("get", "/_matrix/client/v3/directory/room/{roomAlias}"),
    ("delete", "/_matrix/client/v3/directory/room/{roomAlias}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/aliases"),
    ("get", "/_matrix/client/v3/directory/list/room/{roomId}"),
    ("put", "/_matrix/client/v3/directory/list/room/{roomId}"),
    ("get", "/_matrix/client/v3/publicRooms"),
    ("post", "/_matrix/client/v3/publicRooms"),
    ("get", "/_matrix/client/v3/profile/{userId}"),
    ("get", "/_matrix/client/v3/profile/{userId}/{keyName}"),
    ("put", "/_matrix/client/v3/profile/{userId}/{keyName}"),
    ("delete", "/_matrix/client/v3/profile/{userId}/{keyName}"),
    ("post", "/_matrix/client/v3/user_directory/search"),
    ("post", "/_matrix/client/v3/user/{userId}/filter"),
    ("get", "/_matrix/client/v3/user/{userId}/filter/{filterId}"),
    (
        "get",
        "/_matrix/client/v3/user/{userId}/account_data/{type}",
    ),
    (
        "put",
        "/_matrix/client/v3/user/{userId}/account_data/{type}",
    ),
    (
        "get",
        "/_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}",
    ),
    (
        "put",
        "/_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}",
    ),
    (
        "get",
        "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags",
    ),
    (
        "put",
        "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}",
    ),
    (
        "delete",
        "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}",
    ),
    ("put", "/_matrix/client/v3/rooms/{roomId}/typing/{userId}"),
    (
        "post",
        "/_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}",
    ),
    ("post", "/_matrix/client/v3/rooms/{roomId}/read_markers"),
    ("get", "/_matrix/client/v3/presence/{userId}/status"),
    ("put", "/_matrix/client/v3/presence/{userId}/status"),
    ("post", "/_matrix/client/v3/keys/upload"),
    ("post", "/_matrix/client/v3/keys/query"),
    ("post", "/_matrix/client/v3/keys/claim"),
    ("get", "/_matrix/client/v3/keys/changes"),
    ("post", "/_matrix/client/v3/keys/device_signing/upload"),
    ("post", "/_matrix/client/v3/keys/signatures/upload"),
    ("put", "/_matrix/client/v3/sendToDevice/{eventType}/{txnId}"),
    ("get", "/_matrix/client/v3/pushrules"),
    ("get", "/_matrix/client/v3/pushrules/global"),
    ("get", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}"),
    ("put", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}"),
    (
        "delete",
        "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}",
    ),
    (
        "get",
        "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled",
    ),
    (
        "put",
        "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled",
    ),
    (
        "get",
        "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions",
    ),
    (
        "put",
        "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions",
    ),
];

fn documented_operations(spec: &Value) -> Vec<(String, String)> {
    let mut ops: Vec<(String, String)> = spec["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no paths in the document"))
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|methods| methods.keys())
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    ops.sort();
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_and_document_list_every_endpoint() {
    run(Backend::Sqlite, false, async |app: &TestApp| {
        // The raw document.
        let resp = app.get(palpo_api::SPEC_PATH, None).await;
        let spec = resp.expect_status(200).clone();
        assert!(
            spec["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.")),
            "{}",
            resp.text
        );
        let mut expected: Vec<(String, String)> = OPERATIONS
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        expected.sort();
        assert_eq!(documented_operations(&spec), expected);

        // It is the document `palpo openapi` writes.
        let (_, generated) = palpo_api::openapi_documents()
            .into_iter()
            .find(|(name, _)| name == "client-server.json")
            .expect("client-server.json is generated");
        let generated: Value = serde_json::from_str(&generated).expect("generated JSON");
        assert_eq!(spec, generated);

        // The interactive page: HTML with the same document inside.
        let page = app
            .client
            .get(app.url(palpo_api::DOCS_PATH))
            .send()
            .await
            .expect("docs page");
        assert_eq!(page.status().as_u16(), 200);
        let content_type = page
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(content_type.starts_with("text/html"), "{content_type}");
        let html = page.text().await.expect("docs body");
        assert!(html.contains("SwaggerUIBundle"), "not Swagger UI");
        let embedded = html
            .split_once("let spec = ")
            .and_then(|(_, rest)| rest.split_once(";\n"))
            .map(|(json, _)| json)
            .expect("the page embeds the document");
        let embedded: Value = serde_json::from_str(embedded).expect("embedded JSON");
        assert_eq!(documented_operations(&embedded), expected);

        // Every documented operation is routed: without a token or body it may be refused, but
        // never as an unknown endpoint or method.
        for (method, path) in &expected {
            let concrete = path.replace("{deviceId}", "SOMEDEVICE");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let body = (method == Method::POST || method == Method::PUT).then(|| json!({}));
            let resp = app
                .request(method.clone(), &concrete, None, body.as_ref())
                .await;
            assert!(
                resp.status < 500 && resp.json["errcode"] != "M_UNRECOGNIZED",
                "{method} {concrete} is documented but not served: {} {}",
                resp.status,
                resp.text
            );
        }
    })
    .await;
}
