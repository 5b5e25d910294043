//! Agents and the CLI among several coordinators, through real processes:
//! a real coordinator, and in the test a small gRPC server that plays a
//! standby (refusing with UNAVAILABLE and `x-muster-leader`) or a leader
//! that a newer one has deposed (an older `leader_epoch`). An agent follows
//! a hint at once, skips a coordinator it cannot reach, ignores a hint to a
//! URL outside its list and refuses a deposed leader; the CLI reads from
//! whichever coordinator answers, sends writes to the leader a standby
//! names, and moves a watch on to the next coordinator when its own dies.

mod common;

use std::{
    net::SocketAddr,
    pin::Pin,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use muster::{
    failover::LEADER_METADATA,
    proto::{
        self, CoordinatorMessage, NodeState, coordinator_message,
        coordinator_server::{Coordinator as CoordinatorService, CoordinatorServer},
    },
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

/// Far below the agent's default `--max-backoff` (30 s): reaching the
/// leader within it shows that no backoff was waited out.
const QUICKLY: Duration = Duration::from_secs(8);
const CLI_DEADLINE: Duration = Duration::from_secs(20);

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How the fake coordinator answers.
enum Role {
    /// Refuses every call with UNAVAILABLE, naming `leader`.
    Standby { leader: String },
    /// Registers the agent at the epoch of `epochs` for each stream in turn
    /// (the last one for every later stream), and ends a stream with
    /// UNAVAILABLE after `heartbeats_per_stream` heartbeats, except on the
    /// last.
    Epochs {
        epochs: Vec<u64>,
        heartbeats_per_stream: u64,
    },
}

/// What one Heartbeat stream of the fake saw.
#[derive(Debug, Clone, Default)]
struct StreamSeen {
    epoch: u64,
    heartbeats: u64,
    /// The agent ended the stream (or its connection).
    closed_by_agent: bool,
}

#[derive(Default)]
struct Seen {
    calls: Vec<&'static str>,
    streams: Vec<StreamSeen>,
}

#[derive(Clone)]
struct Fake {
    role: Arc<Role>,
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    fn called(&self, method: &'static str) -> Result<(), Status> {
        self.seen.lock().unwrap().calls.push(method);
        match &*self.role {
            Role::Standby { leader } => {
                let mut refusal = Status::unavailable("this coordinator is a standby");
                refusal.metadata_mut().insert(
                    LEADER_METADATA,
                    MetadataValue::try_from(leader.as_str()).unwrap(),
                );
                Err(refusal)
            }
            Role::Epochs { .. } => Ok(()),
        }
    }

    fn calls(&self, method: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.calls.iter().filter(|call| **call == method).count()
    }

    fn streams(&self) -> Vec<StreamSeen> {
        self.seen.lock().unwrap().streams.clone()
    }
}

fn not_played<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not played by this fake"))
}

#[tonic::async_trait]
impl CoordinatorService for Fake {
    type HeartbeatStream = Events<CoordinatorMessage>;
    type WatchNodesStream = Events<proto::NodeEvent>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        self.called("Heartbeat")?;
        let Role::Epochs {
            epochs,
            heartbeats_per_stream,
        } = &*self.role
        else {
            unreachable!("a standby refused above");
        };
        let mut inbound = request.into_inner();
        let index = {
            let mut seen = self.seen.lock().unwrap();
            let index = seen.streams.len();
            let epoch = epochs[index.min(epochs.len() - 1)];
            seen.streams.push(StreamSeen {
                epoch,
                ..StreamSeen::default()
            });
            index
        };
        let epoch = self.seen.lock().unwrap().streams[index].epoch;
        let last = index + 1 >= epochs.len();
        let limit = *heartbeats_per_stream;
        let seen = self.seen.clone();
        let (outbound, receiver) = mpsc::channel(8);
        tokio::spawn(async move {
            let registered = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Registered(proto::Registered {
                    coordinator_boot_id: "fake".to_owned(),
                    session_generation: index as u64 + 1,
                    heartbeat_interval: Some(Duration::from_millis(100).try_into().unwrap()),
                    leader_epoch: epoch,
                })),
            };
            if outbound.send(Ok(registered)).await.is_err() {
                return;
            }
            loop {
                match inbound.next().await {
                    Some(Ok(proto::AgentMessage {
                        kind: Some(proto::agent_message::Kind::Heartbeat(heartbeat)),
                    })) => {
                        let count = {
                            let mut seen = seen.lock().unwrap();
                            seen.streams[index].heartbeats += 1;
                            seen.streams[index].heartbeats
                        };
                        let ack = CoordinatorMessage {
                            kind: Some(coordinator_message::Kind::Ack(proto::Ack {
                                sequence: heartbeat.sequence,
                                heartbeat_interval: None,
                            })),
                        };
                        if outbound.send(Ok(ack)).await.is_err() {
                            return;
                        }
                        if !last && count >= limit {
                            let _ = outbound
                                .send(Err(Status::unavailable("stepping down")))
                                .await;
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => {
                        seen.lock().unwrap().streams[index].closed_by_agent = true;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_nodes(
        &self,
        _: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        self.called("ListNodes")?;
        not_played()
    }

    async fn get_node(
        &self,
        _: Request<proto::GetNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        self.called("GetNode")?;
        not_played()
    }

    async fn remove_node(
        &self,
        _: Request<proto::RemoveNodeRequest>,
    ) -> Result<Response<proto::RemoveNodeResponse>, Status> {
        self.called("RemoveNode")?;
        not_played()
    }

    async fn drain_node(
        &self,
        _: Request<proto::DrainNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        self.called("DrainNode")?;
        not_played()
    }

    async fn undrain_node(
        &self,
        _: Request<proto::UndrainNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        self.called("UndrainNode")?;
        not_played()
    }

    async fn watch_nodes(
        &self,
        _: Request<proto::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        self.called("WatchNodes")?;
        not_played()
    }
}

/// A fake coordinator serving on an ephemeral loopback port until dropped.
struct FakeServer {
    fake: Fake,
    address: SocketAddr,
    stop: CancellationToken,
}

impl FakeServer {
    async fn start(role: Role) -> Self {
        let fake = Fake {
            role: Arc::new(role),
            seen: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(fake.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        Self {
            fake,
            address,
            stop,
        }
    }

    async fn standby(leader: &str) -> Self {
        Self::start(Role::Standby {
            leader: leader.to_owned(),
        })
        .await
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A loopback URL nothing listens on: a port bound, then let go.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn start_coordinator(dir: &std::path::Path) -> Coordinator {
    Coordinator::start(&dir.join("muster.db"), "127.0.0.1:0", FAST_TIMING)
}

/// Runs `muster ARGS` on a blocking thread, so the fake servers of this
/// runtime keep answering.
async fn muster(args: &[String]) -> std::process::Output {
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
        command.args(&args).env("MUSTER_LOG", "warn");
        output_within(&mut command, CLI_DEADLINE)
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_a_standbys_hint_to_the_leader_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let leader = start_coordinator(dir.path());
    let standby = FakeServer::standby(&leader.url()).await;
    let dead = dead_url();
    // Were the hint ignored, the agent would try the dead URL next.
    let list = format!("{},{dead},{}", standby.url(), leader.url());
    let agent = start_agent(&list, "follower", &dir.path().join("agent"));
    wait_for_state(&leader.url(), &["follower"], NodeState::Online, QUICKLY).await;

    assert!(standby.fake.calls("Heartbeat") >= 1);
    let switch = agent
        .log_lines()
        .into_iter()
        .find(|line| line.contains("switching coordinator now"))
        .expect("the agent logged its switch");
    assert_eq!(field(&switch, "from=").unwrap(), standby.url(), "{switch}");
    assert_eq!(field(&switch, "to=").unwrap(), leader.url(), "{switch}");
    assert!(switch.contains("a standby named the leader"), "{switch}");
    assert!(
        !agent.log_contains(&format!("to={dead}")),
        "the agent dialled the dead URL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_tries_the_next_url_when_the_first_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path());
    let dead = dead_url();
    let list = format!("{dead},{}", coordinator.url());
    let agent = start_agent(&list, "skipper", &dir.path().join("agent"));
    wait_for_state(&coordinator.url(), &["skipper"], NodeState::Online, QUICKLY).await;
    let switch = agent
        .log_lines()
        .into_iter()
        .find(|line| line.contains("switching coordinator"))
        .expect("the agent logged its switch");
    assert_eq!(field(&switch, "from=").unwrap(), dead, "{switch}");
    assert_eq!(
        field(&switch, "to=").unwrap(),
        coordinator.url(),
        "{switch}"
    );
    assert!(switch.contains("no leader hint"), "{switch}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_does_not_follow_a_hint_outside_its_list() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = start_coordinator(dir.path());
    let standby = FakeServer::standby(&elsewhere.url()).await;
    let agent = start_agent(&standby.url(), "loyal", &dir.path().join("agent"));
    agent
        .wait_for_log(0, QUICKLY, |line| {
            line.contains("not following a leader hint").then_some(())
        })
        .await;
    let ignored = agent
        .log_lines()
        .into_iter()
        .find(|line| line.contains("not following a leader hint"))
        .unwrap();
    assert_eq!(field(&ignored, "hint=").unwrap(), elsewhere.url());
    // The agent keeps to its own list: after a second refusal it still has
    // not registered with the coordinator the hint named.
    wait_for("a second refusal", QUICKLY, || async {
        (standby.fake.calls("Heartbeat") >= 2).then_some(())
    })
    .await;
    assert_eq!(list_nodes(&elsewhere.url()).await, Some(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_leader_older_than_one_it_has_seen() {
    let dir = tempfile::tempdir().unwrap();
    // Registered at epoch 7, then the stream fails; the next stream is
    // registered at epoch 3, by a deposed leader; the one after at 9.
    let fake = FakeServer::start(Role::Epochs {
        epochs: vec![7, 3, 9],
        heartbeats_per_stream: 2,
    })
    .await;
    let agent = start_agent(&fake.url(), "fenced", &dir.path().join("agent"));
    let streams = wait_for("heartbeats under epoch 9", QUICKLY * 2, || {
        let streams = fake.fake.streams();
        let settled = streams.len() >= 3 && streams[2].heartbeats >= 2;
        async move { settled.then_some(streams) }
    })
    .await;
    assert_eq!(streams[0].epoch, 7);
    assert!(streams[0].heartbeats >= 2, "{streams:?}");
    let deposed = &streams[1];
    assert_eq!(deposed.epoch, 3);
    assert_eq!(deposed.heartbeats, 0, "{streams:?}");
    assert!(deposed.closed_by_agent, "{streams:?}");
    assert_eq!(streams[2].epoch, 9);
    assert!(
        agent.log_contains("a deposed leader"),
        "the agent did not say why it hung up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_from_the_first_coordinator_that_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "listed").await;
    let dead = dead_url();
    let list = format!("{dead},{}", coordinator.url());
    let output = muster(&strings(&[
        "nodes",
        "list",
        "--output",
        "json",
        "--coordinator",
        &list,
    ]))
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let nodes: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(nodes[0]["node_id"], "listed", "{nodes}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&dead) && stderr.contains(&format!("asking {}", coordinator.url())),
        "{stderr}"
    );

    // A standby answers reads for itself in the real thing; this fake
    // refuses them, so the read moves on without following its hint.
    let standby = FakeServer::standby(&coordinator.url()).await;
    let list = format!("{},{}", standby.url(), coordinator.url());
    let output = muster(&strings(&["nodes", "list", "--coordinator", &list])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("listed"));
    assert!(text(&output.stderr).contains("no leader hint"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_write_follows_the_standbys_hint_to_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _agent) = coordinator_with_agent(dir.path(), "drained").await;
    let standby = FakeServer::standby(&coordinator.url()).await;
    let dead = dead_url();
    let list = format!("{},{dead},{}", standby.url(), coordinator.url());
    let output = muster(&strings(&[
        "nodes",
        "drain",
        "drained",
        "--reason",
        "maintenance",
        "--coordinator",
        &list,
    ]))
    .await;
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(standby.fake.calls("DrainNode"), 1);
    assert!(stderr.contains("a standby named the leader"), "{stderr}");
    assert!(!stderr.contains(&dead), "{stderr}");
    let drained = node(&coordinator.url(), "drained").await.unwrap();
    assert!(drained.drained);
    assert_eq!(drained.drain_reason, "maintenance");

    // With the standby alone, the write fails and says where the leader is.
    let output = muster(&strings(&[
        "nodes",
        "undrain",
        "drained",
        "--coordinator",
        &standby.url(),
    ]))
    .await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("the leader is {}", coordinator.url())),
        "{stderr}"
    );
    assert!(node(&coordinator.url(), "drained").await.unwrap().drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_coordinator_list_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().display().to_string();
    for list in [
        "http://127.0.0.1:7700,",
        "http://127.0.0.1:7700,,http://127.0.0.1:7701",
        "http://127.0.0.1:7700,http://127.0.0.1:7700/",
        "http://127.0.0.1:7700,127.0.0.1:7701",
    ] {
        for command in [
            strings(&["nodes", "list", "--coordinator", list]),
            strings(&[
                "agent",
                "--coordinator",
                list,
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                &state_dir,
            ]),
            strings(&["swarm", "--coordinator", list, "--agents", "1"]),
        ] {
            let output = muster(&command).await;
            assert!(!output.status.success(), "{command:?}");
            let stderr = text(&output.stderr);
            assert!(stderr.contains("--coordinator"), "{command:?}: {stderr}");
        }
    }
}

/// Node ids that `muster nodes watch --output json` printed to `out`.
fn watched_nodes(out: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|event| event["node"]["node_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_moves_on_to_the_next_coordinator_when_its_own_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first_dir).unwrap();
    std::fs::create_dir_all(&second_dir).unwrap();
    let (mut first, _first_agent) = coordinator_with_agent(&first_dir, "on-first").await;
    // Its own database, unlike real standbys: its first bookmark tells the
    // watch so, and the watch lists the fleet again from revision 0.
    let second = Coordinator::start(
        &second_dir.join("muster.db"),
        "127.0.0.1:0",
        &[FAST_TIMING, &["--watch-bookmark-interval", "200ms"]].concat(),
    );
    let _second_agent = start_agent(&second.url(), "on-second", &second_dir.join("agent"));
    wait_for_state(&second.url(), &["on-second"], NodeState::Online, QUICKLY).await;
    let out = dir.path().join("watch.json");
    let list = format!("{},{}", first.url(), second.url());
    let mut watch = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["nodes", "watch", "--output", "json", "--coordinator", &list])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("stderr")).unwrap())
        .spawn()
        .expect("spawn muster nodes watch");
    wait_for("the first coordinator's node", QUICKLY, || {
        let seen = watched_nodes(&out).contains(&"on-first".to_owned());
        async move { seen.then_some(()) }
    })
    .await;
    assert!(!watched_nodes(&out).contains(&"on-second".to_owned()));

    first.process.kill();
    wait_for("the second coordinator's node", QUICKLY, || {
        let seen = watched_nodes(&out).contains(&"on-second".to_owned());
        async move { seen.then_some(()) }
    })
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    let stderr = std::fs::read_to_string(out.with_extension("stderr")).unwrap();
    assert!(
        stderr.contains(&format!("from {}", second.url())),
        "{stderr}"
    );
}
