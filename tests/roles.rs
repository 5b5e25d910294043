//! A coordinator's role, on the single-coordinator database (SQLite): it
//! leads at epoch 0, says so on every response, success or error, of every
//! service, and reports each health name.

mod common;

use std::time::Duration;

use common::{Coordinator, RawStream, channel, register_message, wait_for};
use muster::proto::{self, GetNodeRequest, ListNodesRequest};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ROLE: &str = "x-muster-role";

fn role_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(ROLE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

async fn health(url: &str, service: &str) -> Option<(ServingStatus, Option<String>)> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = HealthClient::new(channel(url).await)
        .check(request)
        .await
        .ok()?;
    let role = role_of(response.metadata());
    Some((response.into_inner().status(), role))
}

#[tokio::test]
async fn a_single_coordinator_leads_at_epoch_zero_and_says_so_on_every_response() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &[]);
    let url = coordinator.url();
    coordinator
        .process
        .wait_for_log(0, Duration::from_secs(20), |line| {
            line.contains("coordinator role: leader").then_some(())
        })
        .await;

    for service in ["", "muster.v1.Coordinator", "muster.v1.Coordinator.reads"] {
        let (status, role) = wait_for(
            &format!("health of {service:?} SERVING"),
            Duration::from_secs(20),
            || async {
                health(&url, service)
                    .await
                    .filter(|(status, _)| *status == ServingStatus::Serving)
            },
        )
        .await;
        assert_eq!(status, ServingStatus::Serving);
        assert_eq!(role.as_deref(), Some("leader"), "health of {service:?}");
    }

    let mut client = coordinator.client().await;
    let listed = client
        .list_nodes(ListNodesRequest {})
        .await
        .expect("ListNodes");
    assert_eq!(role_of(listed.metadata()).as_deref(), Some("leader"));

    let missing = client
        .get_node(GetNodeRequest {
            node_id: "nobody".to_owned(),
        })
        .await
        .expect_err("no such node");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(role_of(missing.metadata()).as_deref(), Some("leader"));

    let stream = RawStream::open(
        &url,
        register_message("node-a", "http://127.0.0.1:9", "boot-1"),
    )
    .await
    .expect("a leader takes Heartbeat streams");
    let mut inbound = stream.inbound;
    match inbound.message().await.expect("registered") {
        Some(proto::CoordinatorMessage {
            kind: Some(proto::coordinator_message::Kind::Registered(registered)),
        }) => assert_eq!(registered.leader_epoch, 0),
        other => panic!("expected registered, got {other:?}"),
    }
}

#[tokio::test]
async fn a_coordinator_on_its_own_database_needs_no_advertise_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(
        &dir.path().join("muster.db"),
        "0.0.0.0:0",
        &["--leader-lease", "3s"],
    );
    let line = coordinator
        .process
        .wait_for_log(0, Duration::from_secs(20), |line| {
            line.contains("coordinator listening")
                .then(|| line.to_owned())
        })
        .await;
    assert!(
        line.contains("advertise_url=http://127.0.0.1:"),
        "a loopback URL stands in for an unspecified address: {line}"
    );
}
