//! The coordinator's state machine: runs, workers, epoch accounting, sync rounds and
//! checkpoints. Pure and synchronous: the time ([`Now`]) and generated run ids come in as
//! arguments, so that it is unit-testable without gRPC, clocks or randomness;
//! [`crate::Coordinator`] drives it.
//!
//! - [`State`] (here): every run, the events and the runs changed since the last look;
//! - `spec`: the [`RunSpec`] a run is registered with, and the id rule;
//! - `records`: what a run is made of, as `run.json` persists it;
//! - `workers`: registration, liveness and the sweep that marks silent workers lost;
//! - `progress`: the training steps and evaluations workers report;
//! - `rounds`: sync rounds and their uploads ([`UploadPlan`], [`CheckedUpload`], [`RoundJob`]);
//! - `checkpoints`: the averages completed rounds make ([`NewCheckpoint`]), pruned to the
//!   latest, the best and those awaiting evaluation;
//! - `render`: the protobuf views of a run (status, directives, checkpoints).
//!
//! It must not depend on gRPC transport, tokio, the file system or the clock: reading,
//! saving and waiting are the coordinator's.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flowers_proto::v1 as pb;

use crate::error::{CoordinatorError, Result};

mod checkpoints;
#[cfg(test)]
mod fixtures;
mod progress;
mod records;
mod render;
mod rounds;
mod spec;
mod workers;

pub(crate) use checkpoints::checkpoint_id;
pub use checkpoints::NewCheckpoint;
use records::Run;
pub use rounds::{CheckedUpload, RoundJob, UploadPlan};
use spec::check_id;
pub use spec::RunSpec;

/// Behaviour that is the coordinator's, not a run's.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Open a sync round when a worker has trained this many steps since its last sync (0: only at epoch ends).
    pub sync_every: u32,
    /// A worker silent for this long is marked lost.
    pub worker_timeout: Duration,
}

/// The moment a change happens, read once by the caller.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// The monotonic clock, for worker liveness.
    pub instant: Instant,
    /// The wall clock in seconds since the Unix epoch, as records store it.
    pub unix: f64,
}

/// All runs.
#[derive(Debug)]
pub struct State {
    settings: Settings,
    runs: BTreeMap<String, Run>,
    events: Vec<(String, pb::RunEvent)>,
    dirty: BTreeSet<String>,
}

fn event(e: pb::run_event::Event) -> pb::RunEvent {
    pb::RunEvent { event: Some(e) }
}

impl State {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            runs: BTreeMap::new(),
            events: Vec::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Adds a run loaded from disk; its workers' liveness timeouts start afresh at `now`.
    pub fn restore(
        &mut self,
        json: &[u8],
        now: Now,
    ) -> std::result::Result<String, serde_json::Error> {
        let mut run: Run = serde_json::from_slice(json)?;
        for w in run.workers.values_mut() {
            w.last_seen = Some(now.instant);
        }
        let id = run.id.clone();
        self.runs.insert(id.clone(), run);
        Ok(id)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Events produced since the last call, for WatchRun subscribers.
    pub fn take_events(&mut self) -> Vec<(String, pb::RunEvent)> {
        std::mem::take(&mut self.events)
    }

    /// Runs changed since the last call, serialised for saving.
    pub fn take_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|id| {
                let run = self.runs.get(&id)?;
                Some((
                    id,
                    serde_json::to_vec_pretty(run).expect("run state serialises"),
                ))
            })
            .collect()
    }

    /// Every run, serialised (for the final save at shutdown).
    pub fn serialize_all(&self) -> Vec<(String, Vec<u8>)> {
        self.runs
            .iter()
            .map(|(id, run)| {
                (
                    id.clone(),
                    serde_json::to_vec_pretty(run).expect("run state serialises"),
                )
            })
            .collect()
    }

    fn run(&self, run_id: &str) -> Result<&Run> {
        self.runs
            .get(run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_owned()))
    }

    fn run_mut(&mut self, run_id: &str) -> Result<&mut Run> {
        self.dirty.insert(run_id.to_owned());
        self.runs
            .get_mut(run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_owned()))
    }

    /// Registers run `run_id` (the caller draws one when the loader named none); registering
    /// the same config again is idempotent, another one under the same id is refused.
    pub fn register_run(
        &mut self,
        config: Option<&pb::RunConfig>,
        run_id: &str,
        now: Now,
    ) -> Result<pb::RunStatus> {
        let config =
            config.ok_or_else(|| CoordinatorError::Invalid("RegisterRun needs a config".into()))?;
        let spec = RunSpec::from(config);
        spec.validate()?;
        check_id("run", run_id)?;
        if let Some(existing) = self.runs.get(run_id) {
            // Registering the same run again (a loader retry or restart) is fine.
            return if existing.spec == spec {
                self.status(run_id, StatusDetail::default())
            } else {
                Err(CoordinatorError::RunExists(run_id.to_owned()))
            };
        }
        tracing::info!(run = %run_id, "run registered");
        let run = Run::new(run_id.to_owned(), spec, now.unix);
        self.runs.insert(run_id.to_owned(), run);
        self.dirty.insert(run_id.to_owned());
        self.status(run_id, StatusDetail::default())
    }

    pub fn run_ids(&self) -> Vec<String> {
        self.runs.keys().cloned().collect()
    }

    pub fn status(&self, run_id: &str, detail: StatusDetail) -> Result<pb::RunStatus> {
        let run = self.run(run_id)?;
        Ok(run.status(&self.settings, detail))
    }
}

