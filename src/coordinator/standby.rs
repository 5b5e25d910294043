//! What a standby serves: the operator reads, from the database.
//!
//! - `ListNodes` and `GetNode` read the rows as the leader last committed
//!   them. A standby proves no node alive, so a node's state is the row's:
//!   LEFT when its agent left, OFFLINE when the leader recorded it so,
//!   ONLINE otherwise.
//! - `WatchNodes` reads the event log: [`follow_event_log`] polls it every
//!   [`POLL_PERIOD`] and publishes the new revisions into the store's hub,
//!   in order, so a watch on a standby sees the leader's events a poll
//!   period late, and goes on unbroken through a failover.
//!
//! The hub is fed by this follower only while this process does not lead;
//! a new leader stops it and [`catch_up`]s before its first write, so the
//! hub always sees every revision once and in order.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    error::{ServiceError, display_chain},
    node::{NodeId, NodeSnapshot, NodeState, StoredNode},
    proto,
    store::{Store, StoreError},
};

/// How often a standby reads the event log and the rows.
pub(super) const POLL_PERIOD: Duration = Duration::from_millis(500);
/// Events read per query while catching up.
const PAGE: usize = 512;

/// The fleet as the rows say, for a standby.
pub(super) async fn list_nodes(store: &Store) -> Result<proto::ListNodesResponse, ServiceError> {
    let nodes = store.load_nodes().await?;
    Ok(proto::ListNodesResponse {
        nodes: nodes.into_iter().map(node_from_row).collect(),
        expiry_paused: None,
    })
}

pub(super) async fn get_node(store: &Store, node_id: NodeId) -> Result<proto::Node, ServiceError> {
    // One row would do; a standby's reads are rare enough to load them all.
    let nodes = store.load_nodes().await?;
    nodes
        .into_iter()
        .find(|node| node.registration.node_id == node_id)
        .map(node_from_row)
        .ok_or(ServiceError::NodeNotFound(node_id))
}

fn node_from_row(node: StoredNode) -> proto::Node {
    let state = if node.left_at.is_some() {
        NodeState::Left
    } else if node.offline_since.is_some() {
        NodeState::Offline
    } else {
        NodeState::Online
    };
    proto::Node::from(NodeSnapshot {
        registration: node.registration,
        state,
        registered_at: node.registered_at,
        last_seen: node.last_seen,
        generation: node.generation,
        offline_since: node.offline_since,
        drain: node.drain,
        last_probe_error: None,
    })
}

/// Publishes every committed event the hub has not seen yet.
pub(super) async fn catch_up(store: &Store) -> Result<(), StoreError> {
    let hub = store.event_hub();
    let through = store.history().await?.last_revision;
    loop {
        let after = hub.revision();
        if after >= through {
            return Ok(());
        }
        let events = store.replay(after, through, PAGE).await?;
        if events.is_empty() {
            return Ok(());
        }
        hub.publish(events);
    }
}

/// The rows a standby's dashboard shows, refreshed by [`follow_event_log`].
#[derive(Default)]
pub(super) struct RowsView(Mutex<proto::ListNodesResponse>);

impl RowsView {
    pub(super) fn get(&self) -> proto::ListNodesResponse {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, nodes: proto::ListNodesResponse) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = nodes;
    }
}

/// Follows the leader's commits until `stop`: new events into the hub,
/// the rows into `rows`. A failed read is retried on the next poll.
pub(super) async fn follow_event_log(store: Store, rows: Arc<RowsView>, stop: CancellationToken) {
    loop {
        if let Err(error) = catch_up(&store).await {
            debug!(error = %display_chain(&error), "cannot read the event log; will retry");
        }
        match list_nodes(&store).await {
            Ok(nodes) => rows.set(nodes),
            Err(error) => {
                debug!(error = %display_chain(&error), "cannot read the rows; will retry")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL_PERIOD) => {}
        }
    }
}
