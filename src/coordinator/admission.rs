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

use std::{
    num::NonZeroU32,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{codegen::http, server::NamedService};
use tower::{Layer, Service};
use tracing::warn;

use crate::{
    auth::{self, Token},
    error::ServiceError,
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
