//! Black-box test harness: a real Palpo HTTP server on a fresh database, driven over HTTP.
//!
//! [`TestApp::spawn`] creates a throwaway database on the chosen backend (optionally with the
//! Redis cache in a namespace of its own), builds the services and the poem app exactly as the
//! binary does, and serves it on `127.0.0.1:<free port>`. Tests talk to it with reqwest only.
//!
//! [`backend_matrix!`] turns one scenario (`async fn(&TestApp)`) into six tests, one per
//! {sqlite, postgres, mysql} × {no redis, redis}: `<scenario>::sqlite`, `<scenario>::postgres_redis`...
//! A backend left out of `PALPO_TEST_BACKENDS` is not run; a backend (or Redis) that is asked
//! for but unreachable makes the test fail.
//!
//! [`run`] / [`run_with`] tear the app down (server, pools, database, Redis namespace) whether
//! the scenario passes or panics.

use std::{
    net::SocketAddr,
    panic::{AssertUnwindSafe, resume_unwind},
    sync::{Arc, Once},
    time::Duration,
};

use futures::FutureExt;
use palpo_core::config::CacheConfig;
use palpo_service::Services;
use palpo_storage::{
    Storage,
    testing::{
        TestDatabase, assert_redis_reachable, backend_enabled, delete_namespace, redis_url,
        test_cache_config,
    },
};
use poem::listener::{Acceptor, Listener, TcpListener};
use reqwest::{Method, header::HeaderMap};
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};

pub use palpo_core::Config;
pub use palpo_storage::{Backend, testing};

/// The server name every test app uses.
pub const SERVER_NAME: &str = "test.local";

/// How long one HTTP request may take before the test fails instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A logged-in session: what registration and login hand back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
}

/// A Palpo server on a fresh database, and a client for it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub base_url: String,
    pub client: reqwest::Client,
    pub backend: Backend,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
    db: TestDatabase,
    storage: Storage,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _data_dir: tempfile::TempDir,
}

/// An HTTP response, read completely.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    /// The body as JSON; `Value::Null` when it is not JSON.
    pub json: Value,
}

fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The configuration of a test app: defaults, `server_name = test.local`, rate limits off,
/// no cache. Loaded through [`Config::load_from`] with an empty file, so a stray
/// `config/palpo.toml` cannot leak in.
fn base_config(data_dir: &std::path::Path) -> Config {
    let file = data_dir.join("palpo.toml");
    std::fs::write(&file, "").unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    let env = [
        ("PALPO__SERVER_NAME", SERVER_NAME.to_owned()),
        ("PALPO__DATA_DIR", data_dir.display().to_string()),
        ("PALPO__RATE_LIMIT__ENABLED", "false".to_owned()),
        ("PALPO__LOG", "warn".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    Config::load_from(Some(&file), env).unwrap_or_else(|e| panic!("test configuration: {e}"))
}

impl TestApp {
    /// A server on a fresh `backend` database; with the shared test Redis as cache (in a
    /// namespace of its own) when `with_redis`.
    pub async fn spawn(backend: Backend, with_redis: bool) -> TestApp {
        Self::spawn_with(backend, with_redis, |_| {}).await
    }

    /// As [`TestApp::spawn`], with `tweak` applied to the configuration before the server starts.
    pub async fn spawn_with(
        backend: Backend,
        with_redis: bool,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        let cache = if with_redis {
            let url = redis_url();
            assert_redis_reachable(&url).await;
            Some(test_cache_config(&url))
        } else {
            None
        };
        Self::spawn_with_cache(backend, cache, tweak).await
    }

    /// As [`TestApp::spawn_with`], with an explicit cache configuration (`None`: no cache).
    pub async fn spawn_with_cache(
        backend: Backend,
        cache: Option<CacheConfig>,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        init_tracing();
        let data_dir = tempfile::Builder::new()
            .prefix("palpo-app-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let mut config = base_config(data_dir.path());
        // From here on, a panic drops `db`, whose `Drop` removes the database.
        let db = TestDatabase::create(backend).await;
        config.database = db.config();
        if let Some(cache) = cache {
            config.cache = cache;
        }

        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .unwrap_or_else(|e| panic!("cannot bind a port on 127.0.0.1: {e}"));
        let addr: SocketAddr = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().copied())
            .unwrap_or_else(|| panic!("the listener has no socket address"));
        let base_url = format!("http://{addr}");
        config.listen = addr;
        config.public_base_url = Some(base_url.clone());
        tweak(&mut config);

        let storage = Storage::open_with_cache(&config.database, &config.cache)
            .await
            .unwrap_or_else(|e| panic!("cannot open the {} test database: {e}", backend.name()));
        let config = Arc::new(config);
        let app = palpo_api::build_app(Services::new(config.clone(), storage.clone()));
        let (shutdown, signal) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let signal = async {
                let _ = signal.await;
            };
            if let Err(e) = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, signal, Some(Duration::from_secs(2)))
                .await
            {
                eprintln!("test server failed: {e}");
            }
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_else(|e| panic!("cannot build the HTTP client: {e}"));
        TestApp {
            base_url,
            client,
            backend,
            config,
            db,
            storage,
            shutdown: Some(shutdown),
            server: Some(server),
            _data_dir: data_dir,
        }
    }

    /// Stops the server, closes the pools, drops the database and the Redis namespace.
    pub async fn teardown(mut self) {
        // Idle keep-alive connections would hold the graceful shutdown up.
        drop(std::mem::take(&mut self.client));
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.storage.db().close().await;
        self.db.drop_database().await;
        if let Some(url) = &self.config.cache.redis_url {
            delete_namespace(url, &self.config.cache.namespace).await;
        }
    }

    /// The URL of the test database (to inspect it with sqlx).
    pub fn database_url(&self) -> &str {
        self.db.url()
    }

    /// The storage the server uses.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// `@localpart:test.local`
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.config.server_name)
    }

    // -----------------------------------------------------------------------------------------
    // Plain HTTP

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut req = self.client.request(method.clone(), self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: request failed: {e}"));
        Resp::read(resp).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request(Method::POST, path, token, Some(&body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.request(Method::PUT, path, token, Some(&body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>, body: Option<Value>) -> Resp {
        self.request(Method::DELETE, path, token, body.as_ref())
            .await
    }

    /// Sends raw bytes, with the given `Content-Type` (none when `None`).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        self.send_raw_as(method, path, None, content_type, body)
            .await
    }

    /// As [`TestApp::send_raw`], with `token` as the bearer token when given.
    pub async fn send_raw_as(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        let mut req = self.client.request(method.clone(), self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: request failed: {e}"));
        Resp::read(resp).await
    }

    /// Writes `request` (a complete HTTP/1.1 request, which should say `Connection: close`) to
    /// the server over a plain TCP connection and returns the raw response, for what reqwest
    /// will not send (hand-made chunked bodies, broken framing). A server that answers before
    /// reading the whole request may reset the connection: what it sent is still returned.
    pub async fn raw_http(&self, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.config.listen;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        // Errors are ignored: the server may answer and close before it has read everything.
        let _ = stream.write_all(request).await;
        let _ = stream.flush().await;
        let mut response = Vec::new();
        let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => response.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "raw request to {addr}: no end of response");
        String::from_utf8_lossy(&response).into_owned()
    }

    // -----------------------------------------------------------------------------------------
    // Matrix

    /// Registers `localpart` the way a client does: a first request without `auth` must be
    /// answered 401 with the flows and a session, the second completes `m.login.dummy`.
    #[track_caller]
    pub fn register<'a>(
        &'a self,
        localpart: &'a str,
        password: &'a str,
    ) -> impl Future<Output = Session> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let body = json!({ "username": localpart, "password": password });
            let challenge = self.post("/_matrix/client/v3/register", None, body).await;
            let session = challenge.expect_uia(&[&["m.login.dummy"]]);
            let resp = self
                .post(
                    "/_matrix/client/v3/register",
                    None,
                    json!({
                        "username": localpart,
                        "password": password,
                        "auth": { "type": "m.login.dummy", "session": session },
                    }),
                )
                .await;
            let session = resp.expect_session(caller);
            assert_eq!(session.user_id, self.user_id(localpart), "{caller}");
            session
        }
    }

    /// `POST /login` with an `m.id.user` identifier.
    pub async fn login_resp(&self, user: &str, password: &str) -> Resp {
        self.post(
            "/_matrix/client/v3/login",
            None,
            json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": user },
                "password": password,
            }),
        )
        .await
    }

    /// Logs in; panics unless it succeeds.
    #[track_caller]
    pub fn login<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
    ) -> impl Future<Output = Session> + 'a {
        let caller = std::panic::Location::caller();
        async move { self.login_resp(user, password).await.expect_session(caller) }
    }

    /// `GET /account/whoami`.
    pub async fn whoami(&self, token: &str) -> Resp {
        self.get("/_matrix/client/v3/account/whoami", Some(token))
            .await
    }

    /// Panics unless `token` is valid and belongs to `session`'s user and device.
    #[track_caller]
    pub fn assert_token_valid<'a>(&'a self, session: &'a Session) -> impl Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let resp = self.whoami(&session.access_token).await;
            assert_eq!(resp.status, 200, "{caller}: whoami: {}", resp.text);
            assert_eq!(resp.json["user_id"], session.user_id.as_str(), "{caller}");
            assert_eq!(
                resp.json["device_id"],
                session.device_id.as_str(),
                "{caller}"
            );
        }
    }

    /// Panics unless `token` is refused with 401 `M_UNKNOWN_TOKEN`, `soft_logout: false`.
    #[track_caller]
    pub fn assert_token_revoked<'a>(&'a self, token: &'a str) -> impl Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let resp = self.whoami(token).await;
            resp.expect_error_at(401, "M_UNKNOWN_TOKEN", caller);
            assert_eq!(resp.json["soft_logout"], false, "{caller}: {}", resp.text);
            // `/sync` may take a token from memory: it must be refused all the same.
            let resp = self.get("/_matrix/client/v3/sync", Some(token)).await;
            resp.expect_error_at(401, "M_UNKNOWN_TOKEN", caller);
            assert_eq!(resp.json["soft_logout"], false, "{caller}: {}", resp.text);
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Not torn down (a panic inside `spawn`, or a test that forgot): stop serving at least.
        // The database's own `Drop` removes it.
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Resp {
    pub async fn read(resp: reqwest::Response) -> Resp {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("cannot read the response body: {e}"));
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            json,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Panics unless the status is `status`; returns the JSON body.
    #[track_caller]
    pub fn expect_status(&self, status: u16) -> &Value {
        assert_eq!(
            self.status, status,
            "expected {status}, got {}: {}",
            self.status, self.text
        );
        &self.json
    }

    /// Panics unless this is 200 with a JSON object; returns it.
    #[track_caller]
    pub fn expect_ok(&self) -> &Value {
        self.expect_status(200);
        self.expect_json_content_type(std::panic::Location::caller());
        assert!(self.json.is_object(), "not a JSON object: {}", self.text);
        &self.json
    }

    fn expect_json_content_type(&self, caller: &std::panic::Location<'_>) {
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{caller}: Content-Type is {content_type:?}, not application/json ({} {})",
            self.status,
            self.text
        );
    }

    /// Panics unless this is a Matrix error: `status`, `Content-Type: application/json`, and a
    /// body with `errcode == errcode` and a string `error`. Returns the body.
    #[track_caller]
    pub fn expect_error(&self, status: u16, errcode: &str) -> &Value {
        self.expect_error_at(status, errcode, std::panic::Location::caller())
    }

    fn expect_error_at(
        &self,
        status: u16,
        errcode: &str,
        caller: &std::panic::Location<'_>,
    ) -> &Value {
        assert_eq!(
            (self.status, self.json["errcode"].as_str()),
            (status, Some(errcode)),
            "{caller}: expected {status} {errcode}, got: {} {}",
            self.status,
            self.text
        );
        self.expect_json_content_type(caller);
        assert!(
            self.json["error"].is_string(),
            "{caller}: error body without an `error` string: {}",
            self.text
        );
        &self.json
    }

    /// Panics unless this is a user-interactive-auth challenge (401, JSON) offering exactly
    /// `flows`; returns its session id.
    #[track_caller]
    pub fn expect_uia(&self, flows: &[&[&str]]) -> String {
        let caller = std::panic::Location::caller();
        assert_eq!(
            self.status, 401,
            "{caller}: expected a UIA 401: {}",
            self.text
        );
        self.expect_json_content_type(caller);
        let offered: Vec<Vec<String>> = self.json["flows"]
            .as_array()
            .unwrap_or_else(|| panic!("{caller}: no flows: {}", self.text))
            .iter()
            .map(|flow| {
                flow["stages"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{caller}: flow without stages: {}", self.text))
                    .iter()
                    .map(|s| s.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<String>> = flows
            .iter()
            .map(|flow| flow.iter().map(|s| (*s).to_owned()).collect())
            .collect();
        assert_eq!(offered, expected, "{caller}: {}", self.text);
        let session = self.json["session"]
            .as_str()
            .unwrap_or_else(|| panic!("{caller}: no session: {}", self.text));
        assert!(!session.is_empty(), "{caller}: empty session");
        session.to_owned()
    }

    /// Panics unless this is a 200 carrying `user_id`, `access_token` and `device_id`.
    fn expect_session(&self, caller: &std::panic::Location<'_>) -> Session {
        assert_eq!(
            self.status, 200,
            "{caller}: expected a session: {}",
            self.text
        );
        let field = |name: &str| {
            self.json[name]
                .as_str()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| panic!("{caller}: no {name}: {}", self.text))
                .to_owned()
        };
        Session {
            user_id: field("user_id"),
            access_token: field("access_token"),
            device_id: field("device_id"),
        }
    }
}

/// Spawns an app for `backend` (with the shared Redis when `with_redis`), runs `scenario` on
/// it, and tears everything down, also when the scenario panics (the panic is then resumed).
/// Returns at once, saying so, when `backend` is not in `PALPO_TEST_BACKENDS`.
pub async fn run<F>(backend: Backend, with_redis: bool, scenario: F)
where
    F: AsyncFnOnce(&TestApp),
{
    run_with(backend, with_redis, |_| {}, scenario).await;
}

/// As [`run`], with `tweak` applied to the configuration.
pub async fn run_with<F>(
    backend: Backend,
    with_redis: bool,
    tweak: impl FnOnce(&mut Config),
    scenario: F,
) where
    F: AsyncFnOnce(&TestApp),
{
    if !backend_enabled(backend) {
        return;
    }
    let app = TestApp::spawn_with(backend, with_redis, tweak).await;
    let result = AssertUnwindSafe(scenario(&app)).catch_unwind().await;
    app.teardown().await;
    if let Err(panic) = result {
        resume_unwind(panic);
    }
}

/// One test per backend × {no Redis, Redis} for an `async fn(&TestApp)` scenario:
///
/// ```ignore
/// backend_matrix!(register_login_whoami, scenario_fn);
/// backend_matrix!(registration_disabled, scenario_fn, |config: &mut Config| { ... });
/// ```
///
/// makes the module `register_login_whoami` with the tests `sqlite`, `sqlite_redis`,
/// `postgres`, `postgres_redis`, `mysql` and `mysql_redis`.
#[macro_export]
macro_rules! backend_matrix {
    ($name:ident, $scenario:path) => {
        $crate::backend_matrix!($name, $scenario, |_: &mut $crate::Config| {});
    };
    ($name:ident, $scenario:path, $tweak:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::__backend_case!(sqlite, Sqlite, false, $scenario, $tweak);
            $crate::__backend_case!(sqlite_redis, Sqlite, true, $scenario, $tweak);
            $crate::__backend_case!(postgres, Postgres, false, $scenario, $tweak);
            $crate::__backend_case!(postgres_redis, Postgres, true, $scenario, $tweak);
            $crate::__backend_case!(mysql, MySql, false, $scenario, $tweak);
            $crate::__backend_case!(mysql_redis, MySql, true, $scenario, $tweak);
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __backend_case {
    ($test:ident, $backend:ident, $redis:expr, $scenario:path, $tweak:expr) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            $crate::run_with($crate::Backend::$backend, $redis, $tweak, $scenario).await;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Rooms

/// Percent-encodes one path segment: room ids (`!`), aliases (`#`), event ids (`$`, and `/` or
/// `+` in room versions 3), user ids (`@`, `:`). Only RFC 3986 unreserved characters stay.
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len() * 3);
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A transaction id no other request of this test process uses.
pub fn next_txn_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("txn{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl TestApp {
    /// `/_matrix/client/v3/rooms/{roomId}` followed by `rest` (which starts with `/`).
    pub fn room_path(&self, room_id: &str, rest: &str) -> String {
        format!("/_matrix/client/v3/rooms/{}{rest}", enc(room_id))
    }

    /// `POST /createRoom`; panics unless it succeeds. Returns the room id.
    #[track_caller]
    pub fn create_room<'a>(
        &'a self,
        token: &'a str,
        body: Value,
    ) -> impl Future<Output = String> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let resp = self
                .post("/_matrix/client/v3/createRoom", Some(token), body)
                .await;
            assert_eq!(resp.status, 200, "{caller}: createRoom: {}", resp.text);
            resp.json["room_id"]
                .as_str()
                .filter(|id| id.starts_with('!'))
                .unwrap_or_else(|| panic!("{caller}: no room_id: {}", resp.text))
                .to_owned()
        }
    }

    /// Sends an event of `event_type` with a fresh transaction id; panics unless it succeeds.
    /// Returns the event id.
    #[track_caller]
    pub fn send_event<'a>(
        &'a self,
        token: &'a str,
        room_id: &'a str,
        event_type: &'a str,
        content: Value,
    ) -> impl Future<Output = String> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let path = self.room_path(
                room_id,
                &format!("/send/{}/{}", enc(event_type), next_txn_id()),
            );
            let resp = self.put(&path, Some(token), content).await;
            assert_eq!(resp.status, 200, "{caller}: send: {}", resp.text);
            resp.json["event_id"]
                .as_str()
                .filter(|id| id.starts_with('$'))
                .unwrap_or_else(|| panic!("{caller}: no event_id: {}", resp.text))
                .to_owned()
        }
    }

    /// Sets `session`'s display name; panics unless it succeeds.
    pub async fn set_displayname(&self, session: &Session, name: &str) {
        let path = format!(
            "/_matrix/client/v3/profile/{}/displayname",
            enc(&session.user_id)
        );
        self.put(
            &path,
            Some(&session.access_token),
            json!({ "displayname": name }),
        )
        .await
        .expect_ok();
    }

    /// Sends an `m.room.message` text; panics unless it succeeds. Returns the event id.
    #[track_caller]
    pub fn send_text<'a>(
        &'a self,
        token: &'a str,
        room_id: &'a str,
        body: &'a str,
    ) -> impl Future<Output = String> + 'a {
        let content = json!({ "msgtype": "m.text", "body": body });
        self.send_event(token, room_id, "m.room.message", content)
    }

    /// `POST /join/{roomIdOrAlias}`; returns the response.
    pub async fn join_resp(&self, token: &str, room_id_or_alias: &str) -> Resp {
        let path = format!("/_matrix/client/v3/join/{}", enc(room_id_or_alias));
        self.post(&path, Some(token), json!({})).await
    }

    /// Joins a room by id or alias; panics unless it succeeds. Returns the room id.
    #[track_caller]
    pub fn join_room<'a>(
        &'a self,
        token: &'a str,
        room_id_or_alias: &'a str,
    ) -> impl Future<Output = String> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let resp = self.join_resp(token, room_id_or_alias).await;
            assert_eq!(resp.status, 200, "{caller}: join: {}", resp.text);
            resp.json["room_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{caller}: no room_id: {}", resp.text))
                .to_owned()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Several processes

