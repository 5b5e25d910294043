//! Errors above the store.
//!
//! [`ServiceError`] is what every gRPC handler and heartbeat session returns;
//! its `From` impl is the single place where our errors become a
//! [`tonic::Status`]. [`RunError`] is what ends a coordinator or agent process.

use std::{io, net::SocketAddr, path::PathBuf};

use tonic::{Code, Status};

pub use crate::validation::InvalidInput;
use crate::{
    auth::{Denied, TokenFileError},
    node::NodeId,
    pool::PoolError,
    store::StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    InvalidArgument(#[from] InvalidInput),
    #[error("node {0} is not registered")]
    NodeNotFound(NodeId),
    /// A probe of a swarm reached an address no simulated agent has; a real
    /// agent would not be listening there at all.
    #[error("no simulated agent listens at {0}")]
    NoSimulatedAgent(String),
    /// The request is well-formed but not allowed at this point of a stream.
    #[error("{0}")]
    OutOfOrder(String),
    #[error(
        "node {node_id}: this stream (generation {stale}) was superseded by generation {current}: another stream registered as this node; if that is not this agent restarting, two agents share one node id and node secret, most likely one --state-dir (give each agent its own --state-dir and --node-id)"
    )]
    Superseded {
        node_id: NodeId,
        stale: u64,
        current: u64,
    },
    #[error(
        "node {0} was removed (it expired, or an operator removed it) while its stream was open; reconnect to register again"
    )]
    Forgotten(NodeId),
    #[error(
        "node id {0} is registered with a different node secret (another machine, or a copied disk image); remove it with `muster nodes remove {0}` to claim it afresh, or pick another --node-id"
    )]
    NodeIdHeld(NodeId),
    #[error(
        "the stored row of node {node_id} is unreadable ({reason}); it is kept as it is for an operator to inspect, and `muster nodes remove {node_id}` lets the node register afresh"
    )]
    Quarantined { node_id: NodeId, reason: String },
    #[error(transparent)]
    Unauthenticated(#[from] Denied),
    /// A limit on load was reached; the message names it.
    #[error("{0}")]
    Overloaded(String),
    /// The agent's stream failed, e.g. a message too large to decode.
    #[error("{}", .0.message())]
    Inbound(Status),
    #[error("no register message within {0:?}")]
    RegistrationTimeout(std::time::Duration),
    #[error("no heartbeat within {0:?}; closing the stream")]
    HeartbeatTimeout(std::time::Duration),
    #[error(
        "since_revision {since} is older than the event history, which starts after revision {pruned_through}; list again with since_revision=0 (`muster nodes watch` without --since)"
    )]
    HistoryPruned { since: u64, pruned_through: u64 },
    #[error(
        "since_revision {since} is ahead of this coordinator's latest revision {latest}: its database was replaced or restored (see database_id); list again with since_revision=0"
    )]
    RevisionAhead { since: u64, latest: u64 },
    #[error(
        "since_revision {since} is older than the lease event history, which starts after revision {pruned_through}; list the leases again and watch with since_revision=0"
    )]
    LeaseHistoryPruned { since: u64, pruned_through: u64 },
    #[error("this watch fell behind the fleet's changes; resume with since_revision={resume_from}")]
    WatcherBehind { resume_from: u64 },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(
        "the lease pool is being restored after a coordinator restart; retry once the coordinator is SERVING (or give the request a wait)"
    )]
    PoolRestoring,
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// This coordinator is a standby, or has just stopped leading; the
    /// answer carries the leader's URL, when one is known, in
    /// `x-muster-leader`.
    #[error(
        "this coordinator is a standby: {}",
        .leader.as_deref().map_or_else(|| "no leader is known yet; retry another coordinator, or later".to_owned(), |url| format!("the leader is {url}"))
    )]
    NotLeader { leader: Option<String> },
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let code = match &error {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NodeNotFound(_)
            | ServiceError::Forgotten(_)
            | ServiceError::NoSimulatedAgent(_) => Code::NotFound,
            ServiceError::OutOfOrder(_) | ServiceError::Quarantined { .. } => {
                Code::FailedPrecondition
            }
            ServiceError::NodeIdHeld(_) => Code::PermissionDenied,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::Overloaded(_) => Code::ResourceExhausted,
            ServiceError::Superseded { .. } => Code::Aborted,
            // tonic reports a message over the decoding limit as OUT_OF_RANGE;
            // to the agent it is a resource limit like any other.
            ServiceError::Inbound(status) if status.code() == Code::OutOfRange => {
                Code::ResourceExhausted
            }
            ServiceError::Inbound(status) => status.code(),
            ServiceError::RegistrationTimeout(_) | ServiceError::HeartbeatTimeout(_) => {
                Code::DeadlineExceeded
            }
            ServiceError::HistoryPruned { .. } | ServiceError::LeaseHistoryPruned { .. } => {
                Code::OutOfRange
            }
            ServiceError::RevisionAhead { .. } => Code::FailedPrecondition,
            ServiceError::WatcherBehind { .. } => Code::Aborted,
            ServiceError::Pool(pool) => match pool {
                PoolError::Invalid(_) => Code::InvalidArgument,
                PoolError::RequestIdReused { .. } => Code::AlreadyExists,
                PoolError::UnknownLease(_) => Code::NotFound,
                PoolError::NotRenewable { .. } => Code::FailedPrecondition,
                PoolError::Exhausted(_) => Code::ResourceExhausted,
                PoolError::UnknownNode(_) | PoolError::Inconsistent(_) => Code::Internal,
            },
            ServiceError::ShuttingDown
            | ServiceError::PoolRestoring
            | ServiceError::NotLeader { .. } => Code::Unavailable,
            ServiceError::Store(store) if store.is_unavailable() => Code::Unavailable,
            ServiceError::Store(_) | ServiceError::Internal(_) => Code::Internal,
        };
        let mut status = Status::new(code, display_chain(&error));
        if let ServiceError::NotLeader {
            leader: Some(leader),
        } = &error
            && let Ok(url) = leader.parse()
        {
            status
                .metadata_mut()
                .insert(crate::failover::LEADER_METADATA, url);
        }
        status
    }
}

