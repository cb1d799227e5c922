//! SIGTERM/SIGINT as a flag the consuming loop watches between batches.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::warn;

/// Turns `true` on the first SIGTERM or SIGINT; a second signal exits at once (status 130).
/// Must be called inside a tokio runtime.
pub fn on_signals() -> std::io::Result<watch::Receiver<bool>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("shutdown requested: finishing the batch in hand, then saving a checkpoint");
        let _ = tx.send(true);
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("second signal: exiting without a checkpoint (unacked batches return to the queue)");
        std::process::exit(130);
    });
    Ok(rx)
}

/// Resolves once `flag` is `true`; never, if its sender is gone without having set it (so a
/// caller without signals passes the receiver of a dropped `watch::channel(false)`).
pub async fn requested(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|&stop| stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
