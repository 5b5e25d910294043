//! Failure detection and age-out: killed, hung and gracefully stopped agents.
//!
//! Deadlines here are the documented bound plus a margin for a loaded
//! two-core machine; each test is arranged so that only the mechanism under
//! test can produce the state it waits for.

mod common;

use std::time::Duration;

use common::*;
use muster::{proto::NodeState, store::Store};
use nix::sys::signal::Signal;

/// Added to every documented bound, for scheduling delays under load.
const MARGIN: Duration = Duration::from_secs(2);

async fn wait_until_no_row(db: &std::path::Path, node_id: &str) {
    wait_for(
        &format!("the row of {node_id} to be deleted"),
        MARGIN,
        || async { (!stored_node_ids(db).await.iter().any(|id| id == node_id)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_goes_offline_when_its_stream_ends_and_then_expires() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    // offline-after is a minute, so OFFLINE can only come from the stream ending.
    let expire_after = Duration::from_secs(2);
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &timing("200ms", "60s", "2s"));
    let url = coordinator.url();
    let mut doomed = start_agent(&url, "gpu-doomed", &dir.path().join("a1"));
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
        Duration::from_secs(1) + MARGIN,
    )
    .await;
    assert!(offline[0].offline_since.is_some());

    wait_for("gpu-doomed to expire", expire_after + MARGIN, || async {
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
    wait_until_no_row(&db, "gpu-doomed").await;

    assert_eq!(stored_node_ids(&db).await, ["gpu-survivor"]);
    assert_eq!(
        state_of(&node(&url, "gpu-survivor").await.unwrap()),
        NodeState::Online
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_agent_goes_offline_after_offline_after_and_returns_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let offline_after = Duration::from_secs(1);
    let coordinator = Coordinator::start(
        &dir.path().join("muster.db"),
        "127.0.0.1:0",
        &timing("200ms", "1s", "24h"),
    );
    let url = coordinator.url();
    let agent = start_agent(&url, "gpu-hung", &dir.path().join("a1"));
    let online = wait_for_state(&url, &["gpu-hung"], NodeState::Online, START_DEADLINE).await;

    agent.signal(Signal::SIGSTOP);
    wait_for_state(
        &url,
        &["gpu-hung"],
        NodeState::Offline,
        offline_after + MARGIN,
    )
    .await;
    agent.signal(Signal::SIGCONT);
    let back = wait_for_state(&url, &["gpu-hung"], NodeState::Online, START_DEADLINE).await;
    assert_eq!(
        back[0].boot_id, online[0].boot_id,
        "the same agent process came back"
    );
}

async fn expiry_counts_from_the_stored_offline_moment_across_restarts(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "liveness::expiry_counts_from_the_stored_offline_moment_across_restarts",
    ) else {
        return;
    };
    let db = database.db.clone();
    let expire_after = Duration::from_secs(6);
    let outage = Duration::from_secs(4);
    let timing = timing("200ms", "1s", "6s");
    let mut first = Coordinator::start(&db, "127.0.0.1:0", &timing);
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
    wait_for("offline_since to be stored", START_DEADLINE, || async {
        let stored = Store::open(store_database(&db))
            .await
            .ok()?
            .load_nodes()
            .await
            .ok()?;
        stored.first()?.offline_since
    })
    .await;
    first.process.kill();

    // The coordinator is down for most of expire-after. Had the restart reset
    // the clock, the node would live for all of expire-after again; counted
    // from the stored moment, it goes once the half of expire-after that a
    // restarted coordinator always measures itself has passed.
    tokio::time::sleep(outage).await;
    let second = Coordinator::start(&db, "127.0.0.1:0", &timing);
    let url = second.url();
    wait_for(
        "gpu-gone to expire soon after the restart",
        expire_after / 2 + MARGIN,
        || async { list_nodes(&url).await?.is_empty().then_some(()) },
    )
    .await;
    wait_until_no_row(&db, "gpu-gone").await;
}

on_every_backend!(expiry_counts_from_the_stored_offline_moment_across_restarts);

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_an_agent_gracefully_and_its_node_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &timing("200ms", "60s", "24h"));
    let url = coordinator.url();
    let agent = start_agent(&url, "gpu-1", &dir.path().join("a1"));
    wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;

    let status = agent.stop_with(Signal::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "agent exit: {status:?}");
    wait_for_state(&url, &["gpu-1"], NodeState::Left, MARGIN).await;

    let status = coordinator
        .process
        .stop_with(Signal::SIGINT, Duration::from_secs(10));
    assert!(status.success(), "coordinator exit: {status:?}");
    assert_eq!(stored_node_ids(&db).await, ["gpu-1"]);
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

    let rows = Store::open(&db).await.unwrap().load_nodes().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].offline_since, None,
        "a shutdown is not evidence that a node died"
    );
}

/// Opens a Health/Watch stream, which a client may keep open forever.
async fn watch_health(url: &str) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(url).await);
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    health.watch(request).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_stream_delays_shutdown_only_for_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let _watch = watch_health(&coordinator.url()).await;
    let drain_timeout = Duration::from_secs(5);
    let status = coordinator
        .process
        .stop_with(Signal::SIGTERM, drain_timeout + MARGIN * 2);
    assert!(status.success(), "coordinator exit: {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_ends_the_process_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let _watch = watch_health(&coordinator.url()).await;
    coordinator.process.signal(Signal::SIGTERM);
    coordinator
        .process
        .wait_for_log(0, MARGIN, |line| {
            line.contains("shutting down").then_some(())
        })
        .await;
    let status = coordinator.process.stop_with(Signal::SIGTERM, MARGIN);
    assert_eq!(status.code(), Some(130), "{status:?}");
}
