//! The seam between the HTTP server and the model: a served model renders prompts and makes
//! decoders; a decoder runs one continuous batch (sequences join and leave between steps).
//!
//! The shapes mirror `nanochat_engine::BatchDecoder` so the real engine plugs in with a thin
//! adapter, while the scheduler and every HTTP test can run against the scripted fake in
//! [`crate::fake`].

use crate::error::Result;

/// Identifier of a sequence inside one decoder.
pub type SeqId = u64;

/// How one sequence samples. `top_k == 0` and `top_p >= 1` disable those filters.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus mass (1: all).
    pub top_p: f32,
    /// Drop tokens below this fraction of the top probability (0: off).
    pub min_p: f32,
    /// RNG seed; `None` draws a fresh one.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
}

impl Sampling {
    /// The settings of sample `i` of a request for backends without seed streams: the seed
    /// shifted by `i`, so that choices differ yet repeat.
    pub fn nth_sample(&self, i: usize) -> Sampling {
        Sampling {
            seed: self.seed.map(|s| s.wrapping_add(i as u64)),
            ..self.clone()
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Finish {
    /// The model ended its turn, or a stop string matched.
    Stop,
    /// max_tokens (or the context window) was reached.
    Length,
    /// Cancelled by the server.
    Cancelled,
}

impl Finish {
    /// The OpenAI `finish_reason` string.
    pub fn as_openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            // OpenAI has no such reason; clients never see it because the stream is gone.
            Finish::Cancelled => "cancelled",
        }
    }
}

/// What one decode step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The sequence.
    pub id: SeqId,
    /// A sampled token and the UTF-8-safe text it completes (may be empty).
    pub token: Option<(u32, String)>,
    /// Set on the sequence's last output; the decoder has already dropped it.
    pub finished: Option<Finish>,
}

/// A continuous-batching decoder owned by one worker thread.
pub trait DecodeBackend {
    /// Start a sequence; it takes part in the next `step`.
    fn add(&mut self, prompt: Vec<u32>, sampling: Sampling) -> Result<SeqId>;
    /// Start `n` samples of one prompt (a request's `n` choices), all or none. Backends that
    /// can share the prompt's prefill override this; the default adds them one by one, sample
    /// `i` seeded with `seed + i`.
    fn add_samples(
        &mut self,
        prompt: Vec<u32>,
        sampling: Sampling,
        n: usize,
    ) -> Result<Vec<SeqId>> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            match self.add(prompt.clone(), sampling.nth_sample(i)) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.cancel(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }
    /// Advance every active sequence by one token.
    fn step(&mut self) -> Result<Vec<StepOutput>>;
    /// Drop a sequence now, freeing its slot (unknown ids are ignored).
    fn cancel(&mut self, id: SeqId);
    /// Sequences currently decoding.
    fn active(&self) -> usize;
}

/// One chat message after validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ChatTurn {
    /// `system`, `user` or `assistant`.
    pub role: Role,
    /// Plain text (content parts already joined).
    pub content: String,
}

/// Chat roles the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions; merged into the first user message like nanochat does.
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
}

/// A loaded model the server can serve: prompt rendering plus a decoder factory.
pub trait ServedModel: Send + Sync + 'static {
    /// Stable identity of the weights (artifact id or content hash); part of cache keys.
    fn artifact_id(&self) -> &str;
    /// Human-facing model name suggested for /v1/models.
    fn default_name(&self) -> &str;
    /// Context window in tokens (prompt + completion).
    fn context_len(&self) -> usize;
    /// Where the model runs, as its backend describes itself (`cpu (...)`, `cuda:0 (...)`);
    /// reported by `/health`, `/stats` and the startup log.
    fn device(&self) -> &str;
    /// Tokens priming the assistant to answer this conversation.
    fn render_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>>;
    /// Tokens for a raw completion prompt (BOS + text).
    fn render_completion(&self, prompt: &str) -> Result<Vec<u32>>;
    /// A fresh decoder for one worker (called on that worker's thread).
    fn new_decoder(&self, max_batch: usize) -> Result<Box<dyn DecodeBackend>>;
}
