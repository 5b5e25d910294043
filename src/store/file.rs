//! The database file itself, apart from what SQLite keeps in it.
//!
//! Invariants: a database is created only where no file exists, nor the
//! journal of a deleted one, and its creation is logged; an empty file is
//! never taken for a database. While
//! the coordinator runs, it writes only while the file it opened is still
//! the file at its path: once it has been deleted, moved away or replaced,
//! every write is refused, so no write is acknowledged into a file that
//! will vanish. Writes resume if the same file is put back.
//!
//! SQLite creates the side files of a database in WAL mode (`-wal`, `-shm`)
//! with the database file's mode at the time. A database made read-only and
//! then writable again can leave them read-only, and SQLite then refuses
//! every write ("attempt to write a readonly database") for as long as they
//! stay so. The coordinator owns those files: while the database file is
//! writable, a side file it cannot write is given the database file's mode
//! again, and logged; one it may not change names itself, and its mode, as
//! the cause of the outage.

use std::{
    fs::File,
    io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use nix::unistd::{AccessFlags, access};
use tracing::{error, info, warn};

use super::StoreError;

/// The files SQLite keeps beside a database in WAL mode.
const SIDE_FILES: [&str; 2] = ["-wal", "-shm"];

/// `db` with `suffix` appended to its file name.
fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut path = db.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// What start-up found at the database's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Found {
    Existing,
    /// Nothing: the database is to be created.
    Nothing,
}

/// Checks that the directory the database lives in exists.
pub(super) fn check_directory(db: &Path) -> Result<(), StoreError> {
    let directory = match db.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match std::fs::metadata(directory) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => Err(StoreError::NoDirectory {
            path: db.to_owned(),
            directory: directory.to_owned(),
            reason: "is not a directory",
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(StoreError::NoDirectory {
            path: db.to_owned(),
            directory: directory.to_owned(),
            reason: "does not exist",
        }),
        Err(source) => Err(StoreError::Inspect {
            path: directory.to_owned(),
            source,
        }),
    }
}

/// Looks at the database's path before SQLite opens it. An empty file is
/// refused: SQLite would take it for a new database and start afresh where
/// a database was expected.
pub(super) fn inspect(db: &Path) -> Result<Found, StoreError> {
    check_directory(db)?;
    match std::fs::metadata(db) {
        Ok(metadata) if metadata.is_file() && metadata.len() == 0 => Err(StoreError::EmptyFile {
            path: db.to_owned(),
        }),
        Ok(_) => Ok(Found::Existing),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            refuse_orphaned_journal(db)?;
            warn!("creating a new database at {}", db.display());
            Ok(Found::Nothing)
        }
        Err(source) => Err(StoreError::Inspect {
            path: db.to_owned(),
            source,
        }),
    }
}

