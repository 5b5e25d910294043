//! A database that cannot be written: at start-up, while running, and at
//! shutdown. Run-time faults are real ones: another process holds SQLite's
//! write lock, so every write of the coordinator fails once its busy timeout
//! has passed, exactly as on a database it may not write. That works as root
//! and as any other user. A full disk is a small tmpfs filled up, where the
//! tests may mount one (as root).

mod common;

use std::{
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{
    Coordinator, FAST_TIMING, Process, RawStream, hold_for, node, register_message, start_agent,
    start_agent_with, state_of, wait_for, wait_for_state,
};
use diesel::{Connection, RunQueryDsl, SqliteConnection, connection::SimpleConnection};
use muster::proto::NodeState;
use nix::sys::signal::Signal;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Long enough for a write to wait out the coordinator's 5 s busy timeout,
/// fail, and be noticed, on a loaded machine.
const OUTAGE_NOTICED: Duration = Duration::from_secs(30);
const SERVICE: &str = "muster.v1.Coordinator";
const NOBODY: u32 = 65534;

/// Holds SQLite's write lock on a database, as a second process would, until
/// released or dropped.
struct WriteLock(SqliteConnection);

impl WriteLock {
    fn take(db: &Path) -> Self {
        let mut conn = SqliteConnection::establish(&db.display().to_string()).expect("open db");
        conn.batch_execute("BEGIN IMMEDIATE")
            .expect("take the write lock");
        Self(conn)
    }

    fn release(mut self) {
        self.0.batch_execute("ROLLBACK").expect("release the lock");
    }
}

async fn health(url: &str, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = HealthClient::new(channel).check(request).await.ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

async fn wait_for_health(url: &str, wanted: ServingStatus, deadline: Duration) {
    for service in ["", SERVICE] {
        wait_for(
            &format!("health of {service:?} to be {wanted:?}"),
            deadline,
            || async move { (health(url, service).await == Some(wanted)).then_some(()) },
        )
        .await;
    }
}

/// A command running `muster` as a user that file permissions bind: as
/// nobody, from a copy of the binary in `dir`, when the tests run as root
/// (permissions do not bind root); as the current user otherwise. `dir` and
/// what it holds become nobody's.
fn unprivileged_muster(dir: &Path) -> Command {
    let running_as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    if !running_as_root {
        return Command::new(env!("CARGO_BIN_EXE_muster"));
    }
    // Copied by a child process: a file this process had open for writing
    // could leak into a concurrent test's fork, and exec would then fail
    // with "text file busy".
    let binary = dir.join("muster");
    let copied = Command::new("cp")
        .arg(env!("CARGO_BIN_EXE_muster"))
        .arg(&binary)
        .status()
        .expect("run cp");
    assert!(copied.success());
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        std::os::unix::fs::chown(entry.unwrap().path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut command = Command::new(&binary);
    command.uid(NOBODY).gid(NOBODY);
    command
}

/// Runs `command` to completion; one still running after `deadline` (a
/// coordinator that started serving) is killed and fails the test.
fn output_within(mut command: Command, deadline: Duration) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run muster");
    let started = std::time::Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the coordinator was still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    child.wait_with_output().expect("collect output")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_database_at_start_up_is_a_one_line_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    drop(muster::store::Store::open(&db).await.unwrap());
    // Only the file is read-only: the directory stays writable, so SQLite
    // can still open the file (read-only) and an empty transaction passes.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let mut command = unprivileged_muster(dir.path());
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
        .env("MUSTER_LOG", "off");
    let output = output_within(command, Duration::from_secs(20));
    common::one_line_error(&output, &db.display().to_string());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot write database"), "{stderr}");
    assert!(stderr.contains("readonly"), "the cause is named: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_database_is_a_readiness_problem_that_clears_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let steady = start_agent(&url, "steady", &dir.path().join("steady"));
    let doomed = start_agent(&url, "doomed", &dir.path().join("doomed"));
    let mut mover = start_agent(&url, "mover", &dir.path().join("mover"));
    for node_id in ["steady", "doomed", "mover"] {
        wait_for_state(&url, &[node_id], NodeState::Online, Duration::from_secs(20)).await;
    }
    let mover_generation = node(&url, "mover").await.unwrap().session_generation;
    wait_for_health(&url, ServingStatus::Serving, Duration::from_secs(20)).await;

    let lock = WriteLock::take(&db);
    wait_for_health(&url, ServingStatus::NotServing, OUTAGE_NOTICED).await;
    // Logged before readiness changes, but read from the pipe in its own time.
    coordinator
        .process
        .wait_for_log(0, OUTAGE_NOTICED, |line| {
            line.contains("database writes are failing").then_some(())
        })
        .await;
    assert_eq!(
        coordinator
            .process
            .log_count(&["database writes are failing"]),
        1
    );

    let refused = RawStream::refused(
        &url,
        register_message("newcomer", "http://127.0.0.1:9", "b"),
    )
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("locked"),
        "the cause is named: {refused:?}"
    );

    // A new agent keeps retrying; a node whose agent comes back during the
    // outage is shown ONLINE, not OFFLINE, though it cannot register; one
    // whose agent dies goes OFFLINE, a change waiting to be written.
    let latecomer = start_agent_with(
        &url,
        "latecomer",
        &dir.path().join("latecomer"),
        &["--max-backoff", "1s"],
    );
    mover.kill();
    let mover = start_agent_with(
        &url,
        "mover",
        &dir.path().join("mover"),
        &["--max-backoff", "1s"],
    );
    drop(doomed);
    wait_for_state(
        &url,
        &["doomed"],
        NodeState::Offline,
        Duration::from_secs(10),
    )
    .await;
    wait_for_state(&url, &["mover"], NodeState::Online, OUTAGE_NOTICED).await;
    hold_for(
        "steady and mover ONLINE during the outage",
        Duration::from_secs(6),
        || {
            let url = url.clone();
            async move {
                for node_id in ["steady", "mover"] {
                    let node = node(&url, node_id).await.ok_or("node missing")?;
                    if state_of(&node) != NodeState::Online {
                        return Err(format!("{node_id} is {:?}", state_of(&node)));
                    }
                }
                Ok(())
            }
        },
    )
    .await;
    assert!(node(&url, "latecomer").await.is_none());
    assert!(
        latecomer.log_contains("Unavailable"),
        "the agent was told UNAVAILABLE"
    );
    assert_eq!(
        coordinator
            .process
            .log_count(&["database writes are failing"]),
        1,
        "one log line per outage, not one per failed write"
    );

    lock.release();
    wait_for_health(&url, ServingStatus::Serving, OUTAGE_NOTICED).await;
    wait_for_state(&url, &["latecomer"], NodeState::Online, OUTAGE_NOTICED).await;
    wait_for("mover to register again", OUTAGE_NOTICED, || {
        let url = url.clone();
        async move {
            let node = node(&url, "mover").await?;
            (node.session_generation > mover_generation).then_some(())
        }
    })
    .await;
    coordinator
        .process
        .wait_for_log(0, OUTAGE_NOTICED, |line| {
            line.contains("database writes succeed again").then_some(())
        })
        .await;
    assert_eq!(
        coordinator
            .process
            .log_count(&["database writes succeed again"]),
        1
    );
    assert_eq!(
        state_of(&node(&url, "steady").await.unwrap()),
        NodeState::Online
    );
    drop((steady, mover, latecomer));

    let status = coordinator
        .process
        .stop_with(Signal::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let store = muster::store::Store::open(&db).await.unwrap();
    let stored = store.load_nodes().await.unwrap();
    let doomed = stored
        .iter()
        .find(|n| n.registration.node_id.as_str() == "doomed")
        .expect("doomed is stored");
    assert!(
        doomed.offline_since.is_some(),
        "the OFFLINE change made during the outage was written"
    );
    assert!(
        stored
            .iter()
            .any(|n| n.registration.node_id.as_str() == "latecomer"),
        "the registration refused during the outage was written on retry"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutting_down_with_unsaved_changes_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let lost = start_agent(&url, "lost", &dir.path().join("lost"));
    wait_for_state(&url, &["lost"], NodeState::Online, Duration::from_secs(20)).await;

    let lock = WriteLock::take(&db);
    drop(lost);
    wait_for_state(&url, &["lost"], NodeState::Offline, Duration::from_secs(10)).await;
    let skip = coordinator.process.log_len();
    coordinator.process.signal(Signal::SIGTERM);
    let line = coordinator
        .process
        .wait_for_log(skip, Duration::from_secs(30), |line| {
            (line.contains("not saved") && line.contains("node_id=lost")).then(|| line.to_owned())
        })
        .await;
    assert!(line.contains("went OFFLINE"), "{line}");
    assert!(line.contains("ERROR"), "{line}");
    coordinator
        .process
        .wait_for_log(skip, Duration::from_secs(30), |line| {
            line.contains("coordinator stopped").then_some(())
        })
        .await;
    drop(lock);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_made_writable_again_is_used_again_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    drop(muster::store::Store::open(&db).await.unwrap());
    let mut command = unprivileged_muster(dir.path());
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
        .args(FAST_TIMING);
    let coordinator = Process::try_spawn("coordinator", command).unwrap();
    let url = coordinator.url();
    let agents = tempfile::tempdir().unwrap();
    let _steady = start_agent(&url, "steady", &agents.path().join("steady"));
    wait_for_state(
        &url,
        &["steady"],
        NodeState::Online,
        Duration::from_secs(20),
    )
    .await;
    wait_for_health(&url, ServingStatus::Serving, Duration::from_secs(20)).await;

    // SQLite may keep writing a file made read-only: a connection opened
    // before the chmod still holds a writable descriptor, and a fresh one may
    // be handed such a descriptor again. What holds either way: every
    // registration is acknowledged durably or refused with UNAVAILABLE that
    // names the cause, and nothing acknowledged is lost.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    let lock = WriteLock::take(&db);
    wait_for_health(&url, ServingStatus::NotServing, OUTAGE_NOTICED).await;
    lock.release();
    let mut acknowledged = Vec::new();
    for attempt in 1..=10 {
        let node_id = format!("early-{attempt}");
        match try_register(&url, &node_id).await {
            Ok(()) => acknowledged.push(node_id),
            Err(refused) => {
                assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
                assert!(
                    refused.message().contains("readonly") || refused.message().contains("locked"),
                    "the cause is named: {refused:?}"
                );
            }
        }
    }
    assert_eq!(
        state_of(&node(&url, "steady").await.unwrap()),
        NodeState::Online
    );

    // Only the database file is made writable again, as an operator does.
    // SQLite creates the -wal and -shm files with the database file's mode
    // at the time, so side files created while it was 0444 stay 0444; the
    // coordinator gives them the database file's mode again.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    wait_for_health(&url, ServingStatus::Serving, OUTAGE_NOTICED).await;
    // As an agent does, retry: a connection still read-only fails once more,
    // and is replaced.
    let deadline = tokio::time::Instant::now() + OUTAGE_NOTICED;
    while let Err(status) = try_register(&url, "newcomer").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused {OUTAGE_NOTICED:?} after the file was writable again: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    coordinator
        .wait_for_log(0, OUTAGE_NOTICED, |line| {
            line.contains("database writes succeed again").then_some(())
        })
        .await;
    // One line per change of state, not one per failed write: the outage
    // may have come and gone more than once, but every line is a change.
    let failing = coordinator.log_count(&["database writes are failing"]);
    let recovered = coordinator.log_count(&["database writes succeed again"]);
    assert_eq!(failing, recovered);
    assert!((1..=3).contains(&failing), "{failing} outages logged");

    for suffix in ["-wal", "-shm"] {
        let side = side_file(&db, suffix);
        if let Ok(metadata) = std::fs::metadata(&side) {
            assert_eq!(
                metadata.mode() & 0o777,
                0o644,
                "{} keeps its mode",
                side.display()
            );
        }
    }

    let mut conn = SqliteConnection::establish(&db.display().to_string()).expect("open db");
    let stored: Vec<String> = diesel::sql_query("SELECT node_id FROM known_nodes")
        .load::<StoredNodeId>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|row| row.node_id)
        .collect();
    for node_id in acknowledged
        .iter()
        .chain(["steady".to_owned(), "newcomer".to_owned()].iter())
    {
        assert!(
            stored.contains(node_id),
            "{node_id} was acknowledged but not stored: {stored:?}"
        );
    }
}

/// `db` with `suffix` appended: where SQLite keeps its side files.
fn side_file(db: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", db.display()))
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The trap an operator's `chmod 0444 muster.db` and back to 0644 leaves:
/// SQLite created the side files while the database was 0444, so they are
/// 0444 beside a writable database, and SQLite refuses every write for as
/// long as they stay so.
#[tokio::test(flavor = "multi_thread")]
async fn side_files_left_read_only_beside_a_writable_database_are_named_and_repaired() {
    let running_as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    drop(muster::store::Store::open(&db).await.unwrap());
    let mut command = unprivileged_muster(dir.path());
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
        .args(FAST_TIMING);
    let coordinator = Process::try_spawn("coordinator", command).unwrap();
    let url = coordinator.url();
    let agents = tempfile::tempdir().unwrap();
    let _steady = start_agent(&url, "steady", &agents.path().join("steady"));
    wait_for_state(
        &url,
        &["steady"],
        NodeState::Online,
        Duration::from_secs(20),
    )
    .await;
    wait_for_health(&url, ServingStatus::Serving, Duration::from_secs(20)).await;
    let wal = side_file(&db, "-wal");
    let shm = side_file(&db, "-shm");
    assert!(
        wal.exists() && shm.exists(),
        "the coordinator runs in WAL mode"
    );
    // Another connection to the database, as a backup or an operator's
    // sqlite3 shell holds one, keeps the side files in place when the
    // coordinator drops its own (SQLite's last connection deletes them).
    let mut reader = SqliteConnection::establish(&db.display().to_string()).expect("open db");
    diesel::sql_query("SELECT node_id FROM known_nodes")
        .load::<StoredNodeId>(&mut reader)
        .unwrap();

    if running_as_root {
        // A side file the coordinator may not change (another owner's) is
        // named, with its mode, as the cause of the outage.
        std::os::unix::fs::chown(&wal, Some(0), Some(0)).unwrap();
        set_mode(&wal, 0o444);
        wait_for_health(&url, ServingStatus::NotServing, OUTAGE_NOTICED).await;
        let refused = try_register(&url, "newcomer")
            .await
            .expect_err("refused while the side file is unwritable");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let wal_name = wal.display().to_string();
        assert!(
            refused.message().contains(&wal_name) && refused.message().contains("0444"),
            "the side file and its mode are named: {refused:?}"
        );
        assert_eq!(
            state_of(&node(&url, "steady").await.unwrap()),
            NodeState::Online
        );
        std::os::unix::fs::chown(&wal, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // As SQLite leaves them after creating them beside a 0444 database.
    set_mode(&wal, 0o444);
    set_mode(&shm, 0o444);

    let deadline = tokio::time::Instant::now() + OUTAGE_NOTICED;
    while let Err(status) = try_register(&url, "newcomer").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused {OUTAGE_NOTICED:?} after the side file could be repaired: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_health(&url, ServingStatus::Serving, OUTAGE_NOTICED).await;
    coordinator
        .wait_for_log(0, OUTAGE_NOTICED, |line| {
            line.contains("gave the database's side file").then_some(())
        })
        .await;
    for side in [&wal, &shm] {
        assert_eq!(
            std::fs::metadata(side).unwrap().mode() & 0o777,
            0o644,
            "{} has the database file's mode again",
            side.display()
        );
    }
    assert_eq!(
        state_of(&node(&url, "steady").await.unwrap()),
        NodeState::Online
    );
    drop(reader);
}

#[derive(diesel::QueryableByName)]
struct StoredNodeId {
    #[diesel(sql_type = diesel::sql_types::Text)]
    node_id: String,
}

/// One registration attempt, as an agent makes it.
async fn try_register(url: &str, node_id: &str) -> Result<(), tonic::Status> {
    let registration = register_message(node_id, "http://127.0.0.1:9", "b");
    RawStream::open(url, registration)
        .await?
        .registered()
        .await?;
    Ok(())
}

/// A small tmpfs mounted on a temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem: writes `filler` until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&filler)
            .unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let bytes = vec![0u8; chunk];
            // Bounded by the filesystem's size.
            while file.write_all(&bytes).is_ok() {}
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Checkpoints the whole write-ahead log into the database and truncates
/// it to nothing, if no one holds a lock that stops it; says whether it did.
fn truncate_wal(conn: &mut SqliteConnection) -> bool {
    #[derive(diesel::QueryableByName)]
    struct Checkpoint {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        busy: i32,
    }
    conn.batch_execute("PRAGMA busy_timeout = 0").unwrap();
    diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)")
        .load::<Checkpoint>(conn)
        .is_ok_and(|done| done.first().is_some_and(|row| row.busy == 0))
}

/// Whether process `pid` is stopped by a signal.
fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .is_some_and(|end| stat[end + 1..].trim_start().starts_with('T'))
}

/// Fills `disk` with the database's write-ahead log empty. SQLite writes
/// its log from the start again once it has been checkpointed, reusing
/// blocks it already has, so on a full disk a write fails only if it needs
/// more of them; with the log empty, every write needs a new block. The
/// coordinator is stopped meanwhile (for milliseconds), so that no write of
/// its lands between the truncation and the filling.
fn fill_with_empty_wal(
    disk: &Tmpfs,
    coordinator: &Process,
    reader: &mut SqliteConnection,
) -> PathBuf {
    for _ in 0..100 {
        coordinator.signal(Signal::SIGSTOP);
        for _ in 0..1000 {
            if stopped(coordinator.pid()) {
                break;
            }
            std::thread::yield_now();
        }
        // Stopped between transactions, not holding SQLite's write lock.
        if truncate_wal(reader) {
            let filler = disk.fill();
            coordinator.signal(Signal::SIGCONT);
            return filler;
        }
        coordinator.signal(Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the write-ahead log could not be truncated");
}

fn stored_offline(conn: &mut SqliteConnection, node_id: &str) -> bool {
    #[derive(diesel::QueryableByName)]
    struct Offline {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        offline_since: Option<String>,
    }
    diesel::sql_query(
        "SELECT CAST(offline_since AS TEXT) AS offline_since FROM known_nodes WHERE node_id = ?",
    )
    .bind::<diesel::sql_types::Text, _>(node_id)
    .load::<Offline>(conn)
    .unwrap()
    .first()
    .is_some_and(|row| row.offline_since.is_some())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_a_readiness_problem_and_shutdown_names_what_it_did_not_save() {
    let disk = match Tmpfs::mount("16m") {
        Ok(disk) => disk,
        Err(reason) => {
            common::skip("the full-disk test", &reason);
            return;
        }
    };
    let db = disk.path().join("muster.db");
    let agents = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let steady = start_agent(&url, "steady", &agents.path().join("steady"));
    let doomed = start_agent(&url, "doomed", &agents.path().join("doomed"));
    for node_id in ["steady", "doomed"] {
        wait_for_state(&url, &[node_id], NodeState::Online, Duration::from_secs(20)).await;
    }
    wait_for_health(&url, ServingStatus::Serving, Duration::from_secs(20)).await;
    // Held open for the whole test, so that the coordinator's connections
    // are never the database's last: the last one to close would checkpoint
    // and delete the log, freeing blocks on the full disk. The coordinator's
    // periodic checkpoints cannot write anything while the log is empty.
    let mut reader = SqliteConnection::establish(&db.display().to_string()).expect("open db");
    let filler = fill_with_empty_wal(&disk, &coordinator.process, &mut reader);

    wait_for_health(&url, ServingStatus::NotServing, OUTAGE_NOTICED).await;
    let refused = RawStream::refused(
        &url,
        register_message("newcomer", "http://127.0.0.1:9", "b"),
    )
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("full"),
        "the cause is named: {refused:?}"
    );
    drop(doomed);
    wait_for_state(
        &url,
        &["doomed"],
        NodeState::Offline,
        Duration::from_secs(10),
    )
    .await;
    hold_for(
        "steady ONLINE while the disk is full",
        Duration::from_secs(4),
        || {
            let url = url.clone();
            async move {
                let node = node(&url, "steady").await.ok_or("steady missing")?;
                match state_of(&node) {
                    NodeState::Online => Ok(()),
                    other => Err(format!("steady is {other:?}")),
                }
            }
        },
    )
    .await;
    assert!(!stored_offline(&mut reader, "doomed"));

    // Space is freed: the coordinator recovers without a restart and writes
    // the change it kept.
    std::fs::remove_file(&filler).unwrap();
    wait_for_health(&url, ServingStatus::Serving, OUTAGE_NOTICED).await;
    wait_for(
        "doomed's OFFLINE change to be written",
        OUTAGE_NOTICED,
        || {
            let offline = stored_offline(&mut reader, "doomed");
            async move { offline.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        coordinator
            .process
            .log_count(&["database writes are failing"]),
        1
    );

    // Full again, then SIGTERM with a change unsaved: the final flush tries
    // for its deadline, then names what it could not save.
    let _filler = fill_with_empty_wal(&disk, &coordinator.process, &mut reader);
    wait_for_health(&url, ServingStatus::NotServing, OUTAGE_NOTICED).await;
    drop(steady);
    wait_for_state(
        &url,
        &["steady"],
        NodeState::Offline,
        Duration::from_secs(10),
    )
    .await;
    let skip = coordinator.process.log_len();
    let signalled = std::time::Instant::now();
    coordinator.process.signal(Signal::SIGTERM);
    let summary = coordinator
        .process
        .wait_for_log(skip, Duration::from_secs(30), |line| {
            line.contains("did not take").then(|| line.to_owned())
        })
        .await;
    assert!(summary.contains("full"), "the cause is named: {summary}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(4),
        "the final flush gave up after {:?}, before its deadline",
        signalled.elapsed()
    );
    let line = coordinator
        .process
        .wait_for_log(skip, Duration::from_secs(30), |line| {
            (line.contains("not saved") && line.contains("node_id=steady")).then(|| line.to_owned())
        })
        .await;
    assert!(line.contains("went OFFLINE"), "{line}");
    coordinator
        .process
        .wait_for_log(skip, Duration::from_secs(30), |line| {
            line.contains("coordinator stopped").then_some(())
        })
        .await;
    assert!(!stored_offline(&mut reader, "steady"));
    coordinator
        .process
        .stop_with(Signal::SIGTERM, Duration::from_secs(20));

    // Started on the full disk, a coordinator refuses to, naming the cause:
    // a write that is rolled back would pass, so start-up commits one.
    let mut command = Command::new(env!("CARGO_BIN_EXE_muster"));
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
        .env("MUSTER_LOG", "off");
    let output = output_within(command, Duration::from_secs(20));
    common::one_line_error(&output, &db.display().to_string());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("disk is full"), "{stderr}");
    drop(reader);
}
