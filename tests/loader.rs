//! The loader pipeline end to end against the real local RabbitMQ: a generated
//! archive goes through preprocessing, splitting and publishing, and every
//! batch is consumed back; bad inputs make the CLI fail naming the file.

use flowers_broker::{
    connect, dead_queue, delete_run_queues, eval_queue, message_count, train_queue, val_queue,
    Consumer, Publisher, PublisherOptions, RunLayout,
};
use flowers_dataset::matwriter::{write_mat, MatVar};
use flowers_dataset::SplitStrategy;
use flowers_e2e::{broker_url, loader_binary, unique_run_id, SmallDataset};
use flowers_loader::{run, LoaderConfig};
use flowers_preprocess::{preprocess_archive, PreprocessOptions};
use flowers_wire::{Batch, Split};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

const CLASSES: u32 = 4;
const IMG: u32 = 20;

async fn drain(conn: &lapin::Connection, queue: &str) -> Vec<Batch> {
    let mut consumer = Consumer::open(conn, queue, 4).await.unwrap();
    let mut batches = Vec::new();
    while let Some(delivery) = consumer.next(Duration::from_millis(500)).await.unwrap() {
        delivery.ack().await.unwrap();
        batches.push(delivery.batch);
    }
    assert_eq!(consumer.rejected(), 0);
    consumer.close().await.unwrap();
    batches
}

