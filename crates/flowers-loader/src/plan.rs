//! Which images go into which batch of which epoch.

use flowers_dataset::epoch_order;
use flowers_proto::interim_evaluation_after;
use flowers_wire::{BatchHeader, Split};

/// One batch to assemble: its header and its images (by number), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBatch {
    pub header: BatchHeader,
    pub images: Vec<u32>,
}

/// Splits a run's images into batches: training images in a fresh order each
/// epoch (from `seed` and the epoch), validation images in a fixed order. The
/// last batch of a split may be short.
#[derive(Debug, Clone)]
pub struct EpochPlanner {
    pub run_id: String,
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
    pub batch_size: usize,
    pub seed: u64,
    pub num_classes: u32,
    /// Evaluations of the validation images per epoch (1: at its end only).
    pub evaluations_per_epoch: u32,
}

impl EpochPlanner {
    /// Batches per epoch of the training split.
    pub fn train_batches_per_epoch(&self) -> u32 {
        batches(self.train.len(), self.batch_size)
    }

    /// Batches per epoch of the validation split.
    pub fn val_batches_per_epoch(&self) -> u32 {
        batches(self.validation.len(), self.batch_size)
    }

    /// The training batches of `epoch`, shuffled.
    pub fn train_batches(&self, epoch: u32) -> Vec<PlannedBatch> {
        let order = epoch_order(&self.train, self.seed, u64::from(epoch));
        self.chunk(epoch, Split::Train, &order)
    }

    /// The validation batches of `epoch`'s evaluation `part` (0: its end), in ascending image
    /// number.
    pub fn val_batches(&self, epoch: u32, part: u32) -> Vec<PlannedBatch> {
        let mut batches = self.chunk(epoch, Split::Validation, &self.validation);
        for b in &mut batches {
            b.header.eval_part = part;
        }
        batches
    }

    /// Everything `epoch` publishes, in order: its training batches, with each interim
    /// evaluation's validation batches right after the training batches it follows (so that
    /// they are there when the coordinator asks for them), then the epoch-end validation.
    pub fn epoch_batches(&self, epoch: u32) -> Vec<PlannedBatch> {
        let train = self.train_batches(epoch);
        let n = self.evaluations_per_epoch.max(1);
        let mut out = Vec::new();
        let mut published = 0;
        for part in 1..n {
            let after = interim_evaluation_after(part, n, train.len() as u32) as usize;
            out.extend_from_slice(&train[published..after]);
            published = after;
            out.extend(self.val_batches(epoch, part));
        }
        out.extend_from_slice(&train[published..]);
        out.extend(self.val_batches(epoch, 0));
        out
    }

    fn chunk(&self, epoch: u32, split: Split, images: &[u32]) -> Vec<PlannedBatch> {
        let batches_in_epoch = batches(images.len(), self.batch_size);
        images
            .chunks(self.batch_size.max(1))
            .enumerate()
            .map(|(index, chunk)| PlannedBatch {
                header: BatchHeader {
                    run_id: self.run_id.clone(),
                    epoch,
                    split,
                    batch_index: index as u32,
                    batches_in_epoch,
                    num_classes: self.num_classes,
                    eval_part: 0,
                },
                images: chunk.to_vec(),
            })
            .collect()
    }
}

fn batches(images: usize, batch_size: usize) -> u32 {
    images.div_ceil(batch_size.max(1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner() -> EpochPlanner {
        EpochPlanner {
            run_id: "r".into(),
            train: (1..=10).collect(),
            validation: vec![11, 12, 13],
            batch_size: 4,
            seed: 7,
            num_classes: 3,
            evaluations_per_epoch: 1,
        }
    }

    fn flat(batches: &[PlannedBatch]) -> Vec<u32> {
        batches
            .iter()
            .flat_map(|b| b.images.iter().copied())
            .collect()
    }

    #[test]
    fn every_training_image_once_per_epoch_in_a_new_order() {
        let p = planner();
        let (e0, e1) = (p.train_batches(0), p.train_batches(1));
        assert_eq!(
            e0.iter().map(|b| b.images.len()).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let (mut s0, mut s1) = (flat(&e0), flat(&e1));
        assert_ne!(s0, s1, "epochs should be shuffled differently");
        assert_eq!(
            flat(&p.train_batches(0)),
            s0,
            "same seed and epoch, same order"
        );
        s0.sort();
        s1.sort();
        assert_eq!(s0, p.train);
        assert_eq!(s1, p.train);
        for (i, b) in e1.iter().enumerate() {
            assert_eq!(
                (b.header.epoch, b.header.split, b.header.batch_index),
                (1, Split::Train, i as u32)
            );
            assert_eq!(b.header.batches_in_epoch, 3);
        }
    }

    #[test]
    fn validation_is_fixed() {
        let p = planner();
        let v = p.val_batches(5, 0);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].images, [11, 12, 13]);
        assert_eq!(
            (v[0].header.split, v[0].header.epoch),
            (Split::Validation, 5)
        );
        assert_eq!(p.val_batches(6, 0)[0].images, v[0].images);
        assert_eq!(
            (p.train_batches_per_epoch(), p.val_batches_per_epoch()),
            (3, 1)
        );
    }

    #[test]
    fn empty_validation_has_no_batches() {
        let p = EpochPlanner {
            validation: vec![],
            ..planner()
        };
        assert!(p.val_batches(0, 0).is_empty());
        assert_eq!(p.val_batches_per_epoch(), 0);
    }

    #[test]
    fn interim_validations_follow_their_share_of_training() {
        let p = EpochPlanner {
            evaluations_per_epoch: 3,
            ..planner()
        };
        // 3 training batches, evaluations after 1 and 2 of them, then at the end.
        let order: Vec<(Split, u32, u32)> = p
            .epoch_batches(4)
            .iter()
            .map(|b| (b.header.split, b.header.batch_index, b.header.eval_part))
            .collect();
        assert_eq!(
            order,
            [
                (Split::Train, 0, 0),
                (Split::Validation, 0, 1),
                (Split::Train, 1, 0),
                (Split::Validation, 0, 2),
                (Split::Train, 2, 0),
                (Split::Validation, 0, 0),
            ]
        );
        let once = planner().epoch_batches(4);
        assert_eq!(once.len(), 4);
        assert_eq!(once[3].header.split, Split::Validation);
    }
}
