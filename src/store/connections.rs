//! The store's database connections, and whether writes through them
//! currently succeed.
//!
//! Invariants:
//! - Every write's outcome is reported: a failed write makes the store
//!   [`Availability::Failing`], a successful one makes it available again.
//!   Reads report nothing, since a database that can be read may still
//!   refuse every write.
//! - After a failed write, every pooled connection is dropped and the next
//!   write opens a fresh one. SQLite opens a file it cannot write read-only,
//!   and such a connection stays read-only after the file becomes writable
//!   again; a fresh one sees the file as it is now. A PostgreSQL connection
//!   that failed may be dead (the server restarted, the network dropped
//!   it); a fresh one reconnects, so the store recovers by itself once the
//!   server is back. The exception is a
//!   database file gone from its path: the open connections keep it, and
//!   are the ones that can write to it again if it is put back.
//! - Only connections of the current pool speak for availability. A write
//!   through a connection of a replaced pool (one that was checked out when
//!   the pool was replaced) still returns its outcome to its caller, but
//!   neither clears nor raises an outage: an old connection that can still
//!   write says nothing about the fresh ones, and one that fails says nothing
//!   new.

use std::{
    sync::{PoisonError, RwLock},
    time::Duration,
};

use diesel::r2d2::Pool;
use tokio::sync::watch;

use super::{DbPool, Manager, PooledDb, StoreError, Target};
use crate::error::display_chain;

const POOL_SIZE: u32 = 4;
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the store's writes currently succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// The last write failed; `cause` says why, on one line.
    Failing {
        cause: String,
    },
}

pub(super) struct Connections {
    target: Target,
    pool: RwLock<Generation>,
    availability: watch::Sender<Availability>,
}

/// A pool and how many pools came before it.
struct Generation {
    number: u64,
    pool: DbPool,
}

impl Connections {
    /// Opens the pool, waiting until its first connection is established.
    pub(super) fn open(target: Target) -> Result<Self, StoreError> {
        let pool = builder().build(Manager::new(target.clone()))?;
        Ok(Self {
            target,
            pool: RwLock::new(Generation { number: 0, pool }),
            availability: watch::Sender::new(Availability::Available),
        })
    }

    pub(super) fn get(&self) -> Result<PooledDb, StoreError> {
        Ok(self.current().1.get()?)
    }

    fn current(&self) -> (u64, DbPool) {
        let generation = self.pool.read().unwrap_or_else(PoisonError::into_inner);
        (generation.number, generation.pool.clone())
    }

    /// Runs `write` on a connection and reports its outcome.
    pub(super) fn write<T>(
        &self,
        write: impl FnOnce(&mut PooledDb) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (generation, pool) = self.current();
        let outcome = pool
            .get()
            .map_err(StoreError::from)
            .and_then(|mut conn| write(&mut conn));
        if generation == self.current().0 {
            self.report(outcome.as_ref().err());
        }
        outcome
    }

    /// Records the outcome of a write: `None` if it succeeded.
    pub(super) fn report(&self, failure: Option<&StoreError>) {
        match failure {
            None => {
                self.availability.send_if_modified(|now| {
                    let changed = *now != Availability::Available;
                    *now = Availability::Available;
                    changed
                });
            }
            Some(error) if error.is_unavailable() => {
                metrics::counter!("muster_store_write_failures_total").increment(1);
                // A deposed leader's connections are sound.
                if !error.is_file_gone() && !error.is_fenced() {
                    self.reconnect();
                }
                let cause = display_chain(error);
                // Only a change of state is news; a new cause of the same
                // outage is kept for the next reader but wakes nobody.
                self.availability.send_if_modified(|now| {
                    let changed = *now == Availability::Available;
                    *now = Availability::Failing { cause };
                    changed
                });
            }
            Some(_) => {}
        }
    }

    pub(super) fn availability(&self) -> watch::Receiver<Availability> {
        self.availability.subscribe()
    }

    /// Replaces the pool with one that has no connection yet; connections
    /// of the old one close as soon as their holders return them.
    fn reconnect(&self) {
        let fresh = builder().build_unchecked(Manager::new(self.target.clone()));
        let mut generation = self.pool.write().unwrap_or_else(PoisonError::into_inner);
        generation.number += 1;
        generation.pool = fresh;
    }
}

fn builder() -> diesel::r2d2::Builder<Manager> {
    Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(1))
        .connection_timeout(CONNECTION_TIMEOUT)
}
