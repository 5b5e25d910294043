//! Coordinator restarts: nodes are reloaded as UNKNOWN, proven alive by
//! Status probes, and never lost, without any agent being touched. Every
//! scenario runs on SQLite and on PostgreSQL.

mod common;

use std::{cell::RefCell, time::Duration};

use common::*;
use muster::{
    coordinator::{ProbeCredentials, ProbeOutcome, probe},
    node::NodeId,
    proto::NodeState,
    store::Store,
};
use nix::sys::signal::Signal;
use tokio::time::Instant;

const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);

/// Offline-after in [`FAST_TIMING`], plus a margin: how long recovered nodes
/// are watched to prove that none goes OFFLINE after the fact.
const WATCH_AFTER_RECOVERY: Duration = Duration::from_secs(4);

/// A fleet of two agents registered with a coordinator on `db`.
struct Fleet {
    coordinator: Coordinator,
    agents: Vec<Process>,
    registered: Vec<muster::proto::Node>,
}

impl Fleet {
    async fn start(dir: &std::path::Path, db: &std::path::Path) -> Self {
        let coordinator = Coordinator::start(db, "127.0.0.1:0", FAST_TIMING);
        let agents = vec![
            start_agent(&coordinator.url(), "gpu-1", &dir.join("a1")),
            start_agent(&coordinator.url(), "gpu-2", &dir.join("a2")),
        ];
        let registered = wait_for_state(
            &coordinator.url(),
            &["gpu-1", "gpu-2"],
            NodeState::Online,
            START_DEADLINE,
        )
        .await;
        Self {
            coordinator,
            agents,
            registered,
        }
    }

    /// SIGKILLs the coordinator, starts it again at once on the same port
    /// and database, and checks that every node is ONLINE
    /// again within the deadline, was never shown OFFLINE, and is the same
    /// agent process as before.
    async fn kill_and_restart_coordinator(&mut self) {
        let listen = self.coordinator.process.address.to_string();
        let db = self.coordinator.db.clone();
        self.coordinator.process.kill();
        self.coordinator = Coordinator::restart(&db, &listen, FAST_TIMING);
        let restarted = Instant::now();

        let url = self.coordinator.url();
        let url = url.as_str();
        let broken = RefCell::new(None);
        let broken_ref = &broken;
        let after = wait_for(
            "every node ONLINE after the restart",
            RECOVERY_DEADLINE,
            || async move {
                let nodes = list_nodes(url).await?;
                if let Err(why) = none_offline(&nodes) {
                    broken_ref.borrow_mut().get_or_insert(why);
                }
                (nodes.len() == 2 && nodes.iter().all(|n| state_of(n) == NodeState::Online))
                    .then_some(nodes)
            },
        )
        .await;
        eprintln!("all ONLINE {:?} after the restart", restarted.elapsed());
        assert_eq!(broken.into_inner(), None, "during recovery");
        for (node, old) in after.iter().zip(&self.registered) {
            assert_eq!(node.node_id, old.node_id);
            assert_eq!(
                node.boot_id, old.boot_id,
                "the agent process was not restarted"
            );
            assert_eq!(node.registered_at, old.registered_at);
        }
    }

    /// Watches the recovered fleet long enough for a node that was only
    /// probed, and never re-registered, to have gone OFFLINE; then checks
    /// that every agent has registered again on its own.
    async fn expect_stable_and_re_registered(&self) {
        let url = self.coordinator.url();
        let url = url.as_str();
        hold_none_offline(url, WATCH_AFTER_RECOVERY).await;
        let nodes = list_nodes(url).await.unwrap();
        for (node, old) in nodes.iter().zip(&self.registered) {
            assert!(
                node.session_generation > old.session_generation,
                "{} has not re-registered: {node:?}",
                node.node_id
            );
        }
    }
}

async fn a_killed_coordinator_recovers_every_node_on_the_same_port_without_touching_agents(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(dir.path(), "recovery::a_killed_coordinator_recovers_every_node_on_the_same_port_without_touching_agents") else {
        return;
    };
    let mut fleet = Fleet::start(dir.path(), &database.db).await;
    let agent_pids: Vec<u32> = fleet.agents.iter().map(Process::pid).collect();
    for _ in 0..3 {
        fleet.kill_and_restart_coordinator().await;
    }
    fleet.expect_stable_and_re_registered().await;
    let pids_now: Vec<u32> = fleet.agents.iter().map(Process::pid).collect();
    assert_eq!(pids_now, agent_pids);
}

