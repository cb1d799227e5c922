//! The protobuf views of a run: its status (epochs, evaluations, workers, curve), the
//! directives a worker gets with every response, and checkpoint infos.

use std::collections::BTreeSet;

use flowers_proto::v1 as pb;

use super::records::{ratio, CheckpointRecord, Phase, Run, WorkerRecord};
use super::{Settings, StatusDetail};

impl WorkerRecord {
    pub(super) fn status(&self) -> pb::WorkerStatus {
        pb::WorkerStatus {
            worker_id: self.id.clone(),
            host: self.host.clone(),
            device: self.device.clone(),
            gpu_name: self.gpu_name.clone(),
            state: if self.lost {
                pb::WorkerState::Lost
            } else {
                pb::WorkerState::Active
            } as i32,
            steps: self.steps,
            images_per_s: self.images_per_s,
            data_wait_fraction: self.data_wait_fraction,
            last_heartbeat: self.last_heartbeat,
        }
    }
}

impl From<Phase> for pb::RunState {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Running => pb::RunState::Running,
            Phase::Finished => pb::RunState::Finished,
        }
    }
}

impl Run {
    pub(super) fn directives(&self, worker_id: &str) -> pb::HeartbeatResponse {
        let sync_round = match &self.round {
            Some(r)
                if r.participants.contains(worker_id)
                    && !r.uploads.contains_key(worker_id)
                    && !r.averaging =>
            {
                r.number
            }
            _ => 0,
        };
        let validating = self.validating();
        pb::HeartbeatResponse {
            run_state: pb::RunState::from(self.phase) as i32,
            sync_round,
            evaluate_epoch_plus_one: validating.map_or(0, |p| p.epoch + 1),
            current_epoch: self.current_epoch,
            evaluate_part: validating.map_or(0, |p| p.part),
        }
    }

    pub(super) fn best_status(&self) -> Option<pb::BestCheckpoint> {
        let best = self.best.as_ref()?;
        let c = self.checkpoints.iter().find(|c| &c.id == best)?;
        Some(pb::BestCheckpoint {
            checkpoint_id: c.id.clone(),
            epoch: c.epoch,
            val_accuracy: c.val_accuracy.unwrap_or(0.0),
            path: format!("runs/{}/checkpoints/{}.safetensors", self.id, c.id),
            eval_part: c.eval_part,
        })
    }

    pub(super) fn checkpoint_info(&self, c: &CheckpointRecord) -> pb::CheckpointInfo {
        pb::CheckpointInfo {
            checkpoint_id: c.id.clone(),
            run_id: self.id.clone(),
            epoch: c.epoch,
            sync_round: c.round,
            size_bytes: c.size_bytes,
            val_accuracy: c.val_accuracy.unwrap_or(0.0),
            best: self.best.as_ref() == Some(&c.id),
            created_at: c.created_at,
            eval_part: c.eval_part,
        }
    }

