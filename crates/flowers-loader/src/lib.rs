//! The loader pipeline: epoch plans, parallel preprocessing, publishing and its benchmark.
