//! Faults of the database file, through real processes: a second
//! coordinator on the same file, a coordinator killed with SIGKILL, a file
//! deleted under a running coordinator, files that are not the database
//! they claim to be, and a row that cannot be read.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{
    Coordinator, FAST_TIMING, RawStream, START_DEADLINE, field, hold_none_offline, node,
    one_line_error, output_within, register_message, scrape, start_agent, stored_node_ids,
    wait_for, wait_for_state,
};
use diesel::{Connection, RunQueryDsl, SqliteConnection, connection::SimpleConnection};
use muster::proto::{self, NodeState};
use nix::sys::signal::Signal;
use tonic::Code;

/// A start-up refusal comes well within this.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(15);

fn coordinator_command(db: &Path, listen: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
    command
        .args([
            "coordinator",
            "--http-listen",
            "127.0.0.1:0",
            "--listen",
            listen,
            "--db",
        ])
        .arg(db)
        .args(FAST_TIMING)
        .env("MUSTER_LOG", "off");
    command
}

/// Runs a coordinator on `db` and checks that it refuses to start with one
/// line that mentions each of `expected`.
fn assert_refuses(db: &Path, listen: &str, expected: &[&str]) -> String {
    let output = output_within(&mut coordinator_command(db, listen), REFUSAL_DEADLINE);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    for needle in expected {
        one_line_error(&output, needle);
    }
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn lock_file(db: &Path) -> String {
    std::fs::read_to_string(format!("{}.lock", db.display())).unwrap_or_default()
}

fn execute_sql(db: &Path, sql: &str) {
    SqliteConnection::establish(db.to_str().unwrap())
        .expect("open the database")
        .batch_execute(&format!("PRAGMA busy_timeout = 5000; {sql}"))
        .expect("run sql");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_coordinator_on_the_same_database_exits_naming_the_first_whose_nodes_stay_online()
{
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let first = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let _agents = ["gpu-1", "gpu-2"].map(|id| start_agent(&first.url(), id, &dir.path().join(id)));
    wait_for_state(
        &first.url(),
        &["gpu-1", "gpu-2"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;

    let db_name = db.display().to_string();
    let pid = format!("pid {}", first.process.pid());
    let address = first.process.address.to_string();
    assert_refuses(&db, "127.0.0.1:0", &[&db_name, &pid, &address]);

    // Past offline-after, and the nodes' rows are all still there.
    hold_none_offline(&first.url(), Duration::from_secs(4)).await;
    wait_for_state(
        &first.url(),
        &["gpu-1", "gpu-2"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;
    let mut stored = stored_node_ids(&db).await;
    stored.sort();
    assert_eq!(stored, ["gpu-1", "gpu-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lock_of_a_coordinator_killed_with_sigkill_never_blocks_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let mut coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let listen = coordinator.process.address.to_string();
    let _agent = start_agent(&coordinator.url(), "gpu-1", &dir.path().join("gpu-1"));
    wait_for_state(
        &coordinator.url(),
        &["gpu-1"],
        NodeState::Online,
        START_DEADLINE,
    )
    .await;

    for _ in 0..2 {
        let holder = format!("pid={} address={listen}", coordinator.process.pid());
        assert_eq!(lock_file(&db).trim(), holder);
        coordinator.process.kill();
        assert_eq!(lock_file(&db).trim(), holder, "the lock file stays behind");

        coordinator = Coordinator::restart(&db, &listen, FAST_TIMING);
        wait_for_state(
            &coordinator.url(),
            &["gpu-1"],
            NodeState::Online,
            START_DEADLINE,
        )
        .await;
    }
    assert_eq!(
        lock_file(&db).trim(),
        format!("pid={} address={listen}", coordinator.process.pid())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_database_takes_no_registration_and_a_restart_says_it_creates_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let (kept, _) = RawStream::register(&url, "kept", "http://127.0.0.1:9", "b1").await;

    std::fs::remove_file(&db).unwrap();
    for attempt in 0..3 {
        let registration = register_message(&format!("new-{attempt}"), "http://127.0.0.1:9", "b1");
        let refused = RawStream::refused(&url, registration).await;
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            refused
                .message()
                .contains(&format!("{} was deleted", db.display())),
            "{refused:?}"
        );
    }
    assert!(
        !db.exists(),
        "nothing is created in the deleted file's place"
    );
    coordinator
        .process
        .wait_for_log(0, START_DEADLINE, |line| {
            (line.contains("ERROR") && line.contains("was deleted")).then_some(())
        })
        .await;
    // Each refusal is logged, if at all, before it is sent; a line the
    // coordinator logs after the last refusal was received is read after
    // every line of the refusals.
    drop(kept);
    coordinator
        .process
        .wait_for_log(0, START_DEADLINE, |line| {
            line.contains("session ended").then_some(())
        })
        .await;
    assert_eq!(
        coordinator.process.log_count(&["ERROR", "was deleted"]),
        1,
        "logged once, not once per refusal"
    );

    let status = coordinator
        .process
        .stop_with(Signal::SIGTERM, START_DEADLINE);
    assert!(status.success(), "{status:?}");
    // SQLite may keep the deleted database's write-ahead log; a new
    // database beside it would have the old log replayed into it.
    let wal = dir.path().join("muster.db-wal");
    if wal.metadata().is_ok_and(|m| m.len() > 0) {
        assert_refuses(&db, "127.0.0.1:0", &["muster.db-wal", "deleted or moved"]);
        std::fs::remove_file(&wal).unwrap();
        let _ = std::fs::remove_file(dir.path().join("muster.db-shm"));
    }
    let restarted = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    assert!(
        restarted
            .process
            .log_contains(&format!("creating a new database at {}", db.display())),
        "the restart must say that it creates a new database"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_that_are_not_the_expected_database_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    assert_refuses(&empty, "127.0.0.1:0", &["empty.db is an empty file"]);
    assert_eq!(
        std::fs::metadata(&empty).unwrap().len(),
        0,
        "left as it was"
    );

    let newer = dir.path().join("newer.db");
    drop(muster::store::Store::open(&newer).await.unwrap());
    execute_sql(
        &newer,
        "INSERT INTO __diesel_schema_migrations (version) VALUES ('20990101000000')",
    );
    assert_refuses(&newer, "127.0.0.1:0", &["newer.db", "20990101000000"]);

    let orphaned_journal = dir.path().join("orphan.db");
    std::fs::write(dir.path().join("orphan.db-wal"), b"frames").unwrap();
    assert_refuses(
        &orphaned_journal,
        "127.0.0.1:0",
        &["orphan.db does not exist, but its journal", "orphan.db-wal"],
    );
    assert!(!orphaned_journal.exists());

    let in_missing_directory = dir.path().join("nonexistent/dir/x.db");
    assert_refuses(
        &in_missing_directory,
        "127.0.0.1:0",
        &[&format!(
            "directory {} does not exist",
            dir.path().join("nonexistent/dir").display()
        )],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_that_cannot_listen_creates_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    assert_refuses(&db, &address, &[&format!("cannot listen on {address}")]);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files created: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_row_is_quarantined_and_the_rest_of_the_fleet_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    for id in ["good", "bad"] {
        RawStream::register(&coordinator.url(), id, "http://127.0.0.1:9", "b1").await;
    }
    let status = coordinator
        .process
        .stop_with(Signal::SIGTERM, START_DEADLINE);
    assert!(status.success(), "{status:?}");
    execute_sql(
        &db,
        "UPDATE known_nodes SET labels = 'not json' WHERE node_id = 'bad'",
    );

    let mut extra = FAST_TIMING.to_vec();
    extra.extend(["--metrics-listen", "127.0.0.1:0"]);
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &extra);
    let url = coordinator.url();
    assert_eq!(
        coordinator
            .process
            .log_count(&["quarantined", "node_id=bad", "labels"]),
        1,
        "the quarantined row is logged with its node id and the reason"
    );
    let metrics_address = coordinator
        .process
        .wait_for_log(0, START_DEADLINE, |line| field(line, "metrics_address="))
        .await;
    assert!(
        scrape(&metrics_address).contains("muster_store_rows_quarantined 1"),
        "the quarantined row is counted"
    );
    assert!(node(&url, "good").await.is_some(), "the rest is served");
    assert!(node(&url, "bad").await.is_none());

    let refused = RawStream::open(&url, register_message("bad", "http://127.0.0.1:9", "b2"))
        .await
        .err()
        .expect("the quarantined node id is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("muster nodes remove bad"),
        "{refused:?}"
    );
    let labels: Vec<String> =
        diesel::sql_query("SELECT labels FROM known_nodes WHERE node_id = 'bad'")
            .load::<Labels>(&mut SqliteConnection::establish(db.to_str().unwrap()).unwrap())
            .unwrap()
            .into_iter()
            .map(|row| row.labels)
            .collect();
    assert_eq!(labels, ["not json"], "the row is kept as it was");

    // An operator's removal lets the node register afresh.
    coordinator
        .client()
        .await
        .remove_node(proto::RemoveNodeRequest {
            node_id: "bad".to_owned(),
        })
        .await
        .expect("remove the quarantined row");
    RawStream::register(&url, "bad", "http://127.0.0.1:9", "b2").await;
    wait_for("bad to be listed", START_DEADLINE, || async {
        node(&url, "bad").await
    })
    .await;
}

#[derive(diesel::QueryableByName)]
struct Labels {
    #[diesel(sql_type = diesel::sql_types::Text)]
    labels: String,
}
