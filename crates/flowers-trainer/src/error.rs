use std::path::PathBuf;

use flowers_model::DeviceError;

use crate::worker::WorkerGone;

/// Everything that stops the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
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
    Coordinator(Box<flowers_coordinator::ClientError>),
    #[error(transparent)]
    Worker(#[from] WorkerGone),
    #[error(transparent)]
    Dataset(#[from] flowers_dataset::DatasetError),
    #[error(transparent)]
    Preprocess(#[from] flowers_preprocess::PreprocessError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Data(String),
}

impl From<flowers_broker::BrokerError> for TrainError {
    fn from(e: flowers_broker::BrokerError) -> Self {
        TrainError::Broker(Box::new(e))
    }
}

impl From<flowers_coordinator::ClientError> for TrainError {
    fn from(e: flowers_coordinator::ClientError) -> Self {
        TrainError::Coordinator(Box::new(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
