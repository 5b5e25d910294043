//! The placement, preemption and lifetime rules, with time passed in.

use std::collections::BTreeMap;

use super::*;

const TTL: Duration = Duration::from_secs(60);
const GIB: u64 = 1024;

fn node_id(raw: &str) -> NodeId {
    NodeId::parse("node_id", raw).unwrap()
}

fn uuid(node: &str, index: u32) -> String {
    format!("GPU-{node}-{index}")
}

fn view(node: &str, state: NodeState) -> NodeView {
    NodeView {
        node_id: node_id(node),
        state,
        drained: false,
        labels: BTreeMap::new(),
    }
}

struct Fixture {
    pool: Pool,
    now: Moment,
}

impl Fixture {
    fn new() -> Self {
        Self {
            pool: Pool::new(PoolConfig::default()),
            now: Moment::now(),
        }
    }

    /// An ONLINE node with one GPU per size, in GiB, indexed in order.
    fn node(&mut self, node: &str, sizes_gib: &[u64]) {
        self.pool
            .upsert_node(view(node, NodeState::Online), self.now);
        let gpus = sizes_gib
            .iter()
            .enumerate()
            .map(|(index, gib)| GpuView {
                index: index as u32,
                uuid: uuid(node, index as u32),
                total_mib: gib * GIB,
                used_mib: 0,
                healthy: true,
            })
            .collect();
        self.pool.set_gpus(&node_id(node), gpus).unwrap();
    }

    fn set_state(&mut self, node: &str, state: NodeState) -> Vec<Change> {
        self.pool.upsert_node(view(node, state), self.now)
    }

    fn advance(&mut self, by: Duration) -> Vec<Change> {
        self.now = self.now.after(by);
        self.pool.tick(self.now)
    }

    fn acquire(
        &mut self,
        request: &AcquireRequest,
    ) -> Result<(Acquisition, Vec<Change>), PoolError> {
        self.pool.acquire(request, self.now)
    }

    fn granted(&mut self, request: &AcquireRequest) -> Lease {
        match self.acquire(request) {
            Ok((Acquisition::Granted(lease), _)) => lease,
            other => panic!("{} was not granted: {other:?}", request.request_id),
        }
    }

    fn waiting(&mut self, request: &AcquireRequest) -> (Wait, Vec<Change>) {
        match self.acquire(request) {
            Ok((Acquisition::Waiting(wait), changes)) => (wait, changes),
            other => panic!("{} does not wait: {other:?}", request.request_id),
        }
    }

    fn exhausted(&mut self, request: &AcquireRequest) -> Shortfall {
        match self.acquire(request) {
            Err(PoolError::Exhausted(shortfall)) => shortfall,
            other => panic!(
                "{} was not refused for lack of memory: {other:?}",
                request.request_id
            ),
        }
    }

    fn state(&self, lease: &Lease) -> LeaseState {
        self.pool.get(&lease.lease_id).unwrap().state
    }

    fn leased_mib(&self, node: &str, index: u32) -> u64 {
        self.pool
            .gpu_usage(&node_id(node), &uuid(node, index))
            .unwrap()
            .leased_mib
    }
}

fn request(request_id: &str, gib: u64, priority: i32) -> AcquireRequest {
    AcquireRequest {
        request_id: request_id.to_owned(),
        terms: LeaseTerms {
            holder: "trainer".to_owned(),
            mb: gib * GIB,
            priority,
            ttl: TTL,
            constraints: Constraints::default(),
        },
        wait: Duration::ZERO,
    }
}

fn waiting_request(request_id: &str, gib: u64, priority: i32) -> AcquireRequest {
    AcquireRequest {
        wait: Duration::from_secs(60),
        ..request(request_id, gib, priority)
    }
}

fn on(request: AcquireRequest, node: &str) -> AcquireRequest {
    let mut request = request;
    request.terms.constraints.node_id = Some(node_id(node));
    request
}

fn placed(lease: &Lease) -> (String, String) {
    (lease.node_id.to_string(), lease.gpu_uuid.clone())
}

fn events(changes: &[Change]) -> Vec<(Event, String)> {
    changes
        .iter()
        .map(|c| (c.event.clone(), c.lease.lease_id.to_string()))
        .collect()
}

#[test]
fn best_fit_takes_the_smallest_free_memory_that_is_large_enough() {
    let mut f = Fixture::new();
    f.node("a", &[80, 40, 24]);
    let first = f.granted(&request("r1", 30, 0));
    assert_eq!(placed(&first), ("a".into(), uuid("a", 1)));
    let second = f.granted(&request("r2", 20, 0));
    assert_eq!(placed(&second), ("a".into(), uuid("a", 2)));
    // a/1 has 10 GiB left and a/2 4 GiB: 8 GiB fits a/1 best.
    let third = f.granted(&request("r3", 8, 0));
    assert_eq!(placed(&third), ("a".into(), uuid("a", 1)));
    let fourth = f.granted(&request("r4", 20, 0));
    assert_eq!(placed(&fourth), ("a".into(), uuid("a", 0)));
}