/// A `Duration`'s debug form, as in `retry_in=3.21s` or `retry_in=812ms`.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    }
    let secs = text.strip_suffix('s')?;
    secs.parse::<f64>().ok().map(Duration::from_secs_f64)
}

async fn an_agent_waiting_out_a_long_backoff_re_registers_as_soon_as_it_is_probed(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "recovery::an_agent_waiting_out_a_long_backoff_re_registers_as_soon_as_it_is_probed",
    ) else {
        return;
    };
    let mut fleet = Fleet::start(dir.path(), &database.db).await;
    let listen = fleet.coordinator.process.address.to_string();
    let db = fleet.coordinator.db.clone();
    fleet.coordinator.process.kill();

    // Wait until an agent has just gone to sleep for several seconds.
    let long_sleep = Duration::from_secs(3);
    let agent = &fleet.agents[0];
    let asleep_for = agent
        .wait_for_log(agent.log_len(), Duration::from_secs(60), |line| {
            let delay = parse_debug_duration(&field(line, "retry_in=")?)?;
            (delay >= long_sleep).then_some(delay)
        })
        .await;

    fleet.coordinator = Coordinator::restart(&db, &listen, FAST_TIMING);
    let url = fleet.coordinator.url();
    let before = fleet.registered[0].session_generation;
    wait_for(
        "gpu-1 to re-register before its backoff ends",
        long_sleep / 2,
        || async {
            let node = node(&url, "gpu-1").await?;
            (node.session_generation > before).then_some(())
        },
    )
    .await;
    eprintln!("re-registered although the backoff had {asleep_for:?} to run");
}

async fn a_coordinator_frozen_past_offline_after_shows_no_node_offline_when_it_resumes(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "recovery::a_coordinator_frozen_past_offline_after_shows_no_node_offline_when_it_resumes",
    ) else {
        return;
    };
    let fleet = Fleet::start(dir.path(), &database.db).await;
    // Longer than offline-after (3 s) and than the agents' patience (three
    // 500 ms intervals): agents give up on their streams and reconnect.
    let freeze = Duration::from_secs(4);
    fleet.coordinator.process.signal(Signal::SIGSTOP);
    tokio::time::sleep(freeze).await;
    fleet.coordinator.process.signal(Signal::SIGCONT);
    fleet.expect_stable_and_re_registered().await;
    let stored = Store::open(store_database(&fleet.coordinator.db))
        .await
        .unwrap()
        .load_nodes()
        .await
        .unwrap();
    assert!(
        stored.iter().all(|n| n.offline_since.is_none()),
        "{stored:?}"
    );
}

async fn time_the_coordinator_stood_still_is_not_held_against_nodes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "recovery::time_the_coordinator_stood_still_is_not_held_against_nodes",
    ) else {
        return;
    };
    let fleet = Fleet::start(dir.path(), &database.db).await;
    // Freeze an agent, then the coordinator, so that no heartbeat is waiting
    // when the coordinator resumes: only the allowance for its own stall keeps
    // the node from being judged at once on a deadline that passed while the
    // coordinator itself was stopped.
    fleet.agents[0].signal(Signal::SIGSTOP);
    fleet.coordinator.process.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.coordinator.process.signal(Signal::SIGCONT);

    let url = fleet.coordinator.url();
    let url = url.as_str();
    hold_for(
        "gpu-1 not judged on the stall",
        Duration::from_secs(1),
        || async move {
            let node = node(url, "gpu-1").await.ok_or("gpu-1 not listed")?;
            match state_of(&node) {
                NodeState::Offline => Err("gpu-1 shown OFFLINE right after the stall".to_owned()),
                _ => Ok(()),
            }
        },
    )
    .await;
    // The agent really is frozen, so the node does go OFFLINE after that.
    wait_for_state(url, &["gpu-1"], NodeState::Offline, START_DEADLINE).await;
    fleet.agents[0].signal(Signal::SIGCONT);
}

