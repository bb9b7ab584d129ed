//! Next-token selection: greedy, temperature, top-k, top-p (nucleus) and min-p, each sequence with
//! its own seeded random stream so results never depend on what else shares the batch.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::EngineError;

/// How one sequence is sampled and when it stops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose mass is at least
    /// `top_p`; `1` disables the filter.
    pub top_p: f32,
    /// Keep only tokens whose probability is at least `min_p` times the most likely token's;
    /// `0` disables the filter.
    pub min_p: f32,
    /// Seed of this sequence's random stream; `None` draws a fresh one.
    pub seed: Option<u64>,
    /// Upper bound on generated tokens (forced tool-output tokens count too).
    pub max_tokens: usize,
    /// Text that ends the generation when it appears; it is not part of the streamed text.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }

    /// Checks every field and says which one is out of range.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: String| Err(EngineError::InvalidParams(what));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!(
                "top_p must be in (0, 1] (1 = off), got {}",
                self.top_p
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!(
                "min_p must be in [0, 1] (0 = off), got {}",
                self.min_p
            ));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".into());
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// A sequence's private random stream (ChaCha8: fast, portable, reproducible across platforms).
#[derive(Clone, Debug)]
pub struct SeqRng(ChaCha8Rng);

impl SeqRng {
    /// Stream `stream` of `seed`: samples drawn from one prefill use streams 0, 1, 2, ...
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        SeqRng(rng)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seed for callers that did not ask for one (process-random, not cryptographic).
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Index of the largest logit; the first one wins ties (like `torch.argmax`). NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_val {
            best_val = v;
            best = i;
        }
    }
    best as u32
}

/// The distribution a non-greedy draw picks from after every filter: `(token, probability)`
/// pairs, probabilities summing to 1, most likely first when top-p is active.
///
/// Filters apply in the order temperature -> top-k -> top-p -> min-p; top-p measures mass after
/// top-k (renormalised), min-p is relative to the most likely token and so order-free.
pub fn filtered_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let mut scratch = Vec::new();
    filter_into(logits, params, &mut scratch);
    let total: f64 = scratch.iter().map(|c| c.1).sum();
    scratch.into_iter().map(|(t, p)| (t, p / total)).collect()
}

/// Fills `out` with `(token, unnormalised probability)` of the surviving candidates.
fn filter_into(logits: &[f32], params: &SamplingParams, out: &mut Vec<(u32, f64)>) {
    out.clear();
    // NaN logits are treated as impossible; an all -inf/NaN row falls back to argmax below.
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan() && **v > f32::NEG_INFINITY)
        .map(|(i, &v)| (i as u32, v))
        .collect();
    if cands.is_empty() {
        out.push((argmax(logits), 1.0));
        return;
    }
    let k = params.top_k;
    if k > 0 && k < cands.len() {
        // O(V) selection instead of a full O(V log V) sort: only k survivors get sorted.
        cands.select_nth_unstable_by(k - 1, desc);
        cands.truncate(k);
    }
    let need_sorted = params.top_p < 1.0;
    if need_sorted {
        cands.sort_unstable_by(desc);
    }
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let inv_t = 1.0 / params.temperature.max(f32::MIN_POSITIVE) as f64;
    out.extend(
        cands
            .iter()
            .map(|&(t, l)| (t, ((l as f64 - max) * inv_t).exp())),
    );
    if need_sorted {
        let total: f64 = out.iter().map(|c| c.1).sum();
        // Logits are f32, so probabilities carry ~1e-7 relative error: the slack keeps a set
        // whose exact mass equals p from being extended by one more token.
        let target = params.top_p as f64 * total * (1.0 - 1e-6);
        let mut cum = 0.0;
        let mut keep = out.len();
        for (i, c) in out.iter().enumerate() {
            cum += c.1;
            if cum >= target {
                keep = i + 1;
                break;
            }
        }
        out.truncate(keep.max(1));
    }
    if params.min_p > 0.0 {
        // The most likely survivor has unnormalised probability exp(0) = 1.
        let floor = params.min_p as f64;
        out.retain(|c| c.1 >= floor);
    }
}

/// Reusable per-row sampling state: the random stream plus a scratch buffer.
#[derive(Clone, Debug)]
pub struct Sampler {
    rng: SeqRng,
    scratch: Vec<(u32, f64)>,
}

