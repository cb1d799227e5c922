//! flowersctl against an in-process coordinator over real gRPC.

use std::process::Command;
use std::time::Duration;

use flowers_coordinator::testing::{client_config, serve_on_free_port};
use flowers_coordinator::{CoordinatorConfig, ServerHandle};
use flowers_coordinator_client::{CoordinatorClient, WorkerInfo};
use flowers_proto::v1 as pb;
use safetensors::tensor::{Dtype, TensorView};

const TOKEN: &str = "cli-token";

fn flowersctl(server: &ServerHandle, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowersctl"))
        .args(["--coordinator", &server.url(), "--token", token])
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn weights(v: f32) -> Vec<u8> {
    let data: Vec<u8> = [v, v * 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    safetensors::serialize(
        [(
            "fc.weight",
            TensorView::new(Dtype::F32, vec![2], &data).unwrap(),
        )],
        None,
    )
    .unwrap()
}

fn step(epoch: u32, batch: u32, loss: f32) -> pb::StepMetrics {
    pb::StepMetrics {
        epoch,
        batch_index: batch,
        images: 8,
        loss,
        accuracy: 0.5,
        images_per_s: 64.0,
        data_wait_s: 0.01,
        step_s: 0.1,
        step: 0,
    }
}

/// A run of 2 epochs (2 training, 1 validation batch each) with the first
/// epoch trained, averaged and validated.
async fn run_one_epoch(c: &CoordinatorClient) -> (String, Vec<u8>) {
    let config = pb::RunConfig {
        dataset: "flowers".into(),
        split: "stratified".into(),
        img_size: 64,
        batch_size: 8,
        epochs: 2,
        train_batches_per_epoch: 2,
        val_batches_per_epoch: 1,
        seed: 1,
        num_classes: 102,
        train_images: 16,
        val_images: 8,
        evaluations_per_epoch: 1,
    };
    let run = c
        .register_run(config, Some("cli-run"))
        .await
        .unwrap()
        .run_id;
    let info = WorkerInfo {
        host: "gpu-box".into(),
        device: "cuda:0".into(),
        gpu_name: "H200".into(),
    };
    let w = c
        .register_worker(&run, &info, None)
        .await
        .unwrap()
        .worker_id;
    let d = c
        .report_steps(&run, &w, 1, vec![step(0, 0, 3.0), step(0, 1, 2.0)])
        .await
        .unwrap()
        .directives
        .unwrap();
    let avg = c
        .sync_parameters(&run, &w, d.sync_round, 16, weights(1.5))
        .await
        .unwrap();
    let batch = pb::BatchEvaluation {
        batch_index: 0,
        images: 8,
        correct: 6,
        correct_top5: 8,
        loss_sum: 4.0,
    };
    assert!(
        c.report_evaluation(&run, &w, 0, 0, vec![batch])
            .await
            .unwrap()
            .evaluation_complete
    );
    c.report_steps(&run, &w, 2, vec![step(1, 0, 1.0)])
        .await
        .unwrap();
    (run, avg)
}

async fn start(dir: &std::path::Path) -> (ServerHandle, CoordinatorClient) {
    let config = CoordinatorConfig {
        sync_every: 0,
        worker_timeout: Duration::from_secs(30),
        ..CoordinatorConfig::new(dir)
    };
    let server = serve_on_free_port(config, Some(TOKEN)).await.unwrap();
    let client = CoordinatorClient::connect(&client_config(&server, Some(TOKEN))).unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_runs_and_checkpoints_as_json_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let (server, c) = start(dir.path()).await;
    let (run, _) = run_one_epoch(&c).await;

    let (ok, out, err) = flowersctl(&server, TOKEN, &["status", &run, "--json"]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["run_id"], run);
    assert_eq!(s["state"], "running");
    assert_eq!(s["current_epoch"], 1);
    assert_eq!(s["steps"], 3);
    assert_eq!(s["epochs"][0]["validated"], true);
    assert_eq!(s["epochs"][0]["val_accuracy"], 0.75);
    assert_eq!(s["epochs"][0]["train_loss"], 2.5);
    assert_eq!(s["epochs"][1]["train_batches_done"], 1);
    assert_eq!(s["workers"][0]["gpu_name"], "H200");
    assert_eq!(s["workers"][0]["state"], "active");
    assert_eq!(s["best"]["epoch"], 0);
    assert_eq!(s["best"]["val_accuracy"], 0.75);

    // Without a run id: the newest running run.
    let (ok, out, err) = flowersctl(&server, TOKEN, &["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("run cli-run  running"), "{out}");
    assert!(out.contains("epoch 2/2"), "{out}");
    let epoch1 = out
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        epoch1.contains("2/2 ✓") && epoch1.contains("75.00%"),
        "{epoch1}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("w1") && l.contains("gpu-box") && l.contains("active")),
        "{out}"
    );
    assert!(
        out.contains("best: round-000001 at epoch 1: validation accuracy 75.00%"),
        "{out}"
    );

    let (ok, out, err) = flowersctl(&server, TOKEN, &["runs", "--json"]);
    assert!(ok, "{err}");
    let runs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1);

    let (ok, out, _) = flowersctl(&server, TOKEN, &["checkpoints", &run]);
    assert!(ok);
    assert!(
        out.lines().nth(1).unwrap().starts_with("round-000001") && out.contains("best"),
        "{out}"
    );

    let (ok, _, err) = flowersctl(&server, "wrong", &["runs"]);
    assert!(!ok);
    assert!(err.contains("wrong bearer token"), "{err}");
    let (ok, _, err) = flowersctl(&server, TOKEN, &["status", "missing-run"]);
    assert!(!ok && err.contains("unknown run"), "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_is_byte_exact_and_plots_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (server, c) = start(dir.path()).await;
    let (run, avg) = run_one_epoch(&c).await;
    let out_dir = tempfile::tempdir().unwrap();

    let file = out_dir.path().join("best.safetensors");
    let (ok, _, err) = flowersctl(
        &server,
        TOKEN,
        &["download", &run, "-o", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), avg);

    for name in ["curves.png", "curves.svg"] {
        let path = out_dir.path().join(name);
        let (ok, _, err) = flowersctl(
            &server,
            TOKEN,
            &["plot", &run, "-o", path.to_str().unwrap()],
        );
        assert!(ok, "{err}");
        let bytes = std::fs::read(&path).unwrap();
        if name.ends_with("png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            let mut png = png::Decoder::new(std::io::Cursor::new(&bytes))
                .read_info()
                .expect("a PNG header");
            let mut pixels = vec![0; png.output_buffer_size().unwrap()];
            let frame = png.next_frame(&mut pixels).expect("the PNG decodes");
            assert_eq!((frame.width, frame.height), (1000, 800));
        } else {
            let svg = String::from_utf8(bytes).unwrap();
            assert!(
                svg.contains("<svg") && svg.contains("validation accuracy"),
                "{svg}"
            );
        }
    }
    if let Ok(keep) = std::env::var("FLOWERSCTL_KEEP_PLOT") {
        std::fs::copy(out_dir.path().join("curves.png"), keep).unwrap();
    }
    let (ok, _, err) = flowersctl(&server, TOKEN, &["plot", &run, "-o", "curves.jpg"]);
    assert!(!ok && err.contains(".png or .svg"), "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_run_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (server, c) = start(dir.path()).await;
    let (run, _) = run_one_epoch(&c).await;
    let url = server.url();
    let (subscribed, wait_subscribed) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowersctl"))
            .args(["--coordinator", &url, "--token", TOKEN, "watch", "cli-run"])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = String::new();
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if line.starts_with("following run") {
                subscribed.send(()).unwrap();
            }
            stdout.push_str(&line);
            stdout.push('\n');
        }
        (child.wait_with_output().unwrap(), stdout)
    });
    // The first snapshot line: the watch stream is up, so no later event is missed.
    tokio::task::spawn_blocking(move || wait_subscribed.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("watch never showed the run");
    // Finish epoch 2.
    let w = "w1";
    let d = c
        .report_steps(&run, w, 3, vec![step(1, 1, 0.5)])
        .await
        .unwrap()
        .directives
        .unwrap();
    c.sync_parameters(&run, w, d.sync_round, 16, weights(2.0))
        .await
        .unwrap();
    let batch = pb::BatchEvaluation {
        batch_index: 0,
        images: 8,
        correct: 7,
        correct_top5: 8,
        loss_sum: 2.0,
    };
    c.report_evaluation(&run, w, 1, 0, vec![batch])
        .await
        .unwrap();
    let (out, stdout) = tokio::task::spawn_blocking(move || watcher.join().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("following run cli-run at epoch 2/2\n"),
        "{stdout}"
    );
    assert!(stdout.contains("epoch 2 trained"), "{stdout}");
    assert!(
        stdout.contains("epoch 2 validated: accuracy 87.50%"),
        "{stdout}"
    );
    assert!(
        stdout.contains("run finished: best validation accuracy 87.50% at epoch 2"),
        "{stdout}"
    );
    server.shutdown().await.unwrap();
}
