//! Nodes as `muster nodes list --output json` prints them.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    pub node_id: String,
    pub state: String,
    pub boot_id: String,
    pub registered_at: Option<String>,
    pub session_generation: u64,
}

pub fn find<'a>(nodes: &'a [Node], node_id: &str) -> Option<&'a Node> {
    nodes.iter().find(|n| n.node_id == node_id)
}

pub fn is_in(nodes: &[Node], node_id: &str, state: &str) -> bool {
    find(nodes, node_id).is_some_and(|n| n.state == state)
}

pub fn all_online(nodes: &[Node], node_ids: &[&str]) -> Option<Vec<Node>> {
    node_ids
        .iter()
        .all(|id| is_in(nodes, id, "ONLINE"))
        .then(|| nodes.to_vec())
}
