//! Leading and standing by, on a database that arbitrates leadership; on
//! one that does not (SQLite), a single term at epoch 0 until shutdown.
//!
//! Invariants:
//! - A leader never serves past its lease as the database counts it: it
//!   steps down when its own monotonic clock reaches the [`LeaseClock`]
//!   deadline, measured from the moment it SENT its last successful renewal
//!   (or campaign), less a safety margin, whether later renewals fail, hang,
//!   or are refused.
//! - A write the database refuses as fenced deposes the leader at once.
//! - A standby campaigns every third of the lease and serves the operator
//!   reads meanwhile; stepping down keeps the process and its port.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Process, standby, term::Term};
use crate::{
    error::{RunError, display_chain},
    store::Campaign,
};

/// How often a leader renews its lease, and a standby campaigns.
pub(super) fn renewal_period(lease: Duration) -> Duration {
    lease / 3
}

/// Until when a leader may act on a lease granted for `lease` by a request
/// sent at `sent`: the database started counting no earlier than that, and
/// the margin covers the rates of the two clocks drifting apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LeaseClock {
    lease: Duration,
    deadline: Instant,
}

impl LeaseClock {
    pub(super) fn granted(lease: Duration, sent: Instant) -> Self {
        Self {
            lease,
            deadline: sent + lease - lease / 5,
        }
    }

