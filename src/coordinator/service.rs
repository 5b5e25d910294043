//! The Coordinator gRPC service. Reads are served from the registry in
//! memory; each Heartbeat stream becomes a tracked session task.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{
    Shared,
    session::{read_registration, serve_stream},
};
use crate::{
    error::ServiceError,
    node::NodeId,
    proto::{self, AgentMessage, CoordinatorMessage, coordinator_server::Coordinator},
};

/// How long a new stream may take to send its register message.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one agent before the session waits for it.
const OUTBOUND_CAPACITY: usize = 8;

pub(crate) struct CoordinatorService {
    shared: Arc<Shared>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
}

impl CoordinatorService {
    pub(super) fn new(
        shared: Arc<Shared>,
        sessions: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            shared,
            sessions,
            shutdown,
        }
    }
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(ServiceError::ShuttingDown.into());
        }
        let mut inbound = request.into_inner();
        let registration = tokio::select! {
            () = self.shutdown.cancelled() => return Err(ServiceError::ShuttingDown.into()),
            registration = read_registration(&mut inbound, REGISTRATION_TIMEOUT) => registration?,
        };
        let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
        let (admitted, admission) = oneshot::channel();
        let span = tracing::info_span!(
            "session",
            node_id = %registration.node_id,
            generation = tracing::field::Empty
        );
        self.sessions.spawn(
            serve_stream(
                self.shared.clone(),
                registration,
                inbound,
                outbound,
                admitted,
                self.shutdown.clone(),
            )
            .instrument(span),
        );
        admission.await.map_err(|_| {
            ServiceError::Internal("the registration task ended early".to_owned())
        })??;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_nodes(
        &self,
        _request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        let nodes = self.shared.lock().list();
        Ok(Response::new(proto::ListNodesResponse {
            nodes: nodes.into_iter().map(proto::Node::from).collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<proto::GetNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        let node_id =
            NodeId::parse("node_id", &request.into_inner().node_id).map_err(ServiceError::from)?;
        let node = self.shared.lock().get(&node_id);
        let node = node.ok_or(ServiceError::NodeNotFound(node_id))?;
        Ok(Response::new(node.into()))
    }
}
