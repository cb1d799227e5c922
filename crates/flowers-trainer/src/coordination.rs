//! The decisions a coordinator takes over from a standalone trainer: is this stage over, sync
//! before validation, who validates, where metrics go. The loop in [`crate::run`] asks a
//! [`Coordination`]; [`Standalone`] decides alone, [`crate::coordinated::Coordinated`] through
//! a coordinator.
//!
//! The loop keeps the broker to itself. The model's thread is shared: a coordination that must
//! exchange parameters keeps the handle [`Coordination::started`] gives it.

use std::future::Future;
use std::sync::Arc;

use flowers_model::Policy;

use crate::metrics::{BatchEval, EvalMetrics, StepMetrics};
use crate::progress::EpochProgress;
use crate::state::TrainState;
use crate::worker::Worker;
use crate::TrainError;

/// The decisions a coordinator takes over from a standalone trainer.
pub trait Coordination {
    /// The model is built (and resumed, if asked): e.g. load the run's latest average into it,
    /// and keep `model` for the hooks that exchange parameters later. `policies` are what the
    /// run's phases train, in order.
    fn started(
        &mut self,
        _model: &Arc<Worker<TrainState>>,
        _policies: &[Policy],
    ) -> impl Future<Output = Result<(), TrainError>> + Send {
        async { Ok(()) }
    }

    /// Whether the current stage is over for this trainer. Asked at every batch boundary:
    /// before every wait for a message and after every poll interval without one (`idle`).
    fn stage_done(
        &mut self,
        progress: &EpochProgress,
        idle: bool,
    ) -> impl Future<Output = Result<bool, TrainError>> + Send;

    /// Whether this trainer is alone on the run's queues. Then a drained queue whose successor
    /// holds messages ends the stage too: the loader fills each queue completely before it
    /// starts the next one, so the missing batches were acked by a trainer that died after its
    /// last checkpoint. With others on the queues, it only means they took the rest.
    fn alone(&self) -> bool;

    /// During the training of `epoch`, at a batch boundary: an interim evaluation (its part) to
    /// run before the next step, if one is asked for.
    fn interim_evaluation(
        &mut self,
        _epoch: u32,
    ) -> impl Future<Output = Result<Option<u32>, TrainError>> + Send {
        async { Ok(None) }
    }

    /// Called after every optimizer step, before its batch is acked.
    fn step_done(
        &mut self,
        metrics: &StepMetrics,
    ) -> impl Future<Output = Result<(), TrainError>> + Send;

    /// Before evaluation `part` of `epoch` (0: its end): the sync point, e.g. for averaging the
    /// model across workers.
    fn before_validation(
        &mut self,
        epoch: u32,
        part: u32,
    ) -> impl Future<Output = Result<(), TrainError>> + Send;

    /// Whether this trainer validates `epoch` at all.
    fn should_validate(
        &mut self,
        epoch: u32,
    ) -> impl Future<Output = Result<bool, TrainError>> + Send;

    /// Called after every validation batch, before it is acked.
    fn batch_evaluated(
        &mut self,
        _counts: &BatchEval,
    ) -> impl Future<Output = Result<(), TrainError>> + Send {
        async { Ok(()) }
    }

    /// A finished evaluation (this trainer's share of it).
    fn validation_done(
        &mut self,
        metrics: &EvalMetrics,
    ) -> impl Future<Output = Result<(), TrainError>> + Send;
}

/// A trainer alone on the run: a stage ends when it has used `batches_in_epoch` distinct batches
/// (or, see [`Coordination::alone`], when the loader has moved on).
#[derive(Debug, Default)]
pub struct Standalone;

impl Coordination for Standalone {
    async fn stage_done(
        &mut self,
        progress: &EpochProgress,
        _idle: bool,
    ) -> Result<bool, TrainError> {
        Ok(progress.is_complete())
    }

    fn alone(&self) -> bool {
        true
    }

    async fn step_done(&mut self, _: &StepMetrics) -> Result<(), TrainError> {
        Ok(())
    }

    async fn before_validation(&mut self, _: u32, _: u32) -> Result<(), TrainError> {
        Ok(())
    }

    async fn should_validate(&mut self, _: u32) -> Result<bool, TrainError> {
        Ok(true)
    }

    async fn validation_done(&mut self, _: &EvalMetrics) -> Result<(), TrainError> {
        Ok(())
    }
}
