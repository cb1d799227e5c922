//! The model, its optimizer and one training or evaluation step. Lives on the training thread
//! ([`crate::worker::Worker`]); nothing here is async.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

use flowers_model::{
    build_model, copy_into_variables, flip_rows, is_trunk_variable, load_checkpoint, read_checkpoint_meta,
    save_checkpoint, tensor_file, to_model_input, CheckpointMeta, InceptionV3, ModelConfig,
    Optimizer, OptimizerKind, Policy, Variant,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};
use tracing::{info, warn};

use crate::device::{upload_nhwc, with_precision, Precision};
use crate::metrics::EvalTally;
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

/// Borrowed view of one batch: pixels NHWC uint8, 0-based labels.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    pub pixels: &'a [u8],
    /// `[N, H, W, 3]`.
    pub shape: [i64; 4],
    pub labels: &'a [u32],
    /// The images' file names: with them, trunk activations are cached (see [`TrunkCache`]).
    pub names: Option<&'a [String]>,
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
            return Err(TrainError::File {
                path: checkpoint.to_path_buf(),
                message: format!(
                    "checkpoint has {} classes, the run {}",
                    meta.num_classes, opts.num_classes
                ),
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

    /// Logits of the batch (training mode and flips when `train`), under the run's precision.
    /// While the trunk is frozen and the batch names its images, trunk activations come from
    /// the cache, and those missing are computed (without gradients) and added to it.
    fn logits(&mut self, batch: BatchView<'_>, train: bool) -> Result<Tensor, TrainError> {
        let (device, precision) = (self.opts.device, self.opts.precision);
        let flip = train && self.opts.flip;
        if let Some(names) = batch.names.filter(|n| n.len() != batch.labels.len()) {
            return Err(TrainError::Data(format!(
                "batch names {} images for {} labels",
                names.len(),
                batch.labels.len()
            )));
        }
        let names = match batch.names {
            Some(names) if self.model.trunk_is_frozen() && self.trunk_cache.is_enabled() => names,
            _ => {
                let pixels = upload_nhwc(batch.pixels, batch.shape, device);
                let x = to_model_input(&pixels, device, flip)?;
                return Ok(with_precision(precision, device, || {
                    self.model.forward_t(&x, train)
                }));
            }
        };
        let flips: Vec<bool> = if flip {
            Vec::<bool>::try_from(
                Tensor::rand([names.len() as i64], (Kind::Float, Device::Cpu)).lt(0.5),
            )?
        } else {
            vec![false; names.len()]
        };
        let mut rows: Vec<Option<Tensor>> = names
            .iter()
            .zip(&flips)
            .map(|(name, &f)| self.trunk_cache.get(name, f))
            .collect();
        let missing: Vec<i64> = (0..rows.len() as i64)
            .filter(|&i| rows[i as usize].is_none())
            .collect();
        // Only images missing from the cache need their pixels on the device.
        if !missing.is_empty() {
            let pixels = upload_nhwc(batch.pixels, batch.shape, device);
            let index = Tensor::from_slice(&missing).to_device(device);
            let x = to_model_input(&pixels.f_index_select(0, &index)?, device, false)?;
            let x = flip_rows(
                &x,
                &missing
                    .iter()
                    .map(|&i| flips[i as usize])
                    .collect::<Vec<_>>(),
            );
            let trunk =
                tch::no_grad(|| with_precision(precision, device, || self.model.trunk(&x, false)));
            for (j, &i) in missing.iter().enumerate() {
                let i = i as usize;
                // A copy owns its storage, so a cached image does not pin the whole batch.
                let activation = trunk.get(j as i64).copy();
                self.trunk_cache
                    .insert(&names[i], flips[i], activation.shallow_clone());
                rows[i] = Some(activation);
            }
        }
        let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
        let trunk = Tensor::f_stack(&rows, 0)?;
        Ok(with_precision(precision, device, || {
            self.model.forward_from_trunk(&trunk, train)
        }))
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
            return Err(TrainError::Data(format!(
                "training loss became {loss} at step {}; lower the learning rate",
                self.step
            )));
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

    /// Names of the tensors workers exchange over a run whose phases train under `policies`:
    /// every policy's [`InceptionV3::sync_tensor_names`], so that the set stays the same when
    /// a phase changes what trains (frozen tensors are equal on every worker, so averaging them
    /// changes nothing). Sorted.
    pub fn sync_names(&self, policies: &[Policy]) -> Vec<String> {
        let mut names: BTreeSet<String> = self.model.sync_tensor_names().into_iter().collect();
        for &policy in policies.iter().filter(|&&p| p != self.policy()) {
            // Which tensors a policy trains is decided while building the model: build a
            // throwaway one on the CPU.
            let vs = VarStore::new(Device::Cpu);
            let config = ModelConfig {
                policy,
                ..self.model.config().clone()
            };
            names.extend(InceptionV3::new(&vs.root(), config).sync_tensor_names());
        }
        names.into_iter().collect()
    }

    /// The current values of the variables `names`, as safetensors bytes with `metadata`.
    pub fn tensors_bytes(
        &self,
        names: &[String],
        metadata: &HashMap<String, String>,
    ) -> Result<Vec<u8>, TrainError> {
        let vars = self.vs.variables();
        let tensors = names
            .iter()
            .map(|n| {
                vars.get(n)
                    .map(|t| (n.as_str(), t))
                    .ok_or_else(|| TrainError::Data(format!("the model has no variable {n}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(tensor_file::to_bytes("parameters", tensors, metadata)?)
    }

    /// Overwrites variables with same-named `tensors` (e.g. an average of workers); every name
    /// must be a variable of the same shape. The optimizer state is kept.
    pub fn load_tensors(
        &mut self,
        what: &str,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<(), TrainError> {
        copy_into_variables(
            &self.vs,
            Path::new(what),
            tensors.iter().map(|(name, t)| (name.as_str(), t)),
        )?;
        if tensors.keys().any(|n| is_trunk_variable(n)) {
            self.trunk_cache.clear();
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
    use super::*;

    fn opts() -> ModelOptions {
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
        let view = BatchView {
            pixels: &pixels,
            shape: [4, 75, 75, 3],
            labels: &labels,
            names: None,
        };
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
        let view = BatchView {
            pixels: &pixels,
            shape: [4, 75, 75, 3],
            labels: &labels,
            names: None,
        };
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
    fn sync_names_cover_every_phase_and_tensors_round_trip() {
        tch::manual_seed(0);
        let mut a = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let head = a.sync_names(&[Policy::Head]);
        assert_eq!(head, ["fc.bias", "fc.weight"]);
        let both = a.sync_names(&[Policy::Head, Policy::Reference]);
        assert!(both.len() > head.len() && head.iter().all(|n| both.contains(n)));
        assert!(both.iter().any(|n| n.ends_with("bn.running_mean")));

        tch::manual_seed(1);
        let b = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let meta = HashMap::from([("variant".to_string(), "torchvision".to_string())]);
        let bytes = b.tensors_bytes(&both, &meta).unwrap();
        let file = tensor_file::from_bytes(Path::new("b"), &bytes).unwrap();
        assert_eq!(file.metadata, meta);
        assert_eq!(file.tensors.len(), both.len());
        a.load_tensors("b", &file.tensors).unwrap();
        let (va, vb) = (a.var_store().variables(), b.var_store().variables());
        assert!(both.iter().all(|n| va[n].equal(&vb[n])));
        // Still a leaf that trains.
        assert!(va["fc.weight"].requires_grad());

        let wrong = BTreeMap::from([(
            "fc.bias".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )]);
        let err = a.load_tensors("upload", &wrong).unwrap_err().to_string();
        assert!(err.contains("upload") && err.contains("fc.bias"), "{err}");
    }

    #[test]
    fn checkpoint_round_trip_restores_step_and_weights() {
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let mut st = TrainState::new(opts(), Policy::Head, 1.0, None).unwrap();
        let (pixels, labels) = batch();
        let view = BatchView {
            pixels: &pixels,
            shape: [4, 75, 75, 3],
            labels: &labels,
            names: None,
        };
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
        let view = BatchView {
            pixels: &pixels,
            shape: [4, 75, 75, 3],
            labels: &labels,
            names: None,
        };
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
