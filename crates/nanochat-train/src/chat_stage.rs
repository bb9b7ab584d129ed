//! The mid-training and SFT stages: load the previous stage's model, build a seeded task
//! mixture from the config, and run the shared loop on conversation batches (a packed stream for
//! mid-training, padded and loss-masked rows for SFT).

use std::sync::Arc;

use nanochat_artifacts::layout::resolve_model;
use nanochat_artifacts::stage::{self, StageContext};
use nanochat_data::chat_batches::{PaddedBatches, StreamBatches, TaskCursor};
use nanochat_data::tasks::{Task, TaskMixture, TaskSpec};
use nanochat_model::{load_checkpoint, CheckpointMeta};
use nanochat_tokenizer::Tokenizer;
use serde::Deserialize;

use crate::trainer::{train_on_device, BatchSource, LoopConfig, RunDirs, TrainJob};
use crate::TrainError;

/// Which conversation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatStageKind {
    /// Mid-training: packed stream, every token trained on.
    Midtrain,
    /// SFT: padded rows, only assistant tokens trained on.
    Sft,
}

fn d_seed() -> u64 {
    42
}
fn d_max_tokens() -> usize {
    2048
}

/// Config of `nanochat-midtrain` / `nanochat-sft`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatStageConfig {
    /// The training loop (for SFT `total_batch_size` counts conversations).
    pub train: LoopConfig,
    /// Training tasks; relative paths are inside the `chat` input.
    pub tasks: Vec<TaskSpec>,
    /// Validation tasks (default: the training tasks).
    #[serde(default)]
    pub val_tasks: Vec<TaskSpec>,
    /// Seed of the mixture shuffle.
    #[serde(default = "d_seed")]
    pub mixture_seed: u64,
    /// Worker threads (0: all cores).
    #[serde(default)]
    pub threads: usize,
    /// SFT: conversations are cut to this many tokens.
    #[serde(default = "d_max_tokens")]
    pub max_tokens: usize,
}

fn mixture(
    specs: &[TaskSpec],
    base: &std::path::Path,
    seed: u64,
) -> Result<Arc<dyn Task>, TrainError> {
    let mut tasks = Vec::new();
    for s in specs {
        tasks.push(s.load(base)?);
    }
    let m = TaskMixture::new(tasks, seed);
    for (name, n) in m.summary() {
        tracing::info!(task = %name, items = n, "task");
    }
    Ok(Arc::new(m))
}

/// Runs a conversation stage under the stage contract; returns the process exit code.
/// Inputs: `model` (a training stage's output), `tokenizer`, `chat` (task files).
pub fn run_chat_stage(kind: ChatStageKind, ctx: &StageContext) -> Result<i32, TrainError> {
    let mut cfg: ChatStageConfig = ctx
        .config()
        .map_err(|e| TrainError::Config(e.to_string()))?;
    let dist = crate::process::dist_env()?;
    crate::process::set_threads(cfg.threads)?;
    cfg.train.device = crate::process::device_for_rank(cfg.train.device, &dist);
    let nccl = crate::process::wants_nccl(&dist, cfg.train.device);
    let mut collective = crate::process::collective_for(&dist, cfg.train.device)?;
    // Each rank reads every `world`-th conversation, starting at its rank.
    let (rank, world) = (dist.rank, dist.world_size);
    let input = |n: &str| {
        ctx.input(n)
            .map(|p| p.to_path_buf())
            .map_err(|e| TrainError::Config(e.to_string()))
    };
    let tok_dir = input("tokenizer")?;
    let location = resolve_model(&input("model")?, Some(&tok_dir), None)?;
    let tokenizer = Arc::new(
        Tokenizer::load(&location.tokenizer)
            .map_err(|e| TrainError::Config(format!("{}: {e}", location.tokenizer.display())))?,
    );
    let (model, parent) = load_checkpoint(&location.checkpoint)?;
    // A data-stage artifact holds `chat/`; a plain directory of task files works too.
    let mut chat = input("chat")?;
    if chat.join("chat").is_dir() {
        chat = chat.join("chat");
    }
    let train_task = mixture(&cfg.tasks, &chat, cfg.mixture_seed)?;
    let val_specs = if cfg.val_tasks.is_empty() {
        &cfg.tasks
    } else {
        &cfg.val_tasks
    };
    let val_task = mixture(val_specs, &chat, cfg.mixture_seed)?;
    let b = cfg.train.device_batch_size;
    let t = model.config().sequence_len;
    let max_tokens = cfg.max_tokens;
    let units = match kind {
        ChatStageKind::Midtrain => b * t,
        ChatStageKind::Sft => b,
    };
    let tk = tokenizer.clone();
    let tt = train_task.clone();
    let mut make_train = move |state: Option<nanochat_data::PackerState>| -> Result<Box<dyn BatchSource>, TrainError> {
        let cursor = state.as_ref().map(TaskCursor::from_packer_state);
        Ok(match kind {
            ChatStageKind::Midtrain => Box::new(StreamBatches::new(tt.clone(), tk.clone(), b, t, rank, world, cursor)?),
            ChatStageKind::Sft => Box::new(PaddedBatches::new(tt.clone(), tk.clone(), b, max_tokens, rank, world, cursor)?),
        })
    };
    let tk2 = tokenizer.clone();
    let mut make_val = move || -> Result<Box<dyn BatchSource>, TrainError> {
        Ok(match kind {
            ChatStageKind::Midtrain => Box::new(StreamBatches::new(
                val_task.clone(),
                tk2.clone(),
                b,
                t,
                rank,
                world,
                None,
            )?),
            ChatStageKind::Sft => Box::new(PaddedBatches::new(
                val_task.clone(),
                tk2.clone(),
                b,
                max_tokens,
                rank,
                world,
                None,
            )?),
        })
    };
    let mut meta = CheckpointMeta::new(0);
    meta.tokenizer_id = parent.tokenizer_id.clone();
    let job = TrainJob {
        cfg: &cfg.train,
        units_per_micro: units,
        tokenizer: &tokenizer,
        dirs: RunDirs {
            work: ctx.work_dir().to_path_buf(),
            out: ctx.out_dir().to_path_buf(),
            run: ctx.run_dir().map(std::path::Path::to_path_buf),
        },
        meta,
        interrupted: &stage::interrupted,
        collective: collective.as_mut(),
        nccl,
    };
    let outcome = train_on_device(job, model, &mut make_train, &mut make_val)?;
    Ok(crate::process::exit_code(outcome, &format!("{kind:?}")))
}
