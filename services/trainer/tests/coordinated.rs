//! Two trainers sharing a run under an in-process coordinator, against the local RabbitMQ: every
//! batch trained once across both, parameters averaged in rounds that both join, each epoch
//! validated by the coordinator halfway (an interim evaluation) and at its end, the run finished
//! with a best checkpoint.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flowers_coordinator::testing::{client_config, serve_on_free_port};
use flowers_coordinator::{CoordinatorConfig, ServerHandle};
use flowers_coordinator_client::{CoordinatorClient, WorkerInfo};
use flowers_model::{tensor_file, Policy};
use flowers_proto::v1 as pb;
use flowers_trainer::coordinated::{Coordinated, CoordinatedOptions};
use flowers_trainer::coordination::Coordination;
use flowers_trainer::recipe::{Hyper, Overrides, Recipe};
use flowers_trainer::run::{run, RunOptions, RunOutcome};
use flowers_trainer::state::TrainState;
use flowers_trainer::worker::Worker;

const TOKEN: &str = "t0ken";
const EPOCHS: u32 = 2;
const TRAIN_BATCHES: u32 = 6;
const VAL_BATCHES: u32 = 2;
/// Halfway through each epoch and at its end.
const EVALUATIONS: u32 = 2;

fn layout() -> RunLayout {
    RunLayout::epochs(EPOCHS).with_evaluations(EVALUATIONS)
}

async fn start_coordinator(dir: &Path) -> ServerHandle {
    let config = CoordinatorConfig {
        // Periodic rounds within an epoch too, not only the epoch-end ones.
        sync_every: 2,
        worker_timeout: Duration::from_secs(10),
        ..CoordinatorConfig::new(dir)
    };
    serve_on_free_port(config, Some(TOKEN)).await.unwrap()
}

/// The run as the loader registers it (see `common::epochs`: the last training batch has 2 images).
fn run_config() -> pb::RunConfig {
    pb::RunConfig {
        dataset: "generated".into(),
        split: "stratified".into(),
        img_size: IMG,
        batch_size: 4,
        epochs: EPOCHS,
        train_batches_per_epoch: TRAIN_BATCHES,
        val_batches_per_epoch: VAL_BATCHES,
        seed: 3,
        num_classes: CLASSES,
        train_images: (TRAIN_BATCHES - 1) * 4 + 2,
        val_images: VAL_BATCHES * 4,
        evaluations_per_epoch: EVALUATIONS,
    }
}

