//! Sync rounds: when one opens, which uploads it takes, and how it ends short of its
//! checkpoint (`checkpoints.rs`): failed (participants send again), or cancelled when every
//! participant was lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::records::{Phase, Round, Upload};
use super::{Now, State};
use crate::error::{CoordinatorError, Result};
use crate::tensors::{check_schema, TensorSpec};

/// What an uploader should do after its header was checked.
#[derive(Debug, PartialEq, Eq)]
pub enum UploadPlan {
    /// The round is open and expects this worker: send the tensors.
    Send { schema: Option<Vec<TensorSpec>> },
    /// The round already completed (a retry): its average is this checkpoint.
    Done { checkpoint_id: String },
}

/// A worker's tensors, parsed and with their schema, ready to join a round.
#[derive(Debug)]
pub struct CheckedUpload {
    pub bytes: Arc<Vec<u8>>,
    /// Samples trained since the worker's last sync: its weight in the average.
    pub samples: u64,
    pub schema: Vec<TensorSpec>,
}

/// A round whose uploads are all in, ready to be averaged.
#[derive(Debug)]
pub struct RoundJob {
    pub run_id: String,
    pub round: u64,
    pub epoch: u32,
    pub uploads: Vec<(Arc<Vec<u8>>, u64)>,
    pub workers: Vec<String>,
}

impl State {
    /// Opens a round when one is due and none is open: first the round of the current
    /// epoch's next evaluation once its share of training is done, else a periodic one when a
    /// worker reached sync_every. None while an evaluation is under way (nobody trains).
    pub(super) fn maybe_open_round(&mut self, run_id: &str) {
        let sync_every = self.settings.sync_every as u64;
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.phase != Phase::Running || run.round.is_some() || run.validating().is_some() {
            return;
        }
        let epoch = run.current_epoch;
        let evaluation = run.due_evaluation();
        let periodic = sync_every > 0
            && run
                .workers
                .values()
                .any(|w| !w.lost && w.steps_since_sync >= sync_every);
        if evaluation.is_none() && !periodic {
            return;
        }
        let participants: BTreeSet<String> = run
            .workers
            .values()
            .filter(|w| !w.lost)
            .map(|w| w.id.clone())
            .collect();
        if participants.is_empty() {
            return;
        }
        let number = run.last_round + 1;
        tracing::info!(
            run = run_id,
            round = number,
            ?evaluation,
            workers = participants.len(),
            "sync round opened"
        );
        run.round = Some(Round {
            number,
            evaluation,
            epoch,
            participants,
            uploads: BTreeMap::new(),
            averaging: false,
        });
        self.dirty.insert(run_id.to_owned());
    }

    /// Checks an upload's header before its tensors are read.
    pub fn plan_upload(&self, run_id: &str, worker_id: &str, round: u64) -> Result<UploadPlan> {
        let run = self.run(run_id)?;
        if !run.workers.contains_key(worker_id) {
            return Err(CoordinatorError::UnknownWorker {
                run: run_id.to_owned(),
                worker: worker_id.to_owned(),
            });
        }
        if round == run.last_round && run.last_round_participants.contains(worker_id) {
            if let Some(latest) = &run.latest {
                return Ok(UploadPlan::Done {
                    checkpoint_id: latest.clone(),
                });
            }
        }
        match &run.round {
            Some(r) if r.number == round && r.participants.contains(worker_id) && !r.averaging => {
                if r.uploads.contains_key(worker_id) {
                    Err(CoordinatorError::Precondition(format!("worker {worker_id} already sent its tensors for round {round}")))
                } else {
                    Ok(UploadPlan::Send { schema: run.schema.clone() })
                }
            }
            Some(r) if r.number == round && !r.participants.contains(worker_id) => Err(CoordinatorError::Precondition(format!(
                "worker {worker_id} is not part of round {round} (it joined or came back after the round opened)"
            ))),
            _ => Err(CoordinatorError::Precondition(format!(
                "round {round} is not open for uploads in run {run_id} (last completed round: {})",
                run.last_round
            ))),
        }
    }

