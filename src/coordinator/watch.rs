//! One watch of the fleet's events, as `WatchNodes` (and the dashboard's
//! `/events`) serve it: a snapshot or a replay from a revision, then live
//! events, with bookmarks while nothing happens.
//!
//! Invariants:
//! - A watch subscribes to the live feed before it reads the history, and
//!   replays only up to the revision it subscribed at; its [`Cursor`] sends
//!   each revision once and in order, and a hole ends the watch with the
//!   revision to resume from rather than being skipped.
//! - A watch never slows the coordinator: the live feed is bounded, and a
//!   watch that falls behind ends with [`ServiceError::WatcherBehind`].
//! - A revision the history no longer holds is refused
//!   ([`ServiceError::HistoryPruned`], OUT_OF_RANGE), as is one the
//!   database never issued ([`ServiceError::RevisionAhead`]).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::{
    sync::mpsc,
    time::{Interval, MissedTickBehavior, interval_at},
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    error::ServiceError,
    events::{Admit, Cursor, EventHub, LiveEvents, Next, NodeEvent},
    proto,
    store::Store,
};

/// Stored events read per query while replaying.
const REPLAY_PAGE: usize = 512;
/// How long the status that ends a watch may wait for room in its stream.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Where watches read events from: the live hub and the stored history.
#[derive(Clone)]
pub struct EventSource {
    hub: Arc<EventHub>,
    store: Store,
    bookmark_every: Duration,
}

impl EventSource {
    pub fn new(store: Store, bookmark_every: Duration) -> Self {
        Self {
            hub: store.event_hub(),
            store,
            bookmark_every,
        }
    }

    /// Random once per database; every event carries it.
    pub fn database_id(&self) -> &str {
        self.hub.database_id()
    }

    /// Starts a watch: with `since_revision` 0, a snapshot of every node
    /// then live events; otherwise every event after `since_revision`, then
    /// live events.
    pub async fn watch(&self, since_revision: u64) -> Result<Watch, ServiceError> {
        if since_revision == 0 {
            let subscription = self.hub.subscribe();
            let revision = subscription.snapshot.revision;
            return Ok(self.open(
                subscription.live,
                Cursor::after(revision),
                subscription.snapshot.to_proto(self.database_id()).into(),
                revision,
            ));
        }
        let (subscribed_at, live) = self.hub.follow();
        if since_revision > subscribed_at {
            return Err(ServiceError::RevisionAhead {
                since: since_revision,
                latest: subscribed_at,
            });
        }
        let history = self.store.history().await?;
        if since_revision < history.pruned_through {
            return Err(ServiceError::HistoryPruned {
                since: since_revision,
                pruned_through: history.pruned_through,
            });
        }
        Ok(self.open(
            live,
            Cursor::after(since_revision),
            VecDeque::new(),
            subscribed_at,
        ))
    }

    fn open(
        &self,
        live: LiveEvents,
        cursor: Cursor,
        ready: VecDeque<proto::NodeEvent>,
        replay_through: u64,
    ) -> Watch {
        let mut bookmarks = interval_at(
            tokio::time::Instant::now() + self.bookmark_every,
            self.bookmark_every,
        );
        bookmarks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Watch {
            source: self.clone(),
            live,
            cursor,
            ready,
            replay_through,
            bookmarks,
        }
    }
}

/// A running watch; [`Watch::next`] yields its events one by one.
pub struct Watch {
    source: EventSource,
    live: LiveEvents,
    cursor: Cursor,
    /// Events ready to send: the snapshot, or a page of the replay.
    ready: VecDeque<proto::NodeEvent>,
    /// The history is replayed up to here; later events come live.
    replay_through: u64,
    bookmarks: Interval,
}

impl Watch {
    /// The last revision this watch has yielded (or its snapshot's).
    pub fn revision(&self) -> u64 {
        self.cursor.revision()
    }

    /// The next event. Ends only with an error: the watch fell behind, the
    /// history it was replaying was pruned under it, or the coordinator is
    /// stopping.
    pub async fn next(&mut self) -> Result<proto::NodeEvent, ServiceError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            if self.cursor.revision() < self.replay_through {
                self.replay_page().await?;
                continue;
            }
            let next = tokio::select! {
                next = self.live.next() => next,
                _ = self.bookmarks.tick() => return Ok(self.bookmark()),
            };
            match next {
                Next::Event(event) => {
                    if let Some(event) = self.admit(&event)? {
                        return Ok(event);
                    }
                }
                Next::Lagged => {
                    return Err(ServiceError::WatcherBehind {
                        resume_from: self.cursor.revision(),
                    });
                }
                Next::Closed => return Err(ServiceError::ShuttingDown),
            }
        }
    }

    async fn replay_page(&mut self) -> Result<(), ServiceError> {
        let after = self.cursor.revision();
        let page = self
            .source
            .store
            .replay(after, self.replay_through, REPLAY_PAGE)
            .await?;
        if page.first().is_none_or(|first| first.revision != after + 1) {
            let history = self.source.store.history().await?;
            return Err(ServiceError::HistoryPruned {
                since: after,
                pruned_through: history.pruned_through,
            });
        }
        for event in &page {
            if let Some(event) = self.admit(event)? {
                self.ready.push_back(event);
            }
        }
        Ok(())
    }

    fn admit(&mut self, event: &NodeEvent) -> Result<Option<proto::NodeEvent>, ServiceError> {
        match self.cursor.admit(event.revision) {
            Admit::Send => Ok(Some(event.to_proto(self.source.database_id()))),
            Admit::Duplicate => Ok(None),
            Admit::Gap { .. } => Err(ServiceError::WatcherBehind {
                resume_from: self.cursor.revision(),
            }),
        }
    }

    fn bookmark(&self) -> proto::NodeEvent {
        proto::NodeEvent {
            revision: self.cursor.revision(),
            kind: proto::NodeEventKind::Bookmark.into(),
            node: None,
            reason: String::new(),
            database_id: self.source.database_id().to_owned(),
        }
    }
}

/// Serves one `WatchNodes` stream until its client goes, the watch fails, or
/// the coordinator shuts down; the watch's error is the stream's status.
pub(super) async fn serve(
    mut watch: Watch,
    outbound: mpsc::Sender<Result<proto::NodeEvent, Status>>,
    shutdown: CancellationToken,
) {
    let ended = loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => Err(ServiceError::ShuttingDown),
            () = outbound.closed() => return,
            next = watch.next() => next,
        };
        let event = match next {
            Ok(event) => event,
            Err(error) => break error,
        };
        tokio::select! {
            sent = outbound.send(Ok(event)) => if sent.is_err() { return },
            () = shutdown.cancelled() => break ServiceError::ShuttingDown,
        }
    };
    let revision = watch.revision();
    tracing::debug!(error = %ended, revision, "watch ended");
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, outbound.send(Err(ended.into()))).await;
}
