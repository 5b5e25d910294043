//! Steps the security tests share: files, the CLI, metrics, coordinator
//! flags and restarts.

use std::{
    path::Path,
    process::{Command, Output},
};

use crate::common::*;

pub fn write_file(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

/// [`FAST_TIMING`] followed by `flags`.
pub fn fast_timing_and<'a>(flags: &[&'a str]) -> Vec<&'a str> {
    FAST_TIMING.iter().chain(flags).copied().collect()
}

pub fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// Runs the `muster` CLI with `args` and extra environment `env`.
pub fn muster(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run muster")
}

pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits for `process` to log a line that contains every one of `needles`.
pub async fn wait_for_line(process: &Process, needles: &[&str]) {
    process
        .wait_for_log(0, START_DEADLINE, |line| {
            needles.iter().all(|n| line.contains(n)).then_some(())
        })
        .await;
}

/// Starts a coordinator again on `db` after the last one was killed, and
/// waits until its probe has proven `node_id` alive. It listens on another
/// port, so that the agent's own reconnect cannot prove the node first.
pub async fn restart_and_probe(db: &Path, flags: &[&str], node_id: &str) -> Coordinator {
    let coordinator = Coordinator::start(db, "127.0.0.1:0", flags);
    wait_for_line(&coordinator.process, &["probe passed", node_id]).await;
    coordinator
}

pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}
