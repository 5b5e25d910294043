//! The mass-expiry guard, through real processes: while more than half of
//! the fleet is down at once, no node expires; the pause shows in the log,
//! in `muster nodes list` and in the metrics, and expiry resumes once enough
//! of the fleet is back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use muster::proto::{self, NodeState};

const EXPIRE_AFTER: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(3);

fn expiry_paused_gauge(address: &str) -> Option<f64> {
    scrape(address).lines().find_map(|line| {
        line.strip_prefix("muster_expiry_paused ")?
            .trim()
            .parse()
            .ok()
    })
}

async fn list(url: &str) -> proto::ListNodesResponse {
    connect(url)
        .await
        .expect("connect")
        .list_nodes(proto::ListNodesRequest {})
        .await
        .expect("list nodes")
        .into_inner()
}

fn nodes_list_stderr(url: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["nodes", "list", "--coordinator", url])
        .output()
        .expect("run muster nodes list");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_pauses_while_most_of_the_fleet_is_down_and_resumes_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = timing("200ms", "1s", "3s").to_vec();
    extra.extend(["--metrics-listen", "127.0.0.1:0"]);
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let metrics = coordinator
        .process
        .wait_for_log(0, START_DEADLINE, |line| field(line, "metrics_address="))
        .await;
    let ids = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"];
    let mut agents: Vec<Process> = ids
        .iter()
        .map(|id| start_agent(&url, id, &dir.path().join(id)))
        .collect();
    wait_for_state(&url, &ids, NodeState::Online, START_DEADLINE).await;
    assert_eq!(list(&url).await.expiry_paused, None);

    // Three of four go down at once.
    for agent in &mut agents[1..] {
        agent.kill();
    }
    let down_since = Instant::now();
    let logged = coordinator.process.log_len();
    wait_for_state(&url, &ids[1..], NodeState::Offline, START_DEADLINE).await;
    coordinator
        .process
        .wait_for_log(logged, MARGIN, |line| {
            line.contains("expiry paused").then_some(())
        })
        .await;
    let paused = list(&url)
        .await
        .expiry_paused
        .expect("ListNodes says expiry is paused");
    assert_eq!((paused.nodes_down, paused.nodes_known), (3, 4));
    assert!(nodes_list_stderr(&url).contains("expiry is paused: 3 of 4 nodes"));
    assert_eq!(expiry_paused_gauge(&metrics), Some(1.0));

    // Well past expire-after, every node is still there.
    hold_for(
        "no node expired while the guard holds",
        EXPIRE_AFTER + MARGIN,
        || async {
            let listed = list_nodes(&url)
                .await
                .ok_or("the coordinator stopped answering")?;
            (listed.len() == ids.len())
                .then_some(())
                .ok_or_else(|| format!("{} nodes left", listed.len()))
        },
    )
    .await;
    assert!(down_since.elapsed() > EXPIRE_AFTER + MARGIN);

    // One comes back: two of four down is not more than half.
    let logged = coordinator.process.log_len();
    agents[1] = start_agent(&url, ids[1], &dir.path().join(ids[1]));
    wait_for("the two dead nodes to expire", START_DEADLINE, || async {
        let listed = list_nodes(&url).await?;
        let mut left: Vec<_> = listed.iter().map(|n| n.node_id.as_str()).collect();
        left.sort_unstable();
        (left == ["gpu-0", "gpu-1"]).then_some(())
    })
    .await;
    coordinator
        .process
        .wait_for_log(logged, MARGIN, |line| {
            line.contains("expiry resumed").then_some(())
        })
        .await;
    assert_eq!(list(&url).await.expiry_paused, None);
    assert!(!nodes_list_stderr(&url).contains("expiry is paused"));
    assert_eq!(expiry_paused_gauge(&metrics), Some(0.0));
    assert_eq!(coordinator.process.log_count(&["expiry paused"]), 1);
    assert_eq!(coordinator.process.log_count(&["expiry resumed"]), 1);
}
