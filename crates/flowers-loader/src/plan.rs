//! Which images go into which batch of which epoch.

use flowers_dataset::epoch_order;
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

    /// The validation batches of `epoch`, in ascending image number.
    pub fn val_batches(&self, epoch: u32) -> Vec<PlannedBatch> {
        self.chunk(epoch, Split::Validation, &self.validation)
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
        let v = p.val_batches(5);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].images, [11, 12, 13]);
        assert_eq!(
            (v[0].header.split, v[0].header.epoch),
            (Split::Validation, 5)
        );
        assert_eq!(p.val_batches(6)[0].images, v[0].images);
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
        assert!(p.val_batches(0).is_empty());
        assert_eq!(p.val_batches_per_epoch(), 0);
    }
}
