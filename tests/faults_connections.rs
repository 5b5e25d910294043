//! Connections that never speak, through real processes: silent and
//! half-greeted connections are closed, floods beyond the connection limit
//! lock out neither agents nor operators, running out of file descriptors
//! makes the coordinator back off rather than spin, and oversized requests
//! to an agent are refused with RESOURCE_EXHAUSTED, and memory returns to
//! its level before floods once their connections have closed.

mod common;

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use muster::proto::{self, StatusResponse, agent_client::AgentClient};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;
use tonic_prost::ProstCodec;

/// The client preface and an empty SETTINGS frame: what an HTTP/2 client
/// sends before its first request.
const GREETING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// How long a test waits for a connection the server should close.
const CLOSE_DEADLINE: Duration = Duration::from_secs(15);

/// Starts a coordinator whose open-file limit, soft and hard, is `files`:
/// it raises its soft limit to its hard one, so both are lowered.
fn coordinator_with_open_files(db: &std::path::Path, files: u64, extra: &[&str]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
    command
        .args([
            "coordinator",
            "--http-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--db",
        ])
        .arg(db)
        .args(FAST_TIMING)
        .args(extra);
    // SAFETY: setrlimit is async-signal-safe, and the closure touches
    // nothing else between fork and exec.
    unsafe {
        command.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, files, files).map_err(std::io::Error::from)
        });
    }
    Process::try_spawn("coordinator", command).unwrap_or_else(|failure| panic!("{failure}"))
}

/// Opens `count` connections to `address`, each sending `greeting` first;
/// the ones the server refuses at once may come back already closed.
async fn flood(address: SocketAddr, count: usize, greeting: &[u8]) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(Ok(mut connection)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(address)).await
        else {
            continue;
        };
        if !greeting.is_empty() && connection.write_all(greeting).await.is_err() {
            continue;
        }
        connections.push(connection);
    }
    connections
}

