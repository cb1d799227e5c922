//! The loader run: preprocess once, split, then publish every epoch's batches.

use crate::plan::{EpochPlanner, PlannedBatch};
use crate::replay::Replayer;
use crate::resume::PublishLog;
use flowers_broker::{
    connect, delete_run_queues, BatchKey, BrokerError, Publisher, PublisherOptions, RunLayout,
};
use flowers_dataset::{split_images, DatasetError, Labels, SetIds, SplitStrategy};
use flowers_preprocess::{
    preprocess_archive, ImageInfo, PixelStore, PreprocessError, PreprocessOptions, Skipped,
};
use flowers_proto::v1::RunConfig;
use flowers_wire::{build_batch, encode_batch, Batch, WireError};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::info;

/// Batches assembled ahead of the publisher: enough to hide a slow read,
/// few enough to keep memory small (~9 MB each at 32 x 299 x 299).
const ASSEMBLED_AHEAD: usize = 3;

/// Everything a loader run needs.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// `102flowers.tgz` (or `.tar`).
    pub data: PathBuf,
    /// `imagelabels.mat`.
    pub labels: PathBuf,
    /// `setid.mat`; needed for [`SplitStrategy::Official`].
    pub setid: Option<PathBuf>,
    pub split: SplitStrategy,
    pub preprocess: PreprocessOptions,
    pub batch_size: usize,
    pub epochs: u32,
    /// Evaluations of the validation set per epoch: 1 at its end, `n > 1` also after every
    /// `1/n` of its training batches (needs a coordinator to ask trainers for them).
    pub evaluations_per_epoch: u32,
    /// Seed of the per-epoch training order.
    pub seed: u64,
    pub run_id: String,
    pub broker_url: String,
    pub publisher: PublisherOptions,
    /// Where the preprocessed pixel store lives while the loader runs.
    pub cache_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    // Boxed: broker errors are large and rare.
    #[error(transparent)]
    Broker(Box<BrokerError>),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("invalid loader configuration: {0}")]
    Config(String),
    #[error("{archive}: no training images after the split ({images} decodable images)")]
    NoTrainingImages { archive: PathBuf, images: usize },
    /// A blocking task (preparing, or assembling batches) panicked or was cancelled.
    #[error("batch assembly stopped: {0}")]
    Assembly(#[from] tokio::task::JoinError),
    #[error("publish log {path}: {source}")]
    PublishLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("asking the coordinator about {0}")]
    Coordinator(String),
}

impl From<BrokerError> for LoaderError {
    fn from(error: BrokerError) -> Self {
        LoaderError::Broker(Box::new(error))
    }
}

/// Reads batches' pixels back from the store.
#[derive(Debug)]
pub struct Assembler {
    store: PixelStore,
    /// Image number -> (archive member name, 0-based label).
    images: HashMap<u32, (String, u32)>,
}

impl Assembler {
    pub fn new(store: PixelStore, images: &[ImageInfo]) -> Self {
        let images = images
            .iter()
            .map(|i| (i.number, (i.file_name.clone(), i.label)))
            .collect();
        Assembler { store, images }
    }

    /// The batch `planned` describes, pixels read from the store.
    pub fn assemble(&self, planned: &PlannedBatch) -> Result<Batch, LoaderError> {
        let image_bytes = self.store.image_bytes();
        let mut pixels = vec![0u8; image_bytes * planned.images.len()];
        let mut names = Vec::with_capacity(planned.images.len());
        let mut labels = Vec::with_capacity(planned.images.len());
        for (out, &number) in pixels.chunks_exact_mut(image_bytes).zip(&planned.images) {
            self.store.copy_into(number, out)?;
            let (name, label) = self
                .images
                .get(&number)
                .ok_or(PreprocessError::NotStored { number })?;
            names.push(name.clone());
            labels.push(*label);
        }
        let size = self.store.img_size();
        Ok(build_batch(
            &planned.header,
            size,
            size,
            names,
            labels,
            pixels,
        )?)
    }
}

/// A preprocessed, split data set, ready to publish.
#[derive(Debug)]
pub struct Prepared {
    pub planner: EpochPlanner,
    pub images: usize,
    pub skipped: Vec<Skipped>,
    pub preprocess_seconds: f64,
    /// Per-split and per-class image counts.
    pub split_summary: String,
    assembler: Arc<Assembler>,
}

/// How a publishing picks up its run (the default: from the start, as a first loader does).
#[derive(Debug, Default)]
pub struct Resume {
    /// Batches not to publish: counted at the coordinator, or confirmed to an earlier loader.
    pub skip: BTreeSet<BatchKey>,
    /// Where the batches confirmed now are recorded, for a loader started after this one.
    pub log: Option<PublishLog>,
    /// The epoch the consumers are at (see [`Publisher::follow_epochs`]).
    pub live_epoch: Option<watch::Receiver<u32>>,
}

