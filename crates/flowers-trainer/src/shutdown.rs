//! SIGTERM/SIGINT as a flag the consuming loop watches between batches.

pub use flowers_shutdown::requested;
use flowers_shutdown::Signals;
use tokio::sync::watch;
use tracing::warn;

/// Turns `true` on the first SIGTERM or SIGINT; a second signal exits at once (status 130).
/// Must be called inside a tokio runtime.
pub fn on_signals() -> std::io::Result<watch::Receiver<bool>> {
    let mut signals = Signals::install()?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signals.recv().await;
        warn!("shutdown requested: finishing the batch in hand, then saving a checkpoint");
        let _ = tx.send(true);
        signals.recv().await;
        warn!("second signal: exiting without a checkpoint (unacked batches return to the queue)");
        std::process::exit(130);
    });
    Ok(rx)
}
