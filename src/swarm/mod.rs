//! The swarm simulator: many agents in one process, to measure a
//! coordinator at fleet scale.
//!
//! Every simulated agent is the real agent's reconnect loop with its own
//! HTTP/2 connection and Heartbeat stream; connections are spread over
//! several loopback source addresses so that a fleet can outgrow one
//! address's ephemeral ports. One Status listener answers probes for all of
//! them, each agent as itself (see [`status`]). What the links report is
//! gathered in [`stats`] and printed as one JSON line per period on stdout.
//!
//! With `--gpus-per-agent N`, every agent reports N synthetic GPUs, the same
//! for the whole run, so a benchmark's coordinator holds a fleet's worth of
//! inventories.
//!
//! The swarm refuses to start when the open-file limit or the ephemeral port
//! range cannot hold the fleet asked for, rather than failing part-way.

mod stats;
mod status;

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Endpoint;
use tracing::{Instrument, info, warn};

use crate::{
    agent::{Identity, reconnect, register_message},
    auth::NodeSecret,
    config::SwarmConfig,
    connections::{self, ConnectionLimits},
    error::{InvalidInput, RunError},
    failover::CoordinatorUrls,
    grpc, limits,
    node::{Claim, Gpu, GpuInventory, NodeId},
    proto::agent_server::AgentServer,
};

pub use stats::{Exhausted, Report, Stats};

/// Source addresses are 127.0.0.2 and up; 127.0.0.1 is left to everything else.
const FIRST_SOURCE_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Agents advertise 127.64.0.0 plus their number, far from source addresses.
const FIRST_AGENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 64, 0, 0);
/// 127.255.255.255 is the loopback network's broadcast address.
const LAST_LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 255, 255, 255);
/// Files the process needs besides one connection per agent: the listener,
/// probes being answered, the runtime, logs.
const SPARE_FILES: u64 = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the swarm until `shutdown` is cancelled or `--duration` has passed.
pub async fn run(config: SwarmConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let coordinators = CoordinatorUrls::parse("--coordinator", &config.coordinator)?;
    check_capacity(&config)?;
    let (listener, address) = grpc::bind(config.listen).await?;
    let hostname = gethostname::gethostname().to_string_lossy().into_owned();

    let stats = Arc::new(Stats::new(config.agents));
    let mut identities = Vec::with_capacity(config.agents as usize);
    let mut links = Vec::with_capacity(config.agents as usize);
    for index in 0..config.agents {
        let number = config.first_agent + index;
        let node_id = NodeId::parse(
            "--node-prefix",
            &format!("{}-{number:06}", config.node_prefix),
        )?;
        let advertised = agent_address(number)?;
        let boot_id = uuid::Uuid::new_v4().to_string();
        let register = register_message(
            &node_id,
            format!("http://{advertised}:{}", address.port()),
            boot_id.clone(),
            hostname.clone(),
            vec![("swarm".to_owned(), config.node_prefix.clone())],
            &simulated_secret(&node_id)?,
            reconnect::DEFAULT_MAX_BACKOFF,
        );
        let gpus = synthetic_gpus(number, config.gpus_per_agent)?;
        Claim::try_from(register.clone())?;
        let probed = Arc::new(Notify::new());
        identities.push(Identity::new(
            node_id.to_string(),
            boot_id,
            hostname.clone(),
            probed.clone(),
            None,
        ));
        let link = reconnect::Link {
            coordinators: reconnect::Coordinators::new(coordinators.clone(), |url| {
                endpoint(&config, url, index)
            })?,
            register,
            // The sender is dropped: the inventory never changes.
            gpus: watch::channel(gpus).1,
            join_token: None,
            events: Arc::new(stats::AgentEvents::new(stats.clone())),
            max_backoff: reconnect::DEFAULT_MAX_BACKOFF,
            connect_timeout: CONNECT_TIMEOUT,
            // A benchmark's agents vanish together; they do not leave.
            leave_timeout: None,
        };
        links.push((node_id, link, probed));
    }

    let status = status::SwarmStatus::new(agent_address(config.first_agent)?, identities);
    let router = grpc::server(None, grpc::KEEPALIVE, connections::HANDSHAKE_TIMEOUT)?
        .add_service(AgentServer::new(status).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES));
    info!(
        %address,
        agents = config.agents,
        first_agent = config.first_agent,
        source_addresses = config.source_addresses,
        coordinator = %config.coordinator,
        "swarm listening"
    );

    let tasks = TaskTracker::new();
    let open_files = limits::open_files().map_or(1_024, |files| files.soft);
    tasks.spawn(grpc::serve(
        router,
        listener,
        ConnectionLimits::for_open_files(open_files),
        shutdown.clone(),
    ));
    for (node_id, link, probed) in links {
        let span = tracing::info_span!("agent", %node_id);
        tasks.spawn(reconnect::run(link, probed, shutdown.clone()).instrument(span));
    }
    tasks.close();

    report_until_done(&stats, &config, &shutdown).await;
    shutdown.cancel();
    tasks.wait().await;
    print_report(&stats.report());
    Ok(())
}

