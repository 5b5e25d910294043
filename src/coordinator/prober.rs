//! The prober: after a restart, asks every reloaded node's agent for its
//! Status, so live nodes are ONLINE again without waiting for their agents to
//! reconnect.
//!
//! A probe passes only when the agent answers with the expected node id:
//! another process now listening at a node's old address proves nothing.
//! Probes run concurrently, bounded in number and each in time; a node whose
//! agent has registered again before its turn is not probed. The round tells
//! [`Readiness`] once it has finished or hit its deadline.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Shared, readiness::Readiness};
use crate::{
    auth::Token,
    clock::Moment,
    error::display_chain,
    grpc,
    node::NodeId,
    proto::{StatusRequest, StatusResponse, agent_client::AgentClient},
    registry::ProbeTarget,
    tls::Tls,
};

/// What a probe presents to an agent: the cluster's join token, and over
/// TLS, the coordinator's certificate.
#[derive(Clone, Copy, Default)]
pub struct ProbeCredentials<'a> {
    pub tls: Option<&'a Tls>,
    pub join_token: Option<&'a Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The agent answered as the expected node.
    Alive { boot_id: String },
    /// Something answered, but as another node.
    WrongNode { answered: String },
    /// Nothing answered in time, or the call failed.
    Unreachable { reason: String },
}

/// Calls `Agent/Status` at `agent_url` and checks that it is `expected`.
pub async fn probe(
    agent_url: &str,
    expected: &NodeId,
    timeout: Duration,
    credentials: ProbeCredentials<'_>,
) -> ProbeOutcome {
    let call = call_status(agent_url, timeout, credentials);
    match tokio::time::timeout(timeout, call).await {
        Err(_) => ProbeOutcome::Unreachable {
            reason: format!("no answer within {timeout:?}"),
        },
        Ok(Err(reason)) => ProbeOutcome::Unreachable { reason },
        Ok(Ok(status)) if status.node_id == expected.as_str() => ProbeOutcome::Alive {
            boot_id: status.boot_id,
        },
        Ok(Ok(status)) => ProbeOutcome::WrongNode {
            answered: status.node_id,
        },
    }
}

async fn call_status(
    agent_url: &str,
    timeout: Duration,
    credentials: ProbeCredentials<'_>,
) -> Result<StatusResponse, String> {
    let endpoint = grpc::endpoint(agent_url, credentials.tls)
        .map_err(|e| display_chain(&e))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await.map_err(|e| display_chain(&e))?;
    let mut request = tonic::Request::new(StatusRequest {});
    request.metadata_mut().insert(
        grpc::PROBE_METADATA,
        tonic::metadata::MetadataValue::from_static("coordinator"),
    );
    if let Some(token) = credentials.join_token {
        token.attach_as_join(request.metadata_mut());
    }
    let response = AgentClient::new(channel)
        .status(request)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok(response.into_inner())
}

pub(super) async fn initial_round(
    shared: Arc<Shared>,
    timeout: Duration,
    concurrency: usize,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let targets = shared.lock().unproven();
    let total = targets.len();
    let deadline = tokio::time::Instant::now() + timeout * 2;
    let credentials = ProbeCredentials {
        tls: shared.tls.as_ref(),
        join_token: shared.join_token.as_ref(),
    };
    let mut outcomes = futures::stream::iter(targets)
        .map(|target| {
            let shared = shared.clone();
            async move {
                // Most agents of a fleet re-register on their own within a
                // second or two; probing them too would only double the
                // connections a restart costs both sides.
                if !shared.lock().is_unproven(&target) {
                    return (target, None);
                }
                let outcome = probe(&target.agent_url, &target.node_id, timeout, credentials).await;
                (target, Some(outcome))
            }
        })
        .buffer_unordered(concurrency);

    let mut proven = 0usize;
    let mut skipped = 0usize;
    let mut serving = false;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(deadline), if !serving => {
                warn!(total, proven, "initial probe round hit its deadline; serving while the rest finish");
                readiness.probe_round_done().await;
                serving = true;
                continue;
            }
            next = outcomes.next() => next,
        };
        let Some((target, outcome)) = next else {
            break;
        };
        let Some(outcome) = outcome else {
            skipped += 1;
            continue;
        };
        let ProbeTarget {
            node_id, agent_url, ..
        } = &target;
        match outcome {
            ProbeOutcome::Alive { boot_id } => {
                proven += 1;
                if shared.update(|registry| registry.probe_succeeded(&target, Moment::now())) {
                    info!(%node_id, %boot_id, "probe passed; node online");
                }
            }
            ProbeOutcome::WrongNode { answered } => {
                let reason = format!("{agent_url} answered as node {answered}");
                if shared.update(|registry| registry.probe_failed(&target, &reason)) {
                    warn!(%node_id, %agent_url, %answered, "probe reached a different node; not marking online");
                }
            }
            ProbeOutcome::Unreachable { reason } => {
                let reason = explain_probe_failure(&reason);
                if shared.update(|registry| registry.probe_failed(&target, &reason)) {
                    warn!(%node_id, %agent_url, %reason, "probe failed; the node stays UNKNOWN until its agent reconnects (shown by `muster nodes get`)");
                }
            }
        }
    }
    info!(total, proven, skipped, "initial probe round finished");
    if !serving {
        readiness.probe_round_done().await;
    }
}

/// `reason` with what to do about the TLS failures whose rustls names mean
/// little to an operator.
fn explain_probe_failure(reason: &str) -> String {
    let advice = if reason.contains("NotValidForName") || reason.contains("not valid for name") {
        Some(
            "the agent's certificate does not cover the host of its advertised URL; make one with `muster tls cert --name HOST` for that host, or set --advertise-url to a name it covers",
        )
    } else if reason.contains("UnknownIssuer") || reason.contains("BadSignature") {
        Some("the agent's certificate is not signed by the coordinator's --tls-ca")
    } else if reason.contains("Expired") {
        Some("the agent's certificate has expired")
    } else {
        None
    };
    match advice {
        Some(advice) => format!("{reason} ({advice})"),
        None => reason.to_owned(),
    }
}
