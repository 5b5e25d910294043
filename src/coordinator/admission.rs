//! Admission of Heartbeat streams: a tower layer in front of the Coordinator
//! service, deciding before any message of a new stream is read.
//!
//! - A stream without the join token (when one is set) is refused with
//!   UNAUTHENTICATED first, so callers without credentials cannot use up
//!   the limits below and lock real agents out.
//! - A stream is refused with RESOURCE_EXHAUSTED when `max_streams` streams
//!   are already open, or when registrations arrive faster than the
//!   configured rate (a token bucket with a burst of one second's worth).
//!   Refused agents back off and retry, so a reconnect storm is spread out
//!   instead of queued.
//!
//! An admitted stream carries a [`StreamPermit`] in its request extensions;
//! the session task holds it for as long as the stream lives. Operator calls
//! (ListNodes, GetNode, RemoveNode) are never shed.
//!
//! Once its `register` has been read, a stream is admitted by [`serve_stream`]:
//! the registration is committed to the store, then applied to the registry,
//! and only then is `registered` sent and the [`Session`] run. A node id held
//! under another node secret is refused, and nothing about the node changes.

use std::{
    num::NonZeroU32,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::{Status, codegen::http, server::NamedService};
use tower::{Layer, Service};
use tracing::{debug, warn};

use super::{
    Shared,
    session::{Outbound, Session, rejection},
};
use crate::{
    auth::{self, SecretHash, Token},
    clock::Moment,
    error::{InvalidInput, ServiceError, display_chain},
    node::{Claim, NodeId},
    proto::{self, AgentMessage, CoordinatorMessage, coordinator_message},
    store::Enrolled,
};

pub const HEARTBEAT_PATH: &str = "/muster.v1.Coordinator/Heartbeat";

/// One open Heartbeat stream's share of `max_streams`; released on drop.
#[derive(Clone, Debug)]
pub struct StreamPermit {
    _held: Arc<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct Limits {
    join_token: Option<Token>,
    streams: Arc<Semaphore>,
    max_streams: u32,
    registrations: DefaultDirectRateLimiter,
    per_second: NonZeroU32,
}

impl Limits {
    fn admit(&self, join_token: Option<&[u8]>) -> Result<StreamPermit, ServiceError> {
        auth::require_join_token(self.join_token.as_ref(), join_token).map_err(|denied| {
            metrics::counter!("muster_registrations_refused_total", "reason" => "join_token")
                .increment(1);
            warn!(%denied, "refused a Heartbeat stream without the join token");
            denied
        })?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("muster_streams_refused_total", "limit" => "max_streams")
                .increment(1);
            ServiceError::Overloaded(format!(
                "too many Heartbeat streams: the limit is {} (--max-streams); retry later",
                self.max_streams
            ))
        })?;
        self.registrations.check().map_err(|_| {
            metrics::counter!("muster_streams_refused_total", "limit" => "registration_rate")
                .increment(1);
            ServiceError::Overloaded(format!(
                "too many registrations: the limit is {} per second (--max-registrations-per-second); retry later",
                self.per_second
            ))
        })?;
        Ok(StreamPermit {
            _held: Arc::new(permit),
        })
    }
}

#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    limits: Arc<Limits>,
}

