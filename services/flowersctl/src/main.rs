//! flowersctl: the coordinator's command-line client, and `predict` with a trained checkpoint.

mod plot;
mod predict;
mod render;
mod watch;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use atomic_write_file::AtomicWriteFile;
use clap::{Parser, Subcommand};
use flowers_coordinator_client::{Backoff, ClientConfig, CoordinatorClient};
use flowers_proto::v1 as pb;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Inspect and follow training runs on a flowers coordinator"
)]
struct Cli {
    /// Coordinator address (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "FLOWERS_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Bearer token.
    #[arg(long, global = true, env = "FLOWERS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate to trust for an https coordinator.
    #[arg(long, global = true, env = "FLOWERS_CA_CERT")]
    ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List runs.
    Runs {
        #[arg(long)]
        json: bool,
    },
    /// A run's epochs, workers, validation accuracy and best checkpoint.
    Status {
        /// Run id (default: the newest running run, else the newest run).
        run: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Follow a run live: progress bars for the epoch and its validation.
    Watch { run: Option<String> },
    /// List a run's checkpoints.
    Checkpoints {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Download a checkpoint (default: the best, else the latest) as safetensors.
    Download {
        run: String,
        checkpoint: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Plot training loss/accuracy and validation accuracy per epoch (.png or .svg).
    Plot {
        run: String,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Top-5 flowers in JPEG images under a checkpoint (a file, or a run's best).
    Predict(predict::PredictArgs),
}

/// The run to show when none is named: the newest running one, else the newest.
async fn pick_run(client: &CoordinatorClient, run: Option<String>) -> anyhow::Result<String> {
    if let Some(run) = run {
        return Ok(run);
    }
    let runs = client.list_runs().await?;
    let newest = |running: bool| {
        runs.iter()
            .filter(|r| !running || r.state == pb::RunState::Running as i32)
            .max_by(|a, b| a.created_at.total_cmp(&b.created_at))
    };
    match newest(true).or_else(|| newest(false)) {
        Some(r) => Ok(r.run_id.clone()),
        None => bail!("the coordinator has no runs yet"),
    }
}

fn json_out(value: serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    flowers_telemetry::init();
    // One readable line for the person at the terminal, whatever RUST_BACKTRACE says.
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ca_cert = match &cli.ca_cert {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?,
        ),
        None => None,
    };
    // An interactive tool should say quickly that the coordinator is down.
    let retry = Backoff {
        initial: Duration::from_millis(200),
        max_delay: Duration::from_secs(1),
        give_up_after: Duration::from_secs(3),
    };
    let config = ClientConfig {
        ca_cert,
        ..ClientConfig::new(&cli.coordinator)
            .token(cli.token.clone())
            .retry(retry)
    };
    let client = CoordinatorClient::connect(&config)?;
    match cli.command {
        Command::Runs { json } => {
            let runs = client.list_runs().await?;
            if json {
                json_out(serde_json::Value::Array(
                    runs.iter().map(render::run_json).collect(),
                ))?;
            } else {
                print!("{}", render::runs_table(&runs));
            }
        }
        Command::Status { run, json } => {
            let run = pick_run(&client, run).await?;
            let status = client.get_run(&run, false).await?;
            if json {
                json_out(render::run_json(&status))?;
            } else {
                print!("{}", render::status_text(&status));
            }
        }
        Command::Watch { run } => {
            let run = pick_run(&client, run).await?;
            watch::watch(&client, &run).await?;
        }
        Command::Checkpoints { run, json } => {
            let checkpoints = client.list_checkpoints(&run).await?;
            if json {
                json_out(serde_json::Value::Array(
                    checkpoints.iter().map(render::checkpoint_json).collect(),
                ))?;
            } else {
                print!("{}", render::checkpoints_table(&checkpoints));
            }
        }
        Command::Download {
            run,
            checkpoint,
            output,
        } => {
            let (info, bytes) = client.get_checkpoint(&run, checkpoint.as_deref()).await?;
            save_atomically(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "{} ({} bytes, epoch {}, round {}) -> {}",
                info.checkpoint_id,
                bytes.len(),
                info.epoch,
                info.sync_round,
                output.display()
            );
        }
        Command::Plot { run, output } => {
            let status = client.get_run(&run, true).await?;
            plot::plot(&status, &output)?;
            println!("{}", output.display());
        }
        Command::Predict(args) => predict::predict(&client, args).await?,
    }
    Ok(())
}

/// Writes `bytes` to `path` (creating its directory) so that an interrupted download leaves
/// the old file or none, never a partial one.
fn save_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = AtomicWriteFile::open(path)?;
    file.write_all(bytes)?;
    file.commit()
}
