//! The coordinator over real gRPC: a server started in-process on a free port.

use std::path::Path;
use std::time::Duration;

use flowers_coordinator::testing::{client_config, serve_on_free_port};
use flowers_coordinator::{Coordinator, CoordinatorConfig, ServeOptions, ServerHandle};
use flowers_coordinator_client::{Backoff, ClientConfig, CoordinatorClient, WorkerInfo};
use flowers_proto::v1 as pb;
use safetensors::tensor::SafeTensors;
use tonic::Code;

const TOKEN: &str = "s3cret";

async fn start(dir: &Path, sync_every: u32, worker_timeout_ms: u64) -> ServerHandle {
    let config = CoordinatorConfig {
        sync_every,
        worker_timeout: Duration::from_millis(worker_timeout_ms),
        ..CoordinatorConfig::new(dir)
    };
    serve_on_free_port(config, Some(TOKEN)).await.unwrap()
}

fn client(server: &ServerHandle) -> CoordinatorClient {
    CoordinatorClient::connect(&client_config(server, Some(TOKEN))).unwrap()
}

fn config(epochs: u32, train: u32, val: u32) -> pb::RunConfig {
    pb::RunConfig {
        dataset: "flowers-test".into(),
        split: "stratified".into(),
        img_size: 32,
        batch_size: 4,
        epochs,
        train_batches_per_epoch: train,
        val_batches_per_epoch: val,
        seed: 7,
        num_classes: 102,
        train_images: train * 4,
        val_images: val * 4,
        evaluations_per_epoch: 1,
    }
}

fn tensors(entries: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    flowers_coordinator::testing::f32_safetensors(entries).unwrap()
}

fn read(bytes: &[u8], name: &str) -> Vec<f32> {
    flowers_coordinator::testing::f32_values(bytes, name).unwrap()
}

fn step(epoch: u32, batch: u32) -> pb::StepMetrics {
    pb::StepMetrics {
        step: 0,
        epoch,
        batch_index: batch,
        images: 4,
        loss: 2.0,
        accuracy: 0.25,
        images_per_s: 100.0,
        data_wait_s: 0.01,
        step_s: 0.04,
    }
}

async fn worker(c: &CoordinatorClient, run: &str, host: &str) -> String {
    let info = WorkerInfo {
        host: host.into(),
        device: "cpu".into(),
        gpu_name: String::new(),
    };
    c.register_worker(run, &info, None).await.unwrap().worker_id
}

