//! The whole system end to end, as real processes against the real local RabbitMQ: a
//! coordinator, the loader and two trainers train 10 classes of the shared archive at 75 px
//! for 2 epochs from the pretrained weights, validating halfway through each epoch
//! (`--eval-every 0.5`) and at its end. Then the same with faults: a trainer killed with
//! SIGKILL mid-epoch, and the coordinator killed and restarted mid-run.

use flowers_e2e::broker_url;
use flowers_e2e::local::{LocalRun, LocalRunOptions};
use flowers_proto::v1 as pb;
use std::time::Duration;
use tokio::sync::Mutex;

const CLASSES: u32 = 10;

/// The runs share two cores: one at a time.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Two trainers, 2 epochs, evaluated halfway (`--eval-every 0.5`) and at the end of each.
fn start(prefix: &'static str) -> LocalRun {
    LocalRun::start(LocalRunOptions {
        evaluations: 2,
        classes: CLASSES,
        ..LocalRunOptions::new(prefix, broker_url())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_train_every_batch_once_and_learn() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let mut cluster = start("e2e-run");
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
    cluster.assert_all_exit_zero().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_mid_epoch_loses_no_batch() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let mut cluster = start("e2e-kill");
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
    let mut cluster = start("e2e-restart");
    cluster
        .wait_for("training in epoch 0", |s| s.steps >= 2)
        .await;
    cluster.coordinator.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart_coordinator();
    let status = cluster.wait_finished().await;
    cluster.assert_complete(&status);
}
