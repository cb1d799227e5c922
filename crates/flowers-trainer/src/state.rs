//! The model, its optimizer and one training or evaluation step. Lives on the training thread
//! ([`crate::worker::Worker`]); nothing here is async. The forward pass is in `forward.rs`,
//! what workers exchange in `exchange.rs`.

mod exchange;
mod forward;

use std::path::Path;
use std::time::Instant;

use flowers_model::{
    build_model, load_checkpoint, read_checkpoint_meta, save_checkpoint, CheckpointMeta,
    InceptionV3, ModelConfig, Optimizer, OptimizerKind, Policy, Variant,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};
use tracing::{info, warn};

use crate::batch::BatchView;
use crate::device::Precision;
use crate::metrics::EvalTally;
use crate::recipe::Phase;
use crate::trunk_cache::TrunkCache;
use crate::TrainError;

/// How the model is built and run; fixed for the life of a trainer.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub device: Device,
    pub precision: Precision,
    pub num_classes: i64,
    /// Architecture when training from scratch (pretrained weights carry their own).
    pub variant: Variant,
    pub label_smoothing: f64,
    /// Dropout before the classifier.
    pub dropout: f64,
    /// Random horizontal flips of training batches.
    pub flip: bool,
    pub optimizer: OptimizerKind,
    /// Bytes of trunk activations kept while the trunk is frozen (0: none); see [`TrunkCache`].
    pub trunk_cache_bytes: usize,
}

impl ModelOptions {
    fn model_config(&self, variant: Variant, policy: Policy) -> ModelConfig {
        ModelConfig {
            dropout: self.dropout,
            ..ModelConfig::new(self.num_classes, variant, policy)
        }
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    pub loss: f64,
    pub correct: u64,
    pub images: usize,
    pub secs: f64,
}

/// Model, optimizer and step count of a trainer.
pub struct TrainState {
    opts: ModelOptions,
    vs: VarStore,
    model: InceptionV3,
    optimizer: Optimizer,
    backbone_lr_scale: f64,
    /// Optimizer steps taken (carried over from a resumed checkpoint).
    pub step: u64,
    resumed_from: Option<CheckpointMeta>,
    trunk_cache: TrunkCache,
}

impl TrainState {
    /// A model with `weights` (a pretrained safetensors file or a checkpoint), or initialised at
    /// random when `None`, and a fresh optimizer.
    pub fn new(
        opts: ModelOptions,
        policy: Policy,
        backbone_lr_scale: f64,
        weights: Option<&Path>,
    ) -> Result<Self, TrainError> {
        let vs = VarStore::new(opts.device);
        let config = opts.model_config(opts.variant, policy);
        let (model, _) = build_model(&vs, config, weights)?;
        let optimizer = Optimizer::new(opts.optimizer, model.param_groups(backbone_lr_scale));
        Ok(Self::assemble(
            opts,
            vs,
            model,
            optimizer,
            backbone_lr_scale,
        ))
    }

    /// The state a run starts from: the checkpoint to `resume` (with its own policy; the phase
    /// gives the lr multiplier), else a new model under `phase` with `weights` (see
    /// [`TrainState::new`]).
    pub fn start(
        opts: ModelOptions,
        phase: Phase,
        resume: Option<&Path>,
        weights: Option<&Path>,
    ) -> Result<Self, TrainError> {
        match resume {
            Some(checkpoint) => Self::resume(opts, phase.backbone_lr_scale, checkpoint),
            None => Self::new(opts, phase.policy, phase.backbone_lr_scale, weights),
        }
    }

    /// A state at step 0 around a built model and its optimizer.
    fn assemble(
        opts: ModelOptions,
        vs: VarStore,
        model: InceptionV3,
        optimizer: Optimizer,
        backbone_lr_scale: f64,
    ) -> Self {
        Self {
            trunk_cache: TrunkCache::new(opts.trunk_cache_bytes),
            opts,
            vs,
            model,
            optimizer,
            backbone_lr_scale,
            step: 0,
            resumed_from: None,
        }
    }

