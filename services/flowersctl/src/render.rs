//! Tables and JSON for runs, epochs, workers and checkpoints.

use std::fmt::Write;

use flowers_proto::v1 as pb;
use serde_json::{json, Value};

fn run_state(state: i32) -> &'static str {
    match pb::RunState::try_from(state) {
        Ok(pb::RunState::Running) => "running",
        Ok(pb::RunState::Finished) => "finished",
        Ok(pb::RunState::Failed) => "failed",
        _ => "unknown",
    }
}

fn worker_state(state: i32) -> &'static str {
    match pb::WorkerState::try_from(state) {
        Ok(pb::WorkerState::Active) => "active",
        Ok(pb::WorkerState::Lost) => "lost",
        Ok(pb::WorkerState::Left) => "left",
        _ => "unknown",
    }
}

fn ago(unix: f64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    if unix <= 0.0 {
        return "never".into();
    }
    let s = (now - unix).max(0.0);
    if s < 120.0 {
        format!("{s:.0}s ago")
    } else if s < 7200.0 {
        format!("{:.0}m ago", s / 60.0)
    } else {
        format!("{:.1}h ago", s / 3600.0)
    }
}

fn percent(x: f32) -> String {
    format!("{:.2}%", x * 100.0)
}

/// "epoch 2" for an epoch-end evaluation, "epoch 2 at 3/8" for interim part 3 of 8.
pub fn evaluation_label(epoch: u32, part: u32, evaluations_per_epoch: u32) -> String {
    match part {
        0 => format!("epoch {}", epoch + 1),
        p => format!("epoch {} at {p}/{evaluations_per_epoch}", epoch + 1),
    }
}

fn evaluations_per_epoch(r: &pb::RunStatus) -> u32 {
    r.config
        .as_ref()
        .map_or(1, |c| c.evaluations_per_epoch.max(1))
}

