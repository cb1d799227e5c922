//! The trainer: consuming batches, training steps, checkpoints, evaluation and its benchmark.

pub mod bench;
pub mod coordinated;
pub mod device;
mod error;
pub mod evaluate;
pub mod gpu_claim;
pub mod metrics;
pub mod recipe;
pub mod run;
pub mod shutdown;
pub mod state;
pub mod trunk_cache;
pub mod worker;

pub use error::TrainError;
