//! Where and how to reach the coordinator, and the bearer token every call carries.

use std::time::Duration;

use flowers_retry::Backoff;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::error::{ClientError, ClientResult};

/// Where and how to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub address: String,
    pub token: Option<String>,
    /// PEM CA certificate to trust for https (besides the system roots).
    pub ca_cert: Option<Vec<u8>>,
    /// Retries of calls that failed because the coordinator was unreachable.
    pub retry: Backoff,
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            token: None,
            ca_cert: None,
            retry: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub fn retry(mut self, retry: Backoff) -> Self {
        self.retry = retry;
        self
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The header for `token`; `None` sends none.
    pub(crate) fn new(token: Option<&str>) -> ClientResult<Self> {
        let value = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::BadToken)
            })
            .transpose()?;
        Ok(Self(value))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
