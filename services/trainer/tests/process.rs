//! The `trainer` binary against the local RabbitMQ: a trainer killed with SIGKILL loses no
//! batch; SIGTERM saves a checkpoint and exits 0, and `--resume` finishes the epoch with every
//! batch trained exactly once.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A `trainer run` child whose log lines arrive on `lines`.
struct Trainer {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Trainer {
    fn start(run: &str, prefetch: u16, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["run", "--run-id", run, "--epochs", "1", "--weights", "none"])
            .args(["--prefetch", &prefetch.to_string(), "--img-size", "75"])
            // Every parameter trains: steps slow enough to act during one.
            .args([
                "--trainable",
                "all",
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--threads",
                "1",
            ])
            .args(extra)
            .env("FLOWERS_BROKER_URL", broker_url())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Trainer {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Collects log lines until one satisfies `pred`.
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let hit = pred(&line);
            self.log.push(line);
            if hit {
                return;
            }
        }
        panic!(
            "no such log line within {timeout:?}; log:\n{}",
            self.log.join("\n")
        );
    }

    /// Waits for the exit and collects the remaining log.
    fn finish(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The readers end at EOF once the process is gone.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.log.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "trainer still running after {timeout:?}; log:\n{}",
                    self.log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Batch indices of the steps logged so far.
    fn trained(&self) -> Vec<u32> {
        self.log.iter().filter_map(|l| step_batch(l)).collect()
    }
}

/// The batch index of a step's log line (`... metrics=epoch=0 step=1 batch=3 loss=...`).
fn step_batch(line: &str) -> Option<u32> {
    let rest = &line[line.find("metrics=epoch=")?..];
    let b = rest.find(" batch=")? + " batch=".len();
    rest[b..].split_whitespace().next()?.parse().ok()
}

fn is_step(line: &str) -> bool {
    step_batch(line).is_some()
}

/// Polls until the queue's ready count is `want` (the broker requeues asynchronously).
async fn wait_ready(run: &str, which: &str, want: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = ready(run, which, 0).await;
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_leaves_the_unacked_batches_in_the_queue() {
    let run_id = unique_run("kill");
    const BATCHES: u32 = 16;
    publish(
        &run_id,
        RunLayout::epochs(1),
        &epochs(&run_id, 1, BATCHES, 1),
    )
    .await;
    // A prefetch as large as the queue: the trainer holds every batch, unacked but the ones
    // it has trained.
    let mut t = Trainer::start(&run_id, BATCHES as u16, &[]);
    t.wait_for(is_step, Duration::from_secs(180));
    assert_eq!(
        ready(&run_id, "train", 0).await,
        0,
        "all batches delivered to the trainer"
    );
    t.child.kill().unwrap(); // SIGKILL, mid-way through the next step
    t.finish(Duration::from_secs(30));
    let trained = t.trained();
    assert!(
        !trained.is_empty() && (trained.len() as u32) < BATCHES,
        "{trained:?}"
    );
    let back = wait_ready(&run_id, "train", BATCHES - trained.len() as u32).await;
    assert_eq!(
        back,
        BATCHES - trained.len() as u32,
        "every batch not acked (the one in hand included) is back in the queue"
    );
    cleanup(&run_id, RunLayout::epochs(1)).await;
}

fn progress(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("latest.progress.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_and_resume_trains_the_rest_once() {
    let run_id = unique_run("term");
    const BATCHES: u32 = 10;
    publish(
        &run_id,
        RunLayout::epochs(1),
        &epochs(&run_id, 1, BATCHES, 1),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ckpt_dir = dir.path().to_str().unwrap();

    let mut t = Trainer::start(&run_id, 2, &["--checkpoint-dir", ckpt_dir]);
    t.wait_for(is_step, Duration::from_secs(180));
    let term = Command::new("kill")
        .args(["-TERM", &t.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = t.finish(Duration::from_secs(120));
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        t.log.join("\n")
    );
    let first = t.trained();
    assert!(
        !first.is_empty() && (first.len() as u32) < BATCHES,
        "{first:?}"
    );
    let p = progress(dir.path());
    assert_eq!(p["progress"]["stage"], "Train");
    let mut done: Vec<u32> = serde_json::from_value(p["progress"]["done"].clone()).unwrap();
    done.sort_unstable();
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(
        done, sorted,
        "the checkpoint records exactly the trained batches"
    );
    assert_eq!(p["step"], first.len());
    assert_eq!(
        wait_ready(&run_id, "train", BATCHES - first.len() as u32).await,
        BATCHES - first.len() as u32,
        "prefetched batches went back to the queue"
    );

    let resume = dir.path().join("latest.safetensors");
    let mut t2 = Trainer::start(
        &run_id,
        2,
        &[
            "--checkpoint-dir",
            ckpt_dir,
            "--resume",
            resume.to_str().unwrap(),
        ],
    );
    let status = t2.finish(Duration::from_secs(300));
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        t2.log.join("\n")
    );
    assert!(
        t2.log.iter().any(|l| l.starts_with("accuracy=")),
        "{}",
        t2.log.join("\n")
    );
    let mut counts = BTreeMap::new();
    for b in first.iter().chain(&t2.trained()) {
        *counts.entry(*b).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        (0..BATCHES).map(|b| (b, 1)).collect::<BTreeMap<_, _>>(),
        "every batch trained exactly once across both trainers"
    );
    assert_eq!(ready(&run_id, "train", 0).await, 0);
    assert_eq!(ready(&run_id, "val", 0).await, 0);
    let meta = flowers_model::read_checkpoint_meta(&resume).unwrap();
    assert_eq!((meta.epoch, meta.step), (1, u64::from(BATCHES)));
    cleanup(&run_id, RunLayout::epochs(1)).await;
}
