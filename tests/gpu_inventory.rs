//! GPU inventory through real processes: agents read `file:` inventories,
//! the coordinator shows them in ListNodes/GetNode, `muster nodes` and the
//! dashboard's `/api/nodes`, takes changes past the agent's thresholds from
//! heartbeats without a new registration (a `gpus` event; changes below them
//! write nothing), and keeps them across a SIGKILL. A malformed file, or NVML asked for on a machine without
//! a driver, refuses start-up with one line.

mod common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, SystemTime},
};

use common::*;
use muster::proto::{self, NodeState};
use serde_json::json;

/// How often the test agents read their GPU file.
const POLL_INTERVAL: &str = "100ms";

fn gpu(index: u32, used: u64) -> serde_json::Value {
    json!({
        "index": index,
        "uuid": format!("GPU-test-{index}"),
        "name": "NVIDIA A100-80G",
        "memory_total_mib": 81920,
        "memory_used_mib": used,
    })
}

/// Replaces the file at once (write, then rename), as a tool updating it
/// should, so the agent never reads half of it.
fn write_gpus(path: &Path, gpus: &serde_json::Value) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(gpus).unwrap()).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

fn start_agent_reading(url: &str, node_id: &str, dir: &Path, file: &Path) -> Process {
    let source = format!("file:{}", file.display());
    start_agent_with(
        url,
        node_id,
        &dir.join(node_id),
        &[
            "--gpu-source",
            &source,
            "--gpu-poll-interval",
            POLL_INTERVAL,
        ],
    )
}

