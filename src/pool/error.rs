//! The pool's one error type, with messages a caller can act on.

use std::{fmt, time::SystemTime};

use super::lease::{LeaseId, ReleaseReason};
use crate::{node::NodeId, validation::InvalidInput};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// ALREADY_EXISTS on the wire.
    #[error(
        "request_id {request_id:?} was already used with a different {field}; \
         repeat the same parameters or use a new request_id"
    )]
    RequestIdReused {
        request_id: String,
        field: &'static str,
    },
    #[error("lease {0} is not known: never granted, or released long enough ago to be forgotten")]
    UnknownLease(LeaseId),
    #[error("lease {lease_id} cannot be renewed: it {why}; acquire a new lease")]
    NotRenewable { lease_id: LeaseId, why: Unrenewable },
    /// RESOURCE_EXHAUSTED on the wire.
    #[error("{0}")]
    Exhausted(Shortfall),
    #[error("node {0} is not known to the pool")]
    UnknownNode(NodeId),
    /// Persisted leases that cannot all be true at once.
    #[error("the stored leases are inconsistent: {0}")]
    Inconsistent(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unrenewable {
    Expired { at: SystemTime },
    Revoked { at: SystemTime },
    Released { reason: ReleaseReason },
}

impl fmt::Display for Unrenewable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expired { at } => {
                write!(f, "expired at {}", humantime::format_rfc3339_millis(*at))
            }
            Self::Revoked { at } => write!(
                f,
                "was revoked at {} for a more important lease",
                humantime::format_rfc3339_millis(*at)
            ),
            Self::Released { reason } => write!(f, "was {reason}"),
        }
    }
}

/// One GPU and its free memory, to say how close a request came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuFree {
    pub node_id: NodeId,
    pub index: u32,
    pub free_mib: u64,
}

/// Why an acquisition could not be granted now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub mb: u64,
    pub priority: i32,
    /// Placeable GPUs satisfying the constraints.
    pub eligible_gpus: usize,
    pub most_free: Option<GpuFree>,
    pub blocked: Blocked,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// No healthy GPU on an ONLINE, undrained node matches the constraints.
    NoEligibleGpu,
    /// On no single GPU would revoking every lease of lower priority free
    /// enough.
    NothingToRevoke,
    /// Revoking leases would make room, but the request does not wait, so
    /// nothing was revoked.
    WouldRevoke {
        gpu: GpuFree,
        leases: usize,
        revoked_mib: u64,
    },
    /// The request waited for revoked leases, and they were not freed in
    /// time (said by the layer that waited).
    WaitedInVain { waiting_for: Vec<LeaseId> },
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no GPU can take {} MiB", self.mb)?;
        if self.blocked == Blocked::NoEligibleGpu {
            return f.write_str(
                ": no healthy GPU on an ONLINE, undrained node matches the constraints",
            );
        }
        write!(f, ": {} matching GPUs", self.eligible_gpus)?;
        if let Some(most) = &self.most_free {
            write!(
                f,
                ", the most free is {} MiB on node {} GPU {}",
                most.free_mib, most.node_id, most.index
            )?;
        }
        match &self.blocked {
            Blocked::NoEligibleGpu => Ok(()),
            Blocked::NothingToRevoke => write!(
                f,
                "; revoking leases of priority below {} would not free enough on any one GPU",
                self.priority
            ),
            Blocked::WouldRevoke { gpu, leases: 0, .. } => write!(
                f,
                "; node {} GPU {} would have room once leases revoked earlier are freed, \
                 but the request does not wait (set a wait)",
                gpu.node_id, gpu.index
            ),
            Blocked::WouldRevoke {
                gpu,
                leases,
                revoked_mib,
            } => write!(
                f,
                "; revoking {leases} lease(s) of {revoked_mib} MiB on node {} GPU {} would make \
                 room, but the request does not wait (set a wait)",
                gpu.node_id, gpu.index
            ),
            Blocked::WaitedInVain { waiting_for } => {
                let ids: Vec<&str> = waiting_for.iter().map(LeaseId::as_str).collect();
                write!(
                    f,
                    "; the wait ended before the revoked leases [{}] were freed",
                    ids.join(", ")
                )
            }
        }
    }
}
