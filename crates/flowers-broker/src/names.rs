//! Queue naming per run (the cross-crate contract).

use crate::BrokerError;

/// The dead-letter exchange shared by every run (direct, durable).
pub const DLX_EXCHANGE: &str = "flowers.dlx";

/// Longest accepted run id; queue names must stay under AMQP's 255 bytes.
pub const MAX_RUN_ID_LEN: usize = 64;

/// Run ids appear in queue names and routing keys, so they are restricted to
/// `[A-Za-z0-9_-]`, 1 to [`MAX_RUN_ID_LEN`] characters.
pub fn validate_run_id(run_id: &str) -> Result<(), BrokerError> {
    let ok = !run_id.is_empty()
        && run_id.len() <= MAX_RUN_ID_LEN
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidRunId(run_id.to_string()))
    }
}

/// `flowers.<run_id>.train.<epoch>`: the training batches of one epoch.
pub fn train_queue(run_id: &str, epoch: u32) -> String {
    format!("flowers.{run_id}.train.{epoch}")
}

/// `flowers.<run_id>.val.<epoch>`: the validation batches of one epoch.
pub fn val_queue(run_id: &str, epoch: u32) -> String {
    format!("flowers.{run_id}.val.{epoch}")
}

/// `flowers.<run_id>.dead`: messages rejected by the run's consumers.
pub fn dead_queue(run_id: &str) -> String {
    format!("flowers.{run_id}.dead")
}

/// The queues of a run with `epochs` epochs: train and val of every epoch, in
/// publishing order, then the dead-letter queue.
pub fn run_queues(run_id: &str, epochs: u32) -> Vec<String> {
    (0..epochs)
        .flat_map(|e| [train_queue(run_id, e), val_queue(run_id, e)])
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
        assert_eq!(
            run_queues("r", 2),
            [
                "flowers.r.train.0",
                "flowers.r.val.0",
                "flowers.r.train.1",
                "flowers.r.val.1",
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
