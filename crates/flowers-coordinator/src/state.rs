//! The coordinator's state machine: runs, workers, epoch accounting, sync rounds
//! and checkpoints. Pure and synchronous (time comes in as arguments), so that it
//! is unit-testable without gRPC; [`crate::Coordinator`] drives it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowers_proto::v1 as pb;
use flowers_proto::{interim_evaluation_after, run_id};
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};
use crate::tensors::{check_schema, TensorSpec};

/// Behaviour that is the coordinator's, not a run's.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Open a sync round when a worker has trained this many steps since its last sync (0: only at epoch ends).
    pub sync_every: u32,
    /// A worker silent for this long is marked lost.
    pub worker_timeout: Duration,
}

/// Most training-curve points kept per run; older ones are merged pairwise.
const MAX_HISTORY: usize = 4096;

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Ids become file and queue names: run and worker ids follow the one run id rule.
pub(crate) fn check_id(kind: &str, id: &str) -> Result<()> {
    if run_id::is_valid(id) {
        Ok(())
    } else {
        Err(CoordinatorError::Invalid(format!(
            "{kind} id {id:?} must be {}",
            run_id::RULE
        )))
    }
}

/// The run's configuration as the loader registered it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub dataset: String,
    pub split: String,
    pub img_size: u32,
    pub batch_size: u32,
    pub epochs: u32,
    pub train_batches_per_epoch: u32,
    pub val_batches_per_epoch: u32,
    pub seed: u64,
    pub num_classes: u32,
    pub train_images: u32,
    pub val_images: u32,
    /// Evaluations per epoch: parts 1..n-1 after p/n of its training, then its end.
    pub evaluations_per_epoch: u32,
}

impl From<&pb::RunConfig> for RunSpec {
    fn from(c: &pb::RunConfig) -> Self {
        Self {
            dataset: c.dataset.clone(),
            split: c.split.clone(),
            img_size: c.img_size,
            batch_size: c.batch_size,
            epochs: c.epochs,
            train_batches_per_epoch: c.train_batches_per_epoch,
            val_batches_per_epoch: c.val_batches_per_epoch,
            seed: c.seed,
            num_classes: c.num_classes,
            train_images: c.train_images,
            val_images: c.val_images,
            // proto3's default 0 means the epoch end only.
            evaluations_per_epoch: c.evaluations_per_epoch.max(1),
        }
    }
}

impl From<&RunSpec> for pb::RunConfig {
    fn from(s: &RunSpec) -> Self {
        Self {
            dataset: s.dataset.clone(),
            split: s.split.clone(),
            img_size: s.img_size,
            batch_size: s.batch_size,
            epochs: s.epochs,
            train_batches_per_epoch: s.train_batches_per_epoch,
            val_batches_per_epoch: s.val_batches_per_epoch,
            seed: s.seed,
            num_classes: s.num_classes,
            train_images: s.train_images,
            val_images: s.val_images,
            evaluations_per_epoch: s.evaluations_per_epoch,
        }
    }
}

impl RunSpec {
    fn validate(&self) -> Result<()> {
        let positive = [
            ("epochs", self.epochs),
            ("train_batches_per_epoch", self.train_batches_per_epoch),
            ("val_batches_per_epoch", self.val_batches_per_epoch),
            ("batch_size", self.batch_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(CoordinatorError::Invalid(format!(
                    "run config: {name} must be at least 1"
                )));
            }
        }
        // Bounds the per-epoch batch sets kept in memory and on disk.
        if self.train_batches_per_epoch > 1_000_000
            || self.val_batches_per_epoch > 1_000_000
            || self.epochs > 10_000
        {
            return Err(CoordinatorError::Invalid(
                "run config: too many epochs or batches per epoch".into(),
            ));
        }
        if self.evaluations_per_epoch > self.train_batches_per_epoch {
            return Err(CoordinatorError::Invalid(format!(
                "run config: {} evaluations per epoch, but an epoch has only {} training batches",
                self.evaluations_per_epoch, self.train_batches_per_epoch
            )));
        }
        Ok(())
    }

    /// Where evaluation `part` lives in [`EpochRecord::evaluations`]: interim parts 1..n-1
    /// first, the epoch end (part 0) last.
    fn eval_slot(&self, part: u32) -> Option<usize> {
        let n = self.evaluations_per_epoch;
        match part {
            0 => Some(n as usize - 1),
            p if p < n => Some(p as usize - 1),
            _ => None,
        }
    }

    fn eval_part(&self, slot: usize) -> u32 {
        if slot + 1 == self.evaluations_per_epoch as usize {
            0
        } else {
            slot as u32 + 1
        }
    }

