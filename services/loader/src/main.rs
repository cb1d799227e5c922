//! Loader service: reads the flowers archive and publishes preprocessed batches to RabbitMQ.

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use flowers_broker::{
    broker_url_from_env, connect, delete_run_queues, PublisherOptions, RunLayout,
};
use flowers_coordinator_client::{ClientConfig, CoordinatorClient};
use flowers_dataset::{Labels, SetName, SplitStrategy};
use flowers_liveness::{HealthArgs, LivenessFile};
use flowers_loader::bench::decode_bench;
use flowers_loader::replay::ReplaySummary;
use flowers_loader::resume::{counted_batches, PublishLog};
use flowers_loader::{
    evaluations_per_epoch, log_prepared, prepare, publish_bench, LoaderConfig, Resume, RunSummary,
};
use flowers_preprocess::{preprocess_archive, PreprocessOptions};
use flowers_proto::run_id;
use flowers_proto::v1::RunState;
use flowers_wire::DEFAULT_MAX_MESSAGE_BYTES;
use std::path::PathBuf;
use std::time::Duration;
use tracing::{info, warn};

/// How often a loader with a coordinator looks at the run's progress for lost batches.
const REPLAY_POLL: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "loader",
    version,
    about = "Preprocesses the Oxford 102 Flowers archive and publishes uint8 NHWC batches to RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preprocess once, then publish every epoch's training and validation batches.
    #[command(alias = "publish")]
    Run(Box<RunArgs>),
    /// Time decoding (and, with --publish, confirmed publishing).
    Bench(BenchArgs),
    /// Delete a finished run's queues (every epoch's training and validation queues and its
    /// dead-letter queue), with whatever they still hold.
    DeleteQueues(DeleteArgs),
    /// Exit 0 while a running loader's liveness file is fresh (container health checks).
    Health(HealthArgs),
}

#[derive(Args)]
struct Input {
    /// The image archive (102flowers.tgz or a .tar).
    #[arg(long, env = "FLOWERS_DATA")]
    data: PathBuf,
    /// imagelabels.mat.
    #[arg(long, env = "FLOWERS_LABELS")]
    labels: PathBuf,
    /// Output image side.
    #[arg(long, env = "FLOWERS_IMG_SIZE", default_value_t = 299)]
    img_size: u32,
    /// Threads reading and decoding the archive, the reader included (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Only the first N images of the archive.
    #[arg(long)]
    limit: Option<usize>,
    /// Only images of the first N classes (labels 1..=N); the run then has N classes.
    #[arg(long)]
    classes: Option<u32>,
    /// Images per batch (the last of a split may be short).
    #[arg(long, env = "FLOWERS_BATCH_SIZE", default_value_t = 32)]
    batch_size: usize,
    /// RabbitMQ URL [env: FLOWERS_BROKER_URL, then AMQP_URL].
    #[arg(long)]
    broker_url: Option<String>,
    /// Largest encoded batch message; larger batches are refused before publishing.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Batches sent ahead of their publisher confirms.
    #[arg(long, default_value_t = 16)]
    max_unconfirmed: usize,
    /// Batch messages written to the broker's disk (persistent: they survive its restart) or
    /// kept in its memory (transient: 2.3x faster to publish here, lost with a restart and then
    /// replayed) [default: transient with --coordinator, which the replay needs; else
    /// persistent].
    #[arg(long, env = "FLOWERS_DELIVERY", value_enum)]
    delivery: Option<Delivery>,
    /// Directory for the preprocessed pixel store (img_size^2 * 3 bytes per image).
    #[arg(long, env = "FLOWERS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl Input {
    fn preprocess(&self) -> PreprocessOptions {
        PreprocessOptions {
            img_size: self.img_size,
            threads: self.threads,
            limit: self.limit,
            classes: self.classes,
        }
    }

    fn broker_url(&self) -> String {
        self.broker_url.clone().unwrap_or_else(broker_url_from_env)
    }

    fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// How to publish; `replayed`: lost batches will be published again (a coordinator
    /// tracks the run), so transient delivery is the default.
    fn publisher(&self, replayed: bool) -> PublisherOptions {
        let default = if replayed {
            Delivery::Transient
        } else {
            Delivery::Persistent
        };
        PublisherOptions {
            max_message_bytes: self.max_message_bytes,
            max_unconfirmed: self.max_unconfirmed,
            persistent: matches!(self.delivery.unwrap_or(default), Delivery::Persistent),
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Delivery {
    Persistent,
    Transient,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitKind {
    /// Per class, --val-fraction of the images validate (chosen from --seed).
    Stratified,
    /// setid.mat's lists: --train-sets train, --val-sets validate.
    Official,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    liveness: LivenessFile,
    #[command(flatten)]
    input: Input,
    /// setid.mat (needed by --split official).
    #[arg(long, env = "FLOWERS_SETID")]
    setid: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "stratified")]
    split: SplitKind,
    /// Fraction of each class that validates (stratified split).
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// setid.mat lists that train (official split).
    #[arg(long, value_delimiter = ',', default_value = "trnid")]
    train_sets: Vec<SetName>,
    /// setid.mat lists that validate (official split).
    #[arg(long, value_delimiter = ',', default_value = "valid")]
    val_sets: Vec<SetName>,
    #[arg(long, env = "FLOWERS_EPOCHS")]
    epochs: u32,
    /// Also evaluate every this fraction of an epoch (e.g. 0.125, as the reference notebook),
    /// besides at its end; rounded to 1/n. Needs --coordinator, which asks trainers for them.
    #[arg(long, env = "FLOWERS_EVAL_EVERY")]
    eval_every: Option<f64>,
    /// Seed of the split and of every epoch's training order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Names the run's queues (flowers.<run-id>.train.<epoch>, ...); generated when absent.
    #[arg(long, env = "FLOWERS_RUN_ID")]
    run_id: Option<String>,
    /// Most unconsumed batches across the run's queues; publishing waits beyond it.
    #[arg(long, default_value_t = 64)]
    max_queued_batches: u32,
    /// Coordinator to register the run with (e.g. http://127.0.0.1:50051); none: publish only.
    #[arg(long, env = "FLOWERS_COORDINATOR")]
    coordinator: Option<String>,
    /// Bearer token for the coordinator.
    #[arg(long, env = "FLOWERS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// With --coordinator: seconds the run's current stage may stand still, its queue empty and
    /// batches uncounted, before the loader publishes those batches again (the broker lost
    /// them). The loader stays until the run is over, to do so.
    #[arg(long, env = "FLOWERS_REPLAY_AFTER", default_value_t = 30)]
    replay_after: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    input: Input,
    /// Also publish the batches to a throwaway run (deleted afterwards) and time it.
    #[arg(long)]
    publish: bool,
}

#[derive(Args)]
struct DeleteArgs {
    #[arg(long, env = "FLOWERS_RUN_ID")]
    run_id: String,
    /// The run's epochs, as published.
    #[arg(long, env = "FLOWERS_EPOCHS")]
    epochs: u32,
    /// The run's --eval-every, as published (its interim validation queues go too).
    #[arg(long, env = "FLOWERS_EVAL_EVERY")]
    eval_every: Option<f64>,
    /// RabbitMQ URL [env: FLOWERS_BROKER_URL, then AMQP_URL].
    #[arg(long)]
    broker_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flowers_telemetry::init();
    match Cli::parse().command {
        Command::Run(args) => run(*args).await,
        Command::Bench(args) => bench(args).await,
        Command::DeleteQueues(args) => delete_queues(args).await,
        Command::Health(args) => Ok(args.report()?),
    }
}

async fn delete_queues(args: DeleteArgs) -> anyhow::Result<()> {
    let evaluations = args.eval_every.map_or(Ok(1), evaluations_per_epoch)?;
    let layout = RunLayout::epochs(args.epochs).with_evaluations(evaluations);
    let url = args.broker_url.unwrap_or_else(broker_url_from_env);
    let conn = connect(&url, "flowers-loader delete-queues").await?;
    let dropped = delete_run_queues(&conn, &args.run_id, layout)
        .await
        .with_context(|| format!("deleting the queues of run {}", args.run_id))?;
    let _ = conn.close(200, "OK".into()).await;
    info!(run_id = %args.run_id, messages_dropped = dropped, "run queues deleted");
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.liveness.keep_fresh();
    let split = match args.split {
        SplitKind::Stratified => SplitStrategy::Stratified {
            val_fraction: args.val_fraction,
            seed: args.seed,
        },
        SplitKind::Official => {
            anyhow::ensure!(
                args.setid.is_some(),
                "--split official needs --setid setid.mat"
            );
            SplitStrategy::Official {
                train: args.train_sets,
                validate: args.val_sets,
            }
        }
    };
    let evaluations_per_epoch = args.eval_every.map_or(Ok(1), evaluations_per_epoch)?;
    anyhow::ensure!(
        evaluations_per_epoch == 1 || args.coordinator.is_some(),
        "--eval-every needs --coordinator: the coordinator asks trainers for interim evaluations"
    );
    let run_id = args.run_id.unwrap_or_else(run_id::random);
    let cfg = LoaderConfig {
        data: args.input.data.clone(),
        labels: args.input.labels.clone(),
        setid: args.setid,
        split,
        preprocess: args.input.preprocess(),
        batch_size: args.input.batch_size,
        epochs: args.epochs,
        evaluations_per_epoch,
        seed: args.seed,
        run_id,
        broker_url: args.input.broker_url(),
        publisher: PublisherOptions {
            max_queued_batches: args.max_queued_batches,
            ..args.input.publisher(args.coordinator.is_some())
        },
        cache_dir: args.input.cache_dir(),
    };
    // Scripts start trainers on this run's queues.
    println!("run_id={}", cfg.run_id);
    let Some(address) = &args.coordinator else {
        let prepared = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || prepare(&cfg)).await??
        };
        log_prepared(&prepared);
        let summary = prepared.publish(&cfg, Resume::default()).await?;
        log_summary(&summary);
        return Ok(());
    };
    let client = CoordinatorClient::connect(&ClientConfig::new(address.clone()).token(args.token))
        .with_context(|| format!("connecting to the coordinator at {address}"))?;
    let asking = || format!("asking {address} about run {}", cfg.run_id);
    let known = known_run(&client, &cfg.run_id).await.with_context(asking)?;
    if known
        .as_ref()
        .is_some_and(|run| run.state != RunState::Running as i32)
    {
        // Started again after the run (`docker compose up` twice): publishing it
        // anew would only feed trainers that have left.
        info!(run_id = %cfg.run_id, coordinator = %address, "the run is over: nothing to publish");
        return Ok(());
    }
    let prepared = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare(&cfg)).await??
    };
    log_prepared(&prepared);
    // Registered before the first batch, so the coordinator counts every one; registering a
    // run again with the same plan (a restarted loader) is fine.
    let run = client
        .register_run(prepared.run_config(&cfg), Some(&cfg.run_id))
        .await
        .with_context(|| format!("registering run {} with {address}", cfg.run_id))?;
    info!(run_id = %run.run_id, coordinator = %address, resuming = known.is_some(), "run registered");
    let log_path = PublishLog::path(&cfg.cache_dir, &cfg.run_id);
    let (log, confirmed) = PublishLog::open(&log_path, &prepared.plan_line(&cfg), known.is_some())?;
    let mut skip = known.as_ref().map(counted_batches).unwrap_or_default();
    skip.extend(confirmed);
    let (epoch_tx, epoch_rx) = tokio::sync::watch::channel(run.current_epoch);
    let replayer = prepared
        .replayer(&cfg, Duration::from_secs(args.replay_after), REPLAY_POLL)
        .await?;
    let resume = Resume {
        skip,
        log: Some(log),
        live_epoch: Some(epoch_rx),
    };
    let status = || client.get_run_batches(&cfg.run_id);
    let (summary, replays) = tokio::try_join!(
        prepared.publish(&cfg, resume),
        replayer.run(status, epoch_tx)
    )?;
    log_summary(&summary);
    log_replays(&replays);
    anyhow::ensure!(
        replays.final_state != RunState::Failed as i32,
        "run {} failed at the coordinator",
        cfg.run_id
    );
    Ok(())
}

