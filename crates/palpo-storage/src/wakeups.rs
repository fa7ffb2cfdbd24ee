//! Cross-process wake-ups: several Palpo processes on one database tell each other, through
//! Redis pub/sub, that the global stream moved, so a sync long-polling on one process wakes
//! when another process writes.
//!
//! Only the position travels (channel `<namespace>:v1:stream`, message `<origin>:<position>`).
//! Positions commit in order, so a process that hears of position N reads everything up to N
//! from the database. `<origin>` is a random id per [`Wakeups`] (per process), so a process
//! ignores its own messages.
//!
//! Redis is optional and never fails a request:
//! - [`Wakeups::publish`] only records the position; a background task sends the newest one
//!   (coalescing bursts), and on failure logs a rate-limited warning and retries with backoff.
//! - A [`Subscription`] reconnects with backoff when Redis drops, and then yields
//!   [`Wakeup::Resync`]: messages sent while it was away are lost, so the caller should read
//!   the current position from the database.
//! - Without `cache.redis_url`, wake-ups are disabled: publishing does nothing and a
//!   subscription ends at once.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use palpo_core::config::{CacheConfig, redact_url};
use rand::Rng;
use tokio::sync::watch;

use crate::error::{Result, StorageError};

/// Longest one PUBLISH may take, connecting included. Off the request path.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest connecting and subscribing may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A subscribed connection is pinged this often, to notice a connection that died silently.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// First pause after a failure; it doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most one "Redis unavailable" warning per this period (per publisher or subscription).
const WARN_EVERY: Duration = Duration::from_secs(30);
/// The channel schema version.
const CHANNEL_VERSION: &str = "v1";

/// What a [`Subscription`] hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Another process committed stream position `.0`.
    Advanced(i64),
    /// The subscription is (again) listening; what was published before may have been missed,
    /// so read the current position from the database.
    Resync,
}

/// Why a Redis operation failed. Logged, never returned to callers.
#[derive(Debug, thiserror::Error)]
enum WakeupError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection closed")]
    Closed,
}

/// Publishes this process's stream positions and hands out subscriptions to the others'.
/// Cheap to clone; clones share the publisher and the origin id. Disabled by default.
#[derive(Clone, Default)]
pub struct Wakeups {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    channel: Channel,
    /// The newest position to publish; the publisher task sends it. Dropping the sender (the
    /// last `Wakeups` clone) ends that task.
    latest: watch::Sender<i64>,
}

/// Where messages go and who we are.
#[derive(Clone)]
struct Channel {
    client: redis::Client,
    /// `<namespace>:v1:stream`
    name: String,
    /// Random, per `Wakeups`: messages carrying it are our own.
    origin: Arc<str>,
}

impl fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some(inner) => f
                .debug_struct("Wakeups")
                .field("channel", &inner.channel.name)
                .field("origin", &inner.channel.origin)
                .finish(),
            None => f.write_str("Wakeups(disabled)"),
        }
    }
}

impl Wakeups {
    /// Wake-ups on `cache.redis_url` in `cache.namespace`, or disabled when no URL is set.
    /// Does not connect. Must run inside a Tokio runtime when a URL is set (it starts the
    /// publisher task).
    pub fn from_config(cache: &CacheConfig) -> Result<Self> {
        match &cache.redis_url {
            Some(url) if !url.trim().is_empty() => Self::new(url, &cache.namespace),
            _ => Ok(Self::default()),
        }
    }

