//! `nanochat-midtrain --config FILE.toml --input model=DIR --input tokenizer=DIR --input chat=DIR --out DIR --work DIR`
//!
//! Mid-training stage: continues a base model on a packed stream of rendered conversations (task mixture), stage CLI contract.
//! Config: nanochat_train::chat_stage::ChatStageConfig (a `[train]` table and `[[tasks]]`).

use nanochat_train::chat_stage::{run_chat_stage, ChatStageKind};

fn main() {
    nanochat_artifacts::stage::run_main("nanochat-midtrain", |ctx| {
        run_chat_stage(ChatStageKind::Midtrain, ctx)
    })
}
