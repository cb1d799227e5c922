//! Sync rounds: the weighted average, lost workers, refused uploads.

use std::time::Duration;

use flowers_proto::v1 as pb;
use safetensors::tensor::SafeTensors;
use tonic::Code;

use crate::support::*;

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
