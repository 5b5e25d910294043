//! The node registry: the coordinator's in-memory view of the fleet, as a
//! state machine with no I/O. Time is passed in as a [`Moment`].
//!
//! Invariants:
//! - Every node has exactly one current session generation. A call carrying
//!   an older generation never changes the node: an older session never
//!   overwrites a newer one.
//! - A node is ONLINE only while it has proven itself alive (a heartbeat, a
//!   registration or a passed probe) within `offline_after`, not counting
//!   time the coordinator itself stood still.
//! - A node loaded from the store starts UNKNOWN; it becomes ONLINE only when
//!   proven alive, and OFFLINE when `reload_grace` passes without proof.
//! - While the coordinator runs, every deadline (going OFFLINE, expiring)
//!   is a monotonic [`std::time::Instant`]: a step of the wall clock, either
//!   way, never moves one. No node is removed sooner than `expire_after` of
//!   monotonic time after it went OFFLINE, and it went OFFLINE no sooner
//!   than it was last seen.
//! - The wall-clock moment a node went OFFLINE is persisted, so a restart
//!   does not reset its expiry, but it is trusted only within bounds, because
//!   the clock that wrote it may have been wrong. After a restart, an OFFLINE
//!   node is kept for `expire_after` less its stored age (wall time now minus
//!   the stored `offline_since`, taken as zero if that lies in the future),
//!   but never less than half of `expire_after`: whatever the store says, at
//!   least half of every node's `expire_after` is measured by the running
//!   process itself, and a future-dated `offline_since` delays expiry by at
//!   most one `expire_after` from start-up.
//! - Expiry pauses while more than `expiry_guard_fraction` of the known
//!   fleet is OFFLINE or UNKNOWN at once: that is more likely the
//!   coordinator's own network failing than half the machines dying. The
//!   guard applies to fleets of at least [`MIN_GUARDED_FLEET`] nodes, so a
//!   home lab's one dead machine still expires. Going OFFLINE never pauses.
//! - A LEFT node (its agent shut down on purpose and said so) expires like
//!   an OFFLINE one, counted from when it left, by the same rules across a
//!   restart. It is never judged by silence nor probed, it reloads LEFT
//!   after a restart, and only a new registration brings it back. LEFT
//!   nodes count neither as down nor as known for the mass-expiry guard:
//!   they left on purpose.
//! - A node's drain is changed only by [`Registry::set_drain`], after the
//!   store has recorded it; a re-registration keeps it. A drain that reaches
//!   a node whose registration the store has committed but the registry not
//!   yet applied is held for that registration.
//! - Every node heartbeats at an interval the registry assigns: the
//!   configured `heartbeat_interval`, stretched in whole multiples of it so
//!   that the whole fleet stays within `max_heartbeats_per_second`. A node's
//!   `offline_after` grows in proportion to its interval. When the fleet
//!   grows past a step, each node is given the new interval on its next
//!   heartbeat; it shrinks again only once the fleet is a tenth below the
//!   step, so a fleet at a boundary does not flap.
//! - A node that was not OFFLINE when the coordinator stopped gets its agent's
//!   reconnect backoff ceiling plus `reload_grace` after a restart, so an
//!   agent waiting out its longest backoff is not shown OFFLINE; one already
//!   OFFLINE gets only `offline_after`.
//! - Every change the store must know about is queued, in order, for
//!   [`Registry::take_changes`]. `last_seen` is collected separately by
//!   [`Registry::take_last_seen`], so heartbeats cost no write of their own.
//! - A node's GPU inventory is replaced only by its current session, and a
//!   replaced inventory is collected by [`Registry::take_inventories`] for the
//!   same batches as `last_seen`: a changing inventory costs no write of its
//!   own either, and only its latest value is written.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    clock::Moment,
    node::{
        DEFAULT_MAX_BACKOFF, Drain, GpuInventory, NodeId, NodeSnapshot, NodeState, Registration,
        StoredNode,
    },
};

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The shortest heartbeat interval, which a small fleet gets.
    pub heartbeat_interval: Duration,
    /// The fleet's heartbeats per second stay at or below this.
    pub max_heartbeats_per_second: u32,
    /// Silence after which an ONLINE node becomes OFFLINE, for a node at
    /// `heartbeat_interval`; it scales with the node's interval.
    pub offline_after: Duration,
    /// Time an OFFLINE node is kept before it is forgotten.
    pub expire_after: Duration,
    /// Time a node that was live when the coordinator stopped may stay
    /// UNKNOWN after a restart, on top of its agent's reconnect backoff
    /// ceiling, before it is OFFLINE.
    pub reload_grace: Duration,
    /// Expiry pauses while more than this fraction of the known fleet is
    /// OFFLINE or UNKNOWN; in (0, 1], where 1 never pauses.
    pub expiry_guard_fraction: f64,
}

/// The smallest fleet the mass-expiry guard applies to. Below it, every
/// node down at once is as likely to be a small lab switched off as a
/// network failure, and a dead node must still expire.
pub const MIN_GUARDED_FLEET: usize = 3;

/// The most an interval is stretched: beyond this a fleet's heartbeats go
/// over the cap rather than nodes going unheard for absurdly long.
const MAX_STRETCH: u32 = 10_000;

impl Timing {
    /// The interval that keeps a fleet of `nodes` within the cap: the
    /// configured interval times the smallest whole number that does.
    pub fn interval_for(&self, nodes: usize) -> Duration {
        let per_interval = (f64::from(self.max_heartbeats_per_second)
            * self.heartbeat_interval.as_secs_f64())
        .floor()
        .max(1.0);
        let stretch = (nodes as f64 / per_interval)
            .ceil()
            .clamp(1.0, f64::from(MAX_STRETCH));
        self.heartbeat_interval * stretch as u32
    }

    /// How long a node that was live when the coordinator stopped may stay
    /// UNKNOWN after a restart.
    fn reload_grace_for(&self, registration: &Registration) -> Duration {
        registration.max_backoff + self.reload_grace
    }

    /// How long a node answering a probe counts as live before its stream
    /// must be back. The probe cuts the agent's backoff short, so the agent's
    /// own ceiling counts only up to the default one: an agent that declares
    /// an hour and dies right after answering is not shown ONLINE for an hour.
    fn probed_live_for(&self, registration: &Registration, interval: Duration) -> Duration {
        let backoff = registration.max_backoff.min(DEFAULT_MAX_BACKOFF);
        self.offline_after_at(interval)
            .max(backoff + self.reload_grace)
    }

    /// `offline_after` for a node heartbeating every `interval`.
    pub fn offline_after_at(&self, interval: Duration) -> Duration {
        self.offline_after
            .mul_f64(interval.as_secs_f64() / self.heartbeat_interval.as_secs_f64())
            .max(self.offline_after)
    }

    /// How long a node OFFLINE since `offline_since`, as a previous run's
    /// wall clock recorded it, is still kept after a restart at `now`:
    /// `expire_after` less the stored age, but at least half of
    /// `expire_after`, and never more than all of it.
    pub fn expiry_after_restart(&self, offline_since: SystemTime, now: SystemTime) -> Duration {
        let stored_age = now.duration_since(offline_since).unwrap_or_default();
        self.expire_after
            .saturating_sub(stored_age)
            .max(self.expire_after / 2)
    }

    /// The interval a node at `current` should move to in a fleet of `nodes`:
    /// longer at once when the fleet needs it, shorter only when the fleet is
    /// a tenth below the step.
    fn retune(&self, current: Duration, nodes: usize) -> Duration {
        let wanted = self.interval_for(nodes);
        if wanted >= current {
            return wanted;
        }
        self.interval_for(nodes + nodes.div_ceil(10)).min(current)
    }
}

/// What the store must record, in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    WentOffline {
        node_id: NodeId,
        generation: u64,
        since: SystemTime,
    },
    CameOnline {
        node_id: NodeId,
        generation: u64,
    },
    Expired {
        node_id: NodeId,
        generation: u64,
    },
}

impl Change {
    pub fn node_id(&self) -> &NodeId {
        match self {
            Self::WentOffline { node_id, .. }
            | Self::CameOnline { node_id, .. }
            | Self::Expired { node_id, .. } => node_id,
        }
    }
}

/// A node's latest GPU inventory, to be written over the row of the session
/// that reported it (an older session's would change nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryUpdate {
    pub node_id: NodeId,
    pub generation: u64,
    pub gpus: GpuInventory,
}

/// A node as the lease pool sees it.
#[derive(Clone, Copy, Debug)]
pub struct PoolFacts<'a> {
    pub node_id: &'a NodeId,
    pub state: NodeState,
    pub drained: bool,
    pub labels: &'a BTreeMap<String, String>,
    pub gpus: &'a GpuInventory,
}

