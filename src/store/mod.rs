//! The store: the only module that touches diesel.
//!
//! The coordinator serves every read from memory; the store is read once at
//! start-up and written on change. Every call runs on tokio's blocking pool
//! with a connection from an r2d2 pool, so no database call ever blocks the
//! async runtime.
//!
//! Writes that follow a session carry its generation, and match only the row
//! of that generation: a write from a superseded session changes nothing.
//!
//! A row that cannot be read is quarantined, never deleted or overwritten:
//! it is left out of the fleet, logged and counted at start-up, and a
//! registration of its node id is refused until an operator removes it.
//!
//! Every write reports whether it succeeded (see [`Availability`]); a store
//! whose writes fail keeps serving reads, and recovers by itself once a
//! write succeeds again.

mod backend;
mod checkpoint;
mod connections;
mod enroller;
mod events;
mod file;
mod heartbeats;
mod leadership;
mod leases;
mod lock;
mod rows;
mod schema;
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../tests/common/postgres.rs"]
mod test_postgres;
#[cfg(test)]
pub(crate) mod testing;

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use diesel::{prelude::*, r2d2::PooledConnection};
use tokio::sync::watch;
use tracing::warn;

pub use self::backend::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
pub use self::connections::Availability;
pub use self::events::{EventSettings, History};
pub use self::leadership::{Campaign, Leader, SINGLE_COORDINATOR_EPOCH};
pub use self::lock::{DatabaseLock, Holder, lock_path};
use self::{
    backend::{Db, Manager, Target},
    connections::Connections,
    events::{EventLog, Recorder},
    file::DatabaseFile,
    rows::{DrainRow, NodeRow, generation_to_column},
    schema::known_nodes,
};
use crate::{
    auth::SecretHash,
    clock::{from_unix_millis, to_unix_millis},
    config::Database,
    events::{EventHub, EventKind, NodeEvent, Reason},
    lease_events::{LeaseEvent, LeaseFeed},
    node::{Drain, NodeId, NodeSnapshot, NodeState, Registration, StoredNode},
    pool::{Change as LeaseChange, PersistedPool},
    proto,
    registry::{Change, Enrollment, InventoryUpdate},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {db}")]
    Open {
        db: String,
        source: diesel::ConnectionError,
    },
    #[error("cannot use database {db}")]
    Unusable {
        db: String,
        source: diesel::result::Error,
    },
    #[error("cannot write database {db} (check its permissions and free disk space)")]
    Unwritable {
        db: String,
        source: diesel::result::Error,
    },
    #[error("cannot migrate database {db}: {reason}")]
    Migration { db: String, reason: String },
    #[error("cannot open database {path}: directory {directory} {reason}")]
    NoDirectory {
        path: PathBuf,
        directory: PathBuf,
        reason: &'static str,
    },
    #[error("cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database {path} is an empty file (0 bytes), not a muster database; a database is created only where no file exists: remove the empty file to start afresh, or put the database back"
    )]
    EmptyFile { path: PathBuf },
    #[error(
        "database {path} does not exist, but its journal {journal} does: the database was deleted or moved without it; put the database back beside it, or remove {journal} and its -shm file to start afresh"
    )]
    OrphanedJournal { path: PathBuf, journal: PathBuf },
    #[error(
        "database {db} was migrated by a newer muster (schema version {}, unknown to this binary); run a muster that knows it, or restore a backup from before the upgrade",
        .versions.join(", ")
    )]
    UnknownSchema { db: String, versions: Vec<String> },
    #[error(
        "database {path} {what} while in use; writes are refused until that same file is back at its path (a restart would start from a new database)"
    )]
    Gone { path: PathBuf, what: String },
    #[error(
        "database side file {side} has mode {mode:04o} and cannot be written, though database {db} (mode {db_mode:04o}) can: {reason}; give it the database file's mode and owner"
    )]
    SideFileUnwritable {
        side: PathBuf,
        mode: u32,
        db: PathBuf,
        db_mode: u32,
        reason: String,
    },
    #[error(
        "database {db} is in use by another coordinator ({}); stop that one, or give this one its own --db",
        .holder.as_ref().map_or_else(|| "its lock file names no process".to_owned(), Holder::to_string)
    )]
    Locked { db: PathBuf, holder: Option<Holder> },
    #[error("cannot create or lock {path}, beside the database")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no database connection available")]
    Pool(#[from] diesel::r2d2::PoolError),
    #[error("database query failed")]
    Query(#[from] diesel::result::Error),
    #[error("stored node {node_id:?} is unreadable: {reason}")]
    Corrupt { node_id: String, reason: String },
    #[error("stored lease of generation {generation} is unreadable: {reason}")]
    CorruptLease { generation: i64, reason: String },
    #[error("stored lease event {revision} is unreadable: {reason}")]
    CorruptLeaseEvent { revision: i64, reason: String },
    #[error("database task did not finish")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot start the registration thread")]
    EnrollerStart(#[source] std::io::Error),
    #[error("cannot start the WAL checkpoint thread")]
    CheckpointerStart(#[source] std::io::Error),
    #[error("the registration thread has stopped")]
    EnrollerStopped,
    /// A write of a coordinator whose leadership epoch has been superseded
    /// (or whose lease has expired); nothing was applied.
    #[error(
        "write refused: this coordinator's leadership (epoch {epoch}) has been lost{}",
        .current.map_or_else(String::new, |current| format!(" to epoch {current}"))
    )]
    Fenced { epoch: u64, current: Option<u64> },
    /// The transaction shared with other registrations failed.
    #[error("registration not committed")]
    Batch(#[source] Arc<StoreError>),
}

impl StoreError {
    /// Whether the error is the database's rather than one row's: the file
    /// cannot be written, the disk is full, the database is locked or has
    /// gone from its path, no connection could be made. Such an error makes
    /// the store unavailable until a write succeeds again; callers are told
    /// the service is unavailable, and retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match self {
            Self::Batch(cause) => cause.is_unavailable(),
            Self::Corrupt { .. } | Self::CorruptLease { .. } | Self::CorruptLeaseEvent { .. } => {
                false
            }
            Self::Query(Error::DatabaseError(
                Kind::UniqueViolation
                | Kind::ForeignKeyViolation
                | Kind::NotNullViolation
                | Kind::CheckViolation,
                _,
            )) => false,
            _ => true,
        }
    }

    /// Whether the write was refused because this coordinator's leadership
    /// epoch no longer holds (see [`Store::fence`]), alone or as the cause of
    /// a failed registration batch.
    pub fn is_fenced(&self) -> bool {
        match self {
            Self::Batch(cause) => cause.is_fenced(),
            Self::Fenced { .. } => true,
            _ => false,
        }
    }

    /// Whether the database file has gone from its path. Connections already
    /// open still hold the file, and are the ones to use if it comes back;
    /// new ones could not open it.
    fn is_file_gone(&self) -> bool {
        match self {
            Self::Batch(cause) => cause.is_file_gone(),
            Self::Gone { .. } => true,
            _ => false,
        }
    }
}

/// The outcome of [`Store::enroll`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrolled {
    Admitted(Enrollment),
    /// The node id was first registered with another node secret.
    HeldByAnotherSecret,
    /// The node's row cannot be read; it is kept as it is for an operator.
    Quarantined {
        reason: String,
    },
}

type DbPool = diesel::r2d2::Pool<Manager>;
type PooledDb = PooledConnection<Manager>;

#[derive(Clone)]
pub struct Store {
    connections: Arc<Connections>,
    enroller: enroller::Enroller,
    /// The SQLite file; `None` on PostgreSQL.
    file: Option<Arc<DatabaseFile>>,
    events: Arc<EventLog>,
    lease_feed: Arc<LeaseFeed>,
}

impl Store {
    /// Opens the database, checks that it is writable and applies pending
    /// migrations. A SQLite database is created, and its creation logged,
    /// only where no file exists; an empty file, or a database migrated by a
    /// newer muster, is refused.
    pub async fn open(db: impl Into<Database>) -> Result<Self, StoreError> {
        Self::open_with(db, EventSettings::default()).await
    }

