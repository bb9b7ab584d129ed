//! `nanochat-sft --config FILE.toml --input model=DIR --input tokenizer=DIR --input chat=DIR --out DIR --work DIR`
//!
//! SFT stage: fine-tunes on padded, loss-masked conversations (task mixture), stage CLI contract.
//! Config: nanochat_train::chat_stage::ChatStageConfig (a `[train]` table and `[[tasks]]`).

use anyhow::Result;
use clap::Parser;
use nanochat_artifacts::stage::{self, StageArgs, StageContext};
use nanochat_train::chat_stage::{run_chat_stage, ChatStageKind};

fn main() {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nanochat-sft: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run() -> Result<i32> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    stage::install_signal_handlers()?;
    let ctx = StageContext::new(StageArgs::parse())?;
    Ok(run_chat_stage(ChatStageKind::Sft, &ctx)?)
}
