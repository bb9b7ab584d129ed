//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong in the store or while parsing the stage contract.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "creating directory", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying OS error.
        source: std::io::Error,
    },
    /// A stage's TOML config could not be parsed or did not match the expected struct.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (from the TOML deserializer).
        message: String,
    },
    /// A `--input` argument or input lookup was invalid.
    #[error("input {name:?}: {reason}")]
    Input {
        /// The input name.
        name: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A string was not a valid object id (64 lowercase hex digits).
    #[error("invalid object id {0:?}: expected 64 lowercase hex digits (a sha256)")]
    InvalidObjectId(String),
    /// A ref name was not valid.
    #[error("invalid ref name {name:?}: {reason}")]
    InvalidRef {
        /// The offending name.
        name: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A ref does not exist.
    #[error("ref {0:?} does not exist in the store")]
    RefNotFound(String),
    /// The object is not in the store.
    #[error("object {0} is not in the store")]
    ObjectNotFound(String),
    /// An object failed verification; every problem found is listed.
    #[error("object {id} failed verification:\n  {}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Corrupt {
        /// The object id.
        id: String,
        /// Each file that is missing, truncated, altered or unexpected.
        problems: Vec<crate::store::Problem>,
    },
    /// Content to publish is unusable (e.g. a symlink or special file).
    #[error("cannot publish {}: {reason}", path.display())]
    Unpublishable {
        /// The offending path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A model reference (path, object directory, ref or id) does not lead to a checkpoint and
    /// tokenizer.
    #[error("model {reference}: {reason}")]
    ModelReference {
        /// The reference as given.
        reference: String,
        /// What is missing and how to fix it.
        reason: String,
    },
    /// A JSON record in the store could not be parsed.
    #[error("malformed store record {}: {source}", path.display())]
    Record {
        /// The record file.
        path: PathBuf,
        /// Parser error.
        source: serde_json::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Extension to attach an operation and path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
