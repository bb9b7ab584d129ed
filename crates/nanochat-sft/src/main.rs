//! `nanochat-sft --config FILE.toml --input model=DIR --input tokenizer=DIR --input chat=DIR --out DIR --work DIR`
//!
//! SFT stage: fine-tunes on padded, loss-masked conversations (task mixture), stage CLI contract.
//! Config: nanochat_train::chat_stage::ChatStageConfig (a `[train]` table and `[[tasks]]`).

use nanochat_train::chat_stage::{run_chat_stage, ChatStageKind};

fn main() {
    nanochat_artifacts::stage::run_main("nanochat-sft", |ctx| {
        run_chat_stage(ChatStageKind::Sft, ctx)
    })
}
