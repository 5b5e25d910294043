//! The agent daemon: resolves its identity, serves the Agent Status service
//! (with health and reflection), reads its GPUs through [`gpu`], and keeps a
//! Heartbeat stream open to the coordinator (the leader, of several) through
//! [`reconnect`].

pub mod gpu;
mod identity;
pub mod reconnect;
mod state_lock;
mod status;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

pub use identity::{resolve_node_id, resolve_node_secret};
pub use status::{Identity, StatusService};

use crate::{
    auth::{NodeSecret, Token},
    config::AgentConfig,
    connections::{self, ConnectionLimits},
    error::RunError,
    failover::CoordinatorUrls,
    grpc, limits,
    node::{Claim, NodeId, validate_url},
    proto::{self, agent_server::AgentServer},
    tls::Tls,
};

/// Limit of one attempt to reach the coordinator, name lookup included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutting-down agent waits for the coordinator to record its
/// leave before it exits anyway.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
    let _state_dir_lock = state_lock::lock_state_dir(&config.state_dir).await?;
    let hostname = gethostname::gethostname().to_string_lossy().into_owned();
    let node_id = resolve_node_id(config.node_id.as_deref(), &config.state_dir, &hostname).await?;
    let node_secret = resolve_node_secret(&config.state_dir).await?;
    let join_token =
        Token::from_optional_file("--join-token-file", config.join_token_file.as_deref())?;
    let tls = Tls::load(&config.tls)?;
    let server = grpc::server(
        tls.as_ref(),
        grpc::KEEPALIVE,
        connections::HANDSHAKE_TIMEOUT,
    )?;
    let connection_limits = connection_limits();
    let boot_id = uuid::Uuid::new_v4().to_string();
    let (listener, address) = grpc::bind(config.listen).await?;
    let advertise_url = match config.advertise_url {
        Some(url) => {
            validate_url("--advertise-url", &url)?;
            url
        }
        None => default_advertise_url(address, &hostname, tls.is_some()),
    };
    let register = register_message(
        &node_id,
        advertise_url.clone(),
        boot_id.clone(),
        hostname.clone(),
        config.labels,
        &node_secret,
        config.max_backoff,
    );
    Claim::try_from(register.clone())?;
    let coordinators = reconnect::Coordinators::new(
        CoordinatorUrls::parse("--coordinator", &config.coordinator)?,
        |url| grpc::endpoint(url, tls.as_ref()),
    )?;
    // Last of what can fail at start-up: `auto` without a driver logs a
    // line, and nothing is logged before a start-up error.
    let gpus = gpu::start(&config.gpu_source, config.gpu_poll_interval).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<StatusService>>().await;
    let probed = Arc::new(Notify::new());
    let status = StatusService::new(Identity::new(
        node_id.to_string(),
        boot_id.clone(),
        hostname,
        probed.clone(),
        join_token.clone(),
    ));
    let mut server = server;
    let router = server
        .add_service(health_service.max_decoding_message_size(grpc::MAX_MESSAGE_BYTES))
        .add_service(AgentServer::new(status).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES));
    let router = grpc::with_reflection(router, &["muster.v1.Agent"])?;
    info!(%address, %node_id, %boot_id, %advertise_url, coordinator = %config.coordinator, "agent listening");

    let tasks = TaskTracker::new();
    tasks.spawn(reconnect::run(
        reconnect::Link {
            coordinators,
            register,
            gpus,
            join_token,
            events: Arc::new(reconnect::Unobserved),
            max_backoff: config.max_backoff,
            connect_timeout: CONNECT_TIMEOUT,
            leave_timeout: Some(LEAVE_TIMEOUT),
        },
        probed,
        shutdown.clone(),
    ));
    let served = grpc::serve(router, listener, connection_limits, shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    info!("agent stopped");
    served
}

/// The default connection limits, under this process's open-file limit.
fn connection_limits() -> ConnectionLimits {
    let open_files = limits::open_files()
        .inspect_err(|error| tracing::warn!(%error, "cannot read the open-file limit"))
        .map_or(1_024, |files| files.soft);
    ConnectionLimits::for_open_files(open_files)
}

/// The `register` message an agent of this version opens its streams with.
pub fn register_message(
    node_id: &NodeId,
    agent_url: String,
    boot_id: String,
    hostname: String,
    labels: Vec<(String, String)>,
    node_secret: &NodeSecret,
    max_backoff: Duration,
) -> proto::Register {
    proto::Register {
        node_id: node_id.to_string(),
        agent_url,
        boot_id,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname,
        labels: labels.into_iter().collect(),
        node_secret: node_secret.expose().to_owned(),
        max_backoff: prost_types::Duration::try_from(max_backoff).ok(),
        inventory: None,
    }
}

/// The listen address as a URL, with the host name in place of an
/// unspecified IP such as `0.0.0.0`.
fn default_advertise_url(listen: SocketAddr, hostname: &str, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if listen.ip().is_unspecified() {
        format!("{scheme}://{hostname}:{}", listen.port())
    } else {
        format!("{scheme}://{listen}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_url_defaults() {
        assert_eq!(
            default_advertise_url("0.0.0.0:7701".parse().unwrap(), "gpu1", false),
            "http://gpu1:7701"
        );
        assert_eq!(
            default_advertise_url("127.0.0.1:9".parse().unwrap(), "gpu1", false),
            "http://127.0.0.1:9"
        );
        assert_eq!(
            default_advertise_url("[::1]:9".parse().unwrap(), "gpu1", true),
            "https://[::1]:9"
        );
    }
}
