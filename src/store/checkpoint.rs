//! SQLite's WAL checkpoints on a thread of their own (PostgreSQL has its
//! own checkpointer). Every connection is opened
//! with automatic checkpoints off, so no commit ever waits for one: the
//! copy of the WAL into the database and its fsync happen here, in PASSIVE
//! mode, which never blocks a writer. Under a steady stream of commits
//! (leases at thousands a second) the fsync would otherwise stall whichever
//! writer crossed the WAL's threshold, and every caller waiting for it.
//!
//! A PASSIVE checkpoint alone never lets the WAL start again from its
//! beginning while commits keep coming: SQLite rewinds it only when a
//! writer finds every frame already copied, and under a steady stream some
//! frame always arrived after the checkpoint began, so the file would grow
//! without bound (hundreds of MB a minute under lease load). Once the WAL
//! holds more than [`WalLimits::restart_bytes`] of frames, the thread takes
//! the store's write gate, which holds back every write transaction of this
//! process, and runs a RESTART checkpoint: it copies only the frames that
//! came after the PASSIVE one it has just run, and the next commit writes
//! from the WAL's beginning again. The file keeps its size and is reused, so
//! no write waits while a large file is cut short (on a disk mounted with
//! `discard`, cutting 64 MiB took 15 ms); only a file grown far past the
//! limit while readers held it back is cut (TRUNCATE) instead.
//!
//! Invariant: the thread ends once the store's connections are gone; a
//! failed checkpoint is retried at the next period (it fails only while the
//! database itself is failing, which writes report).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use diesel::{
    QueryableByName, RunQueryDsl, SqliteConnection, connection::SimpleConnection, sql_types::BigInt,
};
use parking_lot::FairMutex;
use tracing::{debug, info};

use super::{
    StoreError,
    backend::{BUSY_TIMEOUT, Db},
    connections::Connections,
};
use crate::error::display_chain;

/// How often the WAL is copied into the database.
const PERIOD: Duration = Duration::from_millis(200);
/// How long a checkpoint under the write gate waits for readers of older
/// snapshots (writes are held back meanwhile).
const GATED_WAITS_FOR_READERS: Duration = Duration::from_millis(50);
/// How large the WAL may grow.
#[derive(Clone, Copy, Debug)]
pub(super) struct WalLimits {
    /// Frames past which the WAL is rewound to its beginning.
    pub restart_bytes: u64,
    /// A file past this size is cut short when it is rewound.
    pub truncate_bytes: u64,
    /// After the WAL could not be rewound (another connection holds an old
    /// snapshot open), the next try waits this long, so that writes are not
    /// held back every period for nothing.
    pub retry_after: Duration,
}

impl Default for WalLimits {
    fn default() -> Self {
        Self {
            restart_bytes: 64 * 1024 * 1024,
            truncate_bytes: 256 * 1024 * 1024,
            retry_after: Duration::from_secs(10),
        }
    }
}

/// Starts the thread for the database whose WAL is at `wal`; `write_gate`
/// is the lock every write transaction of the store holds.
pub(super) fn start(
    connections: &Arc<Connections>,
    wal: PathBuf,
    write_gate: Arc<FairMutex<()>>,
    limits: WalLimits,
) -> Result<(), StoreError> {
    let connections = Arc::downgrade(connections);
    std::thread::Builder::new()
        .name("muster-checkpoint".to_owned())
        .spawn(move || run(&connections, &wal, &write_gate, limits))
        .map(drop)
        .map_err(StoreError::CheckpointerStart)
}

#[derive(Clone, Copy)]
enum Mode {
    Passive,
    Restart,
    Truncate,
}

impl Mode {
    fn pragma(self) -> &'static str {
        match self {
            Self::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
            Self::Restart => "PRAGMA wal_checkpoint(RESTART)",
            Self::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Passive => "passive",
            Self::Restart => "restart",
            Self::Truncate => "truncate",
        }
    }
}