    /// Distinct training batches of an epoch trained before the evaluation in `slot` is due.
    fn eval_after(&self, slot: usize) -> u32 {
        match self.eval_part(slot) {
            0 => self.train_batches_per_epoch,
            part => interim_evaluation_after(
                part,
                self.evaluations_per_epoch,
                self.train_batches_per_epoch,
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Running,
    Finished,
}

/// One evaluation of the validation set: of an averaged checkpoint, by whichever workers
/// took its batches.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Evaluation {
    /// The average of the sync round that opened the evaluation.
    checkpoint: Option<String>,
    validated_batches: BTreeSet<u32>,
    val_images: u64,
    val_correct: u64,
    val_correct_top5: u64,
    val_loss_sum: f64,
    validated: bool,
}

fn ratio(num: f64, den: u64) -> f32 {
    if den == 0 {
        0.0
    } else {
        (num / den as f64) as f32
    }
}

impl Evaluation {
    fn accuracy(&self) -> f32 {
        ratio(self.val_correct as f64, self.val_images)
    }
    fn loss(&self) -> f32 {
        ratio(self.val_loss_sum, self.val_images)
    }
    fn top5_accuracy(&self) -> f32 {
        ratio(self.val_correct_top5 as f64, self.val_images)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct EpochRecord {
    trained_batches: BTreeSet<u32>,
    train_images: u64,
    train_loss_sum: f64,
    train_correct: f64,
    trained: bool,
    /// In order: the interim evaluations (parts 1..n-1), then the epoch end.
    evaluations: Vec<Evaluation>,
}

impl EpochRecord {
    fn new(evaluations_per_epoch: u32) -> Self {
        Self {
            trained_batches: BTreeSet::new(),
            train_images: 0,
            train_loss_sum: 0.0,
            train_correct: 0.0,
            trained: false,
            evaluations: (0..evaluations_per_epoch.max(1))
                .map(|_| Evaluation::default())
                .collect(),
        }
    }

    fn end(&self) -> &Evaluation {
        self.evaluations.last().expect("at least the epoch end")
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkerRecord {
    id: String,
    host: String,
    device: String,
    gpu_name: String,
    lost: bool,
    steps: u64,
    steps_since_sync: u64,
    images_per_s: f32,
    data_wait_fraction: f32,
    last_heartbeat: f64,
    last_seq: u64,
    /// Liveness clock; a restarted coordinator gives every worker a fresh timeout.
    #[serde(skip, default = "Instant::now")]
    last_seen: Instant,
    /// Waiting inside SyncParameters, so silent for a good reason.
    #[serde(skip)]
    in_sync: bool,
}

#[derive(Debug)]
struct Upload {
    bytes: Arc<Vec<u8>>,
    samples: u64,
}

/// An evaluation of the run: epoch, and part (0: the epoch end, p: interim part p).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct EvalPoint {
    epoch: u32,
    part: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Round {
    number: u64,
    /// The evaluation whose model this round makes, if it is an evaluation round.
    evaluation: Option<EvalPoint>,
    epoch: u32,
    participants: BTreeSet<String>,
    /// Uploads live in memory only: after a restart participants send again.
    #[serde(skip)]
    uploads: BTreeMap<String, Upload>,
    #[serde(skip)]
    averaging: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointRecord {
    id: String,
    epoch: u32,
    /// The evaluation that scored it (0: the epoch end).
    eval_part: u32,
    round: u64,
    size_bytes: u64,
    val_accuracy: Option<f32>,
    created_at: f64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct HistoryPoint {
    steps: u64,
    epoch_progress: f32,
    loss: f32,
    accuracy: f32,
}

/// One run, as persisted in `run.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Run {
    id: String,
    spec: RunSpec,
    phase: Phase,
    created_at: f64,
    /// The epoch being trained or validated (== epochs when finished).
    current_epoch: u32,
    steps: u64,
    epochs: Vec<EpochRecord>,
    workers: BTreeMap<String, WorkerRecord>,
    next_worker: u64,
    round: Option<Round>,
    last_round: u64,
    last_round_participants: BTreeSet<String>,
    schema: Option<Vec<TensorSpec>>,
    checkpoints: Vec<CheckpointRecord>,
    latest: Option<String>,
    best: Option<String>,
    history: Vec<HistoryPoint>,
}

/// What an uploader should do after its header was checked.
#[derive(Debug, PartialEq, Eq)]
pub enum UploadPlan {
    /// The round is open and expects this worker: send the tensors.
    Send { schema: Option<Vec<TensorSpec>> },
    /// The round already completed (a retry): its average is this checkpoint.
    Done { checkpoint_id: String },
}

/// A worker's tensors, parsed and with their schema, ready to join a round.
#[derive(Debug)]
pub struct CheckedUpload {
    pub bytes: Arc<Vec<u8>>,
    /// Samples trained since the worker's last sync: its weight in the average.
    pub samples: u64,
    pub schema: Vec<TensorSpec>,
}

/// A round whose uploads are all in, ready to be averaged.
#[derive(Debug)]
pub struct RoundJob {
    pub run_id: String,
    pub round: u64,
    pub epoch: u32,
    pub uploads: Vec<(Arc<Vec<u8>>, u64)>,
    pub workers: Vec<String>,
}

/// The metadata of a checkpoint file the coordinator just wrote.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    pub id: String,
    pub size_bytes: u64,
}

pub(crate) fn checkpoint_id(round: u64) -> String {
    format!("round-{round:06}")
}

/// All runs.
#[derive(Debug)]
pub struct State {
    settings: Settings,
    runs: BTreeMap<String, Run>,
    events: Vec<(String, pb::RunEvent)>,
    dirty: BTreeSet<String>,
}

fn event(e: pb::run_event::Event) -> pb::RunEvent {
    pb::RunEvent { event: Some(e) }
}

impl State {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            runs: BTreeMap::new(),
            events: Vec::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Adds a run loaded from disk (workers get a fresh liveness timeout).
    pub fn restore(&mut self, json: &[u8]) -> std::result::Result<String, serde_json::Error> {
        let run: Run = serde_json::from_slice(json)?;
        let id = run.id.clone();
        self.runs.insert(id.clone(), run);
        Ok(id)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Events produced since the last call, for WatchRun subscribers.
    pub fn take_events(&mut self) -> Vec<(String, pb::RunEvent)> {
        std::mem::take(&mut self.events)
    }

    /// Runs changed since the last call, serialised for saving.
    pub fn take_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|id| {
                let run = self.runs.get(&id)?;
                Some((
                    id,
                    serde_json::to_vec_pretty(run).expect("run state serialises"),
                ))
            })
            .collect()
    }

    /// Every run, serialised (for the final save at shutdown).
    pub fn serialize_all(&self) -> Vec<(String, Vec<u8>)> {
        self.runs
            .iter()
            .map(|(id, run)| {
                (
                    id.clone(),
                    serde_json::to_vec_pretty(run).expect("run state serialises"),
                )
            })
            .collect()
    }

    fn run(&self, run_id: &str) -> Result<&Run> {
        self.runs
            .get(run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_owned()))
    }

    fn run_mut(&mut self, run_id: &str) -> Result<&mut Run> {
        self.dirty.insert(run_id.to_owned());
        self.runs
            .get_mut(run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_owned()))
    }

    pub fn register_run(&mut self, req: &pb::RegisterRunRequest) -> Result<pb::RunStatus> {
        let config = req
            .config
            .as_ref()
            .ok_or_else(|| CoordinatorError::Invalid("RegisterRun needs a config".into()))?;
        let spec = RunSpec::from(config);
        spec.validate()?;
        let id = if req.run_id.is_empty() {
            run_id::random()
        } else {
            check_id("run", &req.run_id)?;
            req.run_id.clone()
        };
        if let Some(existing) = self.runs.get(&id) {
            // Registering the same run again (a loader retry or restart) is fine.
            return if existing.spec == spec {
                Ok(self.status(&id, false)?)
            } else {
                Err(CoordinatorError::RunExists(id))
            };
        }
        let epochs = (0..spec.epochs)
            .map(|_| EpochRecord::new(spec.evaluations_per_epoch))
            .collect();
        let run = Run {
            id: id.clone(),
            spec,
            phase: Phase::Running,
            created_at: unix_now(),
            current_epoch: 0,
            steps: 0,
            epochs,
            workers: BTreeMap::new(),
            next_worker: 1,
            round: None,
            last_round: 0,
            last_round_participants: BTreeSet::new(),
            schema: None,
            checkpoints: Vec::new(),
            latest: None,
            best: None,
            history: Vec::new(),
        };
        tracing::info!(run = %id, "run registered");
        self.runs.insert(id.clone(), run);
        self.dirty.insert(id.clone());
        self.status(&id, false)
    }

    pub fn run_ids(&self) -> Vec<String> {
        self.runs.keys().cloned().collect()
    }

    pub fn status(&self, run_id: &str, include_history: bool) -> Result<pb::RunStatus> {
        let run = self.run(run_id)?;
        Ok(run.status(&self.settings, include_history))
    }

    pub fn register_worker(
        &mut self,
        req: &pb::RegisterWorkerRequest,
        now: Instant,
    ) -> Result<pb::RegisterWorkerResponse> {
        let settings = self.settings.clone();
        let run = self.run_mut(&req.run_id)?;
        let id = if req.worker_id.is_empty() {
            let id = format!("w{}", run.next_worker);
            run.next_worker += 1;
            id
        } else {
            check_id("worker", &req.worker_id)?;
            req.worker_id.clone()
        };
        let worker = run
            .workers
            .entry(id.clone())
            .or_insert_with(|| WorkerRecord {
                id: id.clone(),
                host: String::new(),
                device: String::new(),
                gpu_name: String::new(),
                lost: false,
                steps: 0,
                steps_since_sync: 0,
                images_per_s: 0.0,
                data_wait_fraction: 0.0,
                last_heartbeat: 0.0,
                last_seq: 0,
                last_seen: now,
                in_sync: false,
            });
        worker.host = req.host.clone();
        worker.device = req.device.clone();
        worker.gpu_name = req.gpu_name.clone();
        worker.lost = false;
        worker.last_seen = now;
        worker.last_heartbeat = unix_now();
        // It starts from the latest average, so nothing it trained before counts.
        worker.steps_since_sync = 0;
        let changed = worker.status();
        tracing::info!(run = %req.run_id, worker = %id, host = %req.host, device = %req.device, "worker registered");
        let checkpoint_id = run.latest.clone().unwrap_or_default();
        let status = run.status(&settings, false);
        self.events.push((
            req.run_id.clone(),
            event(pb::run_event::Event::Worker(pb::WorkerChanged {
                worker: Some(changed),
            })),
        ));
        Ok(pb::RegisterWorkerResponse {
            worker_id: id,
            run: Some(status),
            checkpoint_id,
            heartbeat_interval_ms: (settings.worker_timeout.as_millis() / 3).clamp(10, 10_000)
                as u32,
            sync_every: settings.sync_every,
        })
    }

    /// Marks a worker alive (reviving it if it was lost) and returns it.
    fn touch(&mut self, run_id: &str, worker_id: &str, now: Instant) -> Result<()> {
        let run = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_owned()))?;
        let worker =
            run.workers
                .get_mut(worker_id)
                .ok_or_else(|| CoordinatorError::UnknownWorker {
                    run: run_id.to_owned(),
                    worker: worker_id.to_owned(),
                })?;
        worker.last_seen = now;
        worker.last_heartbeat = unix_now();
        if worker.lost {
            // Back after a network blip: it joins the next round, not the open one.
            worker.lost = false;
            tracing::info!(run = run_id, worker = worker_id, "lost worker is back");
            let changed = worker.status();
            self.dirty.insert(run_id.to_owned());
            self.events.push((
                run_id.to_owned(),
                event(pb::run_event::Event::Worker(pb::WorkerChanged {
                    worker: Some(changed),
                })),
            ));
        }
        Ok(())
    }

    pub fn heartbeat(
        &mut self,
        run_id: &str,
        worker_id: &str,
        now: Instant,
    ) -> Result<pb::HeartbeatResponse> {
        self.touch(run_id, worker_id, now)?;
        self.maybe_open_round(run_id);
        Ok(self.run(run_id)?.directives(worker_id))
    }

    pub fn report_steps(
        &mut self,
        req: &pb::ReportStepsRequest,
        now: Instant,
    ) -> Result<pb::ReportStepsResponse> {
        self.touch(&req.run_id, &req.worker_id, now)?;
        let run = self.run_mut(&req.run_id)?;
        let spec = run.spec.clone();
        for s in &req.steps {
            if s.epoch >= spec.epochs || s.batch_index >= spec.train_batches_per_epoch {
                return Err(CoordinatorError::Invalid(format!(
                    "step {} trained batch {} of epoch {}, but the run has {} epochs of {} training batches",
                    s.step, s.batch_index, s.epoch, spec.epochs, spec.train_batches_per_epoch
                )));
            }
        }
        let worker = run.workers.get_mut(&req.worker_id).expect("touched above");
        if req.seq != 0 && req.seq <= worker.last_seq {
            // A retry of a call already counted.
            return Ok(pb::ReportStepsResponse {
                newly_counted: 0,
                directives: Some(run.directives(&req.worker_id)),
            });
        }
        worker.last_seq = req.seq;
        if req.steps.is_empty() {
            return Ok(pb::ReportStepsResponse {
                newly_counted: 0,
                directives: Some(run.directives(&req.worker_id)),
            });
        }
        let n = req.steps.len() as u64;
        worker.steps += n;
        worker.steps_since_sync += n;
        let last = req.steps.last().expect("not empty");
        worker.images_per_s = last.images_per_s;
        let (wait, total): (f32, f32) = req
            .steps
            .iter()
            .fold((0.0, 0.0), |(w, t), s| (w + s.data_wait_s, t + s.step_s));
        worker.data_wait_fraction = if total > 0.0 {
            (wait / total).clamp(0.0, 1.0)
        } else {
            0.0
        };
        run.steps += n;

        let mut newly = 0;
        let (mut loss, mut acc, mut images) = (0.0f64, 0.0f64, 0u64);
        let mut trained_now = Vec::new();
        for s in &req.steps {
            let e = &mut run.epochs[s.epoch as usize];
            let w = s.images as f64;
            e.train_images += s.images as u64;
            e.train_loss_sum += s.loss as f64 * w;
            e.train_correct += s.accuracy as f64 * w;
            (loss, acc, images) = (
                loss + s.loss as f64 * w,
                acc + s.accuracy as f64 * w,
                images + s.images as u64,
            );
            if e.trained_batches.insert(s.batch_index) {
                newly += 1;
                if !e.trained && e.trained_batches.len() as u32 == spec.train_batches_per_epoch {
                    e.trained = true;
                    trained_now.push(s.epoch);
                }
            }
        }
        let epoch = last.epoch;
        let done = run.epochs[epoch as usize].trained_batches.len() as u32;
        let progress = epoch as f32 + done as f32 / spec.train_batches_per_epoch as f32;
        let (mean_loss, mean_acc) = if images > 0 {
            ((loss / images as f64) as f32, (acc / images as f64) as f32)
        } else {
            (last.loss, last.accuracy)
        };
        run.push_history(HistoryPoint {
            steps: run.steps,
            epoch_progress: progress,
            loss: mean_loss,
            accuracy: mean_acc,
        });
        let progress_event = pb::StepProgress {
            epoch,
            train_batches_done: done,
            train_batches_total: spec.train_batches_per_epoch,
            steps: run.steps,
            loss: mean_loss,
            accuracy: mean_acc,
            images_per_s: run.images_per_s(),
        };
        let run_id = req.run_id.clone();
        self.events.push((
            run_id.clone(),
            event(pb::run_event::Event::Steps(progress_event)),
        ));
        for e in trained_now {
            tracing::info!(run = %run_id, epoch = e, "epoch trained");
            self.events.push((
                run_id.clone(),
                event(pb::run_event::Event::EpochTrained(pb::EpochTrained {
                    epoch: e,
                })),
            ));
        }
        self.maybe_open_round(&run_id);
        let run = self.run(&run_id)?;
        Ok(pb::ReportStepsResponse {
            newly_counted: newly,
            directives: Some(run.directives(&req.worker_id)),
        })
    }

    pub fn report_evaluation(
        &mut self,
        req: &pb::ReportEvaluationRequest,
        now: Instant,
    ) -> Result<pb::ReportEvaluationResponse> {
        self.touch(&req.run_id, &req.worker_id, now)?;
        let run = self.run_mut(&req.run_id)?;
        let spec = run.spec.clone();
        if req.epoch >= spec.epochs {
            return Err(CoordinatorError::Invalid(format!(
                "epoch {} out of range: the run has {} epochs",
                req.epoch, spec.epochs
            )));
        }
        let slot = spec.eval_slot(req.part).ok_or_else(|| {
            CoordinatorError::Invalid(format!(
                "evaluation part {} out of range: the run evaluates {} times per epoch",
                req.part, spec.evaluations_per_epoch
            ))
        })?;
        let point = EvalPoint {
            epoch: req.epoch,
            part: req.part,
        };
        if run.epochs[req.epoch as usize].evaluations[slot].validated {
            return Ok(pb::ReportEvaluationResponse {
                newly_counted: 0,
                evaluation_complete: true,
            });
        }
        if run.validating() != Some(point) {
            return Err(CoordinatorError::Precondition(format!(
                "{} is not being validated (its training or its sync round is not complete)",
                point.describe()
            )));
        }
        for b in &req.batches {
            if b.batch_index >= spec.val_batches_per_epoch
                || b.correct > b.images
                || b.correct_top5 > b.images
                || !b.loss_sum.is_finite()
            {
                return Err(CoordinatorError::Invalid(format!(
                    "validation batch {} of {}: index must be below {} and correct counts at most {} images, loss finite",
                    b.batch_index, point.describe(), spec.val_batches_per_epoch, b.images
                )));
            }
        }
        let e = &mut run.epochs[req.epoch as usize].evaluations[slot];
        let mut newly = 0;
        for b in &req.batches {
            if e.validated_batches.insert(b.batch_index) {
                newly += 1;
                e.val_images += b.images as u64;
                e.val_correct += b.correct as u64;
                e.val_correct_top5 += b.correct_top5 as u64;
                e.val_loss_sum += b.loss_sum;
            }
        }
        let complete = e.validated_batches.len() as u32 == spec.val_batches_per_epoch;
        let result = pb::EvaluationResult {
            epoch: req.epoch,
            val_batches_done: e.validated_batches.len() as u32,
            val_batches_total: spec.val_batches_per_epoch,
            complete,
            accuracy: e.accuracy(),
            loss: e.loss(),
            top5_accuracy: e.top5_accuracy(),
            part: req.part,
        };
        let run_id = req.run_id.clone();
        self.events.push((
            run_id.clone(),
            event(pb::run_event::Event::Evaluation(result)),
        ));
        if complete {
            self.evaluation_validated(&run_id, point);
        }
        Ok(pb::ReportEvaluationResponse {
            newly_counted: newly,
            evaluation_complete: complete,
        })
    }

    fn evaluation_validated(&mut self, run_id: &str, point: EvalPoint) {
        let run = self.runs.get_mut(run_id).expect("caller checked");
        let slot = run.spec.eval_slot(point.part).expect("caller checked");
        let e = &mut run.epochs[point.epoch as usize].evaluations[slot];
        e.validated = true;
        let accuracy = e.accuracy();
        let checkpoint = e
            .checkpoint
            .clone()
            .expect("validated evaluations have a checkpoint");
        if let Some(c) = run.checkpoints.iter_mut().find(|c| c.id == checkpoint) {
            c.val_accuracy = Some(accuracy);
        }
        let best_accuracy = run
            .best
            .as_ref()
            .and_then(|b| run.checkpoints.iter().find(|c| &c.id == b))
            .and_then(|c| c.val_accuracy);
        if best_accuracy.is_none_or(|b| accuracy > b) {
            run.best = Some(checkpoint);
        }
        tracing::info!(
            run = run_id,
            epoch = point.epoch,
            part = point.part,
            accuracy,
            "evaluation validated"
        );
        if point.part != 0 {
            // An interim evaluation: training of the epoch goes on.
            self.maybe_open_round(run_id);
            return;
        }
        run.current_epoch = point.epoch + 1;
        if run.current_epoch == run.spec.epochs {
            run.phase = Phase::Finished;
            let best = run.best_status();
            tracing::info!(run = run_id, best = ?best, "run finished");
            self.events.push((
                run_id.to_owned(),
                event(pb::run_event::Event::Finished(pb::RunFinished {
                    state: pb::RunState::Finished as i32,
                    best,
                })),
            ));
        }
    }

    /// Opens a round when one is due and none is open: first the round of the current
    /// epoch's next evaluation once its share of training is done, else a periodic one when a
    /// worker reached sync_every. None while an evaluation is under way (nobody trains).
    fn maybe_open_round(&mut self, run_id: &str) {
        let sync_every = self.settings.sync_every as u64;
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.phase != Phase::Running || run.round.is_some() || run.validating().is_some() {
            return;
        }
        let epoch = run.current_epoch;
        let evaluation = run.due_evaluation();
        let periodic = sync_every > 0
            && run
                .workers
                .values()
                .any(|w| !w.lost && w.steps_since_sync >= sync_every);
        if evaluation.is_none() && !periodic {
            return;
        }
        let participants: BTreeSet<String> = run
            .workers
            .values()
            .filter(|w| !w.lost)
            .map(|w| w.id.clone())
            .collect();
        if participants.is_empty() {
            return;
        }
        let number = run.last_round + 1;
        tracing::info!(
            run = run_id,
            round = number,
            ?evaluation,
            workers = participants.len(),
            "sync round opened"
        );
        run.round = Some(Round {
            number,
            evaluation,
            epoch,
            participants,
            uploads: BTreeMap::new(),
            averaging: false,
        });
        self.dirty.insert(run_id.to_owned());
    }

    /// Checks an upload's header before its tensors are read.
    pub fn plan_upload(&self, run_id: &str, worker_id: &str, round: u64) -> Result<UploadPlan> {
        let run = self.run(run_id)?;
        if !run.workers.contains_key(worker_id) {
            return Err(CoordinatorError::UnknownWorker {
                run: run_id.to_owned(),
                worker: worker_id.to_owned(),
            });
        }
        if round == run.last_round && run.last_round_participants.contains(worker_id) {
            if let Some(latest) = &run.latest {
                return Ok(UploadPlan::Done {
                    checkpoint_id: latest.clone(),
                });
            }
        }
        match &run.round {
            Some(r) if r.number == round && r.participants.contains(worker_id) && !r.averaging => {
                if r.uploads.contains_key(worker_id) {
                    Err(CoordinatorError::Precondition(format!("worker {worker_id} already sent its tensors for round {round}")))
                } else {
                    Ok(UploadPlan::Send { schema: run.schema.clone() })
                }
            }
            Some(r) if r.number == round && !r.participants.contains(worker_id) => Err(CoordinatorError::Precondition(format!(
                "worker {worker_id} is not part of round {round} (it joined or came back after the round opened)"
            ))),
            _ => Err(CoordinatorError::Precondition(format!(
                "round {round} is not open for uploads in run {run_id} (last completed round: {})",
                run.last_round
            ))),
        }
    }

    /// Adds a worker's tensors to the open round, checking them against the run's schema.
    pub fn add_upload(
        &mut self,
        run_id: &str,
        worker_id: &str,
        round: u64,
        upload: CheckedUpload,
        now: Instant,
    ) -> Result<()> {
        if let UploadPlan::Done { .. } = self.plan_upload(run_id, worker_id, round)? {
            return Err(CoordinatorError::Precondition(format!(
                "round {round} already completed"
            )));
        }
        self.touch(run_id, worker_id, now)?;
        let run = self.run_mut(run_id)?;
        match &run.schema {
            Some(expected) => check_schema(expected, &upload.schema)?,
            None => run.schema = Some(upload.schema),
        }
        if let Some(w) = run.workers.get_mut(worker_id) {
            w.in_sync = true;
        }
        let r = run.round.as_mut().expect("plan_upload saw the round open");
        let samples = upload.samples;
        r.uploads.insert(
            worker_id.to_owned(),
            Upload {
                bytes: upload.bytes,
                samples,
            },
        );
        tracing::debug!(
            run = run_id,
            worker = worker_id,
            round,
            samples,
            "upload received"
        );
        Ok(())
    }

    /// The run's open round, if every participant still active has sent its
    /// tensors (lost ones are dropped). A round all of whose participants were
    /// lost before sending anything is cancelled, and reopened when due.
    pub fn take_ready_round(&mut self, run_id: &str) -> Option<RoundJob> {
        let run = self.runs.get_mut(run_id)?;
        let round = run.round.as_mut()?;
        if round.averaging {
            return None;
        }
        let waiting_for = round
            .participants
            .iter()
            .filter(|p| {
                !round.uploads.contains_key(*p) && run.workers.get(*p).is_some_and(|w| !w.lost)
            })
            .count();
        if waiting_for > 0 {
            return None;
        }
        if round.uploads.is_empty() {
            tracing::warn!(
                run = run_id,
                round = round.number,
                "every participant of the round was lost; cancelled"
            );
            run.round = None;
            self.dirty.insert(run_id.to_owned());
            self.maybe_open_round(run_id);
            return None;
        }
        round.averaging = true;
        Some(RoundJob {
            run_id: run_id.to_owned(),
            round: round.number,
            epoch: round.epoch,
            uploads: round
                .uploads
                .values()
                .map(|u| (u.bytes.clone(), u.samples))
                .collect(),
            workers: round.uploads.keys().cloned().collect(),
        })
    }

    /// Averaging or saving failed: the uploads are dropped and the round stays
    /// open, so that participants (whose calls fail) send again.
    pub fn fail_round(&mut self, run_id: &str, round: u64) {
        if let Some(r) = self
            .runs
            .get_mut(run_id)
            .and_then(|run| run.round.as_mut())
            .filter(|r| r.number == round)
        {
            r.uploads.clear();
            r.averaging = false;
        }
    }

    /// Closes a round whose average was saved as `checkpoint`. Returns the
    /// checkpoints no longer kept, whose files the caller deletes.
    pub fn finish_round(
        &mut self,
        run_id: &str,
        round: u64,
        checkpoint: NewCheckpoint,
        now: Instant,
    ) -> Vec<String> {
        let Some(run) = self.runs.get_mut(run_id) else {
            return Vec::new();
        };
        let Some(r) = run.round.take_if(|r| r.number == round) else {
            return Vec::new();
        };
        for id in r.uploads.keys() {
            if let Some(w) = run.workers.get_mut(id) {
                w.steps_since_sync = 0;
                w.in_sync = false;
                w.last_seen = now;
            }
        }
        run.last_round = r.number;
        run.last_round_participants = r.uploads.keys().cloned().collect();
        run.checkpoints.push(CheckpointRecord {
            id: checkpoint.id.clone(),
            epoch: r.epoch,
            eval_part: r.evaluation.map_or(0, |p| p.part),
            round: r.number,
            size_bytes: checkpoint.size_bytes,
            val_accuracy: None,
            created_at: unix_now(),
        });
        run.latest = Some(checkpoint.id.clone());
        tracing::info!(run = run_id, round, workers = r.uploads.len(), checkpoint = %checkpoint.id, "sync round complete");
        if let Some(point) = r.evaluation {
            let slot = run
                .spec
                .eval_slot(point.part)
                .expect("rounds open for valid parts");
            run.epochs[point.epoch as usize].evaluations[slot].checkpoint =
                Some(checkpoint.id.clone());
            let result = pb::EvaluationResult {
                epoch: point.epoch,
                val_batches_done: 0,
                val_batches_total: run.spec.val_batches_per_epoch,
                part: point.part,
                ..Default::default()
            };
            self.events.push((
                run_id.to_owned(),
                event(pb::run_event::Event::Evaluation(result)),
            ));
        }
        self.dirty.insert(run_id.to_owned());
        let removed = self.prune_checkpoints(run_id);
        self.maybe_open_round(run_id);
        removed
    }

    /// Keeps the latest checkpoint, the best one and those of evaluations under way.
    fn prune_checkpoints(&mut self, run_id: &str) -> Vec<String> {
        let Some(run) = self.runs.get_mut(run_id) else {
            return Vec::new();
        };
        let mut keep: BTreeSet<&String> = run.latest.iter().chain(run.best.iter()).collect();
        keep.extend(
            run.epochs
                .iter()
                .flat_map(|e| &e.evaluations)
                .filter(|e| !e.validated)
                .filter_map(|e| e.checkpoint.as_ref()),
        );
        let (kept, removed): (Vec<_>, Vec<_>) = run
            .checkpoints
            .drain(..)
            .partition(|c| keep.contains(&c.id));
        run.checkpoints = kept;
        removed.into_iter().map(|c| c.id).collect()
    }

    /// Marks workers silent for longer than the timeout as lost; returns the runs touched.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let timeout = self.settings.worker_timeout;
        let mut touched = Vec::new();
        for (run_id, run) in &mut self.runs {
            for w in run.workers.values_mut() {
                if !w.lost && !w.in_sync && now.saturating_duration_since(w.last_seen) > timeout {
                    w.lost = true;
                    tracing::warn!(run = %run_id, worker = %w.id, "worker missed its heartbeats: lost");
                    self.events.push((
                        run_id.clone(),
                        event(pb::run_event::Event::Worker(pb::WorkerChanged {
                            worker: Some(w.status()),
                        })),
                    ));
                    touched.push(run_id.clone());
                }
            }
        }
        touched.dedup();
        self.dirty.extend(touched.iter().cloned());
        touched
    }

