//! The store writer: the one task that writes registry changes to the store.
//!
//! Being the only writer keeps each node's changes in the order the registry
//! made them.
//! State changes are written as soon as they happen; `last_seen` of every
//! node that heartbeated, and the GPU inventory of every node whose
//! inventory changed, are written in one transaction per flush period (the
//! heartbeat interval, at least a second), so heartbeats never cost a write
//! each. A failed write is retried on the next
//! round, never dropped; the store's availability, not this task, reports
//! the outage (see `readiness`).
//!
//! On shutdown the writer keeps retrying what is unwritten for at most
//! [`DRAIN_DEADLINE`], then logs, as an error, every change and `last_seen`
//! it could not save. A write the database refuses as fenced is never
//! retried: this coordinator no longer leads, and the write is dropped.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::Shared;
use crate::{
    error::display_chain,
    node::NodeId,
    registry::{Change, InventoryUpdate},
    store::StoreError,
};

/// How long the final flush at shutdown may keep retrying a failing store.
pub(super) const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Pause between the final flush's attempts.
const DRAIN_RETRY: Duration = Duration::from_millis(200);

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
        let (last_seen, inventories) = {
            let mut registry = shared.lock();
            for change in registry.take_changes() {
                unwritten.insert(change.node_id().clone(), change);
            }
            if flush_last_seen {
                last_flush = Instant::now();
                (registry.take_last_seen(), registry.take_inventories())
            } else {
                (Vec::new(), Vec::new())
            }
        };
        let batch = Batch {
            changes: std::mem::take(&mut unwritten).into_values().collect(),
            last_seen: last_seen.into(),
            inventories: inventories.into(),
        };
        if stopping {
            drain(&shared, batch).await;
            return;
        }
        if let Err(error) = write(&shared, &batch).await {
            if shared.deposal.notice(&error) {
                // The term is over; what it did not write, the next leader
                // learns from the agents themselves.
                continue;
            }
            debug!(error = %display_chain(&error), changes = batch.changes.len(), "store write failed; will retry");
            unwritten = batch
                .changes
                .iter()
                .map(|change| (change.node_id().clone(), change.clone()))
                .collect();
            let mut registry = shared.lock();
            registry.restore_last_seen(&batch.last_seen);
            registry.restore_inventories(&batch.inventories);
        }
    }
}

/// One round's writes, shared so that a failed round can be retried without
/// copying them.
struct Batch {
    changes: Arc<[Change]>,
    last_seen: Arc<[(NodeId, SystemTime)]>,
    inventories: Arc<[InventoryUpdate]>,
}

async fn write(shared: &Shared, batch: &Batch) -> Result<(), StoreError> {
    if batch.changes.is_empty() && batch.last_seen.is_empty() && batch.inventories.is_empty() {
        return Ok(());
    }
    let transactions = shared
        .store
        .write(
            batch.changes.clone(),
            batch.last_seen.clone(),
            batch.inventories.clone(),
        )
        .await?;
    batch.changes.iter().for_each(log_change);
    metrics::counter!("muster_store_write_transactions_total").increment(transactions as u64);
    metrics::counter!("muster_store_changes_written_total").increment(batch.changes.len() as u64);
    metrics::counter!("muster_store_last_seen_written_total")
        .increment(batch.last_seen.len() as u64);
    metrics::counter!("muster_store_gpu_inventories_written_total")
        .increment(batch.inventories.len() as u64);
    Ok(())
}

/// The final flush: retries until it succeeds or [`DRAIN_DEADLINE`] has
/// passed, then names whatever stays unsaved.
async fn drain(shared: &Shared, batch: Batch) {
    let deadline = Instant::now() + DRAIN_DEADLINE;
    let mut attempts = 0u32;
    let failure = loop {
        attempts += 1;
        let attempt = write(shared, &batch);
        let failure = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) if shared.deposal.notice(&error) => break display_chain(&error),
            Ok(Err(error)) => display_chain(&error),
            Err(_) => format!("the write did not finish within {DRAIN_DEADLINE:?}"),
        };
        if Instant::now() + DRAIN_RETRY >= deadline {
            break failure;
        }
        tokio::time::sleep(DRAIN_RETRY).await;
    };
    error!(
        error = %failure,
        attempts,
        changes = batch.changes.len(),
        last_seen = batch.last_seen.len(),
        inventories = batch.inventories.len(),
        "shutting down with changes the database did not take; they are lost"
    );
    for change in batch.changes.iter() {
        error!(node_id = %change.node_id(), change = %describe(change), "not saved");
    }
    if !batch.last_seen.is_empty() {
        let nodes: Vec<&str> = batch
            .last_seen
            .iter()
            .map(|(node_id, _)| node_id.as_str())
            .collect();
        error!(nodes = %nodes.join(","), "last_seen not saved");
    }
    if !batch.inventories.is_empty() {
        let nodes: Vec<&str> = batch
            .inventories
            .iter()
            .map(|update| update.node_id.as_str())
            .collect();
        error!(nodes = %nodes.join(","), "GPU inventories not saved");
    }
}

fn describe(change: &Change) -> String {
    match change {
        Change::WentOffline {
            generation, since, ..
        } => format!(
            "went OFFLINE at {} (generation {generation})",
            humantime::format_rfc3339_millis(*since)
        ),
        Change::CameOnline { generation, .. } => {
            format!("came back ONLINE (generation {generation})")
        }
        Change::Expired { generation, .. } => {
            format!("expired and was to be removed (generation {generation})")
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
