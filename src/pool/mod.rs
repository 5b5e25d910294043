//! The VRAM lease pool: which GPU memory is leased to whom, as a state
//! machine with no I/O. Time is passed in as a [`Moment`]; every call that
//! changes a lease returns the [`Change`]s it made, in order, for the layer
//! above to persist (in batches) and to publish as events.
//!
//! Counting:
//! - A lease counts against its GPU while it is ACTIVE, REVOKED or
//!   SUSPENDED; RELEASED leases count for nothing.
//! - Free memory on a GPU is its total minus the larger of (the leases that
//!   count plus the memory reserved for waiting acquisitions) and the memory
//!   its node reports in use.
//! - A lease is granted only where it fits in free memory, so the leases
//!   counted on a GPU never exceed its total while its total stays as
//!   reported (a node reporting a smaller total is believed; the free
//!   memory is then zero, never negative).
//!
//! Placement:
//! - Only GPUs that are present in their node's latest inventory, healthy,
//!   on an ONLINE node that is not drained, and that satisfy every
//!   constraint (node id, GPU uuid, label selector) are considered.
//! - Best fit: the least free memory that is large enough; ties by node id,
//!   then GPU index, then uuid. The same state and request always give the
//!   same GPU.
//! - A `node_id` or `gpu_uuid` constraint naming nothing in the inventory is
//!   invalid input; one naming a GPU that is merely unplaceable now is not.
//!
//! Preemption, when nothing fits:
//! - Only ACTIVE leases of strictly lower priority are candidates; equal
//!   priority never preempts, and SUSPENDED or REVOKED leases are not
//!   revoked (again).
//! - All victims are on ONE placeable GPU satisfying the constraints, and
//!   together they must free enough, counting the memory of leases already
//!   REVOKED there as freed and the memory in use that no lease accounts
//!   for as staying in use; if no GPU has such a set, nothing is revoked.
//! - The set chosen on a GPU and the GPU chosen are the least by: MiB
//!   revoked, then the highest priority among the victims, then the number
//!   of victims, then the newest victims, then node id and GPU index (see
//!   `preemption.rs` for the exact order).
//! - A request with a zero `wait` revokes nothing: it is told what revoking
//!   would free. Otherwise the victims become REVOKED and the request's
//!   memory is **reserved** on that GPU: no other acquisition can take the
//!   memory the victims free. [`Pool::acquire`] answers
//!   [`Acquisition::Waiting`], naming the leases it waits for and the
//!   moment the last of them is freed by the revoke grace at the latest.
//! - Calling `acquire` again with the same request grants the lease once it
//!   fits (on the reserved GPU, or on any other GPU that fits meanwhile),
//!   and otherwise answers `Waiting` again and extends the reservation to
//!   the new call's wait. The service waits up to its deadline, calling
//!   again when a lease it waits for is released, when the GPU's inventory
//!   changes, or at `retry_at`; when the deadline passes it calls
//!   [`Pool::withdraw`], which frees the reservation and returns the
//!   [`Shortfall`] ([`Blocked::WaitedInVain`]) to answer RESOURCE_EXHAUSTED
//!   with. A reservation nobody withdraws lapses at its wait's end on
//!   [`Pool::tick`]. Any request, of any priority, may wait for memory that
//!   leases already REVOKED will free, as long as the reservations already
//!   made there leave room: it revokes nothing more.
//! - Reservations are not persisted: after a restart the caller's retry
//!   starts over, and the leases already REVOKED count as freed, so nothing
//!   more is revoked for it.
//! - A REVOKED lease is freed when its holder releases it or when
//!   `revoke_grace` has passed since it was revoked, whichever is first
//!   (or its TTL, if that comes sooner). It cannot be renewed.
//!
//! Lifetimes:
//! - Every lease has a TTL in [`MIN_TTL`, `MAX_TTL`]; an ACTIVE lease not
//!   renewed within it is RELEASED by `tick`. A renewal at or past the
//!   deadline fails even before `tick` has run.
//! - `release` is idempotent: releasing an unknown or released lease
//!   succeeds and changes nothing.
//! - The same `request_id` with the same terms returns the same lease,
//!   whatever its state, until the lease is forgotten `released_retention`
//!   after its release; with other terms it is refused naming the field.
//! - Generations (fencing tokens) increase with every grant and are never
//!   reused: a restored pool continues after the larger of the persisted
//!   last generation and every persisted lease's generation.
//!
//! Nodes:
//! - OFFLINE: its ACTIVE leases become SUSPENDED, still counted and never
//!   placed elsewhere. ONLINE again within `orphan_grace`: they are ACTIVE
//!   again with a full TTL from that moment. Otherwise `tick` releases
//!   them. While SUSPENDED a lease does not expire by its TTL (its holder
//!   may not be able to renew) and may still be renewed.
//! - LEFT or removed (expired, or by an operator): its leases are RELEASED
//!   at once. UNKNOWN changes nothing.
//! - Drained, or a GPU unhealthy: no new lease lands there; existing leases
//!   are untouched.
//! - A GPU that vanishes from its node's inventory keeps its leases (and
//!   their count) until they are released; it takes no new lease.
//!
//! Restart:
//! - [`Pool::restore`] loads the persisted leases unsettled: `tick`
//!   releases nothing until [`Pool::reconcile`] is called, once the probe
//!   round has settled, with every node the registry knows.
//! - `reconcile` starts every deadline over from that moment, because the
//!   holders could not renew while the coordinator was down and stored
//!   wall-clock moments may be wrong: ACTIVE and REVOKED leases get a full
//!   TTL, REVOKED ones a full revoke grace, SUSPENDED ones a full orphan
//!   grace. Only node facts release leases then: a node LEFT or no longer
//!   known. No lease is released merely because the coordinator restarted.
//!
//! Cost: acquire and release are O(log GPUs) without constraints or with a
//! node or GPU constraint; a label selector scans the best-fit index from
//! the requested size up. Deadlines sit in one ordered set, so `tick` costs
//! O(log leases) per deadline due. Preemption is skipped outright when no
//! ACTIVE lease has a lower priority; otherwise it visits GPUs holding
//! revoked or reserved memory, then the others from the most free down,
//! stopping once a GPU would need more revoked than the best set found, so
//! it is O(GPUs + leases) only when nothing can be revoked anywhere. `list`
//! is O(leases).

