//! What the swarm measures: registrations, ack round trips, reconnects and
//! failures, gathered from every simulated agent's link and reported as one
//! JSON line per period.
//!
//! Counters, registration and reconnect times cover the whole run; ack
//! round trips only the period since the previous report.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::agent::reconnect::LinkEvents;

/// Why connections failed for want of a resource the operating system
/// rations, recognised in an error's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// EMFILE or ENFILE: the open-file limit.
    OpenFiles,
    /// EADDRNOTAVAIL or EADDRINUSE: no ephemeral port left on a source address.
    Ports,
}

impl Exhausted {
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut cause = Some(error);
        while let Some(current) = cause {
            if let Some(io) = current.downcast_ref::<std::io::Error>() {
                match io.raw_os_error() {
                    Some(code) if code == EMFILE || code == ENFILE => {
                        return Some(Self::OpenFiles);
                    }
                    Some(code) if code == EADDRNOTAVAIL || code == EADDRINUSE => {
                        return Some(Self::Ports);
                    }
                    _ => {}
                }
            }
            cause = current.source();
        }
        None
    }
}

const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
const EADDRINUSE: i32 = nix::errno::Errno::EADDRINUSE as i32;
const EADDRNOTAVAIL: i32 = nix::errno::Errno::EADDRNOTAVAIL as i32;

/// Totals and samples shared by every simulated agent of one swarm.
pub struct Stats {
    started: Instant,
    agents: u64,
    first_registrations: Mutex<Vec<Duration>>,
    reconnects: Mutex<Vec<Duration>>,
    /// Ack round trips since the previous report.
    acks_in_period: Mutex<Vec<Duration>>,
    connected: AtomicU64,
    acks: AtomicU64,
    failures: AtomicU64,
    open_file_failures: AtomicU64,
    port_failures: AtomicU64,
}

/// One report line.
#[derive(Debug, Serialize)]
pub struct Report {
    pub elapsed_s: f64,
    pub agents: u64,
    /// Agents that have registered at least once.
    pub registered: u64,
    /// Agents whose stream is registered now.
    pub connected: u64,
    /// From the start until the last agent first registered.
    pub all_registered_s: Option<f64>,
    pub registration_p50_ms: Option<f64>,
    pub registration_p99_ms: Option<f64>,
    pub acks: u64,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    pub failures: u64,
    pub open_file_failures: u64,
    pub port_failures: u64,
    /// Streams registered again after a failure, and how long each agent
    /// was without a registered stream.
    pub reconnects: usize,
    pub reconnect_p50_ms: Option<f64>,
    pub reconnect_p99_ms: Option<f64>,
    pub reconnect_max_ms: Option<f64>,
}

impl Stats {
    pub fn new(agents: u32) -> Self {
        Self {
            started: Instant::now(),
            agents: agents.into(),
            first_registrations: Mutex::new(Vec::with_capacity(agents as usize)),
            reconnects: Mutex::new(Vec::new()),
            acks_in_period: Mutex::new(Vec::new()),
            connected: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            open_file_failures: AtomicU64::new(0),
            port_failures: AtomicU64::new(0),
        }
    }

