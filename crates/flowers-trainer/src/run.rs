//! The consuming loop of `trainer run`: per epoch E, train on `train.E`, then validate on
//! `val.E`, then E+1; a coordinator may also ask for interim evaluations on `val.E.p` in the
//! middle of an epoch's training. A batch is acked only after the step (or evaluation) that
//! used it, so a trainer that dies loses no batch: the broker redelivers whatever was unacked.
//!
//! Where the loop needs a decision that a coordinator would make (is this stage over, sync
//! before validation, who validates, where metrics go), it asks a [`Coordination`];
//! [`Standalone`] makes them alone.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flowers_broker::{
    connect_with_backoff, declare_run_topology, eval_queue, message_count, purge_queue,
    train_queue, val_queue, validate_run_id, Backoff, Connection, Consumer, Delivery, RunLayout,
};
use flowers_model::Policy;
use flowers_wire::{describe, Batch, Dims, Split};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::metrics::{BatchEval, EvalMetrics, EvalTally, StepMetrics};
use crate::recipe::Hyper;
use crate::shutdown;
use crate::state::{BatchView, ModelOptions, TrainState};
use crate::worker::Worker;
use crate::TrainError;

/// How long one wait for a message lasts before the loop asks again whether the stage is over.
const POLL: Duration = Duration::from_secs(2);
/// How often a trainer waiting for batches says so.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(30);

/// The two stages of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Train,
    Validate,
}

/// Where a trainer stands in an epoch: what it has used of the stage's queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochProgress {
    pub epoch: u32,
    pub stage: Stage,
    /// Batch indices of the stage used (trained or evaluated) and acked.
    pub done: BTreeSet<u32>,
    /// `batches_in_epoch` of the stage, from its messages.
    pub batches_in_epoch: Option<u32>,
    /// Validation counts so far (validate stage only).
    pub tally: Option<EvalTally>,
    /// Validate stage: which evaluation of the epoch (0: its end; p: interim part p).
    #[serde(default)]
    pub eval_part: u32,
}

impl EpochProgress {
    pub fn new(epoch: u32, stage: Stage) -> Self {
        Self {
            epoch,
            stage,
            done: BTreeSet::new(),
            batches_in_epoch: None,
            tally: None,
            eval_part: 0,
        }
    }

    /// The validate stage of interim evaluation `part` of `epoch`.
    pub fn interim(epoch: u32, part: u32) -> Self {
        Self {
            eval_part: part,
            ..Self::new(epoch, Stage::Validate)
        }
    }

    /// Every batch of the stage has been used by this trainer.
    pub fn is_complete(&self) -> bool {
        matches!(self.batches_in_epoch, Some(n) if self.done.len() >= n as usize)
    }

    pub fn queue(&self, run_id: &str) -> String {
        match self.stage {
            Stage::Train => train_queue(run_id, self.epoch),
            Stage::Validate => eval_queue(run_id, self.epoch, self.eval_part),
        }
    }

    fn split(&self) -> Split {
        match self.stage {
            Stage::Train => Split::Train,
            Stage::Validate => Split::Validation,
        }
    }
}

/// What [`Coordination::stage_done`] is asked with.
pub struct StageContext<'a> {
    pub run_id: &'a str,
    pub progress: &'a EpochProgress,
    /// The last epoch of the run.
    pub last_epoch: u32,
    /// No message arrived for a poll interval.
    pub idle: bool,
    /// The trainer's broker connection, e.g. to look at queue lengths.
    pub conn: &'a Connection,
    /// The training thread, e.g. to exchange parameters at this batch boundary.
    pub worker: &'a Worker<TrainState>,
}

/// The decisions a coordinator takes over from a standalone trainer.
pub trait Coordination {
    /// The model is built (and resumed, if asked): e.g. load the run's latest average into it.
    /// `policies` are what the run's phases train, in order.
    fn started(
        &mut self,
        _worker: &Worker<TrainState>,
        _policies: &[Policy],
    ) -> impl Future<Output = Result<(), TrainError>> + Send {
        async { Ok(()) }
    }

    /// Whether the current stage is over for this trainer. Asked at every batch boundary:
    /// before every wait for a message and after every poll interval without one.
    fn stage_done(
        &mut self,
        ctx: StageContext<'_>,
    ) -> impl Future<Output = Result<bool, TrainError>> + Send;

