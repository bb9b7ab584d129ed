//! Text generation for nanochat models.
//!
//! A prompt is prefilled once into a KV-cache row, then decoded one token per step. Around that
//! core: the samplers ([`SamplingParams`]: greedy, temperature, top-k, top-p, min-p, seeded per
//! sequence), stop conditions (`<|assistant_end|>`, `<|bos|>`, stop strings, `max_tokens`, the
//! context window), UTF-8-safe text deltas, nanochat's calculator tool, prompt fitting, and
//! continuous batching ([`BatchDecoder`]) that a server drives directly.
//!
//! The engine talks to the model and the tokenizer through two small traits, [`StepModel`] and
//! [`TokenCodec`], so everything here is tested against the scripted fakes in [`testing`].
#![warn(missing_docs)]

pub mod batch;
pub mod calculator;
pub mod context;
pub mod device;
pub mod engine;
pub mod gpt;
pub mod model;
pub mod sampling;
pub mod stream;
pub mod testing;

pub use batch::{BatchDecoder, FinishReason, SeqId, StepOutput, TokenEvent, Usage};
pub use context::{fit_prompt, FitStrategy, Fitted};
pub use device::{DeviceGpt, DeviceKvCache};
pub use engine::{CancelToken, Completion, Engine, Generation};
pub use model::{Specials, StepModel, TokenCodec};
pub use sampling::{Sampler, SamplingParams, SeqRng};

/// Everything that can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A sampling parameter is out of range.
    #[error("invalid generation parameters: {0}")]
    InvalidParams(String),
    /// Nothing to condition on.
    #[error("the prompt is empty (a prompt needs at least one token, e.g. <|bos|>)")]
    EmptyPrompt,
    /// A prompt token is not in the model's vocabulary.
    #[error("prompt token {token} is outside the model's vocabulary of {vocab_size}")]
    InvalidToken {
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// Every row of the batch is taken; retry after a sequence finishes.
    #[error("the batch is full ({capacity} sequences); try again when one finishes")]
    BatchFull {
        /// Rows in the decoder.
        capacity: usize,
    },
    /// The model failed.
    #[error("model error: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An engine invariant broke (a bug).
    #[error("internal engine error: {0}")]
    Internal(String),
}
