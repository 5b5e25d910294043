//! How every muster server (coordinator, agent, swarm) accepts and keeps
//! TCP connections, so that peers which connect and never speak cannot use
//! up its file descriptors, its memory or its CPU.
//!
//! - At most `max_connections` accepted connections are open at once (one
//!   more for the moment it takes an evicted one to close), so the
//!   descriptors left under the open-file limit stay free for the database,
//!   outgoing probes and logs. When the limit is reached, a new connection
//!   evicts the oldest one that carries no stream; when every connection
//!   carries one, the new one is accepted and closed at once. Either is
//!   counted in `muster_connections_refused_total`. So connections that
//!   never speak can delay, but never lock out, agents and operators.
//! - A connection must send its first [`GREETING_BYTES`] (an HTTP/2
//!   preface, or a TLS client hello) within `handshake_timeout`, or it is
//!   closed.
//! - A connection that carries no stream for `idle_timeout` is closed. One
//!   with a stream open (an agent's Heartbeat, an operator call in flight)
//!   never is: streams are counted by [`StreamCountLayer`] from the moment a
//!   request reaches the services until its response body is dropped.
//! - A failing `accept` never spins: the loop backs off (up to
//!   [`MAX_ACCEPT_BACKOFF`]) and logs one line when an episode starts and
//!   one when it ends, while connections already open are served as usual.
//!   On `EMFILE`/`ENFILE` it releases a spare descriptor to accept and close
//!   the connection that is waiting, so its peer learns at once to retry
//!   instead of hanging in the backlog.

use std::{
    collections::VecDeque,
    fs::File,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, Stream, future::BoxFuture, task::AtomicWaker};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tonic::{
    body::Body,
    codegen::http,
    server::NamedService,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};
use tracing::{debug, info, warn};

/// Time a new connection has to send its first [`GREETING_BYTES`]. Every
/// real client sends them as soon as its TCP connection is up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a connection may stay open without carrying any stream. Clients
/// that keep a channel between calls reconnect transparently.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Open-file descriptors kept out of reach of accepted connections: for the
/// database and its journal, outgoing probes, the metrics listener and logs.
pub const RESERVED_FILES: u64 = 256;

/// The length of the HTTP/2 client preface; a TLS client hello is longer.
pub const GREETING_BYTES: usize = 24;

/// The longest pause between two attempts to accept while accepting fails.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// How often the acceptor, while no new connection arrives, forgets the
/// closed ones it still remembers. It keeps looking while it remembers any:
/// connections that were all open when it started waiting close later.
const FORGET_CLOSED_AFTER: Duration = Duration::from_secs(2);

/// What a server tolerates from the connections it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// The default timeouts, and as many connections as `open_files` allows
    /// once [`RESERVED_FILES`] are set aside.
    pub fn for_open_files(open_files: u64) -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: max_connections_for(open_files),
        }
    }
}

/// How many connections fit under an open-file limit of `open_files`, with
/// [`RESERVED_FILES`] set aside (or half, under a very low limit).
pub fn max_connections_for(open_files: u64) -> usize {
    let reserve = RESERVED_FILES.min(open_files / 2);
    usize::try_from(open_files - reserve)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// How many connections are open, and how many have closed so far.
#[derive(Debug, Default)]
pub struct Tally {
    open: AtomicUsize,
    closed: AtomicUsize,
}

impl Tally {
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::Relaxed)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The connections accepted on `listener`, within `limits`, and their
/// tally. The stream never ends and never yields an error: accept errors
/// are handled here.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> (
    impl Stream<Item = Result<Connection, io::Error>> + Send,
    Arc<Tally>,
) {
    let tally = Arc::new(Tally::default());
    let acceptor = Acceptor {
        listener,
        limits,
        tally: tally.clone(),
        accepted: VecDeque::new(),
        spare: spare_file(),
        failing: None,
    };
    let connections = futures::stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.next().await;
        Some((Ok(connection), acceptor))
    });
    (connections, tally)
}

fn spare_file() -> Option<File> {
    File::open("/dev/null")
        .inspect_err(|error| warn!(%error, "cannot keep a spare file descriptor"))
        .ok()
}

struct Acceptor {
    listener: TcpListener,
    limits: ConnectionLimits,
    tally: Arc<Tally>,
    /// The connections accepted, oldest first, as eviction candidates.
    accepted: VecDeque<Weak<Activity>>,
    spare: Option<File>,
    failing: Option<Failing>,
}

