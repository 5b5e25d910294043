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
//! without bound (hundreds of MB a minute under lease load). Once it is
//! past [`WAL_TRUNCATE_BYTES`], the thread takes the store's write gate,
//! which holds back every write transaction of this process, and runs a
//! TRUNCATE checkpoint: it copies only the frames since the last PASSIVE
//! one, and empties the file.
//!
//! Invariant: the thread ends once the store's connections are gone; a
//! failed checkpoint is retried at the next period (it fails only while the
//! database itself is failing, which writes report).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use diesel::connection::SimpleConnection;
use parking_lot::FairMutex;
use tracing::{debug, info};

use super::{StoreError, backend::BUSY_TIMEOUT, connections::Connections};
use crate::error::display_chain;

/// How often the WAL is copied into the database.
const PERIOD: Duration = Duration::from_millis(200);
/// The WAL file's size past which it is emptied under the write gate.
const WAL_TRUNCATE_BYTES: u64 = 64 * 1024 * 1024;
/// How long the TRUNCATE checkpoint waits for readers of older snapshots
/// (writes are held back meanwhile).
const TRUNCATE_WAITS_FOR_READERS: Duration = Duration::from_millis(50);
/// After the WAL could not be emptied (another process holds an old
/// snapshot open), the next try waits this long, so that writes are not
/// held back every period for nothing.
const TRUNCATE_RETRY: Duration = Duration::from_secs(10);

/// Starts the thread for the database whose WAL is at `wal`; `write_gate`
/// is the lock every write transaction of the store holds.
pub(super) fn start(
    connections: &Arc<Connections>,
    wal: PathBuf,
    write_gate: Arc<FairMutex<()>>,
) -> Result<(), StoreError> {
    let connections = Arc::downgrade(connections);
    std::thread::Builder::new()
        .name("muster-checkpoint".to_owned())
        .spawn(move || run(&connections, &wal, &write_gate))
        .map(drop)
        .map_err(StoreError::CheckpointerStart)
}

fn run(connections: &Weak<Connections>, wal: &Path, write_gate: &FairMutex<()>) {
    let mut truncate_not_before = Instant::now();
    loop {
        std::thread::sleep(PERIOD);
        let Some(connections) = connections.upgrade() else {
            return;
        };
        let checkpointed = connections.get().and_then(|mut conn| {
            conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);")?;
            if wal_bytes(wal) <= WAL_TRUNCATE_BYTES || Instant::now() < truncate_not_before {
                return Ok(());
            }
            let truncated = {
                let _no_write_under_way = write_gate.lock();
                let truncated = conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA wal_checkpoint(TRUNCATE);",
                    TRUNCATE_WAITS_FOR_READERS.as_millis()
                ));
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {};",
                    BUSY_TIMEOUT.as_millis()
                ))?;
                truncated
            };
            truncated?;
            if wal_bytes(wal) > WAL_TRUNCATE_BYTES {
                truncate_not_before = Instant::now() + TRUNCATE_RETRY;
                info!(
                    wal = %wal.display(),
                    retry_in = ?TRUNCATE_RETRY,
                    "the WAL could not be emptied: another connection still reads an older snapshot"
                );
            } else {
                metrics::counter!("muster_store_wal_truncations_total").increment(1);
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
