//! The coordinator's HTTP listener (`--http-listen`): the live dashboard at
//! `/`, the fleet as JSON at `/api/nodes`, node events as server-sent
//! events at `/events`, and Prometheus metrics at `/metrics`.
//!
//! Invariants:
//! - With an admin token, nothing about the fleet is served without it: `/`,
//!   `/api/nodes` and `/events` need the session cookie that `/login` sets
//!   (or the token as `Authorization: Bearer`). Only the login page, the
//!   static assets (the same in every binary) and `/metrics` are public.
//! - The page, its stylesheet and script are embedded in the binary, and the
//!   page loads nothing from anywhere else (its Content-Security-Policy
//!   says so to the browser).
//! - The dashboard reads the fleet through [`Fleet`] alone: the registry's
//!   view and the event source that WatchNodes serves from.
//! - Every response streaming events ends when the coordinator shuts down,
//!   so the listener's graceful shutdown never waits on an open page.

mod events;
mod session;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};
use futures::{future::BoxFuture, stream::BoxStream};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{auth::Token, error::RunError, grpc, proto, telemetry, wire::json::NodeJson};

/// A watch of the fleet's events: each item is the next event, or why the
/// watch ended (then it yields nothing more).
pub type NodeEvents = BoxStream<'static, Result<proto::NodeEvent, String>>;

/// Why a watch could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefused {
    /// The revision is older than the history, or newer than the database
    /// has issued (it was replaced): list again from a snapshot.
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unavailable(String),
}

/// What the dashboard needs of the coordinator.
pub trait Fleet: Send + Sync + 'static {
    /// Every node, as ListNodes answers.
    fn nodes(&self) -> proto::ListNodesResponse;

    /// The events after `since_revision`, as WatchNodes streams them: with
    /// 0, a snapshot first.
    fn watch(&self, since_revision: u64) -> BoxFuture<'static, Result<NodeEvents, WatchRefused>>;
}

/// The bound HTTP listener.
pub struct HttpListener {
    listener: TcpListener,
    address: SocketAddr,
}

impl HttpListener {
    pub fn local_address(&self) -> SocketAddr {
        self.address
    }
}

/// Binds `address` for [`serve`].
pub async fn bind(address: SocketAddr) -> Result<HttpListener, RunError> {
    let (listener, address) = grpc::bind(address).await?;
    Ok(HttpListener { listener, address })
}

/// What the listener serves from.
pub struct Sources {
    pub fleet: Arc<dyn Fleet>,
    /// Rendered at `/metrics`.
    pub metrics: PrometheusHandle,
    /// Required of everything about the fleet, when set.
    pub admin_token: Option<Token>,
}

/// Everything a request handler reads.
#[derive(Clone)]
struct Dashboard {
    fleet: Arc<dyn Fleet>,
    admin_token: Option<Token>,
    /// Ends every open event stream.
    shutdown: CancellationToken,
}

/// Serves the dashboard on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: HttpListener, sources: Sources, shutdown: CancellationToken) {
    let dashboard = Dashboard {
        fleet: sources.fleet,
        admin_token: sources.admin_token,
        shutdown: shutdown.clone(),
    };
    let served = axum::serve(listener.listener, router(dashboard, sources.metrics))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        warn!(%error, "the HTTP listener failed");
    }
}

fn router(dashboard: Dashboard, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/login", get(session::login_page).post(session::log_in))
        .route("/logout", axum::routing::post(session::log_out))
        .route("/api/nodes", get(nodes))
        .route("/events", get(events::events))
        .route("/assets/dashboard.css", get(stylesheet))
        .route("/assets/dashboard.js", get(script))
        .route("/metrics", get(telemetry::render_route(metrics)))
        .with_state(dashboard)
        .layer(axum::middleware::map_response(secure_headers))
}

const INDEX_HTML: &str = include_str!("assets/index.html");
/// The log-out button, shown only when there is a login.
const LOGOUT_HIDDEN: &str = r#"<form id="logout" method="post" action="/logout" hidden>"#;
const LOGOUT_SHOWN: &str = r#"<form id="logout" method="post" action="/logout">"#;
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");

/// Headers on every response: nothing framed, sniffed, referred or loaded
/// from elsewhere.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn page(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let Some(token) = dashboard.admin_token.as_ref() else {
        return Html(INDEX_HTML).into_response();
    };
    if !session::admitted(Some(token), &headers) {
        return Redirect::to("/login").into_response();
    }
    Html(INDEX_HTML.replace(LOGOUT_HIDDEN, LOGOUT_SHOWN)).into_response()
}

async fn stylesheet() -> Response {
    static_asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

async fn script() -> Response {
    static_asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

fn static_asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/nodes`: every node in the shape `muster nodes list --output
/// json` prints, and the expiry guard's state while it holds expiry back.
#[derive(Serialize)]
struct NodesJson<'a> {
    nodes: Vec<NodeJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiry_paused: Option<ExpiryPausedJson>,
}

#[derive(Serialize)]
struct ExpiryPausedJson {
    nodes_down: u64,
    nodes_known: u64,
    guard_fraction: f64,
}

async fn nodes(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    if !session::admitted(dashboard.admin_token.as_ref(), &headers) {
        return session::unauthorized();
    }
    let listed = dashboard.fleet.nodes();
    Json(NodesJson {
        nodes: listed.nodes.iter().map(NodeJson::from).collect(),
        expiry_paused: listed.expiry_paused.map(|paused| ExpiryPausedJson {
            nodes_down: paused.nodes_down,
            nodes_known: paused.nodes_known,
            guard_fraction: paused.guard_fraction,
        }),
    })
    .into_response()
}

/// A JSON error body, `{"error": message}`.
fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
