//! The sweeper: periodically moves silent nodes to OFFLINE and removes nodes
//! that have been OFFLINE for `expire-after`.

use std::{sync::Arc, time::Duration};

use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Shared;
use crate::clock::Moment;

/// A tenth of `offline_after`, within 50 ms to 500 ms: a silent node is
/// marked OFFLINE at most that long after its deadline, and an expired node
/// is removed well within max(1 s, expire-after / 10).
pub(super) fn period(offline_after: Duration) -> Duration {
    (offline_after / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

pub(super) async fn run(shared: Arc<Shared>, period: Duration, shutdown: CancellationToken) {
    let mut tick = interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let report = shared.update(|registry| registry.sweep(Moment::now()));
                if report.went_offline > 0 || report.expired > 0 {
                    debug!(went_offline = report.went_offline, expired = report.expired, "sweep");
                }
            }
        }
    }
}
