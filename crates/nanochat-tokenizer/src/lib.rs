//! nanochat-tokenizer: byte-level BPE in the style of GPT-4.
//!
//! - [`Tokenizer`]: tiktoken-compatible encoding over mergeable ranks with special tokens,
//!   batch encoding across threads, lossless `decode_bytes` and lossy `decode` that never panic,
//!   and the on-disk format (`tokenizer.tiktoken` + `tokenizer.json` sidecar).
//! - [`chat`]: conversations (SmolTalk / nanochat JSON) rendered into ids + training mask.
//! - [`pretokenize`]: the split patterns, with a hand-written scanner for the known ones.
#![warn(missing_docs)]

mod bpe;
pub mod chat;
pub mod corpus;
pub mod eval;
pub mod pretokenize;
mod tokenizer;
pub mod train;

use std::path::{Path, PathBuf};

pub use chat::{Content, Conversation, Message, Part, PartKind, Role};
pub use pretokenize::{
    Splitter, CL100K_PATTERN, GPT4_PATTERN, NANOCHAT_PATTERN, O200K_PATTERN, R50K_PATTERN,
};
pub use tokenizer::{
    parse_tiktoken, read_tiktoken, OpenAiEncoding, Tokenizer, NANOCHAT_SPECIALS, RANKS_FILE,
    SIDECAR_FILE,
};
pub use train::{train_nanochat, BpeTrainer, TrainOptions, TrainStats};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file's content is not in the expected format.
    #[error("{path}:{line}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when not line-oriented).
        line: usize,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// A JSON file or record could not be parsed or written.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The split pattern does not compile.
    #[error("invalid split pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// The regex engine's message.
        reason: String,
    },
    /// Ranks or special tokens are inconsistent.
    #[error("invalid vocabulary: {0}")]
    Vocab(String),
    /// A special token the operation needs is not in this tokenizer.
    #[error("this tokenizer has no special token {0:?} (train it with nanochat's specials)")]
    UnknownSpecial(String),
    /// An id outside the vocabulary.
    #[error("token id {0} is not in the vocabulary")]
    UnknownId(u32),
    /// A conversation that cannot be rendered.
    #[error("malformed conversation: {0}")]
    Conversation(String),
    /// Bad training settings or input.
    #[error("tokenizer training: {0}")]
    Train(String),
    /// Writing a file durably failed (the path is in the message).
    #[error(transparent)]
    Write(#[from] nanochat_artifacts::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
