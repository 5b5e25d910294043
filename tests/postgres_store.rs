//! The coordinator on a PostgreSQL `--db`: its password never shows (log,
//! `--print-config`, errors), a malformed URL is refused naming the flag,
//! and a server that cannot be reached is a clear start-up error.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{postgres::Postgres, *};
use muster::proto::NodeState;

const PASSWORD: &str = "s3cret-password";
const DEADLINE: Duration = Duration::from_secs(30);

fn muster(args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_muster")).args(args),
        DEADLINE,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_of_db_is_never_shown() {
    let Some(server) = Postgres::start("postgres_store::the_password_of_db_is_never_shown") else {
        return;
    };
    // Trust authentication ignores the password; the coordinator must still
    // keep it to itself.
    let url = server
        .create_database()
        .replacen("muster@", &format!("muster:{PASSWORD}@"), 1);
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(Path::new(&url), "127.0.0.1:0", FAST_TIMING);
    let _agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("gpu-1"));
    wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;
    let log = coordinator.process.log_lines().join("\n");
    assert!(log.contains("muster:***@127.0.0.1"), "{log}");
    assert!(!log.contains(PASSWORD), "{log}");

    let printed = muster(&["coordinator", "--db", &url, "--print-config"]);
    let stdout = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{printed:?}");
    assert!(
        stdout.contains("db = \"postgres://muster:***@127.0.0.1"),
        "{stdout}"
    );
    assert!(!stdout.contains(PASSWORD), "{stdout}");
}

#[test]
fn a_malformed_url_is_refused_naming_db_without_its_password() {
    let output = muster(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &format!("postgres://muster:{PASSWORD}@127.0.0.1:notaport/muster"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "a usage error: {output:?}");
    assert_eq!(
        stderr.trim_end(),
        "error: --db postgres://muster:***@127.0.0.1:notaport/muster is not a valid \
         PostgreSQL URL: invalid port number"
    );
}

#[test]
fn a_server_that_cannot_be_reached_is_a_clear_start_up_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://muster:{PASSWORD}@127.0.0.1:{port}/muster");
    let output = muster(&["coordinator", "--listen", "127.0.0.1:0", "--db", &url]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains(&format!(
            "cannot open database postgres://muster:***@127.0.0.1:{port}/muster"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}