#[test]
fn ties_are_broken_by_node_id_then_gpu_index() {
    let mut f = Fixture::new();
    f.node("b", &[40, 40]);
    f.node("a", &[40, 40]);
    let order: Vec<(String, String)> = (0..4)
        .map(|i| placed(&f.granted(&request(&format!("r{i}"), 40, 0))))
        .collect();
    assert_eq!(
        order,
        vec![
            ("a".into(), uuid("a", 0)),
            ("a".into(), uuid("a", 1)),
            ("b".into(), uuid("b", 0)),
            ("b".into(), uuid("b", 1)),
        ]
    );
}

#[test]
fn placement_is_deterministic() {
    let run = || {
        let mut f = Fixture::new();
        for node in ["n3", "n1", "n2"] {
            f.node(node, &[24, 48, 80, 24]);
        }
        (0..10)
            .map(|i| placed(&f.granted(&request(&format!("r{i}"), 3 + i * 5, 0))))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn reported_use_counts_when_it_exceeds_the_leases() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("small", 10, 0));
    let busy = GpuView {
        index: 0,
        uuid: uuid("a", 0),
        total_mib: 80 * GIB,
        used_mib: 70 * GIB,
        healthy: true,
    };
    f.pool.set_gpus(&node_id("a"), vec![busy.clone()]).unwrap();
    assert_eq!(
        f.pool
            .gpu_usage(&node_id("a"), &uuid("a", 0))
            .unwrap()
            .free_mib,
        10 * GIB
    );
    f.exhausted(&request("big", 20, 0));
    let quiet = GpuView {
        used_mib: 5 * GIB,
        ..busy
    };
    f.pool.set_gpus(&node_id("a"), vec![quiet]).unwrap();
    // Leases count when the node reports less in use than they hold.
    assert_eq!(
        f.pool
            .gpu_usage(&node_id("a"), &uuid("a", 0))
            .unwrap()
            .free_mib,
        70 * GIB
    );
    f.granted(&request("big", 20, 0));
    assert_eq!(f.state(&lease), LeaseState::Active);
}

#[test]
fn only_healthy_gpus_on_online_undrained_nodes_take_leases() {
    let mut f = Fixture::new();
    f.node("drained", &[80]);
    f.node("offline", &[80]);
    f.node("unknown", &[80]);
    f.node("sick", &[80]);
    f.node("zz-good", &[16]);
    let mut drained = view("drained", NodeState::Online);
    drained.drained = true;
    f.pool.upsert_node(drained, f.now);
    f.set_state("offline", NodeState::Offline);
    f.set_state("unknown", NodeState::Unknown);
    let sick = GpuView {
        index: 0,
        uuid: uuid("sick", 0),
        total_mib: 80 * GIB,
        used_mib: 0,
        healthy: false,
    };
    f.pool.set_gpus(&node_id("sick"), vec![sick]).unwrap();
    let lease = f.granted(&request("r", 16, 0));
    assert_eq!(lease.node_id.as_str(), "zz-good");
    let shortfall = f.exhausted(&request("r2", 1, 0));
    assert_eq!(shortfall.eligible_gpus, 1);
    let shortfall = f.exhausted(&on(request("r3", 1, 0), "drained"));
    assert_eq!(shortfall.blocked, Blocked::NoEligibleGpu);
    assert!(
        shortfall.to_string().contains("no healthy GPU"),
        "{shortfall}"
    );
}

#[test]
fn a_drained_node_keeps_its_leases() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 10, 0));
    let mut drained = view("a", NodeState::Online);
    drained.drained = true;
    assert!(f.pool.upsert_node(drained, f.now).is_empty());
    assert_eq!(f.state(&lease), LeaseState::Active);
    assert_eq!(f.leased_mib("a", 0), 10 * GIB);
    f.exhausted(&request("r2", 10, 0));
}

#[test]
fn constraints_narrow_placement() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[40, 80]);
    let mut labelled = view("c", NodeState::Online);
    labelled.labels.insert("zone".into(), "west".into());
    f.pool.upsert_node(labelled, f.now);
    f.pool
        .set_gpus(
            &node_id("c"),
            vec![GpuView {
                index: 0,
                uuid: uuid("c", 0),
                total_mib: 80 * GIB,
                used_mib: 0,
                healthy: true,
            }],
        )
        .unwrap();

    let lease = f.granted(&on(request("n", 10, 0), "b"));
    assert_eq!(placed(&lease), ("b".into(), uuid("b", 0)));

    let mut by_uuid = request("u", 10, 0);
    by_uuid.terms.constraints.gpu_uuid = Some(uuid("b", 1));
    assert_eq!(placed(&f.granted(&by_uuid)), ("b".into(), uuid("b", 1)));

    let mut by_label = request("l", 10, 0);
    by_label.terms.constraints.labels =
        LabelSelector::parse("label_selector", "zone=west").unwrap();
    assert_eq!(placed(&f.granted(&by_label)), ("c".into(), uuid("c", 0)));

    let mut nowhere = request("x", 10, 0);
    nowhere.terms.constraints.labels = LabelSelector::parse("label_selector", "zone=east").unwrap();
    assert_eq!(f.exhausted(&nowhere).blocked, Blocked::NoEligibleGpu);
}

