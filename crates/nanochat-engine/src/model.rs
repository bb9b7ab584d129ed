//! The two narrow interfaces the engine drives: a model that extends KV-cached rows, and a
//! codec that maps tokens to bytes. `nanochat-model`'s `Gpt` and `nanochat-tokenizer`'s
//! `Tokenizer` implement them; tests use the scripted fakes in [`crate::testing`].

use crate::EngineError;

/// A decoder-only model with a row-addressed KV cache.
///
/// Rows are independent sequences with their own lengths; the engine decides which row holds
/// which sequence, so rows come and go between calls (continuous batching).
pub trait StepModel: Send + Sync {
    /// The KV cache for a fixed number of rows.
    type Cache: Send;

    /// Number of logits per position.
    fn vocab_size(&self) -> usize;
    /// Longest sequence (prompt + generated) a row can hold.
    fn context_len(&self) -> usize;
    /// An empty cache with `rows` rows.
    fn new_cache(&self, rows: usize) -> Result<Self::Cache, EngineError>;
    /// Runs one forward over several rows at once: `batch` lists `(row, tokens)` pairs, each
    /// row at most once, the tokens continuing that row (a whole prompt to prefill, or the one
    /// token of a decode step). Returns the logits after each entry's last token, row-major in
    /// the order given: `batch.len() * vocab_size`.
    fn forward(
        &self,
        cache: &mut Self::Cache,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>, EngineError>;
    /// Empties `row`.
    fn reset_row(&self, cache: &mut Self::Cache, row: usize) -> Result<(), EngineError>;
    /// Makes `dst` an exact copy of `src` (several samples from one prefill).
    fn copy_row(&self, cache: &mut Self::Cache, src: usize, dst: usize) -> Result<(), EngineError>;
}

/// Token <-> text mapping the engine needs (tool calls, stop strings, streaming text).
pub trait TokenCodec: Send + Sync {
    /// Ordinary text to ids; special-token strings in `text` are plain text.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// The exact bytes of `ids` (special tokens as their literal names).
    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8>;
    /// Id of a special token such as `<|assistant_end|>`.
    fn special_id(&self, name: &str) -> Option<u32>;
}

impl TokenCodec for nanochat_tokenizer::Tokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        nanochat_tokenizer::Tokenizer::encode(self, text)
    }

    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        nanochat_tokenizer::Tokenizer::decode_bytes(self, ids)
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        nanochat_tokenizer::Tokenizer::special_id(self, name)
    }
}

/// The special tokens that steer generation, looked up once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Specials {
    /// `<|bos|>`: generating it ends the sequence.
    pub bos: Option<u32>,
    /// `<|user_start|>`: turn boundary used when a prompt must be shortened.
    pub user_start: Option<u32>,
    /// `<|user_end|>`: end of the leading user turn kept as framing.
    pub user_end: Option<u32>,
    /// `<|assistant_end|>`: generating it ends the sequence.
    pub assistant_end: Option<u32>,
    /// `<|python_start|>`: starts a calculator call.
    pub python_start: Option<u32>,
    /// `<|python_end|>`: ends a calculator call; its result is forced next.
    pub python_end: Option<u32>,
    /// `<|output_start|>`: forced before a tool result.
    pub output_start: Option<u32>,
    /// `<|output_end|>`: forced after a tool result.
    pub output_end: Option<u32>,
}

impl Specials {
    /// Looks every special token up in `codec` (missing ones disable their feature).
    pub fn from_codec(codec: &dyn TokenCodec) -> Self {
        Specials {
            bos: codec.special_id("<|bos|>"),
            user_start: codec.special_id("<|user_start|>"),
            user_end: codec.special_id("<|user_end|>"),
            assistant_end: codec.special_id("<|assistant_end|>"),
            python_start: codec.special_id("<|python_start|>"),
            python_end: codec.special_id("<|python_end|>"),
            output_start: codec.special_id("<|output_start|>"),
            output_end: codec.special_id("<|output_end|>"),
        }
    }

    /// Tokens that end a sequence when generated.
    pub fn is_terminal(&self, token: u32) -> bool {
        Some(token) == self.assistant_end || Some(token) == self.bos
    }
}
