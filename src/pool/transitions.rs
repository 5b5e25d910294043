//! The transitions of one lease, and the deadlines that drive them.

use std::time::Instant;

use super::{
    Change, Event, Lease, LeaseId, LeaseState, Pool, ReleaseReason, Timer, inventory::GpuKey,
    lease::AcquireRequest,
};
use crate::clock::Moment;

/// A lease and its monotonic deadlines, which only the running process
/// knows; `None` before the pool is reconciled.
pub(super) struct Entry {
    pub lease: Lease,
    pub expires: Option<Instant>,
    /// The end of the revoke grace (REVOKED) or orphan grace (SUSPENDED).
    pub grace_ends: Option<Instant>,
    pub forget_at: Option<Instant>,
    pub timer: Option<Instant>,
}

impl Entry {
    pub fn due(&self) -> Option<Instant> {
        match self.lease.state {
            LeaseState::Active => self.expires,
            LeaseState::Revoked => match (self.expires, self.grace_ends) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            LeaseState::Suspended => self.grace_ends,
            LeaseState::Released => self.forget_at,
        }
    }
}

impl Pool {
    pub(super) fn on_deadline(&mut self, generation: u64, now: Moment) -> Option<Change> {
        let entry = self.leases.get(&generation)?;
        let reason = match entry.lease.state {
            LeaseState::Active => ReleaseReason::Expired,
            LeaseState::Revoked => match (entry.expires, entry.grace_ends) {
                (Some(expires), Some(grace_ends)) if expires <= grace_ends => {
                    ReleaseReason::Expired
                }
                _ => ReleaseReason::RevokeGraceEnded,
            },
            LeaseState::Suspended => ReleaseReason::Orphaned,
            LeaseState::Released => return Some(self.forget(generation)),
        };
        self.release_entry(generation, reason, now)
    }

    pub(super) fn forget(&mut self, generation: u64) -> Change {
        let entry = self
            .leases
            .remove(&generation)
            .expect("checked by the caller");
        self.by_id.remove(&entry.lease.lease_id);
        if self.by_request.get(&entry.lease.request_id) == Some(&generation) {
            self.by_request.remove(&entry.lease.request_id);
        }
        Change {
            event: Event::Forgotten,
            lease: entry.lease,
        }
    }

    pub(super) fn grant(
        &mut self,
        request: &AcquireRequest,
        key: GpuKey,
        now: Moment,
    ) -> (Lease, Change) {
        let mut generation = self.last_generation + 1;
        while self
            .by_id
            .contains_key(&LeaseId::for_generation(generation))
        {
            generation += 1;
        }
        self.last_generation = generation;
        let ttl = request.terms.ttl;
        let lease = Lease {
            lease_id: LeaseId::for_generation(generation),
            request_id: request.request_id.clone(),
            terms: request.terms.clone(),
            node_id: key.0.clone(),
            gpu_uuid: key.1.clone(),
            generation,
            granted_at: now.wall,
            expires_at: now.wall + ttl,
            state: LeaseState::Active,
            revoked_at: None,
            suspended_at: None,
            released_at: None,
            release_reason: None,
        };
        let gpu = self.inventory.gpu_entry(&key);
        gpu.leased_mib += lease.terms.mb;
        gpu.leases.insert(generation);
        self.count_active(lease.terms.priority, true);
        self.inventory.reindex(&key);
        self.by_id.insert(lease.lease_id.clone(), generation);
        self.by_request.insert(lease.request_id.clone(), generation);
        self.leases.insert(
            generation,
            Entry {
                lease: lease.clone(),
                expires: Some(now.monotonic + ttl),
                grace_ends: None,
                forget_at: None,
                timer: None,
            },
        );
        self.retime(generation);
        (
            lease.clone(),
            Change {
                event: Event::Granted,
                lease,
            },
        )
    }

    pub(super) fn revoke(
        &mut self,
        generation: u64,
        for_request: &str,
        now: Moment,
    ) -> Option<Change> {
        let entry = self.leases.get_mut(&generation)?;
        if entry.lease.state != LeaseState::Active {
            return None;
        }
        entry.lease.state = LeaseState::Revoked;
        entry.lease.revoked_at = Some(now.wall);
        entry.grace_ends = Some(now.monotonic + self.config.revoke_grace);
        let lease = entry.lease.clone();
        self.count_active(lease.terms.priority, false);
        let key = (lease.node_id.clone(), lease.gpu_uuid.clone());
        self.inventory.gpu_entry(&key).revoked_mib += lease.terms.mb;
        self.inventory.reindex(&key);
        self.retime(generation);
        Some(Change {
            event: Event::Revoked {
                for_request: for_request.to_owned(),
            },
            lease,
        })
    }

