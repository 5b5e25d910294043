//! The event log's tables: appending a node's change in the transaction
//! that makes it, replaying the history, pruning it.
//!
//! Invariants:
//! - Every transaction that changes a node's row and records events runs
//!   through [`EventLog::transaction`]: its events take the next revisions
//!   from `event_log.last_revision` inside that transaction, so an event is
//!   durable exactly when its change is.
//! - The event order lock is taken before the transaction begins and let go
//!   after its events are published, so the hub is handed revisions in the
//!   order they were issued, whichever thread committed them. It is fair:
//!   writers take it in the order they asked, so one that commits often
//!   (the lease writer) waits for the transaction in progress and those
//!   queued before it, never for a writer that lets go and takes it again.
//! - Pruning keeps the last `keep_events` events or every event younger than
//!   `keep_for`, whichever is more, and records the last revision it
//!   removed, below which a watch cannot resume.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use diesel::prelude::*;
use parking_lot::FairMutex;
use prost::Message;

use super::{
    StoreError,
    backend::{Db, write_transaction},
    file::DatabaseFile,
    leadership::Fence,
    rows::{DrainRow, NodeRow},
    schema::{event_log, known_nodes, node_events},
};
use crate::{
    clock::to_unix_millis,
    events::{EventHub, EventKind, NodeEvent, Reason},
    node::{NodeId, NodeSnapshot, NodeState, StoredNode},
    proto,
};

/// How much history is kept, and how far a watcher may fall behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSettings {
    /// At least this many of the latest events are kept...
    pub keep_events: u64,
    /// ...and every event younger than this.
    pub keep_for: Duration,
    /// Events a live watcher may fall behind before its stream is ended.
    pub watcher_buffer: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            keep_events: 10_000,
            keep_for: Duration::from_secs(3600),
            watcher_buffer: 4096,
        }
    }
}

/// The span of revisions the database holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    /// Events up to this revision have been pruned; a watch may resume from
    /// it or later.
    pub pruned_through: u64,
    pub last_revision: u64,
}

pub(super) struct EventLog {
    hub: Arc<EventHub>,
    order: Arc<FairMutex<()>>,
    settings: EventSettings,
    fence: Fence,
}

/// Events recorded during one transaction, given revisions when it ends.
#[derive(Default)]
pub(super) struct Recorder {
    pending: Vec<(EventKind, Reason, proto::Node)>,
}

impl Recorder {
    pub(super) fn record(&mut self, kind: EventKind, reason: Reason, node: proto::Node) {
        self.pending.push((kind, reason, node));
    }

    pub(super) fn changed(&mut self, reason: Reason, node: proto::Node) {
        self.record(EventKind::Changed, reason, node);
    }
}

impl EventLog {
    /// Reads the database's identity and latest revision, and starts the hub.
    pub(super) fn open(conn: &mut Db, settings: EventSettings) -> Result<Self, StoreError> {
        let (last_revision, database_id): (i64, String) = event_log::table
            .select((event_log::last_revision, event_log::database_id))
            .first(conn)?;
        let hub = EventHub::new(
            database_id,
            revision_from_column(last_revision)?,
            settings.watcher_buffer,
        );
        Ok(Self {
            hub: Arc::new(hub),
            order: Arc::new(FairMutex::new(())),
            settings,
            fence: Fence::default(),
        })
    }

    pub(super) fn hub(&self) -> &Arc<EventHub> {
        &self.hub
    }

    pub(super) fn fence(&self) -> &Fence {
        &self.fence
    }

    pub(super) fn settings(&self) -> EventSettings {
        self.settings
    }

    /// The order lock itself: whoever holds it knows that no write
    /// transaction of this process is under way or can begin.
    pub(super) fn write_gate(&self) -> Arc<FairMutex<()>> {
        self.order.clone()
    }

