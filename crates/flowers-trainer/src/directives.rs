//! What the coordinator's directives (its latest heartbeat answer) ask of this worker, given the
//! evaluations the worker already saw complete. Pure decisions: [`crate::coordinated`] does the
//! talking.

use flowers_proto::v1 as pb;

use crate::progress::{EpochProgress, Stage};

/// Orders an epoch's evaluations: the interim parts 1, 2, .. first, its end (part 0) last.
pub fn eval_order(epoch: u32, part: u32) -> (u32, u32) {
    (epoch, if part == 0 { u32::MAX } else { part })
}

/// The evaluation `d` asks for, as (epoch, part), unless this worker already saw it (or a later
/// one, by [`eval_order`]) complete: `validated`.
pub fn asked_evaluation(
    d: &pb::HeartbeatResponse,
    validated: Option<(u32, u32)>,
) -> Option<(u32, u32)> {
    let epoch = d.evaluate_epoch_plus_one.checked_sub(1)?;
    let seen = validated >= Some(eval_order(epoch, d.evaluate_part));
    (!seen).then_some((epoch, d.evaluate_part))
}

/// Whether the stage `progress` stands in is over for this worker under `d`.
pub fn stage_over(
    d: &pb::HeartbeatResponse,
    validated: Option<(u32, u32)>,
    progress: &EpochProgress,
) -> bool {
    if d.run_state == pb::RunState::Finished as i32 {
        return true;
    }
    let (epoch, part) = (progress.epoch, progress.eval_part);
    let asked = asked_evaluation(d, validated);
    match progress.stage {
        // Over once the epoch-end round is done (validation asked) or the run moved on.
        Stage::Train => d.current_epoch > epoch || asked == Some((epoch, 0)),
        // Over once every validation batch is counted, whoever evaluated it: this worker's
        // last report said so, or the coordinator asks for something else now.
        Stage::Validate => d.current_epoch > epoch || asked != Some((epoch, part)),
    }
}

/// The interim evaluation (its part) of `epoch` that `d` asks for, if any.
pub fn interim_part(
    d: &pb::HeartbeatResponse,
    validated: Option<(u32, u32)>,
    epoch: u32,
) -> Option<u32> {
    match asked_evaluation(d, validated) {
        Some((e, part)) if e == epoch && part > 0 => Some(part),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directives(current_epoch: u32, evaluate: Option<(u32, u32)>) -> pb::HeartbeatResponse {
        pb::HeartbeatResponse {
            run_state: pb::RunState::Running as i32,
            sync_round: 0,
            evaluate_epoch_plus_one: evaluate.map_or(0, |(e, _)| e + 1),
            current_epoch,
            evaluate_part: evaluate.map_or(0, |(_, p)| p),
        }
    }

    #[test]
    fn an_epochs_end_comes_after_its_interim_evaluations() {
        assert!(eval_order(1, 1) < eval_order(1, 2));
        assert!(eval_order(1, 2) < eval_order(1, 0));
        assert!(eval_order(1, 0) < eval_order(2, 1));
    }

    #[test]
    fn an_evaluation_seen_complete_is_no_longer_asked() {
        assert_eq!(asked_evaluation(&directives(0, None), None), None);
        let end = directives(1, Some((1, 0)));
        assert_eq!(asked_evaluation(&end, None), Some((1, 0)));
        assert_eq!(asked_evaluation(&end, Some(eval_order(1, 2))), Some((1, 0)));
        assert_eq!(asked_evaluation(&end, Some(eval_order(1, 0))), None);
    }

    #[test]
    fn training_ends_with_the_epochs_evaluation_or_the_next_epoch() {
        let training = EpochProgress::new(1, Stage::Train);
        assert!(!stage_over(&directives(1, None), None, &training));
        assert!(
            !stage_over(&directives(1, Some((1, 1))), None, &training),
            "an interim evaluation pauses training, it does not end it"
        );
        assert_eq!(interim_part(&directives(1, Some((1, 1))), None, 1), Some(1));
        assert_eq!(interim_part(&directives(1, Some((1, 1))), None, 2), None);
        assert_eq!(interim_part(&directives(1, Some((1, 0))), None, 1), None);
        assert!(stage_over(&directives(1, Some((1, 0))), None, &training));
        assert!(stage_over(&directives(2, None), None, &training));
        let finished = pb::HeartbeatResponse {
            run_state: pb::RunState::Finished as i32,
            ..directives(1, None)
        };
        assert!(stage_over(&finished, None, &training));
    }

    #[test]
    fn validation_ends_once_the_coordinator_asks_for_something_else() {
        let validating = EpochProgress::interim(1, 1);
        let asked = directives(1, Some((1, 1)));
        assert!(!stage_over(&asked, None, &validating));
        assert!(stage_over(&asked, Some(eval_order(1, 1)), &validating));
        assert!(stage_over(&directives(1, Some((1, 0))), None, &validating));
        assert!(stage_over(&directives(2, None), None, &validating));
    }
}