    /// During the training of `epoch`, at a batch boundary: an interim evaluation (its part) to
    /// run before the next step, if one is asked for.
    fn interim_evaluation(
        &mut self,
        _epoch: u32,
    ) -> impl Future<Output = Result<Option<u32>, TrainError>> + Send {
        async { Ok(None) }
    }

    /// Called after every optimizer step, before its batch is acked.
    fn step_done(
        &mut self,
        metrics: &StepMetrics,
    ) -> impl Future<Output = Result<(), TrainError>> + Send;

    /// Before evaluation `part` of `epoch` (0: its end): the sync point, e.g. for averaging the
    /// model across workers (through `worker.call(|state| ..)`).
    fn before_validation(
        &mut self,
        epoch: u32,
        part: u32,
        worker: &Worker<TrainState>,
    ) -> impl Future<Output = Result<(), TrainError>> + Send;

    /// Whether this trainer validates `epoch` at all.
    fn should_validate(
        &mut self,
        epoch: u32,
    ) -> impl Future<Output = Result<bool, TrainError>> + Send;

    /// Called after every validation batch, before it is acked.
    fn batch_evaluated(
        &mut self,
        _counts: &BatchEval,
    ) -> impl Future<Output = Result<(), TrainError>> + Send {
        async { Ok(()) }
    }

    /// A finished evaluation (this trainer's share of it).
    fn validation_done(
        &mut self,
        metrics: &EvalMetrics,
    ) -> impl Future<Output = Result<(), TrainError>> + Send;
}

/// A trainer alone on the run: a stage ends when it has used `batches_in_epoch` distinct batches.
#[derive(Debug, Default)]
pub struct Standalone;

impl Coordination for Standalone {
    async fn stage_done(&mut self, ctx: StageContext<'_>) -> Result<bool, TrainError> {
        let p = ctx.progress;
        if p.is_complete() {
            return Ok(true);
        }
        if !ctx.idle {
            return Ok(false);
        }
        // The loader fills each queue completely before it starts the next one. So once this
        // queue is drained and the next one holds messages, nothing more will come: the missing
        // batches were acked by a trainer that died after its last checkpoint.
        let next = match p.stage {
            Stage::Train => Some(val_queue(ctx.run_id, p.epoch)),
            Stage::Validate if p.epoch < ctx.last_epoch => {
                Some(train_queue(ctx.run_id, p.epoch + 1))
            }
            Stage::Validate => None,
        };
        let Some(next) = next else { return Ok(false) };
        if message_count(ctx.conn, &next).await?.unwrap_or(0) == 0 {
            return Ok(false);
        }
        warn!(
            queue = %p.queue(ctx.run_id),
            used = p.done.len(),
            expected = ?p.batches_in_epoch,
            "queue drained before every batch was seen (the rest were acked by an earlier trainer); moving on"
        );
        Ok(true)
    }

    async fn step_done(&mut self, _: &StepMetrics) -> Result<(), TrainError> {
        Ok(())
    }

    async fn before_validation(
        &mut self,
        _: u32,
        _: u32,
        _: &Worker<TrainState>,
    ) -> Result<(), TrainError> {
        Ok(())
    }

    async fn should_validate(&mut self, _: u32) -> Result<bool, TrainError> {
        Ok(true)
    }

