//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use nanochat_model::{Gpt, GptConfig};

/// A tiny explicit config.
pub fn tiny(
    n_layer: usize,
    n_head: usize,
    n_kv_head: usize,
    n_embd: usize,
    vocab: usize,
) -> GptConfig {
    GptConfig {
        sequence_len: 16,
        vocab_size: vocab,
        n_layer,
        n_head,
        n_kv_head,
        n_embd,
        rope_base: 10000.0,
        softcap: Some(15.0),
    }
}

/// A model whose every weight (zero-initialised projections included) carries signal.
pub fn random_model(cfg: GptConfig, seed: u64) -> Gpt {
    let mut m = Gpt::new(cfg, seed).unwrap();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    {
        let mut pm = m.params_mut();
        for p in pm.iter_mut() {
            let scale = if p.name.contains("lm_head") { 0.5 } else { 0.3 };
            for x in p.data.iter_mut() {
                *x = *x * 0.5 + scale * next();
            }
        }
    }
    m
}

/// Deterministic pseudo-random tokens below `vocab`.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + seed * 97 + 13) % vocab as u64) as u32)
        .collect()
}
