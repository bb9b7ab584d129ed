//! `nanochat-eval`: the evaluation pipeline stage.
//!
//! `nanochat-eval --config eval.toml --input model=DIR [--input tokenizer=DIR] --out DIR --work DIR`
//!
//! `model` is a model artifact (docs/artifacts.md, "Artifact layout": `model/` + `tokenizer/`,
//! or a checkpoint directory); the tokenizer comes from the `tokenizer` input or from the model
//! artifact. The config is [`nanochat_eval::stage::EvalConfig`] (see docs/eval.md). Wall times
//! go to the run directory (`timing.json`), not the artifact.
//!
//! The arguments are the stage contract's and nothing else; the device is the config's
//! `device` key (`"cpu"` by default, `"cuda"`, `"cuda:N"`), so that it is part of the stage's
//! fingerprint. Every evaluation, scoring and generation alike, runs on that one copy of the
//! model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use nanochat_artifacts::layout::resolve_model;
use nanochat_artifacts::stage::{self, StageContext};
use nanochat_engine::DeviceGpt;
use nanochat_eval::adapters::EngineGenerator;
use nanochat_eval::stage::{
    run_eval_resumable, summary_markdown, EvalConfig, EvalInputs, EvalMode, ModelInfo,
};
use nanochat_eval::Generator;
use nanochat_tokenizer::Tokenizer;

/// Dataset names mentioned in the model artifact's small config/metadata files, so that the
/// GSM8K overlap rule can tell whether `gsm_symbolic_train` was used.
fn training_data_mentions(dirs: &[&Path]) -> Vec<String> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            let small = e.metadata().map(|m| m.len() < 1 << 20).unwrap_or(false);
            let text_like = p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "toml" | "json" | "yaml" | "yml"));
            if small && text_like {
                if let Ok(text) = std::fs::read_to_string(&p) {
                    for word in text.split(|c: char| !(c.is_alphanumeric() || "_./-".contains(c))) {
                        if word.contains("gsm_symbolic") || word.ends_with(".jsonl.gz") {
                            out.push(word.to_string());
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Identity of the model for task checkpoints: sha256 over the name and sha256 of every file
/// directly in the checkpoint dir (weights, config, metadata) and the tokenizer files.
fn model_fingerprint(ckpt_dir: &Path, tok_dir: &Path) -> anyhow::Result<String> {
    let mut lines = String::new();
    for (tag, dir) in [("model", ckpt_dir), ("tokenizer", tok_dir)] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                tag == "model"
                    || p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("tokenizer"))
            })
            .collect();
        files.sort();
        for f in files {
            let (hex, _) = nanochat_artifacts::sha256_file(&f)
                .with_context(|| format!("hashing {}", f.display()))?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            lines.push_str(&format!("{tag}/{name} {hex}\n"));
        }
    }
    Ok(nanochat_artifacts::sha256_hex(lines.as_bytes()))
}

/// Greedy generation with the calculator tool, through nanochat-engine, on the model's device.
fn make_generator(
    gpt: &Arc<DeviceGpt>,
    tokenizer: &Arc<Tokenizer>,
    max_batch: usize,
) -> Option<Box<dyn Generator>> {
    Some(Box::new(EngineGenerator::new(
        nanochat_engine::Engine::new(gpt.clone(), tokenizer.clone()),
        max_batch,
    )))
}

fn main() {
    stage::run_main("nanochat-eval", |ctx| match run(ctx) {
        Ok(()) => Ok(0),
        Err(_) if stage::interrupted() => {
            eprintln!("nanochat-eval: interrupted");
            Ok(stage::interrupt_exit_code().unwrap_or(130))
        }
        Err(e) => Err(e),
    })
}

fn run(ctx: &StageContext) -> anyhow::Result<()> {
    let cfg: EvalConfig = ctx.config()?;
    let model_root = ctx.input("model")?;
    let location = resolve_model(
        model_root,
        ctx.inputs().get("tokenizer").map(PathBuf::as_path),
        None,
    )
    .context("input model (or pass --input tokenizer=DIR)")?;
    let (ckpt_dir, tok_dir) = (location.checkpoint, location.tokenizer);
    let tokenizer = Arc::new(
        Tokenizer::load(&tok_dir)
            .with_context(|| format!("loading tokenizer from {}", tok_dir.display()))?,
    );
    let (gpt, meta) = nanochat_model::load_checkpoint(&ckpt_dir)
        .with_context(|| format!("loading checkpoint {}", ckpt_dir.display()))?;
    let c = gpt.config();
    if (tokenizer.vocab_size() as usize) > c.vocab_size {
        bail!(
            "tokenizer has {} tokens but the model's vocabulary is {}: wrong tokenizer input?",
            tokenizer.vocab_size(),
            c.vocab_size
        );
    }
    // No absolute path here: the artifact must not depend on where the store lives.
    let description = format!(
        "step {}, depth {}, d_model {}, context {}",
        meta.step, c.n_layer, c.n_embd, c.sequence_len
    );
    let trained_on = training_data_mentions(&[model_root, &ckpt_dir]);
    let fingerprint = model_fingerprint(&ckpt_dir, &tok_dir)?;
    let gpt = DeviceGpt::on(gpt, cfg.device).with_context(|| {
        format!(
            "putting the model on device {} (config key `device`)",
            cfg.device
        )
    })?;
    tracing::info!(%description, ?trained_on, mode = ?cfg.mode, "evaluating on {}", gpt.describe());
    let gpt = Arc::new(gpt);
    let generator: Option<Box<dyn Generator>> = match cfg.mode {
        EvalMode::Chat => make_generator(&gpt, &tokenizer, cfg.batch_size),
        EvalMode::Base => None,
    };
    let interrupted = stage::interrupted;
    let inputs = EvalInputs {
        model: gpt.as_ref(),
        generator: generator.as_deref(),
        tokenizer: tokenizer.as_ref(),
        token_bytes: Some(tokenizer.token_bytes()),
        model_info: ModelInfo {
            description,
            trained_on,
            fingerprint,
        },
        interrupted: &interrupted,
    };
    let metrics = run_eval_resumable(&cfg, &inputs, ctx.out_dir(), Some(ctx.work_dir()))?;
    ctx.write_run_file(
        "timing.json",
        serde_json::to_string_pretty(&metrics.timing())?.as_bytes(),
    )?;
    eprintln!("{}", summary_markdown(&metrics));
    Ok(())
}
