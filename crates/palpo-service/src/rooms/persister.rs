//! Group commit: the local events that concurrent sends built are written several to a
//! transaction, so that they share its commit (one log flush) and take the global stream
//! counter, which every writer of every room waits for, once between them.
//!
//! A message's send frees its room once the event is queued (the next one is built on it
//! while it waits for the commit), so a batch holds as many of a busy room's messages as
//! arrived during the previous commit. A state event's send holds its room until the commit:
//! the next event needs the state group it creates.

use std::sync::{Arc, OnceLock};

use palpo_storage::{
    Backend, LockTurn, RoomRepo, Storage, StorageError,
    model::{NewEvent, PersistedEvent},
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::notifier::Notifier;

/// Most transactions the persister has open at once (see [`Persister::writers`]).
pub(super) const MAX_WRITERS: usize = 2;

/// Most events one transaction writes.
const MAX_BATCH: usize = 64;

type Outcome = Result<PersistedEvent, StorageError>;

struct Job {
    event: NewEvent,
    reply: oneshot::Sender<Outcome>,
}

pub(super) struct Persister {
    rooms: Arc<dyn RoomRepo>,
    /// Told of each batch's newest position once it is committed, by the writer itself: the
    /// syncs must wake even when the sends' requests are gone (their clients hung up).
    notifier: Arc<Notifier>,
    /// Batches written at once: SQLite has one writer connection, so a second batch would
    /// only wait for it (and leave the first one smaller); on PostgreSQL and MySQL a second
    /// batch does its writes while the first waits for its commit.
    writers: usize,
    /// The queue, with its task started on first use (inside the runtime that serves).
    queue: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl Persister {
    pub(super) fn new(storage: &Storage, notifier: Arc<Notifier>) -> Self {
        let writers = match storage.db().backend() {
            Backend::Sqlite => 1,
            Backend::Postgres | Backend::MySql => MAX_WRITERS,
        };
        Persister {
            rooms: storage.rooms.clone(),
            notifier,
            writers,
            queue: OnceLock::new(),
        }
    }

    /// Queues `event` to be persisted with whatever other events are waiting; the returned
    /// future resolves once it is committed (and the notifier told) or failed. A conflict
    /// (the room moved on, the transaction id was used) is this event's alone. Events are
    /// written in the order they were queued.
    pub(super) fn submit(&self, event: NewEvent) -> impl Future<Output = Outcome> + use<> {
        let (reply, answer) = oneshot::channel();
        let queued = self.queue().send(Job { event, reply });
        async move {
            queued.map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        }
    }

    fn queue(&self) -> &mpsc::UnboundedSender<Job> {
        self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(write_batches(
                self.rooms.clone(),
                self.notifier.clone(),
                receiver,
                self.writers,
            ));
            sender
        })
    }
}

fn stopped() -> StorageError {
    StorageError::Corrupt("the event writer stopped".into())
}

/// Takes what is queued (up to [`MAX_BATCH`]) whenever a writer is free; ends when the
/// service (the queue's sender) is gone.
async fn write_batches(
    rooms: Arc<dyn RoomRepo>,
    notifier: Arc<Notifier>,
    mut queue: mpsc::UnboundedReceiver<Job>,
    writers: usize,
) {
    let free_writers = Arc::new(Semaphore::new(writers));
    // Batches lock their rooms in the order they were taken: a batch's events may be built
    // on the one's before it.
    let mut turn = LockTurn::default();
    loop {
        let Ok(writer) = free_writers.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = Vec::new();
        if queue.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            return;
        }
        let next = turn.then();
        let this_turn = std::mem::replace(&mut turn, next);
        let (rooms, notifier) = (rooms.clone(), notifier.clone());
        tokio::spawn(async move {
            write_batch(&*rooms, &notifier, jobs, this_turn).await;
            drop(writer);
        });
    }
}

#[tracing::instrument(skip_all, fields(events = jobs.len()))]
async fn write_batch(rooms: &dyn RoomRepo, notifier: &Notifier, jobs: Vec<Job>, turn: LockTurn) {
    let (events, replies): (Vec<NewEvent>, Vec<_>) =
        jobs.into_iter().map(|job| (job.event, job.reply)).unzip();
    match rooms.persist_events_in_turn(&events, turn).await {
        Ok(outcomes) => {
            let written = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
            if let Some(newest) = outcomes
                .iter()
                .filter_map(|outcome| outcome.as_ref().ok())
                .map(|persisted| persisted.stream_ordering)
                .max()
            {
                notifier.stream_advanced(newest);
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // The sender may have gone (its request was dropped); the event stays.
                let _ = reply.send(outcome);
            }
            // Answered first: the senders of this batch need not wait for it.
            rooms.after_batch(written);
        }
        Err(error) if events.len() == 1 => {
            let _ = replies
                .into_iter()
                .next()
                .map(|reply| reply.send(Err(error)));
        }
        Err(error) => {
            // One event can fail the whole transaction (a duplicate event id, say): write
            // each on its own so that the others do not fail with it.
            tracing::debug!(%error, "batch failed; writing its events one by one");
            for (event, reply) in events.into_iter().zip(replies) {
                let outcome = rooms
                    .persist_events(std::slice::from_ref(&event))
                    .await
                    .and_then(|mut outcomes| outcomes.pop().unwrap_or_else(|| Err(stopped())));
                if let Ok(persisted) = &outcome {
                    notifier.stream_advanced(persisted.stream_ordering);
                }
                let _ = reply.send(outcome);
            }
        }
    }
}
