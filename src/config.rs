//! The command line. Every flag can also be set through a `MUSTER_*`
//! environment variable, and those of the daemons from a `--config` file
//! ([`file`]); durations are written like `500ms`, `5s` or `24h`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{auth::Token, error::InvalidInput, tls::TlsArgs};

mod database;
pub mod file;

pub use database::{Database, DatabaseParser, InvalidDatabase, PostgresUrl};

#[derive(Debug, Parser)]
#[command(
    name = "muster",
    version,
    about = "A control plane for a fleet of GPU agent nodes"
)]
pub struct Cli {
    /// Log filter, in tracing's env-filter syntax (e.g. `info,muster=debug`).
    #[arg(long, env = "MUSTER_LOG", default_value = "info", global = true)]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: the registry of nodes, persisted in SQLite.
    Coordinator(CoordinatorConfig),
    /// Run the agent daemon on a node.
    Agent(AgentConfig),
    /// Simulate a fleet of agents from one process, to measure a coordinator.
    Swarm(SwarmConfig),
    /// Inspect the nodes a coordinator knows.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Acquire, renew, release and list VRAM leases.
    Leases {
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// Ask a coordinator or an agent whether it is healthy; exits 0 only if
    /// it reports SERVING (for container healthchecks).
    Health(HealthConfig),
    /// Make a CA and certificates for mutual TLS.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make the cluster's CA: ca.crt, and its private key ca.key (mode 0600).
    Ca(TlsCaConfig),
    /// Make a certificate signed by the CA, for a coordinator, an agent or an
    /// operator: NAME.crt and NAME.key (mode 0600).
    Cert(TlsCertConfig),
}

#[derive(Debug, Clone, Args)]
pub struct TlsCaConfig {
    /// Directory to write ca.crt and ca.key to.
    #[arg(long, env = "MUSTER_TLS_DIR", default_value = ".")]
    pub dir: PathBuf,

    /// The CA's common name.
    #[arg(long, default_value = "muster CA")]
    pub common_name: String,

    /// How long the CA is valid.
    #[arg(long, default_value = "10years", value_parser = parse_duration)]
    pub valid_for: Duration,

    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TlsCertConfig {
    /// Host names and IP addresses the certificate is for, separated by
    /// commas; the first is also its common name and file name. Give every
    /// name peers use to reach this process (the host of the coordinator's
    /// URL, or of the agent's advertised URL).
    #[arg(
        long = "name",
        value_name = "HOST[,HOST...]",
        value_delimiter = ',',
        required = true
    )]
    pub names: Vec<String>,

    /// For a process that only dials servers, such as an operator's `muster
    /// nodes`. Without --client and --server, the certificate serves both,
    /// as coordinators and agents need.
    #[arg(long)]
    pub client: bool,

    /// For a process that only serves.
    #[arg(long)]
    pub server: bool,

    /// Directory to write the certificate and its key to, and where the CA
    /// is looked for.
    #[arg(long, env = "MUSTER_TLS_DIR", default_value = ".")]
    pub dir: PathBuf,

    /// File names are this, then .crt and .key [default: the first --name]
    #[arg(long, value_name = "NAME")]
    pub file_name: Option<String>,

    /// The CA certificate to sign with [default: DIR/ca.crt]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// The CA's private key [default: DIR/ca.key]
    #[arg(long, value_name = "FILE")]
    pub ca_key: Option<PathBuf>,

    /// How long the certificate is valid.
    #[arg(long, default_value = "2years", value_parser = parse_duration)]
    pub valid_for: Duration,

    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

impl TlsCertConfig {
    pub fn ca_cert(&self) -> PathBuf {
        self.ca.clone().unwrap_or_else(|| self.dir.join("ca.crt"))
    }

