//! Shared training library of the nanochat stages: the AdamW + Muon optimizers of the reference
//! recipe, learning-rate schedules, the training loop, checkpoints and exact resume.
#![warn(missing_docs)]

pub mod chat_stage;
pub mod grad_sync;
pub mod optim;
pub mod process;
pub mod schedule;
pub mod shard;
pub mod trainer;

/// Errors of the training library.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor had a different size than the optimizer registered for it.
    #[error("parameter `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// Parameter or tensor name.
        name: String,
        /// Registered shape.
        expected: Vec<usize>,
        /// Sizes that were passed.
        got: Vec<usize>,
    },
    /// Misuse of an optimizer or a failure inside one.
    #[error("optimizer: {0}")]
    Optimizer(String),
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A checkpoint exists but cannot be used.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file or directory.
        path: std::path::PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The model failed (shapes, non-finite loss, checkpoint I/O).
    #[error(transparent)]
    Model(#[from] nanochat_model::ModelError),
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] nanochat_data::DataError),
    /// Saving or loading the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] nanochat_tokenizer::Error),
    /// Writing a file durably failed, or an input artifact is not what the stage needs.
    #[error(transparent)]
    Store(#[from] nanochat_artifacts::Error),
    /// The ranks of a data-parallel run could not meet, or a collective failed (a peer died,
    /// aborted or stopped answering; the message names it).
    #[error(transparent)]
    Dist(#[from] nanochat_dist::DistError),
    /// The ranks of a data-parallel run disagree (different checkpoints, weights or configs).
    #[error("ranks disagree: {0}")]
    RankMismatch(String),
}
