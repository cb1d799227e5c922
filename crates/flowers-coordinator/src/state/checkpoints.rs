//! The checkpoints a run keeps: recording a completed round's average, pruning those no longer
//! kept (only the latest, the best and those awaiting their evaluation stay), and looking
//! them up.

use std::collections::BTreeSet;

use flowers_proto::v1 as pb;

use super::records::CheckpointRecord;
use super::{event, Now, State};
use crate::error::{CoordinatorError, Result};

/// The metadata of a checkpoint file the coordinator just wrote.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub id: String,
    pub size_bytes: u64,
}

pub(crate) fn checkpoint_id(round: u64) -> String {
    format!("round-{round:06}")
}

impl State {
    /// Closes a round whose average was saved as `checkpoint`. Returns the
    /// checkpoints no longer kept, whose files the caller deletes.
    pub fn finish_round(
        &mut self,
        run_id: &str,
        round: u64,
        checkpoint: NewCheckpoint,
        now: Now,
    ) -> Vec<String> {
        let Some(run) = self.runs.get_mut(run_id) else {
            return Vec::new();
        };
        let Some(r) = run.round.take_if(|r| r.number == round) else {
            return Vec::new();
        };
        for id in r.uploads.keys() {
            if let Some(w) = run.workers.get_mut(id) {
                w.steps_since_sync = 0;
                w.in_sync = false;
                w.last_seen = Some(now.instant);
            }
        }
        run.last_round = r.number;
        run.last_round_participants = r.uploads.keys().cloned().collect();
        run.checkpoints.push(CheckpointRecord {
            id: checkpoint.id.clone(),
            epoch: r.epoch,
            eval_part: r.evaluation.map_or(0, |p| p.part),
            round: r.number,
            size_bytes: checkpoint.size_bytes,
            val_accuracy: None,
            created_at: now.unix,
        });
        run.latest = Some(checkpoint.id.clone());
        tracing::info!(run = run_id, round, workers = r.uploads.len(), checkpoint = %checkpoint.id, "sync round complete");
        if let Some(point) = r.evaluation {
            let slot = run
                .spec
                .eval_slot(point.part)
                .expect("rounds open for valid parts");
            run.epochs[point.epoch as usize].evaluations[slot].checkpoint =
                Some(checkpoint.id.clone());
            let result = pb::EvaluationResult {
                epoch: point.epoch,
                val_batches_done: 0,
                val_batches_total: run.spec.val_batches_per_epoch,
                part: point.part,
                ..Default::default()
            };
            self.events.push((
                run_id.to_owned(),
                event(pb::run_event::Event::Evaluation(result)),
            ));
        }
        self.dirty.insert(run_id.to_owned());
        let removed = self.prune_checkpoints(run_id);
        self.maybe_open_round(run_id);
        removed
    }

    /// Keeps the latest checkpoint, the best one and those of evaluations under way.
    fn prune_checkpoints(&mut self, run_id: &str) -> Vec<String> {
        let Some(run) = self.runs.get_mut(run_id) else {
            return Vec::new();
        };
        let mut keep: BTreeSet<&String> = run.latest.iter().chain(run.best.iter()).collect();
        keep.extend(
            run.epochs
                .iter()
                .flat_map(|e| &e.evaluations)
                .filter(|e| !e.validated)
                .filter_map(|e| e.checkpoint.as_ref()),
        );
        let (kept, removed): (Vec<_>, Vec<_>) = run
            .checkpoints
            .drain(..)
            .partition(|c| keep.contains(&c.id));
        run.checkpoints = kept;
        removed.into_iter().map(|c| c.id).collect()
    }

    pub fn list_checkpoints(&self, run_id: &str) -> Result<Vec<pb::CheckpointInfo>> {
        let run = self.run(run_id)?;
        Ok(run
            .checkpoints
            .iter()
            .map(|c| run.checkpoint_info(c))
            .collect())
    }

