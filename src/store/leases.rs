//! The lease pool's tables: one row per lease the pool keeps, and the
//! highest generation ever issued.
//!
//! Invariants: a batch of the pool's changes is written in one transaction,
//! in the order the pool made them, each replacing its lease's whole row
//! (a forgotten lease's row is deleted); `lease_generations.last_issued`
//! only ever grows, so a restored pool never issues a generation again.
//!
//! Every change but forgetting is also appended to `lease_events` in that
//! transaction, taking the next revision of `lease_event_log`; the log
//! keeps the latest [`LEASE_EVENTS_KEPT`] events and records the last
//! revision it pruned, below which a watch cannot resume.

use std::time::{Duration, SystemTime};

use diesel::prelude::*;
use prost::Message;

use super::{
    StoreError,
    backend::Db,
    schema::{lease_event_log, lease_events, lease_generations, leases},
};
use crate::{
    clock::{from_unix_millis, to_unix_millis},
    lease_events::{LeaseEvent, LeaseEventKind},
    node::NodeId,
    pool::{
        Change, Constraints, Event, LabelSelector, Lease, LeaseId, LeaseState, LeaseTerms,
        PersistedPool, ReleaseReason,
    },
    proto,
};

/// Lease events kept for watchers to resume from; a few megabytes.
pub(super) const LEASE_EVENTS_KEPT: u64 = 100_000;
/// Lease events pruned at once: few enough that the commit which prunes
/// them holds the write gate for a few milliseconds (10,000 held it for
/// 20-27 ms, a stall of every lease call once a second at 5,000 pairs/s),
/// many enough that most commits prune nothing.
const PRUNE_STEP: u64 = 1_000;

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

/// Writes `changes` in order, raises the last generation issued to
/// `last_generation` and appends their events, which it returns for
/// publishing once committed; the caller runs it in one transaction.
pub(super) fn write(
    connection: &mut Db,
    changes: &[Change],
    last_generation: u64,
    now: SystemTime,
) -> Result<Vec<LeaseEvent>, StoreError> {
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
    append_events(connection, changes, now)
}

fn append_events(
    connection: &mut Db,
    changes: &[Change],
    now: SystemTime,
) -> Result<Vec<LeaseEvent>, StoreError> {
    let told: Vec<(LeaseEventKind, &Change)> = changes
        .iter()
        .filter_map(|change| Some((LeaseEventKind::of(&change.event)?, change)))
        .collect();
    if told.is_empty() {
        return Ok(Vec::new());
    }
    let (last_revision, pruned_through): (i64, i64) = lease_event_log::table
        .select((
            lease_event_log::last_revision,
            lease_event_log::pruned_through,
        ))
        .first(connection)?;
    let first = revision_from_column(last_revision)? + 1;
    let at = to_unix_millis(now);
    let mut events = Vec::with_capacity(told.len());
    for ((kind, change), revision) in told.into_iter().zip(first..) {
        let lease = proto::Lease::from(&change.lease);
        let revoked_for = match &change.event {
            Event::Revoked { for_request } => for_request.clone(),
            _ => String::new(),
        };
        diesel::insert_into(lease_events::table)
            .values((
                lease_events::revision.eq(to_column(revision)),
                lease_events::lease_generation.eq(to_column(change.lease.generation)),
                lease_events::kind.eq(kind.as_str()),
                lease_events::lease.eq(lease.encode_to_vec()),
                lease_events::revoked_for.eq(&revoked_for),
                lease_events::at.eq(at),
            ))
            .execute(connection)?;
        events.push(LeaseEvent {
            revision,
            kind,
            lease,
            revoked_for,
            at: now,
        });
    }
    let last = events.last().map_or(first - 1, |event| event.revision);
    let mut pruned_through = revision_from_column(pruned_through)?;
    if last.saturating_sub(pruned_through) > LEASE_EVENTS_KEPT + PRUNE_STEP {
        pruned_through = last - LEASE_EVENTS_KEPT;
        diesel::delete(
            lease_events::table.filter(lease_events::revision.le(to_column(pruned_through))),
        )
        .execute(connection)?;
    }
    diesel::update(lease_event_log::table)
        .set((
            lease_event_log::last_revision.eq(to_column(last)),
            lease_event_log::pruned_through.eq(to_column(pruned_through)),
        ))
        .execute(connection)?;
    Ok(events)
}

/// The span of lease event revisions the database holds: events after
/// the first, through the second.
pub(super) fn event_history(connection: &mut Db) -> Result<(u64, u64), StoreError> {
    let (pruned_through, last_revision): (i64, i64) = lease_event_log::table
        .select((
            lease_event_log::pruned_through,
            lease_event_log::last_revision,
        ))
        .first(connection)?;
    Ok((
        revision_from_column(pruned_through)?,
        revision_from_column(last_revision)?,
    ))
}

/// Stored lease events with revisions in `(after, through]`, oldest first,
/// at most `limit` of them.
pub(super) fn replay_events(
    connection: &mut Db,
    after: u64,
    through: u64,
    limit: usize,
) -> Result<Vec<LeaseEvent>, StoreError> {
    let rows: Vec<(i64, String, Vec<u8>, String, i64)> = lease_events::table
        .filter(lease_events::revision.gt(to_column(after)))
        .filter(lease_events::revision.le(to_column(through)))
        .order(lease_events::revision)
        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
        .select((
            lease_events::revision,
            lease_events::kind,
            lease_events::lease,
            lease_events::revoked_for,
            lease_events::at,
        ))
        .load(connection)?;
    rows.into_iter()
        .map(|(revision, kind, lease, revoked_for, at)| {
            let corrupt = |reason: String| StoreError::CorruptLeaseEvent { revision, reason };
            Ok(LeaseEvent {
                revision: revision_from_column(revision)?,
                kind: LeaseEventKind::parse(&kind)
                    .ok_or_else(|| corrupt(format!("kind {kind:?}")))?,
                lease: proto::Lease::decode(lease.as_slice())
                    .map_err(|error| corrupt(format!("undecodable lease: {error}")))?,
                revoked_for,
                at: from_unix_millis(at),
            })
        })
        .collect()
}

fn revision_from_column(revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision).map_err(|_| StoreError::CorruptLeaseEvent {
        revision,
        reason: "the revision is negative".to_owned(),
    })
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
