//! The JSON shapes of nodes and watch events, shared by `muster nodes`
//! (`--output json`) and anything else that serves them as JSON: times in
//! RFC 3339 with milliseconds, states and kinds by their short names, empty
//! optional strings left out.

use std::{collections::BTreeMap, time::SystemTime};

use serde::Serialize;

use crate::proto;

/// The JSON shape of a node: times in RFC 3339, state as its short name.
#[derive(Debug, Serialize)]
pub struct NodeJson<'a> {
    node_id: &'a str,
    state: &'static str,
    agent_url: &'a str,
    last_seen: Option<String>,
    registered_at: Option<String>,
    offline_since: Option<String>,
    drained: bool,
    drain_reason: Option<&'a str>,
    drained_at: Option<String>,
    boot_id: &'a str,
    session_generation: u64,
    version: &'a str,
    hostname: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
    last_probe_error: Option<&'a str>,
}

impl<'a> From<&'a proto::Node> for NodeJson<'a> {
    fn from(node: &'a proto::Node) -> Self {
        Self {
            node_id: &node.node_id,
            state: state_name(node.state),
            agent_url: &node.agent_url,
            last_seen: node.last_seen.map(rfc3339),
            registered_at: node.registered_at.map(rfc3339),
            offline_since: node.offline_since.map(rfc3339),
            drained: node.drained,
            drain_reason: node.drained.then_some(node.drain_reason.as_str()),
            drained_at: node.drained_at.map(rfc3339),
            boot_id: &node.boot_id,
            session_generation: node.session_generation,
            version: &node.version,
            hostname: &node.hostname,
            labels: node
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            last_probe_error: Some(node.last_probe_error.as_str()).filter(|e| !e.is_empty()),
        }
    }
}

/// The JSON shape of a watch event: one object per line.
#[derive(Debug, Serialize)]
pub struct EventJson<'a> {
    revision: u64,
    kind: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    database_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<NodeJson<'a>>,
}

impl<'a> From<&'a proto::NodeEvent> for EventJson<'a> {
    fn from(event: &'a proto::NodeEvent) -> Self {
        Self {
            revision: event.revision,
            kind: event_kind_name(event.kind),
            reason: &event.reason,
            database_id: &event.database_id,
            node: event.node.as_ref().map(NodeJson::from),
        }
    }
}

/// The short name of a `NodeState`, as JSON and the table show it.
pub fn state_name(state: i32) -> &'static str {
    match proto::NodeState::try_from(state) {
        Ok(proto::NodeState::Online) => "ONLINE",
        Ok(proto::NodeState::Offline) => "OFFLINE",
        Ok(proto::NodeState::Unknown) => "UNKNOWN",
        Ok(proto::NodeState::Left) => "LEFT",
        Ok(proto::NodeState::Unspecified) | Err(_) => "UNSPECIFIED",
    }
}

/// The short name of a `NodeEventKind`, as JSON and the table show it.
pub fn event_kind_name(kind: i32) -> &'static str {
    match proto::NodeEventKind::try_from(kind) {
        Ok(proto::NodeEventKind::Snapshot) => "snapshot",
        Ok(proto::NodeEventKind::SnapshotEnd) => "snapshot_end",
        Ok(proto::NodeEventKind::Changed) => "changed",
        Ok(proto::NodeEventKind::Removed) => "removed",
        Ok(proto::NodeEventKind::Bookmark) => "bookmark",
        Ok(proto::NodeEventKind::Unspecified) | Err(_) => "unspecified",
    }
}

fn rfc3339(timestamp: prost_types::Timestamp) -> String {
    let time = SystemTime::try_from(timestamp).unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_millis(time).to_string()
}