impl TestApp {
    /// A second server on this app's database and Redis namespace, as another process of the
    /// same deployment: its own pools, services, notifier and Redis connections. `tweak` edits
    /// its configuration first (`config.cache.redis_url = None`: a process without Redis).
    /// Tear it down before this app; only this app drops the database.
    pub async fn spawn_peer(&self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let data_dir = tempfile::Builder::new()
            .prefix("palpo-app-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let mut config = base_config(data_dir.path());
        config.database = self.config.database.clone();
        config.cache = self.config.cache.clone();
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .unwrap_or_else(|e| panic!("cannot bind a port on 127.0.0.1: {e}"));
        let addr: SocketAddr = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().copied())
            .unwrap_or_else(|| panic!("the listener has no socket address"));
        let base_url = format!("http://{addr}");
        config.listen = addr;
        config.public_base_url = Some(base_url.clone());
        tweak(&mut config);

        let storage = Storage::open_with_cache(&config.database, &config.cache)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "peer: cannot open the {} database: {e}",
                    self.backend.name()
                )
            });
        let config = Arc::new(config);
        let app = palpo_api::build_app(Services::new(config.clone(), storage.clone()));
        let (shutdown, signal) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let signal = async {
                let _ = signal.await;
            };
            if let Err(e) = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, signal, Some(Duration::from_secs(2)))
                .await
            {
                eprintln!("peer test server failed: {e}");
            }
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_else(|e| panic!("cannot build the HTTP client: {e}"));
        TestApp {
            base_url,
            client,
            backend: self.backend,
            config,
            db: self.db.shared_handle(),
            storage,
            shutdown: Some(shutdown),
            server: Some(server),
            _data_dir: data_dir,
        }
    }
}