mod acquisition;
mod error;
mod inventory;
mod lease;
mod preemption;
mod selector;
mod transitions;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

pub use error::{Blocked, GpuFree, PoolError, Shortfall, Unrenewable};
pub use inventory::{GpuUsage, GpuView, NodeView};
pub use lease::{
    AcquireRequest, Change, Constraints, Event, Lease, LeaseId, LeaseState, LeaseTerms,
    MAX_GPU_UUID_LEN, MAX_HOLDER_LEN, MAX_REQUEST_ID_LEN, MAX_TTL, MAX_WAIT, MIN_TTL,
    ReleaseReason,
};
pub use selector::LabelSelector;

use crate::{
    clock::Moment,
    node::{NodeId, NodeState},
    validation::InvalidInput,
};
use acquisition::{Reservation, gpu_free};
use inventory::{Inventory, NodeEntry};
use transitions::Entry;

pub const DEFAULT_REVOKE_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(600);
pub const DEFAULT_RELEASED_RETENTION: Duration = Duration::from_secs(60);
/// Search steps one preemption may spend choosing victims, over all GPUs.
const PREEMPTION_SEARCH_STEPS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// How long a revoked lease's memory stays counted if its holder does
    /// not release it.
    pub revoke_grace: Duration,
    /// How long a SUSPENDED lease waits for its node to come back.
    pub orphan_grace: Duration,
    /// How long a RELEASED lease is kept, for `list` and for retries of its
    /// `request_id`, before it is forgotten.
    pub released_retention: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            revoke_grace: DEFAULT_REVOKE_GRACE,
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            released_retention: DEFAULT_RELEASED_RETENTION,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per call and moved, never stored in bulk"
)]
pub enum Acquisition {
    Granted(Lease),
    Waiting(Wait),
}

