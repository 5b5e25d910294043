//! A leader's term: everything a coordinator runs only while it leads (the
//! registry loaded from the store, the writer, the sweeper, the prober and
//! the lease pool), under one cancellation token, a child of the process's.
//!
//! Invariants:
//! - A term starts as a restarted coordinator does: every stored node is
//!   loaded UNKNOWN and probed, and nodes that were live get the reload
//!   grace, so a new leader shows no live node OFFLINE.
//! - The hub has seen every committed event before the term's first write.
//! - A term ends in order: its sessions first (each told why), then the
//!   writers make their final flush. A write the database refuses as fenced
//!   is never retried and never acknowledged, and deposes the term.

use std::sync::Arc;

use futures::{FutureExt, future::Fuse};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use super::{
    PROBE_CONCURRENCY, Process, RegistryHandle, Shared, leases, prober, standby, sweeper, writer,
};
use crate::{
    clock::Moment,
    error::RunError,
    pool::{Pool, PoolConfig},
    registry::{Registry, Timing},
    store::StoreError,
};

/// Notices the database refusing a write as fenced: counts it, and deposes
/// the term at once.
#[derive(Clone, Default)]
pub(crate) struct Deposal(CancellationToken);

impl Deposal {
    /// Whether `error` is a fenced write (the term is deposed if so).
    pub(crate) fn notice(&self, error: &StoreError) -> bool {
        let (epoch, current) = match error {
            StoreError::Fenced { epoch, current } => (*epoch, *current),
            StoreError::Batch(cause) => return self.notice(cause),
            _ => return false,
        };
        metrics::counter!("muster_fenced_writes_total").increment(1);
        if !self.0.is_cancelled() {
            warn!(
                epoch,
                current = ?current,
                "the database refused a write: this coordinator's leadership was lost; stepping down"
            );
            self.0.cancel();
        }
        true
    }

    pub(crate) async fn deposed(&self) {
        self.0.cancelled().await;
    }
}

pub(super) struct Term {
    pub(super) shared: Arc<Shared>,
    background: TaskTracker,
    writer_stop: CancellationToken,
    writer: Fuse<JoinHandle<()>>,
    sweeper: Fuse<JoinHandle<()>>,
    lease_writer: Fuse<JoinHandle<()>>,
    lease_follower: Fuse<JoinHandle<()>>,
}

impl Term {
    /// Loads the fleet and starts leading at `epoch`.
    pub(super) async fn start(process: &Process, epoch: u64) -> Result<Self, RunError> {
        let config = &process.config;
        let store = &process.store;
        standby::catch_up(store).await?;
        let stored = store.load_nodes().await?;
        let reloaded = stored.len();
        let mut timing = Timing {
            heartbeat_interval: config.heartbeat_interval,
            max_heartbeats_per_second: config.max_heartbeats_per_second,
            offline_after: config.offline_after,
            expire_after: config.expire_after,
            reload_grace: config.offline_after,
            expiry_guard_fraction: config.expiry_guard_fraction,
        };
        // On top of its agent's backoff ceiling, each reloaded node gets the
        // usual allowance of a fleet this size.
        timing.reload_grace = timing.offline_after_at(timing.interval_for(reloaded));
        let mut registry = Registry::new(timing);
        registry.load(stored, Moment::now());
        // Reloaded nodes are UNKNOWN now, whatever the log last said of them.
        store.record_reload(registry.list()).await?;
        let pool = Pool::restore(
            PoolConfig {
                revoke_grace: config.revoke_grace,
                orphan_grace: config.lease_orphan_grace,
                ..PoolConfig::default()
            },
            store.load_leases().await?,
        )?;
        let (leases, lease_writes) = leases::Leases::new(pool);
        let registry = RegistryHandle::new(registry);
        let stop = process.shutdown.child_token();
        let deposal = Deposal::default();
        let shared = Arc::new(Shared {
            changes_pending: registry.changes_pending.clone(),
            registry,
            timing,
            boot_id: process.boot_id.clone(),
            epoch,
            join_token: process.join_token.clone(),
            tls: process.tls.clone(),
            drains: tokio::sync::Mutex::new(()),
            store: store.clone(),
            leases,
            roles: process.roles.clone(),
            sessions: TaskTracker::new(),
            stop: stop.clone(),
            deposal: deposal.clone(),
        });
        process.readiness.begin_term().await;

        let background = TaskTracker::new();
        let writer_stop = CancellationToken::new();
        let writer = background.spawn(writer::run(
            shared.clone(),
            writer::flush_period(config.heartbeat_interval),
            writer_stop.clone(),
        ));
        let sweeper = background.spawn(sweeper::run(
            shared.clone(),
            sweeper::period(config.offline_after),
            config.expiry_guard_fraction,
            stop.clone(),
        ));
        let lease_writer = background.spawn_blocking({
            let store = store.clone();
            let writer_stop = writer_stop.clone();
            move || leases::write(&store, lease_writes, &deposal, &writer_stop)
        });
        let lease_follower = background.spawn(leases::follow(
            shared.leases.clone(),
            shared.registry.clone(),
            process.readiness.probe_round(),
            stop.clone(),
        ));
        background.spawn(prober::initial_round(
            shared.clone(),
            config.probe_timeout,
            PROBE_CONCURRENCY,
            process.readiness.clone(),
            stop.clone(),
        ));
        tracing::info!(epoch, reloaded, reload_grace = ?timing.reload_grace, "leading: the fleet is loaded and being probed");
        Ok(Self {
            shared,
            background,
            writer_stop,
            writer: writer.fuse(),
            sweeper: sweeper.fuse(),
            lease_writer: lease_writer.fuse(),
            lease_follower: lease_follower.fuse(),
        })
    }

    /// Resolves when a task the term cannot do without has failed: the
    /// writers, the sweeper and the lease pool's follower end only when told
    /// to. A coordinator that can no longer persist, detect failures or keep
    /// its leases in step with the fleet must not go on looking healthy.
    pub(super) async fn failure(&mut self) -> RunError {
        loop {
            tokio::select! {
                ended = &mut self.sweeper => if let Err(error) = ended {
                    return RunError::TaskFailed { task: "sweeper", reason: error.to_string() };
                },
                ended = &mut self.writer => {
                    let reason = ended.err().map_or_else(|| "it stopped".to_owned(), |e| e.to_string());
                    return RunError::TaskFailed { task: "store writer", reason };
                }
                ended = &mut self.lease_writer => {
                    let reason = ended.err().map_or_else(|| "it stopped".to_owned(), |e| e.to_string());
                    return RunError::TaskFailed { task: "lease writer", reason };
                }
                ended = &mut self.lease_follower => if ended.is_err() || !self.shared.stop.is_cancelled() {
                    let reason = ended.err().map_or_else(|| "it stopped".to_owned(), |e| e.to_string());
                    return RunError::TaskFailed { task: "lease pool follower", reason };
                },
            }
        }
    }

    /// Ends the term: sessions first, then the writers' final flush.
    pub(super) async fn stop(self) {
        self.shared.stop.cancel();
        self.shared.sessions.close();
        self.shared.sessions.wait().await;
        self.writer_stop.cancel();
        self.background.close();
        self.background.wait().await;
    }
}
