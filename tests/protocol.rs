//! The Heartbeat stream contract: what is refused, with which status, and
//! that an older session never overwrites a newer one.

mod common;

use std::time::Duration;

use common::*;
use muster::proto::{self, NodeState, coordinator_message};
use tonic::Code;

async fn refusal(url: &str, messages: Vec<proto::AgentMessage>) -> tonic::Status {
    let mut messages = messages.into_iter();
    let first = messages.next().expect("at least one message");
    let mut stream = match RawStream::open(url, first).await {
        Err(status) => return status,
        Ok(stream) => stream,
    };
    for message in messages {
        let _ = stream.outbound.send(message).await;
    }
    loop {
        match stream.next().await {
            Err(status) => return status,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_streams_are_refused_with_a_clear_status_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = InProcessCoordinator::start(&db, FAST_TIMING).await;
    let url = coordinator.url();
    let agent_url = "http://127.0.0.1:9";

    let status = refusal(&url, vec![heartbeat_message(1)]).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("must be register"), "{status:?}");

    let status = refusal(&url, vec![proto::AgentMessage { kind: None }]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let status = refusal(&url, vec![register_message("Bad Id", agent_url, "b")]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("register.node_id"), "{status:?}");

    let status = refusal(&url, vec![register_message("gpu-1", "not a url", "b")]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("register.agent_url"),
        "{status:?}"
    );

    assert_eq!(
        list_nodes(&url).await.unwrap(),
        vec![],
        "no node was admitted"
    );
    assert!(stored_node_ids(&db).await.is_empty(), "no row was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_register_or_a_sequence_going_backwards_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = InProcessCoordinator::start(&dir.path().join("muster.db"), FAST_TIMING).await;
    let url = coordinator.url();

    let (mut stream, _) = RawStream::register(&url, "gpu-1", "http://127.0.0.1:9", "b1").await;
    stream
        .send(register_message("gpu-1", "http://127.0.0.1:9", "b1"))
        .await;
    let status = stream.next().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("only once"), "{status:?}");

    let (mut stream, _) = RawStream::register(&url, "gpu-2", "http://127.0.0.1:9", "b1").await;
    stream.send(heartbeat_message(5)).await;
    assert!(matches!(
        stream.next().await.unwrap().unwrap().kind,
        Some(coordinator_message::Kind::Ack(proto::Ack {
            sequence: 5,
            heartbeat_interval: None
        }))
    ));
    stream.send(heartbeat_message(5)).await;
    let status = stream.next().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("heartbeat.sequence"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_session_cannot_overwrite_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = InProcessCoordinator::start(&dir.path().join("muster.db"), FAST_TIMING).await;
    let url = coordinator.url();

    let (mut old, old_generation) =
        RawStream::register(&url, "gpu-1", "http://127.0.0.1:9", "boot-old").await;
    let (mut new, new_generation) =
        RawStream::register(&url, "gpu-1", "http://127.0.0.1:9", "boot-new").await;
    assert!(new_generation > old_generation);

    old.send(heartbeat_message(1)).await;
    let status = old.next().await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("superseded"), "{status:?}");
    drop(old);

    // The old stream's end must not take the node OFFLINE, now or at any
    // later sweep.
    let url_ref = url.as_str();
    hold_for(
        "the newer session's node ONLINE",
        Duration::from_secs(1),
        || async move {
            let node = node(url_ref, "gpu-1").await.ok_or("gpu-1 vanished")?;
            match state_of(&node) {
                NodeState::Online if node.boot_id == "boot-new" => Ok(()),
                _ => Err(format!("{node:?}")),
            }
        },
    )
    .await;

    new.send(heartbeat_message(1)).await;
    assert!(
        new.next().await.unwrap().is_some(),
        "the newer session is still acknowledged"
    );
    let node = node(&url, "gpu-1").await.unwrap();
    assert_eq!(state_of(&node), NodeState::Online);
    assert_eq!(node.boot_id, "boot-new");
    assert_eq!(node.session_generation, new_generation);

    drop(new);
    let node = wait_for_state(&url, &["gpu-1"], NodeState::Offline, START_DEADLINE).await;
    assert_eq!(node[0].boot_id, "boot-new");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_node_answers_not_found_and_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = InProcessCoordinator::start(&dir.path().join("muster.db"), FAST_TIMING).await;
    let mut client = coordinator.client().await;
    let missing = client
        .get_node(proto::GetNodeRequest {
            node_id: "absent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("absent"));
    let invalid = client
        .get_node(proto::GetNodeRequest {
            node_id: "NOT valid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_stream_that_goes_quiet_is_closed_and_its_node_offline() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(
        &dir.path().join("muster.db"),
        "127.0.0.1:0",
        &timing("200ms", "1s", "24h"),
    );
    let (mut quiet, _) =
        RawStream::register(&coordinator.url(), "gpu-quiet", "http://127.0.0.1:9", "b").await;
    let status = quiet.next().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("no heartbeat"), "{status:?}");
    let node = node(&coordinator.url(), "gpu-quiet").await.unwrap();
    assert_eq!(state_of(&node), NodeState::Offline);
}

/// The `registered` or `ack` interval a coordinator message carries.
fn interval_in(message: Option<proto::CoordinatorMessage>) -> Option<Duration> {
    let interval = match message?.kind? {
        coordinator_message::Kind::Registered(registered) => registered.heartbeat_interval,
        coordinator_message::Kind::Ack(ack) => ack.heartbeat_interval,
        coordinator_message::Kind::Left(_) => None,
    };
    Duration::try_from(interval?).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_growing_fleet_is_given_longer_intervals_over_its_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    // One heartbeat per second allows one node at 1s, two at 2s.
    let flags = [
        "--heartbeat-interval",
        "1s",
        "--offline-after",
        "3s",
        "--max-heartbeats-per-second",
        "1",
    ];
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &flags);
    let url = coordinator.url();
    let mut first = RawStream::open(&url, register_message("gpu-1", "http://127.0.0.1:9", "b1"))
        .await
        .unwrap();
    assert_eq!(
        interval_in(first.next().await.unwrap()),
        Some(Duration::from_secs(1))
    );
    let mut second = RawStream::open(&url, register_message("gpu-2", "http://127.0.0.1:9", "b2"))
        .await
        .unwrap();
    assert_eq!(
        interval_in(second.next().await.unwrap()),
        Some(Duration::from_secs(2))
    );

    first.send(heartbeat_message(1)).await;
    assert_eq!(
        interval_in(first.next().await.unwrap()),
        Some(Duration::from_secs(2)),
        "the earlier node is told on its next ack"
    );
    first.send(heartbeat_message(2)).await;
    assert_eq!(interval_in(first.next().await.unwrap()), None, "told once");
}
