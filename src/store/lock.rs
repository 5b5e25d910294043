//! The coordinator's exclusive claim on its database: an OS lock (`flock`)
//! on a lock file beside it, `<db>.lock`, held for the whole life of the
//! process.
//!
//! Invariants: while a coordinator runs, no second coordinator can use its
//! database; the kernel releases the lock when the process ends, however it
//! ends, so a lock file left by a killed coordinator never blocks a restart.
//! The lock file is never deleted: deleting it would let a starting
//! coordinator lock a new file while an older one still held the old.
//!
//! The lock file records the holder's pid and listen address, so a refused
//! coordinator can say which process holds the database.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{StoreError, file};

/// Held until dropped; the lock is released with it, or by the kernel when
/// the process dies.
#[derive(Debug)]
pub struct DatabaseLock {
    _file: Flock<File>,
}

impl DatabaseLock {
    /// Takes the lock on the database at `db` for a coordinator listening on
    /// `address`, or says which process holds it.
    pub async fn acquire(db: &Path, address: SocketAddr) -> Result<Self, StoreError> {
        let db = db.to_owned();
        tokio::task::spawn_blocking(move || Self::acquire_blocking(&db, address)).await?
    }

    fn acquire_blocking(db: &Path, address: SocketAddr) -> Result<Self, StoreError> {
        file::check_directory(db)?;
        // Through a symbolic link, the lock sits beside the database itself,
        // so that every path to one database takes the same lock.
        let path = lock_path(&std::fs::canonicalize(db).unwrap_or_else(|_| db.to_owned()));
        let lock_error = |source| StoreError::Lock {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_error)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(StoreError::Locked {
                    db: db.to_owned(),
                    holder: read_holder(&mut file),
                });
            }
            Err((_, errno)) => return Err(lock_error(errno.into())),
        };
        locked.set_len(0).map_err(lock_error)?;
        locked.rewind().map_err(lock_error)?;
        let holder = Holder {
            pid: std::process::id(),
            address: address.to_string(),
        };
        locked
            .write_all(holder.to_line().as_bytes())
            .map_err(lock_error)?;
        Ok(Self { _file: locked })
    }
}

/// The lock file of the database at `db`.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The process that holds a database, as its lock file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub address: String,
}

impl Holder {
    fn to_line(&self) -> String {
        format!("pid={} address={}\n", self.pid, self.address)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut pid = None;
        let mut address = None;
        for field in text.split_whitespace() {
            match field.split_once('=') {
                Some(("pid", value)) => pid = value.parse().ok(),
                Some(("address", value)) => address = Some(value.to_owned()),
                _ => {}
            }
        }
        Some(Self {
            pid: pid?,
            address: address?,
        })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}, listening on {}", self.pid, self.address)
    }
}

/// The holder recorded in a lock file another process has locked. The holder
/// writes its line just after locking, so a reader that comes in between
/// finds the file empty and looks again, briefly.
fn read_holder(file: &mut File) -> Option<Holder> {
    const ATTEMPTS: usize = 20;
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(10);
    for _ in 0..ATTEMPTS {
        let mut text = String::new();
        if file.rewind().is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Some(holder) = Holder::parse(&text)
        {
            return Some(holder);
        }
        std::thread::sleep(PAUSE);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> SocketAddr {
        "127.0.0.1:7700".parse().unwrap()
    }

    #[tokio::test]
    async fn a_second_claim_names_the_holder_and_a_released_one_can_be_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("muster.db");
        let held = DatabaseLock::acquire(&db, address()).await.unwrap();

        let refused = DatabaseLock::acquire(&db, "127.0.0.1:7800".parse().unwrap())
            .await
            .unwrap_err();
        let StoreError::Locked { holder, .. } = &refused else {
            panic!("{refused}")
        };
        assert_eq!(
            holder.as_ref(),
            Some(&Holder {
                pid: std::process::id(),
                address: "127.0.0.1:7700".to_owned()
            })
        );
        let message = refused.to_string();
        assert!(message.contains(&db.display().to_string()), "{message}");
        assert!(message.contains("127.0.0.1:7700"), "{message}");

        drop(held);
        DatabaseLock::acquire(&db, address()).await.unwrap();
        assert!(lock_path(&db).exists(), "the lock file is kept");
    }

    #[tokio::test]
    async fn a_database_reached_through_a_symbolic_link_takes_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("muster.db");
        std::fs::write(&db, b"SQLite format 3\0").unwrap();
        let link = dir.path().join("current.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        let _held = DatabaseLock::acquire(&db, address()).await.unwrap();
        let refused = DatabaseLock::acquire(&link, address()).await.unwrap_err();
        assert!(matches!(refused, StoreError::Locked { .. }), "{refused}");
        assert!(refused.to_string().contains("current.db"), "{refused}");
    }

    #[test]
    fn a_holder_line_round_trips_and_garbage_is_no_holder() {
        let holder = Holder {
            pid: 42,
            address: "[::1]:7700".to_owned(),
        };
        assert_eq!(Holder::parse(&holder.to_line()), Some(holder));
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("pid=x address=y"), None);
    }
}
