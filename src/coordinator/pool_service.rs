//! The Pool gRPC service: VRAM leases. The wire types stop here; the pool
//! sees only its own requests and leases. Guarded by the admin token, as
//! the operator calls are. Only the leader holds the pool; a standby
//! refuses every call (the role layer does, before a call reaches here).

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::{
    Process, Shared,
    lease_watch::{self, Interest, LeaseEvents},
};
use crate::{
    auth,
    error::ServiceError,
    node::NodeId,
    pool::{
        AcquireRequest, Constraints, LabelSelector, LeaseFilter, LeaseId, LeaseState, LeaseTerms,
    },
    proto::{self, pool_server::Pool},
    validation::InvalidInput,
};

pub(crate) struct PoolService {
    process: Arc<Process>,
}

impl PoolService {
    pub(super) fn new(process: Arc<Process>) -> Self {
        Self { process }
    }

    /// The leader's term, for an operator with the admin token.
    fn admit<T>(&self, request: &Request<T>) -> Result<Arc<Shared>, ServiceError> {
        self.require_admin(request)?;
        self.process.leader()
    }

    fn require_admin<T>(&self, request: &Request<T>) -> Result<(), ServiceError> {
        let authorization = request.metadata().get(auth::AUTHORIZATION_METADATA);
        let authorization = authorization.map(|value| value.as_bytes());
        auth::require_admin_token(self.process.admin_token.as_ref(), authorization).map_err(
            |denied| {
                metrics::counter!("muster_admin_requests_refused_total").increment(1);
                warn!(peer = ?request.remote_addr(), %denied, "refused a Pool call");
                ServiceError::from(denied)
            },
        )
    }
}

#[tonic::async_trait]
impl Pool for PoolService {
    type WatchLeasesStream = LeaseEvents;

    async fn acquire_lease(
        &self,
        request: Request<proto::AcquireLeaseRequest>,
    ) -> Result<Response<proto::Lease>, Status> {
        let shared = self.admit(&request)?;
        if shared.stop.is_cancelled() {
            return Err(shared.roles.refusal().into());
        }
        let request = acquire_request(request.into_inner()).map_err(ServiceError::from)?;
        let lease = shared.leases.acquire(request, &shared.stop).await?;
        Ok(Response::new(proto::Lease::from(&lease)))
    }

    async fn renew_lease(
        &self,
        request: Request<proto::RenewLeaseRequest>,
    ) -> Result<Response<proto::Lease>, Status> {
        let shared = self.admit(&request)?;
        let lease_id = lease_id(&request.into_inner().lease_id).map_err(ServiceError::from)?;
        let lease = shared.leases.renew(&lease_id).await?;
        Ok(Response::new(proto::Lease::from(&lease)))
    }

    async fn release_lease(
        &self,
        request: Request<proto::ReleaseLeaseRequest>,
    ) -> Result<Response<proto::ReleaseLeaseResponse>, Status> {
        let shared = self.admit(&request)?;
        let lease_id = lease_id(&request.into_inner().lease_id).map_err(ServiceError::from)?;
        let lease = shared.leases.release(&lease_id).await?;
        if let Some(lease) = &lease {
            debug!(%lease_id, holder = %lease.terms.holder, "lease released by its holder");
        }
        Ok(Response::new(proto::ReleaseLeaseResponse {
            lease: lease.as_ref().map(proto::Lease::from),
        }))
    }

    async fn watch_leases(
        &self,
        request: Request<proto::WatchLeasesRequest>,
    ) -> Result<Response<Self::WatchLeasesStream>, Status> {
        let shared = self.admit(&request)?;
        if shared.stop.is_cancelled() {
            return Err(shared.roles.refusal().into());
        }
        let request = request.into_inner();
        let interest = Interest {
            since_revision: request.since_revision,
            holder: request.holder,
        };
        let events =
            lease_watch::watch(shared.store.clone(), interest, shared.stop.clone()).await?;
        Ok(Response::new(events))
    }

    async fn list_leases(
        &self,
        request: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        let shared = self.admit(&request)?;
        let filter = lease_filter(request.into_inner()).map_err(ServiceError::from)?;
        let leases = shared.leases.list(&filter);
        Ok(Response::new(proto::ListLeasesResponse {
            leases: leases.iter().map(proto::Lease::from).collect(),
        }))
    }
}

fn lease_id(raw: &str) -> Result<LeaseId, InvalidInput> {
    if raw.is_empty() {
        return Err(InvalidInput::new("lease_id", "is required"));
    }
    Ok(LeaseId::new(raw))
}

fn duration(
    field: &'static str,
    value: Option<prost_types::Duration>,
) -> Result<Duration, InvalidInput> {
    let Some(value) = value else {
        return Ok(Duration::ZERO);
    };
    Duration::try_from(value)
        .map_err(|_| InvalidInput::new(field, format!("must be a positive duration, got {value}")))
}

fn optional(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn acquire_request(request: proto::AcquireLeaseRequest) -> Result<AcquireRequest, InvalidInput> {
    if request.ttl.is_none() {
        return Err(InvalidInput::new(
            "ttl",
            "is required: a lease lives between 5s and 24h unless renewed",
        ));
    }
    let node_id = optional(request.node_id)
        .map(|raw| NodeId::parse("node_id", &raw))
        .transpose()?;
    Ok(AcquireRequest {
        request_id: request.request_id,
        terms: LeaseTerms {
            holder: request.holder,
            mb: request.mb,
            priority: request.priority,
            ttl: duration("ttl", request.ttl)?,
            constraints: Constraints {
                node_id,
                gpu_uuid: optional(request.gpu_uuid),
                labels: LabelSelector::parse("label_selector", &request.label_selector)?,
            },
        },
        wait: duration("wait", request.wait)?,
    })
}

fn lease_filter(request: proto::ListLeasesRequest) -> Result<LeaseFilter, InvalidInput> {
    let states = request
        .states
        .iter()
        .map(|raw| match proto::LeaseState::try_from(*raw) {
            Ok(proto::LeaseState::Active) => Ok(LeaseState::Active),
            Ok(proto::LeaseState::Revoked) => Ok(LeaseState::Revoked),
            Ok(proto::LeaseState::Suspended) => Ok(LeaseState::Suspended),
            Ok(proto::LeaseState::Released) => Ok(LeaseState::Released),
            Ok(proto::LeaseState::Unspecified) | Err(_) => Err(InvalidInput::new(
                "states",
                format!(
                    "{raw} is not a lease state (1 active, 2 revoked, 3 suspended, 4 released)"
                ),
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(LeaseFilter {
        node_id: optional(request.node_id)
            .map(|raw| NodeId::parse("node_id", &raw))
            .transpose()?,
        gpu_uuid: optional(request.gpu_uuid),
        holder: optional(request.holder),
        states,
    })
}
