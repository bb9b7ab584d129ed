//! Full training-step benchmark: the model's forward+backward alone against the whole optimizer
//! step (real-text data loading through the packer, forward+backward at a gradient
//! accumulation, grad clipping, Muon + AdamW), with f32 and with bf16 matmuls.
//!
//! `cargo run --release -p nanochat-train --example bench_step -- DEPTH SEQ BATCH VOCAB THREADS [ACCUM]`
//!
//! * Data: the shards of `$NANOCHAT_SHARED_DIR/data/corpus` (default `../shared`, relative to
//!   the workspace root; else the embedded `data/sample/corpus`), tokenized on the loader
//!   thread with GPT-2's `r50k_base` from `…/data/tokenizer/`, packed into `(BATCH, SEQ+1)`
//!   rows as pretraining does. Token ids are folded into the model's vocabulary (`id mod
//!   VOCAB`) so the model has exactly the asked shape; the tokenization work is the real one.
//! * ACCUM (default 8: the speedrun's 524,288-token batch over 32×2048-token micro-batches on
//!   one device) micro-batches per optimizer step; the step is also timed at ACCUM = 1, the
//!   worst case for the optimizer's share.
//! * `$NANOCHAT_BENCH_STEPS` (default 2) timed optimizer steps per setting, after one warm-up.
//! * Muon runs its Newton–Schulz in bf16 in every row (the recipe's default, as the
//!   reference); the precision column is the model's matmul precision.
//!
//! Prints a table and one JSON line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nanochat_data::packer::LoaderSpec;
use nanochat_data::{list_shards, Batch, PretrainLoader, Split};
use nanochat_model::{Gpt, GptConfig, MatmulPrecision, ParamMut, Reduction};
use nanochat_tokenizer::{OpenAiEncoding, Tokenizer};
use nanochat_train::optim::{
    clip_grad_norm, muon_momentum_at, NanochatOptimizer, OptimizerSettings,
};

