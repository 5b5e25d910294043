//! The lease pool's tables: one row per lease the pool keeps, and the
//! highest generation ever issued.
//!
//! Invariants: a batch of the pool's changes is written in one transaction,
//! in the order the pool made them, each replacing its lease's whole row
//! (a forgotten lease's row is deleted); `lease_generations.last_issued`
//! only ever grows, so a restored pool never issues a generation again.

use std::time::Duration;

use diesel::prelude::*;

use super::{
    StoreError,
    backend::Db,
    schema::{lease_generations, leases},
};
use crate::{
    clock::{from_unix_millis, to_unix_millis},
    node::NodeId,
    pool::{
        Change, Constraints, Event, LabelSelector, Lease, LeaseId, LeaseState, LeaseTerms,
        PersistedPool, ReleaseReason,
    },
};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = leases, check_for_backend(diesel::sqlite::Sqlite, diesel::pg::Pg))]
struct LeaseRow {
    generation: i64,
    request_id: String,
    holder: String,
    mb: i64,
    priority: i32,
    ttl_ms: i64,
    constraints: String,
    node_id: String,
    gpu_uuid: String,
    granted_at: i64,
    expires_at: i64,
    state: String,
    revoked_at: Option<i64>,
    suspended_at: Option<i64>,
    released_at: Option<i64>,
    release_reason: Option<String>,
}

#[derive(serde::Deserialize)]
struct StoredConstraints {
    node_id: Option<String>,
    gpu_uuid: Option<String>,
    label_selector: String,
}

fn state_name(state: LeaseState) -> &'static str {
    match state {
        LeaseState::Active => "active",
        LeaseState::Revoked => "revoked",
        LeaseState::Suspended => "suspended",
        LeaseState::Released => "released",
    }
}

fn parse_state(text: &str) -> Option<LeaseState> {
    [
        LeaseState::Active,
        LeaseState::Revoked,
        LeaseState::Suspended,
        LeaseState::Released,
    ]
    .into_iter()
    .find(|state| state_name(*state) == text)
}

const RELEASE_REASONS: [(ReleaseReason, &str); 6] = [
    (ReleaseReason::Holder, "holder"),
    (ReleaseReason::Expired, "expired"),
    (ReleaseReason::RevokeGraceEnded, "revoke_grace_ended"),
    (ReleaseReason::Orphaned, "orphaned"),
    (ReleaseReason::NodeLeft, "node_left"),
    (ReleaseReason::NodeRemoved, "node_removed"),
];

fn reason_name(reason: ReleaseReason) -> &'static str {
    RELEASE_REASONS
        .iter()
        .find(|(known, _)| *known == reason)
        .map_or("holder", |(_, name)| name)
}

fn parse_reason(text: &str) -> Option<ReleaseReason> {
    RELEASE_REASONS
        .iter()
        .find(|(_, name)| *name == text)
        .map(|(reason, _)| *reason)
}

fn to_column(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl LeaseRow {
    fn new(lease: &Lease) -> Self {
        let terms = &lease.terms;
        Self {
            generation: to_column(lease.generation),
            request_id: lease.request_id.clone(),
            holder: terms.holder.clone(),
            mb: to_column(terms.mb),
            priority: terms.priority,
            ttl_ms: i64::try_from(terms.ttl.as_millis()).unwrap_or(i64::MAX),
            constraints: serde_json::json!({
                "node_id": terms.constraints.node_id.as_ref().map(NodeId::as_str),
                "gpu_uuid": terms.constraints.gpu_uuid,
                "label_selector": terms.constraints.labels.to_string(),
            })
            .to_string(),
            node_id: lease.node_id.to_string(),
            gpu_uuid: lease.gpu_uuid.clone(),
            granted_at: to_unix_millis(lease.granted_at),
            expires_at: to_unix_millis(lease.expires_at),
            state: state_name(lease.state).to_owned(),
            revoked_at: lease.revoked_at.map(to_unix_millis),
            suspended_at: lease.suspended_at.map(to_unix_millis),
            released_at: lease.released_at.map(to_unix_millis),
            release_reason: lease.release_reason.map(|r| reason_name(r).to_owned()),
        }
    }

    fn into_lease(self) -> Result<Lease, StoreError> {
        let generation = self.generation;
        let corrupt = |reason: String| StoreError::CorruptLease { generation, reason };
        let unsigned = |column: &str, value: i64| {
            u64::try_from(value).map_err(|_| corrupt(format!("{column} is negative: {value}")))
        };
        let node_id = |column: &'static str, raw: &str| {
            NodeId::parse(column, raw).map_err(|error| corrupt(error.to_string()))
        };
        let state =
            parse_state(&self.state).ok_or_else(|| corrupt(format!("state {:?}", self.state)))?;
        let release_reason = match &self.release_reason {
            Some(text) => Some(
                parse_reason(text).ok_or_else(|| corrupt(format!("release_reason {text:?}")))?,
            ),
            None => None,
        };
        let constraints: StoredConstraints = serde_json::from_str(&self.constraints)
            .map_err(|error| corrupt(format!("constraints: {error}")))?;
        let labels = LabelSelector::parse("label_selector", &constraints.label_selector)
            .map_err(|error| corrupt(error.to_string()))?;
        let generation_unsigned = unsigned("generation", generation)?;
        Ok(Lease {
            lease_id: LeaseId::for_generation(generation_unsigned),
            request_id: self.request_id,
            terms: LeaseTerms {
                holder: self.holder,
                mb: unsigned("mb", self.mb)?,
                priority: self.priority,
                ttl: Duration::from_millis(unsigned("ttl_ms", self.ttl_ms)?),
                constraints: Constraints {
                    node_id: constraints
                        .node_id
                        .as_deref()
                        .map(|raw| node_id("constraints.node_id", raw))
                        .transpose()?,
                    gpu_uuid: constraints.gpu_uuid,
                    labels,
                },
            },
            node_id: node_id("node_id", &self.node_id)?,
            gpu_uuid: self.gpu_uuid,
            generation: generation_unsigned,
            granted_at: from_unix_millis(self.granted_at),
            expires_at: from_unix_millis(self.expires_at),
            state,
            revoked_at: self.revoked_at.map(from_unix_millis),
            suspended_at: self.suspended_at.map(from_unix_millis),
            released_at: self.released_at.map(from_unix_millis),
            release_reason,
        })
    }
}

