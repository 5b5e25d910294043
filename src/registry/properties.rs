//! Property tests: random sequences of what happens to a fleet, run through
//! the registry and a model of the store, checking the registry's
//! invariants after every step. `PROPTEST_CASES` sets how many sequences
//! run (256 by default); RELIABILITY.md gives a longer run.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use proptest::prelude::*;

use super::*;
use crate::node::{Registration, StoredNode};

const NODES: usize = 4;
const OFFLINE_AFTER: Duration = Duration::from_secs(3);
const EXPIRE_AFTER: Duration = Duration::from_secs(10);
const STEP: i64 = 2 * 3600;

fn timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_secs(1),
        max_heartbeats_per_second: 1000,
        offline_after: OFFLINE_AFTER,
        expire_after: EXPIRE_AFTER,
        reload_grace: Duration::from_secs(5),
        expiry_guard_fraction: 0.5,
    }
}

#[derive(Clone, Debug)]
enum Op {
    Register(usize),
    /// A heartbeat from the node's open session, or from one it replaced.
    Heartbeat {
        node: usize,
        stale: bool,
    },
    /// The node's open session ends.
    Leave(usize),
    /// Time passes with nobody heard.
    Silence(Duration),
    /// A Status probe of the node answers.
    Probe(usize),
    /// The coordinator stood still this long.
    Stall(Duration),
    /// The wall clock is stepped to this offset from real time, in seconds.
    StepClock(i64),
    /// The coordinator restarts from what the store holds.
    Restart,
    /// An operator removes the node.
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    prop_oneof![
        3 => node.clone().prop_map(Op::Register),
        4 => (node.clone(), prop::bool::weighted(0.2))
            .prop_map(|(node, stale)| Op::Heartbeat { node, stale }),
        2 => node.clone().prop_map(Op::Leave),
        4 => (0..15_000u64).prop_map(|ms| Op::Silence(Duration::from_millis(ms))),
        2 => node.clone().prop_map(Op::Probe),
        1 => (0..20_000u64).prop_map(|ms| Op::Stall(Duration::from_millis(ms))),
        2 => prop_oneof![Just(-STEP), Just(0), Just(STEP)].prop_map(Op::StepClock),
        2 => Just(Op::Restart),
        1 => node.prop_map(Op::Remove),
    ]
}

fn node_id(node: usize) -> NodeId {
    NodeId::parse("node_id", &format!("n{node}")).unwrap()
}

/// The rows the store would hold after applying every flushed change.
#[derive(Default)]
struct ModelStore {
    rows: BTreeMap<NodeId, StoredNode>,
    last_issued: u64,
}

impl ModelStore {
    fn enroll(&mut self, node_id: &NodeId, now: SystemTime) -> Enrollment {
        self.last_issued += 1;
        let registration = Registration {
            node_id: node_id.clone(),
            agent_url: format!("http://{node_id}:7701"),
            boot_id: format!("boot-{}", self.last_issued),
            version: "1".to_owned(),
            hostname: node_id.to_string(),
            labels: BTreeMap::new(),
            max_backoff: Duration::from_secs(30),
            gpus: Default::default(),
        };
        self.rows.insert(
            node_id.clone(),
            StoredNode {
                registration,
                registered_at: now,
                last_seen: now,
                generation: self.last_issued,
                offline_since: None,
                drain: None,
                left_at: None,
            },
        );
        Enrollment {
            generation: self.last_issued,
            registered_at: now,
        }
    }

    fn apply(&mut self, change: &Change) {
        let matching = |rows: &mut BTreeMap<NodeId, StoredNode>, node_id: &NodeId, generation| {
            rows.get_mut(node_id)
                .filter(|row| row.generation == generation)
                .is_some()
        };
        match change {
            Change::WentOffline {
                node_id,
                generation,
                since,
            } => {
                if matching(&mut self.rows, node_id, *generation) {
                    self.rows.get_mut(node_id).unwrap().offline_since = Some(*since);
                }
            }
            Change::CameOnline {
                node_id,
                generation,
            } => {
                if matching(&mut self.rows, node_id, *generation) {
                    self.rows.get_mut(node_id).unwrap().offline_since = None;
                }
            }
            Change::Expired {
                node_id,
                generation,
            } => {
                if matching(&mut self.rows, node_id, *generation) {
                    self.rows.remove(node_id);
                }
            }
        }
    }
}