fn shared_dir() -> PathBuf {
    std::env::var_os("NANOCHAT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// Corpus shards and the tokenizer that reads them.
fn data_source() -> Result<(Vec<PathBuf>, Arc<Tokenizer>)> {
    let shared = shared_dir().join("data");
    let tok_path = shared.join("tokenizer/r50k_base.tiktoken.gz");
    if !tok_path.exists() {
        bail!(
            "{} not found: set NANOCHAT_SHARED_DIR to the shared data checkout",
            tok_path.display()
        );
    }
    let tokenizer = Tokenizer::from_openai_file(&tok_path, OpenAiEncoding::R50kBase)
        .with_context(|| format!("loading {}", tok_path.display()))?;
    let mut corpus = shared.join("corpus");
    if !corpus.is_dir() {
        corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample/corpus");
    }
    let shards = list_shards(&corpus, Split::Train)
        .with_context(|| format!("listing shards in {}", corpus.display()))?;
    Ok((shards, Arc::new(tokenizer)))
}

/// The packer's batches with token ids folded into `vocab`.
struct Loader {
    inner: PretrainLoader,
    vocab: usize,
}

impl Loader {
    fn next(&mut self) -> Result<Batch> {
        let mut b = self.inner.next_batch()?;
        let v = self.vocab as u32;
        b.inputs.iter_mut().for_each(|x| *x %= v);
        b.targets
            .iter_mut()
            .filter(|x| **x >= 0)
            .for_each(|x| *x %= v as i32);
        Ok(b)
    }
}

struct Setup {
    cfg: GptConfig,
    b: usize,
    t: usize,
    shards: Vec<PathBuf>,
    tokenizer: Arc<Tokenizer>,
    steps: usize,
}

impl Setup {
    fn loader(&self) -> Result<Loader> {
        let spec = LoaderSpec {
            shards: self.shards.clone(),
            b: self.b,
            t: self.t,
            rank: 0,
            world_size: 1,
            prefetch: 4,
        };
        Ok(Loader {
            inner: PretrainLoader::start(spec, self.tokenizer.clone(), None)?,
            vocab: self.cfg.vocab_size,
        })
    }

    fn model_and_optimizer(&self, precision: MatmulPrecision) -> Result<(Gpt, NanochatOptimizer)> {
        let mut model = Gpt::new(self.cfg.clone(), 0)?;
        model.set_matmul_precision(precision);
        let specs: Vec<(String, Vec<usize>)> = model
            .param_specs()
            .iter()
            .map(|s| (s.name.clone(), s.shape.to_vec()))
            .collect();
        let opt = NanochatOptimizer::new(
            specs.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            self.cfg.n_embd,
            OptimizerSettings::default(),
        )?;
        Ok((model, opt))
    }

    /// Forward+backward tokens/s on one fixed real batch (what the model bench measures).
    fn fwd_bwd(&self, precision: MatmulPrecision) -> Result<f64> {
        let (mut model, _) = self.model_and_optimizer(precision)?;
        let batch = self.loader()?.next()?;
        let run = |model: &mut Gpt| -> Result<()> {
            model.zero_grad()?;
            model.forward_backward(
                &batch.inputs,
                &batch.targets,
                batch.b,
                batch.t,
                Reduction::Mean,
            )?;
            Ok(())
        };
        run(&mut model)?;
        let t0 = Instant::now();
        let reps = self.steps.max(2);
        for _ in 0..reps {
            run(&mut model)?;
        }
        Ok((reps * self.b * self.t) as f64 / t0.elapsed().as_secs_f64())
    }

    /// Full optimizer steps at `accum`: returns (tokens/s, mean optimizer seconds per step).
    fn full_step(&self, precision: MatmulPrecision, accum: usize) -> Result<(f64, f64)> {
        let (mut model, mut opt) = self.model_and_optimizer(precision)?;
        let mut loader = self.loader()?;
        let mut step = |model: &mut Gpt, n: u64| -> Result<f64> {
            model.zero_grad()?;
            for _ in 0..accum {
                let b = loader.next()?;
                model.forward_backward_scaled(
                    &b.inputs,
                    &b.targets,
                    b.b,
                    b.t,
                    Reduction::Mean,
                    1.0 / accum as f32,
                )?;
            }
            let t0 = Instant::now();
            opt.set_muon_momentum(muon_momentum_at(n));
            let mut pm = model.params_mut();
            let mut ps: Vec<ParamMut<'_>> = pm.iter_mut().collect();
            clip_grad_norm(ps.iter_mut().map(|p| &mut *p.grad), 1.0);
            opt.step(
                1.0,
                ps.into_iter().map(|p| {
                    let g: &[f32] = p.grad;
                    (p.name, p.data, g)
                }),
            )?;
            // (params_mut marked the weight cache stale: the next forward rebuilds it)
            Ok(t0.elapsed().as_secs_f64())
        };
        step(&mut model, 0)?;
        let mut opt_seconds = 0.0;
        let t0 = Instant::now();
        for n in 0..self.steps {
            opt_seconds += step(&mut model, n as u64 + 1)?;
        }
        let dt = t0.elapsed().as_secs_f64();
        Ok((
            (self.steps * accum * self.b * self.t) as f64 / dt,
            opt_seconds / self.steps as f64,
        ))
    }
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()
        .context("arguments: DEPTH SEQ BATCH VOCAB THREADS [ACCUM] (integers)")?;
    if args.len() < 5 {
        bail!("usage: bench_step DEPTH SEQ BATCH VOCAB THREADS [ACCUM]");
    }
    let (depth, seq, batch, vocab, threads) = (args[0], args[1], args[2], args[3], args[4]);
    let accum = args.get(5).copied().unwrap_or(8).max(1);
    let steps = std::env::var("NANOCHAT_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let (shards, tokenizer) = data_source()?;
    let setup = Setup {
        cfg: GptConfig::from_depth(depth, vocab, seq)?,
        b: batch,
        t: seq,
        shards,
        tokenizer,
        steps,
    };
    let mut json = serde_json::Map::new();
    for (key, v) in [
        ("depth", depth),
        ("seq", seq),
        ("batch", batch),
        ("vocab", vocab),
        ("threads", threads),
        ("accum", accum),
        ("steps", steps),
    ] {
        json.insert(key.into(), v.into());
    }
    // Which CPU and which kernels produced the figures (issue 18: every figure says so).
    let choice = nanochat_model::compute::cpu::select::kernel_choice();
    json.insert(
        "cpu".into(),
        nanochat_model::compute::cpu::cpu_name().into(),
    );
    json.insert("kernels".into(), choice.report().into());
    println!(
        "{:5} {:>12} {:>16} {:>10} {:>12} {:>12} {:>9}",
        "prec", "fwd+bwd", "step@ACCUM", "overhead", "step@1", "overhead@1", "optim s"
    );
    for (name, precision) in [
        ("f32", MatmulPrecision::F32),
        ("bf16", MatmulPrecision::Bf16),
    ] {
        let fb = setup.fwd_bwd(precision)?;
        let (full, opt_s) = setup.full_step(precision, accum)?;
        let full1 = if accum == 1 {
            full
        } else {
            setup.full_step(precision, 1)?.0
        };
        let over = |x: f64| 100.0 * (fb / x - 1.0);
        println!(
            "{name:5} {fb:>8.1} t/s {full:>12.1} t/s {:>8.1} % {full1:>8.1} t/s {:>10.1} % {opt_s:>9.3}",
            over(full),
            over(full1)
        );
        let r = |x: f64| (x * 10.0).round() / 10.0;
        json.insert(format!("{name}_fwd_bwd_tok_s"), r(fb).into());
        json.insert(format!("{name}_step_tok_s"), r(full).into());
        json.insert(format!("{name}_step_accum1_tok_s"), r(full1).into());
        json.insert(
            format!("{name}_optimizer_s"),
            ((opt_s * 1e4).round() / 1e4).into(),
        );
        json.insert(format!("{name}_step_overhead_pct"), r(over(full)).into());
        json.insert(
            format!("{name}_step_accum1_overhead_pct"),
            r(over(full1)).into(),
        );
    }
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}
