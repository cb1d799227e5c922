//! `flowersctl predict` on generated JPEGs with tiny checkpoints: a trainer's file, and a
//! coordinator average fetched with `--run` from an in-process coordinator.
//!
//! The checkpoints have a zero classifier weight and a chosen bias, so the probabilities are
//! known exactly whatever the (random) backbone computes: softmax(bias).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flowers_coordinator::testing::{client_config, serve_on_free_port};
use flowers_coordinator::{CoordinatorConfig, ServerHandle};
use flowers_coordinator_client::{CoordinatorClient, WorkerInfo};
use flowers_model::{
    save_checkpoint, tensor_file, CheckpointMeta, InceptionV3, ModelConfig, Policy, Variant,
};
use flowers_proto::v1 as pb;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const CLASSES: i64 = 5;

fn flowersctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowersctl"))
        .args(args)
        .env("RUST_LOG", "error")
        .env_remove("FLOWERS_WEIGHTS")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A randomly initialised 5-class model whose head is `fc.weight = 0`, `fc.bias = bias`.
fn tiny_model(bias: &[f32]) -> (VarStore, InceptionV3) {
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let model = InceptionV3::new(
        &vs.root(),
        ModelConfig::new(CLASSES, Variant::Torchvision, Policy::Head),
    );
    let vars = vs.variables();
    tch::no_grad(|| {
        let mut weight = vars["fc.weight"].shallow_clone();
        weight.copy_(&weight.zeros_like());
        vars["fc.bias"]
            .shallow_clone()
            .copy_(&Tensor::from_slice(bias));
    });
    (vs, model)
}

fn softmax(bias: &[f32]) -> Vec<f32> {
    let sum: f32 = bias.iter().map(|b| b.exp()).sum();
    bias.iter().map(|b| b.exp() / sum).collect()
}

/// Two generated JPEGs (one not square) and a text file.
fn inputs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let image = |w: usize, h: usize, seed: usize| {
        let rgb: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * seed + i / 97) % 256) as u8)
            .collect();
        flowers_imaging::encode_rgb_jpeg(&rgb, w, h, 90).unwrap()
    };
    let a = dir.join("a.jpg");
    let b = dir.join("b.jpg");
    let text = dir.join("readme.txt");
    std::fs::write(&a, image(100, 80, 3)).unwrap();
    std::fs::write(&b, image(90, 90, 11)).unwrap();
    std::fs::write(&text, "not a picture\n").unwrap();
    (a, b, text)
}

/// `(image, [(probability, name line)])` blocks of the text output.
fn parse(stdout: &str) -> Vec<(String, Vec<(f32, String)>)> {
    let mut blocks: Vec<(String, Vec<(f32, String)>)> = Vec::new();
    for line in stdout.lines() {
        if let Some(row) = line.strip_prefix("  ") {
            let (p, name) = row.split_once("  ").unwrap();
            blocks
                .last_mut()
                .unwrap()
                .1
                .push((p.parse().unwrap(), name.to_string()));
        } else {
            blocks.push((line.to_string(), Vec::new()));
        }
    }
    blocks
}

fn check_block(block: &(String, Vec<(f32, String)>), image: &Path, want: &[(f32, &str)]) {
    assert_eq!(block.0, image.display().to_string());
    let rows = &block.1;
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.windows(2).all(|w| w[0].0 >= w[1].0), "{rows:?}");
    let sum: f32 = rows.iter().map(|r| r.0).sum();
    assert!(sum <= 1.0 + 5e-4, "{rows:?}");
    for ((p, name), (want_p, want_name)) in rows.iter().zip(want) {
        assert!((p - want_p).abs() < 1e-4, "{rows:?}");
        assert_eq!(name, want_name);
    }
}