    pub fn ca_key(&self) -> PathBuf {
        self.ca_key
            .clone()
            .unwrap_or_else(|| self.dir.join("ca.key"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct CoordinatorConfig {
    /// Address to serve gRPC on.
    #[arg(
        long,
        env = "MUSTER_COORDINATOR_LISTEN",
        default_value = "0.0.0.0:7700"
    )]
    pub listen: SocketAddr,

    /// The database: a SQLite file (migrated if needed; created, and
    /// logged, only where no file exists; locked through `<db>.lock` while
    /// the coordinator runs), or a `postgres://user:password@host:port/name`
    /// URL (migrated if needed; shareable by several coordinators). The
    /// password is never logged.
    #[arg(long, env = "MUSTER_DB", default_value = "muster.db", value_parser = DatabaseParser)]
    pub db: Database,

    /// How often agents send a heartbeat.
    #[arg(long, env = "MUSTER_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// The fleet's heartbeats per second are kept at or below this: agents
    /// of a larger fleet are given a longer interval than
    /// --heartbeat-interval, in whole multiples of it.
    #[arg(
        long,
        env = "MUSTER_MAX_HEARTBEATS_PER_SECOND",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_heartbeats_per_second: u32,

    /// Silence after which a node is shown OFFLINE, for an agent at
    /// --heartbeat-interval; it grows with an agent's interval.
    #[arg(long, env = "MUSTER_OFFLINE_AFTER", default_value = "15s", value_parser = parse_duration)]
    pub offline_after: Duration,

    /// Time a revoked lease's memory stays counted if its holder does not release it; the
    /// lease that preempted it is granted when it is freed.
    #[arg(long, env = "MUSTER_REVOKE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub revoke_grace: Duration,

    /// Time the leases of an OFFLINE node stay SUSPENDED, waiting for it to come back,
    /// before they are released.
    #[arg(long, env = "MUSTER_LEASE_ORPHAN_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub lease_orphan_grace: Duration,

    /// Time a node stays OFFLINE or LEFT before it is removed, by the monotonic clock;
    /// RELIABILITY.md says how restarts and clock steps count.
    #[arg(long, env = "MUSTER_EXPIRE_AFTER", default_value = "24h", value_parser = parse_duration)]
    pub expire_after: Duration,

    /// Expiry pauses while more than this fraction of the known fleet is
    /// OFFLINE or UNKNOWN at once (fleets of 3 nodes or more), as when the
    /// coordinator's own network fails; in (0, 1], where 1 never pauses.
    /// LEFT nodes, which left on purpose, are not counted.
    #[arg(long, env = "MUSTER_EXPIRY_GUARD_FRACTION", default_value_t = 0.5)]
    pub expiry_guard_fraction: f64,

    /// Time limit of one Status probe to an agent after a restart.
    #[arg(long, env = "MUSTER_PROBE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub probe_timeout: Duration,

    /// File holding the cluster's join token. When set, Heartbeat streams
    /// must carry it, and Status probes present it to the agents.
    #[arg(long, env = "MUSTER_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// File holding the operators' token. When set, every operator call
    /// (ListNodes, GetNode, RemoveNode, DrainNode, UndrainNode, WatchNodes)
    /// needs it as `authorization: Bearer <token>`, and the dashboard,
    /// `/api/nodes` and `/events` ask for it through a login form.
    #[arg(long, env = "MUSTER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Heartbeat streams open at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MUSTER_MAX_STREAMS", default_value_t = 50_000)]
    pub max_streams: u32,

    /// New Heartbeat streams (registrations) accepted per second, with a
    /// burst of as many; more are refused with RESOURCE_EXHAUSTED and the
    /// agents back off.
    #[arg(
        long,
        env = "MUSTER_MAX_REGISTRATIONS_PER_SECOND",
        default_value_t = 2_000
    )]
    pub max_registrations_per_second: u32,

