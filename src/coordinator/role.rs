//! The coordinator's role among coordinators that share one database.
//!
//! [`Roles`] is the one owner of the role: `leader` while this process holds
//! the database's leadership lease (always, on a database that arbitrates
//! none), `standby` otherwise. Every response of every service carries it in
//! `x-muster-role` (through [`grpc::RoleLayer`], outermost on the server).
//! A standby refuses the calls only the leader serves ([`leader_only`])
//! before any handler runs: UNAVAILABLE, with the leader's URL in
//! `x-muster-leader` while a live leader is known.
//!
//! Each change of role is logged once, with the epoch and the leader's URL,
//! and exported as `muster_coordinator_leader` (1 or 0) and
//! `muster_leader_epoch`.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::info;

use crate::{
    error::ServiceError,
    grpc::{self, RolePolicy},
    store::Leader,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Leader,
    Standby,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Leader => "leader",
            Self::Standby => "standby",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    role: Role,
    /// This process's epoch while it leads; the known leader's otherwise.
    epoch: Option<u64>,
    leader_url: Option<String>,
}

/// The role, shared by the server's layer, the services and the campaign.
#[derive(Clone)]
pub(crate) struct Roles {
    view: Arc<watch::Sender<View>>,
    own_url: Arc<str>,
    shutdown: CancellationToken,
}

/// The gRPC paths only a leader serves: agents' streams and every write.
pub(crate) fn leader_only(path: &str) -> bool {
    const COORDINATOR_WRITES: [&str; 4] = [
        "/muster.v1.Coordinator/Heartbeat",
        "/muster.v1.Coordinator/RemoveNode",
        "/muster.v1.Coordinator/DrainNode",
        "/muster.v1.Coordinator/UndrainNode",
    ];
    COORDINATOR_WRITES.contains(&path) || path.starts_with("/muster.v1.Pool/")
}

impl Roles {
    /// Starts as a standby that knows no leader.
    pub(crate) fn new(own_url: String, shutdown: CancellationToken) -> Self {
        metrics::gauge!("muster_coordinator_leader").set(0.0);
        Self {
            view: Arc::new(watch::Sender::new(View {
                role: Role::Standby,
                epoch: None,
                leader_url: None,
            })),
            own_url: own_url.into(),
            shutdown,
        }
    }

    pub(crate) fn role(&self) -> Role {
        self.view.borrow().role
    }

    pub(crate) fn own_url(&self) -> &str {
        &self.own_url
    }

    /// This process leads at `epoch`.
    pub(crate) fn lead(&self, epoch: u64) {
        let view = View {
            role: Role::Leader,
            epoch: Some(epoch),
            leader_url: Some(self.own_url.to_string()),
        };
        if self.view.send_replace(view).role != Role::Leader {
            metrics::gauge!("muster_coordinator_leader").set(1.0);
            metrics::gauge!("muster_leader_epoch").set(epoch as f64);
            metrics::counter!("muster_role_changes_total", "role" => "leader").increment(1);
            info!(role = "leader", epoch, leader_url = %self.own_url, "coordinator role: leader");
        }
    }

    /// This process does not lead; `leader` leads, if it is known and its
    /// lease is live.
    pub(crate) fn follow(&self, leader: Option<&Leader>, why: &str) {
        let leader = leader.filter(|leader| !leader.expires_in.is_zero());
        let view = View {
            role: Role::Standby,
            epoch: leader.map(|leader| leader.epoch),
            leader_url: leader
                .map(|leader| leader.url.clone())
                .filter(|url| **url != *self.own_url),
        };
        let before = self.view.send_replace(view.clone());
        if before.role != Role::Standby {
            metrics::gauge!("muster_coordinator_leader").set(0.0);
            metrics::counter!("muster_role_changes_total", "role" => "standby").increment(1);
        }
        if before.role != Role::Standby || before.leader_url != view.leader_url {
            info!(
                role = "standby",
                epoch = ?view.epoch,
                leader_url = view.leader_url.as_deref().unwrap_or("(none known)"),
                %why,
                "coordinator role: standby"
            );
        }
    }

    /// Why a call only the leader serves is refused here now.
    pub(crate) fn refusal(&self) -> ServiceError {
        if self.shutdown.is_cancelled() {
            return ServiceError::ShuttingDown;
        }
        ServiceError::NotLeader {
            leader: self.view.borrow().leader_url.clone(),
        }
    }
}

impl RolePolicy for Roles {
    fn role(&self) -> &'static str {
        Roles::role(self).as_str()
    }

    fn refuse(&self, path: &str) -> Option<Status> {
        if Roles::role(self) == Role::Leader || !leader_only(path) {
            return None;
        }
        metrics::counter!("muster_standby_refusals_total").increment(1);
        Some(Status::from(self.refusal()))
    }
}

impl From<Roles> for grpc::RoleLayer {
    fn from(roles: Roles) -> Self {
        Self(Some(Arc::new(roles)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn leader(url: &str, expires_in: Duration) -> Leader {
        Leader {
            holder: "other".to_owned(),
            url: url.to_owned(),
            epoch: 7,
            expires_in,
        }
    }

    #[test]
    fn a_standby_refuses_only_the_leaders_calls_and_names_a_live_leader() {
        let roles = Roles::new("http://10.0.0.1:7700".to_owned(), CancellationToken::new());
        roles.follow(
            Some(&leader("http://10.0.0.2:7700", Duration::from_secs(5))),
            "test",
        );
        assert!(roles.refuse("/muster.v1.Coordinator/ListNodes").is_none());
        assert!(roles.refuse("/grpc.health.v1.Health/Check").is_none());
        let refused = roles
            .refuse("/muster.v1.Coordinator/Heartbeat")
            .expect("a standby refuses Heartbeat");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(
            refused
                .metadata()
                .get(crate::failover::LEADER_METADATA)
                .and_then(|url| url.to_str().ok()),
            Some("http://10.0.0.2:7700")
        );
        assert!(roles.refuse("/muster.v1.Pool/AcquireLease").is_some());
    }

    #[test]
    fn an_expired_leader_is_no_hint() {
        let roles = Roles::new("http://10.0.0.1:7700".to_owned(), CancellationToken::new());
        roles.follow(
            Some(&leader("http://10.0.0.2:7700", Duration::ZERO)),
            "test",
        );
        let refused = roles.refuse("/muster.v1.Coordinator/DrainNode").unwrap();
        assert!(
            refused
                .metadata()
                .get(crate::failover::LEADER_METADATA)
                .is_none()
        );
    }

    #[test]
    fn a_leader_refuses_nothing() {
        let roles = Roles::new("http://10.0.0.1:7700".to_owned(), CancellationToken::new());
        roles.lead(3);
        assert_eq!(RolePolicy::role(&roles), "leader");
        assert!(roles.refuse("/muster.v1.Coordinator/Heartbeat").is_none());
    }
}
