//! Inference with a trained checkpoint: which kind of file it is, the model it holds, and the
//! class probabilities of preprocessed images.
//!
//! Two kinds of checkpoint, told apart by `__metadata__.format` ([`checkpoint_format`]):
//! - a trainer's: every model variable plus `variant`, `num_classes` and `img_size`; it is
//!   complete on its own.
//! - a coordinator average: only the tensors workers sync (trainable parameters and training
//!   BatchNorms' running stats); frozen layers are whatever the run started from, so they come
//!   from its pretrained weights (whose metadata also gives the variant). Its class count is read
//!   off `fc.weight`.

use std::path::Path;

use flowers_proto::checkpoint_format;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::CheckpointMeta;
use crate::{
    build_model, copy_into_variables, load_checkpoint, tensor_file, to_model_input, InceptionV3,
    ModelConfig, ModelError, Policy, Variant,
};

/// Images per forward pass: bounds memory on long image lists.
const BATCH: usize = 16;

/// What a checkpoint file is, read from its header alone.
#[derive(Debug)]
pub enum CheckpointKind {
    Trainer(CheckpointMeta),
    /// A coordinator average; `img_size` as its first upload recorded it (none in averages
    /// written before the coordinator kept it).
    Average {
        img_size: Option<u32>,
    },
}

impl CheckpointKind {
    pub fn of(path: &Path) -> Result<Self, ModelError> {
        let meta = tensor_file::read_metadata(path)?;
        match meta.get(checkpoint_format::KEY).map(String::as_str) {
            Some(checkpoint_format::TRAINER) => Ok(CheckpointKind::Trainer(
                CheckpointMeta::from_map(path, &meta)?,
            )),
            Some(checkpoint_format::AVERAGE) => Ok(CheckpointKind::Average {
                img_size: meta
                    .get("img_size")
                    .and_then(|v| v.parse().ok())
                    .filter(|&s| s > 0),
            }),
            other => Err(ModelError::NotACheckpoint {
                path: path.to_path_buf(),
                format: other.map(str::to_owned),
            }),
        }
    }
}

/// A model ready for inference: eval mode, no gradients.
pub struct Classifier {
    /// Owns the variables that the model's tensors share.
    _vs: VarStore,
    model: InceptionV3,
    device: Device,
}

impl Classifier {
    /// The model of a trainer's checkpoint (`meta` as [`CheckpointKind::of`] read it).
    pub fn from_checkpoint(
        path: &Path,
        meta: &CheckpointMeta,
        device: Device,
    ) -> Result<Self, ModelError> {
        let vs = VarStore::new(device);
        let model = InceptionV3::new(
            &vs.root(),
            ModelConfig::new(meta.num_classes, meta.variant, meta.policy),
        );
        load_checkpoint(path, &vs, None)?;
        Ok(Self {
            _vs: vs,
            model,
            device,
        })
    }

    /// The model built from `weights` with every tensor of the average at `path` put over it;
    /// the average's class count must be `num_classes` where that is known.
    pub fn from_average(
        path: &Path,
        weights: &Path,
        num_classes: Option<i64>,
        device: Device,
    ) -> Result<Self, ModelError> {
        let file = tensor_file::read(path)?;
        let found = file
            .tensors
            .get("fc.weight")
            .ok_or_else(|| ModelError::NoClassifier {
                path: path.to_path_buf(),
            })?
            .size()[0];
        if let Some(expected) = num_classes.filter(|&n| n != found) {
            return Err(ModelError::ClassCount {
                path: path.to_path_buf(),
                found,
                expected,
            });
        }
        let vs = VarStore::new(device);
        // The variant is the weights file's; the policy does not matter in eval mode.
        let config = ModelConfig::new(found, Variant::Tf2015, Policy::Head);
        let (model, _) = build_model(&vs, config, Some(weights))?;
        copy_into_variables(
            &vs,
            path,
            file.tensors.iter().map(|(name, t)| (name.as_str(), t)),
        )?;
        tracing::debug!(path = %path.display(), tensors = file.tensors.len(), "average applied");
        Ok(Self {
            _vs: vs,
            model,
            device,
        })
    }

    pub fn num_classes(&self) -> i64 {
        self.model.config().num_classes
    }

    /// Class probabilities (softmax of the logits) of uint8 `[N, S, S, 3]` images with side
    /// `img_size` (as the loader publishes them), `[N][num_classes]`.
    pub fn probabilities(&self, pixels: &[u8], img_size: u32) -> Result<Vec<Vec<f32>>, ModelError> {
        let s = i64::from(img_size);
        let image_bytes = (img_size as usize).pow(2) * 3;
        let mut out = Vec::new();
        for chunk in pixels.chunks(BATCH * image_bytes) {
            let n = (chunk.len() / image_bytes) as i64;
            let batch = Tensor::from_slice(chunk).view([n, s, s, 3]);
            let x = to_model_input(&batch, self.device, false)?;
            let probs = tch::no_grad(|| self.model.forward_t(&x, false))
                .softmax(-1, Kind::Float)
                .to_device(Device::Cpu);
            out.extend(Vec::<Vec<f32>>::try_from(&probs)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn an_unknown_file_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.safetensors");
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let meta = HashMap::from([("variant".to_string(), "tf2015".to_string())]);
        tensor_file::write(&path, [("x", &t)], &meta).unwrap();
        let err = CheckpointKind::of(&path).unwrap_err().to_string();
        assert!(
            err.contains("other.safetensors") && err.contains("not a flowers checkpoint"),
            "{err}"
        );
    }

    #[test]
    fn an_average_tells_its_image_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("round.safetensors");
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let meta = HashMap::from([
            (
                checkpoint_format::KEY.to_string(),
                checkpoint_format::AVERAGE.to_string(),
            ),
            ("img_size".to_string(), "75".to_string()),
        ]);
        tensor_file::write(&path, [("x", &t)], &meta).unwrap();
        assert!(matches!(
            CheckpointKind::of(&path).unwrap(),
            CheckpointKind::Average { img_size: Some(75) }
        ));
    }
}
