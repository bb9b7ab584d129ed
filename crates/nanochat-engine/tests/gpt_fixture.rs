//! The engine on the real GPT: the reference fixture's greedy tokens (computed without a KV
//! cache) must come out of cached decoding, and batching must not change any result.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanochat_engine::{Engine, FinishReason, SamplingParams, TokenCodec};
use nanochat_model::{Gpt, GptConfig};

/// Fixture vocabularies have no tokenizer: ids map to one byte each, no special tokens.
struct PlainCodec;

impl TokenCodec for PlainCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }
    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter().map(|&i| (i % 256) as u8).collect()
    }
    fn special_id(&self, _: &str) -> Option<u32> {
        None
    }
}

fn fixture_dir() -> Option<PathBuf> {
    // `../shared` beside the workspace root, or `$NANOCHAT_SHARED_DIR` (e.g. from a worktree).
    let shared = std::env::var_os("NANOCHAT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let dir = shared.join("fixtures/gpt_tiny_a");
    if dir.join("weights.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIP: {} is absent", dir.display());
        None
    }
}

fn load() -> Option<(Engine<Gpt>, serde_json::Value)> {
    let dir = fixture_dir()?;
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    let c = &meta["config"];
    let get = |k: &str| c[k].as_u64().map(|v| v as usize);
    let cfg = GptConfig {
        sequence_len: get("sequence_len")?,
        vocab_size: get("vocab_size")?,
        n_layer: get("n_layer")?,
        n_head: get("n_head")?,
        n_kv_head: get("n_kv_head")?,
        n_embd: get("n_embd")?,
        rope_base: meta["rope_base"].as_f64()?,
        softcap: meta["softcap"].as_f64().map(|v| v as f32),
    };
    let path = dir.join("weights.safetensors");
    let bytes = std::fs::read(&path).ok()?;
    let gpt = Gpt::from_safetensors(cfg, &bytes, &path).expect("fixture weights load");
    Some((Engine::new(Arc::new(gpt), Arc::new(PlainCodec)), meta))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cached_greedy_reproduces_reference_tokens() {
    let Some((engine, meta)) = load() else { return };
    let prompt = ids(&meta["greedy_prompt"]);
    let want = ids(&meta["greedy_tokens"]);
    assert_eq!(want.len(), 12);
    let mut gen = engine
        .generate(&prompt, &SamplingParams::greedy(want.len()))
        .expect("generate");
    let got: Vec<u32> = gen.by_ref().map(|e| e.expect("token").token).collect();
    assert_eq!(got, want);
    assert_eq!(gen.finish_reason(), Some(FinishReason::Length));
    // top-k = 1 at any temperature is greedy.
    let k1 = SamplingParams {
        temperature: 0.8,
        top_k: 1,
        seed: Some(3),
        max_tokens: want.len(),
        ..Default::default()
    };
    let c = engine.generate_batch(&[prompt], &k1, 1, 1).expect("batch");
    assert_eq!(c[0].tokens, want);
}

#[test]
fn batching_and_seeds_do_not_change_results() {
    let Some((engine, meta)) = load() else { return };
    let base = ids(&meta["greedy_prompt"]);
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            base[..3 + i % 4]
                .iter()
                .map(|t| (t + i as u32 * 7) % 300)
                .collect()
        })
        .collect();
    for params in [
        SamplingParams::greedy(10),
        SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(1234),
            max_tokens: 10,
            ..Default::default()
        },
    ] {
        let together = engine
            .generate_batch(&prompts, &params, 1, 4)
            .expect("batch");
        for (p, t) in prompts.iter().zip(&together) {
            let alone = engine
                .generate_batch(std::slice::from_ref(p), &params, 1, 1)
                .expect("alone");
            assert_eq!(&alone[0], t);
        }
        let again = engine
            .generate_batch(&prompts, &params, 1, 4)
            .expect("again");
        assert_eq!(again, together);
    }
    // Several samples from one prefill equal separate runs on the matching streams.
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(77),
        max_tokens: 8,
        ..Default::default()
    };
    let samples = engine
        .generate_batch(&prompts[..1], &params, 3, 3)
        .expect("samples");
    let alone = engine
        .generate_batch(&prompts[..1], &params, 1, 1)
        .expect("alone");
    assert_eq!(samples[0], alone[0]);
    assert!(samples.iter().any(|s| s.tokens != samples[0].tokens));
}