    async fn validation_done(&mut self, _: &EvalMetrics) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Options of `trainer run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub broker_url: String,
    pub run_id: String,
    /// Epochs in the run: queues `train.0` .. `train.<epochs-1>`.
    pub epochs: u32,
    /// Evaluations per epoch (the run's; 1: at its end only), for declaring the run's queues.
    pub evaluations_per_epoch: u32,
    /// First epoch to train; default 0, or where `resume` stopped.
    pub start_epoch: Option<u32>,
    /// Unacked messages the broker may hand this trainer ahead of use.
    pub prefetch: u16,
    /// Pretrained weights (`None`: from scratch).
    pub weights: Option<PathBuf>,
    /// A checkpoint to continue from (overrides `weights`).
    pub resume: Option<PathBuf>,
    /// Where `latest.safetensors` (+ `latest.progress.json`) go after every epoch and at
    /// shutdown; `None`: no checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Expected image size; `None` takes the first batch's.
    pub img_size: Option<u32>,
    /// Largest batch accepted; `None` accepts any.
    pub batch_size: Option<u32>,
    /// Seed of torch's RNG (flips, dropout).
    pub seed: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Every epoch trained (and validated where asked); the last validation, if any.
    Finished(Option<EvalMetrics>),
    /// Stopped by a signal after the batch in hand; a checkpoint was saved if configured.
    Interrupted { epoch: u32, stage: Stage },
}

/// The position saved next to a checkpoint (`<name>.progress.json`).
#[derive(Debug, Serialize, Deserialize)]
struct SavedProgress {
    run_id: String,
    /// The checkpoint's step, to catch a progress file that belongs to another checkpoint.
    step: u64,
    img_size: Option<u32>,
    progress: EpochProgress,
}

fn progress_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("progress.json")
}

fn read_progress(checkpoint: &Path) -> Result<Option<SavedProgress>, TrainError> {
    let path = progress_path(checkpoint);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::io(&path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::File {
            path: path.clone(),
            message: format!("not a trainer progress file: {e}"),
        })
}

enum StageEnd {
    Complete,
    Interrupted,
    /// Training paused for interim evaluation `part` of the epoch.
    Evaluate(u32),
}

/// Sums over the steps of an epoch's training, for its log line.
struct TrainTotals {
    started: Instant,
    images: u64,
    loss_sum: f64,
    correct: u64,
    step_secs: f64,
    wait_secs: f64,
}

impl TrainTotals {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            images: 0,
            loss_sum: 0.0,
            correct: 0,
            step_secs: 0.0,
            wait_secs: 0.0,
        }
    }

    fn add(&mut self, m: &StepMetrics, data_wait: f64) {
        self.images += m.images as u64;
        self.loss_sum += m.loss * m.images as f64;
        self.correct += (m.accuracy * m.images as f64).round() as u64;
        self.step_secs += m.step_secs;
        self.wait_secs += data_wait;
    }

    fn log(&self, progress: &EpochProgress) {
        if self.images == 0 {
            return;
        }
        let n = self.images as f64;
        info!(
            epoch = progress.epoch,
            batches = progress.done.len(),
            images = self.images,
            loss = format!("{:.4}", self.loss_sum / n),
            acc = format!("{:.3}", self.correct as f64 / n),
            images_per_s = format!("{:.1}", n / self.step_secs.max(1e-9)),
            data_wait_s = format!("{:.1}", self.wait_secs),
            wall_s = format!("{:.1}", self.started.elapsed().as_secs_f64()),
            "epoch trained"
        );
    }
}

struct Runner<'a, C> {
    opts: &'a RunOptions,
    hyper: &'a Hyper,
    coord: &'a mut C,
    conn: Connection,
    worker: Worker<TrainState>,
    shutdown: watch::Receiver<bool>,
    num_classes: u32,
    img_size: Option<u32>,
    last_eval: Option<EvalMetrics>,
    train_totals: TrainTotals,
}

/// Trains the run's epochs from the broker until done or shut down (see the module docs).
pub async fn run<C: Coordination>(
    opts: &RunOptions,
    model: ModelOptions,
    hyper: &Hyper,
    coord: &mut C,
    shutdown: watch::Receiver<bool>,
) -> Result<RunOutcome, TrainError> {
    validate_run_id(&opts.run_id)?;
    if opts.epochs == 0 {
        return Err(TrainError::Usage("--epochs must be at least 1".into()));
    }
    let saved = match &opts.resume {
        Some(c) => read_progress(c)?,
        None => None,
    };
    let saved = match saved {
        Some(s) if s.run_id != opts.run_id => {
            warn!(saved_run = %s.run_id, "the checkpoint's progress belongs to another run: ignoring it");
            None
        }
        other => other,
    };
    let num_classes = u32::try_from(model.num_classes)
        .map_err(|_| TrainError::Usage(format!("bad class count {}", model.num_classes)))?;

    // The first phase decides the model's policy; a resumed model switches if it differs.
    let start_hint = opts
        .start_epoch
        .or(saved.as_ref().map(|s| s.progress.epoch))
        .unwrap_or(0);
    let phase = hyper.phase(start_hint, opts.epochs);
    if opts.resume.is_none() && opts.weights.is_none() {
        warn!(
            "no pretrained weights (--weights none): training from scratch, accuracy will be poor"
        );
    }
    let (resume, weights, seed) = (opts.resume.clone(), opts.weights.clone(), opts.seed);
    let worker = Worker::spawn("trainer-torch", move || {
        tch::manual_seed(seed as i64);
        match &resume {
            Some(c) => TrainState::resume(model, phase.backbone_lr_scale, c),
            None => TrainState::new(
                model,
                phase.policy,
                phase.backbone_lr_scale,
                weights.as_deref(),
            ),
        }
    })
    .await?;
    let mut policies: Vec<Policy> = Vec::new();
    for e in 0..opts.epochs {
        let p = hyper.phase(e, opts.epochs).policy;
        if policies.last() != Some(&p) {
            policies.push(p);
        }
    }
    coord.started(&worker, &policies).await?;
    let (step, meta) = worker
        .call(|st| (st.step, st.resumed_from().cloned()))
        .await?;

    let mut progress = match (opts.start_epoch, saved, &meta) {
        (Some(e), _, _) => EpochProgress::new(e, Stage::Train),
        (None, Some(s), _) => {
            if s.step != step {
                let checkpoint = opts
                    .resume
                    .as_deref()
                    .expect("saved progress comes with --resume");
                return Err(TrainError::File {
                    path: progress_path(checkpoint),
                    message: format!(
                        "progress is for step {}, the checkpoint is at step {step}",
                        s.step
                    ),
                });
            }
            s.progress
        }
        (None, None, Some(m)) => EpochProgress::new(m.epoch as u32, Stage::Train),
        (None, None, None) => EpochProgress::new(0, Stage::Train),
    };
    if progress.epoch >= opts.epochs {
        return Err(TrainError::Usage(format!(
            "start epoch {} is not below --epochs {}",
            progress.epoch, opts.epochs
        )));
    }
    let img_size = opts.img_size.or_else(|| {
        meta.as_ref()
            .and_then(|m| u32::try_from(m.img_size).ok())
            .filter(|&s| s > 0)
    });

    let conn = connect_with_backoff(
        &opts.broker_url,
        &format!("flowers trainer {}", opts.run_id),
        &Backoff::default(),
    )
    .await?;
    // Declaring is idempotent and lets a trainer start before the loader.
    let channel = conn.create_channel().await.map_err(|e| {
        TrainError::Data(format!(
            "opening a channel to declare run {}: {e}",
            opts.run_id
        ))
    })?;
    let layout = RunLayout::epochs(opts.epochs).with_evaluations(opts.evaluations_per_epoch);
    declare_run_topology(&channel, &opts.run_id, layout).await?;
    let _ = channel.close(200, "OK".into()).await;
    if opts.checkpoint_dir.is_none() {
        warn!("no --checkpoint-dir: nothing will be saved");
    }
    info!(
        run = %opts.run_id, epoch = progress.epoch, stage = ?progress.stage, epochs = opts.epochs,
        recipe = %hyper.recipe, prefetch = opts.prefetch, step, "trainer started"
    );

    let mut runner = Runner {
        opts,
        hyper,
        coord,
        conn,
        worker,
        shutdown,
        num_classes,
        img_size,
        last_eval: None,
        train_totals: TrainTotals::new(),
    };
    let outcome = match runner.epochs(&mut progress).await {
        Ok(o) => o,
        Err(e) => {
            // Everything acked is in the model: saving keeps the two consistent for --resume.
            if let Err(save) = runner.save(&progress).await {
                error!(error = %save, "could not save a checkpoint after the error");
            }
            return Err(e);
        }
    };
    if let Err(e) = runner.conn.close(200, "OK".into()).await {
        warn!(error = %e, "closing the broker connection");
    }
    Ok(outcome)
}

impl<C: Coordination> Runner<'_, C> {
    async fn epochs(&mut self, progress: &mut EpochProgress) -> Result<RunOutcome, TrainError> {
        while progress.epoch < self.opts.epochs {
            let epoch = progress.epoch;
            let phase = self.hyper.phase(epoch, self.opts.epochs);
            self.worker
                .call(move |st| st.set_phase(phase.policy, phase.backbone_lr_scale))
                .await??;
            if progress.stage == Stage::Train {
                self.train_totals = TrainTotals::new();
                loop {
                    match self.stage(progress).await? {
                        StageEnd::Complete => break,
                        StageEnd::Interrupted => return self.interrupted(progress).await,
                        StageEnd::Evaluate(part) => {
                            // Interrupted here, the training position is what is saved: the
                            // interim evaluation is the coordinator's to finish.
                            let mut interim = EpochProgress::interim(epoch, part);
                            if self.validation(&mut interim).await?.is_none() {
                                return self.interrupted(progress).await;
                            }
                        }
                    }
                }
                self.train_totals.log(progress);
                *progress = EpochProgress::new(epoch, Stage::Validate);
            }
            if self.coord.should_validate(epoch).await? {
                match self.validation(progress).await? {
                    Some(metrics) => self.last_eval = Some(metrics),
                    None => return self.interrupted(progress).await,
                }
            }
            *progress = EpochProgress::new(epoch + 1, Stage::Train);
            self.save(progress).await?;
        }
        Ok(RunOutcome::Finished(self.last_eval.clone()))
    }

    /// Evaluation `progress.eval_part` of `progress.epoch`: the sync point, then the validate
    /// stage. Its figures, or `None` when interrupted.
    async fn validation(
        &mut self,
        progress: &mut EpochProgress,
    ) -> Result<Option<EvalMetrics>, TrainError> {
        let (epoch, part) = (progress.epoch, progress.eval_part);
        if progress.done.is_empty() {
            self.coord
                .before_validation(epoch, part, &self.worker)
                .await?;
        }
        match self.stage(progress).await? {
            StageEnd::Complete => {}
            StageEnd::Interrupted => return Ok(None),
            StageEnd::Evaluate(_) => unreachable!("interim evaluations interrupt training only"),
        }
        let tally = progress
            .tally
            .take()
            .unwrap_or_else(|| EvalTally::new(self.num_classes as usize));
        let metrics = tally.summary(epoch);
        if part == 0 {
            info!(%metrics, "validated");
        } else {
            info!(%metrics, part, "interim evaluation done");
        }
        self.coord.validation_done(&metrics).await?;
        Ok(Some(metrics))
    }

    async fn interrupted(&mut self, progress: &EpochProgress) -> Result<RunOutcome, TrainError> {
        self.save(progress).await?;
        info!(epoch = progress.epoch, stage = ?progress.stage, "stopped on request");
        Ok(RunOutcome::Interrupted {
            epoch: progress.epoch,
            stage: progress.stage,
        })
    }

    /// Writes `latest.safetensors` and its progress file into the checkpoint directory.
    async fn save(&self, progress: &EpochProgress) -> Result<(), TrainError> {
        let Some(dir) = &self.opts.checkpoint_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let path = dir.join("latest.safetensors");
        let (epochs_done, img_size) = (progress.epoch, self.img_size.map_or(0, i64::from));
        let save_path = path.clone();
        let step = self
            .worker
            .call(move |st| st.save(&save_path, epochs_done, img_size).map(|()| st.step))
            .await??;
        let saved = SavedProgress {
            run_id: self.opts.run_id.clone(),
            step,
            img_size: self.img_size,
            progress: progress.clone(),
        };
        let json = serde_json::to_string(&saved).expect("progress serialises");
        let final_path = progress_path(&path);
        let tmp = final_path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| TrainError::io(&tmp, e))?;
        std::fs::rename(&tmp, &final_path).map_err(|e| TrainError::io(&final_path, e))?;
        info!(checkpoint = %path.display(), step, epoch = progress.epoch, stage = ?progress.stage, "checkpoint saved");
        Ok(())
    }

    /// Why `batch` cannot be used at this point of the run, if it cannot.
    fn misfit(&mut self, batch: &Batch, progress: &EpochProgress) -> Option<String> {
        if batch.run_id != self.opts.run_id {
            return Some(format!("it belongs to run {:?}", batch.run_id));
        }
        let eval_part = if progress.stage == Stage::Validate {
            progress.eval_part
        } else {
            0
        };
        if batch.split != progress.split() as i32
            || batch.epoch != progress.epoch
            || batch.eval_part != eval_part
        {
            return Some(format!(
                "the queue {} holds {:?} batches of epoch {} (evaluation part {eval_part}) only",
                progress.queue(&self.opts.run_id),
                progress.split(),
                progress.epoch
            ));
        }
        if batch.num_classes != self.num_classes {
            return Some(format!(
                "it has {} classes, the model {}",
                batch.num_classes, self.num_classes
            ));
        }
        if batch.batch_index >= batch.batches_in_epoch {
            return Some("its batch index is not below batches_in_epoch".into());
        }
        if let Some(n) = progress
            .batches_in_epoch
            .filter(|&n| n != batch.batches_in_epoch)
        {
            return Some(format!(
                "earlier batches of the stage said {n} batches_in_epoch"
            ));
        }
        let dims = Dims::of(batch).ok()?;
        match self.img_size {
            Some(s) if dims.height != s as usize || dims.width != s as usize => {
                return Some(format!(
                    "its images are {}x{}, the run's {s}x{s}",
                    dims.height, dims.width
                ))
            }
            Some(_) => {}
            None if dims.height != dims.width => {
                return Some(format!(
                    "its images are {}x{}, not square",
                    dims.height, dims.width
                ))
            }
            None => self.img_size = Some(dims.height as u32),
        }
        match self.opts.batch_size {
            Some(b) if dims.n > b as usize => Some(format!(
                "it has {} images, more than --batch-size {b}",
                dims.n
            )),
            _ => None,
        }
    }

    /// Consumes the stage's queue until the coordination says the stage is over.
    async fn stage(&mut self, progress: &mut EpochProgress) -> Result<StageEnd, TrainError> {
        let queue = progress.queue(&self.opts.run_id);
        let mut consumer = Consumer::open(&self.conn, &queue, self.opts.prefetch).await?;
        let mut wait_started = Instant::now();
        let mut last_waiting_log = Instant::now();
        let mut idle = false;
        let end = loop {
            let ctx = StageContext {
                run_id: &self.opts.run_id,
                progress,
                last_epoch: self.opts.epochs - 1,
                idle,
                conn: &self.conn,
                worker: &self.worker,
            };
            if self.coord.stage_done(ctx).await? {
                break StageEnd::Complete;
            }
            if progress.stage == Stage::Train {
                if let Some(part) = self.coord.interim_evaluation(progress.epoch).await? {
                    break StageEnd::Evaluate(part);
                }
            }
            let next = tokio::select! {
                biased;
                () = shutdown::requested(&mut self.shutdown) => break StageEnd::Interrupted,
                next = consumer.next(POLL) => next?,
            };
            let Some(mut delivery) = next else {
                idle = true;
                if last_waiting_log.elapsed() >= WAITING_LOG_EVERY {
                    info!(%queue, used = progress.done.len(), expected = ?progress.batches_in_epoch, "waiting for batches");
                    last_waiting_log = Instant::now();
                }
                continue;
            };
            idle = false;
            let data_wait = wait_started.elapsed().as_secs_f64();
            if let Some(reason) = self.misfit(&delivery.batch, progress) {
                error!(%queue, batch = %describe(&delivery.batch), %reason, "unusable batch: dead-lettering it");
                delivery.reject().await?;
                continue;
            }
            let index = delivery.batch.batch_index;
            if progress.done.contains(&index) {
                warn!(%queue, batch = %describe(&delivery.batch), "batch already used (redelivered duplicate): acking it without use");
                delivery.ack().await?;
                continue;
            }
            let batches_in_epoch = delivery.batch.batches_in_epoch;
            match progress.stage {
                Stage::Train => {
                    let metrics = self.train(&mut delivery, progress, data_wait).await?;
                    if let Err(e) = self.coord.step_done(&metrics).await {
                        // Not recorded: another trainer must train the batch again.
                        let _ = delivery.requeue().await;
                        return Err(e);
                    }
                    delivery.ack().await?;
                    self.train_totals.add(&metrics, data_wait);
                    progress.done.insert(index);
                    progress.batches_in_epoch = Some(batches_in_epoch);
                    info!(%metrics, "step");
                }
                Stage::Validate => {
                    let counts = self.validate(&mut delivery, progress).await?;
                    if let Err(e) = self.coord.batch_evaluated(&counts).await {
                        let _ = delivery.requeue().await;
                        return Err(e);
                    }
                    delivery.ack().await?;
                    progress.done.insert(index);
                    progress.batches_in_epoch = Some(batches_in_epoch);
                }
            }
            wait_started = Instant::now();
        };
        if consumer.rejected() > 0 {
            warn!(%queue, rejected = consumer.rejected(), "malformed messages went to the dead-letter queue");
        }
        // Closing hands back whatever was prefetched and not used.
        consumer.close().await?;
        if let StageEnd::Complete = end {
            // Every batch of the queue was used (by this trainer or, as the coordination says,
            // by others): what is left are redeliveries of used batches, e.g. of a trainer that
            // died between reporting a step and acking it. Nobody would consume them again.
            let purged = purge_queue(&self.conn, &queue).await?;
            if purged > 0 {
                warn!(%queue, purged, "dropped redelivered duplicates of used batches");
            }
        }
        Ok(end)
    }

    /// One optimizer step on the delivery's batch (acked by the caller). A failed step hands the
    /// batch back to the queue.
    async fn train(
        &mut self,
        delivery: &mut Delivery,
        progress: &EpochProgress,
        data_wait_secs: f64,
    ) -> Result<StepMetrics, TrainError> {
        let batch = &mut delivery.batch;
        let phase = self.hyper.phase(progress.epoch, self.opts.epochs);
        let lr = phase.lr_at(
            progress.epoch,
            progress.done.len() as u32,
            batch.batches_in_epoch,
        );
        let owned = OwnedBatch::take(batch);
        let result = self
            .worker
            .call(move |st| st.train_step(owned.view(), lr).map(|o| (o, st.step)))
            .await
            .map_err(TrainError::from)
            .and_then(|r| r);
        let (outcome, step) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = delivery.requeue().await;
                return Err(e);
            }
        };
        Ok(StepMetrics {
            epoch: progress.epoch,
            step,
            batch_index: delivery.batch.batch_index,
            images: outcome.images,
            loss: outcome.loss,
            accuracy: outcome.correct as f64 / outcome.images.max(1) as f64,
            lr,
            data_wait_secs,
            step_secs: outcome.secs,
        })
    }

    /// Adds the delivery's batch to the stage's tally (acked by the caller) and returns its
    /// counts.
    async fn validate(
        &mut self,
        delivery: &mut Delivery,
        progress: &mut EpochProgress,
    ) -> Result<BatchEval, TrainError> {
        let batch = &mut delivery.batch;
        let (epoch, batch_index) = (batch.epoch, batch.batch_index);
        let owned = OwnedBatch::take(batch);
        let mut tally = EvalTally::new(self.num_classes as usize);
        let result = self
            .worker
            .call(move |st| {
                let r = st.evaluate(owned.view(), &mut tally);
                (tally, r)
            })
            .await;
        let (tally, r) = match result {
            Ok(t) => t,
            Err(e) => {
                let _ = delivery.requeue().await;
                return Err(e.into());
            }
        };
        if let Err(e) = r {
            let _ = delivery.requeue().await;
            return Err(e);
        }
        let counts = tally.batch_counts(epoch, progress.eval_part, batch_index);
        progress
            .tally
            .get_or_insert_with(|| EvalTally::new(self.num_classes as usize))
            .merge(&tally);
        Ok(counts)
    }
}

/// A delivered batch's pixels and labels, moved out of the message so that the training
/// thread can own them.
struct OwnedBatch {
    pixels: Vec<u8>,
    labels: Vec<u32>,
    names: Vec<String>,
    shape: [i64; 4],
}

impl OwnedBatch {
    fn take(batch: &mut Batch) -> Self {
        let s = &batch.shape;
        Self {
            shape: [s[0], s[1], s[2], s[3]].map(i64::from),
            pixels: std::mem::take(&mut batch.pixels),
            labels: batch.labels.clone(),
            names: batch.file_names.clone(),
        }
    }

    fn view(&self) -> BatchView<'_> {
        BatchView {
            pixels: &self.pixels,
            shape: self.shape,
            labels: &self.labels,
            names: Some(&self.names),
        }
    }
}