async fn train(coordinated: &mut Coordinated, run_id: &str, seed: u64) -> RunOutcome {
    let opts = RunOptions {
        broker_url: broker_url(),
        run_id: run_id.to_owned(),
        epochs: coordinated.run_config().epochs,
        evaluations_per_epoch: coordinated.run_config().evaluations_per_epoch.max(1),
        start_epoch: Some(coordinated.start_epoch()),
        prefetch: 1,
        broker_outage_limit: std::time::Duration::from_secs(30),
        weights: None,
        resume: None,
        checkpoint_dir: None,
        img_size: Some(coordinated.run_config().img_size),
        batch_size: Some(4),
        seed,
    };
    assert_eq!(coordinated.run_config().num_classes, CLASSES);
    // The head alone: cheap steps; the coordination is what is under test.
    let hyper = Hyper::new(
        Recipe::Reference,
        &Overrides {
            policy: Some(Policy::Head),
            ..Default::default()
        },
    )
    .unwrap();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    run(&opts, cpu_model(false), &hyper, coordinated, stop)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_share_a_run_through_the_coordinator() {
    let started = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let server = start_coordinator(state.path()).await;
    let run_id = unique_run("coord");
    let client = CoordinatorClient::connect(&client_config(&server, Some(TOKEN))).unwrap();
    let join = |host: &str| {
        Coordinated::join(CoordinatedOptions {
            client: client_config(&server, Some(TOKEN)),
            run_id: run_id.clone(),
            info: WorkerInfo {
                host: host.into(),
                device: "Cpu".into(),
                gpu_name: String::new(),
            },
            wait_for_run: Duration::from_secs(5),
        })
    };
    // A trainer may start before the loader registers the run: it waits.
    let (a, ()) = tokio::join!(join("a"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .register_run(run_config(), Some(&run_id))
            .await
            .unwrap();
        let mut batches = epochs(&run_id, EPOCHS, TRAIN_BATCHES, VAL_BATCHES);
        for e in 0..EPOCHS {
            batches.extend(interim(&run_id, e, VAL_BATCHES, 1));
        }
        publish(&run_id, layout(), &batches).await;
    });
    let (mut a, mut b) = (a.unwrap(), join("b").await.unwrap());
    assert_ne!(a.worker_id(), b.worker_id());
    assert_eq!(a.run_config().epochs, EPOCHS);
    let (out_a, out_b) = tokio::join!(train(&mut a, &run_id, 1), train(&mut b, &run_id, 2));
    assert!(matches!(out_a, RunOutcome::Finished(_)), "{out_a:?}");
    assert!(matches!(out_b, RunOutcome::Finished(_)), "{out_b:?}");

    let status = client.get_run(&run_id, false).await.unwrap();
    assert_eq!(status.state, pb::RunState::Finished as i32);
    assert_eq!(
        status.steps,
        u64::from(EPOCHS * TRAIN_BATCHES),
        "no batch trained twice"
    );
    for e in &status.epochs {
        assert_eq!(
            (e.train_batches_done, e.val_batches_done),
            (TRAIN_BATCHES, VAL_BATCHES),
            "epoch {}: every batch counted once",
            e.epoch
        );
        assert!(e.trained && e.validated, "epoch {}", e.epoch);
        assert!(
            (0.0..=1.0).contains(&e.val_accuracy) && e.val_loss > 0.0,
            "{e:?}"
        );
        let halfway = &e.interim[..];
        assert_eq!(halfway.len(), 1, "{e:?}");
        assert!(
            halfway[0].validated
                && halfway[0].val_batches_done == VAL_BATCHES
                && halfway[0].after_train_batches == TRAIN_BATCHES / 2
                && halfway[0].val_loss > 0.0,
            "{e:?}"
        );
    }
    // Both worked: their steps add up to the run's.
    let steps: Vec<u64> = status.workers.iter().map(|w| w.steps).collect();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps.iter().sum::<u64>(), status.steps);

    // The best checkpoint is an evaluation round's average of both workers, usable on its own.
    let best = status.best.expect("a best checkpoint");
    let (info, bytes) = client
        .get_checkpoint(&run_id, Some(&best.checkpoint_id))
        .await
        .unwrap();
    assert!(info.best);
    let file = tensor_file::from_bytes(Path::new("best"), &bytes).unwrap();
    let mut workers: Vec<&str> = file.metadata["workers"].split(',').collect();
    workers.sort_unstable();
    let mut expected = vec![a.worker_id(), b.worker_id()];
    expected.sort_unstable();
    assert_eq!(
        workers, expected,
        "both workers joined the evaluation round"
    );
    assert_eq!(file.metadata["variant"], "torchvision");
    assert_eq!(file.metadata["img_size"], IMG.to_string());
    assert_eq!(file.metadata["num_classes"], CLASSES.to_string());
    assert_eq!(
        file.tensors.keys().collect::<Vec<_>>(),
        ["fc.bias", "fc.weight"]
    );
    // Rounds: periodic ones (sync_every 2) besides the four evaluation ones.
    assert!(
        status.sync_round > u64::from(EPOCHS * EVALUATIONS),
        "{}",
        status.sync_round
    );

    // A late joiner starts from the run's latest average.
    let mut late = join("late").await.unwrap();
    assert!(late.run_finished());
    let worker = Arc::new(
        Worker::spawn("late", || {
            TrainState::new(cpu_model(false), Policy::Head, 1.0, None)
        })
        .await
        .unwrap(),
    );
    late.started(&worker, &[Policy::Head]).await.unwrap();
    let (_, latest) = client
        .get_checkpoint(&run_id, Some(&status.latest_checkpoint_id))
        .await
        .unwrap();
    let latest = tensor_file::from_bytes(Path::new("latest"), &latest).unwrap();
    let loaded = worker
        .call(|st| st.var_store().variables()["fc.weight"].copy())
        .await
        .unwrap();
    assert!(loaded.equal(&latest.tensors["fc.weight"]));

    for e in 0..EPOCHS {
        assert_eq!(ready(&run_id, "train", e).await, 0, "train.{e} drained");
        assert_eq!(ready(&run_id, "val", e).await, 0, "val.{e} drained");
        assert_eq!(ready(&run_id, "val1", e).await, 0, "val.{e}.1 drained");
    }
    assert_eq!(ready(&run_id, "dead", 0).await, 0);
    drop((a, b, late));
    cleanup(&run_id, layout()).await;
    server.shutdown().await.unwrap();
    eprintln!(
        "two coordinated trainers: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn cli_refuses_settings_that_differ_from_the_run() {
    let state = tempfile::tempdir().unwrap();
    let server = start_coordinator(state.path()).await;
    let run_id = unique_run("cli");
    let client = CoordinatorClient::connect(&client_config(&server, Some(TOKEN))).unwrap();
    client
        .register_run(run_config(), Some(&run_id))
        .await
        .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["run", "--coordinator", &server.url(), "--run-id", &run_id])
        .args(["--epochs", "3", "--weights", "none", "--device", "cpu"])
        .env("FLOWERS_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--epochs 3 differs from the coordinator's run, which has 2"),
        "{stderr}"
    );
    server.shutdown().await.unwrap();
}
