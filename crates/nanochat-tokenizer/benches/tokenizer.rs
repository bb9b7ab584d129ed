//! Throughput of training and encoding on the shared corpus (`../shared/data/corpus`, 11 train
//! shards), the workloads of nanochat's peers measured by `scripts/bench-tokenizer.sh`:
//! rustbpe 0.1.0 training to vocab 32768 and tiktoken cl100k_base encoding.
//!
//! `cargo bench -p nanochat-tokenizer --bench tokenizer [-- train|encode] [--reps N]`

use std::path::PathBuf;
use std::time::Instant;

use nanochat_tokenizer::{corpus, BpeTrainer, OpenAiEncoding, Tokenizer, NANOCHAT_PATTERN};

fn shared() -> Option<PathBuf> {
    let c = [
        std::env::var_os("NANOCHAT_SHARED_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")),
    ];
    c.into_iter()
        .flatten()
        .find(|p| p.join("data/corpus").is_dir())
}

fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("reps >= 1"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let want = |w: &str| {
        !args.iter().any(|a| a == "train" || a == "encode") || args.iter().any(|a| a == w)
    };
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let Some(shared) = shared() else {
        eprintln!("SKIPPED: ../shared/data/corpus is absent");
        return;
    };
    let mut docs = Vec::new();
    for i in 0..11 {
        let p = shared.join(format!("data/corpus/shard_{i:05}.jsonl.gz"));
        docs.extend(corpus::documents(&p).unwrap().map(|d| d.unwrap()));
    }
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let mb = bytes as f64 / 1e6;
    println!(
        "corpus: {} documents, {:.1} MB, {} threads",
        docs.len(),
        mb,
        rayon::current_num_threads()
    );
    if want("train") {
        let (secs, n) = best(reps, || {
            let mut t = BpeTrainer::new(NANOCHAT_PATTERN).unwrap();
            t.add_documents(docs.iter().cloned());
            t.finish(32768).unwrap().0.len()
        });
        println!("train vocab {n}: {secs:.3} s (best of {reps})");
    }
    if want("encode") {
        let tok = Tokenizer::from_openai_file(
            &shared.join("data/tokenizer/cl100k_base.tiktoken.gz"),
            OpenAiEncoding::Cl100kBase,
        )
        .unwrap();
        let joined = docs.join("\n");
        let (secs, ids) = best(reps, || tok.encode(&joined));
        println!(
            "encode cl100k single call: {:.1} MB/s ({} tokens, id sum {}, {secs:.3} s, best of {reps})",
            joined.len() as f64 / 1e6 / secs,
            ids.len(),
            ids.iter().map(|&i| i as u64).sum::<u64>()
        );
        let (secs, out) = best(reps, || tok.encode_batch(&docs));
        println!(
            "encode cl100k batch: {:.1} MB/s ({} tokens, id sum {}, {secs:.3} s, best of {reps})",
            mb / secs,
            out.iter().map(|v| v.len()).sum::<usize>(),
            out.iter().flatten().map(|&i| i as u64).sum::<u64>()
        );
    }
}