/// The run as the coordinator knows it, with its counted batches; `None` for a run it does not
/// know (a new one).
async fn known_run(
    client: &CoordinatorClient,
    run_id: &str,
) -> Result<Option<flowers_proto::v1::RunStatus>, flowers_coordinator_client::ClientError> {
    match client.get_run_batches(run_id).await {
        Ok(status) => Ok(Some(status)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn log_replays(r: &ReplaySummary) {
    if r.replayed > 0 {
        warn!(
            replays = r.replays,
            batches = r.replayed,
            "published lost batches again"
        );
    }
    info!("the run is over");
}

fn log_summary(s: &RunSummary) {
    let skipped: Vec<&str> = s.skipped.iter().map(|k| k.file_name.as_str()).collect();
    let per_epoch: Vec<String> = s
        .epochs
        .iter()
        .map(|e| {
            let interim = if e.interim_val_batches > 0 {
                format!("+{}", e.interim_val_batches)
            } else {
                String::new()
            };
            format!("{}:{}+{}{interim}", e.epoch, e.train_batches, e.val_batches)
        })
        .collect();
    info!(
        run_id = %s.run_id,
        images = s.images,
        skipped = s.skipped.len(),
        skipped_files = ?skipped,
        confirmed_batches_train_plus_val_per_epoch = %per_epoch.join(" "),
        mb_published = s.payload_bytes as f64 / 1e6,
        reconnects = s.reconnects,
        preprocess_seconds = s.preprocess_seconds,
        publish_seconds = s.publish_seconds,
        "loader finished"
    );
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let input = &args.input;
    let labels = Labels::from_mat_file(&input.labels)?;
    let opts = input.preprocess();
    let report = {
        let (data, labels, opts) = (input.data.clone(), labels.clone(), opts.clone());
        tokio::task::spawn_blocking(move || decode_bench(&data, &labels, &opts)).await??
    };
    println!(
        "images={} skipped={} img_size={} threads={} seconds={:.3}",
        report.images, report.skipped, opts.img_size, opts.threads, report.seconds
    );
    println!("images_per_s={:.1}", report.images_per_s);
    if !args.publish {
        return Ok(());
    }
    let pre = {
        let (data, labels, opts, cache) = (
            input.data.clone(),
            labels.clone(),
            opts.clone(),
            input.cache_dir(),
        );
        tokio::task::spawn_blocking(move || preprocess_archive(&data, &labels, &opts, &cache))
            .await??
    };
    let run_id = format!("bench-{}", run_id::random());
    let report = publish_bench(
        &input.broker_url(),
        &run_id,
        pre.store,
        &pre.images,
        labels.num_classes(),
        input.batch_size,
        input.publisher(false),
    )
    .await
    .context("publish benchmark")?;
    println!(
        "batches={} payload_mb={:.1} publish_seconds={:.3}",
        report.batches,
        report.payload_bytes as f64 / 1e6,
        report.seconds
    );
    println!("publish_mb_per_s={:.1}", report.mb_per_s);
    Ok(())
}
