//! Giving memory back to the operating system after a flood of connections.
//!
//! The `muster` binary (linked dynamically; a static build keeps glibc's
//! malloc) allocates through jemalloc, whose background thread
//! returns pages freed for a second to the system by itself (see
//! `src/main.rs`); that is what keeps a coordinator's memory within a fifth
//! of its level before a flood once the flood's connections have closed.
//! glibc's malloc still serves what C code allocates (SQLite's page cache),
//! and anything embedding this library without jemalloc, and it keeps freed
//! memory in its arenas. So once at least [`FLOOD_CLOSES`] connections have
//! closed since the last time, and no more are closing, glibc is asked to
//! return what it holds free (`malloc_trim`), off the async runtime. Steady
//! fleets, whose connections stay open, never trigger it.

use std::time::Duration;

/// Connections closed since the last trim that make it worth another.
pub const FLOOD_CLOSES: usize = 256;

/// How often the count of closed connections is looked at.
pub const TRIM_CHECK: Duration = Duration::from_secs(2);

/// Trims the allocator once `closed` (a running count of closed
/// connections) has grown by [`FLOOD_CLOSES`] since the last trim and then
/// stopped growing for a [`TRIM_CHECK`]: after a flood has ended, not in
/// the middle of it. Runs until dropped.
pub async fn trim_after_closes(closed: impl Fn() -> usize) {
    let mut trimmed_at = closed();
    let mut last_seen = trimmed_at;
    let mut ticks = tokio::time::interval(TRIM_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = closed();
        let still_closing = now != last_seen;
        last_seen = now;
        if !still_closing && now.saturating_sub(trimmed_at) >= FLOOD_CLOSES {
            trimmed_at = now;
            match tokio::task::spawn_blocking(trim).await {
                Ok(()) => tracing::debug!(
                    closed = now,
                    "returned free memory to the system after connections closed"
                ),
                Err(error) => tracing::warn!(%error, "trimming the allocator failed"),
            }
        }
    }
}

/// Returns the allocator's free memory to the operating system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free
    // lists, under the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
