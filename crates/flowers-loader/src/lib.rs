//! The loader pipeline: epoch plans, parallel preprocessing, publishing and its benchmark.

pub mod bench;
pub mod preprocess;