/// What a run's status holds besides its summary (`GetRunRequest`'s `include_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusDetail {
    /// The training curve.
    pub history: bool,
    /// Which batches of every epoch and evaluation are counted.
    pub batches: bool,
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn registering_the_same_run_again_is_idempotent_and_another_config_is_refused() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(2, 4, 1), clock.at(0));
        let again = state
            .register_run(Some(&config(2, 4, 1)), RUN, clock.at(5))
            .unwrap();
        assert_eq!((again.run_id.as_str(), again.created_at), (RUN, 1000.0));
        assert!(state.take_dirty().is_empty(), "nothing changed");
        let err = state
            .register_run(Some(&config(3, 4, 1)), RUN, clock.at(5))
            .unwrap_err();
        assert!(
            matches!(err, CoordinatorError::RunExists(ref id) if id == RUN),
            "{err}"
        );
    }

    #[test]
    fn a_run_needs_a_valid_config_and_id() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(1, 4, 1), clock.at(0));
        let invalid = |r: Result<pb::RunStatus>| matches!(r, Err(CoordinatorError::Invalid(_)));
        assert!(invalid(state.register_run(None, "x", clock.at(0))));
        assert!(invalid(state.register_run(
            Some(&config(0, 4, 1)),
            "x",
            clock.at(0)
        )));
        // Run ids name queues: the broker's alphabet, no dots.
        assert!(invalid(state.register_run(
            Some(&config(1, 4, 1)),
            "a.b",
            clock.at(0)
        )));
        assert_eq!(state.run_ids(), [RUN]);
        let status = state
            .register_run(Some(&config(1, 4, 1)), "run-0000abcd", clock.at(0))
            .unwrap();
        assert_eq!(status.run_id, "run-0000abcd");
        let dirty: Vec<String> = state.take_dirty().into_iter().map(|(id, _)| id).collect();
        assert_eq!(dirty, ["run-0000abcd"]);
    }

    #[test]
    fn a_restored_run_is_the_saved_one_with_fresh_worker_timeouts() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(1, 4, 1), clock.at(0));
        let w = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &w, 1, &[(0, 0), (0, 1)], clock.at(10)).unwrap();
        let saved = state.serialize_all();
        assert_eq!(saved.len(), 1);

        let mut restored = State::new(state.settings().clone());
        let later = clock.at(60_000);
        assert_eq!(restored.restore(&saved[0].1, later).unwrap(), RUN);
        assert_eq!(restored.serialize_all(), saved);
        // Silent for a minute before the restart, yet not lost within a timeout after it.
        assert!(restored.sweep(clock.at(60_500)).is_empty());
        assert_eq!(restored.sweep(clock.at(61_500)), [RUN]);
        assert!(restored.restore(b"{", later).is_err());
    }
}
