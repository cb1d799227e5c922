//! Connecting, with exponential backoff while the broker is unreachable.

use crate::error::redact_url;
use crate::BrokerError;
use lapin::{Connection, ConnectionProperties};
use std::time::{Duration, Instant};
use tracing::warn;

/// The local broker of the development setup (guest/guest, vhost `/`).
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker the environment names: `FLOWERS_BROKER_URL`, else `AMQP_URL`, else
/// [`DEFAULT_BROKER_URL`]. The services use it when no `--broker-url` is given.
pub fn broker_url_from_env() -> String {
    std::env::var("FLOWERS_BROKER_URL")
        .or_else(|_| std::env::var("AMQP_URL"))
        .unwrap_or_else(|_| DEFAULT_BROKER_URL.to_string())
}

/// Exponential backoff between connection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt; doubles after each further one.
    pub initial: Duration,
    /// Ceiling of the delay.
    pub max_delay: Duration,
    /// Give up once this much time has passed since the first failure.
    pub give_up_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failed attempts (1 = first).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max_delay)
    }
}

/// Opens one connection (one attempt). `name` shows in the management UI.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props)
        .await
        .map_err(|source| BrokerError::Connect {
            url: redact_url(url),
            source,
        })
}

/// Connects, retrying with `backoff` while the broker is unreachable and
/// logging each failure.
pub async fn connect_with_backoff(
    url: &str,
    name: &str,
    backoff: &Backoff,
) -> Result<Connection, BrokerError> {
    let started = Instant::now();
    let mut failures = 0u32;
    loop {
        match connect(url, name).await {
            Ok(conn) => return Ok(conn),
            Err(BrokerError::Connect { url, source }) => {
                failures += 1;
                let elapsed = started.elapsed();
                if elapsed >= backoff.give_up_after {
                    return Err(BrokerError::GaveUp {
                        url,
                        attempts: failures,
                        elapsed,
                        last: source,
                    });
                }
                let delay = backoff.delay(failures);
                warn!(%url, attempt = failures, retry_in = ?delay, error = %source, "RabbitMQ unreachable; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(other) => return Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_up_to_the_ceiling() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Duration::from_secs(5),
        };
        let delays: Vec<_> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(200), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn gives_up_on_a_closed_port() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            give_up_after: Duration::from_millis(100),
        };
        // Port 1 on localhost is not a broker.
        let err = connect_with_backoff("amqp://u:pw@127.0.0.1:1/%2f", "test", &b)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, BrokerError::GaveUp { attempts, .. } if attempts >= 3),
            "{text}"
        );
        assert!(text.contains("amqp://u:***@127.0.0.1:1"), "{text}");
    }
}
