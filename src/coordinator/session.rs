//! One heartbeat session: the life of one Heartbeat stream.
//!
//! The first message must be `register`; [`super::admission`] commits it to
//! the store and applies it to the registry before `registered` is sent.
//! From then on the session needs no store: each heartbeat is checked
//! (sequence numbers strictly increase, the session is still the node's
//! newest), applied to the registry and acknowledged. A heartbeat that
//! carries a GPU inventory replaces the node's; the writer persists it with
//! its next batch.
//!
//! A `leave` (the agent is shutting down on purpose) is recorded in the
//! store before anything else: only once it is durable does the node become
//! LEFT in the registry and the agent get `left`; then the session ends.
//! A leave that cannot be recorded is never acknowledged.
//!
//! However else the stream ends, its node goes OFFLINE at once, unless a
//! newer session of the node exists, the node has left, or the coordinator
//! itself is shutting down (a restart must not show any node as dead). A stream whose node the
//! sweeper has marked OFFLINE, or which a newer session has replaced, is
//! closed once it has been silent for `offline_after`, so no session lingers.

use std::{future::Future, time::Duration, time::SystemTime};

use futures::{Stream, StreamExt};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::RegistryHandle;
use crate::{
    clock::Moment,
    error::{InvalidInput, ServiceError, display_chain},
    node::{Claim, NodeId, NodeState, validate_short_field},
    proto::{self, AgentMessage, CoordinatorMessage, agent_message, coordinator_message},
    registry::{SessionRejected, Timing},
    store::{Store, StoreError},
    wire,
};

pub(super) type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// Waits at most `timeout` for the stream's first message, which must be a
/// valid `register`.
pub async fn read_registration<S>(inbound: &mut S, timeout: Duration) -> Result<Claim, ServiceError>
where
    S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
{
    let first = tokio::time::timeout(timeout, inbound.next())
        .await
        .map_err(|_| ServiceError::RegistrationTimeout(timeout))?;
    match first {
        None => Err(ServiceError::OutOfOrder(
            "the stream ended before its register message".to_owned(),
        )),
        Some(Err(status)) => Err(ServiceError::Inbound(status)),
        Some(Ok(AgentMessage {
            kind: Some(agent_message::Kind::Register(register)),
        })) => Ok(Claim::try_from(register)?),
        Some(Ok(AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(_)),
        })) => Err(ServiceError::OutOfOrder(
            "the first message on a Heartbeat stream must be register, got heartbeat".to_owned(),
        )),
        Some(Ok(AgentMessage {
            kind: Some(agent_message::Kind::Leave(_)),
        })) => Err(ServiceError::OutOfOrder(
            "the first message on a Heartbeat stream must be register, got leave".to_owned(),
        )),
        Some(Ok(AgentMessage { kind: None })) => Err(InvalidInput::new(
            "agent_message.kind",
            "must be set; the first message on a Heartbeat stream must be register",
        )
        .into()),
    }
}

