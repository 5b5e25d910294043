//! The agent's link to the coordinator: one Heartbeat stream at a time,
//! re-established for as long as the agent runs.
//!
//! Every new stream starts with `register`. When a stream fails, ends, or the
//! coordinator goes silent (no ack for three heartbeat intervals; HTTP/2
//! keepalive covers a dead connection), the link waits an exponentially
//! growing delay with full jitter (the first within a second, capped at
//! `--max-backoff`, 30 s by default) and tries again. Missing acks, not HTTP/2 keepalive, are what judge the
//! coordinator: keepalive would also tear down a stream the agent is keeping
//! open across a coordinator's pause (see [`AbandonedStream`]). The delay starts over after a stream that stayed
//! registered for a while, and is cut short when a coordinator probes the
//! agent's Status service: a coordinator that probes is back.
//!
//! Every `register` carries the GPU feed's inventory; a heartbeat carries it
//! only when the feed has changed since the stream last sent it.
//!
//! With several coordinators (`--coordinator A,B,C`), the link is on one of
//! them at a time, and moves on when it fails (see [`failover`]): to the
//! leader a standby named in its UNAVAILABLE refusal at once, if that
//! leader is in the list; otherwise to the next URL, after the backoff.
//! Each move logs one line naming both URLs and why. With one URL, the link
//! behaves exactly as with a single coordinator.
//!
//! Fencing: the link remembers the highest `leader_epoch` any `registered`
//! carried, in memory for the life of the process (it is not persisted; a
//! restarted agent trusts the first leader it reaches). A `registered` with
//! a lower epoch comes from a deposed leader: the stream is closed at once,
//! before any heartbeat, and the link moves on as after a failure. Epoch 0
//! is a single coordinator that arbitrates no leadership (SQLite): it is
//! always accepted and raises nothing.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, transport::Endpoint};
use tracing::{error, info, warn};

use super::gpu::GpuFeed;
use crate::{
    auth::Token,
    error::{RunError, display_chain},
    failover::{self, CoordinatorUrls, Cursor},
    grpc,
    proto::{
        self, AgentMessage, agent_message, coordinator_client::CoordinatorClient,
        coordinator_message,
    },
};

const FIRST_RETRY_CEILING: Duration = Duration::from_secs(1);
/// The longest an agent waits between attempts by default
/// (`--max-backoff`); a restarted coordinator's reload grace allows for it.
pub const DEFAULT_MAX_BACKOFF: Duration = crate::node::DEFAULT_MAX_BACKOFF;
/// How long a coordinator may take to answer `register`. Generous, so that a
/// coordinator that was paused for a while answers the attempt already made
/// rather than finding a pile of abandoned ones when it resumes.
const REGISTERED_TIMEOUT: Duration = Duration::from_secs(30);
/// Used if the coordinator's `registered` carries no usable interval.
const FALLBACK_INTERVAL: Duration = Duration::from_secs(5);
const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Acks missed in a row before the coordinator counts as silent.
const SILENT_AFTER_INTERVALS: u32 = 3;
/// A stream registered at least this long counts as healthy: the backoff
/// starts over after it. A shorter one (say, two agents fighting over one
/// node id) keeps backing off.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Connect(RunError),
    #[error("the coordinator refused the stream ({:?}): {}", .0.code(), .0.message())]
    Refused(Status),
    #[error("no registered reply within {0:?}")]
    NoReply(Duration),
    #[error("the stream failed ({:?}): {}", .0.code(), .0.message())]
    Stream(Status),
    #[error("the coordinator closed the stream")]
    Closed,
    #[error("no ack from the coordinator for {0:?}")]
    Silent(Duration),
    #[error("unexpected message from the coordinator: {0}")]
    Unexpected(&'static str),
    #[error(
        "a deposed leader: it registered this agent at leader epoch {epoch}, but epoch {highest} was seen before"
    )]
    Deposed { epoch: u64, highest: u64 },
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl LinkError {
    /// The leader's URL, if the coordinator refused as a standby naming it.
    fn leader_hint(&self) -> Option<String> {
        match self {
            Self::Stream(status) | Self::Refused(status) => failover::leader_hint(status),
            _ => None,
        }
    }

    /// What the operator must do about this error, if it will not go away by
    /// retrying alone.
    fn needs_attention(&self) -> Option<&'static str> {
        let code = match self {
            Self::Stream(status) | Self::Refused(status) => status.code(),
            _ => return None,
        };
        match code {
            tonic::Code::Aborted => Some(
                "another stream registered as this node; is a second agent using the same node id?",
            ),
            tonic::Code::PermissionDenied => Some(
                "the coordinator holds this node id for another machine (a different node secret)",
            ),
            tonic::Code::Unauthenticated => {
                Some("the coordinator refused this agent's credentials; check --join-token-file")
            }
            tonic::Code::InvalidArgument => {
                Some("the coordinator refused this agent's registration")
            }
            _ => None,
        }
    }
}