/// Refuses to create a database beside the journal of one that was deleted
/// or moved without it: SQLite would replay that journal into the new file.
fn refuse_orphaned_journal(db: &Path) -> Result<(), StoreError> {
    for suffix in ["-wal", "-journal"] {
        let journal = beside(db, suffix);
        match std::fs::metadata(&journal) {
            Ok(metadata) if metadata.len() > 0 => {
                return Err(StoreError::OrphanedJournal {
                    path: db.to_owned(),
                    journal,
                });
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Inspect {
                    path: journal,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The database file as the coordinator opened it, kept open so that its
/// identity can be compared with whatever is at its path now.
#[derive(Debug)]
pub(super) struct DatabaseFile {
    path: PathBuf,
    file: File,
    device: u64,
    inode: u64,
    /// Whether the last check found the file gone; the change is logged
    /// once each way.
    gone: AtomicBool,
}

impl DatabaseFile {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let inspect_error = |source| StoreError::Inspect {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(inspect_error)?;
        let metadata = file.metadata().map_err(inspect_error)?;
        metrics::gauge!("muster_store_database_gone").set(0.0);
        Ok(Self {
            path: path.to_owned(),
            file,
            device: metadata.dev(),
            inode: metadata.ino(),
            gone: AtomicBool::new(false),
        })
    }

    /// Fails if the opened file is no longer the file at its path. Called
    /// before a write transaction and again before it is acknowledged.
    pub(super) fn ensure_in_place(&self) -> Result<(), StoreError> {
        match self.whereabouts() {
            None => {
                if self.gone.swap(false, Ordering::Relaxed) {
                    metrics::gauge!("muster_store_database_gone").set(0.0);
                    info!(db = %self.path.display(), "the database file is back at its path; writes resume");
                }
                Ok(())
            }
            Some(what) => {
                let error = StoreError::Gone {
                    path: self.path.clone(),
                    what,
                };
                if !self.gone.swap(true, Ordering::Relaxed) {
                    metrics::gauge!("muster_store_database_gone").set(1.0);
                    error!(db = %self.path.display(), "{error}");
                }
                Err(error)
            }
        }
    }

    /// Where SQLite keeps the database's write-ahead log.
    pub(super) fn wal_path(&self) -> PathBuf {
        beside(&self.path, "-wal")
    }

    /// Gives a side file (`-wal`, `-shm`) that this process cannot write the
    /// database file's mode again, while the database file itself is
    /// writable; fails, naming the side file and its mode, where that is not
    /// allowed (a file of another owner) or does not help. While the
    /// database file itself is not writable, its own mode is the cause, and
    /// the side files are left alone.
    pub(super) fn repair_side_files(&self) -> Result<(), StoreError> {
        let Ok(database) = std::fs::metadata(&self.path) else {
            return Ok(());
        };
        if access(&self.path, AccessFlags::W_OK).is_err() {
            return Ok(());
        }
        let database_mode = database.mode() & 0o7777;
        for suffix in SIDE_FILES {
            let side = beside(&self.path, suffix);
            let Ok(metadata) = std::fs::metadata(&side) else {
                continue;
            };
            if access(&side, AccessFlags::W_OK).is_ok() {
                continue;
            }
            let mode = metadata.mode() & 0o7777;
            let unwritable = |reason: String| StoreError::SideFileUnwritable {
                side: side.clone(),
                mode,
                db: self.path.clone(),
                db_mode: database_mode,
                reason,
            };
            std::fs::set_permissions(&side, std::fs::Permissions::from_mode(database_mode))
                .map_err(|error| unwritable(format!("its mode cannot be changed ({error})")))?;
            if access(&side, AccessFlags::W_OK).is_err() {
                return Err(unwritable(format!(
                    "it stays unwritable with mode {database_mode:04o}"
                )));
            }
            info!(
                side = %side.display(),
                from = %format!("{mode:04o}"),
                to = %format!("{database_mode:04o}"),
                "gave the database's side file the database file's mode again: SQLite created it while the database was read-only"
            );
        }
        Ok(())
    }

    /// What happened to the file, if it is no longer at its path.
    fn whereabouts(&self) -> Option<String> {
        let unlinked = self.file.metadata().is_ok_and(|m| m.nlink() == 0);
        match std::fs::metadata(&self.path) {
            Ok(now) if now.dev() == self.device && now.ino() == self.inode => None,
            Ok(_) if unlinked => Some("was deleted and another file put in its place".to_owned()),
            Ok(_) => Some("was replaced by another file".to_owned()),
            Err(error) if error.kind() == io::ErrorKind::NotFound && unlinked => {
                Some("was deleted".to_owned())
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Some("was moved away".to_owned())
            }
            Err(error) => Some(format!("cannot be checked ({error})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_told_apart_from_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("muster.db");
        assert_eq!(inspect(&db).unwrap(), Found::Nothing);
        std::fs::write(&db, b"").unwrap();
        assert!(matches!(inspect(&db), Err(StoreError::EmptyFile { .. })));
        std::fs::write(&db, b"SQLite format 3\0").unwrap();
        assert_eq!(inspect(&db).unwrap(), Found::Existing);
        let missing = dir.path().join("absent/muster.db");
        let refused = inspect(&missing).unwrap_err();
        assert!(
            refused.to_string().ends_with("absent does not exist"),
            "{refused}"
        );
        assert!(check_directory(Path::new("muster.db")).is_ok());

        std::fs::remove_file(&db).unwrap();
        std::fs::write(dir.path().join("muster.db-wal"), b"frames").unwrap();
        let orphaned = inspect(&db).unwrap_err().to_string();
        assert!(orphaned.contains("muster.db-wal"), "{orphaned}");
    }

    #[test]
    fn a_deleted_moved_or_replaced_file_is_seen_and_a_restored_one_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("muster.db");
        let aside = dir.path().join("aside.db");
        std::fs::write(&db, b"data").unwrap();
        let file = DatabaseFile::open(&db).unwrap();
        file.ensure_in_place().unwrap();

        std::fs::rename(&db, &aside).unwrap();
        let moved = file.ensure_in_place().unwrap_err().to_string();
        assert!(moved.contains("was moved away"), "{moved}");
        std::fs::rename(&aside, &db).unwrap();
        file.ensure_in_place().unwrap();

        std::fs::write(&aside, b"other").unwrap();
        std::fs::rename(&aside, &db).unwrap();
        let replaced = file.ensure_in_place().unwrap_err().to_string();
        assert!(replaced.contains("another file"), "{replaced}");

        std::fs::remove_file(&db).unwrap();
        let deleted = file.ensure_in_place().unwrap_err().to_string();
        assert!(deleted.contains("was deleted"), "{deleted}");
        assert!(deleted.contains(&db.display().to_string()), "{deleted}");
    }

    #[test]
    fn side_files_get_the_database_files_mode_once_it_is_writable() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("muster.db");
        std::fs::write(&db, b"data").unwrap();
        let file = DatabaseFile::open(&db).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o7777;
        let set = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let wal = beside(&db, "-wal");
        let shm = beside(&db, "-shm");
        std::fs::write(&wal, b"frames").unwrap();
        std::fs::write(&shm, b"index").unwrap();
        set(&db, 0o640);
        set(&wal, 0o444);
        set(&shm, 0o444);
        let writable = access(&wal, AccessFlags::W_OK).is_ok();
        file.repair_side_files().unwrap();
        if writable {
            // As root, a 0444 file is writable and is left as it is.
            assert_eq!(mode(&wal), 0o444);
            return;
        }
        assert_eq!(mode(&wal), 0o640);
        assert_eq!(mode(&shm), 0o640);

        set(&db, 0o444);
        set(&wal, 0o444);
        file.repair_side_files().unwrap();
        assert_eq!(
            mode(&wal),
            0o444,
            "left alone while the database is read-only"
        );
    }
}