#[test]
fn trainer_checkpoint_top5_names_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, text) = inputs(dir.path());
    let bias = [0.0, 1.0, 4.0, 0.5, -1.0];
    let (vs, _model) = tiny_model(&bias);
    let ckpt = dir.path().join("trainer.safetensors");
    let meta = CheckpointMeta {
        step: 10,
        epoch: 1,
        policy: Policy::Head,
        variant: Variant::Torchvision,
        num_classes: CLASSES,
        img_size: 75,
        optimizer: None,
    };
    save_checkpoint(&ckpt, &vs, None, &meta).unwrap();

    let p = softmax(&bias);
    // The bundled cat_to_name.json names classes 1..5 so.
    let want = [
        (p[2], "canterbury bells (3)"),
        (p[1], "hard-leaved pocket orchid (2)"),
        (p[3], "sweet pea (4)"),
        (p[0], "pink primrose (1)"),
        (p[4], "english marigold (5)"),
    ];
    let (ok, out, err) = flowersctl(&[
        "predict",
        "--checkpoint",
        path_str(&ckpt),
        "--device",
        "cpu",
        path_str(&a),
        path_str(&b),
    ]);
    assert!(ok, "{err}");
    let blocks = parse(&out);
    assert_eq!(blocks.len(), 2, "{out}");
    check_block(&blocks[0], &a, &want);
    check_block(&blocks[1], &b, &want);

    // Names from a file; --top; JSON.
    let names = dir.path().join("names.json");
    std::fs::write(
        &names,
        r#"{"1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}"#,
    )
    .unwrap();
    let (ok, out, err) = flowersctl(&[
        "predict",
        "--checkpoint",
        path_str(&ckpt),
        "--class-names",
        path_str(&names),
        "--top",
        "2",
        "--json",
        "--device",
        "cpu",
        path_str(&a),
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let top = json[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(
        (&top[0]["name"], &top[0]["class"]),
        (&"three".into(), &3.into())
    );
    assert_eq!(top[1]["name"], "two");
    assert!((top[0]["probability"].as_f64().unwrap() - f64::from(p[2])).abs() < 1e-5);

    // A non-image among the images: failure naming it, nothing on stdout.
    let (ok, out, err) = flowersctl(&[
        "predict",
        "--checkpoint",
        path_str(&ckpt),
        path_str(&a),
        path_str(&text),
    ]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("readme.txt") && err.contains("JPEG"), "{err}");

    // Not a checkpoint.
    let (ok, _, err) = flowersctl(&["predict", "--checkpoint", path_str(&text), path_str(&a)]);
    assert!(!ok);
    assert!(err.contains("readme.txt"), "{err}");
}

async fn start_coordinator(dir: &Path) -> ServerHandle {
    let config = CoordinatorConfig {
        sync_every: 0,
        worker_timeout: Duration::from_secs(30),
        ..CoordinatorConfig::new(dir)
    };
    serve_on_free_port(config, None).await.unwrap()
}

/// Registers a 5-class 75 px run and completes one sync round whose average is `upload`.
async fn run_with_average(server: &ServerHandle, upload: Vec<u8>) -> String {
    let c = CoordinatorClient::connect(&client_config(server, None)).unwrap();
    let config = pb::RunConfig {
        dataset: "flowers".into(),
        split: "stratified".into(),
        img_size: 75,
        batch_size: 4,
        epochs: 1,
        train_batches_per_epoch: 1,
        val_batches_per_epoch: 1,
        seed: 1,
        num_classes: CLASSES as u32,
        train_images: 4,
        val_images: 4,
        evaluations_per_epoch: 1,
    };
    let run = c
        .register_run(config, Some("predict-run"))
        .await
        .unwrap()
        .run_id;
    let info = WorkerInfo {
        host: "test".into(),
        device: "cpu".into(),
        gpu_name: String::new(),
    };
    let w = c
        .register_worker(&run, &info, None)
        .await
        .unwrap()
        .worker_id;
    let step = pb::StepMetrics {
        epoch: 0,
        batch_index: 0,
        images: 4,
        loss: 1.0,
        accuracy: 0.5,
        images_per_s: 10.0,
        data_wait_s: 0.0,
        step_s: 0.1,
        step: 1,
    };
    let d = c
        .report_steps(&run, &w, 1, vec![step])
        .await
        .unwrap()
        .directives
        .unwrap();
    assert!(d.sync_round > 0);
    c.sync_parameters(&run, &w, d.sync_round, 4, upload)
        .await
        .unwrap();
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_average_over_pretrained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _, _) = inputs(dir.path());
    // The "pretrained weights": a whole model whose head favours class 1, which the average
    // must replace (its head favours class 5).
    let (weights_vs, _m) = tiny_model(&[9.0, 0.0, 0.0, 0.0, 0.0]);
    let weights = dir.path().join("pretrained.safetensors");
    let vars = weights_vs.variables();
    let meta = HashMap::from([("variant".to_string(), "torchvision".to_string())]);
    tensor_file::write(&weights, vars.iter().map(|(n, t)| (n.as_str(), t)), &meta).unwrap();

    // What a worker syncs under the `head` policy: the classifier.
    let bias = [0.0f32, 0.5, 1.0, -2.0, 5.0];
    let zeros = Tensor::zeros([CLASSES, 2048], (Kind::Float, Device::Cpu));
    let upload_file = dir.path().join("upload.safetensors");
    tensor_file::write(
        &upload_file,
        [
            ("fc.weight", &zeros),
            ("fc.bias", &Tensor::from_slice(&bias)),
        ],
        &HashMap::new(),
    )
    .unwrap();
    let server = start_coordinator(&dir.path().join("state")).await;
    let run = run_with_average(&server, std::fs::read(&upload_file).unwrap()).await;

    let url = server.url();
    let (a_s, w_s) = (path_str(&a).to_string(), path_str(&weights).to_string());
    let out = tokio::task::spawn_blocking(move || {
        flowersctl(&[
            "--coordinator",
            &url,
            "predict",
            "--run",
            &run,
            "--weights",
            &w_s,
            "--device",
            "cpu",
            &a_s,
        ])
    })
    .await
    .unwrap();
    let (ok, out, err) = out;
    assert!(ok, "{err}");
    let p = softmax(&bias);
    let want = [
        (p[4], "english marigold (5)"),
        (p[2], "canterbury bells (3)"),
        (p[1], "hard-leaved pocket orchid (2)"),
        (p[0], "pink primrose (1)"),
        (p[3], "sweet pea (4)"),
    ];
    let blocks = parse(&out);
    assert_eq!(blocks.len(), 1, "{out}");
    check_block(&blocks[0], &a, &want);

    // Downloaded, the average has no image size of its own, and it needs the weights file.
    let (url, a_s) = (server.url(), path_str(&a).to_string());
    let avg = dir.path().join("avg.safetensors");
    let avg_s = path_str(&avg).to_string();
    let missing = dir.path().join("no-weights.safetensors");
    let missing_s = path_str(&missing).to_string();
    let (no_size, no_weights) = tokio::task::spawn_blocking(move || {
        let (ok, _, err) = flowersctl(&[
            "--coordinator",
            &url,
            "download",
            "predict-run",
            "--output",
            &avg_s,
        ]);
        assert!(ok, "{err}");
        (
            flowersctl(&["predict", "--checkpoint", &avg_s, &a_s]),
            flowersctl(&[
                "predict",
                "--checkpoint",
                &avg_s,
                "--img-size",
                "75",
                "--weights",
                &missing_s,
                &a_s,
            ]),
        )
    })
    .await
    .unwrap();
    assert!(!no_size.0);
    assert!(
        no_size.2.contains("avg.safetensors") && no_size.2.contains("--img-size"),
        "{}",
        no_size.2
    );
    assert!(!no_weights.0);
    assert!(
        no_weights.2.contains("no-weights.safetensors") && no_weights.2.contains("--weights"),
        "{}",
        no_weights.2
    );
}
