//! Helpers of the trainer's RabbitMQ tests: unique runs, small generated batches, queue counts.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::{SystemTime, UNIX_EPOCH};

pub use flowers_broker::RunLayout;
use flowers_broker::{
    connect, dead_queue, delete_run_queues, eval_queue, message_count, train_queue, val_queue,
    Publisher, PublisherOptions,
};
use flowers_model::{OptimizerKind, Variant};
use flowers_trainer::device::Precision;
use flowers_trainer::state::ModelOptions;
use flowers_wire::{build_batch, Batch, BatchHeader, Split};

pub const IMG: u32 = 75;
pub const CLASSES: u32 = 102;

/// The broker under test: the one the services find without `--broker-url`.
pub use flowers_broker::broker_url_from_env as broker_url;

/// A run id no other test (or earlier run of this one) uses.
pub fn unique_run(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "t-{prefix}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

/// Batch `index` of `count` of a split: `n` 75 px images of deterministic pixels and labels.
pub fn batch(run: &str, epoch: u32, split: Split, index: u32, count: u32, n: u32) -> Batch {
    let header = BatchHeader {
        run_id: run.to_string(),
        epoch,
        split,
        batch_index: index,
        batches_in_epoch: count,
        num_classes: CLASSES,
        eval_part: 0,
    };
    let image = (IMG * IMG * 3) as usize;
    let pixels = (0..n as usize * image)
        .map(|i| ((i * 31 + index as usize * 7 + epoch as usize) % 256) as u8)
        .collect();
    let labels = (0..n).map(|i| (index * 5 + i) % CLASSES).collect();
    let names = (0..n)
        .map(|i| format!("jpg/image_{:05}.jpg", index * 10 + i + 1))
        .collect();
    build_batch(&header, IMG, IMG, names, labels, pixels).unwrap()
}

/// Every batch of `epochs` epochs: `train` training batches of 4 images (the last one of 2),
/// then `val` validation batches of 4, per epoch, in the loader's order.
pub fn epochs(run: &str, epochs: u32, train: u32, val: u32) -> Vec<Batch> {
    let mut out = Vec::new();
    for e in 0..epochs {
        for i in 0..train {
            out.push(batch(
                run,
                e,
                Split::Train,
                i,
                train,
                if i + 1 == train { 2 } else { 4 },
            ));
        }
        for i in 0..val {
            out.push(batch(run, e, Split::Validation, i, val, 4));
        }
    }
    out
}

/// The `val` validation batches of interim evaluation `part` of `epoch`.
pub fn interim(run: &str, epoch: u32, val: u32, part: u32) -> Vec<Batch> {
    (0..val)
        .map(|i| {
            let mut b = batch(run, epoch, Split::Validation, i, val, 4);
            b.eval_part = part;
            b
        })
        .collect()
}

pub async fn publish(run: &str, layout: RunLayout, batches: &[Batch]) {
    let mut p = Publisher::connect(&broker_url(), run, layout, PublisherOptions::default())
        .await
        .unwrap();
    for b in batches {
        p.publish(b).await.unwrap();
    }
    p.close().await.unwrap();
}

/// Sends `payload` straight to `queue` as a persistent message, bypassing the publisher's
/// checks and deduplication (for malformed messages and redelivered copies).
pub async fn publish_raw(queue: &str, payload: &[u8]) {
    let conn = connect(&broker_url(), "trainer test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.into(),
        lapin::options::BasicPublishOptions::default(),
        payload,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "OK".into()).await;
}

/// Ready messages of the run's queue `train`/`val`/`val1` (interim part 1)/`dead` of `epoch`.
pub async fn ready(run: &str, which: &str, epoch: u32) -> u32 {
    let queue = match which {
        "train" => train_queue(run, epoch),
        "val" => val_queue(run, epoch),
        "val1" => eval_queue(run, epoch, 1),
        _ => dead_queue(run),
    };
    let conn = connect(&broker_url(), "trainer test").await.unwrap();
    let n = message_count(&conn, &queue)
        .await
        .unwrap()
        .expect("queue exists");
    let _ = conn.close(200, "OK".into()).await;
    n
}

/// fp32 on the CPU, torchvision's architecture, 102 classes, a small trunk cache.
pub fn cpu_model(flip: bool) -> ModelOptions {
    ModelOptions {
        device: tch::Device::Cpu,
        precision: Precision::Fp32,
        num_classes: i64::from(CLASSES),
        variant: Variant::Torchvision,
        label_smoothing: 0.0,
        dropout: 0.5,
        flip,
        optimizer: OptimizerKind::adamax(),
        trunk_cache_bytes: 64 << 20,
    }
}

pub async fn cleanup(run: &str, layout: RunLayout) {
    let conn = connect(&broker_url(), "trainer test").await.unwrap();
    delete_run_queues(&conn, run, layout).await.unwrap();
    let _ = conn.close(200, "OK".into()).await;
}
