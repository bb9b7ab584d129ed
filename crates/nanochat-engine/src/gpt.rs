//! [`StepModel`] for `nanochat-model`'s [`Gpt`]: rows of a [`KvCache`] sized to the training
//! context, one [`Gpt::forward_cached_last`] call per engine step (only the logits after each
//! row's last token are ever sampled, so no other position pays for lm_head).

use nanochat_model::{Gpt, KvCache};

use crate::model::StepModel;
use crate::EngineError;

/// Prompt tokens per forward call: a long prompt is fed in slices to bound the activation
/// buffers (about `PREFILL_CHUNK * 4 * n_embd` floats each).
const PREFILL_CHUNK: usize = 256;

fn model_err(e: nanochat_model::ModelError) -> EngineError {
    EngineError::Model(Box::new(e))
}

impl StepModel for Gpt {
    type Cache = KvCache;

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn context_len(&self) -> usize {
        self.config().sequence_len
    }

    fn new_cache(&self, rows: usize) -> Result<KvCache, EngineError> {
        KvCache::new(self.config(), rows, self.config().sequence_len).map_err(model_err)
    }

    fn forward(
        &self,
        cache: &mut KvCache,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>, EngineError> {
        let vocab = self.config().vocab_size;
        if batch.iter().any(|e| e.1.is_empty()) {
            return Err(EngineError::Internal(
                "forward called with an empty row".into(),
            ));
        }
        let total: usize = batch.iter().map(|e| e.1.len()).sum();
        if total <= PREFILL_CHUNK {
            // The common case: every decode row and any short prompts in one call.
            return self.forward_cached_last(cache, batch).map_err(model_err);
        }
        // Long prompts: the single-token rows together, then each prompt in chunks.
        let mut out = vec![0f32; batch.len() * vocab];
        let singles: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].1.len() == 1)
            .collect();
        if !singles.is_empty() {
            let sub: Vec<(usize, &[u32])> = singles.iter().map(|&i| batch[i]).collect();
            let logits = self.forward_cached_last(cache, &sub).map_err(model_err)?;
            for (j, &i) in singles.iter().enumerate() {
                out[i * vocab..(i + 1) * vocab]
                    .copy_from_slice(&logits[j * vocab..(j + 1) * vocab]);
            }
        }
        for (i, &(row, tokens)) in batch.iter().enumerate() {
            if tokens.len() == 1 {
                continue;
            }
            let mut last = Vec::new();
            for chunk in tokens.chunks(PREFILL_CHUNK) {
                last = self
                    .forward_cached_last(cache, &[(row, chunk)])
                    .map_err(model_err)?;
            }
            if last.len() == vocab {
                out[i * vocab..(i + 1) * vocab].copy_from_slice(&last);
            }
        }
        Ok(out)
    }

    fn reset_row(&self, cache: &mut KvCache, row: usize) -> Result<(), EngineError> {
        cache.reset(row).map_err(model_err)
    }

    fn copy_row(&self, cache: &mut KvCache, src: usize, dst: usize) -> Result<(), EngineError> {
        cache.copy_row(src, dst).map_err(model_err)
    }
}
