//! Model hyper-parameters.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The embedding and lm_head rows are padded to a multiple of this (as the reference does).
pub const PAD_VOCAB_TO: usize = 64;

/// Shape of a GPT. Serialized as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Training context length; RoPE tables cover ten times this.
    pub sequence_len: usize,
    /// Real vocabulary size (logits are sliced to it).
    pub vocab_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of query heads.
    pub n_head: usize,
    /// Number of key/value heads (GQA); divides `n_head`.
    pub n_kv_head: usize,
    /// Model width; `n_embd / n_head` is the head dimension (even, for RoPE).
    pub n_embd: usize,
    /// RoPE base frequency (10000 in the reference).
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
    /// Logit softcap `c`: logits become `c·tanh(z/c)`; `None` disables it (the reference uses 15).
    #[serde(default = "default_softcap")]
    pub softcap: Option<f32>,
}

fn default_rope_base() -> f64 {
    10000.0
}
fn default_softcap() -> Option<f32> {
    Some(15.0)
}

impl GptConfig {
    /// nanochat's sizing rule: width `64·depth`, `ceil(width/128)` heads, as many KV heads.
    pub fn from_depth(depth: usize, vocab_size: usize, sequence_len: usize) -> Result<Self> {
        let n_embd = depth * 64;
        let n_head = n_embd.div_ceil(128).max(1);
        let cfg = GptConfig {
            sequence_len,
            vocab_size,
            n_layer: depth,
            n_head,
            n_kv_head: n_head,
            n_embd,
            rope_base: default_rope_base(),
            softcap: default_softcap(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every invariant the model relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.n_kv_head == 0 {
            return bad(format!(
                "n_layer, n_embd, n_head and n_kv_head must be positive (got {}, {}, {}, {})",
                self.n_layer, self.n_embd, self.n_head, self.n_kv_head
            ));
        }
        if self.vocab_size == 0 || self.vocab_size > u32::MAX as usize {
            return bad(format!(
                "vocab_size must be in 1..=2^32-1 (got {})",
                self.vocab_size
            ));
        }
        if self.sequence_len == 0 {
            return bad("sequence_len must be positive".into());
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dim n_embd/n_head = {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if self.n_kv_head > self.n_head || !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "n_kv_head {} must divide n_head {}",
                self.n_kv_head, self.n_head
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(format!(
                "rope_base must be a finite number > 1 (got {})",
                self.rope_base
            ));
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("softcap must be positive and finite (got {c})"));
            }
        }
        Ok(())
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Vocabulary rows of `wte` and `lm_head`: `vocab_size` rounded up to a multiple of 64.
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(PAD_VOCAB_TO) * PAD_VOCAB_TO
    }

    /// Positions covered by the rotary tables (the reference over-allocates 10x).
    pub fn max_positions(&self) -> usize {
        self.sequence_len * 10
    }

    /// Total parameter count (padded vocabulary included).
    pub fn num_params(&self) -> usize {
        crate::params::param_specs(self)
            .iter()
            .map(|s| s.shape[0] * s.shape[1])
            .sum()
    }

    /// The reference's FLOPs-per-token estimate for training (6·non-embedding params + attention).
    pub fn flops_per_token(&self) -> f64 {
        let n = self.num_params() - self.padded_vocab_size() * self.n_embd;
        6.0 * n as f64
            + 12.0 * (self.n_layer * self.n_head * self.head_dim() * self.sequence_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_depth_follows_nanochat_rule() {
        let c = GptConfig::from_depth(20, 65536, 2048).unwrap();
        assert_eq!(
            (c.n_embd, c.n_head, c.n_kv_head, c.head_dim()),
            (1280, 10, 10, 128)
        );
        let c = GptConfig::from_depth(8, 32768, 512).unwrap();
        assert_eq!((c.n_embd, c.n_head), (512, 4));
        let c = GptConfig::from_depth(1, 300, 32).unwrap();
        assert_eq!((c.n_embd, c.n_head), (64, 1));
    }

    #[test]
    fn padding_and_validation() {
        let mut c = GptConfig::from_depth(2, 300, 32).unwrap();
        assert_eq!(c.padded_vocab_size(), 320);
        c.vocab_size = 320;
        assert_eq!(c.padded_vocab_size(), 320);
        c.n_kv_head = 3;
        assert!(c.validate().is_err());
        c.n_kv_head = 2;
        c.n_head = 2;
        c.n_embd = 6; // head dim 3: odd
        assert!(c.validate().is_err());
    }
}
