//! What a coordinator call can fail with: the status the coordinator (or the transport)
//! answered, a bad address or token, or a malformed stream.

use tonic::{Code, Status};

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator address {address:?}: {source}")]
    Endpoint {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the bearer token holds characters not allowed in gRPC metadata")]
    BadToken,
    // The status is not a #[source]: its text is already in this message.
    #[error("coordinator call {call} failed: {} ({:?})", status.message(), status.code())]
    Status { call: &'static str, status: Status },
    #[error("coordinator call {call}: malformed stream: {message}")]
    Stream { call: &'static str, message: String },
}

impl ClientError {
    /// The gRPC status, when the coordinator (or transport) answered with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status { status, .. } => Some(status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The coordinator answered that the run or worker asked about does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }
}

pub type ClientResult<T> = Result<T, ClientError>;
