//! [`StepModel`] for `nanochat-model`'s [`Gpt`]: rows of a [`KvCache`] sized to the training
//! context, one [`Gpt::forward_cached_last`] call per engine step (only the logits after each
//! row's last token are ever sampled, so no other position pays for lm_head).

use nanochat_model::{Backend, Gpt, KvCache};

use crate::model::StepModel;
use crate::EngineError;

/// Prompt tokens per forward call: a long prompt is fed in slices to bound the activation
/// buffers (about `PREFILL_CHUNK * 4 * n_embd` floats each).
const PREFILL_CHUNK: usize = 256;

fn model_err(e: nanochat_model::ModelError) -> EngineError {
    EngineError::Model(Box::new(e))
}

impl<B: Backend> StepModel for Gpt<B> {
    type Cache = KvCache<B>;

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn context_len(&self) -> usize {
        self.config().sequence_len
    }

    fn new_cache(&self, rows: usize) -> Result<KvCache<B>, EngineError> {
        self.new_kv_cache(rows, self.config().sequence_len)
            .map_err(model_err)
    }

    fn forward(
        &self,
        cache: &mut KvCache<B>,
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
        // More than one call's worth: cut prompts into slices of at most PREFILL_CHUNK and pack
        // the pieces (decode rows first, as they come) into calls of up to PREFILL_CHUNK tokens.
        // Packing matters when many short prompts arrive together (a burst of clients): one
        // call per prompt would pay each call's fixed cost (weight streaming or packing) per
        // prompt, which dominated the first token at 32 concurrent clients.
        let mut out = vec![0f32; batch.len() * vocab];
        let mut call: Vec<(usize, &[u32])> = Vec::new();
        // For each entry of `call`: the batch index whose logits it yields, if it is the last
        // slice of that entry.
        let mut owners: Vec<Option<usize>> = Vec::new();
        let mut call_tokens = 0;
        let mut flush = |call: &mut Vec<(usize, &[u32])>,
                         owners: &mut Vec<Option<usize>>,
                         call_tokens: &mut usize|
         -> Result<(), EngineError> {
            if call.is_empty() {
                return Ok(());
            }
            let logits = self.forward_cached_last(cache, call).map_err(model_err)?;
            for (j, owner) in owners.iter().enumerate() {
                if let Some(i) = *owner {
                    out[i * vocab..(i + 1) * vocab]
                        .copy_from_slice(&logits[j * vocab..(j + 1) * vocab]);
                }
            }
            call.clear();
            owners.clear();
            *call_tokens = 0;
            Ok(())
        };
        for (i, &(row, tokens)) in batch.iter().enumerate() {
            let slices = tokens.len().div_ceil(PREFILL_CHUNK);
            for (k, slice) in tokens.chunks(PREFILL_CHUNK).enumerate() {
                // A row's next slice must wait for the call holding its previous one.
                let row_in_call = call.iter().any(|&(r, _)| r == row);
                if row_in_call || call_tokens + slice.len() > PREFILL_CHUNK {
                    flush(&mut call, &mut owners, &mut call_tokens)?;
                }
                call.push((row, slice));
                owners.push((k + 1 == slices).then_some(i));
                call_tokens += slice.len();
            }
        }
        flush(&mut call, &mut owners, &mut call_tokens)?;
        Ok(out)
    }

    fn reset_row(&self, cache: &mut KvCache<B>, row: usize) -> Result<(), EngineError> {
        cache.reset(row).map_err(model_err)
    }

    fn copy_row(&self, cache: &mut KvCache<B>, src: usize, dst: usize) -> Result<(), EngineError> {
        cache.copy_row(src, dst).map_err(model_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanochat_model::GptConfig;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|t| (t * 31 + salt * 7 + 3) % 300)
            .collect()
    }

    /// Prompts too long for one call, mixed with decode rows, give the same last-position
    /// logits as each row run alone (the packing into calls is invisible).
    #[test]
    fn packed_prefill_matches_each_row_alone() {
        let cfg = GptConfig::from_depth(1, 300, 1024).unwrap();
        let mut gpt = Gpt::new(cfg, 3).unwrap();
        // The reference init zeroes lm_head and output projections; spread every weight so
        // that logits depend on the tokens.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for p in gpt.params_mut().iter_mut() {
            for v in p.data.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
            }
        }
        let vocab = 300;
        // Row 0 and 1 decode (history of 5 tokens then one new), rows 2-5 prefill: 40 + 40 +
        // 300 (split over two calls) + 200 tokens.
        let histories = [tokens(5, 1), tokens(5, 2)];
        let prompts = [tokens(40, 3), tokens(40, 4), tokens(300, 5), tokens(200, 6)];
        let decode = [[17u32], [42u32]];

        let mut cache = gpt.new_cache(6).unwrap();
        for (row, h) in histories.iter().enumerate() {
            gpt.forward(&mut cache, &[(row, h)]).unwrap();
        }
        let mut batch: Vec<(usize, &[u32])> = vec![(0, &decode[0]), (1, &decode[1])];
        for (j, p) in prompts.iter().enumerate() {
            batch.push((2 + j, p));
        }
        let packed = gpt.forward(&mut cache, &batch).unwrap();
        assert_eq!(packed.len(), batch.len() * vocab);

        let alone = |seq: &[&[u32]]| {
            let mut c = gpt.new_cache(1).unwrap();
            let mut last = Vec::new();
            for part in seq {
                last = gpt.forward_cached_last(&mut c, &[(0, part)]).unwrap();
            }
            last
        };
        let mut expected = Vec::new();
        for (h, d) in histories.iter().zip(&decode) {
            expected.push(alone(&[h, d]));
        }
        for p in &prompts {
            expected.push(alone(&[p]));
        }
        for (i, e) in expected.iter().enumerate() {
            let got = &packed[i * vocab..(i + 1) * vocab];
            let worst = got
                .iter()
                .zip(e)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-3, "entry {i}: max |diff| {worst}");
            assert_eq!(argmax(got), argmax(e), "entry {i}");
        }
        // Every row's cache grew by exactly its new tokens.
        for (row, n) in [(0, 6), (1, 6), (2, 40), (3, 40), (4, 300), (5, 200)] {
            assert_eq!(cache.len(row), n, "row {row}");
        }
    }

    fn argmax(v: &[f32]) -> usize {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0
    }
}
