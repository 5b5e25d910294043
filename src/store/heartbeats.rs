//! Heartbeat times, in a narrow table of their own (`node_heartbeats`).
//!
//! Invariants:
//! - A node's last_seen, as every reader sees it, is the later of its
//!   `known_nodes.last_seen` (written when it registers) and its time here:
//!   a row left from an earlier session can never move it back.
//! - A time is written only for a node that has a row in `known_nodes`, and
//!   a node's time goes with its row, so nothing here outlives its node.
//!
//! A flush of a whole fleet's times rewrites these rows of a few dozen
//! bytes, not the pages of `known_nodes`, which mostly hold GPU
//! inventories: for 10,000 nodes with 8 GPUs each, about 2,500 pages a
//! flush there against about a hundred here, by estimate from row sizes.

use std::{collections::HashMap, time::SystemTime};

use diesel::{
    prelude::*,
    sql_types::{Array, BigInt, Text},
};

use super::{
    StoreError,
    backend::Db,
    schema::{known_nodes, node_heartbeats},
};
use crate::{
    clock::{from_unix_millis, to_unix_millis},
    node::NodeId,
};

/// Writes heartbeat times, the last one of a node winning, for nodes that
/// are known; one statement on PostgreSQL, where each would otherwise be a
/// round trip to the server.
pub(super) fn write(conn: &mut Db, last_seen: &[(NodeId, SystemTime)]) -> Result<(), StoreError> {
    if last_seen.is_empty() {
        return Ok(());
    }
    match conn {
        Db::Postgres(conn) => {
            let latest: HashMap<&str, i64> = last_seen
                .iter()
                .map(|(node_id, seen)| (node_id.as_str(), to_unix_millis(*seen)))
                .collect();
            let (node_ids, times): (Vec<&str>, Vec<i64>) = latest.into_iter().unzip();
            diesel::sql_query(
                "INSERT INTO node_heartbeats (node_id, last_seen) \
                 SELECT seen.node_id, seen.at \
                 FROM unnest($1::text[], $2::bigint[]) AS seen(node_id, at) \
                 JOIN known_nodes ON known_nodes.node_id = seen.node_id \
                 ON CONFLICT (node_id) DO UPDATE SET last_seen = EXCLUDED.last_seen",
            )
            .bind::<Array<Text>, _>(node_ids)
            .bind::<Array<BigInt>, _>(times)
            .execute(conn)?;
        }
        Db::Sqlite(conn) => {
            // Built with the query builder, not as SQL text, and as a
            // REPLACE rather than an upsert: diesel prepares neither SQL
            // text nor `ON CONFLICT DO UPDATE` once per connection, but
            // again for every statement, here once per node.
            for (node_id, seen) in last_seen {
                diesel::replace_into(node_heartbeats::table)
                    .values(
                        known_nodes::table
                            .select((
                                known_nodes::node_id,
                                to_unix_millis(*seen).into_sql::<BigInt>(),
                            ))
                            .filter(known_nodes::node_id.eq(node_id.as_str())),
                    )
                    .into_columns((node_heartbeats::node_id, node_heartbeats::last_seen))
                    .execute(conn)?;
            }
        }
    }
    Ok(())
}

/// Every stored heartbeat time, by node id.
pub(super) fn all(conn: &mut Db) -> Result<HashMap<String, i64>, StoreError> {
    Ok(node_heartbeats::table
        .select((node_heartbeats::node_id, node_heartbeats::last_seen))
        .load::<(String, i64)>(conn)?
        .into_iter()
        .collect())
}

/// The stored heartbeat time of one node.
pub(super) fn of(conn: &mut Db, node_id: &NodeId) -> Result<Option<i64>, StoreError> {
    Ok(node_heartbeats::table
        .find(node_id.as_str())
        .select(node_heartbeats::last_seen)
        .first(conn)
        .optional()?)
}

/// Removes the time of a node whose row is removed.
pub(super) fn forget(conn: &mut Db, node_id: &NodeId) -> Result<(), StoreError> {
    diesel::delete(node_heartbeats::table.find(node_id.as_str())).execute(conn)?;
    Ok(())
}

/// The later of a row's last_seen and its stored heartbeat time.
pub(super) fn latest(row: SystemTime, heartbeat: Option<i64>) -> SystemTime {
    heartbeat.map_or(row, |millis| row.max(from_unix_millis(millis)))
}
