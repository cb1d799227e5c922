//! The gRPC layer ([`CoordinatorService`]): translates `flowers.v1.Coordinator` calls onto
//! [`Coordinator`] and streams tensors in [`CHUNK_BYTES`] chunks. It holds no state of its own.

use std::pin::Pin;
use std::sync::Arc;

use flowers_proto::v1 as pb;
use flowers_proto::v1::coordinator_server::Coordinator as CoordinatorRpc;
use flowers_proto::CHUNK_BYTES;
use flowers_shutdown::requested;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::Coordinator;
use crate::error::CoordinatorError;
use crate::state::{StatusDetail, UploadPlan};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The tonic service.
#[derive(Clone)]
pub struct CoordinatorService {
    coordinator: Coordinator,
}

impl CoordinatorService {
    pub fn new(coordinator: Coordinator) -> Self {
        Self { coordinator }
    }
}

fn is_finished(e: &pb::RunEvent) -> bool {
    matches!(e.event, Some(pb::run_event::Event::Finished(_)))
}

/// Streams `bytes` as `TensorChunk`s.
fn tensor_chunks(bytes: Arc<Vec<u8>>, round: u64) -> BoxStream<pb::TensorChunk> {
    let total = bytes.len();
    let starts: Vec<usize> = (0..total.max(1)).step_by(CHUNK_BYTES).collect();
    Box::pin(tokio_stream::iter(starts).map(move |start| {
        let end = (start + CHUNK_BYTES).min(total);
        Ok(pb::TensorChunk {
            offset: start as u64,
            data: bytes[start..end].to_vec(),
            total_bytes: if start == 0 { total as u64 } else { 0 },
            round,
        })
    }))
}

/// Reads the rest of an upload, checking offsets and the announced size.
async fn read_upload(
    stream: &mut Streaming<pb::SyncUpload>,
    total: u64,
) -> Result<Vec<u8>, Status> {
    let mut bytes = Vec::with_capacity(total as usize);
    while let Some(part) = stream.message().await? {
        match part.part {
            Some(pb::sync_upload::Part::Chunk(chunk)) => {
                if chunk.offset != bytes.len() as u64 {
                    return Err(Status::invalid_argument(format!(
                        "chunk at offset {} but {} bytes were received so far",
                        chunk.offset,
                        bytes.len()
                    )));
                }
                if bytes.len() as u64 + chunk.data.len() as u64 > total {
                    return Err(Status::invalid_argument(format!(
                        "upload exceeds its announced {total} bytes"
                    )));
                }
                bytes.extend_from_slice(&chunk.data);
            }
            Some(pb::sync_upload::Part::Header(_)) => {
                return Err(Status::invalid_argument(
                    "a second SyncHeader in one upload",
                ))
            }
            None => return Err(Status::invalid_argument("an empty SyncUpload message")),
        }
    }
    Ok(bytes)
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn register_run(
        &self,
        req: Request<pb::RegisterRunRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        Ok(Response::new(
            self.coordinator.register_run(req.get_ref()).await?,
        ))
    }

    async fn get_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        let req = req.into_inner();
        Ok(Response::new(self.coordinator.run_status(
            &req.run_id,
            StatusDetail {
                history: req.include_history,
                batches: req.include_batches,
            },
        )?))
    }

    async fn list_runs(
        &self,
        _req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        Ok(Response::new(pb::ListRunsResponse {
            runs: self.coordinator.list_runs(),
        }))
    }

    type WatchRunStream = BoxStream<pb::RunEvent>;

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let run_id = req.into_inner().run_id;
        let (snapshot, mut events) = self.coordinator.watch(&run_id)?;
        let finished = snapshot.state != pb::RunState::Running as i32;
        let (tx, rx) = mpsc::channel(64);
        let coordinator = self.coordinator.clone();
        let mut shutdown = coordinator.shutdown_signal();
        tokio::spawn(async move {
            let first = pb::RunEvent {
                event: Some(pb::run_event::Event::Snapshot(snapshot)),
            };
            if tx.send(Ok(first)).await.is_err() || finished {
                return;
            }
            loop {
                let next = tokio::select! {
                    next = events.recv() => next,
                    _ = requested(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                        return;
                    }
                };
                let event = match next {
                    Ok((id, event)) if id == run_id => event,
                    Ok(_) => continue,
                    // Too slow a reader: a fresh snapshot replaces what it missed.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match coordinator.run_status(&run_id, StatusDetail::default()) {
                            Ok(s) => pb::RunEvent {
                                event: Some(pb::run_event::Event::Snapshot(s)),
                            },
                            Err(_) => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let last = is_finished(&event);
                if tx.send(Ok(event)).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        Ok(Response::new(
            self.coordinator.register_worker(req.get_ref()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(
            self.coordinator.heartbeat(req.get_ref()).await?,
        ))
    }

    async fn report_steps(
        &self,
        req: Request<pb::ReportStepsRequest>,
    ) -> Result<Response<pb::ReportStepsResponse>, Status> {
        Ok(Response::new(
            self.coordinator.report_steps(req.get_ref()).await?,
        ))
    }

    async fn report_evaluation(
        &self,
        req: Request<pb::ReportEvaluationRequest>,
    ) -> Result<Response<pb::ReportEvaluationResponse>, Status> {
        Ok(Response::new(
            self.coordinator.report_evaluation(req.get_ref()).await?,
        ))
    }

    type SyncParametersStream = BoxStream<pb::TensorChunk>;

    async fn sync_parameters(
        &self,
        req: Request<Streaming<pb::SyncUpload>>,
    ) -> Result<Response<Self::SyncParametersStream>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await?.and_then(|m| m.part) {
            Some(pb::sync_upload::Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "SyncParameters must start with a SyncHeader",
                ))
            }
        };
        let average = match self.coordinator.plan_upload(&header)? {
            UploadPlan::Done { checkpoint_id } => {
                self.coordinator
                    .completed_round(&header.run_id, &checkpoint_id)
                    .await?
            }
            UploadPlan::Send { .. } => {
                let bytes = read_upload(&mut stream, header.total_bytes).await?;
                self.coordinator.sync(&header, bytes).await?
            }
        };
        Ok(Response::new(tensor_chunks(average, header.round)))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: self.coordinator.list_checkpoints(&req.get_ref().run_id)?,
        }))
    }

    type GetCheckpointStream = BoxStream<pb::CheckpointChunk>;

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<Self::GetCheckpointStream>, Status> {
        let req = req.into_inner();
        let (info, path) = self
            .coordinator
            .checkpoint(&req.run_id, &req.checkpoint_id)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::from(CoordinatorError::io("opening checkpoint", &path, e)))?;
        let total = info.size_bytes;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut info = Some(info);
            let mut offset = 0u64;
            loop {
                let mut data = vec![0u8; CHUNK_BYTES];
                let n = match file.read(&mut data).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::from(CoordinatorError::io(
                                "reading checkpoint",
                                &path,
                                e,
                            ))))
                            .await;
                        return;
                    }
                };
                if n == 0 && offset > 0 {
                    return;
                }
                data.truncate(n);
                let chunk = pb::CheckpointChunk {
                    info: info.take(),
                    offset,
                    data,
                    total_bytes: total,
                };
                offset += n as u64;
                if tx.send(Ok(chunk)).await.is_err() || n == 0 {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