/// The durable part of a registration, as the store committed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enrollment {
    pub generation: u64,
    pub registered_at: SystemTime,
}

/// Why a session's call was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionRejected {
    /// A newer session of the node exists.
    Superseded { current: u64 },
    /// The node expired, or an operator removed it, while this session was
    /// open.
    Forgotten,
}

/// A node to prove alive with a Status probe, as it was when the probe began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub node_id: NodeId,
    pub agent_url: String,
    pub generation: u64,
}

/// How much of the fleet is down, and whether that pauses expiry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpiryGuard {
    pub paused: bool,
    /// Nodes OFFLINE or UNKNOWN.
    pub down: usize,
    /// Nodes not LEFT.
    pub known: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub went_offline: usize,
    pub expired: usize,
    /// Set when this sweep paused or resumed expiry.
    pub guard_changed: Option<ExpiryGuard>,
}

#[derive(Debug)]
struct Entry {
    registration: Registration,
    registered_at: SystemTime,
    generation: u64,
    state: NodeState,
    last_seen: SystemTime,
    /// How often this node's agent was told to heartbeat.
    interval: Duration,
    /// The node becomes OFFLINE if not proven alive again before this.
    live_until: Instant,
    offline_since: Option<SystemTime>,
    drain: Option<Drain>,
    /// Set with `offline_since`: the node is removed once OFFLINE past this.
    expires_at: Option<Instant>,
    last_seen_dirty: bool,
    /// The inventory in `registration` changed since the store last took it.
    inventory_dirty: bool,
    /// A stall of the coordinator has already been pardoned since the node
    /// was last heard; one pardon per silence, so a dead node is not kept
    /// alive by a coordinator that keeps running late.
    pardoned: bool,
    /// Why the last Status probe failed, until one passes.
    last_probe_error: Option<String>,
}

