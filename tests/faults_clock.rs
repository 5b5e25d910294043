//! Wall-clock steps, through real coordinator processes whose clock is moved
//! by libfaketime: expiry runs on the monotonic clock while the coordinator
//! runs, and a stored `offline_since` written under a wrong clock neither
//! expires a node at once nor delays its expiry after a restart.
//!
//! The clock is moved through a file that libfaketime re-reads every second
//! (`FAKETIME_TIMESTAMP_FILE`), and only the wall clock is faked: a real step
//! leaves `CLOCK_MONOTONIC` alone.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use common::*;
use muster::{proto::NodeState, store::Store};

const TWO_HOURS: i64 = 2 * 3600;
const EXPIRE_AFTER: Duration = Duration::from_secs(8);
const TIMING: [&str; 6] = [
    "--heartbeat-interval",
    "200ms",
    "--offline-after",
    "1s",
    "--expire-after",
    "8s",
];
/// Slack for a sweep, a poll and a loaded machine.
const MARGIN: Duration = Duration::from_secs(3);
/// A node may legitimately vanish this close to its earliest allowed moment,
/// between the poll being sent and being answered.
const POLL_SLACK: Duration = Duration::from_millis(250);

/// libfaketime's multi-threaded library, or `None` where it is not installed
/// (see [`skip`]: under `CI=true` that fails).
fn libfaketime() -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("faketime/libfaketimeMT.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketimeMT.so.1")])
        .find(|path| path.exists());
    if found.is_none() {
        skip(
            "the wall-clock step tests",
            "libfaketime is not installed (apt-get install faketime)",
        );
    }
    found
}

/// The clock of a coordinator started under libfaketime: an offset from the
/// real wall clock, changed by rewriting a file.
struct FakeClock {
    library: PathBuf,
    file: PathBuf,
}

impl FakeClock {
    fn new(library: PathBuf, dir: &Path, offset_seconds: i64) -> Self {
        let clock = Self {
            library,
            file: dir.join("faketime.rc"),
        };
        clock.set(offset_seconds);
        clock
    }

    fn set(&self, offset_seconds: i64) {
        std::fs::write(&self.file, format!("{offset_seconds:+}\n")).expect("write faketime file");
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", self.library.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
            ("NO_FAKE_STAT", "1".to_owned()),
        ]
    }
}

/// Registers `node_id` on a raw stream and ends the stream, so the node goes
/// OFFLINE at once. Returns a moment just before the stream ended: the node
/// cannot have gone OFFLINE before it.
async fn register_and_leave(url: &str, node_id: &str) -> Instant {
    let (stream, _) = RawStream::register(url, node_id, "http://127.0.0.1:9", "b").await;
    let left = Instant::now();
    drop(stream);
    wait_for_state(url, &[node_id], NodeState::Offline, START_DEADLINE).await;
    left
}

/// Whether `node_id` is listed; panics if the coordinator does not answer.
async fn is_listed(url: &str, node_id: &str) -> bool {
    list_nodes(url)
        .await
        .expect("the coordinator answers")
        .iter()
        .any(|n| n.node_id == node_id)
}

