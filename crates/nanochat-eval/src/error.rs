//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading evaluation data, running a model or writing results.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration or metadata file is malformed (what, where, how to fix is in `message`).
    #[error("{path}: {message}")]
    Config {
        /// The offending file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A task has no usable items (all malformed, or the file is empty).
    #[error("task {task}: no usable items ({reason})")]
    EmptyTask {
        /// Task label.
        task: String,
        /// Why.
        reason: String,
    },
    /// The model (or generator) behind a trait failed.
    #[error("model: {0}")]
    Model(String),
    /// The Python sandbox could not be started.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// Anything the caller passed that cannot work (e.g. an empty batch).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// JSON (de)serialization of results or reports.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// SVG rendering of a curve failed.
    #[error("plot: {0}")]
    Plot(String),
    /// Writing a file durably failed, or an artifact could not be found (the path is in the
    /// message).
    #[error(transparent)]
    Store(#[from] nanochat_artifacts::Error),
}

impl EvalError {
    /// Shorthand for an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for a configuration error on `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EvalError::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