/// Talking to the server the way a Matrix client library does: requests built by ruma, answers
/// parsed by ruma's response types.
pub mod ruma_client {
    use ruma::api::{IncomingResponseExt, error::FromHttpResponseError};

    use crate::TestApp;

    /// Sends a request ruma built; returns the raw response for ruma to parse.
    pub async fn exchange(
        app: &TestApp,
        request: http::Request<Vec<u8>>,
    ) -> http::Response<Vec<u8>> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        assert!(url.starts_with(&app.base_url), "{url}");
        let resp = app
            .client
            .request(parts.method.clone(), &url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} {url}: {e}", parts.method));
        let mut builder = http::Response::builder().status(resp.status());
        for (name, value) in resp.headers() {
            builder = builder.header(name, value);
        }
        let body = resp.bytes().await.expect("response body").to_vec();
        builder.body(body).expect("response")
    }

    /// Parses `resp` with ruma's response type `R`.
    pub fn parse<R: IncomingResponseExt>(
        resp: &http::Response<Vec<u8>>,
    ) -> Result<R, FromHttpResponseError<R::EndpointError>> {
        let mut builder = http::Response::builder().status(resp.status());
        for (name, value) in resp.headers() {
            builder = builder.header(name, value);
        }
        R::try_from_http_response(builder.body(resp.body().as_slice()).expect("response"))
    }

    /// Status and body, for failure messages.
    pub fn describe(resp: &http::Response<Vec<u8>>) -> String {
        format!("{} {}", resp.status(), String::from_utf8_lossy(resp.body()))
    }

    /// `Ok(response)`, or a panic showing what the server sent.
    #[track_caller]
    pub fn ok<R: IncomingResponseExt>(resp: &http::Response<Vec<u8>>) -> R
    where
        R::EndpointError: std::fmt::Debug,
    {
        parse::<R>(resp).unwrap_or_else(|e| panic!("ruma cannot accept {}: {e:?}", describe(resp)))
    }
}

// ---------------------------------------------------------------------------------------------
// Sync

/// `GET /sync` with `since` (none: an initial sync) and a timeout in ms; panics unless 200.
pub async fn sync(app: &TestApp, token: &str, since: Option<&str>, timeout_ms: u64) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    app.get(&path, Some(token)).await.expect_ok().clone()
}

/// The `next_batch` of a sync response; panics when there is none.
pub fn next_batch(response: &Value) -> String {
    response["next_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("no next_batch: {response}"))
        .to_owned()
}

/// A long-poll `/sync` after `since`, running in the background.
pub fn long_poll(
    app: &TestApp,
    token: &str,
    since: &str,
    timeout_ms: u64,
) -> tokio::task::JoinHandle<Value> {
    let client = app.client.clone();
    let url = app.url(&format!(
        "/_matrix/client/v3/sync?timeout={timeout_ms}&since={}",
        enc(since)
    ));
    let token = token.to_owned();
    tokio::spawn(async move {
        client
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("sync")
            .json::<Value>()
            .await
            .expect("json")
    })
}