/// Watches that `node_id` stays listed in every answer received before
/// `until`. An answer received later may have been given after `until`, so
/// it proves nothing, however slowly the machine runs.
async fn stays_until(url: &str, node_id: &str, since: Instant, until: Instant, why: &str) {
    loop {
        let listed = is_listed(url, node_id).await;
        let answered = Instant::now();
        if answered >= until {
            return;
        }
        assert!(
            listed,
            "{node_id} was removed {:?} after going OFFLINE: {why}",
            answered - since
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn is_removed_by(url: &str, node_id: &str, deadline: Instant, why: &str) {
    let what = format!("{node_id} to expire ({why})");
    let within = deadline.saturating_duration_since(Instant::now());
    wait_for(&what, within, || async {
        (!is_listed(url, node_id).await).then_some(())
    })
    .await;
}

/// Waits until the coordinator's wall clock shows `offset_seconds`, as the
/// `last_seen` it gives the heartbeats of a node `witness` proves.
async fn wait_for_clock(url: &str, offset_seconds: i64) {
    let (witness, _) = RawStream::register(url, "witness", "http://127.0.0.1:9", "w").await;
    let witness = &witness;
    let mut sequence = 0;
    wait_for(
        "the coordinator's clock to be stepped",
        START_DEADLINE,
        || {
            sequence += 1;
            async move {
                witness.send(heartbeat_message(sequence)).await;
                let seen = SystemTime::try_from(node(url, "witness").await?.last_seen?).ok()?;
                ((skew(seen) - offset_seconds as f64).abs() < 600.0).then_some(())
            }
        },
    )
    .await;
}

/// Seconds `time` lies ahead of the real clock; negative if behind.
fn skew(time: SystemTime) -> f64 {
    match time.duration_since(SystemTime::now()) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

/// A node OFFLINE for a moment when the coordinator's clock is stepped by
/// `step` seconds is removed `EXPIRE_AFTER` after it went OFFLINE, by the
/// monotonic clock: not sooner, and not `step` later.
async fn a_step_at_run_time_does_not_move_expiry(step: i64) {
    let Some(library) = libfaketime() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(library, dir.path(), 0);
    let coordinator = Coordinator::start_with_env(
        &dir.path().join("muster.db"),
        "127.0.0.1:0",
        &TIMING,
        &clock.env(),
    );
    let url = coordinator.url();

    let left = register_and_leave(&url, "gpu-gone").await;
    clock.set(step);
    wait_for_clock(&url, step).await;
    eprintln!(
        "clock stepped by {step}s {:?} after gpu-gone left",
        left.elapsed()
    );

    stays_until(
        &url,
        "gpu-gone",
        left,
        left + EXPIRE_AFTER,
        "the wall-clock step hastened expiry",
    )
    .await;
    is_removed_by(
        &url,
        "gpu-gone",
        left + EXPIRE_AFTER + MARGIN,
        "the step must not delay it",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_forward_at_run_time_does_not_expire_a_node_early() {
    a_step_at_run_time_does_not_move_expiry(TWO_HOURS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_back_at_run_time_does_not_delay_expiry() {
    a_step_at_run_time_does_not_move_expiry(-TWO_HOURS).await;
}

/// Runs a coordinator with its clock `offset` seconds off while `gpu-gone`
/// goes OFFLINE and that is stored, kills it, and starts a coordinator with
/// the right clock on the same database. Returns it and the moment it was
/// started, before it read the store.
async fn offline_under_a_wrong_clock_then_restart(
    dir: &Path,
    offset: i64,
) -> (Coordinator, Instant) {
    let library = libfaketime().expect("checked by the caller");
    let db = dir.join("muster.db");
    let clock = FakeClock::new(library, dir, offset);
    let mut first = Coordinator::start_with_env(&db, "127.0.0.1:0", &TIMING, &clock.env());
    register_and_leave(&first.url(), "gpu-gone").await;
    let stored = wait_for("offline_since to be stored", START_DEADLINE, || async {
        let stored = Store::open(&db).await.ok()?.load_nodes().await.ok()?;
        stored.first()?.offline_since
    })
    .await;
    let stored_skew = skew(stored);
    assert!(
        (stored_skew - offset as f64).abs() < 600.0,
        "offline_since stored {stored_skew}s off"
    );
    first.process.kill();

    let started = Instant::now();
    (Coordinator::start(&db, "127.0.0.1:0", &TIMING), started)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_moment_written_under_a_clock_behind_does_not_expire_at_once_after_a_restart() {
    if libfaketime().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (second, started) = offline_under_a_wrong_clock_then_restart(dir.path(), -TWO_HOURS).await;
    let url = second.url();
    // The stored age looks two hours long; half of expire-after is still
    // measured by the restarted coordinator itself.
    let earliest = started + EXPIRE_AFTER / 2;
    stays_until(
        &url,
        "gpu-gone",
        started,
        earliest,
        "expired at once after the restart",
    )
    .await;
    is_removed_by(
        &url,
        "gpu-gone",
        earliest + MARGIN,
        "half of expire-after after the restart",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_moment_written_under_a_clock_ahead_does_not_delay_expiry_after_a_restart() {
    if libfaketime().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (second, started) = offline_under_a_wrong_clock_then_restart(dir.path(), TWO_HOURS).await;
    let url = second.url();
    // offline_since lies two hours in the future: counted as just now, so
    // the node goes one expire-after from start-up, not two hours later.
    is_removed_by(
        &url,
        "gpu-gone",
        Instant::now() + EXPIRE_AFTER + MARGIN,
        "a full expire-after after the restart",
    )
    .await;
    assert!(
        started.elapsed() >= EXPIRE_AFTER - POLL_SLACK,
        "removed {:?} after the restart, sooner than expire-after",
        started.elapsed()
    );
}
