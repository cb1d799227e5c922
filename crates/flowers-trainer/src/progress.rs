//! Where a trainer stands in a run ([`EpochProgress`]), where a run starts, and the progress
//! saved next to a checkpoint (`<name>.progress.json`) so that `--resume` continues mid-epoch.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use atomic_write_file::AtomicWriteFile;
use flowers_broker::{eval_queue, train_queue, val_queue};
use flowers_model::CheckpointMeta;
use flowers_wire::Split;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::metrics::EvalTally;
use crate::TrainError;

/// The two stages of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Train,
    Validate,
}

/// Where a trainer stands in an epoch: what it has used of the stage's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    pub epoch: u32,
    pub stage: Stage,
    /// Batch indices of the stage used (trained or evaluated) and acked.
    pub done: BTreeSet<u32>,
    /// `batches_in_epoch` of the stage, from its messages.
    pub batches_in_epoch: Option<u32>,
    /// Validation counts so far (validate stage only).
    pub tally: Option<EvalTally>,
    /// Validate stage: which evaluation of the epoch (0: its end; p: interim part p).
    #[serde(default)]
    pub eval_part: u32,
}

impl EpochProgress {
    pub fn new(epoch: u32, stage: Stage) -> Self {
        Self {
            epoch,
            stage,
            done: BTreeSet::new(),
            batches_in_epoch: None,
            tally: None,
            eval_part: 0,
        }
    }

    /// The validate stage of interim evaluation `part` of `epoch`.
    pub fn interim(epoch: u32, part: u32) -> Self {
        Self {
            eval_part: part,
            ..Self::new(epoch, Stage::Validate)
        }
    }

    /// Every batch of the stage has been used by this trainer.
    pub fn is_complete(&self) -> bool {
        matches!(self.batches_in_epoch, Some(n) if self.done.len() >= n as usize)
    }

    pub fn queue(&self, run_id: &str) -> String {
        match self.stage {
            Stage::Train => train_queue(run_id, self.epoch),
            Stage::Validate => eval_queue(run_id, self.epoch, self.eval_part),
        }
    }

    /// The queue the loader fills after this stage's in a run whose last epoch is `last_epoch`:
    /// the epoch's validation after its training, the next epoch's training after a validation,
    /// none after the last one.
    pub fn next_queue(&self, run_id: &str, last_epoch: u32) -> Option<String> {
        match self.stage {
            Stage::Train => Some(val_queue(run_id, self.epoch)),
            Stage::Validate if self.epoch < last_epoch => Some(train_queue(run_id, self.epoch + 1)),
            Stage::Validate => None,
        }
    }

    /// The split of the stage's batches.
    pub fn split(&self) -> Split {
        match self.stage {
            Stage::Train => Split::Train,
            Stage::Validate => Split::Validation,
        }
    }
}

/// The position saved next to a checkpoint.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedProgress {
    pub run_id: String,
    /// The checkpoint's step, to catch a progress file that belongs to another checkpoint.
    pub step: u64,
    pub img_size: Option<u32>,
    pub progress: EpochProgress,
}

/// `<checkpoint name>.progress.json`.
pub fn progress_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("progress.json")
}

impl SavedProgress {
    /// The progress of run `run_id` saved with `checkpoint`, if there is any.
    pub fn read(checkpoint: &Path, run_id: &str) -> Result<Option<Self>, TrainError> {
        let path = progress_path(checkpoint);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TrainError::io(&path, e)),
        };
        let saved: Self = serde_json::from_str(&text)
            .map_err(|source| TrainError::ProgressFile { path, source })?;
        if saved.run_id != run_id {
            warn!(saved_run = %saved.run_id, "the checkpoint's progress belongs to another run: ignoring it");
            return Ok(None);
        }
        Ok(Some(saved))
    }

    /// Saves it next to `checkpoint`, atomically (see [`flowers_model::tensor_file::write`]).
    pub fn write(&self, checkpoint: &Path) -> Result<(), TrainError> {
        let path = progress_path(checkpoint);
        let json = serde_json::to_string(self).expect("progress serialises");
        let io = |e| TrainError::io(&path, e);
        let mut file = AtomicWriteFile::open(&path).map_err(io)?;
        file.write_all(json.as_bytes()).map_err(io)?;
        file.commit().map_err(io)
    }
}

