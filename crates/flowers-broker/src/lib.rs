//! RabbitMQ topology, confirmed publishing with backpressure, consuming with dead-lettering.
//!
//! # Queues of a run (see [`names`])
//! * `flowers.<run_id>.train.<E>`: training batches of epoch `E` ([`train_queue`]);
//! * `flowers.<run_id>.val.<E>`: validation batches of epoch `E`'s end ([`val_queue`]);
//! * `flowers.<run_id>.val.<E>.<p>`: with `n` evaluations per epoch, the validation batches
//!   of the interim evaluation after `p/n` of epoch `E` ([`eval_queue`], [`RunLayout`]);
//! * `flowers.<run_id>.dead`: dead letters ([`dead_queue`]), bound to the direct
//!   exchange `flowers.dlx` ([`DLX_EXCHANGE`]) with routing key `<run_id>`.
//!
//! All durable; train/val queues carry `x-dead-letter-exchange=flowers.dlx` and
//! `x-dead-letter-routing-key=<run_id>`. [`declare_run_topology`] declares them
//! (the loader does, for every epoch, before publishing).
//!
//! # Publishing (the loader)
//! ```no_run
//! # async fn f(batches: Vec<flowers_wire::Batch>) -> Result<(), flowers_broker::BrokerError> {
//! use flowers_broker::{Publisher, PublisherOptions, RunLayout};
//! let opts = PublisherOptions { max_queued_batches: 64, ..Default::default() };
//! let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! let mut publisher = Publisher::connect(url, "run1", RunLayout::epochs(2), opts).await?;
//! for batch in &batches {
//!     publisher.publish(batch).await?; // waits while the run's queues are full
//! }
//! let stats = publisher.close().await?; // every batch confirmed
//! # Ok(()) }
//! ```
//! Messages are persistent and confirmed; a batch counts only once confirmed.
//! When the connection breaks, the publisher reconnects with exponential
//! backoff ([`Backoff`]) and re-sends only the batches not yet confirmed.
//!
//! # Consuming (the trainers)
//! ```no_run
//! # async fn f() -> Result<(), flowers_broker::BrokerError> {
//! use flowers_broker::{connect, train_queue, Consumer};
//! use std::time::Duration;
//! let conn = connect("amqp://guest:guest@127.0.0.1:5672/%2f", "trainer-0").await?;
//! let mut consumer = Consumer::open(&conn, &train_queue("run1", 0), 4).await?;
//! while let Some(delivery) = consumer.next(Duration::from_secs(30)).await? {
//!     let batch = &delivery.batch; // verified: checksum, shape, labels
//!     // ... optimizer step on batch.pixels ...
//!     delivery.ack().await?; // or delivery.requeue() to hand it back
//! }
//! # Ok(()) }
//! ```
//! A message that fails [`flowers_wire::decode_and_verify`] is rejected
//! without requeue, so it lands in the run's dead-letter queue, with a warning
//! naming queue, delivery tag and reason; `next` goes on to the next message.
//! A consumer does not reconnect by itself: on an error that
//! [`BrokerError::is_transient`] calls curable (a broken connection, a channel the broker
//! closed, e.g. for `consumer_timeout`), open a new one; unacked batches are redelivered.
//!
//! # Housekeeping
//! [`message_count`] (ready messages in a queue), [`purge_queue`] and [`delete_run_queues`].
//!
//! # Where the broker is
//! [`broker_url_from_env`]: `FLOWERS_BROKER_URL`, else `AMQP_URL`, else [`DEFAULT_BROKER_URL`],
//! what every service uses without `--broker-url`.
//!
//! Errors are [`BrokerError`]s. The crate moves [`flowers_wire`] batches, checked with that
//! crate's rules on receipt, and must not depend on the data set, imaging, the loader, the
//! model, the trainer or the coordinator.

mod connection;
mod consumer;
mod error;
pub mod names;
mod publisher;
mod topology;

pub use connection::{
    broker_url_from_env, connect, connect_with_backoff, Backoff, DEFAULT_BROKER_URL,
};
pub use consumer::{Consumer, Delivery};
pub use error::{redact_url, BrokerError};
pub use lapin::Connection;
pub use names::{
    dead_queue, eval_queue, train_queue, val_queue, validate_run_id, RunLayout, DLX_EXCHANGE,
};
pub use publisher::{BatchKey, PublishStats, Published, Publisher, PublisherOptions};
pub use topology::{
    batch_queue_arguments, declare_run_topology, delete_run_queues, message_count, purge_queue,
};
