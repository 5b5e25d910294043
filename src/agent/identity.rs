//! The agent's identity on disk: its node id, kept in the state directory so
//! that it survives restarts of the agent and changes of the host name.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::{error::RunError, node::NodeId};

const NODE_ID_FILE: &str = "node_id";

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
    write_atomically(state_dir, &path, node_id.as_str())
        .await
        .map_err(state_error)?;
    Ok(node_id)
}

/// Writes `contents` to a temporary file beside `path`, then renames it, so a
/// crash never leaves a half-written identity.
async fn write_atomically(dir: &Path, path: &Path, contents: &str) -> io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let temporary: PathBuf = path.with_extension("tmp");
    tokio::fs::write(&temporary, format!("{contents}\n")).await?;
    tokio::fs::rename(&temporary, path).await
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
