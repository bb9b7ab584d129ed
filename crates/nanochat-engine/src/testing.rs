//! Deterministic stand-ins for a model and a tokenizer, for tests of the engine and of the
//! crates that drive it (the server). Not for production use.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::model::{StepModel, TokenCodec};
use crate::EngineError;

/// nanochat's special tokens, in the order [`ByteCodec`] numbers them (from 256).
pub const SPECIAL_NAMES: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

/// A byte-level codec: ids 0..256 are bytes, 256..265 the special tokens.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteCodec;

impl ByteCodec {
    /// Id of a special token by name; panics on an unknown name (test helper).
    pub fn special(name: &str) -> u32 {
        SPECIAL_NAMES
            .iter()
            .position(|s| *s == name)
            .map(|i| 256 + i as u32)
            .unwrap_or_else(|| panic!("unknown special token {name}"))
    }

    /// Vocabulary size (bytes + specials).
    pub const VOCAB: usize = 256 + SPECIAL_NAMES.len();
}

impl TokenCodec for ByteCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            match id {
                0..=255 => out.push(id as u8),
                _ => {
                    if let Some(name) = SPECIAL_NAMES.get(id as usize - 256) {
                        out.extend_from_slice(name.as_bytes());
                    }
                }
            }
        }
        out
    }

    fn special_id(&self, name: &str) -> Option<u32> {
        SPECIAL_NAMES
            .iter()
            .position(|s| *s == name)
            .map(|i| 256 + i as u32)
    }
}

/// Chooses a strongly preferred next token from a row's full history (prompt + generated).
pub type Script = dyn Fn(&[u32]) -> Option<u32> + Send + Sync;

/// A fake model whose logits are a hash of each row's entire history, so any cache mix-up
/// (wrong row, lost token, bad copy) changes its output. A [`Script`] can make one token
/// dominate to steer generation.
pub struct FakeModel {
    vocab: usize,
    context: usize,
    script: Option<Arc<Script>>,
    /// Number of `forward` calls that prefilled a prompt of more than one token.
    pub prefills: AtomicUsize,
    /// Number of `forward` calls with one token per row.
    pub decodes: AtomicUsize,
    /// Largest number of rows seen in one `forward`.
    pub max_rows_per_forward: AtomicUsize,
}

/// The fake model's cache: each row's token history.
#[derive(Clone, Debug, Default)]
pub struct FakeCache {
    rows: Vec<Vec<u32>>,
}

impl FakeModel {
    /// A fake model over `vocab` tokens with a `context`-token window.
    pub fn new(vocab: usize, context: usize) -> Self {
        FakeModel {
            vocab,
            context,
            script: None,
            prefills: AtomicUsize::new(0),
            decodes: AtomicUsize::new(0),
            max_rows_per_forward: AtomicUsize::new(0),
        }
    }

    /// Adds a script that picks a dominant next token.
    pub fn with_script(
        mut self,
        script: impl Fn(&[u32]) -> Option<u32> + Send + Sync + 'static,
    ) -> Self {
        self.script = Some(Arc::new(script));
        self
    }

    /// The logits this model gives after `history`.
    pub fn logits_for(&self, history: &[u32]) -> Vec<f32> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in history {
            h = (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut logits: Vec<f32> = (0..self.vocab as u64)
            .map(|i| {
                let mut z = h ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 24) as f32 * 4.0
            })
            .collect();
        if let Some(t) = self.script.as_ref().and_then(|s| s(history)) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += 100.0;
            }
        }
        logits
    }

    fn row<'a>(
        &self,
        cache: &'a mut FakeCache,
        row: usize,
    ) -> Result<&'a mut Vec<u32>, EngineError> {
        cache.rows.get_mut(row).ok_or_else(|| out_of_range(row))
    }
}

impl StepModel for FakeModel {
    type Cache = FakeCache;

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn context_len(&self) -> usize {
        self.context
    }

    fn new_cache(&self, rows: usize) -> Result<FakeCache, EngineError> {
        Ok(FakeCache {
            rows: vec![Vec::new(); rows],
        })
    }

    fn forward(
        &self,
        cache: &mut FakeCache,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>, EngineError> {
        let calls = if batch.iter().any(|e| e.1.len() > 1) {
            &self.prefills
        } else {
            &self.decodes
        };
        calls.fetch_add(1, Ordering::Relaxed);
        self.max_rows_per_forward
            .fetch_max(batch.len(), Ordering::Relaxed);
        let mut out = Vec::with_capacity(batch.len() * self.vocab);
        let mut seen = vec![false; cache.rows.len()];
        for &(row, tokens) in batch {
            if std::mem::replace(seen.get_mut(row).ok_or_else(|| out_of_range(row))?, true) {
                return Err(EngineError::Model(
                    format!("row {row} appears twice").into(),
                ));
            }
            let context = self.context;
            let r = self.row(cache, row)?;
            r.extend_from_slice(tokens);
            if r.len() > context {
                return Err(EngineError::Model(
                    format!("row {row} exceeds the context").into(),
                ));
            }
            let h = r.clone();
            out.extend(self.logits_for(&h));
        }
        Ok(out)
    }

    fn reset_row(&self, cache: &mut FakeCache, row: usize) -> Result<(), EngineError> {
        self.row(cache, row)?.clear();
        Ok(())
    }

    fn copy_row(&self, cache: &mut FakeCache, src: usize, dst: usize) -> Result<(), EngineError> {
        let h = self.row(cache, src)?.clone();
        *self.row(cache, dst)? = h;
        Ok(())
    }
}

fn out_of_range(row: usize) -> EngineError {
    EngineError::Model(format!("row {row} out of range").into())
}