/// What `PRAGMA wal_checkpoint` reports.
#[derive(QueryableByName)]
struct Checkpointed {
    /// 1 if readers or writers kept it from finishing.
    #[diesel(sql_type = BigInt)]
    busy: i64,
    /// Frames in the WAL since it last started from its beginning.
    #[diesel(sql_type = BigInt)]
    log: i64,
}

fn sqlite(conn: &mut Db) -> &mut SqliteConnection {
    let Db::Sqlite(sqlite) = conn else {
        unreachable!("only a SQLite store has a checkpoint thread")
    };
    sqlite
}

fn checkpoint(conn: &mut Db, mode: Mode) -> Result<Checkpointed, StoreError> {
    Ok(diesel::sql_query(mode.pragma()).get_result(sqlite(conn))?)
}

fn page_bytes(conn: &mut Db) -> Result<u64, StoreError> {
    #[derive(QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = BigInt)]
        page_size: i64,
    }
    let page: PageSize = diesel::sql_query("PRAGMA page_size").get_result(sqlite(conn))?;
    Ok(u64::try_from(page.page_size).unwrap_or(0))
}

fn run(connections: &Weak<Connections>, wal: &Path, write_gate: &FairMutex<()>, limits: WalLimits) {
    let mut rewind_not_before = Instant::now();
    // The WAL's frame count when it was last rewound: a RESTART only makes
    // the next commit start from the beginning, so until one comes the
    // count stays, and means nothing new to rewind.
    let mut rewound_at_frames = None;
    loop {
        std::thread::sleep(PERIOD);
        let Some(connections) = connections.upgrade() else {
            return;
        };
        let checkpointed = connections.get().and_then(|mut conn| {
            let passive = checkpoint(&mut conn, Mode::Passive)?;
            let frames = u64::try_from(passive.log).unwrap_or(0);
            if rewound_at_frames == Some(passive.log)
                || frames.saturating_mul(page_bytes(&mut conn)?) <= limits.restart_bytes
                || Instant::now() < rewind_not_before
            {
                return Ok(());
            }
            let mode = if wal_bytes(wal) > limits.truncate_bytes {
                Mode::Truncate
            } else {
                Mode::Restart
            };
            let rewound = {
                let _no_write_under_way = write_gate.lock();
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {};",
                    GATED_WAITS_FOR_READERS.as_millis()
                ))?;
                let rewound = checkpoint(&mut conn, mode);
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {};",
                    BUSY_TIMEOUT.as_millis()
                ))?;
                rewound
            }?;
            if rewound.busy == 0 {
                rewound_at_frames = Some(rewound.log);
                metrics::counter!("muster_store_wal_rewinds_total", "mode" => mode.label())
                    .increment(1);
            } else {
                rewind_not_before = Instant::now() + limits.retry_after;
                info!(
                    wal = %wal.display(),
                    retry_in = ?limits.retry_after,
                    "the WAL could not be rewound: another connection still reads an older snapshot"
                );
            }
            Ok(())
        });
        if let Err(error) = checkpointed {
            debug!(error = %display_chain(&error), "WAL checkpoint failed; will retry");
        }
    }
}

