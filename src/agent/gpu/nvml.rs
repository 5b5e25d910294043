//! `--gpu-source nvml`: the GPUs as the NVIDIA driver's management library
//! sees them. `libnvidia-ml.so.1` is loaded when the source is opened, not
//! linked, so the same binary runs on machines without a driver.
//!
//! Health: a GPU becomes unhealthy after a critical Xid event, and stays so
//! until the agent restarts, as the driver itself wants a reset after one.
//! Xids that applications cause (13, 31, 43, 45, 68, 109: faults of a
//! program, not of the card) are logged but leave the GPU healthy, as in
//! the container orchestrators' NVIDIA device plugin. A GPU the driver
//! reports lost is kept in the inventory as unhealthy. Where the driver
//! cannot deliver events (some GPUs cannot), health is not tracked, which
//! is logged once at start-up.

use std::{collections::BTreeMap, time::Duration};

use nvml_wrapper::{
    EventSet, Nvml, bitmasks::event::EventTypes, enum_wrappers::device::TemperatureSensor,
    enums::event::XidError, error::NvmlError,
};
use tracing::{info, warn};

use super::GpuSource;
use crate::node::Gpu;

/// Xids caused by applications rather than by the GPU.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];
const MIB: u64 = 1024 * 1024;

pub(super) struct NvmlSource {
    /// Leaked on purpose: event sets and devices borrow the library handle,
    /// and an agent opens NVML once and keeps it until it exits.
    nvml: &'static Nvml,
    events: Option<EventSet<'static>>,
    /// Why each GPU, by uuid, is unhealthy.
    unhealthy: BTreeMap<String, String>,
    /// The previous reading, so a GPU that is lost keeps its identity.
    last: Vec<Gpu>,
}

impl NvmlSource {
    pub(super) fn open() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|error| format!("NVML cannot be loaded: {error}"))?;
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let events = match watch_critical_xids(nvml) {
            Ok(events) => Some(events),
            Err(error) => {
                warn!(%error, "the driver cannot report Xid events; GPU health is not tracked");
                None
            }
        };
        Ok(Self {
            nvml,
            events,
            unhealthy: BTreeMap::new(),
            last: Vec::new(),
        })
    }

    fn on_event(&mut self, event: nvml_wrapper::struct_wrappers::event::EventData<'static>) {
        if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            return;
        }
        let uuid = event
            .device
            .uuid()
            .unwrap_or_else(|_| "(unknown)".to_owned());
        let xid = match event.event_data {
            Some(XidError::Value(xid)) => Some(xid),
            Some(XidError::Unknown) | None => None,
        };
        match unhealthy_after(xid) {
            Some(reason) => {
                warn!(%uuid, %reason, "the GPU is unhealthy until the agent restarts");
                self.unhealthy.insert(uuid, reason);
            }
            None => info!(%uuid, ?xid, "an application caused an Xid error; the GPU stays healthy"),
        }
    }

    fn read_gpu(&self, index: u32) -> Result<Gpu, NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        let uuid = device.uuid()?;
        let memory = device.memory_info()?;
        let total = memory.total / MIB;
        let utilization = optional(device.utilization_rates())?.map_or(0, |rates| rates.gpu);
        let temperature = optional(device.temperature(TemperatureSensor::Gpu))?.unwrap_or(0);
        Ok(Gpu {
            index,
            name: device.name()?,
            memory_total_mib: total,
            memory_used_mib: (memory.used / MIB).min(total),
            utilization_percent: utilization.min(100),
            temperature_celsius: i32::try_from(temperature).unwrap_or(i32::MAX),
            unhealthy: self.unhealthy.get(&uuid).cloned(),
            uuid,
        })
    }
}

/// Why a critical Xid event makes its GPU unhealthy; `None` for one an
/// application caused. An event without its Xid counts against the GPU.
fn unhealthy_after(xid: Option<u64>) -> Option<String> {
    match xid {
        Some(xid) if APPLICATION_XIDS.contains(&xid) => None,
        Some(xid) => Some(format!("critical Xid {xid}")),
        None => Some("critical Xid error".to_owned()),
    }
}

/// A set that wakes on critical Xid errors of every GPU.
fn watch_critical_xids(nvml: &'static Nvml) -> Result<EventSet<'static>, String> {
    let mut set = nvml.create_event_set().map_err(|e| e.to_string())?;
    for index in 0..nvml.device_count().map_err(|e| e.to_string())? {
        let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| format!("GPU {index}: {e}"))?;
    }
    Ok(set)
}

/// A reading some GPUs do not support, as `None`.
fn optional<T>(reading: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match reading {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(error) => Err(error),
    }
}

impl GpuSource for NvmlSource {
    fn read(&mut self) -> Result<Option<Vec<Gpu>>, String> {
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            match self.read_gpu(index) {
                Ok(gpu) => gpus.push(gpu),
                Err(NvmlError::GpuLost) => {
                    let Some(known) = self.last.iter().find(|gpu| gpu.index == index) else {
                        return Err(format!("GPU {index} is lost"));
                    };
                    let reason = "the GPU has fallen off the bus".to_owned();
                    self.unhealthy.insert(known.uuid.clone(), reason.clone());
                    gpus.push(Gpu {
                        unhealthy: Some(reason),
                        ..known.clone()
                    });
                }
                Err(error) => return Err(format!("GPU {index}: {error}")),
            }
        }
        self.last.clone_from(&gpus);
        Ok(Some(gpus))
    }

    fn wait(&mut self, interval: Duration) {
        let Some(events) = &self.events else {
            std::thread::sleep(interval);
            return;
        };
        let timeout_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        match events.wait(timeout_ms) {
            Ok(event) => self.on_event(event),
            Err(NvmlError::Timeout) => {}
            Err(error) => {
                warn!(%error, "waiting for Xid events failed; GPU health is no longer tracked");
                self.events = None;
                std::thread::sleep(interval);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xids_of_the_hardware_make_a_gpu_unhealthy_and_those_of_applications_do_not() {
        assert_eq!(
            unhealthy_after(Some(79)).as_deref(),
            Some("critical Xid 79")
        );
        assert_eq!(
            unhealthy_after(Some(48)).as_deref(),
            Some("critical Xid 48")
        );
        assert!(unhealthy_after(None).is_some());
        for application in APPLICATION_XIDS {
            assert_eq!(
                unhealthy_after(Some(application)),
                None,
                "Xid {application}"
            );
        }
    }
}
