//! The Coordinator gRPC service. On the leader, reads are served from the
//! registry in memory, and each Heartbeat stream becomes a tracked session
//! task of the term; on a standby, reads come from the database (see
//! `standby`) and everything else is refused, as the role layer already
//! does before a call reaches here.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, warn};

use super::{
    Process,
    admission::{StreamPermit, serve_stream},
    role::Role,
    session::read_registration,
    standby, watch,
};
use crate::{
    auth,
    clock::Moment,
    error::ServiceError,
    node::{NodeId, validate_reason},
    proto::{self, AgentMessage, CoordinatorMessage, coordinator_server::Coordinator},
};

/// How long a new stream may take to send its register message.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before the session waits for it.
const OUTBOUND_CAPACITY: usize = 8;
/// Events queued towards one watcher before its watch waits for it.
const WATCH_OUTBOUND_CAPACITY: usize = 64;

pub(crate) struct CoordinatorService {
    process: Arc<Process>,
}

impl CoordinatorService {
    pub(super) fn new(process: Arc<Process>) -> Self {
        Self { process }
    }
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;
type WatchNodesStream = Pin<Box<dyn Stream<Item = Result<proto::NodeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type HeartbeatStream = HeartbeatStream;
    type WatchNodesStream = WatchNodesStream;

    async fn heartbeat(
        &self,
        mut request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let shared = self.process.leader()?;
        if shared.stop.is_cancelled() {
            return Err(shared.roles.refusal().into());
        }
        let permit = request.extensions_mut().remove::<StreamPermit>();
        let mut inbound = request.into_inner();
        let claim = tokio::select! {
            () = shared.stop.cancelled() => return Err(shared.roles.refusal().into()),
            claim = read_registration(&mut inbound, REGISTRATION_TIMEOUT) => claim?,
        };
        let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
        let (admitted, admission) = oneshot::channel();
        let span = tracing::info_span!(
            "session",
            node_id = %claim.registration.node_id,
            generation = tracing::field::Empty
        );
        shared.sessions.clone().spawn(
            serve_stream(shared, claim, inbound, outbound, admitted, permit).instrument(span),
        );
        admission.await.map_err(|_| {
            ServiceError::Internal("the registration task ended early".to_owned())
        })??;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn watch_nodes(
        &self,
        request: Request<proto::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        self.require_admin(&request)?;
        let shutdown = &self.process.shutdown;
        if shutdown.is_cancelled() {
            return Err(ServiceError::ShuttingDown.into());
        }
        let since_revision = request.into_inner().since_revision;
        let events = &self.process.events;
        let watch = if since_revision == 0 && self.process.roles.role() == Role::Standby {
            // A standby's hub has seen only the events since it started; the
            // rows are the whole fleet.
            let store = &self.process.store;
            events
                .watch_from(async { Ok(standby::list_nodes(store).await?.nodes) })
                .await?
        } else {
            if self.process.roles.role() == Role::Standby {
                events
                    .caught_up_to(since_revision, standby::POLL_PERIOD * 4)
                    .await;
            }
            events.watch(since_revision).await?
        };
        let (outbound, receiver) = mpsc::channel(WATCH_OUTBOUND_CAPACITY);
        self.process.watches.spawn(
            watch::serve(watch, outbound, shutdown.clone())
                .instrument(tracing::info_span!("watch", since_revision)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_nodes(
        &self,
        request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        self.require_admin(&request)?;
        match self.process.leader() {
            Ok(shared) => Ok(Response::new(shared.registry.list_nodes())),
            Err(_) => Ok(Response::new(
                standby::list_nodes(&self.process.store).await?,
            )),
        }
    }

    async fn get_node(
        &self,
        request: Request<proto::GetNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        self.require_admin(&request)?;
        let node_id =
            NodeId::parse("node_id", &request.into_inner().node_id).map_err(ServiceError::from)?;
        let shared = match self.process.leader() {
            Ok(shared) => shared,
            Err(_) => {
                let node = standby::get_node(&self.process.store, node_id).await?;
                return Ok(Response::new(node));
            }
        };
        let node = shared.lock().get(&node_id);
        let node = node.ok_or(ServiceError::NodeNotFound(node_id))?;
        Ok(Response::new(node.into()))
    }

    async fn remove_node(
        &self,
        request: Request<proto::RemoveNodeRequest>,
    ) -> Result<Response<proto::RemoveNodeResponse>, Status> {
        self.require_admin(&request)?;
        let node_id =
            NodeId::parse("node_id", &request.into_inner().node_id).map_err(ServiceError::from)?;
        let shared = self.process.leader()?;
        // The row goes first: once this call returns, a registration with
        // another secret must find the id free.
        let removed_generation = shared
            .store
            .remove(node_id.clone())
            .await
            .map_err(|error| shared.store_failed(error))?
            .ok_or_else(|| ServiceError::NodeNotFound(node_id.clone()))?;
        let removed = shared.update(|registry| registry.remove(&node_id, removed_generation));
        info!(%node_id, generation = removed_generation, "node removed by an operator");
        Ok(Response::new(proto::RemoveNodeResponse {
            node: removed.map(proto::Node::from),
        }))
    }

    async fn drain_node(
        &self,
        request: Request<proto::DrainNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        self.require_admin(&request)?;
        let request = request.into_inner();
        let node_id = NodeId::parse("node_id", &request.node_id).map_err(ServiceError::from)?;
        validate_reason("reason", &request.reason).map_err(ServiceError::from)?;
        let node = self
            .set_drain(node_id.clone(), Some(request.reason.clone()))
            .await?;
        info!(%node_id, reason = %request.reason, "node drained by an operator");
        Ok(Response::new(node))
    }

    async fn undrain_node(
        &self,
        request: Request<proto::UndrainNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        self.require_admin(&request)?;
        let node_id =
            NodeId::parse("node_id", &request.into_inner().node_id).map_err(ServiceError::from)?;
        let node = self.set_drain(node_id.clone(), None).await?;
        info!(%node_id, "node undrained by an operator");
        Ok(Response::new(node))
    }
}

impl CoordinatorService {
    /// Records a drain (`reason` given) or an undrain in the store, then in
    /// the registry, as RemoveNode does: once the call answers, the drain
    /// survives a restart.
    async fn set_drain(
        &self,
        node_id: NodeId,
        reason: Option<String>,
    ) -> Result<proto::Node, ServiceError> {
        let shared = self.process.leader()?;
        let _in_order = shared.drains.lock().await;
        let (row_generation, drain) = shared
            .store
            .set_drain(node_id.clone(), reason, Moment::now().wall)
            .await
            .map_err(|error| shared.store_failed(error))?
            .ok_or_else(|| ServiceError::NodeNotFound(node_id.clone()))?;
        let node = shared.update(|registry| registry.set_drain(&node_id, row_generation, drain));
        shared.leases.apply_node(&shared.registry, &node_id);
        node.map(proto::Node::from)
            .ok_or(ServiceError::NodeNotFound(node_id))
    }

    fn require_admin<T>(&self, request: &Request<T>) -> Result<(), ServiceError> {
        let authorization = request.metadata().get(auth::AUTHORIZATION_METADATA);
        let authorization = authorization.map(|value| value.as_bytes());
        auth::require_admin_token(self.process.admin_token.as_ref(), authorization).map_err(
            |denied| {
                metrics::counter!("muster_admin_requests_refused_total").increment(1);
                warn!(peer = ?request.remote_addr(), %denied, "refused an operator call");
                ServiceError::from(denied)
            },
        )
    }
}