    /// Adds a worker's tensors to the open round, checking them against the run's schema.
    pub fn add_upload(
        &mut self,
        run_id: &str,
        worker_id: &str,
        round: u64,
        upload: CheckedUpload,
        now: Now,
    ) -> Result<()> {
        if let UploadPlan::Done { .. } = self.plan_upload(run_id, worker_id, round)? {
            return Err(CoordinatorError::Precondition(format!(
                "round {round} already completed"
            )));
        }
        self.touch(run_id, worker_id, now)?;
        let run = self.run_mut(run_id)?;
        match &run.schema {
            Some(expected) => check_schema(expected, &upload.schema)?,
            None => run.schema = Some(upload.schema),
        }
        if let Some(w) = run.workers.get_mut(worker_id) {
            w.in_sync = true;
        }
        let r = run.round.as_mut().expect("plan_upload saw the round open");
        let samples = upload.samples;
        r.uploads.insert(
            worker_id.to_owned(),
            Upload {
                bytes: upload.bytes,
                samples,
            },
        );
        tracing::debug!(
            run = run_id,
            worker = worker_id,
            round,
            samples,
            "upload received"
        );
        Ok(())
    }

    /// The run's open round, if every participant still active has sent its
    /// tensors (lost ones are dropped). A round all of whose participants were
    /// lost before sending anything is cancelled, and reopened when due.
    pub fn take_ready_round(&mut self, run_id: &str) -> Option<RoundJob> {
        let run = self.runs.get_mut(run_id)?;
        let round = run.round.as_mut()?;
        if round.averaging {
            return None;
        }
        let waiting_for = round
            .participants
            .iter()
            .filter(|p| {
                !round.uploads.contains_key(*p) && run.workers.get(*p).is_some_and(|w| !w.lost)
            })
            .count();
        if waiting_for > 0 {
            return None;
        }
        if round.uploads.is_empty() {
            tracing::warn!(
                run = run_id,
                round = round.number,
                "every participant of the round was lost; cancelled"
            );
            run.round = None;
            self.dirty.insert(run_id.to_owned());
            self.maybe_open_round(run_id);
            return None;
        }
        round.averaging = true;
        Some(RoundJob {
            run_id: run_id.to_owned(),
            round: round.number,
            epoch: round.epoch,
            uploads: round
                .uploads
                .values()
                .map(|u| (u.bytes.clone(), u.samples))
                .collect(),
            workers: round.uploads.keys().cloned().collect(),
        })
    }

