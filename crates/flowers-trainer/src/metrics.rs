//! What one training step and one evaluation report: logged through `tracing`, handed to the
//! coordination hooks as plain structs (and to the coordinator as its messages); and the sums
//! of an epoch's steps for its log line.

use std::fmt;
use std::time::Instant;

use flowers_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tracing::info;

/// The figures of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// Epoch the batch belongs to.
    pub epoch: u32,
    /// Optimizer steps taken by this trainer so far, this one included.
    pub step: u64,
    /// `batch_index` of the batch in its epoch.
    pub batch_index: u32,
    /// Images in the batch.
    pub images: usize,
    /// Mean training loss of the batch (with label smoothing when it is on).
    pub loss: f64,
    /// Top-1 accuracy on the batch, taken from the forward pass of the step (training mode).
    pub accuracy: f64,
    /// Base learning rate of the step: the head's (pretrained layers may get a fraction of it).
    pub lr: f64,
    /// Seconds from the end of the previous step until this batch was on hand.
    pub data_wait_secs: f64,
    /// Seconds of the step itself: upload, forward, backward, optimizer update.
    pub step_secs: f64,
}

impl StepMetrics {
    /// Training throughput of the step alone.
    pub fn images_per_sec(&self) -> f64 {
        if self.step_secs > 0.0 {
            self.images as f64 / self.step_secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for StepMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch={} step={} batch={} loss={:.4} acc={:.3} lr={:.2e} images_per_s={:.1} step_s={:.3} data_wait_s={:.3}",
            self.epoch,
            self.step,
            self.batch_index,
            self.loss,
            self.accuracy,
            self.lr,
            self.images_per_sec(),
            self.step_secs,
            self.data_wait_secs
        )
    }
}

/// A step as the coordinator takes it.
impl From<&StepMetrics> for pb::StepMetrics {
    fn from(m: &StepMetrics) -> Self {
        pb::StepMetrics {
            step: m.step,
            epoch: m.epoch,
            batch_index: m.batch_index,
            images: m.images as u32,
            loss: m.loss as f32,
            accuracy: m.accuracy as f32,
            images_per_s: m.images_per_sec() as f32,
            data_wait_s: m.data_wait_secs as f32,
            step_s: m.step_secs as f32,
        }
    }
}

/// Counts for a classification evaluation: top-1, top-5, per-class hits and the confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTally {
    num_classes: usize,
    images: u64,
    loss_sum: f64,
    top1: u64,
    top5: u64,
    /// Row = true class, column = predicted class.
    confusion: Vec<u64>,
}

/// One off-diagonal entry of the confusion matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfusedPair {
    /// True class (0-based).
    pub actual: usize,
    /// Predicted class (0-based).
    pub predicted: usize,
    /// Images of `actual` predicted as `predicted`.
    pub count: u64,
}

impl EvalTally {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            images: 0,
            loss_sum: 0.0,
            top1: 0,
            top5: 0,
            confusion: vec![0; num_classes * num_classes],
        }
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Adds one image: its label, its classes ranked best first (at least one) and its loss.
    ///
    /// # Panics
    /// When `label` or a ranked class is not below `num_classes`, or `ranked` is empty:
    /// both come from the model and the verified batch, so that is a bug here.
    pub fn add(&mut self, label: usize, ranked: &[usize], loss: f64) {
        assert!(label < self.num_classes, "label {label} out of range");
        let predicted = ranked[0];
        self.images += 1;
        self.loss_sum += loss;
        if predicted == label {
            self.top1 += 1;
        }
        if ranked.iter().take(5).any(|&c| c == label) {
            self.top5 += 1;
        }
        self.confusion[label * self.num_classes + predicted] += 1;
    }

    /// Folds another tally over the same classes into this one.
    pub fn merge(&mut self, other: &EvalTally) {
        assert_eq!(
            self.num_classes, other.num_classes,
            "tallies over different class counts"
        );
        self.images += other.images;
        self.loss_sum += other.loss_sum;
        self.top1 += other.top1;
        self.top5 += other.top5;
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
    }

    pub fn images(&self) -> u64 {
        self.images
    }

    fn ratio(&self, n: u64) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            n as f64 / self.images as f64
        }
    }

    pub fn top1(&self) -> f64 {
        self.ratio(self.top1)
    }

    pub fn top5(&self) -> f64 {
        self.ratio(self.top5)
    }

    pub fn mean_loss(&self) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            self.loss_sum / self.images as f64
        }
    }

    /// Accuracy of each class that had images: `(class, correct, total)`.
    pub fn per_class(&self) -> Vec<(usize, u64, u64)> {
        (0..self.num_classes)
            .filter_map(|c| {
                let row = &self.confusion[c * self.num_classes..(c + 1) * self.num_classes];
                let total: u64 = row.iter().sum();
                (total > 0).then_some((c, row[c], total))
            })
            .collect()
    }

    /// The `n` largest off-diagonal confusion entries, largest first (ties by class order).
    pub fn most_confused(&self, n: usize) -> Vec<ConfusedPair> {
        let mut pairs: Vec<ConfusedPair> = self
            .confusion
            .iter()
            .enumerate()
            .filter_map(|(i, &count)| {
                let (actual, predicted) = (i / self.num_classes, i % self.num_classes);
                (actual != predicted && count > 0).then_some(ConfusedPair {
                    actual,
                    predicted,
                    count,
                })
            })
            .collect();
        pairs.sort_by(|a, b| b.count.cmp(&a.count).then(a.actual.cmp(&b.actual)));
        pairs.truncate(n);
        pairs
    }

    /// The counts of an evaluation of batch `batch_index` of `epoch` (this tally holding that
    /// batch alone), as a coordinator sums them over distinct batches.
    pub fn batch_counts(&self, epoch: u32, eval_part: u32, batch_index: u32) -> BatchEval {
        BatchEval {
            epoch,
            eval_part,
            batch_index,
            images: self.images,
            correct: self.top1,
            correct_top5: self.top5,
            loss_sum: self.loss_sum,
        }
    }

    /// The summary of a finished evaluation.
    pub fn summary(&self, epoch: u32) -> EvalMetrics {
        EvalMetrics {
            epoch,
            images: self.images,
            loss: self.mean_loss(),
            top1: self.top1(),
            top5: self.top5(),
        }
    }
}

