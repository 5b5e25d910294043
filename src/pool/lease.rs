//! What a lease is, what asking for one carries, and the changes the pool
//! reports. These are plain values: the wire and the store map onto them.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use super::selector::LabelSelector;
use crate::{node::NodeId, validation::InvalidInput};

/// The shortest TTL a lease may have: shorter leases would cost a renewal
/// every few heartbeats.
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// The longest TTL: no lease lives forever.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest an acquisition may wait for revoked leases to be freed.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
pub const MAX_REQUEST_ID_LEN: usize = 128;
pub const MAX_HOLDER_LEN: usize = 256;
pub const MAX_GPU_UUID_LEN: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(String);

impl LeaseId {
    /// The id the pool gives the lease granted with `generation`; unique
    /// because generations never repeat.
    pub fn for_generation(generation: u64) -> Self {
        Self(format!("lease-{generation}"))
    }

    /// An id as a caller or the store gives it; any string is accepted, an
    /// unknown one simply names no lease.
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a lease may be placed. Every constraint given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Constraints {
    pub node_id: Option<NodeId>,
    pub gpu_uuid: Option<String>,
    pub labels: LabelSelector,
}

/// What a lease is for. Two acquisitions with the same `request_id` must
/// carry equal terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTerms {
    /// Who holds the lease: a service name, for people and for `list`.
    pub holder: String,
    /// VRAM in MiB.
    pub mb: u64,
    /// Higher is more important; only strictly higher priorities preempt.
    pub priority: i32,
    /// How long the lease lives without a renewal, and how far a renewal
    /// extends it.
    pub ttl: Duration,
    pub constraints: Constraints,
}

impl LeaseTerms {
    /// The first field in which `other` differs, for an error that says
    /// why a reused `request_id` was refused.
    pub(super) fn first_difference(&self, other: &Self) -> Option<&'static str> {
        if self.holder != other.holder {
            Some("holder")
        } else if self.mb != other.mb {
            Some("mb")
        } else if self.priority != other.priority {
            Some("priority")
        } else if self.ttl != other.ttl {
            Some("ttl")
        } else if self.constraints.node_id != other.constraints.node_id {
            Some("node_id")
        } else if self.constraints.gpu_uuid != other.constraints.gpu_uuid {
            Some("gpu_uuid")
        } else if self.constraints.labels != other.constraints.labels {
            Some("label_selector")
        } else {
            None
        }
    }
}

/// One `AcquireLease`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcquireRequest {
    /// The idempotency key: the same key with the same terms gets the same
    /// lease back.
    pub request_id: String,
    pub terms: LeaseTerms,
    /// How long the caller waits for revoked leases to be freed. Zero means
    /// it does not wait, and then no lease is revoked for it.
    pub wait: Duration,
}

impl AcquireRequest {
    /// The rules that need no knowledge of the fleet.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_text("request_id", &self.request_id, MAX_REQUEST_ID_LEN)?;
        validate_text("holder", &self.terms.holder, MAX_HOLDER_LEN)?;
        if self.terms.mb == 0 {
            return Err(InvalidInput::new("mb", "must be at least 1 MiB, got 0"));
        }
        let ttl = self.terms.ttl;
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(InvalidInput::new(
                "ttl",
                format!(
                    "must be between {} and {}, got {}",
                    humantime::format_duration(MIN_TTL),
                    humantime::format_duration(MAX_TTL),
                    humantime::format_duration(ttl)
                ),
            ));
        }
        if self.wait > MAX_WAIT {
            return Err(InvalidInput::new(
                "wait",
                format!(
                    "must be at most {}, got {}",
                    humantime::format_duration(MAX_WAIT),
                    humantime::format_duration(self.wait)
                ),
            ));
        }
        if let Some(uuid) = &self.terms.constraints.gpu_uuid {
            validate_text("gpu_uuid", uuid, MAX_GPU_UUID_LEN)?;
        }
        Ok(())
    }
}

fn validate_text(field: &'static str, value: &str, max_len: usize) -> Result<(), InvalidInput> {
    if value.is_empty() || value.len() > max_len {
        return Err(InvalidInput::new(
            field,
            format!("must be 1 to {max_len} bytes, got {}", value.len()),
        ));
    }
    if let Some(bad) = value.chars().find(|c| c.is_control()) {
        return Err(InvalidInput::new(
            field,
            format!("must not contain control characters, found {bad:?}"),
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LeaseState {
    Active,
    /// Revoked for a more important lease: still counted until its holder
    /// releases it or the revoke grace ends.
    Revoked,
    /// Its node is OFFLINE: still counted, active again if the node comes
    /// back within the orphan grace.
    Suspended,
    Released,
}

impl LeaseState {
    /// Whether the lease's memory is still taken from its GPU.
    pub fn counts(self) -> bool {
        self != Self::Released
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The holder released it.
    Holder,
    /// Its TTL passed without a renewal.
    Expired,
    /// It was revoked and its holder did not release it within the grace.
    RevokeGraceEnded,
    /// Its node stayed OFFLINE for the whole orphan grace.
    Orphaned,
    NodeLeft,
    /// Its node expired or was removed.
    NodeRemoved,
}

impl fmt::Display for ReleaseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Holder => "released by its holder",
            Self::Expired => "expired",
            Self::RevokeGraceEnded => "revoked, and its grace ended",
            Self::Orphaned => "released after its node stayed offline past the orphan grace",
            Self::NodeLeft => "released because its node left",
            Self::NodeRemoved => "released because its node was removed",
        })
    }
}

/// A lease as it is shown, persisted and restored. Moments are wall-clock
/// time; the pool keeps its own monotonic deadlines beside them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub lease_id: LeaseId,
    pub request_id: String,
    pub terms: LeaseTerms,
    pub node_id: NodeId,
    pub gpu_uuid: String,
    /// The fencing token: higher for every lease granted later, across
    /// restarts.
    pub generation: u64,
    pub granted_at: SystemTime,
    pub expires_at: SystemTime,
    pub state: LeaseState,
    pub revoked_at: Option<SystemTime>,
    pub suspended_at: Option<SystemTime>,
    pub released_at: Option<SystemTime>,
    pub release_reason: Option<ReleaseReason>,
}

/// What happened to a lease. Every change the pool makes is reported as
/// one, in order, with the lease as it is afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Granted,
    Renewed,
    /// Revoked to make room for the acquisition with this `request_id`.
    Revoked {
        for_request: String,
    },
    Suspended,
    Resumed,
    Released(ReleaseReason),
    /// Its deadlines started over when the pool was reconciled after a
    /// restart.
    Reconciled,
    /// Released long enough ago that the pool no longer keeps it; the store
    /// may delete it.
    Forgotten,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub event: Event,
    pub lease: Lease,
}
