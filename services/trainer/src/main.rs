//! Trainer worker: fine-tunes InceptionV3 on batches from RabbitMQ (`run`), evaluates a
//! checkpoint on an archive (`evaluate`) and times training steps (`bench`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flowers_broker::broker_url_from_env;
use flowers_coordinator_client::{ClientConfig, WorkerInfo};
use flowers_liveness::{HealthArgs, LivenessFile};
use flowers_model::{DeviceChoice, OptimizerKind, Policy};
use flowers_trainer::bench::{bench, BenchOptions};
use flowers_trainer::coordinated::{Coordinated, CoordinatedOptions};
use flowers_trainer::coordination::Standalone;
use flowers_trainer::device::{gpu_name, Precision};
use flowers_trainer::evaluate::{evaluate, parse_split, EvaluateOptions};
use flowers_trainer::gpu_claim::{claim_gpu, GpuClaim};
use flowers_trainer::recipe::{Hyper, Overrides, Recipe, ScheduleKind};
use flowers_trainer::run::{run, RunOptions, RunOutcome};
use flowers_trainer::shutdown;
use flowers_trainer::state::ModelOptions;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train on the run's batches from RabbitMQ: train.E, then val.E, for each epoch.
    Run(Box<RunArgs>),
    /// Accuracy of a checkpoint on images of an archive.
    Evaluate(EvaluateArgs),
    /// Time training steps on generated input; prints `images_per_s=<n>`.
    Bench(BenchArgs),
    /// Exit 0 while a running trainer's liveness file is fresh (container health checks).
    Health(HealthArgs),
}

#[derive(Args)]
struct Compute {
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, env = "FLOWERS_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// bf16 (CUDA autocast; fp32 on the CPU) or fp32.
    #[arg(long, default_value = "bf16")]
    precision: Precision,
    /// libtorch intra-op threads (default: libtorch's choice, one per core).
    #[arg(long, env = "FLOWERS_TORCH_THREADS")]
    threads: Option<i32>,
    /// Folder shared by trainer replicas that see the same GPUs: each claims a GPU of its own
    /// (lock file gpu-<i>.lock) instead of all using GPU 0.
    #[arg(long, env = "FLOWERS_GPU_CLAIM_DIR")]
    gpu_claim_dir: Option<PathBuf>,
}

