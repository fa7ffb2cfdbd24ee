//! A minimal Matrix Client-Server API client: just what the benchmark needs.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// `M_ROOM_IN_USE` answers to createRoom that were retried.
pub static ROOM_ID_COLLISIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One logged-in user.
#[derive(Debug, Clone)]
pub struct User {
    pub user_id: String,
    pub token: String,
}

/// A homeserver at a base URL such as `http://127.0.0.1:8008`.
#[derive(Clone)]
pub struct Homeserver {
    http: reqwest::Client,
    base: String,
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refuses anything but a loopback host: the benchmark only drives local servers.
pub fn check_loopback(url: &str) -> Result<()> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    let loopback = host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("{url}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed");
    }
    Ok(())
}

impl Homeserver {
    pub fn new(base: &str, connections: usize) -> Result<Self> {
        check_loopback(base)?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections.max(4))
            .timeout(Duration::from_secs(120))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Sends one request and returns the status and the JSON body (Null when not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let (status, bytes) = self.call_raw(method, path, token, body).await?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// Like [`call`](Self::call), the body left unparsed.
    async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>)> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    /// Like [`call`](Self::call) but any non-2xx status is an error.
    pub async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value> {
        let (status, value) = self.call(method, path, token, body).await?;
        if !(200..300).contains(&status) {
            return Err(anyhow!("{path}: HTTP {status}: {value}"));
        }
        Ok(value)
    }

    /// `GET /_matrix/client/versions` answered 200.
    pub async fn versions_ok(&self) -> bool {
        matches!(
            self.call(reqwest::Method::GET, "/_matrix/client/versions", None, None)
                .await,
            Ok((200, _))
        )
    }

    /// Registers `username` with user-interactive auth (`m.login.dummy`, two rounds).
    pub async fn register(&self, username: &str, password: &str) -> Result<User> {
        let path = "/_matrix/client/v3/register";
        let mut body = json!({
            "username": username,
            "password": password,
            "initial_device_display_name": "palpo-bench",
        });
        let (status, value) = self
            .call(reqwest::Method::POST, path, None, Some(&body))
            .await?;
        let value = match status {
            200 => value,
            401 => {
                let session = value["session"]
                    .as_str()
                    .context("401 without a UIA session")?;
                body["auth"] = json!({ "type": "m.login.dummy", "session": session });
                self.ok(reqwest::Method::POST, path, None, Some(&body))
                    .await?
            }
            _ => bail!("register {username}: HTTP {status}: {value}"),
        };
        Ok(User {
            user_id: value["user_id"].as_str().context("no user_id")?.to_owned(),
            token: value["access_token"]
                .as_str()
                .context("no access_token")?
                .to_owned(),
        })
    }

