//! Start-up failures end the process with one line on stderr, not a panic.

mod common;

use std::{
    net::TcpListener,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    process::Command,
};

use common::one_line_error;

fn coordinator_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
    command
        .args(["coordinator", "--http-listen", "127.0.0.1:0"])
        .args(args)
        .env("MUSTER_LOG", "off");
    command
}

/// Runs `command` and checks it fails with one line mentioning `expected`.
fn assert_refuses(mut command: Command, expected: &str) {
    one_line_error(&command.output().expect("run muster"), expected);
}

/// Runs a coordinator with `args` and checks it fails with one line
/// mentioning `expected`.
fn assert_coordinator_refuses(args: &[&str], expected: &str) {
    assert_refuses(coordinator_command(args), expected);
}

#[test]
fn a_db_in_a_missing_directory_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("missing/muster.db");
    assert_coordinator_refuses(
        &["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()],
        "cannot open database",
    );
}

#[test]
fn a_db_that_is_not_a_database_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    std::fs::write(&db, vec![b'x'; 4096]).unwrap();
    assert_coordinator_refuses(
        &["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()],
        "muster.db",
    );
}

#[test]
fn a_read_only_db_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A real database: an empty file is refused for being empty.
    let mut conn =
        <diesel::SqliteConnection as diesel::Connection>::establish(db.to_str().unwrap()).unwrap();
    diesel::connection::SimpleConnection::batch_execute(&mut conn, "CREATE TABLE t (x)").unwrap();
    drop(conn);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();

    let running_as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let command = if running_as_root {
        // Permissions do not bind root; run as nobody so they do, from a copy
        // of the binary that nobody can reach wherever the checkout lives.
        let binary = dir.path().join("muster");
        std::fs::copy(env!("CARGO_BIN_EXE_muster"), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = Command::new(&binary);
        command
            .args([
                "coordinator",
                "--http-listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(&db)
            .env("MUSTER_LOG", "off")
            .uid(65534)
            .gid(65534);
        command
    } else {
        coordinator_command(&["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()])
    };
    assert_refuses(command, "muster.db");
}

#[test]
fn a_busy_port_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let db = dir.path().join("muster.db");
    assert_coordinator_refuses(
        &["--listen", &address, "--db", db.to_str().unwrap()],
        &format!("cannot listen on {address}"),
    );
}

#[test]
fn inconsistent_timing_is_a_one_line_error() {
    assert_coordinator_refuses(
        &["--heartbeat-interval", "10s", "--offline-after", "5s"],
        "--offline-after",
    );
}

#[test]
fn an_agent_with_a_malformed_coordinator_url_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_muster"));
    agent
        .args([
            "agent",
            "--coordinator",
            "coordinator:7700",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--node-id", "gpu-1", "--state-dir"])
        .arg(dir.path())
        .env("MUSTER_LOG", "off");
    assert_refuses(agent, "--coordinator");
}
