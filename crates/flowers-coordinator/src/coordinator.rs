//! The coordinator proper ([`Coordinator`], configured by [`CoordinatorConfig`]): drives the
//! [`State`] machine, saves it, averages rounds off the async threads, and fans events out to
//! watchers. It is where the clocks are read and run ids drawn, for the state machine to take
//! as arguments; it knows nothing of gRPC (that is `service.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowers_proto::{checkpoint_format, run_id, v1 as pb};
use flowers_shutdown::requested;
use tokio::sync::{broadcast, watch};

use crate::error::{CoordinatorError, Result};
use crate::state::{
    checkpoint_id, CheckedUpload, NewCheckpoint, Now, RoundJob, Settings, State, StatusDetail,
    UploadPlan,
};
use crate::store::Store;
use crate::tensors::{model_metadata, schema_of, weighted_average};

/// How the coordinator behaves.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    pub sync_every: u32,
    pub worker_timeout: Duration,
    /// Largest parameter upload accepted (bytes).
    pub max_upload_bytes: u64,
}

impl CoordinatorConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            sync_every: 100,
            worker_timeout: Duration::from_secs(30),
            max_upload_bytes: 2 << 30,
        }
    }
}

/// A run's newest checkpoint id and bytes.
type LatestAverage = (String, Arc<Vec<u8>>);

/// The result of one round, as waiting uploaders see it.
#[derive(Clone, Debug)]
struct RoundOutcome {
    round: u64,
    result: std::result::Result<Arc<Vec<u8>>, String>,
}

struct Inner {
    config: CoordinatorConfig,
    store: Store,
    state: Mutex<State>,
    events: broadcast::Sender<(String, pb::RunEvent)>,
    rounds: Mutex<HashMap<String, watch::Sender<Option<RoundOutcome>>>>,
    /// The newest average of each run, kept in memory for retried uploads.
    latest: Mutex<HashMap<String, LatestAverage>>,
    /// Serialises saves; remembers what each run file last got so that an older
    /// snapshot never overwrites a newer one.
    saved: tokio::sync::Mutex<HashMap<String, Vec<u8>>>,
    shutdown: watch::Sender<bool>,
}