    pub(super) fn status(&self, settings: &Settings, detail: StatusDetail) -> pb::RunStatus {
        let spec = &self.spec;
        let indices = |set: &BTreeSet<u32>| {
            if detail.batches {
                set.iter().copied().collect()
            } else {
                Vec::new()
            }
        };
        let epochs = self
            .epochs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let end = e.end();
                let interim = e.evaluations[..e.evaluations.len() - 1]
                    .iter()
                    .enumerate()
                    .map(|(slot, v)| pb::InterimEvaluation {
                        part: spec.eval_part(slot),
                        after_train_batches: spec.eval_after(slot),
                        val_batches_done: v.validated_batches.len() as u32,
                        validated: v.validated,
                        val_loss: v.loss(),
                        val_accuracy: v.accuracy(),
                        val_top5_accuracy: v.top5_accuracy(),
                        checkpoint_id: v.checkpoint.clone().unwrap_or_default(),
                        validated_batch_indices: indices(&v.validated_batches),
                    })
                    .collect();
                pb::EpochStatus {
                    epoch: i as u32,
                    train_batches_done: e.trained_batches.len() as u32,
                    train_batches_total: spec.train_batches_per_epoch,
                    val_batches_done: end.validated_batches.len() as u32,
                    val_batches_total: spec.val_batches_per_epoch,
                    trained: e.trained,
                    validated: end.validated,
                    train_loss: ratio(e.train_loss_sum, e.train_images),
                    train_accuracy: ratio(e.train_correct, e.train_images),
                    val_loss: end.loss(),
                    val_accuracy: end.accuracy(),
                    val_top5_accuracy: end.top5_accuracy(),
                    checkpoint_id: end.checkpoint.clone().unwrap_or_default(),
                    interim,
                    trained_batch_indices: indices(&e.trained_batches),
                    validated_batch_indices: indices(&end.validated_batches),
                }
            })
            .collect();
        let history = if detail.history {
            self.history
                .iter()
                .map(|p| pb::TrainPoint {
                    steps: p.steps,
                    epoch_progress: p.epoch_progress,
                    loss: p.loss,
                    accuracy: p.accuracy,
                })
                .collect()
        } else {
            Vec::new()
        };
        let validating = self.validating();
        pb::RunStatus {
            run_id: self.id.clone(),
            config: Some(pb::RunConfig::from(spec)),
            state: pb::RunState::from(self.phase) as i32,
            current_epoch: self.current_epoch,
            steps: self.steps,
            images_per_s: self.images_per_s(),
            epochs,
            workers: self.workers.values().map(WorkerRecord::status).collect(),
            best: self.best_status(),
            sync_round: self.round.as_ref().map_or(self.last_round, |r| r.number),
            created_at: self.created_at,
            history,
            sync_every: settings.sync_every,
            latest_checkpoint_id: self.latest.clone().unwrap_or_default(),
            validating_epoch_plus_one: validating.map_or(0, |p| p.epoch + 1),
            validating_part: validating.map_or(0, |p| p.part),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::State;
    use super::*;

    /// One epoch of 4 batches evaluated twice: its interim evaluation is done and best, the
    /// epoch end not yet. Worker b (w1) was lost before the round, a (w2) is active.
    fn interim_evaluated(clock: &Clock) -> State {
        let config = pb::RunConfig {
            evaluations_per_epoch: 2,
            ..config(1, 4, 1)
        };
        let mut state = state_with_run(0, config, clock.at(0));
        add_worker(&mut state, "b", clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(500));
        state.sweep(clock.at(1001));
        report(&mut state, &a, 1, &[(0, 0), (0, 1)], clock.at(1500)).unwrap();
        assert_eq!(
            state
                .status(RUN, StatusDetail::default())
                .unwrap()
                .sync_round,
            1,
            "the open round"
        );
        complete_round(&mut state, clock.at(1500));
        let d = state.heartbeat(RUN, &a, clock.at(1500)).unwrap();
        assert_eq!(
            d,
            pb::HeartbeatResponse {
                run_state: pb::RunState::Running as i32,
                sync_round: 0,
                evaluate_epoch_plus_one: 1,
                current_epoch: 0,
                evaluate_part: 1,
            }
        );
        evaluate(&mut state, &a, 0, 1, vec![evaluation(0, 9)], clock.at(1500)).unwrap();
        state
    }

    #[test]
    fn a_status_shows_epochs_interim_evaluations_workers_and_the_best() {
        let clock = Clock::new();
        let state = interim_evaluated(&clock);
        let s = state.status(RUN, StatusDetail::default()).unwrap();
        assert_eq!(
            (s.run_id.as_str(), s.state),
            (RUN, pb::RunState::Running as i32)
        );
        assert_eq!(s.config.as_ref().unwrap().evaluations_per_epoch, 2);
        assert_eq!((s.current_epoch, s.steps, s.images_per_s), (0, 2, 100.0));
        assert_eq!((s.sync_round, s.sync_every, s.created_at), (1, 0, 1000.0));
        assert_eq!(s.latest_checkpoint_id, "round-000001");
        assert_eq!((s.validating_epoch_plus_one, s.validating_part), (0, 0));
        let states: Vec<i32> = s.workers.iter().map(|w| w.state).collect();
        assert_eq!(
            states,
            [pb::WorkerState::Lost as i32, pb::WorkerState::Active as i32]
        );
        assert_eq!(s.workers[1].last_heartbeat, 1001.5);

        let e = &s.epochs[0];
        assert_eq!(
            (e.train_batches_done, e.train_batches_total, e.trained),
            (2, 4, false)
        );
        assert_eq!((e.train_loss, e.train_accuracy), (2.0, 0.25));
        assert_eq!(
            (e.val_batches_done, e.validated, e.checkpoint_id.as_str()),
            (0, false, "")
        );
        assert_eq!(
            e.interim,
            [pb::InterimEvaluation {
                part: 1,
                after_train_batches: 2,
                val_batches_done: 1,
                validated: true,
                val_loss: 0.4,
                val_accuracy: 0.9,
                val_top5_accuracy: 1.0,
                checkpoint_id: "round-000001".into(),
                validated_batch_indices: Vec::new(),
            }]
        );
        assert_eq!(
            s.best,
            Some(pb::BestCheckpoint {
                checkpoint_id: "round-000001".into(),
                epoch: 0,
                val_accuracy: 0.9,
                path: "runs/r/checkpoints/round-000001.safetensors".into(),
                eval_part: 1,
            })
        );
    }

    #[test]
    fn the_training_curve_is_sent_only_when_asked() {
        let clock = Clock::new();
        let state = interim_evaluated(&clock);
        assert!(state
            .status(RUN, StatusDetail::default())
            .unwrap()
            .history
            .is_empty());
        let history = state
            .status(
                RUN,
                StatusDetail {
                    history: true,
                    batches: false,
                },
            )
            .unwrap()
            .history;
        assert_eq!(
            history,
            [pb::TrainPoint {
                steps: 2,
                epoch_progress: 0.5,
                loss: 2.0,
                accuracy: 0.25,
            }]
        );
    }

    #[test]
    fn the_counted_batches_are_sent_only_when_asked() {
        let clock = Clock::new();
        let state = interim_evaluated(&clock);
        let summary = state.status(RUN, StatusDetail::default()).unwrap();
        assert!(summary.epochs[0].trained_batch_indices.is_empty());
        assert!(summary.epochs[0].interim[0]
            .validated_batch_indices
            .is_empty());
        let batches = StatusDetail {
            batches: true,
            ..StatusDetail::default()
        };
        let epoch = &state.status(RUN, batches).unwrap().epochs[0];
        assert_eq!(epoch.trained_batch_indices, [0, 1]);
        assert_eq!(epoch.interim[0].validated_batch_indices, [0]);
        assert!(
            epoch.validated_batch_indices.is_empty(),
            "the epoch end is not evaluated yet"
        );
    }

    #[test]
    fn checkpoint_infos_flag_the_best() {
        let clock = Clock::new();
        let state = interim_evaluated(&clock);
        let infos = state.list_checkpoints(RUN).unwrap();
        assert_eq!(
            infos,
            [pb::CheckpointInfo {
                checkpoint_id: "round-000001".into(),
                run_id: RUN.into(),
                epoch: 0,
                sync_round: 1,
                size_bytes: 100,
                val_accuracy: 0.9,
                best: true,
                created_at: 1001.5,
                eval_part: 1,
            }]
        );
    }
}
