//! The two databases behind the one store: a SQLite file, or a PostgreSQL
//! server. Everything above this module sees one connection type, [`Db`];
//! what differs between the two is kept here: how a connection is made and
//! set up, how a write transaction begins, which migrations apply.
//!
//! Invariants:
//! - A SQLite connection gets its PRAGMAs before it is used, and a write
//!   transaction takes the write lock at its start (`BEGIN IMMEDIATE`), so
//!   two writers never deadlock on upgrading a read lock.
//! - A PostgreSQL connection gives up connecting after
//!   [`CONNECT_TIMEOUT`], so an unreachable server is an outage reported
//!   in bounded time rather than a hung write. Its write transactions run
//!   at READ COMMITTED: every counter (session generations, revisions,
//!   lease generations) is raised with an `UPDATE … SET n = n + k`, which
//!   locks the counter's row until commit, so counters live in the
//!   database and never decrease, whichever coordinator writes.
//! - Each backend's migrations are its own (`migrations/sqlite`,
//!   `migrations/postgres`); a database that records a migration this
//!   binary does not know is refused.

use std::{collections::BTreeSet, path::Path, time::Duration};

use diesel::{
    connection::{AnsiTransactionManager, SimpleConnection, TransactionManager},
    migration::MigrationSource,
    pg::PgConnection,
    prelude::*,
    r2d2::{ManageConnection, R2D2Connection},
    sqlite::SqliteConnection,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::{StoreError, file};
use crate::config::PostgresUrl;

pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The PostgreSQL advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x6d75_7374_6572; // "muster"
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a PostgreSQL connection attempt may take, unless the URL sets
/// its own `connect_timeout`.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to either database.
#[derive(diesel::MultiConnection)]
pub enum Db {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// What to connect to; the URL of a PostgreSQL target holds its password,
/// so this type is never shown (see [`Target::shown`]).
#[derive(Clone)]
pub(super) enum Target {
    /// A SQLite URI (`file:…?mode=…`).
    Sqlite(String),
    Postgres(PostgresUrl),
}

impl Target {
    /// The SQLite database at `path`, allowed to create the file only where
    /// start-up found nothing.
    pub(super) fn sqlite(path: &Path, found: file::Found) -> Self {
        Self::Sqlite(sqlite_uri(path, found))
    }

    pub(super) fn connect(&self) -> Result<Db, diesel::ConnectionError> {
        match self {
            Self::Sqlite(uri) => {
                let mut conn = SqliteConnection::establish(uri)?;
                apply_sqlite_settings(&mut conn)
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(Db::Sqlite(conn))
            }
            Self::Postgres(url) => {
                PgConnection::establish(&with_connect_timeout(url.expose())).map(Db::Postgres)
            }
        }
    }
}

/// Settings applied to every SQLite connection. WAL lets reads proceed
/// during a write; `synchronous = NORMAL` keeps every commit across a
/// process crash (a power loss may lose the last commits, which agents
/// re-register). Automatic checkpoints are off: the checkpoint thread does
/// them, so no commit waits for one (see `checkpoint`).
fn apply_sqlite_settings(conn: &mut SqliteConnection) -> Result<(), diesel::result::Error> {
    conn.batch_execute(&format!(
        "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
         PRAGMA wal_autocheckpoint = 0;",
        BUSY_TIMEOUT.as_millis()
    ))
}

fn with_connect_timeout(url: &str) -> String {
    if url.contains("connect_timeout=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!(
        "{url}{separator}connect_timeout={}",
        CONNECT_TIMEOUT.as_secs()
    )
}

/// The SQLite URI of the database at `path`.
fn sqlite_uri(path: &Path, found: file::Found) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut uri = String::from("file:");
    for byte in absolute.as_os_str().as_encoded_bytes() {
        match byte {
            b'?' | b'#' | b'%' | 0x00..=0x20 | 0x7f..=0xff => {
                uri.push_str(&format!("%{byte:02X}"));
            }
            _ => uri.push(char::from(*byte)),
        }
    }
    uri.push_str(match found {
        file::Found::Existing => "?mode=rw",
        file::Found::Nothing => "?mode=rwc",
    });
    uri
}

/// Makes the pool's connections; replaces diesel's `ConnectionManager`,
/// which would try every backend on one URL.
pub(super) struct Manager {
    target: Target,
}

impl Manager {
    pub(super) fn new(target: Target) -> Self {
        Self { target }
    }
}

impl ManageConnection for Manager {
    type Connection = Db;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<Db, Self::Error> {
        self.target
            .connect()
            .map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut Db) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut Db) -> bool {
        std::thread::panicking() || conn.is_broken()
    }
}

