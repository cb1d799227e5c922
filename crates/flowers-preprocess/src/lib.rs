//! Preprocessing of Oxford 102 Flowers images, shared by the loader (which publishes the pixels)
//! and the trainer (which evaluates on them): decode, centre-crop and resize.
//!
//! A gzip stream cannot be read at random, and every epoch wants a fresh order, so
//! [`preprocess_archive`] decodes the archive once, in parallel, into a disk-backed
//! [`PixelStore`]; each epoch then reads fixed-size records back with positional reads.
//!
//! [`preprocess_files`] does the same to loose JPEG files, for inference.
//!
//! Main types: [`PreprocessOptions`], [`Preprocessed`] (the store and what went into it),
//! [`PixelStore`], [`PreprocessError`].
//!
//! Depends on the data set and imaging crates only: nothing here knows of the broker, the wire
//! format or the model.

mod error;
mod files;
mod pipeline;
mod store;

pub use error::PreprocessError;
pub use files::preprocess_files;
pub use pipeline::{
    preprocess_archive, run_pipeline, ImageInfo, PipelineOutcome, PreprocessOptions, Preprocessed,
    Skipped,
};
pub use store::PixelStore;
