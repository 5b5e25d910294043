//! Readiness: the one owner of the health service's status.
//!
//! The coordinator is SERVING, under both the empty service name and the
//! Coordinator's, only while both hold: the initial probe round after start-up
//! has finished (or hit its deadline), and the store's writes succeed. A
//! failing store is a readiness problem, not a crash: reads are still
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

use super::service::CoordinatorService;
use crate::{
    proto::coordinator_server::CoordinatorServer,
    store::{Availability, Store},
};

/// How often a failing store is tried again when nothing else writes.
pub(super) const RECHECK_PERIOD: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Default)]
struct Conditions {
    probe_round_done: bool,
    store_failing: bool,
}

impl Conditions {
    fn status(self) -> ServingStatus {
        if self.probe_round_done && !self.store_failing {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
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
        let readiness = Self {
            conditions: Mutex::new(Conditions::default()),
            health,
            probe_round: watch::Sender::new(false),
        };
        readiness.publish(ServingStatus::NotServing).await;
        Arc::new(readiness)
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
        let before = conditions.status();
        change(&mut conditions);
        let after = conditions.status();
        if after != before {
            self.publish(after).await;
        }
    }

    async fn publish(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status(
                <CoordinatorServer<CoordinatorService> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
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