    pub fn list_checkpoints(&self, run_id: &str) -> Result<Vec<pb::CheckpointInfo>> {
        let run = self.run(run_id)?;
        Ok(run
            .checkpoints
            .iter()
            .map(|c| run.checkpoint_info(c))
            .collect())
    }

    /// A checkpoint's info; an empty id means the best, or the latest when none is validated.
    pub fn checkpoint(&self, run_id: &str, checkpoint_id: &str) -> Result<pb::CheckpointInfo> {
        let run = self.run(run_id)?;
        let id = if checkpoint_id.is_empty() {
            run.best
                .as_ref()
                .or(run.latest.as_ref())
                .ok_or_else(|| CoordinatorError::NoCheckpoint(run_id.to_owned()))?
        } else {
            checkpoint_id
        };
        run.checkpoints
            .iter()
            .find(|c| c.id == id)
            .map(|c| run.checkpoint_info(c))
            .ok_or_else(|| CoordinatorError::UnknownCheckpoint {
                run: run_id.to_owned(),
                checkpoint: id.to_owned(),
            })
    }
}

impl EvalPoint {
    fn describe(&self) -> String {
        match self.part {
            0 => format!("epoch {}", self.epoch),
            p => format!("epoch {} (interim evaluation {p})", self.epoch),
        }
    }
}