/// Full-jitter exponential backoff: each delay is uniform between zero and a
/// ceiling that doubles from `first_ceiling` up to `max`.
struct ReconnectBackoff {
    ceilings: ExponentialBackoff,
    max: Duration,
}

impl ReconnectBackoff {
    /// The first ceiling is one second, or the heartbeat interval the
    /// coordinator last gave if longer: a fleet it has slowed down to keep
    /// its heartbeats under a cap spreads its reconnects as widely, so a
    /// restart brings no more registrations per second than heartbeats.
    /// Neither exceeds `max`.
    fn new(interval: Duration, max: Duration) -> Self {
        let first_ceiling = interval.max(FIRST_RETRY_CEILING).min(max);
        let ceilings = ExponentialBuilder::default()
            .with_min_delay(first_ceiling)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times()
            .build();
        Self { ceilings, max }
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceilings.next().unwrap_or(self.max).min(self.max);
        rand::random_range(Duration::ZERO..=ceiling)
    }
}

/// The coordinators a link may dial, each with the endpoint to dial it by.
pub struct Coordinators {
    urls: CoordinatorUrls,
    endpoints: Vec<Endpoint>,
}

impl Coordinators {
    /// Each of `urls` with the endpoint `endpoint` makes for it.
    pub fn new<E>(
        urls: CoordinatorUrls,
        endpoint: impl FnMut(&str) -> Result<Endpoint, E>,
    ) -> Result<Self, E> {
        let endpoints = urls
            .urls()
            .iter()
            .map(String::as_str)
            .map(endpoint)
            .collect::<Result<_, E>>()?;
        Ok(Self { urls, endpoints })
    }

    fn url(&self, index: usize) -> &str {
        self.urls.get(index)
    }

    fn endpoint(&self, index: usize) -> &Endpoint {
        &self.endpoints[index % self.endpoints.len()]
    }
}

/// The highest leader epoch a `registered` carried; see the module docs.
#[derive(Debug, Default)]
struct Fence {
    highest: u64,
}

impl Fence {
    /// Accepts `epoch` unless it is older than one seen before; 0 (a single
    /// coordinator) is always accepted.
    fn admit(&mut self, epoch: u64) -> Result<(), LinkError> {
        if epoch == 0 {
            return Ok(());
        }
        if epoch < self.highest {
            return Err(LinkError::Deposed {
                epoch,
                highest: self.highest,
            });
        }
        self.highest = epoch;
        Ok(())
    }
}

/// What the agent registers with, and where.
pub struct Link {
    pub coordinators: Coordinators,
    /// Sent on every new stream; its inventory is replaced by the feed's.
    pub register: proto::Register,
    pub gpus: GpuFeed,
    pub join_token: Option<Token>,
    /// Told what happens on the link; the swarm simulator measures with it.
    pub events: Arc<dyn LinkEvents>,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// Limit of one connection attempt. It covers the name lookup, which the
    /// endpoint's own connect timeout does not: a host cut off from its DNS
    /// server can wait on a lookup far longer than on a TCP connect.
    pub connect_timeout: Duration,
    /// On shutdown, send `leave` on a registered stream and wait this long
    /// for `left`, so the node shows LEFT rather than OFFLINE; `None` just
    /// hangs up.
    pub leave_timeout: Option<Duration>,
}

