//! The evaluation traits implemented for the real workspace types: `nanochat-model`'s [`Gpt`]
//! scores sequences, `nanochat-tokenizer`'s [`Tokenizer`] encodes and renders chat prompts, and
//! `nanochat-engine`'s [`Engine`] generates (greedy, calculator tool included).

use nanochat_engine::{DeviceGpt, Engine, SamplingParams, StepModel};
use nanochat_model::{Backend, Gpt};
use nanochat_tokenizer::chat::{Conversation, Message, Role};
use nanochat_tokenizer::Tokenizer;

use crate::model::{EvalTokenizer, Generator, LogProbModel, LogitsBatch, SharedPrefix};
use crate::{EvalError, Result};

impl<B: Backend> LogProbModel for Gpt<B> {
    /// The rotary table's length: nanochat's GPT forwards prompts longer than its training
    /// context without cropping, up to that table.
    fn max_seq_len(&self) -> Option<usize> {
        Some(self.config().max_positions())
    }

    /// The training context (`sequence_len`), not the rotary table: bits per byte is measured
    /// on rows as long as the ones the model was trained on, as nanochat does.
    fn context_len(&self) -> Option<usize> {
        Some(self.config().sequence_len)
    }

    fn logits(&self, tokens: &[u32], batch: usize, seq_len: usize) -> Result<LogitsBatch> {
        let data = Gpt::logits(self, tokens, batch, seq_len)
            .map_err(|e| EvalError::Model(e.to_string()))?;
        Ok(LogitsBatch {
            batch,
            seq_len,
            vocab: self.config().vocab_size,
            data,
        })
    }

    fn logits_at(
        &self,
        tokens: &[u32],
        batch: usize,
        seq_len: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        Gpt::logits_at(self, tokens, batch, seq_len, positions)
            .map_err(|e| EvalError::Model(e.to_string()))
    }

    /// Three cached forwards for all groups at once: prefill every group's shared prefix in
    /// its first row (only the last position goes through the vocabulary projection), copy
    /// that row's cache to the group's other rows, then run every row's tail.
    fn tail_logits(&self, groups: &[SharedPrefix<'_>]) -> Result<Option<Vec<Vec<Vec<f32>>>>> {
        let model_err = |e: nanochat_model::ModelError| EvalError::Model(e.to_string());
        let rows: usize = groups.iter().map(|g| g.rows.len()).sum();
        let capacity = groups
            .iter()
            .flat_map(|g| g.rows.iter().map(|r| r.len()))
            .max()
            .unwrap_or(0);
        if rows == 0 || capacity == 0 {
            return Ok(Some(
                groups
                    .iter()
                    .map(|g| vec![Vec::new(); g.rows.len()])
                    .collect(),
            ));
        }
        for g in groups {
            if g.rows
                .iter()
                .any(|r| r.len() <= g.shared || r[..g.shared] != g.rows[0][..g.shared])
            {
                return Err(EvalError::Invalid(
                    "tail_logits: a row does not extend its group's shared prefix".into(),
                ));
            }
        }
        let mut cache = self.new_kv_cache(rows, capacity).map_err(model_err)?;
        let mut first_rows = Vec::with_capacity(groups.len());
        let mut next = 0usize;
        for g in groups {
            first_rows.push(next);
            next += g.rows.len();
        }
        let prefill: Vec<(usize, &[u32])> = groups
            .iter()
            .zip(&first_rows)
            .filter(|(g, _)| g.shared > 0)
            .map(|(g, &r)| (r, &g.rows[0][..g.shared]))
            .collect();
        if !prefill.is_empty() {
            self.forward_cached_last(&mut cache, &prefill)
                .map_err(model_err)?;
        }
        let mut tails: Vec<(usize, &[u32])> = Vec::with_capacity(rows);
        for (g, &first) in groups.iter().zip(&first_rows) {
            for (k, r) in g.rows.iter().enumerate() {
                if k > 0 && g.shared > 0 {
                    cache.copy_row(first, first + k).map_err(model_err)?;
                }
                tails.push((first + k, &r[g.shared..]));
            }
        }
        let flat = self.forward_cached(&mut cache, &tails).map_err(model_err)?;
        let vocab = self.config().vocab_size;
        let mut out = Vec::with_capacity(groups.len());
        let mut offset = 0usize;
        for g in groups {
            let mut per_row = Vec::with_capacity(g.rows.len());
            for r in &g.rows {
                let n = (r.len() - g.shared) * vocab;
                per_row.push(flat[offset..offset + n].to_vec());
                offset += n;
            }
            out.push(per_row);
        }
        Ok(Some(out))
    }
}

/// Runs `$body` with `$m` bound to the GPT of whichever device the model is on.
macro_rules! on_device {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            DeviceGpt::Cpu($m) => $body,
            #[cfg(feature = "cuda")]
            DeviceGpt::Cuda($m) => $body,
        }
    };
}

