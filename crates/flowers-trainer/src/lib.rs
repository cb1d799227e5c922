//! The trainer: consuming batches, training steps, checkpoints, evaluation and its benchmark.

pub mod device;
mod error;
pub mod metrics;
pub mod recipe;
pub mod state;
pub mod worker;

pub use error::TrainError;