/// Hooks called as a link runs. They must return quickly: they run on the
/// link's own task.
pub trait LinkEvents: Send + Sync {
    /// A stream registered, `attempt` after its connection was begun.
    fn registered(&self, _attempt: Duration) {}
    /// A heartbeat was acknowledged `round_trip` after it was sent.
    fn acked(&self, _round_trip: Duration) {}
    /// The link failed and will be tried again.
    fn failed(&self, _error: &(dyn std::error::Error + 'static)) {}
}

/// For a link nobody watches.
pub struct Unobserved;

impl LinkEvents for Unobserved {}

/// Keeps the agent registered until `shutdown` is cancelled. A notification
/// on `probed` cuts a backoff short.
pub async fn run(link: Link, probed: Arc<Notify>, shutdown: CancellationToken) {
    let mut interval = FIRST_RETRY_CEILING;
    let mut backoff = ReconnectBackoff::new(interval, link.max_backoff);
    let mut abandoned = None;
    let mut cursor = Cursor::new(&link.coordinators.urls);
    let mut fence = Fence::default();
    loop {
        let mut registered_at = None;
        let from = cursor.current();
        let error = hold_stream(
            &link,
            from,
            &mut fence,
            &mut registered_at,
            &mut interval,
            &mut abandoned,
            &shutdown,
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        if registered_at.is_some() {
            cursor.succeeded();
        }
        if registered_at.is_some_and(|at: Instant| at.elapsed() >= HEALTHY_AFTER) {
            backoff = ReconnectBackoff::new(interval, link.max_backoff);
        }
        link.events.failed(&error);
        let hint = error.leader_hint();
        let switch = cursor.after_failure(&link.coordinators.urls, hint.as_deref());
        let to = switch.to();
        let error_text = display_chain(&error);
        if switch.immediate() {
            info!(
                from = %link.coordinators.url(from),
                to = %link.coordinators.url(to),
                reason = %switch.reason(),
                error = %error_text,
                "switching coordinator now"
            );
            continue;
        }
        let delay = backoff.next_delay();
        if let Some(attention) = error.needs_attention() {
            error!(error = %error_text, retry_in = ?delay, "{attention}");
        } else if let failover::Switch::HintRefused { hint, .. } = &switch {
            warn!(
                from = %link.coordinators.url(from),
                to = %link.coordinators.url(to),
                %hint,
                error = %error_text,
                retry_in = ?delay,
                "not following a leader hint to a URL outside --coordinator"
            );
        } else if to != from {
            warn!(
                from = %link.coordinators.url(from),
                to = %link.coordinators.url(to),
                reason = %switch.reason(),
                error = %error_text,
                retry_in = ?delay,
                "switching coordinator"
            );
        } else {
            warn!(error = %error_text, retry_in = ?delay, "coordinator link down");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
            () = probed.notified() => info!("probed by a coordinator; reconnecting now"),
        }
    }
}

/// A stream given up on because the coordinator went silent. It stays open,
/// without heartbeats, until a new stream has registered: a coordinator that
/// was only paused then sees the newer session before the older one ends, so
/// the node is never shown OFFLINE for the switch.
struct AbandonedStream {
    _outbound: mpsc::Sender<AgentMessage>,
    _inbound: tonic::Streaming<proto::CoordinatorMessage>,
}

/// Opens one stream, registers and heartbeats until something goes wrong.
/// Sets `registered_at` once the coordinator has accepted the registration,
/// and `interval` to the heartbeat interval it gives; then lets go of any
/// `abandoned` stream, and leaves this one there if the coordinator goes
/// silent.
async fn hold_stream(
    link: &Link,
    target: usize,
    fence: &mut Fence,
    registered_at: &mut Option<Instant>,
    interval: &mut Duration,
    abandoned: &mut Option<AbandonedStream>,
    shutdown: &CancellationToken,
) -> LinkError {
    let attempt_began = Instant::now();
    let url = link.coordinators.url(target);
    let endpoint = link.coordinators.endpoint(target).clone();
    let connected = tokio::select! {
        () = shutdown.cancelled() => return LinkError::ShuttingDown,
        connected = grpc::connect(endpoint, url, link.connect_timeout) => connected,
    };
    let channel = match connected {
        Ok(channel) => channel,
        Err(error) => return LinkError::Connect(error),
    };
    let (outbound, receiver) = mpsc::channel(4);
    let mut gpus = link.gpus.clone();
    let mut register = link.register.clone();
    register.inventory = {
        let inventory = gpus.borrow_and_update();
        (!inventory.is_empty()).then(|| proto::GpuInventory::from(&*inventory))
    };
    let register = AgentMessage {
        kind: Some(agent_message::Kind::Register(register)),
    };
    if outbound.send(register).await.is_err() {
        return LinkError::Closed;
    }
    let registration = async {
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        if let Some(token) = &link.join_token {
            token.attach_as_join(request.metadata_mut());
        }
        let mut inbound = CoordinatorClient::new(channel)
            .heartbeat(request)
            .await
            .map_err(LinkError::Refused)?
            .into_inner();
        match inbound.message().await {
            Err(status) => Err(LinkError::Refused(status)),
            Ok(None) => Err(LinkError::Closed),
            Ok(Some(proto::CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Registered(accepted)),
            })) => Ok((inbound, accepted)),
            Ok(Some(_)) => Err(LinkError::Unexpected(
                "expected registered as the first reply",
            )),
        }
    };
    let registration = tokio::select! {
        () = shutdown.cancelled() => return LinkError::ShuttingDown,
        registration = tokio::time::timeout(REGISTERED_TIMEOUT, registration) => registration,
    };
    let (mut inbound, accepted) = match registration {
        Err(_) => return LinkError::NoReply(REGISTERED_TIMEOUT),
        Ok(Err(error)) => return error,
        Ok(Ok(registered)) => registered,
    };
    if let Err(deposed) = fence.admit(accepted.leader_epoch) {
        return deposed;
    }
    *registered_at = Some(Instant::now());
    *abandoned = None;
    link.events.registered(attempt_began.elapsed());
    *interval = usable_interval(accepted.heartbeat_interval).unwrap_or(FALLBACK_INTERVAL);
    info!(
        coordinator = %url,
        leader_epoch = accepted.leader_epoch,
        generation = accepted.session_generation,
        coordinator_boot_id = %accepted.coordinator_boot_id,
        interval = ?interval,
        "registered with the coordinator"
    );

    let mut silent_after = *interval * SILENT_AFTER_INTERVALS;
    let mut ticker = heartbeat_ticker(Instant::now() + *interval, *interval);
    let mut last_ack = Instant::now();
    let mut sequence = 0u64;
    let mut sent_at = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Some(timeout) = link.leave_timeout {
                    leave(&outbound, &mut inbound, timeout).await;
                }
                return LinkError::ShuttingDown;
            }
            _ = ticker.tick() => {
                sequence += 1;
                sent_at = Instant::now();
                let inventory = match gpus.has_changed() {
                    Ok(true) => Some(proto::GpuInventory::from(&*gpus.borrow_and_update())),
                    Ok(false) | Err(_) => None,
                };
                let heartbeat = proto::Heartbeat { sequence, inventory };
                let heartbeat = AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
                };
                if outbound.send(heartbeat).await.is_err() {
                    return LinkError::Closed;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(proto::CoordinatorMessage { kind: Some(coordinator_message::Kind::Ack(ack)) })) => {
                    last_ack = Instant::now();
                    if ack.sequence == sequence {
                        link.events.acked(last_ack - sent_at);
                    }
                    if let Some(retuned) = usable_interval(ack.heartbeat_interval) {
                        info!(interval = ?retuned, "the coordinator changed the heartbeat interval");
                        *interval = retuned;
                        silent_after = retuned * SILENT_AFTER_INTERVALS;
                        ticker = heartbeat_ticker(last_ack + retuned, retuned);
                    }
                }
                Ok(Some(proto::CoordinatorMessage { kind: Some(coordinator_message::Kind::Registered(_)) })) => {
                    return LinkError::Unexpected("a second registered on one stream");
                }
                Ok(Some(proto::CoordinatorMessage { kind: Some(coordinator_message::Kind::Left(_)) })) => {
                    return LinkError::Unexpected("left before this agent sent leave");
                }
                Ok(Some(proto::CoordinatorMessage { kind: None })) => {}
                Ok(None) => return LinkError::Closed,
                Err(status) => return LinkError::Stream(status),
            },
            () = tokio::time::sleep_until(last_ack + silent_after) => {
                *abandoned = Some(AbandonedStream { _outbound: outbound, _inbound: inbound });
                return LinkError::Silent(silent_after);
            }
        }
    }
}

