//! Declaring, inspecting and deleting a run's exchange and queues.

use crate::names::{dead_queue, run_queues, validate_run_id, RunLayout, DLX_EXCHANGE};
use crate::BrokerError;
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

/// Arguments of every train/val queue: rejected messages go to the run's
/// dead-letter queue.
pub fn batch_queue_arguments(run_id: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DLX_EXCHANGE.into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(run_id.into()),
    );
    args
}

/// Declares (idempotently) the dead-letter exchange, the run's dead queue
/// bound to it with the run id, and the batch queues of every epoch of
/// `layout`, all durable. The dead queue itself has no dead-letter
/// arguments: a message rejected there would loop back into it.
pub async fn declare_run_topology(
    channel: &Channel,
    run_id: &str,
    layout: RunLayout,
) -> Result<(), BrokerError> {
    validate_run_id(run_id)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            DLX_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::amqp("declare exchange", DLX_EXCHANGE, e))?;
    let dead = dead_queue(run_id);
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::amqp("declare queue", &dead, e))?;
    channel
        .queue_bind(
            dead.as_str().into(),
            DLX_EXCHANGE.into(),
            run_id.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::amqp("bind queue", &dead, e))?;
    for epoch in 0..layout.epochs {
        for queue in layout.epoch_queues(run_id, epoch) {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    batch_queue_arguments(run_id),
                )
                .await
                .map_err(|e| BrokerError::amqp("declare queue", &queue, e))?;
        }
    }
    Ok(())
}

/// Ready (not yet delivered) messages in `queue`, or `None` if it does not
/// exist. Uses its own channel, since a missing queue closes the channel.
pub async fn message_count(conn: &Connection, queue: &str) -> Result<Option<u32>, BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BrokerError::amqp("open channel for", queue, e))?;
    match passive_count(&channel, queue).await {
        Err(BrokerError::NoQueue(_)) => Ok(None),
        other => {
            // Best effort: the connection's other channels are unaffected either way.
            let _ = channel.close(200, "OK".into()).await;
            other.map(Some)
        }
    }
}

/// Drops the ready messages of `queue` (unacked ones stay with their consumers); returns how
/// many. For the duplicates a redelivery can leave behind once every batch of a queue was used.
pub async fn purge_queue(conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BrokerError::amqp("open channel for", queue, e))?;
    let purged = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| BrokerError::amqp("purge queue", queue, e));
    let _ = channel.close(200, "OK".into()).await;
    purged
}

/// Ready messages in an existing `queue` (passive declare on `channel`).
pub(crate) async fn passive_count(channel: &Channel, queue: &str) -> Result<u32, BrokerError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .map_err(|e| match e.kind() {
            ErrorKind::ProtocolError(amqp)
                if amqp.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
            {
                BrokerError::NoQueue(queue.to_string())
            }
            _ => BrokerError::amqp("inspect queue", queue, e),
        })
}

/// Deletes the run's queues of `layout` and its dead queue (missing ones are
/// fine); returns how many messages they held.
pub async fn delete_run_queues(
    conn: &Connection,
    run_id: &str,
    layout: RunLayout,
) -> Result<u64, BrokerError> {
    validate_run_id(run_id)?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BrokerError::amqp("open channel for", run_id, e))?;
    let mut dropped = 0u64;
    for queue in run_queues(run_id, layout) {
        dropped += u64::from(
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| BrokerError::amqp("delete queue", &queue, e))?,
        );
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(dropped)
}
