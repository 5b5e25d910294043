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
//! The row is taken with one conditional upsert: inserted if absent, taken
//! over (epoch + 1) if its lease has expired by the database's `now()`, or
//! renewed (same epoch) if `holder` still holds it. Every fenced write
//! transaction first reads the row `FOR SHARE` where the epoch matches and
//! the lease is unexpired: the takeover's update waits until that write has
//! committed, and a write that starts after a takeover finds no such row and
//! is refused (counted in `muster_store_fenced_writes_total`).
//!
//! SQLite is a single coordinator, made exclusive by its lock file
//! ([`super::DatabaseLock`]): it arbitrates nothing, always leads, and its
//! epoch is [`SINGLE_COORDINATOR_EPOCH`].

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use diesel::{
    OptionalExtension, PgConnection, QueryableByName, RunQueryDsl, sql_query,
    sql_types::{BigInt, Text},
};

use super::{Store, StoreError, backend::Db};

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

const CAMPAIGN: &str = "\
    INSERT INTO leadership AS current (id, holder, url, epoch, expires_at) \
    VALUES (1, $1, $2, 1, now() + $3::float8 * interval '1 millisecond') \
    ON CONFLICT (id) DO UPDATE SET \
        holder = EXCLUDED.holder, \
        url = EXCLUDED.url, \
        epoch = CASE WHEN current.holder = EXCLUDED.holder AND current.expires_at > now() \
                THEN current.epoch ELSE current.epoch + 1 END, \
        expires_at = EXCLUDED.expires_at \
    WHERE current.holder = EXCLUDED.holder OR current.expires_at <= now() \
    RETURNING epoch";

const RENEW: &str = "\
    UPDATE leadership SET expires_at = now() + $3::float8 * interval '1 millisecond' \
    WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()";

/// Expired a millisecond ago, so that a campaign in a later transaction
/// finds it expired whatever the clock's resolution.
const RESIGN: &str = "\
    UPDATE leadership SET expires_at = now() - interval '1 millisecond' \
    WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()";

const LEADER: &str = "\
    SELECT holder, url, epoch, \
        GREATEST(0, CEIL(EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::BIGINT \
            AS expires_in_ms \
    FROM leadership WHERE id = 1";

const FENCE: &str = "\
    SELECT epoch FROM leadership WHERE id = 1 AND epoch = $1 AND expires_at > now() FOR SHARE";

const CURRENT_EPOCH: &str = "SELECT epoch FROM leadership WHERE id = 1";