    /// Runs `work` in a write transaction, appends the events it recorded
    /// in that same transaction, and publishes them once it has committed.
    /// The transaction is refused unless the database file is still at its
    /// path both before it and after it has committed: a write into a file
    /// that has gone is never reported as done. A side file left read-only
    /// is repaired first, or named as the cause. Once fenced, it is refused
    /// too unless this coordinator's epoch still leads (see
    /// [`super::leadership`]).
    pub(super) fn transaction<T>(
        &self,
        file: Option<&DatabaseFile>,
        conn: &mut Db,
        now: SystemTime,
        work: impl FnOnce(&mut Db, &mut Recorder) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _in_order = self.order.lock();
        if let Some(file) = file {
            file.ensure_in_place()?;
            file.repair_side_files()?;
        }
        let (done, committed) = write_transaction(conn, |conn| {
            self.fence.check(conn)?;
            let mut recorder = Recorder::default();
            let done = work(conn, &mut recorder)?;
            let committed = append(conn, recorder, now)?;
            Ok::<_, StoreError>((done, committed))
        })?;
        // Published even if the file is found gone just after the commit:
        // the events are in the database that watchers would replay.
        if !committed.is_empty() {
            self.hub.publish(committed);
        }
        if let Some(file) = file {
            file.ensure_in_place()?;
        }
        Ok(done)
    }

    /// The node as the hub last published it: the state an event of this
    /// node carries when its change does not decide the state (a drain of
    /// a node still UNKNOWN after a restart).
    pub(super) fn published_state(&self, node_id: &NodeId) -> Option<(u64, proto::NodeState)> {
        self.hub
            .node(node_id.as_str())
            .map(|node| (node.session_generation, node.state()))
    }
}

/// Gives the recorded events the next revisions and inserts them.
fn append(
    conn: &mut Db,
    recorder: Recorder,
    now: SystemTime,
) -> Result<Vec<NodeEvent>, StoreError> {
    if recorder.pending.is_empty() {
        return Ok(Vec::new());
    }
    let count = i64::try_from(recorder.pending.len()).unwrap_or(i64::MAX);
    diesel::update(event_log::table)
        .set(event_log::last_revision.eq(event_log::last_revision + count))
        .execute(conn)?;
    let last: i64 = event_log::table
        .select(event_log::last_revision)
        .first(conn)?;
    let first = revision_from_column(last - count + 1)?;
    let at = to_unix_millis(now);
    let mut events = Vec::with_capacity(recorder.pending.len());
    for ((kind, reason, node), revision) in recorder.pending.into_iter().zip(first..) {
        diesel::insert_into(node_events::table)
            .values((
                node_events::revision.eq(revision_to_column(revision)),
                node_events::node_id.eq(&node.node_id),
                node_events::kind.eq(kind.as_str()),
                node_events::reason.eq(reason.as_str()),
                node_events::node.eq(node.encode_to_vec()),
                node_events::at.eq(at),
            ))
            .execute(conn)?;
        events.push(NodeEvent {
            revision,
            kind,
            reason,
            node,
        });
    }
    Ok(events)
}

/// The node's row as the wire shows it, with its state as the row implies:
/// LEFT once it left, OFFLINE while offline, otherwise `live` (ONLINE, or
/// UNKNOWN for a node not yet proven alive since a restart). `None` if
/// there is no such row, or it cannot be read.
pub(super) fn row_node(
    conn: &mut Db,
    node_id: &NodeId,
    live: NodeState,
) -> Result<Option<proto::Node>, StoreError> {
    let found = known_nodes::table
        .find(node_id.as_str())
        .select((NodeRow::as_select(), DrainRow::as_select()))
        .first::<(NodeRow, DrainRow)>(conn);
    let (row, drain) = match found {
        Ok(found) => found,
        Err(diesel::result::Error::NotFound | diesel::result::Error::DeserializationError(_)) => {
            return Ok(None);
        }
        Err(other) => return Err(other.into()),
    };
    let Ok(stored) = StoredNode::try_from(row) else {
        return Ok(None);
    };
    let last_seen =
        super::heartbeats::latest(stored.last_seen, super::heartbeats::of(conn, node_id)?);
    let state = match (stored.left_at, stored.offline_since) {
        (Some(_), _) => NodeState::Left,
        (None, Some(_)) => NodeState::Offline,
        (None, None) => live,
    };
    Ok(Some(proto::Node::from(NodeSnapshot {
        registration: stored.registration,
        state,
        registered_at: stored.registered_at,
        last_seen,
        generation: stored.generation,
        offline_since: stored.left_at.or(stored.offline_since),
        drain: drain.into_drain(),
        last_probe_error: None,
    })))
}

