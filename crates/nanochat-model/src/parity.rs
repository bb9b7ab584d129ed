//! Parity against reference numbers laid out like `../shared/fixtures/gpt_tiny_a`
//! (`weights.safetensors`, `forward_backward.safetensors`, `meta.json`).
//!
//! Relative error of a tensor is `max|ours − ref| / max|ref|` (norm-wise, so near-zero
//! entries do not blow it up); a scalar's is `|ours − ref| / |ref|`.

use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::model::{Gpt, Reduction};
use nanochat_compute::{Backend, Cpu};

/// Results of one parity run.
#[derive(Debug, Clone)]
pub struct ParityReport {
    /// Relative error of the logits.
    pub logits: f64,
    /// Relative error of the mean loss.
    pub loss_mean: f64,
    /// Relative error of the summed loss.
    pub loss_sum: f64,
    /// Relative error of every parameter's gradient (of the mean loss).
    pub grads: Vec<(String, f64)>,
    /// Greedy tokens the reference produced.
    pub greedy_expected: Vec<u32>,
    /// Greedy tokens we produced with the KV cache.
    pub greedy_got: Vec<u32>,
    /// Relative error of KV-cached logits against full-forward logits (same model).
    pub cached_vs_full: f64,
}

impl ParityReport {
    /// Largest gradient error.
    pub fn max_grad(&self) -> f64 {
        self.grads.iter().map(|g| g.1).fold(0.0, f64::max)
    }
    /// Whether every error is within `tol` and the greedy tokens match.
    pub fn passes(&self, tol: f64) -> bool {
        self.logits <= tol
            && self.loss_mean <= tol
            && self.loss_sum <= tol
            && self.max_grad() <= tol
            && self.cached_vs_full <= tol
            && self.greedy_expected == self.greedy_got
    }
}

fn fx_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidInput(format!("fixture {}: {}", path.display(), reason.into()))
}

/// A tensor from a fixture file, as f64, whatever its stored dtype.
pub fn fixture_tensor(st: &SafeTensors<'_>, name: &str, path: &Path) -> Result<Vec<f64>> {
    let t = st
        .tensor(name)
        .map_err(|e| fx_err(path, format!("{name}: {e}")))?;
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
            .collect(),
        other => return Err(fx_err(path, format!("{name}: unsupported dtype {other:?}"))),
    })
}

