//! `trainer bench`: training steps on generated input, the same step `trainer run` takes
//! (upload, conversion, forward, loss, backward, optimizer update). bench/train_step.py times
//! the same step in PyTorch.

use std::time::Instant;

use flowers_model::{OptimizerKind, Policy, Variant};
use tch::{Device, Kind, Tensor};

use crate::batch::BatchView;
use crate::device::Precision;
use crate::state::{ModelOptions, TrainState};
use crate::TrainError;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub device: Device,
    pub precision: Precision,
    pub batch_size: usize,
    pub img_size: u32,
    pub policy: Policy,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    /// Untimed steps first (allocator and kernel warm-up).
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub steps: usize,
    pub images: usize,
    pub secs: f64,
    pub last_loss: f64,
}

impl BenchReport {
    pub fn images_per_sec(&self) -> f64 {
        self.images as f64 / self.secs
    }

    pub fn step_ms(&self) -> f64 {
        1e3 * self.secs / self.steps as f64
    }
}

/// Times `steps` training steps after `warmup` ones on one random batch, 102 classes, random
/// initial weights (the policy decides the cost, not the weights' values).
pub fn bench(opts: &BenchOptions) -> Result<BenchReport, TrainError> {
    if opts.steps == 0 || opts.batch_size == 0 {
        return Err(TrainError::Usage(
            "--steps and --batch-size must be at least 1".into(),
        ));
    }
    tch::manual_seed(opts.seed as i64);
    let model_opts = ModelOptions {
        device: opts.device,
        precision: opts.precision,
        num_classes: 102,
        // torchvision's architecture, as bench/train_step.py times (tf2015 differs in pools only).
        variant: Variant::Torchvision,
        label_smoothing: 0.0,
        dropout: 0.5,
        flip: true,
        optimizer: opts.optimizer,
        trunk_cache_bytes: 0,
    };
    let mut state = TrainState::new(model_opts, opts.policy, 1.0, None)?;
    let size = i64::from(opts.img_size);
    let n = opts.batch_size as i64;
    let pixels = Tensor::randint(256, [n, size, size, 3], (Kind::Uint8, Device::Cpu));
    let pixels: Vec<u8> = Vec::try_from(pixels.flatten(0, -1))?;
    let labels = Tensor::randint(102, [n], (Kind::Int64, Device::Cpu));
    let labels: Vec<u32> = Vec::<i64>::try_from(labels)?
        .into_iter()
        .map(|l| l as u32)
        .collect();
    let view = BatchView {
        pixels: &pixels,
        shape: [n, size, size, 3],
        labels: &labels,
        names: None,
    };
    for _ in 0..opts.warmup {
        state.train_step(view, opts.lr)?;
    }
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    for _ in 0..opts.steps {
        last_loss = state.train_step(view, opts.lr)?.loss;
    }
    Ok(BenchReport {
        steps: opts.steps,
        images: opts.steps * opts.batch_size,
        secs: started.elapsed().as_secs_f64(),
        last_loss,
    })
}
