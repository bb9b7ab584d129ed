//! CORE-style multiple-choice throughput on a random depth-D GPT (the reference peer is
//! `examples/bench_core_torch.py`, which runs nanochat's own `core_eval.evaluate_task` on the
//! same items with the same tokenizer and model shape).
//!
//! usage: bench_core <shared/data> [DEPTH=8] [ITEMS=40] [TASK=hellaswag_zeroshot] [BATCH_ROWS=16]
//!        [SCORING=auto|padded|tails]

use std::time::Instant;

use nanochat_eval::core::{
    bundle::load_bundle, evaluate_task, load_task, CoreOptions, ScoringPath,
};
use nanochat_model::{Gpt, GptConfig};
use nanochat_tokenizer::{OpenAiEncoding, Tokenizer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let shared = std::path::PathBuf::from(args.get(1).map_or("../shared/data", |s| s.as_str()));
    let depth: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let items: usize = args.get(3).map_or(Ok(40), |s| s.parse())?;
    let task_name = args.get(4).map_or("hellaswag_zeroshot", |s| s.as_str());
    let batch_rows: usize = args.get(5).map_or(Ok(16), |s| s.parse())?;
    let scoring = match args.get(6).map_or("auto", |s| s.as_str()) {
        "auto" => ScoringPath::Auto,
        "padded" => ScoringPath::Padded,
        "tails" => ScoringPath::Tails,
        other => anyhow::bail!("SCORING must be auto, padded or tails, not {other:?}"),
    };
    let tok = Tokenizer::from_openai_file(
        &shared.join("tokenizer/cl100k_base.tiktoken.gz"),
        OpenAiEncoding::Cl100kBase,
    )?;
    let vocab = 100_352; // cl100k ids (< 100277) padded to a multiple of 64, as in the peer
    let dim = depth * 64;
    let heads = dim.div_ceil(128).max(1);
    let cfg = GptConfig {
        n_head: heads,
        n_kv_head: heads,
        ..GptConfig::from_depth(depth, vocab, 2048)?
    };
    let gpt = Gpt::new(cfg, 0)?;
    let specs = load_bundle(&shared.join("core"))?;
    let spec = specs
        .iter()
        .find(|s| s.label == task_name)
        .ok_or_else(|| anyhow::anyhow!("no task {task_name}"))?;
    let task = load_task(spec)?;
    let opts = CoreOptions {
        max_per_task: Some(items),
        batch_rows,
        scoring,
        ..Default::default()
    };
    let t = Instant::now();
    let (score, _) = evaluate_task(&gpt, &tok, &task, &opts, None)?;
    let dt = t.elapsed().as_secs_f64();
    println!(
        "{{\"impl\": \"nanochat-eval\", \"scoring\": \"{}\", \"task\": \"{task_name}\", \"depth\": {depth}, \"items\": {}, \"seconds\": {dt:.2}, \"items_per_s\": {:.3}, \"accuracy\": {:.4}, \"threads\": {}}}",
        args.get(6).map_or("auto", |s| s.as_str()),
        score.items,
        score.items as f64 / dt,
        score.accuracy,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}