/// A cheaply cloneable handle on the coordinator.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// The clocks, read once per change: the state machine takes time as an argument.
fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Coordinator {
    /// Opens the state directory and resumes every run saved there.
    pub fn open(config: CoordinatorConfig) -> Result<Self> {
        if config.worker_timeout.is_zero() {
            return Err(CoordinatorError::Invalid(
                "worker timeout must be positive".into(),
            ));
        }
        let store = Store::open(&config.state_dir)?;
        let mut state = State::new(Settings {
            sync_every: config.sync_every,
            worker_timeout: config.worker_timeout,
        });
        let opened = now();
        for (path, bytes) in store.load_run_files()? {
            let id = state
                .restore(&bytes, opened)
                .map_err(|source| CoordinatorError::CorruptState { path, source })?;
            tracing::info!(run = %id, "resumed run");
        }
        let (events, _) = broadcast::channel(4096);
        let (shutdown, _) = watch::channel(false);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                state: Mutex::new(state),
                events,
                rounds: Mutex::new(HashMap::new()),
                latest: Mutex::new(HashMap::new()),
                saved: tokio::sync::Mutex::new(HashMap::new()),
                shutdown,
            }),
        })
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// Runs `f` on the state, then publishes its events and saves what changed.
    async fn with_state<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let (out, events, dirty) = {
            let mut state = lock(&self.inner.state);
            let out = f(&mut state);
            (out, state.take_events(), state.take_dirty())
        };
        for e in events {
            // No subscriber is fine.
            let _ = self.inner.events.send(e);
        }
        self.save(dirty).await?;
        out
    }

    async fn save(&self, runs: Vec<(String, Vec<u8>)>) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut saved = self.inner.saved.lock().await;
        for (id, json) in runs {
            if saved.get(&id) == Some(&json) {
                continue;
            }
            let (store, run_id, bytes) = (self.inner.store.clone(), id.clone(), json.clone());
            tokio::task::spawn_blocking(move || store.save_run(&run_id, &bytes))
                .await
                .expect("save task")?;
            saved.insert(id, json);
        }
        Ok(())
    }

    /// Saves every run (at shutdown).
    pub async fn save_all(&self) -> Result<()> {
        let all = lock(&self.inner.state).serialize_all();
        self.save(all).await
    }

    /// Registers a run under the id the loader gave, or under a fresh random one.
    pub async fn register_run(&self, req: &pb::RegisterRunRequest) -> Result<pb::RunStatus> {
        let id = if req.run_id.is_empty() {
            run_id::random()
        } else {
            req.run_id.clone()
        };
        self.with_state(|s| s.register_run(req.config.as_ref(), &id, now()))
            .await
    }

    pub fn run_status(&self, run_id: &str, detail: StatusDetail) -> Result<pb::RunStatus> {
        lock(&self.inner.state).status(run_id, detail)
    }

    pub fn list_runs(&self) -> Vec<pb::RunStatus> {
        let state = lock(&self.inner.state);
        state
            .run_ids()
            .iter()
            .filter_map(|id| state.status(id, StatusDetail::default()).ok())
            .collect()
    }

    /// A snapshot of the run plus a receiver of every later event (of all runs:
    /// the caller filters by run id).
    pub fn watch(
        &self,
        run_id: &str,
    ) -> Result<(pb::RunStatus, broadcast::Receiver<(String, pb::RunEvent)>)> {
        // Subscribing under the lock means no event falls between snapshot and stream.
        let state = lock(&self.inner.state);
        let rx = self.inner.events.subscribe();
        Ok((state.status(run_id, StatusDetail::default())?, rx))
    }

    pub async fn register_worker(
        &self,
        req: &pb::RegisterWorkerRequest,
    ) -> Result<pb::RegisterWorkerResponse> {
        self.with_state(|s| s.register_worker(req, now())).await
    }

    pub async fn heartbeat(&self, req: &pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        self.with_state(|s| s.heartbeat(&req.run_id, &req.worker_id, now()))
            .await
    }

    pub async fn report_steps(
        &self,
        req: &pb::ReportStepsRequest,
    ) -> Result<pb::ReportStepsResponse> {
        self.with_state(|s| s.report_steps(req, now())).await
    }

    pub async fn report_evaluation(
        &self,
        req: &pb::ReportEvaluationRequest,
    ) -> Result<pb::ReportEvaluationResponse> {
        self.with_state(|s| s.report_evaluation(req, now())).await
    }

    /// Checks a sync header before the tensors are read.
    pub fn plan_upload(&self, header: &pb::SyncHeader) -> Result<UploadPlan> {
        if header.total_bytes > self.inner.config.max_upload_bytes {
            return Err(CoordinatorError::Invalid(format!(
                "upload of {} bytes exceeds the limit of {} bytes",
                header.total_bytes, self.inner.config.max_upload_bytes
            )));
        }
        lock(&self.inner.state).plan_upload(&header.run_id, &header.worker_id, header.round)
    }

    /// The average of a completed round: the latest checkpoint's bytes.
    pub async fn completed_round(&self, run_id: &str, checkpoint_id: &str) -> Result<Arc<Vec<u8>>> {
        if let Some((id, bytes)) = lock(&self.inner.latest).get(run_id) {
            if id == checkpoint_id {
                return Ok(bytes.clone());
            }
        }
        let path = self.inner.store.checkpoint_file(run_id, checkpoint_id);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| CoordinatorError::io("reading checkpoint", path, e))?;
        Ok(Arc::new(bytes))
    }

    /// Adds a worker's tensors to the open round and waits until the round's
    /// average is ready; returns it.
    pub async fn sync(&self, header: &pb::SyncHeader, bytes: Vec<u8>) -> Result<Arc<Vec<u8>>> {
        if bytes.len() as u64 != header.total_bytes {
            return Err(CoordinatorError::Invalid(format!(
                "the header announced {} bytes but {} arrived",
                header.total_bytes,
                bytes.len()
            )));
        }
        let bytes = Arc::new(bytes);
        let shared = bytes.clone();
        let schema = tokio::task::spawn_blocking(move || schema_of(&shared))
            .await
            .expect("schema task")?;
        let mut done = lock(&self.inner.rounds)
            .entry(header.run_id.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        let mut shutdown = self.inner.shutdown.subscribe();
        self.with_state(|s| {
            s.add_upload(
                &header.run_id,
                &header.worker_id,
                header.round,
                CheckedUpload {
                    bytes,
                    samples: header.samples,
                    schema,
                },
                now(),
            )
        })
        .await?;
        self.drive_round(&header.run_id);
        loop {
            if let Some(outcome) = done
                .borrow_and_update()
                .as_ref()
                .filter(|o| o.round >= header.round)
            {
                return match (&outcome.result, outcome.round == header.round) {
                    (Ok(bytes), true) => Ok(bytes.clone()),
                    (Err(e), true) => Err(CoordinatorError::Precondition(format!(
                        "round {} failed: {e}; send again",
                        header.round
                    ))),
                    (_, false) => Err(CoordinatorError::Precondition(format!(
                        "round {} was superseded",
                        header.round
                    ))),
                };
            }
            tokio::select! {
                changed = done.changed() => if changed.is_err() { return Err(CoordinatorError::ShuttingDown) },
                _ = requested(&mut shutdown) => return Err(CoordinatorError::ShuttingDown),
            }
        }
    }

    /// Starts averaging the run's open round if all its uploads are in.
    fn drive_round(&self, run_id: &str) {
        let job = lock(&self.inner.state).take_ready_round(run_id);
        if let Some(job) = job {
            let this = self.clone();
            tokio::spawn(async move { this.complete_round(job).await });
        }
    }

    async fn complete_round(&self, job: RoundJob) {
        let (run_id, round) = (job.run_id.clone(), job.round);
        let id = checkpoint_id(round);
        let (store, saved_as) = (self.inner.store.clone(), id.clone());
        let mut metadata = job
            .uploads
            .first()
            .map(|(bytes, _)| model_metadata(bytes))
            .unwrap_or_default();
        metadata.extend([
            ("format".to_owned(), checkpoint_format::AVERAGE.to_owned()),
            ("run_id".to_owned(), run_id.clone()),
            ("round".to_owned(), round.to_string()),
            ("epoch".to_owned(), job.epoch.to_string()),
            ("workers".to_owned(), job.workers.join(",")),
            (
                "samples".to_owned(),
                job.uploads.iter().map(|(_, s)| s).sum::<u64>().to_string(),
            ),
        ]);
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let uploads: Vec<(&[u8], u64)> = job
                .uploads
                .iter()
                .map(|(b, s)| (b.as_slice(), *s))
                .collect();
            let average = weighted_average(&uploads, metadata)?;
            store.save_checkpoint(&job.run_id, &saved_as, &average)?;
            Ok(average)
        })
        .await
        .expect("averaging task");
        let outcome = match work {
            Ok(average) => {
                let average = Arc::new(average);
                lock(&self.inner.latest).insert(run_id.clone(), (id.clone(), average.clone()));
                let checkpoint = NewCheckpoint {
                    id: id.clone(),
                    size_bytes: average.len() as u64,
                };
                let removed = self
                    .with_state(|s| Ok(s.finish_round(&run_id, round, checkpoint, now())))
                    .await;
                match removed {
                    Ok(removed) => {
                        for old in removed {
                            self.inner
                                .store
                                .remove(&self.inner.store.checkpoint_file(&run_id, &old));
                        }
                        Ok(average)
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => {
                tracing::error!(run = %run_id, round, error = %e, "sync round failed");
                lock(&self.inner.state).fail_round(&run_id, round);
                Err(e.to_string())
            }
        };
        if let Some(tx) = lock(&self.inner.rounds).get(&run_id) {
            tx.send_replace(Some(RoundOutcome {
                round,
                result: outcome,
            }));
        }
    }

    /// Marks silent workers lost and completes the rounds that were waiting only on them.
    pub async fn sweep(&self) -> Result<()> {
        let touched = self.with_state(|s| Ok(s.sweep(now()))).await?;
        for run in touched {
            self.drive_round(&run);
        }
        Ok(())
    }

    /// Marks lost workers every quarter of the worker timeout until shutdown.
    pub async fn run_sweeper(&self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut tick = tokio::time::interval(self.inner.config.worker_timeout / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => if let Err(e) = self.sweep().await {
                    tracing::error!(error = %e, "saving state after marking lost workers");
                },
                _ = requested(&mut shutdown) => return,
            }
        }
    }

    pub fn list_checkpoints(&self, run_id: &str) -> Result<Vec<pb::CheckpointInfo>> {
        lock(&self.inner.state).list_checkpoints(run_id)
    }

    /// A checkpoint's info and file.
    pub fn checkpoint(
        &self,
        run_id: &str,
        checkpoint_id: &str,
    ) -> Result<(pb::CheckpointInfo, PathBuf)> {
        let info = lock(&self.inner.state).checkpoint(run_id, checkpoint_id)?;
        let path = self
            .inner
            .store
            .checkpoint_file(run_id, &info.checkpoint_id);
        Ok((info, path))
    }

    /// Tells waiters (held SyncParameters calls, watchers, the sweeper) to stop.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }
}