#[test]
fn constraints_naming_unknown_nodes_or_gpus_are_invalid() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[80]);
    let on_a = uuid("a", 0);
    let cases = [
        (Some("zz"), None, "node_id"),
        (None, Some("GPU-nope"), "gpu_uuid"),
        (Some("b"), Some(on_a.as_str()), "gpu_uuid"),
    ];
    for (node, gpu, field) in cases {
        let mut request = request("r", 1, 0);
        request.terms.constraints.node_id = node.map(node_id);
        request.terms.constraints.gpu_uuid = gpu.map(|g| g.to_string());
        match f.acquire(&request) {
            Err(PoolError::Invalid(invalid)) => assert_eq!(invalid.field, field),
            other => panic!("{node:?} {field}: {other:?}"),
        }
    }
}

#[test]
fn bad_input_names_the_field() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let mut cases: Vec<(AcquireRequest, &str)> = Vec::new();
    let mut r = request("r", 1, 0);
    r.terms.mb = 0;
    cases.push((r, "mb"));
    for ttl in [
        Duration::from_millis(4_999),
        MAX_TTL + Duration::from_secs(1),
        Duration::ZERO,
    ] {
        let mut r = request("r", 1, 0);
        r.terms.ttl = ttl;
        cases.push((r, "ttl"));
    }
    let mut r = request("r", 1, 0);
    r.wait = MAX_WAIT + Duration::from_secs(1);
    cases.push((r, "wait"));
    cases.push((request("", 1, 0), "request_id"));
    cases.push((
        request(&"r".repeat(MAX_REQUEST_ID_LEN + 1), 1, 0),
        "request_id",
    ));
    let mut r = request("r", 1, 0);
    r.terms.holder = String::new();
    cases.push((r, "holder"));
    let mut r = request("r", 1, 0);
    r.terms.holder = "a\nb".into();
    cases.push((r, "holder"));
    for (request, field) in cases {
        match f.acquire(&request) {
            Err(PoolError::Invalid(invalid)) => {
                assert_eq!(invalid.field, field, "{invalid}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(f.pool.list(&LeaseFilter::default()).is_empty());
}

#[test]
fn ttl_bounds_are_inclusive() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    for (i, ttl) in [MIN_TTL, MAX_TTL].into_iter().enumerate() {
        let mut r = request(&format!("r{i}"), 1, 0);
        r.terms.ttl = ttl;
        let lease = f.granted(&r);
        assert_eq!(lease.expires_at, f.now.wall + ttl);
    }
}

#[test]
fn the_same_request_id_returns_the_same_lease() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let r = request("once", 10, 0);
    let (first, changes) = f.acquire(&r).unwrap();
    assert_eq!(changes.len(), 1);
    let (again, changes) = f.acquire(&r).unwrap();
    assert_eq!(first, again);
    assert!(changes.is_empty());
    assert_eq!(f.leased_mib("a", 0), 10 * GIB);
    // Even after it was released, until it is forgotten.
    let Acquisition::Granted(lease) = first else {
        unreachable!()
    };
    f.pool.release(&lease.lease_id, f.now);
    let released = f.granted(&r);
    assert_eq!(released.lease_id, lease.lease_id);
    assert_eq!(released.state, LeaseState::Released);
    let forgotten = f.advance(DEFAULT_RELEASED_RETENTION);
    assert_eq!(
        events(&forgotten),
        vec![(Event::Forgotten, lease.lease_id.to_string())]
    );
    let fresh = f.granted(&r);
    assert!(fresh.generation > lease.generation);
    assert_eq!(fresh.state, LeaseState::Active);
}

#[test]
fn a_reused_request_id_with_other_terms_is_refused_naming_the_field() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let r = request("key", 10, 0);
    f.granted(&r);
    let mut other_mb = r.clone();
    other_mb.terms.mb += 1;
    let mut other_holder = r.clone();
    other_holder.terms.holder = "someone-else".into();
    let mut other_ttl = r.clone();
    other_ttl.terms.ttl = Duration::from_secs(61);
    let other_node = on(r.clone(), "a");
    let mut other_wait = r.clone();
    other_wait.wait = Duration::from_secs(5);
    for (request, field) in [
        (other_mb, "mb"),
        (other_holder, "holder"),
        (other_ttl, "ttl"),
        (other_node, "node_id"),
    ] {
        match f.acquire(&request) {
            Err(error @ PoolError::RequestIdReused { .. }) => {
                assert!(error.to_string().contains(field), "{error}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    // The wait is how long to wait, not part of the lease.
    f.granted(&other_wait);
    assert_eq!(f.pool.list(&LeaseFilter::default()).len(), 1);
}

#[test]
fn release_is_idempotent() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    assert!(
        f.pool
            .release(&LeaseId::new("never-granted"), f.now)
            .is_empty()
    );
    let lease = f.granted(&request("r", 10, 0));
    let changes = f.pool.release(&lease.lease_id, f.now);
    assert_eq!(
        events(&changes),
        vec![(
            Event::Released(ReleaseReason::Holder),
            lease.lease_id.to_string()
        )]
    );
    assert!(f.pool.release(&lease.lease_id, f.now).is_empty());
    assert_eq!(f.leased_mib("a", 0), 0);
}

#[test]
fn renew_extends_by_the_ttl() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 10, 0));
    f.advance(Duration::from_secs(50));
    let (renewed, changes) = f.pool.renew(&lease.lease_id, f.now).unwrap();
    assert_eq!(renewed.expires_at, f.now.wall + TTL);
    assert_eq!(changes[0].event, Event::Renewed);
    assert!(f.advance(Duration::from_secs(59)).is_empty());
    let expired = f.advance(Duration::from_secs(1));
    assert_eq!(
        events(&expired),
        vec![(
            Event::Released(ReleaseReason::Expired),
            lease.lease_id.to_string()
        )]
    );
    assert_eq!(f.leased_mib("a", 0), 0);
}