#[tokio::test]
async fn averaging_of_known_tensors_is_the_exact_weighted_mean_and_downloads_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2, 5_000).await;
    let c = client(&server);
    let run = c
        .register_run(config(1, 8, 1), Some("avg"))
        .await
        .unwrap()
        .run_id;
    let (w1, w2) = (worker(&c, &run, "a").await, worker(&c, &run, "b").await);

    let r = c
        .report_steps(&run, &w1, 1, vec![step(0, 0), step(0, 1)])
        .await
        .unwrap();
    let round = r.directives.unwrap().sync_round;
    assert_eq!(round, 1, "sync_every=2 steps opens round 1");
    assert_eq!(
        c.heartbeat(&run, &w2).await.unwrap().sync_round,
        1,
        "every active worker takes part"
    );

    // More than one chunk each way: 3 MiB of zeros plus the tensor under test.
    let big = vec![0.0f32; 3 << 18];
    let a = tensors(&[
        ("fc.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        ("big", vec![big.len()], big.clone()),
    ]);
    let b = tensors(&[
        ("fc.weight", vec![2, 2], vec![5.0, 6.0, 7.0, -8.0]),
        ("big", vec![big.len()], big.clone()),
    ]);
    let (ca, cb) = (c.clone(), c.clone());
    let (run_a, run_b, wa, wb) = (run.clone(), run.clone(), w1.clone(), w2.clone());
    let ta = tokio::spawn(async move { ca.sync_parameters(&run_a, &wa, round, 4, a).await });
    let tb = tokio::spawn(async move { cb.sync_parameters(&run_b, &wb, round, 12, b).await });
    let (avg_a, avg_b) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
    assert_eq!(avg_a, avg_b);
    // (4*x + 12*y) / 16
    assert_eq!(read(&avg_a, "fc.weight"), vec![4.0, 5.0, 6.0, -5.0]);
    assert_eq!(read(&avg_a, "big").len(), big.len());

    let listed = c.list_checkpoints(&run).await.unwrap();
    assert_eq!(listed.len(), 1);
    let (info, downloaded) = c
        .get_checkpoint(&run, Some(&listed[0].checkpoint_id))
        .await
        .unwrap();
    assert_eq!(info.sync_round, 1);
    assert_eq!(downloaded, avg_a, "download is byte-exact");
    let on_disk = std::fs::read(dir.path().join(format!(
        "runs/{run}/checkpoints/{}.safetensors",
        info.checkpoint_id
    )))
    .unwrap();
    assert_eq!(downloaded, on_disk);
    let meta = SafeTensors::read_metadata(&downloaded).unwrap().1;
    assert_eq!(meta.metadata().as_ref().unwrap()["samples"], "16");

    // A retry of the completed round gets the same average instead of an error.
    let again = c
        .sync_parameters(
            &run,
            &w1,
            round,
            4,
            tensors(&[("fc.weight", vec![2, 2], vec![0.0; 4])]),
        )
        .await
        .unwrap();
    assert_eq!(again, avg_a);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_round_completes_when_one_of_three_workers_stops_heartbeating() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1, 300).await;
    let c = client(&server);
    let run = c.register_run(config(1, 8, 1), None).await.unwrap().run_id;
    let w: Vec<String> = vec![
        worker(&c, &run, "a").await,
        worker(&c, &run, "b").await,
        worker(&c, &run, "c").await,
    ];
    let round = c
        .report_steps(&run, &w[0], 1, vec![step(0, 0)])
        .await
        .unwrap()
        .directives
        .unwrap()
        .sync_round;
    assert_eq!(round, 1);
    let mut tasks = Vec::new();
    for (i, id) in w[..2].iter().enumerate() {
        let (c, run, id) = (c.clone(), run.clone(), id.clone());
        let t = tensors(&[("w", vec![1], vec![i as f32 * 2.0])]);
        tasks.push(tokio::spawn(async move {
            c.sync_parameters(&run, &id, round, 1, t).await
        }));
    }
    // Worker c never heartbeats again; the round must not wait for it forever.
    let started = std::time::Instant::now();
    for t in tasks {
        let avg = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("round completed")
            .unwrap()
            .unwrap();
        assert_eq!(read(&avg, "w"), vec![1.0]);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it waited for the timeout"
    );
    let status = c.get_run(&run, false).await.unwrap();
    let states: Vec<i32> = status.workers.iter().map(|w| w.state).collect();
    assert_eq!(
        states,
        vec![
            pb::WorkerState::Active as i32,
            pb::WorkerState::Active as i32,
            pb::WorkerState::Lost as i32
        ]
    );
    // Its late upload is refused: the round is over and it was dropped.
    let late = c
        .sync_parameters(&run, &w[2], round, 1, tensors(&[("w", vec![1], vec![9.0])]))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Some(Code::FailedPrecondition), "{late}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_redelivered_batch_is_counted_once_and_retried_reports_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let run = c.register_run(config(1, 4, 1), None).await.unwrap().run_id;
    let (w1, w2) = (worker(&c, &run, "a").await, worker(&c, &run, "b").await);
    assert_eq!(
        c.report_steps(&run, &w1, 1, vec![step(0, 0), step(0, 1)])
            .await
            .unwrap()
            .newly_counted,
        2
    );
    // w1 crashed before acking batch 1; RabbitMQ redelivers it to w2.
    assert_eq!(
        c.report_steps(&run, &w2, 1, vec![step(0, 1), step(0, 2)])
            .await
            .unwrap()
            .newly_counted,
        1
    );
    // A retried call (same seq) changes nothing.
    assert_eq!(
        c.report_steps(&run, &w2, 1, vec![step(0, 1), step(0, 2)])
            .await
            .unwrap()
            .newly_counted,
        0
    );
    let s = c.get_run(&run, true).await.unwrap();
    assert_eq!(s.epochs[0].train_batches_done, 3);
    assert!(!s.epochs[0].trained);
    assert_eq!(
        s.steps, 4,
        "four optimizer steps ran, one on a redelivered batch"
    );
    assert_eq!(s.history.len(), 2);
    let bad = c
        .report_steps(&run, &w1, 2, vec![step(0, 4)])
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(Code::InvalidArgument), "{bad}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_epoch_completes_and_triggers_validation_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let run = c.register_run(config(2, 2, 2), None).await.unwrap().run_id;
    let mut watch = c.watch_run(&run).await.unwrap();
    let w = worker(&c, &run, "a").await;

    let mut best_accuracy = 0.0;
    for (epoch, (correct0, correct1)) in [(7, 5), (4, 4)].into_iter().enumerate() {
        let epoch = epoch as u32;
        let before = c
            .report_steps(&run, &w, epoch as u64 * 2 + 1, vec![step(epoch, 0)])
            .await
            .unwrap();
        assert_eq!(
            before.directives.unwrap().sync_round,
            0,
            "no round before the epoch is trained"
        );
        let d = c
            .report_steps(&run, &w, epoch as u64 * 2 + 2, vec![step(epoch, 1)])
            .await
            .unwrap()
            .directives
            .unwrap();
        assert!(d.sync_round > 0, "epoch end opens a sync round");
        assert_eq!(
            d.evaluate_epoch_plus_one, 0,
            "evaluation waits for the average"
        );
        c.sync_parameters(
            &run,
            &w,
            d.sync_round,
            8,
            tensors(&[("w", vec![1], vec![1.0])]),
        )
        .await
        .unwrap();
        let hb = c.heartbeat(&run, &w).await.unwrap();
        assert_eq!(hb.evaluate_epoch_plus_one, epoch + 1);
        let batch = |i, correct, loss| pb::BatchEvaluation {
            batch_index: i,
            images: 10,
            correct,
            correct_top5: 10,
            loss_sum: loss,
        };
        let r = c
            .report_evaluation(&run, &w, epoch, 0, vec![batch(0, correct0, 5.0)])
            .await
            .unwrap();
        assert_eq!((r.newly_counted, r.evaluation_complete), (1, false));
        // Batch 0 redelivered: counted once.
        let r = c
            .report_evaluation(
                &run,
                &w,
                epoch,
                0,
                vec![batch(0, correct0, 5.0), batch(1, correct1, 3.0)],
            )
            .await
            .unwrap();
        assert_eq!((r.newly_counted, r.evaluation_complete), (1, true));
        let s = c.get_run(&run, false).await.unwrap();
        let e = &s.epochs[epoch as usize];
        let accuracy = (correct0 + correct1) as f32 / 20.0;
        assert!(
            e.validated && e.val_accuracy == accuracy && e.val_loss == 0.4,
            "{e:?}"
        );
        best_accuracy = f32::max(best_accuracy, accuracy);
        assert_eq!(s.best.as_ref().unwrap().val_accuracy, best_accuracy);
    }
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!(s.state, pb::RunState::Finished as i32);
    let best = s.best.unwrap();
    assert_eq!((best.epoch, best.val_accuracy), (0, 0.6));
    assert!(dir.path().join(&best.path).exists(), "{}", best.path);
    let (info, _) = c.get_checkpoint(&run, None).await.unwrap();
    assert!(info.best && info.checkpoint_id == best.checkpoint_id);
    assert_eq!(
        c.heartbeat(&run, &w).await.unwrap().run_state,
        pb::RunState::Finished as i32
    );

    let mut kinds = Vec::new();
    while let Some(e) = watch.message().await.unwrap() {
        kinds.push(match e.event.unwrap() {
            pb::run_event::Event::Snapshot(_) => "snapshot",
            pb::run_event::Event::Steps(_) => "steps",
            pb::run_event::Event::EpochTrained(_) => "trained",
            pb::run_event::Event::Evaluation(_) => "evaluation",
            pb::run_event::Event::Finished(_) => "finished",
            pb::run_event::Event::Worker(_) => "worker",
        });
    }
    assert_eq!(kinds.first(), Some(&"snapshot"));
    assert_eq!(
        kinds.last(),
        Some(&"finished"),
        "the stream ends with the run: {kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "trained").count(), 2);
    server.shutdown().await.unwrap();
}