/// The fleet's world: real time, the coordinator's clocks, open sessions,
/// and what the checks need to remember.
struct World {
    registry: Registry,
    store: ModelStore,
    start: Moment,
    /// Real time since `start`; the monotonic clock of every run follows it.
    elapsed: Duration,
    /// The wall clock's error, in seconds.
    wall_offset: i64,
    /// Whether the wall clock has ever been stepped.
    stepped: bool,
    /// The generation of each node's open session.
    sessions: BTreeMap<NodeId, u64>,
    issued: BTreeMap<NodeId, BTreeSet<u64>>,
    highest_generation: BTreeMap<NodeId, u64>,
    /// Real time each node was last proven alive, and in which run.
    last_heard: BTreeMap<NodeId, (Duration, u32)>,
    last_restart: Duration,
    /// Runs of the coordinator so far, less one.
    restarts: u32,
}

impl World {
    fn new() -> Self {
        Self {
            registry: Registry::new(timing()),
            store: ModelStore::default(),
            start: Moment::now(),
            elapsed: Duration::ZERO,
            wall_offset: 0,
            stepped: false,
            sessions: BTreeMap::new(),
            issued: BTreeMap::new(),
            highest_generation: BTreeMap::new(),
            last_heard: BTreeMap::new(),
            last_restart: Duration::ZERO,
            restarts: 0,
        }
    }

    fn now(&self) -> Moment {
        let real = self.start.after(self.elapsed);
        let step = Duration::from_secs(self.wall_offset.unsigned_abs());
        Moment {
            monotonic: real.monotonic,
            wall: if self.wall_offset >= 0 {
                real.wall + step
            } else {
                real.wall - step
            },
        }
    }

    fn heard(&mut self, node_id: &NodeId) {
        self.last_heard
            .insert(node_id.clone(), (self.elapsed, self.restarts));
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.now();
        match *op {
            Op::Register(node) => {
                let node_id = node_id(node);
                let enrollment = self.store.enroll(&node_id, now.wall);
                self.issued
                    .entry(node_id.clone())
                    .or_default()
                    .insert(enrollment.generation);
                let registration = self.store.rows[&node_id].registration.clone();
                if self
                    .registry
                    .register(registration, enrollment, now)
                    .is_ok()
                {
                    self.sessions.insert(node_id.clone(), enrollment.generation);
                    self.heard(&node_id);
                }
            }
            Op::Heartbeat { node, stale } => {
                let node_id = node_id(node);
                let Some(&open) = self.sessions.get(&node_id) else {
                    return Ok(());
                };
                let older = self.issued[&node_id].range(..open).next_back().copied();
                let generation = if stale { older.unwrap_or(open) } else { open };
                let current = self.registry.get(&node_id).map(|n| n.generation);
                let answer = self.registry.heartbeat(&node_id, generation, now);
                prop_assert_eq!(
                    answer.is_ok(),
                    current == Some(generation),
                    "only the current session is heard"
                );
                if answer.is_ok() {
                    self.heard(&node_id);
                }
            }
            Op::Leave(node) => {
                let node_id = node_id(node);
                if let Some(generation) = self.sessions.remove(&node_id) {
                    self.registry.session_ended(&node_id, generation, now);
                }
            }
            Op::Silence(duration) => self.elapsed += duration,
            Op::Probe(node) => {
                let node_id = node_id(node);
                let targets = self.registry.unproven();
                for target in targets.iter().filter(|t| t.node_id == node_id) {
                    if self.registry.probe_succeeded(target, now) {
                        self.heard(&node_id);
                    }
                }
            }
            Op::Stall(duration) => {
                self.elapsed += duration;
                let now = self.now();
                self.registry.pardon_stall(duration, now);
            }
            Op::StepClock(offset) => {
                self.stepped |= offset != self.wall_offset;
                self.wall_offset = offset;
            }
            Op::Restart => {
                self.flush()?;
                self.registry = Registry::new(timing());
                self.registry.load(self.store.rows.values().cloned(), now);
                self.sessions.clear();
                self.last_restart = self.elapsed;
                self.restarts += 1;
            }
            Op::Remove(node) => {
                let node_id = node_id(node);
                if let Some(row) = self.store.rows.remove(&node_id) {
                    self.registry.remove(&node_id, row.generation);
                    self.sessions.remove(&node_id);
                }
            }
        }
        self.sweep()?;
        self.check()
    }

