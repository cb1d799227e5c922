//! Replaying batches the broker lost. The coordinator's accounting is the truth of a run's
//! progress and every batch is a function of the plan, so when the stage the run is in (an
//! epoch's training, or one of its evaluations) has stopped advancing, its queue is empty and
//! batches of it are still uncounted, those batches are gone (a broker restart dropped
//! transient messages, a queue was purged or deleted): the loader publishes exactly them again.
//! A copy of a batch that was not lost after all is counted once by the coordinator and
//! dropped by the trainers at the stage's end.

use crate::plan::EpochPlanner;
use crate::resume::counted_batches;
use crate::{Assembler, LoaderError};
use flowers_broker::{
    connect, eval_queue, message_count, train_queue, BatchKey, Connection, Publisher,
};
use flowers_proto::v1 as pb;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// A stage of a run: an epoch's training, or evaluation `part` of it (0: its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub epoch: u32,
    pub validation: bool,
    pub part: u32,
}

impl Stage {
    pub fn queue(&self, run_id: &str) -> String {
        if self.validation {
            eval_queue(run_id, self.epoch, self.part)
        } else {
            train_queue(run_id, self.epoch)
        }
    }
}

/// The stage a running run is in, with how many of its batches are counted and its total.
pub fn active_stage(status: &pb::RunStatus) -> Option<(Stage, usize, usize)> {
    if status.state != pb::RunState::Running as i32 {
        return None;
    }
    if let Some(epoch) = status.validating_epoch_plus_one.checked_sub(1) {
        let e = status.epochs.get(epoch as usize)?;
        let part = status.validating_part;
        let counted = if part == 0 {
            e.validated_batch_indices.len()
        } else {
            e.interim
                .iter()
                .find(|i| i.part == part)?
                .validated_batch_indices
                .len()
        };
        let stage = Stage {
            epoch,
            validation: true,
            part,
        };
        return Some((stage, counted, e.val_batches_total as usize));
    }
    let e = status.epochs.get(status.current_epoch as usize)?;
    let stage = Stage {
        epoch: e.epoch,
        validation: false,
        part: 0,
    };
    Some((
        stage,
        e.trained_batch_indices.len(),
        e.train_batches_total as usize,
    ))
}

/// Decides when a stage's missing batches are lost: its count has not moved for `after` while
/// its queue is empty. Takes the time as input, so it is tested without waiting.
#[derive(Debug)]
pub struct StallWatch {
    after: Duration,
    /// The stage and count last seen, and since when they are unchanged.
    seen: Option<(Stage, usize, Instant)>,
}

impl StallWatch {
    pub fn new(after: Duration) -> Self {
        Self { after, seen: None }
    }

    /// `counted` of `total` batches of `stage` are counted and its queue holds `ready`
    /// messages at `now`: whether to replay the missing ones now. After a replay, the next one
    /// waits for another stall of `after`.
    pub fn observe(
        &mut self,
        now: Instant,
        stage: Stage,
        counted: usize,
        total: usize,
        ready: u32,
    ) -> bool {
        if counted >= total {
            self.seen = None;
            return false;
        }
        match self.seen {
            Some((s, c, since)) if s == stage && c == counted => {
                let stalled = ready == 0 && now.duration_since(since) >= self.after;
                if stalled {
                    self.seen = Some((stage, counted, now));
                }
                stalled
            }
            _ => {
                self.seen = Some((stage, counted, now));
                false
            }
        }
    }
}

/// What the replaying did by the time the run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub final_state: i32,
    /// Batches published again.
    pub replayed: u64,
    pub replays: u32,
}

/// Republishes lost batches of a run (see the module docs) until it is over.
pub struct Replayer {
    pub(crate) planner: EpochPlanner,
    pub(crate) assembler: Arc<Assembler>,
    pub(crate) broker_url: String,
    pub(crate) publisher: Publisher,
    /// How long a stage's count must stand still, its queue empty, before a replay.
    pub stall_after: Duration,
    /// How often the run's status is fetched.
    pub poll: Duration,
}

