use std::path::PathBuf;

/// Errors of the model library. File errors name the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {source}")]
    SafeTensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("unknown {what} {value:?} (expected one of: {})", expected.join(", "))]
    UnknownName {
        what: &'static str,
        value: String,
        expected: &'static [&'static str],
    },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    /// `value` is none of the `expected` names of a `what`.
    pub(crate) fn unknown_name(
        what: &'static str,
        value: &str,
        expected: &'static [&'static str],
    ) -> Self {
        ModelError::UnknownName {
            what,
            value: value.to_owned(),
            expected,
        }
    }

    pub(crate) fn bad_file(path: &std::path::Path, message: impl Into<String>) -> Self {
        ModelError::BadFile {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// A tensor in `path` whose shape is not the model's.
    pub(crate) fn shape_mismatch(
        path: &std::path::Path,
        name: &str,
        file: &[i64],
        model: &[i64],
    ) -> Self {
        Self::bad_file(
            path,
            format!("tensor {name} has shape {file:?}, the model needs {model:?}"),
        )
    }
}
