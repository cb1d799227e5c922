//! [`LocalRun`]: a coordinator, the loader and trainers as real processes on this host, on one
//! run of the shared archive at 75 px, against a broker of the test's choice.

use crate::{
    archive_in, assert_every_epoch_complete, flowers_dir, free_port, pretrained_weights,
    unique_run_id, workspace_binary, Service,
};
use flowers_coordinator_client::{ClientConfig, CoordinatorClient};
use flowers_proto::v1 as pb;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "e2e-token";
pub const IMG: u32 = 75;
pub const BATCH: u32 = 16;
/// A whole run takes well under a minute here; generous for a loaded CI machine.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// What a [`LocalRun`] trains and how its services are started.
#[derive(Debug, Clone)]
pub struct LocalRunOptions {
    /// Starts the run id.
    pub prefix: &'static str,
    pub broker_url: String,
    pub trainers: usize,
    pub epochs: u32,
    /// Evaluations per epoch (the loader's `--eval-every 1/n`).
    pub evaluations: u32,
    /// Classes of the shared archive (the first N).
    pub classes: u32,
    /// Appended to the loader's and every trainer's `run` arguments.
    pub loader_args: Vec<String>,
    pub trainer_args: Vec<String>,
}

impl LocalRunOptions {
    pub fn new(prefix: &'static str, broker_url: String) -> Self {
        Self {
            prefix,
            broker_url,
            trainers: 2,
            epochs: 2,
            evaluations: 1,
            classes: 10,
            loader_args: Vec::new(),
            trainer_args: Vec::new(),
        }
    }
}

/// The services of one run (see the module docs); every process is killed when dropped.
pub struct LocalRun {
    pub opts: LocalRunOptions,
    pub dir: tempfile::TempDir,
    pub run_id: String,
    pub port: u16,
    pub coordinator: Service,
    pub loader: Service,
    pub trainers: Vec<Service>,
    pub client: CoordinatorClient,
    /// Loaders started so far (names the logs of restarted ones).
    loaders: usize,
}

impl LocalRun {
    pub fn start(opts: LocalRunOptions) -> LocalRun {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let run_id = unique_run_id(opts.prefix);
        let coordinator = start_coordinator(dir.path(), port, "coordinator");
        let loader = Service::spawn(
            "loader",
            loader_command(&opts, dir.path(), port, &run_id),
            dir.path(),
        );
        let trainers = (0..opts.trainers)
            .map(|i| start_trainer(&opts, dir.path(), port, &run_id, i))
            .collect();
        let client = CoordinatorClient::connect(
            &ClientConfig::new(coordinator_url(port)).token(Some(TOKEN.to_string())),
        )
        .expect("coordinator client");
        LocalRun {
            opts,
            dir,
            run_id,
            port,
            coordinator,
            loader,
            trainers,
            client,
            loaders: 1,
        }
    }

    /// A new loader process in place of the current one (which should have ended).
    pub fn restart_loader(&mut self) {
        self.loaders += 1;
        let cmd = loader_command(&self.opts, self.dir.path(), self.port, &self.run_id);
        self.loader = Service::spawn(&format!("loader-{}", self.loaders), cmd, self.dir.path());
    }

    /// A new coordinator process on the same port and state folder.
    pub fn restart_coordinator(&mut self) {
        self.coordinator = start_coordinator(self.dir.path(), self.port, "coordinator-restarted");
    }

    pub fn logs(&self) -> String {
        let mut all = vec![self.coordinator.log_tail(15), self.loader.log_tail(15)];
        all.extend(self.trainers.iter().map(|t| t.log_tail(15)));
        all.join("\n")
    }

    pub async fn status(&self) -> Option<pb::RunStatus> {
        self.client.get_run(&self.run_id, false).await.ok()
    }