/// Whether the server closed `connection` within `deadline`: a read that
/// returns end of file or an error. Whatever the server sent first (its
/// own SETTINGS) is read past.
async fn closed_within(connection: &mut TcpStream, deadline: Duration) -> bool {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    for _ in 0..64 {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, connection.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
    false
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which sits in parentheses; utime and
    // stime are fields 14 and 15 of the whole line.
    let after_name = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// How many files process `pid` holds open.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

/// `muster nodes list` against `url`, as an operator runs it.
fn nodes_list(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["nodes", "list", "--coordinator", url])
        .output()
        .expect("run muster nodes list")
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_send_the_preface_are_closed_within_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(
        &dir.path().join("muster.db"),
        "127.0.0.1:0",
        &["--handshake-timeout", "1s"],
    );
    let agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("agent"));
    wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        proto::NodeState::Online,
        START_DEADLINE,
    )
    .await;

    // The agent's Status port keeps the default handshake timeout (5 s).
    for (server, address) in [
        ("coordinator", coordinator.process.address),
        ("agent", agent.address),
    ] {
        let mut silent = TcpStream::connect(address).await.unwrap();
        let mut half_greeted = TcpStream::connect(address).await.unwrap();
        half_greeted.write_all(&GREETING[..10]).await.unwrap();
        let started = Instant::now();
        assert!(
            closed_within(&mut silent, CLOSE_DEADLINE).await,
            "the {server} kept a silent connection open for {CLOSE_DEADLINE:?}"
        );
        assert!(
            closed_within(&mut half_greeted, CLOSE_DEADLINE).await,
            "the {server} kept a connection that sent part of a preface open for {CLOSE_DEADLINE:?}"
        );
        eprintln!(
            "{server}: silent connections closed after {:?}",
            started.elapsed()
        );
    }

    // A real client, whose greeting comes at once, is served as before.
    let nodes = list_nodes(&coordinator.url()).await.expect("list nodes");
    assert_eq!(state_of(&nodes[0]), proto::NodeState::Online);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_connections_locks_out_neither_agents_nor_operators() {
    let dir = tempfile::tempdir().unwrap();
    // 256 open files leave room for 128 connections.
    let coordinator = coordinator_with_open_files(&dir.path().join("muster.db"), 256, &[]);
    let url = coordinator.url();
    let _first = start_agent(&url, "gpu-1", &dir.path().join("a1"));
    wait_for_state(&url, &["gpu-1"], proto::NodeState::Online, START_DEADLINE).await;

    // Connections that greet like HTTP/2 clients and then never open a
    // stream: the handshake timeout does not close them.
    let flooded = flood(coordinator.address, 400, GREETING).await;
    eprintln!("{} flood connections open", flooded.len());

    let started = Instant::now();
    let _second = start_agent(&url, "gpu-2", &dir.path().join("a2"));
    wait_for_state(&url, &["gpu-2"], proto::NodeState::Online, START_DEADLINE).await;
    let listed = nodes_list(&url);
    assert!(
        listed.status.success(),
        "nodes list failed during the flood: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let table = String::from_utf8(listed.stdout).unwrap();
    assert!(table.contains("gpu-1  ONLINE"), "{table}");
    assert!(table.contains("gpu-2  ONLINE"), "{table}");
    eprintln!(
        "registered and listed during the flood in {:?}",
        started.elapsed()
    );
    let nodes = list_nodes(&url).await.expect("list nodes");
    none_offline(&nodes).unwrap();
    drop(flooded);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_file_descriptor_left_the_coordinator_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // --max-connections above what the limit allows, so that connections
    // alone run the process out of file descriptors.
    let coordinator = coordinator_with_open_files(
        &dir.path().join("muster.db"),
        160,
        &[
            "--max-connections",
            "10000",
            "--handshake-timeout",
            "60s",
            "--idle-timeout",
            "120s",
        ],
    );
    let url = coordinator.url();
    let _agent = start_agent(&url, "gpu-1", &dir.path().join("agent"));
    wait_for_state(&url, &["gpu-1"], proto::NodeState::Online, START_DEADLINE).await;
    // An operator connection made before the flood keeps being served.
    let mut operator = connect(&url).await.unwrap();
    operator
        .list_nodes(proto::ListNodesRequest {})
        .await
        .unwrap();

    let backing_off = "cannot accept connections";
    let flooded = flood(coordinator.address, 250, b"").await;
    coordinator
        .wait_for_log(0, START_DEADLINE, |line| {
            line.contains(backing_off).then_some(())
        })
        .await;

    let window = Duration::from_secs(3);
    let before = cpu_ticks(coordinator.pid());
    tokio::time::sleep(window).await;
    let spent = cpu_ticks(coordinator.pid()) - before;
    // Clock ticks are 1/100 s on Linux; a spinning accept loop spends the
    // whole window, 300 ticks.
    assert!(
        spent < 60,
        "the coordinator spent {spent} ticks of CPU in {window:?} while out of file descriptors"
    );
    let nodes = operator
        .list_nodes(proto::ListNodesRequest {})
        .await
        .expect("an open operator connection is still served")
        .into_inner()
        .nodes;
    none_offline(&nodes).unwrap();
    assert_eq!(coordinator.log_count(&[backing_off]), 1);

    drop(flooded);
    coordinator
        .wait_for_log(0, START_DEADLINE, |line| {
            line.contains("accepting connections again").then_some(())
        })
        .await;
    let nodes = wait_for("a new operator connection", START_DEADLINE, || {
        list_nodes(&url)
    })
    .await;
    none_offline(&nodes).unwrap();
    assert_eq!(coordinator.log_count(&[backing_off]), 1);
}

/// A request message with one large field: over the 64 KiB limit, and
/// otherwise read as an empty StatusRequest.
#[derive(Clone, PartialEq, prost::Message)]
struct PaddedStatusRequest {
    #[prost(bytes = "vec", tag = "15")]
    padding: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_status_request_is_refused_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, agent) = coordinator_with_agent(dir.path(), "gpu-1").await;
    let channel = channel(&agent.url()).await;

    let mut status = AgentClient::new(channel.clone());
    status
        .status(proto::StatusRequest {})
        .await
        .expect("a small request is answered");

    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let oversized = PaddedStatusRequest {
        padding: vec![7; 70 * 1024],
    };
    let refused = grpc
        .unary::<_, StatusResponse, _>(
            tonic::Request::new(oversized),
            "/muster.v1.Agent/Status".parse().unwrap(),
            ProstCodec::default(),
        )
        .await
        .expect_err("an oversized request is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("65536"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_returns_to_within_a_fifth_of_its_level_before_floods_of_connections() {
    const CONNECTIONS: usize = 1000;
    const FLOODS: usize = 3;
    const SETTLE: Duration = Duration::from_secs(30);
    const TRIMMED: &str = "returned free memory to the system";
    // This process holds every flood connection too.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", &[]);
    let address = coordinator.process.address;
    let pid = coordinator.process.pid();
    let files = open_files(pid);
    let process = &coordinator.process;

    // A flood that half greets and half stays silent, closed by its client;
    // waits until the coordinator has closed its side and trimmed.
    let flood_and_close = |round: usize| async move {
        let mut connections = flood(address, CONNECTIONS / 2, b"").await;
        connections.extend(flood(address, CONNECTIONS / 2, GREETING).await);
        assert!(
            connections.len() > CONNECTIONS * 9 / 10,
            "only {} of {CONNECTIONS} connections opened",
            connections.len()
        );
        let during = rss_kib(pid);
        drop(connections);
        // Within a few files of before: the store may have opened another
        // pooled connection meanwhile.
        wait_for("the flood's connections to close", SETTLE, || async {
            (open_files(pid) <= files + 32).then_some(())
        })
        .await;
        wait_for("the allocator to be trimmed", SETTLE, || async {
            (process.log_count(&[TRIMMED]) >= round).then_some(())
        })
        .await;
        during
    };

    // A first flood leaves what any flood's first connections allocate for
    // good (thread stacks, tables grown once); the level after it is the
    // one that later floods must come back to.
    flood_and_close(1).await;
    let before = rss_kib(pid);
    eprintln!("after a warm-up flood: {before} KiB");
    for round in 1..=FLOODS {
        let during = flood_and_close(round + 1).await;
        let after = wait_for(
            &format!("RSS after flood {round} to come back within 20 % of {before} KiB"),
            SETTLE,
            || async {
                let now = rss_kib(pid);
                (now * 5 <= before * 6).then_some(now)
            },
        )
        .await;
        eprintln!("flood {round}: during {during} KiB, after {after} KiB");
    }
}