/// Heartbeats every `period` from `first`. An agent held up for several
/// periods (a paused VM, a starved process) sends one heartbeat, not one per
/// period missed, and then keeps its old phase: a fleet held up together
/// does not come back in step, which would send every heartbeat of the
/// fleet at the same instant from then on.
fn heartbeat_ticker(first: Instant, period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticker
}

/// A heartbeat interval from the coordinator, no shorter than we accept.
fn usable_interval(interval: Option<prost_types::Duration>) -> Option<Duration> {
    interval
        .and_then(|d| Duration::try_from(d).ok())
        .map(|d| d.max(MIN_INTERVAL))
}

/// Tells the coordinator this agent is leaving on purpose, and waits at most
/// `timeout` for it to be recorded.
async fn leave(
    outbound: &mpsc::Sender<AgentMessage>,
    inbound: &mut tonic::Streaming<proto::CoordinatorMessage>,
    timeout: Duration,
) {
    let leave = AgentMessage {
        kind: Some(agent_message::Kind::Leave(proto::Leave {
            reason: "the agent is shutting down".to_owned(),
        })),
    };
    let acknowledged = tokio::time::timeout(timeout, async {
        outbound.send(leave).await.ok()?;
        loop {
            match inbound.message().await {
                Ok(Some(proto::CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Left(_)),
                })) => return Some(()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    })
    .await;
    match acknowledged {
        Ok(Some(())) => info!("left the fleet: the coordinator shows this node LEFT"),
        Ok(None) | Err(_) => warn!(
            ?timeout,
            "the coordinator did not acknowledge the leave; it will show this node OFFLINE"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_MAX: Duration = DEFAULT_MAX_BACKOFF;

    #[tokio::test(start_paused = true)]
    async fn an_agent_held_up_for_several_periods_sends_one_heartbeat_and_keeps_its_phase() {
        let period = Duration::from_secs(1);
        let first = Instant::now() + Duration::from_millis(300);
        let mut ticker = heartbeat_ticker(first, period);
        assert_eq!(ticker.tick().await, first);

        // Held up (without yielding to the timer) for 4.5 periods.
        tokio::time::advance(Duration::from_millis(4_500)).await;
        let at_once = Duration::ZERO;
        assert!(
            tokio::time::timeout(at_once, ticker.tick()).await.is_ok(),
            "one heartbeat at once"
        );
        assert!(
            tokio::time::timeout(at_once, ticker.tick()).await.is_err(),
            "no second one for the periods missed"
        );
        ticker.tick().await;
        assert_eq!(Instant::now(), first + period * 5, "the old phase kept");
    }

    #[test]
    fn backoff_starts_within_a_second_and_is_capped_at_the_maximum() {
        for max in [
            DEFAULT_MAX,
            Duration::from_secs(2),
            Duration::from_millis(300),
        ] {
            for _ in 0..100 {
                let mut backoff = ReconnectBackoff::new(Duration::from_millis(500), max);
                assert!(backoff.next_delay() <= FIRST_RETRY_CEILING.min(max));
                for _ in 0..20 {
                    assert!(backoff.next_delay() <= max, "{max:?}");
                }
            }
        }
    }

    #[test]
    fn a_slowed_fleet_spreads_its_first_reconnect_over_its_interval() {
        let interval = Duration::from_secs(8);
        let delays: Vec<_> = (0..200)
            .map(|_| ReconnectBackoff::new(interval, DEFAULT_MAX).next_delay())
            .collect();
        assert!(delays.iter().all(|d| *d <= interval));
        assert!(
            delays.iter().any(|d| *d > FIRST_RETRY_CEILING),
            "{delays:?}"
        );
        let capped = ReconnectBackoff::new(Duration::from_secs(600), DEFAULT_MAX).next_delay();
        assert!(capped <= DEFAULT_MAX);
    }

    #[test]
    fn the_fence_refuses_an_older_leader_and_always_admits_epoch_zero() {
        let mut fence = Fence::default();
        fence.admit(0).unwrap();
        fence.admit(3).unwrap();
        fence.admit(3).unwrap();
        fence.admit(5).unwrap();
        match fence.admit(4) {
            Err(LinkError::Deposed { epoch, highest }) => assert_eq!((epoch, highest), (4, 5)),
            other => panic!("{other:?}"),
        }
        fence.admit(0).unwrap();
        fence.admit(6).unwrap();
        assert!(fence.admit(5).is_err());
    }

    #[test]
    fn backoff_is_jittered() {
        let mut backoff = ReconnectBackoff::new(FIRST_RETRY_CEILING, DEFAULT_MAX);
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 1, "{delays:?}");
    }
}
