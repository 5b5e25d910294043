//! The agent's exclusive hold on its state directory.
//!
//! Two agents sharing a directory share a node id and a node secret, so
//! each takes the other's registration over, again and again. An agent
//! therefore holds an exclusive `flock` on `<state-dir>/lock` for its whole
//! life, with its pid written in the file so that a second agent can name
//! the first. The kernel releases the lock when the process ends, however
//! it ends, so a crashed agent never leaves a stale lock behind.

use std::{
    fs::File,
    io::{self, Read, Seek, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::error::RunError;

const LOCK_FILE: &str = "lock";

/// Held while the agent runs; dropping it releases the directory.
#[derive(Debug)]
pub struct StateDirLock {
    _lock: Flock<File>,
}

/// Locks `state_dir` (created if missing) for this process, or says which
/// process holds it.
pub async fn lock_state_dir(state_dir: &Path) -> Result<StateDirLock, RunError> {
    let state_dir = state_dir.to_owned();
    tokio::task::spawn_blocking(move || lock_blocking(&state_dir))
        .await
        .map_err(|e| RunError::TaskFailed {
            task: "state directory lock",
            reason: e.to_string(),
        })?
}

fn lock_blocking(state_dir: &Path) -> Result<StateDirLock, RunError> {
    let path: PathBuf = state_dir.join(LOCK_FILE);
    let state_error = |source: io::Error| RunError::StateDir {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(state_error)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(state_error)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_owned(),
                pid => format!("the agent with pid {pid}"),
            };
            return Err(RunError::StateDirInUse {
                path: state_dir.to_owned(),
                holder,
            });
        }
        Err((_, errno)) => return Err(state_error(io::Error::from(errno))),
    };
    let record_pid = |file: &mut File| -> io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()
    };
    record_pid(&mut lock).map_err(state_error)?;
    Ok(StateDirLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_locked_directory_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let held = lock_state_dir(&state).await.unwrap();
        let recorded = std::fs::read_to_string(state.join(LOCK_FILE)).unwrap();
        assert_eq!(recorded.trim(), std::process::id().to_string());
        // flock locks belong to the open file, so a second open in the
        // same process conflicts just as another process would.
        let refused = lock_state_dir(&state).await.unwrap_err();
        let message = refused.to_string();
        assert!(message.contains(&state.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(held);
        lock_state_dir(&state).await.unwrap();
    }
}
