//! Generation speed of the engine on a randomly initialised GPT: time to first token (prefill
//! of the prompt + first sample) and decode tokens/s, for a batch of samples from one prefill
//! (like the reference's `Engine.generate(num_samples=B)`). Prints one JSON line.
//!
//! usage: cargo run --release -p nanochat-engine --example bench_engine -- \
//!            DEPTH SEQ VOCAB BATCH [PROMPT_LEN=16] [NEW_TOKENS=128] [REPEATS=2]
//! Peer: scripts/bench_engine_torch.py with the same arguments (scripts/bench-engine.sh runs both).
//! `NANOCHAT_DEVICE=cuda` (a build with `--features cuda`) runs it on a GPU; the peer takes
//! `DEVICE=cuda`. `NANOCHAT_PRECISION=bf16` decodes from bf16 weights on the CPU (half the
//! bytes per token). `bench_engine --kernels` prints the CPU and its kernel choices.

use std::sync::Arc;
use std::time::Instant;

use nanochat_engine::{DeviceGpt, Engine, SamplingParams, TokenCodec};
use nanochat_model::{Device, Gpt, GptConfig};

/// No tokenizer is needed to time generation: ids are opaque and nothing is special, so no row
/// stops early.
struct OpaqueCodec;

impl TokenCodec for OpaqueCodec {
    fn encode(&self, _: &str) -> Vec<u32> {
        Vec::new()
    }
    fn decode_bytes(&self, _: &[u32]) -> Vec<u8> {
        Vec::new()
    }
    fn special_id(&self, _: &str) -> Option<u32> {
        None
    }
}

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `--kernels`: the CPU and the kernel each op family takes on it (the bench scripts print
    // this above their figures).
    if args.first().map(String::as_str) == Some("--kernels") {
        println!("cpu: {}", nanochat_model::compute::cpu::cpu_name());
        for line in nanochat_model::compute::cpu::select::kernel_choice().report() {
            println!("{line}");
        }
        return Ok(());
    }
    if args.len() < 4 {
        eprintln!("usage: bench_engine DEPTH SEQ VOCAB BATCH [PROMPT_LEN] [NEW_TOKENS] [REPEATS]");
        std::process::exit(2);
    }
    let (depth, seq, vocab, batch) = (
        arg(&args, 0, 4),
        arg(&args, 1, 512),
        arg(&args, 2, 32768),
        arg(&args, 3, 1),
    );
    let (prompt_len, new_tokens, repeats) =
        (arg(&args, 4, 16), arg(&args, 5, 128), arg(&args, 6, 2));
    let cfg = GptConfig::from_depth(depth, vocab, seq)?;
    let device: Device = std::env::var("NANOCHAT_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    let mut host = Gpt::new(cfg, 0)?;
    if let Ok(p) = std::env::var("NANOCHAT_PRECISION") {
        host.set_matmul_precision(p.parse()?);
    }
    let gpt = DeviceGpt::on(host, device)?;
    let params = gpt.config().num_params();
    let described = gpt.describe();
    let engine = Engine::new(Arc::new(gpt), Arc::new(OpaqueCodec));
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect();
    let sampling = SamplingParams::greedy(new_tokens);

    let mut best: Option<(f64, f64, f64)> = None;
    // One untimed warm-up run (allocations, page faults, thread pool start), then `repeats`.
    for run in 0..=repeats {
        let mut dec = engine.batch_decoder(batch)?;
        let t0 = Instant::now();
        dec.add_samples(prompt.clone(), sampling.clone(), batch)?;
        let mut first = None;
        let mut tokens = 0usize;
        while dec.active() > 0 {
            let outs = dec.step()?;
            tokens += outs.iter().filter(|o| o.event.is_some()).count();
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        }
        let total = t0.elapsed().as_secs_f64();
        let ttft = first.unwrap_or(total);
        // Tokens after the first step, over the time after it.
        let decode_tps = (tokens - batch) as f64 / (total - ttft);
        if run > 0 && best.is_none_or(|b| total < b.2) {
            best = Some((ttft, decode_tps, total));
        }
    }
    let (ttft, decode_tps, total) = best.unwrap_or_default();
    println!(
        "{{\"impl\":\"rust\",\"depth\":{depth},\"seq\":{seq},\"vocab\":{vocab},\"batch\":{batch},\
         \"prompt_len\":{prompt_len},\"new_tokens\":{new_tokens},\"params\":{params},\
         \"threads\":{},\"ttft_s\":{ttft:.4},\"decode_tokens_per_s\":{decode_tps:.1},\
         \"decode_tokens_per_s_per_seq\":{:.1},\"total_s\":{total:.3},\"device\":{described:?}}}",
        rayon_threads(),
        decode_tps / batch as f64
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
