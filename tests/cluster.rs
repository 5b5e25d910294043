//! The cluster of `docker-compose.yml` in real containers, each with its own
//! address: coordinator restarts, the loss of an agent, a network partition
//! and expiry, asserted on what `ListNodes` reports.
//!
//! The image is `FROM scratch` around a statically linked binary this test
//! builds, so no image registry is needed. Without a Docker engine and
//! compose the test says in one line that it skipped, unless `CI=true`,
//! where it fails. Every run has its own compose project, network, volumes
//! and image tag, all removed at the end whatever happens, and no fixed host
//! port: the coordinator is published on a free loopback port that the test
//! looks up, and queried there with `muster nodes list`, which answers in
//! milliseconds where a `docker exec` takes a good part of a second.

use std::{
    cell::RefCell,
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde::Deserialize;

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
    say(&summary);
}

/// Writes one line to the real stderr, past the test harness's capture.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The compose command line (`docker compose` or `docker-compose`), or
/// `None` after saying why the test is skipped.
fn docker_compose() -> Option<Vec<String>> {
    let unavailable = |reason: String| {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("CI=true, so the cluster test must run, but {reason}");
        }
        say(&format!(
            "cluster test skipped: {reason} (with CI=true this is a failure)"
        ));
        None
    };
    let engine = run(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]));
    if !engine.as_ref().is_ok_and(|output| output.status.success()) {
        return unavailable(format!(
            "no Docker engine is reachable ({})",
            failure(&engine)
        ));
    }
    let spellings = [vec!["docker", "compose"], vec!["docker-compose"]];
    for spelling in spellings {
        let version = run(Command::new(spelling[0])
            .args(&spelling[1..])
            .arg("version"));
        if version.is_ok_and(|output| output.status.success()) {
            return Some(spelling.into_iter().map(str::to_owned).collect());
        }
    }
    unavailable("neither `docker compose` nor `docker-compose` works".to_owned())
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn target_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds the static binary the Dockerfile copies, as `scripts/cluster.sh`
/// does. Its own target directory keeps it clear of the build lock of the
/// `cargo test` running this.
fn build_static_binary() -> Duration {
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--release", "--locked", "--target"])
        .arg(target_triple())
        .current_dir(manifest_dir())
        .env("CARGO_TARGET_DIR", manifest_dir().join("target/static"))
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    checked(
        run_within(&mut build, BUILD_DEADLINE),
        "building the static binary",
    );
    started.elapsed()
}

/// Runs `command` with [`COMMAND_DEADLINE`].
fn run(command: &mut Command) -> Result<Output, String> {
    run_within(command, COMMAND_DEADLINE)
}

/// Runs `command` to completion, killing it if it takes longer than `limit`.
fn run_within(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match outcome.recv_timeout(limit) {
        Ok(output) => output.map_err(|e| format!("{command:?} failed: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            Err(format!("{command:?} did not finish within {limit:?}"))
        }
    }
}

fn failure(outcome: &Result<Output, String>) -> String {
    match outcome {
        Err(reason) => reason.clone(),
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            format!("{}: {}", output.status, last.unwrap_or("no output"))
        }
    }
}

/// The output of a command that must succeed.
fn checked(outcome: Result<Output, String>, what: &str) -> Output {
    match outcome {
        Ok(output) if output.status.success() => output,
        Ok(output) => panic!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(reason) => panic!("{what}: {reason}"),
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A node as `muster nodes list --output json` prints it.
#[derive(Debug, Clone, Deserialize)]
struct Node {
    node_id: String,
    state: String,
    boot_id: String,
    registered_at: Option<String>,
    session_generation: u64,
}

fn find<'a>(nodes: &'a [Node], node_id: &str) -> Option<&'a Node> {
    nodes.iter().find(|n| n.node_id == node_id)
}

fn is_in(nodes: &[Node], node_id: &str, state: &str) -> bool {
    find(nodes, node_id).is_some_and(|n| n.state == state)
}

fn all_online(nodes: &[Node], node_ids: &[&str]) -> Option<Vec<Node>> {
    node_ids
        .iter()
        .all(|id| is_in(nodes, id, "ONLINE"))
        .then(|| nodes.to_vec())
}

/// An agent's container and the agent process in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentContainer {
    name: &'static str,
    id: String,
    started_at: String,
}