    /// Everything a checkpoint holds: the model as saved (its policy and variant), its step,
    /// and the optimizer state when the run uses the same optimizer and policy.
    pub fn resume(
        opts: ModelOptions,
        backbone_lr_scale: f64,
        checkpoint: &Path,
    ) -> Result<Self, TrainError> {
        let meta = read_checkpoint_meta(checkpoint)?;
        if meta.num_classes != opts.num_classes {
            return Err(TrainError::CheckpointClasses {
                path: checkpoint.to_path_buf(),
                checkpoint: meta.num_classes,
                run: opts.num_classes,
            });
        }
        let opts = ModelOptions {
            variant: meta.variant,
            ..opts
        };
        let vs = VarStore::new(opts.device);
        let model = InceptionV3::new(&vs.root(), opts.model_config(meta.variant, meta.policy));
        let mut optimizer = Optimizer::new(opts.optimizer, model.param_groups(backbone_lr_scale));
        let same_optimizer = meta.optimizer.as_deref() == Some(opts.optimizer.name());
        if !same_optimizer {
            warn!(
                checkpoint = %checkpoint.display(),
                saved = ?meta.optimizer,
                run = opts.optimizer.name(),
                "optimizer differs from the checkpoint's: starting it fresh"
            );
        }
        let meta = load_checkpoint(checkpoint, &vs, same_optimizer.then_some(&mut optimizer))?;
        info!(checkpoint = %checkpoint.display(), step = meta.step, epoch = meta.epoch, policy = %meta.policy, "resumed");
        let mut state = Self::assemble(opts, vs, model, optimizer, backbone_lr_scale);
        state.step = meta.step;
        state.resumed_from = Some(meta);
        Ok(state)
    }

    /// The metadata of the checkpoint this state was resumed from.
    pub fn resumed_from(&self) -> Option<&CheckpointMeta> {
        self.resumed_from.as_ref()
    }

    pub fn policy(&self) -> Policy {
        self.model.config().policy
    }

    pub fn model(&self) -> &InceptionV3 {
        &self.model
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }

    /// Switches to `policy` and the backbone lr multiplier of a new phase. A new policy means
    /// new variables (requires_grad and BatchNorm modes are fixed at construction): they are
    /// copied over, and the optimizer starts afresh for the new parameter set.
    pub fn set_phase(&mut self, policy: Policy, backbone_lr_scale: f64) -> Result<(), TrainError> {
        if policy == self.policy() && backbone_lr_scale == self.backbone_lr_scale {
            return Ok(());
        }
        let from = self.policy();
        if policy != from {
            let mut vs = VarStore::new(self.opts.device);
            let config = ModelConfig {
                policy,
                ..self.model.config().clone()
            };
            let model = InceptionV3::new(&vs.root(), config);
            vs.copy(&self.vs)?;
            self.vs = vs;
            self.model = model;
            if !self.model.trunk_is_frozen() {
                // The new phase trains the trunk: whatever was cached goes stale with its first step.
                self.trunk_cache.clear();
            }
        }
        info!(%from, to = %policy, backbone_lr_scale, "new training phase: fresh optimizer");
        self.optimizer = Optimizer::new(
            self.opts.optimizer,
            self.model.param_groups(backbone_lr_scale),
        );
        self.backbone_lr_scale = backbone_lr_scale;
        Ok(())
    }

    fn labels(&self, batch: BatchView<'_>) -> Tensor {
        let labels: Vec<i64> = batch.labels.iter().map(|&l| i64::from(l)).collect();
        Tensor::from_slice(&labels).to_device(self.opts.device)
    }

    /// One optimizer step at base learning rate `lr` on the batch (training mode, flips when
    /// enabled).
    pub fn train_step(&mut self, batch: BatchView<'_>, lr: f64) -> Result<StepOutcome, TrainError> {
        let started = Instant::now();
        let y = self.labels(batch);
        let logits = self.logits(batch, true)?;
        let loss = logits.to_kind(Kind::Float).f_cross_entropy_loss::<Tensor>(
            &y,
            None,
            Reduction::Mean,
            -100,
            self.opts.label_smoothing,
        )?;
        self.optimizer.zero_grad();
        loss.f_backward()?;
        self.optimizer.step(lr);
        self.step += 1;
        let correct = logits
            .detach()
            .f_argmax(-1, false)?
            .f_eq_tensor(&y)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        // Reading the loss waits for the device, so `secs` covers the whole step.
        let loss = loss.f_double_value(&[])?;
        if !loss.is_finite() {
            return Err(TrainError::LossNotFinite {
                loss,
                step: self.step,
            });
        }
        Ok(StepOutcome {
            loss,
            correct: correct as u64,
            images: batch.labels.len(),
            secs: started.elapsed().as_secs_f64(),
        })
    }

