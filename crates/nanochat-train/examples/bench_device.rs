//! Training-step throughput on a device, shaped like the PyTorch peer
//! `shared/tools/bench_torch_gpu.py`: nanochat's sizing rule (width = 64·depth, heads of 128),
//! random tokens, bf16 matmuls, forward+backward then the Muon + AdamW step, timed after three
//! warm-up steps.
//!
//! `cargo run --release --features cuda -p nanochat-train --example bench_device -- DEVICE DEPTH SEQ BATCH VOCAB [STEPS]`
//!
//! Prints one JSON line (tokens/s, step seconds, the forward+backward and optimizer shares,
//! device memory in use).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use nanochat_model::compute::{with_backend, BackendTask};
use nanochat_model::{Backend, Device, Gpt, GptConfig, MatmulPrecision, Reduction};
use nanochat_train::optim::{muon_momentum_at, NanochatOptimizer, OptimizerSettings};

struct Bench {
    depth: usize,
    seq: usize,
    batch: usize,
    vocab: usize,
    steps: usize,
    precision: MatmulPrecision,
}

impl BackendTask for Bench {
    type Output = Result<serde_json::Value>;
    fn run<B: Backend>(self, backend: B) -> Result<serde_json::Value> {
        let dim = self.depth * 64;
        let heads = dim.div_ceil(128).max(1);
        let cfg = GptConfig {
            sequence_len: self.seq,
            vocab_size: self.vocab,
            n_layer: self.depth,
            n_head: heads,
            n_kv_head: heads,
            n_embd: dim,
            rope_base: 10000.0,
            softcap: Some(15.0),
        };
        let describe = backend.describe();
        let free0 = backend.available_memory();
        let host = Gpt::new(cfg, 0)?;
        let mut model = host.to_backend(backend.clone())?;
        drop(host);
        model.set_matmul_precision(self.precision);
        let mut opt = NanochatOptimizer::for_model(&model, OptimizerSettings::default())?;
        let n = self.batch * self.seq;
        let mut s = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let idx: Vec<u32> = (0..n)
            .map(|_| (next() % self.vocab as u64) as u32)
            .collect();
        let targets: Vec<i32> = (0..n)
            .map(|_| (next() % self.vocab as u64) as i32)
            .collect();
        let (mut fb, mut opt_s) = (0.0, 0.0);
        let mut loss = 0.0;
        let mut step = |model: &mut Gpt<B>, k: u64, timed: bool| -> Result<()> {
            let t0 = Instant::now();
            model.zero_grad()?;
            loss = model.forward_backward(&idx, &targets, self.batch, self.seq, Reduction::Mean)?;
            let t1 = Instant::now();
            opt.set_muon_momentum(muon_momentum_at(k));
            opt.step_model(model, 1.0)?;
            model.backend().synchronize()?;
            if timed {
                fb += (t1 - t0).as_secs_f64();
                opt_s += t1.elapsed().as_secs_f64();
            }
            Ok(())
        };
        let t0 = Instant::now();
        for k in 0..3 {
            step(&mut model, k, false)?;
        }
        let warmup = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for k in 0..self.steps {
            step(&mut model, 3 + k as u64, true)?;
        }
        let dt = t0.elapsed().as_secs_f64() / self.steps as f64;
        let free1 = model.backend().available_memory();
        let used = match (free0, free1) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 / 1e9),
            _ => None,
        };
        Ok(serde_json::json!({
            "device": describe, "depth": self.depth, "seq": self.seq, "batch": self.batch,
            "vocab": self.vocab, "precision": self.precision.to_string(), "steps": self.steps,
            "step_s": dt, "tok_per_s": n as f64 / dt,
            "fwd_bwd_s": fb / self.steps as f64, "optimizer_s": opt_s / self.steps as f64,
            "warmup_s": warmup, "mem_gb": used, "last_loss": loss,
        }))
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        bail!("usage: bench_device DEVICE DEPTH SEQ BATCH VOCAB [STEPS] [f32|bf16]");
    }
    let device: Device = args[0].parse()?;
    let num = |i: usize| -> Result<usize> {
        args[i]
            .parse()
            .with_context(|| format!("argument {}: {:?} is not an integer", i + 1, args[i]))
    };
    let bench = Bench {
        depth: num(1)?,
        seq: num(2)?,
        batch: num(3)?,
        vocab: num(4)?,
        steps: if args.len() > 5 { num(5)? } else { 10 },
        precision: match args.get(6) {
            Some(p) => p.parse()?,
            None => MatmulPrecision::Bf16,
        },
    };
    let out = with_backend(device, bench)??;
    println!("{out}");
    Ok(())
}