#[test]
fn renewing_an_expired_lease_fails_clearly() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 10, 0));
    // At the deadline, before any tick has released it.
    f.now = f.now.after(TTL);
    let error = f.pool.renew(&lease.lease_id, f.now).unwrap_err();
    assert!(matches!(
        &error,
        PoolError::NotRenewable {
            why: Unrenewable::Expired { .. },
            ..
        }
    ));
    assert!(error.to_string().contains("expired at"), "{error}");
    f.pool.tick(f.now);
    let error = f.pool.renew(&lease.lease_id, f.now).unwrap_err();
    assert!(matches!(
        error,
        PoolError::NotRenewable {
            why: Unrenewable::Expired { .. },
            ..
        }
    ));
    f.advance(DEFAULT_RELEASED_RETENTION);
    let error = f.pool.renew(&lease.lease_id, f.now).unwrap_err();
    assert_eq!(error, PoolError::UnknownLease(lease.lease_id.clone()));
}

#[test]
fn renewing_a_released_or_revoked_lease_fails() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let released = f.granted(&request("released", 10, 0));
    f.pool.release(&released.lease_id, f.now);
    let error = f.pool.renew(&released.lease_id, f.now).unwrap_err();
    assert!(
        error.to_string().contains("released by its holder"),
        "{error}"
    );

    let victim = f.granted(&request("victim", 70, 0));
    f.waiting(&waiting_request("boss", 70, 1));
    let error = f.pool.renew(&victim.lease_id, f.now).unwrap_err();
    assert!(matches!(
        error,
        PoolError::NotRenewable {
            why: Unrenewable::Revoked { .. },
            ..
        }
    ));
    assert!(error.to_string().contains("revoked"), "{error}");
}

#[test]
fn nothing_is_revoked_when_all_lower_priority_leases_together_free_too_little() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let low = [
        f.granted(&request("l1", 30, 0)),
        f.granted(&request("l2", 30, 0)),
    ];
    let high = f.granted(&request("h", 20, 5));
    let shortfall = f.exhausted(&waiting_request("big", 70, 3));
    assert_eq!(shortfall.blocked, Blocked::NothingToRevoke);
    assert!(
        shortfall.to_string().contains("priority below 3"),
        "{shortfall}"
    );
    for lease in low.iter().chain([&high]) {
        assert_eq!(f.state(lease), LeaseState::Active);
    }
}

#[test]
fn equal_priority_never_preempts() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let holder = f.granted(&request("first", 80, 3));
    assert_eq!(
        f.exhausted(&waiting_request("second", 10, 3)).blocked,
        Blocked::NothingToRevoke
    );
    assert_eq!(f.state(&holder), LeaseState::Active);
    let (wait, changes) = f.waiting(&waiting_request("third", 10, 4));
    assert_eq!(wait.waiting_for, vec![holder.lease_id.clone()]);
    assert_eq!(changes.len(), 1);
}

#[test]
fn preemption_revokes_the_fewest_mib_on_one_gpu() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[80]);
    // a: 50 + 30; b: 40 + 40, all lower priority.
    let a50 = f.granted(&on(request("a50", 50, 0), "a"));
    let a30 = f.granted(&on(request("a30", 30, 1), "a"));
    let b40 = f.granted(&on(request("b40", 40, 0), "b"));
    let b40_newer = f.granted(&on(request("b40n", 40, 0), "b"));
    let (wait, changes) = f.waiting(&waiting_request("boss", 35, 5));
    // 35 GiB: a would lose 50 (30 is too little), b loses 40: the newer.
    assert_eq!((wait.node_id.as_str(), wait.gpu_index), ("b", 0));
    assert_eq!(wait.waiting_for, vec![b40_newer.lease_id.clone()]);
    assert_eq!(wait.retry_at, Some(f.now.monotonic + DEFAULT_REVOKE_GRACE));
    assert_eq!(
        events(&changes),
        vec![(
            Event::Revoked {
                for_request: "boss".into()
            },
            b40_newer.lease_id.to_string()
        )]
    );
    for lease in [&a50, &a30, &b40] {
        assert_eq!(f.state(lease), LeaseState::Active);
    }
    // Still counted until freed.
    assert_eq!(f.leased_mib("b", 0), 80 * GIB);
}