/// Confirmed batches of one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSummary {
    pub epoch: u32,
    pub train_batches: usize,
    /// Of the epoch-end validation.
    pub val_batches: usize,
    /// Of the interim validations, all together.
    pub interim_val_batches: usize,
}

/// What a run published.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: String,
    pub images: usize,
    pub skipped: Vec<Skipped>,
    pub epochs: Vec<EpochSummary>,
    /// Confirmed message bytes.
    pub payload_bytes: u64,
    pub reconnects: u32,
    pub preprocess_seconds: f64,
    pub publish_seconds: f64,
}

/// Evaluations per epoch for evaluating every `fraction` of an epoch: `1/fraction`, rounded
/// (0.125 gives 8, 0.3 gives 3, 1 gives 1: the epoch end only).
pub fn evaluations_per_epoch(fraction: f64) -> Result<u32, LoaderError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(LoaderError::Config(format!(
            "--eval-every must be a fraction of an epoch in (0, 1], got {fraction}"
        )));
    }
    Ok((1.0 / fraction).round().min(f64::from(u16::MAX)) as u32)
}

/// Reads labels (and set ids), preprocesses the archive into a pixel store
/// under `cache_dir` and splits the decodable images. Blocking: it decodes on
/// `cfg.preprocess.threads` threads.
pub fn prepare(cfg: &LoaderConfig) -> Result<Prepared, LoaderError> {
    if cfg.batch_size == 0 {
        return Err(LoaderError::Config("batch size must be positive".into()));
    }
    if cfg.epochs == 0 {
        return Err(LoaderError::Config("epochs must be positive".into()));
    }
    if cfg.evaluations_per_epoch == 0 {
        return Err(LoaderError::Config(
            "evaluations per epoch must be at least 1".into(),
        ));
    }
    flowers_broker::validate_run_id(&cfg.run_id)?;
    let labels = Labels::from_mat_file(&cfg.labels)?;
    let set_ids = cfg
        .setid
        .as_deref()
        .map(SetIds::from_mat_file)
        .transpose()?;
    let pre = preprocess_archive(&cfg.data, &labels, &cfg.preprocess, &cfg.cache_dir)?;
    for skipped in &pre.skipped {
        info!(file = %skipped.file_name, reason = %skipped.reason, "skipped image");
    }
    let split = split_images(
        pre.images.iter().map(|i| (i.number, i.label)),
        &cfg.split,
        set_ids.as_ref(),
    )?;
    if split.train.is_empty() {
        return Err(LoaderError::NoTrainingImages {
            archive: cfg.data.clone(),
            images: pre.images.len(),
        });
    }
    let split_summary = split.summary(&labels, None);
    let planner = EpochPlanner {
        run_id: cfg.run_id.clone(),
        train: split.train,
        validation: split.validation,
        batch_size: cfg.batch_size,
        seed: cfg.seed,
        num_classes: cfg
            .preprocess
            .classes
            .map_or(labels.num_classes(), |c| c.min(labels.num_classes())),
        evaluations_per_epoch: cfg.evaluations_per_epoch,
    };
    if cfg.evaluations_per_epoch > planner.train_batches_per_epoch() {
        return Err(LoaderError::Config(format!(
            "{} evaluations per epoch, but an epoch has only {} training batches",
            cfg.evaluations_per_epoch,
            planner.train_batches_per_epoch()
        )));
    }
    Ok(Prepared {
        images: pre.images.len(),
        skipped: pre.skipped,
        preprocess_seconds: pre.elapsed.as_secs_f64(),
        split_summary,
        assembler: Arc::new(Assembler::new(pre.store, &pre.images)),
        planner,
    })
}

impl Prepared {
    /// The run as the coordinator's `RegisterRun` wants it (the hook for
    /// registering a run before publishing).
    pub fn run_config(&self, cfg: &LoaderConfig) -> RunConfig {
        RunConfig {
            dataset: cfg.data.display().to_string(),
            split: match cfg.split {
                SplitStrategy::Stratified { .. } => "stratified".into(),
                SplitStrategy::Official { .. } => "official".into(),
            },
            img_size: cfg.preprocess.img_size,
            batch_size: cfg.batch_size as u32,
            epochs: cfg.epochs,
            train_batches_per_epoch: self.planner.train_batches_per_epoch(),
            val_batches_per_epoch: self.planner.val_batches_per_epoch(),
            seed: cfg.seed,
            num_classes: self.planner.num_classes,
            train_images: self.planner.train.len() as u32,
            val_images: self.planner.validation.len() as u32,
            evaluations_per_epoch: self.planner.evaluations_per_epoch,
        }
    }