/// `max|a − b| / max|b|`.
pub fn rel_err(ours: &[f32], reference: &[f64]) -> f64 {
    if ours.len() != reference.len() {
        return f64::INFINITY;
    }
    let scale = reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The model config a fixture's `meta.json` describes.
pub fn fixture_config(meta: &serde_json::Value, path: &Path) -> Result<GptConfig> {
    let c = &meta["config"];
    let u = |k: &str| {
        c[k].as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| fx_err(path, format!("config.{k} missing")))
    };
    let cfg = GptConfig {
        sequence_len: u("sequence_len")?,
        vocab_size: u("vocab_size")?,
        n_layer: u("n_layer")?,
        n_head: u("n_head")?,
        n_kv_head: u("n_kv_head")?,
        n_embd: u("n_embd")?,
        rope_base: meta["rope_base"].as_f64().unwrap_or(10000.0),
        softcap: Some(meta["softcap"].as_f64().unwrap_or(15.0) as f32),
    };
    cfg.validate()?;
    Ok(cfg)
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Loads the fixture's weights into a CPU model.
pub fn load_fixture_model(dir: &Path) -> Result<(Gpt, serde_json::Value)> {
    load_fixture_model_on(Cpu, dir)
}

/// Loads the fixture's weights into a model on `backend`.
pub fn load_fixture_model_on<B: Backend>(
    backend: B,
    dir: &Path,
) -> Result<(Gpt<B>, serde_json::Value)> {
    let meta_path = dir.join("meta.json");
    let meta: serde_json::Value = serde_json::from_slice(&read(&meta_path)?)
        .map_err(|e| fx_err(&meta_path, e.to_string()))?;
    let cfg = fixture_config(&meta, &meta_path)?;
    let wpath = dir.join("weights.safetensors");
    let model = Gpt::from_safetensors_on(backend, cfg, &read(&wpath)?, &wpath)?;
    Ok((model, meta))
}

/// Runs forward, backward and cached greedy decoding against a fixture directory, on the CPU.
pub fn run_parity(dir: &Path) -> Result<ParityReport> {
    run_parity_on(Cpu, dir)
}

/// [`run_parity`] on `backend`, at the model's default (f32) matmul precision.
pub fn run_parity_on<B: Backend>(backend: B, dir: &Path) -> Result<ParityReport> {
    let (mut model, meta) = load_fixture_model_on(backend, dir)?;
    let fb_path = dir.join("forward_backward.safetensors");
    let fb_bytes = read(&fb_path)?;
    let fb = SafeTensors::deserialize(&fb_bytes).map_err(|e| fx_err(&fb_path, e.to_string()))?;
    let (b, t) = (
        meta["batch"].as_u64().unwrap_or(0) as usize,
        meta["seq"].as_u64().unwrap_or(0) as usize,
    );
    let idx: Vec<u32> = fixture_tensor(&fb, "idx", &fb_path)?
        .iter()
        .map(|&x| x as u32)
        .collect();
    let targets: Vec<i32> = fixture_tensor(&fb, "targets", &fb_path)?
        .iter()
        .map(|&x| x as i32)
        .collect();
    let logits_ref = fixture_tensor(&fb, "logits", &fb_path)?;
    let logits = model.logits(&idx, b, t)?;
    let scalar = |ours: f32, r: f64| ((ours as f64 - r) / r).abs();
    let lm_ref = meta["loss_mean"].as_f64().unwrap_or(f64::NAN);
    let ls_ref = meta["loss_sum"].as_f64().unwrap_or(f64::NAN);
    let loss_sum = model.loss(&idx, &targets, b, t, Reduction::Sum)?;
    model.zero_grad()?;
    let loss_mean = model.forward_backward(&idx, &targets, b, t, Reduction::Mean)?;
    let mut grads = Vec::new();
    for (i, spec) in model.param_specs().iter().enumerate() {
        let r = fixture_tensor(&fb, &format!("grad.{}", spec.name), &fb_path)?;
        grads.push((spec.name.clone(), rel_err(&model.download_grad(i)?, &r)));
    }
    // Cached logits of the first row, prefill half then one token at a time.
    let cfg = model.config().clone();
    let row0 = &idx[..t];
    let mut cache = model.new_kv_cache(1, t)?;
    let half = t / 2;
    let mut cached = model.forward_cached(&mut cache, &[(0, &row0[..half])])?;
    for tok in &row0[half..] {
        cached.extend(model.forward_cached(&mut cache, &[(0, std::slice::from_ref(tok))])?);
    }
    let full: Vec<f64> = logits[..t * cfg.vocab_size]
        .iter()
        .map(|&x| x as f64)
        .collect();
    let cached_vs_full = rel_err(&cached, &full);
    // Greedy decoding with the cache.
    let prompt: Vec<u32> = meta["greedy_prompt"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default();
    let expected: Vec<u32> = meta["greedy_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default();
    let mut got = Vec::new();
    if !prompt.is_empty() {
        let mut cache = model.new_kv_cache(1, prompt.len() + expected.len() + 1)?;
        let v = cfg.vocab_size;
        let lg = model.forward_cached(&mut cache, &[(0, &prompt)])?;
        let mut next = argmax(&lg[lg.len() - v..]);
        for _ in 0..expected.len() {
            got.push(next);
            let lg = model.forward_cached(&mut cache, &[(0, &[next])])?;
            next = argmax(&lg);
        }
    }
    Ok(ParityReport {
        logits: rel_err(&logits, &logits_ref),
        loss_mean: scalar(loss_mean, lm_ref),
        loss_sum: scalar(loss_sum, ls_ref),
        grads,
        greedy_expected: expected,
        greedy_got: got,
        cached_vs_full,
    })
}
