//! Time as the registry sees it. The registry never reads a clock: callers
//! pass a [`Moment`] in, so tests can move time forward without sleeping.
//!
//! Liveness and expiry deadlines use the monotonic clock, which never jumps
//! while the process runs. What is shown to people or persisted across
//! restarts (last seen, offline since) uses wall-clock time, which can be
//! stepped either way; the registry trusts a persisted wall-clock moment only
//! within the bounds its module doc states.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct Moment {
    pub monotonic: Instant,
    pub wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Self {
            monotonic: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn after(self, elapsed: Duration) -> Self {
        Self {
            monotonic: self.monotonic + elapsed,
            wall: self.wall + elapsed,
        }
    }

    pub fn earlier(self, by: Duration) -> Self {
        Self {
            monotonic: self.monotonic - by,
            wall: self.wall - by,
        }
    }
}

/// Milliseconds since the Unix epoch, the representation used in the store.
pub fn to_unix_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub fn from_unix_millis(millis: i64) -> SystemTime {
    let magnitude = Duration::from_millis(millis.unsigned_abs());
    if millis >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_millis_round_trip() {
        for millis in [0, 1, 1_764_000_000_123, -5_000] {
            assert_eq!(to_unix_millis(from_unix_millis(millis)), millis);
        }
    }
}