async fn report_until_done(stats: &Stats, config: &SwarmConfig, shutdown: &CancellationToken) {
    let ends = async {
        match config.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(ends);
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + config.report_every,
        config.report_every,
    );
    let mut told_exhausted = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = &mut ends => return,
            _ = every.tick() => {
                let report = stats.report();
                if !told_exhausted && (report.open_file_failures > 0 || report.port_failures > 0) {
                    told_exhausted = true;
                    warn!(
                        open_file_failures = report.open_file_failures,
                        port_failures = report.port_failures,
                        "connections fail for want of open files or ephemeral ports; \
                         use fewer agents per process, or more --source-addresses"
                    );
                }
                print_report(&report);
            }
        }
    }
}

fn print_report(report: &Report) {
    match serde_json::to_string(report) {
        Ok(line) => println!("{line}"),
        Err(error) => warn!(%error, "cannot encode a report"),
    }
}

/// Memory of a synthetic GPU: an 80 GiB card.
const SYNTHETIC_GPU_MIB: u64 = 81_920;

/// `count` GPUs for agent `number`, with uuids unique in the fleet and
/// memory use and utilisation spread over the range, the same on every run.
fn synthetic_gpus(number: u32, count: u8) -> Result<GpuInventory, InvalidInput> {
    let gpus = (0..u32::from(count))
        .map(|index| {
            let spread = u64::from(number.wrapping_mul(31).wrapping_add(index * 17) % 100);
            Gpu {
                index,
                uuid: format!("GPU-sim-{number:08x}-{index:04x}"),
                name: "SIM-80G".to_owned(),
                memory_total_mib: SYNTHETIC_GPU_MIB,
                memory_used_mib: SYNTHETIC_GPU_MIB * spread / 100,
                utilization_percent: u32::try_from(spread).unwrap_or(0),
                temperature_celsius: 40,
                unhealthy: None,
            }
        })
        .collect();
    GpuInventory::new("--gpus-per-agent", gpus)
}

/// The connection of agent `index` to the coordinator at `url`, from its
/// share of the source addresses.
fn endpoint(config: &SwarmConfig, url: &str, index: u32) -> Result<Endpoint, InvalidInput> {
    let source = u32::from(FIRST_SOURCE_ADDRESS) + index % u32::from(config.source_addresses);
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| InvalidInput::new("--coordinator", e.to_string()))?
        .tcp_nodelay(true)
        .local_address(Some(IpAddr::V4(Ipv4Addr::from(source)))))
}

/// The loopback address agent `number` advertises.
fn agent_address(number: u32) -> Result<Ipv4Addr, InvalidInput> {
    u32::from(FIRST_AGENT_ADDRESS)
        .checked_add(number)
        .map(Ipv4Addr::from)
        .filter(|address| address.octets()[0] == 127 && *address != LAST_LOOPBACK)
        .ok_or_else(|| {
            InvalidInput::new(
                "--first-agent",
                format!("agent {number} has no loopback address left; numbers end at 12582910"),
            )
        })
}

/// Refuses a fleet that the open-file limit (after raising the soft limit to
/// the hard one) or the ephemeral port range could not hold.
fn check_capacity(config: &SwarmConfig) -> Result<(), InvalidInput> {
    if config.agents == 0 {
        return Err(InvalidInput::new("--agents", "must be at least 1"));
    }
    if config.source_addresses == 0 || config.source_addresses > 200 {
        return Err(InvalidInput::new(
            "--source-addresses",
            "must be between 1 and 200",
        ));
    }
    let agents = u64::from(config.agents);
    match limits::raise_open_files() {
        Ok(files) if files.soft < agents + SPARE_FILES => {
            return Err(InvalidInput::new(
                "--agents",
                format!(
                    "{agents} agents need about {} open files, but this process may open only {} \
                     (hard limit {}); run several swarm processes with --first-agent",
                    agents + SPARE_FILES,
                    files.soft,
                    files.hard
                ),
            ));
        }
        Ok(files) => info!(soft = files.soft, hard = files.hard, "open-file limit"),
        Err(error) => warn!(%error, "cannot read or raise the open-file limit"),
    }
    match limits::ephemeral_ports() {
        Ok(ports) => {
            let per_address = agents.div_ceil(u64::from(config.source_addresses));
            if per_address > u64::from(ports) {
                return Err(InvalidInput::new(
                    "--source-addresses",
                    format!(
                        "{agents} agents over {} source addresses need {per_address} ports each, \
                         but the ephemeral port range holds {ports}; add source addresses",
                        config.source_addresses
                    ),
                ));
            }
        }
        Err(error) => warn!(%error, "cannot read the ephemeral port range"),
    }
    Ok(())
}

/// A simulated agent's node secret, derived from its node id so that a swarm
/// started again over the same database keeps its claim to every id. (Real
/// agents keep a random secret on disk.)
fn simulated_secret(node_id: &NodeId) -> Result<NodeSecret, InvalidInput> {
    NodeSecret::parse("simulated node secret", &format!("muster-swarm-{node_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_get_distinct_loopback_addresses() {
        assert_eq!(agent_address(0).unwrap(), Ipv4Addr::new(127, 64, 0, 0));
        assert_eq!(agent_address(65_537).unwrap(), Ipv4Addr::new(127, 65, 0, 1));
        assert_eq!(
            agent_address(12_582_910).unwrap(),
            Ipv4Addr::new(127, 255, 255, 254)
        );
        assert!(agent_address(12_582_911).is_err());
    }
}
