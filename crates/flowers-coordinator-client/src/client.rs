//! The typed client: lazy (re)connection, and every call retried with the configured
//! [`Backoff`](flowers_retry::Backoff) while the coordinator is unreachable.

use std::future::Future;
use std::time::Duration;

use backon::Retryable;
use flowers_proto::v1 as pb;
use flowers_proto::v1::coordinator_client::CoordinatorClient as GrpcClient;
use flowers_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use flowers_retry::Backoff;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::config::{BearerToken, ClientConfig};
use crate::error::{ClientError, ClientResult};

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
    retry: Backoff,
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
        let token = BearerToken::new(config.token.as_deref())?;
        let raw = GrpcClient::with_interceptor(endpoint.connect_lazy(), token)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            raw,
            retry: config.retry,
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
        (|| call(self.raw.clone()))
            .retry(self.retry)
            .when(retryable)
            .notify(|status, delay| {
                tracing::warn!(call = name, error = %status.message(), retry_in = ?delay, "coordinator unavailable");
            })
            .await
            .map_err(|status| ClientError::Status { call: name, status })
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
        self.get_run_with(pb::GetRunRequest {
            run_id: run_id.to_owned(),
            include_history,
            include_batches: false,
        })
        .await
    }

    /// The run's status with the counted batches of every epoch and evaluation.
    pub async fn get_run_batches(&self, run_id: &str) -> ClientResult<pb::RunStatus> {
        self.get_run_with(pb::GetRunRequest {
            run_id: run_id.to_owned(),
            include_history: false,
            include_batches: true,
        })
        .await
    }

    async fn get_run_with(&self, req: pb::GetRunRequest) -> ClientResult<pb::RunStatus> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens on port 1 of the loopback interface.
    const CLOSED: &str = "http://127.0.0.1:1";

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        let config = ClientConfig::new(CLOSED).token(Some("two\nlines".into()));
        assert!(matches!(
            CoordinatorClient::connect(&config),
            Err(ClientError::BadToken)
        ));
        let err = CoordinatorClient::connect(&ClientConfig::new("not a url")).err();
        assert!(matches!(err, Some(ClientError::Endpoint { .. })), "{err:?}");
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_retried_until_the_budget_is_spent() {
        let retry = Backoff {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            give_up_after: Duration::from_millis(100),
        };
        let client = CoordinatorClient::connect(&ClientConfig::new(CLOSED).retry(retry)).unwrap();
        let started = std::time::Instant::now();
        let err = client.list_runs().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(30),
            "slept 10 then 20 ms at least"
        );
    }
}
