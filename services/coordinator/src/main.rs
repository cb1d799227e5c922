//! The coordinator service: runs, epochs, workers, validation and checkpoint sync over gRPC.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use flowers_coordinator::{serve, Coordinator, CoordinatorConfig, ServeOptions};
use flowers_coordinator_client::coordinator_serving;
use flowers_shutdown::Signals;

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask a running coordinator's gRPC health service whether it serves runs: exit 0 when it
    /// does, 1 otherwise (container health checks; needs no token).
    Probe(ProbeArgs),
}

#[derive(Args, Debug)]
struct ProbeArgs {
    /// The coordinator to ask (plain HTTP/2).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    address: String,
    /// Seconds to wait for the connection and the answer.
    #[arg(long, default_value_t = 3.0)]
    timeout: f64,
}

/// Serving (the command when no subcommand is given).
#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLOWERS_LISTEN", default_value = "0.0.0.0:50051")]
    listen: String,
    /// Directory holding every run's state and checkpoints; a restart resumes from it.
    #[arg(long, env = "FLOWERS_STATE_DIR", default_value = "coordinator-state")]
    state_dir: PathBuf,
    /// Bearer token every call must carry.
    #[arg(long, env = "FLOWERS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve without authentication (development only).
    #[arg(long, conflicts_with = "token")]
    insecure_no_auth: bool,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "FLOWERS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, env = "FLOWERS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds without a heartbeat after which a worker is marked lost.
    #[arg(long, env = "FLOWERS_WORKER_TIMEOUT", default_value_t = 30.0)]
    worker_timeout: f64,
    /// Average the workers' parameters every this many steps of a worker (0: only at epoch ends).
    #[arg(long, env = "FLOWERS_SYNC_EVERY", default_value_t = 100)]
    sync_every: u32,
    /// Largest parameter upload accepted, in MiB.
    #[arg(long, env = "FLOWERS_MAX_UPLOAD_MIB", default_value_t = 2048)]
    max_upload_mib: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flowers_telemetry::init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Probe(args)) => probe(args).await,
        None => run(cli.serve).await,
    }
}

async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .with_context(|| format!("--timeout {}", args.timeout))?;
    let serving = coordinator_serving(&args.address, timeout)
        .await
        .with_context(|| format!("probing the coordinator at {}", args.address))?;
    if !serving {
        bail!("the coordinator at {} is not serving", args.address);
    }
    println!("serving");
    Ok(())
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let token = match (args.token, args.insecure_no_auth) {
        (Some(t), _) if t.is_empty() => bail!("--token / FLOWERS_TOKEN is empty"),
        (Some(t), _) => Some(t),
        (None, true) => {
            tracing::warn!("serving without authentication (--insecure-no-auth)");
            None
        }
        (None, false) => bail!("set --token (or FLOWERS_TOKEN), or pass --insecure-no-auth"),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((
            std::fs::read(cert)
                .with_context(|| format!("reading TLS certificate {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("reading TLS key {}", key.display()))?,
        )),
        _ => None,
    };
    if !(args.worker_timeout.is_finite() && args.worker_timeout > 0.0) {
        bail!(
            "--worker-timeout must be a positive number of seconds, got {}",
            args.worker_timeout
        );
    }
    let config = CoordinatorConfig {
        state_dir: args.state_dir.clone(),
        sync_every: args.sync_every,
        worker_timeout: Duration::from_secs_f64(args.worker_timeout),
        max_upload_bytes: args.max_upload_mib << 20,
    };
    let coordinator = Coordinator::open(config)
        .with_context(|| format!("opening state directory {}", args.state_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let mut signals = Signals::install().context("installing signal handlers")?;
    let shutdown = async move {
        let signal = signals.recv().await;
        tracing::info!("{signal}");
    };
    serve(coordinator, listener, ServeOptions { token, tls }, shutdown).await?;
    Ok(())
}
