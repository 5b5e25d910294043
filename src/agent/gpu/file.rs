//! `--gpu-source file:PATH`: GPUs listed in a JSON file, for tests,
//! simulated fleets and hardware NVML cannot see. The file is read again
//! whenever its modification time or size changes.
//!
//! The format is a list of objects:
//! `[{"index": 0, "uuid": "GPU-…", "name": "…", "memory_total_mib": 81920, "memory_used_mib": 0}]`,
//! each optionally with `utilization_percent`, `temperature_celsius`,
//! `healthy` (true unless given) and `unhealthy_reason`. Unknown keys are
//! refused, so a misspelt one is not silently ignored.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use tracing::info;

use super::GpuSource;
use crate::node::Gpu;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuEntry {
    index: u32,
    uuid: String,
    name: String,
    memory_total_mib: u64,
    memory_used_mib: u64,
    #[serde(default)]
    utilization_percent: u32,
    #[serde(default)]
    temperature_celsius: i32,
    #[serde(default = "healthy")]
    healthy: bool,
    #[serde(default)]
    unhealthy_reason: String,
}

fn healthy() -> bool {
    true
}

/// The GPUs a GPU file lists, or what is wrong with it (with its line and
/// column). The rules of [`crate::node::GpuInventory`] are checked by the
/// caller.
pub fn parse_gpu_file(text: &str) -> Result<Vec<Gpu>, String> {
    let entries: Vec<GpuEntry> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(entries
        .into_iter()
        .map(|entry| Gpu {
            index: entry.index,
            uuid: entry.uuid,
            name: entry.name,
            memory_total_mib: entry.memory_total_mib,
            memory_used_mib: entry.memory_used_mib,
            utilization_percent: entry.utilization_percent,
            temperature_celsius: entry.temperature_celsius,
            unhealthy: (!entry.healthy).then(|| {
                if entry.unhealthy_reason.is_empty() {
                    "marked unhealthy in the GPU file".to_owned()
                } else {
                    entry.unhealthy_reason
                }
            }),
        })
        .collect())
}

pub(super) struct FileSource {
    path: PathBuf,
    /// Modification time and size of the file when last read.
    read_as: Option<(SystemTime, u64)>,
}

impl FileSource {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            read_as: None,
        }
    }
}

impl GpuSource for FileSource {
    fn read(&mut self) -> Result<Option<Vec<Gpu>>, String> {
        let metadata = std::fs::metadata(&self.path).map_err(|e| e.to_string())?;
        let stamp = (
            metadata.modified().map_err(|e| e.to_string())?,
            metadata.len(),
        );
        if self.read_as == Some(stamp) {
            return Ok(None);
        }
        let first = self.read_as.is_none();
        // Taken before reading: a file that changes while it is read is read
        // again on the next round.
        self.read_as = Some(stamp);
        let text = std::fs::read_to_string(&self.path).map_err(|e| e.to_string())?;
        if !first {
            info!(path = %self.path.display(), "the GPU file changed; read it again");
        }
        parse_gpu_file(&text).map(Some)
    }

    fn wait(&mut self, interval: Duration) {
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_shape_parses_with_optional_fields_defaulted() {
        let gpus = parse_gpu_file(
            r#"[{"index": 0, "uuid": "GPU-a", "name": "A100-80G",
                 "memory_total_mib": 81920, "memory_used_mib": 0},
                {"index": 1, "uuid": "GPU-b", "name": "A100-80G",
                 "memory_total_mib": 81920, "memory_used_mib": 512,
                 "utilization_percent": 61, "temperature_celsius": 55,
                 "healthy": false, "unhealthy_reason": "critical Xid 79"}]"#,
        )
        .unwrap();
        assert_eq!(gpus.len(), 2);
        assert!(gpus[0].is_healthy());
        assert_eq!(gpus[0].utilization_percent, 0);
        assert_eq!(gpus[1].unhealthy.as_deref(), Some("critical Xid 79"));
        assert_eq!(gpus[1].temperature_celsius, 55);
        assert_eq!(parse_gpu_file("[]").unwrap(), Vec::new());
        let unexplained = parse_gpu_file(
            r#"[{"index": 0, "uuid": "GPU-a", "name": "x", "memory_total_mib": 1,
                 "memory_used_mib": 0, "healthy": false}]"#,
        )
        .unwrap();
        assert!(unexplained[0].unhealthy.is_some());
    }

    #[test]
    fn a_malformed_file_is_explained_with_its_position() {
        for (text, expected) in [
            ("{", "line 1"),
            (r#"{"index": 0}"#, "expected a sequence"),
            (r#"[{"index": 0, "name": "x"}]"#, "missing field"),
            (
                r#"[{"index": 0, "uuid": "u", "name": "x", "memory_total_mib": 1,
                     "memory_used_mib": 0, "memory_free_mib": 1}]"#,
                "unknown field `memory_free_mib`",
            ),
            (
                r#"[{"index": -1, "uuid": "u", "name": "x", "memory_total_mib": 1, "memory_used_mib": 0}]"#,
                "invalid value",
            ),
        ] {
            let problem = parse_gpu_file(text).unwrap_err();
            assert!(problem.contains(expected), "{text}: {problem}");
            assert!(!problem.contains('\n'), "{problem}");
        }
    }

    #[test]
    fn the_file_is_read_again_only_once_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.json");
        let one = r#"[{"index": 0, "uuid": "GPU-a", "name": "x", "memory_total_mib": 100, "memory_used_mib": 0}]"#;
        std::fs::write(&path, one).unwrap();
        let mut source = FileSource::new(path.clone());
        assert_eq!(source.read().unwrap().unwrap().len(), 1);
        assert_eq!(source.read().unwrap(), None);
        std::fs::write(&path, "[]").unwrap();
        assert_eq!(source.read().unwrap(), Some(Vec::new()));
        std::fs::write(&path, "[").unwrap();
        assert!(source.read().is_err());
        assert_eq!(
            source.read().unwrap(),
            None,
            "a broken file is not re-parsed"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(source.read().is_err());
    }
}
