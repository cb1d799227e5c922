//! A run through faults of its broker and its loader, each on a RabbitMQ node of the test's
//! own ([`PrivateBroker`]), which the test stops and starts, or a queue of which it purges: the coordinator, the
//! loader and two trainers as real processes, on 10 classes of the shared archive at 75 px.
//! Every case ends with every training batch of every epoch counted once, validation
//! complete, and every process exited 0.

use flowers_e2e::local::{LocalRun, LocalRunOptions};
use flowers_e2e::rabbit::PrivateBroker;
use flowers_proto::v1 as pb;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The runs share two cores: one at a time.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Three epochs, the loader held to a few queued batches so it is still publishing when the
/// fault comes, and quick to replay what the broker lost; `delivery` of batch messages.
fn options(prefix: &'static str, broker: &PrivateBroker, delivery: &str) -> LocalRunOptions {
    let args = [
        "--max-queued-batches",
        "6",
        "--replay-after",
        "4",
        "--delivery",
        delivery,
    ];
    LocalRunOptions {
        epochs: 3,
        loader_args: args.map(String::from).to_vec(),
        ..LocalRunOptions::new(prefix, broker.url())
    }
}

fn log_of(service: &flowers_e2e::Service) -> String {
    std::fs::read_to_string(&service.log).unwrap_or_default()
}

/// Batches trained more than once: steps beyond the run's training batches.
fn trained_twice(status: &pb::RunStatus) -> u64 {
    let batches: u64 = status
        .epochs
        .iter()
        .map(|e| u64::from(e.train_batches_total))
        .sum();
    status.steps - batches
}

/// Stops the broker for 5 s once both trainers train in epoch 1 (longer than they take to use
/// what they had prefetched), starts it again and lets the run finish.
async fn broker_restart(prefix: &'static str, delivery: &str) -> LocalRun {
    let broker = PrivateBroker::start(prefix, &[]);
    let started = Instant::now();
    let mut run = LocalRun::start(options(prefix, &broker, delivery));
    let before = run
        .wait_for("both trainers training in epoch 1", |s| {
            s.current_epoch == 1 && s.workers.iter().filter(|w| w.steps > 0).count() == 2
        })
        .await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stopped = run.status().await.expect("run status");
    assert_ne!(
        stopped.state,
        pb::RunState::Finished as i32,
        "the fault came mid-run"
    );
    broker.start_again();
    let back = Instant::now();
    let steps = stopped.steps;
    run.wait_for("a step after the broker came back", |s| s.steps > steps)
        .await;
    let first_step = back.elapsed();
    let status = run.wait_finished().await;
    run.assert_complete(&status);
    run.assert_all_exit_zero().await;
    eprintln!(
        "{delivery}: broker down 5 s in epoch 1 (after {} steps): first step {:.1} s after it came back, {} batches trained twice; run {:.0} s",
        before.steps,
        first_step.as_secs_f64(),
        trained_twice(&status),
        started.elapsed().as_secs_f64()
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_epoch_loses_no_persistent_batch() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let run = broker_restart("faults-persistent", "persistent").await;
    assert!(
        !log_of(&run.loader).contains("replaying"),
        "persistent batches survive the restart: nothing to replay\n{}",
        run.loader.log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_batches_lost_with_the_broker_are_replayed() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let run = broker_restart("faults-transient", "transient").await;
    assert!(
        log_of(&run.loader).contains("replaying"),
        "the broker's restart dropped the queued transient batches: they were replayed\n{}",
        run.loader.log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_queue_is_replayed() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let broker = PrivateBroker::start("faults-purge", &[]);
    let mut run = LocalRun::start(options("faults-purge", &broker, "persistent"));
    // The next epoch's queue, filled ahead while the trainers are still in epoch 1: what the
    // purge drops is surely lost (a purge of the current queue may find it all prefetched).
    let queue = flowers_broker::train_queue(&run.run_id, 2);
    let conn = flowers_broker::connect(&broker.url(), "test")
        .await
        .unwrap();
    let mut purged = 0;
    while purged == 0 {
        let s = run
            .wait_for("training in epoch 1", |s| s.current_epoch == 1)
            .await;
        assert_eq!(
            s.current_epoch, 1,
            "epoch 2's batches were purged before it began"
        );
        if flowers_broker::message_count(&conn, &queue).await.unwrap() > Some(0) {
            purged = flowers_broker::purge_queue(&conn, &queue).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = run.wait_finished().await;
    run.assert_complete(&status);
    run.assert_all_exit_zero().await;
    assert!(
        log_of(&run.loader).contains("replaying"),
        "{}",
        run.loader.log_tail(30)
    );
    eprintln!(
        "purged {purged} batches of train.2: {} batches trained twice",
        trained_twice(&status)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_killed_mid_run_resumes_and_one_started_after_the_run_publishes_nothing() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let broker = PrivateBroker::start("faults-loader", &[]);
    let mut run = LocalRun::start(options("faults-loader", &broker, "persistent"));
    // In epoch 1: a loader that started the run over would publish epoch 0 into a queue the
    // trainers have left.
    run.wait_for("training in epoch 1", |s| {
        s.current_epoch == 1 && s.epochs[1].train_batches_done >= 1
    })
    .await;
    run.loader.kill();
    let killed = log_of(&run.loader);
    assert!(
        !killed.contains("loader finished"),
        "killed while publishing\n{killed}"
    );
    run.restart_loader();
    let status = run.wait_finished().await;
    run.assert_complete(&status);
    run.assert_all_exit_zero().await;
    let resumed = log_of(&run.loader);
    assert!(
        resumed.contains("resuming the run"),
        "{}",
        run.loader.log_tail(30)
    );
    eprintln!(
        "loader killed in epoch 0: {} batches trained twice",
        trained_twice(&status)
    );

    run.restart_loader();
    run.assert_all_exit_zero().await;
    assert!(
        log_of(&run.loader).contains("the run is over: nothing to publish"),
        "{}",
        run.loader.log_tail(10)
    );
    let after = run.status().await.expect("run status");
    assert_eq!(after.steps, status.steps, "nothing trained again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainers_ride_out_consumer_timeouts() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    // Deliveries held unacked over a second close the channel: with 8 prefetched and steps of
    // a few tenths of a second, and sync rounds holding them too, that happens all along.
    let broker = PrivateBroker::start_with(
        "faults-timeout",
        &["consumer_timeout = 1000"],
        "[{rabbit, [{channel_tick_interval, 200}]}].",
    );
    let mut opts = options("faults-timeout", &broker, "persistent");
    opts.trainer_args = vec!["--prefetch".into(), "8".into()];
    let mut run = LocalRun::start(opts);
    let status = run.wait_finished().await;
    run.assert_complete(&status);
    run.assert_all_exit_zero().await;
    let timeouts: usize = run
        .trainers
        .iter()
        .map(|t| log_of(t).matches("timed out").count())
        .sum();
    assert!(
        timeouts > 0,
        "the broker closed channels for the timeout\n{}",
        run.logs()
    );
    eprintln!(
        "consumer_timeout 1 s, prefetch 8: {timeouts} channels closed for it, {} batches trained twice",
        trained_twice(&status)
    );
}
