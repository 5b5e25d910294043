//! Prometheus metrics, served at `/metrics` on their own address when the
//! coordinator is given `--metrics-listen`.
//!
//! Without that flag no recorder is installed, and every `metrics::counter!`
//! in the code is a no-op.

use std::net::SocketAddr;

use axum::{Router, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{error::RunError, grpc};

/// A bound metrics listener, with the recorder installed.
pub struct MetricsListener {
    listener: TcpListener,
    address: SocketAddr,
    handle: PrometheusHandle,
}

impl MetricsListener {
    pub fn local_address(&self) -> SocketAddr {
        self.address
    }
}

/// Installs the process-wide recorder and binds `address`.
pub async fn bind(address: SocketAddr) -> Result<MetricsListener, RunError> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| RunError::Metrics(e.to_string()))?;
    let (listener, local) = grpc::bind(address).await?;
    info!(metrics_address = %local, "serving Prometheus metrics at /metrics");
    Ok(MetricsListener {
        listener,
        address: local,
        handle,
    })
}

/// Serves `/metrics` until `shutdown` is cancelled.
pub async fn serve(metrics: MetricsListener, shutdown: CancellationToken) {
    let handle = metrics.handle;
    let app = Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    let served = axum::serve(metrics.listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        warn!(%error, "metrics server failed");
    }
}
