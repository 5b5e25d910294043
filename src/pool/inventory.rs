//! The pool's copy of the fleet: nodes, their GPUs, what is counted against
//! each GPU, and the best-fit index.
//!
//! Invariants: `fit` holds exactly the placeable GPUs (present, healthy, on
//! an ONLINE node that is not drained), each once, keyed by its current
//! free memory; `irregular` holds exactly the placeable GPUs with revoked
//! or reserved memory. Every change to a GPU's counts or to its node goes
//! through [`Inventory::reindex`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::node::{NodeId, NodeState};

use super::lease::Constraints;

/// A node as the pool needs to see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub node_id: NodeId,
    pub state: NodeState,
    pub drained: bool,
    pub labels: BTreeMap<String, String>,
}

/// A GPU as its node last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub total_mib: u64,
    pub used_mib: u64,
    pub healthy: bool,
}

/// What is counted against one GPU, for readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuUsage {
    pub node_id: NodeId,
    pub index: u32,
    pub uuid: String,
    pub total_mib: u64,
    pub used_mib: u64,
    /// Sum of the leases that count: ACTIVE, REVOKED and SUSPENDED.
    pub leased_mib: u64,
    /// Of `leased_mib`, what REVOKED leases hold until they are freed.
    pub revoked_mib: u64,
    /// Held for acquisitions waiting on revoked leases.
    pub reserved_mib: u64,
    pub free_mib: u64,
    pub placeable: bool,
}

pub(super) type GpuKey = (NodeId, String);

/// Ordered so that the first entry at or above a size is the best fit:
/// least free memory, then node id, then GPU index. The node id is always
/// `Some` in the index; `None` sorts first, so a range can start below
/// every node id.
pub(super) type FitKey = (u64, Option<NodeId>, u32, String);

pub(super) struct NodeEntry {
    pub state: NodeState,
    pub drained: bool,
    pub labels: BTreeMap<String, String>,
}

pub(super) struct GpuEntry {
    pub index: u32,
    pub total_mib: u64,
    pub used_mib: u64,
    pub healthy: bool,
    /// In the node's latest inventory. A GPU that vanished from it is kept,
    /// unplaceable, while leases still count against it.
    pub present: bool,
    pub leased_mib: u64,
    pub revoked_mib: u64,
    pub reserved_mib: u64,
    /// Generations of the leases that count against it.
    pub leases: BTreeSet<u64>,
    indexed_as: Option<FitKey>,
}

impl GpuEntry {
    fn absent() -> Self {
        Self {
            index: u32::MAX,
            total_mib: 0,
            used_mib: 0,
            healthy: false,
            present: false,
            leased_mib: 0,
            revoked_mib: 0,
            reserved_mib: 0,
            leases: BTreeSet::new(),
            indexed_as: None,
        }
    }

    /// Total minus the larger of what is promised (leases and
    /// reservations) and what the node reports in use.
    pub fn free_mib(&self) -> u64 {
        self.free_mib_without_reservation(0)
    }

    /// Free memory if `reservation` of the reserved memory were not held.
    pub fn free_mib_without_reservation(&self, reservation: u64) -> u64 {
        let promised = self.leased_mib + self.reserved_mib.saturating_sub(reservation);
        self.total_mib.saturating_sub(promised.max(self.used_mib))
    }

    /// Free memory once every REVOKED lease is freed, assuming the memory
    /// in use that no lease accounts for stays in use.
    pub fn free_mib_after_revocations(&self) -> u64 {
        let staying = self.leased_mib - self.revoked_mib;
        let unaccounted = self.used_mib.saturating_sub(self.leased_mib);
        self.total_mib
            .saturating_sub(staying + self.reserved_mib.max(unaccounted))
    }

    /// Its key in the best-fit index; `None` when it is not placeable.
    pub fn fit_key(&self) -> Option<&FitKey> {
        self.indexed_as.as_ref()
    }

    fn in_use(&self) -> bool {
        !self.leases.is_empty() || self.reserved_mib > 0
    }
}

#[derive(Default)]
pub(super) struct Inventory {
    pub nodes: HashMap<NodeId, NodeEntry>,
    pub gpus: HashMap<GpuKey, GpuEntry>,
    /// Every GPU entry of each node, present or not, by uuid.
    pub gpus_of_node: HashMap<NodeId, BTreeSet<String>>,
    /// Nodes holding a GPU entry with this uuid (simulated fleets repeat
    /// uuids across nodes).
    pub nodes_of_uuid: HashMap<String, BTreeSet<NodeId>>,
    pub fit: BTreeSet<FitKey>,
    /// Placeable GPUs holding revoked or reserved memory: for these the
    /// free memory after revocations differs from the index's.
    pub irregular: BTreeSet<GpuKey>,
}

