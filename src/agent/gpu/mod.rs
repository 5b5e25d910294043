//! The node's GPUs: read from a [`GpuSource`] every `--gpu-poll-interval`
//! and published to the reconnect loop as a [`GpuFeed`].
//!
//! Invariants:
//! - The feed changes only when a reading differs from what it holds past
//!   the thresholds of [`worth_reporting`], so the coordinator hears of
//!   noise-level changes never, and of a slow drift once it adds up.
//! - The reconnect loop sends the feed's inventory in every `register`, and
//!   again on the first heartbeat after the feed changed; an unchanged feed
//!   costs a heartbeat one version check.
//! - A source that fails after start-up leaves the last good inventory in
//!   the feed; the failure is logged once, and so is its end.
//! - Sources run on a thread of their own, never on the async runtime:
//!   NVML calls block. The thread is not joined (a stuck driver call must
//!   not hold up shutdown); it ends within one poll interval of the feed's
//!   last receiver going away.

mod file;
mod nvml;

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

pub use file::parse_gpu_file;

use crate::{
    config::GpuSourceSpec,
    error::RunError,
    node::{Gpu, GpuInventory},
};

/// A change of a GPU's used memory by this much or more is reported.
pub const MEMORY_THRESHOLD_MIB: u64 = 64;
/// A change of a GPU's utilisation by this many points or more is reported.
pub const UTILIZATION_THRESHOLD_POINTS: u32 = 10;

/// The latest inventory worth reporting. Its sender gone, it keeps its last
/// value.
pub type GpuFeed = watch::Receiver<GpuInventory>;

/// Somewhere GPUs can be read from.
pub trait GpuSource: Send + 'static {
    /// Reads every GPU now; `None` when nothing can have changed since the
    /// last reading (a file not modified since).
    fn read(&mut self) -> Result<Option<Vec<Gpu>>, String>;

    /// Waits until the next reading is due: `interval`, or sooner when the
    /// source has news (a critical Xid event).
    fn wait(&mut self, interval: Duration);
}

/// Opens the source `spec` names, reads it once, and keeps reading it every
/// `poll_interval` on its own thread. A source that cannot be opened or
/// read at start-up is an error, except under `auto`, where a missing
/// NVIDIA driver means no GPUs and one line in the log.
pub async fn start(spec: &GpuSourceSpec, poll_interval: Duration) -> Result<GpuFeed, RunError> {
    let opening = spec.clone();
    let opened = tokio::task::spawn_blocking(move || open(&opening))
        .await
        .map_err(|error| RunError::TaskFailed {
            task: "GPU source",
            reason: error.to_string(),
        })??;
    let Some((source, first)) = opened else {
        return Ok(watch::channel(GpuInventory::default()).1);
    };
    info!(source = %spec, gpus = first.gpus().len(), "reading GPUs");
    let (sender, feed) = watch::channel(first);
    let name = spec.to_string();
    std::thread::Builder::new()
        .name("muster-gpus".to_owned())
        .spawn(move || poll(source, &sender, poll_interval, &name))
        .map_err(|error| RunError::TaskFailed {
            task: "GPU source",
            reason: error.to_string(),
        })?;
    Ok(feed)
}

type Opened = Option<(Box<dyn GpuSource>, GpuInventory)>;

fn open(spec: &GpuSourceSpec) -> Result<Opened, RunError> {
    let failed = |problem: String| RunError::GpuSource {
        source_name: spec.to_string(),
        problem,
    };
    let mut source: Box<dyn GpuSource> = match spec {
        GpuSourceSpec::None => return Ok(None),
        GpuSourceSpec::Auto => match nvml::NvmlSource::open() {
            Ok(source) => Box::new(source),
            Err(problem) => {
                info!(%problem, "no NVIDIA driver found; reporting no GPUs");
                return Ok(None);
            }
        },
        GpuSourceSpec::Nvml => Box::new(nvml::NvmlSource::open().map_err(failed)?),
        GpuSourceSpec::File(path) => Box::new(file::FileSource::new(path.clone())),
    };
    let first = source
        .read()
        .and_then(|gpus| validated(gpus.unwrap_or_default()));
    match first {
        Ok(gpus) => Ok(Some((source, gpus))),
        Err(problem) if *spec == GpuSourceSpec::Auto => {
            info!(%problem, "NVML loaded but cannot read the GPUs; reporting no GPUs");
            Ok(None)
        }
        Err(problem) => Err(failed(problem)),
    }
}

fn validated(gpus: Vec<Gpu>) -> Result<GpuInventory, String> {
    GpuInventory::new("gpus", gpus).map_err(|invalid| invalid.reason)
}

fn poll(
    mut source: Box<dyn GpuSource>,
    feed: &watch::Sender<GpuInventory>,
    interval: Duration,
    name: &str,
) {
    let mut failing = false;
    while !feed.is_closed() {
        source.wait(interval);
        match source.read() {
            Ok(None) => {}
            Ok(Some(gpus)) => match validated(gpus) {
                Ok(gpus) => {
                    if std::mem::take(&mut failing) {
                        info!(source = %name, "the GPUs can be read again");
                    }
                    offer(feed, gpus);
                }
                Err(problem) => complain_once(&mut failing, name, &problem),
            },
            Err(problem) => complain_once(&mut failing, name, &problem),
        }
    }
}

fn complain_once(failing: &mut bool, name: &str, problem: &str) {
    if !std::mem::replace(failing, true) {
        warn!(
            source = %name,
            %problem,
            "cannot read the GPUs; reporting the last good inventory until they can be read again"
        );
    }
}