    /// Adds the batch's predictions to `tally` (eval mode, no flips, no gradients).
    pub fn evaluate(
        &mut self,
        batch: BatchView<'_>,
        tally: &mut EvalTally,
    ) -> Result<(), TrainError> {
        let y = self.labels(batch);
        let logits = tch::no_grad(|| self.logits(batch, false))?.to_kind(Kind::Float);
        let losses = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::None, -100, 0.0)?;
        let k = 5.min(self.opts.num_classes);
        let (_, top) = logits.f_topk(k, -1, true, true)?;
        let top: Vec<i64> = Vec::try_from(top.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
        let losses: Vec<f64> =
            Vec::try_from(losses.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
        for (i, (&label, loss)) in batch.labels.iter().zip(losses).enumerate() {
            let ranked: Vec<usize> = top[i * k as usize..(i + 1) * k as usize]
                .iter()
                .map(|&c| c as usize)
                .collect();
            tally.add(label as usize, &ranked, loss);
        }
        Ok(())
    }

    /// Saves model, optimizer state and position (see [`flowers_model::save_checkpoint`]).
    pub fn save(&self, path: &Path, epochs_done: u32, img_size: i64) -> Result<(), TrainError> {
        let meta = CheckpointMeta {
            step: self.step,
            epoch: u64::from(epochs_done),
            policy: self.policy(),
            variant: self.model.config().variant,
            num_classes: self.opts.num_classes,
            img_size,
            optimizer: None,
        };
        save_checkpoint(path, &self.vs, Some(&self.optimizer), &meta)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(super) fn opts() -> ModelOptions {
        ModelOptions {
            device: Device::Cpu,
            precision: Precision::Fp32,
            num_classes: 4,
            variant: Variant::Torchvision,
            label_smoothing: 0.0,
            // Dropout draws from libtorch's global generator, which tests running in parallel
            // share: without it a step's loss depends only on the weights and the batch.
            dropout: 0.0,
            flip: false,
            optimizer: OptimizerKind::adam(),
            trunk_cache_bytes: 0,
        }
    }

    fn batch() -> (Vec<u8>, Vec<u32>) {
        // Image k: a plain shade of its own plus a faint pattern, label k.
        let image = 75 * 75 * 3;
        let pixels = (0..4 * image)
            .map(|i| ((i / image) * 60 + (i * 37) % 16) as u8)
            .collect();
        (pixels, vec![0, 1, 2, 3])
    }

    /// [`batch`]'s pixels and labels as the four 75 px images they are, unnamed.
    fn view_of<'a>(pixels: &'a [u8], labels: &'a [u32]) -> BatchView<'a> {
        BatchView {
            pixels,
            shape: [4, 75, 75, 3],
            labels,
            names: None,
        }
    }

    #[test]
    fn policy_switch_keeps_weights_and_changes_what_trains() {
        tch::manual_seed(0);
        let mut st = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let before: Vec<f64> = st
            .var_store()
            .variables()
            .iter()
            .filter(|(n, _)| n.starts_with("Mixed_7c.branch1x1.conv"))
            .map(|(_, t)| t.abs().sum(Kind::Double).double_value(&[]))
            .collect();
        assert_eq!(st.model().trainable_names(), ["fc.weight", "fc.bias"]);
        st.set_phase(Policy::Reference, 0.1).unwrap();
        assert_eq!(st.policy(), Policy::Reference);
        assert!(st.model().trainable_names().len() > 2);
        let after: Vec<f64> = st
            .var_store()
            .variables()
            .iter()
            .filter(|(n, _)| n.starts_with("Mixed_7c.branch1x1.conv"))
            .map(|(_, t)| t.abs().sum(Kind::Double).double_value(&[]))
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn steps_on_one_batch_lower_its_loss() {
        tch::manual_seed(0);
        let opts = ModelOptions {
            label_smoothing: 0.1,
            ..opts()
        };
        // Random weights need BatchNorms on batch statistics (`all`); frozen ones would run
        // on their initial running stats and blow the activations up.
        let mut st = TrainState::new(opts, Policy::All, 1.0, None).unwrap();
        let (pixels, labels) = batch();
        let view = view_of(&pixels, &labels);
        // BatchNorms on 4 images make single steps noisy: compare the mean losses of the first
        // and last few of 20 steps.
        let mut losses = Vec::new();
        for _ in 0..20 {
            let outcome = st.train_step(view, 1e-3).unwrap();
            assert_eq!(outcome.images, 4);
            losses.push(outcome.loss);
        }
        assert_eq!(st.step, 20);
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (start, end) = (mean(&losses[..4]), mean(&losses[16..]));
        assert!(end < 0.7 * start, "loss {start} -> {end}: {losses:?}");
    }

    #[test]
    fn evaluation_tallies_every_image() {
        tch::manual_seed(0);
        let mut st = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let (pixels, labels) = batch();
        let view = view_of(&pixels, &labels);
        let mut tally = EvalTally::new(4);
        st.evaluate(view, &mut tally).unwrap();
        assert_eq!(tally.images(), 4);
        assert!(
            (tally.top5() - 1.0).abs() < 1e-12,
            "4 classes: top-5 holds every label"
        );
        assert!(tally.mean_loss() > 0.0);
    }

    #[test]
    fn checkpoint_round_trip_restores_step_and_weights() {
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let mut st = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let (pixels, labels) = batch();
        let view = view_of(&pixels, &labels);
        st.train_step(view, 1e-3).unwrap();
        st.save(&path, 1, 75).unwrap();
        let back = TrainState::resume(opts(), 1.0, &path).unwrap();
        let meta = back.resumed_from().unwrap();
        assert_eq!(
            (back.step, meta.epoch, meta.policy, meta.img_size),
            (1, 1, Policy::Head, 75)
        );
        let a = st.var_store().variables()["fc.weight"].shallow_clone();
        let b = back.var_store().variables()["fc.weight"].shallow_clone();
        assert!(a.equal(&b));
    }

    #[test]
    fn cached_trunks_give_the_same_steps_and_go_stale_with_the_trunk() {
        let cached_opts = ModelOptions {
            trunk_cache_bytes: 64 << 20,
            ..opts()
        };
        let mut cached = TrainState::new(cached_opts, Policy::Top, 1.0, None).unwrap();
        let mut plain = TrainState::new(opts(), Policy::Top, 1.0, None).unwrap();
        // Tests share libtorch's generator: copy the weights rather than seed twice.
        plain.vs.copy(&cached.vs).unwrap();
        let (pixels, labels) = batch();
        let names: Vec<String> = (0..4).map(|i| format!("image_{i:05}.jpg")).collect();
        let view = view_of(&pixels, &labels);
        let named = BatchView {
            names: Some(&names),
            ..view
        };
        // The first step fills the cache, the later ones read it; the trunk does not train
        // under `top`, so every step matches the uncached model's.
        for step in 0..3 {
            let (a, b) = (
                cached.train_step(named, 1e-3).unwrap(),
                plain.train_step(view, 1e-3).unwrap(),
            );
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * b.loss.abs(),
                "step {step}: {} vs {}",
                a.loss,
                b.loss
            );
            assert_eq!(a.correct, b.correct);
            assert_eq!(cached.trunk_cache.len(), 4);
        }
        let (mut ta, mut tb) = (EvalTally::new(4), EvalTally::new(4));
        cached.evaluate(named, &mut ta).unwrap();
        plain.evaluate(view, &mut tb).unwrap();
        assert!((ta.mean_loss() - tb.mean_loss()).abs() <= 1e-5 * tb.mean_loss());
        assert_eq!(ta.top1(), tb.top1());

        let short = BatchView {
            names: Some(&names[..3]),
            ..view
        };
        let err = cached.train_step(short, 1e-3).unwrap_err().to_string();
        assert!(err.contains("3 images for 4 labels"), "{err}");

        // New trunk weights (e.g. a resumed average) make every cached activation stale...
        let trunk_var = "Conv2d_1a_3x3.bn.running_mean".to_string();
        let value = cached.var_store().variables()[&trunk_var].copy();
        cached
            .load_tensors("average", &BTreeMap::from([(trunk_var, value)]))
            .unwrap();
        assert!(cached.trunk_cache.is_empty());
        // ...and so does a phase that trains the trunk.
        cached.evaluate(named, &mut ta).unwrap();
        assert_eq!(cached.trunk_cache.len(), 4);
        cached.set_phase(Policy::Reference, 1.0).unwrap();
        cached.train_step(named, 1e-3).unwrap();
        assert!(cached.trunk_cache.is_empty());
    }
}
