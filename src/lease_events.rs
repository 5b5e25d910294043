//! The lease event feed: every committed change of a lease, in revision
//! order, for `WatchLeases`. A holder whose lease was revoked, suspended,
//! resumed or released by the coordinator learns it here without polling.
//!
//! Pure and I/O-free. Lease events have a revision sequence of their own,
//! apart from the fleet's node events: they come at the rate of
//! acquisitions, and are kept by count (see the store), so that a busy
//! pool neither floods `WatchNodes` nor the node history. The store
//! assigns revisions inside the transaction that writes the lease's change
//! and publishes them once it has committed; only the lease writer does
//! both, so the feed sees revisions strictly increasing and without gaps.
//!
//! Invariant: [`LeaseFeed::follow`] returns, atomically, the revision of
//! the latest event published and a live feed of exactly the events after
//! it, so a watcher that replays the stored events up to that revision
//! and then reads the feed misses nothing and sees nothing twice.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use tokio::sync::broadcast;

use crate::{
    pool::{Event, ReleaseReason},
    proto, wire,
};

/// What happened to a lease, as watchers are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEventKind {
    Granted,
    Renewed,
    Revoked,
    Suspended,
    Resumed,
    /// Released by its holder.
    Released,
    /// Its TTL passed without a renewal.
    Expired,
    /// Released by the coordinator for another reason (its node left or
    /// was removed, its revoke grace or orphan grace ended); the lease's
    /// `release_reason` says which.
    Reclaimed,
    /// Its deadlines started over when the pool was reconciled after a
    /// coordinator restart.
    Reconciled,
}

impl LeaseEventKind {
    const ALL: [Self; 9] = [
        Self::Granted,
        Self::Renewed,
        Self::Revoked,
        Self::Suspended,
        Self::Resumed,
        Self::Released,
        Self::Expired,
        Self::Reclaimed,
        Self::Reconciled,
    ];

    /// The kind of the pool's event; `None` for a change no watcher is
    /// told of (a released lease the pool forgets).
    pub fn of(event: &Event) -> Option<Self> {
        Some(match event {
            Event::Granted => Self::Granted,
            Event::Renewed => Self::Renewed,
            Event::Revoked { .. } => Self::Revoked,
            Event::Suspended => Self::Suspended,
            Event::Resumed => Self::Resumed,
            Event::Released(ReleaseReason::Holder) => Self::Released,
            Event::Released(ReleaseReason::Expired) => Self::Expired,
            Event::Released(_) => Self::Reclaimed,
            Event::Reconciled => Self::Reconciled,
            Event::Forgotten => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Renewed => "renewed",
            Self::Revoked => "revoked",
            Self::Suspended => "suspended",
            Self::Resumed => "resumed",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Reclaimed => "reclaimed",
            Self::Reconciled => "reconciled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// One committed change of one lease.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseEvent {
    pub revision: u64,
    pub kind: LeaseEventKind,
    /// The lease after the change.
    pub lease: proto::Lease,
    /// For a revocation: the request it made room for.
    pub revoked_for: String,
    pub at: SystemTime,
}

impl LeaseEvent {
    pub fn to_proto(&self) -> proto::LeaseEvent {
        proto::LeaseEvent {
            revision: self.revision,
            kind: self.kind.as_str().to_owned(),
            lease: Some(self.lease.clone()),
            revoked_for: self.revoked_for.clone(),
            at: Some(wire::timestamp(self.at)),
        }
    }
}

/// The events published after a [`LeaseFeed::follow`].
pub struct LiveLeaseEvents {
    receiver: broadcast::Receiver<Arc<LeaseEvent>>,
}

/// The outcome of waiting on [`LiveLeaseEvents`].
#[derive(Debug)]
pub enum NextLeaseEvent {
    Event(Arc<LeaseEvent>),
    /// The watcher fell too far behind; events were dropped for it.
    Lagged,
    /// The feed is gone: the coordinator is stopping.
    Closed,
}

impl LiveLeaseEvents {
    pub async fn next(&mut self) -> NextLeaseEvent {
        match self.receiver.recv().await {
            Ok(event) => NextLeaseEvent::Event(event),
            Err(broadcast::error::RecvError::Lagged(_)) => NextLeaseEvent::Lagged,
            Err(broadcast::error::RecvError::Closed) => NextLeaseEvent::Closed,
        }
    }
}

/// The publisher side, shared by the store (which publishes) and every
/// watcher (which follows).
pub struct LeaseFeed {
    sender: broadcast::Sender<Arc<LeaseEvent>>,
    /// The revision of the latest event published; held while publishing
    /// and while following, so a follower's start and its feed meet exactly.
    revision: Mutex<u64>,
}

impl LeaseFeed {
    /// A feed whose history ends at `revision`. Each watcher may fall
    /// `capacity` events behind.
    pub fn new(revision: u64, capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender,
            revision: Mutex::new(revision),
        }
    }

    /// The revision of the latest event published.
    pub fn revision(&self) -> u64 {
        *self.lock()
    }

    /// Publishes committed events, which must follow the last published
    /// revision in order. Never waits for a watcher.
    pub fn publish(&self, events: Vec<LeaseEvent>) {
        let mut revision = self.lock();
        for event in events {
            debug_assert!(
                event.revision > *revision,
                "lease event {} published after {}",
                event.revision,
                *revision
            );
            *revision = (*revision).max(event.revision);
            // No receiver is not an error: nobody is watching.
            let _ = self.sender.send(Arc::new(event));
        }
    }

    /// The live feed from now on, and the revision it starts after.
    pub fn follow(&self) -> (u64, LiveLeaseEvents) {
        let revision = self.lock();
        (
            *revision,
            LiveLeaseEvents {
                receiver: self.sender.subscribe(),
            },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.revision.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64) -> LeaseEvent {
        LeaseEvent {
            revision,
            kind: LeaseEventKind::Granted,
            lease: proto::Lease::default(),
            revoked_for: String::new(),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[tokio::test]
    async fn a_follower_gets_exactly_the_events_after_the_revision_it_starts_at() {
        let feed = LeaseFeed::new(7, 16);
        feed.publish(vec![event(8)]);
        let (start, mut live) = feed.follow();
        assert_eq!(start, 8);
        feed.publish(vec![event(9), event(10)]);
        for expected in [9, 10] {
            match live.next().await {
                NextLeaseEvent::Event(event) => assert_eq!(event.revision, expected),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(feed.revision(), 10);
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_is_told_so() {
        let feed = LeaseFeed::new(0, 2);
        let (_, mut live) = feed.follow();
        feed.publish((1..=5).map(event).collect());
        assert!(matches!(live.next().await, NextLeaseEvent::Lagged));
    }

    #[test]
    fn every_kind_round_trips_and_only_forgetting_is_not_told() {
        for kind in LeaseEventKind::ALL {
            assert_eq!(LeaseEventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(LeaseEventKind::of(&Event::Forgotten), None);
        assert_eq!(
            LeaseEventKind::of(&Event::Released(ReleaseReason::Orphaned)),
            Some(LeaseEventKind::Reclaimed)
        );
        assert_eq!(
            LeaseEventKind::of(&Event::Released(ReleaseReason::Expired)),
            Some(LeaseEventKind::Expired)
        );
    }
}
