//! A node's GPUs, as its agent last reported them.
//!
//! Invariants: a [`GpuInventory`] holds at most [`MAX_GPUS`] GPUs, ordered by
//! index, with distinct indexes and distinct uuids; every text field is
//! bounded and free of control characters (it reaches logs and terminals);
//! no GPU uses more memory than it has. Input that breaks a rule is refused
//! with an error naming the field and the GPU, never clamped: a GPU source
//! that reports more used than total memory is broken, and hiding that would
//! hand out memory that is not there.

use std::{collections::BTreeSet, sync::Arc};

use crate::validation::InvalidInput;

/// GPUs one node may report. The largest machines today hold 16.
pub const MAX_GPUS: usize = 64;
pub const MAX_GPU_UUID_LEN: usize = 128;
pub const MAX_GPU_NAME_LEN: usize = 128;
pub const MAX_UNHEALTHY_REASON_LEN: usize = 256;
/// 16 TiB: far above any GPU, low enough that sums over a fleet cannot
/// overflow.
pub const MAX_GPU_MEMORY_MIB: u64 = 1 << 24;
const TEMPERATURE_RANGE: std::ops::RangeInclusive<i32> = -100..=250;

/// One GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub utilization_percent: u32,
    pub temperature_celsius: i32,
    /// Why the GPU is unhealthy (a critical Xid event, say); `None` while it
    /// is healthy.
    pub unhealthy: Option<String>,
}

impl Gpu {
    pub fn is_healthy(&self) -> bool {
        self.unhealthy.is_none()
    }

    /// The share of its memory in use, 0-100.
    pub fn memory_used_percent(&self) -> u64 {
        (self.memory_used_mib * 100)
            .checked_div(self.memory_total_mib)
            .unwrap_or(0)
    }
}

/// The validated GPUs of one node, ordered by index. Cheap to clone: the
/// registry hands a copy to every reader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuInventory(Arc<[Gpu]>);

impl GpuInventory {
    /// Checks every GPU against the rules in the module doc; `field` names
    /// where the inventory came from (`register.inventory`, a file's path is
    /// given by the caller's error).
    pub fn new(field: &'static str, mut gpus: Vec<Gpu>) -> Result<Self, InvalidInput> {
        if gpus.len() > MAX_GPUS {
            return Err(InvalidInput::new(
                field,
                format!("at most {MAX_GPUS} GPUs are allowed, got {}", gpus.len()),
            ));
        }
        gpus.sort_by_key(|gpu| gpu.index);
        let mut uuids = BTreeSet::new();
        for (position, gpu) in gpus.iter().enumerate() {
            let invalid = |reason: String| {
                InvalidInput::new(
                    field,
                    format!("GPU {} ({:?}): {reason}", gpu.index, gpu.uuid),
                )
            };
            if position > 0 && gpus[position - 1].index == gpu.index {
                return Err(invalid("index is given to two GPUs".to_owned()));
            }
            check_text("uuid", &gpu.uuid, MAX_GPU_UUID_LEN).map_err(invalid)?;
            check_text("name", &gpu.name, MAX_GPU_NAME_LEN).map_err(invalid)?;
            if !uuids.insert(gpu.uuid.as_str()) {
                return Err(invalid("uuid is given to two GPUs".to_owned()));
            }
            if gpu.memory_total_mib > MAX_GPU_MEMORY_MIB {
                return Err(invalid(format!(
                    "memory_total_mib must be at most {MAX_GPU_MEMORY_MIB}, got {}",
                    gpu.memory_total_mib
                )));
            }
            if gpu.memory_used_mib > gpu.memory_total_mib {
                return Err(invalid(format!(
                    "memory_used_mib {} exceeds memory_total_mib {}",
                    gpu.memory_used_mib, gpu.memory_total_mib
                )));
            }
            if gpu.utilization_percent > 100 {
                return Err(invalid(format!(
                    "utilization_percent must be 0 to 100, got {}",
                    gpu.utilization_percent
                )));
            }
            if !TEMPERATURE_RANGE.contains(&gpu.temperature_celsius) {
                return Err(invalid(format!(
                    "temperature_celsius must be {} to {}, got {}",
                    TEMPERATURE_RANGE.start(),
                    TEMPERATURE_RANGE.end(),
                    gpu.temperature_celsius
                )));
            }
            if let Some(reason) = &gpu.unhealthy {
                check_text("unhealthy_reason", reason, MAX_UNHEALTHY_REASON_LEN)
                    .map_err(invalid)?;
            }
        }
        Ok(Self(gpus.into()))
    }

    pub fn gpus(&self) -> &[Gpu] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// 1 to `max` bytes, no control characters.
fn check_text(name: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || value.len() > max {
        return Err(format!(
            "{name} must be 1 to {max} bytes, got {}",
            value.len()
        ));
    }
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "{name} must not contain control characters, found {c:?}"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index}"),
            name: "A100-80G".to_owned(),
            memory_total_mib: 81_920,
            memory_used_mib: 1_024,
            ..Gpu::default()
        }
    }

    #[test]
    fn gpus_are_ordered_by_index() {
        let inventory = GpuInventory::new("inventory", vec![gpu(1), gpu(0)]).unwrap();
        let indexes: Vec<u32> = inventory.gpus().iter().map(|gpu| gpu.index).collect();
        assert_eq!(indexes, [0, 1]);
    }

    #[test]
    fn broken_gpus_are_refused_naming_the_gpu_and_the_rule() {
        let refused = |gpus: Vec<Gpu>| GpuInventory::new("register.inventory", gpus).unwrap_err();
        let over_used = Gpu {
            memory_used_mib: 90_000,
            ..gpu(0)
        };
        let error = refused(vec![over_used]);
        assert_eq!(error.field, "register.inventory");
        assert!(error.reason.contains("GPU 0"), "{error}");
        assert!(error.reason.contains("memory_used_mib"), "{error}");

        assert!(refused(vec![gpu(0), gpu(0)]).reason.contains("index"));
        let same_uuid = Gpu {
            uuid: "GPU-0".to_owned(),
            ..gpu(1)
        };
        assert!(refused(vec![gpu(0), same_uuid]).reason.contains("uuid"));
        for broken in [
            Gpu {
                uuid: String::new(),
                ..gpu(0)
            },
            Gpu {
                name: "x".repeat(MAX_GPU_NAME_LEN + 1),
                ..gpu(0)
            },
            Gpu {
                name: "A100\n2026-01-01 INFO forged".to_owned(),
                ..gpu(0)
            },
            Gpu {
                utilization_percent: 101,
                ..gpu(0)
            },
            Gpu {
                temperature_celsius: 1_000,
                ..gpu(0)
            },
            Gpu {
                memory_total_mib: MAX_GPU_MEMORY_MIB + 1,
                memory_used_mib: 0,
                ..gpu(0)
            },
            Gpu {
                unhealthy: Some(String::new()),
                ..gpu(0)
            },
        ] {
            refused(vec![broken]);
        }
        let too_many = (0..=MAX_GPUS as u32).map(gpu).collect();
        assert!(refused(too_many).reason.contains("at most"));
    }

    #[test]
    fn memory_used_percent_survives_a_gpu_without_memory() {
        assert_eq!(gpu(0).memory_used_percent(), 1);
        let empty = Gpu {
            memory_total_mib: 0,
            memory_used_mib: 0,
            ..gpu(0)
        };
        assert_eq!(empty.memory_used_percent(), 0);
    }
}
