//! Row types, kept apart from the domain types they convert to and from.

use std::time::Duration;

use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::{StoreError, schema::known_nodes};
use crate::{
    auth::SecretHash,
    clock::{from_unix_millis, to_unix_millis},
    node::{self, Drain, Gpu, GpuInventory, NodeId, Registration, StoredNode},
    registry::Enrollment,
};

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = known_nodes, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
#[diesel(treat_none_as_null = true)]
pub struct NodeRow {
    pub node_id: String,
    pub agent_url: String,
    pub boot_id: String,
    pub version: String,
    pub hostname: String,
    pub labels: String,
    pub registered_at: i64,
    pub last_seen: i64,
    pub session_generation: i64,
    pub offline_since: Option<i64>,
    pub secret_hash: Option<String>,
    pub max_backoff_ms: Option<i64>,
    pub left_at: Option<i64>,
    /// A JSON list of [`GpuColumn`].
    pub gpus: String,
}

/// One GPU as the `gpus` column keeps it. Its own type, so that renaming a
/// domain field cannot silently change what is on disk.
#[derive(Debug, Serialize, Deserialize)]
struct GpuColumn {
    index: u32,
    uuid: String,
    name: String,
    memory_total_mib: u64,
    memory_used_mib: u64,
    utilization_percent: u32,
    temperature_celsius: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unhealthy: Option<String>,
}

pub fn encode_gpus(node_id: &NodeId, gpus: &GpuInventory) -> Result<String, StoreError> {
    let columns: Vec<GpuColumn> = gpus
        .gpus()
        .iter()
        .map(|gpu| GpuColumn {
            index: gpu.index,
            uuid: gpu.uuid.clone(),
            name: gpu.name.clone(),
            memory_total_mib: gpu.memory_total_mib,
            memory_used_mib: gpu.memory_used_mib,
            utilization_percent: gpu.utilization_percent,
            temperature_celsius: gpu.temperature_celsius,
            unhealthy: gpu.unhealthy.clone(),
        })
        .collect();
    serde_json::to_string(&columns).map_err(|e| StoreError::Corrupt {
        node_id: node_id.to_string(),
        reason: format!("GPU inventory cannot be encoded: {e}"),
    })
}

/// The `gpus` column, held to the same rules as an inventory on the wire.
fn decode_gpus(column: &str) -> Result<GpuInventory, String> {
    let columns: Vec<GpuColumn> = serde_json::from_str(column)
        .map_err(|e| format!("gpus is not a JSON list of GPUs: {e}"))?;
    let gpus = columns
        .into_iter()
        .map(|column| Gpu {
            index: column.index,
            uuid: column.uuid,
            name: column.name,
            memory_total_mib: column.memory_total_mib,
            memory_used_mib: column.memory_used_mib,
            utilization_percent: column.utilization_percent,
            temperature_celsius: column.temperature_celsius,
            unhealthy: column.unhealthy,
        })
        .collect();
    GpuInventory::new("gpus", gpus).map_err(|e| e.to_string())
}

/// The drain columns, kept out of [`NodeRow`] so that a registration, which
/// writes a whole `NodeRow`, never changes them.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = known_nodes, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
pub struct DrainRow {
    pub drained_at: Option<i64>,
    pub drain_reason: Option<String>,
}

impl DrainRow {
    pub fn into_drain(self) -> Option<Drain> {
        Some(Drain {
            since: from_unix_millis(self.drained_at?),
            reason: self.drain_reason.unwrap_or_default(),
        })
    }
}

impl NodeRow {
    pub fn new(
        registration: &Registration,
        secret_hash: SecretHash,
        enrollment: Enrollment,
        last_seen: std::time::SystemTime,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            node_id: registration.node_id.to_string(),
            agent_url: registration.agent_url.clone(),
            boot_id: registration.boot_id.clone(),
            version: registration.version.clone(),
            hostname: registration.hostname.clone(),
            labels: serde_json::to_string(&registration.labels).map_err(|e| {
                StoreError::Corrupt {
                    node_id: registration.node_id.to_string(),
                    reason: format!("labels cannot be encoded: {e}"),
                }
            })?,
            registered_at: to_unix_millis(enrollment.registered_at),
            last_seen: to_unix_millis(last_seen),
            session_generation: generation_to_column(enrollment.generation),
            offline_since: None,
            secret_hash: Some(secret_hash.to_hex()),
            max_backoff_ms: Some(duration_to_column(registration.max_backoff)),
            left_at: None,
            gpus: encode_gpus(&registration.node_id, &registration.gpus)?,
        })
    }
}

impl TryFrom<NodeRow> for StoredNode {
    type Error = StoreError;

    fn try_from(row: NodeRow) -> Result<Self, Self::Error> {
        let corrupt = |reason: String| StoreError::Corrupt {
            node_id: row.node_id.clone(),
            reason,
        };
        let node_id = NodeId::parse("node_id", &row.node_id).map_err(|e| corrupt(e.to_string()))?;
        let labels = serde_json::from_str(&row.labels)
            .map_err(|e| corrupt(format!("labels are not a JSON object of strings: {e}")))?;
        let gpus = decode_gpus(&row.gpus).map_err(&corrupt)?;
        let generation = u64::try_from(row.session_generation).map_err(|_| {
            corrupt(format!(
                "negative session_generation {}",
                row.session_generation
            ))
        })?;
        Ok(Self {
            registration: Registration {
                node_id,
                agent_url: row.agent_url,
                boot_id: row.boot_id,
                version: row.version,
                hostname: row.hostname,
                labels,
                max_backoff: node::bounded_max_backoff(
                    row.max_backoff_ms
                        .map(|millis| Duration::from_millis(millis.max(0).unsigned_abs())),
                ),
                gpus,
            },
            registered_at: from_unix_millis(row.registered_at),
            last_seen: from_unix_millis(row.last_seen),
            generation,
            offline_since: row.offline_since.map(from_unix_millis),
            drain: None,
            left_at: row.left_at.map(from_unix_millis),
        })
    }
}

pub fn generation_to_column(generation: u64) -> i64 {
    i64::try_from(generation).unwrap_or(i64::MAX)
}

fn duration_to_column(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
