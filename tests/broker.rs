//! flowers-broker against the real local RabbitMQ: dead-lettering, backpressure,
//! the size limit and reconnection; and, on a node of its own, RabbitMQ's `consumer_timeout`.

use flowers_broker::{
    connect, dead_queue, delete_run_queues, message_count, train_queue, val_queue, Backoff,
    BrokerError, Consumer, Published, Publisher, PublisherOptions, RunLayout,
};
use flowers_e2e::rabbit::PrivateBroker;
use flowers_e2e::{broker_url, synthetic_batch, unique_run_id, TcpProxy};
use flowers_wire::{Split, WireError};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use prost::Message;
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// Polls `queue` until it holds `expected` ready messages (dead-lettering is asynchronous).
async fn wait_for_count(conn: &lapin::Connection, queue: &str, expected: u32) -> u32 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = message_count(conn, queue)
            .await
            .unwrap()
            .expect("queue exists");
        if count == expected || tokio::time::Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A publisher for a run of one epoch.
async fn one_epoch_publisher(url: &str, run: &str, opts: PublisherOptions) -> Publisher {
    Publisher::connect(url, run, RunLayout::epochs(1), opts)
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_good_ones_delivered() {
    let url = broker_url();
    let run = unique_run_id("dlx");
    let conn = connect(&url, "test").await.unwrap();
    let mut publisher = one_epoch_publisher(&url, &run, PublisherOptions::default()).await;
    let queue = train_queue(&run, 0);

    // Raw messages the loader would never send: garbage, and a batch whose pixels were altered.
    let raw = conn.create_channel().await.unwrap();
    let mut tampered = synthetic_batch(&run, 0, Split::Train, 9, 10, 2, 4);
    tampered.pixels[0] ^= 0xFF;
    let good: Vec<_> = (0..3)
        .map(|i| synthetic_batch(&run, 0, Split::Train, i, 10, 2, 4))
        .collect();
    publisher.publish(&good[0]).await.unwrap();
    for payload in [b"garbage".to_vec(), tampered.encode_to_vec()] {
        raw.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &payload,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    publisher.publish(&good[1]).await.unwrap();
    publisher.publish(&good[2]).await.unwrap();
    publisher.flush().await.unwrap();

    let mut consumer = Consumer::open(&conn, &queue, 2).await.unwrap();
    let mut received = Vec::new();
    while received.len() < 3 {
        let delivery = consumer
            .next(WAIT)
            .await
            .unwrap()
            .expect("a good batch within the timeout");
        received.push(delivery.batch.batch_index);
        delivery.ack().await.unwrap();
    }
    assert_eq!(received, [0, 1, 2]);
    assert!(consumer
        .next(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    assert_eq!(consumer.rejected(), 2);
    assert_eq!(wait_for_count(&conn, &dead_queue(&run), 2).await, 2);
    assert_eq!(message_count(&conn, &queue).await.unwrap(), Some(0));
    consumer.close().await.unwrap();

    delete_run_queues(&conn, &run, RunLayout::epochs(1))
        .await
        .unwrap();
    assert_eq!(message_count(&conn, &queue).await.unwrap(), None);
}

#[tokio::test]
async fn requeued_batches_come_back() {
    let url = broker_url();
    let run = unique_run_id("requeue");
    let conn = connect(&url, "test").await.unwrap();
    let mut publisher = one_epoch_publisher(&url, &run, PublisherOptions::default()).await;
    let batch = synthetic_batch(&run, 0, Split::Validation, 0, 1, 3, 5);
    assert_eq!(publisher.publish(&batch).await.unwrap(), Published::Sent);
    publisher.flush().await.unwrap();
    // Publishing a confirmed batch again is a no-op.
    assert_eq!(
        publisher.publish(&batch).await.unwrap(),
        Published::Duplicate
    );
    publisher.close().await.unwrap();

    let mut consumer = Consumer::open(&conn, &val_queue(&run, 0), 1).await.unwrap();
    let first = consumer.next(WAIT).await.unwrap().unwrap();
    assert!(!first.redelivered);
    first.requeue().await.unwrap();
    let again = consumer.next(WAIT).await.unwrap().unwrap();
    assert!(again.redelivered);
    assert_eq!(again.batch, batch);
    again.ack().await.unwrap();
    assert!(consumer
        .next(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    consumer.close().await.unwrap();
    delete_run_queues(&conn, &run, RunLayout::epochs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn consumer_on_a_missing_queue_names_it() {
    let conn = connect(&broker_url(), "test").await.unwrap();
    let queue = train_queue(&unique_run_id("missing"), 0);
    let err = Consumer::open(&conn, &queue, 1).await.unwrap_err();
    assert!(matches!(err, BrokerError::NoQueue(_)), "{err}");
    assert!(err.to_string().contains(&queue), "{err}");
}

#[tokio::test]
async fn backpressure_keeps_the_queues_at_the_limit() {
    let url = broker_url();
    let run = unique_run_id("backpressure");
    let conn = connect(&url, "test").await.unwrap();
    let opts = PublisherOptions {
        max_queued_batches: 2,
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let mut publisher = one_epoch_publisher(&url, &run, opts).await;
    let total = 7u32;
    let batches: Vec<_> = (0..total)
        .map(|i| synthetic_batch(&run, 0, Split::Train, i, total, 2, 8))
        .collect();
    let publishing = tokio::spawn(async move {
        for batch in &batches {
            publisher.publish(batch).await?;
        }
        publisher.close().await
    });

    // No consumer yet: the queue fills to the limit and stays there.
    let queue = train_queue(&run, 0);
    let mut max_seen = 0;
    for _ in 0..40 {
        max_seen = max_seen.max(message_count(&conn, &queue).await.unwrap().unwrap());
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert_eq!(
        max_seen, 2,
        "queue depth must reach but never exceed max_queued_batches"
    );
    assert!(
        !publishing.is_finished(),
        "publisher must wait for consumers"
    );

    // Consuming lets it finish; every batch arrives once, in order.
    let mut consumer = Consumer::open(&conn, &queue, 1).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < total as usize {
        let delivery = consumer.next(WAIT).await.unwrap().expect("batch");
        seen.push(delivery.batch.batch_index);
        max_seen = max_seen.max(message_count(&conn, &queue).await.unwrap().unwrap());
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen, (0..total).collect::<Vec<_>>());
    assert!(max_seen <= 2, "depth {max_seen} over the limit");
    let stats = publishing.await.unwrap().unwrap();
    assert_eq!(stats.batches, u64::from(total));
    assert!(stats.backpressure_waits >= 1);
    consumer.close().await.unwrap();
    delete_run_queues(&conn, &run, RunLayout::epochs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn oversized_batches_are_refused_before_publishing() {
    let url = broker_url();
    let run = unique_run_id("size");
    let conn = connect(&url, "test").await.unwrap();
    let opts = PublisherOptions {
        max_message_bytes: 10_000,
        ..Default::default()
    };
    let mut publisher = one_epoch_publisher(&url, &run, opts).await;
    let big = synthetic_batch(&run, 0, Split::Train, 0, 1, 4, 32); // 12 KiB of pixels
    let err = publisher.publish(&big).await.unwrap_err();
    assert!(
        matches!(
            err,
            BrokerError::Wire(WireError::TooLarge { limit: 10_000, .. })
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("10000-byte message size limit") && text.contains("batch 0/1"),
        "{text}"
    );
    publisher.close().await.unwrap();
    assert_eq!(
        message_count(&conn, &train_queue(&run, 0)).await.unwrap(),
        Some(0)
    );
    delete_run_queues(&conn, &run, RunLayout::epochs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn publisher_reconnects_and_resends_only_unconfirmed_batches() {
    let url = broker_url();
    let run = unique_run_id("reconnect");
    let conn = connect(&url, "test").await.unwrap();
    let proxy = TcpProxy::start("127.0.0.1:5672").await.unwrap();
    let opts = PublisherOptions {
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            give_up_after: Duration::from_secs(20),
        },
        ..Default::default()
    };
    let mut publisher = one_epoch_publisher(&proxy.url(&url), &run, opts).await;
    let total = 10u32;
    let batches: Vec<_> = (0..total)
        .map(|i| synthetic_batch(&run, 0, Split::Train, i, total, 2, 16))
        .collect();
    for batch in &batches[..4] {
        publisher.publish(batch).await.unwrap();
    }
    publisher.flush().await.unwrap();

    // The broker "goes away" for a while; publishing must wait and resume.
    proxy.cut();
    let restore = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        proxy.restore();
    };
    let publish_rest = async {
        for batch in &batches[4..] {
            publisher.publish(batch).await.unwrap();
        }
        publisher.flush().await.unwrap();
    };
    tokio::join!(restore, publish_rest);
    let stats = publisher.close().await.unwrap();
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert_eq!(stats.batches, u64::from(total));

    // Every batch exactly once: the cut came after a flush, so nothing was in doubt.
    let mut consumer = Consumer::open(&conn, &train_queue(&run, 0), 4)
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    while let Some(delivery) = consumer.next(Duration::from_millis(500)).await.unwrap() {
        assert!(
            seen.insert(delivery.batch.batch_index),
            "batch {} twice",
            delivery.batch.batch_index
        );
        assert_eq!(delivery.batch, batches[delivery.batch.batch_index as usize]);
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen, (0..total).collect());
    consumer.close().await.unwrap();
    delete_run_queues(&conn, &run, RunLayout::epochs(1))
        .await
        .unwrap();
}

/// A consumer that holds a delivery unacked past `consumer_timeout` loses its channel: `next`
/// says so with an error a new consumer cures (what a trainer does on it), and the delivery
/// comes back to the new one.
#[tokio::test]
async fn a_consumer_timeout_is_curable_and_the_delivery_comes_back() {
    let broker = PrivateBroker::start_with(
        "flowers-timeout",
        &["consumer_timeout = 1000"],
        // The channel checks its consumers' timeouts on this tick (60 s by default).
        "[{rabbit, [{channel_tick_interval, 200}]}].",
    );
    let url = broker.url();
    let run = unique_run_id("timeout");
    let conn = connect(&url, "test").await.unwrap();
    let mut publisher = one_epoch_publisher(&url, &run, PublisherOptions::default()).await;
    let batch = synthetic_batch(&run, 0, Split::Train, 0, 1, 2, 4);
    publisher.publish(&batch).await.unwrap();
    publisher.flush().await.unwrap();

    let queue = train_queue(&run, 0);
    let mut consumer = Consumer::open(&conn, &queue, 1).await.unwrap();
    let held = consumer.next(WAIT).await.unwrap().expect("the batch");
    // Held, unacked, past the timeout: the broker closes the channel.
    let err = consumer.next(Duration::from_secs(10)).await.unwrap_err();
    assert!(err.is_transient(), "a new consumer cures it: {err}");
    drop(held);

    let mut again = Consumer::open(&conn, &queue, 1).await.unwrap();
    let back = again.next(WAIT).await.unwrap().expect("redelivered");
    assert_eq!(back.batch.batch_index, 0);
    assert!(back.redelivered);
    back.ack().await.unwrap();
}