#[test]
fn preemption_prefers_lower_priorities_at_equal_size() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let p2 = f.granted(&request("p2", 40, 2));
    let p1 = f.granted(&request("p1", 40, 1));
    let (wait, _) = f.waiting(&waiting_request("boss", 40, 3));
    assert_eq!(wait.waiting_for, vec![p1.lease_id.clone()]);
    assert_eq!(f.state(&p2), LeaseState::Active);
}

#[test]
fn a_holder_releasing_early_frees_the_memory_for_the_waiting_request_only() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    let boss = waiting_request("boss", 60, 5);
    let (wait, _) = f.waiting(&boss);
    assert_eq!(wait.reserved_until, f.now.monotonic + boss.wait);
    f.advance(Duration::from_secs(3));
    f.pool.release(&victim.lease_id, f.now);
    // The freed memory is reserved: another request cannot take it.
    f.exhausted(&request("sneak", 60, 0));
    let lease = f.granted(&boss);
    assert_eq!(placed(&lease), ("a".into(), uuid("a", 0)));
    assert_eq!(f.leased_mib("a", 0), 60 * GIB);
    // Granted once: repeating it returns the same lease.
    assert_eq!(f.granted(&boss).lease_id, lease.lease_id);
}

#[test]
fn the_revoke_grace_frees_a_holder_that_does_not_release() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    let boss = waiting_request("boss", 60, 5);
    f.waiting(&boss);
    assert!(
        f.advance(DEFAULT_REVOKE_GRACE - Duration::from_millis(1))
            .is_empty()
    );
    let (wait, changes) = f.waiting(&boss);
    assert!(changes.is_empty(), "a retry revokes nothing more");
    assert_eq!(wait.waiting_for, vec![victim.lease_id.clone()]);
    let freed = f.advance(Duration::from_millis(1));
    assert_eq!(
        events(&freed),
        vec![(
            Event::Released(ReleaseReason::RevokeGraceEnded),
            victim.lease_id.to_string()
        )]
    );
    f.granted(&boss);
}

#[test]
fn a_request_that_does_not_wait_revokes_nothing() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    let shortfall = f.exhausted(&request("impatient", 60, 5));
    assert!(matches!(
        shortfall.blocked,
        Blocked::WouldRevoke { leases: 1, .. }
    ));
    assert!(
        shortfall.to_string().contains("does not wait"),
        "{shortfall}"
    );
    assert_eq!(f.state(&victim), LeaseState::Active);
}

#[test]
fn a_request_that_does_not_wait_is_told_when_revoked_leases_would_make_room() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    f.waiting(&waiting_request("boss", 40, 5));
    let shortfall = f.exhausted(&request("small", 20, 0));
    assert!(matches!(
        shortfall.blocked,
        Blocked::WouldRevoke { leases: 0, .. }
    ));
    let message = shortfall.to_string();
    assert!(message.contains("once leases revoked earlier"), "{message}");
    assert_eq!(f.state(&victim), LeaseState::Revoked);
}

#[test]
fn a_withdrawn_or_lapsed_reservation_frees_its_memory() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    f.waiting(&waiting_request("boss", 60, 5));
    let shortfall = f.pool.withdraw("boss").unwrap();
    assert_eq!(
        shortfall.blocked,
        Blocked::WaitedInVain {
            waiting_for: vec![victim.lease_id.clone()]
        }
    );
    let message = shortfall.to_string();
    assert!(message.contains("no GPU can take 61440 MiB"), "{message}");
    assert!(
        message.contains("the most free is 20480 MiB on node a GPU 0"),
        "{message}"
    );
    assert!(message.contains(victim.lease_id.as_str()), "{message}");
    assert_eq!(f.pool.withdraw("boss"), None);
    f.pool.release(&victim.lease_id, f.now);
    assert_eq!(
        f.pool
            .gpu_usage(&node_id("a"), &uuid("a", 0))
            .unwrap()
            .reserved_mib,
        0
    );
    f.granted(&request("next", 60, 0));

    let mut g = Fixture::new();
    g.node("a", &[80]);
    let victim = g.granted(&request("victim", 60, 0));
    let mut boss = waiting_request("boss", 60, 5);
    boss.wait = Duration::from_secs(10);
    g.waiting(&boss);
    g.pool.release(&victim.lease_id, g.now);
    g.advance(Duration::from_secs(10));
    g.granted(&request("next", 60, 0));
}

#[test]
fn a_retry_after_its_reservation_lapsed_counts_revoked_leases_as_freed() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    let other = f.granted(&request("other", 20, 0));
    let mut boss = waiting_request("boss", 60, 5);
    boss.wait = Duration::from_secs(5);
    f.waiting(&boss);
    f.advance(Duration::from_secs(5));
    let (wait, changes) = f.waiting(&boss);
    assert!(changes.is_empty());
    assert_eq!(wait.waiting_for, vec![victim.lease_id]);
    assert_eq!(f.state(&other), LeaseState::Active);
}

