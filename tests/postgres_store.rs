//! The coordinator on a PostgreSQL `--db`: its password never shows (log,
//! `--print-config`, errors), a malformed URL is refused naming the flag,
//! a server that cannot be reached is a clear start-up error, and a server
//! that goes away while the coordinator runs is an outage it reports and
//! recovers from by itself.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{postgres::Postgres, *};
use muster::proto::NodeState;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

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

async fn coordinator_health(url: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: "muster.v1.Coordinator".to_owned(),
    };
    let response = HealthClient::new(channel).check(request).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

async fn wait_for_health(url: &str, wanted: ServingStatus) {
    wait_for(&format!("health {wanted:?}"), DEADLINE, || async move {
        (coordinator_health(url).await == Some(wanted)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_goes_away_is_an_outage_that_clears_by_itself() {
    let Some(server) = Postgres::start("postgres_store::a_server_that_goes_away") else {
        return;
    };
    let db = server.create_database();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(Path::new(&db), "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let _steady = start_agent(&url, "steady", &dir.path().join("steady"));
    wait_for_state(&url, &["steady"], NodeState::Online, START_DEADLINE).await;
    wait_for_health(&url, ServingStatus::Serving).await;

    server.stop();
    wait_for_health(&url, ServingStatus::NotServing).await;
    let refused = RawStream::refused(
        &url,
        register_message("newcomer", "http://127.0.0.1:9", "b"),
    )
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let latecomer = start_agent_with(
        &url,
        "latecomer",
        &dir.path().join("latecomer"),
        &["--max-backoff", "1s"],
    );

    server.start_again();
    wait_for_health(&url, ServingStatus::Serving).await;
    wait_for_state(&url, &["latecomer", "steady"], NodeState::Online, DEADLINE).await;
    drop(latecomer);
    let status = coordinator
        .process
        .stop_with(nix::sys::signal::Signal::SIGTERM, DEADLINE);
    assert!(status.success(), "{status:?}");
    let stored = muster::store::Store::open(store_database(Path::new(&db)))
        .await
        .unwrap()
        .load_nodes()
        .await
        .unwrap();
    assert!(
        stored
            .iter()
            .any(|node| node.registration.node_id.as_str() == "latecomer"),
        "the registration refused during the outage was written on retry"
    );
}
