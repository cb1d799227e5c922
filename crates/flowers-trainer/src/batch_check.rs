//! Whether a delivered batch can be used where the run stands: its run, queue, classes, index
//! and image size. A batch that cannot is dead-lettered with the [`Misfit`] as the reason.

use flowers_wire::{Batch, Dims, Split};

use crate::progress::{EpochProgress, Stage};

/// Why a batch cannot be used at this point of the run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Misfit {
    #[error("it belongs to run {0:?}")]
    OtherRun(String),
    #[error("the queue {queue} holds {split:?} batches of epoch {epoch} (evaluation part {eval_part}) only")]
    OtherStage {
        queue: String,
        split: Split,
        epoch: u32,
        eval_part: u32,
    },
    #[error("it has {batch} classes, the model {model}")]
    Classes { batch: u32, model: u32 },
    #[error("its batch index is not below batches_in_epoch")]
    Index,
    #[error("earlier batches of the stage said {0} batches_in_epoch")]
    BatchCount(u32),
    #[error("its images are {height}x{width}, the run's {run}x{run}")]
    ImageSize {
        height: usize,
        width: usize,
        run: u32,
    },
    #[error("its images are {height}x{width}, not square")]
    NotSquare { height: usize, width: usize },
    #[error("it has {images} images, more than --batch-size {batch_size}")]
    TooMany { images: usize, batch_size: u32 },
}

/// What every batch of a run must agree with. The run's image size is the first usable batch's
/// when the run does not give it.
#[derive(Debug, Clone)]
pub struct BatchCheck {
    run_id: String,
    num_classes: u32,
    img_size: Option<u32>,
    batch_size: Option<u32>,
}

impl BatchCheck {
    pub fn new(
        run_id: &str,
        num_classes: u32,
        img_size: Option<u32>,
        batch_size: Option<u32>,
    ) -> Self {
        Self {
            run_id: run_id.to_owned(),
            num_classes,
            img_size,
            batch_size,
        }
    }

    pub fn num_classes(&self) -> u32 {
        self.num_classes
    }

    /// The run's image size, once known.
    pub fn img_size(&self) -> Option<u32> {
        self.img_size
    }

    /// Why `batch` cannot be used at this point (`progress`) of the run, if it cannot.
    pub fn misfit(&mut self, batch: &Batch, progress: &EpochProgress) -> Option<Misfit> {
        if batch.run_id != self.run_id {
            return Some(Misfit::OtherRun(batch.run_id.clone()));
        }
        let eval_part = if progress.stage == Stage::Validate {
            progress.eval_part
        } else {
            0
        };
        if batch.split != progress.split() as i32
            || batch.epoch != progress.epoch
            || batch.eval_part != eval_part
        {
            return Some(Misfit::OtherStage {
                queue: progress.queue(&self.run_id),
                split: progress.split(),
                epoch: progress.epoch,
                eval_part,
            });
        }
        if batch.num_classes != self.num_classes {
            return Some(Misfit::Classes {
                batch: batch.num_classes,
                model: self.num_classes,
            });
        }
        if batch.batch_index >= batch.batches_in_epoch {
            return Some(Misfit::Index);
        }
        if let Some(n) = progress
            .batches_in_epoch
            .filter(|&n| n != batch.batches_in_epoch)
        {
            return Some(Misfit::BatchCount(n));
        }
        let dims = Dims::of(batch).ok()?;
        let (height, width) = (dims.height, dims.width);
        match self.img_size {
            Some(run) if height != run as usize || width != run as usize => {
                return Some(Misfit::ImageSize { height, width, run })
            }
            Some(_) => {}
            None if height != width => return Some(Misfit::NotSquare { height, width }),
            None => self.img_size = Some(height as u32),
        }
        match self.batch_size {
            Some(batch_size) if dims.n > batch_size as usize => Some(Misfit::TooMany {
                images: dims.n,
                batch_size,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use flowers_wire::{build_batch, BatchHeader};

    use super::*;

    /// Batch 1 of 3 of epoch 0's training: `n` images of `height` x `width`, 4 classes.
    fn batch(n: u32, height: u32, width: u32) -> Batch {
        let header = BatchHeader {
            run_id: "r".into(),
            epoch: 0,
            split: Split::Train,
            batch_index: 1,
            batches_in_epoch: 3,
            num_classes: 4,
            eval_part: 0,
        };
        let pixels = vec![0; (n * height * width * 3) as usize];
        let names = (0..n).map(|i| format!("image_{i:05}.jpg")).collect();
        build_batch(&header, height, width, names, vec![0; n as usize], pixels).unwrap()
    }

    fn training() -> EpochProgress {
        EpochProgress::new(0, Stage::Train)
    }

    #[test]
    fn a_fitting_batch_passes_and_fixes_the_image_size() {
        let mut check = BatchCheck::new("r", 4, None, Some(2));
        assert_eq!(check.misfit(&batch(2, 8, 8), &training()), None);
        assert_eq!(check.img_size(), Some(8));
        assert_eq!(
            check.misfit(&batch(2, 6, 6), &training()),
            Some(Misfit::ImageSize {
                height: 6,
                width: 6,
                run: 8
            })
        );
    }

    #[test]
    fn batches_of_another_run_stage_or_model_do_not_fit() {
        let mut check = BatchCheck::new("r", 4, Some(8), None);
        let mut other_run = batch(1, 8, 8);
        other_run.run_id = "q".into();
        assert_eq!(
            check.misfit(&other_run, &training()),
            Some(Misfit::OtherRun("q".into()))
        );
        let validating = EpochProgress::new(0, Stage::Validate);
        let misfit = check.misfit(&batch(1, 8, 8), &validating).unwrap();
        assert!(
            matches!(
                misfit,
                Misfit::OtherStage {
                    split: Split::Validation,
                    ..
                }
            ),
            "{misfit}"
        );
        assert!(misfit.to_string().contains("evaluation part 0"), "{misfit}");
        let mut later = training();
        later.epoch = 1;
        assert!(matches!(
            check.misfit(&batch(1, 8, 8), &later),
            Some(Misfit::OtherStage { .. })
        ));

        let mut check = BatchCheck::new("r", 5, Some(8), None);
        assert_eq!(
            check.misfit(&batch(1, 8, 8), &training()),
            Some(Misfit::Classes { batch: 4, model: 5 })
        );
    }

    #[test]
    fn indices_counts_shapes_and_sizes_are_checked() {
        let mut check = BatchCheck::new("r", 4, None, Some(2));
        let mut past_the_end = batch(1, 8, 8);
        past_the_end.batch_index = 3;
        assert_eq!(
            check.misfit(&past_the_end, &training()),
            Some(Misfit::Index)
        );
        let mut seen = training();
        seen.batches_in_epoch = Some(4);
        assert_eq!(
            check.misfit(&batch(1, 8, 8), &seen),
            Some(Misfit::BatchCount(4))
        );
        assert_eq!(
            check.misfit(&batch(1, 8, 6), &training()),
            Some(Misfit::NotSquare {
                height: 8,
                width: 6
            })
        );
        assert_eq!(check.img_size(), None, "a misfit does not fix the size");
        assert_eq!(
            check
                .misfit(&batch(3, 8, 8), &training())
                .map(|m| m.to_string()),
            Some("it has 3 images, more than --batch-size 2".into())
        );
    }
}
