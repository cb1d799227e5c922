//! Learning-rate schedules, as a function of the optimizer step (0-based).

use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant {
        lr: f64,
    },
    /// Linear warm-up from `lr / warmup_steps` to `lr` over `warmup_steps`, then a half cosine
    /// down to `min_lr` at `total_steps` (and `min_lr` after).
    Cosine {
        lr: f64,
        min_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    },
    /// `lr * gamma^(step / step_size)` (torch's StepLR, counted in steps).
    Step {
        lr: f64,
        step_size: u64,
        gamma: f64,
    },
}

impl LrSchedule {
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::Cosine {
                lr,
                min_lr,
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    return lr * (step + 1) as f64 / warmup_steps as f64;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1);
                let progress = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                min_lr + 0.5 * (lr - min_lr) * (1.0 + (PI * progress).cos())
            }
            LrSchedule::Step {
                lr,
                step_size,
                gamma,
            } => lr * gamma.powf((step / step_size.max(1)) as f64),
        }
    }
}
