//! The loader pipeline: epoch plans, parallel preprocessing, publishing and its benchmark.
//!
//! [`run`] does a whole run from a [`LoaderConfig`]: [`prepare`] (read the
//! labels, decode the archive once into a disk-backed pixel store, split),
//! then [`Prepared::publish`] (declare the run's queues; per epoch publish the
//! shuffled training batches to `train.E`, then the validation batches to
//! `val.E`, and interim validations to `val.E.p` where asked, each confirmed
//! by the broker). Between the two, a caller can
//! register the run with the coordinator using [`Prepared::run_config`].
//!
//! A loader started again on a run leaves out what is there already ([`resume`]: counted at the
//! coordinator, or confirmed to an earlier loader, by its publish log), and while the run goes
//! on, [`replay`] publishes again the batches the broker lost.
//!
//! Also: [`plan`] (which images go into which batch of which epoch), [`bench`](mod@bench) (decode
//! throughput) and [`publish_bench`]. Errors are [`LoaderError`]s.
//!
//! It produces batches and must not depend on the model, the trainer or the coordinator (the
//! `loader` service does the registering).

pub mod bench;
mod pipeline;
pub mod plan;
pub mod replay;
pub mod resume;

pub use pipeline::{
    evaluations_per_epoch, log_prepared, prepare, publish_bench, run, Assembler, EpochSummary,
    LoaderConfig, LoaderError, Prepared, PublishBenchReport, Resume, RunSummary,
};
