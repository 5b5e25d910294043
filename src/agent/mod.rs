//! The agent daemon: resolves its identity, serves the Agent Status service
//! (with health and reflection), and keeps a Heartbeat stream open to the
//! coordinator through [`reconnect`].

mod identity;
pub mod reconnect;
mod status;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Endpoint;
use tracing::info;

pub use identity::resolve_node_id;
pub use status::{Identity, StatusService};

use crate::{
    config::AgentConfig,
    error::RunError,
    grpc,
    node::{NodeId, Registration, validate_url},
    proto::{self, agent_server::AgentServer},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs an agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let hostname = gethostname::gethostname().to_string_lossy().into_owned();
    let node_id = resolve_node_id(config.node_id.as_deref(), &config.state_dir, &hostname).await?;
    let boot_id = uuid::Uuid::new_v4().to_string();
    let (listener, address) = grpc::bind(config.listen).await?;
    let advertise_url = match config.advertise_url {
        Some(url) => {
            validate_url("--advertise-url", &url)?;
            url
        }
        None => default_advertise_url(address, &hostname),
    };
    let register = register_message(
        &node_id,
        advertise_url.clone(),
        boot_id.clone(),
        hostname.clone(),
        config.labels,
    );
    Registration::try_from(register.clone())?;
    validate_url("--coordinator", &config.coordinator)?;
    let coordinator = Endpoint::from_shared(config.coordinator.clone())
        .map_err(|source| RunError::Connect {
            url: config.coordinator.clone(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<StatusService>>().await;
    let probed = Arc::new(Notify::new());
    let status = StatusService::new(Identity::new(
        node_id.to_string(),
        boot_id.clone(),
        hostname,
        probed.clone(),
    ));
    let router = grpc::server()
        .add_service(health_service)
        .add_service(AgentServer::new(status).max_decoding_message_size(grpc::MAX_MESSAGE_BYTES));
    let router = grpc::with_reflection(router, "muster.v1.Agent")?;
    info!(%address, %node_id, %boot_id, %advertise_url, coordinator = %config.coordinator, "agent listening");

    let tasks = TaskTracker::new();
    tasks.spawn(reconnect::run(
        reconnect::Link {
            coordinator,
            register,
            events: Arc::new(reconnect::Unobserved),
        },
        probed,
        shutdown.clone(),
    ));
    let served = grpc::serve(router, listener, shutdown.clone()).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    info!("agent stopped");
    served
}

/// The `register` message an agent of this version opens its streams with.
pub fn register_message(
    node_id: &NodeId,
    agent_url: String,
    boot_id: String,
    hostname: String,
    labels: Vec<(String, String)>,
) -> proto::Register {
    proto::Register {
        node_id: node_id.to_string(),
        agent_url,
        boot_id,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname,
        labels: labels.into_iter().collect(),
    }
}

/// The listen address as a URL, with the host name in place of an
/// unspecified IP such as `0.0.0.0`.
fn default_advertise_url(listen: SocketAddr, hostname: &str) -> String {
    if listen.ip().is_unspecified() {
        format!("http://{hostname}:{}", listen.port())
    } else {
        format!("http://{listen}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_url_defaults() {
        assert_eq!(
            default_advertise_url("0.0.0.0:7701".parse().unwrap(), "gpu1"),
            "http://gpu1:7701"
        );
        assert_eq!(
            default_advertise_url("127.0.0.1:9".parse().unwrap(), "gpu1"),
            "http://127.0.0.1:9"
        );
        assert_eq!(
            default_advertise_url("[::1]:9".parse().unwrap(), "gpu1"),
            "http://[::1]:9"
        );
    }
}
