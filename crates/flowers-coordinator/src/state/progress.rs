//! What workers report: training steps (each distinct batch counted once towards its epoch,
//! retried calls ignored) and evaluation sums, and what follows when an evaluation is complete.

use flowers_proto::v1 as pb;

use super::records::{EvalPoint, HistoryPoint, Phase};
use super::{event, Now, State};
use crate::error::{CoordinatorError, Result};

impl State {
    pub fn report_steps(
        &mut self,
        req: &pb::ReportStepsRequest,
        now: Now,
    ) -> Result<pb::ReportStepsResponse> {
        self.touch(&req.run_id, &req.worker_id, now)?;
        let run = self.run_mut(&req.run_id)?;
        if run.phase == Phase::Finished {
            // Late news from a trainer that was cut off: the run's figures are final.
            return Ok(pb::ReportStepsResponse {
                newly_counted: 0,
                directives: Some(run.directives(&req.worker_id)),
            });
        }
        let spec = run.spec.clone();
        for s in &req.steps {
            if s.epoch >= spec.epochs || s.batch_index >= spec.train_batches_per_epoch {
                return Err(CoordinatorError::Invalid(format!(
                    "step {} trained batch {} of epoch {}, but the run has {} epochs of {} training batches",
                    s.step, s.batch_index, s.epoch, spec.epochs, spec.train_batches_per_epoch
                )));
            }
        }
        let worker = run.workers.get_mut(&req.worker_id).expect("touched above");
        if req.seq != 0 && req.seq <= worker.last_seq {
            // A retry of a call already counted.
            return Ok(pb::ReportStepsResponse {
                newly_counted: 0,
                directives: Some(run.directives(&req.worker_id)),
            });
        }
        worker.last_seq = req.seq;
        if req.steps.is_empty() {
            return Ok(pb::ReportStepsResponse {
                newly_counted: 0,
                directives: Some(run.directives(&req.worker_id)),
            });
        }
        let n = req.steps.len() as u64;
        worker.steps += n;
        worker.steps_since_sync += n;
        let last = req.steps.last().expect("not empty");
        worker.images_per_s = last.images_per_s;
        let (wait, total): (f32, f32) = req
            .steps
            .iter()
            .fold((0.0, 0.0), |(w, t), s| (w + s.data_wait_s, t + s.step_s));
        worker.data_wait_fraction = if total > 0.0 {
            (wait / total).clamp(0.0, 1.0)
        } else {
            0.0
        };
        run.steps += n;

        let mut newly = 0;
        let (mut loss, mut acc, mut images) = (0.0f64, 0.0f64, 0u64);
        let mut trained_now = Vec::new();
        for s in &req.steps {
            let e = &mut run.epochs[s.epoch as usize];
            let w = s.images as f64;
            e.train_images += s.images as u64;
            e.train_loss_sum += s.loss as f64 * w;
            e.train_correct += s.accuracy as f64 * w;
            (loss, acc, images) = (
                loss + s.loss as f64 * w,
                acc + s.accuracy as f64 * w,
                images + s.images as u64,
            );
            if e.trained_batches.insert(s.batch_index) {
                newly += 1;
                if !e.trained && e.trained_batches.len() as u32 == spec.train_batches_per_epoch {
                    e.trained = true;
                    trained_now.push(s.epoch);
                }
            }
        }
        let epoch = last.epoch;
        let done = run.epochs[epoch as usize].trained_batches.len() as u32;
        let progress = epoch as f32 + done as f32 / spec.train_batches_per_epoch as f32;
        let (mean_loss, mean_acc) = if images > 0 {
            ((loss / images as f64) as f32, (acc / images as f64) as f32)
        } else {
            (last.loss, last.accuracy)
        };
        run.push_history(HistoryPoint {
            steps: run.steps,
            epoch_progress: progress,
            loss: mean_loss,
            accuracy: mean_acc,
        });
        let progress_event = pb::StepProgress {
            epoch,
            train_batches_done: done,
            train_batches_total: spec.train_batches_per_epoch,
            steps: run.steps,
            loss: mean_loss,
            accuracy: mean_acc,
            images_per_s: run.images_per_s(),
        };
        let run_id = req.run_id.clone();
        self.events.push((
            run_id.clone(),
            event(pb::run_event::Event::Steps(progress_event)),
        ));
        for e in trained_now {
            tracing::info!(run = %run_id, epoch = e, "epoch trained");
            self.events.push((
                run_id.clone(),
                event(pb::run_event::Event::EpochTrained(pb::EpochTrained {
                    epoch: e,
                })),
            ));
        }
        self.maybe_open_round(&run_id);
        let run = self.run(&run_id)?;
        Ok(pb::ReportStepsResponse {
            newly_counted: newly,
            directives: Some(run.directives(&req.worker_id)),
        })
    }