fn numbers(batches: &[Batch]) -> Vec<u32> {
    batches
        .iter()
        .flat_map(|b| b.file_names.iter())
        .map(|name| flowers_dataset::image_number(name).expect("image file name"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_epochs_arrive_byte_exact_shuffled_and_complete() {
    let data = SmallDataset::generate(27, CLASSES, &[28]);
    let run_id = unique_run_id("loader");
    let preprocess = PreprocessOptions {
        img_size: IMG,
        threads: 2,
        ..PreprocessOptions::default()
    };
    let cfg = LoaderConfig {
        data: data.archive.clone(),
        labels: data.labels.clone(),
        setid: None,
        split: SplitStrategy::Stratified {
            val_fraction: 0.25,
            seed: 3,
        },
        preprocess: preprocess.clone(),
        batch_size: 4,
        epochs: 2,
        // An interim evaluation halfway through each epoch: its own queue, val.E.1.
        evaluations_per_epoch: 2,
        seed: 11,
        run_id: run_id.clone(),
        broker_url: broker_url(),
        publisher: PublisherOptions::default(),
        cache_dir: data.dir.path().to_path_buf(),
    };
    let summary = run(&cfg).await.unwrap();
    assert_eq!(summary.images, 27);
    assert_eq!(summary.skipped.len(), 1);
    assert_eq!(summary.skipped[0].file_name, data.corrupt[0]);

    // The reference: the same preprocessing, done independently.
    let labels = flowers_dataset::Labels::from_mat_file(&data.labels).unwrap();
    let reference =
        preprocess_archive(&data.archive, &labels, &preprocess, data.dir.path()).unwrap();
    let expected_label: BTreeMap<u32, u32> = data.images.iter().copied().collect();

    let conn = connect(&broker_url(), "test").await.unwrap();
    let mut train_orders = Vec::new();
    let mut val_orders = Vec::new();
    for epoch in 0..2 {
        let train = drain(&conn, &train_queue(&run_id, epoch)).await;
        let val = drain(&conn, &val_queue(&run_id, epoch)).await;
        let interim = drain(&conn, &eval_queue(&run_id, epoch, 1)).await;
        assert_eq!(summary.epochs[epoch as usize].train_batches, train.len());
        assert_eq!(summary.epochs[epoch as usize].val_batches, val.len());
        assert_eq!(
            summary.epochs[epoch as usize].interim_val_batches,
            interim.len()
        );
        // The interim evaluation sees the same validation batches, marked as part 1.
        assert_eq!(numbers(&interim), numbers(&val));
        assert!(interim.iter().all(|b| b.eval_part == 1));
        assert!(val.iter().all(|b| b.eval_part == 0));
        for (split, batches) in [(Split::Train, &train), (Split::Validation, &val)] {
            for (i, batch) in batches.iter().enumerate() {
                assert_eq!(
                    (batch.epoch, batch.split, batch.batch_index),
                    (epoch, split as i32, i as u32)
                );
                assert_eq!(batch.batches_in_epoch as usize, batches.len());
                assert_eq!(batch.run_id, run_id);
                assert_eq!(batch.num_classes, CLASSES);
                let n = batch.labels.len();
                assert!(
                    n == 4 || (i + 1 == batches.len() && n < 4),
                    "only the last batch may be short"
                );
                let image_bytes = (IMG * IMG * 3) as usize;
                let mut want = vec![0u8; image_bytes];
                for (j, name) in batch.file_names.iter().enumerate() {
                    let number = flowers_dataset::image_number(name).unwrap();
                    assert_eq!(batch.labels[j], expected_label[&number], "label of {name}");
                    reference.store.copy_into(number, &mut want).unwrap();
                    assert!(
                        batch.pixels[j * image_bytes..(j + 1) * image_bytes] == want[..],
                        "pixels of {name}"
                    );
                }
            }
        }
        // Every decodable image exactly once per epoch, across train and val.
        let mut all = [numbers(&train), numbers(&val)].concat();
        all.sort_unstable();
        assert_eq!(all, (1..=27).collect::<Vec<_>>());
        train_orders.push(numbers(&train));
        val_orders.push(numbers(&val));
    }
    assert_ne!(
        train_orders[0], train_orders[1],
        "training order must change between epochs"
    );
    let mut sorted = train_orders[0].clone();
    sorted.sort_unstable();
    assert_ne!(train_orders[0], sorted, "training order must be shuffled");
    assert_eq!(val_orders[0], val_orders[1], "validation order is fixed");
    assert!(!val_orders[0].is_empty());

    delete_run_queues(&conn, &run_id, RunLayout::epochs(2).with_evaluations(2))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_queues_removes_every_queue_of_a_run() {
    let run_id = unique_run_id("delete");
    let layout = RunLayout::epochs(2).with_evaluations(2);
    // Connecting declares the run's queues.
    Publisher::connect(&broker_url(), &run_id, layout, PublisherOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let conn = connect(&broker_url(), "test").await.unwrap();
    let queues = [
        train_queue(&run_id, 1),
        eval_queue(&run_id, 1, 1),
        val_queue(&run_id, 1),
        dead_queue(&run_id),
    ];
    for q in &queues {
        assert_eq!(message_count(&conn, q).await.unwrap(), Some(0), "{q}");
    }
    let out = Command::new(loader_binary())
        .args(["delete-queues", "--run-id", &run_id, "--epochs", "2"])
        .args(["--eval-every", "0.5", "--broker-url", &broker_url()])
        .output()
        .expect("start the loader binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for q in &queues {
        assert_eq!(message_count(&conn, q).await.unwrap(), None, "{q} deleted");
    }
}

/// Runs `loader run` on `data` with `labels`; returns (success, stderr).
fn loader_cli(
    data: &std::path::Path,
    labels: &std::path::Path,
    cache: &std::path::Path,
) -> (bool, String) {
    let run_id = unique_run_id("cli");
    let out = Command::new(loader_binary())
        .args([
            "run",
            "--epochs",
            "1",
            "--img-size",
            "16",
            "--threads",
            "1",
            "--run-id",
            &run_id,
        ])
        .arg("--data")
        .arg(data)
        .arg("--labels")
        .arg(labels)
        .arg("--cache-dir")
        .arg(cache)
        .env("FLOWERS_BROKER_URL", broker_url())
        .output()
        .expect("start the loader binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn truncated_archive_fails_naming_the_file() {
    let data = SmallDataset::generate(12, 2, &[]);
    let bytes = std::fs::read(&data.archive).unwrap();
    let truncated = data.dir.path().join("truncated.tgz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, stderr) = loader_cli(&truncated, &data.labels, data.dir.path());
    assert!(!ok, "the loader must fail on a truncated archive");
    assert!(
        stderr.contains(&truncated.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn wrong_mat_file_fails_naming_the_file() {
    let data = SmallDataset::generate(4, 2, &[]);
    // A MAT file, but with set ids instead of labels.
    let setid = data.dir.path().join("setid.mat");
    write_mat(&setid, &[MatVar::row("trnid", &[1.0, 2.0])]).unwrap();
    let not_mat = data.dir.path().join("labels.txt");
    std::fs::write(&not_mat, "labels: 1 2 3 4\n").unwrap();
    for labels in [&setid, &not_mat] {
        let (ok, stderr) = loader_cli(&data.archive, labels, data.dir.path());
        assert!(!ok, "the loader must fail on {}", labels.display());
        assert!(stderr.contains(&labels.display().to_string()), "{stderr}");
    }
}