    /// Averaging or saving failed: the uploads are dropped and the round stays
    /// open, so that participants (whose calls fail) send again.
    pub fn fail_round(&mut self, run_id: &str, round: u64) {
        if let Some(r) = self
            .runs
            .get_mut(run_id)
            .and_then(|run| run.round.as_mut())
            .filter(|r| r.number == round)
        {
            r.uploads.clear();
            r.averaging = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::records::EvalPoint;
    use super::*;

    fn open_round(state: &State) -> Option<(u64, Vec<String>)> {
        let r = state.runs[RUN].round.as_ref()?;
        Some((r.number, r.participants.iter().cloned().collect()))
    }

    #[test]
    fn a_periodic_round_opens_at_sync_every_for_every_active_worker() {
        let clock = Clock::new();
        let mut state = state_with_run(2, config(1, 8, 1), clock.at(0));
        let (a, b) = (
            add_worker(&mut state, "a", clock.at(0)),
            add_worker(&mut state, "b", clock.at(0)),
        );
        let d = report(&mut state, &a, 1, &[(0, 0)], clock.at(0))
            .unwrap()
            .directives
            .unwrap();
        assert_eq!((d.sync_round, open_round(&state)), (0, None));
        let d = report(&mut state, &a, 2, &[(0, 1)], clock.at(0))
            .unwrap()
            .directives
            .unwrap();
        assert_eq!(d.sync_round, 1);
        assert_eq!(open_round(&state), Some((1, vec![a.clone(), b.clone()])));
        assert_eq!(state.heartbeat(RUN, &b, clock.at(0)).unwrap().sync_round, 1);
        // Once sent, a worker is no longer asked.
        state
            .add_upload(RUN, &a, 1, upload(8), clock.at(0))
            .unwrap();
        assert_eq!(state.heartbeat(RUN, &a, clock.at(0)).unwrap().sync_round, 0);
    }

    #[test]
    fn a_worker_joining_mid_round_is_not_expected_in_it() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 8, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        let late = add_worker(&mut state, "late", clock.at(0));
        assert!(precondition(state.plan_upload(RUN, &late, 1)));
        assert!(precondition(state.plan_upload(RUN, &a, 2)), "not open");
        let err = state.plan_upload(RUN, "w9", 1).unwrap_err();
        assert!(
            matches!(err, CoordinatorError::UnknownWorker { .. }),
            "{err}"
        );
        assert_eq!(complete_round(&mut state, clock.at(0)).0, 1);
    }

    #[test]
    fn the_first_upload_sets_the_schema_and_a_mismatch_is_refused_with_the_round_open() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 8, 1), clock.at(0));
        let (a, b) = (
            add_worker(&mut state, "a", clock.at(0)),
            add_worker(&mut state, "b", clock.at(0)),
        );
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        assert_eq!(
            state.plan_upload(RUN, &a, 1).unwrap(),
            UploadPlan::Send { schema: None }
        );
        state
            .add_upload(RUN, &a, 1, upload(1), clock.at(0))
            .unwrap();
        assert!(precondition(state.plan_upload(RUN, &a, 1)), "sent already");
        assert_eq!(
            state.plan_upload(RUN, &b, 1).unwrap(),
            UploadPlan::Send {
                schema: Some(schema(1))
            }
        );
        let wrong = CheckedUpload {
            schema: schema(2),
            ..upload(1)
        };
        let err = state
            .add_upload(RUN, &b, 1, wrong, clock.at(0))
            .unwrap_err();
        assert!(matches!(err, CoordinatorError::Tensor(_)), "{err}");
        assert!(state.take_ready_round(RUN).is_none(), "still waiting for b");
        state
            .add_upload(RUN, &b, 1, upload(3), clock.at(0))
            .unwrap();
        let job = state.take_ready_round(RUN).unwrap();
        assert_eq!((job.round, job.workers.clone()), (1, vec![a, b]));
        let samples: Vec<u64> = job.uploads.iter().map(|(_, s)| *s).collect();
        assert_eq!(samples, [1, 3]);
        assert!(state.take_ready_round(RUN).is_none(), "averaging already");
    }

    #[test]
    fn a_failed_round_stays_open_for_the_uploads_again() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 8, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        state
            .add_upload(RUN, &a, 1, upload(1), clock.at(0))
            .unwrap();
        state.take_ready_round(RUN).unwrap();
        state.fail_round(RUN, 1);
        assert_eq!(state.heartbeat(RUN, &a, clock.at(0)).unwrap().sync_round, 1);
        assert_eq!(complete_round(&mut state, clock.at(0)).0, 1);
    }

    #[test]
    fn lost_participants_are_dropped_and_a_round_of_lost_ones_only_is_cancelled() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 8, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        add_worker(&mut state, "b", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        state
            .add_upload(RUN, &a, 1, upload(1), clock.at(900))
            .unwrap();
        assert!(state.take_ready_round(RUN).is_none());
        state.sweep(clock.at(1500));
        assert_eq!(state.take_ready_round(RUN).unwrap().workers, [a]);

        let mut state = state_with_run(1, config(1, 8, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        state.sweep(clock.at(1500));
        assert!(state.take_ready_round(RUN).is_none());
        assert_eq!(
            open_round(&state),
            None,
            "cancelled, and nobody is left to reopen it"
        );
        // Back, it still has a step since its last sync: the round opens again.
        state.heartbeat(RUN, &a, clock.at(1600)).unwrap();
        assert_eq!(open_round(&state), Some((1, vec![a])));
    }

    #[test]
    fn no_round_opens_while_an_evaluation_is_under_way() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(2, 2, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0), (0, 1)], clock.at(0)).unwrap();
        assert_eq!(
            state.runs[RUN].round.as_ref().unwrap().evaluation,
            Some(EvalPoint { epoch: 0, part: 0 })
        );
        complete_round(&mut state, clock.at(0));
        state.take_events();
        // A late step of epoch 0 would reach sync_every, but validation comes first.
        report(&mut state, &a, 2, &[(0, 1)], clock.at(0)).unwrap();
        assert_eq!(open_round(&state), None);
    }
}
