//! A typed client of the coordinator for the loader, trainers and flowersctl:
//! bearer token on every call, lazy (re)connection, and retries with
//! exponential backoff while the coordinator is unreachable.

use std::future::Future;
use std::time::Duration;

use flowers_proto::v1 as pb;
use flowers_proto::v1::coordinator_client::CoordinatorClient as GrpcClient;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::server::MAX_MESSAGE_BYTES;
use crate::service::CHUNK_BYTES;

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
}

pub type ClientResult<T> = Result<T, ClientError>;

/// Retries of calls that failed because the coordinator was unreachable.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up once this much time has passed since the first attempt.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// No retries (e.g. for interactive tools).
    pub fn none() -> Self {
        Self {
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            give_up_after: Duration::ZERO,
        }
    }
}

/// Where and how to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub address: String,
    pub token: Option<String>,
    /// PEM CA certificate to trust for https (besides the system roots).
    pub ca_cert: Option<Vec<u8>>,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            token: None,
            ca_cert: None,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The generated client with the token interceptor, for calls not wrapped here.
pub type RawClient = GrpcClient<InterceptedService<Channel, BearerToken>>;

/// What a trainer tells about itself when registering.
#[derive(Clone, Debug, Default)]
pub struct WorkerInfo {
    pub host: String,
    pub device: String,
    pub gpu_name: String,
}

/// A cloneable coordinator client.
#[derive(Clone)]
pub struct CoordinatorClient {
    raw: RawClient,
    retry: RetryPolicy,
}

fn retryable(status: &Status) -> bool {
    // Unavailable: refused or dropped connection, or a coordinator shutting down.
    // Unknown: h2 connection resets surface this way.
    matches!(status.code(), Code::Unavailable | Code::Unknown)
}

