//! The fleet's event feed: every committed change of a node, in revision
//! order, for live watchers (`WatchNodes`, the dashboard's `/events`).
//!
//! Pure and I/O-free. The store assigns revisions inside the transaction
//! that changes a node's row, and hands the committed events to
//! [`EventHub::publish`] while it still holds its event order (see
//! `store::events`), so the hub sees revisions strictly increasing and
//! without gaps whichever writer committed them.
//!
//! Invariants:
//! - [`EventHub::subscribe`] returns, atomically, the view of every node as
//!   the events through revision `R` leave it, `R` itself, and a live feed
//!   that receives exactly the events after `R`: nothing is missed between
//!   the snapshot and the feed, and nothing is received twice.
//! - Publishing never waits for a subscriber. Each subscriber has a bounded
//!   buffer; one that falls more than [`EventHub::new`]'s `capacity` behind
//!   is told so ([`Next::Lagged`]) and must resume from its last revision.
//! - A [`Cursor`] admits each revision once and in order: a replayed event
//!   also received live is dropped, and a hole is reported, never skipped.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::broadcast;

use crate::proto;

/// Whether the node still exists after the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Changed,
    /// Expired or removed by an operator; the event carries the node as it
    /// was.
    Removed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Changed => "changed",
            Self::Removed => "removed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Changed, Self::Removed]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }

    fn to_proto(self) -> proto::NodeEventKind {
        match self {
            Self::Changed => proto::NodeEventKind::Changed,
            Self::Removed => proto::NodeEventKind::Removed,
        }
    }
}

/// What happened to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Registered, for the first time or again.
    Registered,
    /// ONLINE again: heard from after being OFFLINE, or proven alive after
    /// a restart.
    Online,
    Offline,
    Left,
    Drained,
    Undrained,
    Expired,
    Removed,
    /// The coordinator restarted and reloaded the node (UNKNOWN until
    /// proven alive, or LEFT).
    Reloaded,
}

impl Reason {
    const ALL: [Self; 9] = [
        Self::Registered,
        Self::Online,
        Self::Offline,
        Self::Left,
        Self::Drained,
        Self::Undrained,
        Self::Expired,
        Self::Removed,
        Self::Reloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Left => "left",
            Self::Drained => "drained",
            Self::Undrained => "undrained",
            Self::Expired => "expired",
            Self::Removed => "removed",
            Self::Reloaded => "reloaded",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == text)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One committed change of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeEvent {
    pub revision: u64,
    pub kind: EventKind,
    pub reason: Reason,
    /// The node after the change, or as it was when removed.
    pub node: proto::Node,
}

impl NodeEvent {
    pub fn node_id(&self) -> &str {
        &self.node.node_id
    }

    pub fn to_proto(&self, database_id: &str) -> proto::NodeEvent {
        proto::NodeEvent {
            revision: self.revision,
            kind: self.kind.to_proto().into(),
            node: Some(self.node.clone()),
            reason: self.reason.as_str().to_owned(),
            database_id: database_id.to_owned(),
        }
    }
}

/// Every node as the events through `revision` leave it, ordered by id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: u64,
    pub nodes: Vec<proto::Node>,
}

impl Snapshot {
    /// The stream a `since_revision = 0` watch starts with: one SNAPSHOT
    /// event per node, then SNAPSHOT_END carrying the revision.
    pub fn to_proto(&self, database_id: &str) -> Vec<proto::NodeEvent> {
        let event = |kind: proto::NodeEventKind, node: Option<proto::Node>| proto::NodeEvent {
            revision: self.revision,
            kind: kind.into(),
            node,
            reason: String::new(),
            database_id: database_id.to_owned(),
        };
        self.nodes
            .iter()
            .map(|node| event(proto::NodeEventKind::Snapshot, Some(node.clone())))
            .chain([event(proto::NodeEventKind::SnapshotEnd, None)])
            .collect()
    }
}

/// What a subscriber gets: the view at `snapshot.revision` and every event
/// after it.
pub struct Subscription {
    pub snapshot: Snapshot,
    pub live: LiveEvents,
}

/// The events published after a subscription's snapshot.
pub struct LiveEvents {
    receiver: broadcast::Receiver<Arc<NodeEvent>>,
}