impl Inventory {
    pub fn gpu_entry(&mut self, key: &GpuKey) -> &mut GpuEntry {
        if !self.gpus.contains_key(key) {
            self.gpus.insert(key.clone(), GpuEntry::absent());
            self.gpus_of_node
                .entry(key.0.clone())
                .or_default()
                .insert(key.1.clone());
            self.nodes_of_uuid
                .entry(key.1.clone())
                .or_default()
                .insert(key.0.clone());
        }
        self.gpus.get_mut(key).expect("inserted above")
    }

    /// Replaces a node's inventory. GPUs that vanished stay while leases
    /// count against them.
    pub fn set_gpus(&mut self, node_id: &NodeId, gpus: Vec<GpuView>) {
        let reported: BTreeSet<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        let vanished: Vec<String> = self
            .gpus_of_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter(|uuid| !reported.contains(uuid.as_str()))
            .cloned()
            .collect();
        for uuid in vanished {
            let key = (node_id.clone(), uuid);
            if let Some(gpu) = self.gpus.get_mut(&key) {
                gpu.present = false;
            }
            self.reindex(&key);
            self.forget_if_unused(&key);
        }
        for view in gpus {
            let key = (node_id.clone(), view.uuid);
            let gpu = self.gpu_entry(&key);
            gpu.index = view.index;
            gpu.total_mib = view.total_mib;
            gpu.used_mib = view.used_mib;
            gpu.healthy = view.healthy;
            gpu.present = true;
            self.reindex(&key);
        }
    }

    pub fn reindex_node(&mut self, node_id: &NodeId) {
        let uuids: Vec<String> = self
            .gpus_of_node
            .get(node_id)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for uuid in uuids {
            self.reindex(&(node_id.clone(), uuid));
        }
    }

    pub fn reindex(&mut self, key: &GpuKey) {
        let Some(gpu) = self.gpus.get_mut(key) else {
            return;
        };
        if let Some(old) = gpu.indexed_as.take() {
            self.fit.remove(&old);
        }
        let node_placeable = self
            .nodes
            .get(&key.0)
            .is_some_and(|node| node.state == NodeState::Online && !node.drained);
        if node_placeable && gpu.present && gpu.healthy {
            let fit_key = (
                gpu.free_mib(),
                Some(key.0.clone()),
                gpu.index,
                key.1.clone(),
            );
            self.fit.insert(fit_key.clone());
            gpu.indexed_as = Some(fit_key);
        }
        if gpu.indexed_as.is_some() && (gpu.revoked_mib > 0 || gpu.reserved_mib > 0) {
            self.irregular.insert(key.clone());
        } else {
            self.irregular.remove(key);
        }
    }

    pub fn is_placeable(&self, key: &GpuKey) -> bool {
        self.gpus
            .get(key)
            .is_some_and(|gpu| gpu.indexed_as.is_some())
    }

    /// Drops a GPU entry nothing needs any more.
    pub fn forget_if_unused(&mut self, key: &GpuKey) {
        let unused = self
            .gpus
            .get(key)
            .is_some_and(|gpu| !gpu.present && !gpu.in_use());
        if !unused {
            return;
        }
        if let Some(gpu) = self.gpus.remove(key)
            && let Some(old) = gpu.indexed_as
        {
            self.fit.remove(&old);
        }
        self.irregular.remove(key);
        if let Some(uuids) = self.gpus_of_node.get_mut(&key.0) {
            uuids.remove(&key.1);
            if uuids.is_empty() {
                self.gpus_of_node.remove(&key.0);
            }
        }
        if let Some(nodes) = self.nodes_of_uuid.get_mut(&key.1) {
            nodes.remove(&key.0);
            if nodes.is_empty() {
                self.nodes_of_uuid.remove(&key.1);
            }
        }
    }

    /// Removes a node and marks its GPUs gone; entries still counting
    /// leases stay until those are released.
    pub fn remove_node(&mut self, node_id: &NodeId) {
        self.nodes.remove(node_id);
        self.set_gpus(node_id, Vec::new());
    }