    /// Wake-ups on the Redis at `url`, channel `<namespace>:v1:stream`. Does not connect.
    pub fn new(url: &str, namespace: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            StorageError::Connect(format!("cache.redis_url {}: {e}", redact_url(url)))
        })?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StorageError::Connect("Redis wake-ups must be started inside a Tokio runtime".into())
        })?;
        let origin: String = {
            let mut rng = rand::thread_rng();
            format!("{:016x}{:016x}", rng.r#gen::<u64>(), rng.r#gen::<u64>())
        };
        let channel = Channel {
            client,
            name: format!("{namespace}:{CHANNEL_VERSION}:stream"),
            origin: origin.into(),
        };
        let latest = watch::Sender::new(i64::MIN);
        runtime.spawn(publisher(channel.clone(), latest.subscribe()));
        Ok(Wakeups {
            inner: Some(Arc::new(Inner { channel, latest })),
        })
    }

    /// Whether Redis carries wake-ups (`cache.redis_url` is set).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The pub/sub channel, when enabled.
    pub fn channel(&self) -> Option<&str> {
        self.inner.as_ref().map(|inner| inner.channel.name.as_str())
    }

    /// Tells the other processes that the stream reached `position`. Returns at once and never
    /// fails: the newest position is sent in the background, and a Redis that is down is
    /// logged (rate-limited) and retried.
    pub fn publish(&self, position: i64) {
        if let Some(inner) = &self.inner {
            inner.latest.send_if_modified(|latest| {
                let newer = position > *latest;
                if newer {
                    *latest = position;
                }
                newer
            });
        }
    }

    /// A new subscription to the positions the other processes publish. It connects on its
    /// first [`Subscription::next`].
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            state: self.inner.as_ref().map(|inner| SubscriptionState {
                channel: inner.channel.clone(),
                live: None,
                retry_at: None,
                backoff: Backoff::default(),
                health: Health::new("subscribe"),
            }),
        }
    }
}

/// Sends the newest position each time it changes, until the last `Wakeups` clone is dropped.
async fn publisher(channel: Channel, mut latest: watch::Receiver<i64>) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut health = Health::new("publish");
    let mut backoff = Backoff::default();
    while latest.changed().await.is_ok() {
        loop {
            let position = *latest.borrow_and_update();
            match publish_once(&channel, &mut conn, position).await {
                Ok(()) => {
                    health.ok();
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    health.failed(&e);
                    // Keep the newest position and try again: subscribers that lost their
                    // connection re-sync anyway, this covers a failure of ours alone.
                    tokio::time::sleep(backoff.next_delay()).await;
                    if latest.has_changed().is_err() {
                        return;
                    }
                }
            }
        }
    }
}

async fn publish_once(
    channel: &Channel,
    conn: &mut Option<redis::aio::MultiplexedConnection>,
    position: i64,
) -> std::result::Result<(), WakeupError> {
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(&channel.name)
        .arg(format!("{}:{position}", channel.origin));
    // A kept connection may have died since (Redis restarted): then once more on a fresh one.
    if let Some(kept) = conn.as_mut() {
        let sent = tokio::time::timeout(PUBLISH_TIMEOUT, cmd.query_async::<i64>(kept)).await;
        if let Ok(Ok(_)) = sent {
            return Ok(());
        }
        *conn = None;
    }
    let attempt = async {
        let mut fresh = channel.client.get_multiplexed_async_connection().await?;
        cmd.query_async::<i64>(&mut fresh).await?;
        Ok::<_, WakeupError>(fresh)
    };
    let fresh = tokio::time::timeout(PUBLISH_TIMEOUT, attempt)
        .await
        .map_err(|_| WakeupError::Timeout(PUBLISH_TIMEOUT))??;
    *conn = Some(fresh);
    Ok(())
}

/// The positions other processes publish. See [`Subscription::next`].
pub struct Subscription {
    /// `None`: wake-ups are disabled.
    state: Option<SubscriptionState>,
}

struct SubscriptionState {
    channel: Channel,
    live: Option<Live>,
    /// After a failure, no reconnect before this.
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
    health: Health,
}

/// A subscribed connection.
struct Live {
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
    ping_at: tokio::time::Instant,
}

impl Subscription {
    /// Whether this subscription will ever yield anything.
    pub fn is_enabled(&self) -> bool {
        self.state.is_some()
    }

