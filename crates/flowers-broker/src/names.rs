//! Queue naming per run (the cross-crate contract).

use crate::BrokerError;
use flowers_proto::run_id;

/// The dead-letter exchange shared by every run (direct, durable).
pub const DLX_EXCHANGE: &str = "flowers.dlx";

/// Longest accepted run id; queue names must stay under AMQP's 255 bytes.
pub const MAX_RUN_ID_LEN: usize = run_id::MAX_LEN;

/// Run ids appear in queue names and routing keys, so they follow the one run id rule
/// ([`flowers_proto::run_id`]): `[A-Za-z0-9_-]`, 1 to [`MAX_RUN_ID_LEN`] characters.
pub fn validate_run_id(id: &str) -> Result<(), BrokerError> {
    if run_id::is_valid(id) {
        Ok(())
    } else {
        Err(BrokerError::InvalidRunId(id.to_string()))
    }
}

/// `flowers.<run_id>.train.<epoch>`: the training batches of one epoch.
pub fn train_queue(run_id: &str, epoch: u32) -> String {
    format!("flowers.{run_id}.train.{epoch}")
}

/// `flowers.<run_id>.val.<epoch>`: the validation batches of one epoch's end.
pub fn val_queue(run_id: &str, epoch: u32) -> String {
    format!("flowers.{run_id}.val.{epoch}")
}

/// The validation queue of evaluation `part` of an epoch: [`val_queue`] for the epoch end
/// (part 0), `flowers.<run_id>.val.<epoch>.<part>` for the interim evaluation after
/// `part / n` of the epoch's training.
pub fn eval_queue(run_id: &str, epoch: u32, part: u32) -> String {
    if part == 0 {
        val_queue(run_id, epoch)
    } else {
        format!("flowers.{run_id}.val.{epoch}.{part}")
    }
}

/// Which queues a run has: its epochs, and how often each is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLayout {
    pub epochs: u32,
    /// Evaluations per epoch (at least 1, the epoch end): `n > 1` adds the interim validation
    /// queues of parts `1..n`.
    pub evaluations_per_epoch: u32,
}

impl RunLayout {
    /// `epochs` epochs, each evaluated once at its end.
    pub fn epochs(epochs: u32) -> Self {
        Self {
            epochs,
            evaluations_per_epoch: 1,
        }
    }

    pub fn with_evaluations(self, evaluations_per_epoch: u32) -> Self {
        Self {
            evaluations_per_epoch: evaluations_per_epoch.max(1),
            ..self
        }
    }

    /// The batch queues of one epoch, in publishing order: training, the interim validations,
    /// the epoch-end validation.
    pub fn epoch_queues(&self, run_id: &str, epoch: u32) -> Vec<String> {
        std::iter::once(train_queue(run_id, epoch))
            .chain((1..self.evaluations_per_epoch).map(|p| eval_queue(run_id, epoch, p)))
            .chain(std::iter::once(val_queue(run_id, epoch)))
            .collect()
    }
}

/// `flowers.<run_id>.dead`: messages rejected by the run's consumers.
pub fn dead_queue(run_id: &str) -> String {
    format!("flowers.{run_id}.dead")
}

/// The queues of a run: every epoch's [`RunLayout::epoch_queues`], then the dead-letter queue.
pub fn run_queues(run_id: &str, layout: RunLayout) -> Vec<String> {
    (0..layout.epochs)
        .flat_map(|e| layout.epoch_queues(run_id, e))
        .chain(std::iter::once(dead_queue(run_id)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(train_queue("r1", 0), "flowers.r1.train.0");
        assert_eq!(val_queue("r1", 3), "flowers.r1.val.3");
        assert_eq!(dead_queue("r1"), "flowers.r1.dead");
        assert_eq!(eval_queue("r1", 3, 0), "flowers.r1.val.3");
        assert_eq!(eval_queue("r1", 3, 2), "flowers.r1.val.3.2");
        assert_eq!(
            run_queues("r", RunLayout::epochs(2)),
            [
                "flowers.r.train.0",
                "flowers.r.val.0",
                "flowers.r.train.1",
                "flowers.r.val.1",
                "flowers.r.dead"
            ]
        );
        assert_eq!(
            run_queues("r", RunLayout::epochs(1).with_evaluations(3)),
            [
                "flowers.r.train.0",
                "flowers.r.val.0.1",
                "flowers.r.val.0.2",
                "flowers.r.val.0",
                "flowers.r.dead"
            ]
        );
    }

    #[test]
    fn run_ids_are_checked() {
        for good in ["a", "run-2024_01", &"x".repeat(MAX_RUN_ID_LEN)] {
            assert!(validate_run_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "é", &"x".repeat(MAX_RUN_ID_LEN + 1)] {
            let err = validate_run_id(bad).unwrap_err();
            assert!(err.to_string().contains("invalid run id"), "{bad}: {err}");
        }
    }
}
