//! Training data for nanochat: streaming pretraining documents, BOS-packed token batches
//! produced on a background thread, conversation batches for mid-training and SFT, and the
//! conversation tasks (`tasks`) shared by training and evaluation.
#![warn(missing_docs)]

pub mod chat_batches;
pub mod docs;
pub mod packer;
pub mod parquet;
pub mod tasks;

use std::path::{Path, PathBuf};

pub use docs::{list_shards, DocPosition, DocStream, ShardFormat, Split};
pub use packer::{Batch, PackerState, PretrainLoader};

/// Errors of the data library; every file-related error names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file's content is malformed.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, where, and how to fix it when known.
        detail: String,
    },
    /// Bad arguments or configuration.
    #[error("data configuration: {0}")]
    Config(String),
    /// Tokenizing or rendering failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The background loader thread stopped.
    #[error("data loader thread stopped: {0}")]
    Loader(String),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
