//! The coordinator's error type ([`CoordinatorError`]) and its mapping onto gRPC status codes,
//! the one place that decides which code a refusal gets. It knows nothing of the client's
//! errors (`flowers-coordinator-client`).

use std::path::PathBuf;

/// Everything the coordinator can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("unknown run {0:?}")]
    UnknownRun(String),
    #[error("unknown worker {worker:?} in run {run:?}")]
    UnknownWorker { run: String, worker: String },
    #[error("unknown checkpoint {checkpoint:?} of run {run:?}")]
    UnknownCheckpoint { run: String, checkpoint: String },
    #[error("run {0:?} has no checkpoint yet")]
    NoCheckpoint(String),
    #[error("run {0:?} already exists with a different configuration")]
    RunExists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("tensor mismatch: {0}")]
    Tensor(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt state file {path}: {source}")]
    CorruptState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

impl CoordinatorError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        let msg = e.to_string();
        match e {
            CoordinatorError::UnknownRun(_)
            | CoordinatorError::UnknownWorker { .. }
            | CoordinatorError::UnknownCheckpoint { .. }
            | CoordinatorError::NoCheckpoint(_) => tonic::Status::not_found(msg),
            CoordinatorError::RunExists(_) => tonic::Status::already_exists(msg),
            CoordinatorError::Invalid(_) | CoordinatorError::Tensor(_) => {
                tonic::Status::invalid_argument(msg)
            }
            CoordinatorError::Precondition(_) => tonic::Status::failed_precondition(msg),
            CoordinatorError::ShuttingDown => tonic::Status::unavailable(msg),
            CoordinatorError::Io { .. } | CoordinatorError::CorruptState { .. } => {
                tonic::Status::internal(msg)
            }
        }
    }
}
