//! What a run is registered with: its [`RunSpec`] and the checks on it and on ids, and where
//! each of an epoch's evaluations falls.

use flowers_proto::v1 as pb;
use flowers_proto::{interim_evaluation_after, run_id};
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Ids become file and queue names: run and worker ids follow the one run id rule.
pub(super) fn check_id(kind: &str, id: &str) -> Result<()> {
    if run_id::is_valid(id) {
        Ok(())
    } else {
        Err(CoordinatorError::Invalid(format!(
            "{kind} id {id:?} must be {}",
            run_id::RULE
        )))
    }
}

/// The run's configuration as the loader registered it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub dataset: String,
    pub split: String,
    pub img_size: u32,
    pub batch_size: u32,
    pub epochs: u32,
    pub train_batches_per_epoch: u32,
    pub val_batches_per_epoch: u32,
    pub seed: u64,
    pub num_classes: u32,
    pub train_images: u32,
    pub val_images: u32,
    /// Evaluations per epoch: parts 1..n-1 after p/n of its training, then its end.
    pub evaluations_per_epoch: u32,
}

impl From<&pb::RunConfig> for RunSpec {
    fn from(c: &pb::RunConfig) -> Self {
        Self {
            dataset: c.dataset.clone(),
            split: c.split.clone(),
            img_size: c.img_size,
            batch_size: c.batch_size,
            epochs: c.epochs,
            train_batches_per_epoch: c.train_batches_per_epoch,
            val_batches_per_epoch: c.val_batches_per_epoch,
            seed: c.seed,
            num_classes: c.num_classes,
            train_images: c.train_images,
            val_images: c.val_images,
            // proto3's default 0 means the epoch end only.
            evaluations_per_epoch: c.evaluations_per_epoch.max(1),
        }
    }
}

impl From<&RunSpec> for pb::RunConfig {
    fn from(s: &RunSpec) -> Self {
        Self {
            dataset: s.dataset.clone(),
            split: s.split.clone(),
            img_size: s.img_size,
            batch_size: s.batch_size,
            epochs: s.epochs,
            train_batches_per_epoch: s.train_batches_per_epoch,
            val_batches_per_epoch: s.val_batches_per_epoch,
            seed: s.seed,
            num_classes: s.num_classes,
            train_images: s.train_images,
            val_images: s.val_images,
            evaluations_per_epoch: s.evaluations_per_epoch,
        }
    }
}

impl RunSpec {
    pub(super) fn validate(&self) -> Result<()> {
        let positive = [
            ("epochs", self.epochs),
            ("train_batches_per_epoch", self.train_batches_per_epoch),
            ("val_batches_per_epoch", self.val_batches_per_epoch),
            ("batch_size", self.batch_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(CoordinatorError::Invalid(format!(
                    "run config: {name} must be at least 1"
                )));
            }
        }
        // Bounds the per-epoch batch sets kept in memory and on disk.
        if self.train_batches_per_epoch > 1_000_000
            || self.val_batches_per_epoch > 1_000_000
            || self.epochs > 10_000
        {
            return Err(CoordinatorError::Invalid(
                "run config: too many epochs or batches per epoch".into(),
            ));
        }
        if self.evaluations_per_epoch > self.train_batches_per_epoch {
            return Err(CoordinatorError::Invalid(format!(
                "run config: {} evaluations per epoch, but an epoch has only {} training batches",
                self.evaluations_per_epoch, self.train_batches_per_epoch
            )));
        }
        Ok(())
    }

    /// Where evaluation `part` lives in an epoch's evaluations: interim parts 1..n-1
    /// first, the epoch end (part 0) last.
    pub(super) fn eval_slot(&self, part: u32) -> Option<usize> {
        let n = self.evaluations_per_epoch;
        match part {
            0 => Some(n as usize - 1),
            p if p < n => Some(p as usize - 1),
            _ => None,
        }
    }

    pub(super) fn eval_part(&self, slot: usize) -> u32 {
        if slot + 1 == self.evaluations_per_epoch as usize {
            0
        } else {
            slot as u32 + 1
        }
    }

    /// Distinct training batches of an epoch trained before the evaluation in `slot` is due.
    pub(super) fn eval_after(&self, slot: usize) -> u32 {
        match self.eval_part(slot) {
            0 => self.train_batches_per_epoch,
            part => interim_evaluation_after(
                part,
                self.evaluations_per_epoch,
                self.train_batches_per_epoch,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::config;

    fn spec(evaluations_per_epoch: u32, train: u32) -> RunSpec {
        RunSpec::from(&pb::RunConfig {
            evaluations_per_epoch,
            ..config(2, train, 3)
        })
    }

    fn invalid(config: pb::RunConfig) -> String {
        match RunSpec::from(&config).validate() {
            Err(CoordinatorError::Invalid(message)) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_config_round_trips_and_zero_evaluations_mean_the_epoch_end() {
        let c = pb::RunConfig {
            evaluations_per_epoch: 0,
            ..config(2, 8, 3)
        };
        let s = RunSpec::from(&c);
        s.validate().unwrap();
        assert_eq!(s.evaluations_per_epoch, 1);
        assert_eq!(
            pb::RunConfig::from(&s),
            pb::RunConfig {
                evaluations_per_epoch: 1,
                ..c
            }
        );
    }

    #[test]
    fn counts_must_be_positive_and_bounded() {
        let zero_epochs = pb::RunConfig {
            epochs: 0,
            ..config(1, 8, 1)
        };
        assert_eq!(
            invalid(zero_epochs),
            "run config: epochs must be at least 1"
        );
        assert!(invalid(config(1, 8, 0)).contains("val_batches_per_epoch"));
        let no_batch_size = pb::RunConfig {
            batch_size: 0,
            ..config(1, 8, 1)
        };
        assert!(invalid(no_batch_size).contains("batch_size"));
        assert!(invalid(config(10_001, 8, 1)).contains("too many"));
        assert!(invalid(config(1, 1_000_001, 1)).contains("too many"));
        let crowded = pb::RunConfig {
            evaluations_per_epoch: 9,
            ..config(1, 8, 1)
        };
        assert!(invalid(crowded).contains("9 evaluations per epoch"));
    }

    #[test]
    fn interim_parts_come_first_and_the_epoch_end_last() {
        let s = spec(3, 9);
        assert_eq!(
            [0, 1, 2, 3].map(|p| s.eval_slot(p)),
            [Some(2), Some(0), Some(1), None]
        );
        assert_eq!([0, 1, 2].map(|slot| s.eval_part(slot)), [1, 2, 0]);
        assert_eq!([0, 1, 2].map(|slot| s.eval_after(slot)), [3, 6, 9]);
        let end_only = spec(1, 9);
        assert_eq!(
            (end_only.eval_slot(0), end_only.eval_slot(1)),
            (Some(0), None)
        );
        assert_eq!((end_only.eval_part(0), end_only.eval_after(0)), (0, 9));
    }

    #[test]
    fn ids_follow_the_run_id_rule() {
        check_id("run", "run-1_a").unwrap();
        for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
            let err = check_id("worker", bad).unwrap_err().to_string();
            assert!(
                err.contains("worker id") && err.contains("A-Z a-z 0-9 - _"),
                "{err}"
            );
        }
    }
}