impl WorkerRecord {
    fn status(&self) -> pb::WorkerStatus {
        pb::WorkerStatus {
            worker_id: self.id.clone(),
            host: self.host.clone(),
            device: self.device.clone(),
            gpu_name: self.gpu_name.clone(),
            state: if self.lost {
                pb::WorkerState::Lost
            } else {
                pb::WorkerState::Active
            } as i32,
            steps: self.steps,
            images_per_s: self.images_per_s,
            data_wait_fraction: self.data_wait_fraction,
            last_heartbeat: self.last_heartbeat,
        }
    }
}

impl Run {
    fn images_per_s(&self) -> f32 {
        self.workers
            .values()
            .filter(|w| !w.lost)
            .map(|w| w.images_per_s)
            .sum()
    }

    fn push_history(&mut self, point: HistoryPoint) {
        if self.history.len() >= MAX_HISTORY {
            // Halve the resolution rather than drop the start of the curve.
            self.history = self
                .history
                .chunks(2)
                .map(|c| {
                    let (a, b) = (c[0], c[c.len() - 1]);
                    HistoryPoint {
                        steps: b.steps,
                        epoch_progress: b.epoch_progress,
                        loss: (a.loss + b.loss) / 2.0,
                        accuracy: (a.accuracy + b.accuracy) / 2.0,
                    }
                })
                .collect();
        }
        self.history.push(point);
    }

