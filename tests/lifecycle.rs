//! Drain and graceful leave through real processes: `muster nodes drain`
//! and `undrain` against a coordinator that is restarted in between, and
//! agents stopped with SIGTERM (they leave) or SIGKILL (they vanish).

mod common;

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::*;
use muster::proto::NodeState;
use nix::sys::signal::Signal;

/// An agent stopped with SIGTERM must be shown LEFT within this.
const LEAVE_DEADLINE: Duration = Duration::from_secs(2);
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn muster<S: AsRef<std::ffi::OsStr>>(coordinator_url: &str, args: &[S]) -> Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(args)
            .args(["--coordinator", coordinator_url]),
        START_DEADLINE,
    )
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).unwrap()
}

async fn a_drain_shows_in_list_and_get_survives_a_restart_and_undrain_clears_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "lifecycle::a_drain_shows_in_list_and_get_survives_a_restart_and_undrain_clears_it",
    ) else {
        return;
    };
    let mut coordinator = Coordinator::start(&database.db, "127.0.0.1:0", FAST_TIMING);
    let _agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("gpu-1"));
    wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;
    let url = coordinator.url();

    let drained = json(&muster(
        &url,
        &[
            "nodes",
            "drain",
            "gpu-1",
            "--reason",
            "fan replacement",
            "--output",
            "json",
        ],
    ));
    assert_eq!(drained["drained"], true);
    assert_eq!(drained["drain_reason"], "fan replacement");
    assert_eq!(drained["state"], "ONLINE", "a drained node stays a member");
    let drained_at = drained["drained_at"].as_str().unwrap().to_owned();

    let table = stdout(&muster(&url, &["nodes", "list"]));
    let header = table.lines().next().unwrap();
    let row = table.lines().nth(1).unwrap();
    assert!(header.ends_with("DRAINED"), "{table}");
    assert!(
        row.starts_with("gpu-1  ONLINE") && row.ends_with("\"fan replacement\""),
        "{table}"
    );

    // Draining again replaces the reason and keeps the moment.
    let again = json(&muster(
        &url,
        &[
            "nodes", "drain", "gpu-1", "--reason", "RMA 1234", "--output", "json",
        ],
    ));
    assert_eq!(again["drain_reason"], "RMA 1234");
    assert_eq!(again["drained_at"], drained_at.as_str());

    // Reasons that would garble a terminal, and unknown nodes, are refused.
    one_line_error(
        &muster(&url, &["nodes", "drain", "gpu-1", "--reason", "a\nb"]),
        "control characters",
    );
    one_line_error(
        &muster(&url, &["nodes", "drain", "gpu-1", "--reason", ""]),
        "reason",
    );
    one_line_error(
        &muster(&url, &["nodes", "drain", "nope", "--reason", "x"]),
        "NotFound",
    );
    one_line_error(&muster(&url, &["nodes", "undrain", "nope"]), "NotFound");

    // The drain is durable: a coordinator killed at once still has it.
    let listen = coordinator.process.address.to_string();
    let db = coordinator.db.clone();
    coordinator.process.kill();
    coordinator = Coordinator::restart(&db, &listen, FAST_TIMING);
    let url = coordinator.url();
    wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;
    let after = json(&muster(
        &url,
        &["nodes", "get", "gpu-1", "--output", "json"],
    ));
    assert_eq!(after["drained"], true, "{after}");
    assert_eq!(after["drain_reason"], "RMA 1234");
    assert_eq!(after["drained_at"], drained_at.as_str());
    let table = stdout(&muster(&url, &["nodes", "get", "gpu-1"]));
    assert!(table.contains("\"RMA 1234\""), "{table}");

    let undrained = json(&muster(
        &url,
        &["nodes", "undrain", "gpu-1", "--output", "json"],
    ));
    assert_eq!(undrained["drained"], false);
    assert!(undrained["drain_reason"].is_null());
    let listed = json(&muster(&url, &["nodes", "list", "--output", "json"]));
    assert_eq!(listed[0]["drained"], false);
    let table = stdout(&muster(&url, &["nodes", "list"]));
    assert!(table.lines().nth(1).unwrap().ends_with('-'), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_and_undrain_require_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let token_file = token_file.display().to_string();
    let coordinator = Coordinator::start(
        &dir.path().join("muster.db"),
        "127.0.0.1:0",
        &[FAST_TIMING, &["--admin-token-file", &token_file]].concat(),
    );
    let _agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("gpu-1"));
    let url = coordinator.url();
    let get = ["nodes", "get", "gpu-1", "--output", "json"];
    let with_token = |args: &[&str]| -> Vec<String> {
        args.iter()
            .copied()
            .chain(["--admin-token-file", token_file.as_str()])
            .map(str::to_owned)
            .collect()
    };
    wait_for("gpu-1 to register", START_DEADLINE, || {
        let found = muster(&url, &with_token(&get)).status.success();
        async move { found.then_some(()) }
    })
    .await;

    let drain = ["nodes", "drain", "gpu-1", "--reason", "maintenance"];
    one_line_error(&muster(&url, &drain), "--admin-token-file");
    one_line_error(
        &muster(&url, &["nodes", "undrain", "gpu-1"]),
        "--admin-token-file",
    );
    let node = json(&muster(&url, &with_token(&get)));
    assert_eq!(node["drained"], false, "a refused drain changed nothing");

    stdout(&muster(&url, &with_token(&drain)));
    assert_eq!(json(&muster(&url, &with_token(&get)))["drained"], true);
    stdout(&muster(&url, &with_token(&["nodes", "undrain", "gpu-1"])));
    assert_eq!(json(&muster(&url, &with_token(&get)))["drained"], false);
}