/// An episode of failing accepts.
struct Failing {
    since: Instant,
    failures: u64,
    backoff: Duration,
}

impl Acceptor {
    async fn next(&mut self) -> Connection {
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = tokio::time::sleep(FORGET_CLOSED_AFTER), if !self.accepted.is_empty() => {
                    if self.accepted.len() > self.tally.open() {
                        self.forget_closed();
                    }
                    continue;
                }
            };
            match accepted {
                Ok((stream, _)) => {
                    self.recovered();
                    if self.tally.open() >= self.limits.max_connections && !self.evict_one() {
                        metrics::counter!("muster_connections_refused_total", "action" => "closed")
                            .increment(1);
                        debug!(
                            max_connections = self.limits.max_connections,
                            "refused a connection over the limit"
                        );
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let connection = Connection::new(stream, &self.limits, self.tally.clone());
                    self.remember(&connection.activity);
                    return connection;
                }
                Err(error) if is_per_connection(&error) => {
                    debug!(%error, "a connection failed before it was accepted");
                }
                Err(error) => self.back_off(error).await,
            }
        }
    }

    /// Closes the oldest connection that carries no stream, if there is one.
    fn evict_one(&mut self) -> bool {
        for _ in 0..self.accepted.len() {
            let Some(candidate) = self.accepted.pop_front() else {
                return false;
            };
            let Some(activity) = candidate.upgrade() else {
                continue;
            };
            if activity.evict() {
                metrics::counter!("muster_connections_refused_total", "action" => "evicted")
                    .increment(1);
                debug!(
                    max_connections = self.limits.max_connections,
                    "evicted the oldest connection without a stream"
                );
                return true;
            }
            self.accepted.push_back(candidate);
        }
        false
    }

    fn remember(&mut self, activity: &Arc<Activity>) {
        if self.accepted.len() >= 2 * self.tally.open().max(64) {
            self.forget_closed();
        }
        self.accepted.push_back(Arc::downgrade(activity));
    }

    /// Drops the closed connections from the eviction candidates, and with
    /// them the last reference to their allocations, which would otherwise
    /// stay scattered over the heap and keep its pages resident.
    fn forget_closed(&mut self) {
        self.accepted.retain(|activity| activity.strong_count() > 0);
        self.accepted.shrink_to_fit();
    }

    async fn back_off(&mut self, error: io::Error) {
        let out_of_files = matches!(error.raw_os_error(), Some(EMFILE | ENFILE));
        metrics::counter!(
            "muster_accept_errors_total",
            "error" => if out_of_files { "open_files" } else { "other" }
        )
        .increment(1);
        let failing = self.failing.get_or_insert_with(|| {
            warn!(
                %error,
                open_connections = self.tally.open(),
                "cannot accept connections; backing off, and serving the open ones meanwhile"
            );
            Failing {
                since: Instant::now(),
                failures: 0,
                backoff: MIN_ACCEPT_BACKOFF,
            }
        });
        failing.failures += 1;
        let pause = failing.backoff;
        failing.backoff = (pause * 2).min(MAX_ACCEPT_BACKOFF);
        if out_of_files {
            self.shed_waiting();
        }
        tokio::time::sleep(pause).await;
    }

    /// Frees the spare descriptor to accept the waiting connection and close
    /// it, then takes the spare back.
    fn shed_waiting(&mut self) {
        if self.spare.take().is_some()
            && let Some(Ok(_closed_at_once)) = self.listener.accept().now_or_never()
        {
            metrics::counter!("muster_connections_refused_total").increment(1);
        }
        self.spare = File::open("/dev/null").ok();
    }

    fn recovered(&mut self) {
        if let Some(failing) = self.failing.take() {
            info!(
                failures = failing.failures,
                after = ?failing.since.elapsed(),
                "accepting connections again"
            );
        }
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
    }
}

const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Errors that concern only the connection being accepted, not the
/// listener: the next accept may well succeed at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// What the connection's streams and its acceptor tell its reader: how many
/// streams are open, since when none has been, and whether to close.
#[derive(Debug)]
pub struct Activity {
    streams: AtomicUsize,
    quiet_since: Mutex<Instant>,
    evicted: AtomicBool,
    reader: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            streams: AtomicUsize::new(0),
            quiet_since: Mutex::new(Instant::now()),
            evicted: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }

    /// Marks a connection without streams for closing and wakes its reader;
    /// false if it carries a stream or was evicted already.
    fn evict(&self) -> bool {
        let _no_stream_opens_meanwhile = self
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.streams.load(Ordering::Acquire) > 0 || self.evicted.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.reader.wake();
        true
    }

    fn quiet_since(&self) -> Instant {
        *self
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One stream's place in its connection's [`Activity`]; released on drop.
struct OpenStream(Arc<Activity>);

impl OpenStream {
    fn open(activity: Arc<Activity>) -> Self {
        let quiet_since = activity
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        activity.streams.fetch_add(1, Ordering::AcqRel);
        drop(quiet_since);
        Self(activity)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut quiet_since = self
            .0
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *quiet_since = Instant::now();
        }
    }
}

