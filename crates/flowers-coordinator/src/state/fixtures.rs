//! What the state machine's unit tests share: a clock, a state holding one run, and short
//! ways to register workers, report steps and evaluations, and complete a round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowers_proto::v1 as pb;

use super::{checkpoint_id, CheckedUpload, NewCheckpoint, Now, Settings, State};
use crate::error::Result;
use crate::tensors::TensorSpec;

/// The run every fixture state holds.
pub(super) const RUN: &str = "r";

/// The worker timeout of fixture states.
pub(super) const TIMEOUT: Duration = Duration::from_secs(1);

/// A test's clock: [`Clock::at`] is a moment so many milliseconds after its start.
pub(super) struct Clock(Instant);

impl Clock {
    pub(super) fn new() -> Self {
        Self(Instant::now())
    }

    /// `ms` after the start, whose wall clock reads 1000 s.
    pub(super) fn at(&self, ms: u64) -> Now {
        Now {
            instant: self.0 + Duration::from_millis(ms),
            unix: 1000.0 + ms as f64 / 1000.0,
        }
    }
}

/// A valid config: `epochs` epochs of `train` training and `val` validation batches.
pub(super) fn config(epochs: u32, train: u32, val: u32) -> pb::RunConfig {
    pb::RunConfig {
        dataset: "flowers-test".into(),
        split: "stratified".into(),
        img_size: 32,
        batch_size: 4,
        epochs,
        train_batches_per_epoch: train,
        val_batches_per_epoch: val,
        seed: 7,
        num_classes: 102,
        train_images: train * 4,
        val_images: val * 4,
        evaluations_per_epoch: 1,
    }
}

/// A state (rounds every `sync_every` steps, [`TIMEOUT`]) holding [`RUN`] of `config`.
pub(super) fn state_with_run(sync_every: u32, config: pb::RunConfig, now: Now) -> State {
    let mut state = State::new(Settings {
        sync_every,
        worker_timeout: TIMEOUT,
    });
    state.register_run(Some(&config), RUN, now).unwrap();
    state.take_events();
    state.take_dirty();
    state
}

/// Registers a new worker on `host`; returns its id.
pub(super) fn add_worker(state: &mut State, host: &str, now: Now) -> String {
    let req = pb::RegisterWorkerRequest {
        run_id: RUN.into(),
        host: host.into(),
        device: "cpu".into(),
        ..Default::default()
    };
    state.register_worker(&req, now).unwrap().worker_id
}

/// A step on batch `batch` of `epoch`: 4 images, loss 2, accuracy 0.25, 100 images/s.
pub(super) fn step(epoch: u32, batch: u32) -> pb::StepMetrics {
    pb::StepMetrics {
        step: 0,
        epoch,
        batch_index: batch,
        images: 4,
        loss: 2.0,
        accuracy: 0.25,
        images_per_s: 100.0,
        data_wait_s: 0.01,
        step_s: 0.04,
    }
}

/// Reports `steps` (epoch, batch) of `worker` in call `seq`.
pub(super) fn report(
    state: &mut State,
    worker: &str,
    seq: u64,
    steps: &[(u32, u32)],
    now: Now,
) -> Result<pb::ReportStepsResponse> {
    let req = pb::ReportStepsRequest {
        run_id: RUN.into(),
        worker_id: worker.into(),
        seq,
        steps: steps.iter().map(|&(e, b)| step(e, b)).collect(),
    };
    state.report_steps(&req, now)
}

/// The tensors' schema of every fixture upload.
pub(super) fn schema(len: usize) -> Vec<TensorSpec> {
    vec![TensorSpec {
        name: "w".into(),
        dtype: "F32".into(),
        shape: vec![len],
    }]
}

/// An upload weighted by `samples`, of schema `schema(1)`.
pub(super) fn upload(samples: u64) -> CheckedUpload {
    CheckedUpload {
        bytes: Arc::new(vec![samples as u8]),
        samples,
        schema: schema(1),
    }
}

/// Every participant of the open round uploads, and the round is finished as checkpoint
/// `round-NNNNNN` of 100 bytes. Returns the round's number and the checkpoints pruned.
pub(super) fn complete_round(state: &mut State, now: Now) -> (u64, Vec<String>) {
    let round = state.runs[RUN].round.as_ref().expect("a round is open");
    let (number, participants) = (round.number, round.participants.clone());
    for worker in &participants {
        state
            .add_upload(RUN, worker, number, upload(4), now)
            .unwrap();
    }
    let job = state.take_ready_round(RUN).expect("every upload is in");
    assert_eq!(job.round, number);
    let checkpoint = NewCheckpoint {
        id: checkpoint_id(number),
        size_bytes: 100,
    };
    (number, state.finish_round(RUN, number, checkpoint, now))
}

/// A validation batch of 10 images, `correct` of them right, loss sum 4.
pub(super) fn evaluation(batch_index: u32, correct: u32) -> pb::BatchEvaluation {
    pb::BatchEvaluation {
        batch_index,
        images: 10,
        correct,
        correct_top5: 10,
        loss_sum: 4.0,
    }
}

/// Reports `batches` of evaluation `part` of `epoch` by `worker`.
pub(super) fn evaluate(
    state: &mut State,
    worker: &str,
    epoch: u32,
    part: u32,
    batches: Vec<pb::BatchEvaluation>,
    now: Now,
) -> Result<pb::ReportEvaluationResponse> {
    let req = pb::ReportEvaluationRequest {
        run_id: RUN.into(),
        worker_id: worker.into(),
        epoch,
        part,
        batches,
    };
    state.report_evaluation(&req, now)
}

/// The kinds of the events produced since the last look.
pub(super) fn event_kinds(state: &mut State) -> Vec<&'static str> {
    state
        .take_events()
        .into_iter()
        .map(|(_, e)| match e.event.expect("an event") {
            pb::run_event::Event::Snapshot(_) => "snapshot",
            pb::run_event::Event::Steps(_) => "steps",
            pb::run_event::Event::EpochTrained(_) => "trained",
            pb::run_event::Event::Evaluation(_) => "evaluation",
            pb::run_event::Event::Finished(_) => "finished",
            pb::run_event::Event::Worker(_) => "worker",
        })
        .collect()
}

/// Whether `r` is a refusal for a failed precondition.
pub(super) fn precondition<T>(r: Result<T>) -> bool {
    matches!(r, Err(crate::error::CoordinatorError::Precondition(_)))
}
