//! Leadership among coordinators that share one database.
//!
//! Only a shared database server (PostgreSQL) arbitrates leadership. It keeps
//! one leadership row — holder, advertised URL, epoch, expiry — taken and
//! renewed with conditional updates judged by the database's own clock,
//! never by a coordinator's. Taking the row over from another holder raises
//! the epoch; renewing it keeps the epoch.
//!
//! A coordinator that leads calls [`Store::fence`] with its epoch. From then
//! on every write transaction of the store checks, inside the transaction,
//! that this epoch still holds an unexpired lease; a write of a deposed
//! leader fails with [`StoreError::Fenced`] and changes nothing.
//!
//! SQLite is a single coordinator, made exclusive by its lock file
//! ([`super::DatabaseLock`]): it arbitrates nothing, always leads, and its
//! epoch is [`SINGLE_COORDINATOR_EPOCH`].

use std::time::Duration;

use super::{Store, StoreError};

/// The epoch of a coordinator on a database that arbitrates no leadership.
pub const SINGLE_COORDINATOR_EPOCH: u64 = 0;

/// Who leads, as the database says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The `holder` the leader campaigned with (unique per process).
    pub holder: String,
    /// The URL the leader advertises to agents and operators.
    pub url: String,
    pub epoch: u64,
    /// How long the lease has left by the database's clock at the time of
    /// the read; zero when it has expired.
    pub expires_in: Duration,
}

/// The outcome of [`Store::campaign`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Campaign {
    /// `holder` leads at `epoch` until the lease runs out.
    Won { epoch: u64 },
    /// Another holder leads, or (`None`) the row could not be taken this time.
    Lost { leader: Option<Leader> },
}

impl Store {
    /// Whether this database arbitrates leadership among coordinators.
    pub fn arbitrates_leadership(&self) -> bool {
        false
    }

    /// Takes the leadership for `lease` if nobody holds it or its lease has
    /// expired (a new, higher epoch), or renews it if `holder` holds it
    /// already (the same epoch).
    pub async fn campaign(
        &self,
        _holder: &str,
        _url: &str,
        _lease: Duration,
    ) -> Result<Campaign, StoreError> {
        Ok(Campaign::Won {
            epoch: SINGLE_COORDINATOR_EPOCH,
        })
    }

    /// Extends `holder`'s lease at `epoch` by `lease`. `Ok(false)`: the lease
    /// was lost (expired and taken, or never held); the caller is deposed.
    pub async fn renew_leadership(
        &self,
        _holder: &str,
        _epoch: u64,
        _lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Gives the leadership up at once, so a standby need not wait for the
    /// lease to run out. Does nothing if `holder` no longer holds `epoch`.
    pub async fn resign_leadership(&self, _holder: &str, _epoch: u64) -> Result<(), StoreError> {
        Ok(())
    }

    /// The current leader, if the row is held by anyone (expired or not).
    pub async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        Ok(None)
    }

    /// Makes every later write transaction check that `epoch` still leads.
    pub fn fence(&self, _epoch: u64) {}
}