impl Compute {
    /// Configures libtorch and picks the device; the claim (if any) must live as long as the
    /// device is used.
    fn apply(&self) -> anyhow::Result<(tch::Device, Option<GpuClaim>)> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            tch::set_num_threads(n);
        }
        let mut device = self.device.resolve()?;
        let claim = match (&self.gpu_claim_dir, device) {
            (Some(dir), tch::Device::Cuda(_)) => {
                let claim = claim_gpu(dir, tch::Cuda::device_count() as usize)?;
                device = tch::Device::Cuda(claim.index);
                Some(claim)
            }
            _ => None,
        };
        if device.is_cuda() {
            // Batch shapes are fixed within a run: let cuDNN pick the fastest kernels once.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        tracing::info!(?device, precision = %self.precision.effective(device), threads = tch::get_num_threads(), "compute");
        Ok((device, claim))
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    liveness: LivenessFile,
    /// RabbitMQ URL [env: FLOWERS_BROKER_URL, then AMQP_URL].
    #[arg(long)]
    broker_url: Option<String>,
    #[arg(long, env = "FLOWERS_RUN_ID")]
    run_id: String,
    /// Coordinator URL (http://host:port or https://..): train with the run's other trainers,
    /// averaging parameters through it. Without it the trainer works alone.
    #[arg(long, env = "FLOWERS_COORDINATOR")]
    coordinator: Option<String>,
    /// Bearer token of the coordinator.
    #[arg(
        long,
        env = "FLOWERS_TOKEN",
        hide_env_values = true,
        requires = "coordinator"
    )]
    token: Option<String>,
    /// Seconds to wait for the loader to register the run at the coordinator.
    #[arg(long, default_value_t = 600)]
    wait_for_run: u64,
    /// Epochs of the run (queues train.0 .. train.<N-1>), as given to the loader
    /// [required without --coordinator; default: the run's].
    #[arg(long, env = "FLOWERS_EPOCHS")]
    epochs: Option<u32>,
    /// First epoch to train (default 0, or where --resume stopped; with a coordinator, the run's).
    #[arg(long, conflicts_with = "coordinator")]
    start_epoch: Option<u32>,
    /// Pretrained weights (safetensors, e.g. from `just weights`), or `none` to train from scratch.
    #[arg(
        long,
        env = "FLOWERS_WEIGHTS",
        default_value = "weights/inception_v3_tf2015.safetensors"
    )]
    weights: String,
    /// Continue from a checkpoint (its model, optimizer state and position in the run).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Where latest.safetensors (+ latest.progress.json) are written after each epoch and on
    /// shutdown; with a coordinator, in <dir>/<run id>/<worker id>/, so that replicas sharing
    /// one folder never write the same file.
    #[arg(long, env = "FLOWERS_CHECKPOINT_DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Expected image size (default: the run's with a coordinator, else the first batch's).
    #[arg(long)]
    img_size: Option<u32>,
    /// Largest batch accepted (default: any).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Batches the broker hands over ahead of use (AMQP QoS).
    #[arg(long, default_value_t = 3)]
    prefetch: u16,
    /// Seconds of broker outage to ride out, reconnecting; beyond it the trainer saves its
    /// state and exits with an error.
    #[arg(long, env = "FLOWERS_BROKER_OUTAGE_LIMIT", default_value_t = 300)]
    broker_outage_limit: u64,
    /// Classes of the model's head [default: the run's with a coordinator, else 102].
    #[arg(long)]
    num_classes: Option<u32>,
    #[command(flatten)]
    hyper: HyperArgs,
    #[command(flatten)]
    compute: Compute,
    /// Seed of torch's RNG (flips, dropout, the new head).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// MiB of trunk activations (the output of Mixed_7a, 320 KiB per image at 299 px, one per
    /// image and flip) kept while the recipe trains only the top (`head`, `top`): later epochs
    /// and evaluations skip ~88% of the forward pass. 0 turns the cache off.
    #[arg(long, env = "FLOWERS_TRUNK_CACHE_MIB", default_value_t = 2048)]
    trunk_cache_mib: usize,
}

#[derive(Args)]
struct HyperArgs {
    /// reference (the Keras notebook) or fast (head warm-up, then lower lr for pretrained layers, cosine, label smoothing).
    #[arg(long, default_value = "reference")]
    recipe: Recipe,
    /// What trains (after the fast recipe's head warm-up): reference, top, head or all [recipe: reference; fast: top].
    #[arg(long)]
    trainable: Option<Policy>,
    /// adamax, adam or sgd (momentum 0.9) [recipe: adamax].
    #[arg(long)]
    optimizer: Option<OptimizerKind>,
    /// Base learning rate, the head's [recipe: 1e-2 reference, 3e-3 fast].
    #[arg(long)]
    lr: Option<f64>,
    /// constant, cosine or step [recipe: constant reference, cosine fast].
    #[arg(long)]
    lr_schedule: Option<ScheduleKind>,
    /// Label smoothing of the training loss [recipe: 0 reference, 0.1 fast].
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Dropout before the classifier [recipe: 0.5].
    #[arg(long)]
    dropout: Option<f64>,
    /// Head-only warm-up epochs before the main phase [recipe: 0 reference, 3 fast].
    #[arg(long)]
    head_epochs: Option<u32>,
    /// Learning-rate multiplier of the pretrained layers that train [recipe: 1 reference, 0.3 fast].
    #[arg(long)]
    backbone_lr_scale: Option<f64>,
    /// No random horizontal flips of training batches.
    #[arg(long)]
    no_flip: bool,
}

impl HyperArgs {
    fn resolve(&self) -> anyhow::Result<Hyper> {
        let overrides = Overrides {
            policy: self.trainable,
            optimizer: self.optimizer,
            lr: self.lr,
            label_smoothing: self.label_smoothing,
            dropout: self.dropout,
            schedule: self.lr_schedule,
            flip: self.no_flip.then_some(false),
            head_epochs: self.head_epochs,
            backbone_lr_scale: self.backbone_lr_scale,
        };
        Ok(Hyper::new(self.recipe, &overrides)?)
    }
}