/// The counts of one evaluated validation batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchEval {
    pub epoch: u32,
    /// Which evaluation of the epoch (0: its end; p: interim part p).
    pub eval_part: u32,
    pub batch_index: u32,
    pub images: u64,
    /// Images whose top prediction is the label.
    pub correct: u64,
    /// Images whose label is among the five top predictions.
    pub correct_top5: u64,
    /// Sum (not mean) of the images' cross-entropy losses.
    pub loss_sum: f64,
}

/// A validation batch's counts as the coordinator takes them (its epoch and part go with the
/// report).
impl From<&BatchEval> for pb::BatchEvaluation {
    fn from(c: &BatchEval) -> Self {
        pb::BatchEvaluation {
            batch_index: c.batch_index,
            images: c.images as u32,
            correct: c.correct as u32,
            correct_top5: c.correct_top5 as u32,
            loss_sum: c.loss_sum,
        }
    }
}

/// The figures of one finished evaluation (validation of an epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalMetrics {
    pub epoch: u32,
    pub images: u64,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
}

impl fmt::Display for EvalMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch={} images={} val_loss={:.4} top1={:.4} top5={:.4}",
            self.epoch, self.images, self.loss, self.top1, self.top5
        )
    }
}

/// Sums over the steps of an epoch's training, for its log line.
pub(crate) struct TrainTotals {
    started: Instant,
    images: u64,
    loss_sum: f64,
    correct: u64,
    step_secs: f64,
    wait_secs: f64,
}

impl TrainTotals {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            images: 0,
            loss_sum: 0.0,
            correct: 0,
            step_secs: 0.0,
            wait_secs: 0.0,
        }
    }

    pub fn add(&mut self, m: &StepMetrics, data_wait: f64) {
        self.images += m.images as u64;
        self.loss_sum += m.loss * m.images as f64;
        self.correct += (m.accuracy * m.images as f64).round() as u64;
        self.step_secs += m.step_secs;
        self.wait_secs += data_wait;
    }

    /// Logs the training of `epoch` (`batches` of it), if it trained anything.
    pub fn log(&self, epoch: u32, batches: usize) {
        if self.images == 0 {
            return;
        }
        let n = self.images as f64;
        info!(
            epoch,
            batches,
            images = self.images,
            loss = format!("{:.4}", self.loss_sum / n),
            acc = format!("{:.3}", self.correct as f64 / n),
            images_per_s = format!("{:.1}", n / self.step_secs.max(1e-9)),
            data_wait_s = format!("{:.1}", self.wait_secs),
            wall_s = format!("{:.1}", self.started.elapsed().as_secs_f64()),
            "epoch trained"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_top1_top5_and_confusions() {
        let mut t = EvalTally::new(7);
        t.add(0, &[0, 1, 2, 3, 4], 0.5);
        t.add(1, &[2, 3, 4, 5, 1], 1.0);
        t.add(1, &[2, 1, 0, 3, 4], 1.5);
        t.add(3, &[6, 5, 4, 2, 1], 2.0);
        assert_eq!(t.images(), 4);
        assert!((t.top1() - 0.25).abs() < 1e-12);
        assert!((t.top5() - 0.75).abs() < 1e-12);
        assert!((t.mean_loss() - 1.25).abs() < 1e-12);
        assert_eq!(t.per_class(), vec![(0, 1, 1), (1, 0, 2), (3, 0, 1)]);
        let counts = t.batch_counts(2, 0, 9);
        assert_eq!(
            (
                counts.epoch,
                counts.batch_index,
                counts.images,
                counts.correct,
                counts.correct_top5
            ),
            (2, 9, 4, 1, 3)
        );
        assert!((counts.loss_sum - 5.0).abs() < 1e-12);
        let confused = t.most_confused(2);
        assert_eq!(
            confused,
            vec![
                ConfusedPair {
                    actual: 1,
                    predicted: 2,
                    count: 2
                },
                ConfusedPair {
                    actual: 3,
                    predicted: 6,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn merged_tallies_add_up() {
        let mut a = EvalTally::new(3);
        a.add(0, &[0], 1.0);
        let mut b = EvalTally::new(3);
        b.add(1, &[0], 3.0);
        a.merge(&b);
        assert_eq!(a.images(), 2);
        assert!((a.top1() - 0.5).abs() < 1e-12);
        assert!((a.mean_loss() - 2.0).abs() < 1e-12);
        assert_eq!(
            a.most_confused(5),
            vec![ConfusedPair {
                actual: 1,
                predicted: 0,
                count: 1
            }]
        );
    }

    #[test]
    fn step_throughput() {
        let m = StepMetrics {
            epoch: 1,
            step: 3,
            batch_index: 2,
            images: 8,
            loss: 1.0,
            accuracy: 0.5,
            lr: 0.01,
            data_wait_secs: 0.0,
            step_secs: 0.5,
        };
        assert!((m.images_per_sec() - 16.0).abs() < 1e-12);
        assert!(m.to_string().contains("images_per_s=16.0"));
    }
}
