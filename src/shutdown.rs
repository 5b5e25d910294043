//! Turns SIGINT and SIGTERM into cancellation of the process's root token.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::error::RunError;

/// Cancels `token` on the first SIGINT or SIGTERM. Handlers are installed
/// before this returns, so a signal that arrives during start-up is not lost.
pub fn cancel_on_signal(token: CancellationToken) -> Result<(), RunError> {
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            () = token.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    });
    Ok(())
}