/// Where a run starts: at `start_epoch` when given; else where the progress `saved` with the
/// checkpoint (`resume`) stopped, which must be at the checkpoint's `step`; else after the epochs
/// the `resumed` checkpoint completed; else at the beginning.
pub fn start_position(
    start_epoch: Option<u32>,
    resume: Option<&Path>,
    saved: Option<SavedProgress>,
    step: u64,
    resumed: Option<&CheckpointMeta>,
) -> Result<EpochProgress, TrainError> {
    Ok(match (start_epoch, saved, resumed) {
        (Some(e), _, _) => EpochProgress::new(e, Stage::Train),
        (None, Some(s), _) => {
            if s.step != step {
                let checkpoint = resume.expect("saved progress comes with --resume");
                return Err(TrainError::ProgressStep {
                    path: progress_path(checkpoint),
                    progress_step: s.step,
                    checkpoint_step: step,
                });
            }
            s.progress
        }
        (None, None, Some(m)) => EpochProgress::new(m.epoch as u32, Stage::Train),
        (None, None, None) => EpochProgress::new(0, Stage::Train),
    })
}

#[cfg(test)]
mod tests {
    use flowers_model::{Policy, Variant};

    use super::*;

    fn saved(step: u64) -> SavedProgress {
        let mut progress = EpochProgress::interim(2, 1);
        progress.done.extend([0, 3]);
        progress.batches_in_epoch = Some(5);
        SavedProgress {
            run_id: "r".into(),
            step,
            img_size: Some(75),
            progress,
        }
    }

    fn meta(epoch: u64) -> CheckpointMeta {
        CheckpointMeta {
            step: 40,
            epoch,
            policy: Policy::Head,
            variant: Variant::Tf2015,
            num_classes: 102,
            img_size: 75,
            optimizer: None,
        }
    }

    #[test]
    fn a_stage_is_complete_once_every_batch_is_used() {
        let mut p = EpochProgress::new(0, Stage::Train);
        assert!(!p.is_complete(), "nothing seen yet");
        p.batches_in_epoch = Some(2);
        p.done.insert(1);
        assert!(!p.is_complete());
        p.done.insert(0);
        assert!(p.is_complete());
    }

    #[test]
    fn queues_follow_the_loaders_order() {
        let train = EpochProgress::new(1, Stage::Train);
        assert_eq!(train.queue("r"), train_queue("r", 1));
        assert_eq!(train.next_queue("r", 2), Some(val_queue("r", 1)));
        let val = EpochProgress::new(1, Stage::Validate);
        assert_eq!(val.queue("r"), eval_queue("r", 1, 0));
        assert_eq!(val.next_queue("r", 2), Some(train_queue("r", 2)));
        assert_eq!(
            val.next_queue("r", 1),
            None,
            "nothing after the last validation"
        );
        let interim = EpochProgress::interim(1, 2);
        assert_eq!(interim.queue("r"), eval_queue("r", 1, 2));
        assert_eq!(interim.split(), Split::Validation);
    }

    #[test]
    fn saved_progress_round_trips_next_to_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("latest.safetensors");
        assert_eq!(SavedProgress::read(&checkpoint, "r").unwrap(), None);
        saved(40).write(&checkpoint).unwrap();
        assert!(dir.path().join("latest.progress.json").exists());
        assert_eq!(
            SavedProgress::read(&checkpoint, "r").unwrap(),
            Some(saved(40))
        );
        assert_eq!(SavedProgress::read(&checkpoint, "other").unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );

        std::fs::write(progress_path(&checkpoint), "{").unwrap();
        let err = SavedProgress::read(&checkpoint, "r")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("latest.progress.json") && err.contains("progress file"),
            "{err}"
        );
    }

    #[test]
    fn a_run_starts_where_it_is_told_saved_or_checkpointed() {
        let resume = Path::new("c/latest.safetensors");
        let three_done = meta(3);
        let start = |e, s, m| start_position(e, Some(resume), s, 40, m);
        assert_eq!(
            start(Some(1), Some(saved(40)), Some(&three_done)).unwrap(),
            EpochProgress::new(1, Stage::Train)
        );
        assert_eq!(
            start(None, Some(saved(40)), Some(&three_done)).unwrap(),
            saved(40).progress
        );
        assert_eq!(
            start(None, None, Some(&three_done)).unwrap(),
            EpochProgress::new(3, Stage::Train)
        );
        assert_eq!(
            start_position(None, None, None, 0, None).unwrap(),
            EpochProgress::new(0, Stage::Train)
        );
        let err = start(None, Some(saved(39)), Some(&three_done))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("latest.progress.json") && err.contains("step 39"),
            "{err}"
        );
    }
}