    pub fn report_evaluation(
        &mut self,
        req: &pb::ReportEvaluationRequest,
        now: Now,
    ) -> Result<pb::ReportEvaluationResponse> {
        self.touch(&req.run_id, &req.worker_id, now)?;
        let run = self.run_mut(&req.run_id)?;
        let spec = run.spec.clone();
        if req.epoch >= spec.epochs {
            return Err(CoordinatorError::Invalid(format!(
                "epoch {} out of range: the run has {} epochs",
                req.epoch, spec.epochs
            )));
        }
        let slot = spec.eval_slot(req.part).ok_or_else(|| {
            CoordinatorError::Invalid(format!(
                "evaluation part {} out of range: the run evaluates {} times per epoch",
                req.part, spec.evaluations_per_epoch
            ))
        })?;
        let point = EvalPoint {
            epoch: req.epoch,
            part: req.part,
        };
        if run.epochs[req.epoch as usize].evaluations[slot].validated {
            return Ok(pb::ReportEvaluationResponse {
                newly_counted: 0,
                evaluation_complete: true,
            });
        }
        if run.validating() != Some(point) {
            return Err(CoordinatorError::Precondition(format!(
                "{} is not being validated (its training or its sync round is not complete)",
                point.describe()
            )));
        }
        for b in &req.batches {
            if b.batch_index >= spec.val_batches_per_epoch
                || b.correct > b.images
                || b.correct_top5 > b.images
                || !b.loss_sum.is_finite()
            {
                return Err(CoordinatorError::Invalid(format!(
                    "validation batch {} of {}: index must be below {} and correct counts at most {} images, loss finite",
                    b.batch_index, point.describe(), spec.val_batches_per_epoch, b.images
                )));
            }
        }
        let e = &mut run.epochs[req.epoch as usize].evaluations[slot];
        let mut newly = 0;
        for b in &req.batches {
            if e.validated_batches.insert(b.batch_index) {
                newly += 1;
                e.val_images += b.images as u64;
                e.val_correct += b.correct as u64;
                e.val_correct_top5 += b.correct_top5 as u64;
                e.val_loss_sum += b.loss_sum;
            }
        }
        let complete = e.validated_batches.len() as u32 == spec.val_batches_per_epoch;
        let result = pb::EvaluationResult {
            epoch: req.epoch,
            val_batches_done: e.validated_batches.len() as u32,
            val_batches_total: spec.val_batches_per_epoch,
            complete,
            accuracy: e.accuracy(),
            loss: e.loss(),
            top5_accuracy: e.top5_accuracy(),
            part: req.part,
        };
        let run_id = req.run_id.clone();
        self.events.push((
            run_id.clone(),
            event(pb::run_event::Event::Evaluation(result)),
        ));
        if complete {
            self.evaluation_validated(&run_id, point);
        }
        Ok(pb::ReportEvaluationResponse {
            newly_counted: newly,
            evaluation_complete: complete,
        })
    }

