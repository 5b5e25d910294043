//! The agent's Status service, which the coordinator probes after it
//! restarts. It answers with this process's node id and boot id.
//!
//! A coordinator's probe (marked with [`grpc::PROBE_METADATA`]) means it is
//! back: it wakes the reconnect loop if that is waiting out a backoff, so the
//! agent re-registers at once. Other callers, such as monitoring tools, and
//! probes while the loop is not waiting leave nothing behind.
//!
//! When the agent has a join token, every caller must present it.

use std::{sync::Arc, time::SystemTime};

use tokio::sync::Notify;

use tonic::{Request, Response, Status};

use crate::{
    auth::{self, Token},
    error::ServiceError,
    grpc,
    proto::{StatusRequest, StatusResponse, agent_server::Agent},
};

/// Who an agent is, as its Status answers tell. The swarm simulator keeps
/// one per simulated agent behind a single listener.
pub struct Identity {
    node_id: String,
    boot_id: String,
    hostname: String,
    started_at: SystemTime,
    probed: Arc<Notify>,
    join_token: Option<Token>,
}

impl Identity {
    pub fn new(
        node_id: String,
        boot_id: String,
        hostname: String,
        probed: Arc<Notify>,
        join_token: Option<Token>,
    ) -> Self {
        Self {
            node_id,
            boot_id,
            hostname,
            started_at: SystemTime::now(),
            probed,
            join_token,
        }
    }

    /// Answers `request` as this agent, if it carries the join token the
    /// agent requires; a coordinator's probe wakes the agent's reconnect loop.
    pub fn answer(&self, request: &Request<StatusRequest>) -> Result<StatusResponse, ServiceError> {
        let presented = request.metadata().get(auth::JOIN_TOKEN_METADATA);
        let presented = presented.map(|value| value.as_bytes());
        auth::require_join_token(self.join_token.as_ref(), presented).map_err(|denied| {
            tracing::warn!(peer = ?request.remote_addr(), %denied, "refused a Status call");
            ServiceError::from(denied)
        })?;
        if request.metadata().contains_key(grpc::PROBE_METADATA) {
            self.probed.notify_waiters();
        }
        Ok(StatusResponse {
            node_id: self.node_id.clone(),
            boot_id: self.boot_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: self.hostname.clone(),
            started_at: Some(self.started_at.into()),
        })
    }
}

pub struct StatusService {
    identity: Identity,
}

impl StatusService {
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

#[tonic::async_trait]
impl Agent for StatusService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.identity
            .answer(&request)
            .map(Response::new)
            .map_err(Into::into)
    }
}
