//! Writes a random-init model directory (checkpoint + tokenizer) the server can load, for tests
//! and load benchmarks before a trained model exists.
//!
//! cargo run --release -p nanochat-inference --example make_test_model -- --depth 8 \
//!     --vocab 65536 --corpus ../shared/data/corpus/shard_00000.jsonl.gz --out /tmp/d8

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use nanochat_model::{CheckpointMeta, Gpt, GptConfig};
use nanochat_tokenizer::Tokenizer;

#[derive(Debug, Parser)]
struct Args {
    /// Transformer depth (n_embd = 64 * depth, as nanochat).
    #[arg(long, default_value_t = 2)]
    depth: usize,
    /// Context window.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Tokenizer vocabulary (specials included). 265 = bytes only; larger needs --corpus.
    #[arg(long, default_value_t = 265)]
    vocab: usize,
    /// JSONL(.gz) documents to train the tokenizer on (when --vocab > 265).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Init seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory (gets the checkpoint files and the tokenizer files).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tokenizer = if args.vocab <= 265 {
        Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect())?
    } else {
        let corpus = args
            .corpus
            .as_ref()
            .context("--vocab above 265 needs --corpus to train on")?;
        let docs = nanochat_tokenizer::corpus::documents(corpus)?;
        let opts = nanochat_tokenizer::train::TrainOptions {
            vocab_size: args.vocab as u32,
            ..Default::default()
        };
        nanochat_tokenizer::train::train_nanochat(docs, &opts)?.0
    };
    let vocab = tokenizer.vocab_size() as usize;
    let cfg = GptConfig::from_depth(args.depth, vocab, args.seq_len)?;
    let gpt = Gpt::new(cfg, args.seed)?;
    std::fs::create_dir_all(&args.out)?;
    gpt.save_checkpoint(&args.out, &CheckpointMeta::new(0))?;
    tokenizer.save(&args.out)?;
    println!(
        "wrote depth-{} vocab-{vocab} model to {}",
        args.depth,
        args.out.display()
    );
    Ok(())
}
