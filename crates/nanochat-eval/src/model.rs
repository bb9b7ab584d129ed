//! The small traits the evaluators are written against.
//!
//! Evaluation logic never sees a concrete model, tokenizer or sampler: it needs a tokenizer
//! ([`EvalTokenizer`]), something that returns next-token logits for a batch of sequences
//! ([`LogProbModel`]) and, for generative chat tasks, something that completes a prompt
//! ([`Generator`]). Adapters for `nanochat-model`/`nanochat-engine` implement these; tests use
//! scripted implementations whose answers are known in advance.

use crate::Result;

/// The tokenizer operations evaluation needs.
pub trait EvalTokenizer {
    /// Encode text as ordinary text (special-token strings are not special here).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Decode ids to text (lossy for invalid UTF-8).
    fn decode(&self, ids: &[u32]) -> String;
    /// The beginning-of-sequence id, prepended to every CORE prompt and used as padding.
    fn bos_id(&self) -> u32;
    /// Tokens of a chat prompt ending right where the assistant's reply begins
    /// (`render_for_completion` of a conversation with one user message).
    fn render_chat_prompt(&self, user_message: &str) -> Result<Vec<u32>>;
}

/// Next-token logits of a right-padded batch: `data[(row * seq_len + pos) * vocab + v]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsBatch {
    /// Rows in the batch.
    pub batch: usize,
    /// Padded length of every row.
    pub seq_len: usize,
    /// Vocabulary size (logits per position).
    pub vocab: usize,
    /// Row-major `[batch, seq_len, vocab]` logits.
    pub data: Vec<f32>,
}

impl LogitsBatch {
    /// Logits predicting the token after position `pos` of row `row`.
    pub fn at(&self, row: usize, pos: usize) -> &[f32] {
        let start = (row * self.seq_len + pos) * self.vocab;
        &self.data[start..start + self.vocab]
    }

    /// Check that the shape matches the data and the request.
    pub fn validate(&self, batch: usize, seq_len: usize) -> Result<()> {
        if self.batch != batch
            || self.seq_len != seq_len
            || self.data.len() != batch * seq_len * self.vocab
            || self.vocab == 0
        {
            return Err(crate::EvalError::Model(format!(
                "logits shape mismatch: asked for [{batch}, {seq_len}, V], got [{}, {}, {}] with {} values",
                self.batch,
                self.seq_len,
                self.vocab,
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// A causal language model that returns logits for every position of a padded batch.
pub trait LogProbModel {
    /// Longest sequence the model accepts; longer prompts are cropped from the left, as
    /// nanochat does for models with a fixed context. `None` = no limit.
    fn max_seq_len(&self) -> Option<usize> {
        None
    }
    /// The context the model was trained with (bits per byte is measured on rows this long).
    /// Defaults to [`LogProbModel::max_seq_len`].
    fn context_len(&self) -> Option<usize> {
        self.max_seq_len()
    }
    /// Forward `tokens` (`batch * seq_len` ids, rows right-padded) and return all logits.
    fn logits(&self, tokens: &[u32], batch: usize, seq_len: usize) -> Result<LogitsBatch>;

    /// Logits of the tail positions only, for groups of rows that share a prefix: for every
    /// group, every row `r` gets `[r.len() - group.shared, vocab]` logits (row-major) for the
    /// positions `group.shared..r.len()`. `None` means "not supported": the caller falls back
    /// to [`LogProbModel::logits`].
    ///
    /// Why: a CORE multiple-choice item renders one row per option, and the rows differ only
    /// in their last few tokens after hundreds of identical few-shot tokens. A model with a KV
    /// cache runs the shared prefix once per item and the vocabulary projection only where a
    /// loss is needed, instead of everything for every option.
    fn tail_logits(&self, groups: &[SharedPrefix<'_>]) -> Result<Option<Vec<Vec<Vec<f32>>>>> {
        let _ = groups;
        Ok(None)
    }

    /// Logits `[positions.len(), vocab]` at the flat positions `row·seq_len + pos` (strictly
    /// increasing) of a right-padded batch: all the padded scoring path reads (a continuation
    /// of a few tokens per row). The default slices [`LogProbModel::logits`]; a model that can
    /// skip the vocabulary projection elsewhere should (for CORE's 10-shot prompts that is
    /// nearly every position, and the full output is `batch·seq_len·vocab` floats).
    fn logits_at(
        &self,
        tokens: &[u32],
        batch: usize,
        seq_len: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        let all = self.logits(tokens, batch, seq_len)?;
        all.validate(batch, seq_len)?;
        let mut out = Vec::with_capacity(positions.len() * all.vocab);
        for &p in positions {
            if p >= batch * seq_len {
                return Err(crate::EvalError::Model(format!(
                    "logits_at: position {p} outside the {batch}×{seq_len} batch"
                )));
            }
            out.extend_from_slice(all.at(p / seq_len, p % seq_len));
        }
        Ok(out)
    }
}

/// Rows (token sequences) whose first `shared` tokens are identical; see
/// [`LogProbModel::tail_logits`].
#[derive(Debug, Clone)]
pub struct SharedPrefix<'a> {
    /// The sequences, each longer than `shared`.
    pub rows: Vec<&'a [u32]>,
    /// Length of the common prefix whose logits are not needed.
    pub shared: usize,
}

/// Greedy/sampled completion of a prompt, tool use included (the engine's job).
pub trait Generator {
    /// Generate at most `max_new_tokens` tokens after `prompt` and return only the new tokens.
    /// The generator stops at its own end-of-turn token.
    fn generate(&self, prompt: &[u32], max_new_tokens: usize) -> Result<Vec<u32>>;

    /// Complete several prompts (an implementation may decode them together). The outer error
    /// aborts the run; an inner error fails only that item.
    fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
    ) -> Result<Vec<Result<Vec<u32>>>> {
        Ok(prompts
            .iter()
            .map(|p| self.generate(p, max_new_tokens))
            .collect())
    }
}

/// Per-position cross entropy (nats) and argmax of one row, from its logits.
///
/// `targets[t]` is the token that position `t` should predict. Computed in f64 so long
/// vocabularies do not lose precision in the log-sum-exp.
pub fn row_losses_and_argmax(
    logits: &LogitsBatch,
    row: usize,
    positions: std::ops::Range<usize>,
    targets: &[u32],
) -> (Vec<f64>, Vec<u32>) {
    let mut losses = Vec::with_capacity(positions.len());
    let mut argmax = Vec::with_capacity(positions.len());
    for (pos, &target) in positions.zip(targets) {
        let l = logits.at(row, pos);
        let (mut best, mut best_i) = (f32::NEG_INFINITY, 0usize);
        let mut max = f32::NEG_INFINITY;
        for (i, &v) in l.iter().enumerate() {
            if v > best {
                best = v;
                best_i = i;
            }
            max = max.max(v);
        }
        let sum: f64 = l.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        let t = target as usize;
        let loss = if t < l.len() {
            lse - l[t] as f64
        } else {
            f64::INFINITY
        };
        losses.push(loss);
        argmax.push(best_i as u32);
    }
    (losses, argmax)
}
