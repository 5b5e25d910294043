//! The dashboard's JSON: the ListNodes view of the fleet as `/api/nodes`
//! serves it and `/events` carries it, built from the wire types so that
//! both say exactly what `muster nodes list` says.
//!
//! Times are RFC 3339 strings in UTC with milliseconds; a time the node does
//! not have (not drained, not offline) is absent rather than empty.

use std::{collections::BTreeMap, time::SystemTime};

use serde::Serialize;

use crate::proto;

/// One node, as `GET /api/nodes` lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub node_id: String,
    /// `ONLINE`, `OFFLINE`, `UNKNOWN` or `LEFT`.
    pub state: &'static str,
    pub agent_url: String,
    pub hostname: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<String>,
    pub session_generation: u64,
    pub drained: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub drain_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained_at: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_probe_error: String,
}

/// The whole fleet, as `GET /api/nodes` answers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodesView {
    /// Ordered by node id.
    pub nodes: Vec<NodeView>,
    /// Present while the mass-expiry guard holds expiry back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_paused: Option<ExpiryPausedView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExpiryPausedView {
    pub nodes_down: u64,
    pub nodes_known: u64,
    pub guard_fraction: f64,
}

/// The state's name without the enum's prefix, as the CLI prints it.
pub fn state_name(state: i32) -> &'static str {
    match proto::NodeState::try_from(state) {
        Ok(proto::NodeState::Online) => "ONLINE",
        Ok(proto::NodeState::Offline) => "OFFLINE",
        Ok(proto::NodeState::Left) => "LEFT",
        Ok(proto::NodeState::Unknown | proto::NodeState::Unspecified) | Err(_) => "UNKNOWN",
    }
}

fn rfc3339(timestamp: Option<prost_types::Timestamp>) -> Option<String> {
    let time = SystemTime::try_from(timestamp?).ok()?;
    Some(humantime::format_rfc3339_millis(time).to_string())
}

impl From<proto::Node> for NodeView {
    fn from(node: proto::Node) -> Self {
        Self {
            state: state_name(node.state),
            node_id: node.node_id,
            agent_url: node.agent_url,
            hostname: node.hostname,
            version: node.version,
            labels: node.labels.into_iter().collect(),
            last_seen: rfc3339(node.last_seen),
            registered_at: rfc3339(node.registered_at),
            offline_since: rfc3339(node.offline_since),
            session_generation: node.session_generation,
            drained: node.drained,
            drain_reason: node.drain_reason,
            drained_at: rfc3339(node.drained_at),
            last_probe_error: node.last_probe_error,
        }
    }
}

impl From<proto::ListNodesResponse> for NodesView {
    fn from(response: proto::ListNodesResponse) -> Self {
        Self {
            nodes: response.nodes.into_iter().map(NodeView::from).collect(),
            expiry_paused: response.expiry_paused.map(|paused| ExpiryPausedView {
                nodes_down: paused.nodes_down,
                nodes_known: paused.nodes_known,
                guard_fraction: paused.guard_fraction,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_offline_node_keeps_every_field_the_dashboard_shows() {
        let node = proto::Node {
            node_id: "gpu-1".into(),
            state: proto::NodeState::Offline.into(),
            labels: [("gpu".to_owned(), "a100".to_owned())].into(),
            last_seen: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            drained: true,
            drain_reason: "disk swap".into(),
            ..Default::default()
        };
        let json = serde_json::to_value(NodeView::from(node)).unwrap();
        assert_eq!(json["state"], "OFFLINE");
        assert_eq!(json["last_seen"], "2023-11-14T22:13:20.005Z");
        assert_eq!(json["labels"]["gpu"], "a100");
        assert_eq!(json["drained"], true);
        assert_eq!(json["drain_reason"], "disk swap");
        assert!(json.get("drained_at").is_none());
        assert!(json.get("offline_since").is_none());
    }

    #[test]
    fn states_are_named_as_the_cli_names_them() {
        assert_eq!(state_name(proto::NodeState::Left.into()), "LEFT");
        assert_eq!(state_name(proto::NodeState::Online.into()), "ONLINE");
        assert_eq!(state_name(99), "UNKNOWN");
    }
}
