//! gRPC plumbing shared by the coordinator, the agent and the CLI: binding,
//! HTTP/2 keepalive, TLS, reflection (v1 and v1alpha), serving until
//! cancelled within [`ConnectionLimits`], and dialling a peer's URL.
//!
//! Every server answers a request over [`MAX_MESSAGE_BYTES`] with
//! RESOURCE_EXHAUSTED, like every other limit it enforces.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{
    FutureExt, TryFutureExt,
    future::{BoxFuture, MapOk},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status,
    codegen::http,
    server::NamedService,
    transport::{Channel, Endpoint, Server, server::Router},
};
use tower::{
    Layer, Service,
    layer::util::{Identity, Stack},
};

use crate::{
    connections::{self, ConnectionLimits, StreamCountLayer},
    error::{RunError, ServiceError, display_chain},
    memory, proto,
    tls::Tls,
};

/// The layers every muster server puts in front of its services.
pub type Layers = Stack<OversizedLayer, Stack<StreamCountLayer, Stack<RoleLayer, Identity>>>;
/// A server builder with [`Layers`], from [`server`].
pub type Builder = Server<Layers>;
/// A server's services, ready for [`serve`].
pub type Routes = Router<Layers>;

/// Request metadata with which the coordinator marks its Status probes, so
/// an agent can tell a returning coordinator from a monitoring tool.
pub const PROBE_METADATA: &str = "x-muster-probe";

/// Response metadata of every coordinator answer: `leader` or `standby`.
pub const ROLE_METADATA: &str = "x-muster-role";

/// The largest request message our services accept. Every valid message is
/// far smaller; anything bigger is refused before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The largest answer our own clients read. Lists grow with the fleet
/// (10,000 nodes with 8 GPUs each make a `ListNodesResponse` of about
/// 5.4 MB, past tonic's default of 4 MiB), so clients accept far more than
/// any fleet one coordinator holds.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024 * 1024;

/// Binds `address`; port 0 picks a free port, reported in the result.
pub async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), RunError> {
    let bind_error = |source| RunError::Bind { address, source };
    let listener = TcpListener::bind(address).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// How long an agent's server waits on a silent connection before it pings
/// it, and then for the answer. Keepalive only clears away connections whose
/// peer is gone, so it is deliberately lenient.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// The same for the coordinator, whose connections carry heartbeats: a ping
/// goes out only after this long without a frame, so it must exceed the
/// longest heartbeat interval in use, or every connection of a large fleet
/// (intervals of 10 s and more) is pinged once an interval for nothing.
/// Silent agents are judged by the sweeper long before this.
pub const COORDINATOR_KEEPALIVE: Duration = Duration::from_secs(300);

/// A server builder whose HTTP/2 keepalive pings a connection silent for
/// `keepalive`, so one whose peer is gone is closed even while no request
/// is in flight; it serves TLS when `tls` is set, and a TLS handshake must
/// end within `handshake_timeout`.
pub fn server(
    tls: Option<&Tls>,
    keepalive: Duration,
    handshake_timeout: Duration,
) -> Result<Builder, RunError> {
    server_in_role(tls, keepalive, handshake_timeout, RoleLayer(None))
}

/// [`server`] for a process with a role among its peers: every response
/// names the role in [`ROLE_METADATA`], and `roles` may refuse a call
/// before any handler runs.
pub fn server_in_role(
    tls: Option<&Tls>,
    keepalive: Duration,
    handshake_timeout: Duration,
    roles: RoleLayer,
) -> Result<Builder, RunError> {
    let server = Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .tcp_nodelay(true)
        .layer(roles)
        .layer(StreamCountLayer)
        .layer(OversizedLayer);
    match tls {
        None => Ok(server),
        Some(tls) => server
            .tls_config(tls.server_config(handshake_timeout)?)
            .map_err(|e| RunError::Tls {
                reason: display_chain(&e),
            }),
    }
}

/// An endpoint for `url`, which must be `https` exactly when this process
/// has TLS configured: credentials never travel in plaintext from a process
/// set up for TLS, and an `https` URL is never dialled unverified.
pub fn endpoint(url: &str, tls: Option<&Tls>) -> Result<Endpoint, RunError> {
    let connect_error = |source| RunError::Connect {
        url: url.to_owned(),
        source,
    };
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(connect_error)?
        .tcp_nodelay(true);
    let https = endpoint.uri().scheme_str() == Some("https");
    match (https, tls) {
        (false, None) => Ok(endpoint),
        (true, Some(tls)) => endpoint
            .tls_config(tls.client_config(url)?)
            .map_err(connect_error),
        (true, None) => Err(RunError::Tls {
            reason: format!("{url} uses https: give --tls-ca, the CA that signed its certificate"),
        }),
        (false, Some(_)) => Err(RunError::Tls {
            reason: format!("{url} is plain http, but TLS is configured; use an https URL"),
        }),
    }
}

/// Connects to `url` through `endpoint` within `timeout`, name lookup
/// included. The endpoint's own connect timeout covers only the TCP connect,
/// and a host cut off from its DNS server waits on a lookup for ten seconds
/// or more.
pub async fn connect(
    endpoint: Endpoint,
    url: &str,
    timeout: Duration,
) -> Result<Channel, RunError> {
    tokio::time::timeout(timeout, endpoint.connect_timeout(timeout).connect())
        .await
        .map_err(|_| RunError::ConnectTimeout {
            url: url.to_owned(),
            timeout,
        })?
        .map_err(|source| RunError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// Adds gRPC server reflection, both `v1` and `v1alpha`: many tools in daily
/// use (grpcurl before 1.8.8, Postman, k6, evans) speak only `v1alpha`.
/// Only `services` (the muster services this server implements), health
/// and reflection itself are advertised.
pub fn with_reflection(router: Routes, services: &[&str]) -> Result<Routes, RunError> {
    let advertised: Vec<&str> = services
        .iter()
        .copied()
        .chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
        .collect();
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        advertised
            .iter()
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    Ok(router
        .add_service(
            builder()
                .build_v1()?
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            builder()
                .build_v1alpha()?
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        ))
}

/// How long in-flight calls and streams may take to finish after shutdown
/// begins, before their connections are closed regardless.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the connections accepted on `listener` within `limits` until
/// `shutdown` is cancelled, then lets in-flight calls finish for up to
/// [`DRAIN_TIMEOUT`]. Long-lived streams a client keeps open (a health
/// watch, grpcurl's reflection stream, a half-open connection) cannot hold
/// the process up beyond that.
pub async fn serve(
    router: Routes,
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (incoming, tally) = connections::incoming(listener, limits);
    let trimming = memory::trim_after_closes(move || tally.closed());
    let server = router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        served = server => served?,
        () = trimming => {}
        () = drain_deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "connections still open after the drain timeout; not waiting for them");
        }
    }
    Ok(())
}

