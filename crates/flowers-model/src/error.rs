//! The errors of flowers-model (the InceptionV3 network, its weights files, checkpoints,
//! optimizers and inference): [`ModelError`]; the device choice's own [`crate::DeviceError`] is
//! in `device.rs`. A file's error names the file and what is wrong with it, and
//! keeps the underlying error as its source. Like the rest of the crate, nothing here knows of
//! the broker, the coordinator or the trainer's loop.

use std::num::ParseIntError;
use std::path::{Path, PathBuf};

use flowers_proto::checkpoint_format;
use safetensors::tensor::Dtype;
use tch::Kind;

use crate::OptimizerKind;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {source}")]
    SafeTensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: header length {length} is implausible")]
    HeaderLength { path: PathBuf, length: u64 },
    #[error("{path}: safetensors header is not UTF-8")]
    HeaderNotUtf8 {
        path: PathBuf,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("{path}: safetensors header is not JSON: {source}")]
    HeaderNotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: __metadata__ is not an object")]
    MetadataNotObject { path: PathBuf },
    #[error("{path}: __metadata__.{key} is not a string")]
    MetadataNotString { path: PathBuf, key: String },
    #[error("{path}: tensor {name}: cannot store dtype {kind:?}")]
    UnstorableKind {
        path: PathBuf,
        name: String,
        kind: Kind,
    },
    #[error("{path}: tensor {name}: unsupported dtype {dtype:?}")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
    #[error(
        "{path}: no \"variant\" in __metadata__ (expected \"tf2015\" or \"torchvision\"; \
         convert weights with scripts/convert_*.py)"
    )]
    NoVariant { path: PathBuf },
    #[error("{path}: not a checkpoint: __metadata__ has no {key:?}")]
    MissingMetadata { path: PathBuf, key: &'static str },
    #[error("{path}: __metadata__.{key} = {value:?} is not a number")]
    MetadataNumber {
        path: PathBuf,
        key: &'static str,
        value: String,
        #[source]
        source: ParseIntError,
    },
    /// A name in the metadata (variant, policy) that is not one.
    #[error("{path}: __metadata__.{key}: {source}")]
    MetadataName {
        path: PathBuf,
        key: &'static str,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{path}: tensor {name} is missing (is this an InceptionV3 with torchvision names?)")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {file:?}, the model needs {model:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        file: Vec<i64>,
        model: Vec<i64>,
    },
    #[error("{path}: tensor {name} is not a model variable")]
    NotAVariable { path: PathBuf, name: String },
    #[error("{path}: optimizer state is {saved:?}, the run uses {wanted:?}")]
    OptimizerMismatch {
        path: PathBuf,
        saved: Option<String>,
        wanted: &'static str,
    },
    #[error("invalid input: {what}: optimizer state {key} is missing ({kind} state)")]
    MissingOptimizerState {
        what: String,
        key: String,
        kind: OptimizerKind,
    },
    #[error(
        "invalid input: {what}: optimizer state {key} has shape {state:?}, parameter has {param:?}"
    )]
    OptimizerStateShape {
        what: String,
        key: String,
        state: Vec<i64>,
        param: Vec<i64>,
    },
    #[error("invalid input: model input must be uint8 [N, H, W, 3], got {kind:?} {shape:?}")]
    InputLayout { kind: Kind, shape: Vec<i64> },
    #[error(
        "{path}: not a flowers checkpoint (__metadata__.format is {format:?}; expected {:?} \
         from a trainer or {:?} from the coordinator)",
        checkpoint_format::TRAINER,
        checkpoint_format::AVERAGE
    )]
    NotACheckpoint {
        path: PathBuf,
        format: Option<String>,
    },
    #[error("{path}: the average has no fc.weight, so it carries no trained classifier")]
    NoClassifier { path: PathBuf },
    #[error("{path}: fc.weight has {found} classes, the run has {expected}")]
    ClassCount {
        path: PathBuf,
        found: i64,
        expected: i64,
    },
    #[error("unknown {what} {value:?} (expected one of: {})", expected.join(", "))]
    UnknownName {
        what: &'static str,
        value: String,
        expected: &'static [&'static str],
    },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    /// `value` is none of the `expected` names of a `what`.
    pub(crate) fn unknown_name(
        what: &'static str,
        value: &str,
        expected: &'static [&'static str],
    ) -> Self {
        ModelError::UnknownName {
            what,
            value: value.to_owned(),
            expected,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn safetensors(path: &Path, source: safetensors::SafeTensorError) -> Self {
        ModelError::SafeTensors {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A tensor in `path` whose shape is not the model's.
    pub(crate) fn shape_mismatch(path: &Path, name: &str, file: &[i64], model: &[i64]) -> Self {
        ModelError::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_owned(),
            file: file.to_vec(),
            model: model.to_vec(),
        }
    }
}