/// Where a session makes a leave durable before it acknowledges it.
pub(super) trait LeaveRecorder: Send + Sync + 'static {
    /// Records that the agent of the session holding `generation` left at
    /// `left_at`; whether that session's row was found.
    fn record_leave(
        &self,
        node_id: NodeId,
        generation: u64,
        left_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

impl LeaveRecorder for Store {
    fn record_leave(
        &self,
        node_id: NodeId,
        generation: u64,
        left_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        Store::record_leave(self, node_id, generation, left_at)
    }
}

/// A registered session, ready to run. It reaches the coordinator only
/// through its registry handle and its leave recorder, so it runs as well
/// over a `Vec` of messages in a unit test as over a gRPC stream.
pub(super) struct Session<L = Store> {
    registry: RegistryHandle,
    leaves: L,
    timing: Timing,
    node_id: NodeId,
    generation: u64,
    /// How long the session may stay silent before it asks the registry
    /// whether its node is still live: the node's own offline-after, which
    /// grows with its interval. A session checking sooner would wake every
    /// few hundred milliseconds between the heartbeats of a slowed-down
    /// fleet, for nothing.
    silence_limit: Duration,
    last_sequence: Option<u64>,
}

impl<L: LeaveRecorder> Session<L> {
    /// A session of `node_id` at `generation`, whose agent was told to
    /// heartbeat every `interval`.
    pub(super) fn new(
        registry: RegistryHandle,
        leaves: L,
        timing: Timing,
        node_id: NodeId,
        generation: u64,
        interval: Duration,
    ) -> Self {
        Self {
            registry,
            leaves,
            timing,
            node_id,
            generation,
            silence_limit: timing.offline_after_at(interval),
            last_sequence: None,
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Serves heartbeats until the stream ends, the session is superseded or
    /// the coordinator shuts down, then runs the cleanup whatever the cause.
    pub(super) async fn run<S>(
        mut self,
        mut inbound: S,
        outbound: Outbound,
        shutdown: CancellationToken,
        farewell: impl FnOnce() -> ServiceError,
    ) where
        S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
    {
        info!("session started");
        let ended = tokio::select! {
            () = shutdown.cancelled() => Ended::Shutdown,
            ended = self.serve(&mut inbound, &outbound) => ended,
        };
        // `try_send`: a final status must never wait on an agent that has
        // stopped reading.
        match ended {
            Ended::Shutdown => {
                debug!("session closed: the coordinator stops leading, or shuts down");
                let _ = outbound.try_send(Err(farewell().into()));
            }
            Ended::Stream(reason) => self.end(reason),
            Ended::Left => info!("session ended: the agent left"),
            Ended::Leaving(_) => unreachable!("serve handles a leave before it returns"),
            Ended::Refused(error) => {
                warn!(error = %error, "session refused a message");
                self.end("refused".to_owned());
                let _ = outbound.try_send(Err(error.into()));
            }
        }
    }

    /// The stream is over: the node goes OFFLINE unless a newer session has
    /// replaced this one.
    pub(super) fn end(&self, reason: String) {
        info!(%reason, "session ended");
        self.registry.update(|registry| {
            registry.session_ended(&self.node_id, self.generation, Moment::now());
        });
    }

    async fn serve<S>(&mut self, inbound: &mut S, outbound: &Outbound) -> Ended
    where
        S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
    {
        // One timer for the whole session, re-armed only when it fires:
        // arming a new one for every heartbeat costs a timer-wheel insert and
        // removal per message.
        let mut last_heard = Instant::now();
        let silence_check = tokio::time::sleep(self.silence_limit);
        tokio::pin!(silence_check);
        loop {
            let message = tokio::select! {
                () = outbound.closed() => return Ended::Stream("the agent stopped reading".to_owned()),
                () = &mut silence_check => {
                    let heard_until = last_heard + self.silence_limit;
                    if Instant::now() < heard_until {
                        silence_check.as_mut().reset(heard_until);
                        continue;
                    }
                    if let Some(ended) = self.on_silence() {
                        return ended;
                    }
                    silence_check.as_mut().reset(Instant::now() + self.silence_limit / 10);
                    continue;
                }
                message = inbound.next() => message,
            };
            last_heard = Instant::now();
            let ack = match self.on_heartbeat(message) {
                Ok(ack) => ack,
                Err(Ended::Leaving(leave)) => return self.on_leave(leave, outbound).await,
                Err(ended) => return ended,
            };
            // An agent that leaves this many acks unread is not reading at all.
            if outbound.try_send(Ok(ack)).is_err() {
                return Ended::Stream("the agent stopped reading".to_owned());
            }
        }
    }

    /// The session has heard nothing for its silence limit. The sweeper
    /// alone judges silence (it allows for the coordinator's own stalls); the
    /// session only closes a stream whose node it has given up on, or that a
    /// newer session has replaced. `None`: keep listening.
    fn on_silence(&self) -> Option<Ended> {
        let state = self
            .registry
            .lock()
            .session_state(&self.node_id, self.generation);
        match state {
            Err(rejected) => Some(Ended::Refused(rejection(
                &self.node_id,
                self.generation,
                rejected,
            ))),
            Ok(NodeState::Offline) => Some(Ended::Refused(ServiceError::HeartbeatTimeout(
                self.silence_limit,
            ))),
            Ok(_) => None,
        }
    }

    /// Checks one inbound message and applies it to the registry; the ack to
    /// send, or why the session ends.
    fn on_heartbeat(
        &mut self,
        message: Option<Result<AgentMessage, Status>>,
    ) -> Result<CoordinatorMessage, Ended> {
        let heartbeat = match message {
            None => return Err(Ended::Stream("the agent closed the stream".to_owned())),
            Some(Err(status)) => {
                return Err(Ended::Stream(format!("stream error: {}", status.message())));
            }
            Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
            })) => heartbeat,
            Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Leave(leave)),
            })) => return Err(Ended::Leaving(leave)),
            Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Register(_)),
            })) => {
                return Err(Ended::Refused(ServiceError::OutOfOrder(
                    "register may be sent only once per stream; open a new stream to register again".to_owned(),
                )));
            }
            Some(Ok(AgentMessage { kind: None })) => {
                return Err(Ended::Refused(
                    InvalidInput::new("agent_message.kind", "must be set").into(),
                ));
            }
        };
        if let Some(last) = self.last_sequence
            && heartbeat.sequence <= last
        {
            return Err(Ended::Refused(ServiceError::OutOfOrder(format!(
                "heartbeat.sequence must increase: got {} after {last}",
                heartbeat.sequence
            ))));
        }
        self.last_sequence = Some(heartbeat.sequence);
        let inventory = match heartbeat.inventory {
            None => None,
            Some(inventory) => Some(
                wire::gpu_inventory("heartbeat.inventory", inventory)
                    .map_err(|invalid| Ended::Refused(invalid.into()))?,
            ),
        };
        let accepted = self.registry.update(|registry| {
            let retuned = registry.heartbeat(&self.node_id, self.generation, Moment::now())?;
            if let Some(gpus) = inventory {
                registry.report_inventory(&self.node_id, self.generation, gpus)?;
            }
            Ok(retuned)
        });
        let retuned = accepted.map_err(|rejected| {
            Ended::Refused(rejection(&self.node_id, self.generation, rejected))
        })?;
        if let Some(interval) = retuned {
            self.silence_limit = self.timing.offline_after_at(interval);
            debug!(
                ?interval,
                "heartbeat interval changed with the fleet's size"
            );
        }
        Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Ack(proto::Ack {
                sequence: heartbeat.sequence,
                heartbeat_interval: retuned
                    .and_then(|interval| prost_types::Duration::try_from(interval).ok()),
            })),
        })
    }

    /// The agent is leaving on purpose: records the leave in the store, then
    /// in the registry, then acknowledges it with `left`.
    async fn on_leave(&self, leave: proto::Leave, outbound: &Outbound) -> Ended {
        if let Err(invalid) = validate_short_field("leave.reason", &leave.reason) {
            return Ended::Refused(invalid.into());
        }
        let left_at = Moment::now();
        let recorded = self
            .leaves
            .record_leave(self.node_id.clone(), self.generation, left_at.wall)
            .await;
        match recorded {
            Ok(true) => {}
            Ok(false) => {
                let state = self
                    .registry
                    .lock()
                    .session_state(&self.node_id, self.generation);
                let rejected = state.err().unwrap_or(SessionRejected::Forgotten);
                return Ended::Refused(rejection(&self.node_id, self.generation, rejected));
            }
            Err(error) => {
                warn!(error = %display_chain(&error), "could not record a leave; the node goes OFFLINE instead");
                return Ended::Stream("its leave could not be recorded".to_owned());
            }
        }
        let left = self
            .registry
            .update(|registry| registry.leave(&self.node_id, self.generation, left_at));
        if let Err(rejected) = left {
            return Ended::Refused(rejection(&self.node_id, self.generation, rejected));
        }
        info!(reason = %leave.reason, "node left");
        let _ = outbound.try_send(Ok(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Left(proto::Left {})),
        }));
        Ended::Left
    }
}