impl Sampler {
    /// A sampler drawing from `rng`.
    pub fn new(rng: SeqRng) -> Self {
        Sampler {
            rng,
            scratch: Vec::new(),
        }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32], params: &SamplingParams) -> u32 {
        if params.is_greedy() {
            return argmax(logits);
        }
        filter_into(logits, params, &mut self.scratch);
        let total: f64 = self.scratch.iter().map(|c| c.1).sum();
        let mut u = self.rng.next_f64() * total;
        for &(tok, p) in &self.scratch {
            if u < p {
                return tok;
            }
            u -= p;
        }
        // Rounding left u a hair above the total: the last candidate is the right answer.
        self.scratch.last().map(|c| c.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits_from_probs(p: &[f64]) -> Vec<f32> {
        p.iter().map(|x| x.ln() as f32).collect()
    }

    fn params(t: f32, k: usize, p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p,
            ..Default::default()
        }
    }

    #[test]
    fn argmax_takes_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_mass() {
        let l = logits_from_probs(&[0.1, 0.4, 0.2, 0.3]);
        let toks = |p: f32| -> Vec<u32> {
            filtered_distribution(&l, &params(1.0, 0, p, 0.0))
                .iter()
                .map(|c| c.0)
                .collect()
        };
        assert_eq!(toks(0.4), vec![1]); // exactly reaches 0.4
        assert_eq!(toks(0.41), vec![1, 3]);
        assert_eq!(toks(0.7), vec![1, 3]); // 0.4 + 0.3 = 0.7 exactly
        assert_eq!(toks(0.71), vec![1, 3, 2]);
        assert_eq!(toks(0.9), vec![1, 3, 2]);
        assert_eq!(toks(0.95), vec![1, 3, 2, 0]);
        let mut all = toks(1.0); // filter off: every token, in vocabulary order
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
        let d = filtered_distribution(&l, &params(1.0, 0, 0.7, 0.0));
        assert!((d[0].1 - 0.4 / 0.7).abs() < 1e-6 && (d[1].1 - 0.3 / 0.7).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_min_p_filter_as_documented() {
        let l = logits_from_probs(&[0.05, 0.5, 0.2, 0.25]);
        let mut got: Vec<u32> = filtered_distribution(&l, &params(1.0, 2, 1.0, 0.0))
            .iter()
            .map(|c| c.0)
            .collect();
        got.sort();
        assert_eq!(got, vec![1, 3]);
        // min_p 0.45: keeps tokens with p >= 0.225 (0.5 and 0.25).
        let mut got: Vec<u32> = filtered_distribution(&l, &params(1.0, 0, 1.0, 0.45))
            .iter()
            .map(|c| c.0)
            .collect();
        got.sort();
        assert_eq!(got, vec![1, 3]);
        // top-p after top-k renormalises within the top-k set: 0.5/(0.75) >= 0.6.
        let got = filtered_distribution(&l, &params(1.0, 2, 0.6, 0.0));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 1);
    }

    #[test]
    fn temperature_sharpens_distribution() {
        let l = logits_from_probs(&[0.25, 0.75]);
        let d = filtered_distribution(&l, &params(0.5, 0, 1.0, 0.0));
        let p1 = d.iter().find(|c| c.0 == 1).map(|c| c.1).unwrap_or(0.0);
        assert!((p1 - 0.9).abs() < 1e-6, "{p1}"); // 0.75^2 / (0.75^2 + 0.25^2)
    }

    #[test]
    fn top_k_one_is_greedy_and_seeded_draws_repeat() {
        let l: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(SeqRng::new(1, 0));
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &params(1.3, 1, 1.0, 0.0)), argmax(&l));
        }
        let draw = |seed, stream| {
            let mut s = Sampler::new(SeqRng::new(seed, stream));
            (0..64)
                .map(|_| s.sample(&l, &params(1.0, 0, 1.0, 0.0)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 0), draw(7, 0));
        assert_ne!(draw(7, 0), draw(7, 1));
        assert_ne!(draw(7, 0), draw(8, 0));
    }

    #[test]
    fn sampling_frequencies_follow_filtered_distribution() {
        let l = logits_from_probs(&[0.1, 0.6, 0.3]);
        let mut s = Sampler::new(SeqRng::new(3, 0));
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&l, &params(1.0, 0, 1.0, 0.0)) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.1, 0.6, 0.3]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut p = SamplingParams::default();
        assert!(p.validate().is_ok());
        p.top_p = 0.0;
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        p = SamplingParams {
            stop: vec![String::new()],
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("stop"));
    }
}
