//! Training recipes: which parameters train in which epoch, with which optimizer and learning
//! rate. Everything is a pure function of the epoch and the position in it, so a resumed run
//! continues on the same curve.

use flowers_model::{LrSchedule, OptimizerKind, Policy};
use strum::VariantNames;

use crate::TrainError;

/// A named set of defaults; explicit options override them ([`Overrides`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::Display, strum::VariantNames,
)]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = TrainError,
    parse_err_fn = unknown_recipe
)]
pub enum Recipe {
    /// The Keras notebook: Adamax lr 1e-2 on the reference policy, constant lr, from the first
    /// step (head and unfrozen layers alike).
    Reference,
    /// For small data: three epochs of the head alone on the frozen backbone (Adamax 1e-2; the
    /// random head's large gradients never reach pretrained layers), then the `top` policy (the
    /// reference convolutions and the head; every BatchNorm keeps its pretrained statistics,
    /// since batch statistics of ~1000 images wreck the features) with Adamax 3e-3 for the head
    /// and 9e-4 for the pretrained convolutions, cosine decay to 1/100, label smoothing 0.1,
    /// dropout 0.5. Flip augmentation as always. The trunk never trains, so its activations
    /// are cached ([`crate::trunk_cache`]). Chosen on the official split at 299 px (BENCHMARKS.md).
    Fast,
}

fn unknown_recipe(value: &str) -> TrainError {
    TrainError::Usage(format!(
        "unknown recipe {value:?} (expected {})",
        one_of(Recipe::VARIANTS)
    ))
}

/// Shape of the learning rate over a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::VariantNames)]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = TrainError,
    parse_err_fn = unknown_schedule
)]
pub enum ScheduleKind {
    Constant,
    /// Half cosine from lr to lr/100 over the phase.
    Cosine,
    /// lr x 0.1 every [`STEP_EPOCHS`] epochs of the phase.
    Step,
}

/// Epochs between the decays of [`ScheduleKind::Step`].
pub const STEP_EPOCHS: u32 = 2;

fn unknown_schedule(value: &str) -> TrainError {
    TrainError::Usage(format!(
        "unknown lr schedule {value:?} (expected {})",
        one_of(ScheduleKind::VARIANTS)
    ))
}

/// `a, b or c`.
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [first @ .., last] => format!("{} or {last}", first.join(", ")),
    }
}

/// Options given explicitly on the command line; `None` keeps the recipe's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub policy: Option<Policy>,
    pub optimizer: Option<OptimizerKind>,
    pub lr: Option<f64>,
    pub label_smoothing: Option<f64>,
    pub dropout: Option<f64>,
    pub schedule: Option<ScheduleKind>,
    pub flip: Option<bool>,
    pub head_epochs: Option<u32>,
    pub backbone_lr_scale: Option<f64>,
}

/// Base lr of the fast recipe's main phase (bench/train_recipe.py mirrors the recipe's values).
const FAST_LR: f64 = 3e-3;

/// The resolved hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyper {
    pub recipe: Recipe,
    /// Policy after the head warm-up (all epochs under `reference`).
    pub policy: Policy,
    pub optimizer: OptimizerKind,
    /// Base lr of the main phase (the head's; pretrained layers get `lr * backbone_lr_scale`).
    pub lr: f64,
    pub backbone_lr_scale: f64,
    pub schedule: ScheduleKind,
    pub label_smoothing: f64,
    /// Dropout before the classifier.
    pub dropout: f64,
    /// Random horizontal flips of training batches.
    pub flip: bool,
    /// Most head-only warm-up epochs at the start of the run (0 under `reference`).
    pub head_epochs: u32,
    /// Constant lr of the head warm-up.
    pub head_lr: f64,
}

