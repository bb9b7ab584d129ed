//! Bits per byte: a tokenizer-independent loss (nanochat `loss_eval.py` semantics).
//!
//! Sum the loss (nats) over target tokens that stand for real bytes and divide by the number of
//! bytes those targets represent. `token_bytes[id]` is the UTF-8 length of token `id`, or 0 for
//! special tokens, which are thereby excluded; negative targets (ignore index) are excluded too.

use serde::{Deserialize, Serialize};

use crate::model::{row_losses_and_argmax, LogProbModel};
use crate::{EvalError, Result};

/// Running totals for bits per byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BpbAccumulator {
    /// Sum of losses (nats) over counted targets.
    pub nats: f64,
    /// Sum of bytes of counted targets.
    pub bytes: u64,
    /// Number of counted targets.
    pub tokens: u64,
}

impl BpbAccumulator {
    /// Add per-target losses. `targets[i] < 0` is ignored; a target with 0 bytes is ignored.
    pub fn add(&mut self, losses: &[f32], targets: &[i32], token_bytes: &[u32]) -> Result<()> {
        if losses.len() != targets.len() {
            return Err(EvalError::Invalid(format!(
                "{} losses for {} targets",
                losses.len(),
                targets.len()
            )));
        }
        for (&loss, &t) in losses.iter().zip(targets) {
            if t < 0 {
                continue;
            }
            let b = *token_bytes.get(t as usize).ok_or_else(|| {
                EvalError::Invalid(format!(
                    "target id {t} outside token_bytes ({} entries)",
                    token_bytes.len()
                ))
            })?;
            if b > 0 {
                self.nats += loss as f64;
                self.bytes += b as u64;
                self.tokens += 1;
            }
        }
        Ok(())
    }

    /// Merge another accumulator (e.g. from another thread).
    pub fn merge(&mut self, other: &BpbAccumulator) {
        self.nats += other.nats;
        self.bytes += other.bytes;
        self.tokens += other.tokens;
    }

    /// `nats / (ln 2 * bytes)`; infinity when nothing was counted (as the reference).
    pub fn bpb(&self) -> f64 {
        if self.bytes == 0 {
            f64::INFINITY
        } else {
            self.nats / (std::f64::consts::LN_2 * self.bytes as f64)
        }
    }
}

/// Evaluate bits per byte of `model` over rows of `seq_len + 1` tokens (inputs are the first
/// `seq_len`, targets the last `seq_len`), `batch` rows per forward.
pub fn evaluate_bpb(
    model: &dyn LogProbModel,
    rows: &[Vec<u32>],
    batch: usize,
    token_bytes: &[u32],
) -> Result<BpbAccumulator> {
    let mut acc = BpbAccumulator::default();
    for chunk in rows.chunks(batch.max(1)) {
        let t = chunk[0].len().saturating_sub(1);
        if t == 0 || chunk.iter().any(|r| r.len() != t + 1) {
            return Err(EvalError::Invalid(
                "bpb rows must all have the same length >= 2".into(),
            ));
        }
        let inputs: Vec<u32> = chunk.iter().flat_map(|r| r[..t].iter().copied()).collect();
        let logits = model.logits(&inputs, chunk.len(), t)?;
        logits.validate(chunk.len(), t)?;
        for (i, r) in chunk.iter().enumerate() {
            let (losses, _) = row_losses_and_argmax(&logits, i, 0..t, &r[1..]);
            let losses: Vec<f32> = losses.iter().map(|&l| l as f32).collect();
            let targets: Vec<i32> = r[1..].iter().map(|&x| x as i32).collect();
            acc.add(&losses, &targets, token_bytes)?;
        }
    }
    Ok(acc)
}

/// Pack documents into rows of `seq_len + 1` tokens: each document is BOS + its tokens, all
/// concatenated, then cut into windows of `seq_len + 1` that advance by `seq_len` (the last target
/// of a row is the first input of the next, as in the reference loader's batches); the remainder
/// is dropped; at most `max_rows` rows.
pub fn pack_rows(docs: &[Vec<u32>], bos: u32, seq_len: usize, max_rows: usize) -> Vec<Vec<u32>> {
    let mut stream = Vec::new();
    let mut rows = Vec::new();
    for d in docs {
        stream.push(bos);
        stream.extend_from_slice(d);
        while stream.len() > seq_len && rows.len() < max_rows {
            rows.push(stream[..seq_len + 1].to_vec());
            stream.drain(..seq_len);
        }
        if rows.len() >= max_rows {
            break;
        }
    }
    rows
}