    fn evaluation_validated(&mut self, run_id: &str, point: EvalPoint) {
        let run = self.runs.get_mut(run_id).expect("caller checked");
        let slot = run.spec.eval_slot(point.part).expect("caller checked");
        let e = &mut run.epochs[point.epoch as usize].evaluations[slot];
        e.validated = true;
        let accuracy = e.accuracy();
        let checkpoint = e
            .checkpoint
            .clone()
            .expect("validated evaluations have a checkpoint");
        if let Some(c) = run.checkpoints.iter_mut().find(|c| c.id == checkpoint) {
            c.val_accuracy = Some(accuracy);
        }
        let best_accuracy = run
            .best
            .as_ref()
            .and_then(|b| run.checkpoints.iter().find(|c| &c.id == b))
            .and_then(|c| c.val_accuracy);
        if best_accuracy.is_none_or(|b| accuracy > b) {
            run.best = Some(checkpoint);
        }
        tracing::info!(
            run = run_id,
            epoch = point.epoch,
            part = point.part,
            accuracy,
            "evaluation validated"
        );
        if point.part != 0 {
            // An interim evaluation: training of the epoch goes on.
            self.maybe_open_round(run_id);
            return;
        }
        run.current_epoch = point.epoch + 1;
        if run.current_epoch == run.spec.epochs {
            run.phase = Phase::Finished;
            let best = run.best_status();
            tracing::info!(run = run_id, best = ?best, "run finished");
            self.events.push((
                run_id.to_owned(),
                event(pb::run_event::Event::Finished(pb::RunFinished {
                    state: pb::RunState::Finished as i32,
                    best,
                })),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn a_redelivered_batch_counts_once_and_a_retried_call_not_at_all() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(1, 4, 1), clock.at(0));
        let (a, b) = (
            add_worker(&mut state, "a", clock.at(0)),
            add_worker(&mut state, "b", clock.at(0)),
        );
        state.take_events();
        let counted = |r: Result<pb::ReportStepsResponse>| r.unwrap().newly_counted;
        assert_eq!(
            counted(report(&mut state, &a, 1, &[(0, 0), (0, 1)], clock.at(0))),
            2
        );
        // a crashed before acking batch 1; it is redelivered to b.
        assert_eq!(
            counted(report(&mut state, &b, 1, &[(0, 1), (0, 2)], clock.at(0))),
            1
        );
        assert_eq!(
            counted(report(&mut state, &b, 1, &[(0, 1), (0, 2)], clock.at(0))),
            0
        );
        // seq 0 carries no order: never taken for a retry.
        assert_eq!(
            counted(report(&mut state, &b, 0, &[(0, 0)], clock.at(0))),
            0
        );
        let run = &state.runs[RUN];
        assert_eq!(run.epochs[0].trained_batches.len(), 3);
        assert_eq!((run.steps, run.workers["w2"].steps), (5, 3));
        assert_eq!(run.epochs[0].train_images, 20);
        assert_eq!(run.history.len(), 3, "one point per counted call");
        assert!(!run.epochs[0].trained);
        assert_eq!(event_kinds(&mut state), ["steps", "steps", "steps"]);
    }

    #[test]
    fn steps_outside_the_run_are_refused_whole() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(2, 4, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        for bad in [(0, 4), (2, 0)] {
            let err = report(&mut state, &a, 1, &[(0, 0), bad], clock.at(0)).unwrap_err();
            assert!(matches!(err, CoordinatorError::Invalid(_)), "{err}");
        }
        assert_eq!(state.runs[RUN].steps, 0);
        assert_eq!(
            state.runs[RUN].workers["w1"].last_seq, 0,
            "a refused call is no retry"
        );
    }

    #[test]
    fn the_last_batch_trains_the_epoch_and_the_step_figures_follow_the_worker() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(2, 2, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        state.take_events();
        let r = report(&mut state, &a, 1, &[(0, 0), (0, 1), (1, 0)], clock.at(0)).unwrap();
        assert_eq!(r.newly_counted, 3);
        assert_eq!(event_kinds(&mut state), ["steps", "trained"]);
        let run = &state.runs[RUN];
        assert!(run.epochs[0].trained && !run.epochs[1].trained);
        let w = &run.workers["w1"];
        assert_eq!(w.images_per_s, 100.0);
        assert!(
            (w.data_wait_fraction - 0.25).abs() < 1e-6,
            "{}",
            w.data_wait_fraction
        );
        let point = run.history[0];
        assert_eq!(
            (
                point.steps,
                point.epoch_progress,
                point.loss,
                point.accuracy
            ),
            (3, 1.5, 2.0, 0.25)
        );
    }

    /// A state whose epoch 0 of 2 is trained and its round complete: validation under way.
    fn validating(clock: &Clock) -> (State, String) {
        let mut state = state_with_run(0, config(2, 2, 2), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0), (0, 1)], clock.at(0)).unwrap();
        complete_round(&mut state, clock.at(0));
        state.take_events();
        (state, a)
    }

