//! Readiness: the one owner of the health service's status.
//!
//! Three service names, each SERVING only while what it names can be done:
//! - [`COORDINATOR_HEALTH`] (`muster.v1.Coordinator`): everything, agents'
//!   streams and operator writes included. Only a leader, once the initial
//!   probe round of its term has finished (or hit its deadline), and while
//!   the store's writes succeed.
//! - [`READS_HEALTH`] (`muster.v1.Coordinator.reads`): the operator reads
//!   (ListNodes, GetNode, WatchNodes). A leader once its probe round is done;
//!   a standby while it reaches the database.
//! - `""` (the whole server): its role can be done: the first on a leader,
//!   the second on a standby.
//!
//! A failing store is a readiness problem, not a crash: reads are still
//! served, registrations are refused with UNAVAILABLE, and the coordinator
//! turns SERVING again by itself once a write succeeds.
//!
//! Each change of the store's availability is logged once and exported as
//! `muster_store_available` (1 or 0); while the store fails, a write that
//! is rolled back probes it every [`RECHECK_PERIOD`], so it recovers even
//! when nothing else is waiting to be written.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use crate::store::{Availability, Store};

/// The health name of everything a leader serves.
pub const COORDINATOR_HEALTH: &str = "muster.v1.Coordinator";
/// The health name of the operator reads, which standbys serve too.
pub const READS_HEALTH: &str = "muster.v1.Coordinator.reads";

/// How often a failing store is tried again when nothing else writes.
pub(super) const RECHECK_PERIOD: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Conditions {
    leading: bool,
    probe_round_done: bool,
    store_failing: bool,
    /// A standby's last campaign reached the database.
    database_reached: bool,
}

/// The status of the whole server, of the Coordinator, and of the reads.
type Statuses = [ServingStatus; 3];

impl Conditions {
    fn statuses(self) -> Statuses {
        let serving = |ready: bool| {
            if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let coordinator = self.leading && self.probe_round_done && !self.store_failing;
        let reads = if self.leading {
            self.probe_round_done
        } else {
            self.database_reached
        };
        let overall = if self.leading { coordinator } else { reads };
        [serving(overall), serving(coordinator), serving(reads)]
    }
}

/// The handle through which the probe round and the store report.
pub(super) struct Readiness {
    /// An async lock, held while the health service is told, so that two
    /// reports can never reach it in the opposite order.
    conditions: Mutex<Conditions>,
    health: HealthReporter,
    /// Turns true, once, when the initial probe round is done.
    probe_round: watch::Sender<bool>,
}

impl Readiness {
    /// Starts NOT_SERVING.
    pub(super) async fn new(health: HealthReporter) -> Arc<Self> {
        let conditions = Conditions {
            leading: false,
            probe_round_done: false,
            store_failing: false,
            database_reached: false,
        };
        let readiness = Self {
            conditions: Mutex::new(conditions),
            health,
            probe_round: watch::Sender::new(false),
        };
        readiness.publish(conditions.statuses()).await;
        Arc::new(readiness)
    }

    /// A term begins: NOT_SERVING as a leader until its probe round is done.
    pub(super) async fn begin_term(&self) {
        self.probe_round.send_replace(false);
        self.update(|conditions| {
            conditions.leading = true;
            conditions.probe_round_done = false;
        })
        .await;
    }

    pub(super) async fn end_term(&self) {
        self.probe_round.send_replace(false);
        self.update(|conditions| {
            conditions.leading = false;
            conditions.probe_round_done = false;
        })
        .await;
    }

    /// Whether a standby reaches the database.
    pub(super) async fn standby_database(&self, reached: bool) {
        self.update(|conditions| conditions.database_reached = reached)
            .await;
    }

    pub(super) async fn probe_round_done(&self) {
        self.update(|conditions| conditions.probe_round_done = true)
            .await;
        self.probe_round.send_replace(true);
    }

    /// Sees `true` once the initial probe round is done (or hit its
    /// deadline): what the lease pool waits for before it reconciles.
    pub(super) fn probe_round(&self) -> watch::Receiver<bool> {
        self.probe_round.subscribe()
    }

    async fn store_failing(&self, failing: bool) {
        self.update(|conditions| conditions.store_failing = failing)
            .await;
    }

    async fn update(&self, change: impl FnOnce(&mut Conditions)) {
        let mut conditions = self.conditions.lock().await;
        let before = conditions.statuses();
        change(&mut conditions);
        let after = conditions.statuses();
        if after != before {
            self.publish(after).await;
        }
    }

    async fn publish(&self, [overall, coordinator, reads]: Statuses) {
        self.health.set_service_status("", overall).await;
        self.health
            .set_service_status(COORDINATOR_HEALTH, coordinator)
            .await;
        self.health.set_service_status(READS_HEALTH, reads).await;
    }
}

/// Follows the store's availability until `shutdown`: reports it to
/// `readiness`, logs each change once, and retries a failing store.
pub(super) async fn follow_store(
    readiness: Arc<Readiness>,
    store: Store,
    shutdown: CancellationToken,
) {
    let mut availability = store.availability();
    let mut failing = false;
    metrics::gauge!("muster_store_available").set(1.0);
    loop {
        let now = availability.borrow_and_update().clone();
        match (&now, failing) {
            (Availability::Failing { cause }, false) => {
                failing = true;
                metrics::gauge!("muster_store_available").set(0.0);
                warn!(
                    %cause,
                    "database writes are failing; health is NOT_SERVING and registrations are refused with UNAVAILABLE until a write succeeds"
                );
                readiness.store_failing(true).await;
            }
            (Availability::Available, true) => {
                failing = false;
                metrics::gauge!("muster_store_available").set(1.0);
                info!("database writes succeed again; pending changes are being written");
                readiness.store_failing(false).await;
            }
            _ => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = availability.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RECHECK_PERIOD), if failing => {
                let _ = store.check_writable().await;
            }
        }
    }
}