fn evaluation(batch_index: u32, correct: u32) -> pb::BatchEvaluation {
    pb::BatchEvaluation {
        batch_index,
        images: 10,
        correct,
        correct_top5: 10,
        loss_sum: 4.0,
    }
}

#[tokio::test]
async fn interim_evaluations_pause_the_epoch_at_their_share_and_can_be_best() {
    let dir = tempfile::tempdir().unwrap();
    // sync_every 1 would open a round at every step: none may open while an evaluation runs.
    let server = start(dir.path(), 1, 5_000).await;
    let c = client(&server);
    let run = c
        .register_run(
            pb::RunConfig {
                evaluations_per_epoch: 2,
                ..config(1, 4, 1)
            },
            None,
        )
        .await
        .unwrap()
        .run_id;
    let w = worker(&c, &run, "a").await;
    let sync = |round| c.sync_parameters(&run, &w, round, 4, tensors(&[("w", vec![1], vec![1.0])]));

    // Step 1: a periodic round (sync_every 1), not an evaluation.
    let d = c
        .report_steps(&run, &w, 1, vec![step(0, 0)])
        .await
        .unwrap()
        .directives
        .unwrap();
    sync(d.sync_round).await.unwrap();
    let hb = c.heartbeat(&run, &w).await.unwrap();
    assert_eq!((hb.evaluate_epoch_plus_one, hb.sync_round), (0, 0));
    // Step 2 is half of the epoch: its round makes the model of interim evaluation 1.
    let d = c
        .report_steps(&run, &w, 2, vec![step(0, 1)])
        .await
        .unwrap()
        .directives
        .unwrap();
    assert_eq!(
        d.evaluate_epoch_plus_one, 0,
        "evaluation waits for the average"
    );
    sync(d.sync_round).await.unwrap();
    let hb = c.heartbeat(&run, &w).await.unwrap();
    assert_eq!(
        (hb.evaluate_epoch_plus_one, hb.evaluate_part, hb.sync_round),
        (1, 1, 0),
        "interim evaluation 1 asked; no periodic round while it runs"
    );
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!((s.validating_epoch_plus_one, s.validating_part), (1, 1));
    // A step trained before the worker saw the request counts, but opens no round.
    let d = c
        .report_steps(&run, &w, 3, vec![step(0, 2)])
        .await
        .unwrap()
        .directives
        .unwrap();
    assert_eq!((d.sync_round, d.evaluate_part), (0, 1));
    let err = c
        .report_evaluation(&run, &w, 0, 0, vec![evaluation(0, 9)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let err = c
        .report_evaluation(&run, &w, 0, 2, vec![evaluation(0, 9)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let r = c
        .report_evaluation(&run, &w, 0, 1, vec![evaluation(0, 9)])
        .await
        .unwrap();
    assert!(r.evaluation_complete);
    let s = c.get_run(&run, false).await.unwrap();
    let interim = &s.epochs[0].interim;
    assert_eq!(interim.len(), 1);
    assert_eq!(
        (
            interim[0].part,
            interim[0].after_train_batches,
            interim[0].validated
        ),
        (1, 2, true)
    );
    assert_eq!(interim[0].val_accuracy, 0.9);
    assert!(!s.epochs[0].validated, "the epoch itself goes on");
    let best = s.best.clone().unwrap();
    assert_eq!((best.epoch, best.eval_part, best.val_accuracy), (0, 1, 0.9));

    // The periodic round held back during the evaluation opens now.
    let hb = c.heartbeat(&run, &w).await.unwrap();
    assert_eq!(hb.evaluate_epoch_plus_one, 0);
    assert!(hb.sync_round > 0);
    sync(hb.sync_round).await.unwrap();
    // Training goes on to the epoch's end, whose evaluation scores lower.
    let d = c
        .report_steps(&run, &w, 4, vec![step(0, 3)])
        .await
        .unwrap()
        .directives
        .unwrap();
    assert_eq!(d.evaluate_epoch_plus_one, 0);
    sync(d.sync_round).await.unwrap();
    let hb = c.heartbeat(&run, &w).await.unwrap();
    assert_eq!((hb.evaluate_epoch_plus_one, hb.evaluate_part), (1, 0));
    c.report_evaluation(&run, &w, 0, 0, vec![evaluation(0, 6)])
        .await
        .unwrap();
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!(s.state, pb::RunState::Finished as i32);
    assert_eq!(s.epochs[0].val_accuracy, 0.6);
    assert_eq!(s.best.unwrap().checkpoint_id, best.checkpoint_id);
    let (info, _) = c.get_checkpoint(&run, None).await.unwrap();
    assert_eq!((info.eval_part, info.val_accuracy), (1, 0.9));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_coordinator_resumes_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let run = c
        .register_run(config(1, 3, 1), Some("resume-me"))
        .await
        .unwrap()
        .run_id;
    let w = worker(&c, &run, "a").await;
    c.report_steps(&run, &w, 1, vec![step(0, 0), step(0, 1)])
        .await
        .unwrap();
    server.shutdown().await.unwrap();

    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!((s.steps, s.epochs[0].train_batches_done), (2, 2));
    // The trainer reconnects under its old id; batch 1 redelivered still counts once.
    let info = WorkerInfo {
        host: "a".into(),
        device: "cpu".into(),
        gpu_name: String::new(),
    };
    assert_eq!(
        c.register_worker(&run, &info, Some(&w))
            .await
            .unwrap()
            .worker_id,
        w
    );
    let r = c
        .report_steps(&run, &w, 2, vec![step(0, 1), step(0, 2)])
        .await
        .unwrap();
    assert_eq!(r.newly_counted, 1);
    let round = r.directives.unwrap().sync_round;
    assert!(round > 0);
    let avg = c
        .sync_parameters(&run, &w, round, 4, tensors(&[("w", vec![1], vec![3.0])]))
        .await
        .unwrap();
    server.shutdown().await.unwrap();

    // Again, now with a checkpoint and an epoch awaiting validation.
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!(s.validating_epoch_plus_one, 1);
    assert_eq!(c.get_checkpoint(&run, None).await.unwrap().1, avg);
    assert_eq!(
        c.register_worker(&run, &info, Some(&w))
            .await
            .unwrap()
            .checkpoint_id,
        s.latest_checkpoint_id
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    for token in [None, Some("wrong".to_owned())] {
        let c = CoordinatorClient::connect(
            &ClientConfig::new(server.url())
                .token(token)
                .retry(Backoff::none()),
        )
        .unwrap();
        let err = c.list_runs().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    }
    let c = client(&server);
    assert!(c.list_runs().await.unwrap().is_empty());
    let err = c.get_run("nope", false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tensor_with_a_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1, 5_000).await;
    let c = client(&server);
    let run = c.register_run(config(1, 8, 1), None).await.unwrap().run_id;
    let (w1, w2) = (worker(&c, &run, "a").await, worker(&c, &run, "b").await);
    let round = c
        .report_steps(&run, &w1, 1, vec![step(0, 0)])
        .await
        .unwrap()
        .directives
        .unwrap()
        .sync_round;
    let (c1, run1, id1) = (c.clone(), run.clone(), w1.clone());
    let first = tokio::spawn(async move {
        c1.sync_parameters(
            &run1,
            &id1,
            round,
            1,
            tensors(&[("w", vec![2], vec![1.0, 2.0])]),
        )
        .await
    });
    // Let w1's upload define the round's schema first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = c
        .sync_parameters(
            &run,
            &w2,
            round,
            1,
            tensors(&[("w", vec![3], vec![1.0, 2.0, 3.0])]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.status()
            .unwrap()
            .message()
            .contains("tensor \"w\" is F32 [3], expected F32 [2]"),
        "{err}"
    );
    let err = c
        .sync_parameters(&run, &w2, round, 1, b"not safetensors".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    // The round is still open; a correct upload completes it.
    let avg = c
        .sync_parameters(
            &run,
            &w2,
            round,
            1,
            tensors(&[("w", vec![2], vec![3.0, 4.0])]),
        )
        .await
        .unwrap();
    assert_eq!(read(&avg, "w"), vec![2.0, 3.0]);
    assert_eq!(first.await.unwrap().unwrap(), avg);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_service_to_token_holders() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let list = || {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let denied = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(list())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(list());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(req)
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(services)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"flowers.v1.Coordinator".to_owned()),
        "{names:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_with_a_trusted_certificate_works() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::open(CoordinatorConfig::new(dir.path())).unwrap();
    let options = ServeOptions {
        token: Some(TOKEN.into()),
        tls: Some((cert_pem.clone().into(), key_pem.into())),
    };
    let server = ServerHandle::start(coordinator, "127.0.0.1:0", options)
        .await
        .unwrap();
    let address = format!("https://localhost:{}", server.addr.port());
    let config = ClientConfig {
        ca_cert: Some(cert_pem.into()),
        ..ClientConfig::new(&address).token(Some(TOKEN.into()))
    };
    let c = CoordinatorClient::connect(&config).unwrap();
    assert!(c.list_runs().await.unwrap().is_empty());
    // Plain HTTP/2 to a TLS port fails rather than leaking anything.
    let plain = ClientConfig::new(server.url())
        .token(Some(TOKEN.into()))
        .retry(Backoff::none());
    assert!(CoordinatorClient::connect(&plain)
        .unwrap()
        .list_runs()
        .await
        .is_err());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_run_id_the_broker_would_refuse_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    // '.' separates the parts of queue names (flowers.<run>.train.<epoch>).
    let err = c
        .register_run(config(1, 2, 1), Some("a.b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let generated = c.register_run(config(1, 2, 1), None).await.unwrap().run_id;
    assert!(flowers_proto::run_id::is_valid(&generated), "{generated}");
    let runs: Vec<String> = c
        .list_runs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    assert_eq!(runs, [generated]);
    server.shutdown().await.unwrap();
}
