//! Cross-process wake-ups against a real Redis: the shared test Redis with a fresh namespace
//! per test, and a private `redis-server` where a test kills and restarts it.

use std::time::{Duration, Instant};

use palpo_storage::{
    Wakeup, Wakeups,
    testing::{PrivateRedis, assert_redis_reachable, redis_url, unique_namespace},
};

/// Longest we wait for something that should arrive.
const ARRIVES: Duration = Duration::from_secs(5);
/// How long we listen to conclude that nothing arrives.
const QUIET: Duration = Duration::from_millis(400);

fn wakeups(url: &str, namespace: &str) -> Wakeups {
    Wakeups::new(url, namespace).expect("a valid Redis URL")
}

/// The next wake-up, or a panic naming `what` after `within`.
async fn next(subscription: &mut palpo_storage::Subscription, what: &str) -> Wakeup {
    tokio::time::timeout(ARRIVES, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {ARRIVES:?}"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
}

async fn nothing_arrives(subscription: &mut palpo_storage::Subscription, what: &str) {
    if let Ok(wakeup) = tokio::time::timeout(QUIET, subscription.next()).await {
        panic!("{what}: expected nothing, got {wakeup:?}");
    }
}

#[tokio::test]
async fn delivers_to_the_other_processes_but_not_to_itself() {
    let url = redis_url();
    assert_redis_reachable(&url).await;
    let namespace = unique_namespace();
    let a = wakeups(&url, &namespace);
    let b = wakeups(&url, &namespace);
    let elsewhere = wakeups(&url, &unique_namespace());
    assert!(a.is_enabled());
    assert_eq!(a.channel(), Some(format!("{namespace}:v1:stream").as_str()));

    let mut from_a = a.subscribe();
    let mut from_b = b.subscribe();
    let mut from_elsewhere = elsewhere.subscribe();
    for (subscription, name) in [
        (&mut from_a, "a"),
        (&mut from_b, "b"),
        (&mut from_elsewhere, "elsewhere"),
    ] {
        assert_eq!(next(subscription, name).await, Wakeup::Resync, "{name}");
    }

    let sent = Instant::now();
    a.publish(7);
    assert_eq!(next(&mut from_b, "b hears a").await, Wakeup::Advanced(7));
    println!("published → received: {:?}", sent.elapsed());
    nothing_arrives(&mut from_a, "a does not hear itself").await;
    nothing_arrives(&mut from_elsewhere, "another namespace hears nothing").await;

    // Only newer positions are sent.
    a.publish(5);
    nothing_arrives(&mut from_b, "an older position").await;

    // And a hears b, so its silence above was not a broken subscription.
    b.publish(9);
    assert_eq!(next(&mut from_a, "a hears b").await, Wakeup::Advanced(9));
    nothing_arrives(&mut from_b, "b does not hear itself").await;

    // A burst arrives; the newest position is among what arrives, and last.
    for position in 10..=60 {
        a.publish(position);
    }
    let mut last = 0;
    while last != 60 {
        match next(&mut from_b, "the burst").await {
            Wakeup::Advanced(position) => {
                assert!(position > last, "in order: {position} after {last}");
                last = position;
            }
            Wakeup::Resync => panic!("no reconnect expected"),
        }
    }
}

#[tokio::test]
async fn redis_down_is_no_error_and_the_subscription_comes_back() {
    let mut redis = PrivateRedis::start().await;
    let namespace = unique_namespace();
    let a = wakeups(&redis.url(), &namespace);
    let b = wakeups(&redis.url(), &namespace);
    let mut from_b = b.subscribe();
    assert_eq!(next(&mut from_b, "subscribed").await, Wakeup::Resync);
    a.publish(1);
    assert_eq!(next(&mut from_b, "before").await, Wakeup::Advanced(1));

    redis.kill();
    // Publishing returns at once and never fails; the subscription keeps retrying quietly.
    let started = Instant::now();
    a.publish(2);
    assert!(started.elapsed() < Duration::from_millis(50));
    nothing_arrives(&mut from_b, "Redis is down").await;

    redis.restart().await;
    assert_eq!(
        next(&mut from_b, "reconnected").await,
        Wakeup::Resync,
        "after a reconnect the subscriber is told to re-read the position"
    );
    a.publish(3);
    // Position 2 may still arrive first: the publisher retries it until Redis is back.
    loop {
        match next(&mut from_b, "after the restart").await {
            Wakeup::Advanced(3) => break,
            Wakeup::Advanced(2) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_no_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let wakeups = wakeups(&url, &unique_namespace());
    for position in 1..100 {
        wakeups.publish(position);
    }
    let mut subscription = wakeups.subscribe();
    nothing_arrives(&mut subscription, "no Redis").await;
}

#[tokio::test]
async fn disabled_does_nothing() {
    let wakeups = Wakeups::default();
    assert!(!wakeups.is_enabled());
    assert_eq!(wakeups.channel(), None);
    wakeups.publish(1);
    assert_eq!(wakeups.subscribe().next().await, None);
}