/// One compose project, taken down with its volumes and image when dropped.
struct Cluster {
    compose: Vec<String>,
    project: String,
    image: String,
    coordinator: String,
    /// The coordinator's URL on the host, looked up again after a failed
    /// query: a restarted container may be published on another port.
    published: RefCell<Option<String>>,
}

impl Cluster {
    fn new(compose: Vec<String>) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let project = format!("mustertest{}x{nanos}", std::process::id());
        let image = format!("muster-test:{project}");
        Self {
            compose,
            project,
            image,
            coordinator: String::new(),
            published: RefCell::new(None),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.compose[0]);
        command
            .args(&self.compose[1..])
            .arg("--project-name")
            .arg(&self.project)
            .arg("--file")
            .arg(manifest_dir().join("docker-compose.yml"))
            .args(args)
            .current_dir(manifest_dir())
            .env("MUSTER_IMAGE", &self.image)
            .env("MUSTER_COORDINATOR_PUBLISH", "127.0.0.1:0")
            .env("MUSTER_LOG", "info,muster=debug")
            .envs(timings());
        command
    }

    /// Starts the cluster; the coordinator keeps its container through
    /// restarts, so it is looked up once.
    fn up(&mut self) {
        self.compose(&["up", "-d"]);
        self.coordinator = self.container("coordinator");
    }

    fn compose(&self, args: &[&str]) -> Output {
        checked(run(&mut self.command(args)), &format!("compose {args:?}"))
    }

    fn docker(&self, args: &[&str]) -> Output {
        checked(
            run(Command::new("docker").args(args)),
            &format!("docker {args:?}"),
        )
    }

    fn build_image(&self) -> Duration {
        let started = Instant::now();
        self.compose(&[
            "build",
            "--build-arg",
            &format!("TARGET={}", target_triple()),
            "coordinator",
        ]);
        started.elapsed()
    }

    fn image_size(&self) -> u64 {
        let size = self.docker(&["image", "inspect", "--format", "{{.Size}}", &self.image]);
        stdout(&size).parse().expect("image size")
    }

    fn container(&self, service: &str) -> String {
        let id = stdout(&self.compose(&["ps", "-q", service]));
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        stdout(&self.docker(&["inspect", "--format", format, container]))
    }

    fn agent_containers(&self) -> Vec<AgentContainer> {
        AGENTS
            .iter()
            .map(|name| {
                let id = self.container(name);
                let started_at = self.inspect(&id, "{{.State.StartedAt}}");
                AgentContainer {
                    name,
                    id,
                    started_at,
                }
            })
            .collect()
    }

    /// Runs the binary inside the coordinator's container.
    fn exec(&self, args: &[&str]) -> Result<Output, String> {
        run_within(
            Command::new("docker")
                .args(["exec", &self.coordinator, "/muster"])
                .args(args),
            QUERY_DEADLINE,
        )
    }

    /// The URL of the coordinator's published port, once it has one.
    fn published_url(&self) -> Option<String> {
        if let Some(url) = self.published.borrow().as_ref() {
            return Some(url.clone());
        }
        let port = run_within(
            Command::new("docker").args(["port", &self.coordinator, "7700/tcp"]),
            QUERY_DEADLINE,
        )
        .ok()
        .filter(|output| output.status.success())?;
        let url = format!("http://{}", stdout(&port).lines().next()?);
        *self.published.borrow_mut() = Some(url.clone());
        Some(url)
    }

    /// Every node the coordinator lists, or `None` while it cannot answer.
    fn nodes(&self) -> Option<Vec<Node>> {
        let url = self.published_url()?;
        let output = run_within(
            Command::new(env!("CARGO_BIN_EXE_muster")).args([
                "nodes",
                "list",
                "--output",
                "json",
                "--coordinator",
                &url,
            ]),
            QUERY_DEADLINE,
        )
        .ok()
        .filter(|output| output.status.success());
        let Some(output) = output else {
            self.published.take();
            return None;
        };
        Some(serde_json::from_slice(&output.stdout).expect("nodes list prints JSON"))
    }

    /// Polls the node list until `check` accepts it; returns what `check`
    /// made of it and how long that took.
    fn wait_for<T>(
        &self,
        what: &str,
        deadline: Duration,
        mut check: impl FnMut(&[Node]) -> Option<T>,
    ) -> T {
        self.wait_timed(what, Instant::now(), deadline, &mut check)
            .0
    }

    /// Like [`Cluster::wait_for`], with the deadline counted from `since`;
    /// also returns the time from `since` until the list that satisfied
    /// `check` had been read.
    fn wait_timed<T>(
        &self,
        what: &str,
        since: Instant,
        deadline: Duration,
        check: &mut impl FnMut(&[Node]) -> Option<T>,
    ) -> (T, Duration) {
        let mut last = None;
        loop {
            if let Some(nodes) = self.nodes() {
                let read_at = since.elapsed();
                if let Some(found) = check(&nodes) {
                    assert!(
                        read_at <= deadline,
                        "{what} took {read_at:?}, more than {deadline:?}: {nodes:#?}"
                    );
                    return (found, read_at);
                }
                last = Some(nodes);
            }
            assert!(
                since.elapsed() <= deadline,
                "timed out after {deadline:?} waiting for {what}; last list: {last:#?}"
            );
            std::thread::sleep(POLL);
        }
    }

    fn wait_healthy(&self) {
        let containers: Vec<String> = ["coordinator"]
            .iter()
            .chain(&AGENTS)
            .map(|service| self.container(service))
            .collect();
        let started = Instant::now();
        loop {
            let states: Vec<String> = containers
                .iter()
                .map(|id| self.inspect(id, "{{.State.Health.Status}}"))
                .collect();
            if states.iter().all(|s| s == "healthy") {
                return;
            }
            assert!(
                started.elapsed() <= START_DEADLINE,
                "healthchecks did not pass within {START_DEADLINE:?}: {states:?}"
            );
            std::thread::sleep(POLL * 5);
        }
    }

    /// The static binary resolves compose service names in a scratch image:
    /// agents reached `coordinator` to register, and the coordinator reaches
    /// each agent by its service name, as its probes do.
    fn check_name_resolution(&self) {
        for agent in AGENTS {
            let url = format!("http://{agent}:7701");
            let health = self.exec(&["health", "--addr", &url]);
            checked(
                health,
                &format!("resolving and reaching {url} from the coordinator's container"),
            );
        }
    }

    /// Runs `restart` on the coordinator and checks that every agent is
    /// ONLINE again within 10 s of the coordinator being back, from rows kept
    /// in the volume, with no agent container touched. Returns the time it
    /// took.
    fn coordinator_comes_back(
        &self,
        agents: &[AgentContainer],
        before: &[Node],
        restart: impl FnOnce(&Self),
    ) -> Duration {
        let started_at = "{{.State.StartedAt}}";
        let coordinator_started = self.inspect(&self.coordinator, started_at);
        restart(self);
        assert_ne!(
            self.inspect(&self.coordinator, started_at),
            coordinator_started,
            "the coordinator's container did not restart"
        );
        let (after, took) = self.wait_timed(
            "all agents ONLINE after the coordinator restarted",
            Instant::now(),
            BACK_ONLINE_WITHIN,
            &mut |nodes| all_online(nodes, &AGENTS),
        );
        for agent in AGENTS {
            let (old, new) = (find(before, agent).unwrap(), find(&after, agent).unwrap());
            assert_eq!(
                old.registered_at, new.registered_at,
                "{agent}'s row was not kept in the volume"
            );
            assert!(
                new.session_generation >= old.session_generation,
                "{agent}'s session generation went back: {old:?} then {new:?}"
            );
            assert_eq!(old.boot_id, new.boot_id, "{agent} was restarted");
        }
        assert_eq!(
            self.agent_containers(),
            agents,
            "an agent container was touched"
        );
        took
    }

    /// `compose kill agent-3`: it is OFFLINE within 2 s of its container
    /// dying, and the others stay ONLINE throughout. The list is polled while
    /// compose is still at work, and the time is counted from the moment
    /// the engine recorded the container's end, so compose's own start-up
    /// and exit are not charged to the coordinator. Returns that time, and
    /// when the OFFLINE state was seen.
    fn agent_lost(&self) -> (Duration, Instant) {
        let container = self.container("agent-3");
        let mut kill = self.command(&["kill", "agent-3"]);
        let killing = std::thread::spawn(move || run(&mut kill));
        let offline_seen = self.wait_for(
            "agent-3 OFFLINE after its container was killed",
            COMMAND_DEADLINE,
            |nodes| {
                assert!(
                    all_online(nodes, &["agent-1", "agent-2"]).is_some(),
                    "an agent that was not killed left ONLINE: {nodes:#?}"
                );
                is_in(nodes, "agent-3", "OFFLINE").then(|| (SystemTime::now(), Instant::now()))
            },
        );
        checked(
            killing.join().expect("compose kill thread"),
            "compose kill agent-3",
        );
        let died = self.inspect(&container, "{{.State.FinishedAt}}");
        let died = humantime::parse_rfc3339(&died).expect("FinishedAt is RFC 3339");
        if let Ok(early) = died.duration_since(offline_seen.0) {
            assert!(
                early < Duration::from_secs(1),
                "agent-3 was OFFLINE {early:?} before its container died"
            );
        }
        let took = offline_seen.0.duration_since(died).unwrap_or_default();
        assert!(
            took <= LOST_AGENT_OFFLINE_WITHIN,
            "agent-3 was shown OFFLINE {took:?} after its container died, more than {LOST_AGENT_OFFLINE_WITHIN:?}"
        );
        (took, offline_seen.1)
    }

    /// Disconnects agent-2 from the network: OFFLINE within offline-after
    /// plus 2 s, then ONLINE within 10 s of reconnecting, the same agent
    /// process throughout. Returns both times.
    fn agent_partitioned(&self, agents: &[AgentContainer]) -> (Duration, Duration) {
        let agent = agents.iter().find(|a| a.name == "agent-2").unwrap();
        let network = format!("{}_muster", self.project);
        let boot_id = find(&self.nodes().expect("node list"), "agent-2")
            .expect("agent-2 listed")
            .boot_id
            .clone();

        self.docker(&["network", "disconnect", &network, &agent.id]);
        let (_, offline) = self.wait_timed(
            "partitioned agent-2 OFFLINE",
            Instant::now(),
            PARTITION_OFFLINE_WITHIN,
            &mut |nodes| {
                assert!(
                    is_in(nodes, "agent-1", "ONLINE"),
                    "agent-1 left ONLINE: {nodes:#?}"
                );
                is_in(nodes, "agent-2", "OFFLINE").then_some(())
            },
        );

        self.docker(&[
            "network", "connect", "--alias", "agent-2", &network, &agent.id,
        ]);
        let (node, online) = self.wait_timed(
            "agent-2 ONLINE after the partition healed",
            Instant::now(),
            BACK_ONLINE_WITHIN,
            &mut |nodes| {
                find(nodes, "agent-2")
                    .filter(|n| n.state == "ONLINE")
                    .cloned()
            },
        );
        assert_eq!(node.boot_id, boot_id, "agent-2 was restarted");
        assert_eq!(
            self.inspect(&agent.id, "{{.State.StartedAt}}"),
            agent.started_at,
            "agent-2's container was restarted"
        );
        (offline, online)
    }

    /// The killed agent-3, OFFLINE since `offline`, is removed once that has
    /// lasted expire-after; the others are untouched.
    fn lost_agent_expires(&self, offline: Instant) -> Duration {
        let nodes = self.nodes().expect("node list");
        assert!(
            find(&nodes, "agent-3").is_some() || offline.elapsed() >= EXPIRE_AFTER,
            "agent-3 expired after {:?}, sooner than {EXPIRE_AFTER:?}",
            offline.elapsed()
        );
        let (_, took) = self.wait_timed(
            "agent-3 to expire",
            offline,
            EXPIRE_AFTER + Duration::from_secs(5),
            &mut |nodes| {
                let gone = find(nodes, "agent-3").is_none();
                (gone && all_online(nodes, &["agent-1", "agent-2"]).is_some()).then_some(())
            },
        );
        took
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(logs) = run(&mut self.command(&["logs", "--no-color", "--tail", "150"]))
        {
            eprintln!("{}", String::from_utf8_lossy(&logs.stdout));
        }
        let down = run(&mut self.command(&[
            "down",
            "--volumes",
            "--rmi",
            "all",
            "--remove-orphans",
            "--timeout",
            "5",
        ]));
        if !down.as_ref().is_ok_and(|output| output.status.success()) {
            say(&format!(
                "cluster test: compose down of project {} failed: {}",
                self.project,
                failure(&down)
            ));
        }
    }
}
