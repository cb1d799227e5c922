//! SIGINT and SIGTERM as a graceful-shutdown request (as in mini-redis: the signal resolves a
//! future or sets a flag that the serving loop watches, and the work in hand finishes first).
//!
//! Main types: [`Signals`] listens for both signals and tells which one came ([`Signal`]);
//! [`requested`] waits on a shutdown flag (`watch::Receiver<bool>`). What a service does on a
//! signal (finish a batch, save its state, exit at a second one) is the service's.
//!
//! It must not depend on any other crate of the workspace.

use std::fmt;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// A signal asking the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        })
    }
}

/// Listens for SIGINT and SIGTERM. While it lives, neither ends the process by itself.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening. Must be called inside a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
        }
    }
}

/// Resolves once `flag` is `true`; never, if its sender is gone without having set it (so a
/// caller without signals passes the receiver of a dropped `watch::channel(false)`).
pub async fn requested(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|&stop| stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_int;
    use std::time::Duration;
    use tokio::time::timeout;

    extern "C" {
        /// C's `raise`: sends a signal to this process.
        fn raise(signal: c_int) -> c_int;
    }
    const SIGTERM: c_int = 15;

    #[tokio::test]
    async fn a_signal_is_received_and_named() {
        let mut signals = Signals::install().unwrap();
        // SAFETY: `raise` has no preconditions; the handler installed above catches SIGTERM.
        assert_eq!(unsafe { raise(SIGTERM) }, 0);
        let got = timeout(Duration::from_secs(5), signals.recv())
            .await
            .unwrap();
        assert_eq!(
            (got, got.to_string()),
            (Signal::Terminate, "SIGTERM".into())
        );
    }

    #[tokio::test]
    async fn requested_waits_for_the_flag_and_never_resolves_without_a_sender() {
        let (tx, mut rx) = watch::channel(false);
        let waiting = tokio::spawn(async move { requested(&mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        tx.send(true).unwrap();
        timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();

        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(timeout(Duration::from_millis(50), requested(&mut rx))
            .await
            .is_err());
    }
}