/// Rewrites tonic's OUT_OF_RANGE for a request message over the decoding
/// limit, which it sends before any handler runs (and only that one, told
/// by its wording), through the one mapping
/// into [`Status`], which makes it RESOURCE_EXHAUSTED. Streams that fail
/// later reach that mapping through their handler.
#[derive(Clone, Copy, Debug, Default)]
pub struct OversizedLayer;

impl<S> Layer<S> for OversizedLayer {
    type Service = Oversized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversized { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Oversized<S> {
    inner: S,
}

impl<S: NamedService> NamedService for Oversized<S> {
    const NAME: &'static str = S::NAME;
}

type ResponseMap<R> = fn(http::Response<R>) -> http::Response<R>;

impl<S, B, R> Service<http::Request<B>> for Oversized<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MapOk<S::Future, ResponseMap<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner.call(request).map_ok(map_oversized)
    }
}

/// How tonic words its OUT_OF_RANGE for a message over a size limit. Other
/// OUT_OF_RANGE answers are ours (a watch from a pruned revision) and pass
/// as they are.
const TONIC_SIZE_LIMIT: &str = "message length too large";

fn map_oversized<R>(mut response: http::Response<R>) -> http::Response<R> {
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() == Code::OutOfRange
        && status.message().contains(TONIC_SIZE_LIMIT)
    {
        let status = Status::from(ServiceError::Inbound(status));
        if let Err(error) = status.add_header(response.headers_mut()) {
            tracing::warn!(%error, "cannot rewrite a refused request's status");
        }
    }
    response
}

/// A process's role among peers that share one database, as its server
/// reports it on every response and enforces before any handler runs.
pub trait RolePolicy: Send + Sync + 'static {
    /// The role's name, sent in [`ROLE_METADATA`].
    fn role(&self) -> &'static str;
    /// The refusal of a call to `path` that this role does not serve.
    fn refuse(&self, path: &str) -> Option<Status>;
}

/// The outermost layer of a server: stamps [`ROLE_METADATA`] on every
/// response, its own refusals included. Without a policy it does nothing.
#[derive(Clone, Default)]
pub struct RoleLayer(pub Option<Arc<dyn RolePolicy>>);

impl<S> Layer<S> for RoleLayer {
    type Service = InRole<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InRole {
            inner,
            policy: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InRole<S> {
    inner: S,
    policy: Option<Arc<dyn RolePolicy>>,
}

impl<S: NamedService> NamedService for InRole<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for InRole<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(policy) = self.policy.clone() else {
            return self.inner.call(request).boxed();
        };
        if let Some(refused) = policy.refuse(request.uri().path()) {
            let mut response = refused.into_http::<R>();
            stamp_role(policy.role(), &mut response);
            return futures::future::ready(Ok(response)).boxed();
        }
        self.inner
            .call(request)
            .map_ok(move |mut response| {
                stamp_role(policy.role(), &mut response);
                response
            })
            .boxed()
    }
}

fn stamp_role<R>(role: &'static str, response: &mut http::Response<R>) {
    response
        .headers_mut()
        .insert(ROLE_METADATA, http::HeaderValue::from_static(role));
}
