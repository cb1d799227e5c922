//! The consuming loop of `trainer run`: per epoch E, train on `train.E`, then validate on
//! `val.E`, then E+1; a coordinator may also ask for interim evaluations on `val.E.p` in the
//! middle of an epoch's training. A batch is acked only after the step (or evaluation) that
//! used it, so a trainer that dies loses no batch: the broker redelivers whatever was unacked.
//! A lost broker (restart, broken connection, a channel closed for `consumer_timeout`) is
//! waited out: the trainer reconnects and consumes again with its model and optimizer intact.
//!
//! Where the loop needs a decision that a coordinator would make (is this stage over, sync
//! before validation, who validates, where metrics go), it asks a [`Coordination`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowers_broker::{
    connect_with_backoff, declare_run_topology, message_count, purge_queue, validate_run_id,
    Backoff, BrokerError, Connection, Consumer, Delivery, RunLayout,
};
use flowers_wire::describe;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::batch::OwnedBatch;
use crate::batch_check::BatchCheck;
use crate::coordination::Coordination;
use crate::metrics::{BatchEval, EvalMetrics, EvalTally, StepMetrics, TrainTotals};
use crate::progress::{start_position, EpochProgress, SavedProgress, Stage};
use crate::recipe::Hyper;
use crate::shutdown;
use crate::state::{ModelOptions, TrainState};
use crate::worker::Worker;
use crate::TrainError;

/// How long one wait for a message lasts before the loop asks again whether the stage is over.
const POLL: Duration = Duration::from_secs(2);
/// How often a trainer waiting for batches says so.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(30);
/// Longest wait between two attempts to reach a broker that went away: short, since every
/// second of it is a second without training once the broker is back.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Pause before consuming again on a connection that just failed to.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

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
    /// Longest broker outage the trainer waits out (reconnecting); beyond it, it saves its
    /// state and exits with the error.
    pub broker_outage_limit: Duration,
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

impl RunOptions {
    /// The checkpoint file saved into `checkpoint_dir` (its progress file goes beside it).
    pub fn checkpoint_path(&self) -> Option<PathBuf> {
        self.checkpoint_dir
            .as_ref()
            .map(|dir| dir.join("latest.safetensors"))
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Every epoch trained (and validated where asked); the last validation, if any.
    Finished(Option<EvalMetrics>),
    /// Stopped by a signal after the batch in hand; a checkpoint was saved if configured.
    Interrupted { epoch: u32, stage: Stage },
}

enum StageEnd {
    Complete,
    Interrupted,
    /// Training paused for interim evaluation `part` of the epoch.
    Evaluate(u32),
}

struct Runner<'a, C> {
    opts: &'a RunOptions,
    hyper: &'a Hyper,
    coord: &'a mut C,
    conn: Connection,
    worker: Arc<Worker<TrainState>>,
    shutdown: watch::Receiver<bool>,
    check: BatchCheck,
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
        Some(c) => SavedProgress::read(c, &opts.run_id)?,
        None => None,
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
        TrainState::start(model, phase, resume.as_deref(), weights.as_deref())
    })
    .await?;
    let worker = Arc::new(worker);
    coord.started(&worker, &hyper.policies(opts.epochs)).await?;
    let (step, meta) = worker
        .call(|st| (st.step, st.resumed_from().cloned()))
        .await?;

    let mut progress = start_position(
        opts.start_epoch,
        opts.resume.as_deref(),
        saved,
        step,
        meta.as_ref(),
    )?;
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

    let conn = connect(opts, &Backoff::default()).await?;
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
        check: BatchCheck::new(&opts.run_id, num_classes, img_size, opts.batch_size),
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

/// Connects to the broker, retrying per `backoff`, and declares the run's queues.
async fn connect(opts: &RunOptions, backoff: &Backoff) -> Result<Connection, BrokerError> {
    let conn = connect_with_backoff(
        &opts.broker_url,
        &format!("flowers trainer {}", opts.run_id),
        backoff,
    )
    .await?;
    declare(&conn, opts).await?;
    Ok(conn)
}