    /// What the plan's batches are a function of (besides the pixel store): names a
    /// [`PublishLog`]'s plan.
    pub fn plan_line(&self, cfg: &LoaderConfig) -> String {
        format!("flowers publish log v1 {:?}", self.run_config(cfg))
    }

    /// A [`Replayer`] of this run's lost batches, on a connection of its own.
    pub async fn replayer(
        &self,
        cfg: &LoaderConfig,
        stall_after: Duration,
        poll: Duration,
    ) -> Result<Replayer, LoaderError> {
        let layout =
            RunLayout::epochs(cfg.epochs).with_evaluations(self.planner.evaluations_per_epoch);
        // What is replayed goes into an empty queue: no backpressure.
        let opts = PublisherOptions {
            max_queued_batches: u32::MAX,
            ..cfg.publisher.clone()
        };
        let publisher =
            Publisher::connect(&cfg.broker_url, &self.planner.run_id, layout, opts).await?;
        Ok(Replayer {
            planner: self.planner.clone(),
            assembler: self.assembler.clone(),
            broker_url: cfg.broker_url.clone(),
            publisher,
            stall_after,
            poll,
        })
    }

    /// Declares the run's queues and publishes, per epoch, the shuffled
    /// training batches to `train.E`, then the validation batches to `val.E`
    /// (and those of interim evaluations to `val.E.p` among the training ones:
    /// [`EpochPlanner::epoch_batches`]), leaving out what `resume` says is there already.
    pub async fn publish(
        self,
        cfg: &LoaderConfig,
        resume: Resume,
    ) -> Result<RunSummary, LoaderError> {
        // The first training batch is full-sized: refuse an over-limit run
        // before declaring any queue.
        if let Some(first) = self.planner.train_batches(0).first() {
            encode_batch(
                &self.assembler.assemble(first)?,
                cfg.publisher.max_message_bytes,
            )?;
        }
        let started = Instant::now();
        let layout =
            RunLayout::epochs(cfg.epochs).with_evaluations(self.planner.evaluations_per_epoch);
        let mut publisher = Publisher::connect(
            &cfg.broker_url,
            &self.planner.run_id,
            layout,
            cfg.publisher.clone(),
        )
        .await?;
        if let Some(epoch) = resume.live_epoch {
            publisher.follow_epochs(epoch);
        }
        if !resume.skip.is_empty() {
            info!(
                already_there = resume.skip.len(),
                "resuming the run: publishing only what is neither counted nor confirmed before"
            );
        }
        let planner = self.planner.clone();
        let skip = resume.skip;
        let plan = (0..cfg.epochs)
            .flat_map(move |e| planner.epoch_batches(e))
            .filter(move |b| !skip.contains(&BatchKey::of_header(&b.header)));
        publish_plan(&mut publisher, &self.assembler, plan, resume.log).await?;
        let epochs = (0..cfg.epochs)
            .map(|epoch| EpochSummary {
                epoch,
                train_batches: publisher.confirmed(epoch, false).map_or(0, |s| s.len()),
                val_batches: publisher.confirmed(epoch, true).map_or(0, |s| s.len()),
                interim_val_batches: publisher.confirmed_interim(epoch),
            })
            .collect();
        let stats = publisher.close().await?;
        Ok(RunSummary {
            run_id: self.planner.run_id.clone(),
            images: self.images,
            skipped: self.skipped,
            epochs,
            payload_bytes: stats.payload_bytes,
            reconnects: stats.reconnects,
            preprocess_seconds: self.preprocess_seconds,
            publish_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The whole run: [`prepare`] (on a blocking thread), then [`Prepared::publish`].
pub async fn run(cfg: &LoaderConfig) -> Result<RunSummary, LoaderError> {
    let prepared = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare(&cfg)).await??
    };
    log_prepared(&prepared);
    prepared.publish(cfg, Resume::default()).await
}

/// Logs the split's per-part and per-class counts.
pub fn log_prepared(prepared: &Prepared) {
    info!(
        images = prepared.images,
        skipped = prepared.skipped.len(),
        train_batches_per_epoch = prepared.planner.train_batches_per_epoch(),
        val_batches_per_epoch = prepared.planner.val_batches_per_epoch(),
        "preprocessed and split\n{}",
        prepared.split_summary
    );
}

/// Publishes `plan` in order, assembling batches on a blocking thread while
/// earlier ones are being published; flushes (and logs) at each epoch's end. Every confirmed
/// batch goes into `log`.
async fn publish_plan(
    publisher: &mut Publisher,
    assembler: &Arc<Assembler>,
    plan: impl Iterator<Item = PlannedBatch> + Send + 'static,
    mut log: Option<PublishLog>,
) -> Result<(), LoaderError> {
    let (tx, mut rx) = mpsc::channel::<Result<Batch, LoaderError>>(ASSEMBLED_AHEAD);
    let assembly = {
        let assembler = assembler.clone();
        tokio::task::spawn_blocking(move || {
            for planned in plan {
                let batch = assembler.assemble(&planned);
                let failed = batch.is_err();
                // A closed channel means the publisher stopped on an error of its own.
                if tx.blocking_send(batch).is_err() || failed {
                    break;
                }
            }
        })
    };
    let mut epoch = None;
    let mut epoch_started = Instant::now();
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        if epoch.is_some_and(|e| e != batch.epoch) {
            finish_epoch(publisher, epoch.unwrap_or(0), epoch_started.elapsed()).await?;
            record_confirmed(publisher, log.as_mut())?;
            epoch_started = Instant::now();
        }
        epoch = Some(batch.epoch);
        publisher.publish(&batch).await?;
        record_confirmed(publisher, log.as_mut())?;
    }
    assembly.await?;
    if let Some(e) = epoch {
        finish_epoch(publisher, e, epoch_started.elapsed()).await?;
    }
    record_confirmed(publisher, log.as_mut())
}

fn record_confirmed(
    publisher: &mut Publisher,
    log: Option<&mut PublishLog>,
) -> Result<(), LoaderError> {
    let confirmed = publisher.take_confirmed();
    match log {
        Some(log) => log.append(&confirmed),
        None => Ok(()),
    }
}

async fn finish_epoch(
    publisher: &mut Publisher,
    epoch: u32,
    took: Duration,
) -> Result<(), LoaderError> {
    publisher.flush().await?;
    let count = |validation| {
        publisher
            .confirmed(epoch, validation)
            .map_or(0, |s| s.len())
    };
    info!(
        epoch,
        train_batches = count(false),
        val_batches = count(true),
        interim_val_batches = publisher.confirmed_interim(epoch),
        seconds = took.as_secs_f64(),
        "epoch published and confirmed"
    );
    Ok(())
}

/// Throughput of publishing preprocessed batches with confirms.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishBenchReport {
    pub batches: u64,
    pub payload_bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

/// Publishes every image of `images` (from `store`) once, in batches of
/// `batch_size`, to a throwaway run `run_id` with no consumer, timing until
/// the last confirm; deletes the run's queues. `opts.max_queued_batches` is
/// raised so that backpressure never waits.
pub async fn publish_bench(
    broker_url: &str,
    run_id: &str,
    store: PixelStore,
    images: &[ImageInfo],
    num_classes: u32,
    batch_size: usize,
    opts: PublisherOptions,
) -> Result<PublishBenchReport, LoaderError> {
    let planner = EpochPlanner {
        run_id: run_id.to_string(),
        train: images.iter().map(|i| i.number).collect(),
        validation: Vec::new(),
        batch_size,
        seed: 0,
        num_classes,
        evaluations_per_epoch: 1,
    };
    let opts = PublisherOptions {
        max_queued_batches: planner.train_batches_per_epoch() + 1,
        ..opts
    };
    let assembler = Arc::new(Assembler::new(store, images));
    let layout = RunLayout::epochs(1);
    let mut publisher = Publisher::connect(broker_url, run_id, layout, opts).await?;
    let started = Instant::now();
    let published = publish_plan(
        &mut publisher,
        &assembler,
        planner.train_batches(0).into_iter(),
        None,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let stats = publisher.close().await;
    // The queues go whatever happened, so a failed benchmark leaves nothing behind.
    let conn = connect(broker_url, "flowers-loader bench cleanup").await?;
    delete_run_queues(&conn, run_id, layout).await?;
    published?;
    let stats = stats?;
    Ok(PublishBenchReport {
        batches: stats.batches,
        payload_bytes: stats.payload_bytes,
        seconds,
        mb_per_s: stats.payload_bytes as f64 / 1e6 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_every_becomes_evaluations_per_epoch() {
        assert_eq!(evaluations_per_epoch(0.125).unwrap(), 8);
        assert_eq!(evaluations_per_epoch(0.3).unwrap(), 3);
        assert_eq!(evaluations_per_epoch(1.0).unwrap(), 1);
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let err = evaluations_per_epoch(bad).unwrap_err().to_string();
            assert!(err.contains("--eval-every"), "{bad}: {err}");
        }
    }
}