fn metric(address: &str, name: &str) -> Option<u64> {
    scrape(address).lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

const INVENTORIES_WRITTEN: &str = "muster_store_gpu_inventories_written_total";

async fn start_coordinator(dir: &Path) -> (Coordinator, String) {
    let coordinator = Coordinator::start(&dir.join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let metrics = coordinator.http_address().to_string();
    (coordinator, metrics)
}

/// Waits until `node_id` is shown with GPU 0 using `used` MiB.
async fn wait_for_used(url: &str, node_id: &str, used: u64) -> proto::Node {
    wait_for(
        &format!("{node_id}'s GPU 0 shown using {used} MiB"),
        START_DEADLINE,
        || async {
            let node = node(url, node_id).await?;
            (node.gpus.first()?.memory_used_mib == used).then_some(node)
        },
    )
    .await
}

/// The first `gpus` event in the log: replayed from its start, it needs no
/// timing.
async fn gpus_event(url: &str) -> proto::NodeEvent {
    let mut events = connect(url)
        .await
        .unwrap()
        .watch_nodes(proto::WatchNodesRequest { since_revision: 1 })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(START_DEADLINE, async {
        loop {
            let event = events.message().await.unwrap().expect("the watch goes on");
            if event.reason == "gpus" {
                return event;
            }
        }
    })
    .await
    .expect("a gpus event")
}

fn muster_stdout(url: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(args)
        .args(["--coordinator", url])
        .output()
        .expect("run muster");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_inventory_is_shown_and_changes_past_the_threshold_arrive_on_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, metrics) = start_coordinator(dir.path()).await;
    let url = coordinator.url();
    let file = dir.path().join("gpus.json");
    write_gpus(&file, &json!([gpu(1, 1024), gpu(0, 1024)]));
    let agent = start_agent_reading(&url, "gpu-1", dir.path(), &file);

    let shown = wait_for_used(&url, "gpu-1", 1024).await;
    assert_eq!(state_of(&shown), NodeState::Online);
    let got = coordinator
        .client()
        .await
        .get_node(proto::GetNodeRequest {
            node_id: "gpu-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.gpus, shown.gpus);
    let indexes: Vec<u32> = got.gpus.iter().map(|gpu| gpu.index).collect();
    assert_eq!(indexes, [0, 1], "ordered by index");
    assert_eq!(got.gpus[1].uuid, "GPU-test-1");
    assert_eq!(got.gpus[1].memory_total_mib, 81920);
    assert!(got.gpus.iter().all(|gpu| gpu.healthy));

    let api = http(coordinator.http_address(), "GET", "/api/nodes", &[], "").await;
    let api: serde_json::Value = serde_json::from_str(&api.body).unwrap();
    let dashboard_gpus = &api["nodes"][0]["gpus"];
    assert_eq!(dashboard_gpus[1]["uuid"], "GPU-test-1", "{api}");
    assert_eq!(dashboard_gpus[1]["memory_used_mib"], 1024, "{api}");
    let table = muster_stdout(&url, &["nodes", "list"]);
    assert!(table.lines().next().unwrap().contains("GPUS"), "{table}");
    assert!(table.contains("2× A100-80G 1%"), "{table}");
    let details = muster_stdout(&url, &["nodes", "get", "gpu-1"]);
    assert!(
        details.contains("gpu 1  GPU-test-1  A100-80G  1024/81920 MiB (1%)"),
        "{details}"
    );
    let generation = got.session_generation;

    // Below the threshold: the agent reads the file, and says nothing.
    let logged = agent.log_len();
    write_gpus(&file, &json!([gpu(0, 1024 + 63), gpu(1, 1024)]));
    agent
        .wait_for_log(logged, START_DEADLINE, |line| {
            line.contains("the GPU file changed").then_some(())
        })
        .await;
    let read_at = SystemTime::now();
    // Heartbeats are due every 500 ms and writes every second: once a
    // heartbeat sent a second after the read has arrived, any inventory it
    // carried would be shown, and a batch after it would have been written.
    wait_for(
        "two seconds of heartbeats after the read",
        START_DEADLINE,
        || async {
            let node = node(&url, "gpu-1").await?;
            let seen = SystemTime::try_from(node.last_seen?).ok()?;
            (seen > read_at + Duration::from_secs(2)).then_some(())
        },
    )
    .await;
    let node_now = node(&url, "gpu-1").await.unwrap();
    assert_eq!(
        node_now.gpus[0].memory_used_mib, 1024,
        "below the threshold"
    );
    assert_eq!(
        metric(&metrics, INVENTORIES_WRITTEN),
        Some(0),
        "a change below the threshold is never written"
    );

    // Past the threshold, and a health change: shown without registering
    // again, then written in a batch.
    let mut failed = gpu(1, 1024);
    failed["healthy"] = json!(false);
    failed["unhealthy_reason"] = json!("critical Xid 79");
    write_gpus(&file, &json!([gpu(0, 1024 + 64), failed]));
    let changed = wait_for_used(&url, "gpu-1", 1024 + 64).await;
    assert_eq!(
        changed.session_generation, generation,
        "no new registration"
    );
    assert!(!changed.gpus[1].healthy);
    assert_eq!(changed.gpus[1].unhealthy_reason, "critical Xid 79");
    wait_for("the inventory written", START_DEADLINE, || async {
        (metric(&metrics, INVENTORIES_WRITTEN)? >= 1).then_some(())
    })
    .await;
    let written = gpus_event(&url).await;
    assert_eq!(written.node.unwrap().gpus, changed.gpus);
    let table = muster_stdout(&url, &["nodes", "list"]);
    assert!(table.contains("(1 unhealthy)"), "{table}");

    // A GPU gone is reported too.
    write_gpus(&file, &json!([gpu(0, 1024 + 64)]));
    wait_for("GPU 1 gone", START_DEADLINE, || async {
        (node(&url, "gpu-1").await?.gpus.len() == 1).then_some(())
    })
    .await;

    // A file broken later keeps the last good inventory, and is complained
    // about once however often it changes while broken.
    let logged = agent.log_len();
    for broken in ["[", "[{"] {
        let read_before = agent.log_count(&["the GPU file changed"]);
        std::fs::write(&file, broken).unwrap();
        wait_for("the broken file read", START_DEADLINE, || async {
            (agent.log_count(&["the GPU file changed"]) > read_before).then_some(())
        })
        .await;
    }
    write_gpus(&file, &json!([gpu(0, 1024 + 64), gpu(1, 0)]));
    agent
        .wait_for_log(logged, START_DEADLINE, |line| {
            line.contains("the GPUs can be read again").then_some(())
        })
        .await;
    assert_eq!(agent.log_count(&["cannot read the GPUs"]), 1);
    wait_for("GPU 1 back", START_DEADLINE, || async {
        (node(&url, "gpu-1").await?.gpus.len() == 2).then_some(())
    })
    .await;
}

async fn gpus_reported_on_heartbeats_survive_a_coordinator_sigkill(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "gpu_inventory::gpus_reported_on_heartbeats_survive_a_coordinator_sigkill",
    ) else {
        return;
    };
    let mut coordinator = Coordinator::start(&database.db, "127.0.0.1:0", FAST_TIMING);
    let metrics = coordinator.http_address().to_string();
    let url = coordinator.url();
    let file = dir.path().join("gpus.json");
    write_gpus(&file, &json!([gpu(0, 0)]));
    let mut agent = start_agent_reading(&url, "gpu-1", dir.path(), &file);
    wait_for_used(&url, "gpu-1", 0).await;
    write_gpus(&file, &json!([gpu(0, 40_000)]));
    wait_for_used(&url, "gpu-1", 40_000).await;
    wait_for("the inventory written", START_DEADLINE, || async {
        (metric(&metrics, INVENTORIES_WRITTEN)? >= 1).then_some(())
    })
    .await;

    // The agent dies first, so only the store can tell the GPUs again.
    agent.kill();
    let listen = coordinator.process.address.to_string();
    coordinator.process.kill();
    let coordinator = Coordinator::restart(&database.db, &listen, FAST_TIMING);
    let reloaded = node(&coordinator.url(), "gpu-1").await.expect("reloaded");
    assert_ne!(state_of(&reloaded), NodeState::Online);
    assert_eq!(reloaded.gpus.len(), 1);
    assert_eq!(reloaded.gpus[0].memory_used_mib, 40_000);
    assert_eq!(reloaded.gpus[0].uuid, "GPU-test-0");

    let _agent = start_agent_reading(&coordinator.url(), "gpu-1", dir.path(), &file);
    let back = wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await
    .remove(0);
    assert_eq!(back.gpus, reloaded.gpus);
}

on_every_backend!(gpus_reported_on_heartbeats_survive_a_coordinator_sigkill);

fn agent_command(dir: &Path, gpu_source: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
    command
        .args(["agent", "--listen", "127.0.0.1:0", "--node-id", "gpu-1"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--gpu-source", gpu_source])
        .env("MUSTER_LOG", "info");
    command
}

#[test]
fn a_malformed_gpu_file_refuses_start_up_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpus.json");
    let source = format!("file:{}", file.display());
    std::fs::write(&file, r#"[{"index": 0, "name": "A100"}]"#).unwrap();
    let output = output_within(&mut agent_command(dir.path(), &source), START_DEADLINE);
    one_line_error(&output, &source);
    one_line_error(&output, "missing field `uuid` at line 1");

    write_gpus(&file, &json!([gpu(0, 90_000)]));
    let output = output_within(&mut agent_command(dir.path(), &source), START_DEADLINE);
    one_line_error(
        &output,
        "memory_used_mib 90000 exceeds memory_total_mib 81920",
    );

    std::fs::remove_file(&file).unwrap();
    let output = output_within(&mut agent_command(dir.path(), &source), START_DEADLINE);
    one_line_error(&output, &source);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_driver_auto_reports_no_gpus_in_one_line_and_nvml_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _metrics) = start_coordinator(dir.path()).await;
    let agent = start_agent_with(
        &coordinator.url(),
        "gpu-1",
        &dir.path().join("gpu-1"),
        &["--gpu-source", "auto"],
    );
    let shown = wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await
    .remove(0);
    if agent.log_contains("reading GPUs") {
        skip(
            "the no-driver checks",
            "this machine has an NVIDIA driver, and NVML loaded",
        );
        return;
    }
    assert_eq!(agent.log_count(&["no NVIDIA driver found"]), 1);
    assert!(shown.gpus.is_empty());

    let output = output_within(&mut agent_command(dir.path(), "nvml"), START_DEADLINE);
    one_line_error(&output, "--gpu-source nvml: NVML cannot be loaded");
}
