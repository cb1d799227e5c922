//! The trainer: consuming batches, training steps, checkpoints, evaluation and its benchmark.