    /// [`Store::open`], keeping the event history `events` asks for.
    pub async fn open_with(
        db: impl Into<Database>,
        events: EventSettings,
    ) -> Result<Self, StoreError> {
        let db = db.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(&db, events)).await?
    }

    fn open_blocking(db: &Database, settings: EventSettings) -> Result<Self, StoreError> {
        let shown = db.to_string();
        let open_error = |error: diesel::ConnectionError| match error {
            diesel::ConnectionError::CouldntSetupConfiguration(source) => StoreError::Unusable {
                db: shown.clone(),
                source,
            },
            source => StoreError::Open {
                db: shown.clone(),
                source,
            },
        };
        let (mut conn, file, target) = match db {
            Database::Sqlite(path) => {
                let found = file::inspect(path)?;
                let conn = Target::sqlite(path, found).connect().map_err(open_error)?;
                let file = Arc::new(DatabaseFile::open(path)?);
                // Connections opened later never create a file: if the
                // database has gone from its path, they fail instead of
                // starting an empty one.
                let target = Target::sqlite(path, file::Found::Existing);
                (conn, Some(file), target)
            }
            Database::Postgres(url) => {
                let target = Target::Postgres(url.clone());
                (target.connect().map_err(open_error)?, None, target)
            }
        };
        // The rolled-back write proves the database writable; only a
        // committed one proves that the disk has room for it.
        backend::write_and_roll_back(&mut conn)
            .and_then(|()| backend::commit_no_op(&mut conn))
            .map_err(|source| StoreError::Unwritable {
                db: shown.clone(),
                source,
            })?;
        backend::migrate(&mut conn, &shown)?;
        let events = Arc::new(EventLog::open(&mut conn, settings)?);
        let (_, last_lease_event) = leases::event_history(&mut conn)?;
        let lease_feed = Arc::new(LeaseFeed::new(last_lease_event, settings.watcher_buffer));
        drop(conn);

        let connections = Arc::new(Connections::open(target)?);
        let enroller =
            enroller::Enroller::start(connections.clone(), file.clone(), events.clone())?;
        if let Some(file) = &file {
            checkpoint::start(
                &connections,
                file.wal_path(),
                events.write_gate(),
                checkpoint::WalLimits::default(),
            )?;
        }
        Ok(Self {
            connections,
            enroller,
            file,
            events,
            lease_feed,
        })
    }

    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PooledDb) -> Result<T, StoreError> + Send + 'static,
    {
        let connections = self.connections.clone();
        tokio::task::spawn_blocking(move || work(&mut connections.get()?)).await?
    }

    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PooledDb) -> Result<T, StoreError> + Send + 'static,
    {
        let connections = self.connections.clone();
        let outcome = tokio::task::spawn_blocking(move || connections.write(work)).await;
        outcome.unwrap_or_else(|error| {
            let error = StoreError::from(error);
            self.connections.report(Some(&error));
            Err(error)
        })
    }

    /// The lease pool as it was last committed.
    pub async fn load_leases(&self) -> Result<PersistedPool, StoreError> {
        self.read(|conn| leases::load(conn)).await
    }

    /// Commits the lease pool's changes, in order, in one transaction, and
    /// raises the last generation issued to `last_generation`.
    pub async fn write_leases(
        &self,
        changes: Arc<[LeaseChange]>,
        last_generation: u64,
    ) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.commit_leases(&changes, last_generation)).await?
    }

    /// [`Store::write_leases`], blocking: for the lease writer's own
    /// thread, never for the async runtime. The changes' events are
    /// published to the lease feed once committed.
    pub fn commit_leases(
        &self,
        changes: &[LeaseChange],
        last_generation: u64,
    ) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let events = self.connections.write(|conn| {
            self.events
                .transaction(self.file.as_deref(), conn, now, |conn, _| {
                    leases::write(conn, changes, last_generation, now)
                })
        })?;
        if !events.is_empty() {
            self.lease_feed.publish(events);
        }
        Ok(())
    }

    /// The feed every committed lease event is published to, in revision
    /// order.
    pub fn lease_feed(&self) -> Arc<LeaseFeed> {
        self.lease_feed.clone()
    }

    /// The span of lease event revisions the database holds: after the
    /// first, through the second.
    pub async fn lease_event_history(&self) -> Result<(u64, u64), StoreError> {
        self.read(|conn| leases::event_history(conn)).await
    }

    /// Stored lease events with revisions in `(after, through]`, oldest
    /// first, at most `limit` of them.
    pub async fn replay_lease_events(
        &self,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        self.read(move |conn| leases::replay_events(conn, after, through, limit))
            .await
    }

    /// Whether writes currently succeed; changes with every write's outcome.
    pub fn availability(&self) -> watch::Receiver<Availability> {
        self.connections.availability()
    }

    /// Proves the database writable, and still at its path, with a write
    /// that is committed but changes nothing (see [`commit_no_op`]); reports
    /// the outcome like any other write. Side
    /// files left read-only are repaired before a connection is taken, since
    /// SQLite may not even open one beside them.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let file = self.file.clone();
        let repaired = tokio::task::spawn_blocking(move || {
            file.as_deref()
                .map_or(Ok(()), DatabaseFile::repair_side_files)
        })
        .await?;
        if let Err(error) = repaired {
            self.connections.report(Some(&error));
            return Err(error);
        }
        let file = self.file.clone();
        self.run(move |conn| {
            if let Some(file) = &file {
                file.ensure_in_place()?;
            }
            Ok(backend::commit_no_op(conn)?)
        })
        .await
    }

    /// Runs `work` in a write transaction that also appends the events it
    /// records; see [`EventLog::transaction`].
    async fn event_transaction<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db, &mut Recorder) -> Result<T, StoreError> + Send + 'static,
    {
        let file = self.file.clone();
        let events = self.events.clone();
        self.run(move |conn| events.transaction(file.as_deref(), conn, SystemTime::now(), work))
            .await
    }

    /// The feed every committed event is published to, in revision order.
    pub fn event_hub(&self) -> Arc<EventHub> {
        self.events.hub().clone()
    }

    /// The span of revisions the database holds.
    pub async fn history(&self) -> Result<History, StoreError> {
        self.read(|conn| events::history(conn)).await
    }

    /// Stored events with revisions in `(after, through]`, oldest first, at
    /// most `limit` of them.
    pub async fn replay(
        &self,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<NodeEvent>, StoreError> {
        self.read(move |conn| events::replay(conn, after, through, limit))
            .await
    }

    /// Records that the coordinator restarted and reloaded `nodes` as they
    /// now are (UNKNOWN until proven alive, or LEFT): one event each.
    pub async fn record_reload(&self, nodes: Vec<NodeSnapshot>) -> Result<(), StoreError> {
        if nodes.is_empty() {
            return Ok(());
        }
        self.event_transaction(move |_, recorder| {
            for node in nodes {
                recorder.changed(Reason::Reloaded, proto::Node::from(node));
            }
            Ok(())
        })
        .await
    }

    /// Every readable node in the store. A row that cannot be read is
    /// quarantined: logged, counted in `muster_store_rows_quarantined`, and
    /// left out, so one bad row cannot keep the fleet from being served.
    pub async fn load_nodes(&self) -> Result<Vec<StoredNode>, StoreError> {
        self.read(|conn| {
            let heartbeats = heartbeats::all(conn)?;
            let rows = known_nodes::table
                .select((NodeRow::as_select(), DrainRow::as_select()))
                .order(known_nodes::node_id)
                .load_iter::<(NodeRow, DrainRow), diesel::connection::DefaultLoadingMode>(conn)?;
            let mut nodes = Vec::new();
            let mut quarantined = 0_u32;
            for row in rows {
                let (row, drain) = match row {
                    Ok((row, drain)) => (Ok(row), drain.into_drain()),
                    Err(error) => (Err(error), None),
                };
                match decode(row)? {
                    Decoded::Node(node) => {
                        let heartbeat = heartbeats.get(node.registration.node_id.as_str());
                        nodes.push(StoredNode {
                            drain,
                            last_seen: heartbeats::latest(node.last_seen, heartbeat.copied()),
                            ..*node
                        });
                    }
                    Decoded::Unreadable { node_id, reason } => {
                        quarantined += 1;
                        warn!(
                            node_id = %node_id.as_deref().unwrap_or("(undecodable)"),
                            %reason,
                            "quarantined an unreadable row: its node is left out of the fleet, and the row is kept as it is for an operator"
                        );
                    }
                }
            }
            metrics::gauge!("muster_store_rows_quarantined").set(f64::from(quarantined));
            Ok(nodes)
        })
        .await
    }

    /// Records a registration and returns its session generation, issued
    /// from a fleet-wide counter, so it is above any generation the node ever
    /// held. Returns only once the row is committed; registrations arriving
    /// together share a transaction (see [`enroller`]). A node id already
    /// held under another secret is refused, and nothing is written for it.
    pub async fn enroll(
        &self,
        registration: Registration,
        secret_hash: SecretHash,
        now: SystemTime,
    ) -> Result<Enrolled, StoreError> {
        self.enroller.enroll(registration, secret_hash, now).await
    }

    /// Whether `node_id` is stored with this node secret. Only reads, so it
    /// answers while writes fail.
    pub async fn holds_secret(
        &self,
        node_id: NodeId,
        secret_hash: SecretHash,
    ) -> Result<bool, StoreError> {
        self.read(move |conn| {
            let stored: Option<Option<String>> = known_nodes::table
                .find(node_id.as_str())
                .select(known_nodes::secret_hash)
                .first(conn)
                .optional()?;
            Ok(stored
                .flatten()
                .and_then(|stored| SecretHash::from_hex(&stored))
                .is_some_and(|stored| stored.matches(&secret_hash)))
        })
        .await
    }

    /// Deletes a node's row, whatever its generation, and returns the
    /// generation it held (0 when that cannot be read); `None` if there was
    /// no such row.
    pub async fn remove(&self, node_id: NodeId) -> Result<Option<u64>, StoreError> {
        self.event_transaction(move |conn, recorder| {
            if let Some(node) = events::row_node(conn, &node_id, NodeState::Online)? {
                recorder.record(EventKind::Removed, Reason::Removed, node);
            }
            let row = known_nodes::table.find(node_id.as_str());
            let generation: Option<Option<i64>> = row
                .select(known_nodes::session_generation.nullable())
                .first(conn)
                .optional()?;
            diesel::delete(row).execute(conn)?;
            heartbeats::forget(conn, &node_id)?;
            // A generation that cannot be read is a quarantined row's: its
            // node was never loaded nor admitted, so no session is fenced.
            Ok(generation.map(|g| g.and_then(|g| u64::try_from(g).ok()).unwrap_or(0)))
        })
        .await
    }

    /// Drains (`reason` given) or undrains a node's row, whatever its
    /// generation. Draining a drained node replaces its reason and keeps
    /// the moment it was first drained. Returns the generation the row held
    /// and the drain as recorded; `None` if there was no such row.
    pub async fn set_drain(
        &self,
        node_id: NodeId,
        reason: Option<String>,
        now: SystemTime,
    ) -> Result<Option<(u64, Option<Drain>)>, StoreError> {
        let events = self.events.clone();
        self.event_transaction(move |conn, recorder| {
            let row = known_nodes::table.find(node_id.as_str());
            let found: Option<(i64, Option<i64>)> = row
                .select((known_nodes::session_generation, known_nodes::drained_at))
                .first(conn)
                .optional()?;
            let Some((generation, drained_at)) = found else {
                return Ok(None);
            };
            let drain = reason.map(|reason| Drain {
                since: drained_at.map_or(now, from_unix_millis),
                reason,
            });
            diesel::update(row)
                .set((
                    known_nodes::drained_at
                        .eq(drain.as_ref().map(|drain| to_unix_millis(drain.since))),
                    known_nodes::drain_reason.eq(drain.as_ref().map(|drain| drain.reason.clone())),
                ))
                .execute(conn)?;
            let generation = u64::try_from(generation).map_err(|_| StoreError::Corrupt {
                node_id: node_id.to_string(),
                reason: format!("negative session_generation {generation}"),
            })?;
            // A drain leaves the state as it was, and a row cannot tell
            // ONLINE from UNKNOWN: the last event of this session can.
            let live = match events.published_state(&node_id) {
                Some((published, proto::NodeState::Unknown)) if published == generation => {
                    NodeState::Unknown
                }
                _ => NodeState::Online,
            };
            if let Some(node) = events::row_node(conn, &node_id, live)? {
                let reason = if drain.is_some() {
                    Reason::Drained
                } else {
                    Reason::Undrained
                };
                recorder.changed(reason, node);
            }
            Ok(Some((generation, drain)))
        })
        .await
    }

    /// Records that the agent of the session holding `generation` left on
    /// purpose at `left_at`. Returns whether that session's row was found:
    /// a superseded session's leave changes nothing.
    pub async fn record_leave(
        &self,
        node_id: NodeId,
        generation: u64,
        left_at: SystemTime,
    ) -> Result<bool, StoreError> {
        self.event_transaction(move |conn, recorder| {
            let updated = diesel::update(
                known_nodes::table
                    .find(node_id.as_str())
                    .filter(known_nodes::session_generation.eq(generation_to_column(generation))),
            )
            .set(known_nodes::left_at.eq(Some(to_unix_millis(left_at))))
            .execute(conn)?;
            if updated == 1
                && let Some(node) = events::row_node(conn, &node_id, NodeState::Online)?
            {
                recorder.changed(Reason::Left, node);
            }
            Ok(updated == 1)
        })
        .await
    }

    /// Writes heartbeat times, then registry changes and GPU inventories in
    /// one transaction, with an event for each change and each inventory
    /// that found its session's row (an inventory is written only over the
    /// row of the session that reported it), and prunes the event history.
    ///
    /// Heartbeat times go first, [`LAST_SEEN_PER_TRANSACTION`] nodes per
    /// transaction: a whole fleet's would hold the write lock for tens of
    /// milliseconds, and every lease commit would wait behind it. Each is
    /// a time the node was certainly seen, so a retry that writes some of
    /// them again changes nothing. Shared slices let a caller keep the
    /// batch for a retry without copying it. Returns how many transactions
    /// were committed.
    pub async fn write(
        &self,
        changes: Arc<[Change]>,
        last_seen: Arc<[(NodeId, SystemTime)]>,
        inventories: Arc<[InventoryUpdate]>,
    ) -> Result<usize, StoreError> {
        if changes.is_empty() && last_seen.is_empty() && inventories.is_empty() {
            return Ok(0);
        }
        let settings = self.events.settings();
        let file = self.file.clone();
        let events = self.events.clone();
        self.run(move |conn| {
            let mut transactions = 0;
            for chunk in last_seen.chunks(LAST_SEEN_PER_TRANSACTION) {
                events.transaction(file.as_deref(), conn, SystemTime::now(), |conn, _| {
                    heartbeats::write(conn, chunk)
                })?;
                transactions += 1;
            }
            events.transaction(
                file.as_deref(),
                conn,
                SystemTime::now(),
                |conn, recorder| {
                    write_inventories(conn, recorder, &inventories)?;
                    for change in changes.iter() {
                        apply_change(conn, recorder, change)?;
                    }
                    events::prune(conn, settings, SystemTime::now())
                },
            )?;
            Ok(transactions + 1)
        })
        .await
    }
}

