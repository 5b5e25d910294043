//! VRAM leases through real processes: agents report `file:` inventories,
//! and the Pool service grants, renews, revokes and releases leases as the
//! nodes come and go. Leases survive a SIGKILL of the coordinator; a killed
//! agent's leases are SUSPENDED, then RELEASED after the orphan grace; a
//! leaving agent's are RELEASED at once; a drained node takes no new lease;
//! bad input is refused naming the field.

mod common;

use std::{path::Path, time::Duration};

use common::*;
use muster::proto::{self, LeaseState, NodeState, pool_client::PoolClient};
use nix::sys::signal::Signal;
use serde_json::json;
use tonic::{Code, transport::Channel};

const GPU_MIB: u64 = 10_000;

fn gpu_file(dir: &Path, node_id: &str) -> String {
    let path = dir.join(format!("{node_id}-gpus.json"));
    let gpus = json!([{
        "index": 0,
        "uuid": format!("GPU-{node_id}-0"),
        "name": "NVIDIA A100-80G",
        "memory_total_mib": GPU_MIB,
        "memory_used_mib": 0,
    }]);
    std::fs::write(&path, serde_json::to_vec(&gpus).unwrap()).unwrap();
    format!("file:{}", path.display())
}

fn start_gpu_agent(url: &str, node_id: &str, dir: &Path) -> Process {
    let source = gpu_file(dir, node_id);
    start_agent_with(url, node_id, &dir.join(node_id), &["--gpu-source", &source])
}

async fn pool(url: &str) -> PoolClient<Channel> {
    PoolClient::new(channel(url).await)
}

fn seconds(secs: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(secs).unwrap(),
        nanos: 0,
    })
}

fn request(request_id: &str, mb: u64) -> proto::AcquireLeaseRequest {
    proto::AcquireLeaseRequest {
        request_id: request_id.to_owned(),
        holder: "trainer".to_owned(),
        mb,
        ttl: seconds(60),
        // The pool learns a new node's GPUs within a tenth of a second.
        wait: seconds(10),
        ..proto::AcquireLeaseRequest::default()
    }
}