/// Every stored lease and the last generation issued.
pub(super) fn load(connection: &mut Db) -> Result<PersistedPool, StoreError> {
    let last_issued: i64 = lease_generations::table
        .select(lease_generations::last_issued)
        .first(connection)?;
    let rows: Vec<LeaseRow> = leases::table
        .select(LeaseRow::as_select())
        .order(leases::generation)
        .load(connection)?;
    Ok(PersistedPool {
        last_generation: u64::try_from(last_issued).unwrap_or(0),
        leases: rows
            .into_iter()
            .map(LeaseRow::into_lease)
            .collect::<Result<_, _>>()?,
    })
}

/// Writes `changes` in order and raises the last generation issued to
/// `last_generation`; the caller runs it in one transaction.
pub(super) fn write(
    connection: &mut Db,
    changes: &[Change],
    last_generation: u64,
) -> Result<(), StoreError> {
    for change in changes {
        if change.event == Event::Forgotten {
            diesel::delete(leases::table.find(to_column(change.lease.generation)))
                .execute(connection)?;
        } else {
            let generation = to_column(change.lease.generation);
            diesel::delete(leases::table.find(generation)).execute(connection)?;
            diesel::insert_into(leases::table)
                .values(LeaseRow::new(&change.lease))
                .execute(connection)?;
        }
    }
    let last_generation = to_column(last_generation);
    diesel::update(
        lease_generations::table.filter(lease_generations::last_issued.lt(last_generation)),
    )
    .set(lease_generations::last_issued.eq(last_generation))
    .execute(connection)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use super::*;

    fn lease(generation: u64, state: LeaseState) -> Lease {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Lease {
            lease_id: LeaseId::for_generation(generation),
            request_id: format!("request-{generation}"),
            terms: LeaseTerms {
                holder: "trainer".to_owned(),
                mb: 4_096,
                priority: -3,
                ttl: Duration::from_secs(60),
                constraints: Constraints {
                    node_id: Some(NodeId::parse("node_id", "gpu-1").unwrap()),
                    gpu_uuid: None,
                    labels: LabelSelector::parse("label_selector", "zone=a,rack=7").unwrap(),
                },
            },
            node_id: NodeId::parse("node_id", "gpu-1").unwrap(),
            gpu_uuid: "GPU-1".to_owned(),
            generation,
            granted_at: at,
            expires_at: at + Duration::from_secs(60),
            state,
            revoked_at: (state == LeaseState::Revoked).then_some(at),
            suspended_at: None,
            released_at: (state == LeaseState::Released).then_some(at),
            release_reason: (state == LeaseState::Released).then_some(ReleaseReason::Orphaned),
        }
    }

    fn change(event: Event, lease: Lease) -> Change {
        Change { event, lease }
    }

    #[tokio::test]
    async fn leases_round_trip_in_order_forgotten_ones_go_and_the_generation_never_falls() {
        for db in crate::store::testing::each_backend("store::leases::tests") {
            let store = db.open().await;
            assert_eq!(store.load_leases().await.unwrap(), PersistedPool::default());

            let batch: Arc<[Change]> = vec![
                change(Event::Granted, lease(1, LeaseState::Active)),
                change(Event::Granted, lease(2, LeaseState::Active)),
                change(
                    Event::Revoked {
                        for_request: "x".to_owned(),
                    },
                    lease(2, LeaseState::Revoked),
                ),
                change(Event::Granted, lease(3, LeaseState::Active)),
                change(
                    Event::Released(ReleaseReason::Orphaned),
                    lease(3, LeaseState::Released),
                ),
            ]
            .into();
            store.write_leases(batch, 3).await.unwrap();
            store
                .write_leases(
                    vec![change(Event::Forgotten, lease(1, LeaseState::Released))].into(),
                    1,
                )
                .await
                .unwrap();
            drop(store);

            let store = db.open().await;
            let loaded = store.load_leases().await.unwrap();
            assert_eq!(loaded.last_generation, 3, "a smaller one never lowers it");
            assert_eq!(
                loaded.leases,
                [
                    lease(2, LeaseState::Revoked),
                    lease(3, LeaseState::Released)
                ],
                "the latest change of each lease, every field as written"
            );
        }
    }
}
