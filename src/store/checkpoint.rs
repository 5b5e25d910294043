//! WAL checkpoints on a thread of their own. Every connection is opened
//! with automatic checkpoints off, so no commit ever waits for one: the
//! copy of the WAL into the database and its fsync happen here, in PASSIVE
//! mode, which never blocks a writer. Under a steady stream of commits
//! (leases at thousands a second) the fsync would otherwise stall whichever
//! writer crossed the WAL's threshold, and every caller waiting for it.
//!
//! Invariant: the thread ends once the store's connections are gone; a
//! failed checkpoint is retried at the next period (it fails only while the
//! database itself is failing, which writes report).

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use diesel::connection::SimpleConnection;
use tracing::debug;

use super::{StoreError, connections::Connections};
use crate::error::display_chain;

/// How often the WAL is copied into the database.
const PERIOD: Duration = Duration::from_millis(200);

pub(super) fn start(connections: &Arc<Connections>) -> Result<(), StoreError> {
    let connections = Arc::downgrade(connections);
    std::thread::Builder::new()
        .name("muster-checkpoint".to_owned())
        .spawn(move || run(&connections))
        .map(drop)
        .map_err(StoreError::CheckpointerStart)
}

fn run(connections: &Weak<Connections>) {
    loop {
        std::thread::sleep(PERIOD);
        let Some(connections) = connections.upgrade() else {
            return;
        };
        let checkpointed = connections.get().and_then(|mut conn| {
            conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);")
                .map_err(StoreError::from)
        });
        if let Err(error) = checkpointed {
            debug!(error = %display_chain(&error), "WAL checkpoint failed; will retry");
        }
    }
}