/// Runs `work` in a write transaction: committed if it returns `Ok`,
/// rolled back otherwise.
pub(super) fn write_transaction<T, E>(
    conn: &mut Db,
    work: impl FnOnce(&mut Db) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<diesel::result::Error>,
{
    match conn {
        Db::Sqlite(sqlite) => {
            AnsiTransactionManager::begin_transaction_sql(sqlite, "BEGIN IMMEDIATE")?
        }
        Db::Postgres(postgres) => AnsiTransactionManager::begin_transaction(postgres)?,
    }
    match work(conn) {
        Ok(value) => {
            <Db as Connection>::TransactionManager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(error) => match <Db as Connection>::TransactionManager::rollback_transaction(conn) {
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(error),
            Err(rollback) => Err(rollback.into()),
        },
    }
}

/// Proves the database writable with a write that is rolled back. SQLite
/// opens a file it may not write read-only, and only a real write shows
/// it; PostgreSQL refuses to issue a transaction id on a read-only server.
pub(super) fn write_and_roll_back(conn: &mut Db) -> Result<(), diesel::result::Error> {
    let outcome = write_transaction(conn, |conn| {
        match conn {
            Db::Sqlite(sqlite) => {
                sqlite.batch_execute("CREATE TABLE muster_write_check (written INTEGER)")?;
            }
            Db::Postgres(postgres) => postgres.batch_execute("SELECT txid_current()")?,
        }
        Err::<(), _>(diesel::result::Error::RollbackTransaction)
    });
    match outcome {
        Err(diesel::result::Error::RollbackTransaction) => Ok(()),
        other => other,
    }
}

/// Commits a write that changes nothing. Unlike a rolled-back write, it
/// reaches the write-ahead log, so it also fails on a full disk: SQLite's
/// `user_version` set to the value it has (in WAL mode a rolled-back
/// transaction never writes a page, and would pass while every real write
/// fails); on PostgreSQL, a transaction that takes a transaction id, whose
/// commit is logged.
pub(super) fn commit_no_op(conn: &mut Db) -> Result<(), diesel::result::Error> {
    #[derive(QueryableByName)]
    struct UserVersion {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        user_version: i32,
    }
    write_transaction(conn, |conn| match conn {
        Db::Sqlite(sqlite) => {
            let version = diesel::sql_query("PRAGMA user_version")
                .get_result::<UserVersion>(sqlite)?
                .user_version;
            sqlite.batch_execute(&format!("PRAGMA user_version = {version}"))
        }
        Db::Postgres(postgres) => postgres.batch_execute("SELECT txid_current()"),
    })
}

/// Applies the backend's pending migrations, after refusing a database that
/// records one this binary does not have: a newer muster has changed its
/// schema in ways this one cannot know.
pub(super) fn migrate(conn: &mut Db, shown: &str) -> Result<(), StoreError> {
    match conn {
        Db::Sqlite(sqlite) => migrate_with(sqlite, SQLITE_MIGRATIONS, shown),
        Db::Postgres(postgres) => {
            // Coordinators starting together on one database migrate it one
            // at a time; the lock is the session's, freed if it dies.
            let lock = format!("SELECT pg_advisory_lock({MIGRATION_LOCK})");
            postgres
                .batch_execute(&lock)
                .map_err(|source| StoreError::Unusable {
                    db: shown.to_owned(),
                    source,
                })?;
            let migrated = migrate_with(postgres, POSTGRES_MIGRATIONS, shown);
            let unlock = format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})");
            postgres
                .batch_execute(&unlock)
                .map_err(|source| StoreError::Unusable {
                    db: shown.to_owned(),
                    source,
                })?;
            migrated
        }
    }
}

fn migrate_with<C>(
    conn: &mut C,
    migrations: EmbeddedMigrations,
    shown: &str,
) -> Result<(), StoreError>
where
    C: MigrationHarness<C::Backend> + Connection,
    EmbeddedMigrations: MigrationSource<C::Backend>,
{
    let migration_error = |reason: String| StoreError::Migration {
        db: shown.to_owned(),
        reason,
    };
    let known: BTreeSet<String> = MigrationSource::<C::Backend>::migrations(&migrations)
        .map_err(|e| migration_error(e.to_string()))?
        .iter()
        .map(|migration| migration.name().version().to_string())
        .collect();
    let unknown: Vec<String> = conn
        .applied_migrations()
        .map_err(|e| migration_error(e.to_string()))?
        .into_iter()
        .map(|version| version.to_string())
        .filter(|version| !known.contains(version))
        .collect();
    if !unknown.is_empty() {
        return Err(StoreError::UnknownSchema {
            db: shown.to_owned(),
            versions: unknown,
        });
    }
    conn.run_pending_migrations(migrations)
        .map_err(|e| migration_error(e.to_string()))?;
    Ok(())
}