    /// Placeable GPUs that satisfy the constraints, in best-fit order,
    /// starting at those with at least `min_free_mib` free.
    pub fn candidates<'a>(
        &'a self,
        constraints: &'a Constraints,
        min_free_mib: u64,
    ) -> Box<dyn Iterator<Item = &'a FitKey> + 'a> {
        let start = (min_free_mib, None, 0, String::new());
        match (&constraints.node_id, &constraints.gpu_uuid) {
            (None, None) => Box::new(
                self.fit
                    .range(start..)
                    .filter(move |key| self.satisfies(key, constraints)),
            ),
            _ => Box::new(self.narrowed(constraints, min_free_mib).into_iter()),
        }
    }

    /// Placeable GPUs that satisfy the constraints, most free memory first
    /// (ties in reverse best-fit order).
    pub fn candidates_by_most_free<'a>(
        &'a self,
        constraints: &'a Constraints,
    ) -> Box<dyn Iterator<Item = &'a FitKey> + 'a> {
        match (&constraints.node_id, &constraints.gpu_uuid) {
            (None, None) => Box::new(
                self.fit
                    .iter()
                    .rev()
                    .filter(move |key| self.satisfies(key, constraints)),
            ),
            _ => Box::new(self.narrowed(constraints, 0).into_iter().rev()),
        }
    }

    pub fn count_candidates(&self, constraints: &Constraints) -> usize {
        if *constraints == Constraints::default() {
            self.fit.len()
        } else {
            self.candidates(constraints, 0).count()
        }
    }

    fn narrowed<'a>(&'a self, constraints: &'a Constraints, min_free_mib: u64) -> Vec<&'a FitKey> {
        let mut narrowed: Vec<&FitKey> = self
            .narrowed_keys(constraints)
            .filter_map(|key| self.gpus.get(&key)?.indexed_as.as_ref())
            .filter(|fit_key| fit_key.0 >= min_free_mib)
            .filter(|fit_key| self.satisfies(fit_key, constraints))
            .collect();
        narrowed.sort();
        narrowed
    }

    /// GPU keys named by a node or uuid constraint.
    fn narrowed_keys<'a>(
        &'a self,
        constraints: &'a Constraints,
    ) -> Box<dyn Iterator<Item = GpuKey> + 'a> {
        match (&constraints.node_id, &constraints.gpu_uuid) {
            (Some(node_id), Some(uuid)) => {
                Box::new(std::iter::once((node_id.clone(), uuid.clone())))
            }
            (Some(node_id), None) => Box::new(
                self.gpus_of_node
                    .get(node_id)
                    .into_iter()
                    .flatten()
                    .map(move |uuid| (node_id.clone(), uuid.clone())),
            ),
            (None, Some(uuid)) => Box::new(
                self.nodes_of_uuid
                    .get(uuid)
                    .into_iter()
                    .flatten()
                    .map(move |node_id| (node_id.clone(), uuid.clone())),
            ),
            (None, None) => Box::new(std::iter::empty()),
        }
    }

    pub fn satisfies(&self, key: &FitKey, constraints: &Constraints) -> bool {
        let (_, Some(node_id), _, uuid) = key else {
            return false;
        };
        constraints.node_id.as_ref().is_none_or(|n| n == node_id)
            && constraints.gpu_uuid.as_ref().is_none_or(|u| u == uuid)
            && (constraints.labels.is_empty()
                || self
                    .nodes
                    .get(node_id)
                    .is_some_and(|node| constraints.labels.matches(&node.labels)))
    }

    pub fn usage(&self, key: &GpuKey) -> Option<GpuUsage> {
        let gpu = self.gpus.get(key)?;
        Some(GpuUsage {
            node_id: key.0.clone(),
            index: gpu.index,
            uuid: key.1.clone(),
            total_mib: gpu.total_mib,
            used_mib: gpu.used_mib,
            leased_mib: gpu.leased_mib,
            revoked_mib: gpu.revoked_mib,
            reserved_mib: gpu.reserved_mib,
            free_mib: gpu.free_mib(),
            placeable: gpu.indexed_as.is_some(),
        })
    }
}

pub(super) fn gpu_key(fit_key: &FitKey) -> GpuKey {
    let (_, node_id, _, uuid) = fit_key;
    (
        node_id.clone().expect("indexed GPUs carry their node id"),
        uuid.clone(),
    )
}