    /// Waits until `done` holds for the run's status, failing with the logs at the deadline
    /// or when a trainer or the loader exits with an error.
    pub async fn wait_for(
        &mut self,
        what: &str,
        done: impl Fn(&pb::RunStatus) -> bool,
    ) -> pb::RunStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.status().await {
                if done(&status) {
                    return status;
                }
            }
            for service in self
                .trainers
                .iter_mut()
                .chain(std::iter::once(&mut self.loader))
            {
                if let Some(code) = service.exited() {
                    assert!(
                        code.success(),
                        "{} failed: {code}\n{}",
                        service.name,
                        service.log_tail(30)
                    );
                }
            }
            assert!(
                start.elapsed() < RUN_DEADLINE,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_finished(&mut self) -> pb::RunStatus {
        self.wait_for("the run to finish", |s| {
            s.state == pb::RunState::Finished as i32
        })
        .await
    }

    /// `flowersctl status RUN --json`, parsed.
    pub fn flowersctl_status(&self) -> serde_json::Value {
        let out = Command::new(workspace_binary("flowersctl"))
            .args([
                "--coordinator",
                &coordinator_url(self.port),
                "--token",
                TOKEN,
            ])
            .args(["status", &self.run_id, "--json"])
            .output()
            .expect("run flowersctl");
        assert!(
            out.status.success(),
            "flowersctl status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("flowersctl status --json prints JSON")
    }

    /// Checks what every run must end with, whatever happened on the way.
    pub fn assert_complete(&self, status: &pb::RunStatus) {
        let json = self.flowersctl_status();
        assert_eq!(json["state"], "finished", "{json:#}");
        assert_every_epoch_complete(status, self.opts.epochs);
        for epoch in &status.epochs {
            assert_eq!(
                epoch.interim.len() as u32,
                self.opts.evaluations - 1,
                "{epoch:?}"
            );
            for interim in &epoch.interim {
                assert!(interim.validated, "{epoch:?}");
                assert_eq!(interim.val_batches_done, epoch.val_batches_total);
            }
        }
        let best = status.best.as_ref().expect("a best checkpoint");
        // Checkpoint paths are relative to the coordinator's --state-dir.
        let path = self.dir.path().join("coordinator-state").join(&best.path);
        assert!(path.exists(), "best checkpoint {} on disk", path.display());
    }

    /// Waits for every trainer and the loader to exit, and checks that each exited 0.
    pub async fn assert_all_exit_zero(&mut self) {
        let start = Instant::now();
        for service in self
            .trainers
            .iter_mut()
            .chain(std::iter::once(&mut self.loader))
        {
            let code = loop {
                if let Some(code) = service.exited() {
                    break code;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "{} did not exit after the run finished\n{}",
                    service.name,
                    service.log_tail(30)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert!(
                code.success(),
                "{} exited {code}\n{}",
                service.name,
                service.log_tail(30)
            );
        }
    }
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        // The run's queues go with it, so the broker is left as it was found.
        let (run_id, url) = (self.run_id.clone(), self.opts.broker_url.clone());
        let layout = flowers_broker::RunLayout::epochs(self.opts.epochs)
            .with_evaluations(self.opts.evaluations);
        let cleanup = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                if let Ok(conn) = flowers_broker::connect(&url, "e2e-cleanup").await {
                    let _ = flowers_broker::delete_run_queues(&conn, &run_id, layout).await;
                }
            })
        });
        let _ = cleanup.join();
    }
}

pub fn coordinator_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn start_coordinator(dir: &Path, port: u16, name: &str) -> Service {
    let mut cmd = Command::new(workspace_binary("coordinator"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.join("coordinator-state"))
        .args(["--token", TOKEN])
        .args(["--sync-every", "4"])
        .args(["--worker-timeout", "4"]);
    Service::spawn(name, cmd, dir)
}

fn loader_command(opts: &LocalRunOptions, dir: &Path, port: u16, run_id: &str) -> Command {
    let data = flowers_dir();
    let mut loader = Command::new(workspace_binary("loader"));
    loader
        .args(["run", "--run-id", run_id])
        .arg("--data")
        .arg(archive_in(&data))
        .arg("--labels")
        .arg(data.join("imagelabels.mat"))
        .args(["--classes", &opts.classes.to_string()])
        .args(["--epochs", &opts.epochs.to_string()])
        .args(["--img-size", &IMG.to_string()])
        .args(["--batch-size", &BATCH.to_string()])
        .args(["--threads", "1"])
        .args(["--broker-url", &opts.broker_url])
        .args(["--coordinator", &coordinator_url(port)])
        .args(["--token", TOKEN])
        .arg("--cache-dir")
        .arg(dir)
        .args(&opts.loader_args);
    if opts.evaluations > 1 {
        loader.args([
            "--eval-every",
            &(1.0 / f64::from(opts.evaluations)).to_string(),
        ]);
    }
    loader
}

fn start_trainer(
    opts: &LocalRunOptions,
    dir: &Path,
    port: u16,
    run_id: &str,
    index: usize,
) -> Service {
    let mut cmd = Command::new(workspace_binary("trainer"));
    cmd.args(["run", "--run-id", run_id])
        .args(["--coordinator", &coordinator_url(port), "--token", TOKEN])
        .args(["--broker-url", &opts.broker_url])
        .arg("--weights")
        .arg(pretrained_weights())
        .args(["--recipe", "fast", "--threads", "1", "--device", "cpu"])
        .arg("--checkpoint-dir")
        .arg(dir.join(format!("trainer-{index}")))
        .args(["--seed", &index.to_string()])
        .args(&opts.trainer_args);
    Service::spawn(&format!("trainer-{index}"), cmd, dir)
}