impl Hyper {
    pub fn new(recipe: Recipe, o: &Overrides) -> Result<Self, TrainError> {
        let base = match recipe {
            Recipe::Reference => Hyper {
                recipe,
                policy: Policy::Reference,
                optimizer: OptimizerKind::adamax(),
                lr: 1e-2,
                backbone_lr_scale: 1.0,
                schedule: ScheduleKind::Constant,
                label_smoothing: 0.0,
                dropout: 0.5,
                flip: true,
                head_epochs: 0,
                head_lr: 1e-2,
            },
            Recipe::Fast => Hyper {
                recipe,
                policy: Policy::Top,
                optimizer: OptimizerKind::adamax(),
                lr: FAST_LR,
                backbone_lr_scale: 0.3,
                schedule: ScheduleKind::Cosine,
                label_smoothing: 0.1,
                dropout: 0.5,
                flip: true,
                head_epochs: 3,
                head_lr: 1e-2,
            },
        };
        let h = Hyper {
            policy: o.policy.unwrap_or(base.policy),
            optimizer: o.optimizer.unwrap_or(base.optimizer),
            lr: o.lr.unwrap_or(base.lr),
            label_smoothing: o.label_smoothing.unwrap_or(base.label_smoothing),
            dropout: o.dropout.unwrap_or(base.dropout),
            schedule: o.schedule.unwrap_or(base.schedule),
            flip: o.flip.unwrap_or(base.flip),
            head_epochs: o.head_epochs.unwrap_or(base.head_epochs),
            backbone_lr_scale: o.backbone_lr_scale.unwrap_or(base.backbone_lr_scale),
            ..base
        };
        if !(h.backbone_lr_scale >= 0.0 && h.backbone_lr_scale.is_finite()) {
            return Err(TrainError::Usage(format!(
                "--backbone-lr-scale must be a number >= 0, got {}",
                h.backbone_lr_scale
            )));
        }
        if !(h.lr > 0.0 && h.lr.is_finite()) {
            return Err(TrainError::Usage(format!(
                "--lr must be a positive number, got {}",
                h.lr
            )));
        }
        if !(0.0..1.0).contains(&h.label_smoothing) {
            return Err(TrainError::Usage(format!(
                "--label-smoothing must be in [0, 1), got {}",
                h.label_smoothing
            )));
        }
        if !(0.0..1.0).contains(&h.dropout) {
            return Err(TrainError::Usage(format!(
                "--dropout must be in [0, 1), got {}",
                h.dropout
            )));
        }
        Ok(h)
    }

    /// Head-only warm-up epochs of a run of `total_epochs`: the recipe's count, but always at
    /// least one epoch of the main phase (nothing to warm up under `--trainable head`).
    fn warmup_epochs(&self, total_epochs: u32) -> u32 {
        if self.policy == Policy::Head {
            0
        } else {
            self.head_epochs.min(total_epochs.saturating_sub(1))
        }
    }

    /// What the phases of a run of `total_epochs` epochs train, in order.
    pub fn policies(&self, total_epochs: u32) -> Vec<Policy> {
        let mut policies: Vec<Policy> = Vec::new();
        for epoch in 0..total_epochs {
            let p = self.phase(epoch, total_epochs).policy;
            if policies.last() != Some(&p) {
                policies.push(p);
            }
        }
        policies
    }

    /// The phase that epoch `epoch` (0-based, as in the queue names) of a run with
    /// `total_epochs` epochs belongs to.
    pub fn phase(&self, epoch: u32, total_epochs: u32) -> Phase {
        let warmup = self.warmup_epochs(total_epochs);
        if epoch < warmup {
            Phase {
                policy: Policy::Head,
                first_epoch: 0,
                epochs: warmup,
                lr: self.head_lr,
                backbone_lr_scale: 1.0,
                schedule: ScheduleKind::Constant,
            }
        } else {
            Phase {
                policy: self.policy,
                first_epoch: warmup,
                epochs: total_epochs.max(epoch + 1) - warmup,
                lr: self.lr,
                backbone_lr_scale: self.backbone_lr_scale,
                schedule: self.schedule,
            }
        }
    }
}

/// Consecutive epochs trained with one policy and one optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub policy: Policy,
    pub first_epoch: u32,
    pub epochs: u32,
    pub lr: f64,
    pub backbone_lr_scale: f64,
    pub schedule: ScheduleKind,
}

