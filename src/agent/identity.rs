//! The agent's identity on disk: its node id and its node secret, kept in
//! the state directory so that they survive restarts of the agent and changes
//! of the host name.
//!
//! The secret is created once, readable by its owner alone (mode 0600), and
//! never replaced, not even by a concurrent first start: a new secret would
//! lock the node out of its own id. A secret file that others may read is
//! refused, as ssh refuses such keys.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::{auth::NodeSecret, error::RunError, node::NodeId};

const NODE_ID_FILE: &str = "node_id";
const NODE_SECRET_FILE: &str = "node_secret";
const SECRET_MODE: u32 = 0o600;

/// Reads the node secret kept in `state_dir`, creating it on first use.
pub async fn resolve_node_secret(state_dir: &Path) -> Result<NodeSecret, RunError> {
    let path = state_dir.join(NODE_SECRET_FILE);
    let state_error = |source: io::Error| RunError::StateDir {
        path: path.clone(),
        source,
    };
    match tokio::fs::metadata(&path).await {
        Ok(metadata) => {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(state_error(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the node secret is readable by others (mode {mode:o}); run `chmod 600` on it"
                    ),
                )));
            }
            let kept = tokio::fs::read_to_string(&path)
                .await
                .map_err(state_error)?;
            return Ok(NodeSecret::parse("node_secret file", kept.trim())?);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(state_error(e)),
    }
    let published = publish_once(
        state_dir,
        &path,
        NodeSecret::generate().expose(),
        SECRET_MODE,
    )
    .await
    .map_err(state_error)?;
    Ok(NodeSecret::parse("node_secret file", &published)?)
}

/// Picks the node id: the flag if given; otherwise the id kept in
/// `state_dir`; otherwise the host name, which is then kept.
pub async fn resolve_node_id(
    flag: Option<&str>,
    state_dir: &Path,
    hostname: &str,
) -> Result<NodeId, RunError> {
    if let Some(flag) = flag {
        return Ok(NodeId::parse("--node-id", flag)?);
    }
    let path = state_dir.join(NODE_ID_FILE);
    let state_error = |source: io::Error| RunError::StateDir {
        path: path.clone(),
        source,
    };
    match tokio::fs::read_to_string(&path).await {
        Ok(kept) => return Ok(NodeId::parse("node_id file", kept.trim())?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(state_error(e)),
    }
    let node_id = NodeId::from_hostname(hostname)?;
    let published = publish_once(state_dir, &path, node_id.as_str(), 0o644)
        .await
        .map_err(state_error)?;
    Ok(NodeId::parse("node_id file", &published)?)
}

/// Publishes `contents` at `path` unless a file is already there, and
/// returns what `path` holds afterwards: ours, or what another process
/// published first. The contents go to a uniquely named temporary file of
/// `mode`, synced, then linked into place (a link never replaces a file) and
/// the directory synced, so neither a crash nor a concurrent start leaves a
/// half-written identity or swaps one identity for another.
async fn publish_once(dir: &Path, path: &Path, contents: &str, mode: u32) -> io::Result<String> {
    let (dir, path, contents) = (dir.to_owned(), path.to_owned(), contents.to_owned());
    tokio::task::spawn_blocking(move || publish_once_blocking(&dir, &path, &contents, mode))
        .await
        .map_err(io::Error::other)?
}

fn publish_once_blocking(dir: &Path, path: &Path, contents: &str, mode: u32) -> io::Result<String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};

    std::fs::create_dir_all(dir)?;
    let temporary: PathBuf = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)?;
        file.write_all(format!("{contents}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&temporary, path)
    })();
    let _ = std::fs::remove_file(&temporary);
    match written {
        Ok(()) => {
            std::fs::File::open(dir)?.sync_all()?;
            Ok(contents.to_owned())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path)?.trim().to_owned())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hostname_is_kept_and_then_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = resolve_node_id(None, &state, "Lab-GPU-1").await.unwrap();
        assert_eq!(first.as_str(), "lab-gpu-1");
        let after_rename = resolve_node_id(None, &state, "renamed").await.unwrap();
        assert_eq!(after_rename, first);
    }

    #[tokio::test]
    async fn the_flag_wins_and_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let id = resolve_node_id(Some("gpu-7"), dir.path(), "host")
            .await
            .unwrap();
        assert_eq!(id.as_str(), "gpu-7");
        assert!(matches!(
            resolve_node_id(Some("Bad Id"), dir.path(), "host").await,
            Err(RunError::Config(_))
        ));
    }

    #[tokio::test]
    async fn the_secret_is_created_once_private_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = resolve_node_secret(&state).await.unwrap();
        let path = state.join(NODE_SECRET_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SECRET_MODE);
        assert_eq!(resolve_node_secret(&state).await.unwrap(), first);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve_node_secret(&state).await.unwrap_err();
        assert!(err.to_string().contains("node_secret"), "{err}");
        assert!(
            crate::error::display_chain(&err).contains("chmod 600"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn concurrent_first_starts_agree_on_one_secret() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let starts = (0..8).map(|_| resolve_node_secret(&state));
        let secrets: Vec<_> = futures::future::join_all(starts)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(secrets.iter().all(|s| *s == secrets[0]));
        let on_disk = std::fs::read_to_string(state.join(NODE_SECRET_FILE)).unwrap();
        assert_eq!(on_disk.trim(), secrets[0].expose());
        let leftovers = std::fs::read_dir(&state).unwrap().count();
        assert_eq!(leftovers, 1, "temporary files are cleaned up");
    }

    #[tokio::test]
    async fn an_unusable_state_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = resolve_node_id(None, &file.join("sub"), "host")
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::StateDir { .. }), "{err}");
    }
}