/// An acquisition that revoked leases and holds a reservation until they
/// are freed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    pub node_id: NodeId,
    pub gpu_uuid: String,
    pub gpu_index: u32,
    /// The REVOKED leases on that GPU.
    pub waiting_for: Vec<LeaseId>,
    /// When the revoke grace frees the last of them; `None` when the
    /// memory the node reports in use is what still stands in the way, or
    /// before the pool is reconciled.
    pub retry_at: Option<Instant>,
    /// When the reservation lapses unless the request is repeated.
    pub reserved_until: Instant,
}

/// What the store keeps, and what a pool is restored from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PersistedPool {
    /// The highest generation ever issued, including leases since forgotten.
    pub last_generation: u64,
    pub leases: Vec<Lease>,
}

/// What `list` returns: leases matching every field given; `states` empty
/// means any state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    pub node_id: Option<NodeId>,
    pub gpu_uuid: Option<String>,
    pub holder: Option<String>,
    pub states: Vec<LeaseState>,
}

impl LeaseFilter {
    fn matches(&self, lease: &Lease) -> bool {
        self.node_id.as_ref().is_none_or(|n| *n == lease.node_id)
            && self.gpu_uuid.as_ref().is_none_or(|u| *u == lease.gpu_uuid)
            && self
                .holder
                .as_ref()
                .is_none_or(|h| *h == lease.terms.holder)
            && (self.states.is_empty() || self.states.contains(&lease.state))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Lease(u64),
    Reservation(String),
}

pub struct Pool {
    config: PoolConfig,
    inventory: Inventory,
    // The maps that grow with the number of leases are ordered maps: a hash
    // map doubling at a quarter of a million leases stalls the call that
    // grows it for a fifth of a second.
    /// By generation.
    leases: BTreeMap<u64, Entry>,
    by_id: BTreeMap<LeaseId, u64>,
    by_request: BTreeMap<String, u64>,
    reservations: HashMap<String, Reservation>,
    timers: BTreeSet<(Instant, Timer)>,
    /// How many ACTIVE leases there are of each priority: a request above
    /// none of them has nothing to preempt, without a scan.
    active_by_priority: BTreeMap<i32, usize>,
    last_generation: u64,
    settled: bool,
}

impl Pool {
    /// An empty pool that has nothing to reconcile.
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config,
            inventory: Inventory::default(),
            leases: BTreeMap::new(),
            by_id: BTreeMap::new(),
            by_request: BTreeMap::new(),
            reservations: HashMap::new(),
            timers: BTreeSet::new(),
            active_by_priority: BTreeMap::new(),
            last_generation: 0,
            settled: true,
        }
    }

    /// A pool holding the persisted leases, unsettled until
    /// [`Pool::reconcile`].
    pub fn restore(config: PoolConfig, persisted: PersistedPool) -> Result<Self, PoolError> {
        let mut pool = Self::new(config);
        pool.settled = false;
        pool.last_generation = persisted.last_generation;
        for lease in persisted.leases {
            let generation = lease.generation;
            if pool.leases.contains_key(&generation) {
                return Err(PoolError::Inconsistent(format!(
                    "two leases have generation {generation}"
                )));
            }
            if pool.by_id.contains_key(&lease.lease_id) {
                return Err(PoolError::Inconsistent(format!(
                    "two leases have the id {}",
                    lease.lease_id
                )));
            }
            if pool.by_request.contains_key(&lease.request_id) {
                return Err(PoolError::Inconsistent(format!(
                    "two leases have the request_id {:?}",
                    lease.request_id
                )));
            }
            pool.last_generation = pool.last_generation.max(generation);
            if lease.state == LeaseState::Active {
                pool.count_active(lease.terms.priority, true);
            }
            if lease.state.counts() {
                let gpu = pool
                    .inventory
                    .gpu_entry(&(lease.node_id.clone(), lease.gpu_uuid.clone()));
                gpu.leased_mib += lease.terms.mb;
                if lease.state == LeaseState::Revoked {
                    gpu.revoked_mib += lease.terms.mb;
                }
                gpu.leases.insert(generation);
            }
            pool.by_id.insert(lease.lease_id.clone(), generation);
            pool.by_request.insert(lease.request_id.clone(), generation);
            pool.leases.insert(
                generation,
                Entry {
                    lease,
                    expires: None,
                    grace_ends: None,
                    forget_at: None,
                    timer: None,
                },
            );
        }
        Ok(pool)
    }

    /// Everything the store needs to restore this pool.
    pub fn snapshot(&self) -> PersistedPool {
        PersistedPool {
            last_generation: self.last_generation,
            leases: self.list(&LeaseFilter::default()),
        }
    }

    pub fn last_generation(&self) -> u64 {
        self.last_generation
    }

    /// Whether deadlines run: always for a new pool, after `reconcile` for
    /// a restored one.
    pub fn is_settled(&self) -> bool {
        self.settled
    }

    /// The earliest moment `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    pub fn get(&self, lease_id: &LeaseId) -> Option<&Lease> {
        let generation = self.by_id.get(lease_id)?;
        self.leases.get(generation).map(|entry| &entry.lease)
    }

    /// Matching leases, oldest grant first.
    pub fn list(&self, filter: &LeaseFilter) -> Vec<Lease> {
        let mut leases: Vec<&Lease> = self
            .leases
            .values()
            .map(|entry| &entry.lease)
            .filter(|lease| filter.matches(lease))
            .collect();
        leases.sort_unstable_by_key(|lease| lease.generation);
        leases.into_iter().cloned().collect()
    }

    pub fn gpu_usage(&self, node_id: &NodeId, uuid: &str) -> Option<GpuUsage> {
        self.inventory.usage(&(node_id.clone(), uuid.to_owned()))
    }

    /// Every GPU the pool knows, by node id, then index.
    pub fn gpus(&self) -> Vec<GpuUsage> {
        let mut gpus: Vec<GpuUsage> = self
            .inventory
            .gpus
            .keys()
            .filter_map(|key| self.inventory.usage(key))
            .collect();
        gpus.sort_unstable_by(|a, b| {
            (&a.node_id, a.index, &a.uuid).cmp(&(&b.node_id, b.index, &b.uuid))
        });
        gpus
    }

    /// Adds a node or applies what changed about it: its state (with what
    /// that means for its leases), drain and labels.
    pub fn upsert_node(&mut self, view: NodeView, now: Moment) -> Vec<Change> {
        let node_id = view.node_id;
        self.inventory.nodes.insert(
            node_id.clone(),
            NodeEntry {
                state: view.state,
                drained: view.drained,
                labels: view.labels,
            },
        );
        let mut changes = Vec::new();
        for generation in self.leases_on_node(&node_id) {
            let change = match view.state {
                NodeState::Online => self.resume(generation, now),
                NodeState::Offline => self.suspend(generation, now),
                NodeState::Left => self.release_entry(generation, ReleaseReason::NodeLeft, now),
                NodeState::Unknown => None,
            };
            changes.extend(change);
        }
        self.inventory.reindex_node(&node_id);
        changes
    }

    /// Replaces a node's GPU inventory. The node must have been upserted.
    pub fn set_gpus(&mut self, node_id: &NodeId, gpus: Vec<GpuView>) -> Result<(), PoolError> {
        if !self.inventory.nodes.contains_key(node_id) {
            return Err(PoolError::UnknownNode(node_id.clone()));
        }
        let mut uuids = HashSet::new();
        let mut indexes = HashSet::new();
        for gpu in &gpus {
            if gpu.uuid.is_empty() || gpu.uuid.len() > MAX_GPU_UUID_LEN {
                return Err(InvalidInput::new(
                    "gpus.uuid",
                    format!(
                        "must be 1 to {MAX_GPU_UUID_LEN} bytes, got {}",
                        gpu.uuid.len()
                    ),
                )
                .into());
            }
            if !uuids.insert(gpu.uuid.as_str()) {
                return Err(InvalidInput::new(
                    "gpus.uuid",
                    format!("{:?} is reported twice on node {node_id}", gpu.uuid),
                )
                .into());
            }
            if !indexes.insert(gpu.index) {
                return Err(InvalidInput::new(
                    "gpus.index",
                    format!("{} is reported twice on node {node_id}", gpu.index),
                )
                .into());
            }
        }
        self.inventory.set_gpus(node_id, gpus);
        Ok(())
    }

    /// The node expired or was removed: its leases are released at once.
    pub fn remove_node(&mut self, node_id: &NodeId, now: Moment) -> Vec<Change> {
        let changes = self
            .leases_on_node(node_id)
            .into_iter()
            .filter_map(|generation| {
                self.release_entry(generation, ReleaseReason::NodeRemoved, now)
            })
            .collect();
        self.inventory.remove_node(node_id);
        changes
    }

    /// Settles a restored pool once the probe round is over: `nodes` is
    /// every node the registry knows. Deadlines start over the first time
    /// (see the module doc); nodes not listed are removed.
    pub fn reconcile(&mut self, nodes: Vec<NodeView>, now: Moment) -> Vec<Change> {
        let mut changes = Vec::new();
        if !self.settled {
            self.settled = true;
            let mut generations: Vec<u64> = self.leases.keys().copied().collect();
            generations.sort_unstable();
            for generation in generations {
                changes.extend(self.restart_deadlines(generation, now));
            }
        }
        let listed: HashSet<NodeId> = nodes.iter().map(|view| view.node_id.clone()).collect();
        for view in nodes {
            changes.extend(self.upsert_node(view, now));
        }
        let mut unlisted: Vec<NodeId> = self
            .inventory
            .nodes
            .keys()
            .chain(self.inventory.gpus_of_node.keys())
            .filter(|node_id| !listed.contains(*node_id))
            .cloned()
            .collect();
        unlisted.sort_unstable();
        unlisted.dedup();
        for node_id in unlisted {
            changes.extend(self.remove_node(&node_id, now));
        }
        changes
    }

    /// Grants a lease, answers that it waits for revoked leases, or says
    /// what was missing. See the module doc for the rules.
    pub fn acquire(
        &mut self,
        request: &AcquireRequest,
        now: Moment,
    ) -> Result<(Acquisition, Vec<Change>), PoolError> {
        request.validate()?;
        let reused = |field| PoolError::RequestIdReused {
            request_id: request.request_id.clone(),
            field,
        };
        if let Some(generation) = self.by_request.get(&request.request_id) {
            let lease = &self.leases[generation].lease;
            if let Some(field) = lease.terms.first_difference(&request.terms) {
                return Err(reused(field));
            }
            return Ok((Acquisition::Granted(lease.clone()), Vec::new()));
        }
        if let Some(reservation) = self.reservations.get(&request.request_id)
            && let Some(field) = reservation.terms.first_difference(&request.terms)
        {
            return Err(reused(field));
        }
        self.check_constraints_name_known(&request.terms.constraints)?;
        if let Some(outcome) = self.acquire_reserved(request, now) {
            return Ok(outcome);
        }
        if let Some(key) = self.best_fit(&request.terms) {
            let (lease, change) = self.grant(request, key, now);
            return Ok((Acquisition::Granted(lease), vec![change]));
        }
        self.preempt(request, now)
    }

    /// Gives up a waiting acquisition's reservation when its wait is over,
    /// saying what it waited for; `None` when it holds no reservation.
    pub fn withdraw(&mut self, request_id: &str) -> Option<Shortfall> {
        let wait = self.wait_for(request_id)?;
        let terms = self.reservations[request_id].terms.clone();
        self.drop_reservation(request_id);
        let most_free = self
            .inventory
            .candidates_by_most_free(&terms.constraints)
            .next()
            .map(gpu_free);
        Some(Shortfall {
            mb: terms.mb,
            priority: terms.priority,
            eligible_gpus: self.inventory.count_candidates(&terms.constraints),
            most_free,
            blocked: Blocked::WaitedInVain {
                waiting_for: wait.waiting_for,
            },
        })
    }

    /// Extends an ACTIVE (or SUSPENDED) lease by its TTL from `now`.
    pub fn renew(
        &mut self,
        lease_id: &LeaseId,
        now: Moment,
    ) -> Result<(Lease, Vec<Change>), PoolError> {
        let generation = *self
            .by_id
            .get(lease_id)
            .ok_or_else(|| PoolError::UnknownLease(lease_id.clone()))?;
        let settled = self.settled;
        let entry = self
            .leases
            .get_mut(&generation)
            .expect("indexed leases exist");
        let refuse = |why| PoolError::NotRenewable {
            lease_id: lease_id.clone(),
            why,
        };
        match entry.lease.state {
            LeaseState::Released => {
                let why = match entry.lease.release_reason {
                    Some(ReleaseReason::Expired) | None => Unrenewable::Expired {
                        at: entry.lease.expires_at,
                    },
                    Some(reason) => Unrenewable::Released { reason },
                };
                return Err(refuse(why));
            }
            LeaseState::Revoked => {
                let at = entry.lease.revoked_at.unwrap_or(entry.lease.expires_at);
                return Err(refuse(Unrenewable::Revoked { at }));
            }
            LeaseState::Active if settled && entry.expires.is_some_and(|e| now.monotonic >= e) => {
                return Err(refuse(Unrenewable::Expired {
                    at: entry.lease.expires_at,
                }));
            }
            LeaseState::Active | LeaseState::Suspended => {}
        }
        let ttl = entry.lease.terms.ttl;
        entry.expires = Some(now.monotonic + ttl);
        entry.lease.expires_at = now.wall + ttl;
        let lease = entry.lease.clone();
        self.retime(generation);
        Ok((
            lease.clone(),
            vec![Change {
                event: Event::Renewed,
                lease,
            }],
        ))
    }

    /// Releases a lease; unknown and released leases are fine.
    pub fn release(&mut self, lease_id: &LeaseId, now: Moment) -> Vec<Change> {
        let Some(&generation) = self.by_id.get(lease_id) else {
            return Vec::new();
        };
        self.release_entry(generation, ReleaseReason::Holder, now)
            .into_iter()
            .collect()
    }

    /// Applies every deadline at or before `now`: expiry, the ends of
    /// revoke and orphan graces, forgetting, lapsed reservations.
    pub fn tick(&mut self, now: Moment) -> Vec<Change> {
        let mut changes = Vec::new();
        if !self.settled {
            return changes;
        }
        while let Some((at, timer)) = self.timers.first().cloned() {
            if at > now.monotonic {
                break;
            }
            self.timers.remove(&(at, timer.clone()));
            match timer {
                Timer::Reservation(request_id) => self.drop_reservation(&request_id),
                Timer::Lease(generation) => {
                    if let Some(entry) = self.leases.get_mut(&generation) {
                        entry.timer = None;
                    }
                    changes.extend(self.on_deadline(generation, now));
                }
            }
        }
        changes
    }

    /// Generations of the leases counted on the node's GPUs, in order.
    fn leases_on_node(&self, node_id: &NodeId) -> Vec<u64> {
        let mut generations: Vec<u64> = self
            .inventory
            .gpus_of_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|uuid| self.inventory.gpus.get(&(node_id.clone(), uuid.clone())))
            .flat_map(|gpu| gpu.leases.iter().copied())
            .collect();
        generations.sort_unstable();
        generations
    }
}
