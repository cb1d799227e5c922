//! [`DatasetError`]: everything that can be wrong with the data set's files.

use std::io;
use std::path::PathBuf;

/// Everything that can be wrong with the data set's files. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a readable MAT v5 file: {source}")]
    MatParse {
        path: PathBuf,
        #[source]
        source: matfile::Error,
    },
    #[error("{path}: {message}")]
    MatContent { path: PathBuf, message: String },
    #[error("{path}: archive is truncated or corrupt: {message}")]
    Archive { path: PathBuf, message: String },
    /// The next member's header could not be read.
    #[error("{path}: archive is truncated or corrupt: {source}")]
    ArchiveHeader {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: archive is truncated or corrupt: {member}: {source}")]
    ArchiveMember {
        path: PathBuf,
        member: String,
        #[source]
        source: io::Error,
    },
    /// What follows the end-of-archive marker (the gzip trailer) does not read.
    #[error("{path}: archive is truncated or corrupt: after the end-of-archive marker: {source}")]
    ArchiveTrailer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {member} appears twice in the archive")]
    DuplicateImage { path: PathBuf, member: String },
    #[error("{path}: not a class-name map: {source}")]
    ClassNames {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: not a class-name map: key `{key}` is not a class number >= 1")]
    ClassNumber { path: PathBuf, key: String },
    #[error("invalid split: {0}")]
    Split(String),
}