async fn acquire(
    url: &str,
    request: proto::AcquireLeaseRequest,
) -> Result<proto::Lease, tonic::Status> {
    pool(url)
        .await
        .acquire_lease(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn lease(url: &str, lease_id: &str) -> Option<proto::Lease> {
    let listed = pool(url)
        .await
        .list_leases(proto::ListLeasesRequest::default())
        .await
        .ok()?
        .into_inner();
    listed.leases.into_iter().find(|l| l.lease_id == lease_id)
}

async fn wait_for_lease_state(
    url: &str,
    lease_id: &str,
    state: LeaseState,
    deadline: Duration,
) -> proto::Lease {
    wait_for(&format!("{lease_id} to be {state:?}"), deadline, || async {
        lease(url, lease_id)
            .await
            .filter(|l| l.state == state as i32)
    })
    .await
}

fn assert_refused(result: Result<proto::Lease, tonic::Status>, code: Code, names: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(names),
        "the message names {names:?}: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_drains_and_expiry_are_answered_with_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let _a = start_gpu_agent(&url, "node-a", dir.path());
    let _b = start_gpu_agent(&url, "node-b", dir.path());
    wait_for_state(
        &url,
        &["node-a", "node-b"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;

    let first = acquire(&url, request("first", 1_000))
        .await
        .expect("granted");
    assert_eq!(
        first.node_id, "node-a",
        "best fit breaks the tie by node id"
    );
    assert_eq!(first.state, LeaseState::Active as i32);
    let again = acquire(&url, request("first", 1_000))
        .await
        .expect("same lease");
    assert_eq!(
        again.lease_id, first.lease_id,
        "request_id is an idempotency key"
    );

    assert_refused(
        acquire(&url, request("first", 2_000)).await,
        Code::AlreadyExists,
        "mb",
    );
    assert_refused(
        acquire(&url, request("zero", 0)).await,
        Code::InvalidArgument,
        "mb",
    );
    let short = proto::AcquireLeaseRequest {
        ttl: seconds(1),
        ..request("short", 10)
    };
    assert_refused(acquire(&url, short).await, Code::InvalidArgument, "ttl");
    let forever = proto::AcquireLeaseRequest {
        ttl: None,
        ..request("forever", 10)
    };
    assert_refused(acquire(&url, forever).await, Code::InvalidArgument, "ttl");
    let nowhere = proto::AcquireLeaseRequest {
        node_id: "node-z".to_owned(),
        ..request("nowhere", 10)
    };
    assert_refused(
        acquire(&url, nowhere).await,
        Code::InvalidArgument,
        "node_id",
    );
    let no_gpu = proto::AcquireLeaseRequest {
        gpu_uuid: "GPU-none".to_owned(),
        ..request("no-gpu", 10)
    };
    assert_refused(
        acquire(&url, no_gpu).await,
        Code::InvalidArgument,
        "gpu_uuid",
    );
    let malformed = proto::AcquireLeaseRequest {
        label_selector: "zone=a,,".to_owned(),
        ..request("malformed", 10)
    };
    assert_refused(
        acquire(&url, malformed).await,
        Code::InvalidArgument,
        "label_selector",
    );
    let too_big = proto::AcquireLeaseRequest {
        wait: None,
        ..request("too-big", GPU_MIB + 1)
    };
    assert_refused(acquire(&url, too_big).await, Code::ResourceExhausted, "MiB");

    // A drained node takes no new lease, even when it fits best.
    let mut client = coordinator.client().await;
    client
        .drain_node(proto::DrainNodeRequest {
            node_id: "node-a".to_owned(),
            reason: "test".to_owned(),
        })
        .await
        .expect("drained");
    let pinned = proto::AcquireLeaseRequest {
        node_id: "node-a".to_owned(),
        wait: None,
        ..request("pinned", 10)
    };
    assert_refused(
        acquire(&url, pinned).await,
        Code::ResourceExhausted,
        "undrained",
    );
    let elsewhere = acquire(&url, request("elsewhere", 1_000))
        .await
        .expect("granted");
    assert_eq!(
        elsewhere.node_id, "node-b",
        "node-a fits best but is drained"
    );

    // A lease not renewed within its TTL is released; renewing it then
    // fails, saying so.
    let brief = proto::AcquireLeaseRequest {
        ttl: seconds(5),
        ..request("brief", 10)
    };
    let brief = acquire(&url, brief).await.expect("granted");
    let renewed = pool(&url)
        .await
        .renew_lease(proto::RenewLeaseRequest {
            lease_id: brief.lease_id.clone(),
        })
        .await
        .expect("renewed while alive")
        .into_inner();
    assert!(renewed.expires_at.unwrap().seconds >= brief.expires_at.unwrap().seconds);
    let expired = wait_for_lease_state(
        &url,
        &brief.lease_id,
        LeaseState::Released,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(expired.release_reason, "expired");
    let status = pool(&url)
        .await
        .renew_lease(proto::RenewLeaseRequest {
            lease_id: brief.lease_id.clone(),
        })
        .await
        .expect_err("expired");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("expired"), "{}", status.message());

    let released = pool(&url)
        .await
        .release_lease(proto::ReleaseLeaseRequest {
            lease_id: first.lease_id.clone(),
        })
        .await
        .expect("released")
        .into_inner();
    assert_eq!(released.lease.unwrap().state, LeaseState::Released as i32);
    pool(&url)
        .await
        .release_lease(proto::ReleaseLeaseRequest {
            lease_id: "lease-never".to_owned(),
        })
        .await
        .expect("releasing an unknown lease is fine");
}

async fn leases_survive_a_sigkill_of_the_coordinator_and_generations_keep_rising(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database) = backend.database(
        dir.path(),
        "leases::leases_survive_a_sigkill_of_the_coordinator_and_generations_keep_rising",
    ) else {
        return;
    };
    let db = database.db.clone();
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let address = url.trim_start_matches("http://").to_owned();
    let _agent = start_gpu_agent(&url, "node-a", dir.path());
    wait_for_state(&url, &["node-a"], NodeState::Online, START_DEADLINE).await;
    let held = acquire(&url, request("held", 4_000))
        .await
        .expect("granted");
    let released = acquire(&url, request("released", 1_000))
        .await
        .expect("granted");
    pool(&url)
        .await
        .release_lease(proto::ReleaseLeaseRequest {
            lease_id: released.lease_id.clone(),
        })
        .await
        .expect("released");

    coordinator.process.kill();
    let coordinator = Coordinator::restart(&db, &address, FAST_TIMING);
    let url = coordinator.url();
    let kept = wait_for_lease_state(&url, &held.lease_id, LeaseState::Active, START_DEADLINE).await;
    assert_eq!(kept.generation, held.generation);
    assert_eq!(kept.node_id, "node-a");
    assert_eq!(kept.mb, 4_000);
    // The held memory is still counted: what is left is all a lease can get.
    let rest = acquire(&url, request("rest", GPU_MIB - 4_000))
        .await
        .expect("granted");
    assert!(
        rest.generation > released.generation,
        "generations never go back: {} after {}",
        rest.generation,
        released.generation
    );
    let none_left = proto::AcquireLeaseRequest {
        wait: None,
        ..request("none-left", 1)
    };
    assert_refused(
        acquire(&url, none_left).await,
        Code::ResourceExhausted,
        "MiB",
    );
    let again = acquire(&url, request("held", 4_000))
        .await
        .expect("same lease");
    assert_eq!(
        again.lease_id, held.lease_id,
        "idempotency survives the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_suspends_its_leases_then_they_are_released_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = FAST_TIMING.to_vec();
    extra.extend(["--lease-orphan-grace", "2s"]);
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let mut agent = start_gpu_agent(&url, "node-a", dir.path());
    wait_for_state(&url, &["node-a"], NodeState::Online, START_DEADLINE).await;
    let held = acquire(&url, request("held", 4_000))
        .await
        .expect("granted");

    agent.kill();
    wait_for_lease_state(&url, &held.lease_id, LeaseState::Suspended, START_DEADLINE).await;
    let released =
        wait_for_lease_state(&url, &held.lease_id, LeaseState::Released, START_DEADLINE).await;
    assert!(
        released.release_reason.contains("orphan grace"),
        "{}",
        released.release_reason
    );
}

/// Runs `muster leases ARGS --coordinator URL --output json`, returning
/// its parsed stdout, or its stderr if it failed.
fn leases_cli(url: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_muster"))
        .arg("leases")
        .args(args)
        .args(["--coordinator", url, "--output", "json"])
        .output()
        .expect("run muster leases");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).expect("JSON on stdout"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_agent_releases_its_leases_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let agent = start_gpu_agent(&url, "node-a", dir.path());
    wait_for_state(&url, &["node-a"], NodeState::Online, START_DEADLINE).await;
    // Through the command line, as an operator would.
    let acquired = leases_cli(
        &url,
        &[
            "acquire", "--holder", "cli", "--mb", "4000", "--ttl", "1m", "--wait", "10s",
        ],
    )
    .expect("acquired");
    let lease_id = acquired[0]["lease_id"]
        .as_str()
        .expect("a lease id")
        .to_owned();
    assert_eq!(acquired[0]["state"], "ACTIVE");
    assert_eq!(acquired[0]["node_id"], "node-a");
    let renewed = leases_cli(&url, &["renew", &lease_id]).expect("renewed");
    assert_eq!(renewed[0]["lease_id"], lease_id.as_str());
    let refused = leases_cli(
        &url,
        &["acquire", "--holder", "cli", "--mb", "0", "--ttl", "1m"],
    )
    .expect_err("mb 0 is refused");
    assert!(refused.contains("mb"), "{refused}");
    let held = lease(&url, &lease_id).await.expect("listed");

    agent.stop_with(Signal::SIGTERM, START_DEADLINE);
    let released = wait_for_lease_state(
        &url,
        &held.lease_id,
        LeaseState::Released,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        released.release_reason.contains("left"),
        "{}",
        released.release_reason
    );
    let listed =
        leases_cli(&url, &["list", "--state", "released", "--holder", "cli"]).expect("listed");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["state"], "RELEASED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_request_revokes_a_lower_one_and_its_holder_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = FAST_TIMING.to_vec();
    extra.extend(["--revoke-grace", "30s"]);
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let _agent = start_gpu_agent(&url, "node-a", dir.path());
    wait_for_state(&url, &["node-a"], NodeState::Online, START_DEADLINE).await;
    let low = acquire(&url, request("low", 8_000)).await.expect("granted");

    let urgent = proto::AcquireLeaseRequest {
        priority: 10,
        wait: seconds(20),
        ..request("urgent", 8_000)
    };
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { acquire(&url, urgent).await }
    });
    let revoked =
        wait_for_lease_state(&url, &low.lease_id, LeaseState::Revoked, START_DEADLINE).await;
    assert_eq!(revoked.generation, low.generation);
    assert!(
        !waiting.is_finished(),
        "the memory is not free until the holder lets go"
    );
    // Its holder sees the revocation and lets go long before the grace ends.
    pool(&url)
        .await
        .release_lease(proto::ReleaseLeaseRequest {
            lease_id: low.lease_id.clone(),
        })
        .await
        .expect("released");
    let granted = waiting
        .await
        .unwrap()
        .expect("granted once the memory is free");
    assert_eq!(granted.node_id, "node-a");
    assert!(granted.generation > low.generation);

    let equal = proto::AcquireLeaseRequest {
        priority: 10,
        wait: seconds(1),
        ..request("equal", 8_000)
    };
    assert_refused(
        acquire(&url, equal).await,
        Code::ResourceExhausted,
        "priority below 10",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_its_holder_keeps_is_freed_by_the_revoke_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = FAST_TIMING.to_vec();
    extra.extend(["--revoke-grace", "1s"]);
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &extra);
    let url = coordinator.url();
    let _agent = start_gpu_agent(&url, "node-a", dir.path());
    wait_for_state(&url, &["node-a"], NodeState::Online, START_DEADLINE).await;
    let low = acquire(&url, request("low", 8_000)).await.expect("granted");

    let urgent = proto::AcquireLeaseRequest {
        priority: 1,
        wait: seconds(30),
        ..request("urgent", 8_000)
    };
    let granted = acquire(&url, urgent)
        .await
        .expect("granted when the grace ends");
    assert_eq!(granted.node_id, "node-a");
    let freed = lease(&url, &low.lease_id).await.expect("still listed");
    assert_eq!(freed.state, LeaseState::Released as i32);
    assert!(
        freed.release_reason.contains("grace"),
        "{}",
        freed.release_reason
    );
    let status = pool(&url)
        .await
        .renew_lease(proto::RenewLeaseRequest {
            lease_id: low.lease_id.clone(),
        })
        .await
        .expect_err("a freed lease cannot be renewed");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

// The scenario across a restart, on SQLite and on PostgreSQL.
on_every_backend!(leases_survive_a_sigkill_of_the_coordinator_and_generations_keep_rising);