/// Puts `gpus` in the feed if they differ from it past the thresholds.
fn offer(feed: &watch::Sender<GpuInventory>, gpus: GpuInventory) {
    feed.send_if_modified(|reported| {
        let worth = worth_reporting(reported, &gpus);
        if worth {
            *reported = gpus;
        }
        worth
    });
}

/// Whether `now` differs from what was last `reported` enough to tell the
/// coordinator: a GPU added, gone or replaced (index, uuid, name or total
/// memory), used memory moved by [`MEMORY_THRESHOLD_MIB`] or more,
/// utilisation by [`UTILIZATION_THRESHOLD_POINTS`] or more, or any change of
/// health. Temperature alone is never worth a report.
pub fn worth_reporting(reported: &GpuInventory, now: &GpuInventory) -> bool {
    let (reported, now) = (reported.gpus(), now.gpus());
    reported.len() != now.len()
        || reported.iter().zip(now).any(|(was, is)| {
            was.index != is.index
                || was.uuid != is.uuid
                || was.name != is.name
                || was.memory_total_mib != is.memory_total_mib
                || was.memory_used_mib.abs_diff(is.memory_used_mib) >= MEMORY_THRESHOLD_MIB
                || was.utilization_percent.abs_diff(is.utilization_percent)
                    >= UTILIZATION_THRESHOLD_POINTS
                || was.unhealthy != is.unhealthy
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, used: u64, utilization: u32) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index}"),
            name: "A100-80G".to_owned(),
            memory_total_mib: 81_920,
            memory_used_mib: used,
            utilization_percent: utilization,
            temperature_celsius: 40,
            unhealthy: None,
        }
    }

    fn inventory(gpus: Vec<Gpu>) -> GpuInventory {
        GpuInventory::new("test", gpus).unwrap()
    }

    #[test]
    fn memory_and_utilisation_are_reported_from_their_thresholds_on() {
        let reported = inventory(vec![gpu(0, 1_000, 50)]);
        let worth = |gpus| worth_reporting(&reported, &inventory(gpus));
        assert!(!worth(vec![gpu(0, 1_000, 50)]));
        assert!(!worth(vec![gpu(0, 1_063, 59)]));
        assert!(!worth(vec![gpu(0, 937, 41)]));
        assert!(worth(vec![gpu(0, 1_064, 50)]));
        assert!(worth(vec![gpu(0, 936, 50)]));
        assert!(worth(vec![gpu(0, 1_000, 60)]));
        assert!(worth(vec![gpu(0, 1_000, 40)]));
    }

    #[test]
    fn health_and_membership_changes_are_always_reported_and_temperature_never() {
        let reported = inventory(vec![gpu(0, 0, 0), gpu(1, 0, 0)]);
        let worth = |gpus| worth_reporting(&reported, &inventory(gpus));
        let mut hot = gpu(1, 0, 0);
        hot.temperature_celsius = 90;
        assert!(!worth(vec![gpu(0, 0, 0), hot]));
        let mut failed = gpu(1, 0, 0);
        failed.unhealthy = Some("critical Xid 79".to_owned());
        assert!(worth(vec![gpu(0, 0, 0), failed]));
        assert!(worth(vec![gpu(0, 0, 0)]));
        assert!(worth(vec![gpu(0, 0, 0), gpu(1, 0, 0), gpu(2, 0, 0)]));
        let mut replaced = gpu(1, 0, 0);
        replaced.uuid = "GPU-new".to_owned();
        assert!(worth(vec![gpu(0, 0, 0), replaced]));
        assert!(worth(vec![]));
    }

    /// Hands out its readings in order, then nothing new.
    struct Scripted(std::collections::VecDeque<Result<Option<Vec<Gpu>>, String>>);

    impl GpuSource for Scripted {
        fn read(&mut self) -> Result<Option<Vec<Gpu>>, String> {
            self.0.pop_front().unwrap_or(Ok(None))
        }

        fn wait(&mut self, interval: Duration) {
            std::thread::sleep(interval);
        }
    }

    #[tokio::test]
    async fn failed_and_invalid_readings_keep_the_last_good_inventory_and_the_thread_ends_with_the_feed()
     {
        let mut over_used = gpu(0, 0, 0);
        over_used.memory_used_mib = 100_000;
        let source = Scripted(
            [
                Err("the file is gone".to_owned()),
                Ok(Some(vec![over_used])),
                Ok(None),
                Ok(Some(vec![gpu(0, 5_000, 0)])),
            ]
            .into(),
        );
        let (sender, mut feed) = watch::channel(inventory(vec![gpu(0, 0, 0)]));
        let polling = std::thread::spawn(move || {
            poll(Box::new(source), &sender, Duration::from_millis(1), "test");
        });
        tokio::time::timeout(Duration::from_secs(10), feed.changed())
            .await
            .expect("the good reading arrives")
            .unwrap();
        assert_eq!(feed.borrow_and_update().gpus()[0].memory_used_mib, 5_000);
        drop(feed);
        tokio::task::spawn_blocking(move || polling.join())
            .await
            .unwrap()
            .expect("the thread ends once nobody holds the feed");
    }

    #[test]
    fn a_slow_drift_is_reported_once_it_adds_up() {
        let (sender, mut feed) = watch::channel(inventory(vec![gpu(0, 0, 0)]));
        for used in (10..=60).step_by(10) {
            offer(&sender, inventory(vec![gpu(0, used, 0)]));
            assert!(!feed.has_changed().unwrap(), "{used} MiB");
        }
        offer(&sender, inventory(vec![gpu(0, 70, 0)]));
        assert!(feed.has_changed().unwrap());
        assert_eq!(feed.borrow_and_update().gpus()[0].memory_used_mib, 70);
        offer(&sender, inventory(vec![gpu(0, 100, 0)]));
        assert!(!feed.has_changed().unwrap());
    }
}
