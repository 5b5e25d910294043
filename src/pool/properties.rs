//! Property tests: random sequences of acquisitions, releases, renewals,
//! node changes, usage reports, time passing and restarts, checking the
//! pool's invariants after every step. `PROPTEST_CASES` sets how many
//! sequences run (256 by default).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::{
    inventory::{GpuKey, gpu_key},
    preemption::{Candidate, Victims},
    *,
};

const NODES: usize = 3;
const GPUS_PER_NODE: u32 = 2;
const TOTAL_MIB: [u64; 2] = [1000, 600];

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        key: u8,
        mb: u64,
        priority: i32,
        waits: bool,
        node: Option<usize>,
    },
    Release(u8),
    Renew(u8),
    Withdraw(u8),
    Advance(Duration),
    SetState(usize, NodeState),
    Drain(usize, bool),
    ReportUsed {
        node: usize,
        gpu: u32,
        used_mib: u64,
        healthy: bool,
    },
    Remove(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    let state = prop_oneof![
        3 => Just(NodeState::Online),
        2 => Just(NodeState::Offline),
        1 => Just(NodeState::Unknown),
        1 => Just(NodeState::Left),
    ];
    prop_oneof![
        8 => (0..12u8, 1..700u64, 0..4i32, any::<bool>(), prop::option::weighted(0.2, node.clone()))
            .prop_map(|(key, mb, priority, waits, node)| Op::Acquire { key, mb, priority, waits, node }),
        3 => (0..12u8).prop_map(Op::Release),
        2 => (0..12u8).prop_map(Op::Renew),
        1 => (0..12u8).prop_map(Op::Withdraw),
        4 => (0..90_000u64).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        3 => (node.clone(), state).prop_map(|(node, state)| Op::SetState(node, state)),
        1 => (node.clone(), any::<bool>()).prop_map(|(node, drained)| Op::Drain(node, drained)),
        2 => (node.clone(), 0..GPUS_PER_NODE, 0..1200u64, prop::bool::weighted(0.8))
            .prop_map(|(node, gpu, used_mib, healthy)| Op::ReportUsed { node, gpu, used_mib, healthy }),
        1 => node.prop_map(Op::Remove),
        1 => Just(Op::Restart),
    ]
}

fn node_id(node: usize) -> NodeId {
    NodeId::parse("node_id", &format!("n{node}")).unwrap()
}

fn gpu(gpu: u32, used_mib: u64, healthy: bool) -> GpuView {
    GpuView {
        index: gpu,
        uuid: format!("GPU-{gpu}"),
        total_mib: TOTAL_MIB[gpu as usize],
        used_mib,
        healthy,
    }
}

/// The fleet as the registry would tell it, and the acquisitions made.
struct World {
    pool: Pool,
    now: Moment,
    nodes: BTreeMap<usize, NodeView>,
    gpus: BTreeMap<usize, Vec<GpuView>>,
    /// The terms each request key was first used with.
    requests: HashMap<u8, AcquireRequest>,
    /// The lease each request key got, if any.
    granted: HashMap<u8, LeaseId>,
    highest_generation_seen: u64,
    config: PoolConfig,
}

impl World {
    fn new() -> Self {
        let config = PoolConfig {
            revoke_grace: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(120),
            released_retention: Duration::from_secs(60),
        };
        Self {
            pool: Pool::new(config),
            now: Moment::now(),
            nodes: BTreeMap::new(),
            gpus: BTreeMap::new(),
            requests: HashMap::new(),
            granted: HashMap::new(),
            highest_generation_seen: 0,
            config,
        }
    }

