//! A real PostgreSQL server for a test, from the machine's own packages.
//!
//! [`Postgres::start`] finds `initdb` and `pg_ctl` in `PATH` or under
//! `/usr/lib/postgresql/*/bin`, and runs them as the `postgres` user when
//! the tests run as root (the server refuses to run as root). The cluster
//! lives in a temporary directory owned by that user, listens on a free
//! loopback port only, with trust authentication (nothing but loopback can
//! reach it), and is stopped with `pg_ctl stop -m immediate` when the guard
//! drops, whatever the test did. Without PostgreSQL a test is skipped with
//! one line, and fails under `CI=true`.
//!
//! Self-contained, so that the store's unit tests can include it too.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// How long the server may take to accept connections after a start.
const READY_DEADLINE: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;
const SUPERUSER: &str = "muster";
const INSTALL: &str = "apt-get install -y postgresql";

/// One PostgreSQL cluster, stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    /// Runs its commands as this user (when the tests run as root).
    run_as: Option<String>,
    _dir: tempfile::TempDir,
    data: PathBuf,
    sockets: PathBuf,
    log: PathBuf,
    port: u16,
    databases: AtomicUsize,
}

impl Postgres {
    /// Starts a fresh cluster for `what`; `None` (having said so, or failed
    /// the test under `CI=true`) where PostgreSQL is not installed.
    pub fn start(what: &str) -> Option<Self> {
        let Some(bin) = find_bin() else {
            skip(
                what,
                &format!("PostgreSQL's initdb and pg_ctl are not installed ({INSTALL})"),
            );
            return None;
        };
        let run_as = running_as_root().then(|| "postgres".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("muster-postgres")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        std::fs::create_dir(&sockets).expect("socket directory");
        if let Some(user) = &run_as {
            let (uid, gid) = ids_of(user);
            for path in [dir.path(), &sockets] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
            }
        }
        let mut postgres = Self {
            bin,
            run_as,
            log: dir.path().join("postgres.log"),
            _dir: dir,
            data,
            sockets,
            port: 0,
            databases: AtomicUsize::new(0),
        };
        postgres.must(
            "initdb",
            &[
                "-D",
                path_str(&postgres.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            postgres.port = free_port();
            match postgres.try_start_server() {
                Ok(()) => return Some(postgres),
                // Another process may take the port between our probe and
                // the server's bind.
                Err(failure) => failures.push(failure),
            }
        }
        panic!("PostgreSQL did not start: {failures:#?}");
    }

    /// A new, empty database, and its URL.
    pub fn create_database(&self) -> String {
        let name = format!("muster_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        self.must(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                &name,
            ],
        );
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once, as a crash would: clients lose their
    /// connections.
    pub fn stop(&self) {
        self.must(
            "pg_ctl",
            &["-D", path_str(&self.data), "stop", "-m", "immediate", "-w"],
        );
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&self) {
        self.try_start_server()
            .unwrap_or_else(|failure| panic!("PostgreSQL did not start again: {failure}"));
    }

    fn try_start_server(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            path_str(&self.sockets)
        );
        let started = Instant::now();
        let output = self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data),
                "-l",
                path_str(&self.log),
                "-o",
                &options,
                "-w",
                "-t",
                &READY_DEADLINE.as_secs().to_string(),
                "start",
            ],
        );
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl start failed after {:?}: {}{}\nserver log:\n{}",
            started.elapsed(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        ))
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        command
            .args(args)
            .env("PGHOST", "127.0.0.1")
            .current_dir(self.data.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()))
    }

    fn must(&self, program: &str, args: &[&str]) {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", path_str(&self.data), "stop", "-m", "immediate", "-w"],
        );
    }
}

/// The directory holding `initdb` and `pg_ctl`: from `PATH`, else the
/// newest under `/usr/lib/postgresql`.
fn find_bin() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                // A symbolic link into a version's directory finds its
                // createdb beside it.
                let real = std::fs::canonicalize(dir.join("initdb")).ok()?;
                return real.parent().map(Path::to_owned);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Says on the real stderr, past the test harness's capture, that `what`
/// did not run; under `CI=true` nothing may be skipped, so this fails.
fn skip(what: &str, reason: &str) {
    use std::io::Write;
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true, so {what} must run, but {reason}"
    );
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {what}: {reason} (with CI=true this is a failure)"
    );
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|process| process.uid() == 0)
}

fn ids_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, user])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no user {user} to run PostgreSQL as"))
    };
    (id("-u"), id("-g"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}
