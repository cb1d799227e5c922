//! The reconnect backoff that every client of a service which can be down for a while uses:
//! the broker's publisher and the coordinator's client.
//!
//! Main type: [`Backoff`], delays doubling from `initial` up to `max_delay`, and no retry that
//! would start more than `give_up_after` after the first attempt. It is a
//! [`backon::BackoffBuilder`], so a retry loop is backon's
//! `(|| attempt()).retry(backoff).when(retryable).notify(log)`.
//!
//! It must not depend on any other crate of the workspace, nor know what it retries.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

/// Exponential backoff between attempts, bounded by the time since the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt; doubles after each further one.
    pub initial: Duration,
    /// Ceiling of the delay.
    pub max_delay: Duration,
    /// No retry starts once this much time has passed since the first attempt.
    pub give_up_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// No retries (e.g. for interactive tools).
    pub fn none() -> Self {
        Self {
            initial: Duration::ZERO,
            max_delay: Duration::ZERO,
            give_up_after: Duration::ZERO,
        }
    }

    /// The delays with no deadline: `initial`, doubling up to `max_delay`, without end.
    fn exponential(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.initial)
            .with_max_delay(self.max_delay)
            .without_max_times()
            .build()
    }
}

/// The delays of one retried operation, ending at its deadline.
///
/// backon's own `with_total_delay` counts only the sleeps; the deadline here also counts the
/// attempts, which can take long themselves (a connect timeout, a call held by the server).
#[derive(Debug)]
pub struct Delays {
    delays: ExponentialBackoff,
    deadline: Instant,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.delays.next()?;
        (Instant::now() + delay < self.deadline).then_some(delay)
    }
}

impl BackoffBuilder for Backoff {
    type Backoff = Delays;

    /// Starts the clock: call it (as backon's `retry` does) just before the first attempt.
    fn build(self) -> Delays {
        Delays {
            delays: self.exponential(),
            deadline: Instant::now() + self.give_up_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::Retryable;

    #[test]
    fn delay_doubles_up_to_the_ceiling() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Duration::from_secs(5),
        };
        let delays: Vec<_> = b.exponential().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.exponential().nth(199), Some(Duration::from_secs(1)));
    }

    #[test]
    fn the_default_delays_double_from_200_ms_to_10_s() {
        let delays: Vec<_> = Backoff::default()
            .exponential()
            .take(8)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
    }

    #[tokio::test]
    async fn no_retry_starts_past_the_deadline() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            give_up_after: Duration::from_millis(100),
        };
        let mut retries = 0;
        let result: Result<(), &str> = (|| async { Err("down") })
            .retry(b)
            .notify(|_, _| retries += 1)
            .await;
        assert_eq!(result, Err("down"));
        // Sleeps of 10, 20, 20, 20, 20 ms fit before the deadline; a sixth would end past it.
        assert!((2..=5).contains(&retries), "{retries} retries");
    }

    #[tokio::test]
    async fn none_makes_one_attempt() {
        let mut retries = 0;
        let result: Result<(), &str> = (|| async { Err("down") })
            .retry(Backoff::none())
            .notify(|_, _| retries += 1)
            .await;
        assert_eq!((result, retries), (Err("down"), 0));
    }
}