/// A model on whichever device `--device` chose scores as the GPT on it does.
impl LogProbModel for DeviceGpt {
    fn max_seq_len(&self) -> Option<usize> {
        on_device!(self, m => m.max_seq_len())
    }

    fn context_len(&self) -> Option<usize> {
        on_device!(self, m => LogProbModel::context_len(m))
    }

    fn logits(&self, tokens: &[u32], batch: usize, seq_len: usize) -> Result<LogitsBatch> {
        on_device!(self, m => LogProbModel::logits(m, tokens, batch, seq_len))
    }

    fn logits_at(
        &self,
        tokens: &[u32],
        batch: usize,
        seq_len: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        on_device!(self, m => LogProbModel::logits_at(m, tokens, batch, seq_len, positions))
    }

    fn tail_logits(&self, groups: &[SharedPrefix<'_>]) -> Result<Option<Vec<Vec<Vec<f32>>>>> {
        on_device!(self, m => m.tail_logits(groups))
    }
}

impl EvalTokenizer for Tokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        Tokenizer::encode(self, text)
    }
    fn decode(&self, ids: &[u32]) -> String {
        Tokenizer::decode(self, ids)
    }
    fn bos_id(&self) -> u32 {
        Tokenizer::bos_id(self)
    }
    fn render_chat_prompt(&self, user_message: &str) -> Result<Vec<u32>> {
        let conv = Conversation {
            messages: vec![
                Message::text(Role::User, user_message),
                Message::text(Role::Assistant, ""),
            ],
        };
        self.render_for_completion(&conv)
            .map_err(|e| EvalError::Invalid(format!("cannot render the chat prompt: {e}")))
    }
}

/// Greedy generation through the engine, `max_batch` prompts decoded together.
pub struct EngineGenerator<M: StepModel> {
    engine: Engine<M>,
    max_batch: usize,
}

impl<M: StepModel> EngineGenerator<M> {
    /// Wrap an engine; `max_batch` sequences share each decode step.
    pub fn new(engine: Engine<M>, max_batch: usize) -> Self {
        EngineGenerator {
            engine,
            max_batch: max_batch.max(1),
        }
    }

    fn params(max_new_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 50,
            max_tokens: max_new_tokens,
            seed: Some(0),
            ..SamplingParams::default()
        }
    }
}

impl<M: StepModel> Generator for EngineGenerator<M> {
    fn generate(&self, prompt: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
        let mut out = self.generate_batch(&[prompt.to_vec()], max_new_tokens)?;
        out.pop()
            .unwrap_or_else(|| Err(EvalError::Model("no completion".into())))
    }

    fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
    ) -> Result<Vec<Result<Vec<u32>>>> {
        let done = self
            .engine
            .generate_batch(prompts, &Self::params(max_new_tokens), 1, self.max_batch)
            .map_err(|e| EvalError::Model(e.to_string()))?;
        Ok(done.into_iter().map(|c| Ok(c.tokens)).collect())
    }
}