#[test]
fn a_waiting_request_takes_another_gpu_that_fits_meanwhile() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[80]);
    f.granted(&on(request("a-low", 80, 0), "a"));
    let b_low = f.granted(&on(request("b-low", 80, 1), "b"));
    let boss = waiting_request("boss", 60, 5);
    let (wait, _) = f.waiting(&boss);
    assert_eq!(wait.node_id.as_str(), "a");
    // b frees up before a's victim does.
    f.pool.release(&b_low.lease_id, f.now);
    assert_eq!(f.granted(&boss).node_id.as_str(), "b");
    assert_eq!(
        f.pool
            .gpu_usage(&node_id("a"), &uuid("a", 0))
            .unwrap()
            .reserved_mib,
        0
    );
}

#[test]
fn an_offline_node_suspends_its_leases_and_they_resume_within_the_grace() {
    let mut f = Fixture::new();
    f.node("a", &[80, 80]);
    let first = f.granted(&request("r1", 80, 0));
    let second = f.granted(&request("r2", 10, 0));
    let changes = f.set_state("a", NodeState::Offline);
    assert_eq!(
        events(&changes),
        vec![
            (Event::Suspended, first.lease_id.to_string()),
            (Event::Suspended, second.lease_id.to_string()),
        ]
    );
    assert_eq!(f.state(&first), LeaseState::Suspended);
    assert_eq!(f.leased_mib("a", 0), 80 * GIB, "still counted");
    // Longer than the TTL: a suspended lease does not expire.
    assert!(
        f.advance(DEFAULT_ORPHAN_GRACE - Duration::from_secs(1))
            .is_empty()
    );
    let changes = f.set_state("a", NodeState::Online);
    assert_eq!(changes.len(), 2);
    assert!(changes.iter().all(|c| c.event == Event::Resumed));
    let resumed = f.pool.get(&first.lease_id).unwrap();
    assert_eq!(resumed.state, LeaseState::Active);
    assert_eq!(resumed.expires_at, f.now.wall + TTL);
    assert_eq!(resumed.suspended_at, None);
    f.pool.renew(&first.lease_id, f.now).unwrap();
}

#[test]
fn suspended_leases_are_not_placed_elsewhere_and_may_be_renewed() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[40]);
    let lease = f.granted(&on(request("r", 60, 0), "a"));
    f.set_state("a", NodeState::Offline);
    let (renewed, _) = f.pool.renew(&lease.lease_id, f.now).unwrap();
    assert_eq!(renewed.state, LeaseState::Suspended);
    assert_eq!(renewed.node_id.as_str(), "a");
    assert_eq!(
        f.pool
            .gpu_usage(&node_id("b"), &uuid("b", 0))
            .unwrap()
            .leased_mib,
        0
    );
}

#[test]
fn leases_orphaned_past_the_grace_are_released() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 10, 0));
    f.set_state("a", NodeState::Offline);
    let changes = f.advance(DEFAULT_ORPHAN_GRACE);
    assert_eq!(
        events(&changes),
        vec![(
            Event::Released(ReleaseReason::Orphaned),
            lease.lease_id.to_string()
        )]
    );
    assert_eq!(f.leased_mib("a", 0), 0);

    // Back after the grace but before any tick: released, not resumed.
    let mut g = Fixture::new();
    g.node("a", &[80]);
    let lease = g.granted(&request("r", 10, 0));
    g.set_state("a", NodeState::Offline);
    g.now = g.now.after(DEFAULT_ORPHAN_GRACE);
    let changes = g.set_state("a", NodeState::Online);
    assert_eq!(
        events(&changes),
        vec![(
            Event::Released(ReleaseReason::Orphaned),
            lease.lease_id.to_string()
        )]
    );
}

#[test]
fn a_node_that_left_or_was_removed_releases_its_leases_at_once() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[80]);
    let on_a = f.granted(&on(request("ra", 10, 0), "a"));
    let on_b = f.granted(&on(request("rb", 10, 0), "b"));
    let changes = f.set_state("a", NodeState::Left);
    assert_eq!(
        events(&changes),
        vec![(
            Event::Released(ReleaseReason::NodeLeft),
            on_a.lease_id.to_string()
        )]
    );
    let changes = f.pool.remove_node(&node_id("b"), f.now);
    assert_eq!(
        events(&changes),
        vec![(
            Event::Released(ReleaseReason::NodeRemoved),
            on_b.lease_id.to_string()
        )]
    );
    assert_eq!(f.pool.gpu_usage(&node_id("b"), &uuid("b", 0)), None);
    // Suspended leases too.
    f.node("c", &[80]);
    let on_c = f.granted(&on(request("rc", 10, 0), "c"));
    f.set_state("c", NodeState::Offline);
    let changes = f.pool.remove_node(&node_id("c"), f.now);
    assert_eq!(
        events(&changes),
        vec![(
            Event::Released(ReleaseReason::NodeRemoved),
            on_c.lease_id.to_string()
        )]
    );
}