impl Entry {
    fn snapshot(&self) -> NodeSnapshot {
        NodeSnapshot {
            registration: self.registration.clone(),
            state: self.state,
            registered_at: self.registered_at,
            last_seen: self.last_seen,
            generation: self.generation,
            offline_since: self.offline_since,
            drain: self.drain.clone(),
            last_probe_error: self.last_probe_error.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Registry {
    timing: Timing,
    nodes: BTreeMap<NodeId, Entry>,
    changes: Vec<Change>,
    /// The generation at which an operator removed each node. A registration
    /// the store committed at or below it was deleted with the row, so it
    /// must not be applied, even if it arrives after the removal.
    removed_at: BTreeMap<NodeId, u64>,
    /// Drains the store recorded on a row of the given generation while the
    /// registry held no entry for the node: its registration was committed
    /// but not yet applied. A registration at or below that generation
    /// takes the drain.
    drain_ahead: BTreeMap<NodeId, (u64, Option<Drain>)>,
    /// As the latest sweep found it.
    guard: ExpiryGuard,
    /// Some entry's inventory may be dirty; without one, collecting
    /// inventories skips the walk over the fleet.
    inventories_pending: bool,
    /// Moves on with every call that may change what [`Self::pool_facts`]
    /// yields: a node added or removed, or its state, drain, labels or GPUs
    /// changed. A heartbeat that changes nothing leaves it alone, so a
    /// follower of the fleet can skip walking an unchanged one.
    facts_version: u64,
}

impl Registry {
    pub fn new(timing: Timing) -> Self {
        Self {
            timing,
            nodes: BTreeMap::new(),
            changes: Vec::new(),
            removed_at: BTreeMap::new(),
            drain_ahead: BTreeMap::new(),
            guard: ExpiryGuard::default(),
            inventories_pending: false,
            facts_version: 0,
        }
    }

    /// Adds nodes read from the store after a restart. They are UNKNOWN until
    /// proven alive, and OFFLINE if `reload_grace` passes without proof.
    pub fn load(&mut self, stored: impl IntoIterator<Item = StoredNode>, now: Moment) {
        let stored: Vec<StoredNode> = stored.into_iter().collect();
        self.facts_version += 1;
        let interval = self.timing.interval_for(self.nodes.len() + stored.len());
        for node in stored {
            let (state, offline_since) = match node.left_at {
                Some(left_at) => (NodeState::Left, Some(left_at)),
                None => (NodeState::Unknown, node.offline_since),
            };
            let grace = if node.offline_since.is_some() {
                self.timing.offline_after_at(interval)
            } else {
                self.timing.reload_grace_for(&node.registration)
            };
            let expires_at = offline_since
                .map(|since| now.monotonic + self.timing.expiry_after_restart(since, now.wall));
            self.nodes.insert(
                node.registration.node_id.clone(),
                Entry {
                    registration: node.registration,
                    registered_at: node.registered_at,
                    generation: node.generation,
                    state,
                    last_seen: node.last_seen,
                    interval,
                    live_until: now.monotonic + grace,
                    offline_since,
                    drain: node.drain,
                    expires_at,
                    last_seen_dirty: false,
                    inventory_dirty: false,
                    pardoned: false,
                    last_probe_error: None,
                },
            );
        }
    }

    /// Applies a registration the store has committed, and returns the
    /// interval the agent is to heartbeat at. A registration older than the
    /// node's current generation, or one whose row an operator has since
    /// removed, is refused.
    pub fn register(
        &mut self,
        registration: Registration,
        enrollment: Enrollment,
        now: Moment,
    ) -> Result<Duration, SessionRejected> {
        if let Some(&removed_at) = self.removed_at.get(&registration.node_id) {
            if enrollment.generation <= removed_at {
                return Err(SessionRejected::Forgotten);
            }
            self.removed_at.remove(&registration.node_id);
        }
        let (known, mut drain) = match self.nodes.get(&registration.node_id) {
            Some(entry) if entry.generation >= enrollment.generation => {
                return Err(SessionRejected::Superseded {
                    current: entry.generation,
                });
            }
            Some(entry) => (self.nodes.len(), entry.drain.clone()),
            None => (self.nodes.len() + 1, None),
        };
        if let Some((recorded_at, ahead)) = self.drain_ahead.remove(&registration.node_id)
            && recorded_at >= enrollment.generation
        {
            drain = ahead;
        }
        let interval = self.timing.interval_for(known);
        self.facts_version += 1;
        // A probe failure outlives the registration that followed it: the
        // next restart's probe would fail the same way.
        let last_probe_error = self
            .nodes
            .get(&registration.node_id)
            .and_then(|entry| entry.last_probe_error.clone());
        self.nodes.insert(
            registration.node_id.clone(),
            Entry {
                registration,
                registered_at: enrollment.registered_at,
                generation: enrollment.generation,
                state: NodeState::Online,
                last_seen: now.wall,
                interval,
                live_until: now.monotonic + self.timing.offline_after_at(interval),
                offline_since: None,
                drain,
                expires_at: None,
                last_seen_dirty: false,
                inventory_dirty: false,
                pardoned: false,
                last_probe_error,
            },
        );
        Ok(interval)
    }

    /// Records a heartbeat from the session holding `generation`. Returns a
    /// new interval when the fleet's size calls for one; the session passes
    /// it on to the agent.
    pub fn heartbeat(
        &mut self,
        node_id: &NodeId,
        generation: u64,
        now: Moment,
    ) -> Result<Option<Duration>, SessionRejected> {
        let timing = self.timing;
        let nodes = self.nodes.len();
        let entry = self.current_entry(node_id, generation)?;
        let interval = timing.retune(entry.interval, nodes);
        let retuned = (interval != entry.interval).then_some(interval);
        entry.interval = interval;
        entry.last_seen = now.wall;
        entry.last_seen_dirty = true;
        entry.live_until = now.monotonic + timing.offline_after_at(interval);
        entry.pardoned = false;
        let generation = entry.generation;
        if entry.state != NodeState::Online {
            entry.state = NodeState::Online;
            entry.expires_at = None;
            entry.offline_since = None;
            self.facts_version += 1;
            self.changes.push(Change::CameOnline {
                node_id: node_id.clone(),
                generation,
            });
        }
        Ok(retuned)
    }

    /// Replaces the GPU inventory of the node whose session holds
    /// `generation`, to be written with the next batch.
    pub fn report_inventory(
        &mut self,
        node_id: &NodeId,
        generation: u64,
        gpus: GpuInventory,
    ) -> Result<(), SessionRejected> {
        let entry = self.current_entry(node_id, generation)?;
        entry.registration.gpus = gpus;
        entry.inventory_dirty = true;
        self.inventories_pending = true;
        self.facts_version += 1;
        Ok(())
    }

    /// The stream of the session holding `generation` has ended. The node goes
    /// OFFLINE at once unless a newer session has replaced it.
    pub fn session_ended(&mut self, node_id: &NodeId, generation: u64, now: Moment) {
        let expire_after = self.timing.expire_after;
        if let Ok(entry) = self.current_entry(node_id, generation)
            && matches!(entry.state, NodeState::Unknown | NodeState::Online)
        {
            let since = entry.offline_since.unwrap_or(now.wall);
            entry.state = NodeState::Offline;
            entry.offline_since = Some(since);
            entry.expires_at.get_or_insert(now.monotonic + expire_after);
            self.facts_version += 1;
            self.changes.push(Change::WentOffline {
                node_id: node_id.clone(),
                generation,
                since,
            });
        }
    }

    /// The agent of the session holding `generation` has left on purpose,
    /// and the store has recorded it at `left_at.wall`: the node is LEFT,
    /// and expires `expire_after` from then.
    pub fn leave(
        &mut self,
        node_id: &NodeId,
        generation: u64,
        left_at: Moment,
    ) -> Result<(), SessionRejected> {
        let expire_after = self.timing.expire_after;
        let entry = self.current_entry(node_id, generation)?;
        entry.state = NodeState::Left;
        entry.offline_since = Some(left_at.wall);
        entry.expires_at = Some(left_at.monotonic + expire_after);
        self.facts_version += 1;
        Ok(())
    }

    /// Applies a drain (`Some`) or an undrain (`None`) the store has
    /// recorded on the node's row, which held `row_generation`. Returns the
    /// node as it now is; `None` if the registry holds no entry for it.
    pub fn set_drain(
        &mut self,
        node_id: &NodeId,
        row_generation: u64,
        drain: Option<Drain>,
    ) -> Option<NodeSnapshot> {
        self.facts_version += 1;
        match self.nodes.get_mut(node_id) {
            Some(entry) => {
                entry.drain = drain;
                Some(entry.snapshot())
            }
            None => {
                self.drain_ahead
                    .insert(node_id.clone(), (row_generation, drain));
                None
            }
        }
    }

    /// A Status probe sent to `target` was answered with the node's own id.
    /// Only an UNKNOWN node of the probed generation changes: a late answer
    /// never overrides what a session has reported since. Returns whether
    /// the node became ONLINE.
    pub fn probe_succeeded(&mut self, target: &ProbeTarget, now: Moment) -> bool {
        let timing = self.timing;
        let Some(entry) = self.nodes.get_mut(&target.node_id) else {
            return false;
        };
        let live_for = timing.probed_live_for(&entry.registration, entry.interval);
        if entry.state != NodeState::Unknown || entry.generation != target.generation {
            return false;
        }
        entry.state = NodeState::Online;
        entry.last_seen = now.wall;
        entry.last_seen_dirty = true;
        entry.live_until = now.monotonic + live_for;
        entry.pardoned = false;
        entry.expires_at = None;
        entry.last_probe_error = None;
        entry.offline_since = None;
        // UNKNOWN to ONLINE is a change for the event log even when the row
        // already says the node is live.
        self.facts_version += 1;
        self.changes.push(Change::CameOnline {
            node_id: target.node_id.clone(),
            generation: entry.generation,
        });
        true
    }

    /// The node's own agent tried to register, with the node's secret, but
    /// the store could not commit the registration. The attempt proves the
    /// agent alive as a passed probe does, so a node is not shown OFFLINE
    /// because the coordinator's database failed: it stays ONLINE for its
    /// agent's backoff ceiling plus the reload grace plus `refusal_took` (how
    /// long the store took to fail this attempt; the next may take as long),
    /// time for the next attempt. Its session generation stays as it was.
    /// Returns whether the node was known.
    pub fn vouch(&mut self, node_id: &NodeId, refusal_took: Duration, now: Moment) -> bool {
        let timing = self.timing;
        let Some(entry) = self.nodes.get_mut(node_id) else {
            return false;
        };
        let live_for = timing
            .offline_after_at(entry.interval)
            .max(timing.reload_grace_for(&entry.registration) + refusal_took);
        let was_online = entry.state == NodeState::Online;
        if !was_online {
            self.facts_version += 1;
        }
        entry.state = NodeState::Online;
        entry.last_seen = now.wall;
        entry.last_seen_dirty = true;
        entry.live_until = now.monotonic + live_for;
        entry.pardoned = false;
        if entry.offline_since.take().is_some() || !was_online {
            self.changes.push(Change::CameOnline {
                node_id: node_id.clone(),
                generation: entry.generation,
            });
        }
        true
    }

    /// A Status probe sent to `target` failed for `reason`; the node keeps
    /// the reason until a probe passes, for operators to see. Returns
    /// whether the reason is new for this node, so that it is reported once
    /// per cause rather than once per probe.
    pub fn probe_failed(&mut self, target: &ProbeTarget, reason: &str) -> bool {
        let Some(entry) = self.nodes.get_mut(&target.node_id) else {
            return false;
        };
        if entry.last_probe_error.as_deref() == Some(reason) {
            return false;
        }
        entry.last_probe_error = Some(reason.to_owned());
        true
    }

    /// The coordinator itself was stalled for `stalled` (paused, suspended,
    /// starved of CPU) until `now`, and heard nobody in that time through no
    /// fault of the nodes. Each node not heard since gets its deadline moved
    /// back by as much, but never beyond a full `offline_after` from `now`,
    /// and only once per silence.
    pub fn pardon_stall(&mut self, stalled: Duration, now: Moment) {
        let timing = self.timing;
        for entry in self.nodes.values_mut() {
            if matches!(entry.state, NodeState::Unknown | NodeState::Online) && !entry.pardoned {
                let latest = now.monotonic + timing.offline_after_at(entry.interval);
                entry.live_until = entry
                    .live_until
                    .max((entry.live_until + stalled).min(latest));
                entry.pardoned = true;
            }
        }
    }

    /// Marks silent nodes OFFLINE and removes nodes that have been OFFLINE
    /// past their expiry, unless the mass-expiry guard holds expiry back.
    pub fn sweep(&mut self, now: Moment) -> SweepReport {
        let mut report = SweepReport::default();
        let expire_after = self.timing.expire_after;
        for (node_id, entry) in &mut self.nodes {
            if matches!(entry.state, NodeState::Unknown | NodeState::Online)
                && now.monotonic >= entry.live_until
            {
                entry.state = NodeState::Offline;
                report.went_offline += 1;
                if entry.offline_since.is_none() {
                    entry.offline_since = Some(now.wall);
                    entry.expires_at = Some(now.monotonic + expire_after);
                }
                // Also when it was OFFLINE before a restart: UNKNOWN to
                // OFFLINE is a change for the event log.
                self.changes.push(Change::WentOffline {
                    node_id: node_id.clone(),
                    generation: entry.generation,
                    since: entry.offline_since.unwrap_or(now.wall),
                });
            }
        }
        let guard = self.measure_guard();
        if guard.paused != self.guard.paused {
            report.guard_changed = Some(guard);
        }
        self.guard = guard;
        if report.went_offline > 0 {
            self.facts_version += 1;
        }
        if guard.paused {
            return report;
        }
        let changes = &mut self.changes;
        self.nodes.retain(|node_id, entry| {
            let expired = matches!(entry.state, NodeState::Offline | NodeState::Left)
                && entry.expires_at.is_some_and(|at| now.monotonic >= at);
            if expired {
                report.expired += 1;
                changes.push(Change::Expired {
                    node_id: node_id.clone(),
                    generation: entry.generation,
                });
            }
            !expired
        });
        if report.expired > 0 {
            self.facts_version += 1;
        }
        report
    }

    fn measure_guard(&self) -> ExpiryGuard {
        let members = || {
            self.nodes
                .values()
                .filter(|entry| entry.state != NodeState::Left)
        };
        let known = members().count();
        let down = members()
            .filter(|entry| entry.state != NodeState::Online)
            .count();
        let paused = known >= MIN_GUARDED_FLEET
            && down as f64 > self.timing.expiry_guard_fraction * known as f64;
        ExpiryGuard {
            paused,
            down,
            known,
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The mass-expiry guard as the latest sweep left it.
    pub fn expiry_guard(&self) -> ExpiryGuard {
        self.guard
    }

    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Changes not yet handed to the store, oldest first.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// `last_seen` of every node that heartbeated since the previous call.
    pub fn take_last_seen(&mut self) -> Vec<(NodeId, SystemTime)> {
        self.nodes
            .iter_mut()
            .filter(|(_, entry)| entry.last_seen_dirty)
            .map(|(node_id, entry)| {
                entry.last_seen_dirty = false;
                (node_id.clone(), entry.last_seen)
            })
            .collect()
    }

    /// Hands back `last_seen` values the store failed to write, so the next
    /// flush retries them.
    pub fn restore_last_seen(&mut self, unwritten: &[(NodeId, SystemTime)]) {
        for (node_id, _) in unwritten {
            if let Some(entry) = self.nodes.get_mut(node_id) {
                entry.last_seen_dirty = true;
            }
        }
    }

    /// The inventory of every node whose inventory changed since the
    /// previous call.
    pub fn take_inventories(&mut self) -> Vec<InventoryUpdate> {
        if !std::mem::take(&mut self.inventories_pending) {
            return Vec::new();
        }
        self.nodes
            .iter_mut()
            .filter(|(_, entry)| entry.inventory_dirty)
            .map(|(node_id, entry)| {
                entry.inventory_dirty = false;
                InventoryUpdate {
                    node_id: node_id.clone(),
                    generation: entry.generation,
                    gpus: entry.registration.gpus.clone(),
                }
            })
            .collect()
    }

    /// Hands back inventories the store failed to write. A node that has
    /// registered again since wrote its inventory with its registration.
    pub fn restore_inventories(&mut self, unwritten: &[InventoryUpdate]) {
        for update in unwritten {
            if let Some(entry) = self.nodes.get_mut(&update.node_id)
                && entry.generation == update.generation
            {
                entry.inventory_dirty = true;
                self.inventories_pending = true;
            }
        }
    }

    /// The state of a node as seen by its session holding `generation`.
    pub fn session_state(
        &self,
        node_id: &NodeId,
        generation: u64,
    ) -> Result<NodeState, SessionRejected> {
        match self.nodes.get(node_id) {
            None => Err(SessionRejected::Forgotten),
            Some(entry) if entry.generation != generation => Err(SessionRejected::Superseded {
                current: entry.generation,
            }),
            Some(entry) => Ok(entry.state),
        }
    }

    /// Forgets a node whose row the store has deleted at `removed_generation`.
    /// A registration committed at that generation or below, but not yet
    /// applied, will be refused when it arrives.
    pub fn remove(&mut self, node_id: &NodeId, removed_generation: u64) -> Option<NodeSnapshot> {
        self.drain_ahead.remove(node_id);
        let recorded = self.removed_at.entry(node_id.clone()).or_insert(0);
        *recorded = (*recorded).max(removed_generation);
        if self.nodes.get(node_id)?.generation > removed_generation {
            return None;
        }
        self.facts_version += 1;
        self.nodes.remove(node_id).map(|entry| entry.snapshot())
    }

    pub fn get(&self, node_id: &NodeId) -> Option<NodeSnapshot> {
        self.nodes.get(node_id).map(Entry::snapshot)
    }

    /// Changes whenever what [`Self::pool_facts`] yields may have changed.
    pub fn facts_version(&self) -> u64 {
        self.facts_version
    }

    /// What the lease pool needs of every node, borrowed: no copy of the
    /// fleet is made to find what changed.
    pub fn pool_facts(&self) -> impl Iterator<Item = PoolFacts<'_>> {
        self.nodes.iter().map(|(node_id, entry)| PoolFacts {
            node_id,
            state: entry.state,
            drained: entry.drain.is_some(),
            labels: &entry.registration.labels,
            gpus: &entry.registration.gpus,
        })
    }

    /// Every node, ordered by id.
    pub fn list(&self) -> Vec<NodeSnapshot> {
        self.nodes.values().map(Entry::snapshot).collect()
    }

    /// Nodes not yet proven alive since the coordinator started.
    pub fn unproven(&self) -> Vec<ProbeTarget> {
        self.nodes
            .iter()
            .filter(|(_, entry)| entry.state == NodeState::Unknown)
            .map(|(node_id, entry)| ProbeTarget {
                node_id: node_id.clone(),
                agent_url: entry.registration.agent_url.clone(),
                generation: entry.generation,
            })
            .collect()
    }

    /// Whether `target` is still UNKNOWN in the generation it was probed for.
    pub fn is_unproven(&self, target: &ProbeTarget) -> bool {
        self.nodes.get(&target.node_id).is_some_and(|entry| {
            entry.state == NodeState::Unknown && entry.generation == target.generation
        })
    }

    fn current_entry(
        &mut self,
        node_id: &NodeId,
        generation: u64,
    ) -> Result<&mut Entry, SessionRejected> {
        match self.nodes.get_mut(node_id) {
            None => Err(SessionRejected::Forgotten),
            Some(entry) if entry.generation != generation => Err(SessionRejected::Superseded {
                current: entry.generation,
            }),
            Some(entry) => Ok(entry),
        }
    }
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const OFFLINE_AFTER: Duration = Duration::from_secs(15);
    const EXPIRE_AFTER: Duration = Duration::from_secs(3600);
    const GRACE: Duration = Duration::from_secs(30);

    const INTERVAL: Duration = Duration::from_secs(5);

    fn timing(max_heartbeats_per_second: u32) -> Timing {
        Timing {
            heartbeat_interval: INTERVAL,
            max_heartbeats_per_second,
            offline_after: OFFLINE_AFTER,
            expire_after: EXPIRE_AFTER,
            reload_grace: GRACE,
            expiry_guard_fraction: 0.5,
        }
    }

    fn registry() -> Registry {
        Registry::new(timing(1000))
    }

    fn id(raw: &str) -> NodeId {
        NodeId::parse("node_id", raw).unwrap()
    }

    fn registration(node: &str, boot: &str) -> Registration {
        Registration {
            node_id: id(node),
            agent_url: format!("http://{node}:7701"),
            boot_id: boot.to_owned(),
            version: "1".to_owned(),
            hostname: node.to_owned(),
            labels: BTreeMap::new(),
            max_backoff: Duration::ZERO,
            gpus: Default::default(),
        }
    }

    fn enroll(generation: u64, now: Moment) -> Enrollment {
        Enrollment {
            generation,
            registered_at: now.wall,
        }
    }

    /// A registry where `node` has just registered with `generation`.
    fn with_online(node: &str, generation: u64, now: Moment) -> Registry {
        let mut registry = registry();
        registry
            .register(registration(node, "b1"), enroll(generation, now), now)
            .unwrap();
        registry
    }

    fn state(registry: &Registry, node: &str) -> Option<NodeState> {
        registry.get(&id(node)).map(|n| n.state)
    }

    fn stored(
        node: &str,
        generation: u64,
        offline_since: Option<SystemTime>,
        at: Moment,
    ) -> StoredNode {
        StoredNode {
            registration: registration(node, "old-boot"),
            registered_at: at.wall,
            last_seen: at.wall,
            generation,
            offline_since,
            drain: None,
            left_at: None,
        }
    }

    fn drain(reason: &str, at: Moment) -> Option<Drain> {
        Some(Drain {
            reason: reason.to_owned(),
            since: at.wall,
        })
    }

    #[test]
    fn the_facts_version_moves_with_every_change_the_pool_follows_and_never_with_a_quiet_heartbeat()
    {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        let mut version = registry.facts_version();
        let moved = |registry: &Registry, before: u64, what: &str| {
            let now = registry.facts_version();
            assert_ne!(now, before, "{what} must move the facts version");
            now
        };

        let t1 = t0.after(Duration::from_secs(1));
        registry.heartbeat(&id("a"), 1, t1).unwrap();
        assert_eq!(registry.facts_version(), version, "a quiet heartbeat");
        registry.sweep(t1);
        assert_eq!(
            registry.facts_version(),
            version,
            "a sweep that finds nothing"
        );

        registry.set_drain(&id("a"), 1, drain("fan", t1));
        version = moved(&registry, version, "a drain");
        registry
            .report_inventory(&id("a"), 1, GpuInventory::default())
            .unwrap();
        version = moved(&registry, version, "an inventory");
        registry.session_ended(&id("a"), 1, t1);
        version = moved(&registry, version, "going OFFLINE");
        registry
            .register(registration("a", "b2"), enroll(2, t1), t1)
            .unwrap();
        version = moved(&registry, version, "a registration");
        registry.sweep(t1.after(OFFLINE_AFTER + INTERVAL));
        version = moved(&registry, version, "a sweep that marks a node OFFLINE");
        registry
            .heartbeat(&id("a"), 2, t1.after(OFFLINE_AFTER * 2))
            .unwrap();
        version = moved(&registry, version, "a heartbeat that brings a node back");
        registry.leave(&id("a"), 2, t1).unwrap();
        version = moved(&registry, version, "a leave");
        registry.sweep(t1.after(EXPIRE_AFTER));
        version = moved(&registry, version, "an expiry");
        registry.load([stored("b", 1, None, t1)], t1);
        version = moved(&registry, version, "a reload");
        registry.remove(&id("b"), 1);
        moved(&registry, version, "a removal");
    }

    #[test]
    fn a_left_node_is_not_judged_by_silence_and_expires_from_when_it_left() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        let left = t0.after(Duration::from_secs(1));
        registry.leave(&id("a"), 1, left).unwrap();
        registry.session_ended(&id("a"), 1, left);
        assert_eq!(state(&registry, "a"), Some(NodeState::Left));
        assert_eq!(
            registry.get(&id("a")).unwrap().offline_since,
            Some(left.wall)
        );
        assert!(
            registry.take_changes().is_empty(),
            "the session wrote the leave"
        );

        let report = registry.sweep(left.after(EXPIRE_AFTER - Duration::from_millis(1)));
        assert_eq!(
            report,
            SweepReport::default(),
            "never OFFLINE, not yet expired"
        );
        assert_eq!(state(&registry, "a"), Some(NodeState::Left));
        assert_eq!(registry.sweep(left.after(EXPIRE_AFTER)).expired, 1);
        assert_eq!(state(&registry, "a"), None);
    }

    #[test]
    fn a_stale_generations_leave_is_ignored() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry
            .register(registration("a", "b2"), enroll(2, t0), t0)
            .unwrap();
        assert_eq!(
            registry.leave(&id("a"), 1, t0),
            Err(SessionRejected::Superseded { current: 2 })
        );
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));
        assert_eq!(
            registry.leave(&id("z"), 1, t0),
            Err(SessionRejected::Forgotten)
        );
    }

