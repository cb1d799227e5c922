//! Training checkpoints: one safetensors file with every model variable (VarStore names), the
//! optimizer state under `optim.`, and the training position in `__metadata__`. A checkpoint also
//! carries `variant`, so it can serve as `--weights` for a new run.

use std::collections::HashMap;
use std::num::ParseIntError;
use std::path::Path;
use std::str::FromStr;

use flowers_proto::checkpoint_format;
use tch::nn::VarStore;
use tch::Tensor;

use crate::{copy_into_variables, tensor_file, ModelError, Optimizer, Policy, Variant};

const OPTIM_PREFIX: &str = "optim.";

/// Where training stood, stored as the checkpoint's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Optimizer steps done.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    pub policy: Policy,
    pub variant: Variant,
    pub num_classes: i64,
    pub img_size: i64,
    /// `OptimizerKind::name()` of the saved state, if any.
    pub optimizer: Option<String>,
}

impl CheckpointMeta {
    fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            (
                checkpoint_format::KEY.to_string(),
                checkpoint_format::TRAINER.to_string(),
            ),
            ("source".to_string(), "flowers checkpoint".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("epoch".to_string(), self.epoch.to_string()),
            ("policy".to_string(), self.policy.to_string()),
            ("variant".to_string(), self.variant.to_string()),
            ("num_classes".to_string(), self.num_classes.to_string()),
            ("img_size".to_string(), self.img_size.to_string()),
        ]);
        if let Some(o) = &self.optimizer {
            m.insert("optimizer".to_string(), o.clone());
        }
        m
    }

    pub(crate) fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Self, ModelError> {
        let get = |key: &'static str| {
            m.get(key).ok_or_else(|| ModelError::MissingMetadata {
                path: path.to_path_buf(),
                key,
            })
        };
        fn num<T: FromStr<Err = ParseIntError>>(
            path: &Path,
            key: &'static str,
            value: &str,
        ) -> Result<T, ModelError> {
            value.parse().map_err(|source| ModelError::MetadataNumber {
                path: path.to_path_buf(),
                key,
                value: value.to_owned(),
                source,
            })
        }
        let named = |key: &'static str| {
            move |e: ModelError| ModelError::MetadataName {
                path: path.to_path_buf(),
                key,
                source: Box::new(e),
            }
        };
        Ok(CheckpointMeta {
            step: num(path, "step", get("step")?)?,
            epoch: num(path, "epoch", get("epoch")?)?,
            policy: get("policy")?.parse().map_err(named("policy"))?,
            variant: get("variant")?.parse().map_err(named("variant"))?,
            num_classes: num(path, "num_classes", get("num_classes")?)?,
            img_size: num(path, "img_size", get("img_size")?)?,
            optimizer: m.get("optimizer").cloned(),
        })
    }
}

/// Writes all of `vs`'s variables, the optimizer's state and `meta` (atomically).
pub fn save_checkpoint(
    path: &Path,
    vs: &VarStore,
    optimizer: Option<&Optimizer>,
    meta: &CheckpointMeta,
) -> Result<(), ModelError> {
    let mut meta = meta.clone();
    meta.optimizer = optimizer.map(|o| o.kind().name().to_string());
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    if let Some(o) = optimizer {
        named.extend(
            o.state_tensors()
                .into_iter()
                .map(|(n, t)| (format!("{OPTIM_PREFIX}{n}"), t)),
        );
    }
    tensor_file::write(
        path,
        named.iter().map(|(n, t)| (n.as_str(), t)),
        &meta.to_map(),
    )
}

/// The metadata alone (to build the matching model before [`load_checkpoint`]).
pub fn read_checkpoint_meta(path: &Path) -> Result<CheckpointMeta, ModelError> {
    CheckpointMeta::from_map(path, &tensor_file::read_metadata(path)?)
}

/// Restores every variable of `vs` (all must be present with equal shapes) and, when given, the
/// optimizer's state (its kind must match the saved one).
pub fn load_checkpoint(
    path: &Path,
    vs: &VarStore,
    optimizer: Option<&mut Optimizer>,
) -> Result<CheckpointMeta, ModelError> {
    let file = tensor_file::read(path)?;
    let meta = CheckpointMeta::from_map(path, &file.metadata)?;
    let saved = vs
        .variables()
        .into_keys()
        .map(|name| {
            file.tensors
                .get_key_value(&name)
                .map(|(name, t)| (name.as_str(), t))
                .ok_or(ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    copy_into_variables(vs, path, saved)?;
    if let Some(opt) = optimizer {
        let want = opt.kind().name();
        match meta.optimizer.as_deref() {
            Some(saved) if saved == want => {}
            saved => {
                return Err(ModelError::OptimizerMismatch {
                    path: path.to_path_buf(),
                    saved: saved.map(str::to_owned),
                    wanted: want,
                })
            }
        }
        let state = file
            .tensors
            .iter()
            .filter_map(|(n, t)| {
                n.strip_prefix(OPTIM_PREFIX)
                    .map(|n| (n.to_string(), t.shallow_clone()))
            })
            .collect();
        opt.load_state_tensors(&state, &path.display().to_string())?;
    }
    Ok(meta)
}
