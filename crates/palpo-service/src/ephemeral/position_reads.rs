//! Position reads shared by the syncs that ask at once.
//!
//! Every sync pass starts by reading the stream's position and the heads of its sections
//! ([`EphemeralRepo::sync_positions`]). A new event wakes every long-poll of this process at
//! once, and each would run that statement alone; most of its cost is starting it (a subquery
//! per head), not its rows. Here the syncs queue their asks, one of them reads for every ask
//! queued, and the asks queued while it reads go in the next read. A read answers only asks
//! queued before it started, so each sync sees every change committed before it asked, as if
//! it had read alone.

use std::sync::{Arc, Mutex, PoisonError};

use palpo_core::{Error, Result, now_millis};
use palpo_storage::{
    EphemeralRepo,
    model::{PositionAsk, SyncPosition, TokenCheck},
};
use tokio::sync::oneshot;

use crate::internal;

struct QueuedAsk {
    user: String,
    device: Option<String>,
    token: Option<TokenCheck>,
    answer: oneshot::Sender<Result<SyncPosition>>,
}

#[derive(Default)]
pub(crate) struct PositionReads {
    queue: Mutex<Vec<QueuedAsk>>,
    /// Held while a read for the queue runs: the asks queued meanwhile wait for it to end
    /// and go in the next read together.
    reading: Arc<tokio::sync::Mutex<()>>,
}

impl PositionReads {
    /// [`EphemeralRepo::sync_position`] of `user` (`device`, `token`), read with the asks of
    /// the other syncs asking at the same time.
    pub(crate) async fn read(
        &self,
        repo: &Arc<dyn EphemeralRepo>,
        user: &str,
        device: Option<&str>,
        token: Option<&TokenCheck>,
    ) -> Result<SyncPosition> {
        loop {
            let (answer, mut answered) = oneshot::channel();
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(QueuedAsk {
                    user: user.to_owned(),
                    device: device.map(str::to_owned),
                    token: token.cloned(),
                    answer,
                });
            let turn = tokio::select! {
                biased;
                answer = &mut answered => match answer {
                    Ok(answer) => return answer,
                    // The sync reading for it was dropped (its client went away): ask again.
                    Err(_) => continue,
                },
                turn = self.reading.clone().lock_owned() => turn,
            };
            match answered.try_recv() {
                Ok(answer) => return answer,
                Err(oneshot::error::TryRecvError::Closed) => continue,
                // Still queued: no read is running, so none took it.
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            // Let the syncs woken with this one queue their asks first.
            tokio::task::yield_now().await;
            let mut queued =
                std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
            // Syncs gone meanwhile need no answer.
            queued.retain(|ask| !ask.answer.is_closed());
            // A task of its own: should this sync go away (its client hung up), the read
            // still answers the others.
            let repo = repo.clone();
            tokio::spawn(async move {
                read_for(&*repo, queued).await;
                drop(turn);
            });
            match answered.await {
                Ok(answer) => return answer,
                // The read's task ended without answering (it panicked): ask again.
                Err(_) => continue,
            }
        }
    }
}

/// Reads the position for every ask of `queued` and answers each (in a span of its own: it
/// serves several syncs).
#[tracing::instrument(skip_all, fields(asks = queued.len()))]
async fn read_for(repo: &dyn EphemeralRepo, queued: Vec<QueuedAsk>) {
    let asks: Vec<PositionAsk<'_>> = queued
        .iter()
        .map(|ask| PositionAsk {
            user_id: &ask.user,
            device_id: ask.device.as_deref(),
            token: ask.token.as_ref(),
        })
        .collect();
    let answers = repo.sync_positions(now_millis(), &asks).await;
    drop(asks);
    match answers {
        Ok(answers) if answers.len() == queued.len() => {
            for (ask, answer) in queued.into_iter().zip(answers) {
                // A sync that went away no longer listens.
                let _ = ask.answer.send(answer.map_err(internal));
            }
        }
        Ok(answers) => {
            let error = format!(
                "{} answers to {} position asks",
                answers.len(),
                queued.len()
            );
            for ask in queued {
                let _ = ask.answer.send(Err(Error::internal(&error)));
            }
        }
        Err(error) => {
            tracing::error!(%error, "position read failed");
            for ask in queued {
                let _ = ask.answer.send(Err(Error::internal(&error)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::poll;
    use palpo_storage::testing::{backends_under_test, with_storage};

    use super::*;

    async fn answered(
        read: impl Future<Output = Result<SyncPosition>>,
        backend: palpo_storage::Backend,
        what: &str,
    ) -> SyncPosition {
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("{backend:?}: {what}: no answer"))
            .unwrap_or_else(|e| panic!("{backend:?}: {what}: {e}"))
    }

    /// A sync that goes away (its client hung up) while it holds the turn, before its read or
    /// during it, leaves the syncs asking with it answered: no error, no wait without end.
    #[tokio::test]
    async fn a_sync_that_goes_away_leaves_the_others_answered() {
        for backend in backends_under_test() {
            with_storage(backend, |storage| async move {
                let reads = PositionReads::default();
                let repo = storage.ephemeral.clone();
                // Gone before reading: it took the turn and let the others queue.
                let mut gone = Box::pin(reads.read(&repo, "@gone:test", None, None));
                assert!(poll!(&mut gone).is_pending(), "holds the turn");
                let mut other = Box::pin(reads.read(&repo, "@other:test", None, None));
                assert!(poll!(&mut other).is_pending(), "waits for the turn");
                drop(gone);
                let before = answered(other, backend, "gone before its read").await;

                // Gone during its read, which took the other's ask with its own.
                let mut gone = Box::pin(reads.read(&repo, "@gone:test", None, None));
                assert!(poll!(&mut gone).is_pending(), "holds the turn");
                let mut other = Box::pin(reads.read(&repo, "@other:test", None, None));
                assert!(poll!(&mut other).is_pending(), "queued, waits");
                assert!(poll!(&mut gone).is_pending(), "reading for both");
                assert!(
                    reads
                        .queue
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_empty(),
                    "the read took both asks"
                );
                drop(gone);
                let during = answered(other, backend, "gone during its read").await;
                assert_eq!(before.position, during.position, "nothing written between");
            })
            .await;
        }
    }
}
