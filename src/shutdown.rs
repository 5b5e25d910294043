//! Turns SIGINT and SIGTERM into cancellation of the process's root token.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::error::RunError;

/// 128 + SIGINT, as shells report a process ended by an interrupt.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// Runs `work` until it finishes, cancelling `token` on the first SIGINT or
/// SIGTERM so that `work` can shut down gracefully; a second signal ends the
/// process at once. The handlers are installed before `work` starts, so a
/// signal during start-up is not lost.
pub async fn run_until_signal<F>(token: CancellationToken, work: F) -> Result<(), RunError>
where
    F: Future<Output = Result<(), RunError>>,
{
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let finished = CancellationToken::new();
    let watch = async {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            () = finished.cancelled() => return,
        };
        tracing::info!(
            signal = name,
            "shutting down; a second signal exits at once"
        );
        token.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            () = finished.cancelled() => return,
        }
        tracing::warn!("second signal; exiting without finishing shutdown");
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    };
    let work = async {
        let result = work.await;
        token.cancel();
        finished.cancel();
        result
    };
    let (result, ()) = tokio::join!(work, watch);
    result
}
