//! Conversions between the wire types of [`crate::proto`] and the domain.
//! They sit in the service layer, so the domain ([`crate::node`],
//! [`crate::registry`]) never knows the wire types; every field an agent
//! sends is validated here, on the way in.

pub mod json;

use std::time::Duration;

use crate::{
    auth::NodeSecret,
    clock::to_unix_millis,
    node::{self, Claim, Gpu, GpuInventory, NodeId, NodeSnapshot, NodeState, Registration},
    pool::{Lease, LeaseState, ReleaseReason},
    proto,
    validation::InvalidInput,
};

impl TryFrom<proto::Register> for Claim {
    type Error = InvalidInput;

    fn try_from(register: proto::Register) -> Result<Self, Self::Error> {
        let node_id = NodeId::parse("register.node_id", &register.node_id)?;
        let secret = NodeSecret::parse("register.node_secret", &register.node_secret)?;
        node::validate_url("register.agent_url", &register.agent_url)?;
        if register.boot_id.is_empty() {
            return Err(InvalidInput::new("register.boot_id", "must not be empty"));
        }
        for (field, value) in [
            ("register.boot_id", &register.boot_id),
            ("register.version", &register.version),
            ("register.hostname", &register.hostname),
        ] {
            node::validate_short_field(field, value)?;
        }
        let labels = node::validate_labels(register.labels)?;
        let max_backoff = register
            .max_backoff
            .map(|declared| {
                Duration::try_from(declared)
                    .map_err(|_| InvalidInput::new("register.max_backoff", "must not be negative"))
            })
            .transpose()?;
        let gpus = register
            .inventory
            .map(|inventory| gpu_inventory("register.inventory", inventory))
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            registration: Registration {
                node_id,
                agent_url: register.agent_url,
                boot_id: register.boot_id,
                version: register.version,
                hostname: register.hostname,
                labels,
                max_backoff: node::bounded_max_backoff(max_backoff),
                gpus,
            },
            secret,
        })
    }
}

/// An inventory from the wire, validated; `field` names the message it came
/// in (`register.inventory`, `heartbeat.inventory`).
pub fn gpu_inventory(
    field: &'static str,
    inventory: proto::GpuInventory,
) -> Result<GpuInventory, InvalidInput> {
    let gpus = inventory
        .gpus
        .into_iter()
        .map(|gpu| Gpu {
            index: gpu.index,
            uuid: gpu.uuid,
            name: gpu.name,
            memory_total_mib: gpu.memory_total_mib,
            memory_used_mib: gpu.memory_used_mib,
            utilization_percent: gpu.utilization_percent,
            temperature_celsius: gpu.temperature_celsius,
            unhealthy: (!gpu.healthy).then(|| {
                if gpu.unhealthy_reason.is_empty() {
                    "reported unhealthy".to_owned()
                } else {
                    gpu.unhealthy_reason
                }
            }),
        })
        .collect();
    GpuInventory::new(field, gpus)
}

impl From<&Gpu> for proto::Gpu {
    fn from(gpu: &Gpu) -> Self {
        Self {
            index: gpu.index,
            uuid: gpu.uuid.clone(),
            name: gpu.name.clone(),
            memory_total_mib: gpu.memory_total_mib,
            memory_used_mib: gpu.memory_used_mib,
            utilization_percent: gpu.utilization_percent,
            temperature_celsius: gpu.temperature_celsius,
            healthy: gpu.is_healthy(),
            unhealthy_reason: gpu.unhealthy.clone().unwrap_or_default(),
        }
    }
}

impl From<&GpuInventory> for proto::GpuInventory {
    fn from(inventory: &GpuInventory) -> Self {
        Self {
            gpus: inventory.gpus().iter().map(proto::Gpu::from).collect(),
        }
    }
}

impl From<NodeState> for proto::NodeState {
    fn from(state: NodeState) -> Self {
        match state {
            NodeState::Unknown => Self::Unknown,
            NodeState::Online => Self::Online,
            NodeState::Offline => Self::Offline,
            NodeState::Left => Self::Left,
        }
    }
}

impl From<NodeSnapshot> for proto::Node {
    fn from(node: NodeSnapshot) -> Self {
        let registration = node.registration;
        Self {
            node_id: registration.node_id.to_string(),
            agent_url: registration.agent_url,
            state: proto::NodeState::from(node.state).into(),
            last_seen: Some(node.last_seen.into()),
            registered_at: Some(node.registered_at.into()),
            boot_id: registration.boot_id,
            labels: registration.labels.into_iter().collect(),
            version: registration.version,
            hostname: registration.hostname,
            session_generation: node.generation,
            offline_since: node.offline_since.map(Into::into),
            drained: node.drain.is_some(),
            drained_at: node.drain.as_ref().map(|drain| drain.since.into()),
            drain_reason: node.drain.map(|drain| drain.reason).unwrap_or_default(),
            last_probe_error: node.last_probe_error.unwrap_or_default(),
            gpus: registration
                .gpus
                .gpus()
                .iter()
                .map(proto::Gpu::from)
                .collect(),
        }
    }
}

fn lease_state_to_proto(state: LeaseState) -> proto::LeaseState {
    match state {
        LeaseState::Active => proto::LeaseState::Active,
        LeaseState::Revoked => proto::LeaseState::Revoked,
        LeaseState::Suspended => proto::LeaseState::Suspended,
        LeaseState::Released => proto::LeaseState::Released,
    }
}