    /// Time a new connection has to send its HTTP/2 preface, and to finish
    /// its TLS handshake; it is closed otherwise.
    #[arg(long, env = "MUSTER_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Time a connection may stay open without any call or Heartbeat stream
    /// on it; it is closed then, and its client reconnects when it needs to.
    #[arg(long, env = "MUSTER_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Connections open at once. At the limit, a new connection evicts the
    /// oldest one that carries no stream, or is closed at once if all carry
    /// one. Default: the open-file limit less 256 files kept for the
    /// database, probes and logs.
    #[arg(long, env = "MUSTER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Address of the HTTP listener: the live dashboard at `/`, its JSON at
    /// `/api/nodes`, server-sent node events at `/events`, and Prometheus
    /// metrics at `/metrics`; `off` disables it. Put it behind TLS on
    /// anything but loopback (SECURITY.md).
    #[arg(
        long,
        env = "MUSTER_HTTP_LISTEN",
        default_value = "127.0.0.1:7780",
        value_name = "ADDR|off"
    )]
    pub http_listen: HttpListen,

    /// Deprecated: `/metrics` is served on --http-listen. When set, metrics
    /// are also served here, and a warning says to use --http-listen.
    #[arg(long, env = "MUSTER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The event history keeps at least this many events (and every event
    /// younger than --event-history-age). Hidden: tests shrink it.
    #[arg(long, hide = true, default_value_t = 10_000)]
    pub event_history_events: u64,

    #[arg(long, hide = true, default_value = "1h", value_parser = parse_duration)]
    pub event_history_age: Duration,

    /// How often a watch with nothing to send sends a BOOKMARK. Hidden:
    /// tests shorten it.
    #[arg(long, hide = true, default_value = "10s", value_parser = parse_duration)]
    pub watch_bookmark_interval: Duration,

    /// Events a watcher may fall behind before its stream is ended.
    #[arg(long, hide = true, default_value_t = 4096)]
    pub watch_buffer: usize,

    /// How long a leader's lease lasts on a database that several
    /// coordinators share; the leader renews it every third of that, and
    /// steps down by its own clock before the lease can run out. A standby
    /// takes over within about this long after the leader dies.
    #[arg(long, env = "MUSTER_LEADER_LEASE", default_value = "10s", value_parser = parse_duration)]
    pub leader_lease: Duration,

    /// URL at which agents and operators reach this coordinator; standbys
    /// name the leader's in their refusals. Defaults to the listen address
    /// (https with TLS); required when that address is unspecified (such
    /// as 0.0.0.0) and the database is shared by several coordinators.
    #[arg(long, env = "MUSTER_COORDINATOR_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub file: file::ConfigFileArgs,
}

/// Where the coordinator's HTTP listener binds, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

impl std::str::FromStr for HttpListen {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if raw.trim().eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        raw.trim()
            .parse()
            .map(|address| Self(Some(address)))
            .map_err(|_| format!("expected an address such as 127.0.0.1:7780, or off; got {raw:?}"))
    }
}

impl HttpListen {
    /// This setting with the port the listener bound in place of port 0.
    pub fn bound(self, bound: Option<SocketAddr>) -> Self {
        Self(bound.or(self.0))
    }
}

impl std::fmt::Display for HttpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(address) => address.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// Upper bounds that keep every deadline computed from a flag far from
/// overflow, and catch a mistyped unit.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_OFFLINE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_LEASE_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_EXPIRE_AFTER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A lease shorter than this leaves too little time to renew it across one
/// slow database round trip.
const MIN_LEADER_LEASE: Duration = Duration::from_secs(1);
const MAX_LEADER_LEASE: Duration = Duration::from_secs(3600);
/// An agent's `--max-backoff` is at most what a coordinator allows for after
/// a restart.
const MAX_BACKOFF: Duration = crate::node::MAX_MAX_BACKOFF;
/// Reading NVML more often than this costs CPU and tells nothing new.
const MIN_GPU_POLL_INTERVAL: Duration = Duration::from_millis(100);
const MAX_GPU_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// The most GPUs `muster swarm` gives one simulated agent.
pub const MAX_GPUS_PER_AGENT: u8 = 64;