/// Waits until `node_id` is gone, asserting at every poll that it is LEFT
/// while it is still listed; how long it took.
async fn wait_for_left_node_to_expire(url: &str, node_id: &str, deadline: Duration) -> Duration {
    let started = Instant::now();
    wait_for(&format!("{node_id} to expire"), deadline, || async move {
        let nodes = list_nodes(url).await?;
        match nodes.iter().find(|n| n.node_id == node_id) {
            Some(node) => {
                assert_eq!(state_of(node), NodeState::Left, "{node:?}");
                None
            }
            None => Some(()),
        }
    })
    .await;
    started.elapsed()
}

fn start_leaving_agent(url: &str, dir: &Path) -> Process {
    start_agent(url, "gpu-1", &dir.join("gpu-1"))
}

async fn an_agent_stopped_with_sigterm_leaves_and_its_node_expires_from_then(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "lifecycle::an_agent_stopped_with_sigterm_leaves_and_its_node_expires_from_then",
    ) else {
        return;
    };
    let expire = ["--expire-after", "6s"];
    let extra = [FAST_TIMING, &expire].concat();
    let mut coordinator = Coordinator::start(&database.db, "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let agent = start_leaving_agent(&url, dir.path());
    let online = wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;

    let signalled = Instant::now();
    let status = agent.stop_with(Signal::SIGTERM, LEAVE_DEADLINE + Duration::from_secs(3));
    assert!(status.success(), "{status:?}");
    let left = wait_for_state(&url, &["gpu-1"], NodeState::Left, LEAVE_DEADLINE).await;
    eprintln!("LEFT {:?} after SIGTERM", signalled.elapsed());
    assert!(left[0].offline_since.is_some(), "{left:?}");
    assert_eq!(left[0].session_generation, online[0].session_generation);
    assert!(coordinator.process.log_contains("node left"));

    // LEFT is durable and reloads LEFT: not UNKNOWN, not probed, not OFFLINE.
    let listen = coordinator.process.address.to_string();
    let db = coordinator.db.clone();
    coordinator.process.kill();
    coordinator = Coordinator::restart(&db, &listen, &extra);
    let url = coordinator.url();
    let reloaded = wait_for(
        "the restarted coordinator to answer",
        START_DEADLINE,
        || list_nodes(&url),
    )
    .await;
    assert_eq!(state_of(&reloaded[0]), NodeState::Left, "{reloaded:?}");
    let millis = |t: Option<prost_types::Timestamp>| {
        let t = t.expect("offline_since");
        t.seconds * 1000 + i64::from(t.nanos / 1_000_000)
    };
    assert_eq!(
        millis(reloaded[0].offline_since),
        millis(left[0].offline_since),
        "stored to the millisecond"
    );

    // Expires like OFFLINE, counted from when it left, and is LEFT until then.
    let waited = wait_for_left_node_to_expire(&url, "gpu-1", Duration::from_secs(20)).await;
    let since_left = signalled.elapsed();
    assert!(
        since_left >= Duration::from_secs(6),
        "expired {since_left:?} after leaving"
    );
    eprintln!("expired {waited:?} after the restart, {since_left:?} after leaving");

    // The same agent started again registers as usual.
    let _again = start_leaving_agent(&url, dir.path());
    let back = wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;
    assert!(back[0].offline_since.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restarted_after_leaving_is_online_and_a_sigkilled_one_is_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let url = coordinator.url();
    agent.stop_with(Signal::SIGINT, LEAVE_DEADLINE + Duration::from_secs(3));
    wait_for_state(&url, &["gpu-1"], NodeState::Left, LEAVE_DEADLINE).await;

    let mut agent = start_leaving_agent(&url, dir.path());
    let back = wait_for_state(&url, &["gpu-1"], NodeState::Online, START_DEADLINE).await;
    assert!(back[0].offline_since.is_none(), "{back:?}");

    agent.kill();
    let offline = wait_for_state(&url, &["gpu-1"], NodeState::Offline, START_DEADLINE).await;
    assert!(offline[0].offline_since.is_some());
    assert!(
        !agent.log_contains("left the fleet"),
        "a SIGKILLed agent says nothing"
    );
}

// The scenarios across a restart, on SQLite and on PostgreSQL.
on_every_backend!(
    a_drain_shows_in_list_and_get_survives_a_restart_and_undrain_clears_it,
    an_agent_stopped_with_sigterm_leaves_and_its_node_expires_from_then,
);
