//! Connecting, with exponential backoff while the broker is unreachable.

use crate::error::redact_url;
use crate::BrokerError;
use backon::Retryable;
pub use flowers_retry::Backoff;
use lapin::{Connection, ConnectionProperties};
use std::time::Instant;
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
    let connected = (|| connect(url, name))
        .retry(*backoff)
        .when(|e| matches!(e, BrokerError::Connect { .. }))
        .notify(|e, delay| {
            failures += 1;
            warn!(attempt = failures, retry_in = ?delay, error = %e, "RabbitMQ unreachable; retrying");
        })
        .await;
    match connected {
        Err(BrokerError::Connect { url, source }) => Err(BrokerError::GaveUp {
            url,
            attempts: failures + 1,
            elapsed: started.elapsed(),
            last: source,
        }),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