impl CoordinatorClient {
    /// Builds a client; the connection is made on first use and remade after a
    /// failure, so this succeeds while the coordinator is still down.
    pub fn connect(config: &ClientConfig) -> ClientResult<Self> {
        let endpoint_err = |source| ClientError::Endpoint {
            address: config.address.clone(),
            source,
        };
        let mut endpoint = Endpoint::from_shared(config.address.clone())
            .map_err(endpoint_err)?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if config.address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &config.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            endpoint = endpoint.tls_config(tls).map_err(endpoint_err)?;
        }
        let token = config
            .token
            .as_ref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::BadToken)
            })
            .transpose()?;
        let raw = GrpcClient::with_interceptor(endpoint.connect_lazy(), BearerToken(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            raw,
            retry: config.retry.clone(),
        })
    }

    /// The generated client (token included).
    pub fn raw(&self) -> RawClient {
        self.raw.clone()
    }

    /// Runs `call` until it succeeds, fails for a reason other than
    /// unavailability, or the retry budget is spent.
    async fn retry<T, F, Fut>(&self, name: &'static str, mut call: F) -> ClientResult<T>
    where
        F: FnMut(RawClient) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let start = tokio::time::Instant::now();
        let mut backoff = self.retry.initial_backoff;
        loop {
            match call(self.raw.clone()).await {
                Ok(v) => return Ok(v),
                Err(status)
                    if retryable(&status)
                        && start.elapsed() + backoff < self.retry.give_up_after =>
                {
                    tracing::warn!(call = name, error = %status.message(), retry_in = ?backoff, "coordinator unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
                Err(status) => return Err(ClientError::Status { call: name, status }),
            }
        }
    }

    /// Registers a run (or re-registers the same config under `run_id`).
    pub async fn register_run(
        &self,
        config: pb::RunConfig,
        run_id: Option<&str>,
    ) -> ClientResult<pb::RunStatus> {
        let req = pb::RegisterRunRequest {
            config: Some(config),
            run_id: run_id.unwrap_or_default().to_owned(),
        };
        self.retry("RegisterRun", |mut c| {
            let req = req.clone();
            async move { Ok(c.register_run(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn get_run(
        &self,
        run_id: &str,
        include_history: bool,
    ) -> ClientResult<pb::RunStatus> {
        let req = pb::GetRunRequest {
            run_id: run_id.to_owned(),
            include_history,
        };
        self.retry("GetRun", |mut c| {
            let req = req.clone();
            async move { Ok(c.get_run(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn list_runs(&self) -> ClientResult<Vec<pb::RunStatus>> {
        self.retry("ListRuns", |mut c| async move {
            Ok(c.list_runs(pb::ListRunsRequest {}).await?.into_inner().runs)
        })
        .await
    }

    /// The run's events: a snapshot first, then progress as it happens.
    pub async fn watch_run(&self, run_id: &str) -> ClientResult<tonic::Streaming<pb::RunEvent>> {
        let req = pb::WatchRunRequest {
            run_id: run_id.to_owned(),
        };
        self.retry("WatchRun", |mut c| {
            let req = req.clone();
            async move { Ok(c.watch_run(req).await?.into_inner()) }
        })
        .await
    }

    /// Registers a trainer; pass its previous id to be recognised after a reconnect.
    pub async fn register_worker(
        &self,
        run_id: &str,
        info: &WorkerInfo,
        worker_id: Option<&str>,
    ) -> ClientResult<pb::RegisterWorkerResponse> {
        let req = pb::RegisterWorkerRequest {
            run_id: run_id.to_owned(),
            host: info.host.clone(),
            device: info.device.clone(),
            gpu_name: info.gpu_name.clone(),
            worker_id: worker_id.unwrap_or_default().to_owned(),
        };
        self.retry("RegisterWorker", |mut c| {
            let req = req.clone();
            async move { Ok(c.register_worker(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn heartbeat(
        &self,
        run_id: &str,
        worker_id: &str,
    ) -> ClientResult<pb::HeartbeatResponse> {
        let req = pb::HeartbeatRequest {
            run_id: run_id.to_owned(),
            worker_id: worker_id.to_owned(),
        };
        self.retry("Heartbeat", |mut c| {
            let req = req.clone();
            async move { Ok(c.heartbeat(req).await?.into_inner()) }
        })
        .await
    }

    /// Reports trained steps; `seq` starts at 1 and grows by one per call, so
    /// that a retried call is not counted twice.
    pub async fn report_steps(
        &self,
        run_id: &str,
        worker_id: &str,
        seq: u64,
        steps: Vec<pb::StepMetrics>,
    ) -> ClientResult<pb::ReportStepsResponse> {
        let req = pb::ReportStepsRequest {
            run_id: run_id.to_owned(),
            worker_id: worker_id.to_owned(),
            steps,
            seq,
        };
        self.retry("ReportSteps", |mut c| {
            let req = req.clone();
            async move { Ok(c.report_steps(req).await?.into_inner()) }
        })
        .await
    }

    /// Reports per-batch validation sums of evaluation `part` (0: the epoch end) of `epoch`.
    pub async fn report_evaluation(
        &self,
        run_id: &str,
        worker_id: &str,
        epoch: u32,
        part: u32,
        batches: Vec<pb::BatchEvaluation>,
    ) -> ClientResult<pb::ReportEvaluationResponse> {
        let req = pb::ReportEvaluationRequest {
            run_id: run_id.to_owned(),
            worker_id: worker_id.to_owned(),
            epoch,
            batches,
            part,
        };
        self.retry("ReportEvaluation", |mut c| {
            let req = req.clone();
            async move { Ok(c.report_evaluation(req).await?.into_inner()) }
        })
        .await
    }

    /// Sends this worker's tensors (safetensors bytes) for `round`, weighted by
    /// `samples` trained since its last sync, and returns the round's average
    /// once every active worker has sent. Blocks for as long as the round takes.
    pub async fn sync_parameters(
        &self,
        run_id: &str,
        worker_id: &str,
        round: u64,
        samples: u64,
        safetensors: impl Into<bytes::Bytes>,
    ) -> ClientResult<Vec<u8>> {
        let bytes: bytes::Bytes = safetensors.into();
        let header = pb::SyncHeader {
            run_id: run_id.to_owned(),
            worker_id: worker_id.to_owned(),
            round,
            samples,
            total_bytes: bytes.len() as u64,
        };
        self.retry("SyncParameters", |mut c| {
            let header = header.clone();
            let bytes = bytes.clone();
            async move {
                let chunks =
                    (0..bytes.len())
                        .step_by(CHUNK_BYTES)
                        .map(move |start| pb::SyncUpload {
                            part: Some(pb::sync_upload::Part::Chunk(pb::TensorChunk {
                                offset: start as u64,
                                data: bytes[start..(start + CHUNK_BYTES).min(bytes.len())].to_vec(),
                                total_bytes: 0,
                                round: 0,
                            })),
                        });
                let first = pb::SyncUpload {
                    part: Some(pb::sync_upload::Part::Header(header)),
                };
                let upload = tokio_stream::iter(std::iter::once(first).chain(chunks));
                let mut stream = c.sync_parameters(upload).await?.into_inner();
                let mut out = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    if chunk.offset != out.len() as u64 {
                        return Err(Status::data_loss(format!(
                            "average chunk at offset {} after {} bytes",
                            chunk.offset,
                            out.len()
                        )));
                    }
                    out.extend_from_slice(&chunk.data);
                }
                Ok(out)
            }
        })
        .await
    }

    pub async fn list_checkpoints(&self, run_id: &str) -> ClientResult<Vec<pb::CheckpointInfo>> {
        let req = pb::ListCheckpointsRequest {
            run_id: run_id.to_owned(),
        };
        self.retry("ListCheckpoints", |mut c| {
            let req = req.clone();
            async move { Ok(c.list_checkpoints(req).await?.into_inner().checkpoints) }
        })
        .await
    }

    /// Downloads a checkpoint (`None`: the best, or the latest when none is
    /// validated yet): its info and its safetensors bytes.
    pub async fn get_checkpoint(
        &self,
        run_id: &str,
        checkpoint_id: Option<&str>,
    ) -> ClientResult<(pb::CheckpointInfo, Vec<u8>)> {
        let req = pb::GetCheckpointRequest {
            run_id: run_id.to_owned(),
            checkpoint_id: checkpoint_id.unwrap_or_default().to_owned(),
        };
        let (info, bytes) = self
            .retry("GetCheckpoint", |mut c| {
                let req = req.clone();
                async move {
                    let mut stream = c.get_checkpoint(req).await?.into_inner();
                    let mut info = None;
                    let mut out = Vec::new();
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk?;
                        if chunk.offset != out.len() as u64 {
                            return Err(Status::data_loss(format!(
                                "checkpoint chunk at offset {} after {} bytes",
                                chunk.offset,
                                out.len()
                            )));
                        }
                        if out.is_empty() {
                            out.reserve(chunk.total_bytes as usize);
                        }
                        info = info.or(chunk.info);
                        out.extend_from_slice(&chunk.data);
                    }
                    Ok((info, out))
                }
            })
            .await?;
        let info = info.ok_or(ClientError::Stream {
            call: "GetCheckpoint",
            message: "no checkpoint info in the stream".into(),
        })?;
        if info.size_bytes != bytes.len() as u64 {
            return Err(ClientError::Stream {
                call: "GetCheckpoint",
                message: format!(
                    "{} bytes received, checkpoint {} has {}",
                    bytes.len(),
                    info.checkpoint_id,
                    info.size_bytes
                ),
            });
        }
        Ok((info, bytes))
    }
}