/// The outcome of waiting on [`LiveEvents`].
#[derive(Debug)]
pub enum Next {
    Event(Arc<NodeEvent>),
    /// The subscriber fell too far behind; events were dropped for it.
    Lagged,
    /// The hub is gone: the coordinator is stopping.
    Closed,
}

impl LiveEvents {
    pub async fn next(&mut self) -> Next {
        match self.receiver.recv().await {
            Ok(event) => Next::Event(event),
            Err(broadcast::error::RecvError::Lagged(_)) => Next::Lagged,
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }

    /// The next event if one is already waiting.
    pub fn try_next(&mut self) -> Option<Next> {
        match self.receiver.try_recv() {
            Ok(event) => Some(Next::Event(event)),
            Err(broadcast::error::TryRecvError::Lagged(_)) => Some(Next::Lagged),
            Err(broadcast::error::TryRecvError::Closed) => Some(Next::Closed),
            Err(broadcast::error::TryRecvError::Empty) => None,
        }
    }
}

/// The publisher side, shared by the store (which publishes) and every
/// watcher (which subscribes).
pub struct EventHub {
    database_id: String,
    sender: broadcast::Sender<Arc<NodeEvent>>,
    /// Held while publishing and while subscribing, so a subscription's
    /// snapshot and its live feed meet exactly.
    view: Mutex<View>,
}

#[derive(Default)]
struct View {
    revision: u64,
    nodes: BTreeMap<String, proto::Node>,
}

impl EventHub {
    /// A hub for the database `database_id`, whose history ends at
    /// `revision`. Each subscriber may fall `capacity` events behind.
    pub fn new(database_id: String, revision: u64, capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            database_id,
            sender,
            view: Mutex::new(View {
                revision,
                nodes: BTreeMap::new(),
            }),
        }
    }

    pub fn database_id(&self) -> &str {
        &self.database_id
    }

    /// The revision of the latest event published.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Publishes committed events, which must follow the last published
    /// revision in order. Never waits for a subscriber.
    pub fn publish(&self, events: Vec<NodeEvent>) {
        let mut view = self.lock();
        for event in events {
            debug_assert!(
                event.revision > view.revision,
                "revision {} published after {}",
                event.revision,
                view.revision
            );
            view.revision = view.revision.max(event.revision);
            match event.kind {
                EventKind::Changed => {
                    view.nodes
                        .insert(event.node.node_id.clone(), event.node.clone());
                }
                EventKind::Removed => {
                    view.nodes.remove(&event.node.node_id);
                }
            }
            // No receiver is not an error: nobody is watching.
            let _ = self.sender.send(Arc::new(event));
        }
    }

    /// The node as the latest published event left it.
    pub fn node(&self, node_id: &str) -> Option<proto::Node> {
        self.lock().nodes.get(node_id).cloned()
    }

    /// The current view and every event after it.
    pub fn subscribe(&self) -> Subscription {
        let view = self.lock();
        Subscription {
            snapshot: Snapshot {
                revision: view.revision,
                nodes: view.nodes.values().cloned().collect(),
            },
            live: LiveEvents {
                receiver: self.sender.subscribe(),
            },
        }
    }

    /// The live feed from now on, without a snapshot, and the revision it
    /// starts after.
    pub fn follow(&self) -> (u64, LiveEvents) {
        let view = self.lock();
        (
            view.revision,
            LiveEvents {
                receiver: self.sender.subscribe(),
            },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a watcher stands: the last revision it has been sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    sent: u64,
}

/// What to do with an event offered to a [`Cursor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// The next revision: send it.
    Send,
    /// Already sent (replayed, then received live too): drop it.
    Duplicate,
    /// Revisions between the cursor and this event are missing.
    Gap { expected: u64 },
}

impl Cursor {
    pub fn after(revision: u64) -> Self {
        Self { sent: revision }
    }

    pub fn revision(self) -> u64 {
        self.sent
    }

