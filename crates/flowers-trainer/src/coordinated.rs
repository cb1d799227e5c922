//! [`Coordinated`]: the decisions of a trainer that shares a run with others under a coordinator,
//! following the protocol in `crates/flowers-coordinator/README.md`: register (and start from the
//! run's latest average), heartbeat in the background, report every step and every validation
//! batch before its ack, join sync rounds at batch boundaries, and leave it to the coordinator to
//! say when an epoch's training and validation are over.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowers_coordinator_client::{ClientConfig, ClientResult, CoordinatorClient, WorkerInfo};
use flowers_model::{tensor_file, Policy};
use flowers_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::{info, warn};

use crate::coordination::Coordination;
use crate::directives::{asked_evaluation, eval_order, interim_part, stage_over};
use crate::metrics::{BatchEval, EvalMetrics, StepMetrics};
use crate::progress::EpochProgress;
use crate::state::TrainState;
use crate::worker::Worker;
use crate::TrainError;

/// Where the coordinator is and who this trainer is.
#[derive(Debug, Clone)]
pub struct CoordinatedOptions {
    pub client: ClientConfig,
    pub run_id: String,
    pub info: WorkerInfo,
    /// How long to wait for the loader to register the run (trainers may start first).
    pub wait_for_run: Duration,
}

/// How often a trainer asks again whether its run is registered.
const RUN_POLL: Duration = Duration::from_secs(1);

/// What every call to the coordinator needs; shared with the heartbeat task.
#[derive(Clone)]
struct Link {
    client: CoordinatorClient,
    run_id: String,
    worker_id: String,
    info: WorkerInfo,
}

impl Link {
    /// Runs `call`; when the coordinator does not know this worker (it lost its state, or
    /// dropped the worker), registers again under the same id and runs it once more.
    async fn call<T, F, Fut>(&self, mut call: F) -> ClientResult<T>
    where
        F: FnMut(Link) -> Fut,
        Fut: Future<Output = ClientResult<T>>,
    {
        match call(self.clone()).await {
            Err(e) if e.is_not_found() => {
                warn!(worker = %self.worker_id, error = %e, "the coordinator does not know this worker: registering again");
                self.client
                    .register_worker(&self.run_id, &self.info, Some(&self.worker_id))
                    .await?;
                call(self.clone()).await
            }
            other => other,
        }
    }

    async fn heartbeat(&self) -> ClientResult<pb::HeartbeatResponse> {
        self.call(|l| async move { l.client.heartbeat(&l.run_id, &l.worker_id).await })
            .await
    }
}

