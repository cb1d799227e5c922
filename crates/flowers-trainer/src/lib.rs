//! The trainer: consuming batches, training steps, checkpoints, evaluation and its benchmark.
//!
//! - [`run`]: the consuming loop of `trainer run`, which asks a [`coordination::Coordination`]
//!   for the decisions a coordinator may take over ([`coordination::Standalone`] alone,
//!   [`coordinated::Coordinated`] with others); [`progress`] is where it stands and what it
//!   saves next to a checkpoint.
//! - [`state::TrainState`]: the model, its optimizer and one step, on the training thread of a
//!   [`worker::Worker`]; [`recipe`] says what trains when and at which learning rate.
//! - [`evaluate`] (`trainer evaluate`) and [`bench`] (`trainer bench`).
//!
//! Main types: [`run::RunOptions`], [`coordination::Coordination`], [`state::TrainState`],
//! [`recipe::Hyper`], [`TrainError`]. The model itself is flowers-model's and the preprocessing
//! flowers-preprocess's; the trainer must not depend on the loader crate, nor on the
//! coordinator beyond its client.

pub mod batch;
mod batch_check;
pub mod bench;
pub mod coordinated;
pub mod coordination;
pub mod device;
mod directives;
mod error;
pub mod evaluate;
pub mod gpu_claim;
pub mod metrics;
pub mod progress;
pub mod recipe;
pub mod run;
pub mod shutdown;
pub mod state;
pub mod trunk_cache;
pub mod worker;

pub use error::TrainError;