/// An error and its sources on one line, `outer: inner: innermost`. Messages
/// never repeat their source, so each cause appears once.
pub fn display_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut previous = line.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some libraries wrap an error in another that displays the same.
        if text != previous && !text.is_empty() {
            line.push_str(": ");
            line.push_str(&text);
        }
        previous = text;
        source = cause.source();
    }
    line
}

/// Why a coordinator or agent process could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot restore the lease pool")]
    Pool(#[from] PoolError),
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(
        "the state directory {path} is in use by {holder}; give each agent on a machine its own --state-dir (and --node-id)"
    )]
    StateDirInUse { path: PathBuf, holder: String },
    #[error("cannot keep the agent's identity in {path}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Config(#[from] InvalidInput),
    /// `--gpu-source` names a source that cannot be read, e.g.
    /// `file:/etc/gpus.json: line 3 column 7: missing field uuid`.
    #[error("--gpu-source {source_name}: {problem}")]
    GpuSource {
        source_name: String,
        problem: String,
    },
    #[error("the {task} task failed: {reason}")]
    TaskFailed { task: &'static str, reason: String },
    #[error("cannot install signal handler")]
    Signal(#[source] io::Error),
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {url} within {timeout:?}")]
    ConnectTimeout {
        url: String,
        timeout: std::time::Duration,
    },
    #[error("{url} answered {code:?}: {message}")]
    Rpc {
        url: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{url} closed the connection without answering; {advice}")]
    Dropped { url: String, advice: String },
    #[error("{url} was not SERVING within {}: {last}", humantime::format_duration(*.waited))]
    NotReady {
        url: String,
        waited: std::time::Duration,
        last: String,
    },
    #[error("{url} is {status}")]
    Unhealthy { url: String, status: &'static str },
    #[error("cannot write output")]
    Output(#[from] io::Error),
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    #[error("TLS: {reason}")]
    Tls { reason: String },
    #[error("{flag} {path}: {problem}")]
    TlsCertificate {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{reason}")]
    TlsIssue { reason: String },
    #[error("cannot write {path}")]
    WriteFile { path: PathBuf, source: io::Error },
    #[error("cannot read {flag} {path}")]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}
