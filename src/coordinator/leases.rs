//! The lease pool in the coordinator: the one [`Pool`] behind a short-held
//! lock, the task that keeps it in step with the registry and its
//! deadlines, and the writer that commits its changes.
//!
//! Invariants:
//! - Every change the pool makes is queued for the writer while the pool's
//!   lock is held, so the store receives changes in the pool's order.
//! - A call is answered only after the batch holding its changes (or, for a
//!   call that changed nothing, every change queued before it) is
//!   committed; a batch the database refuses is retried, never dropped.
//! - The pool learns the fleet from the registry: whenever the registry's
//!   facts version moves, node states, drains, labels and GPU inventories
//!   are compared with what it last saw, and nodes no longer known are
//!   removed; a node going OFFLINE suspends its leases at once. It is
//!   reconciled once, after the initial probe round, before anything else;
//!   until then no lease is granted and nothing expires.

use std::{
    collections::{BTreeMap, HashMap},
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::{RegistryHandle, term::Deposal};
use crate::{
    clock::Moment,
    error::{ServiceError, display_chain},
    node::{GpuInventory, NodeId, NodeState},
    pool::{
        AcquireRequest, Acquisition, Change, GpuView, Lease, LeaseFilter, LeaseId, MAX_WAIT,
        NodeView, Pool, PoolError, Shortfall,
    },
    registry::PoolFacts,
    store::Store,
};

/// After comparing the fleet, the follower waits this many times as long
/// before it compares it again for a change of the registry's facts: under
/// a steady stream of changes (GPU inventories of a large busy fleet) the
/// walk takes at most a tenth of a core, while the first change after a
/// quiet spell (a node going OFFLINE) is applied at once.
const WALK_GAP_FACTOR: u32 = 9;
/// Changes written in one transaction at most.
const MAX_BATCH: usize = 4_096;
/// Pause between attempts at a batch the database refused.
const WRITE_RETRY: Duration = Duration::from_millis(200);
/// How long the final flush at shutdown keeps retrying.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Changes to commit, and who waits for them.
struct Write {
    changes: Vec<Change>,
    last_generation: u64,
    done: oneshot::Sender<()>,
}

/// The pool and what its callers share: the lock, the queue to the writer
/// and the signal that something changed.
pub(crate) struct Leases {
    pool: Mutex<Pool>,
    writes: mpsc::UnboundedSender<Write>,
    /// Woken after every change that may let a waiting acquisition through.
    changed: Notify,
    follower: Follower,
}

impl Leases {
    /// The pool and the receiving end of its write queue, for [`write`].
    pub(super) fn new(pool: Pool) -> (Arc<Self>, WriteQueue) {
        let (writes, queue) = mpsc::unbounded_channel();
        let leases = Arc::new(Self {
            pool: Mutex::new(pool),
            writes,
            changed: Notify::new(),
            follower: Follower::default(),
        });
        (leases, WriteQueue(queue))
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `changes` (possibly none) behind everything queued so far;
    /// called with the pool's lock held, which `pool` proves.
    fn queue(&self, pool: &Pool, changes: Vec<Change>) -> oneshot::Receiver<()> {
        let (done, committed) = oneshot::channel();
        if !changes.is_empty() {
            self.changed.notify_waiters();
            self.follower.deadline_may_have_moved(pool.next_deadline());
        }
        let write = Write {
            changes,
            last_generation: pool.last_generation(),
            done,
        };
        // Only fails once the writer has stopped; the dropped sender then
        // answers the caller that the coordinator is shutting down.
        let _ = self.writes.send(write);
        committed
    }

    /// Grants a lease, waiting up to `wait` for room: it tries again
    /// whenever the pool changes, and at the moment revoked leases it waits
    /// for are freed by their grace.
    pub(super) async fn acquire(
        &self,
        request: AcquireRequest,
        shutdown: &CancellationToken,
    ) -> Result<Lease, ServiceError> {
        // The pool refuses a longer wait, naming the field; bounded here so
        // the deadline is computed safely before it does.
        let deadline = Instant::now() + request.wait.min(MAX_WAIT);
        let mut last_shortfall: Option<Shortfall> = None;
        loop {
            let mut changed = pin!(self.changed.notified());
            let mut retry_at = deadline;
            let (outcome, committed) = {
                let mut pool = self.lock();
                let outcome = if !pool.is_settled() {
                    (None, None)
                } else {
                    match pool.acquire(&request, Moment::now()) {
                        Ok((acquisition, changes)) => {
                            let committed = self.queue(&pool, changes);
                            (Some(Ok(acquisition)), Some(committed))
                        }
                        Err(error) => (Some(Err(error)), None),
                    }
                };
                // Only an acquisition that may try again listens for
                // changes, from before the lock is let go, so none is
                // missed; a granted one costs the other callers' changes
                // nothing.
                let may_retry = match &outcome.0 {
                    Some(Ok(Acquisition::Granted(_))) => false,
                    Some(Err(error)) => matches!(error, PoolError::Exhausted(_)),
                    _ => true,
                };
                if may_retry {
                    changed.as_mut().enable();
                }
                outcome
            };
            if let Some(committed) = committed {
                committed.await.map_err(|_| ServiceError::ShuttingDown)?;
            }
            match outcome {
                None => {}
                Some(Ok(Acquisition::Granted(lease))) => return Ok(lease),
                Some(Ok(Acquisition::Waiting(wait))) => {
                    if let Some(at) = wait.retry_at {
                        retry_at = retry_at.min(Instant::from_std(at));
                    }
                }
                Some(Err(PoolError::Exhausted(shortfall))) => last_shortfall = Some(shortfall),
                Some(Err(error)) => return Err(error.into()),
            }
            if Instant::now() >= deadline {
                let withdrawn = self.lock().withdraw(&request.request_id);
                return Err(match withdrawn.or(last_shortfall) {
                    Some(shortfall) => PoolError::Exhausted(shortfall).into(),
                    None => ServiceError::PoolRestoring,
                });
            }
            tokio::select! {
                () = shutdown.cancelled() => return Err(ServiceError::ShuttingDown),
                () = changed => {}
                () = tokio::time::sleep_until(retry_at) => {}
            }
        }
    }

    pub(super) async fn renew(&self, lease_id: &LeaseId) -> Result<Lease, ServiceError> {
        let (lease, committed) = {
            let mut pool = self.lock();
            let (lease, changes) = pool.renew(lease_id, Moment::now())?;
            (lease, self.queue(&pool, changes))
        };
        committed.await.map_err(|_| ServiceError::ShuttingDown)?;
        Ok(lease)
    }

    /// The lease as it is after the release; `None` if it is not known.
    pub(super) async fn release(&self, lease_id: &LeaseId) -> Result<Option<Lease>, ServiceError> {
        let (lease, committed) = {
            let mut pool = self.lock();
            let changes = pool.release(lease_id, Moment::now());
            (pool.get(lease_id).cloned(), self.queue(&pool, changes))
        };
        committed.await.map_err(|_| ServiceError::ShuttingDown)?;
        Ok(lease)
    }

    /// Applies what the registry now says of one node at once, rather than
    /// at the next round: an operator's drain takes effect before the call
    /// that made it answers.
    pub(super) fn apply_node(&self, registry: &RegistryHandle, node_id: &NodeId) {
        let Some(node) = registry.lock().get(node_id) else {
            return;
        };
        let view = NodeView {
            node_id: node_id.clone(),
            state: node.state,
            drained: node.drain.is_some(),
            labels: node.registration.labels,
        };
        let mut pool = self.lock();
        let changes = pool.upsert_node(view, Moment::now());
        drop(self.queue(&pool, changes));
        self.changed.notify_waiters();
    }

    pub(super) fn list(&self, filter: &LeaseFilter) -> Vec<Lease> {
        self.lock().list(filter)
    }
}

/// What the pool last saw of a node.
struct Seen {
    state: NodeState,
    drained: bool,
    labels: BTreeMap<String, String>,
    gpus: GpuInventory,
    /// The sync round that last found it in the registry.
    round: u64,
}

/// A node whose facts changed since the last round.
struct Update {
    view: NodeView,
    gpus: Option<Vec<GpuView>>,
}

fn view(facts: &PoolFacts<'_>) -> NodeView {
    NodeView {
        node_id: facts.node_id.clone(),
        state: facts.state,
        drained: facts.drained,
        labels: facts.labels.clone(),
    }
}

fn gpu_views(gpus: &GpuInventory) -> Vec<GpuView> {
    gpus.gpus()
        .iter()
        .map(|gpu| GpuView {
            index: gpu.index,
            uuid: gpu.uuid.clone(),
            total_mib: gpu.memory_total_mib,
            used_mib: gpu.memory_used_mib,
            healthy: gpu.is_healthy(),
        })
        .collect()
}

/// The pool's copy of the fleet, compared with the registry each round.
#[derive(Default)]
struct Fleet {
    seen: HashMap<NodeId, Seen>,
    round: u64,
    /// The registry's facts version at the last walk; an unchanged version
    /// means an unchanged fleet, and no walk.
    walked_at: Option<u64>,
}

impl Fleet {
    /// What changed since the last round, and the nodes now gone.
    fn compare(&mut self, registry: &RegistryHandle) -> (Vec<Update>, Vec<NodeId>) {
        self.round += 1;
        let round = self.round;
        let mut updates = Vec::new();
        {
            let registry = registry.lock();
            let version = registry.facts_version();
            if self.walked_at == Some(version) {
                return (updates, Vec::new());
            }
            self.walked_at = Some(version);
            for facts in registry.pool_facts() {
                let seen = self.seen.get_mut(facts.node_id);
                match seen {
                    Some(seen) => {
                        seen.round = round;
                        let node_changed = seen.state != facts.state
                            || seen.drained != facts.drained
                            || seen.labels != *facts.labels;
                        let gpus_changed = seen.gpus != *facts.gpus;
                        if !node_changed && !gpus_changed {
                            continue;
                        }
                        seen.state = facts.state;
                        seen.drained = facts.drained;
                        if seen.labels != *facts.labels {
                            seen.labels = facts.labels.clone();
                        }
                        if gpus_changed {
                            seen.gpus = facts.gpus.clone();
                        }
                        updates.push(Update {
                            view: view(&facts),
                            gpus: gpus_changed.then(|| gpu_views(facts.gpus)),
                        });
                    }
                    None => {
                        self.seen.insert(
                            facts.node_id.clone(),
                            Seen {
                                state: facts.state,
                                drained: facts.drained,
                                labels: facts.labels.clone(),
                                gpus: facts.gpus.clone(),
                                round,
                            },
                        );
                        updates.push(Update {
                            view: view(&facts),
                            gpus: Some(gpu_views(facts.gpus)),
                        });
                    }
                }
            }
        }
        let gone: Vec<NodeId> = self
            .seen
            .iter()
            .filter(|(_, seen)| seen.round != round)
            .map(|(node_id, _)| node_id.clone())
            .collect();
        for node_id in &gone {
            self.seen.remove(node_id);
        }
        (updates, gone)
    }
}

/// Keeps the pool in step with the registry and its own deadlines until
/// `shutdown`: reconciles it once the initial probe round is done, then
/// applies what changed in the fleet as soon as the registry's facts move,
/// and every deadline as it falls due. Nothing is polled: between changes
/// it sleeps until the pool's next deadline, and is woken sooner when a
/// change brings that deadline forward.
pub(super) async fn follow(
    leases: Arc<Leases>,
    registry: RegistryHandle,
    mut probe_round: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => return,
        done = probe_round.wait_for(|done| *done) => if done.is_err() { return },
    }
    let facts_moved = registry.facts_moved.clone();
    let mut fleet = Fleet::default();
    let (updates, _) = fleet.compare(&registry);
    {
        let now = Moment::now();
        let mut pool = leases.lock();
        let views = updates.iter().map(|update| update.view.clone()).collect();
        let mut changes = pool.reconcile(views, now);
        set_gpus(&mut pool, updates);
        changes.extend(pool.tick(now));
        info!(
            leases = pool.list(&LeaseFilter::default()).len(),
            changes = changes.len(),
            "lease pool reconciled with the fleet"
        );
        drop(leases.queue(&pool, changes));
        leases.changed.notify_waiters();
    }
    let mut walk_not_before = Instant::now();
    loop {
        let wake = {
            let pool = leases.lock();
            let wake = pool.next_deadline().map(Instant::from_std);
            leases.follower.plan(wake);
            wake
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = facts_moved.notified() => {
                let at = wake.map_or(walk_not_before, |wake| wake.min(walk_not_before));
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            () = leases.follower.woken.notified() => {}
            () = sleep_until(wake) => {}
        }
        let walk_started = Instant::now();
        let (updates, gone) = fleet.compare(&registry);
        walk_not_before = Instant::now() + walk_started.elapsed() * WALK_GAP_FACTOR;
        let now = Moment::now();
        let mut pool = leases.lock();
        let mut changes = Vec::new();
        let inventory_changed = !updates.is_empty() || !gone.is_empty();
        for node_id in &gone {
            changes.extend(pool.remove_node(node_id, now));
        }
        for update in &updates {
            changes.extend(pool.upsert_node(update.view.clone(), now));
        }
        set_gpus(&mut pool, updates);
        changes.extend(pool.tick(now));
        if !changes.is_empty() {
            debug!(changes = changes.len(), "lease pool followed the fleet");
        }
        if !changes.is_empty() || inventory_changed {
            drop(leases.queue(&pool, changes));
            leases.changed.notify_waiters();
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the follower next wakes by itself, so that a change bringing the
/// pool's next deadline forward can wake it sooner.
#[derive(Default)]
struct Follower {
    /// Set, with the pool's lock held, before the follower sleeps; `None`:
    /// it sleeps until woken.
    wakes_at: Mutex<Option<Instant>>,
    woken: Notify,
}

impl Follower {
    fn plan(&self, at: Option<Instant>) {
        *self.wakes_at.lock().unwrap_or_else(PoisonError::into_inner) = at;
    }

    /// Called with the pool's lock held, after a change: wakes the follower
    /// if the pool's next deadline now falls before its planned wake. The
    /// permit is kept if it is not yet waiting.
    fn deadline_may_have_moved(&self, next_deadline: Option<std::time::Instant>) {
        let Some(next) = next_deadline.map(Instant::from_std) else {
            return;
        };
        let planned = *self.wakes_at.lock().unwrap_or_else(PoisonError::into_inner);
        if planned.is_none_or(|planned| next < planned) {
            self.plan(Some(next));
            self.woken.notify_one();
        }
    }
}

fn set_gpus(pool: &mut Pool, updates: Vec<Update>) {
    for update in updates {
        let Some(gpus) = update.gpus else { continue };
        if let Err(error) = pool.set_gpus(&update.view.node_id, gpus) {
            // The registry validated the inventory; the pool's own rules
            // are the same, so this is a bug to report, not to crash on.
            error!(node_id = %update.view.node_id, error = %display_chain(&error), "GPU inventory refused by the lease pool");
        }
    }
}

/// The receiving end of the pool's write queue.
pub(super) struct WriteQueue(mpsc::UnboundedReceiver<Write>);

/// Commits the pool's changes in batches, in order, until `stop`; then
/// drains what is queued, retrying for at most [`DRAIN_DEADLINE`].
///
/// Runs on a thread of its own (it blocks on the database): every write
/// queued while a batch commits joins the next one, so the number of
/// transactions falls as the load rises, and no batch waits for a thread
/// or a task to be scheduled before it is written.
pub(super) fn write(store: &Store, queue: WriteQueue, deposal: &Deposal, stop: &CancellationToken) {
    let WriteQueue(mut queue) = queue;
    let runtime = tokio::runtime::Handle::current();
    loop {
        let first = match queue.try_recv() {
            Ok(write) => Some(write),
            Err(_) => runtime.block_on(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    write = queue.recv() => write,
                }
            }),
        };
        let Some(first) = first else {
            queue.close();
            let mut rest = Vec::new();
            while let Ok(write) = queue.try_recv() {
                rest.push(write);
            }
            if !rest.is_empty() {
                commit(store, rest, deposal, stop);
            }
            return;
        };
        let mut changes = first.changes.len();
        let mut batch = vec![first];
        while changes < MAX_BATCH
            && let Ok(write) = queue.try_recv()
        {
            changes += write.changes.len();
            batch.push(write);
        }
        commit(store, batch, deposal, stop);
    }
}

/// Writes one batch, retrying until it is committed (or, once `stop` is
/// cancelled, for [`DRAIN_DEADLINE`] more), then answers everyone waiting
/// for it.
fn commit(store: &Store, mut batch: Vec<Write>, deposal: &Deposal, stop: &CancellationToken) {
    let last_generation = batch.iter().map(|w| w.last_generation).max().unwrap_or(0);
    let changes: Vec<Change> = batch
        .iter_mut()
        .flat_map(|write| std::mem::take(&mut write.changes))
        .collect();
    if !changes.is_empty() {
        let mut attempts = 0u32;
        let mut deadline: Option<std::time::Instant> = None;
        loop {
            attempts += 1;
            match store.commit_leases(&changes, last_generation) {
                Ok(()) => break,
                // Never acknowledged: the callers waiting on it are told the
                // coordinator no longer leads.
                Err(failure) if deposal.notice(&failure) => return,
                Err(failure) => {
                    debug!(error = %display_chain(&failure), attempts, "lease write failed; will retry");
                    let now = std::time::Instant::now();
                    if stop.is_cancelled() && deadline.is_none() {
                        deadline = Some(now + DRAIN_DEADLINE);
                    }
                    if deadline.is_some_and(|deadline| now + WRITE_RETRY >= deadline) {
                        error!(
                            error = %display_chain(&failure),
                            changes = changes.len(),
                            "shutting down with lease changes the database did not take; they are lost"
                        );
                        return;
                    }
                    std::thread::sleep(WRITE_RETRY);
                }
            }
        }
        metrics::counter!("muster_lease_write_transactions_total").increment(1);
        metrics::counter!("muster_lease_changes_written_total").increment(changes.len() as u64);
    }
    for write in batch {
        let _ = write.done.send(());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        lease_events::{LeaseEventKind, NextLeaseEvent},
        node::{DEFAULT_MAX_BACKOFF, Gpu, Registration},
        pool::{Constraints, LabelSelector, LeaseState, LeaseTerms, PoolConfig},
        registry::{Enrollment, Registry, Timing},
    };

    const GPU_MIB: u64 = 8_192;

    async fn started(dir: &std::path::Path) -> (Arc<Leases>, Store, CancellationToken) {
        let store = Store::open(&dir.join("muster.db")).await.unwrap();
        let mut pool = Pool::new(PoolConfig {
            revoke_grace: Duration::from_secs(3_600),
            ..PoolConfig::default()
        });
        let node_id = NodeId::parse("node_id", "gpu-1").unwrap();
        let now = Moment::now();
        pool.upsert_node(
            NodeView {
                node_id: node_id.clone(),
                state: NodeState::Online,
                drained: false,
                labels: BTreeMap::new(),
            },
            now,
        );
        pool.set_gpus(
            &node_id,
            vec![GpuView {
                index: 0,
                uuid: "GPU-1".to_owned(),
                total_mib: GPU_MIB,
                used_mib: 0,
                healthy: true,
            }],
        )
        .unwrap();
        let (leases, queue) = Leases::new(pool);
        let stop = start_writer(&store, queue);
        (leases, store, stop)
    }

    /// Starts the lease writer on `store`; cancelling the token stops it.
    fn start_writer(store: &Store, queue: WriteQueue) -> CancellationToken {
        let stop = CancellationToken::new();
        tokio::task::spawn_blocking({
            let store = store.clone();
            let stop = stop.clone();
            move || write(&store, queue, &Deposal::default(), &stop)
        });
        stop
    }

    /// What the store keeps exactly (it keeps moments to the millisecond).
    fn summary(lease: &Lease) -> (LeaseId, LeaseState, u64, u64) {
        (
            lease.lease_id.clone(),
            lease.state,
            lease.generation,
            lease.terms.mb,
        )
    }

    fn request(request_id: &str, mb: u64, priority: i32, wait: Duration) -> AcquireRequest {
        AcquireRequest {
            request_id: request_id.to_owned(),
            terms: LeaseTerms {
                holder: "test".to_owned(),
                mb,
                priority,
                ttl: Duration::from_secs(60),
                constraints: Constraints {
                    node_id: None,
                    gpu_uuid: None,
                    labels: LabelSelector::default(),
                },
            },
            wait,
        }
    }

    /// A registry with `gpu-1` ONLINE, one GPU of [`GPU_MIB`]; its
    /// session's generation.
    fn registry_with_a_gpu_node() -> (RegistryHandle, u64) {
        let registry = RegistryHandle::new(Registry::new(Timing {
            heartbeat_interval: Duration::from_secs(1),
            max_heartbeats_per_second: 1_000,
            offline_after: Duration::from_secs(3),
            expire_after: Duration::from_secs(3_600),
            reload_grace: Duration::from_secs(3),
            expiry_guard_fraction: 0.5,
        }));
        let gpus = GpuInventory::new(
            "gpus",
            vec![Gpu {
                index: 0,
                uuid: "GPU-1".to_owned(),
                name: "A100".to_owned(),
                memory_total_mib: GPU_MIB,
                memory_used_mib: 0,
                utilization_percent: 0,
                temperature_celsius: 40,
                unhealthy: None,
            }],
        )
        .unwrap();
        let registration = Registration {
            node_id: NodeId::parse("node_id", "gpu-1").unwrap(),
            agent_url: "http://gpu-1:7701".to_owned(),
            boot_id: "boot".to_owned(),
            version: "test".to_owned(),
            hostname: "gpu-1".to_owned(),
            labels: BTreeMap::new(),
            max_backoff: DEFAULT_MAX_BACKOFF,
            gpus,
        };
        let enrollment = Enrollment {
            generation: 1,
            registered_at: std::time::SystemTime::now(),
        };
        registry
            .update(|registry| registry.register(registration, enrollment, Moment::now()))
            .unwrap();
        (registry, 1)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_going_offline_suspends_its_leases_at_once_without_waiting_for_a_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("muster.db")).await.unwrap();
        let (leases, queue) = Leases::new(Pool::new(PoolConfig::default()));
        let stop = start_writer(&store, queue);
        let (registry, generation) = registry_with_a_gpu_node();
        let (_, probe_round) = watch::channel(true);
        tokio::spawn(follow(
            leases.clone(),
            registry.clone(),
            probe_round,
            stop.clone(),
        ));
        let shutdown = CancellationToken::new();
        let held = leases
            .acquire(
                request("held", 1_000, 0, Duration::from_secs(10)),
                &shutdown,
            )
            .await
            .expect("granted once the follower has seen the node's GPU");
        let (_, mut events) = store.lease_feed().follow();

        // The pool's next deadline is the lease's expiry, a minute away, and
        // nothing polls: only the registry's own signal can wake the
        // follower well within the deadline below.
        let node_id = held.node_id.clone();
        registry.update(|registry| registry.session_ended(&node_id, generation, Moment::now()));
        let suspended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.next().await {
                    NextLeaseEvent::Event(event) if event.kind == LeaseEventKind::Suspended => {
                        return event;
                    }
                    NextLeaseEvent::Event(_) => {}
                    other => panic!("{other:?}"),
                }
            }
        })
        .await
        .expect("suspended long before any deadline of the pool");
        assert_eq!(suspended.lease.lease_id, held.lease_id.to_string());
        assert_eq!(
            leases.list(&LeaseFilter::default())[0].state,
            LeaseState::Suspended,
            "committed before it was told"
        );
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_answer_follows_the_commit_of_its_change() {
        let dir = tempfile::tempdir().unwrap();
        let (leases, store, stop) = started(dir.path()).await;
        let shutdown = CancellationToken::new();
        let granted = leases
            .acquire(request("a", 1_000, 0, Duration::ZERO), &shutdown)
            .await
            .unwrap();
        let stored = store.load_leases().await.unwrap();
        assert_eq!(
            stored.leases.iter().map(summary).collect::<Vec<_>>(),
            [summary(&granted)],
            "committed before the answer"
        );
        assert_eq!(stored.last_generation, granted.generation);

        let released = leases.release(&granted.lease_id).await.unwrap().unwrap();
        assert_eq!(released.state, LeaseState::Released);
        let stored = store.load_leases().await.unwrap();
        assert_eq!(
            stored.leases.iter().map(summary).collect::<Vec<_>>(),
            [summary(&released)]
        );
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_acquisition_is_granted_once_its_victim_is_released_and_an_equal_one_is_refused()
     {
        let dir = tempfile::tempdir().unwrap();
        let (leases, store, stop) = started(dir.path()).await;
        let shutdown = CancellationToken::new();
        let low = leases
            .acquire(request("low", 6_000, 0, Duration::ZERO), &shutdown)
            .await
            .unwrap();

        let waiting = tokio::spawn({
            let leases = leases.clone();
            let shutdown = shutdown.clone();
            async move {
                leases
                    .acquire(
                        request("high", 6_000, 5, Duration::from_secs(30)),
                        &shutdown,
                    )
                    .await
            }
        });
        let revoked = async {
            loop {
                let stored = store.load_leases().await.unwrap();
                if stored.leases[0].state == LeaseState::Revoked {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), revoked)
            .await
            .expect("the revocation is committed while the acquisition waits");
        leases.release(&low.lease_id).await.unwrap();
        let high = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("granted once the victim let go")
            .unwrap()
            .unwrap();
        assert!(high.generation > low.generation);

        let equal = leases
            .acquire(
                request("equal", 6_000, 5, Duration::from_millis(200)),
                &shutdown,
            )
            .await
            .expect_err("nothing of lower priority to revoke");
        assert!(
            matches!(&equal, ServiceError::Pool(PoolError::Exhausted(_))),
            "{equal:?}"
        );
        stop.cancel();
    }
}
