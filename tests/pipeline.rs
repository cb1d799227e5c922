//! The whole system end to end, as real processes against the real local RabbitMQ: a
//! coordinator, the loader and two trainers train 10 classes of the shared archive at 75 px
//! for 2 epochs from the pretrained weights, validating halfway through each epoch
//! (`--eval-every 0.5`) and at its end. Then the same with faults: a trainer killed with
//! SIGKILL mid-epoch, and the coordinator killed and restarted mid-run.

use flowers_coordinator_client::{ClientConfig, CoordinatorClient};
use flowers_e2e::{
    archive_in, assert_every_epoch_complete, broker_url, flowers_dir, free_port,
    pretrained_weights, unique_run_id, workspace_binary, Service,
};
use flowers_proto::v1 as pb;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const EPOCHS: u32 = 2;
/// `--eval-every 0.5`: halfway and at the end of each epoch.
const EVALUATIONS: u32 = 2;
const CLASSES: u32 = 10;
const IMG: u32 = 75;
const BATCH: u32 = 16;
const TOKEN: &str = "e2e-token";
/// A whole run takes well under a minute here; generous for a loaded CI machine.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// The runs share two cores: one at a time.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::const_new(());

struct Cluster {
    dir: tempfile::TempDir,
    run_id: String,
    port: u16,
    coordinator: Service,
    loader: Service,
    trainers: Vec<Service>,
    client: CoordinatorClient,
}

impl Cluster {
    fn start(prefix: &str, trainers: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let run_id = unique_run_id(prefix);
        let coordinator = start_coordinator(dir.path(), port, "coordinator");
        let data = flowers_dir();
        let mut loader = Command::new(workspace_binary("loader"));
        loader
            .args(["run", "--run-id", &run_id])
            .arg("--data")
            .arg(archive_in(&data))
            .arg("--labels")
            .arg(data.join("imagelabels.mat"))
            .args(["--classes", &CLASSES.to_string()])
            .args(["--epochs", &EPOCHS.to_string()])
            .args(["--eval-every", &(1.0 / f64::from(EVALUATIONS)).to_string()])
            .args(["--img-size", &IMG.to_string()])
            .args(["--batch-size", &BATCH.to_string()])
            .args(["--threads", "1"])
            .args(["--broker-url", &broker_url()])
            .args(["--coordinator", &coordinator_url(port)])
            .args(["--token", TOKEN])
            .arg("--cache-dir")
            .arg(dir.path());
        let loader = Service::spawn("loader", loader, dir.path());
        let trainers = (0..trainers)
            .map(|i| start_trainer(dir.path(), port, &run_id, i))
            .collect();
        let client = CoordinatorClient::connect(
            &ClientConfig::new(coordinator_url(port)).token(Some(TOKEN.to_string())),
        )
        .expect("coordinator client");
        Cluster {
            dir,
            run_id,
            port,
            coordinator,
            loader,
            trainers,
            client,
        }
    }

    fn logs(&self) -> String {
        let mut all = vec![self.coordinator.log_tail(15), self.loader.log_tail(10)];
        all.extend(self.trainers.iter().map(|t| t.log_tail(15)));
        all.join("\n")
    }

    async fn status(&self) -> Option<pb::RunStatus> {
        self.client.get_run(&self.run_id, false).await.ok()
    }