    fn ensure_node(&mut self, node: usize) {
        if self.nodes.contains_key(&node) {
            return;
        }
        let view = NodeView {
            node_id: node_id(node),
            state: NodeState::Online,
            drained: false,
            labels: BTreeMap::new(),
        };
        self.pool.upsert_node(view.clone(), self.now);
        let gpus: Vec<GpuView> = (0..GPUS_PER_NODE).map(|g| gpu(g, 0, true)).collect();
        self.pool.set_gpus(&node_id(node), gpus.clone()).unwrap();
        self.nodes.insert(node, view);
        self.gpus.insert(node, gpus);
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Acquire {
                key,
                mb,
                priority,
                waits,
                node,
            } => {
                if let Some(node) = node {
                    self.ensure_node(*node);
                }
                let request = self.requests.entry(*key).or_insert_with(|| AcquireRequest {
                    request_id: format!("req-{key}"),
                    terms: LeaseTerms {
                        holder: "prop".into(),
                        mb: *mb,
                        priority: *priority,
                        ttl: Duration::from_secs(40),
                        constraints: Constraints {
                            node_id: node.map(node_id),
                            ..Constraints::default()
                        },
                    },
                    wait: if *waits {
                        Duration::from_secs(20)
                    } else {
                        Duration::ZERO
                    },
                });
                let request = request.clone();
                let fresh = !self.pool.by_request.contains_key(&request.request_id)
                    && !self.pool.reservations.contains_key(&request.request_id);
                let fits = self.pool.best_fit(&request.terms).is_some();
                let expected = best_victims_by_brute_force(&self.pool, &request.terms);
                match self.pool.acquire(&request, self.now) {
                    Ok((Acquisition::Granted(lease), changes)) => {
                        prop_assert_eq!(&lease.terms, &request.terms);
                        if self.granted.get(key) == Some(&lease.lease_id) {
                            prop_assert!(changes.is_empty());
                        }
                        if !changes.is_empty() {
                            prop_assert!(lease.generation > self.highest_generation_seen);
                            self.highest_generation_seen = lease.generation;
                        }
                        self.granted.insert(*key, lease.lease_id);
                    }
                    Ok((Acquisition::Waiting(wait), changes)) => {
                        prop_assert!(!request.wait.is_zero(), "only waiting requests revoke");
                        if fresh {
                            let revoked: Vec<u64> =
                                changes.iter().map(|c| c.lease.generation).collect();
                            let gpu = (wait.node_id.clone(), wait.gpu_uuid.clone());
                            prop_assert_eq!(expected, Some((gpu, revoked)));
                        }
                        for change in &changes {
                            prop_assert!(change.lease.terms.priority < request.terms.priority);
                            prop_assert_eq!(change.lease.state, LeaseState::Revoked);
                            prop_assert_eq!(&change.lease.node_id, &wait.node_id);
                        }
                    }
                    Err(PoolError::Exhausted(shortfall)) => {
                        if fresh && !fits {
                            match shortfall.blocked {
                                Blocked::WouldRevoke { leases, .. } => {
                                    let count = expected.map(|(_, victims)| victims.len());
                                    prop_assert_eq!(count, Some(leases));
                                }
                                _ => prop_assert_eq!(expected, None),
                            }
                        }
                    }
                    Err(PoolError::Invalid(invalid)) => {
                        prop_assert_eq!(invalid.field, "node_id");
                    }
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
            Op::Release(key) => {
                if let Some(lease_id) = self.granted.get(key) {
                    self.pool.release(lease_id, self.now);
                    prop_assert!(self.pool.release(lease_id, self.now).is_empty());
                }
            }
            Op::Renew(key) => {
                if let Some(lease_id) = self.granted.get(key) {
                    let before = self.pool.get(lease_id).map(|lease| lease.state);
                    let renewed = self.pool.renew(lease_id, self.now);
                    if let Ok((lease, _)) = renewed {
                        prop_assert!(matches!(
                            before,
                            Some(LeaseState::Active | LeaseState::Suspended)
                        ));
                        prop_assert_eq!(lease.expires_at, self.now.wall + lease.terms.ttl);
                    }
                }
            }
            Op::Withdraw(key) => {
                let request_id = format!("req-{key}");
                if let Some(shortfall) = self.pool.withdraw(&request_id) {
                    let waited = matches!(shortfall.blocked, Blocked::WaitedInVain { .. });
                    prop_assert!(waited, "{}", shortfall);
                    let again = self.pool.withdraw(&request_id);
                    prop_assert!(again.is_none());
                }
            }
            Op::Advance(by) => {
                self.now = self.now.after(*by);
                for change in self.pool.tick(self.now) {
                    prop_assert!(matches!(
                        change.event,
                        Event::Released(_) | Event::Forgotten
                    ));
                }
            }
            Op::SetState(node, state) => {
                self.ensure_node(*node);
                let view = self.nodes.get_mut(node).unwrap();
                view.state = *state;
                let view = view.clone();
                let changes = self.pool.upsert_node(view, self.now);
                for change in changes {
                    prop_assert_eq!(change.lease.node_id, node_id(*node));
                    let expected = match state {
                        NodeState::Online => {
                            matches!(
                                change.event,
                                Event::Resumed | Event::Released(ReleaseReason::Orphaned)
                            )
                        }
                        NodeState::Offline => change.event == Event::Suspended,
                        NodeState::Left => change.event == Event::Released(ReleaseReason::NodeLeft),
                        NodeState::Unknown => false,
                    };
                    prop_assert!(expected, "{:?} after {:?}", change.event, state);
                }
            }
            Op::Drain(node, drained) => {
                self.ensure_node(*node);
                let view = self.nodes.get_mut(node).unwrap();
                view.drained = *drained;
                let view = view.clone();
                prop_assert!(self.pool.upsert_node(view, self.now).is_empty());
            }
            Op::ReportUsed {
                node,
                gpu: index,
                used_mib,
                healthy,
            } => {
                self.ensure_node(*node);
                let gpus = self.gpus.get_mut(node).unwrap();
                gpus[*index as usize] = gpu(*index, *used_mib, *healthy);
                let gpus = gpus.clone();
                self.pool.set_gpus(&node_id(*node), gpus).unwrap();
            }
            Op::Remove(node) => {
                if self.nodes.remove(node).is_some() {
                    self.gpus.remove(node);
                    for change in self.pool.remove_node(&node_id(*node), self.now) {
                        prop_assert_eq!(change.event, Event::Released(ReleaseReason::NodeRemoved));
                    }
                }
            }
            Op::Restart => {
                let before = self.pool.snapshot();
                let counted_before = counted(&before.leases);
                self.pool = Pool::restore(self.config, before.clone()).unwrap();
                prop_assert!(self.pool.last_generation() >= before.last_generation);
                for (node, gpus) in &self.gpus {
                    self.pool.upsert_node(self.nodes[node].clone(), self.now);
                    self.pool.set_gpus(&node_id(*node), gpus.clone()).unwrap();
                }
                let views: Vec<NodeView> = self.nodes.values().cloned().collect();
                let changes = self.pool.reconcile(views, self.now);
                for change in &changes {
                    let node_gone = match self
                        .nodes
                        .iter()
                        .find(|(n, _)| node_id(**n) == change.lease.node_id)
                    {
                        None => true,
                        Some((_, view)) => view.state == NodeState::Left,
                    };
                    if let Event::Released(_) = change.event {
                        prop_assert!(node_gone, "released without a node fact: {:?}", change);
                    }
                }
                let after = counted(&self.pool.snapshot().leases);
                for id in counted_before.difference(&after) {
                    prop_assert!(
                        changes.iter().any(|c| &c.lease.lease_id == id),
                        "lease {} vanished silently",
                        id
                    );
                }
            }
        }
        check_invariants(&self.pool)
    }
}

/// The victims preemption must choose, by trying every subset of the
/// candidates on every eligible GPU: the GPU and the generations revoked,
/// oldest first.
fn best_victims_by_brute_force(pool: &Pool, terms: &LeaseTerms) -> Option<(GpuKey, Vec<u64>)> {
    type Rank = (Victims, NodeId, u32);
    let mut best: Option<(Rank, GpuKey, Vec<u64>)> = None;
    for fit_key in pool.inventory.candidates(&terms.constraints, 0) {
        let key = gpu_key(fit_key);
        let gpu = &pool.inventory.gpus[&key];
        let needed = terms.mb.saturating_sub(gpu.free_mib_after_revocations());
        if needed == 0 && gpu.revoked_mib == 0 {
            continue;
        }
        let candidates: Vec<Candidate> = gpu
            .leases
            .iter()
            .map(|generation| &pool.leases[generation].lease)
            .filter(|lease| {
                lease.state == LeaseState::Active && lease.terms.priority < terms.priority
            })
            .map(|lease| Candidate {
                generation: lease.generation,
                mb: lease.terms.mb,
                priority: lease.terms.priority,
            })
            .collect();
        for mask in 0u32..(1 << candidates.len()) {
            let chosen: Vec<Candidate> = (0..candidates.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| candidates[i])
                .collect();
            if chosen.iter().map(|c| c.mb).sum::<u64>() < needed {
                continue;
            }
            let rank = (Victims::of(&chosen), key.0.clone(), gpu.index);
            if best
                .as_ref()
                .is_none_or(|(best_rank, _, _)| rank < *best_rank)
            {
                let mut generations: Vec<u64> = chosen.iter().map(|c| c.generation).collect();
                generations.sort_unstable();
                best = Some((rank, key.clone(), generations));
            }
        }
    }
    best.map(|(_, key, generations)| (key, generations))
}

fn counted(leases: &[Lease]) -> std::collections::BTreeSet<LeaseId> {
    leases
        .iter()
        .filter(|lease| lease.state.counts())
        .map(|lease| lease.lease_id.clone())
        .collect()
}

fn check_invariants(pool: &Pool) -> Result<(), TestCaseError> {
    let mut leased: HashMap<GpuKey, (u64, u64)> = HashMap::new();
    for (generation, entry) in &pool.leases {
        let lease = &entry.lease;
        prop_assert_eq!(*generation, lease.generation);
        prop_assert!(lease.generation <= pool.last_generation);
        prop_assert_eq!(pool.by_id.get(&lease.lease_id), Some(generation));
        prop_assert_eq!(pool.by_request.get(&lease.request_id), Some(generation));
        if lease.state.counts() {
            let sums = leased
                .entry((lease.node_id.clone(), lease.gpu_uuid.clone()))
                .or_default();
            sums.0 += lease.terms.mb;
            if lease.state == LeaseState::Revoked {
                sums.1 += lease.terms.mb;
            }
        }
        if pool.settled {
            prop_assert_eq!(entry.timer, entry.due());
            if let Some(due) = entry.due() {
                prop_assert!(pool.timers.contains(&(due, Timer::Lease(*generation))));
            }
        }
    }
    let mut active: BTreeMap<i32, usize> = BTreeMap::new();
    for entry in pool.leases.values() {
        if entry.lease.state == LeaseState::Active {
            *active.entry(entry.lease.terms.priority).or_default() += 1;
        }
    }
    prop_assert_eq!(&pool.active_by_priority, &active);
    let mut reserved: HashMap<GpuKey, u64> = HashMap::new();
    for reservation in pool.reservations.values() {
        *reserved.entry(reservation.gpu.clone()).or_default() += reservation.terms.mb;
    }
    let mut placeable = 0;
    for (key, gpu) in &pool.inventory.gpus {
        let (sum, revoked) = leased.get(key).copied().unwrap_or_default();
        prop_assert_eq!(gpu.leased_mib, sum, "leased on {:?}", key);
        prop_assert_eq!(gpu.revoked_mib, revoked, "revoked on {:?}", key);
        prop_assert_eq!(
            gpu.reserved_mib,
            reserved.get(key).copied().unwrap_or_default()
        );
        prop_assert!(
            gpu.leased_mib <= gpu.total_mib || !gpu.present,
            "{:?}: {} MiB leased on a GPU of {}",
            key,
            gpu.leased_mib,
            gpu.total_mib
        );
        prop_assert!(gpu.present || !gpu.leases.is_empty() || gpu.reserved_mib > 0);
        let node = pool.inventory.nodes.get(&key.0);
        let should_place = gpu.present
            && gpu.healthy
            && node.is_some_and(|n| n.state == NodeState::Online && !n.drained);
        prop_assert_eq!(pool.inventory.is_placeable(key), should_place);
        prop_assert_eq!(
            pool.inventory.irregular.contains(key),
            should_place && (gpu.revoked_mib > 0 || gpu.reserved_mib > 0)
        );
        if should_place {
            placeable += 1;
            prop_assert!(pool.inventory.fit.contains(&(
                gpu.free_mib(),
                Some(key.0.clone()),
                gpu.index,
                key.1.clone()
            )));
        }
    }
    prop_assert_eq!(pool.inventory.fit.len(), placeable);
    prop_assert!(
        pool.inventory
            .irregular
            .iter()
            .all(|key| pool.inventory.gpus.contains_key(key))
    );
    for key in leased.keys() {
        prop_assert!(
            pool.inventory.gpus.contains_key(key),
            "no entry for {:?}",
            key
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn the_pool_keeps_its_invariants(ops in prop::collection::vec(op(), 1..80)) {
        let mut world = World::new();
        for op in &ops {
            world.run(op)?;
        }
    }
}