pub fn run_json(r: &pb::RunStatus) -> Value {
    let c = r.config.clone().unwrap_or_default();
    json!({
        "run_id": r.run_id,
        "state": run_state(r.state),
        "config": {
            "dataset": c.dataset, "split": c.split, "img_size": c.img_size, "batch_size": c.batch_size,
            "epochs": c.epochs, "train_batches_per_epoch": c.train_batches_per_epoch,
            "val_batches_per_epoch": c.val_batches_per_epoch, "seed": c.seed, "num_classes": c.num_classes,
            "train_images": c.train_images, "val_images": c.val_images,
            "evaluations_per_epoch": c.evaluations_per_epoch.max(1),
        },
        "current_epoch": r.current_epoch,
        "steps": r.steps,
        "images_per_s": r.images_per_s,
        "sync_round": r.sync_round,
        "sync_every": r.sync_every,
        "latest_checkpoint_id": r.latest_checkpoint_id,
        "validating_epoch": r.validating_epoch_plus_one.checked_sub(1),
        "validating_part": r.validating_part,
        "created_at": r.created_at,
        "epochs": r.epochs.iter().map(|e| json!({
            "epoch": e.epoch,
            "train_batches_done": e.train_batches_done, "train_batches_total": e.train_batches_total,
            "val_batches_done": e.val_batches_done, "val_batches_total": e.val_batches_total,
            "trained": e.trained, "validated": e.validated,
            "train_loss": e.train_loss, "train_accuracy": e.train_accuracy,
            "val_loss": e.val_loss, "val_accuracy": e.val_accuracy, "val_top5_accuracy": e.val_top5_accuracy,
            "checkpoint_id": e.checkpoint_id,
            "interim": e.interim.iter().map(|i| json!({
                "part": i.part, "after_train_batches": i.after_train_batches,
                "val_batches_done": i.val_batches_done, "validated": i.validated,
                "val_loss": i.val_loss, "val_accuracy": i.val_accuracy,
                "val_top5_accuracy": i.val_top5_accuracy, "checkpoint_id": i.checkpoint_id,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "workers": r.workers.iter().map(|w| json!({
            "worker_id": w.worker_id, "host": w.host, "device": w.device, "gpu_name": w.gpu_name,
            "state": worker_state(w.state), "steps": w.steps, "images_per_s": w.images_per_s,
            "data_wait_fraction": w.data_wait_fraction, "last_heartbeat": w.last_heartbeat,
        })).collect::<Vec<_>>(),
        "best": r.best.as_ref().map(|b| json!({
            "checkpoint_id": b.checkpoint_id, "epoch": b.epoch, "eval_part": b.eval_part,
            "val_accuracy": b.val_accuracy, "path": b.path,
        })),
    })
}

pub fn checkpoint_json(c: &pb::CheckpointInfo) -> Value {
    json!({
        "checkpoint_id": c.checkpoint_id, "run_id": c.run_id, "epoch": c.epoch, "sync_round": c.sync_round,
        "size_bytes": c.size_bytes, "val_accuracy": c.val_accuracy, "best": c.best, "created_at": c.created_at,
        "eval_part": c.eval_part,
    })
}

/// Left-aligned columns sized to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, &mut header.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

pub fn runs_table(runs: &[pb::RunStatus]) -> String {
    if runs.is_empty() {
        return "no runs\n".into();
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let epochs = r.config.as_ref().map_or(0, |c| c.epochs);
            vec![
                r.run_id.clone(),
                run_state(r.state).into(),
                format!(
                    "{}/{}",
                    r.current_epoch.min(epochs.saturating_sub(1)) + 1,
                    epochs
                ),
                r.steps.to_string(),
                format!("{:.1}", r.images_per_s),
                r.workers
                    .iter()
                    .filter(|w| w.state == pb::WorkerState::Active as i32)
                    .count()
                    .to_string(),
                r.best.as_ref().map_or("-".into(), |b| {
                    format!(
                        "{} ({})",
                        percent(b.val_accuracy),
                        evaluation_label(b.epoch, b.eval_part, evaluations_per_epoch(r))
                    )
                }),
            ]
        })
        .collect();
    table(
        &[
            "RUN",
            "STATE",
            "EPOCH",
            "STEPS",
            "IMG/S",
            "WORKERS",
            "BEST VAL ACC",
        ],
        &rows,
    )
}

pub fn status_text(r: &pb::RunStatus) -> String {
    let c = r.config.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  {}  dataset {} ({} split), {}px, batch {}, seed {}",
        r.run_id,
        run_state(r.state),
        c.dataset,
        c.split,
        c.img_size,
        c.batch_size,
        c.seed
    );
    let epoch = if r.state == pb::RunState::Running as i32 {
        format!("epoch {}/{}", r.current_epoch + 1, c.epochs)
    } else {
        format!("{} epochs", c.epochs)
    };
    let n = evaluations_per_epoch(r);
    let validating = r
        .validating_epoch_plus_one
        .checked_sub(1)
        .map_or(String::new(), |e| {
            format!(", validating {}", evaluation_label(e, r.validating_part, n))
        });
    let _ = writeln!(
        out,
        "{epoch}{validating}, step {}, {:.1} images/s, sync round {} (every {} steps)",
        r.steps, r.images_per_s, r.sync_round, r.sync_every
    );
    match &r.best {
        Some(b) => {
            let _ = writeln!(
                out,
                "best: {} at {}: validation accuracy {} ({})",
                b.checkpoint_id,
                evaluation_label(b.epoch, b.eval_part, n),
                percent(b.val_accuracy),
                b.path
            );
        }
        None => {
            let _ = writeln!(out, "best: none validated yet");
        }
    }
    let _ = writeln!(out);
    let mark = |done: bool| if done { " ✓" } else { "" };
    let figures = |started: bool, loss: f32, acc: f32, top5: f32| -> [String; 3] {
        if started {
            [format!("{loss:.4}"), percent(acc), percent(top5)]
        } else {
            ["-".into(), "-".into(), "-".into()]
        }
    };
    let rows: Vec<Vec<String>> = r
        .epochs
        .iter()
        .filter(|e| e.train_batches_done > 0 || e.epoch <= r.current_epoch)
        .flat_map(|e| {
            // Interim evaluations get a row each, after the epoch's own.
            let interim = e
                .interim
                .iter()
                .filter(|i| i.val_batches_done > 0 || i.validated)
                .map(|i| {
                    let [loss, acc, top5] =
                        figures(true, i.val_loss, i.val_accuracy, i.val_top5_accuracy);
                    vec![
                        format!("  at {}/{n}", i.part),
                        format!("{}/{}", i.after_train_batches, e.train_batches_total),
                        String::new(),
                        String::new(),
                        format!(
                            "{}/{}{}",
                            i.val_batches_done,
                            e.val_batches_total,
                            mark(i.validated)
                        ),
                        loss,
                        acc,
                        top5,
                    ]
                });
            let val = e.val_batches_done > 0 || e.validated;
            let [val_loss, val_acc, val_top5] =
                figures(val, e.val_loss, e.val_accuracy, e.val_top5_accuracy);
            std::iter::once(vec![
                (e.epoch + 1).to_string(),
                format!(
                    "{}/{}{}",
                    e.train_batches_done,
                    e.train_batches_total,
                    mark(e.trained)
                ),
                if e.train_batches_done > 0 {
                    format!("{:.4}", e.train_loss)
                } else {
                    "-".into()
                },
                if e.train_batches_done > 0 {
                    percent(e.train_accuracy)
                } else {
                    "-".into()
                },
                format!(
                    "{}/{}{}",
                    e.val_batches_done,
                    e.val_batches_total,
                    mark(e.validated)
                ),
                val_loss,
                val_acc,
                val_top5,
            ])
            .chain(interim)
        })
        .collect();
    out.push_str(&table(
        &[
            "EPOCH",
            "TRAINED",
            "LOSS",
            "ACC",
            "VALIDATED",
            "VAL LOSS",
            "VAL ACC",
            "VAL TOP5",
        ],
        &rows,
    ));
    let _ = writeln!(out);
    if r.workers.is_empty() {
        let _ = writeln!(out, "no workers");
    } else {
        let rows: Vec<Vec<String>> = r
            .workers
            .iter()
            .map(|w| {
                vec![
                    w.worker_id.clone(),
                    w.host.clone(),
                    w.device.clone(),
                    if w.gpu_name.is_empty() {
                        "-".into()
                    } else {
                        w.gpu_name.clone()
                    },
                    worker_state(w.state).into(),
                    w.steps.to_string(),
                    format!("{:.1}", w.images_per_s),
                    percent(w.data_wait_fraction),
                    ago(w.last_heartbeat),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "WORKER",
                "HOST",
                "DEVICE",
                "GPU",
                "STATE",
                "STEPS",
                "IMG/S",
                "DATA WAIT",
                "LAST SEEN",
            ],
            &rows,
        ));
    }
    out
}

pub fn checkpoints_table(checkpoints: &[pb::CheckpointInfo]) -> String {
    if checkpoints.is_empty() {
        return "no checkpoints\n".into();
    }
    let rows: Vec<Vec<String>> = checkpoints
        .iter()
        .map(|c| {
            vec![
                c.checkpoint_id.clone(),
                match c.eval_part {
                    0 => (c.epoch + 1).to_string(),
                    p => format!("{} at part {p}", c.epoch + 1),
                },
                c.sync_round.to_string(),
                format!("{:.1} MiB", c.size_bytes as f64 / (1 << 20) as f64),
                if c.val_accuracy > 0.0 || c.best {
                    percent(c.val_accuracy)
                } else {
                    "-".into()
                },
                if c.best { "best".into() } else { String::new() },
            ]
        })
        .collect();
    table(
        &["CHECKPOINT", "EPOCH", "ROUND", "SIZE", "VAL ACC", ""],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interim_evaluations_get_rows_and_labels() {
        let interim = pb::InterimEvaluation {
            part: 1,
            after_train_batches: 5,
            val_batches_done: 3,
            validated: true,
            val_loss: 0.5,
            val_accuracy: 0.8125,
            val_top5_accuracy: 1.0,
            checkpoint_id: "round-000003".into(),
            ..Default::default()
        };
        let status = pb::RunStatus {
            run_id: "r".into(),
            config: Some(pb::RunConfig {
                epochs: 1,
                evaluations_per_epoch: 2,
                ..Default::default()
            }),
            state: pb::RunState::Running as i32,
            epochs: vec![pb::EpochStatus {
                train_batches_done: 7,
                train_batches_total: 10,
                val_batches_total: 3,
                interim: vec![interim],
                ..Default::default()
            }],
            best: Some(pb::BestCheckpoint {
                checkpoint_id: "round-000003".into(),
                val_accuracy: 0.8125,
                eval_part: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = status_text(&status);
        let row = text
            .lines()
            .find(|l| l.trim_start().starts_with("at 1/2"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            row.contains("5/10") && row.contains("3/3 ✓") && row.contains("81.25%"),
            "{row}"
        );
        assert!(
            text.contains("best: round-000003 at epoch 1 at 1/2: validation accuracy 81.25%"),
            "{text}"
        );
        let json = run_json(&status);
        assert_eq!(json["epochs"][0]["interim"][0]["after_train_batches"], 5);
        assert_eq!(json["best"]["eval_part"], 1);
        assert_eq!(evaluation_label(2, 0, 8), "epoch 3");
    }
}