#[derive(Debug)]
enum Ended {
    Shutdown,
    Stream(String),
    Refused(ServiceError),
    /// The agent sent `leave`; the session records it before it ends.
    Leaving(proto::Leave),
    /// The node is recorded LEFT and the agent told so.
    Left,
}

pub(super) fn rejection(
    node_id: &NodeId,
    generation: u64,
    rejected: SessionRejected,
) -> ServiceError {
    match rejected {
        SessionRejected::Superseded { current } => ServiceError::Superseded {
            node_id: node_id.clone(),
            stale: generation,
            current,
        },
        SessionRejected::Forgotten => ServiceError::Forgotten(node_id.clone()),
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use tonic::Code;

    use super::*;

    fn register(node_id: &str) -> AgentMessage {
        AgentMessage {
            kind: Some(agent_message::Kind::Register(proto::Register {
                node_id: node_id.to_owned(),
                agent_url: "http://127.0.0.1:7701".to_owned(),
                boot_id: "boot".to_owned(),
                node_secret: "0123456789abcdef".to_owned(),
                ..Default::default()
            })),
        }
    }

    fn heartbeat(sequence: u64) -> AgentMessage {
        AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {
                sequence,
                inventory: None,
            })),
        }
    }

    async fn first_message_code(messages: Vec<AgentMessage>) -> Result<Claim, Code> {
        let mut inbound = stream::iter(messages.into_iter().map(Ok));
        read_registration(&mut inbound, Duration::from_secs(1))
            .await
            .map_err(|e| Status::from(e).code())
    }

    #[tokio::test]
    async fn a_register_first_is_accepted() {
        let registration = first_message_code(vec![register("gpu-1"), heartbeat(1)])
            .await
            .unwrap();
        assert_eq!(registration.registration.node_id.as_str(), "gpu-1");
    }

    #[tokio::test]
    async fn anything_else_first_is_refused_with_a_clear_status() {
        assert_eq!(
            first_message_code(vec![heartbeat(1)]).await.unwrap_err(),
            Code::FailedPrecondition
        );
        assert_eq!(
            first_message_code(vec![AgentMessage { kind: None }])
                .await
                .unwrap_err(),
            Code::InvalidArgument
        );
        assert_eq!(
            first_message_code(vec![]).await.unwrap_err(),
            Code::FailedPrecondition
        );
        assert_eq!(
            first_message_code(vec![register("Not Valid")])
                .await
                .unwrap_err(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_silent_stream_times_out() {
        let mut inbound = stream::pending::<Result<AgentMessage, Status>>();
        let error = read_registration(&mut inbound, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert_eq!(Status::from(error).code(), Code::DeadlineExceeded);
    }
}

/// The serve loop alone, over channels, with tokio's clock paused: no store,
/// no network, no sleeping in real time.
#[cfg(test)]
mod serve_loop {
    use std::{
        sync::{Arc, Mutex},
        time::SystemTime,
    };

    use tokio::{sync::mpsc, task::JoinHandle};
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Code;

    use super::*;
    use crate::{
        node::{DEFAULT_MAX_BACKOFF, Registration},
        registry::{Enrollment, Registry},
    };

    const ACKS_QUEUED: usize = 8;
    const DEADLINE: Duration = Duration::from_secs(60);

    fn timing(max_heartbeats_per_second: u32) -> Timing {
        Timing {
            heartbeat_interval: Duration::from_secs(1),
            max_heartbeats_per_second,
            offline_after: Duration::from_secs(3),
            expire_after: Duration::from_secs(3600),
            reload_grace: Duration::from_secs(3),
            expiry_guard_fraction: 0.5,
        }
    }

    fn id(node: &str) -> NodeId {
        NodeId::parse("node_id", node).unwrap()
    }

    /// Registers `node` at `generation` as admission would; its interval.
    fn register(registry: &RegistryHandle, node: &str, generation: u64) -> Duration {
        let registration = Registration {
            node_id: id(node),
            agent_url: format!("http://{node}:7701"),
            boot_id: "boot".to_owned(),
            version: "test".to_owned(),
            hostname: node.to_owned(),
            labels: Default::default(),
            max_backoff: DEFAULT_MAX_BACKOFF,
            gpus: Default::default(),
        };
        let enrollment = Enrollment {
            generation,
            registered_at: SystemTime::now(),
        };
        registry
            .update(|registry| registry.register(registration, enrollment, Moment::now()))
            .unwrap()
    }

    fn state(registry: &RegistryHandle, node: &str) -> Option<(NodeState, u64)> {
        registry
            .lock()
            .get(&id(node))
            .map(|node| (node.state, node.generation))
    }

    /// A running session: the agent's side of its stream, and the task.
    struct Agent {
        messages: mpsc::Sender<Result<AgentMessage, Status>>,
        acks: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
        session: JoinHandle<()>,
        shutdown: CancellationToken,
    }

    /// Records leaves in memory, or fails every one as a failing store does.
    #[derive(Clone, Default)]
    struct Leaves {
        recorded: Arc<Mutex<Vec<(NodeId, u64)>>>,
        failing: bool,
    }

    impl LeaveRecorder for Leaves {
        async fn record_leave(
            &self,
            node_id: NodeId,
            generation: u64,
            _left_at: SystemTime,
        ) -> Result<bool, StoreError> {
            if self.failing {
                return Err(StoreError::Query(
                    diesel::result::Error::BrokenTransactionManager,
                ));
            }
            self.recorded.lock().unwrap().push((node_id, generation));
            Ok(true)
        }
    }

    impl Agent {
        fn start(registry: &RegistryHandle, timing: Timing, node: &str, generation: u64) -> Self {
            Self::start_recording(registry, timing, node, generation, Leaves::default())
        }

        fn start_recording(
            registry: &RegistryHandle,
            timing: Timing,
            node: &str,
            generation: u64,
            leaves: Leaves,
        ) -> Self {
            let interval = register(registry, node, generation);
            let session = Session::new(
                registry.clone(),
                leaves,
                timing,
                id(node),
                generation,
                interval,
            );
            let (messages, inbound) = mpsc::channel(64);
            let (outbound, acks) = mpsc::channel(ACKS_QUEUED);
            let shutdown = CancellationToken::new();
            let session = tokio::spawn(session.run(
                ReceiverStream::new(inbound),
                outbound,
                shutdown.clone(),
                || ServiceError::ShuttingDown,
            ));
            Self {
                messages,
                acks,
                session,
                shutdown,
            }
        }

        async fn heartbeat(&self, sequence: u64) {
            let heartbeat = proto::Heartbeat {
                sequence,
                inventory: None,
            };
            let message = AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
            };
            self.messages.send(Ok(message)).await.unwrap();
        }

        async fn heartbeat_with_gpus(&self, sequence: u64, gpus: Vec<proto::Gpu>) {
            let heartbeat = proto::Heartbeat {
                sequence,
                inventory: Some(proto::GpuInventory { gpus }),
            };
            let message = AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
            };
            self.messages.send(Ok(message)).await.unwrap();
        }

        async fn leave(&self) {
            let leave = proto::Leave {
                reason: "SIGTERM".to_owned(),
            };
            let message = AgentMessage {
                kind: Some(agent_message::Kind::Leave(leave)),
            };
            self.messages.send(Ok(message)).await.unwrap();
        }

        async fn ack(&mut self) -> proto::Ack {
            match self.next().await {
                Ok(CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Ack(ack)),
                }) => ack,
                other => panic!("expected an ack, got {other:?}"),
            }
        }

        async fn refusal(&mut self) -> Status {
            self.next().await.expect_err("a final status")
        }

        async fn next(&mut self) -> Result<CoordinatorMessage, Status> {
            tokio::time::timeout(DEADLINE, self.acks.recv())
                .await
                .expect("the session answered")
                .expect("the session sent something")
        }

        async fn ended(self) {
            tokio::time::timeout(DEADLINE, self.session)
                .await
                .expect("the session ended")
                .unwrap();
        }
    }

    fn handle(timing: Timing) -> RegistryHandle {
        RegistryHandle::new(Registry::new(timing))
    }

    #[tokio::test(start_paused = true)]
    async fn a_sequence_going_backwards_ends_the_session_and_its_node_goes_offline() {
        let registry = handle(timing(1000));
        let mut agent = Agent::start(&registry, timing(1000), "gpu-1", 1);
        agent.heartbeat(5).await;
        assert_eq!(agent.ack().await.sequence, 5);
        agent.heartbeat(4).await;
        let refused = agent.refusal().await;
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("got 4 after 5"), "{refused:?}");
        agent.ended().await;
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Offline, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_replaces_the_inventory_and_a_broken_one_ends_the_session() {
        let registry = handle(timing(1000));
        let mut agent = Agent::start(&registry, timing(1000), "gpu-1", 1);
        let gpu = proto::Gpu {
            index: 0,
            uuid: "GPU-0".to_owned(),
            name: "A100-80G".to_owned(),
            memory_total_mib: 81_920,
            memory_used_mib: 4_096,
            healthy: true,
            ..Default::default()
        };
        agent.heartbeat_with_gpus(1, vec![gpu.clone()]).await;
        assert_eq!(agent.ack().await.sequence, 1);
        let gpus = |registry: &RegistryHandle| {
            registry.lock().get(&id("gpu-1")).unwrap().registration.gpus
        };
        assert_eq!(gpus(&registry).gpus()[0].memory_used_mib, 4_096);
        agent.heartbeat(2).await;
        assert_eq!(agent.ack().await.sequence, 2);
        assert_eq!(
            gpus(&registry).gpus().len(),
            1,
            "kept by a heartbeat without one"
        );
        assert_eq!(registry.lock().take_inventories().len(), 1);

        agent
            .heartbeat_with_gpus(
                3,
                vec![proto::Gpu {
                    memory_used_mib: 100_000,
                    ..gpu
                }],
            )
            .await;
        let refused = agent.refusal().await;
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().starts_with("heartbeat.inventory GPU 0"),
            "{refused:?}"
        );
        agent.ended().await;
        assert_eq!(gpus(&registry).gpus()[0].memory_used_mib, 4_096);
    }

    #[tokio::test(start_paused = true)]
    async fn a_superseded_session_is_refused_and_leaves_the_newer_one_online() {
        let registry = handle(timing(1000));
        let mut old = Agent::start(&registry, timing(1000), "gpu-1", 1);
        register(&registry, "gpu-1", 2);
        old.heartbeat(1).await;
        let refused = old.refusal().await;
        assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
        assert!(
            refused.message().contains("superseded by generation 2"),
            "{refused:?}"
        );
        old.ended().await;
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Online, 2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_is_closed_only_once_its_node_is_offline() {
        let timing = timing(1000);
        let registry = handle(timing);
        let mut agent = Agent::start(&registry, timing, "gpu-1", 1);
        let silence_limit = timing.offline_after_at(timing.heartbeat_interval);
        // The session itself never judges silence: while the registry still
        // shows the node ONLINE, the stream stays open however long it is.
        tokio::time::sleep(silence_limit * 5).await;
        assert!(!agent.session.is_finished(), "closed while ONLINE");
        assert!(agent.acks.try_recv().is_err());

        let later = Moment::now().after(silence_limit * 2);
        registry.update(|registry| registry.sweep(later));
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Offline, 1)));
        let refused = agent.refusal().await;
        assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
        agent.ended().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_closed_by_shutdown_leaves_its_node_online() {
        let registry = handle(timing(1000));
        let mut agent = Agent::start(&registry, timing(1000), "gpu-1", 1);
        agent.heartbeat(1).await;
        assert_eq!(agent.ack().await.sequence, 1);
        agent.shutdown.cancel();
        let refused = agent.refusal().await;
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        agent.ended().await;
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Online, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_closing_its_stream_takes_its_node_offline() {
        let registry = handle(timing(1000));
        let mut agent = Agent::start(&registry, timing(1000), "gpu-1", 1);
        agent.heartbeat(1).await;
        assert_eq!(agent.ack().await.sequence, 1);
        let Agent {
            messages, session, ..
        } = agent;
        drop(messages);
        tokio::time::timeout(DEADLINE, session)
            .await
            .expect("the session ended")
            .unwrap();
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Offline, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_stops_reading_its_acks_is_let_go() {
        let registry = handle(timing(1000));
        let agent = Agent::start(&registry, timing(1000), "gpu-1", 1);
        for sequence in 1..=ACKS_QUEUED as u64 + 1 {
            agent.heartbeat(sequence).await;
        }
        let Agent { acks, session, .. } = agent;
        tokio::time::timeout(DEADLINE, session)
            .await
            .expect("the session let the agent go")
            .unwrap();
        assert_eq!(acks.len(), ACKS_QUEUED);
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Offline, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_carries_a_new_interval_once_when_the_fleet_grows() {
        // Two heartbeats a second at a 1 s interval: two nodes per step.
        let timing = timing(2);
        let registry = handle(timing);
        let mut agent = Agent::start(&registry, timing, "gpu-0", 1);
        agent.heartbeat(1).await;
        assert_eq!(agent.ack().await.heartbeat_interval, None);

        for node in 1..5 {
            register(&registry, &format!("gpu-{node}"), 1 + node);
        }
        let grown = timing.interval_for(5);
        assert_eq!(grown, Duration::from_secs(3));
        agent.heartbeat(2).await;
        assert_eq!(
            agent.ack().await.heartbeat_interval,
            prost_types::Duration::try_from(grown).ok()
        );
        agent.heartbeat(3).await;
        assert_eq!(agent.ack().await.heartbeat_interval, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leave_is_recorded_then_acknowledged_and_the_node_stays_left() {
        let registry = handle(timing(1000));
        let leaves = Leaves::default();
        let mut agent = Agent::start_recording(&registry, timing(1000), "gpu-1", 1, leaves.clone());
        agent.heartbeat(1).await;
        agent.ack().await;
        agent.leave().await;
        match agent.next().await {
            Ok(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Left(_)),
            }) => {}
            other => panic!("expected left, got {other:?}"),
        }
        assert_eq!(*leaves.recorded.lock().unwrap(), [(id("gpu-1"), 1)]);
        agent.ended().await;
        assert_eq!(
            state(&registry, "gpu-1"),
            Some((NodeState::Left, 1)),
            "the stream's end does not turn a LEFT node OFFLINE"
        );

        // Long past offline-after, it is still LEFT, never OFFLINE.
        tokio::time::sleep(Duration::from_secs(60)).await;
        registry.update(|registry| registry.sweep(Moment::now()));
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Left, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leave_the_store_cannot_record_is_not_acknowledged() {
        let registry = handle(timing(1000));
        let leaves = Leaves {
            failing: true,
            ..Leaves::default()
        };
        let agent = Agent::start_recording(&registry, timing(1000), "gpu-1", 1, leaves);
        agent.leave().await;
        let Agent {
            mut acks, session, ..
        } = agent;
        tokio::time::timeout(DEADLINE, session)
            .await
            .expect("the session ended")
            .unwrap();
        assert!(acks.try_recv().is_err(), "no left for an unrecorded leave");
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Offline, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_superseded_sessions_leave_changes_nothing() {
        let registry = handle(timing(1000));
        let mut old = Agent::start(&registry, timing(1000), "gpu-1", 1);
        register(&registry, "gpu-1", 2);
        old.leave().await;
        let refused = old.refusal().await;
        assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
        old.ended().await;
        assert_eq!(state(&registry, "gpu-1"), Some((NodeState::Online, 2)));
    }
}