    /// Judges `revision`, and moves the cursor on when it is the next one.
    pub fn admit(&mut self, revision: u64) -> Admit {
        if revision <= self.sent {
            Admit::Duplicate
        } else if revision == self.sent + 1 {
            self.sent = revision;
            Admit::Send
        } else {
            Admit::Gap {
                expected: self.sent + 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64, node_id: &str, kind: EventKind) -> NodeEvent {
        NodeEvent {
            revision,
            kind,
            reason: Reason::Registered,
            node: proto::Node {
                node_id: node_id.to_owned(),
                session_generation: revision,
                ..Default::default()
            },
        }
    }

    fn revisions(live: &mut LiveEvents) -> Vec<u64> {
        std::iter::from_fn(|| match live.try_next() {
            Some(Next::Event(event)) => Some(event.revision),
            _ => None,
        })
        .collect()
    }

    #[test]
    fn names_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        for kind in [EventKind::Changed, EventKind::Removed] {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Reason::parse("exploded"), None);
    }

    #[test]
    fn a_subscription_sees_the_view_at_its_revision_and_exactly_the_events_after_it() {
        let hub = EventHub::new("db".to_owned(), 10, 16);
        hub.publish(vec![
            event(11, "a", EventKind::Changed),
            event(12, "b", EventKind::Changed),
            event(13, "a", EventKind::Removed),
        ]);
        let mut subscription = hub.subscribe();
        hub.publish(vec![event(14, "c", EventKind::Changed)]);
        assert_eq!(subscription.snapshot.revision, 13);
        let ids: Vec<&str> = subscription
            .snapshot
            .nodes
            .iter()
            .map(|n| n.node_id.as_str())
            .collect();
        assert_eq!(ids, ["b"]);
        assert_eq!(revisions(&mut subscription.live), [14]);
        assert_eq!(hub.revision(), 14);
    }

    #[test]
    fn the_snapshot_stream_ends_with_its_revision() {
        let hub = EventHub::new("db".to_owned(), 0, 4);
        hub.publish(vec![event(1, "a", EventKind::Changed)]);
        let events = hub.subscribe().snapshot.to_proto("db");
        let kinds: Vec<i32> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                proto::NodeEventKind::Snapshot as i32,
                proto::NodeEventKind::SnapshotEnd as i32
            ]
        );
        assert!(
            events
                .iter()
                .all(|e| e.revision == 1 && e.database_id == "db")
        );
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told_and_publishing_never_waits() {
        let hub = EventHub::new("db".to_owned(), 0, 2);
        let (_, mut live) = hub.follow();
        for revision in 1..=5 {
            hub.publish(vec![event(revision, "a", EventKind::Changed)]);
        }
        assert!(matches!(live.try_next(), Some(Next::Lagged)));
    }

    #[tokio::test]
    async fn a_closed_hub_ends_the_feed() {
        let hub = EventHub::new("db".to_owned(), 0, 2);
        let (_, mut live) = hub.follow();
        drop(hub);
        assert!(matches!(live.next().await, Next::Closed));
    }

    /// The resume race, step by step: a watcher resuming from 2 subscribes
    /// while revision 4 is the latest published; 5 and 6 are committed and
    /// published while it replays 3..=5 from the database (5 was committed
    /// before its replay query ran). The cursor sends every revision once,
    /// in order.
    #[test]
    fn subscribe_then_replay_then_drop_what_was_sent_has_no_gap_and_no_duplicate() {
        let hub = EventHub::new("db".to_owned(), 0, 16);
        hub.publish((1..=4).map(|r| event(r, "a", EventKind::Changed)).collect());
        let (subscribed_at, mut live) = hub.follow();
        assert_eq!(subscribed_at, 4);
        hub.publish(vec![event(5, "a", EventKind::Changed)]);
        let replayed = [3, 4, 5];
        hub.publish(vec![event(6, "b", EventKind::Changed)]);

        let mut cursor = Cursor::after(2);
        let mut sent = Vec::new();
        for revision in replayed.into_iter().chain(revisions(&mut live)) {
            match cursor.admit(revision) {
                Admit::Send => sent.push(revision),
                Admit::Duplicate => {}
                Admit::Gap { expected } => panic!("gap before {revision}, expected {expected}"),
            }
        }
        assert_eq!(sent, [3, 4, 5, 6]);
        assert_eq!(cursor.revision(), 6);
    }

    #[test]
    fn a_cursor_reports_a_hole_instead_of_skipping_it() {
        let mut cursor = Cursor::after(7);
        assert_eq!(cursor.admit(7), Admit::Duplicate);
        assert_eq!(cursor.admit(9), Admit::Gap { expected: 8 });
        assert_eq!(cursor.revision(), 7);
        assert_eq!(cursor.admit(8), Admit::Send);
    }
}
