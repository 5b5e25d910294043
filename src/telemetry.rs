//! Prometheus metrics, rendered at `/metrics` by the coordinator's HTTP
//! listener (`--http-listen`), and on the deprecated `--metrics-listen`
//! address when that is given.
//!
//! The recorder is installed once per process, the first time a listener
//! asks for it, and shared by every coordinator the process starts. While
//! nothing serves metrics no recorder is installed, and every
//! `metrics::counter!` in the code is a no-op.

use std::{net::SocketAddr, sync::OnceLock};

use axum::{Router, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{error::RunError, grpc};

/// The process-wide recorder's handle, installing the recorder on first use.
pub fn recorder() -> Result<PrometheusHandle, RunError> {
    static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    RECORDER
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(RunError::Metrics)
}

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
    let handle = recorder()?;
    let (listener, local) = grpc::bind(address).await?;
    warn!(
        metrics_address = %local,
        "--metrics-listen is deprecated: /metrics is also served on --http-listen; use that and drop --metrics-listen"
    );
    Ok(MetricsListener {
        listener,
        address: local,
        handle,
    })
}

/// Serves `/metrics` until `shutdown` is cancelled.
pub async fn serve(metrics: MetricsListener, shutdown: CancellationToken) {
    let app = Router::new().route("/metrics", get(render_route(metrics.handle)));
    let served = axum::serve(metrics.listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        warn!(%error, "metrics server failed");
    }
}

/// A handler rendering the recorder's metrics in Prometheus' text format.
pub fn render_route(
    handle: PrometheusHandle,
) -> impl Fn() -> std::future::Ready<String> + Clone + Send + Sync + 'static {
    move || std::future::ready(handle.render())
}