/// Writes each GPU inventory over the row of the session that reported it,
/// with an event for each that found its row.
fn write_inventories(
    conn: &mut Db,
    recorder: &mut Recorder,
    inventories: &[InventoryUpdate],
) -> Result<(), StoreError> {
    for update in inventories {
        let of_session = known_nodes::table
            .find(update.node_id.as_str())
            .filter(known_nodes::session_generation.eq(generation_to_column(update.generation)));
        let updated = diesel::update(of_session)
            .set(known_nodes::gpus.eq(rows::encode_gpus(&update.node_id, &update.gpus)?))
            .execute(conn)?;
        if updated == 1
            && let Some(node) = events::row_node(conn, &update.node_id, NodeState::Online)?
        {
            recorder.changed(Reason::Gpus, node);
        }
    }
    Ok(())
}

/// Heartbeat times written in one transaction at most: a few milliseconds
/// of the write lock on SQLite, so a lease commit never waits longer for a
/// flush of the whole fleet's.
const LAST_SEEN_PER_TRANSACTION: usize = 256;

/// A row as read: a node, or why it cannot be one.
enum Decoded {
    Node(Box<StoredNode>),
    Unreadable {
        /// `None` when not even the row's columns could be decoded.
        node_id: Option<String>,
        reason: String,
    },
}