    /// Waits until `done` holds for the run's status, failing with the logs at the deadline
    /// or when a trainer exits with an error.
    async fn wait_for(
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
            for t in &mut self.trainers {
                if let Some(code) = t.exited() {
                    assert!(
                        code.success(),
                        "{} failed: {code}\n{}",
                        t.name,
                        t.log_tail(30)
                    );
                }
            }
            assert!(
                start.elapsed() < RUN_DEADLINE,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_finished(&mut self) -> pb::RunStatus {
        self.wait_for("the run to finish", |s| {
            s.state == pb::RunState::Finished as i32
        })
        .await
    }

    /// `flowersctl status RUN --json`, parsed.
    fn flowersctl_status(&self) -> serde_json::Value {
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
    fn assert_complete(&self, status: &pb::RunStatus) {
        let json = self.flowersctl_status();
        assert_eq!(json["state"], "finished", "{json:#}");
        assert_every_epoch_complete(status, EPOCHS);
        for epoch in &status.epochs {
            assert_eq!(epoch.interim.len() as u32, EVALUATIONS - 1, "{epoch:?}");
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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The run's queues go with it, so the broker is left as it was found.
        let run_id = self.run_id.clone();
        let url = broker_url();
        let cleanup = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                if let Ok(conn) = flowers_broker::connect(&url, "e2e-cleanup").await {
                    let layout =
                        flowers_broker::RunLayout::epochs(EPOCHS).with_evaluations(EVALUATIONS);
                    let _ = flowers_broker::delete_run_queues(&conn, &run_id, layout).await;
                }
            })
        });
        let _ = cleanup.join();
        let _ = &self.dir;
    }
}

fn coordinator_url(port: u16) -> String {
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

fn start_trainer(dir: &Path, port: u16, run_id: &str, index: usize) -> Service {
    let mut cmd = Command::new(workspace_binary("trainer"));
    cmd.args(["run", "--run-id", run_id])
        .args(["--coordinator", &coordinator_url(port), "--token", TOKEN])
        .args(["--broker-url", &broker_url()])
        .arg("--weights")
        .arg(pretrained_weights())
        .args(["--recipe", "fast", "--threads", "1", "--device", "cpu"])
        .arg("--checkpoint-dir")
        .arg(dir.join(format!("trainer-{index}")))
        .args(["--seed", &index.to_string()]);
    Service::spawn(&format!("trainer-{index}"), cmd, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_train_every_batch_once_and_learn() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start("e2e-run", 2);
    let status = cluster.wait_finished().await;
    cluster.assert_complete(&status);

    let trained: u32 = status.epochs.iter().map(|e| e.train_batches_total).sum();
    assert_eq!(
        status.steps, trained as u64,
        "no batch was trained twice without a fault"
    );
    assert_eq!(status.workers.len(), 2, "{:?}", status.workers);
    assert!(
        status.workers.iter().all(|w| w.steps > 0),
        "both trainers trained: {:?}",
        status.workers
    );
    for e in &status.epochs {
        eprintln!(
            "epoch {}: train loss {:.3} acc {:.3}, validation acc {:.3} top-5 {:.3} (halfway {:.3})",
            e.epoch,
            e.train_loss,
            e.train_accuracy,
            e.val_accuracy,
            e.val_top5_accuracy,
            e.interim[0].val_accuracy
        );
    }
    let last = status.epochs.last().unwrap();
    let chance = 1.0 / CLASSES as f32;
    assert!(
        last.val_accuracy > 3.0 * chance,
        "pretrained InceptionV3 learns 10 classes well above chance: {:?}\n{}",
        status.epochs,
        cluster.logs()
    );
    assert!(
        cluster.loader.exited().is_some_and(|s| s.success()),
        "{}",
        cluster.loader.log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_mid_epoch_loses_no_batch() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start("e2e-kill", 2);
    cluster
        .wait_for("both trainers to train in epoch 0", |s| {
            s.current_epoch == 0 && s.workers.len() == 2 && s.workers.iter().all(|w| w.steps >= 1)
        })
        .await;
    // Out of the cluster's list, so its SIGKILL exit is not taken for a failure.
    let mut killed = cluster.trainers.remove(0);
    killed.kill();
    let status = cluster.wait_finished().await;
    cluster.assert_complete(&status);
    let lost = status
        .workers
        .iter()
        .filter(|w| w.state == pb::WorkerState::Lost as i32)
        .count();
    assert_eq!(
        lost, 1,
        "the killed trainer is marked lost: {:?}",
        status.workers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_mid_run_completes_the_run() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start("e2e-restart", 2);
    cluster
        .wait_for("training in epoch 0", |s| s.steps >= 2)
        .await;
    cluster.coordinator.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.coordinator =
        start_coordinator(cluster.dir.path(), cluster.port, "coordinator-restarted");
    let status = cluster.wait_finished().await;
    cluster.assert_complete(&status);
}