    fn directives(&self, worker_id: &str) -> pb::HeartbeatResponse {
        let state = match self.phase {
            Phase::Running => pb::RunState::Running,
            Phase::Finished => pb::RunState::Finished,
        };
        let sync_round = match &self.round {
            Some(r)
                if r.participants.contains(worker_id)
                    && !r.uploads.contains_key(worker_id)
                    && !r.averaging =>
            {
                r.number
            }
            _ => 0,
        };
        let validating = self.validating();
        pb::HeartbeatResponse {
            run_state: state as i32,
            sync_round,
            evaluate_epoch_plus_one: validating.map_or(0, |p| p.epoch + 1),
            current_epoch: self.current_epoch,
            evaluate_part: validating.map_or(0, |p| p.part),
        }
    }

    /// The current epoch's first evaluation not validated yet, by slot.
    fn next_evaluation(&self) -> Option<(usize, &Evaluation)> {
        let e = self.epochs.get(self.current_epoch as usize)?;
        e.evaluations.iter().enumerate().find(|(_, v)| !v.validated)
    }

    /// The evaluation under way: its round completed, its batches not all counted.
    fn validating(&self) -> Option<EvalPoint> {
        let (slot, v) = self.next_evaluation()?;
        v.checkpoint.is_some().then(|| EvalPoint {
            epoch: self.current_epoch,
            part: self.spec.eval_part(slot),
        })
    }

