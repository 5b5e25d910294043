//! Failure detection and age-out: killed, hung and gracefully stopped agents.

mod common;

use std::time::Duration;

use common::*;
use muster::proto::NodeState;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_goes_offline_when_its_stream_ends_and_then_expires() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    // offline-after is long, so OFFLINE can only come from the stream ending.
    let timing = timing("200ms", "60s", "2s");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &timing);
    let url = coordinator.url();
    let doomed = start_agent(&url, "gpu-doomed", &dir.path().join("a1"));
    let _survivor = start_agent(&url, "gpu-survivor", &dir.path().join("a2"));
    wait_for_state(
        &url,
        &["gpu-doomed", "gpu-survivor"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;

    doomed.kill();
    let offline = wait_for_state(
        &url,
        &["gpu-doomed"],
        NodeState::Offline,
        Duration::from_secs(5),
    )
    .await;
    assert!(offline[0].offline_since.is_some());

    wait_for("gpu-doomed to expire", Duration::from_secs(10), || async {
        let nodes = list_nodes(&url).await?;
        (!nodes.iter().any(|n| n.node_id == "gpu-doomed")).then_some(())
    })
    .await;
    let mut client = coordinator.client().await;
    let missing = client
        .get_node(muster::proto::GetNodeRequest {
            node_id: "gpu-doomed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let ids = stored_node_ids(&db).await;
    assert_eq!(
        ids,
        ["gpu-survivor"],
        "the expired row is gone from the table"
    );
    assert_eq!(
        state_of(&node(&url, "gpu-survivor").await.unwrap()),
        NodeState::Online
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_agent_goes_offline_after_offline_after_and_returns_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let agent = start_agent(&url, "gpu-hung", &dir.path().join("a1"));
    let online = wait_for_state(&url, &["gpu-hung"], NodeState::Online, START_DEADLINE).await;

    agent.signal(Signal::SIGSTOP);
    wait_for_state(
        &url,
        &["gpu-hung"],
        NodeState::Offline,
        Duration::from_secs(5),
    )
    .await;
    agent.signal(Signal::SIGCONT);
    let back = wait_for_state(
        &url,
        &["gpu-hung"],
        NodeState::Online,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        back[0].boot_id, online[0].boot_id,
        "the same agent process came back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_node_expires_even_across_coordinator_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let timing = timing("200ms", "1s", "3s");
    let first = Coordinator::start(&db, "127.0.0.1:0", &timing);
    let (stream, _) =
        RawStream::register(&first.url(), "gpu-gone", "http://127.0.0.1:9", "b").await;
    drop(stream);
    wait_for_state(
        &first.url(),
        &["gpu-gone"],
        NodeState::Offline,
        START_DEADLINE,
    )
    .await;
    first.process.kill();

    let second = Coordinator::start(&db, "127.0.0.1:0", &timing);
    wait_for(
        "gpu-gone to expire after the restart",
        Duration::from_secs(10),
        || async {
            let nodes = list_nodes(&second.url()).await?;
            nodes.is_empty().then_some(())
        },
    )
    .await;
    assert!(stored_node_ids(&db).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_both_processes_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let timing = timing("200ms", "60s", "24h");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &timing);
    let url = coordinator.url();
    let agent = start_agent(&url, "gpu-1", &dir.path().join("a1"));
    wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;

    let status = agent.stop_with(Signal::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "agent exit: {status:?}");
    wait_for_state(&url, &["gpu-1"], NodeState::Offline, Duration::from_secs(5)).await;

    let status = coordinator
        .process
        .stop_with(Signal::SIGINT, Duration::from_secs(10));
    assert!(status.success(), "coordinator exit: {status:?}");
    assert_eq!(stored_node_ids(&db).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_stopped_with_agents_connected_exits_cleanly_and_marks_no_node_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let db = coordinator.db.clone();

    let status = coordinator
        .process
        .stop_with(Signal::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "coordinator exit: {status:?}");

    let store = muster::store::Store::open(&db).await.unwrap();
    let rows = store.load_nodes().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].offline_since, None,
        "a shutdown is not evidence that a node died"
    );
}