    #[test]
    fn evaluation_batches_count_once_and_complete_the_epoch() {
        let clock = Clock::new();
        let (mut state, a) = validating(&clock);
        let r = evaluate(&mut state, &a, 0, 0, vec![evaluation(0, 7)], clock.at(0)).unwrap();
        assert_eq!((r.newly_counted, r.evaluation_complete), (1, false));
        let r = evaluate(
            &mut state,
            &a,
            0,
            0,
            vec![evaluation(0, 7), evaluation(1, 5)],
            clock.at(0),
        )
        .unwrap();
        assert_eq!((r.newly_counted, r.evaluation_complete), (1, true));
        let run = &state.runs[RUN];
        let end = run.epochs[0].end();
        assert_eq!(
            (end.accuracy(), end.loss(), end.validated),
            (0.6, 0.4, true)
        );
        assert_eq!(
            (run.current_epoch, run.best.as_deref()),
            (1, Some("round-000001"))
        );
        assert_eq!(run.checkpoints[0].val_accuracy, Some(0.6));
        assert_eq!(event_kinds(&mut state), ["evaluation", "evaluation"]);
        // Late repeats are answered, not counted.
        let r = evaluate(&mut state, &a, 0, 0, vec![evaluation(1, 0)], clock.at(0)).unwrap();
        assert_eq!((r.newly_counted, r.evaluation_complete), (0, true));
    }

    /// A two-epoch run that worker `a` trains and validates to its end (epoch 0: 80% correct,
    /// epoch 1: 30%), with the events of all but the last evaluation taken.
    fn finished(clock: &Clock) -> (State, String) {
        let (mut state, a) = validating(clock);
        let both = |correct| vec![evaluation(0, correct), evaluation(1, correct)];
        evaluate(&mut state, &a, 0, 0, both(8), clock.at(0)).unwrap();
        report(&mut state, &a, 2, &[(1, 0), (1, 1)], clock.at(0)).unwrap();
        complete_round(&mut state, clock.at(0));
        state.take_events();
        evaluate(&mut state, &a, 1, 0, both(3), clock.at(0)).unwrap();
        (state, a)
    }

    #[test]
    fn the_last_validated_epoch_finishes_the_run_and_the_best_stays_the_most_accurate() {
        let clock = Clock::new();
        let (mut state, _) = finished(&clock);
        assert_eq!(event_kinds(&mut state), ["evaluation", "finished"]);
        let run = &state.runs[RUN];
        assert_eq!((run.phase, run.current_epoch), (Phase::Finished, 2));
        assert_eq!(run.best.as_deref(), Some("round-000001"));
    }

    #[test]
    fn steps_reported_after_the_run_finished_are_not_counted() {
        let clock = Clock::new();
        let (mut state, a) = finished(&clock);
        let steps = state.runs[RUN].steps;
        // A trainer cut off from the network reports its last steps after the end.
        let r = report(&mut state, &a, 3, &[(1, 0)], clock.at(0)).unwrap();
        assert_eq!(r.newly_counted, 0);
        let directives = r.directives.unwrap();
        assert_eq!(directives.run_state, pb::RunState::Finished as i32);
        assert_eq!(state.runs[RUN].steps, steps, "nothing trained again");
    }

    #[test]
    fn evaluations_out_of_turn_or_range_are_refused() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(2, 2, 2), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        let precondition = evaluate(&mut state, &a, 0, 0, vec![evaluation(0, 1)], clock.at(0));
        assert!(
            matches!(precondition, Err(CoordinatorError::Precondition(_))),
            "{precondition:?}"
        );
        let (mut state, a) = validating(&clock);
        for (epoch, part, batch) in [
            (2, 0, evaluation(0, 1)),
            (0, 1, evaluation(0, 1)),
            (0, 0, evaluation(2, 1)),
            (0, 0, evaluation(0, 11)),
        ] {
            let err = evaluate(&mut state, &a, epoch, part, vec![batch], clock.at(0)).unwrap_err();
            assert!(matches!(err, CoordinatorError::Invalid(_)), "{err}");
        }
        let nan = pb::BatchEvaluation {
            loss_sum: f64::NAN,
            ..evaluation(0, 1)
        };
        let err = evaluate(&mut state, &a, 0, 0, vec![nan], clock.at(0)).unwrap_err();
        assert!(matches!(err, CoordinatorError::Invalid(_)), "{err}");
        assert!(state.runs[RUN].epochs[0].end().validated_batches.is_empty());
    }
}
