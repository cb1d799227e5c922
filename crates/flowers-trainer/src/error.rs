//! The errors of flowers-trainer (the training loop, its coordination, checkpoints and saved
//! progress, evaluation and the benchmark): [`TrainError`], everything that stops the trainer.
//! Errors of the crates it drives (model, broker, coordinator client, preprocessing) are kept
//! whole as sources; like the rest of the crate, nothing here depends on the loader or the
//! coordinator's server side.

use std::path::{Path, PathBuf};

use flowers_dataset::SetName;
use flowers_model::DeviceError;

use crate::worker::WorkerGone;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An option that cannot work, said in the option's words.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Model(#[from] flowers_model::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Boxed: lapin's errors are large, and every result of the crate would carry the size.
    #[error(transparent)]
    Broker(Box<flowers_broker::BrokerError>),
    /// Boxed like the broker's: gRPC statuses are large.
    #[error(transparent)]
    Coordinator(Box<flowers_coordinator_client::ClientError>),
    #[error(transparent)]
    Worker(#[from] WorkerGone),
    #[error(transparent)]
    Dataset(#[from] flowers_dataset::DatasetError),
    #[error(transparent)]
    Preprocess(#[from] flowers_preprocess::PreprocessError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a trainer progress file: {source}")]
    ProgressFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: progress is for step {progress_step}, the checkpoint is at step {checkpoint_step}"
    )]
    ProgressStep {
        path: PathBuf,
        progress_step: u64,
        checkpoint_step: u64,
    },
    #[error("{path}: checkpoint has {checkpoint} classes, the run {run}")]
    CheckpointClasses {
        path: PathBuf,
        checkpoint: i64,
        run: i64,
    },
    #[error("batch names {names} images for {labels} labels")]
    BatchNames { names: usize, labels: usize },
    #[error("training loss became {loss} at step {step}; lower the learning rate")]
    LossNotFinite { loss: f64, step: u64 },
    #[error("the model has no variable {name}")]
    NoVariable { name: String },
    #[error("{archive}: no images to evaluate (split {split:?})")]
    NoImages {
        archive: PathBuf,
        split: Option<SetName>,
    },
    #[error("the coordinator's registration of run {run_id} has no {missing}")]
    Registration {
        run_id: String,
        missing: &'static str,
    },
    #[error("{what} is of the {theirs} variant, this trainer's model {ours}: start it with the run's weights")]
    VariantMismatch {
        what: String,
        theirs: String,
        ours: String,
    },
    #[error("run {run_id} failed at the coordinator")]
    RunFailed { run_id: String },
}

impl From<flowers_broker::BrokerError> for TrainError {
    fn from(e: flowers_broker::BrokerError) -> Self {
        TrainError::Broker(Box::new(e))
    }
}

impl From<flowers_coordinator_client::ClientError> for TrainError {
    fn from(e: flowers_coordinator_client::ClientError) -> Self {
        TrainError::Coordinator(Box::new(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
