//! `flowersctl watch`: live progress bars fed by WatchRun.

use anyhow::Context;
use flowers_coordinator_client::CoordinatorClient;
use flowers_proto::v1 as pb;
use flowers_proto::v1::run_event::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::render::evaluation_label;

struct Bars {
    train: ProgressBar,
    val: ProgressBar,
    epochs: u32,
    evaluations_per_epoch: u32,
}

impl Bars {
    fn new() -> Self {
        // Drawn on stderr when it is a terminal; hidden otherwise, where the printed lines remain.
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("{prefix:>14} [{bar:40.cyan/blue}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> ");
        let train = multi.add(ProgressBar::new(0).with_style(style.clone()));
        let val = multi.add(ProgressBar::new(0).with_style(style));
        Self {
            train,
            val,
            epochs: 0,
            evaluations_per_epoch: 1,
        }
    }

    fn epoch_prefix(&self, kind: &str, epoch: u32) -> String {
        format!("{kind} {}/{}", epoch + 1, self.epochs)
    }

    fn snapshot(&mut self, s: &pb::RunStatus) {
        self.epochs = s.config.as_ref().map_or(0, |c| c.epochs);
        self.evaluations_per_epoch = s
            .config
            .as_ref()
            .map_or(1, |c| c.evaluations_per_epoch.max(1));
        let current = s.current_epoch.min(self.epochs.saturating_sub(1));
        if let Some(e) = s.epochs.get(current as usize) {
            self.train.set_prefix(self.epoch_prefix("train", e.epoch));
            self.train.set_length(e.train_batches_total as u64);
            self.train.set_position(e.train_batches_done as u64);
            self.train.set_message(format!(
                "loss {:.4} acc {:.2}% {:.1} img/s",
                e.train_loss,
                e.train_accuracy * 100.0,
                s.images_per_s
            ));
            self.val.set_prefix(self.epoch_prefix("validate", e.epoch));
            self.val.set_length(e.val_batches_total as u64);
            self.val.set_position(e.val_batches_done as u64);
        }
    }

    fn println(&self, line: String) {
        // Through the bar so the line lands above the bars; plain when hidden.
        if self.train.is_hidden() {
            println!("{line}");
        } else {
            self.train.println(line);
        }
    }
}

/// Follows a run until it finishes (or the stream ends).
pub async fn watch(client: &CoordinatorClient, run: &str) -> anyhow::Result<()> {
    let mut stream = client.watch_run(run).await?;
    let mut bars = Bars::new();
    while let Some(event) = stream.message().await.context("reading WatchRun")? {
        match event.event {
            Some(Event::Snapshot(s)) => {
                bars.snapshot(&s);
                if s.state == pb::RunState::Running as i32 {
                    // Says that the stream is up: later events will be shown.
                    bars.println(format!(
                        "following run {} at epoch {}/{}",
                        s.run_id,
                        s.current_epoch.min(bars.epochs.saturating_sub(1)) + 1,
                        bars.epochs
                    ));
                } else {
                    bars.println(format!(
                        "run {} is {}",
                        s.run_id,
                        if s.state == pb::RunState::Finished as i32 {
                            "finished"
                        } else {
                            "not running"
                        }
                    ));
                    if let Some(b) = s.best {
                        bars.println(format!(
                            "best: {} at {} with validation accuracy {:.2}%",
                            b.checkpoint_id,
                            evaluation_label(b.epoch, b.eval_part, bars.evaluations_per_epoch),
                            b.val_accuracy * 100.0
                        ));
                    }
                }
            }
            Some(Event::Steps(p)) => {
                if bars.train.length() != Some(p.train_batches_total as u64)
                    || bars.train.prefix() != bars.epoch_prefix("train", p.epoch)
                {
                    bars.train.set_prefix(bars.epoch_prefix("train", p.epoch));
                    bars.train.set_length(p.train_batches_total as u64);
                }
                bars.train.set_position(p.train_batches_done as u64);
                bars.train.set_message(format!(
                    "loss {:.4} acc {:.2}% {:.1} img/s",
                    p.loss,
                    p.accuracy * 100.0,
                    p.images_per_s
                ));
            }
            Some(Event::EpochTrained(e)) => bars.println(format!(
                "epoch {} trained; averaging, then validation",
                e.epoch + 1
            )),
            Some(Event::Evaluation(v)) => {
                let kind = match v.part {
                    0 => "validate".to_owned(),
                    p => format!("{p}/{} validate", bars.evaluations_per_epoch),
                };
                bars.val.set_prefix(bars.epoch_prefix(&kind, v.epoch));
                bars.val.set_length(v.val_batches_total as u64);
                bars.val.set_position(v.val_batches_done as u64);
                bars.val
                    .set_message(format!("acc {:.2}% loss {:.4}", v.accuracy * 100.0, v.loss));
                if v.complete {
                    bars.println(format!(
                        "{} validated: accuracy {:.2}%, top-5 {:.2}%, loss {:.4}",
                        evaluation_label(v.epoch, v.part, bars.evaluations_per_epoch),
                        v.accuracy * 100.0,
                        v.top5_accuracy * 100.0,
                        v.loss
                    ));
                    if v.part == 0 {
                        bars.train.set_position(0);
                    }
                    bars.val.set_position(0);
                }
            }
            Some(Event::Worker(w)) => {
                if let Some(w) = w.worker {
                    let state =
                        pb::WorkerState::try_from(w.state).map_or("unknown", |s| s.as_str_name());
                    bars.println(format!(
                        "worker {} ({}, {}) {}",
                        w.worker_id, w.host, w.device, state
                    ));
                }
            }
            Some(Event::Finished(f)) => {
                bars.train.finish();
                bars.val.finish();
                match f.best {
                    Some(b) => bars.println(format!(
                        "run finished: best validation accuracy {:.2}% at {} ({})",
                        b.val_accuracy * 100.0,
                        evaluation_label(b.epoch, b.eval_part, bars.evaluations_per_epoch),
                        b.checkpoint_id
                    )),
                    None => bars.println("run finished".into()),
                }
                break;
            }
            None => {}
        }
    }
    Ok(())
}
