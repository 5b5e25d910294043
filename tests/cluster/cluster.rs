//! One compose project under test: its containers, and the node list its
//! coordinator reports.

use std::{
    cell::RefCell,
    process::{Command, Output},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    AGENTS, POLL, QUERY_DEADLINE, START_DEADLINE,
    commands::{checked, failure, manifest_dir, run, run_within, stdout, target_triple},
    common,
    nodes::Node,
    timings,
};

/// An agent's container and the agent process in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentContainer {
    pub name: &'static str,
    pub id: String,
    pub started_at: String,
}

/// One compose project, taken down with its volumes and image when dropped.
pub struct Cluster {
    compose: Vec<String>,
    pub project: String,
    image: String,
    pub coordinator: String,
    /// The coordinator's URL on the host, looked up again after a failed
    /// query: a restarted container may be published on another port.
    published: RefCell<Option<String>>,
}

impl Cluster {
    pub fn new(compose: Vec<String>) -> Self {
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

    pub fn command(&self, args: &[&str]) -> Command {
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
            .env("MUSTER_DASHBOARD_PUBLISH", "127.0.0.1:0")
            .env("MUSTER_LOG", "info,muster=debug")
            .envs(timings());
        command
    }

    /// Starts the cluster; the coordinator keeps its container through
    /// restarts, so it is looked up once.
    pub fn up(&mut self) {
        self.compose(&["up", "-d"]);
        self.coordinator = self.container("coordinator");
    }

    pub fn compose(&self, args: &[&str]) -> Output {
        checked(run(&mut self.command(args)), &format!("compose {args:?}"))
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        checked(
            run(Command::new("docker").args(args)),
            &format!("docker {args:?}"),
        )
    }

    pub fn build_image(&self) -> Duration {
        let started = Instant::now();
        self.compose(&[
            "build",
            "--build-arg",
            &format!("TARGET={}", target_triple()),
            "coordinator",
        ]);
        started.elapsed()
    }

    pub fn image_size(&self) -> u64 {
        let size = self.docker(&["image", "inspect", "--format", "{{.Size}}", &self.image]);
        stdout(&size).parse().expect("image size")
    }

    pub fn container(&self, service: &str) -> String {
        let id = stdout(&self.compose(&["ps", "-q", service]));
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    pub fn inspect(&self, container: &str, format: &str) -> String {
        stdout(&self.docker(&["inspect", "--format", format, container]))
    }

    pub fn agent_containers(&self) -> Vec<AgentContainer> {
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
    pub fn exec(&self, args: &[&str]) -> Result<Output, String> {
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
    pub fn nodes(&self) -> Option<Vec<Node>> {
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
    /// made of it.
    pub fn wait_for<T>(
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
    pub fn wait_timed<T>(
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

    pub fn wait_healthy(&self) {
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
            common::say(&format!(
                "cluster test: compose down of project {} failed: {}",
                self.project,
                failure(&down)
            ));
        }
    }
}
