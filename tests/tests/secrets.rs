//! Secrets at rest: after registering and logging in over HTTP, the database (read directly)
//! and the Redis cache hold no plain password and no plain access token: passwords are argon2
//! hashes, tokens are their SHA-256.

use palpo_tests::{Backend, TestApp, backend_matrix, testing};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{Connection, Row};

const PASSWORD: &str = "Plain-Password-Do-Not-Store-1!";
const WRONG_PASSWORD: &str = "Wrong-Password-Do-Not-Store-2!";

/// What each table holds that could carry a secret.
const TABLES: &[(&str, &[&str])] = &[
    ("users", &["user_id", "password_hash"]),
    ("access_tokens", &["token_hash", "user_id", "device_id"]),
    (
        "devices",
        &["user_id", "device_id", "display_name", "last_seen_ip"],
    ),
    (
        "uia_sessions",
        &["session_id", "user_id", "purpose", "completed", "data"],
    ),
];

/// One row of a table: its name and the columns of [`TABLES`], as text.
type Row_ = (String, Vec<(String, Option<String>)>);

/// Every row of [`TABLES`], read straight from the database, not through Palpo.
async fn dump(backend: Backend, url: &str) -> Vec<Row_> {
    let mut rows = Vec::new();
    for (table, columns) in TABLES {
        let sql = format!("SELECT {} FROM {table}", columns.join(", "));
        let texts: Vec<Vec<Option<String>>> = match backend {
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
                let found = sqlx::query(&sql).fetch_all(&mut conn).await.expect(&sql);
                found
                    .iter()
                    .map(|row| {
                        (0..columns.len())
                            .map(|i| row.try_get::<Option<String>, _>(i).expect("text column"))
                            .collect()
                    })
                    .collect()
            }
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
                let found = sqlx::query(&sql).fetch_all(&mut conn).await.expect(&sql);
                found
                    .iter()
                    .map(|row| {
                        (0..columns.len())
                            .map(|i| row.try_get::<Option<String>, _>(i).expect("text column"))
                            .collect()
                    })
                    .collect()
            }
            Backend::MySql => {
                // Binary-collated text columns decode as bytes, not as `String`.
                let mut conn = sqlx::MySqlConnection::connect(url).await.expect("connect");
                let found = sqlx::query(&sql).fetch_all(&mut conn).await.expect(&sql);
                found
                    .iter()
                    .map(|row| {
                        (0..columns.len())
                            .map(|i| {
                                row.try_get::<Option<Vec<u8>>, _>(i)
                                    .expect("text column")
                                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                            })
                            .collect()
                    })
                    .collect()
            }
        };
        for values in texts {
            let named = columns
                .iter()
                .map(|c| (*c).to_owned())
                .zip(values)
                .collect();
            rows.push(((*table).to_owned(), named));
        }
    }
    rows
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn column<'a>(rows: &'a [Row_], table: &str, name: &str) -> Vec<&'a str> {
    rows.iter()
        .filter(|(t, _)| t == table)
        .flat_map(|(_, cols)| cols.iter())
        .filter(|(c, _)| c == name)
        .filter_map(|(_, v)| v.as_deref())
        .collect()
}

/// Fails if `haystack` contains any of `secrets`, or the random part of an access token.
fn assert_free_of(haystack: &str, secrets: &[&str], place: &str) {
    for secret in secrets {
        let random = secret.strip_prefix("palpo_").unwrap_or(secret);
        assert!(
            !haystack.contains(secret) && !haystack.contains(random),
            "{place} holds a secret in plain text: {haystack}"
        );
    }
}

async fn no_plain_secrets_at_rest(app: &TestApp) {
    let registered = app.register("sybil", PASSWORD).await;
    let logged_in = app.login("sybil", PASSWORD).await;
    app.assert_token_valid(&registered).await;
    app.assert_token_valid(&logged_in).await;
    // A failed password stage inside an open UIA session, so `uia_sessions` has a row that
    // saw a password.
    let session = app
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&logged_in.access_token),
            json!({}),
        )
        .await
        .expect_uia(&[&["m.login.password"]]);
    let wrong = app
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&logged_in.access_token),
            json!({ "auth": {
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "sybil" },
                "password": WRONG_PASSWORD,
                "session": session,
            } }),
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text);

    let tokens = [
        registered.access_token.as_str(),
        logged_in.access_token.as_str(),
    ];
    let mut secrets = vec![PASSWORD, WRONG_PASSWORD];
    secrets.extend(tokens);

    let rows = dump(app.backend, app.database_url()).await;
    // The tables hold what we expect, so the checks below look at real data.
    let hashes = column(&rows, "users", "password_hash");
    assert_eq!(hashes.len(), 1, "{rows:?}");
    assert!(hashes[0].starts_with("$argon2"), "{}", hashes[0]);
    let mut stored: Vec<&str> = column(&rows, "access_tokens", "token_hash");
    stored.sort();
    let mut expected: Vec<String> = tokens.iter().map(|t| sha256_hex(t)).collect();
    expected.sort();
    assert_eq!(
        stored, expected,
        "token_hash must be the SHA-256 of each token"
    );
    for hash in &stored {
        assert_eq!(hash.len(), 64, "{hash}");
        assert!(
            hash.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{hash}"
        );
    }
    assert_eq!(
        column(&rows, "uia_sessions", "session_id"),
        [session.as_str()]
    );

    for (table, columns) in &rows {
        for (name, value) in columns {
            if let Some(value) = value {
                assert_free_of(value, &secrets, &format!("{table}.{name}"));
            }
        }
    }

    // The cache, when there is one, holds nothing secret either.
    if let Some(url) = &app.config.cache.redis_url {
        let namespace = &app.config.cache.namespace;
        let keys = testing::namespace_keys(url, namespace).await;
        let token_key = format!("{namespace}:v1:token:{}", sha256_hex(tokens[0]));
        assert!(
            keys.contains(&token_key),
            "the token lookup was not cached, so Redis was not checked: {keys:?}"
        );
        let mut conn = testing::redis_connection(url).await;
        for key in keys {
            assert_free_of(&key, &secrets, "a Redis key");
            let value: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("GET");
            if let Some(value) = value {
                assert_free_of(&value, &secrets, &format!("Redis {key}"));
            }
        }
    }
}
backend_matrix!(no_plain_secrets_at_rest, no_plain_secrets_at_rest);
