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
    events::{Admit, Cursor, EventHub, LiveEvents, Next, NodeEvent, Snapshot},
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

    /// Waits, at most `within`, until the hub has published `revision`. A
    /// standby's hub follows the event log a poll period late, and a watch
    /// that moved to it after a failover may resume from a revision it has
    /// not read yet, which would otherwise be refused as ahead.
    pub async fn caught_up_to(&self, revision: u64, within: Duration) {
        let (mut published, mut live) = self.hub.follow();
        let deadline = tokio::time::Instant::now() + within;
        while published < revision {
            match tokio::time::timeout_at(deadline, live.next()).await {
                Ok(Next::Event(event)) => published = event.revision,
                Ok(Next::Lagged) => published = self.hub.revision(),
                Ok(Next::Closed) | Err(_) => return,
            }
        }
    }

    /// Starts a watch whose snapshot is what `nodes` reads, then live
    /// events. The live feed is subscribed first, so no change after the
    /// read is missed; one the read already saw comes again.
    pub async fn watch_from(
        &self,
        nodes: impl Future<Output = Result<Vec<proto::Node>, ServiceError>>,
    ) -> Result<Watch, ServiceError> {
        let (revision, live) = self.hub.follow();
        let snapshot = Snapshot {
            revision,
            nodes: nodes.await?,
        };
        Ok(self.open(
            live,
            Cursor::after(revision),
            snapshot.to_proto(self.database_id()).into(),
            revision,
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::SystemTime};

    use super::*;
    use crate::{
        auth::NodeSecret,
        node::{NodeId, Registration},
        store::{Enrolled, EventSettings},
    };

    const NO_BOOKMARKS: Duration = Duration::from_secs(3600);

    async fn store_with(settings: EventSettings) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(&dir.path().join("muster.db"), settings)
            .await
            .unwrap();
        (dir, store)
    }

    async fn register(store: &Store, node: &str) {
        let registration = Registration {
            node_id: NodeId::parse("node_id", node).unwrap(),
            agent_url: format!("http://{node}:7701"),
            boot_id: "boot".to_owned(),
            version: "v".to_owned(),
            hostname: node.to_owned(),
            labels: BTreeMap::new(),
            max_backoff: Duration::from_secs(30),
            gpus: Default::default(),
        };
        let secret = NodeSecret::parse("secret", "0123456789abcdef0123").unwrap();
        let enrolled = store
            .enroll(registration, secret.hash(), SystemTime::now())
            .await
            .unwrap();
        assert!(matches!(enrolled, Enrolled::Admitted(_)), "{enrolled:?}");
    }

    async fn next_revisions(watch: &mut Watch, count: usize) -> Vec<(u64, i32)> {
        let mut seen = Vec::new();
        for _ in 0..count {
            let event = watch.next().await.unwrap();
            seen.push((event.revision, event.kind));
        }
        seen
    }

    async fn nothing_more(watch: &mut Watch) {
        let more = tokio::time::timeout(Duration::from_millis(100), watch.next()).await;
        assert!(more.is_err(), "unexpected {more:?}");
    }

    #[tokio::test]
    async fn a_resumed_watch_replays_then_goes_live_without_a_gap_or_a_duplicate() {
        let (_dir, store) = store_with(EventSettings::default()).await;
        for node in ["a", "b", "c", "d"] {
            register(&store, node).await;
        }
        let source = EventSource::new(store.clone(), NO_BOOKMARKS);
        let mut watch = source.watch(2).await.unwrap();
        // Committed after the watch subscribed, before it replays.
        register(&store, "e").await;
        register(&store, "f").await;
        let changed = proto::NodeEventKind::Changed as i32;
        assert_eq!(
            next_revisions(&mut watch, 4).await,
            [(3, changed), (4, changed), (5, changed), (6, changed)]
        );
        nothing_more(&mut watch).await;
        register(&store, "g").await;
        assert_eq!(next_revisions(&mut watch, 1).await, [(7, changed)]);
        assert_eq!(watch.revision(), 7);
    }

    #[tokio::test]
    async fn a_watch_from_zero_sends_the_fleet_then_its_revision_then_live_changes() {
        let (_dir, store) = store_with(EventSettings::default()).await;
        register(&store, "a").await;
        register(&store, "b").await;
        register(&store, "a").await;
        let source = EventSource::new(store.clone(), NO_BOOKMARKS);
        let mut watch = source.watch(0).await.unwrap();
        register(&store, "c").await;
        let events: Vec<proto::NodeEvent> = [
            watch.next().await.unwrap(),
            watch.next().await.unwrap(),
            watch.next().await.unwrap(),
            watch.next().await.unwrap(),
        ]
        .into();
        let shape: Vec<(u64, proto::NodeEventKind, &str)> = events
            .iter()
            .map(|e| {
                (
                    e.revision,
                    e.kind(),
                    e.node.as_ref().map_or("", |n| n.node_id.as_str()),
                )
            })
            .collect();
        use proto::NodeEventKind as K;
        assert_eq!(
            shape,
            [
                (3, K::Snapshot, "a"),
                (3, K::Snapshot, "b"),
                (3, K::SnapshotEnd, ""),
                (4, K::Changed, "c"),
            ]
        );
        assert!(events.iter().all(|e| e.database_id == source.database_id()));
        nothing_more(&mut watch).await;
    }

    #[tokio::test]
    async fn revisions_outside_the_history_are_refused_saying_what_to_do() {
        let settings = EventSettings {
            keep_events: 2,
            keep_for: Duration::ZERO,
            watcher_buffer: 16,
        };
        let (_dir, store) = store_with(settings).await;
        for node in ["a", "b", "c", "d", "e"] {
            register(&store, node).await;
        }
        store
            .write(Vec::new().into(), Vec::new().into(), Vec::new().into())
            .await
            .unwrap();
        let a = NodeId::parse("node_id", "a").unwrap();
        store
            .write(
                Vec::new().into(),
                vec![(a, SystemTime::now())].into(),
                Vec::new().into(),
            )
            .await
            .unwrap();
        let source = EventSource::new(store.clone(), NO_BOOKMARKS);
        let pruned = source.watch(1).await.err().unwrap();
        assert!(
            matches!(
                pruned,
                ServiceError::HistoryPruned {
                    since: 1,
                    pruned_through: 3
                }
            ),
            "{pruned}"
        );
        let status = Status::from(pruned);
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(status.message().contains("since_revision=0"), "{status:?}");
        assert!(
            source.watch(3).await.is_ok(),
            "the oldest resumable revision"
        );

        let ahead = source.watch(6).await.err().unwrap();
        assert!(
            matches!(
                ahead,
                ServiceError::RevisionAhead {
                    since: 6,
                    latest: 5
                }
            ),
            "{ahead}"
        );
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_ended_with_the_revision_to_resume_from() {
        let settings = EventSettings {
            watcher_buffer: 2,
            ..EventSettings::default()
        };
        let (_dir, store) = store_with(settings).await;
        register(&store, "a").await;
        let source = EventSource::new(store.clone(), NO_BOOKMARKS);
        let mut watch = source.watch(1).await.unwrap();
        for node in ["b", "c", "d", "e"] {
            register(&store, node).await;
        }
        let behind = watch.next().await.err().unwrap();
        assert!(
            matches!(behind, ServiceError::WatcherBehind { resume_from: 1 }),
            "{behind}"
        );
        assert_eq!(Status::from(behind).code(), tonic::Code::Aborted);
    }

    #[tokio::test]
    async fn a_quiet_watch_sends_bookmarks_with_its_revision() {
        let (_dir, store) = store_with(EventSettings::default()).await;
        register(&store, "a").await;
        let source = EventSource::new(store.clone(), Duration::from_millis(20));
        let mut watch = source.watch(1).await.unwrap();
        let bookmark = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bookmark.kind(), proto::NodeEventKind::Bookmark);
        assert_eq!(bookmark.revision, 1);
    }
}
