//! `flowers_trainer::run` against the local RabbitMQ: every batch trained once and acked,
//! redelivered duplicates dropped, malformed messages dead-lettered while training goes on.

mod common;

use std::collections::BTreeMap;

use common::*;
use flowers_broker::train_queue;
use flowers_model::{read_checkpoint_meta, Policy};
use flowers_trainer::coordination::{Coordination, Standalone};
use flowers_trainer::metrics::{EvalMetrics, StepMetrics};
use flowers_trainer::progress::EpochProgress;
use flowers_trainer::recipe::{Hyper, Overrides, Recipe};
use flowers_trainer::run::{run, RunOptions, RunOutcome};
use flowers_trainer::TrainError;
use flowers_wire::{encode_batch, DEFAULT_MAX_MESSAGE_BYTES};

/// Standalone decisions, with every step and validation recorded.
#[derive(Default)]
struct Recorder {
    inner: Standalone,
    /// (epoch, batch index) -> times trained.
    trained: BTreeMap<(u32, u32), u32>,
    validations: Vec<EvalMetrics>,
}

impl Coordination for Recorder {
    async fn stage_done(&mut self, p: &EpochProgress, idle: bool) -> Result<bool, TrainError> {
        self.inner.stage_done(p, idle).await
    }
    fn alone(&self) -> bool {
        self.inner.alone()
    }
    async fn step_done(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        assert!(m.loss.is_finite() && m.images > 0 && m.step_secs > 0.0);
        *self.trained.entry((m.epoch, m.batch_index)).or_default() += 1;
        Ok(())
    }
    async fn before_validation(&mut self, e: u32, part: u32) -> Result<(), TrainError> {
        self.inner.before_validation(e, part).await
    }
    async fn should_validate(&mut self, e: u32) -> Result<bool, TrainError> {
        self.inner.should_validate(e).await
    }
    async fn validation_done(&mut self, m: &EvalMetrics) -> Result<(), TrainError> {
        self.validations.push(m.clone());
        Ok(())
    }
}

fn hyper() -> Hyper {
    // The head alone: cheap steps; the loop is what is under test.
    let o = Overrides {
        policy: Some(Policy::Head),
        ..Default::default()
    };
    Hyper::new(Recipe::Reference, &o).unwrap()
}

fn options(run: &str, epochs: u32, dir: Option<&std::path::Path>) -> RunOptions {
    RunOptions {
        broker_url: broker_url(),
        run_id: run.to_string(),
        epochs,
        evaluations_per_epoch: 1,
        start_epoch: None,
        prefetch: 3,
        broker_outage_limit: std::time::Duration::from_secs(30),
        weights: None,
        resume: None,
        checkpoint_dir: dir.map(|d| d.to_path_buf()),
        img_size: Some(IMG),
        batch_size: Some(4),
        seed: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trains_each_batch_once_acks_it_and_validates_each_epoch() {
    let run_id = unique_run("once");
    let dir = tempfile::tempdir().unwrap();
    let batches = epochs(&run_id, 2, 3, 1);
    publish(&run_id, RunLayout::epochs(2), &batches).await;
    // A second copy of batch 0 behind the epoch's batches, as a trainer that died between
    // reporting a step and acking it leaves: nobody trains it, and it is not left in train.0.
    let copy = encode_batch(&batches[0], DEFAULT_MAX_MESSAGE_BYTES).unwrap();
    publish_raw(&train_queue(&run_id, 0), &copy).await;

    let mut rec = Recorder::default();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let outcome = run(
        &options(&run_id, 2, Some(dir.path())),
        cpu_model(true),
        &hyper(),
        &mut rec,
        stop,
    )
    .await
    .unwrap();

    let expected: BTreeMap<(u32, u32), u32> = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        .into_iter()
        .map(|k| (k, 1))
        .collect();
    assert_eq!(rec.trained, expected, "each batch trained exactly once");
    assert_eq!(rec.validations.len(), 2);
    assert!(rec.validations.iter().all(|v| v.images == 4));
    assert_eq!(
        outcome,
        RunOutcome::Finished(Some(rec.validations[1].clone()))
    );
    for e in 0..2 {
        assert_eq!(
            ready(&run_id, "train", e).await,
            0,
            "train.{e} drained and acked"
        );
        assert_eq!(
            ready(&run_id, "val", e).await,
            0,
            "val.{e} drained and acked"
        );
    }
    assert_eq!(ready(&run_id, "dead", 0).await, 0);
    let meta = read_checkpoint_meta(&dir.path().join("latest.safetensors")).unwrap();
    assert_eq!(
        (meta.epoch, meta.step, meta.img_size),
        (2, 6, i64::from(IMG))
    );
    cleanup(&run_id, RunLayout::epochs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_is_dead_lettered_and_training_goes_on() {
    let run_id = unique_run("dlq");
    let batches = epochs(&run_id, 1, 2, 1);
    publish(&run_id, RunLayout::epochs(1), &batches[..1]).await;
    // A message that is no Batch at all, between two good ones.
    publish_raw(&train_queue(&run_id, 0), b"\xff\xfe not a protobuf batch").await;
    publish(&run_id, RunLayout::epochs(1), &batches[1..]).await;

    let mut rec = Recorder::default();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let outcome = run(
        &options(&run_id, 1, None),
        cpu_model(true),
        &hyper(),
        &mut rec,
        stop,
    )
    .await
    .unwrap();

    assert!(matches!(outcome, RunOutcome::Finished(Some(_))));
    assert_eq!(
        rec.trained.keys().copied().collect::<Vec<_>>(),
        [(0, 0), (0, 1)]
    );
    assert_eq!(
        ready(&run_id, "dead", 0).await,
        1,
        "the broken message is in the dead-letter queue"
    );
    assert_eq!(ready(&run_id, "train", 0).await, 0);
    cleanup(&run_id, RunLayout::epochs(1)).await;
}
