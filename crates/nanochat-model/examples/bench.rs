//! Throughput benchmark: GEMM peak and memory bandwidth of this machine, a training step
//! (forward + backward) and batch-1 KV-cached decoding.
//!
//! `cargo run --release -p nanochat-model --example bench -- DEPTH SEQ BATCH VOCAB [STEPS]`
//! Training is timed with f32 and with bf16 matmuls (`train_bf16_*`), after the f32 and bf16
//! GEMM peaks. Decoding is timed with f32 and with bf16 weights (`decode_bf16_*`), each
//! against its floor: the time all threads take to stream those weights the way the decode
//! GEMV reads them. Prints one JSON line (compare with ../shared/tools/bench_torch_cpu.py, run back to back).

use std::time::Instant;

use nanochat_model::compute::cpu::bf16::{gemm_bf16, Op};
use nanochat_model::compute::cpu::kernels::{gemm_acc, stream_read_secs};
use nanochat_model::compute::cpu::{cpu_name, select::kernel_choice};
use nanochat_model::{Gpt, GptConfig, KvCache, MatmulPrecision, Reduction};

/// Best-of-3 GFLOP/s of a 2048×1024×512 GEMM (f32, or bf16 with f32 accumulation).
fn gemm_peak(bf16: bool) -> f64 {
    let (m, n, k) = (2048usize, 1024usize, 512usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let reps = 10;
        for _ in 0..reps {
            if bf16 {
                gemm_bf16(Op::N, Op::N, m, n, k, &a, &b, &mut c).unwrap();
            } else {
                gemm_acc(m, n, k, &a, &b, &mut c).unwrap();
            }
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        best = best.max(2.0 * (m * n * k) as f64 / dt / 1e9);
    }
    best
}

/// Batch-1 decode at `precision`: prefill 16 tokens, then single tokens as the PyTorch script
/// does. Between every 8 tokens one pass of the floor: `floor_weights` (the matmul weights in
/// the layout the decode GEMV streams; the embedding is a one-row lookup) read once by all
/// threads at once, each streaming its share of every matrix. Interleaved, so that load from
/// other processes hits both alike. Returns (tokens/s over the run, tokens/s of the median
/// token, floor tokens/s of the median pass): on a shared machine the medians show the speed
/// when the other load lets it run, the mean what this run got.
fn time_decode(
    m: &mut Gpt,
    cfg: &GptConfig,
    idx: &[u32],
    seq: usize,
    precision: MatmulPrecision,
    floor_weights: &[&[f32]],
) -> anyhow::Result<(f64, f64, f64)> {
    m.set_matmul_precision(precision);
    let vocab = cfg.vocab_size;
    let mut cache = KvCache::new(cfg, 1, seq)?;
    let prompt: Vec<u32> = idx[..16].to_vec();
    let lg = m.forward_cached(&mut cache, &[(0, &prompt)])?;
    let argmax = |x: &[f32]| {
        x.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32
    };
    let mut next = argmax(&lg[lg.len() - vocab..]);
    let dsteps = 128.min(seq - 17);
    let mut per_token = Vec::with_capacity(dsteps);
    let mut floor = Vec::new();
    stream_read_secs(floor_weights);
    let mut busy = 0.0;
    for step in 0..dsteps {
        if step % 8 == 0 {
            floor.push(stream_read_secs(floor_weights));
        }
        let t1 = Instant::now();
        let lg = m.forward_cached(&mut cache, &[(0, &[next])])?;
        next = argmax(&lg);
        let dt = t1.elapsed().as_secs_f64();
        busy += dt;
        per_token.push(dt);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((
        dsteps as f64 / busy,
        1.0 / median(&mut per_token),
        1.0 / median(&mut floor),
    ))
}

fn main() -> anyhow::Result<()> {
    // `--kernels`: the CPU and the kernel each op family takes on it (for the bench scripts).
    if std::env::args().nth(1).as_deref() == Some("--kernels") {
        println!("cpu: {}", cpu_name());
        for line in kernel_choice().report() {
            println!("{line}");
        }
        return Ok(());
    }
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let (depth, seq, batch, vocab) = (a[0], a[1], a[2], a[3]);
    let steps = a.get(4).copied().unwrap_or(3);
    let cfg = GptConfig::from_depth(depth, vocab, seq)?;
    // NANOCHAT_BENCH_TRAIN_ONLY=1: skip the machine probes and decoding (for profiling);
    // NANOCHAT_BENCH_DECODE_ONLY=1: skip the GEMM peaks and training.
    let train_only = std::env::var_os("NANOCHAT_BENCH_TRAIN_ONLY").is_some();
    let decode_only = std::env::var_os("NANOCHAT_BENCH_DECODE_ONLY").is_some();
    let (peak, peak_bf16) = if train_only || decode_only {
        (0.0, 0.0)
    } else {
        (gemm_peak(false), gemm_peak(true))
    };
    if std::env::var_os("NANOCHAT_BENCH_PEAK_ONLY").is_some() {
        println!("gemm_peak_gflops {peak:.1} bf16 {peak_bf16:.1}");
        return Ok(());
    }
    let mut m = Gpt::new(cfg.clone(), 0)?;
    let n = batch * seq;
    let idx: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let tg: Vec<i32> = (0..n).map(|i| ((i * 104729 + 7) % vocab) as i32).collect();
    // Forward+backward tokens/s at one matmul precision (after a warm-up step that allocates).
    let time_train = |m: &mut Gpt, precision: MatmulPrecision| -> anyhow::Result<f64> {
        m.set_matmul_precision(precision);
        m.zero_grad()?;
        m.forward_backward(&idx, &tg, batch, seq, Reduction::Mean)?;
        let t = Instant::now();
        for _ in 0..steps {
            m.zero_grad()?;
            m.forward_backward(&idx, &tg, batch, seq, Reduction::Mean)?;
        }
        Ok(n as f64 * steps as f64 / t.elapsed().as_secs_f64())
    };
    // NANOCHAT_BENCH_BF16_ONLY=1: time bf16 training only (for profiling).
    let tps = if decode_only || std::env::var_os("NANOCHAT_BENCH_BF16_ONLY").is_some() {
        f64::NAN
    } else {
        time_train(&mut m, MatmulPrecision::F32)?
    };
    let tps_bf16 = if decode_only {
        f64::NAN
    } else {
        time_train(&mut m, MatmulPrecision::Bf16)?
    };
    m.set_matmul_precision(MatmulPrecision::F32);
    let step_s = n as f64 / tps;
    // Matmul FLOPs actually done: 6·(non-embedding params) per token + causal attention
    // (QK and PV, fwd + bwd with recomputed scores ≈ 5 · 2·T²/2·D per head per layer / T).
    let nonemb = (cfg.num_params() - cfg.padded_vocab_size() * cfg.n_embd) as f64;
    let attn = 5.0 * (cfg.n_layer * cfg.n_head * cfg.head_dim() * seq) as f64;
    let gflops = (6.0 * nonemb + attn) * tps / 1e9;
    let gflops_bf16 = (6.0 * nonemb + attn) * tps_bf16 / 1e9;
    if train_only {
        println!(
            "train_tokens_per_s {tps:.1} gflops {gflops:.1} | bf16 {tps_bf16:.1} gflops {gflops_bf16:.1}"
        );
        return Ok(());
    }
    m.release_training_state();
    // The floors: the f32 weights as they are, and for bf16 the same matrices at half the
    // bytes (the bf16 rows the GEMV streams; same split, same order).
    let f32_weights: Vec<&[f32]> = m
        .params()
        .zip(m.param_layout())
        .filter(|(_, slot)| slot.matmul)
        .map(|(p, _)| p.data)
        .collect();
    let bf16_bytes: Vec<Vec<f32>> = f32_weights
        .iter()
        .map(|w| vec![1.0; w.len().div_ceil(2)])
        .collect();
    let bf16_weights: Vec<&[f32]> = bf16_bytes.iter().map(Vec::as_slice).collect();
    let f32_weights: Vec<Vec<f32>> = f32_weights.iter().map(|w| w.to_vec()).collect();
    let f32_weights: Vec<&[f32]> = f32_weights.iter().map(Vec::as_slice).collect();
    let (dec_tps, dec_median_tps, floor_tps) =
        time_decode(&mut m, &cfg, &idx, seq, MatmulPrecision::F32, &f32_weights)?;
    let (dec16_tps, dec16_median_tps, floor16_tps) = time_decode(
        &mut m,
        &cfg,
        &idx,
        seq,
        MatmulPrecision::Bf16,
        &bf16_weights,
    )?;
    m.set_matmul_precision(MatmulPrecision::F32);
    // Weights streamed per decoded token (wte reads one row only).
    let bytes_per_token = 4.0 * nonemb;
    let bw = bytes_per_token * floor_tps / 1e9;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "depth": depth, "dim": cfg.n_embd, "heads": cfg.n_head, "seq": seq, "batch": batch,
            "vocab": vocab, "params": cfg.num_params(), "threads": rayon::current_num_threads(),
            "train_step_s": (step_s * 1e4).round() / 1e4,
            "train_tokens_per_s": (tps * 10.0).round() / 10.0,
            "train_gflops": (gflops * 10.0).round() / 10.0,
            "train_bf16_tokens_per_s": (tps_bf16 * 10.0).round() / 10.0,
            "train_bf16_gflops": (gflops_bf16 * 10.0).round() / 10.0,
            "gemm_peak_gflops": (peak * 10.0).round() / 10.0,
            "gemm_peak_bf16_gflops": (peak_bf16 * 10.0).round() / 10.0,
            "decode_tokens_per_s": r1(dec_tps),
            "decode_median_tokens_per_s": r1(dec_median_tps),
            "decode_floor_tokens_per_s": r1(floor_tps),
            "decode_pct_of_floor": r1(100.0 * dec_median_tps / floor_tps),
            "decode_bf16_tokens_per_s": r1(dec16_tps),
            "decode_bf16_median_tokens_per_s": r1(dec16_median_tps),
            "decode_bf16_floor_tokens_per_s": r1(floor16_tps),
            "decode_bf16_pct_of_floor": r1(100.0 * dec16_median_tps / floor16_tps),
            "read_bandwidth_gbs": (bw * 10.0).round() / 10.0,
            "cpu": cpu_name(),
            "kernels": kernel_choice().report(),
        })
    );
    Ok(())
}
