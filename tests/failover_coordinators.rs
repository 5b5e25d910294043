//! Several coordinator processes on one real PostgreSQL, with a swarm of 20
//! agents that knows them all: one leads, the others stand by, and a standby
//! takes over when the leader is killed, frozen past its lease, or cut off
//! from the database, without showing a live node OFFLINE.

mod common;

use std::time::{Duration, Instant};

use common::{
    Coordinator, FAST_TIMING, Process, RawStream, channel, postgres::Postgres, register_message,
    start_swarm_with, wait_for,
};
use muster::proto::{
    self, ListNodesRequest, NodeState, WatchNodesRequest, coordinator_client::CoordinatorClient,
};
use nix::sys::signal::Signal;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const AGENTS: usize = 20;
const LEASE: Duration = Duration::from_secs(3);
const LEASE_FLAG: &str = "3s";
/// What the issue allows a failover: the lease, then five seconds.
const TAKEOVER: Duration = Duration::from_secs(8);
const SETTLE: Duration = Duration::from_secs(60);

fn start_coordinator(db: &str) -> Coordinator {
    let mut extra: Vec<&str> = FAST_TIMING.to_vec();
    extra.extend(["--leader-lease", LEASE_FLAG]);
    Coordinator::start(std::path::Path::new(db), "127.0.0.1:0", &extra)
}

async fn wait_for_role(coordinator: &Coordinator, role: &str, deadline: Duration) {
    let needle = format!("coordinator role: {role}");
    coordinator
        .process
        .wait_for_log(0, deadline, |line| line.contains(&needle).then_some(()))
        .await;
}

/// ListNodes at `url`: the role the response names, and the nodes.
async fn list(url: &str) -> Option<(String, Vec<proto::Node>)> {
    let mut client = CoordinatorClient::new(
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?,
    );
    let response = tokio::time::timeout(
        Duration::from_secs(2),
        client.list_nodes(ListNodesRequest {}),
    )
    .await
    .ok()?
    .ok()?;
    let role = response
        .metadata()
        .get("x-muster-role")?
        .to_str()
        .ok()?
        .to_owned();
    Some((role, response.into_inner().nodes))
}

fn all_online(nodes: &[proto::Node]) -> bool {
    nodes.len() == AGENTS && nodes.iter().all(|node| node.state() == NodeState::Online)
}

/// The first of `urls` that answers as the leader with every node ONLINE.
async fn settled_leader(urls: &[String]) -> Option<(String, Vec<proto::Node>)> {
    for url in urls {
        if let Some((role, nodes)) = list(url).await
            && role == "leader"
            && all_online(&nodes)
        {
            return Some((url.clone(), nodes));
        }
    }
    None
}

fn node_ids(nodes: &[proto::Node]) -> Vec<String> {
    let mut ids: Vec<String> = nodes.iter().map(|node| node.node_id.clone()).collect();
    ids.sort();
    ids
}

/// Every event a watch from revision 0 yields, collected in the background.
fn watch_events(url: String) -> tokio::task::JoinHandle<Vec<proto::NodeEvent>> {
    let (ready, started) = std::sync::mpsc::channel();
    let handle = tokio::spawn(async move {
        let mut client = CoordinatorClient::new(channel(&url).await);
        let mut stream = client
            .watch_nodes(WatchNodesRequest { since_revision: 0 })
            .await
            .expect("WatchNodes on a standby")
            .into_inner();
        let _ = ready.send(());
        let mut events = Vec::new();
        while let Ok(Some(event)) = stream.message().await {
            events.push(event);
        }
        events
    });
    let _ = started.recv_timeout(Duration::from_secs(10));
    handle
}

/// The revision a watch from 0 at `url` ends its snapshot with.
async fn latest_revision(url: &str) -> u64 {
    let mut stream = CoordinatorClient::new(channel(url).await)
        .watch_nodes(WatchNodesRequest { since_revision: 0 })
        .await
        .expect("WatchNodes")
        .into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the snapshot within 10 s")
            .expect("the watch goes on")
            .expect("an event");
        if event.kind() == proto::NodeEventKind::SnapshotEnd {
            return event.revision;
        }
    }
}

struct Fleet {
    _postgres: Postgres,
    coordinators: Vec<Coordinator>,
    urls: Vec<String>,
    _swarm: Process,
    ids: Vec<String>,
}