    /// The evaluation whose round is due: its share of the epoch is trained.
    fn due_evaluation(&self) -> Option<EvalPoint> {
        let (slot, v) = self.next_evaluation()?;
        let trained = self.epochs[self.current_epoch as usize]
            .trained_batches
            .len() as u32;
        (v.checkpoint.is_none() && trained >= self.spec.eval_after(slot)).then(|| EvalPoint {
            epoch: self.current_epoch,
            part: self.spec.eval_part(slot),
        })
    }

    fn best_status(&self) -> Option<pb::BestCheckpoint> {
        let best = self.best.as_ref()?;
        let c = self.checkpoints.iter().find(|c| &c.id == best)?;
        Some(pb::BestCheckpoint {
            checkpoint_id: c.id.clone(),
            epoch: c.epoch,
            val_accuracy: c.val_accuracy.unwrap_or(0.0),
            path: format!("runs/{}/checkpoints/{}.safetensors", self.id, c.id),
            eval_part: c.eval_part,
        })
    }

    fn checkpoint_info(&self, c: &CheckpointRecord) -> pb::CheckpointInfo {
        pb::CheckpointInfo {
            checkpoint_id: c.id.clone(),
            run_id: self.id.clone(),
            epoch: c.epoch,
            sync_round: c.round,
            size_bytes: c.size_bytes,
            val_accuracy: c.val_accuracy.unwrap_or(0.0),
            best: self.best.as_ref() == Some(&c.id),
            created_at: c.created_at,
            eval_part: c.eval_part,
        }
    }

