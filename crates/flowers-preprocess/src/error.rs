//! The errors of the preprocessing crate (archive pipeline and pixel store): [`PreprocessError`]
//! stops preprocessing; an undecodable image does not, it is [`crate::Skipped`]. Like the rest of
//! the crate, nothing here depends on the broker, the wire format or the model.

use std::io;
use std::path::PathBuf;

use flowers_dataset::DatasetError;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{archive}: {file_name} (image {number}) has no label: the labels cover images 1..={labelled}")]
    MissingLabel {
        archive: PathBuf,
        file_name: String,
        number: u32,
        labelled: usize,
    },
    #[error("pixel store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {number} is not in the pixel store")]
    NotStored { number: u32 },
    #[error("output buffer holds {got} bytes, an image is {expected}")]
    BufferSize { expected: usize, got: usize },
    #[error("reading {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not an image the loader's pipeline can read (JPEG expected)")]
    Undecodable {
        path: PathBuf,
        #[source]
        source: flowers_imaging::ImageError,
    },
    #[error("invalid preprocessing options: {0}")]
    Options(String),
    #[error("cannot start decoding: {0}")]
    Startup(String),
}