fn wal_bytes(wal: &Path) -> u64 {
    std::fs::metadata(wal).map_or(0, |metadata| metadata.len())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::{backend::Target, file::Found};

    const MIB: u64 = 1024 * 1024;

    struct Database {
        _dir: tempfile::TempDir,
        wal: PathBuf,
        connections: Arc<Connections>,
        write_gate: Arc<FairMutex<()>>,
    }

    impl Database {
        fn with_checkpoints(limits: WalLimits) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("wal.db");
            let connections =
                Arc::new(Connections::open(Target::sqlite(&path, Found::Nothing)).unwrap());
            connections
                .get()
                .unwrap()
                .batch_execute("CREATE TABLE pages (body BLOB NOT NULL)")
                .unwrap();
            let write_gate = Arc::new(FairMutex::new(()));
            let wal = dir.path().join("wal.db-wal");
            start(&connections, wal.clone(), write_gate.clone(), limits).unwrap();
            Self {
                _dir: dir,
                wal,
                connections,
                write_gate,
            }
        }

        /// One commit of about a page, under the write gate as the store's.
        fn commit_a_page(&self, conn: &mut Db) {
            let _in_order = self.write_gate.lock();
            conn.batch_execute("INSERT INTO pages (body) VALUES (zeroblob(4000))")
                .unwrap();
        }

        fn wal_bytes(&self) -> u64 {
            wal_bytes(&self.wal)
        }

        /// The WAL header's checkpoint sequence: it moves each time the
        /// WAL starts again from its beginning.
        fn rewinds(&self) -> u32 {
            use std::io::Read;
            let mut header = [0u8; 16];
            std::fs::File::open(&self.wal)
                .and_then(|mut file| file.read_exact(&mut header))
                .map_or(0, |()| {
                    u32::from_be_bytes([header[12], header[13], header[14], header[15]])
                })
        }
    }

    /// Commits that never stop, beside a reader always at work as in a
    /// coordinator: the WAL is rewound and reused, not grown. (One writer
    /// in one process leaves SQLite moments to rewind it by itself, so this
    /// bounds the file rather than singling out the gated RESTART; the
    /// lease benchmark is where the gated step was seen to matter.)
    #[test]
    fn a_steady_stream_of_commits_reuses_the_wal_instead_of_growing_it() {
        let db = Database::with_checkpoints(WalLimits {
            restart_bytes: MIB,
            truncate_bytes: 1024 * MIB,
            retry_after: Duration::from_millis(200),
        });
        let mut conn = db.connections.get().unwrap();
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = {
            let (mut reader, reading) = (db.connections.get().unwrap(), reading.clone());
            std::thread::spawn(move || {
                while reading.load(std::sync::atomic::Ordering::Relaxed) {
                    reader
                        .batch_execute("SELECT max(rowid) FROM pages")
                        .unwrap();
                }
            })
        };
        // Long enough for a WAL that is never reused to hold many times
        // what one checkpoint period lets through.
        let writing_for = Duration::from_secs(4);
        let began = Instant::now();
        let first = db.rewinds();
        let (mut commits, mut largest) = (0u64, 0u64);
        while began.elapsed() < writing_for || db.rewinds().wrapping_sub(first) < 3 {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "after {commits} commits the WAL was rewound {} times and reached {largest} bytes",
                db.rewinds().wrapping_sub(first)
            );
            db.commit_a_page(&mut conn);
            commits += 1;
            largest = largest.max(db.wal_bytes());
        }
        reading.store(false, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
        // Every commit wrote at least one 4 KiB frame.
        let written = commits * 4096;
        assert!(
            largest < written / 2,
            "{commits} commits wrote at least {written} bytes and grew the WAL to {largest} \
             bytes: it was not reused"
        );
    }

    #[test]
    fn a_wal_grown_while_a_reader_held_it_back_is_cut_short_once_the_reader_ends() {
        let db = Database::with_checkpoints(WalLimits {
            restart_bytes: MIB,
            truncate_bytes: 8 * MIB,
            retry_after: Duration::from_millis(200),
        });
        let mut conn = db.connections.get().unwrap();
        let mut reader = db.connections.get().unwrap();
        db.commit_a_page(&mut conn);
        reader
            .batch_execute("BEGIN; SELECT count(*) FROM pages;")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while db.wal_bytes() <= 16 * MIB {
            assert!(Instant::now() < deadline, "the WAL never grew past 16 MiB");
            db.commit_a_page(&mut conn);
        }
        reader.batch_execute("COMMIT").unwrap();
        while db.wal_bytes() > 8 * MIB {
            assert!(
                Instant::now() < deadline,
                "the WAL stayed at {} bytes after its reader ended",
                db.wal_bytes()
            );
            db.commit_a_page(&mut conn);
        }
    }
}
