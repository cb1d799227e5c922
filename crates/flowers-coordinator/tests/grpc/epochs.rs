//! Epoch accounting: steps counted once, epoch-end and interim evaluations.

use flowers_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

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