#[test]
fn unknown_changes_nothing() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 10, 0));
    assert!(f.set_state("a", NodeState::Unknown).is_empty());
    assert_eq!(f.state(&lease), LeaseState::Active);
}

#[test]
fn a_vanished_gpu_keeps_its_leases_but_takes_no_new_ones() {
    let mut f = Fixture::new();
    f.node("a", &[80, 40]);
    let lease = f.granted(&request("r", 30, 0));
    assert_eq!(lease.gpu_uuid, uuid("a", 1));
    let only_first = GpuView {
        index: 0,
        uuid: uuid("a", 0),
        total_mib: 80 * GIB,
        used_mib: 0,
        healthy: true,
    };
    f.pool.set_gpus(&node_id("a"), vec![only_first]).unwrap();
    assert_eq!(f.leased_mib("a", 1), 30 * GIB);
    assert!(
        !f.pool
            .gpu_usage(&node_id("a"), &uuid("a", 1))
            .unwrap()
            .placeable
    );
    let mut there = request("r2", 1, 0);
    there.terms.constraints.gpu_uuid = Some(uuid("a", 1));
    assert!(matches!(f.acquire(&there), Err(PoolError::Invalid(_))));
    f.pool.release(&lease.lease_id, f.now);
    assert_eq!(f.pool.gpu_usage(&node_id("a"), &uuid("a", 1)), None);
}

#[test]
fn inventory_with_duplicates_is_refused() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let gpu = |index: u32, uuid: &str| GpuView {
        index,
        uuid: uuid.into(),
        total_mib: 1,
        used_mib: 0,
        healthy: true,
    };
    let error = f
        .pool
        .set_gpus(&node_id("a"), vec![gpu(0, "x"), gpu(1, "x")])
        .unwrap_err();
    assert!(
        matches!(error, PoolError::Invalid(ref i) if i.field == "gpus.uuid"),
        "{error}"
    );
    let error = f
        .pool
        .set_gpus(&node_id("a"), vec![gpu(0, "x"), gpu(0, "y")])
        .unwrap_err();
    assert!(
        matches!(error, PoolError::Invalid(ref i) if i.field == "gpus.index"),
        "{error}"
    );
    let error = f.pool.set_gpus(&node_id("zz"), vec![]).unwrap_err();
    assert_eq!(error, PoolError::UnknownNode(node_id("zz")));
}

#[test]
fn list_filters_leases() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[80]);
    let a = f.granted(&on(request("ra", 10, 0), "a"));
    let mut other = on(request("rb", 10, 0), "b");
    other.terms.holder = "inference".into();
    let b = f.granted(&other);
    f.pool.release(&a.lease_id, f.now);
    let ids = |filter: LeaseFilter| -> Vec<LeaseId> {
        f.pool
            .list(&filter)
            .into_iter()
            .map(|l| l.lease_id)
            .collect()
    };
    assert_eq!(
        ids(LeaseFilter::default()),
        vec![a.lease_id.clone(), b.lease_id.clone()]
    );
    let by_node = LeaseFilter {
        node_id: Some(node_id("b")),
        ..LeaseFilter::default()
    };
    assert_eq!(ids(by_node), vec![b.lease_id.clone()]);
    let by_holder = LeaseFilter {
        holder: Some("trainer".into()),
        ..LeaseFilter::default()
    };
    assert_eq!(ids(by_holder), vec![a.lease_id.clone()]);
    let active = LeaseFilter {
        states: vec![LeaseState::Active],
        ..LeaseFilter::default()
    };
    assert_eq!(ids(active), vec![b.lease_id.clone()]);
    let by_gpu = LeaseFilter {
        gpu_uuid: Some(uuid("a", 0)),
        ..LeaseFilter::default()
    };
    assert_eq!(ids(by_gpu), vec![a.lease_id]);
}

fn restart(f: &mut Fixture) {
    let persisted = f.pool.snapshot();
    f.pool = Pool::restore(PoolConfig::default(), persisted).unwrap();
}

#[test]
fn generations_never_decrease_across_a_restore() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let first = f.granted(&request("r1", 10, 0));
    let second = f.granted(&request("r2", 10, 0));
    assert!(second.generation > first.generation);
    f.pool.release(&second.lease_id, f.now);
    f.advance(DEFAULT_RELEASED_RETENTION);
    assert!(f.pool.get(&second.lease_id).is_none());
    restart(&mut f);
    assert_eq!(f.pool.last_generation(), second.generation);
    f.pool.reconcile(vec![view("a", NodeState::Online)], f.now);
    f.node("a", &[80]);
    let third = f.granted(&request("r3", 10, 0));
    assert!(third.generation > second.generation);
    assert_ne!(third.lease_id, second.lease_id);

    // A stored last generation behind a stored lease is overruled.
    let mut persisted = f.pool.snapshot();
    persisted.last_generation = 0;
    let pool = Pool::restore(PoolConfig::default(), persisted).unwrap();
    assert_eq!(pool.last_generation(), third.generation);
}

