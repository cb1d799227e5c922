//! [`BrokerError`], with the lapin error kept as its source where RabbitMQ was involved, and
//! [`redact_url`], which every error and log line naming a broker URL goes through.

use flowers_wire::WireError;
use lapin::protocol::AMQPErrorKind;
use lapin::ErrorKind;
use std::time::Duration;

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid run id {0:?}: use {rule}", rule = flowers_proto::run_id::RULE)]
    InvalidRunId(String),
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("gave up reconnecting to RabbitMQ at {url} after {attempts} attempts in {elapsed:.1?}: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        elapsed: Duration,
        last: lapin::Error,
    },
    #[error("{op} {target}: {source}")]
    Amqp {
        op: &'static str,
        target: String,
        source: lapin::Error,
    },
    #[error("queue {0} does not exist")]
    NoQueue(String),
    #[error("RabbitMQ refused (nack) {what} published to {queue}")]
    Nacked { what: String, queue: String },
    #[error("RabbitMQ returned {what} published to {queue} as unroutable ({reply}); was the queue deleted?")]
    Returned {
        what: String,
        queue: String,
        reply: String,
    },
    #[error("no confirm for {what} from RabbitMQ within {0:?}", .timeout)]
    ConfirmTimeout { what: String, timeout: Duration },
    #[error("batch of run {batch_run:?} given to the publisher of run {run:?}")]
    WrongRun { batch_run: String, run: String },
    #[error("consumer on {0} was cancelled by RabbitMQ (queue deleted?)")]
    Cancelled(String),
    /// The broker closed the consumer's channel (e.g. `consumer_timeout`: a delivery held
    /// unacked too long) or its connection broke under it.
    #[error("consumer on {queue} stopped: {source}")]
    ConsumerFailed { queue: String, source: lapin::Error },
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl BrokerError {
    pub(crate) fn amqp(op: &'static str, target: impl Into<String>, source: lapin::Error) -> Self {
        BrokerError::Amqp {
            op,
            target: target.into(),
            source,
        }
    }

    /// Whether a new connection (or channel) may cure it: the connection broke, the broker
    /// closed it or the consumer's channel, as opposed to a refusal of what we asked for.
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::Connect { .. }
            | BrokerError::ConfirmTimeout { .. }
            | BrokerError::ConsumerFailed { .. }
            | BrokerError::Cancelled(_) => true,
            BrokerError::Amqp { source, .. } => is_transient(source),
            _ => false,
        }
    }
}

fn is_transient(error: &lapin::Error) -> bool {
    match error.kind() {
        // Soft errors (404, 406, ...) refuse one request; hard ones close the
        // connection (e.g. 320 CONNECTION_FORCED when the broker shuts down).
        ErrorKind::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Hard(_)),
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ParsingError(_)
        | ErrorKind::SerialisationError(_) => true,
        _ => false,
    }
}

/// `amqp://user:secret@host` -> `amqp://user:***@host`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("amqp://u@h:5672"), "amqp://u@h:5672");
    }
}