impl Phase {
    /// Base lr of the step after `done` steps of epoch `epoch`, which has `batches_in_epoch`.
    pub fn lr_at(&self, epoch: u32, done: u32, batches_in_epoch: u32) -> f64 {
        let per_epoch = u64::from(batches_in_epoch.max(1));
        let step = u64::from(epoch.saturating_sub(self.first_epoch)) * per_epoch + u64::from(done);
        let schedule = match self.schedule {
            ScheduleKind::Constant => LrSchedule::Constant { lr: self.lr },
            ScheduleKind::Cosine => LrSchedule::Cosine {
                lr: self.lr,
                min_lr: self.lr / 100.0,
                warmup_steps: 0,
                total_steps: u64::from(self.epochs) * per_epoch,
            },
            ScheduleKind::Step => LrSchedule::Step {
                lr: self.lr,
                step_size: u64::from(STEP_EPOCHS) * per_epoch,
                gamma: 0.1,
            },
        };
        schedule.lr_at(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_is_the_keras_notebook() {
        let h = Hyper::new(Recipe::Reference, &Overrides::default()).unwrap();
        assert_eq!(h.policy, Policy::Reference);
        assert_eq!(h.optimizer, OptimizerKind::adamax());
        for epoch in 0..5 {
            let p = h.phase(epoch, 5);
            assert_eq!(p.policy, Policy::Reference);
            assert_eq!(p.lr_at(epoch, 7, 32), 1e-2);
        }
    }

    #[test]
    fn fast_warms_up_the_head_then_decays() {
        let h = Hyper::new(Recipe::Fast, &Overrides::default()).unwrap();
        let warm = h.head_epochs;
        assert!(warm >= 1);
        for epoch in 0..warm {
            assert_eq!(h.phase(epoch, warm + 4).policy, Policy::Head);
        }
        let main = h.phase(warm, warm + 4);
        assert_eq!(
            (main.policy, main.first_epoch, main.epochs),
            (Policy::Top, warm, 4)
        );
        assert!(main.backbone_lr_scale < 1.0);
        assert_eq!(h.phase(warm + 3, warm + 4), main);
        // Cosine over the 4 main epochs: full lr at the start, half way at the middle, lr/100 at the end.
        assert!((main.lr_at(warm, 0, 10) - FAST_LR).abs() < 1e-12);
        let mid = main.lr_at(warm + 2, 0, 10);
        let half = FAST_LR / 100.0 + 0.5 * (FAST_LR - FAST_LR / 100.0);
        assert!((mid - half).abs() < 1e-12, "{mid}");
        assert!(main.lr_at(warm + 3, 9, 10) < FAST_LR / 30.0);
        // A 2-epoch run keeps one main epoch; a 1-epoch run has no warm-up.
        assert_eq!(h.phase(0, 2).policy, Policy::Head);
        assert_eq!(h.phase(1, 2).policy, Policy::Top);
        assert_eq!(h.phase(0, 1).policy, Policy::Top);
        assert_eq!(h.policies(warm + 4), [Policy::Head, Policy::Top]);
        assert_eq!(h.policies(1), [Policy::Top]);
    }

    #[test]
    fn overrides_win_and_bad_values_are_refused() {
        let o = Overrides {
            policy: Some(Policy::Head),
            lr: Some(0.5),
            schedule: Some(ScheduleKind::Step),
            ..Default::default()
        };
        let h = Hyper::new(Recipe::Fast, &o).unwrap();
        let p = h.phase(0, 6);
        assert_eq!(
            p.policy,
            Policy::Head,
            "no warm-up when the head is all that trains"
        );
        assert_eq!(p.lr_at(0, 0, 10), 0.5);
        assert!((p.lr_at(2, 0, 10) - 0.05).abs() < 1e-12);
        let bad = Overrides {
            label_smoothing: Some(1.5),
            ..Default::default()
        };
        assert!(Hyper::new(Recipe::Reference, &bad)
            .unwrap_err()
            .to_string()
            .contains("label-smoothing"));
        let bad = Overrides {
            dropout: Some(1.0),
            ..Default::default()
        };
        assert!(Hyper::new(Recipe::Fast, &bad)
            .unwrap_err()
            .to_string()
            .contains("dropout"));
        let bad = Overrides {
            backbone_lr_scale: Some(-0.1),
            ..Default::default()
        };
        assert!(Hyper::new(Recipe::Fast, &bad)
            .unwrap_err()
            .to_string()
            .contains("backbone-lr-scale"));
        assert!("slow".parse::<Recipe>().is_err());
        let o = Overrides {
            head_epochs: Some(3),
            backbone_lr_scale: Some(0.1),
            ..Default::default()
        };
        let h = Hyper::new(Recipe::Fast, &o).unwrap();
        assert_eq!(h.phase(2, 8).policy, Policy::Head);
        let main = h.phase(3, 8);
        assert_eq!((main.first_epoch, main.backbone_lr_scale), (3, 0.1));
    }
}