impl Replayer {
    /// Watches the run through `status` (with batch indices) until it is no longer running,
    /// sending the epoch its consumers are at into `epoch` (for the publisher's backpressure),
    /// and replays the lost batches of each stalled stage.
    pub async fn run<F, Fut, E>(
        mut self,
        mut status: F,
        epoch: watch::Sender<u32>,
    ) -> Result<ReplaySummary, LoaderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<pb::RunStatus, E>>,
        E: std::fmt::Display,
    {
        let mut watch = StallWatch::new(self.stall_after);
        let mut summary = ReplaySummary::default();
        let mut conn: Option<Connection> = None;
        let run_id = self.planner.run_id.clone();
        loop {
            let now = status()
                .await
                .map_err(|e| LoaderError::Coordinator(format!("run {run_id}: {e}")))?;
            if now.state != pb::RunState::Running as i32 {
                summary.final_state = now.state;
                let _ = self.publisher.close().await;
                return Ok(summary);
            }
            epoch.send_replace(now.current_epoch);
            if let Some((stage, counted, total)) = active_stage(&now) {
                let queue = stage.queue(&run_id);
                if let Some(ready) = ready_messages(&mut conn, &self.broker_url, &queue).await {
                    if watch.observe(Instant::now(), stage, counted, total, ready) {
                        let sent = self.replay(stage, &now, &queue, counted, total).await?;
                        summary.replayed += sent;
                        summary.replays += 1;
                    }
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Publishes again the batches of `stage` that `status` does not count.
    async fn replay(
        &mut self,
        stage: Stage,
        status: &pb::RunStatus,
        queue: &str,
        counted: usize,
        total: usize,
    ) -> Result<u64, LoaderError> {
        let settled = counted_batches(status);
        let batches = if stage.validation {
            self.planner.val_batches(stage.epoch, stage.part)
        } else {
            self.planner.train_batches(stage.epoch)
        };
        let missing: Vec<_> = batches
            .into_iter()
            .filter(|b| !settled.contains(&BatchKey::of_header(&b.header)))
            .collect();
        let indices: Vec<u32> = missing.iter().map(|b| b.header.batch_index).collect();
        warn!(%queue, counted, total, stalled_secs = self.stall_after.as_secs(), missing = ?indices, "the stage stopped with its queue empty and batches uncounted: replaying them");
        for planned in &missing {
            let assembler = self.assembler.clone();
            let planned = planned.clone();
            let batch = tokio::task::spawn_blocking(move || assembler.assemble(&planned)).await??;
            self.publisher.republish(&batch).await?;
        }
        self.publisher.flush().await?;
        info!(%queue, replayed = missing.len(), "lost batches published again");
        Ok(missing.len() as u64)
    }
}

/// Ready messages in `queue`, on a connection kept in `conn` (opened again when it broke);
/// `None` when the broker cannot tell now (down, or the queue is gone), so no replay is decided.
async fn ready_messages(conn: &mut Option<Connection>, url: &str, queue: &str) -> Option<u32> {
    if !conn.as_ref().is_some_and(|c| c.status().connected()) {
        *conn = connect(url, "flowers-loader replay watch").await.ok();
    }
    match message_count(conn.as_ref()?, queue).await {
        Ok(count) => count,
        Err(e) => {
            warn!(%queue, error = %e, "cannot count the queue's messages now");
            *conn = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAIN: Stage = Stage {
        epoch: 1,
        validation: false,
        part: 0,
    };

    #[test]
    fn a_stage_stalled_with_its_queue_empty_is_replayed_once_per_stall() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut w = StallWatch::new(Duration::from_secs(10));
        assert!(!w.observe(at(0), TRAIN, 3, 8, 0), "first sight");
        assert!(!w.observe(at(9), TRAIN, 3, 8, 0), "not stalled long enough");
        assert!(w.observe(at(10), TRAIN, 3, 8, 0), "stalled, queue empty");
        assert!(
            !w.observe(at(15), TRAIN, 3, 8, 0),
            "the replay restarts the wait"
        );
        assert!(
            w.observe(at(20), TRAIN, 3, 8, 0),
            "the replayed copies were lost too"
        );
    }

    #[test]
    fn progress_messages_in_the_queue_or_a_complete_stage_hold_replays_back() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut w = StallWatch::new(Duration::from_secs(10));
        w.observe(at(0), TRAIN, 3, 8, 0);
        assert!(
            !w.observe(at(10), TRAIN, 4, 8, 0),
            "a batch counted meanwhile"
        );
        assert!(
            !w.observe(at(20), TRAIN, 4, 8, 2),
            "its queue still holds batches"
        );
        assert!(w.observe(at(21), TRAIN, 4, 8, 0));
        let validation = Stage {
            validation: true,
            ..TRAIN
        };
        assert!(
            !w.observe(at(40), validation, 4, 8, 0),
            "another stage starts afresh"
        );
        assert!(
            !w.observe(at(60), validation, 8, 8, 0),
            "nothing is missing"
        );
    }

    #[test]
    fn the_active_stage_is_the_evaluation_under_way_or_the_current_training() {
        let epoch = pb::EpochStatus {
            epoch: 0,
            train_batches_total: 8,
            val_batches_total: 2,
            trained_batch_indices: vec![0, 1, 2],
            validated_batch_indices: vec![1],
            interim: vec![pb::InterimEvaluation {
                part: 1,
                validated_batch_indices: vec![0, 1],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut status = pb::RunStatus {
            state: pb::RunState::Running as i32,
            epochs: vec![epoch],
            ..Default::default()
        };
        let train = Stage {
            epoch: 0,
            validation: false,
            part: 0,
        };
        assert_eq!(active_stage(&status), Some((train, 3, 8)));
        status.validating_epoch_plus_one = 1;
        status.validating_part = 1;
        let interim = Stage {
            validation: true,
            part: 1,
            ..train
        };
        assert_eq!(active_stage(&status), Some((interim, 2, 2)));
        status.validating_part = 0;
        let end = Stage { part: 0, ..interim };
        assert_eq!(active_stage(&status), Some((end, 1, 2)));
        status.state = pb::RunState::Finished as i32;
        assert_eq!(active_stage(&status), None);
    }
}