/// Events with revisions in `(after, through]`, oldest first, at most
/// `limit`.
pub(super) fn replay(
    conn: &mut Db,
    after: u64,
    through: u64,
    limit: usize,
) -> Result<Vec<NodeEvent>, StoreError> {
    let rows: Vec<(i64, String, String, Vec<u8>)> = node_events::table
        .filter(node_events::revision.gt(revision_to_column(after)))
        .filter(node_events::revision.le(revision_to_column(through)))
        .order(node_events::revision)
        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
        .select((
            node_events::revision,
            node_events::kind,
            node_events::reason,
            node_events::node,
        ))
        .load(conn)?;
    rows.into_iter()
        .map(|(revision, kind, reason, node)| {
            let corrupt = |what: String| StoreError::Corrupt {
                node_id: format!("(event {revision})"),
                reason: what,
            };
            Ok(NodeEvent {
                revision: revision_from_column(revision)?,
                kind: EventKind::parse(&kind)
                    .ok_or_else(|| corrupt(format!("unknown event kind {kind:?}")))?,
                reason: Reason::parse(&reason)
                    .ok_or_else(|| corrupt(format!("unknown event reason {reason:?}")))?,
                node: proto::Node::decode(node.as_slice())
                    .map_err(|e| corrupt(format!("undecodable node: {e}")))?,
            })
        })
        .collect()
}

pub(super) fn history(conn: &mut Db) -> Result<History, StoreError> {
    let (pruned_through, last_revision): (i64, i64) = event_log::table
        .select((event_log::pruned_through, event_log::last_revision))
        .first(conn)?;
    Ok(History {
        pruned_through: revision_from_column(pruned_through)?,
        last_revision: revision_from_column(last_revision)?,
    })
}

/// Deletes events that are neither among the last `keep_events` nor
/// younger than `keep_for`.
pub(super) fn prune(
    conn: &mut Db,
    settings: EventSettings,
    now: SystemTime,
) -> Result<(), StoreError> {
    let history = history(conn)?;
    let Some(beyond_count) = history.last_revision.checked_sub(settings.keep_events) else {
        return Ok(());
    };
    if beyond_count <= history.pruned_through {
        return Ok(());
    }
    let cutoff = to_unix_millis(
        now.checked_sub(settings.keep_for)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    );
    // Checked first, as it is nearly always true: the oldest event is young.
    let oldest: Option<i64> = node_events::table
        .order(node_events::revision)
        .select(node_events::at)
        .first(conn)
        .optional()?;
    if oldest.is_none_or(|at| at > cutoff) {
        return Ok(());
    }
    let newest_old: Option<i64> = node_events::table
        .filter(node_events::revision.le(revision_to_column(beyond_count)))
        .filter(node_events::at.le(cutoff))
        .select(diesel::dsl::max(node_events::revision))
        .first(conn)?;
    let Some(through) = newest_old else {
        return Ok(());
    };
    // Times may step backwards; the history stays one contiguous span.
    diesel::delete(node_events::table.filter(node_events::revision.le(through))).execute(conn)?;
    diesel::update(event_log::table)
        .set(event_log::pruned_through.eq(through))
        .execute(conn)?;
    Ok(())
}

fn revision_to_column(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn revision_from_column(revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision).map_err(|_| StoreError::Corrupt {
        node_id: "(event log)".to_owned(),
        reason: format!("negative revision {revision}"),
    })
}