pub fn timestamp(at: std::time::SystemTime) -> prost_types::Timestamp {
    let millis = to_unix_millis(at);
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

impl From<&Lease> for proto::Lease {
    fn from(lease: &Lease) -> Self {
        proto::Lease {
            lease_id: lease.lease_id.to_string(),
            request_id: lease.request_id.clone(),
            holder: lease.terms.holder.clone(),
            node_id: lease.node_id.to_string(),
            gpu_uuid: lease.gpu_uuid.clone(),
            mb: lease.terms.mb,
            priority: lease.terms.priority,
            generation: lease.generation,
            expires_at: Some(timestamp(lease.expires_at)),
            state: lease_state_to_proto(lease.state).into(),
            ttl: prost_types::Duration::try_from(lease.terms.ttl).ok(),
            granted_at: Some(timestamp(lease.granted_at)),
            release_reason: lease
                .release_reason
                .map(|reason: ReleaseReason| reason.to_string())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{MAX_AGENT_URL_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS};

    fn register(node_id: &str, agent_url: &str) -> proto::Register {
        proto::Register {
            node_id: node_id.to_owned(),
            agent_url: agent_url.to_owned(),
            boot_id: "boot".to_owned(),
            node_secret: "0123456789abcdef".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn agent_url_rules() {
        assert!(Claim::try_from(register("n", "http://10.0.0.1:7701")).is_ok());
        assert!(Claim::try_from(register("n", "https://gpu.example:443")).is_ok());
        for bad in [
            "",
            "10.0.0.1:7701",
            "ftp://h:1",
            "http://h",
            "http://:80",
            "http://h:notaport",
        ] {
            let err = Claim::try_from(register("n", bad)).expect_err(bad);
            assert_eq!(err.field, "register.agent_url", "{bad}");
        }
        let long = format!("http://h:1/{}", "x".repeat(MAX_AGENT_URL_LEN));
        assert!(Claim::try_from(register("n", &long)).is_err());
    }

    #[test]
    fn label_bounds() {
        let mut too_many = register("n", "http://h:1");
        too_many.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(Claim::try_from(too_many).is_err());

        let mut long_value = register("n", "http://h:1");
        long_value
            .labels
            .insert("gpu".into(), "x".repeat(MAX_LABEL_VALUE_LEN + 1));
        assert!(Claim::try_from(long_value).is_err());
    }

    #[test]
    fn node_secret_is_required_and_bounded() {
        for bad in ["", "short", &"s".repeat(257), "with spaces inside it"] {
            let mut message = register("n", "http://h:1");
            message.node_secret = bad.to_owned();
            assert_eq!(
                Claim::try_from(message).unwrap_err().field,
                "register.node_secret"
            );
        }
    }

    #[test]
    fn control_characters_are_refused() {
        let mut message = register("n", "http://h:1");
        message.hostname = "gpu\n2026-01-01 INFO forged".into();
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.hostname"
        );
        let mut message = register("n", "http://h:1");
        message.labels.insert("gpu".into(), "\u{1b}[31mred".into());
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.labels"
        );
    }

    #[test]
    fn an_inventory_round_trips_and_a_broken_one_is_refused_naming_the_field() {
        let gpu = proto::Gpu {
            index: 0,
            uuid: "GPU-0".into(),
            name: "A100-80G".into(),
            memory_total_mib: 81_920,
            memory_used_mib: 512,
            utilization_percent: 40,
            temperature_celsius: 51,
            healthy: false,
            unhealthy_reason: String::new(),
        };
        let mut message = register("n", "http://h:1");
        message.inventory = Some(proto::GpuInventory {
            gpus: vec![gpu.clone()],
        });
        let gpus = Claim::try_from(message).unwrap().registration.gpus;
        assert_eq!(
            gpus.gpus()[0].unhealthy.as_deref(),
            Some("reported unhealthy")
        );
        let back = proto::GpuInventory::from(&gpus);
        assert_eq!(back.gpus[0].memory_used_mib, 512);
        assert!(!back.gpus[0].healthy);

        let mut message = register("n", "http://h:1");
        message.inventory = Some(proto::GpuInventory {
            gpus: vec![proto::Gpu {
                memory_used_mib: 90_000,
                ..gpu
            }],
        });
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.inventory"
        );
        assert!(
            Claim::try_from(register("n", "http://h:1"))
                .unwrap()
                .registration
                .gpus
                .is_empty()
        );
    }

    #[test]
    fn empty_boot_id_is_refused() {
        let mut message = register("n", "http://h:1");
        message.boot_id.clear();
        assert_eq!(
            Claim::try_from(message).unwrap_err().field,
            "register.boot_id"
        );
    }

    #[test]
    fn the_agents_backoff_ceiling_defaults_is_bounded_and_never_negative() {
        let declared = |max_backoff: Option<prost_types::Duration>| {
            let mut message = register("n", "http://h:1");
            message.max_backoff = max_backoff;
            Claim::try_from(message).map(|claim| claim.registration.max_backoff)
        };
        let seconds = |seconds: i64| Some(prost_types::Duration { seconds, nanos: 0 });
        assert_eq!(declared(None), Ok(node::DEFAULT_MAX_BACKOFF));
        assert_eq!(declared(seconds(90)), Ok(Duration::from_secs(90)));
        assert_eq!(declared(seconds(36_000)), Ok(node::MAX_MAX_BACKOFF));
        assert_eq!(
            declared(seconds(-1)).unwrap_err().field,
            "register.max_backoff"
        );
    }
}
