//! The store writer: the one task that writes registry changes to the store.
//!
//! Being the only writer keeps each node's changes in the order the registry
//! made them.
//! State changes are written as soon as they happen; `last_seen` of every
//! node that heartbeated is written in one transaction per flush period (the
//! heartbeat interval, at least a second), so heartbeats never cost a write
//! each. A failed write is retried on the next
//! round, never dropped.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use crate::{error::display_chain, node::NodeId, registry::Change};

/// How often `last_seen` is flushed: every heartbeat interval, but never
/// more than once a second, so steady-state writes stay at one transaction
/// per second or less whatever the fleet's size and interval.
pub(super) fn flush_period(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval.max(Duration::from_secs(1))
}

pub(super) async fn run(shared: Arc<Shared>, flush_interval: Duration, stop: CancellationToken) {
    let mut flush = interval(flush_interval);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_flush = Instant::now();
    // Only a node's latest change matters: store writes are guarded by
    // generation, so an older one would change nothing. Keeping one per node
    // also bounds what piles up while the store is failing.
    let mut unwritten: BTreeMap<NodeId, Change> = BTreeMap::new();
    loop {
        let stopping = tokio::select! {
            biased;
            () = stop.cancelled() => true,
            () = shared.changes_pending.notified() => false,
            _ = flush.tick() => false,
        };
        // Decided by the clock, not by which branch fired, so a steady stream
        // of state changes can never starve the `last_seen` flush.
        let flush_last_seen = stopping || last_flush.elapsed() >= flush_interval;
        let last_seen = {
            let mut registry = shared.lock();
            for change in registry.take_changes() {
                unwritten.insert(change.node_id().clone(), change);
            }
            if flush_last_seen {
                last_flush = Instant::now();
                registry.take_last_seen()
            } else {
                Vec::new()
            }
        };
        let changes: Arc<[Change]> = std::mem::take(&mut unwritten).into_values().collect();
        let last_seen: Arc<[(NodeId, SystemTime)]> = last_seen.into();
        let writes_anything = !changes.is_empty() || !last_seen.is_empty();
        match shared.store.write(changes.clone(), last_seen.clone()).await {
            Ok(()) if writes_anything => {
                changes.iter().for_each(log_change);
                metrics::counter!("muster_store_write_transactions_total").increment(1);
                metrics::counter!("muster_store_changes_written_total")
                    .increment(changes.len() as u64);
                metrics::counter!("muster_store_last_seen_written_total")
                    .increment(last_seen.len() as u64);
            }
            Ok(()) => {}
            Err(error) => {
                warn!(error = %display_chain(&error), changes = changes.len(), "store write failed; will retry");
                unwritten = changes
                    .iter()
                    .map(|change| (change.node_id().clone(), change.clone()))
                    .collect();
                shared.lock().restore_last_seen(&last_seen);
            }
        }
        if stopping {
            return;
        }
    }
}

fn log_change(change: &Change) {
    match change {
        Change::WentOffline {
            node_id,
            generation,
            ..
        } => info!(%node_id, generation, "node offline"),
        Change::CameOnline {
            node_id,
            generation,
        } => info!(%node_id, generation, "node back online"),
        Change::Expired {
            node_id,
            generation,
        } => info!(%node_id, generation, "node expired and removed"),
    }
}