async fn reloaded_nodes_are_unknown_until_a_probe_proves_them_alive(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "recovery::reloaded_nodes_are_unknown_until_a_probe_proves_them_alive",
    ) else {
        return;
    };
    let db = database.db.clone();
    let slow_offline = [
        "--heartbeat-interval",
        "200ms",
        "--offline-after",
        "30s",
        "--probe-timeout",
        "500ms",
    ];
    let mut first = Coordinator::start(&db, "127.0.0.1:0", &slow_offline);
    let agent = start_agent(&first.url(), "gpu-1", &dir.path().join("a1"));
    let mut dead = start_agent(&first.url(), "gpu-dead", &dir.path().join("a2"));
    let registered = wait_for_state(
        &first.url(),
        &["gpu-1", "gpu-dead"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;
    dead.kill();
    first.process.kill();

    // A new port: the agent keeps dialling the old one, so only a probe can
    // bring its node back.
    let second = Coordinator::start(&db, "127.0.0.1:0", &slow_offline);
    let online = wait_for_state(
        &second.url(),
        &["gpu-1"],
        NodeState::Online,
        RECOVERY_DEADLINE,
    )
    .await;
    assert_eq!(
        online[0].session_generation, registered[0].session_generation,
        "proven by the probe, not a re-registration"
    );
    let dead_node = node(&second.url(), "gpu-dead")
        .await
        .expect("dead node still listed");
    assert_eq!(state_of(&dead_node), NodeState::Unknown);
    drop(agent);
}

async fn a_probe_that_reaches_a_different_node_is_rejected(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "recovery::a_probe_that_reaches_a_different_node_is_rejected",
    ) else {
        return;
    };
    let db = database.db.clone();
    let mut first = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let impostor = start_agent(&first.url(), "gpu-1", &dir.path().join("a1"));
    wait_for_state(&first.url(), &["gpu-1"], NodeState::Online, START_DEADLINE).await;

    // The prober itself: the agent answers, but as another node.
    let expected = NodeId::parse("node_id", "gpu-ghost").unwrap();
    let outcome = probe(
        &impostor.url(),
        &expected,
        Duration::from_secs(2),
        ProbeCredentials::default(),
    )
    .await;
    assert_eq!(
        outcome,
        ProbeOutcome::WrongNode {
            answered: "gpu-1".to_owned()
        }
    );
    let real = NodeId::parse("node_id", "gpu-1").unwrap();
    assert!(matches!(
        probe(
            &impostor.url(),
            &real,
            Duration::from_secs(2),
            ProbeCredentials::default()
        )
        .await,
        ProbeOutcome::Alive { .. }
    ));

    // End to end: a node whose address is now held by another agent stays
    // unproven after a restart, and goes OFFLINE rather than ONLINE.
    let (ghost, _) =
        RawStream::register(&first.url(), "gpu-ghost", &impostor.url(), "ghost-boot").await;
    drop(ghost);
    wait_for_state(
        &first.url(),
        &["gpu-ghost"],
        NodeState::Offline,
        START_DEADLINE,
    )
    .await;
    // The registry shows OFFLINE before the writer commits it; killed in
    // between, the ghost would be reloaded as live, with its agent's whole
    // backoff ceiling as grace. The writer logs a change once committed.
    first
        .process
        .wait_for_log(0, START_DEADLINE, |line| {
            (line.contains("node offline") && line.contains("node_id=gpu-ghost")).then_some(())
        })
        .await;
    first.process.kill();

    let second = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    wait_for_state(
        &second.url(),
        &["gpu-1"],
        NodeState::Online,
        RECOVERY_DEADLINE,
    )
    .await;
    let states = RefCell::new(Vec::new());
    let (url, seen) = (second.url(), &states);
    let url = url.as_str();
    wait_for("gpu-ghost to go OFFLINE", START_DEADLINE, || async move {
        let ghost = node(url, "gpu-ghost").await?;
        seen.borrow_mut().push(state_of(&ghost));
        (state_of(&ghost) == NodeState::Offline).then_some(())
    })
    .await;
    assert!(
        !states.borrow().contains(&NodeState::Online),
        "the ghost was shown ONLINE: {states:?}"
    );
}

async fn a_registration_is_committed_before_it_is_acknowledged(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "recovery::a_registration_is_committed_before_it_is_acknowledged",
    ) else {
        return;
    };
    let db = database.db.clone();
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let (_stream, generation) =
        RawStream::register(&coordinator.url(), "gpu-9", "http://127.0.0.1:9", "b").await;
    coordinator.process.kill();

    let stored = Store::open(store_database(&db))
        .await
        .unwrap()
        .load_nodes()
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].registration.node_id.as_str(), "gpu-9");
    assert_eq!(stored[0].generation, generation);
}

on_every_backend!(
    a_killed_coordinator_recovers_every_node_on_the_same_port_without_touching_agents,
    an_agent_waiting_out_a_long_backoff_re_registers_as_soon_as_it_is_probed,
    a_coordinator_frozen_past_offline_after_shows_no_node_offline_when_it_resumes,
    time_the_coordinator_stood_still_is_not_held_against_nodes,
    reloaded_nodes_are_unknown_until_a_probe_proves_them_alive,
    a_probe_that_reaches_a_different_node_is_rejected,
    a_registration_is_committed_before_it_is_acknowledged,
);
