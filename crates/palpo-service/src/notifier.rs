//! Wakes long-polling syncs.
//!
//! Every persisted change (events, and later account data, receipts...) takes a position in
//! the one global stream; ephemeral changes that are never persisted (typing) bump an
//! in-memory serial instead. A sync waits until either moves past what it has already sent.
//!
//! Several processes on one database: local stream advances are also handed to a publisher
//! ([`Notifier::with_publisher`]; Redis pub/sub in practice, see `palpo_storage::wakeups`), and
//! [`Notifier::relay_from`] feeds the positions the other processes publish into
//! [`Notifier::remote_stream_advanced`]. Only the position travels: positions commit in order,
//! so a woken sync reads everything up to it from the database.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use palpo_storage::{RoomRepo, Subscription, Wakeup};
use tokio::{sync::watch, task::AbortHandle};

/// Tells the other processes that the stream reached a position. Must return at once.
pub type Publisher = Arc<dyn Fn(i64) + Send + Sync>;

pub struct Notifier {
    stream: watch::Sender<i64>,
    ephemeral: watch::Sender<u64>,
    publisher: Option<Publisher>,
    /// The task feeding other processes' positions in; stopped when the notifier is dropped.
    relay: Mutex<Option<AbortHandle>>,
    /// No other process writes to the stream (SQLite): every advance is this process's own
    /// and reaches the notifier, which then knows for sure when nothing moved.
    sole_writer: bool,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            stream: watch::Sender::new(0),
            ephemeral: watch::Sender::new(0),
            publisher: None,
            relay: Mutex::new(None),
            sole_writer: false,
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        let relay = self
            .relay
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(relay) = relay {
            relay.abort();
        }
    }
}

impl Notifier {
    /// A notifier that also hands every local stream advance to `publish`.
    pub fn with_publisher(publish: impl Fn(i64) + Send + Sync + 'static) -> Self {
        let mut notifier = Notifier::default();
        notifier.publisher = Some(Arc::new(publish));
        notifier
    }

    /// Declares that no other process writes to the stream (see
    /// [`Notifier::unchanged_since`]).
    pub fn sole_writer(mut self) -> Self {
        self.sole_writer = true;
        self
    }

    /// Whether nothing was written to the stream after `stream` and nothing ephemeral changed
    /// after `ephemeral`, for certain: only when this process is the sole writer (another
    /// process's writes reach the notifier late, or not at all without Redis) and its latest
    /// advance is `stream`. `false` means "perhaps": read the database.
    pub fn unchanged_since(&self, stream: i64, ephemeral: u64) -> bool {
        self.sole_writer && *self.stream.borrow() == stream && self.ephemeral_serial() == ephemeral
    }

    /// Records that this process committed stream position `position`: wakes the local syncs
    /// (when newer) and tells the other processes.
    pub fn stream_advanced(&self, position: i64) {
        self.advance(position);
        if let Some(publish) = &self.publisher {
            publish(position);
        }
    }

    /// Records that another process committed stream position `position`: wakes the local
    /// syncs (when newer), and is not published again.
    pub fn remote_stream_advanced(&self, position: i64) {
        self.advance(position);
    }

    /// Feeds the positions of `subscription` into [`Notifier::remote_stream_advanced`] until
    /// this notifier is dropped. After each (re)subscription the current position is read
    /// from `rooms`, since positions published meanwhile were missed. Does nothing when the
    /// subscription is disabled or there is no Tokio runtime.
    pub fn relay_from(self: &Arc<Self>, mut subscription: Subscription, rooms: Arc<dyn RoomRepo>) {
        if !subscription.is_enabled() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no Tokio runtime: other processes' writes will not wake syncs");
            return;
        };
        let notifier = Arc::downgrade(self);
        let relay = runtime.spawn(async move {
            while let Some(wakeup) = subscription.next().await {
                let position = match wakeup {
                    Wakeup::Advanced(position) => position,
                    Wakeup::Resync => match rooms.max_stream_ordering().await {
                        Ok(position) => position,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the stream position");
                            continue;
                        }
                    },
                };
                let Some(notifier) = notifier.upgrade() else {
                    return;
                };
                notifier.remote_stream_advanced(position);
            }
        });
        let previous = self
            .relay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(relay.abort_handle());
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    fn advance(&self, position: i64) {
        self.stream.send_if_modified(|latest| {
            let newer = position > *latest;
            if newer {
                *latest = position;
            }
            newer
        });
    }

    /// Records an ephemeral change; returns the new serial.
    pub fn ephemeral_changed(&self) -> u64 {
        let mut serial = 0;
        self.ephemeral.send_modify(|value| {
            *value += 1;
            serial = *value;
        });
        serial
    }

    pub fn ephemeral_serial(&self) -> u64 {
        *self.ephemeral.borrow()
    }

    /// Waits until the stream passes `stream_after` or the ephemeral serial passes
    /// `ephemeral_after`, or `timeout` ends. Returns whether something changed.
    pub async fn wait(&self, stream_after: i64, ephemeral_after: u64, timeout: Duration) -> bool {
        let mut stream = self.stream.subscribe();
        let mut ephemeral = self.ephemeral.subscribe();
        let changed = async {
            tokio::select! {
                r = stream.wait_for(|p| *p > stream_after) => r.is_ok(),
                r = ephemeral.wait_for(|s| *s > ephemeral_after) => r.is_ok(),
            }
        };
        tokio::time::timeout(timeout, changed)
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn waits_until_the_stream_moves() {
        let notifier = Arc::new(Notifier::default());
        assert!(
            !notifier.wait(0, 0, Duration::from_millis(20)).await,
            "nothing happened"
        );
        let waiter = {
            let notifier = notifier.clone();
            tokio::spawn(async move { notifier.wait(5, 0, Duration::from_secs(10)).await })
        };
        notifier.stream_advanced(5);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "position 5 was already seen");
        notifier.stream_advanced(6);
        assert!(waiter.await.expect("task"));
        assert!(
            !notifier.unchanged_since(6, 0),
            "another process may have written"
        );
        let serial = notifier.ephemeral_serial();
        notifier.ephemeral_changed();
        assert!(notifier.wait(6, serial, Duration::from_secs(1)).await);
    }

    #[test]
    fn a_sole_writer_knows_when_nothing_moved() {
        let notifier = Notifier::default().sole_writer();
        notifier.stream_advanced(4);
        assert!(notifier.unchanged_since(4, 0));
        assert!(!notifier.unchanged_since(3, 0), "moved past 3");
        notifier.ephemeral_changed();
        assert!(!notifier.unchanged_since(4, 0), "typing changed");
        assert!(notifier.unchanged_since(4, 1));
        notifier.stream_advanced(5);
        assert!(!notifier.unchanged_since(4, 1));
    }

    #[tokio::test]
    async fn publishes_local_advances_only() {
        let published = Arc::new(Mutex::new(Vec::new()));
        let notifier = {
            let published = published.clone();
            Arc::new(Notifier::with_publisher(move |position| {
                published.lock().expect("lock").push(position);
            }))
        };
        notifier.stream_advanced(3);
        notifier.remote_stream_advanced(7);
        assert!(
            notifier.wait(6, 0, Duration::from_millis(20)).await,
            "a remote position wakes syncs"
        );
        // Published even when another process got further meanwhile.
        notifier.stream_advanced(5);
        assert_eq!(*published.lock().expect("lock"), [3, 5]);
        assert!(!notifier.wait(7, 0, Duration::from_millis(20)).await);
    }
}