fn check_range(flag: &'static str, value: Duration, max: Duration) -> Result<(), InvalidInput> {
    if value.is_zero() || value > max {
        return Err(InvalidInput::new(
            flag,
            format!(
                "must be greater than zero and at most {}, got {}",
                humantime::format_duration(max),
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

impl CoordinatorConfig {
    /// The URL this coordinator advertises: `--advertise-url`, or the
    /// bound listen address (`https` when it serves `tls`). `None` when the
    /// listen address is unspecified and no URL was given.
    pub fn advertised_url(&self, bound: SocketAddr, tls: bool) -> Option<String> {
        if let Some(url) = &self.advertise_url {
            return Some(url.clone());
        }
        if bound.ip().is_unspecified() {
            return None;
        }
        let scheme = if tls { "https" } else { "http" };
        Some(format!("{scheme}://{bound}"))
    }

    pub fn validate(&self) -> Result<(), InvalidInput> {
        check_range(
            "--heartbeat-interval",
            self.heartbeat_interval,
            MAX_HEARTBEAT_INTERVAL,
        )?;
        check_range("--offline-after", self.offline_after, MAX_OFFLINE_AFTER)?;
        check_range("--expire-after", self.expire_after, MAX_EXPIRE_AFTER)?;
        check_range("--revoke-grace", self.revoke_grace, MAX_LEASE_GRACE)?;
        check_range(
            "--lease-orphan-grace",
            self.lease_orphan_grace,
            MAX_LEASE_GRACE,
        )?;
        check_range("--probe-timeout", self.probe_timeout, MAX_PROBE_TIMEOUT)?;
        check_range("--leader-lease", self.leader_lease, MAX_LEADER_LEASE)?;
        if self.leader_lease < MIN_LEADER_LEASE {
            return Err(InvalidInput::new(
                "--leader-lease",
                format!(
                    "must be at least {}, got {}",
                    humantime::format_duration(MIN_LEADER_LEASE),
                    humantime::format_duration(self.leader_lease)
                ),
            ));
        }
        if let Some(url) = &self.advertise_url {
            let parsed: Result<tonic::codegen::http::Uri, _> = url.parse();
            let scheme = parsed.as_ref().ok().and_then(|uri| uri.scheme_str());
            let has_host = parsed.as_ref().is_ok_and(|uri| uri.host().is_some());
            if !matches!(scheme, Some("http" | "https")) || !has_host {
                return Err(InvalidInput::new(
                    "--advertise-url",
                    format!("expected a URL such as http://10.0.0.5:7700, got {url:?}"),
                ));
            }
        }
        if !(self.expiry_guard_fraction > 0.0 && self.expiry_guard_fraction <= 1.0) {
            return Err(InvalidInput::new(
                "--expiry-guard-fraction",
                format!(
                    "must be greater than 0 and at most 1, got {}",
                    self.expiry_guard_fraction
                ),
            ));
        }
        if self.max_streams == 0 {
            return Err(InvalidInput::new("--max-streams", "must be at least 1"));
        }
        if self.max_connections == Some(0) {
            return Err(InvalidInput::new("--max-connections", "must be at least 1"));
        }
        for (flag, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(InvalidInput::new(flag, "must be more than 0s"));
            }
        }
        if self.max_registrations_per_second == 0 {
            return Err(InvalidInput::new(
                "--max-registrations-per-second",
                "must be at least 1",
            ));
        }
        if self.offline_after <= self.heartbeat_interval {
            return Err(InvalidInput::new(
                "--offline-after",
                format!(
                    "must be longer than --heartbeat-interval ({}), or every node would flap",
                    humantime::format_duration(self.heartbeat_interval)
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// URL of the coordinator, or the URLs of several (one leading, the
    /// others standing by) separated by commas. The agent follows a
    /// standby's leader hint at once, but only to a URL of this list, and
    /// otherwise tries the next URL after its backoff.
    #[arg(
        long,
        env = "MUSTER_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub coordinator: String,

    /// Address to serve this agent's Status service on.
    #[arg(long, env = "MUSTER_AGENT_LISTEN", default_value = "0.0.0.0:7701")]
    pub listen: SocketAddr,

    /// URL the coordinator dials to reach this agent. Defaults to the listen
    /// address, with the host name in place of an unspecified IP.
    #[arg(long, env = "MUSTER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Node id. Without it, the id kept in the state directory is used; if
    /// there is none, the host name, which is then kept.
    #[arg(long, env = "MUSTER_NODE_ID")]
    pub node_id: Option<String>,

    /// Directory where the agent keeps its identity.
    #[arg(long, env = "MUSTER_STATE_DIR", default_value = "muster-agent")]
    pub state_dir: PathBuf,

    /// Labels reported to the coordinator, as `key=value`; repeatable, or
    /// several separated by commas (so a value cannot contain a comma).
    #[arg(long = "label", env = "MUSTER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// File holding the cluster's join token, presented to the coordinator
    /// and required of the coordinator's Status probes.
    #[arg(long, env = "MUSTER_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// Longest wait between two attempts to reach the coordinator.
    #[arg(long, env = "MUSTER_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// Where this node's GPU inventory comes from: `auto` (NVML if an NVIDIA
    /// driver loads, else no GPUs), `nvml` (an error if it does not load),
    /// `none`, or `file:PATH` (a JSON list of GPUs, read again when it
    /// changes).
    #[arg(long, env = "MUSTER_GPU_SOURCE", default_value = "auto", value_parser = parse_gpu_source)]
    pub gpu_source: GpuSourceSpec,

    /// How often the GPUs are read. A change reaches the coordinator on the
    /// next heartbeat, and only past a threshold (memory ±64 MiB,
    /// utilisation ±10 points, health, a GPU added or gone).
    #[arg(long, env = "MUSTER_GPU_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub gpu_poll_interval: Duration,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub file: file::ConfigFileArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SwarmConfig {
    /// URL of the coordinator, or the URLs of several separated by commas;
    /// each simulated agent moves between them as `muster agent` does.
    #[arg(
        long,
        env = "MUSTER_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub coordinator: String,

    /// How many agents to simulate, each with its own connection and stream.
    #[arg(long, env = "MUSTER_SWARM_AGENTS", default_value_t = 100)]
    pub agents: u32,

    /// Number of the first agent, so that several swarm processes make one
    /// fleet without sharing node ids.
    #[arg(long, env = "MUSTER_SWARM_FIRST_AGENT", default_value_t = 0)]
    pub first_agent: u32,

    /// Node ids are this prefix, a dash and the agent's number.
    #[arg(long, env = "MUSTER_SWARM_NODE_PREFIX", default_value = "sim")]
    pub node_prefix: String,

    /// Loopback source addresses the connections are spread over (127.0.0.2
    /// and up), each good for one ephemeral port range of connections.
    #[arg(long, env = "MUSTER_SWARM_SOURCE_ADDRESSES", default_value_t = 4)]
    pub source_addresses: u8,

    /// Address of the one Status listener that answers for every simulated
    /// agent. Its IP must accept connections to all of 127.0.0.0/8 (the
    /// default does); agents advertise distinct loopback addresses on its
    /// port, and are told apart by the address a probe reached.
    #[arg(long, env = "MUSTER_SWARM_LISTEN", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,

    /// How often to print a report line (JSON, on stdout).
    #[arg(long, env = "MUSTER_SWARM_REPORT_EVERY", default_value = "5s", value_parser = parse_duration)]
    pub report_every: Duration,

    /// Stop after this long; without it, run until interrupted.
    #[arg(long, env = "MUSTER_SWARM_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Synthetic GPUs each simulated agent reports (0-64), with made-up
    /// uuids and memory use.
    #[arg(long, env = "MUSTER_SWARM_GPUS_PER_AGENT", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=i64::from(MAX_GPUS_PER_AGENT)))]
    pub gpus_per_agent: u8,
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), InvalidInput> {
        check_range("--max-backoff", self.max_backoff, MAX_BACKOFF)?;
        check_range(
            "--gpu-poll-interval",
            self.gpu_poll_interval,
            MAX_GPU_POLL_INTERVAL,
        )?;
        if self.gpu_poll_interval < MIN_GPU_POLL_INTERVAL {
            return Err(InvalidInput::new(
                "--gpu-poll-interval",
                format!(
                    "must be at least {}, got {}",
                    humantime::format_duration(MIN_GPU_POLL_INTERVAL),
                    humantime::format_duration(self.gpu_poll_interval)
                ),
            ));
        }
        Ok(())
    }
}

/// Where an agent reads its GPUs from (`--gpu-source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSourceSpec {
    /// NVML when it loads, otherwise no GPUs.
    Auto,
    /// NVML, or refuse to start.
    Nvml,
    None,
    /// A JSON list of GPUs, read again when it changes.
    File(PathBuf),
}

impl std::fmt::Display for GpuSourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Nvml => f.write_str("nvml"),
            Self::None => f.write_str("none"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

fn parse_gpu_source(raw: &str) -> Result<GpuSourceSpec, String> {
    match raw {
        "auto" => Ok(GpuSourceSpec::Auto),
        "nvml" => Ok(GpuSourceSpec::Nvml),
        "none" => Ok(GpuSourceSpec::None),
        _ => match raw.strip_prefix("file:") {
            Some("") => {
                Err("file: must be followed by a path, as in file:/etc/muster/gpus.json".to_owned())
            }
            Some(path) => Ok(GpuSourceSpec::File(PathBuf::from(path))),
            None => Err(format!(
                "{raw:?} is not a GPU source; use auto, nvml, none or file:PATH"
            )),
        },
    }
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List every node.
    List(NodesClientConfig),
    /// Show one node.
    Get {
        /// The node id.
        node_id: String,
        /// Ask again until the node is registered and the coordinator
        /// answers, for up to this long (e.g. just after starting an agent).
        #[arg(long, env = "MUSTER_NODES_WAIT", value_parser = parse_duration)]
        wait: Option<Duration>,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Forget a node, so that its id can be claimed afresh. Stop its agent
    /// first, or it registers again.
    Remove {
        /// The node id.
        node_id: String,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Take a node out of service: it stays a member and keeps
    /// heartbeating, but nothing new is placed on it. Draining a drained
    /// node replaces its reason.
    Drain {
        /// The node id.
        node_id: String,
        /// Why, for whoever reads `nodes list` next (1-256 bytes).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Put a drained node back in service.
    Undrain {
        /// The node id.
        node_id: String,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Print every change of every node as it happens, one line each: the
    /// fleet as it is first (or every change after --since), then changes
    /// live. Resumes by itself after a dropped connection; lists the fleet
    /// again, saying so on stderr, when the coordinator no longer holds the
    /// revision to resume from.
    Watch {
        /// Print only the changes after this revision (as printed by an
        /// earlier watch) instead of listing the fleet first.
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[command(flatten)]
        client: NodesClientConfig,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeasesCommand {
    /// List leases, oldest grant first.
    List {
        /// Only leases on this node.
        #[arg(long)]
        node_id: Option<String>,
        /// Only leases on this GPU.
        #[arg(long)]
        gpu_uuid: Option<String>,
        /// Only leases of this holder.
        #[arg(long)]
        holder: Option<String>,
        /// Only leases in these states (repeat, or separate with commas).
        #[arg(long, value_enum, value_delimiter = ',')]
        state: Vec<LeaseStateArg>,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Acquire a lease of VRAM on the best-fitting GPU, and print it.
    Acquire {
        /// Who holds the lease, e.g. a service name.
        #[arg(long)]
        holder: String,
        /// VRAM in MiB.
        #[arg(long)]
        mb: u64,
        /// The lease lives this long unless renewed (5s to 24h).
        #[arg(long, value_parser = parse_duration)]
        ttl: Duration,
        /// Higher is more important; only a higher priority preempts.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Wait up to this long for room (revoked leases to be freed).
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
        /// The idempotency key: the same key returns the same lease. A
        /// random one when not given.
        #[arg(long)]
        request_id: Option<String>,
        /// Place it on this node only.
        #[arg(long)]
        node_id: Option<String>,
        /// Place it on this GPU only.
        #[arg(long)]
        gpu_uuid: Option<String>,
        /// Place it only on nodes with these labels, `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        selector: String,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Extend a lease by its TTL from now.
    Renew {
        /// The lease id.
        lease_id: String,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Release a lease; releasing one already released is fine.
    Release {
        /// The lease id.
        lease_id: String,
        #[command(flatten)]
        client: NodesClientConfig,
    },
    /// Print every change of a lease as it happens, one line each
    /// (granted, renewed, revoked, suspended, resumed, released, expired,
    /// reclaimed, reconciled), until the coordinator ends the stream.
    Watch {
        /// Print the changes after this revision (as printed by an earlier
        /// watch) first, instead of only those from now on.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only leases of this holder.
        #[arg(long)]
        holder: Option<String>,
        #[command(flatten)]
        client: NodesClientConfig,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseStateArg {
    Active,
    Revoked,
    Suspended,
    Released,
}

#[derive(Debug, Clone, Args)]
pub struct NodesClientConfig {
    /// URL of the coordinator, or the URLs of several separated by commas:
    /// reads are answered by the first that answers, writes follow a
    /// standby's leader hint (to a URL of this list) or go to the next.
    #[arg(
        long,
        env = "MUSTER_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub coordinator: String,

    /// How to print nodes: an aligned table, or JSON for scripts.
    #[arg(long, env = "MUSTER_OUTPUT", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// File holding the admin token, sent as `authorization: Bearer`.
    #[arg(long, env = "MUSTER_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,

    /// The admin token itself; prefer the environment or --admin-token-file,
    /// which other users cannot see in the process list.
    #[arg(long, env = "MUSTER_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_admin_token)]
    pub admin_token: Option<Token>,

    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HealthConfig {
    /// URL of the server to ask: a coordinator or an agent.
    #[arg(
        long,
        env = "MUSTER_HEALTH_ADDR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub addr: String,

    /// Service to ask about, as `grpc.health.v1` names it; empty means the
    /// server as a whole.
    #[arg(long, env = "MUSTER_HEALTH_SERVICE", default_value = "")]
    pub service: String,

    /// Time limit of the whole check, connecting included.
    #[arg(long, env = "MUSTER_HEALTH_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Ask again until the server is SERVING, for up to this long (e.g. just
    /// after starting it); without it, ask once.
    #[arg(long, env = "MUSTER_HEALTH_WAIT", value_parser = parse_duration)]
    pub wait: Option<Duration>,

    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw)
        .map_err(|e| format!("{e} (write durations like 500ms, 5s or 24h)"))
}

fn parse_admin_token(raw: &str) -> Result<Token, String> {
    Token::new("admin token", raw).map_err(|e| e.to_string())
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("label {raw:?} must look like key=value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coordinator(args: &[&str]) -> Result<CoordinatorConfig, clap::Error> {
        let cli = Cli::try_parse_from(["muster", "coordinator"].iter().chain(args))?;
        match cli.command {
            Command::Coordinator(config) => Ok(config),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_http_listener_is_on_loopback_by_default_and_off_turns_it_off() {
        let default = coordinator(&[]).unwrap().http_listen;
        assert_eq!(default, HttpListen(Some("127.0.0.1:7780".parse().unwrap())));
        let off = coordinator(&["--http-listen", "OFF"]).unwrap().http_listen;
        assert_eq!(off, HttpListen(None));
        assert_eq!(off.to_string(), "off");
        let bound = HttpListen(Some("127.0.0.1:0".parse().unwrap()))
            .bound(Some("127.0.0.1:4321".parse().unwrap()));
        assert_eq!(bound.to_string(), "127.0.0.1:4321");
        let refused = coordinator(&["--http-listen", "localhost:80"]).unwrap_err();
        assert!(refused.to_string().contains("--http-listen"), "{refused}");
    }

    #[test]
    fn coordinator_defaults() {
        let config = coordinator(&[]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:7700".parse().unwrap());
        assert_eq!(config.db, Database::Sqlite(PathBuf::from("muster.db")));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.offline_after, Duration::from_secs(15));
        assert_eq!(config.expire_after, Duration::from_secs(24 * 3600));
        assert_eq!(config.probe_timeout, Duration::from_secs(2));
        assert_eq!(config.max_heartbeats_per_second, 1000);
        config.validate().unwrap();
        assert!(coordinator(&["--max-heartbeats-per-second", "0"]).is_err());
    }

    #[test]
    fn durations_are_human_readable() {
        let config =
            coordinator(&["--heartbeat-interval", "250ms", "--expire-after", "1h 30m"]).unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(config.expire_after, Duration::from_secs(5400));
        let err = coordinator(&["--offline-after", "soon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("5s"), "{err}");
    }

    #[test]
    fn offline_after_must_exceed_the_heartbeat_interval() {
        let config = coordinator(&["--heartbeat-interval", "5s", "--offline-after", "5s"]).unwrap();
        assert_eq!(config.validate().unwrap_err().field, "--offline-after");
    }

    #[test]
    fn durations_out_of_range_are_refused() {
        for (flag, value) in [
            ("--expire-after", "300000000000y"),
            ("--expire-after", "0s"),
            ("--offline-after", "30days"),
            ("--heartbeat-interval", "2h"),
            ("--probe-timeout", "0s"),
        ] {
            let config = coordinator(&[flag, value]).unwrap();
            assert_eq!(config.validate().unwrap_err().field, flag, "{flag} {value}");
        }
    }

    #[test]
    fn the_expiry_guard_fraction_lies_in_zero_to_one() {
        let config = coordinator(&[]).unwrap();
        assert!((config.expiry_guard_fraction - 0.5).abs() < f64::EPSILON);
        for good in ["1", "0.01", "0.9"] {
            let config = coordinator(&["--expiry-guard-fraction", good]).unwrap();
            config.validate().unwrap();
        }
        for bad in ["0", "-0.5", "1.01", "NaN", "inf"] {
            let config = coordinator(&[&format!("--expiry-guard-fraction={bad}")]).unwrap();
            assert_eq!(
                config.validate().unwrap_err().field,
                "--expiry-guard-fraction",
                "{bad}"
            );
        }
    }

    #[test]
    fn labels_parse_as_key_value_pairs() {
        let cli = Cli::try_parse_from([
            "muster", "agent", "--label", "gpu=a100", "--label", "zone=lab",
        ])
        .unwrap();
        let Command::Agent(config) = cli.command else {
            panic!()
        };
        assert_eq!(
            config.labels,
            [("gpu".into(), "a100".into()), ("zone".into(), "lab".into())]
        );
        assert!(Cli::try_parse_from(["muster", "agent", "--label", "novalue"]).is_err());
    }

    #[test]
    fn max_backoff_defaults_to_thirty_seconds_and_must_be_positive() {
        let agent = |args: &[&str]| {
            let cli = Cli::try_parse_from(["muster", "agent"].iter().chain(args)).unwrap();
            let Command::Agent(config) = cli.command else {
                panic!()
            };
            config
        };
        let config = agent(&[]);
        assert_eq!(config.max_backoff, Duration::from_secs(30));
        config.validate().unwrap();
        assert_eq!(
            agent(&["--max-backoff", "500ms"]).max_backoff,
            Duration::from_millis(500)
        );
        let zero = agent(&["--max-backoff", "0s"]).validate().unwrap_err();
        assert_eq!(zero.field, "--max-backoff");
    }

    #[test]
    fn gpu_source_is_auto_by_default_and_file_needs_a_path() {
        let agent = |args: &[&str]| {
            Cli::try_parse_from(["muster", "agent"].iter().chain(args)).map(|cli| {
                let Command::Agent(config) = cli.command else {
                    panic!()
                };
                config
            })
        };
        let config = agent(&[]).unwrap();
        assert_eq!(config.gpu_source, GpuSourceSpec::Auto);
        assert_eq!(config.gpu_poll_interval, Duration::from_secs(5));
        for (raw, parsed) in [
            ("nvml", GpuSourceSpec::Nvml),
            ("none", GpuSourceSpec::None),
            (
                "file:/etc/gpus.json",
                GpuSourceSpec::File("/etc/gpus.json".into()),
            ),
        ] {
            let config = agent(&["--gpu-source", raw]).unwrap();
            assert_eq!(config.gpu_source, parsed);
            assert_eq!(config.gpu_source.to_string(), raw);
        }
        for bad in ["file:", "nvidia", ""] {
            let error = agent(&["--gpu-source", bad]).unwrap_err().to_string();
            assert!(error.contains("--gpu-source"), "{error}");
        }
        let too_often = agent(&["--gpu-poll-interval", "10ms"]).unwrap();
        assert_eq!(
            too_often.validate().unwrap_err().field,
            "--gpu-poll-interval"
        );
    }
}