impl AdmissionLayer {
    pub fn new(max_streams: u32, per_second: NonZeroU32, join_token: Option<Token>) -> Self {
        Self {
            limits: Arc::new(Limits {
                join_token,
                streams: Arc::new(Semaphore::new(max_streams as usize)),
                max_streams,
                registrations: RateLimiter::direct(Quota::per_second(per_second)),
                per_second,
            }),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Admission<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if request.uri().path() == HEARTBEAT_PATH {
            let join_token = request.headers().get(auth::JOIN_TOKEN_METADATA);
            match self.limits.admit(join_token.map(|value| value.as_bytes())) {
                Ok(permit) => {
                    request.extensions_mut().insert(permit);
                }
                Err(refused) => {
                    return Either::Right(ready(Ok(tonic::Status::from(refused).into_http())));
                }
            }
        }
        Either::Left(self.inner.call(request))
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
) where
    S: futures::Stream<Item = Result<AgentMessage, Status>> + Unpin,
{
    if admitted.is_closed() {
        // The agent gave up before anything was written, as the attempts it
        // abandoned while this coordinator was paused do.
        return;
    }
    let _permit = permit;
    let (session, registered) = match admit(&shared, claim).await {
        Ok(admitted) => admitted,
        Err(error) => {
            let _ = admitted.send(Err(error));
            return;
        }
    };
    let stop = shared.stop.clone();
    let roles = shared.roles.clone();
    drop(shared);
    tracing::Span::current().record("generation", session.generation());
    if outbound.try_send(Ok(registered)).is_err() {
        session.end("could not queue registered".to_owned());
        let error = ServiceError::Internal("a new session's outbound queue is full".to_owned());
        let _ = admitted.send(Err(error));
        return;
    }
    if admitted.send(Ok(())).is_err() {
        session.end("the agent hung up during registration".to_owned());
        return;
    }
    session
        .run(inbound, outbound, stop, move || roles.refusal())
        .await;
}

/// Commits the registration to the store, then applies it to the registry;
/// the session and its `registered` message.
async fn admit(
    shared: &Shared,
    claim: Claim,
) -> Result<(Session, CoordinatorMessage), ServiceError> {
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
    let attempt = std::time::Instant::now();
    let enrolled = match shared
        .store
        .enroll(registration.clone(), secret.hash(), Moment::now().wall)
        .await
    {
        Ok(enrolled) => enrolled,
        Err(error) => {
            if error.is_unavailable() {
                vouch_if_known(shared, &node_id, secret.hash(), attempt.elapsed()).await;
            }
            return Err(shared.store_failed(error));
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
    let registered = CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Registered(proto::Registered {
            coordinator_boot_id: shared.boot_id.clone(),
            session_generation: enrollment.generation,
            heartbeat_interval: prost_types::Duration::try_from(interval).ok(),
            leader_epoch: shared.epoch,
        })),
    };
    let session = Session::new(
        shared.registry.clone(),
        shared.store.clone(),
        shared.timing,
        node_id,
        enrollment.generation,
        interval,
    );
    Ok((session, registered))
}

/// A registration the store could not commit still shows that the agent
/// holding the node's secret is alive: keep its node from being shown
/// OFFLINE while the agent retries.
async fn vouch_if_known(
    shared: &Shared,
    node_id: &NodeId,
    secret_hash: SecretHash,
    refusal_took: std::time::Duration,
) {
    match shared
        .store
        .holds_secret(node_id.clone(), secret_hash)
        .await
    {
        Ok(true) => {
            if shared.update(|registry| registry.vouch(node_id, refusal_took, Moment::now())) {
                debug!(%node_id, "registration not committed; the attempt keeps the node online");
            }
        }
        Ok(false) => {}
        Err(error) => {
            debug!(%node_id, error = %display_chain(&error), "cannot check the node secret");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"0123456789abcdef-join";

    fn limits(max_streams: u32, per_second: u32) -> Arc<Limits> {
        let token = Token::new("join token", std::str::from_utf8(TOKEN).unwrap()).unwrap();
        AdmissionLayer::new(
            max_streams,
            NonZeroU32::new(per_second).unwrap(),
            Some(token),
        )
        .limits
    }

    #[test]
    fn streams_without_the_join_token_use_up_no_limit() {
        let limits = limits(1, 1);
        for _ in 0..10 {
            let refused = limits.admit(None).unwrap_err();
            assert!(
                matches!(refused, ServiceError::Unauthenticated(_)),
                "{refused}"
            );
            assert!(limits.admit(Some(b"0123456789abcdef-nope")).is_err());
        }
        assert!(limits.admit(Some(TOKEN)).is_ok());
    }

    #[test]
    fn streams_past_the_maximum_are_refused_until_one_ends() {
        let limits = limits(2, 1000);
        let first = limits.admit(Some(TOKEN)).unwrap();
        let _second = limits.admit(Some(TOKEN)).unwrap();
        let refused = limits.admit(Some(TOKEN)).unwrap_err();
        assert!(refused.to_string().contains("--max-streams"), "{refused}");
        drop(first);
        assert!(limits.admit(Some(TOKEN)).is_ok());
    }

    #[test]
    fn registrations_past_the_rate_are_refused() {
        let limits = limits(100, 3);
        let admitted = (0..10)
            .filter(|_| limits.admit(Some(TOKEN)).is_ok())
            .count();
        assert!((1..=4).contains(&admitted), "{admitted} admitted");
        let refused = limits.admit(Some(TOKEN)).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("--max-registrations-per-second"),
            "{refused}"
        );
    }
}
