//! What the state machine's unit tests share: a clock, a state holding one run, and short
//! ways to register workers, report steps and evaluations, and complete a round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowers_proto::v1 as pb;

use super::{checkpoint_id, CheckedUpload, NewCheckpoint, Now, Settings, State};
use crate::error::Result;
use crate::tensors::TensorSpec;
pub(super) use crate::testing::{
    batch_evaluation as evaluation, run_config as config, step_metrics as step,
};

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
