//! Running docker, compose and the static build, each under a deadline.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::{BUILD_DEADLINE, COMMAND_DEADLINE, common};

/// The compose command line (`docker compose` or `docker-compose`), or
/// `None` after saying why the test is skipped.
pub fn docker_compose() -> Option<Vec<String>> {
    let what = "the cluster test";
    let engine = run(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]));
    if !engine.as_ref().is_ok_and(|output| output.status.success()) {
        let reason = format!("no Docker engine is reachable ({})", failure(&engine));
        common::skip(what, &reason);
        return None;
    }
    let spellings = [vec!["docker", "compose"], vec!["docker-compose"]];
    for spelling in spellings {
        let version = run(Command::new(spelling[0])
            .args(&spelling[1..])
            .arg("version"));
        if version.is_ok_and(|output| output.status.success()) {
            return Some(spelling.into_iter().map(str::to_owned).collect());
        }
    }
    common::skip(what, "neither `docker compose` nor `docker-compose` works");
    None
}

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn target_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds the static binary the Dockerfile copies, with the script that
/// `scripts/cluster.sh up` builds it with, so that neither rebuilds what the
/// other built. The script clears the variables cargo sets for this test.
/// Its own target directory keeps it clear of the build lock of the
/// `cargo test` running this.
pub fn build_static_binary() -> Duration {
    let started = Instant::now();
    let mut build = Command::new(manifest_dir().join("scripts/cluster.sh"));
    build
        .arg("static")
        .env("MUSTER_TARGET", target_triple())
        .current_dir(manifest_dir());
    checked(
        run_within(&mut build, BUILD_DEADLINE),
        "building the static binary",
    );
    started.elapsed()
}

/// Runs `command` with [`COMMAND_DEADLINE`].
pub fn run(command: &mut Command) -> Result<Output, String> {
    run_within(command, COMMAND_DEADLINE)
}

/// Runs `command` to completion, killing it if it takes longer than `limit`.
pub fn run_within(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match outcome.recv_timeout(limit) {
        Ok(output) => output.map_err(|e| format!("{command:?} failed: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            Err(format!("{command:?} did not finish within {limit:?}"))
        }
    }
}

pub fn failure(outcome: &Result<Output, String>) -> String {
    match outcome {
        Err(reason) => reason.clone(),
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            format!("{}: {}", output.status, last.unwrap_or("no output"))
        }
    }
}

/// The output of a command that must succeed.
pub fn checked(outcome: Result<Output, String>, what: &str) -> Output {
    match outcome {
        Ok(output) if output.status.success() => output,
        Ok(output) => panic!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(reason) => panic!("{what}: {reason}"),
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
