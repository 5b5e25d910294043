//! The sweeper: periodically moves silent nodes to OFFLINE and removes nodes
//! that have been OFFLINE for `expire-after`. Time the coordinator itself
//! stood still (seen as a sweep that came far too late) is not held against
//! the nodes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let now = Moment::now();
                // A sweep far later than its period means the whole process
                // stood still; nobody could be heard meanwhile.
                let stalled = now.monotonic.duration_since(last_sweep).saturating_sub(period * 2);
                last_sweep = now.monotonic;
                let report = shared.update(|registry| {
                    if !stalled.is_zero() {
                        registry.pardon_stall(stalled, now);
                    }
                    registry.sweep(now)
                });
                if !stalled.is_zero() {
                    warn!(?stalled, "the coordinator stood still; liveness deadlines moved back");
                }
                if report.went_offline > 0 || report.expired > 0 {
                    debug!(went_offline = report.went_offline, expired = report.expired, "sweep");
                }
            }
        }
    }
}
