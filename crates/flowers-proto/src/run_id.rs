//! Run ids: the one rule every component checks and the one generator.
//!
//! A run id names the run's queues (`flowers.<run_id>.train.<E>`), its directory under the
//! coordinator's state directory and its metrics, so it is restricted to an alphabet that is
//! safe in all of them.

use rand::Rng;

/// Longest accepted id; queue names built from it must stay under AMQP's 255 bytes.
pub const MAX_LEN: usize = 64;

/// The rule, as error messages state it.
pub const RULE: &str = "1 to 64 characters from A-Z a-z 0-9 - _";

/// Whether `id` follows [`RULE`]: 1 to [`MAX_LEN`] characters of `[A-Za-z0-9_-]`.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A fresh id for a run whose owner did not name it: `run-` and eight random hex digits.
pub fn random() -> String {
    format!("run-{:08x}", rand::thread_rng().gen::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_the_queue_name_alphabet() {
        for good in ["a", "run-2024_01", &"x".repeat(MAX_LEN)] {
            assert!(is_valid(good), "{good}");
        }
        for bad in ["", "a.b", ".a", "a b", "a/b", "é", &"x".repeat(MAX_LEN + 1)] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn random_ids_are_valid_and_differ() {
        let (a, b) = (random(), random());
        assert!(
            is_valid(&a) && a.starts_with("run-") && a.len() == 12,
            "{a}"
        );
        assert_ne!(a, b);
    }
}