/// Declares the run's queues: declaring is idempotent and lets a trainer start before the
/// loader.
async fn declare(conn: &Connection, opts: &RunOptions) -> Result<(), BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|source| BrokerError::Amqp {
            op: "open a channel to declare run",
            target: opts.run_id.clone(),
            source,
        })?;
    let layout = RunLayout::epochs(opts.epochs).with_evaluations(opts.evaluations_per_epoch);
    declare_run_topology(&channel, &opts.run_id, layout).await?;
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
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
                self.train_totals.log(epoch, progress.done.len());
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
            self.coord.before_validation(epoch, part).await?;
        }
        match self.stage(progress).await? {
            StageEnd::Complete => {}
            StageEnd::Interrupted => return Ok(None),
            StageEnd::Evaluate(_) => unreachable!("interim evaluations interrupt training only"),
        }
        let tally = progress
            .tally
            .take()
            .unwrap_or_else(|| EvalTally::new(self.check.num_classes() as usize));
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
        let (Some(dir), Some(path)) = (&self.opts.checkpoint_dir, self.opts.checkpoint_path())
        else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let img_size = self.check.img_size();
        let (epochs_done, size) = (progress.epoch, img_size.map_or(0, i64::from));
        let save_path = path.clone();
        let step = self
            .worker
            .call(move |st| st.save(&save_path, epochs_done, size).map(|()| st.step))
            .await??;
        let saved = SavedProgress {
            run_id: self.opts.run_id.clone(),
            step,
            img_size,
            progress: progress.clone(),
        };
        saved.write(&path)?;
        info!(checkpoint = %path.display(), step, epoch = progress.epoch, stage = ?progress.stage, "checkpoint saved");
        Ok(())
    }

    /// Whether the queue after the stage's holds messages, which for a trainer alone ends the
    /// stage (see [`Coordination::alone`]).
    async fn loader_moved_on(&self, progress: &EpochProgress) -> Result<bool, TrainError> {
        let Some(next) = progress.next_queue(&self.opts.run_id, self.opts.epochs - 1) else {
            return Ok(false);
        };
        if message_count(&self.conn, &next).await?.unwrap_or(0) == 0 {
            return Ok(false);
        }
        warn!(
            queue = %progress.queue(&self.opts.run_id),
            used = progress.done.len(),
            expected = ?progress.batches_in_epoch,
            "queue drained before every batch was seen (the rest were acked by an earlier trainer); moving on"
        );
        Ok(true)
    }

    /// Consumes the stage's queue until the coordination says the stage is over.
    async fn stage(&mut self, progress: &mut EpochProgress) -> Result<StageEnd, TrainError> {
        let queue = progress.queue(&self.opts.run_id);
        let mut consumer = Consumer::open(&self.conn, &queue, self.opts.prefetch).await?;
        let mut wait_started = Instant::now();
        let mut last_waiting_log = Instant::now();
        let mut idle = false;
        let end = loop {
            if self.coord.stage_done(progress, idle).await?
                || (idle && self.coord.alone() && self.loader_moved_on(progress).await?)
            {
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
                next = consumer.next(POLL) => next,
            };
            let used = match next {
                Ok(Some(mut delivery)) => {
                    idle = false;
                    let data_wait = wait_started.elapsed().as_secs_f64();
                    let used = self
                        .use_delivery(&mut delivery, progress, &queue, data_wait)
                        .await;
                    wait_started = Instant::now();
                    used
                }
                Ok(None) => {
                    idle = true;
                    if last_waiting_log.elapsed() >= WAITING_LOG_EVERY {
                        info!(%queue, used = progress.done.len(), expected = ?progress.batches_in_epoch, "waiting for batches");
                        last_waiting_log = Instant::now();
                    }
                    continue;
                }
                Err(e) => Err(e.into()),
            };
            match used {
                Ok(()) => {}
                Err(TrainError::Broker(e)) if e.is_transient() => {
                    match self.reconsume(&queue, *e).await? {
                        Some(again) => consumer = again,
                        None => break StageEnd::Interrupted,
                    }
                }
                Err(e) => return Err(e),
            }
        };
        if consumer.rejected() > 0 {
            warn!(%queue, rejected = consumer.rejected(), "malformed messages went to the dead-letter queue");
        }
        // Closing hands back whatever was prefetched and not used; on a channel the broker
        // already closed there is nothing to hand back.
        if let Err(e) = consumer.close().await {
            warn!(%queue, error = %e, "closing the consumer");
        }
        if let StageEnd::Complete = end {
            // Every batch of the queue was used (by this trainer or, as the coordination says,
            // by others): what is left are redeliveries of used batches, e.g. of a trainer that
            // died between reporting a step and acking it. Nobody would consume them again.
            match purge_queue(&self.conn, &queue).await {
                Ok(0) => {}
                Ok(purged) => {
                    warn!(%queue, purged, "dropped redelivered duplicates of used batches")
                }
                // Left behind, they are acked unused by whoever meets them.
                Err(e) => {
                    warn!(%queue, error = %e, "could not drop the duplicates of used batches")
                }
            }
        }
        Ok(end)
    }

    /// Trains on (or evaluates) one delivery, reports it and acks it. A batch that does not fit
    /// the run is dead-lettered; one this trainer already used is acked without use.
    async fn use_delivery(
        &mut self,
        delivery: &mut Delivery,
        progress: &mut EpochProgress,
        queue: &str,
        data_wait: f64,
    ) -> Result<(), TrainError> {
        if let Some(reason) = self.check.misfit(&delivery.batch, progress) {
            error!(%queue, batch = %describe(&delivery.batch), %reason, "unusable batch: dead-lettering it");
            delivery.reject().await?;
            return Ok(());
        }
        let index = delivery.batch.batch_index;
        if progress.done.contains(&index) {
            warn!(%queue, batch = %describe(&delivery.batch), "batch already used (redelivered duplicate): acking it without use");
            delivery.ack().await?;
            return Ok(());
        }
        let batches_in_epoch = delivery.batch.batches_in_epoch;
        let (reported, step) = match progress.stage {
            Stage::Train => {
                let metrics = self.train(delivery, progress, data_wait).await?;
                (self.coord.step_done(&metrics).await, Some(metrics))
            }
            Stage::Validate => {
                let counts = self.validate(delivery, progress).await?;
                (self.coord.batch_evaluated(&counts).await, None)
            }
        };
        if let Err(e) = reported {
            // Not recorded: another trainer must use the batch again.
            let _ = delivery.requeue().await;
            return Err(e);
        }
        // Used and counted before the ack: if the ack is lost with the broker, the redelivered
        // copy is recognised.
        progress.done.insert(index);
        progress.batches_in_epoch = Some(batches_in_epoch);
        if let Some(metrics) = step {
            self.train_totals.add(&metrics, data_wait);
            info!(%metrics, "step");
        }
        delivery.ack().await?;
        Ok(())
    }

    /// After `error` stopped the consumer of `queue`: if a new channel may cure it, waits for
    /// the broker (reconnecting with backoff, for at most `broker_outage_limit` from now) and
    /// consumes `queue` again; `None` when a shutdown comes first. The model and optimizer stay
    /// as they are; batches prefetched on the lost channel come back by redelivery (or by the
    /// loader's replay, where the broker lost them).
    async fn reconsume(
        &mut self,
        queue: &str,
        error: BrokerError,
    ) -> Result<Option<Consumer>, TrainError> {
        if !error.is_transient() {
            return Err(error.into());
        }
        let lost = Instant::now();
        let (opts, conn) = (self.opts, &mut self.conn);
        let limit = opts.broker_outage_limit;
        warn!(%queue, %error, limit_secs = limit.as_secs(), "lost the broker: reconnecting");
        let reopen = async {
            let mut fresh_connection = !conn.status().connected();
            loop {
                if fresh_connection {
                    let backoff = Backoff {
                        max_delay: RECONNECT_MAX_DELAY,
                        give_up_after: limit.saturating_sub(lost.elapsed()),
                        ..Backoff::default()
                    };
                    *conn = connect(opts, &backoff).await?;
                }
                // Declared again: a queue deleted meanwhile is replayed into its new self.
                let opened = match declare(conn, opts).await {
                    Ok(()) => Consumer::open(conn, queue, opts.prefetch).await,
                    Err(e) => Err(e),
                };
                match opened {
                    Err(e) if e.is_transient() && lost.elapsed() < limit => {
                        warn!(%queue, error = %e, "consuming again failed; retrying on a new connection");
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        fresh_connection = true;
                    }
                    other => break other.map_err(TrainError::from),
                }
            }
        };
        let consumer = tokio::select! {
            biased;
            () = shutdown::requested(&mut self.shutdown) => return Ok(None),
            consumer = reopen => consumer?,
        };
        info!(%queue, outage_secs = lost.elapsed().as_secs_f64(), "consuming again after losing the broker");
        Ok(Some(consumer))
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
        let (outcome, step) = self
            .on_worker(delivery, move |st| {
                st.train_step(owned.view(), lr).map(|o| (o, st.step))
            })
            .await?;
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
    /// counts. A failed evaluation hands the batch back to the queue.
    async fn validate(
        &mut self,
        delivery: &mut Delivery,
        progress: &mut EpochProgress,
    ) -> Result<BatchEval, TrainError> {
        let batch = &mut delivery.batch;
        let (epoch, batch_index) = (batch.epoch, batch.batch_index);
        let owned = OwnedBatch::take(batch);
        let mut tally = EvalTally::new(self.check.num_classes() as usize);
        let tally = self
            .on_worker(delivery, move |st| {
                st.evaluate(owned.view(), &mut tally).map(|()| tally)
            })
            .await?;
        let counts = tally.batch_counts(epoch, progress.eval_part, batch_index);
        progress
            .tally
            .get_or_insert_with(|| EvalTally::new(self.check.num_classes() as usize))
            .merge(&tally);
        Ok(counts)
    }

    /// Runs `job` with the delivery's batch on the training thread; if it fails, the batch goes
    /// back to the queue for another try (by this trainer or another).
    async fn on_worker<R: Send + 'static>(
        &self,
        delivery: &mut Delivery,
        job: impl FnOnce(&mut TrainState) -> Result<R, TrainError> + Send + 'static,
    ) -> Result<R, TrainError> {
        let result = self
            .worker
            .call(job)
            .await
            .map_err(TrainError::from)
            .and_then(|r| r);
        if result.is_err() {
            let _ = delivery.requeue().await;
        }
        result
    }
}
