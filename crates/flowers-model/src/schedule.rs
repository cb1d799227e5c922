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

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn constant_and_step() {
        assert_eq!(LrSchedule::Constant { lr: 0.1 }.lr_at(1000), 0.1);
        let s = LrSchedule::Step {
            lr: 1.0,
            step_size: 10,
            gamma: 0.5,
        };
        assert!(close(s.lr_at(9), 1.0) && close(s.lr_at(10), 0.5) && close(s.lr_at(25), 0.25));
    }

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = LrSchedule::Cosine {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            total_steps: 14,
        };
        let lrs: Vec<f64> = (0..4).map(|i| s.lr_at(i)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0]);
        assert!(close(s.lr_at(4), 1.0));
        assert!(close(s.lr_at(9), 0.55)); // half way: (1 + 0.1) / 2
        assert!(close(s.lr_at(14), 0.1) && close(s.lr_at(100), 0.1));
        assert!((4..14).all(|i| s.lr_at(i + 1) < s.lr_at(i)));
    }
}