/// Heartbeats every `interval` until aborted, publishing the coordinator's directives.
async fn heartbeats(
    link: Link,
    directives: Arc<watch::Sender<pb::HeartbeatResponse>>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match link.heartbeat().await {
            Ok(d) => {
                directives.send_replace(d);
            }
            // The client already retried while the coordinator was unreachable; keep trying.
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// A trainer working on a run with others, under a coordinator (see the module docs).
pub struct Coordinated {
    link: Link,
    /// The training thread, from [`Coordination::started`] on: rounds exchange its parameters.
    model: Option<Arc<Worker<TrainState>>>,
    registration: pb::RegisterWorkerResponse,
    config: pb::RunConfig,
    directives: Arc<watch::Sender<pb::HeartbeatResponse>>,
    heartbeat: JoinHandle<()>,
    /// Sequence number of the last `report_steps` call.
    seq: u64,
    /// Images trained since the last sync: this worker's weight in the next average.
    samples: u64,
    /// The last round this worker sent its parameters for (0: none).
    synced_round: u64,
    /// The round whose average the model holds, if it holds one.
    loaded_round: Option<u64>,
    /// What is exchanged in rounds (the same for the whole run) and its metadata.
    sync_names: Vec<String>,
    metadata: HashMap<String, String>,
    /// The latest evaluation this worker saw complete, by [`eval_order`].
    validated: Option<(u32, u32)>,
}

impl Drop for Coordinated {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Coordinated {
    /// Registers with the coordinator and starts heartbeating.
    pub async fn join(opts: CoordinatedOptions) -> Result<Self, TrainError> {
        let client = CoordinatorClient::connect(&opts.client)?;
        let waiting_since = Instant::now();
        let registration = loop {
            match client.register_worker(&opts.run_id, &opts.info, None).await {
                Err(e)
                    if e.is_not_found()
                        && waiting_since.elapsed() + RUN_POLL < opts.wait_for_run =>
                {
                    if waiting_since.elapsed() < RUN_POLL {
                        info!(run = %opts.run_id, "the run is not registered yet: waiting for the loader");
                    }
                    tokio::time::sleep(RUN_POLL).await;
                }
                other => break other?,
            }
        };
        let malformed = |missing| TrainError::Registration {
            run_id: opts.run_id.clone(),
            missing,
        };
        let run = registration
            .run
            .clone()
            .ok_or_else(|| malformed("run status"))?;
        let config = run.config.clone().ok_or_else(|| malformed("run config"))?;
        let link = Link {
            client,
            run_id: opts.run_id,
            worker_id: registration.worker_id.clone(),
            info: opts.info,
        };
        // A new worker is in no open round; the rest comes with the first heartbeat.
        let first = pb::HeartbeatResponse {
            run_state: run.state,
            sync_round: 0,
            evaluate_epoch_plus_one: run.validating_epoch_plus_one,
            current_epoch: run.current_epoch,
            evaluate_part: run.validating_part,
        };
        let directives = Arc::new(watch::channel(first).0);
        let interval = Duration::from_millis(u64::from(registration.heartbeat_interval_ms.max(10)));
        let heartbeat = tokio::spawn(heartbeats(link.clone(), directives.clone(), interval));
        info!(
            run = %link.run_id, worker = %link.worker_id, epoch = run.current_epoch,
            checkpoint = %registration.checkpoint_id, heartbeat_ms = interval.as_millis() as u64,
            sync_every = registration.sync_every, "registered with the coordinator"
        );
        Ok(Self {
            link,
            model: None,
            registration,
            config,
            directives,
            heartbeat,
            seq: 0,
            samples: 0,
            synced_round: 0,
            loaded_round: None,
            sync_names: Vec::new(),
            metadata: HashMap::new(),
            validated: None,
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.link.worker_id
    }

    /// The run as the loader registered it (epochs, classes, image size, batches).
    pub fn run_config(&self) -> &pb::RunConfig {
        &self.config
    }

    /// The epoch the run was at when this worker joined: where it starts.
    pub fn start_epoch(&self) -> u32 {
        self.registration
            .run
            .as_ref()
            .map_or(0, |r| r.current_epoch)
    }

    /// Whether the run was already over when this worker joined.
    pub fn run_finished(&self) -> bool {
        self.registration
            .run
            .as_ref()
            .is_some_and(|r| r.state != pb::RunState::Running as i32)
    }

    /// The run's status now (e.g. its validation figures once it finished).
    pub async fn run_status(&self) -> Result<pb::RunStatus, TrainError> {
        Ok(self.link.client.get_run(&self.link.run_id, false).await?)
    }

    fn model(&self) -> &Worker<TrainState> {
        self.model
            .as_deref()
            .expect("the loop starts the coordination before it asks for rounds")
    }

    fn directives(&self) -> pb::HeartbeatResponse {
        *self.directives.borrow()
    }

    /// The evaluation the coordinator asks for, as (epoch, part), unless this worker already
    /// saw it complete.
    fn asked_evaluation(&self) -> Option<(u32, u32)> {
        asked_evaluation(&self.directives(), self.validated)
    }

    /// Heartbeats now, for fresh directives.
    async fn refresh(&self) -> Result<(), TrainError> {
        let d = self.link.heartbeat().await?;
        self.directives.send_replace(d);
        Ok(())
    }

    /// Loads safetensors bytes of averaged tensors (`what` names them in errors) into the model.
    async fn load(&self, what: String, bytes: &[u8]) -> Result<(), TrainError> {
        let file = tensor_file::from_bytes(Path::new(&what), bytes)?;
        if let (Some(theirs), Some(ours)) =
            (file.metadata.get("variant"), self.metadata.get("variant"))
        {
            if theirs != ours {
                return Err(TrainError::VariantMismatch {
                    what,
                    theirs: theirs.clone(),
                    ours: ours.clone(),
                });
            }
        }
        self.model()
            .call(move |st| st.load_tensors(&what, &file.tensors))
            .await??;
        Ok(())
    }

    /// Downloads checkpoint `id` of the run and loads it into the model.
    async fn load_checkpoint(&mut self, id: &str) -> Result<(), TrainError> {
        let (info, bytes) = self
            .link
            .client
            .get_checkpoint(&self.link.run_id, Some(id))
            .await?;
        self.load(
            format!(
                "checkpoint {} of run {}",
                info.checkpoint_id, self.link.run_id
            ),
            &bytes,
        )
        .await?;
        info!(checkpoint = %info.checkpoint_id, round = info.sync_round, epoch = info.epoch, "loaded the run's average");
        self.loaded_round = Some(info.sync_round);
        Ok(())
    }

    /// Joins the sync round the directives show, if this worker has not sent for it yet:
    /// sends the parameters, waits for the round's average and loads it.
    async fn join_round(&mut self) -> Result<(), TrainError> {
        let round = self.directives().sync_round;
        if round == 0 || round <= self.synced_round {
            return Ok(());
        }
        let started = Instant::now();
        let (names, metadata) = (self.sync_names.clone(), self.metadata.clone());
        let bytes: bytes::Bytes = self
            .model()
            .call(move |st| st.tensors_bytes(&names, &metadata))
            .await??
            .into();
        let samples = self.samples;
        info!(
            round,
            samples,
            bytes = bytes.len(),
            "sync round: sending parameters"
        );
        let result = self
            .link
            .call(|l| {
                let bytes = bytes.clone();
                async move {
                    l.client
                        .sync_parameters(&l.run_id, &l.worker_id, round, samples, bytes)
                        .await
                }
            })
            .await;
        match result {
            Ok(average) => {
                self.load(format!("the average of sync round {round}"), &average)
                    .await?;
                self.samples = 0;
                self.synced_round = round;
                self.loaded_round = Some(round);
                info!(
                    round,
                    secs = format!("{:.2}", started.elapsed().as_secs_f64()),
                    "sync round: average loaded"
                );
            }
            // Not (or no longer) expected in the round, or it failed and must be sent again:
            // the next directives tell which.
            Err(e) if e.code() == Some(Code::FailedPrecondition) => {
                warn!(round, error = %e, "sync round not joined");
            }
            Err(e) => return Err(e.into()),
        }
        self.refresh().await
    }
}

impl Coordination for Coordinated {
    async fn started(
        &mut self,
        model: &Arc<Worker<TrainState>>,
        policies: &[Policy],
    ) -> Result<(), TrainError> {
        self.model = Some(model.clone());
        let policies = policies.to_vec();
        let (names, variant, num_classes) = model
            .call(move |st| {
                (
                    st.sync_names(&policies),
                    st.model().config().variant,
                    st.options().num_classes,
                )
            })
            .await?;
        if u32::try_from(num_classes).ok() != Some(self.config.num_classes) {
            return Err(TrainError::Usage(format!(
                "the model has {num_classes} classes, run {} {}",
                self.link.run_id, self.config.num_classes
            )));
        }
        self.sync_names = names;
        // What makes the average usable on its own (the coordinator copies these keys).
        self.metadata = HashMap::from([
            ("variant".to_owned(), variant.to_string()),
            ("num_classes".to_owned(), num_classes.to_string()),
            ("img_size".to_owned(), self.config.img_size.to_string()),
        ]);
        let checkpoint = self.registration.checkpoint_id.clone();
        if !checkpoint.is_empty() {
            // The run is under way: start from its latest average. Rounds go on while this
            // worker loads its weights, and the coordinator keeps only the latest average (and
            // the best), so the one named at registration may be gone by now: then the newest.
            match self.load_checkpoint(&checkpoint).await {
                Err(TrainError::Coordinator(e)) if e.is_not_found() => {
                    let latest = self.run_status().await?.latest_checkpoint_id;
                    info!(gone = %checkpoint, latest = %latest, "the average named at registration was replaced: loading the newest");
                    self.load_checkpoint(&latest).await?;
                }
                loaded => loaded?,
            }
        }
        Ok(())
    }

    async fn stage_done(
        &mut self,
        progress: &EpochProgress,
        idle: bool,
    ) -> Result<bool, TrainError> {
        if idle {
            // Waiting at an epoch's end (or for batches): learn of the epoch-end round, the
            // evaluation and the next epoch within a poll, not a heartbeat interval.
            self.refresh().await?;
        }
        self.join_round().await?;
        let d = self.directives();
        if d.run_state == pb::RunState::Failed as i32 {
            return Err(TrainError::RunFailed {
                run_id: self.link.run_id.clone(),
            });
        }
        Ok(stage_over(&d, self.validated, progress))
    }

    /// Others share the queues: the coordinator says when a stage is over.
    fn alone(&self) -> bool {
        false
    }

    async fn interim_evaluation(&mut self, epoch: u32) -> Result<Option<u32>, TrainError> {
        Ok(interim_part(&self.directives(), self.validated, epoch))
    }

    async fn step_done(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        self.samples += m.images as u64;
        // The model has moved on from the average it loaded.
        self.loaded_round = None;
        self.seq += 1;
        let (seq, step) = (self.seq, pb::StepMetrics::from(m));
        let response = self
            .link
            .call(|l| async move {
                l.client
                    .report_steps(&l.run_id, &l.worker_id, seq, vec![step])
                    .await
            })
            .await?;
        if let Some(d) = response.directives {
            self.directives.send_replace(d);
        }
        Ok(())
    }

    /// Makes sure the model is the average the evaluation is of: a worker that was not in its
    /// round (e.g. one that joined during it), or that trained a step after it, downloads it.
    async fn before_validation(&mut self, epoch: u32, part: u32) -> Result<(), TrainError> {
        if self.asked_evaluation() != Some((epoch, part)) {
            return Ok(());
        }
        let status = self.run_status().await?;
        let Some(id) = status
            .epochs
            .get(epoch as usize)
            .and_then(|e| match part {
                0 => Some(e.checkpoint_id.clone()),
                p => e
                    .interim
                    .iter()
                    .find(|i| i.part == p)
                    .map(|i| i.checkpoint_id.clone()),
            })
            .filter(|id| !id.is_empty())
        else {
            return Ok(());
        };
        let checkpoints = self.link.client.list_checkpoints(&self.link.run_id).await?;
        let round = checkpoints
            .iter()
            .find(|c| c.checkpoint_id == id)
            .map(|c| c.sync_round);
        if round.is_none() || round != self.loaded_round {
            self.load_checkpoint(&id).await?;
            // What it trained since the round is gone with the reload.
            self.samples = 0;
        }
        Ok(())
    }

    async fn should_validate(&mut self, epoch: u32) -> Result<bool, TrainError> {
        Ok(self.asked_evaluation() == Some((epoch, 0)))
    }

    async fn batch_evaluated(&mut self, c: &BatchEval) -> Result<(), TrainError> {
        let batch = pb::BatchEvaluation::from(c);
        let (epoch, part) = (c.epoch, c.eval_part);
        let response = self
            .link
            .call(|l| async move {
                l.client
                    .report_evaluation(&l.run_id, &l.worker_id, epoch, part, vec![batch])
                    .await
            })
            .await?;
        if response.evaluation_complete {
            info!(epoch, part, "evaluation complete at the coordinator");
            self.validated = self.validated.max(Some(eval_order(epoch, part)));
        }
        Ok(())
    }

    async fn validation_done(&mut self, m: &EvalMetrics) -> Result<(), TrainError> {
        info!(
            epoch = m.epoch,
            images = m.images,
            "this worker's share of the validation is reported"
        );
        Ok(())
    }
}