    pub(super) fn renewed(&mut self, sent: Instant) {
        self.deadline = self.deadline.max(Self::granted(self.lease, sent).deadline);
    }

    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// A term and the lease it runs under.
pub(super) struct Leading {
    pub(super) term: Term,
    pub(super) lease: LeaseClock,
}

/// Runs until shutdown, or until a task the coordinator cannot do without
/// fails; a term still running is ended in order either way.
pub(super) async fn run(process: Arc<Process>, first: Option<Leading>) -> Result<(), RunError> {
    if !process.store.arbitrates_leadership() {
        let Some(mut leading) = first else {
            return Ok(());
        };
        let failed = tokio::select! {
            biased;
            () = process.shutdown.cancelled() => None,
            failure = leading.term.failure() => Some(failure),
        };
        process.shutdown.cancel();
        leading.term.stop().await;
        return failed.map_or(Ok(()), Err);
    }
    let mut leading = first;
    loop {
        leading = match leading {
            Some(leading) => lead(&process, leading).await?,
            None => stand_by(&process).await,
        };
        if leading.is_none() && process.shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// Leads until the lease is lost or shutdown; `Ok(None)` once stepped down.
async fn lead(process: &Process, mut leading: Leading) -> Result<Option<Leading>, RunError> {
    let lease = process.config.leader_lease;
    let holder = process.boot_id.as_str();
    let epoch = leading.term.shared.epoch;
    let deposal = leading.term.shared.deposal.clone();
    let mut next_renewal = Instant::now() + renewal_period(lease);
    let why = loop {
        tokio::select! {
            biased;
            () = process.shutdown.cancelled() => {
                leading.term.stop().await;
                let resigned = tokio::time::timeout(
                    renewal_period(lease),
                    process.store.resign_leadership(holder, epoch),
                ).await;
                if !matches!(resigned, Ok(Ok(()))) {
                    warn!(epoch, "could not resign the leadership; a standby takes over once the lease runs out");
                }
                return Ok(None);
            }
            failure = leading.term.failure() => {
                process.shutdown.cancel();
                leading.term.stop().await;
                return Err(failure);
            }
            () = deposal.deposed() => break "a write was refused as fenced".to_owned(),
            () = sleep_until(leading.lease.deadline()) => {
                break "the lease could not be renewed before it could expire".to_owned();
            }
            () = sleep_until(next_renewal) => {
                let sent = Instant::now();
                let renewal = process.store.renew_leadership(holder, epoch, lease);
                match timeout_at(leading.lease.deadline(), renewal).await {
                    Ok(Ok(true)) => leading.lease.renewed(sent),
                    Ok(Ok(false)) => break "the lease was lost".to_owned(),
                    Ok(Err(error)) => {
                        warn!(epoch, error = %display_chain(&error), "cannot renew the leadership lease; retrying until it could expire");
                    }
                    Err(_) => break "the lease renewal did not answer before the lease could expire".to_owned(),
                }
                next_renewal = sent + renewal_period(lease);
            }
        }
    };
    // Sessions are ended with the new leader's URL when the database can
    // name it at once; without it, agents try their next URL.
    let lookup = Duration::from_secs(1).min(lease / 5);
    let leader = tokio::time::timeout(lookup, process.store.leader()).await;
    let reached = matches!(leader, Ok(Ok(_)));
    let leader = leader.ok().and_then(Result::ok).flatten();
    process.stop_leading(leader.as_ref(), &why);
    metrics::counter!("muster_leadership_lost_total").increment(1);
    leading.term.stop().await;
    process.readiness.end_term().await;
    process.readiness.standby_database(reached).await;
    Ok(None)
}

/// Serves as a standby and campaigns every third of the lease until it
/// wins; `None` at shutdown, or when the won term could not start.
async fn stand_by(process: &Process) -> Option<Leading> {
    let lease = process.config.leader_lease;
    let follower_stop = CancellationToken::new();
    let follower = process.background.spawn(standby::follow_event_log(
        process.store.clone(),
        process.standby_rows.clone(),
        follower_stop.clone(),
    ));
    let won = loop {
        tokio::select! {
            () = process.shutdown.cancelled() => break None,
            () = sleep(renewal_period(lease)) => {}
        }
        let sent = Instant::now();
        match campaign(process).await {
            Ok(Some(epoch)) => break Some((epoch, sent)),
            Ok(None) => process.readiness.standby_database(true).await,
            Err(error) => {
                debug!(%error, "campaign failed; will retry");
                process.roles.follow(None, "the database cannot be reached");
                process.readiness.standby_database(false).await;
            }
        }
    };
    follower_stop.cancel();
    let _ = follower.await;
    let (epoch, sent) = won?;
    match Term::start(process, epoch).await {
        Ok(term) => {
            process.begin_leading(&term.shared);
            Some(Leading {
                term,
                lease: LeaseClock::granted(lease, sent),
            })
        }
        Err(error) => {
            warn!(epoch, error = %display_chain(&error), "won the leadership but could not load the fleet; resigning");
            let _ = process
                .store
                .resign_leadership(&process.boot_id, epoch)
                .await;
            process.readiness.end_term().await;
            None
        }
    }
}

/// One campaign: `Some(epoch)` once won (the store fenced at it), `None`
/// while another leads.
pub(super) async fn campaign(process: &Process) -> Result<Option<u64>, String> {
    let outcome = process
        .store
        .campaign(
            &process.boot_id,
            process.roles.own_url(),
            process.config.leader_lease,
        )
        .await
        .map_err(|error| display_chain(&error))?;
    match outcome {
        Campaign::Won { epoch } => {
            process.store.fence(epoch);
            Ok(Some(epoch))
        }
        Campaign::Lost { leader } => {
            process
                .roles
                .follow(leader.as_ref(), "another coordinator leads");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_from_the_request_not_the_answer() {
        let lease = Duration::from_secs(10);
        let sent = Instant::now();
        let mut clock = LeaseClock::granted(lease, sent);
        assert_eq!(clock.deadline(), sent + Duration::from_secs(8));
        clock.renewed(sent + Duration::from_secs(3));
        assert_eq!(clock.deadline(), sent + Duration::from_secs(11));
        // An answer to an older request never moves the deadline back.
        clock.renewed(sent + Duration::from_secs(1));
        assert_eq!(clock.deadline(), sent + Duration::from_secs(11));
    }

    #[test]
    fn a_leader_renews_at_least_twice_before_its_deadline() {
        let lease = Duration::from_secs(10);
        let sent = Instant::now();
        let clock = LeaseClock::granted(lease, sent);
        assert!(sent + renewal_period(lease) * 2 < clock.deadline());
    }
}
