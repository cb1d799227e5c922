//! Oxford 102 Flowers: streaming archive reader, MAT labels and split ids, train/validation splits.

mod archive;
mod mat;
#[cfg(feature = "testing")]
pub mod matwriter;
mod split;
#[cfg(feature = "testing")]
pub mod tarwriter;

use std::path::PathBuf;

pub use archive::{image_number, ArchiveImage, ArchiveReader};
pub use mat::{ClassNames, Labels, SetIds, SetName};
pub use split::{epoch_order, split_images, Split, SplitStrategy};

/// Everything that can be wrong with the data set's files. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable MAT v5 file: {message}")]
    MatParse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    MatContent { path: PathBuf, message: String },
    #[error("{path}: archive is truncated or corrupt: {message}")]
    Archive { path: PathBuf, message: String },
    #[error("{path}: {member} appears twice in the archive")]
    DuplicateImage { path: PathBuf, member: String },
    #[error("{path}: not a class-name map: {message}")]
    ClassNames { path: PathBuf, message: String },
    #[error("invalid split: {0}")]
    Split(String),
}
