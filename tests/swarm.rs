//! The swarm simulator against a real coordinator: a small simulated fleet
//! registers, then the coordinator is SIGKILLed and restarted on the same
//! port and database, and every node is ONLINE again without ever being
//! shown OFFLINE. Correctness only; `bench/run.sh` measures speed.

mod common;

use std::{cell::RefCell, time::Duration};

use common::*;
use muster::{
    coordinator::{ProbeCredentials, ProbeOutcome, probe},
    node::NodeId,
    proto::NodeState,
};

const AGENTS: usize = 200;
/// Generous: two cores may be running other test binaries meanwhile.
const FLEET_DEADLINE: Duration = Duration::from_secs(60);
/// Longer than offline-after in [`FAST_TIMING`]: a node only probed and
/// never re-registered would be OFFLINE by then.
const WATCH_AFTER_RECOVERY: Duration = Duration::from_secs(4);

/// Waits until all [`AGENTS`] nodes are ONLINE, failing if any is ever
/// shown OFFLINE meanwhile.
async fn all_online_none_ever_offline(url: &str, what: &str) {
    let broken = RefCell::new(None);
    let broken_ref = &broken;
    wait_for(what, FLEET_DEADLINE, || async move {
        let nodes = list_nodes(url).await?;
        if let Err(why) = none_offline(&nodes) {
            broken_ref.borrow_mut().get_or_insert(why);
        }
        let online = nodes
            .iter()
            .filter(|n| state_of(n) == NodeState::Online)
            .count();
        (online == AGENTS).then_some(())
    })
    .await;
    assert_eq!(broken.into_inner(), None, "{what}");
}

async fn a_swarm_registers_and_survives_a_killed_coordinator_with_no_node_offline(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "swarm::a_swarm_registers_and_survives_a_killed_coordinator_with_no_node_offline",
    ) else {
        return;
    };
    let db = database.db.clone();
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let _swarm = start_swarm(&coordinator.url(), AGENTS);
    all_online_none_ever_offline(&coordinator.url(), "every simulated agent ONLINE").await;
    let before = list_nodes(&coordinator.url()).await.unwrap();

    let listen = coordinator.process.address.to_string();
    coordinator.process.kill();
    coordinator = Coordinator::restart(&db, &listen, FAST_TIMING);
    let url = coordinator.url();
    all_online_none_ever_offline(&url, "every node ONLINE after the restart").await;
    hold_none_offline(&url, WATCH_AFTER_RECOVERY).await;

    let after = list_nodes(&url).await.unwrap();
    assert_eq!(after.len(), AGENTS);
    for (node, old) in after.iter().zip(&before) {
        assert_eq!(node.node_id, old.node_id);
        assert_eq!(node.boot_id, old.boot_id, "the same simulated agent");
        assert!(
            node.session_generation > old.session_generation,
            "{} did not register again on its own",
            node.node_id
        );
    }
}

on_every_backend!(a_swarm_registers_and_survives_a_killed_coordinator_with_no_node_offline);

#[tokio::test(flavor = "multi_thread")]
async fn each_simulated_agent_answers_probes_as_itself_and_reports_its_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let _swarm = start_swarm_with(&coordinator.url(), 3, &["--gpus-per-agent", "8"]);
    let nodes = wait_for("three simulated agents", FLEET_DEADLINE, || async {
        let nodes = list_nodes(&coordinator.url()).await?;
        (nodes.len() == 3).then_some(nodes)
    })
    .await;
    let uuids: std::collections::BTreeSet<&str> = nodes
        .iter()
        .flat_map(|node| &node.gpus)
        .map(|gpu| gpu.uuid.as_str())
        .collect();
    assert_eq!(uuids.len(), 3 * 8, "8 GPUs each, uuids unique in the fleet");
    assert!(
        nodes
            .iter()
            .flat_map(|node| &node.gpus)
            .all(|gpu| gpu.healthy && gpu.memory_used_mib <= gpu.memory_total_mib)
    );
    let timeout = Duration::from_secs(5);
    for (node, other) in nodes.iter().zip(nodes.iter().cycle().skip(1)) {
        let id = NodeId::parse("node_id", &node.node_id).unwrap();
        assert_eq!(
            probe(&node.agent_url, &id, timeout, ProbeCredentials::default()).await,
            ProbeOutcome::Alive {
                boot_id: node.boot_id.clone()
            }
        );
        assert_eq!(
            probe(&other.agent_url, &id, timeout, ProbeCredentials::default()).await,
            ProbeOutcome::WrongNode {
                answered: other.node_id.clone()
            }
        );
    }
    let port = nodes[0].agent_url.rsplit(':').next().unwrap();
    let nobody = NodeId::parse("node_id", "nobody").unwrap();
    assert!(matches!(
        probe(
            &format!("http://127.1.2.3:{port}"),
            &nobody,
            timeout,
            ProbeCredentials::default()
        )
        .await,
        ProbeOutcome::Unreachable { .. }
    ));
}

/// 1,500 agents with 64 GPUs each make a node list of about 5 MB, past
/// tonic's default limit of 4 MiB for a reply (10,000 agents with 8 GPUs
/// make 5.4 MB): the CLI reads it whole.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_lists_a_fleet_whose_list_is_larger_than_a_grpc_default_reply() {
    const LARGE_FLEET: usize = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let _swarm = start_swarm_with(&url, LARGE_FLEET, &["--gpus-per-agent", "64"]);
    let size = wait_for("every agent with its GPUs", FLEET_DEADLINE, || async {
        let nodes = list_nodes(&url).await?;
        (nodes.len() == LARGE_FLEET && nodes.iter().all(|node| node.gpus.len() == 64)).then(|| {
            prost::Message::encoded_len(&muster::proto::ListNodesResponse {
                nodes,
                ..Default::default()
            })
        })
    })
    .await;
    assert!(size > 4 * 1024 * 1024, "the list is {size} bytes");

    let url_for_cli = url.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_muster"));
        command
            .args([
                "nodes",
                "list",
                "--output",
                "json",
                "--coordinator",
                &url_for_cli,
            ])
            .env("MUSTER_LOG", "warn");
        output_within(&mut command, FLEET_DEADLINE)
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(nodes.len(), LARGE_FLEET);
    assert!(
        nodes
            .iter()
            .all(|node| node["gpus"].as_array().map(Vec::len) == Some(64)),
        "every node with its 64 GPUs"
    );
}
