//! Consuming verified batches; malformed messages go to the dead-letter queue.

use crate::connection::connect;
use crate::topology::passive_count;
use crate::BrokerError;
use flowers_wire::{decode_and_verify, Batch};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::Acker;
use lapin::{Channel, Connection};
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// A consumer of one queue's batches with prefetch (QoS) `prefetch`.
pub struct Consumer {
    queue: String,
    // Dropping the channel cancels the consumer and requeues unacked deliveries.
    channel: Channel,
    inner: lapin::Consumer,
    rejected: u64,
    // Present when the consumer opened its own connection (`connect`).
    own_conn: Option<Connection>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .field("rejected", &self.rejected)
            .finish()
    }
}

/// A verified batch, to be acked once used (or requeued/rejected).
pub struct Delivery {
    pub batch: Batch,
    pub delivery_tag: u64,
    /// The broker delivered it before (to a consumer that did not ack it).
    pub redelivered: bool,
    /// Encoded size of the message.
    pub payload_bytes: usize,
    acker: Acker,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("batch", &flowers_wire::describe(&self.batch))
            .field("delivery_tag", &self.delivery_tag)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

impl Delivery {
    /// Done with it: the broker forgets the message.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(|e| BrokerError::amqp("ack", flowers_wire::describe(&self.batch), e))
    }

    /// Not processed: put it back in the queue for any consumer.
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        self.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| BrokerError::amqp("requeue", flowers_wire::describe(&self.batch), e))
    }

    /// Unusable: send it to the run's dead-letter queue.
    pub async fn reject(&self) -> Result<(), BrokerError> {
        self.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(drop)
            .map_err(|e| BrokerError::amqp("reject", flowers_wire::describe(&self.batch), e))
    }
}

impl Consumer {
    /// Starts consuming `queue` on a new channel of `conn`. The queue must
    /// exist (the loader declares a run's queues when it starts).
    pub async fn open(conn: &Connection, queue: &str, prefetch: u16) -> Result<Self, BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::amqp("open channel for", queue, e))?;
        // A clear "does not exist" instead of basic.consume's channel error.
        passive_count(&channel, queue).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| BrokerError::amqp("set prefetch on", queue, e))?;
        let inner = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::amqp("consume", queue, e))?;
        Ok(Consumer {
            queue: queue.to_string(),
            channel,
            inner,
            rejected: 0,
            own_conn: None,
        })
    }

    /// Like [`Consumer::open`] on a connection of its own to `url`.
    pub async fn connect(url: &str, queue: &str, prefetch: u16) -> Result<Self, BrokerError> {
        let conn = connect(url, &format!("flowers consumer {queue}")).await?;
        let mut consumer = Self::open(&conn, queue, prefetch).await?;
        consumer.own_conn = Some(conn);
        Ok(consumer)
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Messages this consumer rejected to the dead-letter queue.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The next verified batch, or `None` if none arrives within `timeout`.
    /// Messages failing verification are rejected (dead-lettered) with a
    /// warning and skipped.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Delivery>, BrokerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let delivery = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(BrokerError::Cancelled(self.queue.clone())),
                Ok(Some(Err(source))) => {
                    return Err(BrokerError::ConsumerFailed {
                        queue: self.queue.clone(),
                        source,
                    })
                }
                Ok(Some(Ok(delivery))) => delivery,
            };
            match decode_and_verify(&delivery.data) {
                Ok(batch) => {
                    return Ok(Some(Delivery {
                        batch,
                        delivery_tag: delivery.delivery_tag,
                        redelivered: delivery.redelivered,
                        payload_bytes: delivery.data.len(),
                        acker: delivery.acker,
                    }))
                }
                Err(reason) => {
                    warn!(queue = %self.queue, delivery_tag = delivery.delivery_tag, %reason, "rejecting a malformed message to the dead-letter queue");
                    delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| BrokerError::amqp("reject message on", &self.queue, e))?;
                    self.rejected += 1;
                }
            }
        }
    }

    /// Cancels the consumer; unacked deliveries return to the queue.
    pub async fn close(self) -> Result<(), BrokerError> {
        self.channel
            .close(200, "OK".into())
            .await
            .map_err(|e| BrokerError::amqp("close consumer on", &self.queue, e))?;
        if let Some(conn) = &self.own_conn {
            conn.close(200, "OK".into()).await.map_err(|e| {
                BrokerError::amqp("close connection of consumer on", &self.queue, e)
            })?;
        }
        Ok(())
    }
}