    /// `POST /createRoom`; retries (a bounded number of times) on `M_ROOM_IN_USE`, which a
    /// server deriving room ids from the create event may answer to two creates by one user in
    /// the same millisecond; [`ROOM_ID_COLLISIONS`] counts those retries.
    pub async fn create_room(&self, user: &User, name: &str) -> Result<String> {
        let body = json!({ "preset": "public_chat", "name": name });
        let path = "/_matrix/client/v3/createRoom";
        for _ in 0..5 {
            let (status, v) = self
                .call(reqwest::Method::POST, path, Some(&user.token), Some(&body))
                .await?;
            if status == 200 {
                return Ok(v["room_id"]
                    .as_str()
                    .context("createRoom without room_id")?
                    .to_owned());
            }
            if v["errcode"] != "M_ROOM_IN_USE" {
                bail!("{path}: HTTP {status}: {v}");
            }
            ROOM_ID_COLLISIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        bail!("{path}: M_ROOM_IN_USE five times in a row")
    }

    pub async fn join(&self, user: &User, room_id: &str) -> Result<()> {
        let path = format!("/_matrix/client/v3/join/{}", encode(room_id));
        self.ok(
            reqwest::Method::POST,
            &path,
            Some(&user.token),
            Some(&json!({})),
        )
        .await?;
        Ok(())
    }

    /// `PUT /rooms/{room}/send/m.room.message/{txn}`; returns the status (error on transport).
    pub async fn send(
        &self,
        user: &User,
        room_id: &str,
        txn: &str,
        content: &Value,
    ) -> Result<(u16, Value)> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            encode(room_id),
            encode(txn)
        );
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&user.token),
            Some(content),
        )
        .await
    }

    /// `GET /sync` with optional `since`, `timeout` (ms) and inline `filter`.
    pub async fn sync(
        &self,
        user: &User,
        since: Option<&str>,
        timeout_ms: u64,
        filter: Option<&str>,
    ) -> Result<Value> {
        let path = sync_path(since, timeout_ms, filter);
        self.ok(reqwest::Method::GET, &path, Some(&user.token), None)
            .await
    }

    /// As [`sync`](Self::sync), the answer parsed into only what a load listener looks at
    /// ([`ListenerSync`]): parsing every answer into a `Value` was a sixth of the load
    /// generator's CPU, which runs on the server's machine.
    pub async fn listener_sync(
        &self,
        user: &User,
        since: &str,
        timeout_ms: u64,
        filter: &str,
    ) -> Result<ListenerSync> {
        let path = sync_path(Some(since), timeout_ms, Some(filter));
        let (status, bytes) = self
            .call_raw(reqwest::Method::GET, &path, Some(&user.token), None)
            .await?;
        if !(200..300).contains(&status) {
            return Err(anyhow!(
                "{path}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

fn sync_path(since: Option<&str>, timeout_ms: u64, filter: Option<&str>) -> String {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(since) = since {
        path.push_str(&format!("&since={}", encode(since)));
    }
    if let Some(filter) = filter {
        path.push_str(&format!("&filter={}", encode(filter)));
    }
    path
}

/// What a load listener reads of a sync answer: the token, and of each timeline event its
/// sender and the benchmark's marks in its content. The rest is skipped unparsed.
#[derive(Debug, serde::Deserialize)]
pub struct ListenerSync {
    pub next_batch: String,
    #[serde(default)]
    rooms: ListenerRooms,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ListenerRooms {
    #[serde(default)]
    join: std::collections::HashMap<String, ListenerRoom>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ListenerRoom {
    #[serde(default)]
    timeline: ListenerTimeline,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ListenerTimeline {
    #[serde(default)]
    events: Vec<ListenerEvent>,
}

/// A timeline event as a load listener sees it.
#[derive(Debug, serde::Deserialize)]
pub struct ListenerEvent {
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub content: BenchMarks,
}

/// The marks the load phase puts in each message it sends; kept as JSON values so that a
/// field of another type (someone else's event) is no mark rather than an unreadable answer.
#[derive(Debug, Default, serde::Deserialize)]
pub struct BenchMarks {
    #[serde(default)]
    bench_run: Option<Value>,
    #[serde(default)]
    bench_t_us: Option<Value>,
}

impl BenchMarks {
    pub fn run(&self) -> Option<&str> {
        self.bench_run.as_ref().and_then(Value::as_str)
    }

    /// When the message was sent, in µs since the load phase began.
    pub fn sent_us(&self) -> Option<u64> {
        self.bench_t_us.as_ref().and_then(Value::as_u64)
    }
}

impl ListenerSync {
    /// The timeline events of every joined room.
    pub fn timeline_events(&self) -> impl Iterator<Item = &ListenerEvent> {
        self.rooms
            .join
            .values()
            .flat_map(|room| room.timeline.events.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_room_ids_and_checks_loopback() {
        assert_eq!(encode("!a:b.c"), "%21a%3Ab.c");
        assert!(check_loopback("http://127.0.0.1:8008").is_ok());
        assert!(check_loopback("http://localhost:8008/").is_ok());
        assert!(check_loopback("http://[::1]:8008").is_ok());
        assert!(check_loopback("postgres://postgres@127.0.0.1:5432/x").is_ok());
        assert!(check_loopback("http://example.org").is_err());
        assert!(check_loopback("http://10.0.0.1:8008").is_err());
    }

    #[test]
    fn a_listener_reads_the_marks_of_every_joined_rooms_timeline() {
        let answer = json!({
            "next_batch": "s9_1",
            "account_data": {"events": []},
            "rooms": {
                "join": {
                    "!a:x": {"timeline": {"events": [
                        {"type": "m.room.message", "sender": "@s:x",
                         "content": {"body": "hi", "bench_run": "r1", "bench_t_us": 42}},
                        {"type": "m.room.member", "sender": "@s:x", "state_key": "@s:x",
                         "content": {"membership": "join"}}
                    ], "limited": false}, "state": {"events": []}},
                    "!b:x": {"ephemeral": {"events": []}}
                },
                "leave": {}
            }
        });
        let read: ListenerSync = serde_json::from_value(answer).expect("parses");
        assert_eq!(read.next_batch, "s9_1");
        let events: Vec<&ListenerEvent> = read.timeline_events().collect();
        assert_eq!(events.len(), 2);
        let marked: Vec<(Option<&str>, Option<u64>)> = events
            .iter()
            .filter(|e| e.content.run().is_some())
            .map(|e| (e.sender.as_deref(), e.content.sent_us()))
            .collect();
        assert_eq!(marked, [(Some("@s:x"), Some(42))]);
        // Marks of another type are no marks, and the answer still reads.
        let odd: ListenerSync = serde_json::from_value(json!({"next_batch": "s1",
        "rooms": {"join": {"!a:x": {"timeline": {"events": [
            {"sender": "@o:x", "content": {"bench_run": 7, "bench_t_us": "soon"}}
        ]}}}}}))
        .expect("parses");
        let odd_marks: Vec<_> = odd
            .timeline_events()
            .map(|e| (e.content.run(), e.content.sent_us()))
            .collect();
        assert_eq!(odd_marks, [(None, None)]);
        let quiet: ListenerSync =
            serde_json::from_value(json!({"next_batch": "s10_1"})).expect("parses");
        assert_eq!(quiet.timeline_events().count(), 0);
    }
}
