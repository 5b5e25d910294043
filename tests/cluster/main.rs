//! The cluster of `docker-compose.yml` in real containers, each with its own
//! address: coordinator restarts, the loss of an agent, a network partition
//! and expiry, asserted on what `ListNodes` reports.
//!
//! The image is `FROM scratch` around a statically linked binary that this
//! test builds with `scripts/cluster.sh static`, the very build
//! `scripts/cluster.sh up` runs, so the two share it; no image registry is
//! needed. Without a Docker engine and compose the test prints a `SKIPPED`
//! line, unless `CI=true`, where it fails. Every run has its own compose
//! project, network, volumes and image tag, all removed at the end whatever
//! happens, and no fixed host port: the coordinator is published on a free
//! loopback port that the test looks up, and queried there with
//! `muster nodes list`, which answers in milliseconds where a `docker exec`
//! takes a good part of a second.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod commands;
mod nodes;
mod scenarios;

use std::time::{Duration, Instant};

use cluster::Cluster;
use commands::{build_static_binary, docker_compose};
use nodes::all_online;

const AGENTS: [&str; 3] = ["agent-1", "agent-2", "agent-3"];
const OFFLINE_AFTER: Duration = Duration::from_secs(3);
const EXPIRE_AFTER: Duration = Duration::from_secs(15);

/// Fast timings for the cluster, through the compose file's variables.
fn timings() -> [(&'static str, String); 6] {
    let text = |duration| humantime::format_duration(duration).to_string();
    [
        ("MUSTER_HEARTBEAT_INTERVAL", "500ms".to_owned()),
        ("MUSTER_OFFLINE_AFTER", text(OFFLINE_AFTER)),
        ("MUSTER_EXPIRE_AFTER", text(EXPIRE_AFTER)),
        ("MUSTER_PROBE_TIMEOUT", "1s".to_owned()),
        ("MUSTER_MAX_BACKOFF", "1s".to_owned()),
        ("MUSTER_HEALTHCHECK_INTERVAL", "1s".to_owned()),
    ]
}

const BACK_ONLINE_WITHIN: Duration = Duration::from_secs(10);
const LOST_AGENT_OFFLINE_WITHIN: Duration = Duration::from_secs(2);
const PARTITION_OFFLINE_WITHIN: Duration = Duration::from_secs(OFFLINE_AFTER.as_secs() + 2);
const START_DEADLINE: Duration = Duration::from_secs(90);
const BUILD_DEADLINE: Duration = Duration::from_secs(45 * 60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);
const QUERY_DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

#[test]
fn cluster_survives_restarts_node_loss_and_partitions() {
    let Some(compose) = docker_compose() else {
        return;
    };
    let started = Instant::now();
    let build_time = build_static_binary();
    let mut cluster = Cluster::new(compose);
    let image_time = cluster.build_image();
    let image_size = cluster.image_size();
    cluster.up();

    let all_up = cluster.wait_for("all agents ONLINE", START_DEADLINE, |nodes| {
        all_online(nodes, &AGENTS)
    });
    cluster.wait_healthy();
    cluster.check_name_resolution();
    let agents = cluster.agent_containers();

    let restart = cluster.coordinator_comes_back(&agents, &all_up, |cluster| {
        cluster.compose(&["restart", "coordinator"]);
    });
    let kill_and_start = cluster.coordinator_comes_back(&agents, &all_up, |cluster| {
        cluster.compose(&["kill", "-s", "KILL", "coordinator"]);
        cluster.compose(&["start", "coordinator"]);
    });
    let (node_loss, lost_agent_offline) = cluster.agent_lost();
    let (partition_offline, partition_online) = cluster.agent_partitioned(&agents);
    let expiry = cluster.lost_agent_expires(lost_agent_offline);

    let summary = format!(
        "cluster test: all five scenarios passed in {:.0?} (static build {:.0?}, image {:.1?}, \
         {:.1} MB); ONLINE again {:.1?} after a coordinator restart and {:.1?} after kill+start; \
         lost agent OFFLINE after {:.1?}; partitioned agent OFFLINE after {:.1?}, ONLINE {:.1?} \
         after reconnecting; expired {:.1?} after going offline",
        started.elapsed(),
        build_time,
        image_time,
        image_size as f64 / 1e6,
        restart,
        kill_and_start,
        node_loss,
        partition_offline,
        partition_online,
        expiry,
    );
    drop(cluster);
    common::say(&summary);
}