    fn status(&self, settings: &Settings, include_history: bool) -> pb::RunStatus {
        let spec = &self.spec;
        let epochs = self
            .epochs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let end = e.end();
                let interim = e.evaluations[..e.evaluations.len() - 1]
                    .iter()
                    .enumerate()
                    .map(|(slot, v)| pb::InterimEvaluation {
                        part: spec.eval_part(slot),
                        after_train_batches: spec.eval_after(slot),
                        val_batches_done: v.validated_batches.len() as u32,
                        validated: v.validated,
                        val_loss: v.loss(),
                        val_accuracy: v.accuracy(),
                        val_top5_accuracy: v.top5_accuracy(),
                        checkpoint_id: v.checkpoint.clone().unwrap_or_default(),
                    })
                    .collect();
                pb::EpochStatus {
                    epoch: i as u32,
                    train_batches_done: e.trained_batches.len() as u32,
                    train_batches_total: spec.train_batches_per_epoch,
                    val_batches_done: end.validated_batches.len() as u32,
                    val_batches_total: spec.val_batches_per_epoch,
                    trained: e.trained,
                    validated: end.validated,
                    train_loss: ratio(e.train_loss_sum, e.train_images),
                    train_accuracy: ratio(e.train_correct, e.train_images),
                    val_loss: end.loss(),
                    val_accuracy: end.accuracy(),
                    val_top5_accuracy: end.top5_accuracy(),
                    checkpoint_id: end.checkpoint.clone().unwrap_or_default(),
                    interim,
                }
            })
            .collect();
        let history = if include_history {
            self.history
                .iter()
                .map(|p| pb::TrainPoint {
                    steps: p.steps,
                    epoch_progress: p.epoch_progress,
                    loss: p.loss,
                    accuracy: p.accuracy,
                })
                .collect()
        } else {
            Vec::new()
        };
        let validating = self.validating();
        pb::RunStatus {
            run_id: self.id.clone(),
            config: Some(pb::RunConfig::from(spec)),
            state: match self.phase {
                Phase::Running => pb::RunState::Running,
                Phase::Finished => pb::RunState::Finished,
            } as i32,
            current_epoch: self.current_epoch,
            steps: self.steps,
            images_per_s: self.images_per_s(),
            epochs,
            workers: self.workers.values().map(WorkerRecord::status).collect(),
            best: self.best_status(),
            sync_round: self.round.as_ref().map_or(self.last_round, |r| r.number),
            created_at: self.created_at,
            history,
            sync_every: settings.sync_every,
            latest_checkpoint_id: self.latest.clone().unwrap_or_default(),
            validating_epoch_plus_one: validating.map_or(0, |p| p.epoch + 1),
            validating_part: validating.map_or(0, |p| p.part),
        }
    }
}