#[derive(Args)]
struct EvaluateArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// The image archive (102flowers.tgz).
    #[arg(long, env = "FLOWERS_DATA")]
    data: PathBuf,
    /// imagelabels.mat.
    #[arg(long, env = "FLOWERS_LABELS")]
    labels: PathBuf,
    /// setid.mat; with --split, only that split is evaluated (default: every image).
    #[arg(long, env = "FLOWERS_SETID")]
    setid: Option<PathBuf>,
    /// test, valid or train.
    #[arg(long, default_value = "test", requires = "setid")]
    split: String,
    /// cat_to_name.json, for class names in the report.
    #[arg(long)]
    names: Option<PathBuf>,
    #[arg(long, default_value_t = 299)]
    img_size: u32,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Decoding threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    decode_threads: usize,
    /// Directory for the preprocessed pixel store [default: the system temp dir].
    #[arg(long, env = "FLOWERS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    compute: Compute,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 150)]
    img_size: u32,
    #[arg(long, default_value = "reference")]
    trainable: Policy,
    #[arg(long, default_value = "adamax")]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[command(flatten)]
    compute: Compute,
}

/// jemalloc for the whole process, libtorch's tensor buffers included. Steps run off the main
/// thread, where glibc's malloc serves them from per-thread arenas whose heaps it unmaps and
/// faults in again every step: 16% of a step at batch 8 and 299 px, 29% at batch 32
/// (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in settings (the `MALLOC_CONF` variable overrides them). Without
/// `oversize_threshold:0` it returns every buffer over 8 MiB to the OS when freed, which at
/// 299 px is most activations, and the step pays the page faults again.
#[allow(non_upper_case_globals)]
#[no_mangle]
static malloc_conf: &[u8; 21] = b"oversize_threshold:0\0";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flowers_telemetry::init();
    match Cli::parse().command {
        Command::Run(args) => run_command(*args).await,
        Command::Evaluate(args) => {
            tokio::task::spawn_blocking(move || evaluate_command(args)).await?
        }
        Command::Bench(args) => tokio::task::spawn_blocking(move || bench_command(args)).await?,
        Command::Health(args) => Ok(args.report()?),
    }
}

async fn run_command(args: RunArgs) -> anyhow::Result<()> {
    args.liveness.keep_fresh();
    let (device, _gpu) = args.compute.apply()?;
    let hyper = args.hyper.resolve()?;
    let broker_url = args.broker_url.clone().unwrap_or_else(broker_url_from_env);
    let weights = (args.weights != "none").then(|| PathBuf::from(&args.weights));
    let coordinated = match &args.coordinator {
        Some(url) => {
            let opts = CoordinatedOptions {
                client: ClientConfig::new(url.clone()).token(args.token.clone()),
                run_id: args.run_id.clone(),
                info: WorkerInfo {
                    host: host_name(),
                    device: format!("{device:?}"),
                    gpu_name: gpu_name(device).unwrap_or_default(),
                },
                wait_for_run: std::time::Duration::from_secs(args.wait_for_run),
            };
            let c = Coordinated::join(opts)
                .await
                .with_context(|| format!("joining run {} at {url}", args.run_id))?;
            if c.run_finished() {
                tracing::info!(run = %args.run_id, "the run is over: nothing to train");
                return Ok(());
            }
            Some(c)
        }
        None => None,
    };
    // A coordinated trainer takes the run's settings; given ones must agree with them.
    let (epochs, evaluations_per_epoch, num_classes, img_size, start_epoch) = match &coordinated {
        Some(c) => {
            let run = c.run_config();
            (
                agree("--epochs", args.epochs, run.epochs)?,
                run.evaluations_per_epoch.max(1),
                agree("--num-classes", args.num_classes, run.num_classes)?,
                Some(agree("--img-size", args.img_size, run.img_size)?),
                Some(c.start_epoch()),
            )
        }
        None => (
            args.epochs
                .context("--epochs is required without --coordinator")?,
            1,
            args.num_classes.unwrap_or(102),
            args.img_size,
            args.start_epoch,
        ),
    };
    let checkpoint_dir = match (&coordinated, args.checkpoint_dir) {
        (Some(c), Some(dir)) => Some(dir.join(&args.run_id).join(c.worker_id())),
        (_, dir) => dir,
    };
    let opts = RunOptions {
        broker_url,
        run_id: args.run_id,
        epochs,
        evaluations_per_epoch,
        start_epoch,
        prefetch: args.prefetch,
        broker_outage_limit: std::time::Duration::from_secs(args.broker_outage_limit),
        weights,
        resume: args.resume,
        checkpoint_dir,
        img_size,
        batch_size: args.batch_size,
        seed: args.seed,
    };
    let model = ModelOptions {
        device,
        precision: args.compute.precision,
        num_classes: i64::from(num_classes),
        variant: flowers_model::Variant::Tf2015,
        label_smoothing: hyper.label_smoothing,
        dropout: hyper.dropout,
        flip: hyper.flip,
        optimizer: hyper.optimizer,
        trunk_cache_bytes: args.trunk_cache_mib << 20,
    };
    let checkpoint = opts.checkpoint_path();
    let stop = shutdown::on_signals().context("installing signal handlers")?;
    let outcome = match coordinated {
        Some(mut c) => {
            let outcome = run(&opts, model, &hyper, &mut c, stop).await?;
            if let RunOutcome::Finished(_) = outcome {
                // The run's figures are the coordinator's: every worker's batches together.
                let status = c.run_status().await?;
                if let Some(last) = status.epochs.iter().rev().find(|e| e.validated) {
                    println!("accuracy={:.4}", last.val_accuracy);
                }
                if let Some(best) = status.best {
                    println!(
                        "best_checkpoint={} best_epoch={} best_accuracy={:.4}",
                        best.checkpoint_id, best.epoch, best.val_accuracy
                    );
                }
            }
            outcome
        }
        None => {
            let outcome = run(&opts, model, &hyper, &mut Standalone, stop).await?;
            if let RunOutcome::Finished(Some(m)) = &outcome {
                println!("accuracy={:.4}", m.top1);
            }
            outcome
        }
    };
    match outcome {
        RunOutcome::Finished(_) => {}
        RunOutcome::Interrupted { epoch, stage } => match &checkpoint {
            Some(path) => tracing::info!(
                epoch,
                ?stage,
                "interrupted; resume with --resume {}",
                path.display()
            ),
            None => tracing::info!(
                epoch,
                ?stage,
                "interrupted (no --checkpoint-dir: nothing saved)"
            ),
        },
    }
    Ok(())
}

