//! The sweeper: periodically moves silent nodes to OFFLINE and removes nodes
//! that have been OFFLINE for `expire-after`. Time the coordinator itself
//! stood still (seen as a sweep that came far too late) is not held against
//! the nodes. It reports the mass-expiry guard pausing and resuming expiry
//! with one log line each and the `muster_expiry_paused` gauge.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Shared;
use crate::{clock::Moment, registry::ExpiryGuard};

/// A tenth of `offline_after`, within 50 ms to 500 ms: a silent node is
/// marked OFFLINE at most that long after its deadline, and an expired node
/// is removed well within max(1 s, expire-after / 10).
pub(super) fn period(offline_after: Duration) -> Duration {
    (offline_after / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

pub(super) async fn run(
    shared: Arc<Shared>,
    period: Duration,
    guard_fraction: f64,
    shutdown: CancellationToken,
) {
    let mut tick = interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    metrics::gauge!("muster_expiry_paused").set(0.0);
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
                if let Some(guard) = report.guard_changed {
                    report_guard(guard, guard_fraction);
                }
                if report.went_offline > 0 || report.expired > 0 {
                    debug!(went_offline = report.went_offline, expired = report.expired, "sweep");
                }
            }
        }
    }
}

fn report_guard(guard: ExpiryGuard, guard_fraction: f64) {
    metrics::gauge!("muster_expiry_paused").set(if guard.paused { 1.0 } else { 0.0 });
    if guard.paused {
        warn!(
            down = guard.down,
            known = guard.known,
            expiry_guard_fraction = guard_fraction,
            "expiry paused: more of the fleet is OFFLINE or UNKNOWN at once than \
             --expiry-guard-fraction allows, which looks like this coordinator's own \
             network failing; no node is removed until enough come back"
        );
    } else {
        info!(
            down = guard.down,
            known = guard.known,
            "expiry resumed: enough of the fleet is ONLINE again"
        );
    }
}