#[test]
fn inconsistent_persisted_leases_are_refused() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 10, 0));
    let mut twice = f.pool.snapshot();
    twice.leases.push(lease.clone());
    assert!(matches!(
        Pool::restore(PoolConfig::default(), twice),
        Err(PoolError::Inconsistent(_))
    ));
    let mut same_request = f.pool.snapshot();
    let mut copy = lease;
    copy.generation += 1;
    copy.lease_id = LeaseId::new("other");
    same_request.leases.push(copy);
    let error = Pool::restore(PoolConfig::default(), same_request)
        .err()
        .unwrap();
    assert!(error.to_string().contains("request_id"), "{error}");
}

#[test]
fn no_lease_is_released_merely_because_of_a_restart() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    f.node("b", &[80]);
    f.node("c", &[80]);
    f.node("d", &[80]);
    let on_a = f.granted(&on(request("ra", 10, 0), "a"));
    let on_b = f.granted(&on(request("rb", 10, 0), "b"));
    let on_c = f.granted(&on(request("rc", 10, 0), "c"));
    let on_d = f.granted(&on(request("rd", 10, 0), "d"));
    f.set_state("b", NodeState::Offline);
    restart(&mut f);
    // The coordinator was down for longer than every deadline.
    f.now = f.now.after(Duration::from_secs(3600));
    assert!(
        f.pool.tick(f.now).is_empty(),
        "nothing runs before reconcile"
    );
    assert!(!f.pool.is_settled());
    let nodes = vec![
        view("a", NodeState::Online),
        view("b", NodeState::Offline),
        view("c", NodeState::Unknown),
    ];
    let changes = f.pool.reconcile(nodes, f.now);
    assert!(f.pool.is_settled());
    assert_eq!(
        events(&changes),
        vec![
            (Event::Reconciled, on_a.lease_id.to_string()),
            (Event::Reconciled, on_c.lease_id.to_string()),
            (Event::Reconciled, on_d.lease_id.to_string()),
            (
                Event::Released(ReleaseReason::NodeRemoved),
                on_d.lease_id.to_string()
            ),
        ]
    );
    assert_eq!(f.state(&on_a), LeaseState::Active);
    assert_eq!(
        f.pool.get(&on_a.lease_id).unwrap().expires_at,
        f.now.wall + TTL
    );
    assert_eq!(f.state(&on_b), LeaseState::Suspended);
    assert_eq!(f.state(&on_c), LeaseState::Active);
    // Each deadline runs in full from the reconcile.
    assert!(f.advance(TTL - Duration::from_secs(1)).is_empty());
    f.pool.renew(&on_a.lease_id, f.now).unwrap();
    let expired = f.advance(Duration::from_secs(1));
    assert_eq!(
        events(&expired),
        vec![
            (
                Event::Released(ReleaseReason::Expired),
                on_c.lease_id.to_string()
            ),
            (Event::Forgotten, on_d.lease_id.to_string()),
        ]
    );
    let orphaned = f.advance(DEFAULT_ORPHAN_GRACE);
    assert!(orphaned.contains(&Change {
        event: Event::Released(ReleaseReason::Orphaned),
        lease: f.pool.get(&on_b.lease_id).unwrap().clone(),
    }));
}

#[test]
fn restored_leases_count_before_the_inventory_returns() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let lease = f.granted(&request("r", 70, 0));
    restart(&mut f);
    f.node("a", &[80]);
    f.exhausted(&request("r2", 20, 0));
    f.pool.reconcile(vec![view("a", NodeState::Online)], f.now);
    assert_eq!(f.state(&lease), LeaseState::Active);
    assert_eq!(f.leased_mib("a", 0), 70 * GIB);
}

#[test]
fn a_revoked_lease_survives_a_restart_and_gets_a_full_grace() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    let victim = f.granted(&request("victim", 60, 0));
    let boss = waiting_request("boss", 60, 5);
    f.waiting(&boss);
    restart(&mut f);
    f.now = f.now.after(Duration::from_secs(600));
    f.pool.reconcile(vec![view("a", NodeState::Online)], f.now);
    f.node("a", &[80]);
    assert_eq!(f.state(&victim), LeaseState::Revoked);
    // The retry after the restart revokes nothing more.
    let (wait, changes) = f.waiting(&boss);
    assert!(changes.is_empty());
    assert_eq!(wait.retry_at, Some(f.now.monotonic + DEFAULT_REVOKE_GRACE));
    f.advance(DEFAULT_REVOKE_GRACE);
    f.granted(&boss);
}

#[test]
fn next_deadline_tells_when_to_tick() {
    let mut f = Fixture::new();
    f.node("a", &[80]);
    assert_eq!(f.pool.next_deadline(), None);
    f.granted(&request("r", 10, 0));
    assert_eq!(f.pool.next_deadline(), Some(f.now.monotonic + TTL));
}