/// `given` when it matches the run's `value` (or is absent: then `value`).
fn agree(flag: &str, given: Option<u32>, value: u32) -> anyhow::Result<u32> {
    match given {
        Some(g) if g != value => {
            anyhow::bail!("{flag} {g} differs from the coordinator's run, which has {value}")
        }
        _ => Ok(value),
    }
}

/// This machine's name, for the coordinator's worker list.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn evaluate_command(args: EvaluateArgs) -> anyhow::Result<()> {
    let (device, _gpu) = args.compute.apply()?;
    let split = match &args.setid {
        Some(setid) => Some((setid.clone(), parse_split(&args.split)?)),
        None => None,
    };
    let opts = EvaluateOptions {
        checkpoint: args.checkpoint,
        data: args.data,
        labels: args.labels,
        split,
        class_names: args.names,
        img_size: args.img_size,
        batch_size: args.batch_size,
        threads: args.decode_threads,
        cache_dir: args.cache_dir.unwrap_or_else(std::env::temp_dir),
        device,
        precision: args.compute.precision,
    };
    println!("{}", evaluate(&opts)?.report);
    Ok(())
}

fn bench_command(args: BenchArgs) -> anyhow::Result<()> {
    let (device, _gpu) = args.compute.apply()?;
    let opts = BenchOptions {
        device,
        precision: args.compute.precision,
        batch_size: args.batch_size,
        img_size: args.img_size,
        policy: args.trainable,
        optimizer: args.optimizer,
        lr: args.lr,
        warmup: args.warmup,
        steps: args.steps,
        seed: 0,
    };
    let r = bench(&opts)?;
    println!(
        "device={device:?} precision={} threads={} batch_size={} img_size={} trainable={} optimizer={} steps={}",
        args.compute.precision.effective(device),
        tch::get_num_threads(),
        args.batch_size,
        args.img_size,
        args.trainable,
        args.optimizer,
        r.steps
    );
    println!("step_ms={:.1}", r.step_ms());
    println!("images_per_s={:.2}", r.images_per_sec());
    Ok(())
}