fn decode(row: QueryResult<NodeRow>) -> Result<Decoded, StoreError> {
    match row.map_err(StoreError::from).and_then(StoredNode::try_from) {
        Ok(node) => Ok(Decoded::Node(Box::new(node))),
        Err(StoreError::Corrupt { node_id, reason }) => Ok(Decoded::Unreadable {
            node_id: Some(node_id),
            reason,
        }),
        Err(StoreError::Query(diesel::result::Error::DeserializationError(error))) => {
            Ok(Decoded::Unreadable {
                node_id: None,
                reason: error.to_string(),
            })
        }
        Err(other) => Err(other),
    }
}

/// Writes one registration inside the caller's transaction and issues its
/// generation, unless the node id is held under another secret or its row
/// is unreadable; then nothing is written.
fn enroll_in(
    conn: &mut Db,
    recorder: &mut Recorder,
    registration: &Registration,
    secret_hash: SecretHash,
    now: SystemTime,
) -> Result<Enrolled, StoreError> {
    use schema::session_generations::dsl::{last_issued, session_generations};
    let node = known_nodes::table.find(registration.node_id.as_str());
    let existing: Option<(i64, Option<String>)> = node
        .select((known_nodes::registered_at, known_nodes::secret_hash))
        .first(conn)
        .optional()?;
    let held_by_another = existing
        .as_ref()
        .and_then(|(_, stored)| stored.as_deref())
        .is_some_and(|stored| {
            SecretHash::from_hex(stored).is_none_or(|stored| !stored.matches(&secret_hash))
        });
    if held_by_another {
        return Ok(Enrolled::HeldByAnotherSecret);
    }
    if existing.is_some()
        && let Decoded::Unreadable { reason, .. } =
            decode(node.select(NodeRow::as_select()).first(conn))?
    {
        return Ok(Enrolled::Quarantined { reason });
    }
    let first_registered = existing.map(|(registered_at, _)| registered_at);
    diesel::update(session_generations)
        .set(last_issued.eq(last_issued + 1))
        .execute(conn)?;
    let issued: i64 = session_generations.select(last_issued).first(conn)?;
    let enrollment = Enrollment {
        generation: u64::try_from(issued).map_err(|_| StoreError::Corrupt {
            node_id: registration.node_id.to_string(),
            reason: format!("negative session generation counter {issued}"),
        })?,
        registered_at: from_unix_millis(first_registered.unwrap_or_else(|| to_unix_millis(now))),
    };
    let row = NodeRow::new(registration, secret_hash, enrollment, now)?;
    if first_registered.is_some() {
        diesel::update(node).set(&row).execute(conn)?;
    } else {
        diesel::insert_into(known_nodes::table)
            .values(&row)
            .execute(conn)?;
    }
    if let Some(node) = events::row_node(conn, &registration.node_id, NodeState::Online)? {
        recorder.changed(Reason::Registered, node);
    }
    Ok(Enrolled::Admitted(enrollment))
}