    /// The next wake-up: [`Wakeup::Resync`] once subscribed (first and after every reconnect),
    /// then [`Wakeup::Advanced`] for each position another process publishes. While Redis is
    /// down it keeps retrying (with backoff, logging rate-limited warnings) and does not
    /// return. `None` only when wake-ups are disabled.
    pub async fn next(&mut self) -> Option<Wakeup> {
        let state = self.state.as_mut()?;
        loop {
            let Some(live) = state.live.as_mut() else {
                if let Some(at) = state.retry_at {
                    tokio::time::sleep_until(at).await;
                    state.retry_at = None;
                }
                match connect(&state.channel).await {
                    Ok(live) => {
                        state.live = Some(live);
                        state.backoff.reset();
                        state.health.ok();
                        return Some(Wakeup::Resync);
                    }
                    Err(e) => state.lost(&e),
                }
                continue;
            };
            let lost = tokio::select! {
                message = live.stream.next() => match message {
                    Some(message) => match state.channel.parse(&message) {
                        Some(position) => return Some(Wakeup::Advanced(position)),
                        None => None,
                    },
                    None => Some(WakeupError::Closed),
                },
                () = tokio::time::sleep_until(live.ping_at) => {
                    let pong =
                        tokio::time::timeout(CONNECT_TIMEOUT, live.sink.ping::<redis::Value>())
                            .await;
                    match pong {
                        Ok(Ok(_)) => {
                            live.ping_at = tokio::time::Instant::now() + PING_EVERY;
                            None
                        }
                        Ok(Err(e)) => Some(WakeupError::Redis(e)),
                        Err(_) => Some(WakeupError::Timeout(CONNECT_TIMEOUT)),
                    }
                }
            };
            if let Some(e) = lost {
                state.live = None;
                state.lost(&e);
            }
        }
    }
}

impl SubscriptionState {
    fn lost(&mut self, error: &WakeupError) {
        self.health.failed(error);
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff.next_delay());
    }
}

async fn connect(channel: &Channel) -> std::result::Result<Live, WakeupError> {
    let attempt = async {
        let mut pubsub = channel.client.get_async_pubsub().await?;
        pubsub.subscribe(&channel.name).await?;
        Ok::<_, WakeupError>(pubsub)
    };
    let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| WakeupError::Timeout(CONNECT_TIMEOUT))??;
    let (sink, stream) = pubsub.split();
    Ok(Live {
        sink,
        stream,
        ping_at: tokio::time::Instant::now() + PING_EVERY,
    })
}

impl Channel {
    /// The position in another process's message; `None` for our own or a malformed one.
    fn parse(&self, message: &redis::Msg) -> Option<i64> {
        let payload = message.get_payload::<String>().ok();
        let parsed = payload.as_deref().and_then(|payload| {
            let (origin, position) = payload.split_once(':')?;
            Some((origin, position.parse::<i64>().ok()?))
        });
        match parsed {
            Some((origin, _)) if origin == &*self.origin => None,
            Some((_, position)) => Some(position),
            None => {
                tracing::debug!(channel = %self.name, ?payload, "malformed wake-up message");
                None
            }
        }
    }
}

/// Doubling pauses between retries, from [`MIN_BACKOFF`] to [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = self
            .current
            .map_or(MIN_BACKOFF, |d| (d * 2).min(MAX_BACKOFF));
        self.current = Some(delay);
        delay
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

/// Rate-limited logging of failures, and one line when Redis works again.
struct Health {
    what: &'static str,
    failing: bool,
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl Health {
    fn new(what: &'static str) -> Self {
        Health {
            what,
            failing: false,
            last_warning: None,
            suppressed: 0,
        }
    }

    fn failed(&mut self, error: &WakeupError) {
        self.failing = true;
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            tracing::warn!(
                %error,
                suppressed = self.suppressed,
                what = self.what,
                "Redis unavailable for cross-process wake-ups; syncs on other processes wake \
                 at their timeout until it is back"
            );
            self.last_warning = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    fn ok(&mut self) {
        if self.failing {
            self.failing = false;
            tracing::info!(what = self.what, "Redis wake-ups working again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_delay(), MIN_BACKOFF);
        assert_eq!(backoff.next_delay(), MIN_BACKOFF * 2);
        for _ in 0..20 {
            backoff.next_delay();
        }
        assert_eq!(backoff.next_delay(), MAX_BACKOFF);
        backoff.reset();
        assert_eq!(backoff.next_delay(), MIN_BACKOFF);
    }

    #[tokio::test]
    async fn disabled_without_a_url() {
        let config = CacheConfig {
            redis_url: None,
            namespace: "palpo".into(),
            ttl_secs: 60,
        };
        let wakeups = Wakeups::from_config(&config).expect("no URL is fine");
        assert!(!wakeups.is_enabled());
        wakeups.publish(1);
        let mut subscription = wakeups.subscribe();
        assert!(!subscription.is_enabled());
        assert_eq!(subscription.next().await, None);
    }

    #[test]
    fn a_bad_url_is_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let error = Wakeups::new("http://nope", "palpo").expect_err("not a Redis URL");
        assert!(error.to_string().contains("cache.redis_url"), "{error}");
    }
}
