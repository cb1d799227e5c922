//! Pretrained weights: safetensors files with torchvision names and `__metadata__`
//! `{"variant": "tf2015"|"torchvision", "source": ...}` (written by `scripts/convert_*.py`).

use std::path::Path;

use tch::Tensor;

use crate::{copy_into_variables, tensor_file, InceptionV3, ModelConfig, ModelError, Variant};

/// The variant recorded in a weights file's metadata.
pub fn read_variant(path: &Path) -> Result<Variant, ModelError> {
    let meta = tensor_file::read_metadata(path)?;
    variant_from_metadata(path, &meta)
}

fn variant_from_metadata(
    path: &Path,
    meta: &std::collections::HashMap<String, String>,
) -> Result<Variant, ModelError> {
    let v = meta.get("variant").ok_or_else(|| ModelError::NoVariant {
        path: path.to_path_buf(),
    })?;
    v.parse().map_err(|e| ModelError::MetadataName {
        path: path.to_path_buf(),
        key: "variant",
        source: Box::new(e),
    })
}

/// What [`load_pretrained`] did.
#[derive(Debug, Clone)]
pub struct PretrainedInfo {
    pub variant: Variant,
    pub source: Option<String>,
    /// Variables of the model that the file filled.
    pub loaded: usize,
    /// Variables left at their initial values: the head (`fc.*`), whose class count differs.
    pub kept_initial: Vec<String>,
}

/// Builds the model in `vs` (at its root) and fills it from `weights` when given; the variant is
/// then the file's, not `config.variant`. `None` means training from scratch.
pub fn build_model(
    vs: &tch::nn::VarStore,
    mut config: ModelConfig,
    weights: Option<&Path>,
) -> Result<(InceptionV3, Option<PretrainedInfo>), ModelError> {
    let Some(path) = weights else {
        return Ok((InceptionV3::new(&vs.root(), config), None));
    };
    config.variant = read_variant(path)?;
    let model = InceptionV3::new(&vs.root(), config);
    let info = load_pretrained(vs, path)?;
    Ok((model, Some(info)))
}

/// Copies the backbone of a weights file into the VarStore's variables (names must match exactly).
/// `fc.*` is taken only when its shape matches (a 1000-class ImageNet head never does for 102
/// flowers); every other variable must be present with the right shape, else the error names it.
pub fn load_pretrained(vs: &tch::nn::VarStore, path: &Path) -> Result<PretrainedInfo, ModelError> {
    let file = tensor_file::read(path)?;
    let variant = variant_from_metadata(path, &file.metadata)?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut backbone = Vec::new();
    let mut kept_initial = Vec::new();
    for (name, var) in &vars {
        let is_head = name == "fc.weight" || name == "fc.bias";
        match file.tensors.get_key_value(name) {
            Some((name, src)) if !is_head || src.size() == var.size() => {
                backbone.push((name.as_str(), src))
            }
            _ if is_head => kept_initial.push(name.clone()),
            _ => {
                return Err(ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                })
            }
        }
    }
    copy_into_variables(vs, path, backbone.iter().copied())?;
    let loaded = backbone.len();
    let source = file.metadata.get("source").cloned();
    tracing::info!(
        path = %path.display(), %variant, loaded, kept_initial = ?kept_initial,
        "loaded pretrained weights"
    );
    Ok(PretrainedInfo {
        variant,
        source,
        loaded,
        kept_initial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn variant_must_be_recorded_and_known() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let none = dir.path().join("none.safetensors");
        tensor_file::write(&none, [("x", &t)], &HashMap::new()).unwrap();
        let err = read_variant(&none).unwrap_err().to_string();
        assert!(
            err.contains("none.safetensors") && err.contains("variant"),
            "{err}"
        );

        let odd = dir.path().join("odd.safetensors");
        let meta = HashMap::from([("variant".to_string(), "keras".to_string())]);
        tensor_file::write(&odd, [("x", &t)], &meta).unwrap();
        let err = read_variant(&odd).unwrap_err().to_string();
        assert!(
            err.contains("odd.safetensors") && err.contains("keras"),
            "{err}"
        );

        let ok = dir.path().join("ok.safetensors");
        let meta = HashMap::from([("variant".to_string(), "torchvision".to_string())]);
        tensor_file::write(&ok, [("x", &t)], &meta).unwrap();
        assert_eq!(read_variant(&ok).unwrap(), Variant::Torchvision);
        // It lacks the backbone, so loading names a missing tensor.
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cfg = ModelConfig::new(102, Variant::Torchvision, crate::Policy::Head);
        let err = build_model(&vs, cfg, Some(&ok)).unwrap_err().to_string();
        assert!(
            err.contains("ok.safetensors") && err.contains("is missing"),
            "{err}"
        );
    }
}
