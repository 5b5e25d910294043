//! `WatchLeases`: the stored lease events after a revision, then the live
//! ones, as one stream.
//!
//! Invariants: the live feed is taken before the stored events are read,
//! at a revision `R` it reports atomically; stored events through `R` are
//! replayed, and the live feed holds exactly those after `R`, so the
//! stream has every revision once, in order. A watcher that falls behind
//! the live feed is ended with the revision to resume from.

use std::{collections::VecDeque, pin::Pin};

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    error::ServiceError,
    lease_events::{LeaseEvent, LiveLeaseEvents, NextLeaseEvent},
    store::Store,
};

/// Stored events read at once while replaying.
const REPLAY_CHUNK: usize = 1_000;

pub(super) type LeaseEvents =
    Pin<Box<dyn Stream<Item = Result<crate::proto::LeaseEvent, Status>> + Send>>;

/// Which events a watcher asked for.
pub(super) struct Interest {
    /// 0: only changes from now on.
    pub since_revision: u64,
    /// Empty: every holder's.
    pub holder: String,
}

impl Interest {
    fn wants(&self, event: &LeaseEvent) -> bool {
        self.holder.is_empty() || event.lease.holder == self.holder
    }
}

struct Watch {
    store: Store,
    interest: Interest,
    /// The last revision passed on (or skipped for another holder).
    sent: u64,
    /// Replay runs through this revision, where the live feed starts.
    replay_through: u64,
    pending: VecDeque<LeaseEvent>,
    live: LiveLeaseEvents,
    shutdown: CancellationToken,
    ended: bool,
}

/// Starts a watch, refusing a `since_revision` the history no longer holds
/// or has not reached.
pub(super) async fn watch(
    store: Store,
    interest: Interest,
    shutdown: CancellationToken,
) -> Result<LeaseEvents, ServiceError> {
    let (live_from, live) = store.lease_feed().follow();
    let since = interest.since_revision;
    if since != 0 {
        if since > live_from {
            return Err(ServiceError::RevisionAhead {
                since,
                latest: live_from,
            });
        }
        let (pruned_through, _) = store.lease_event_history().await?;
        if since < pruned_through {
            return Err(ServiceError::LeaseHistoryPruned {
                since,
                pruned_through,
            });
        }
    }
    let watch = Watch {
        store,
        sent: if since == 0 { live_from } else { since },
        replay_through: live_from,
        interest,
        pending: VecDeque::new(),
        live,
        shutdown,
        ended: false,
    };
    Ok(Box::pin(futures::stream::unfold(
        watch,
        |mut watch| async move {
            let next = watch.next().await?;
            Some((next, watch))
        },
    )))
}

impl Watch {
    /// The next event to send, an error that ends the stream, or `None`
    /// once it has ended.
    async fn next(&mut self) -> Option<Result<crate::proto::LeaseEvent, Status>> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.sent = event.revision;
                if self.interest.wants(&event) {
                    return Some(Ok(event.to_proto()));
                }
                continue;
            }
            if self.sent < self.replay_through {
                let replayed = self
                    .store
                    .replay_lease_events(self.sent, self.replay_through, REPLAY_CHUNK)
                    .await;
                match replayed {
                    Ok(events) if events.is_empty() => self.sent = self.replay_through,
                    Ok(events) => self.pending.extend(events),
                    Err(error) => return self.end(ServiceError::from(error)),
                }
                continue;
            }
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return self.end(ServiceError::ShuttingDown),
                next = self.live.next() => next,
            };
            match next {
                NextLeaseEvent::Event(event) => {
                    if event.revision > self.sent {
                        self.pending.push_back(LeaseEvent::clone(&event));
                    }
                }
                NextLeaseEvent::Lagged => {
                    let resume_from = self.sent;
                    return self.end(ServiceError::WatcherBehind { resume_from });
                }
                NextLeaseEvent::Closed => return self.end(ServiceError::ShuttingDown),
            }
        }
    }

    fn end(&mut self, error: ServiceError) -> Option<Result<crate::proto::LeaseEvent, Status>> {
        self.ended = true;
        Some(Err(error.into()))
    }
}