/// The connection information tonic puts in each request's extensions.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    activity: Arc<Activity>,
}

/// An accepted connection, closed by its own reads when it breaks the
/// handshake or idle rules.
pub struct Connection {
    stream: TcpStream,
    activity: Arc<Activity>,
    received: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: Slot,
}

/// One connection's share of `max_connections`; released on drop.
struct Slot(Arc<Tally>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.closed.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("muster_connections_open").decrement(1);
    }
}

impl Connection {
    fn new(stream: TcpStream, limits: &ConnectionLimits, tally: Arc<Tally>) -> Self {
        tally.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("muster_connections_open").increment(1);
        Self {
            stream,
            activity: Arc::new(Activity::new()),
            received: 0,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            _slot: Slot(tally),
        }
    }

    fn greeted(&self) -> bool {
        self.received >= GREETING_BYTES
    }

    /// Polls the connection's deadline; an error when the connection must
    /// be closed, after which its reader sees it fail.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.activity.reader.register(cx.waker());
        if self.activity.evicted.load(Ordering::Acquire) {
            return Some(io::Error::other(
                "evicted: the connection limit was reached and it carried no stream",
            ));
        }
        // Two rounds: a deadline moved forward is polled once more so that
        // it wakes this connection when it is reached.
        for _ in 0..2 {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return None;
            }
            if !self.greeted() {
                metrics::counter!("muster_connections_closed_total", "reason" => "handshake")
                    .increment(1);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {:?}", self.handshake_timeout),
                ));
            }
            let quiet_since = self.activity.quiet_since();
            let next = if self.activity.streams.load(Ordering::Acquire) > 0 {
                Instant::now() + self.idle_timeout
            } else if quiet_since.elapsed() >= self.idle_timeout {
                metrics::counter!("muster_connections_closed_total", "reason" => "idle")
                    .increment(1);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no stream for {:?}", self.idle_timeout),
                ));
            } else {
                quiet_since + self.idle_timeout
            };
            self.deadline.as_mut().reset(next);
        }
        None
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if !this.greeted() => {
                this.received += buf.filled().len() - before;
                if this.greeted() {
                    let idle_deadline = Instant::now() + this.idle_timeout;
                    this.deadline.as_mut().reset(idle_deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => match this.expired(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Counts each request as an open stream of its connection until its
/// response body is dropped, and puts the connection's [`TcpConnectInfo`]
/// where `Request::remote_addr` looks for it.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamCountLayer;

impl<S> Layer<S> for StreamCountLayer {
    type Service = StreamCount<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamCount { inner }
    }
}

#[derive(Clone, Debug)]
pub struct StreamCount<S> {
    inner: S,
}

impl<S: NamedService> NamedService for StreamCount<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for StreamCount<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let info = extensions.get::<ConnectionInfo>().cloned().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(|tls| tls.get_ref().clone())
        });
        let open = info.map(|info| {
            request.extensions_mut().insert(info.tcp);
            OpenStream::open(info.activity)
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match open {
                Some(open) => response.map(|body| Body::new(CountedBody { body, _open: open })),
                None => response,
            })
        })
    }
}

struct CountedBody {
    body: Body,
    _open: OpenStream,
}

impl http_body::Body for CountedBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_of_files_stays_free() {
        assert_eq!(max_connections_for(20_000), 20_000 - 256);
        assert_eq!(max_connections_for(1_024), 768);
        assert_eq!(max_connections_for(100), 50);
        assert_eq!(max_connections_for(0), 1);
    }

    #[test]
    fn streams_keep_a_connection_busy_until_the_last_one_ends() {
        let activity = Arc::new(Activity::new());
        let first = OpenStream::open(activity.clone());
        let second = OpenStream::open(activity.clone());
        drop(first);
        assert_eq!(activity.streams.load(Ordering::Acquire), 1);
        drop(second);
        assert_eq!(activity.streams.load(Ordering::Acquire), 0);
    }
}