/// `count` coordinators, the first leading, and the swarm ONLINE on it.
async fn fleet(what: &str, count: usize) -> Option<Fleet> {
    let postgres = Postgres::start(what)?;
    let db = postgres.create_database();
    let first = start_coordinator(&db);
    wait_for_role(&first, "leader", SETTLE).await;
    let mut coordinators = vec![first];
    for _ in 1..count {
        let standby = start_coordinator(&db);
        wait_for_role(&standby, "standby", SETTLE).await;
        coordinators.push(standby);
    }
    let urls: Vec<String> = coordinators.iter().map(Coordinator::url).collect();
    let swarm = start_swarm_with(&urls.join(","), AGENTS, &[]);
    let (_, nodes) = wait_for("the swarm ONLINE on the leader", SETTLE, || {
        settled_leader(&urls[..1])
    })
    .await;
    Some(Fleet {
        _postgres: postgres,
        coordinators,
        urls,
        _swarm: swarm,
        ids: node_ids(&nodes),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_of_two_standbys_takes_over_a_killed_leader_without_showing_a_node_offline() {
    killed_leader(3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_takes_over_a_killed_leader_without_showing_a_node_offline() {
    killed_leader(2).await;
}

async fn killed_leader(coordinators: usize) {
    let what = format!("failover after SIGKILL among {coordinators} coordinators");
    let Some(mut fleet) = fleet(&what, coordinators).await else {
        return;
    };
    let leader_url = fleet.urls[0].clone();

    // A standby answers reads from the database, says it is a standby, and
    // refuses an agent's stream naming the leader.
    let (role, nodes) = list(&fleet.urls[1])
        .await
        .expect("a standby answers ListNodes");
    assert_eq!(role, "standby");
    assert_eq!(node_ids(&nodes), fleet.ids);
    let refused = RawStream::refused(
        &fleet.urls[1],
        register_message("intruder", "http://127.0.0.1:9", "boot"),
    )
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused
            .metadata()
            .get("x-muster-leader")
            .and_then(|url| url.to_str().ok()),
        Some(leader_url.as_str())
    );
    assert_eq!(
        refused
            .metadata()
            .get("x-muster-role")
            .and_then(|role| role.to_str().ok()),
        Some("standby")
    );

    // A watch that moves to a standby resumes from the leader's latest
    // revision, though the standby reads the event log a poll period late.
    let mut leader = CoordinatorClient::new(channel(&leader_url).await);
    leader
        .drain_node(proto::DrainNodeRequest {
            node_id: fleet.ids[0].clone(),
            reason: "a fresh revision".to_owned(),
        })
        .await
        .expect("DrainNode on the leader");
    let latest = latest_revision(&leader_url).await;
    CoordinatorClient::new(channel(&fleet.urls[1]).await)
        .watch_nodes(WatchNodesRequest {
            since_revision: latest,
        })
        .await
        .expect("a standby resumes a watch from the leader's latest revision");

    // Health: a standby serves the reads, and the whole of its role, but
    // not what only the leader serves.
    for (service, expected) in [
        ("", ServingStatus::Serving),
        ("muster.v1.Coordinator.reads", ServingStatus::Serving),
        ("muster.v1.Coordinator", ServingStatus::NotServing),
    ] {
        let status = wait_for(
            &format!("a standby's health of {service:?}"),
            TAKEOVER,
            || async {
                let request = HealthCheckRequest {
                    service: service.to_owned(),
                };
                let response = HealthClient::new(channel(&fleet.urls[1]).await)
                    .check(request)
                    .await
                    .ok()?;
                let status = response.into_inner().status();
                (status == expected).then_some(status)
            },
        )
        .await;
        assert_eq!(status, expected);
    }

    let watch = watch_events(fleet.urls[coordinators - 1].clone());
    fleet.coordinators[0].process.kill();
    let killed = Instant::now();
    let survivors = fleet.urls[1..].to_vec();
    let (new_leader, nodes) = wait_for("a new leader with every node ONLINE", TAKEOVER, || {
        settled_leader(&survivors)
    })
    .await;
    let took = killed.elapsed();
    eprintln!("failover: {new_leader} leads with {AGENTS} nodes ONLINE {took:?} after SIGKILL");
    assert_eq!(node_ids(&nodes), fleet.ids, "no registration lost");
    // Sessions on the new leader settle before the watch is read.
    common::hold_none_offline(&new_leader, Duration::from_secs(2)).await;

    for coordinator in &mut fleet.coordinators[1..] {
        coordinator.process.kill();
    }
    let events = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the watch ends with its coordinator")
        .expect("watch task");
    assert!(
        events.len() > AGENTS,
        "the watch saw the fleet and the failover"
    );
    let offline: Vec<&proto::NodeEvent> = events
        .iter()
        .filter(|event| {
            event
                .node
                .as_ref()
                .is_some_and(|node| node.state() == NodeState::Offline)
        })
        .collect();
    assert!(offline.is_empty(), "shown OFFLINE: {offline:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_frozen_past_its_lease_finds_itself_deposed_and_its_late_writes_refused() {
    let Some(fleet) = fleet("failover after SIGSTOP", 2).await else {
        return;
    };
    let frozen = &fleet.coordinators[0];
    let log_before = frozen.process.log_len();
    frozen.process.signal(Signal::SIGSTOP);
    let (new_leader, nodes) = wait_for(
        "the standby leading with every node ONLINE",
        TAKEOVER,
        || settled_leader(&fleet.urls[1..]),
    )
    .await;
    assert_eq!(new_leader, fleet.urls[1]);
    assert_eq!(node_ids(&nodes), fleet.ids, "no registration lost");
    frozen.process.signal(Signal::SIGCONT);
    frozen
        .process
        .wait_for_log(log_before, TAKEOVER, |line| {
            line.contains("coordinator role: standby").then_some(())
        })
        .await;
    // Thawed, it either tries a write it had queued, which the database
    // refuses, or finds by its own clock that its lease ran out before it
    // writes anything; which comes first is a race, and both are safe (the
    // store's refusal of an old epoch is tested in the store itself).
    frozen
        .process
        .wait_for_log(log_before, TAKEOVER, |line| {
            (line.contains("the database refused a write")
                || line.contains("the lease could not be renewed before it could expire"))
            .then_some(())
        })
        .await;
    let (role, _) = wait_for("the thawed coordinator answering", TAKEOVER, || {
        list(&fleet.urls[0])
    })
    .await;
    assert_eq!(role, "standby");
    common::hold_none_offline(&new_leader, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_off_from_the_database_steps_down_and_one_leads_once_it_is_back() {
    let Some(fleet) = fleet("failover when the database stops", 2).await else {
        return;
    };
    let leader = &fleet.coordinators[0];
    let log_before = leader.process.log_len();
    fleet._postgres.stop();
    let stopped = Instant::now();
    leader
        .process
        .wait_for_log(log_before, LEASE + Duration::from_secs(2), |line| {
            line.contains("coordinator role: standby").then_some(())
        })
        .await;
    let stepped_down = stopped.elapsed();
    assert!(
        stepped_down < LEASE,
        "stepped down {stepped_down:?} after the database went, past its lease"
    );
    let (role, _) = wait_for("the deposed leader answering", TAKEOVER, || {
        async {
            // Reads need the database; the role is in the refusal too.
            match CoordinatorClient::new(channel(&fleet.urls[0]).await)
                .list_nodes(ListNodesRequest {})
                .await
            {
                Ok(response) => response
                    .metadata()
                    .get("x-muster-role")
                    .and_then(|role| role.to_str().ok().map(str::to_owned)),
                Err(status) => status
                    .metadata()
                    .get("x-muster-role")
                    .and_then(|role| role.to_str().ok().map(str::to_owned)),
            }
            .map(|role| (role, ()))
        }
    })
    .await;
    assert_eq!(role, "standby");
    fleet._postgres.start_again();
    let (new_leader, nodes) = wait_for(
        "one coordinator leading with every node ONLINE once the database is back",
        SETTLE,
        || settled_leader(&fleet.urls),
    )
    .await;
    assert_eq!(node_ids(&nodes), fleet.ids, "no registration lost");
    let mut leaders = 0;
    for url in &fleet.urls {
        if let Some((role, _)) = list(url).await
            && role == "leader"
        {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1, "exactly one leads ({new_leader})");
}

#[test]
fn a_coordinator_on_a_shared_database_needs_a_url_others_can_reach() {
    let Some(postgres) = Postgres::start("--advertise-url on a shared database") else {
        return;
    };
    let db = postgres.create_database();
    let output = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_muster")).args([
            "coordinator",
            "--db",
            &db,
            "--listen",
            "0.0.0.0:0",
            "--http-listen",
            "off",
        ]),
        common::START_DEADLINE,
    );
    common::one_line_error(&output, "--advertise-url");
}