    /// A checkpoint's info; an empty id means the best, or the latest when none is validated.
    pub fn checkpoint(&self, run_id: &str, checkpoint_id: &str) -> Result<pb::CheckpointInfo> {
        let run = self.run(run_id)?;
        let id = if checkpoint_id.is_empty() {
            run.best
                .as_ref()
                .or(run.latest.as_ref())
                .ok_or_else(|| CoordinatorError::NoCheckpoint(run_id.to_owned()))?
        } else {
            checkpoint_id
        };
        run.checkpoints
            .iter()
            .find(|c| c.id == id)
            .map(|c| run.checkpoint_info(c))
            .ok_or_else(|| CoordinatorError::UnknownCheckpoint {
                run: run_id.to_owned(),
                checkpoint: id.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::{StatusDetail, UploadPlan};
    use super::*;

    #[test]
    fn a_completed_round_makes_the_latest_checkpoint_and_a_retry_gets_it() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 8, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        let (round, removed) = complete_round(&mut state, clock.at(2500));
        assert!(removed.is_empty());
        let run = &state.runs[RUN];
        assert_eq!(
            (run.last_round, run.latest.as_deref(), run.round.is_none()),
            (1, Some("round-000001"), true)
        );
        let c = &run.checkpoints[0];
        assert_eq!(
            (c.round, c.size_bytes, c.created_at, c.eval_part),
            (1, 100, 1002.5, 0)
        );
        assert_eq!(run.workers["w1"].steps_since_sync, 0);
        assert_eq!(
            state.plan_upload(RUN, &a, round).unwrap(),
            UploadPlan::Done {
                checkpoint_id: "round-000001".into()
            }
        );
        assert!(precondition(state.add_upload(
            RUN,
            &a,
            round,
            upload(1),
            clock.at(0)
        )));
        assert_eq!(
            state.finish_round(
                RUN,
                round,
                NewCheckpoint {
                    id: "x".into(),
                    size_bytes: 1
                },
                clock.at(0)
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            state.runs[RUN].checkpoints.len(),
            1,
            "finishing twice changes nothing"
        );
    }

    #[test]
    fn an_empty_checkpoint_id_means_the_best_then_the_latest() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 4, 1), clock.at(0));
        let err = state.checkpoint(RUN, "").unwrap_err();
        assert!(matches!(err, CoordinatorError::NoCheckpoint(_)), "{err}");
        let w = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &w, 1, &[(0, 0)], clock.at(0)).unwrap();
        complete_round(&mut state, clock.at(0));
        assert_eq!(
            state.checkpoint(RUN, "").unwrap().checkpoint_id,
            "round-000001"
        );
        report(&mut state, &w, 2, &[(0, 1), (0, 2), (0, 3)], clock.at(0)).unwrap();
        complete_round(&mut state, clock.at(0));
        evaluate(&mut state, &w, 0, 0, vec![evaluation(0, 5)], clock.at(0)).unwrap();
        let best = state.checkpoint(RUN, "").unwrap();
        assert!(
            best.best && best.checkpoint_id == "round-000002",
            "{best:?}"
        );
        let listed: Vec<String> = state
            .list_checkpoints(RUN)
            .unwrap()
            .into_iter()
            .map(|c| c.checkpoint_id)
            .collect();
        assert_eq!(listed, ["round-000002"], "round 1 was pruned");
        let err = state.checkpoint(RUN, "round-000001").unwrap_err();
        assert!(
            matches!(err, CoordinatorError::UnknownCheckpoint { .. }),
            "{err}"
        );
        let err = state.status("nope", StatusDetail::default()).unwrap_err();
        assert!(matches!(err, CoordinatorError::UnknownRun(_)), "{err}");
    }

    #[test]
    fn pruning_keeps_the_latest_the_best_and_those_awaiting_evaluation() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(2, 2, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        let ids = |state: &State| -> Vec<String> {
            state.runs[RUN]
                .checkpoints
                .iter()
                .map(|c| c.id.clone())
                .collect()
        };
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        complete_round(&mut state, clock.at(0)); // periodic: round 1
        report(&mut state, &a, 2, &[(0, 1)], clock.at(0)).unwrap();
        let (_, removed) = complete_round(&mut state, clock.at(0)); // epoch 0's end: round 2
        assert_eq!(
            (removed, ids(&state)),
            (
                vec!["round-000001".to_owned()],
                vec!["round-000002".to_owned()]
            )
        );
        evaluate(&mut state, &a, 0, 0, vec![evaluation(0, 9)], clock.at(0)).unwrap();
        report(&mut state, &a, 3, &[(1, 0)], clock.at(0)).unwrap();
        let (_, removed) = complete_round(&mut state, clock.at(0)); // periodic: round 3
        assert!(removed.is_empty(), "round 2 is the best");
        report(&mut state, &a, 4, &[(1, 1)], clock.at(0)).unwrap();
        let (_, removed) = complete_round(&mut state, clock.at(0)); // epoch 1's end: round 4
        assert_eq!(removed, ["round-000003"]);
        assert_eq!(ids(&state), ["round-000002", "round-000004"]);
    }
}
