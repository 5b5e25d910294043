//! One heartbeat session: the life of one Heartbeat stream.
//!
//! The first message must be `register`; it is validated, committed to the
//! store, and applied to the registry before `registered` is sent. From then
//! on each heartbeat is checked (sequence numbers strictly increase, the
//! session is still the node's newest) and acknowledged.
//!
//! However the stream ends, its node goes OFFLINE at once, unless a newer
//! session of the node exists or the coordinator itself is shutting down
//! (a restart must not show any node as dead). A stream whose node the
//! sweeper has marked OFFLINE, or which a newer session has replaced, is
//! closed once it has been silent for `offline_after`, so no session lingers.

use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::Shared;
use crate::{
    auth::SecretHash,
    clock::Moment,
    error::{InvalidInput, ServiceError, display_chain},
    node::{Claim, NodeId, NodeState},
    proto::{self, AgentMessage, CoordinatorMessage, agent_message, coordinator_message},
    registry::SessionRejected,
    store::Enrolled,
};

use super::admission::StreamPermit;

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
        Some(Ok(AgentMessage { kind: None })) => Err(InvalidInput::new(
            "agent_message.kind",
            "must be set; the first message on a Heartbeat stream must be register",
        )
        .into()),
    }
}

/// Serves one Heartbeat stream whose `register` has been read: admits it,
/// reports the outcome on `admitted` (the gRPC call waits for it), then runs
/// the session. Admission and session are one task, so once the store has
/// committed a registration the session's cleanup always follows, even if
/// the agent hangs up before the call returns.
pub(super) async fn serve_stream<S>(
    shared: Arc<Shared>,
    claim: Claim,
    inbound: S,
    outbound: Outbound,
    admitted: oneshot::Sender<Result<(), ServiceError>>,
    permit: Option<StreamPermit>,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
{
    if admitted.is_closed() {
        // The agent gave up before anything was written, as the attempts it
        // abandoned while this coordinator was paused do.
        return;
    }
    let _permit = permit;
    let session = match Session::admit(shared, claim).await {
        Ok(session) => session,
        Err(error) => {
            let _ = admitted.send(Err(error));
            return;
        }
    };
    tracing::Span::current().record("generation", session.generation);
    if outbound.try_send(Ok(session.registered_message())).is_err() {
        session.end("could not queue registered".to_owned());
        let error = ServiceError::Internal("a new session's outbound queue is full".to_owned());
        let _ = admitted.send(Err(error));
        return;
    }
    if admitted.send(Ok(())).is_err() {
        session.end("the agent hung up during registration".to_owned());
        return;
    }
    session.run(inbound, outbound, shutdown).await;
}

/// A registered session, ready to run.
pub(super) struct Session {
    shared: Arc<Shared>,
    node_id: NodeId,
    generation: u64,
    /// The heartbeat interval the agent was given at registration.
    interval: Duration,
}

impl Session {
    /// Commits the registration to the store, then applies it to the registry.
    /// A node id held under another node secret is refused, and nothing
    /// about the node changes.
    pub(super) async fn admit(shared: Arc<Shared>, claim: Claim) -> Result<Self, ServiceError> {
        let Claim {
            registration,
            secret,
        } = claim;
        let node_id = registration.node_id.clone();
        if shared.tls.is_some() && !registration.agent_url.starts_with("https://") {
            return Err(InvalidInput::new(
                "register.agent_url",
                format!(
                    "must be https: this coordinator uses TLS, and its probes carry credentials; got {:?}",
                    registration.agent_url
                ),
            )
            .into());
        }
        let enrolled = match shared
            .store
            .enroll(registration.clone(), secret.hash(), Moment::now().wall)
            .await
        {
            Ok(enrolled) => enrolled,
            Err(error) => {
                if error.is_unavailable() {
                    vouch_if_known(&shared, &node_id, secret.hash()).await;
                }
                return Err(error.into());
            }
        };
        let enrollment = match enrolled {
            Enrolled::Admitted(enrollment) => enrollment,
            Enrolled::HeldByAnotherSecret => {
                metrics::counter!("muster_registrations_refused_total", "reason" => "node_secret")
                    .increment(1);
                warn!(
                    agent_url = %registration.agent_url,
                    hostname = %registration.hostname,
                    boot_id = %registration.boot_id,
                    "refused a registration: the node id is held by another node secret"
                );
                return Err(ServiceError::NodeIdHeld(node_id));
            }
            Enrolled::Quarantined { reason } => {
                metrics::counter!("muster_registrations_refused_total", "reason" => "quarantined")
                    .increment(1);
                return Err(ServiceError::Quarantined { node_id, reason });
            }
        };
        let interval = shared
            .update(|registry| registry.register(registration, enrollment, Moment::now()))
            .map_err(|rejected| rejection(&node_id, enrollment.generation, rejected))?;
        Ok(Self {
            shared,
            node_id,
            generation: enrollment.generation,
            interval,
        })
    }

    pub(super) fn registered_message(&self) -> CoordinatorMessage {
        CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Registered(proto::Registered {
                coordinator_boot_id: self.shared.boot_id.clone(),
                session_generation: self.generation,
                heartbeat_interval: prost_types::Duration::try_from(self.interval).ok(),
            })),
        }
    }

    /// Serves heartbeats until the stream ends, the session is superseded or
    /// the coordinator shuts down, then runs the cleanup whatever the cause.
    pub(super) async fn run<S>(
        self,
        mut inbound: S,
        outbound: Outbound,
        shutdown: CancellationToken,
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
                debug!("session closed by coordinator shutdown");
                let _ = outbound.try_send(Err(ServiceError::ShuttingDown.into()));
            }
            Ended::Stream(reason) => self.end(reason),
            Ended::Refused(error) => {
                warn!(error = %error, "session refused a message");
                self.end("refused".to_owned());
                let _ = outbound.try_send(Err(error.into()));
            }
        }
    }

    /// The stream is over: the node goes OFFLINE unless a newer session has
    /// replaced this one.
    fn end(&self, reason: String) {
        info!(%reason, "session ended");
        self.shared.update(|registry| {
            registry.session_ended(&self.node_id, self.generation, Moment::now());
        });
    }

    async fn serve<S>(&self, inbound: &mut S, outbound: &Outbound) -> Ended
    where
        S: Stream<Item = Result<AgentMessage, Status>> + Unpin,
    {
        let mut last_sequence: Option<u64> = None;
        // The node's own offline-after, which grows with its interval: a
        // session checking sooner would wake every few hundred milliseconds
        // between the heartbeats of a slowed-down fleet, for nothing.
        let mut silence_limit = self.shared.lock().silence_limit(self.interval);
        // One timer for the whole session, re-armed only when it fires:
        // arming a new one for every heartbeat costs a timer-wheel insert and
        // removal per message.
        let mut last_heard = Instant::now();
        let silence_check = tokio::time::sleep(silence_limit);
        tokio::pin!(silence_check);
        loop {
            let message = tokio::select! {
                () = outbound.closed() => return Ended::Stream("the agent stopped reading".to_owned()),
                () = &mut silence_check => {
                    let heard_until = last_heard + silence_limit;
                    if Instant::now() < heard_until {
                        silence_check.as_mut().reset(heard_until);
                        continue;
                    }
                    // The sweeper alone judges silence (it allows for the
                    // coordinator's own stalls); the session only closes a
                    // stream whose node it has given up on.
                    let state = self.shared.lock().session_state(&self.node_id, self.generation);
                    match state {
                        Err(rejected) => return Ended::Refused(rejection(&self.node_id, self.generation, rejected)),
                        Ok(NodeState::Offline) => return Ended::Refused(ServiceError::HeartbeatTimeout(silence_limit)),
                        Ok(_) => {
                            silence_check.as_mut().reset(Instant::now() + silence_limit / 10);
                            continue;
                        }
                    }
                }
                message = inbound.next() => message,
            };
            last_heard = Instant::now();
            let heartbeat = match message {
                None => return Ended::Stream("the agent closed the stream".to_owned()),
                Some(Err(status)) => {
                    return Ended::Stream(format!("stream error: {}", status.message()));
                }
                Some(Ok(AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
                })) => heartbeat,
                Some(Ok(AgentMessage {
                    kind: Some(agent_message::Kind::Register(_)),
                })) => {
                    return Ended::Refused(ServiceError::OutOfOrder(
                        "register may be sent only once per stream; open a new stream to register again".to_owned(),
                    ));
                }
                Some(Ok(AgentMessage { kind: None })) => {
                    return Ended::Refused(
                        InvalidInput::new("agent_message.kind", "must be set").into(),
                    );
                }
            };
            if let Some(last) = last_sequence
                && heartbeat.sequence <= last
            {
                return Ended::Refused(ServiceError::OutOfOrder(format!(
                    "heartbeat.sequence must increase: got {} after {last}",
                    heartbeat.sequence
                )));
            }
            last_sequence = Some(heartbeat.sequence);
            let accepted = self.shared.update(|registry| {
                registry.heartbeat(&self.node_id, self.generation, Moment::now())
            });
            let retuned = match accepted {
                Ok(retuned) => retuned,
                Err(rejected) => {
                    return Ended::Refused(rejection(&self.node_id, self.generation, rejected));
                }
            };
            if let Some(interval) = retuned {
                silence_limit = self.shared.lock().silence_limit(interval);
                debug!(
                    ?interval,
                    "heartbeat interval changed with the fleet's size"
                );
            }
            let ack = CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Ack(proto::Ack {
                    sequence: heartbeat.sequence,
                    heartbeat_interval: retuned
                        .and_then(|interval| prost_types::Duration::try_from(interval).ok()),
                })),
            };
            // An agent that leaves this many acks unread is not reading at all.
            if outbound.try_send(Ok(ack)).is_err() {
                return Ended::Stream("the agent stopped reading".to_owned());
            }
        }
    }
}

/// A registration the store could not commit still shows that the agent
/// holding the node's secret is alive: keep its node from being shown
/// OFFLINE while the agent retries.
async fn vouch_if_known(shared: &Shared, node_id: &NodeId, secret_hash: SecretHash) {
    match shared
        .store
        .holds_secret(node_id.clone(), secret_hash)
        .await
    {
        Ok(true) => {
            if shared.update(|registry| registry.vouch(node_id, Moment::now())) {
                debug!("registration not committed; the attempt keeps the node online");
            }
        }
        Ok(false) => {}
        Err(error) => debug!(error = %display_chain(&error), "cannot check the node secret"),
    }
}

enum Ended {
    Shutdown,
    Stream(String),
    Refused(ServiceError),
}

fn rejection(node_id: &NodeId, generation: u64, rejected: SessionRejected) -> ServiceError {
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