    pub(super) fn suspend(&mut self, generation: u64, now: Moment) -> Option<Change> {
        let entry = self.leases.get_mut(&generation)?;
        if entry.lease.state != LeaseState::Active {
            return None;
        }
        entry.lease.state = LeaseState::Suspended;
        entry.lease.suspended_at = Some(now.wall);
        entry.grace_ends = Some(now.monotonic + self.config.orphan_grace);
        let lease = entry.lease.clone();
        self.count_active(lease.terms.priority, false);
        self.retime(generation);
        Some(Change {
            event: Event::Suspended,
            lease,
        })
    }

    pub(super) fn resume(&mut self, generation: u64, now: Moment) -> Option<Change> {
        let entry = self.leases.get(&generation)?;
        if entry.lease.state != LeaseState::Suspended {
            return None;
        }
        if self.settled && entry.grace_ends.is_some_and(|end| now.monotonic >= end) {
            return self.release_entry(generation, ReleaseReason::Orphaned, now);
        }
        let entry = self.leases.get_mut(&generation)?;
        let ttl = entry.lease.terms.ttl;
        entry.lease.state = LeaseState::Active;
        entry.lease.suspended_at = None;
        entry.lease.expires_at = now.wall + ttl;
        entry.expires = Some(now.monotonic + ttl);
        entry.grace_ends = None;
        let lease = entry.lease.clone();
        self.count_active(lease.terms.priority, true);
        self.retime(generation);
        Some(Change {
            event: Event::Resumed,
            lease,
        })
    }

    pub(super) fn release_entry(
        &mut self,
        generation: u64,
        reason: ReleaseReason,
        now: Moment,
    ) -> Option<Change> {
        let entry = self.leases.get_mut(&generation)?;
        let previous = entry.lease.state;
        if previous == LeaseState::Released {
            return None;
        }
        entry.lease.state = LeaseState::Released;
        entry.lease.released_at = Some(now.wall);
        entry.lease.release_reason = Some(reason);
        entry.grace_ends = None;
        entry.forget_at = Some(now.monotonic + self.config.released_retention);
        let lease = entry.lease.clone();
        if previous == LeaseState::Active {
            self.count_active(lease.terms.priority, false);
        }
        let key = (lease.node_id.clone(), lease.gpu_uuid.clone());
        let gpu = self.inventory.gpu_entry(&key);
        gpu.leased_mib -= lease.terms.mb;
        if previous == LeaseState::Revoked {
            gpu.revoked_mib -= lease.terms.mb;
        }
        gpu.leases.remove(&generation);
        self.inventory.reindex(&key);
        self.inventory.forget_if_unused(&key);
        self.retime(generation);
        Some(Change {
            event: Event::Released(reason),
            lease,
        })
    }

    /// After a restart every deadline starts over at `now`.
    pub(super) fn restart_deadlines(&mut self, generation: u64, now: Moment) -> Option<Change> {
        let config = self.config;
        let entry = self.leases.get_mut(&generation)?;
        let ttl = entry.lease.terms.ttl;
        let mut changed = false;
        match entry.lease.state {
            LeaseState::Active | LeaseState::Revoked => {
                entry.expires = Some(now.monotonic + ttl);
                entry.lease.expires_at = now.wall + ttl;
                if entry.lease.state == LeaseState::Revoked {
                    entry.grace_ends = Some(now.monotonic + config.revoke_grace);
                }
                changed = true;
            }
            LeaseState::Suspended => {
                entry.grace_ends = Some(now.monotonic + config.orphan_grace);
            }
            LeaseState::Released => {
                entry.forget_at = Some(now.monotonic + config.released_retention);
            }
        }
        let lease = entry.lease.clone();
        self.retime(generation);
        changed.then_some(Change {
            event: Event::Reconciled,
            lease,
        })
    }

    pub(super) fn count_active(&mut self, priority: i32, added: bool) {
        let count = self.active_by_priority.entry(priority).or_default();
        if added {
            *count += 1;
        } else {
            *count -= 1;
            if *count == 0 {
                self.active_by_priority.remove(&priority);
            }
        }
    }

    pub(super) fn retime(&mut self, generation: u64) {
        let Some(entry) = self.leases.get_mut(&generation) else {
            return;
        };
        if let Some(old) = entry.timer.take() {
            self.timers.remove(&(old, Timer::Lease(generation)));
        }
        if let Some(due) = entry.due() {
            entry.timer = Some(due);
            self.timers.insert((due, Timer::Lease(generation)));
        }
    }
}