    fn sweep(&mut self) -> Result<(), TestCaseError> {
        let online: BTreeSet<NodeId> = self
            .registry
            .list()
            .into_iter()
            .filter(|n| n.state == NodeState::Online)
            .map(|n| n.registration.node_id)
            .collect();
        self.registry.sweep(self.now());
        let changes = self.registry.take_changes();
        for change in &changes {
            if let Change::Expired { node_id, .. } = change {
                prop_assert!(!online.contains(node_id), "{node_id} expired while ONLINE");
                self.check_expiry_time(node_id)?;
            }
            self.store.apply(change);
        }
        self.flush()
    }

    /// No node expires sooner than `expire_after` after it was last heard by
    /// the monotonic clock of the run that heard it. One heard before a
    /// restart gets at least half of `expire_after` after the restart, and
    /// all of it after it was heard unless the wall clock was stepped.
    fn check_expiry_time(&self, node_id: &NodeId) -> Result<(), TestCaseError> {
        let (heard, run) = self.last_heard.get(node_id).copied().unwrap_or_default();
        let since_heard = self.elapsed - heard;
        if run == self.restarts || !self.stepped {
            prop_assert!(
                since_heard >= EXPIRE_AFTER,
                "{node_id} expired {since_heard:?} after it was last heard"
            );
        } else {
            let since_restart = self.elapsed - self.last_restart;
            prop_assert!(
                since_restart >= EXPIRE_AFTER / 2,
                "{node_id} expired {since_restart:?} after a restart"
            );
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TestCaseError> {
        for change in self.registry.take_changes() {
            prop_assert!(
                !matches!(change, Change::Expired { .. }),
                "only a sweep expires nodes"
            );
            self.store.apply(&change);
        }
        for (node_id, seen) in self.registry.take_last_seen() {
            if let Some(row) = self.store.rows.get_mut(&node_id) {
                row.last_seen = seen;
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        for node in self.registry.list() {
            let node_id = node.registration.node_id;
            let highest = self.highest_generation.entry(node_id.clone()).or_default();
            prop_assert!(
                node.generation >= *highest,
                "{node_id}'s generation went back from {highest} to {}",
                node.generation
            );
            *highest = node.generation;
            let live = self.issued.get(&node_id).map_or(0, |issued| {
                issued
                    .iter()
                    .filter(|g| self.registry.session_state(&node_id, **g).is_ok())
                    .count()
            });
            prop_assert!(live <= 1, "{node_id} has {live} live sessions");
            prop_assert_eq!(
                node.offline_since.is_some(),
                node.state == NodeState::Offline
                    || (node.state == NodeState::Unknown
                        && self
                            .store
                            .rows
                            .get(&node_id)
                            .is_some_and(|r| r.offline_since.is_some())),
                "offline_since is set exactly while the node is, or was stored, OFFLINE"
            );
        }
        let guard = self.registry.expiry_guard();
        prop_assert!(guard.down <= guard.known);
        Ok(())
    }
}

// The default configuration reads PROPTEST_CASES, 256 when unset.
proptest! {
    #[test]
    fn the_registry_keeps_its_invariants(ops in prop::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for op in &ops {
            world.run(op)?;
        }
    }
}
