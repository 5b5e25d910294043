//! Coordinator restarts: nodes are reloaded as UNKNOWN, proven alive by
//! Status probes, and never lost, without any agent being touched.

mod common;

use std::{cell::RefCell, time::Duration};

use common::*;
use muster::{
    coordinator::{ProbeOutcome, probe},
    node::NodeId,
    proto::NodeState,
    store::Store,
};
use tokio::time::Instant;

const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_coordinator_recovers_every_node_on_the_same_port_without_touching_agents() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let listen = coordinator.process.address.to_string();
    let url = coordinator.url();
    let agents = [
        start_agent(&url, "gpu-1", &dir.path().join("a1")),
        start_agent(&url, "gpu-2", &dir.path().join("a2")),
    ];
    let agent_pids: Vec<u32> = agents.iter().map(Process::pid).collect();
    let before = wait_for_state(&url, &["gpu-1", "gpu-2"], NodeState::Online, START_DEADLINE).await;

    let mut coordinator = coordinator;
    for restart in 1..=3 {
        coordinator.process.kill();
        coordinator = Coordinator::start(&db, &listen, FAST_TIMING);
        let restarted = Instant::now();
        let seen_offline = RefCell::new(Vec::new());
        let (url, seen) = (url.as_str(), &seen_offline);
        let after = wait_for(
            "both nodes ONLINE after the restart",
            RECOVERY_DEADLINE,
            || async move {
                let nodes = list_nodes(url).await?;
                seen.borrow_mut().extend(
                    nodes
                        .iter()
                        .filter(|n| state_of(n) == NodeState::Offline)
                        .map(|n| n.node_id.clone()),
                );
                (nodes.len() == 2 && nodes.iter().all(|n| state_of(n) == NodeState::Online))
                    .then_some(nodes)
            },
        )
        .await;
        eprintln!(
            "restart {restart}: all ONLINE after {:?}",
            restarted.elapsed()
        );
        assert!(
            seen_offline.borrow().is_empty(),
            "restart {restart} showed {seen_offline:?} OFFLINE"
        );
        for (node, old) in after.iter().zip(&before) {
            assert_eq!(node.node_id, old.node_id);
            assert_eq!(
                node.boot_id, old.boot_id,
                "the agent process was not restarted"
            );
            assert_eq!(node.registered_at, old.registered_at);
        }
    }
    let pids_now: Vec<u32> = agents.iter().map(Process::pid).collect();
    assert_eq!(pids_now, agent_pids);

    // Agents re-register on their own: the generation moves past the original.
    wait_for("agents to re-register", START_DEADLINE, || async {
        let nodes = list_nodes(&url).await?;
        nodes.iter().all(|n| n.session_generation > 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reloaded_nodes_are_unknown_until_a_probe_proves_them_alive() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let slow_offline = [
        "--heartbeat-interval",
        "200ms",
        "--offline-after",
        "30s",
        "--probe-timeout",
        "500ms",
    ];
    let first = Coordinator::start(&db, "127.0.0.1:0", &slow_offline);
    let agent = start_agent(&first.url(), "gpu-1", &dir.path().join("a1"));
    let dead = start_agent(&first.url(), "gpu-dead", &dir.path().join("a2"));
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

#[tokio::test(flavor = "multi_thread")]
async fn a_probe_that_reaches_a_different_node_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let first = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let impostor = start_agent(&first.url(), "gpu-1", &dir.path().join("a1"));
    wait_for_state(&first.url(), &["gpu-1"], NodeState::Online, START_DEADLINE).await;

    // The prober itself: the agent answers, but as another node.
    let expected = NodeId::parse("node_id", "gpu-ghost").unwrap();
    let outcome = probe(&impostor.url(), &expected, Duration::from_secs(2)).await;
    assert_eq!(
        outcome,
        ProbeOutcome::WrongNode {
            answered: "gpu-1".to_owned()
        }
    );
    let real = NodeId::parse("node_id", "gpu-1").unwrap();
    assert!(matches!(
        probe(&impostor.url(), &real, Duration::from_secs(2)).await,
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

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_is_committed_before_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let (_stream, generation) =
        RawStream::register(&coordinator.url(), "gpu-9", "http://127.0.0.1:9", "b").await;
    coordinator.process.kill();

    let stored = Store::open(&db).await.unwrap().load_nodes().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].registration.node_id.as_str(), "gpu-9");
    assert_eq!(stored[0].generation, generation);
}
