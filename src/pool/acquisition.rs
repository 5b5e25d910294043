//! Acquisition: where a request fits, whom to revoke when nothing does,
//! and the reservations of requests waiting for revoked leases.

use std::time::Instant;

use super::{
    Acquisition, Blocked, Change, Constraints, GpuFree, LeaseState, LeaseTerms,
    PREEMPTION_SEARCH_STEPS, Pool, PoolError, Shortfall, Timer, Wait,
    inventory::{FitKey, GpuKey, gpu_key},
    lease::AcquireRequest,
    preemption::{self, Candidate, Victims},
    transitions::Entry,
};
use crate::{clock::Moment, node::NodeId, validation::InvalidInput};

pub(super) struct VictimSearch {
    budget: u64,
    best: Option<(Victims, FitKey)>,
}

pub(super) struct Reservation {
    pub terms: LeaseTerms,
    pub gpu: GpuKey,
    pub until: Instant,
}

impl Pool {
    pub(super) fn check_constraints_name_known(
        &self,
        constraints: &Constraints,
    ) -> Result<(), InvalidInput> {
        if let Some(node_id) = &constraints.node_id
            && !self.inventory.nodes.contains_key(node_id)
        {
            return Err(InvalidInput::new(
                "node_id",
                format!("names no known node: {node_id}"),
            ));
        }
        if let Some(uuid) = &constraints.gpu_uuid {
            let present_on = |node_id: &NodeId| {
                self.inventory
                    .gpus
                    .get(&(node_id.clone(), uuid.clone()))
                    .is_some_and(|gpu| gpu.present)
            };
            let known = match &constraints.node_id {
                Some(node_id) => present_on(node_id),
                None => self
                    .inventory
                    .nodes_of_uuid
                    .get(uuid)
                    .is_some_and(|nodes| nodes.iter().any(present_on)),
            };
            if !known {
                let place = constraints
                    .node_id
                    .as_ref()
                    .map(|node_id| format!(" on node {node_id}"))
                    .unwrap_or_default();
                return Err(InvalidInput::new(
                    "gpu_uuid",
                    format!("names no known GPU{place}: {uuid}"),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn best_fit(&self, terms: &LeaseTerms) -> Option<GpuKey> {
        self.inventory
            .candidates(&terms.constraints, terms.mb)
            .next()
            .map(gpu_key)
    }

    /// A repeated acquisition that holds a reservation: granted where it
    /// fits now, otherwise still waiting. `None` when it holds none, or its
    /// GPU can no longer take leases (the reservation is then dropped).
    pub(super) fn acquire_reserved(
        &mut self,
        request: &AcquireRequest,
        now: Moment,
    ) -> Option<(Acquisition, Vec<Change>)> {
        let reservation = self.reservations.get(&request.request_id)?;
        let key = reservation.gpu.clone();
        let reserved_until = reservation.until;
        let mb = request.terms.mb;
        let placeable = self.inventory.is_placeable(&key);
        let fits_reserved =
            placeable && self.inventory.gpus[&key].free_mib_without_reservation(mb) >= mb;
        let target = if fits_reserved {
            Some(key)
        } else {
            self.best_fit(&request.terms)
        };
        if let Some(target) = target {
            self.drop_reservation(&request.request_id);
            let (lease, change) = self.grant(request, target, now);
            return Some((Acquisition::Granted(lease), vec![change]));
        }
        if !placeable {
            self.drop_reservation(&request.request_id);
            return None;
        }
        let until = (now.monotonic + request.wait).max(reserved_until);
        self.set_reservation_until(&request.request_id, until);
        Some((
            Acquisition::Waiting(self.wait_for(&request.request_id).expect("reserved above")),
            Vec::new(),
        ))
    }

    pub(super) fn preempt(
        &mut self,
        request: &AcquireRequest,
        now: Moment,
    ) -> Result<(Acquisition, Vec<Change>), PoolError> {
        let terms = &request.terms;
        let mut search = VictimSearch {
            budget: PREEMPTION_SEARCH_STEPS,
            best: None,
        };
        // GPUs with revoked or reserved memory first: the scan below relies
        // on a GPU's index key being its free memory after revocations.
        for key in &self.inventory.irregular {
            if let Some(fit_key) = self.inventory.gpus[key].fit_key()
                && self.inventory.satisfies(fit_key, &terms.constraints)
            {
                self.consider_victims(terms, fit_key, &mut search);
            }
        }
        // The rest, most free first: what must be revoked only grows, so
        // the scan stops once it exceeds the best set found. Without an
        // ACTIVE lease of lower priority anywhere there is nothing to scan.
        let anything_to_revoke = self
            .active_by_priority
            .first_key_value()
            .is_some_and(|(lowest, _)| *lowest < terms.priority);
        let regular = self
            .inventory
            .candidates_by_most_free(&terms.constraints)
            .take_while(|_| anything_to_revoke);
        for fit_key in regular {
            let key = gpu_key(fit_key);
            if self.inventory.irregular.contains(&key) {
                continue;
            }
            let needed = terms.mb.saturating_sub(fit_key.0);
            if search
                .best
                .as_ref()
                .is_some_and(|(victims, _)| needed > victims.revoked_mib)
            {
                break;
            }
            self.consider_victims(terms, fit_key, &mut search);
        }
        let best = search.best;
        let most_free = self
            .inventory
            .candidates_by_most_free(&terms.constraints)
            .next();
        let shortfall = |blocked| Shortfall {
            mb: terms.mb,
            priority: terms.priority,
            eligible_gpus: self.inventory.count_candidates(&terms.constraints),
            most_free: most_free.map(gpu_free),
            blocked,
        };
        let Some((victims, fit_key)) = best else {
            let blocked = if most_free.is_none() {
                Blocked::NoEligibleGpu
            } else {
                Blocked::NothingToRevoke
            };
            return Err(PoolError::Exhausted(shortfall(blocked)));
        };
        if request.wait.is_zero() {
            return Err(PoolError::Exhausted(shortfall(Blocked::WouldRevoke {
                gpu: gpu_free(&fit_key),
                leases: victims.count,
                revoked_mib: victims.revoked_mib,
            })));
        }
        let key = gpu_key(&fit_key);
        let changes: Vec<Change> = victims
            .generations()
            .iter()
            .rev()
            .filter_map(|generation| self.revoke(*generation, &request.request_id, now))
            .collect();
        self.reserve(request, key, now);
        Ok((
            Acquisition::Waiting(self.wait_for(&request.request_id).expect("reserved above")),
            changes,
        ))
    }

    /// Updates `search` with the best victims on one GPU, if any would do.
    pub(super) fn consider_victims(
        &self,
        terms: &LeaseTerms,
        fit_key: &FitKey,
        search: &mut VictimSearch,
    ) {
        let gpu = &self.inventory.gpus[&gpu_key(fit_key)];
        let needed = terms.mb.saturating_sub(gpu.free_mib_after_revocations());
        if needed == 0 && gpu.revoked_mib == 0 {
            return;
        }
        if search
            .best
            .as_ref()
            .is_some_and(|(victims, _)| needed > victims.revoked_mib)
        {
            return;
        }
        let revocable = gpu
            .leases
            .iter()
            .map(|generation| &self.leases[generation].lease)
            .filter(|lease| {
                lease.state == LeaseState::Active && lease.terms.priority < terms.priority
            });
        if revocable.clone().map(|lease| lease.terms.mb).sum::<u64>() < needed {
            return;
        }
        let candidates: Vec<Candidate> = revocable
            .map(|lease| Candidate {
                generation: lease.generation,
                mb: lease.terms.mb,
                priority: lease.terms.priority,
            })
            .collect();
        let Some(victims) = preemption::choose(candidates, needed, &mut search.budget) else {
            return;
        };
        let better = search.best.as_ref().is_none_or(|(best, best_key)| {
            (&victims, &fit_key.1, fit_key.2) < (best, &best_key.1, best_key.2)
        });
        if better {
            search.best = Some((victims, fit_key.clone()));
        }
    }

    pub(super) fn reserve(&mut self, request: &AcquireRequest, key: GpuKey, now: Moment) {
        let until = now.monotonic + request.wait;
        self.inventory.gpu_entry(&key).reserved_mib += request.terms.mb;
        self.inventory.reindex(&key);
        self.timers
            .insert((until, Timer::Reservation(request.request_id.clone())));
        self.reservations.insert(
            request.request_id.clone(),
            Reservation {
                terms: request.terms.clone(),
                gpu: key,
                until,
            },
        );
    }

    pub(super) fn set_reservation_until(&mut self, request_id: &str, until: Instant) {
        let Some(reservation) = self.reservations.get_mut(request_id) else {
            return;
        };
        let timer = Timer::Reservation(request_id.to_owned());
        self.timers.remove(&(reservation.until, timer.clone()));
        reservation.until = until;
        self.timers.insert((until, timer));
    }

    pub(super) fn drop_reservation(&mut self, request_id: &str) {
        let Some(reservation) = self.reservations.remove(request_id) else {
            return;
        };
        self.timers
            .remove(&(reservation.until, Timer::Reservation(request_id.to_owned())));
        if let Some(gpu) = self.inventory.gpus.get_mut(&reservation.gpu) {
            gpu.reserved_mib -= reservation.terms.mb;
        }
        self.inventory.reindex(&reservation.gpu);
        self.inventory.forget_if_unused(&reservation.gpu);
    }

    pub(super) fn wait_for(&self, request_id: &str) -> Option<Wait> {
        let reservation = self.reservations.get(request_id)?;
        let gpu = &self.inventory.gpus[&reservation.gpu];
        let revoked: Vec<&Entry> = gpu
            .leases
            .iter()
            .map(|generation| &self.leases[generation])
            .filter(|entry| entry.lease.state == LeaseState::Revoked)
            .collect();
        let retry_at = if revoked.is_empty() {
            None
        } else {
            revoked
                .iter()
                .map(|entry| entry.due())
                .collect::<Option<Vec<Instant>>>()
                .and_then(|dues| dues.into_iter().max())
        };
        Some(Wait {
            node_id: reservation.gpu.0.clone(),
            gpu_uuid: reservation.gpu.1.clone(),
            gpu_index: gpu.index,
            waiting_for: revoked
                .iter()
                .map(|entry| entry.lease.lease_id.clone())
                .collect(),
            retry_at,
            reserved_until: reservation.until,
        })
    }
}

pub(super) fn gpu_free(fit_key: &FitKey) -> GpuFree {
    GpuFree {
        node_id: gpu_key(fit_key).0,
        index: fit_key.2,
        free_mib: fit_key.0,
    }
}