    #[test]
    fn a_left_node_registering_again_is_online() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry.leave(&id("a"), 1, t0).unwrap();
        registry
            .register(registration("a", "b2"), enroll(2, t0), t0)
            .unwrap();
        let node = registry.get(&id("a")).unwrap();
        assert_eq!((node.state, node.offline_since), (NodeState::Online, None));
    }

    #[test]
    fn a_left_node_reloads_left_and_is_not_probed() {
        let t0 = Moment::now();
        let left_at = t0.wall - Duration::from_secs(60);
        let mut node = stored("a", 1, None, t0);
        node.left_at = Some(left_at);
        let mut registry = registry();
        registry.load([node, stored("b", 2, None, t0)], t0);
        assert_eq!(state(&registry, "a"), Some(NodeState::Left));
        let probed: Vec<_> = registry.unproven().into_iter().map(|t| t.node_id).collect();
        assert_eq!(probed, [id("b")]);
        registry.sweep(t0.after(GRACE));
        assert_eq!(state(&registry, "a"), Some(NodeState::Left));
        assert_eq!(
            registry
                .sweep(t0.after(EXPIRE_AFTER - Duration::from_secs(60)))
                .expired,
            1,
            "expiry counts from when it left, not from the restart"
        );
        assert_eq!(state(&registry, "a"), None);
    }

    #[test]
    fn left_nodes_do_not_count_toward_the_mass_expiry_guard() {
        let t0 = Moment::now();
        let mut registry = registry();
        register_fleet(&mut registry, 7, t0);
        // Three leave on purpose and one dies: one of the four members is
        // down, well under half, though four of seven nodes are not ONLINE.
        for (i, node) in ["n0", "n1", "n2"].into_iter().enumerate() {
            registry.leave(&id(node), i as u64 + 1, t0).unwrap();
        }
        registry.session_ended(&id("n3"), 4, t0);
        let later = t0.after(EXPIRE_AFTER);
        for (i, node) in ["n4", "n5", "n6"].into_iter().enumerate() {
            registry.heartbeat(&id(node), i as u64 + 5, later).unwrap();
        }
        let report = registry.sweep(later);
        assert_eq!(report.guard_changed, None);
        assert_eq!(
            registry.expiry_guard(),
            ExpiryGuard {
                paused: false,
                down: 1,
                known: 4
            }
        );
        assert_eq!(report.expired, 4, "the LEFT nodes and the dead one");
    }

    #[test]
    fn a_drain_is_kept_by_re_registration_and_cleared_by_undrain() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        let drained = registry.set_drain(&id("a"), 1, drain("fan", t0)).unwrap();
        assert_eq!(drained.drain, drain("fan", t0));
        registry
            .register(registration("a", "b2"), enroll(2, t0), t0)
            .unwrap();
        assert_eq!(registry.get(&id("a")).unwrap().drain, drain("fan", t0));
        registry.set_drain(&id("a"), 2, None).unwrap();
        assert_eq!(registry.get(&id("a")).unwrap().drain, None);
    }

    #[test]
    fn a_drain_recorded_before_its_nodes_registration_applies_is_kept() {
        let t0 = Moment::now();
        let mut registry = registry();
        // The store committed generation 3, then the drain; the registry
        // hears of the drain first.
        assert!(registry.set_drain(&id("a"), 3, drain("rma", t0)).is_none());
        registry
            .register(registration("a", "b"), enroll(3, t0), t0)
            .unwrap();
        assert_eq!(registry.get(&id("a")).unwrap().drain, drain("rma", t0));

        // One recorded on an older row does not reach a newer registration.
        registry.set_drain(&id("b"), 1, drain("old", t0));
        registry
            .register(registration("b", "b"), enroll(4, t0), t0)
            .unwrap();
        assert_eq!(registry.get(&id("b")).unwrap().drain, None);
    }

    #[test]
    fn a_drained_node_is_still_judged_by_silence_and_probed() {
        let t0 = Moment::now();
        let mut node = stored("a", 1, None, t0);
        node.drain = drain("fan", t0);
        let mut registry = registry();
        registry.load([node], t0);
        assert_eq!(registry.unproven().len(), 1);
        registry.sweep(t0.after(GRACE));
        let node = registry.get(&id("a")).unwrap();
        assert_eq!(
            (node.state, node.drain),
            (NodeState::Offline, drain("fan", t0))
        );
    }

    #[test]
    fn registration_makes_a_node_online() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        let node = registry.get(&id("a")).unwrap();
        assert_eq!(node.state, NodeState::Online);
        assert_eq!(node.generation, 1);
        assert_eq!(node.last_seen, t0.wall);
        assert!(
            registry.take_changes().is_empty(),
            "a registration is persisted by the store itself"
        );
    }

    #[test]
    fn heartbeats_keep_a_node_online_and_silence_takes_it_offline() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);

        let t1 = t0.after(OFFLINE_AFTER - Duration::from_secs(1));
        registry.heartbeat(&id("a"), 1, t1).unwrap();
        assert_eq!(
            registry.sweep(t1.after(OFFLINE_AFTER - Duration::from_millis(1))),
            SweepReport::default()
        );
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));

        let silent = t1.after(OFFLINE_AFTER);
        assert_eq!(registry.sweep(silent).went_offline, 1);
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
        assert_eq!(
            registry.take_changes(),
            vec![Change::WentOffline {
                node_id: id("a"),
                generation: 1,
                since: silent.wall
            }]
        );
    }

    #[test]
    fn a_heartbeat_after_going_offline_brings_the_node_back() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry.sweep(t0.after(OFFLINE_AFTER));
        registry.take_changes();

        registry
            .heartbeat(&id("a"), 1, t0.after(OFFLINE_AFTER * 2))
            .unwrap();
        let node = registry.get(&id("a")).unwrap();
        assert_eq!(node.state, NodeState::Online);
        assert_eq!(node.offline_since, None);
        assert_eq!(
            registry.take_changes(),
            vec![Change::CameOnline {
                node_id: id("a"),
                generation: 1
            }]
        );
    }

    #[test]
    fn a_stream_that_ends_takes_its_node_offline_at_once() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry.session_ended(&id("a"), 1, t0.after(Duration::from_millis(10)));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
        assert_eq!(registry.take_changes().len(), 1);
    }

    #[test]
    fn an_older_session_never_overwrites_a_newer_one() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry
            .register(registration("a", "b2"), enroll(2, t0), t0)
            .unwrap();

        assert_eq!(
            registry.heartbeat(&id("a"), 1, t0),
            Err(SessionRejected::Superseded { current: 2 })
        );
        registry.session_ended(&id("a"), 1, t0);
        let node = registry.get(&id("a")).unwrap();
        assert_eq!(node.state, NodeState::Online);
        assert_eq!(node.registration.boot_id, "b2");
        assert!(registry.take_changes().is_empty());
    }

    #[test]
    fn a_registration_committed_before_a_newer_one_is_refused_when_applied_late() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry
            .register(registration("a", "b2"), enroll(2, t0), t0)
            .unwrap();
        assert_eq!(
            registry.register(registration("a", "b1"), enroll(1, t0), t0),
            Err(SessionRejected::Superseded { current: 2 })
        );
        assert_eq!(registry.get(&id("a")).unwrap().registration.boot_id, "b2");
    }

    #[test]
    fn offline_nodes_expire_after_expire_after() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry.session_ended(&id("a"), 1, t0);
        registry.take_changes();

        assert_eq!(
            registry
                .sweep(t0.after(EXPIRE_AFTER - Duration::from_millis(1)))
                .expired,
            0
        );
        assert_eq!(registry.sweep(t0.after(EXPIRE_AFTER)).expired, 1);
        assert_eq!(state(&registry, "a"), None);
        assert_eq!(
            registry.take_changes(),
            vec![Change::Expired {
                node_id: id("a"),
                generation: 1
            }]
        );
        assert_eq!(
            registry.heartbeat(&id("a"), 1, t0),
            Err(SessionRejected::Forgotten)
        );
    }

    #[test]
    fn reloaded_nodes_are_unknown_until_proven_then_offline_after_the_grace() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load([stored("a", 4, None, t0), stored("b", 2, None, t0)], t0);
        assert_eq!(state(&registry, "a"), Some(NodeState::Unknown));
        let targets = registry.unproven();
        assert_eq!(targets.len(), 2);

        assert!(registry.is_unproven(&targets[0]));
        assert!(registry.probe_succeeded(&targets[0], t0.after(Duration::from_secs(1))));
        assert!(!registry.is_unproven(&targets[0]));
        assert!(!registry.probe_succeeded(&targets[0], t0.after(Duration::from_secs(1))));
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));
        assert_eq!(
            registry.unproven(),
            vec![ProbeTarget {
                node_id: id("b"),
                agent_url: "http://b:7701".to_owned(),
                generation: 2
            }]
        );

        registry.sweep(t0.after(GRACE - Duration::from_millis(1)));
        assert_eq!(state(&registry, "b"), Some(NodeState::Unknown));
        registry.sweep(t0.after(GRACE));
        assert_eq!(state(&registry, "b"), Some(NodeState::Offline));
    }

    #[test]
    fn a_reloaded_node_re_registers_with_a_higher_generation() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load([stored("a", 4, None, t0)], t0);
        assert!(
            registry
                .register(registration("a", "b"), enroll(4, t0), t0)
                .is_err()
        );
        registry
            .register(registration("a", "b"), enroll(5, t0), t0)
            .unwrap();
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));
    }

    #[test]
    fn expiry_counts_from_the_persisted_offline_moment_across_restarts() {
        let t0 = Moment::now();
        let went_offline = t0.wall - Duration::from_secs(600);
        let mut registry = registry();
        registry.load([stored("a", 1, Some(went_offline), t0)], t0);

        registry.sweep(t0.after(GRACE));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
        assert_eq!(
            registry.take_changes(),
            [Change::WentOffline {
                node_id: NodeId::parse("node_id", "a").unwrap(),
                generation: 1,
                since: went_offline,
            }],
            "UNKNOWN to OFFLINE is written, keeping the persisted moment"
        );
        let due = t0.after(EXPIRE_AFTER - Duration::from_secs(600));
        assert_eq!(
            registry
                .sweep(due.earlier(Duration::from_millis(1)))
                .expired,
            0
        );
        assert_eq!(registry.sweep(due).expired, 1);
    }

    /// `now` with the wall clock stepped by `step` seconds, either way, and
    /// the monotonic clock untouched, as a real step leaves it.
    fn stepped(now: Moment, step: i64) -> Moment {
        let magnitude = Duration::from_secs(step.unsigned_abs());
        Moment {
            monotonic: now.monotonic,
            wall: if step >= 0 {
                now.wall + magnitude
            } else {
                now.wall - magnitude
            },
        }
    }

    #[test]
    fn a_wall_clock_step_at_run_time_neither_hastens_nor_delays_expiry() {
        for step in [2 * 3600, -2 * 3600] {
            let t0 = Moment::now();
            let mut registry = with_online("a", 1, t0);
            registry.session_ended(&id("a"), 1, t0);

            let after_step = stepped(t0.after(Duration::from_secs(3)), step);
            assert_eq!(registry.sweep(after_step).expired, 0, "step {step}");
            let almost = stepped(t0.after(EXPIRE_AFTER - Duration::from_millis(1)), step);
            assert_eq!(registry.sweep(almost).expired, 0, "step {step}");
            let due = stepped(t0.after(EXPIRE_AFTER), step);
            assert_eq!(registry.sweep(due).expired, 1, "step {step}");
        }
    }

    #[test]
    fn a_node_silenced_before_a_step_expires_by_the_monotonic_clock() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        let went_offline = stepped(t0.after(OFFLINE_AFTER), 2 * 3600);
        registry.sweep(went_offline);
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
        let almost = stepped(t0.after(OFFLINE_AFTER + EXPIRE_AFTER), -2 * 3600);
        assert_eq!(
            registry
                .sweep(almost.earlier(Duration::from_millis(1)))
                .expired,
            0
        );
        assert_eq!(registry.sweep(almost).expired, 1);
    }

    #[test]
    fn after_a_restart_half_of_expire_after_is_always_measured_anew() {
        let t0 = Moment::now();
        let timing = timing(1000);
        let hour = Duration::from_secs(3600);
        // Honest, recent: the rest of expire-after.
        assert_eq!(
            timing.expiry_after_restart(t0.wall - Duration::from_secs(600), t0.wall),
            EXPIRE_AFTER - Duration::from_secs(600)
        );
        // Written under a clock two hours behind: it looks older than
        // expire-after, yet half of it is still measured from start-up.
        assert_eq!(
            timing.expiry_after_restart(t0.wall - 2 * hour - Duration::from_secs(5), t0.wall),
            EXPIRE_AFTER / 2
        );
        // Written under a clock two hours ahead: a full expire-after from
        // start-up, not two hours more.
        assert_eq!(
            timing.expiry_after_restart(t0.wall + 2 * hour, t0.wall),
            EXPIRE_AFTER
        );
    }

    #[test]
    fn a_future_dated_offline_moment_expires_one_expire_after_from_start_up() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load(
            [stored(
                "a",
                1,
                Some(t0.wall + Duration::from_secs(7200)),
                t0,
            )],
            t0,
        );
        registry.sweep(t0.after(GRACE));
        assert_eq!(
            registry
                .sweep(t0.after(EXPIRE_AFTER).earlier(Duration::from_millis(1)))
                .expired,
            0
        );
        assert_eq!(registry.sweep(t0.after(EXPIRE_AFTER)).expired, 1);
    }

    #[test]
    fn more_than_half_of_the_fleet_down_pauses_expiry_until_it_recovers() {
        let t0 = Moment::now();
        let mut registry = registry();
        register_fleet(&mut registry, 4, t0);
        for (node, generation) in [("n1", 2), ("n2", 3), ("n3", 4)] {
            registry.session_ended(&id(node), generation, t0);
        }
        let later = t0.after(EXPIRE_AFTER * 2);
        registry.heartbeat(&id("n0"), 1, later).unwrap();
        let report = registry.sweep(later);
        assert_eq!(report.expired, 0);
        let paused = ExpiryGuard {
            paused: true,
            down: 3,
            known: 4,
        };
        assert_eq!(report.guard_changed, Some(paused));
        assert_eq!(registry.expiry_guard(), paused);
        assert_eq!(registry.sweep(later).guard_changed, None, "reported once");

        // Half down is not more than half: expiry resumes.
        registry.heartbeat(&id("n1"), 2, later).unwrap();
        let report = registry.sweep(later);
        assert_eq!(report.expired, 2);
        assert_eq!(
            report.guard_changed,
            Some(ExpiryGuard {
                paused: false,
                down: 2,
                known: 4
            })
        );
        assert_eq!(state(&registry, "n2"), None);
        assert_eq!(state(&registry, "n1"), Some(NodeState::Online));
    }

    #[test]
    fn going_offline_is_never_paused() {
        let t0 = Moment::now();
        let mut registry = registry();
        register_fleet(&mut registry, 4, t0);
        let report = registry.sweep(t0.after(OFFLINE_AFTER));
        assert_eq!(report.went_offline, 4);
        assert!(registry.expiry_guard().paused);
    }

    #[test]
    fn a_fleet_smaller_than_the_guard_minimum_still_expires_its_dead_nodes() {
        for size in 1..MIN_GUARDED_FLEET {
            let t0 = Moment::now();
            let mut registry = registry();
            register_fleet(&mut registry, size, t0);
            registry.sweep(t0.after(OFFLINE_AFTER));
            let report = registry.sweep(t0.after(OFFLINE_AFTER + EXPIRE_AFTER));
            assert_eq!(report.expired, size, "a fleet of {size}");
            assert_eq!(report.guard_changed, None);
        }
    }

    #[test]
    fn a_fraction_of_one_never_pauses() {
        let t0 = Moment::now();
        let mut registry = Registry::new(Timing {
            expiry_guard_fraction: 1.0,
            ..timing(1000)
        });
        register_fleet(&mut registry, 5, t0);
        registry.sweep(t0.after(OFFLINE_AFTER));
        let report = registry.sweep(t0.after(OFFLINE_AFTER + EXPIRE_AFTER));
        assert_eq!(report.expired, 5);
    }

    #[test]
    fn unknown_nodes_after_a_restart_count_as_down() {
        let t0 = Moment::now();
        let long_ago = t0.wall - EXPIRE_AFTER * 2;
        let mut registry = registry();
        registry.load(
            [
                stored("a", 1, None, t0),
                stored("b", 1, None, t0),
                stored("c", 1, Some(long_ago), t0),
                stored("d", 1, Some(long_ago), t0),
            ],
            t0,
        );
        // c and d are OFFLINE again, a and b still UNKNOWN: all four down.
        let due = t0.after(EXPIRE_AFTER / 2);
        registry.sweep(t0.after(OFFLINE_AFTER));
        assert!(registry.expiry_guard().paused);
        assert_eq!(registry.unproven().len(), 2);
        assert_eq!(registry.sweep(due).expired, 0);
        for node in ["a", "b"] {
            registry
                .register(registration(node, "b2"), enroll(2, due), due)
                .unwrap();
        }
        assert_eq!(registry.sweep(due).expired, 2);
        assert!(!registry.expiry_guard().paused);
    }

    #[test]
    fn a_probe_clears_a_persisted_offline_moment() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load([stored("a", 3, Some(t0.wall), t0)], t0);
        let target = registry.unproven().remove(0);
        assert!(registry.probe_succeeded(&target, t0));
        assert_eq!(
            registry.take_changes(),
            vec![Change::CameOnline {
                node_id: id("a"),
                generation: 3
            }]
        );
    }

    #[test]
    fn last_seen_is_collected_once_per_heartbeat_batch() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry
            .register(registration("b", "b"), enroll(1, t0), t0)
            .unwrap();
        assert!(registry.take_last_seen().is_empty());

        let t1 = t0.after(Duration::from_secs(1));
        for _ in 0..3 {
            registry.heartbeat(&id("a"), 1, t1).unwrap();
        }
        let batch = registry.take_last_seen();
        assert_eq!(batch, vec![(id("a"), t1.wall)]);
        assert!(registry.take_last_seen().is_empty());

        registry.restore_last_seen(&batch);
        assert_eq!(registry.take_last_seen(), batch);
    }

    #[test]
    fn an_inventory_is_replaced_by_the_current_session_only_and_collected_once() {
        use crate::node::Gpu;
        let t0 = Moment::now();
        let mut registry = with_online("a", 2, t0);
        let gpus = GpuInventory::new(
            "inventory",
            vec![Gpu {
                uuid: "GPU-0".to_owned(),
                name: "A100".to_owned(),
                memory_total_mib: 100,
                ..Gpu::default()
            }],
        )
        .unwrap();
        assert_eq!(
            registry.report_inventory(&id("a"), 1, gpus.clone()),
            Err(SessionRejected::Superseded { current: 2 })
        );
        assert!(registry.take_inventories().is_empty());
        assert!(registry.get(&id("a")).unwrap().registration.gpus.is_empty());

        registry
            .report_inventory(&id("a"), 2, gpus.clone())
            .unwrap();
        assert_eq!(registry.get(&id("a")).unwrap().registration.gpus, gpus);
        let batch = registry.take_inventories();
        assert_eq!(
            batch,
            vec![InventoryUpdate {
                node_id: id("a"),
                generation: 2,
                gpus: gpus.clone()
            }]
        );
        assert!(registry.take_inventories().is_empty());
        registry.restore_inventories(&batch);
        assert_eq!(registry.take_inventories(), batch);

        registry.restore_inventories(&batch);
        registry
            .register(registration("a", "again"), enroll(3, t0), t0)
            .unwrap();
        assert!(
            registry.take_inventories().is_empty(),
            "a registration writes its own inventory"
        );
    }

    #[test]
    fn a_late_probe_answer_never_overrides_a_session() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load([stored("a", 4, None, t0)], t0);
        let target = registry.unproven().remove(0);

        registry
            .register(registration("a", "b"), enroll(5, t0), t0)
            .unwrap();
        registry.session_ended(&id("a"), 5, t0);
        assert!(!registry.probe_succeeded(&target, t0));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
    }

    #[test]
    fn a_registration_the_store_could_not_commit_vouches_for_a_known_node() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry.session_ended(&id("a"), 1, t0);
        registry.take_changes();

        let t1 = t0.after(Duration::from_secs(1));
        assert!(registry.vouch(&id("a"), Duration::ZERO, t1));
        let node = registry.get(&id("a")).unwrap();
        assert_eq!((node.state, node.generation), (NodeState::Online, 1));
        assert_eq!(
            registry.take_changes(),
            vec![Change::CameOnline {
                node_id: id("a"),
                generation: 1
            }]
        );
        let within_grace = t1.after(GRACE.max(OFFLINE_AFTER) - Duration::from_millis(1));
        assert_eq!(registry.sweep(within_grace).went_offline, 0);
        assert_eq!(
            registry
                .sweep(t1.after(GRACE.max(OFFLINE_AFTER)))
                .went_offline,
            1
        );

        assert!(!registry.vouch(&id("stranger"), Duration::ZERO, t1));
        assert!(registry.get(&id("stranger")).is_none());
    }

    #[test]
    fn a_probe_keeps_a_node_online_for_the_reload_grace() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load([stored("a", 4, None, t0)], t0);
        let target = registry.unproven().remove(0);
        assert!(registry.probe_succeeded(&target, t0));
        registry.sweep(t0.after(GRACE - Duration::from_millis(1)));
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));
        registry.sweep(t0.after(GRACE));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
    }

    #[test]
    fn a_stall_of_the_coordinator_is_not_held_against_nodes() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        registry
            .register(registration("gone", "b"), enroll(2, t0), t0)
            .unwrap();
        registry.session_ended(&id("gone"), 2, t0);

        let stall = Duration::from_secs(10);
        let resumed = t0.after(OFFLINE_AFTER + stall - Duration::from_secs(1));
        registry.pardon_stall(stall, resumed);
        registry.sweep(t0.after(OFFLINE_AFTER + stall - Duration::from_millis(1)));
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));
        registry.sweep(t0.after(OFFLINE_AFTER + stall));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
        assert_eq!(state(&registry, "gone"), Some(NodeState::Offline));
    }

    #[test]
    fn a_stall_is_pardoned_once_and_never_beyond_offline_after() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);

        // An hour-long pause earns at most a full offline_after from the resume.
        let resumed = t0.after(Duration::from_secs(3600));
        registry.pardon_stall(Duration::from_secs(3600), resumed);
        registry.sweep(resumed.after(OFFLINE_AFTER - Duration::from_millis(1)));
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));

        // A coordinator that keeps running late does not keep a silent node alive.
        registry.pardon_stall(
            Duration::from_secs(3600),
            resumed.after(Duration::from_secs(1)),
        );
        registry.sweep(resumed.after(OFFLINE_AFTER));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
    }

    #[test]
    fn a_node_heard_after_a_stall_is_not_credited_for_it() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        let resumed = t0.after(Duration::from_secs(60));
        registry.heartbeat(&id("a"), 1, resumed).unwrap();
        registry.pardon_stall(Duration::from_secs(60), resumed);
        registry.sweep(resumed.after(OFFLINE_AFTER));
        assert_eq!(state(&registry, "a"), Some(NodeState::Offline));
    }

    #[test]
    fn a_session_learns_whether_it_still_speaks_for_its_node() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        assert_eq!(registry.session_state(&id("a"), 1), Ok(NodeState::Online));
        registry.sweep(t0.after(OFFLINE_AFTER));
        assert_eq!(registry.session_state(&id("a"), 1), Ok(NodeState::Offline));
        registry
            .register(registration("a", "b"), enroll(2, t0), t0)
            .unwrap();
        assert_eq!(
            registry.session_state(&id("a"), 1),
            Err(SessionRejected::Superseded { current: 2 })
        );
        assert_eq!(
            registry.session_state(&id("z"), 1),
            Err(SessionRejected::Forgotten)
        );
    }

    /// Registers nodes `n0`, `n1`, ... up to `count`, returning each one's
    /// assigned interval.
    fn register_fleet(registry: &mut Registry, count: usize, now: Moment) -> Vec<Duration> {
        (0..count)
            .map(|i| {
                let generation = u64::try_from(i).unwrap() + 1;
                registry
                    .register(
                        registration(&format!("n{i}"), "b"),
                        enroll(generation, now),
                        now,
                    )
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_small_fleet_heartbeats_at_the_configured_interval() {
        let timing = timing(1000);
        assert_eq!(timing.interval_for(0), INTERVAL);
        assert_eq!(timing.interval_for(5000), INTERVAL);
        assert_eq!(timing.offline_after_at(INTERVAL), OFFLINE_AFTER);
    }

    #[test]
    fn a_large_fleet_is_stretched_in_whole_intervals_to_stay_under_the_cap() {
        let timing = timing(1000);
        for nodes in [1, 4999, 5000, 5001, 10_000, 10_001, 123_456] {
            let interval = timing.interval_for(nodes);
            assert!(interval >= INTERVAL);
            assert_eq!(interval.as_nanos() % INTERVAL.as_nanos(), 0, "{nodes}");
            let rate = nodes as f64 / interval.as_secs_f64();
            assert!(rate <= 1000.0, "{nodes} nodes at {interval:?}: {rate}/s");
            // No longer than needed: one step shorter would break the cap.
            if interval > INTERVAL {
                assert!(nodes as f64 / (interval - INTERVAL).as_secs_f64() > 1000.0);
            }
        }
        assert_eq!(timing.interval_for(5001), INTERVAL * 2);
        assert_eq!(
            timing.offline_after_at(INTERVAL * 2),
            OFFLINE_AFTER * 2,
            "offline-after scales with the interval"
        );
    }

    #[test]
    fn a_cap_below_one_heartbeat_per_interval_still_allows_one() {
        let timing = Timing {
            heartbeat_interval: Duration::from_millis(100),
            ..timing(1)
        };
        assert_eq!(timing.interval_for(1), Duration::from_millis(100));
        assert_eq!(timing.interval_for(3), Duration::from_millis(300));
        assert_eq!(timing.interval_for(usize::MAX), Duration::from_secs(1000));
    }

    #[test]
    fn registrations_get_the_interval_of_the_fleet_they_join() {
        let t0 = Moment::now();
        let mut registry = Registry::new(timing(1)); // 5 heartbeats per 5 s
        let intervals = register_fleet(&mut registry, 11, t0);
        assert_eq!(intervals[..5], [INTERVAL; 5]);
        assert_eq!(intervals[5..10], [INTERVAL * 2; 5]);
        assert_eq!(intervals[10], INTERVAL * 3);

        // A re-registration does not count its node twice.
        let again = registry
            .register(registration("n0", "b2"), enroll(100, t0), t0)
            .unwrap();
        assert_eq!(again, INTERVAL * 3);
    }

    #[test]
    fn earlier_nodes_are_told_the_longer_interval_on_their_next_heartbeat() {
        let t0 = Moment::now();
        let mut registry = Registry::new(timing(1));
        register_fleet(&mut registry, 10, t0);
        let t1 = t0.after(INTERVAL);
        assert_eq!(registry.heartbeat(&id("n0"), 1, t1), Ok(Some(INTERVAL * 2)));
        assert_eq!(registry.heartbeat(&id("n0"), 1, t1), Ok(None), "told once");
        assert_eq!(registry.heartbeat(&id("n9"), 10, t1), Ok(None));

        // Its silence is judged by the longer interval from then on.
        registry.sweep(t1.after(OFFLINE_AFTER * 2 - Duration::from_millis(1)));
        assert_eq!(state(&registry, "n0"), Some(NodeState::Online));
        registry.sweep(t1.after(OFFLINE_AFTER * 2));
        assert_eq!(state(&registry, "n0"), Some(NodeState::Offline));
    }

    #[test]
    fn the_fleet_rate_stays_under_the_cap_once_every_node_has_heartbeated() {
        let t0 = Moment::now();
        let mut registry = Registry::new(timing(100)); // 500 per 5 s
        let mut intervals = register_fleet(&mut registry, 1234, t0);
        let t1 = t0.after(INTERVAL);
        for (i, interval) in intervals.iter_mut().enumerate() {
            let generation = u64::try_from(i).unwrap() + 1;
            if let Some(retuned) = registry
                .heartbeat(&id(&format!("n{i}")), generation, t1)
                .unwrap()
            {
                *interval = retuned;
            }
        }
        let rate: f64 = intervals.iter().map(|i| 1.0 / i.as_secs_f64()).sum();
        assert!(rate <= 100.0, "{rate} heartbeats/s");
        assert!(intervals.iter().all(|i| *i == INTERVAL * 3));
    }

    #[test]
    fn a_shrinking_fleet_gets_shorter_intervals_only_well_below_the_step() {
        let timing = timing(1);
        // Five nodes fit in one interval; the sixth needs two.
        assert_eq!(timing.retune(INTERVAL, 6), INTERVAL * 2);
        assert_eq!(
            timing.retune(INTERVAL * 2, 5),
            INTERVAL * 2,
            "at the boundary"
        );
        assert_eq!(timing.retune(INTERVAL * 2, 4), INTERVAL);
        assert_eq!(timing.retune(INTERVAL * 3, 8), INTERVAL * 2);
    }

    #[test]
    fn nodes_live_at_a_restart_get_the_reload_grace_and_offline_ones_only_offline_after() {
        let t0 = Moment::now();
        let mut registry = registry();
        registry.load(
            [
                stored("live", 1, None, t0),
                stored("gone", 2, Some(t0.wall), t0),
            ],
            t0,
        );
        registry.sweep(t0.after(OFFLINE_AFTER));
        assert_eq!(state(&registry, "live"), Some(NodeState::Unknown));
        assert_eq!(state(&registry, "gone"), Some(NodeState::Offline));
        registry.sweep(t0.after(GRACE));
        assert_eq!(state(&registry, "live"), Some(NodeState::Offline));
    }

    #[test]
    fn a_reloaded_node_is_allowed_its_own_agents_backoff_ceiling() {
        let t0 = Moment::now();
        let slow_backoff = Duration::from_secs(120);
        let mut slow = stored("slow", 1, None, t0);
        slow.registration.max_backoff = slow_backoff;
        let mut registry = registry();
        registry.load([stored("quick", 2, None, t0), slow], t0);
        registry.sweep(t0.after(GRACE));
        assert_eq!(state(&registry, "quick"), Some(NodeState::Offline));
        assert_eq!(state(&registry, "slow"), Some(NodeState::Unknown));
        registry.sweep(t0.after(slow_backoff + GRACE - Duration::from_millis(1)));
        assert_eq!(state(&registry, "slow"), Some(NodeState::Unknown));
        registry.sweep(t0.after(slow_backoff + GRACE));
        assert_eq!(state(&registry, "slow"), Some(NodeState::Offline));
    }

    #[test]
    fn a_probed_node_whose_agent_declares_a_long_backoff_is_not_kept_online_for_it() {
        let t0 = Moment::now();
        let mut long = stored("long", 1, None, t0);
        long.registration.max_backoff = crate::node::MAX_MAX_BACKOFF;
        let mut registry = registry();
        registry.load([long], t0);
        let target = registry.unproven().remove(0);
        assert!(registry.probe_succeeded(&target, t0));
        let allowance = DEFAULT_MAX_BACKOFF + GRACE;
        registry.sweep(t0.after(allowance - Duration::from_millis(1)));
        assert_eq!(state(&registry, "long"), Some(NodeState::Online));
        registry.sweep(t0.after(allowance));
        assert_eq!(state(&registry, "long"), Some(NodeState::Offline));
    }

    #[test]
    fn list_is_ordered_by_node_id() {
        let t0 = Moment::now();
        let mut registry = registry();
        for node in ["c", "a", "b"] {
            registry
                .register(registration(node, "b"), enroll(1, t0), t0)
                .unwrap();
        }
        let ids: Vec<_> = registry
            .list()
            .into_iter()
            .map(|n| n.registration.node_id.to_string())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn removal_forgets_the_node_and_ends_its_session() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 3, t0);
        assert!(
            registry.remove(&id("a"), 2).is_none(),
            "a newer registration is kept"
        );
        let removed = registry.remove(&id("a"), 3).unwrap();
        assert_eq!(removed.generation, 3);
        assert_eq!(state(&registry, "a"), None);
        assert_eq!(
            registry.heartbeat(&id("a"), 3, t0),
            Err(SessionRejected::Forgotten)
        );
        assert!(registry.remove(&id("a"), 3).is_none());
    }

    #[test]
    fn a_registration_whose_row_was_removed_before_it_applied_is_refused() {
        let t0 = Moment::now();
        let mut registry = with_online("a", 1, t0);
        // Generation 2 was committed, then the operator's removal deleted
        // its row before the registration reached the registry.
        registry.remove(&id("a"), 2);
        assert_eq!(
            registry.register(registration("a", "b2"), enroll(2, t0), t0),
            Err(SessionRejected::Forgotten)
        );
        assert_eq!(state(&registry, "a"), None);
        registry
            .register(registration("a", "b3"), enroll(3, t0), t0)
            .unwrap();
        assert_eq!(state(&registry, "a"), Some(NodeState::Online));
    }
}