/// Applies one change to its session's row, and records its event if the
/// row was found: a change of a superseded session changes nothing and is
/// no event.
fn apply_change(conn: &mut Db, recorder: &mut Recorder, change: &Change) -> Result<(), StoreError> {
    use known_nodes::dsl;
    let of_session = |node_id: &NodeId, generation: u64| {
        dsl::known_nodes
            .filter(dsl::node_id.eq(node_id.to_string()))
            .filter(dsl::session_generation.eq(generation_to_column(generation)))
    };
    match change {
        Change::WentOffline {
            node_id,
            generation,
            since,
        } => {
            let updated = diesel::update(of_session(node_id, *generation))
                .set(dsl::offline_since.eq(Some(to_unix_millis(*since))))
                .execute(conn)?;
            if updated == 1
                && let Some(node) = events::row_node(conn, node_id, NodeState::Online)?
            {
                // A leave recorded meanwhile wins over the silence.
                let reason = if node.state() == proto::NodeState::Left {
                    Reason::Left
                } else {
                    Reason::Offline
                };
                recorder.changed(reason, node);
            }
        }
        Change::CameOnline {
            node_id,
            generation,
        } => {
            let updated = diesel::update(of_session(node_id, *generation))
                .set(dsl::offline_since.eq(None::<i64>))
                .execute(conn)?;
            if updated == 1
                && let Some(node) = events::row_node(conn, node_id, NodeState::Online)?
            {
                recorder.changed(Reason::Online, node);
            }
        }
        Change::Expired {
            node_id,
            generation,
        } => {
            let row = events::row_node(conn, node_id, NodeState::Online)?;
            let deleted = diesel::delete(of_session(node_id, *generation)).execute(conn)?;
            if deleted == 1 {
                heartbeats::forget(conn, node_id)?;
                if let Some(node) = row {
                    recorder.record(EventKind::Removed, Reason::Expired, node);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path, time::Duration};

    use diesel::connection::SimpleConnection;

    use super::*;

    fn registration(node: &str, boot: &str) -> Registration {
        Registration {
            node_id: NodeId::parse("node_id", node).unwrap(),
            agent_url: format!("http://{node}:7701"),
            boot_id: boot.to_owned(),
            version: "v".to_owned(),
            hostname: node.to_owned(),
            labels: BTreeMap::from([("gpu".to_owned(), "a100".to_owned())]),
            max_backoff: Duration::from_secs(90),
            gpus: Default::default(),
        }
    }

    async fn write_batch(
        store: &Store,
        changes: Vec<Change>,
        last_seen: Vec<(NodeId, SystemTime)>,
    ) -> Result<(), StoreError> {
        store
            .write(changes.into(), last_seen.into(), Arc::from([]))
            .await
            .map(drop)
    }

    fn secret_of(node: &str) -> SecretHash {
        crate::auth::NodeSecret::parse("secret", &format!("secret-of-{node}-0123456789"))
            .unwrap()
            .hash()
    }

    async fn admit(store: &Store, registration: Registration, now: SystemTime) -> Enrollment {
        let secret = secret_of(registration.node_id.as_str());
        match store.enroll(registration, secret, now).await.unwrap() {
            Enrolled::Admitted(enrollment) => enrollment,
            refused => panic!("{refused:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn registrations_arriving_together_are_all_committed_with_distinct_generations() {
        for db in testing::each_backend(
            "store::tests::registrations_arriving_together_are_all_committed_with_distinct_generations",
        ) {
            let store = db.open().await;
            let now = SystemTime::now();
            let enrollments = futures::future::join_all((0..200).map(|i| {
                let store = store.clone();
                async move {
                    store
                        .enroll(
                            registration(&format!("n{i}"), "b"),
                            secret_of(&format!("n{i}")),
                            now,
                        )
                        .await
                        .unwrap()
                }
            }))
            .await;
            let mut generations: Vec<u64> = enrollments
                .iter()
                .map(|e| match e {
                    Enrolled::Admitted(e) => e.generation,
                    refused => panic!("{refused:?}"),
                })
                .collect();
            generations.sort_unstable();
            assert_eq!(generations, (1..=200).collect::<Vec<u64>>());
            assert_eq!(store.load_nodes().await.unwrap().len(), 200);
        }
    }

    /// A whole fleet's heartbeat times are flushed a few hundred nodes per
    /// transaction, and every node gets its own.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_fleets_heartbeat_times_are_written_in_short_transactions_each_to_its_node() {
        const FLEET: usize = 600;
        for db in testing::each_backend(
            "store::tests::a_fleets_heartbeat_times_are_written_in_short_transactions_each_to_its_node",
        ) {
            let store = db.open().await;
            let registered = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            futures::future::join_all((0..FLEET).map(|i| {
                let store = store.clone();
                async move {
                    let node = format!("n{i}");
                    store
                        .enroll(registration(&node, "b"), secret_of(&node), registered)
                        .await
                        .unwrap()
                }
            }))
            .await;
            let seen_at = |i: usize| registered + Duration::from_millis(1_000 + i as u64);
            let last_seen: Vec<(NodeId, SystemTime)> = (0..FLEET)
                .map(|i| {
                    (
                        NodeId::parse("node_id", &format!("n{i}")).unwrap(),
                        seen_at(i),
                    )
                })
                .collect();
            let transactions = store
                .write(Arc::from([]), last_seen.into(), Arc::from([]))
                .await
                .unwrap();
            assert_eq!(
                transactions,
                FLEET.div_ceil(LAST_SEEN_PER_TRANSACTION) + 1,
                "heartbeat times in chunks, then the batch's changes"
            );
            let nodes = store.load_nodes().await.unwrap();
            assert_eq!(nodes.len(), FLEET);
            for node in nodes {
                let i: usize = node.registration.node_id.as_str()[1..].parse().unwrap();
                assert_eq!(node.last_seen, seen_at(i), "{}", node.registration.node_id);
            }
        }
    }

    /// Every event the store has, through its public replay.
    async fn all_events(store: &Store) -> Vec<NodeEvent> {
        let history = store.history().await.unwrap();
        store
            .replay(history.pruned_through, history.last_revision, usize::MAX)
            .await
            .unwrap()
    }

    fn summary(events: &[NodeEvent]) -> Vec<(u64, &str, Reason, proto::NodeState)> {
        events
            .iter()
            .map(|e| (e.revision, e.node_id(), e.reason, e.node.state()))
            .collect()
    }

    #[tokio::test]
    async fn every_change_that_finds_its_row_is_one_event_in_its_transaction_and_is_published() {
        for db in testing::each_backend(
            "store::tests::every_change_that_finds_its_row_is_one_event_in_its_transaction_and_is_published",
        ) {
            let store = db.open().await;
            let hub = store.event_hub();
            let (_, mut live) = hub.follow();
            let now = SystemTime::now();
            let a = NodeId::parse("node_id", "a").unwrap();
            let first = admit(&store, registration("a", "b1"), now).await;
            store
                .set_drain(a.clone(), Some("fan".to_owned()), now)
                .await
                .unwrap();
            let offline = Change::WentOffline {
                node_id: a.clone(),
                generation: first.generation,
                since: now,
            };
            let stale = Change::CameOnline {
                node_id: a.clone(),
                generation: first.generation + 7,
            };
            write_batch(&store, vec![offline, stale], vec![(a.clone(), now)])
                .await
                .unwrap();
            let second = admit(&store, registration("a", "b2"), now).await;
            assert!(
                store
                    .record_leave(a.clone(), second.generation, now)
                    .await
                    .unwrap()
            );
            write_batch(
                &store,
                vec![Change::Expired {
                    node_id: a.clone(),
                    generation: second.generation,
                }],
                vec![],
            )
            .await
            .unwrap();

            use proto::NodeState as S;
            let events = all_events(&store).await;
            assert_eq!(
                summary(&events),
                [
                    (1, "a", Reason::Registered, S::Online),
                    (2, "a", Reason::Drained, S::Online),
                    (3, "a", Reason::Offline, S::Offline),
                    (4, "a", Reason::Registered, S::Online),
                    (5, "a", Reason::Left, S::Left),
                    (6, "a", Reason::Expired, S::Left),
                ],
                "the stale generation's change is no event"
            );
            assert!(events[3].node.drained, "registration keeps the drain");
            assert_eq!(events[5].kind, EventKind::Removed);
            let published: Vec<u64> = std::iter::from_fn(|| match live.try_next() {
                Some(crate::events::Next::Event(event)) => Some(event.revision),
                _ => None,
            })
            .collect();
            assert_eq!(published, [1, 2, 3, 4, 5, 6]);
            assert_eq!(hub.revision(), 6);
            assert!(hub.node("a").is_none(), "expired");

            let refused = Change::WentOffline {
                node_id: a.clone(),
                generation: second.generation,
                since: now,
            };
            write_batch(&store, vec![refused], vec![]).await.unwrap();
            admit(&store, registration("b", "b1"), now).await;
            let b = NodeId::parse("node_id", "b").unwrap();
            write_batch(&store, vec![], vec![(b, now + Duration::from_secs(1))])
                .await
                .unwrap();
            assert_eq!(
                store.history().await.unwrap().last_revision,
                7,
                "a heartbeat's last_seen is no event"
            );
        }
    }

    /// An event that cannot be written takes its change down with it: the
    /// two share one transaction, so neither is ever durable alone.
    #[tokio::test]
    async fn a_change_whose_event_cannot_be_written_is_not_written_either() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open(&path).await.unwrap();
        let now = SystemTime::now();
        let a = NodeId::parse("node_id", "a").unwrap();
        let first = admit(&store, registration("a", "b1"), now).await;
        execute_sql(
            &path,
            "CREATE TRIGGER refuse_events BEFORE INSERT ON node_events
             BEGIN SELECT RAISE(ABORT, 'no events'); END;",
        );

        let refused = store
            .set_drain(a.clone(), Some("fan".to_owned()), now)
            .await;
        assert!(refused.is_err(), "{refused:?}");
        let offline = Change::WentOffline {
            node_id: a.clone(),
            generation: first.generation,
            since: now,
        };
        assert!(write_batch(&store, vec![offline], vec![]).await.is_err());
        assert!(
            store
                .record_leave(a.clone(), first.generation, now)
                .await
                .is_err()
        );
        assert!(
            store
                .enroll(registration("b", "b1"), secret_of("b"), now)
                .await
                .is_err()
        );
        assert!(store.remove(a.clone()).await.is_err());
        let nodes = store.load_nodes().await.unwrap();
        assert_eq!(nodes.len(), 1, "neither b registered nor a removed");
        let stored = &nodes[0];
        assert_eq!(stored.drain, None);
        assert_eq!(stored.offline_since, None);
        assert_eq!(stored.left_at, None);
        assert_eq!(store.history().await.unwrap().last_revision, 1);
        assert_eq!(store.event_hub().revision(), 1, "nothing published");

        execute_sql(&path, "DROP TRIGGER refuse_events");
        store
            .set_drain(a, Some("fan".to_owned()), now)
            .await
            .unwrap();
        assert_eq!(store.history().await.unwrap().last_revision, 2);
    }

    /// Registrations, drains, leaves and writer batches commit from many
    /// threads at once; the hub must still see every revision once, in
    /// order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_committed_by_many_writers_at_once_are_published_in_revision_order() {
        for db in testing::each_backend(
            "store::tests::events_committed_by_many_writers_at_once_are_published_in_revision_order",
        ) {
            let store = db.open().await;
            let hub = store.event_hub();
            let (_, mut live) = hub.follow();
            let now = SystemTime::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..40 {
                let store = store.clone();
                tasks.spawn(async move {
                    let node = format!("n{i}");
                    let id = NodeId::parse("node_id", &node).unwrap();
                    let enrollment = admit(&store, registration(&node, "b1"), now).await;
                    store
                        .set_drain(id.clone(), Some("fan".to_owned()), now)
                        .await
                        .unwrap();
                    let offline = Change::WentOffline {
                        node_id: id.clone(),
                        generation: enrollment.generation,
                        since: now,
                    };
                    store
                        .write(
                            vec![offline].into(),
                            vec![(id.clone(), now)].into(),
                            Arc::from([]),
                        )
                        .await
                        .unwrap();
                    admit(&store, registration(&node, "b2"), now).await;
                    store.set_drain(id, None, now).await.unwrap();
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
            let published: Vec<u64> = std::iter::from_fn(|| match live.try_next() {
                Some(crate::events::Next::Event(event)) => Some(event.revision),
                _ => None,
            })
            .collect();
            assert_eq!(published, (1..=200).collect::<Vec<u64>>());
            let stored: Vec<u64> = all_events(&store)
                .await
                .iter()
                .map(|e| e.revision)
                .collect();
            assert_eq!(stored, published);
        }
    }

    #[tokio::test]
    async fn a_drain_keeps_a_reloaded_node_unknown_and_revisions_survive_reopening() {
        for db in testing::each_backend(
            "store::tests::a_drain_keeps_a_reloaded_node_unknown_and_revisions_survive_reopening",
        ) {
            a_drain_keeps_a_reloaded_node_unknown_and_revisions_survive_reopening_on(&db).await;
        }
    }

    async fn a_drain_keeps_a_reloaded_node_unknown_and_revisions_survive_reopening_on(
        db: &testing::TestDb,
    ) {
        let store = db.open().await;
        let now = SystemTime::now();
        admit(&store, registration("a", "b1"), now).await;
        let database_id = store.event_hub().database_id().to_owned();
        drop(store);

        let store = db.open().await;
        assert_eq!(store.event_hub().database_id(), database_id);
        assert_eq!(store.event_hub().revision(), 1);
        let mut reloaded = store.load_nodes().await.unwrap();
        let node = reloaded.remove(0);
        let generation = node.generation;
        store
            .record_reload(vec![NodeSnapshot {
                registration: node.registration,
                state: NodeState::Unknown,
                registered_at: node.registered_at,
                last_seen: node.last_seen,
                generation: node.generation,
                offline_since: None,
                drain: None,
                last_probe_error: None,
            }])
            .await
            .unwrap();
        let a = NodeId::parse("node_id", "a").unwrap();
        store
            .set_drain(a.clone(), Some("fan".to_owned()), now)
            .await
            .unwrap();
        let proven = Change::CameOnline {
            node_id: a,
            generation,
        };
        write_batch(&store, vec![proven], vec![]).await.unwrap();
        let events = all_events(&store).await;
        use proto::NodeState as S;
        assert_eq!(
            summary(&events)[1..],
            [
                (2, "a", Reason::Reloaded, S::Unknown),
                (3, "a", Reason::Drained, S::Unknown),
                (4, "a", Reason::Online, S::Online),
            ]
        );
        assert!(events[3].node.drained);

        let other = testing::another(db).open().await;
        assert_ne!(other.event_hub().database_id(), database_id);
    }

    #[tokio::test]
    async fn pruning_keeps_the_last_events_or_the_young_ones_whichever_is_more() {
        let dir = tempfile::tempdir().unwrap();
        let settings = EventSettings {
            keep_events: 3,
            keep_for: Duration::ZERO,
            watcher_buffer: 16,
        };
        let store = Store::open_with(&dir.path().join("muster.db"), settings)
            .await
            .unwrap();
        let now = SystemTime::now();
        for i in 0..8 {
            admit(&store, registration(&format!("n{i}"), "b"), now).await;
        }
        assert_eq!(store.history().await.unwrap().pruned_through, 0);
        let n0 = NodeId::parse("node_id", "n0").unwrap();
        write_batch(&store, vec![], vec![(n0, now)]).await.unwrap();
        let history = store.history().await.unwrap();
        assert_eq!(
            history,
            History {
                pruned_through: 5,
                last_revision: 8
            }
        );
        let kept: Vec<u64> = all_events(&store)
            .await
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(kept, [6, 7, 8]);

        let young = Store::open_with(
            &dir.path().join("young.db"),
            EventSettings {
                keep_for: Duration::from_secs(3600),
                ..settings
            },
        )
        .await
        .unwrap();
        for i in 0..8 {
            admit(&young, registration(&format!("n{i}"), "b"), now).await;
        }
        let n0 = NodeId::parse("node_id", "n0").unwrap();
        write_batch(&young, vec![], vec![(n0, now)]).await.unwrap();
        assert_eq!(young.history().await.unwrap().pruned_through, 0);
    }

    async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("muster.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn enroll_increments_the_generation_and_keeps_the_first_registration_time() {
        for db in testing::each_backend(
            "store::tests::enroll_increments_the_generation_and_keeps_the_first_registration_time",
        ) {
            let store = db.open().await;
            let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
            let t1 = t0 + Duration::from_secs(60);
            let first = admit(&store, registration("a", "b1"), t0).await;
            let second = admit(&store, registration("a", "b2"), t1).await;
            assert_eq!((first.generation, second.generation), (1, 2));
            assert_eq!(second.registered_at, t0);

            let nodes = store.load_nodes().await.unwrap();
            assert_eq!(nodes.len(), 1);
            assert_eq!(nodes[0].registration, registration("a", "b2"));
            assert_eq!(nodes[0].last_seen, t1);
            assert_eq!(nodes[0].generation, 2);
        }
    }

    #[tokio::test]
    async fn rows_without_a_backoff_ceiling_get_the_default_and_large_ones_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open(&path).await.unwrap();
        let now = SystemTime::now();
        admit(&store, registration("older-agent", "b"), now).await;
        admit(&store, registration("patient-agent", "b"), now).await;
        drop(store);
        execute_sql(
            &path,
            "UPDATE known_nodes SET max_backoff_ms = CASE node_id \
             WHEN 'older-agent' THEN NULL ELSE 36000000 END",
        );

        let store = Store::open(&path).await.unwrap();
        let nodes = store.load_nodes().await.unwrap();
        let backoff_of = |node: &str| {
            nodes
                .iter()
                .find(|n| n.registration.node_id.as_str() == node)
                .map(|n| n.registration.max_backoff)
        };
        assert_eq!(
            backoff_of("older-agent"),
            Some(crate::node::DEFAULT_MAX_BACKOFF)
        );
        assert_eq!(
            backoff_of("patient-agent"),
            Some(crate::node::MAX_MAX_BACKOFF)
        );
    }

    #[tokio::test]
    async fn writes_from_a_superseded_generation_change_nothing() {
        for db in testing::each_backend(
            "store::tests::writes_from_a_superseded_generation_change_nothing",
        ) {
            let store = db.open().await;
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
            admit(&store, registration("a", "b1"), now).await;
            admit(&store, registration("a", "b2"), now).await;
            let a = NodeId::parse("node_id", "a").unwrap();
            write_batch(
                &store,
                vec![
                    Change::WentOffline {
                        node_id: a.clone(),
                        generation: 1,
                        since: now,
                    },
                    Change::Expired {
                        node_id: a.clone(),
                        generation: 1,
                    },
                ],
                vec![],
            )
            .await
            .unwrap();
            let nodes = store.load_nodes().await.unwrap();
            assert_eq!(nodes.len(), 1);
            assert_eq!(nodes[0].offline_since, None);

            write_batch(
                &store,
                vec![Change::WentOffline {
                    node_id: a.clone(),
                    generation: 2,
                    since: now,
                }],
                vec![(a.clone(), now + Duration::from_secs(5))],
            )
            .await
            .unwrap();
            let nodes = store.load_nodes().await.unwrap();
            assert_eq!(nodes[0].offline_since, Some(now));
            assert_eq!(nodes[0].last_seen, now + Duration::from_secs(5));

            write_batch(
                &store,
                vec![Change::Expired {
                    node_id: a,
                    generation: 2,
                }],
                vec![],
            )
            .await
            .unwrap();
            assert!(store.load_nodes().await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn the_last_heartbeat_time_of_a_node_in_a_batch_wins() {
        for db in testing::each_backend("store::tests::the_last_heartbeat_time") {
            let store = db.open().await;
            let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
            let (t1, t2) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
            admit(&store, registration("a", "b1"), t0).await;
            admit(&store, registration("b", "b1"), t0).await;
            let a = NodeId::parse("node_id", "a").unwrap();
            let b = NodeId::parse("node_id", "b").unwrap();
            let absent = NodeId::parse("node_id", "absent").unwrap();
            write_batch(
                &store,
                vec![],
                vec![(a.clone(), t1), (b, t1), (a, t2), (absent, t2)],
            )
            .await
            .unwrap();
            let seen: Vec<(String, SystemTime)> = store
                .load_nodes()
                .await
                .unwrap()
                .into_iter()
                .map(|n| (n.registration.node_id.to_string(), n.last_seen))
                .collect();
            assert_eq!(
                seen,
                [("a".to_owned(), t2), ("b".to_owned(), t1)],
                "{}",
                db.name()
            );
        }
    }

    fn gpus(used: u64) -> crate::node::GpuInventory {
        crate::node::GpuInventory::new(
            "gpus",
            vec![crate::node::Gpu {
                index: 0,
                uuid: "GPU-0".to_owned(),
                name: "A100-80G".to_owned(),
                memory_total_mib: 81_920,
                memory_used_mib: used,
                unhealthy: Some("critical Xid 79".to_owned()),
                ..Default::default()
            }],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn inventories_are_kept_by_registration_and_by_batches_of_the_current_session_only() {
        for db in testing::each_backend(
            "store::tests::inventories_are_kept_by_registration_and_by_batches_of_the_current_session_only",
        ) {
            let store = db.open().await;
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
            let mut registration = registration("a", "b1");
            registration.gpus = gpus(100);
            admit(&store, registration.clone(), now).await;
            assert_eq!(
                store.load_nodes().await.unwrap()[0].registration.gpus,
                gpus(100)
            );

            let a = NodeId::parse("node_id", "a").unwrap();
            let update = |generation, used| InventoryUpdate {
                node_id: a.clone(),
                generation,
                gpus: gpus(used),
            };
            store
                .write(Arc::from([]), Arc::from([]), Arc::from([update(1, 2_000)]))
                .await
                .unwrap();
            assert_eq!(
                store.load_nodes().await.unwrap()[0].registration.gpus,
                gpus(2_000)
            );
            let events = all_events(&store).await;
            let last = events.last().unwrap();
            assert_eq!(last.reason, Reason::Gpus);
            assert_eq!(last.node.gpus[0].memory_used_mib, 2_000);
            store
                .write(Arc::from([]), Arc::from([]), Arc::from([update(0, 3_000)]))
                .await
                .unwrap();
            assert_eq!(
                store.load_nodes().await.unwrap()[0].registration.gpus,
                gpus(2_000),
                "an older session's inventory changes nothing"
            );
            assert_eq!(
                all_events(&store).await.len(),
                events.len(),
                "and is no event"
            );

            drop(store);
            let store = db.open().await;
            assert_eq!(
                store.load_nodes().await.unwrap()[0].registration.gpus,
                gpus(2_000)
            );
            registration.gpus = Default::default();
            admit(&store, registration, now).await;
            assert!(
                store.load_nodes().await.unwrap()[0]
                    .registration
                    .gpus
                    .is_empty()
            );
        }
    }

    #[tokio::test]
    async fn a_node_id_held_by_another_secret_is_refused_and_nothing_is_written() {
        for db in testing::each_backend(
            "store::tests::a_node_id_held_by_another_secret_is_refused_and_nothing_is_written",
        ) {
            let store = db.open().await;
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
            let first = admit(&store, registration("a", "b1"), now).await;
            let refused = store
                .enroll(registration("a", "intruder"), secret_of("intruder"), now)
                .await
                .unwrap();
            assert_eq!(refused, Enrolled::HeldByAnotherSecret);
            let nodes = store.load_nodes().await.unwrap();
            assert_eq!(nodes[0].registration, registration("a", "b1"));
            assert_eq!(nodes[0].generation, first.generation);

            let removed = store
                .remove(NodeId::parse("node_id", "a").unwrap())
                .await
                .unwrap();
            assert_eq!(removed, Some(first.generation));
            let claimed = store
                .enroll(registration("a", "intruder"), secret_of("intruder"), now)
                .await
                .unwrap();
            assert!(matches!(claimed, Enrolled::Admitted(e) if e.generation > first.generation));
            let absent = NodeId::parse("node_id", "absent").unwrap();
            assert_eq!(store.remove(absent).await.unwrap(), None);
        }
    }

    #[test]
    fn a_row_breaking_a_constraint_is_not_an_outage_but_any_other_failure_is() {
        use diesel::result::{DatabaseErrorKind, Error};
        let database = |kind, message: &str| {
            StoreError::Query(Error::DatabaseError(kind, Box::new(message.to_owned())))
        };
        assert!(!database(DatabaseErrorKind::UniqueViolation, "UNIQUE").is_unavailable());
        assert!(
            !StoreError::Corrupt {
                node_id: "a".to_owned(),
                reason: "bad".to_owned()
            }
            .is_unavailable()
        );
        let readonly = database(
            DatabaseErrorKind::Unknown,
            "attempt to write a readonly database",
        );
        assert!(readonly.is_unavailable());
        assert!(database(DatabaseErrorKind::Unknown, "database or disk is full").is_unavailable());
        assert!(StoreError::Batch(Arc::new(readonly)).is_unavailable());
        assert!(StoreError::EnrollerStopped.is_unavailable());
    }

    #[tokio::test]
    async fn a_write_that_fails_makes_the_store_unavailable_until_one_succeeds() {
        let (dir, store) = temp_store().await;
        let mut availability = store.availability();
        assert_eq!(*availability.borrow_and_update(), Availability::Available);
        let mut lock =
            SqliteConnection::establish(&dir.path().join("muster.db").to_string_lossy()).unwrap();
        lock.batch_execute("PRAGMA busy_timeout = 0; BEGIN IMMEDIATE")
            .unwrap();
        let refused = store.check_writable().await.unwrap_err();
        assert!(refused.is_unavailable(), "{refused}");
        assert!(availability.has_changed().unwrap());
        assert!(matches!(
            &*availability.borrow_and_update(),
            Availability::Failing { cause } if cause.contains("locked")
        ));
        lock.batch_execute("ROLLBACK").unwrap();
        store.check_writable().await.unwrap();
        assert_eq!(*availability.borrow_and_update(), Availability::Available);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_postgres_server_that_goes_away_makes_the_store_unavailable_until_it_is_back() {
        let Some(db) = testing::postgres("store::tests::a_postgres_server_that_goes_away") else {
            return;
        };
        let store = db.open().await;
        let mut availability = store.availability();
        let now = SystemTime::now();
        admit(&store, registration("a", "b1"), now).await;
        let server = db.server().unwrap();

        server.stop();
        let refused = store
            .enroll(registration("b", "b1"), secret_of("b"), now)
            .await
            .unwrap_err();
        assert!(refused.is_unavailable(), "{refused}");
        assert!(matches!(
            &*availability.borrow_and_update(),
            Availability::Failing { .. }
        ));

        server.start_again();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(error) = store.check_writable().await {
            assert!(
                std::time::Instant::now() < deadline,
                "still failing: {error}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(*availability.borrow_and_update(), Availability::Available);
        admit(&store, registration("b", "b1"), now).await;
        assert_eq!(store.load_nodes().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(&dir.path().join("absent/muster.db"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::NoDirectory { .. }), "{err}");
        assert!(err.to_string().contains("absent/muster.db"), "{err}");
        assert!(err.to_string().ends_with("absent does not exist"), "{err}");
    }

    #[tokio::test]
    async fn generations_keep_rising_after_a_node_expires() {
        for db in
            testing::each_backend("store::tests::generations_keep_rising_after_a_node_expires")
        {
            let store = db.open().await;
            let now = SystemTime::now();
            let a = NodeId::parse("node_id", "a").unwrap();
            let first = admit(&store, registration("a", "b1"), now).await;
            admit(&store, registration("other", "b1"), now).await;
            write_batch(
                &store,
                vec![Change::Expired {
                    node_id: a,
                    generation: first.generation,
                }],
                vec![],
            )
            .await
            .unwrap();
            let again = admit(&store, registration("a", "b2"), now).await;
            assert!(
                again.generation > first.generation + 1,
                "{again:?} after {first:?}"
            );
        }
    }

    /// The SQLite migrations moved to `migrations/sqlite` keep their
    /// directory names, which are the versions existing databases record:
    /// a database migrated by an earlier muster has nothing to re-run, and
    /// nothing this binary does not know.
    #[tokio::test]
    async fn a_database_of_the_earlier_layout_opens_without_migrating_again() {
        use diesel::migration::MigrationSource;
        use diesel_migrations::MigrationHarness;
        const SHIPPED: [&str; 9] = [
            "20261129000000",
            "20261129120000",
            "20261202000000",
            "20261202120000",
            "20261202130000",
            "20261202140000",
            "20261202150000",
            "20261202160000",
            "20261203000000",
        ];
        let known: Vec<String> =
            MigrationSource::<diesel::sqlite::Sqlite>::migrations(&SQLITE_MIGRATIONS)
                .unwrap()
                .iter()
                .map(|migration| migration.name().version().to_string())
                .collect();
        assert_eq!(known, SHIPPED);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let mut earlier = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        earlier.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        execute_sql(
            &path,
            "INSERT INTO known_nodes (node_id, agent_url, boot_id, registered_at, last_seen, \
             session_generation) VALUES ('a', 'http://a:7701', 'b', 1, 2, 7); \
             UPDATE session_generations SET last_issued = 7",
        );
        drop(earlier);
        let store = Store::open(&path).await.unwrap();
        let loaded = store.load_nodes().await.unwrap();
        assert_eq!(loaded[0].generation, 7);
        assert_eq!(
            loaded[0].last_seen,
            SystemTime::UNIX_EPOCH + Duration::from_millis(2),
            "a time stored in the row before heartbeat times had a table of their own"
        );
        let again = admit(&store, registration("a", "b2"), SystemTime::now()).await;
        assert_eq!(again.generation, 8);
    }

    #[tokio::test]
    async fn reopening_keeps_the_rows_and_does_not_migrate_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open(&path).await.unwrap();
        admit(&store, registration("a", "b1"), SystemTime::now()).await;
        drop(store);
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.load_nodes().await.unwrap().len(), 1);
    }

    fn execute_sql(path: &Path, sql: &str) {
        SqliteConnection::establish(path.to_str().unwrap())
            .unwrap()
            .batch_execute(&format!("PRAGMA busy_timeout = 5000; {sql}"))
            .unwrap();
    }

    /// Rebuilds `known_nodes` without its NOT NULL constraints, as a hand
    /// edit might leave it.
    fn drop_not_null_constraints(path: &Path) {
        execute_sql(
            path,
            "ALTER TABLE known_nodes RENAME TO old_nodes;
             CREATE TABLE known_nodes (node_id TEXT PRIMARY KEY, agent_url TEXT, boot_id TEXT,
                 version TEXT, hostname TEXT, labels TEXT, registered_at BIGINT, last_seen BIGINT,
                 session_generation BIGINT, offline_since BIGINT, secret_hash TEXT,
                 max_backoff_ms BIGINT, drained_at BIGINT, drain_reason TEXT, left_at BIGINT,
                 gpus TEXT);
             INSERT INTO known_nodes SELECT * FROM old_nodes;
             DROP TABLE old_nodes;",
        );
    }

    #[tokio::test]
    async fn a_database_migrated_by_a_newer_muster_is_refused_naming_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        drop(Store::open(&path).await.unwrap());
        execute_sql(
            &path,
            "INSERT INTO __diesel_schema_migrations (version) VALUES ('20990101000000')",
        );
        let refused = Store::open(&path).await.err().unwrap();
        assert!(
            matches!(&refused, StoreError::UnknownSchema { versions, .. } if versions == &["20990101000000"]),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn an_unreadable_row_is_left_out_kept_and_its_node_id_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open(&path).await.unwrap();
        let now = SystemTime::now();
        admit(&store, registration("good", "b1"), now).await;
        admit(&store, registration("bad", "b1"), now).await;
        execute_sql(
            &path,
            "UPDATE known_nodes SET labels = 'not json' WHERE node_id = 'bad'",
        );

        let nodes = store.load_nodes().await.unwrap();
        let ids: Vec<&str> = nodes
            .iter()
            .map(|n| n.registration.node_id.as_str())
            .collect();
        assert_eq!(ids, ["good"]);
        let refused = store
            .enroll(registration("bad", "b2"), secret_of("bad"), now)
            .await
            .unwrap();
        assert!(
            matches!(&refused, Enrolled::Quarantined { reason } if reason.contains("labels")),
            "{refused:?}"
        );
        let intruder = store
            .enroll(registration("bad", "b2"), secret_of("intruder"), now)
            .await
            .unwrap();
        assert_eq!(intruder, Enrolled::HeldByAnotherSecret);
        let labels: Vec<String> = known_nodes::table
            .filter(known_nodes::node_id.eq("bad"))
            .select(known_nodes::labels)
            .load(&mut SqliteConnection::establish(path.to_str().unwrap()).unwrap())
            .unwrap();
        assert_eq!(labels, ["not json"]);
    }

    #[tokio::test]
    async fn a_drain_survives_re_registration_and_a_leave_is_cleared_by_it() {
        for db in testing::each_backend(
            "store::tests::a_drain_survives_re_registration_and_a_leave_is_cleared_by_it",
        ) {
            let store = db.open().await;
            let now = SystemTime::now();
            let a = NodeId::parse("node_id", "a").unwrap();
            let first = admit(&store, registration("a", "b1"), now).await;
            let (generation, drain) = store
                .set_drain(a.clone(), Some("fan".to_owned()), now)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(generation, first.generation);
            let later = now + Duration::from_secs(5);
            let (_, again) = store
                .set_drain(a.clone(), Some("new fan".to_owned()), later)
                .await
                .unwrap()
                .unwrap();
            let again = again.unwrap();
            assert_eq!(again.reason, "new fan");
            assert_eq!(
                to_unix_millis(again.since),
                to_unix_millis(drain.unwrap().since),
                "draining again keeps the first moment"
            );
            assert!(
                !store
                    .record_leave(a.clone(), generation + 1, later)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .record_leave(a.clone(), generation, later)
                    .await
                    .unwrap()
            );
            let loaded = store.load_nodes().await.unwrap().remove(0);
            assert_eq!(loaded.drain.as_ref().unwrap().reason, "new fan");
            assert!(loaded.left_at.is_some());

            admit(&store, registration("a", "b2"), later).await;
            let loaded = store.load_nodes().await.unwrap().remove(0);
            assert_eq!(
                loaded.drain.unwrap().reason,
                "new fan",
                "kept by registration"
            );
            assert_eq!(loaded.left_at, None, "cleared by registration");

            store.set_drain(a.clone(), None, later).await.unwrap();
            assert_eq!(store.load_nodes().await.unwrap()[0].drain, None);
            let absent = NodeId::parse("node_id", "z").unwrap();
            assert_eq!(store.set_drain(absent, None, later).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn a_row_quarantined_for_its_generation_can_be_removed_and_its_node_id_registered_afresh()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open(&path).await.unwrap();
        let now = SystemTime::now();
        admit(&store, registration("negative", "b1"), now).await;
        admit(&store, registration("null", "b1"), now).await;
        execute_sql(
            &path,
            "UPDATE known_nodes SET session_generation = -1 WHERE node_id = 'negative'",
        );
        let refused = store
            .enroll(registration("negative", "b2"), secret_of("negative"), now)
            .await
            .unwrap();
        assert!(
            matches!(&refused, Enrolled::Quarantined { reason } if reason.contains("session_generation")),
            "{refused:?}"
        );

        for node in ["negative", "null"] {
            let node_id = NodeId::parse("node_id", node).unwrap();
            if node == "null" {
                drop_not_null_constraints(&path);
                execute_sql(
                    &path,
                    "UPDATE known_nodes SET session_generation = NULL WHERE node_id = 'null'",
                );
            }
            let removed = store.remove(node_id).await;
            assert!(matches!(removed, Ok(Some(_))), "{node}: {removed:?}");
            admit(&store, registration(node, "b2"), now).await;
        }
        let mut ids: Vec<String> = store
            .load_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.registration.node_id.to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, ["negative", "null"]);
    }

    #[tokio::test]
    async fn a_row_whose_columns_cannot_be_decoded_is_left_out_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let store = Store::open(&path).await.unwrap();
        let now = SystemTime::now();
        admit(&store, registration("good", "b1"), now).await;
        admit(&store, registration("undecodable", "b1"), now).await;
        drop_not_null_constraints(&path);
        execute_sql(
            &path,
            "UPDATE known_nodes SET hostname = NULL WHERE node_id = 'undecodable'",
        );
        let nodes = store.load_nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].registration.node_id.as_str(), "good");
        let refused = store
            .enroll(
                registration("undecodable", "b2"),
                secret_of("undecodable"),
                now,
            )
            .await
            .unwrap();
        assert!(
            matches!(refused, Enrolled::Quarantined { .. }),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn no_write_is_acknowledged_into_a_deleted_database_and_writes_resume_once_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        let aside = dir.path().join("aside");
        std::fs::create_dir(&aside).unwrap();
        let store = Store::open(&path).await.unwrap();
        let now = SystemTime::now();
        admit(&store, registration("a", "b1"), now).await;
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("muster.db{suffix}");
            std::fs::rename(dir.path().join(&name), aside.join(&name)).unwrap();
        }

        let refused = store
            .enroll(registration("b", "b1"), secret_of("b"), now)
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Gone { .. }), "{refused}");
        assert!(refused.is_unavailable());
        assert!(
            refused.to_string().contains("muster.db was moved away"),
            "{refused}"
        );
        let a = NodeId::parse("node_id", "a").unwrap();
        let write = write_batch(&store, vec![], vec![(a.clone(), now)]).await;
        assert!(matches!(write, Err(StoreError::Gone { .. })), "{write:?}");
        assert!(matches!(
            store.remove(a).await,
            Err(StoreError::Gone { .. })
        ));
        assert!(!path.exists(), "no database is created in its place");

        for suffix in ["", "-wal", "-shm"] {
            let name = format!("muster.db{suffix}");
            std::fs::rename(aside.join(&name), dir.path().join(&name)).unwrap();
        }
        admit(&store, registration("b", "b1"), now).await;
        assert_eq!(store.load_nodes().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_empty_file_is_refused_and_never_taken_for_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muster.db");
        std::fs::write(&path, b"").unwrap();
        let refused = Store::open(&path).await.err().unwrap();
        assert!(matches!(refused, StoreError::EmptyFile { .. }), "{refused}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