#[derive(QueryableByName)]
struct EpochRow {
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

#[derive(QueryableByName)]
struct LeaderRow {
    #[diesel(sql_type = Text)]
    holder: String,
    #[diesel(sql_type = Text)]
    url: String,
    #[diesel(sql_type = BigInt)]
    epoch: i64,
    #[diesel(sql_type = BigInt)]
    expires_in_ms: i64,
}

impl From<LeaderRow> for Leader {
    fn from(row: LeaderRow) -> Self {
        Self {
            holder: row.holder,
            url: row.url,
            epoch: epoch_from_column(row.epoch),
            expires_in: Duration::from_millis(u64::try_from(row.expires_in_ms).unwrap_or(0)),
        }
    }
}

fn epoch_from_column(epoch: i64) -> u64 {
    u64::try_from(epoch).unwrap_or(0)
}

fn to_column(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn millis(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// The epoch this store's writes are fenced with.
#[derive(Debug, Default)]
pub(super) struct Fence {
    /// [`SINGLE_COORDINATOR_EPOCH`]: not fenced (every PostgreSQL epoch is
    /// above it).
    epoch: AtomicU64,
}

impl Fence {
    /// Inside a write transaction, before anything is written: refuses the
    /// transaction unless the fencing epoch still holds an unexpired lease,
    /// and holds the leadership row until the transaction ends, so no
    /// takeover can commit in between.
    pub(super) fn check(&self, conn: &mut Db) -> Result<(), StoreError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let Db::Postgres(conn) = conn else {
            return Ok(());
        };
        if epoch == SINGLE_COORDINATOR_EPOCH {
            return Ok(());
        }
        let held: Option<EpochRow> = sql_query(FENCE)
            .bind::<BigInt, _>(to_column(epoch))
            .get_result(conn)
            .optional()?;
        if held.is_some() {
            return Ok(());
        }
        metrics::counter!("muster_store_fenced_writes_total").increment(1);
        let current = current_epoch(conn)?.filter(|current| *current != epoch);
        Err(StoreError::Fenced { epoch, current })
    }
}

fn current_epoch(conn: &mut PgConnection) -> Result<Option<u64>, StoreError> {
    let row: Option<EpochRow> = sql_query(CURRENT_EPOCH).get_result(conn).optional()?;
    Ok(row.map(|row| epoch_from_column(row.epoch)))
}

fn leader_of(conn: &mut PgConnection) -> Result<Option<Leader>, StoreError> {
    let row: Option<LeaderRow> = sql_query(LEADER).get_result(conn).optional()?;
    Ok(row.map(Leader::from))
}

impl Store {
    /// Whether this database arbitrates leadership among coordinators.
    pub fn arbitrates_leadership(&self) -> bool {
        self.file.is_none()
    }

    /// Takes the leadership for `lease` if nobody holds it or its lease has
    /// expired (a new, higher epoch), or renews it if `holder` holds it
    /// already (the same epoch).
    pub async fn campaign(
        &self,
        holder: &str,
        url: &str,
        lease: Duration,
    ) -> Result<Campaign, StoreError> {
        if !self.arbitrates_leadership() {
            return Ok(Campaign::Won {
                epoch: SINGLE_COORDINATOR_EPOCH,
            });
        }
        let (holder, url) = (holder.to_owned(), url.to_owned());
        self.on_postgres(move |conn| {
            let won: Option<EpochRow> = sql_query(CAMPAIGN)
                .bind::<Text, _>(&holder)
                .bind::<Text, _>(&url)
                .bind::<BigInt, _>(millis(lease))
                .get_result(conn)
                .optional()?;
            Ok(match won {
                Some(row) => Campaign::Won {
                    epoch: epoch_from_column(row.epoch),
                },
                None => Campaign::Lost {
                    leader: leader_of(conn)?,
                },
            })
        })
        .await
    }

    /// Extends `holder`'s lease at `epoch` by `lease`. `Ok(false)`: the lease
    /// was lost (expired and taken, or never held); the caller is deposed.
    pub async fn renew_leadership(
        &self,
        holder: &str,
        epoch: u64,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        if !self.arbitrates_leadership() {
            return Ok(true);
        }
        let holder = holder.to_owned();
        self.on_postgres(move |conn| {
            let renewed = sql_query(RENEW)
                .bind::<Text, _>(&holder)
                .bind::<BigInt, _>(to_column(epoch))
                .bind::<BigInt, _>(millis(lease))
                .execute(conn)?;
            Ok(renewed == 1)
        })
        .await
    }

    /// Gives the leadership up at once, so a standby need not wait for the
    /// lease to run out. Does nothing if `holder` no longer holds `epoch`.
    pub async fn resign_leadership(&self, holder: &str, epoch: u64) -> Result<(), StoreError> {
        if !self.arbitrates_leadership() {
            return Ok(());
        }
        let holder = holder.to_owned();
        self.on_postgres(move |conn| {
            sql_query(RESIGN)
                .bind::<Text, _>(&holder)
                .bind::<BigInt, _>(to_column(epoch))
                .execute(conn)?;
            Ok(())
        })
        .await
    }

    /// The current leader, if the row is held by anyone (expired or not).
    pub async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        if !self.arbitrates_leadership() {
            return Ok(None);
        }
        self.on_postgres(leader_of).await
    }

    /// Makes every later write transaction check that `epoch` still leads.
    pub fn fence(&self, epoch: u64) {
        self.events.fence().epoch.store(epoch, Ordering::Release);
    }

    /// Runs `work` on a PostgreSQL connection of the pool, off the runtime.
    async fn on_postgres<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.read(move |conn| match &mut **conn {
            Db::Postgres(conn) => work(conn),
            Db::Sqlite(_) => unreachable!("only PostgreSQL arbitrates leadership"),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Instant, SystemTime},
    };

    use super::*;
    use crate::{
        auth::NodeSecret,
        node::{NodeId, Registration},
        registry::Change,
        store::{Enrolled, testing},
    };

    const URL_A: &str = "http://a.example:7700";
    const URL_B: &str = "http://b.example:7700";

    fn registration(node: &str, boot: &str) -> Registration {
        Registration {
            node_id: NodeId::parse("node_id", node).unwrap(),
            agent_url: format!("http://{node}:7701"),
            boot_id: boot.to_owned(),
            version: "v".to_owned(),
            hostname: node.to_owned(),
            labels: Default::default(),
            max_backoff: Duration::from_secs(90),
            gpus: Default::default(),
        }
    }

    async fn enroll(store: &Store, node: &str, boot: &str) -> Result<Enrolled, StoreError> {
        let secret = NodeSecret::parse("secret", &format!("secret-of-{node}-0123456789"))
            .unwrap()
            .hash();
        store
            .enroll(registration(node, boot), secret, SystemTime::now())
            .await
    }

    /// Waits, by the database's clock, until the lease has run out.
    async fn until_expired(store: &Store) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leader = store.leader().await.unwrap().expect("a leader row");
            if leader.expires_in.is_zero() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the lease never expired: {leader:?}"
            );
            tokio::time::sleep(leader.expires_in.min(Duration::from_millis(100))).await;
        }
    }

    #[tokio::test]
    async fn sqlite_arbitrates_nothing_and_always_leads_at_epoch_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("muster.db")).await.unwrap();
        assert!(!store.arbitrates_leadership());
        assert_eq!(
            store
                .campaign("a", URL_A, Duration::from_secs(1))
                .await
                .unwrap(),
            Campaign::Won {
                epoch: SINGLE_COORDINATOR_EPOCH
            }
        );
        assert!(
            store
                .renew_leadership("a", 0, Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert_eq!(store.leader().await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_leader_at_a_time_a_takeover_only_after_expiry_raises_the_epoch() {
        let Some(db) = testing::postgres("store::leadership::tests::one_leader_at_a_time") else {
            return;
        };
        let a = db.open().await;
        let b = db.open().await;
        assert!(a.arbitrates_leadership());
        assert_eq!(a.leader().await.unwrap(), None, "nobody before a campaign");

        let lease = Duration::from_secs(2);
        assert_eq!(
            a.campaign("a", URL_A, lease).await.unwrap(),
            Campaign::Won { epoch: 1 }
        );
        let Campaign::Lost {
            leader: Some(leader),
        } = b.campaign("b", URL_B, lease).await.unwrap()
        else {
            panic!("b won while a's lease runs");
        };
        assert_eq!((leader.holder.as_str(), leader.url.as_str()), ("a", URL_A));
        assert_eq!(leader.epoch, 1);
        assert!(leader.expires_in > Duration::ZERO && leader.expires_in <= lease);
        assert_eq!(
            a.campaign("a", URL_A, lease).await.unwrap(),
            Campaign::Won { epoch: 1 },
            "campaigning again while leading renews at the same epoch"
        );
        assert!(a.renew_leadership("a", 1, lease).await.unwrap());
        assert!(!b.renew_leadership("b", 1, lease).await.unwrap(), "not b's");

        until_expired(&b).await;
        assert!(
            !a.renew_leadership("a", 1, lease).await.unwrap(),
            "an expired lease is not renewed"
        );
        assert_eq!(
            b.campaign("b", URL_B, lease).await.unwrap(),
            Campaign::Won { epoch: 2 }
        );
        assert!(!a.renew_leadership("a", 1, lease).await.unwrap(), "deposed");
        assert!(matches!(
            a.campaign("a", URL_A, lease).await.unwrap(),
            Campaign::Lost {
                leader: Some(Leader { epoch: 2, .. })
            }
        ));

        a.resign_leadership("a", 1).await.unwrap();
        assert_eq!(
            b.leader().await.unwrap().unwrap().epoch,
            2,
            "not a's to resign"
        );
        b.resign_leadership("b", 2).await.unwrap();
        assert!(b.leader().await.unwrap().unwrap().expires_in.is_zero());
        assert_eq!(
            a.campaign("a", URL_A, lease).await.unwrap(),
            Campaign::Won { epoch: 3 },
            "a resignation frees the row at once"
        );
    }

    /// The fence's lock is what keeps a takeover from committing under a
    /// write that found its epoch valid: the takeover waits for it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_takeover_waits_for_a_fenced_write_in_flight() {
        use diesel::{Connection, connection::SimpleConnection};
        let Some(db) = testing::postgres("store::leadership::tests::a_takeover_waits") else {
            return;
        };
        let old = db.open().await;
        let new = db.open().await;
        let lease = Duration::from_secs(1);
        assert_eq!(
            old.campaign("old", URL_A, lease).await.unwrap(),
            Campaign::Won { epoch: 1 }
        );
        let crate::config::Database::Postgres(url) = &db.db else {
            unreachable!("a PostgreSQL database");
        };
        let mut in_flight = PgConnection::establish(url.expose()).unwrap();
        in_flight.batch_execute("BEGIN").unwrap();
        let held: Vec<EpochRow> = sql_query(FENCE)
            .bind::<BigInt, _>(1_i64)
            .load(&mut in_flight)
            .unwrap();
        assert_eq!(held.len(), 1, "the write found its epoch valid");

        until_expired(&new).await;
        let takeover = tokio::spawn({
            let new = new.clone();
            async move { new.campaign("new", URL_B, lease).await }
        });
        // PostgreSQL itself says when the takeover is blocked on the lock.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                !takeover.is_finished(),
                "the takeover committed under a write in flight"
            );
            let blocked: Vec<EpochRow> = sql_query(
                "SELECT count(*)::bigint AS epoch FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .load(&mut in_flight)
            .unwrap();
            if blocked.first().is_some_and(|row| row.epoch > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the takeover neither committed nor waited on the fence's lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !takeover.is_finished(),
            "the takeover committed under a write in flight"
        );
        in_flight.batch_execute("COMMIT").unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), takeover)
                .await
                .expect("the takeover goes ahead once the write has committed")
                .unwrap()
                .unwrap(),
            Campaign::Won { epoch: 2 }
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_with_an_old_epoch_is_refused_by_the_store_itself() {
        let Some(db) = testing::postgres("store::leadership::tests::a_write_with_an_old_epoch")
        else {
            return;
        };
        let old = db.open().await;
        let new = db.open().await;
        let lease = Duration::from_secs(1);
        assert_eq!(
            old.campaign("old", URL_A, lease).await.unwrap(),
            Campaign::Won { epoch: 1 }
        );
        old.fence(1);
        let Enrolled::Admitted(first) = enroll(&old, "a", "b1").await.unwrap() else {
            panic!("the leader's registration was refused");
        };

        until_expired(&new).await;
        let refused = enroll(&old, "b", "b1").await.unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::Fenced {
                    epoch: 1,
                    current: None
                }
            ),
            "{refused}"
        );
        assert_eq!(
            new.campaign("new", URL_B, lease).await.unwrap(),
            Campaign::Won { epoch: 2 }
        );

        let a = NodeId::parse("node_id", "a").unwrap();
        let offline = Change::WentOffline {
            node_id: a.clone(),
            generation: first.generation,
            since: SystemTime::now(),
        };
        let outcomes = [
            enroll(&old, "a", "b2").await.map(|_| ()),
            old.write(
                vec![offline].into(),
                vec![(a.clone(), SystemTime::now())].into(),
                Arc::from([]),
            )
            .await
            .map(drop),
            old.write_leases(Arc::from([]), 9).await,
            old.set_drain(a.clone(), Some("fan".to_owned()), SystemTime::now())
                .await
                .map(|_| ()),
            old.remove(a.clone()).await.map(|_| ()),
        ];
        for outcome in outcomes {
            assert!(outcome.as_ref().is_err_and(StoreError::is_fenced));
            assert!(
                matches!(
                    outcome,
                    Err(StoreError::Fenced {
                        epoch: 1,
                        current: Some(2)
                    })
                ),
                "{outcome:?}"
            );
        }

        let nodes = new.load_nodes().await.unwrap();
        assert_eq!(nodes.len(), 1, "b was never written");
        assert_eq!(nodes[0].generation, first.generation);
        assert_eq!(nodes[0].offline_since, None);
        assert_eq!(nodes[0].drain, None);
        assert_eq!(new.load_leases().await.unwrap().last_generation, 0);
        assert_eq!(new.history().await.unwrap().last_revision, 1);

        new.fence(2);
        assert!(matches!(
            enroll(&new, "b", "b1").await.unwrap(),
            Enrolled::Admitted(_)
        ));
    }
}
