//! The records a run is made of, as `run.json` persists them, and the questions the state
//! machine asks of a run: which evaluation is due or under way, its throughput, its curve.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::spec::RunSpec;
use crate::tensors::TensorSpec;

/// Most training-curve points kept per run; older ones are merged pairwise.
const MAX_HISTORY: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Phase {
    Running,
    Finished,
}

/// One evaluation of the validation set: of an averaged checkpoint, by whichever workers
/// took its batches.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Evaluation {
    /// The average of the sync round that opened the evaluation.
    pub(super) checkpoint: Option<String>,
    pub(super) validated_batches: BTreeSet<u32>,
    pub(super) val_images: u64,
    pub(super) val_correct: u64,
    pub(super) val_correct_top5: u64,
    pub(super) val_loss_sum: f64,
    pub(super) validated: bool,
}

/// `num / den`, 0 when nothing was counted.
pub(super) fn ratio(num: f64, den: u64) -> f32 {
    if den == 0 {
        0.0
    } else {
        (num / den as f64) as f32
    }
}

impl Evaluation {
    pub(super) fn accuracy(&self) -> f32 {
        ratio(self.val_correct as f64, self.val_images)
    }
    pub(super) fn loss(&self) -> f32 {
        ratio(self.val_loss_sum, self.val_images)
    }
    pub(super) fn top5_accuracy(&self) -> f32 {
        ratio(self.val_correct_top5 as f64, self.val_images)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EpochRecord {
    pub(super) trained_batches: BTreeSet<u32>,
    pub(super) train_images: u64,
    pub(super) train_loss_sum: f64,
    pub(super) train_correct: f64,
    pub(super) trained: bool,
    /// In order: the interim evaluations (parts 1..n-1), then the epoch end.
    pub(super) evaluations: Vec<Evaluation>,
}

impl EpochRecord {
    pub(super) fn new(evaluations_per_epoch: u32) -> Self {
        Self {
            trained_batches: BTreeSet::new(),
            train_images: 0,
            train_loss_sum: 0.0,
            train_correct: 0.0,
            trained: false,
            evaluations: (0..evaluations_per_epoch.max(1))
                .map(|_| Evaluation::default())
                .collect(),
        }
    }

    pub(super) fn end(&self) -> &Evaluation {
        self.evaluations.last().expect("at least the epoch end")
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WorkerRecord {
    pub(super) id: String,
    pub(super) host: String,
    pub(super) device: String,
    pub(super) gpu_name: String,
    pub(super) lost: bool,
    pub(super) steps: u64,
    pub(super) steps_since_sync: u64,
    pub(super) images_per_s: f32,
    pub(super) data_wait_fraction: f32,
    pub(super) last_heartbeat: f64,
    pub(super) last_seq: u64,
    /// Liveness clock, not persisted: restoring a run gives every worker a fresh timeout, so
    /// it is `None` only between deserialising and restoring.
    #[serde(skip)]
    pub(super) last_seen: Option<Instant>,
    /// Waiting inside SyncParameters, so silent for a good reason.
    #[serde(skip)]
    pub(super) in_sync: bool,
}

impl WorkerRecord {
    pub(super) fn new(id: String, now: Instant) -> Self {
        Self {
            id,
            host: String::new(),
            device: String::new(),
            gpu_name: String::new(),
            lost: false,
            steps: 0,
            steps_since_sync: 0,
            images_per_s: 0.0,
            data_wait_fraction: 0.0,
            last_heartbeat: 0.0,
            last_seq: 0,
            last_seen: Some(now),
            in_sync: false,
        }
    }
}

#[derive(Debug)]
pub(super) struct Upload {
    pub(super) bytes: Arc<Vec<u8>>,
    pub(super) samples: u64,
}

/// An evaluation of the run: epoch, and part (0: the epoch end, p: interim part p).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct EvalPoint {
    pub(super) epoch: u32,
    pub(super) part: u32,
}

impl EvalPoint {
    pub(super) fn describe(&self) -> String {
        match self.part {
            0 => format!("epoch {}", self.epoch),
            p => format!("epoch {} (interim evaluation {p})", self.epoch),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Round {
    pub(super) number: u64,
    /// The evaluation whose model this round makes, if it is an evaluation round.
    pub(super) evaluation: Option<EvalPoint>,
    pub(super) epoch: u32,
    pub(super) participants: BTreeSet<String>,
    /// Uploads live in memory only: after a restart participants send again.
    #[serde(skip)]
    pub(super) uploads: BTreeMap<String, Upload>,
    #[serde(skip)]
    pub(super) averaging: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct CheckpointRecord {
    pub(super) id: String,
    pub(super) epoch: u32,
    /// The evaluation that scored it (0: the epoch end).
    pub(super) eval_part: u32,
    pub(super) round: u64,
    pub(super) size_bytes: u64,
    pub(super) val_accuracy: Option<f32>,
    pub(super) created_at: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct HistoryPoint {
    pub(super) steps: u64,
    pub(super) epoch_progress: f32,
    pub(super) loss: f32,
    pub(super) accuracy: f32,
}

/// One run, as persisted in `run.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Run {
    pub(super) id: String,
    pub(super) spec: RunSpec,
    pub(super) phase: Phase,
    pub(super) created_at: f64,
    /// The epoch being trained or validated (== epochs when finished).
    pub(super) current_epoch: u32,
    pub(super) steps: u64,
    pub(super) epochs: Vec<EpochRecord>,
    pub(super) workers: BTreeMap<String, WorkerRecord>,
    pub(super) next_worker: u64,
    pub(super) round: Option<Round>,
    pub(super) last_round: u64,
    pub(super) last_round_participants: BTreeSet<String>,
    pub(super) schema: Option<Vec<TensorSpec>>,
    pub(super) checkpoints: Vec<CheckpointRecord>,
    pub(super) latest: Option<String>,
    pub(super) best: Option<String>,
    pub(super) history: Vec<HistoryPoint>,
}

impl Run {
    /// A run just registered: nothing trained, no worker, no round.
    pub(super) fn new(id: String, spec: RunSpec, created_at: f64) -> Self {
        let epochs = (0..spec.epochs)
            .map(|_| EpochRecord::new(spec.evaluations_per_epoch))
            .collect();
        Self {
            id,
            spec,
            phase: Phase::Running,
            created_at,
            current_epoch: 0,
            steps: 0,
            epochs,
            workers: BTreeMap::new(),
            next_worker: 1,
            round: None,
            last_round: 0,
            last_round_participants: BTreeSet::new(),
            schema: None,
            checkpoints: Vec::new(),
            latest: None,
            best: None,
            history: Vec::new(),
        }
    }

    pub(super) fn images_per_s(&self) -> f32 {
        self.workers
            .values()
            .filter(|w| !w.lost)
            .map(|w| w.images_per_s)
            .sum()
    }

    pub(super) fn push_history(&mut self, point: HistoryPoint) {
        if self.history.len() >= MAX_HISTORY {
            // Halve the resolution rather than drop the start of the curve.
            self.history = self
                .history
                .chunks(2)
                .map(|c| {
                    let (a, b) = (c[0], c[c.len() - 1]);
                    HistoryPoint {
                        steps: b.steps,
                        epoch_progress: b.epoch_progress,
                        loss: (a.loss + b.loss) / 2.0,
                        accuracy: (a.accuracy + b.accuracy) / 2.0,
                    }
                })
                .collect();
        }
        self.history.push(point);
    }

    /// The current epoch's first evaluation not validated yet, by slot.
    fn next_evaluation(&self) -> Option<(usize, &Evaluation)> {
        let e = self.epochs.get(self.current_epoch as usize)?;
        e.evaluations.iter().enumerate().find(|(_, v)| !v.validated)
    }

    /// The evaluation under way: its round completed, its batches not all counted.
    pub(super) fn validating(&self) -> Option<EvalPoint> {
        let (slot, v) = self.next_evaluation()?;
        v.checkpoint.is_some().then(|| EvalPoint {
            epoch: self.current_epoch,
            part: self.spec.eval_part(slot),
        })
    }

    /// The evaluation whose round is due: its share of the epoch is trained.
    pub(super) fn due_evaluation(&self) -> Option<EvalPoint> {
        let (slot, v) = self.next_evaluation()?;
        let trained = self.epochs[self.current_epoch as usize]
            .trained_batches
            .len() as u32;
        (v.checkpoint.is_none() && trained >= self.spec.eval_after(slot)).then(|| EvalPoint {
            epoch: self.current_epoch,
            part: self.spec.eval_part(slot),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::config;
    use flowers_proto::v1 as pb;

    fn run(evaluations_per_epoch: u32, train: u32) -> Run {
        let spec = RunSpec::from(&pb::RunConfig {
            evaluations_per_epoch,
            ..config(2, train, 1)
        });
        Run::new("r".into(), spec, 1.5)
    }

    fn point(steps: u64, loss: f32) -> HistoryPoint {
        HistoryPoint {
            steps,
            epoch_progress: steps as f32 / 10.0,
            loss,
            accuracy: loss / 10.0,
        }
    }

    #[test]
    fn a_new_run_has_one_record_per_epoch_and_evaluation() {
        let r = run(3, 6);
        assert_eq!((r.epochs.len(), r.epochs[0].evaluations.len()), (2, 3));
        assert_eq!(
            (r.phase, r.created_at, r.next_worker),
            (Phase::Running, 1.5, 1)
        );
    }

    #[test]
    fn a_full_history_is_merged_pairwise_keeping_its_start() {
        let mut r = run(1, 4);
        for i in 0..MAX_HISTORY as u64 {
            r.push_history(point(i + 1, i as f32));
        }
        assert_eq!(r.history.len(), MAX_HISTORY);
        r.push_history(point(9999, 7.0));
        assert_eq!(r.history.len(), MAX_HISTORY / 2 + 1);
        // Points 1 and 2 (losses 0 and 1) became one at step 2 with their mean figures.
        assert_eq!(r.history[0], point(2, 0.5));
        assert_eq!(r.history.last(), Some(&point(9999, 7.0)));
    }

    #[test]
    fn the_due_evaluation_follows_the_trained_share_then_validation() {
        let mut r = run(2, 4);
        assert_eq!((r.due_evaluation(), r.validating()), (None, None));
        r.epochs[0].trained_batches.extend([0, 3]);
        let interim = EvalPoint { epoch: 0, part: 1 };
        assert_eq!(r.due_evaluation(), Some(interim));
        // Its round completed: it is under way, no longer due.
        r.epochs[0].evaluations[0].checkpoint = Some("round-000001".into());
        assert_eq!((r.due_evaluation(), r.validating()), (None, Some(interim)));
        r.epochs[0].evaluations[0].validated = true;
        assert_eq!((r.due_evaluation(), r.validating()), (None, None));
        r.epochs[0].trained_batches.extend([1, 2]);
        assert_eq!(r.due_evaluation(), Some(EvalPoint { epoch: 0, part: 0 }));
    }

    #[test]
    fn evaluation_figures_are_per_image_and_zero_before_any() {
        let mut e = Evaluation::default();
        assert_eq!((e.accuracy(), e.loss(), e.top5_accuracy()), (0.0, 0.0, 0.0));
        (
            e.val_images,
            e.val_correct,
            e.val_correct_top5,
            e.val_loss_sum,
        ) = (20, 5, 15, 8.0);
        assert_eq!(
            (e.accuracy(), e.loss(), e.top5_accuracy()),
            (0.25, 0.4, 0.75)
        );
    }

    #[test]
    fn throughput_counts_active_workers_only() {
        let mut r = run(1, 4);
        let now = Instant::now();
        for (id, ips, lost) in [("a", 10.0, false), ("b", 5.0, false), ("c", 100.0, true)] {
            let mut w = WorkerRecord::new(id.into(), now);
            (w.images_per_s, w.lost) = (ips, lost);
            r.workers.insert(id.into(), w);
        }
        assert_eq!(r.images_per_s(), 15.0);
    }
}
