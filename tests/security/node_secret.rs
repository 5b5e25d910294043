//! A node id belongs to the node secret that first claimed it, until an
//! operator removes the node.

use std::path::Path;

use muster::proto::{self, NodeState};
use nix::sys::signal::Signal;
use tonic::Code;

use crate::{REFUSAL_WINDOW, caller::Caller, common::*, steps::*};

const ANOTHER_SECRET: &str = "another-secret-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn a_node_id_belongs_to_the_secret_that_first_claimed_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let flags = fast_timing_and(&["--metrics-listen", "127.0.0.1:0"]);
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &flags);
    let url = coordinator.url();
    let metrics_address = coordinator
        .process
        .wait_for_log(0, START_DEADLINE, |line| field(line, "metrics_address="))
        .await;
    let first = start_agent(&url, "gpu-1", &dir.path().join("first"));
    let held = Caller::default().wait_online(&url, "gpu-1").await;

    a_stream_with_another_secret_is_refused(&url).await;
    let second = start_agent(&url, "gpu-1", &dir.path().join("second"));
    a_second_agent_is_refused_and_changes_nothing(&url, &second, &held).await;
    refusals_are_counted_and_logged(&coordinator, &metrics_address);
    drop(second);

    drop(first);
    let restarted = start_agent(&url, "gpu-1", &dir.path().join("first"));
    let after_restart = the_same_secret_with_a_new_boot_is_admitted(&url, &held).await;
    restarted.stop_with(Signal::SIGTERM, START_DEADLINE);
    a_removed_id_can_be_claimed_afresh(&url, &db, &after_restart).await;
    removing_a_missing_or_invalid_id_is_a_one_line_error(&url);
}

fn register_with(node_id: &str, agent_url: &str, secret: &str) -> proto::AgentMessage {
    let mut message = register_message(node_id, agent_url, "boot");
    if let Some(proto::agent_message::Kind::Register(register)) = &mut message.kind {
        register.node_secret = secret.to_owned();
    }
    message
}

async fn a_stream_with_another_secret_is_refused(url: &str) {
    let refused = Caller::default()
        .refused(
            url,
            register_with("gpu-1", "http://127.0.0.1:9", ANOTHER_SECRET),
        )
        .await;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("gpu-1") && refused.message().contains("node secret"),
        "{refused:?}"
    );
}

/// A whole second agent claiming the id from another state dir is told why,
/// and the first agent keeps the node, its session and its boot.
async fn a_second_agent_is_refused_and_changes_nothing(
    url: &str,
    second: &Process,
    held: &proto::Node,
) {
    wait_for_line(second, &["holds this node id for another machine"]).await;
    hold_for("the first agent keeps gpu-1", REFUSAL_WINDOW, || async {
        let node = node(url, "gpu-1").await.ok_or("gpu-1 missing")?;
        if state_of(&node) == NodeState::Online
            && node.session_generation == held.session_generation
            && node.boot_id == held.boot_id
        {
            Ok(())
        } else {
            Err(format!("gpu-1 changed: {node:?}"))
        }
    })
    .await;
}

fn refusals_are_counted_and_logged(coordinator: &Coordinator, metrics_address: &str) {
    let refusals = metric(
        &scrape(metrics_address),
        "muster_registrations_refused_total{reason=\"node_secret\"}",
    );
    assert!(refusals.is_some_and(|n| n >= 2.0), "{refusals:?}");
    assert!(
        coordinator
            .process
            .log_contains("the node id is held by another node secret"),
        "the refusal is logged"
    );
}

/// The same secret with a new boot is the agent restarting: admitted, with a
/// higher generation.
async fn the_same_secret_with_a_new_boot_is_admitted(url: &str, held: &proto::Node) -> proto::Node {
    let after_restart = wait_for("gpu-1 back with a new boot", START_DEADLINE, || async {
        node(url, "gpu-1")
            .await
            .filter(|n| state_of(n) == NodeState::Online && n.boot_id != held.boot_id)
    })
    .await;
    assert!(after_restart.session_generation > held.session_generation);
    after_restart
}

async fn a_removed_id_can_be_claimed_afresh(url: &str, db: &Path, last: &proto::Node) {
    let removed = muster(&["nodes", "remove", "gpu-1", "--coordinator", url], &[]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(stored_node_ids(db).await.is_empty());
    let (_stream, generation) = Caller::default()
        .register(
            url,
            register_with("gpu-1", "http://127.0.0.1:9", ANOTHER_SECRET),
        )
        .await
        .expect("a removed id can be claimed afresh");
    assert!(generation > last.session_generation);
}

fn removing_a_missing_or_invalid_id_is_a_one_line_error(url: &str) {
    let missing = muster(&["nodes", "remove", "nope", "--coordinator", url], &[]);
    one_line_error(&missing, "NotFound");
    let invalid = muster(&["nodes", "remove", "Not An Id", "--coordinator", url], &[]);
    one_line_error(&invalid, "InvalidArgument");
}
