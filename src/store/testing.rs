//! Databases for the store's tests: a SQLite file, and a PostgreSQL
//! database on a server of its own where PostgreSQL is installed (skipped
//! with one line otherwise, a failure under `CI=true`).

use super::Store;
pub(crate) use super::test_postgres::Postgres;
use crate::config::Database;

/// A database, and what keeps it alive: its directory or its server.
pub(crate) struct TestDb {
    pub(crate) db: Database,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Postgres>,
}

impl TestDb {
    /// The PostgreSQL server, for outages.
    pub(crate) fn server(&self) -> Option<&Postgres> {
        self._server.as_ref()
    }

    /// The backend, for assertion messages.
    pub(crate) fn name(&self) -> &'static str {
        match self.db {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    pub(crate) async fn open(&self) -> Store {
        Store::open(self.db.clone()).await.unwrap()
    }
}

/// A PostgreSQL database on a server of its own; `None` (skipped, or a
/// failure under `CI=true`) where PostgreSQL is not installed.
pub(crate) fn postgres(what: &str) -> Option<TestDb> {
    let server = Postgres::start(what)?;
    Some(TestDb {
        db: Database::parse(&server.create_database()).unwrap(),
        _dir: None,
        _server: Some(server),
    })
}

/// One database of each backend the machine has, for `what`.
pub(crate) fn each_backend(what: &str) -> Vec<TestDb> {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![TestDb {
        db: Database::Sqlite(dir.path().join("muster.db")),
        _dir: Some(dir),
        _server: None,
    }];
    all.extend(postgres(what));
    all
}

/// A second database on the server of `other`, or in a directory of its
/// own for SQLite.
pub(crate) fn another(other: &TestDb) -> TestDb {
    match &other._server {
        Some(server) => TestDb {
            db: Database::parse(&server.create_database()).unwrap(),
            _dir: None,
            _server: None,
        },
        None => {
            let dir = tempfile::tempdir().unwrap();
            TestDb {
                db: Database::Sqlite(dir.path().join("other.db")),
                _dir: Some(dir),
                _server: None,
            }
        }
    }
}
