//! Turns SIGINT and SIGTERM into cancellation of the process's root token.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::error::RunError;

/// Runs `work` until it finishes, cancelling `token` on the first SIGINT or
/// SIGTERM so that `work` can shut down gracefully. The handlers are
/// installed before `work` starts, so a signal during start-up is not lost.
pub async fn run_until_signal<F>(token: CancellationToken, work: F) -> Result<(), RunError>
where
    F: Future<Output = Result<(), RunError>>,
{
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let watch = async {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            () = token.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    };
    let work = async {
        let result = work.await;
        token.cancel();
        result
    };
    let (result, ()) = tokio::join!(work, watch);
    result
}