    /// The report for the period since the previous call.
    pub fn report(&self) -> Report {
        let mut acks = std::mem::take(&mut *lock(&self.acks_in_period));
        let mut reconnects = lock(&self.reconnects).clone();
        acks.sort_unstable();
        reconnects.sort_unstable();
        let mut registrations = lock(&self.first_registrations).clone();
        registrations.sort_unstable();
        let registered = registrations.len() as u64;
        Report {
            elapsed_s: self.started.elapsed().as_secs_f64(),
            agents: self.agents,
            registered,
            connected: self.connected.load(Ordering::Relaxed),
            all_registered_s: (registered == self.agents)
                .then(|| registrations.last().map(Duration::as_secs_f64))
                .flatten(),
            registration_p50_ms: percentile_ms(&registrations, 0.50),
            registration_p99_ms: percentile_ms(&registrations, 0.99),
            acks: self.acks.load(Ordering::Relaxed),
            ack_p50_ms: percentile_ms(&acks, 0.50),
            ack_p99_ms: percentile_ms(&acks, 0.99),
            failures: self.failures.load(Ordering::Relaxed),
            open_file_failures: self.open_file_failures.load(Ordering::Relaxed),
            port_failures: self.port_failures.load(Ordering::Relaxed),
            reconnects: reconnects.len(),
            reconnect_p50_ms: percentile_ms(&reconnects, 0.50),
            reconnect_p99_ms: percentile_ms(&reconnects, 0.99),
            reconnect_max_ms: reconnects.last().map(as_ms),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn as_ms(duration: &Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The nearest-rank percentile of `sorted`, in milliseconds.
fn percentile_ms(sorted: &[Duration], fraction: f64) -> Option<f64> {
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).map(as_ms)
}

/// One simulated agent's view of its link, feeding the shared [`Stats`].
pub struct AgentEvents {
    stats: Arc<Stats>,
    ever_registered: AtomicBool,
    connected: AtomicBool,
    down_since: Mutex<Option<Instant>>,
}

impl AgentEvents {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            ever_registered: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            down_since: Mutex::new(None),
        }
    }
}

impl LinkEvents for AgentEvents {
    fn registered(&self, _attempt: Duration) {
        if !self.connected.swap(true, Ordering::Relaxed) {
            self.stats.connected.fetch_add(1, Ordering::Relaxed);
        }
        if !self.ever_registered.swap(true, Ordering::Relaxed) {
            lock(&self.stats.first_registrations).push(self.stats.started.elapsed());
        }
        if let Some(since) = lock(&self.down_since).take() {
            lock(&self.stats.reconnects).push(since.elapsed());
        }
    }

    fn acked(&self, round_trip: Duration) {
        self.stats.acks.fetch_add(1, Ordering::Relaxed);
        lock(&self.stats.acks_in_period).push(round_trip);
    }

    fn failed(&self, error: &(dyn std::error::Error + 'static)) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        if self.connected.swap(false, Ordering::Relaxed) {
            self.stats.connected.fetch_sub(1, Ordering::Relaxed);
            lock(&self.down_since).get_or_insert_with(Instant::now);
        }
        match Exhausted::of(error) {
            Some(Exhausted::OpenFiles) => &self.stats.open_file_failures,
            Some(Exhausted::Ports) => &self.stats.port_failures,
            None => return,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.50), Some(50.0));
        assert_eq!(percentile_ms(&sorted, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&sorted[..1], 0.99), Some(1.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn a_reconnect_is_timed_from_the_failure_of_a_registered_stream() {
        let stats = Arc::new(Stats::new(1));
        let events = AgentEvents::new(stats.clone());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        events.failed(&refused);
        assert_eq!(stats.report().reconnects, 0, "never registered yet");
        events.registered(Duration::ZERO);
        events.failed(&refused);
        events.failed(&refused);
        events.registered(Duration::ZERO);
        let report = stats.report();
        assert_eq!((report.registered, report.connected), (1, 1));
        assert_eq!((report.reconnects, report.failures), (1, 3));
        assert!(report.all_registered_s.is_some());
    }

    #[test]
    fn exhausted_resources_are_recognised_in_a_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed")]
        struct Wrapper(#[source] std::io::Error);
        let emfile = Wrapper(std::io::Error::from_raw_os_error(EMFILE));
        assert_eq!(Exhausted::of(&emfile), Some(Exhausted::OpenFiles));
        let no_port = std::io::Error::from_raw_os_error(EADDRNOTAVAIL);
        assert_eq!(Exhausted::of(&no_port), Some(Exhausted::Ports));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Exhausted::of(&refused), None);
    }
}
