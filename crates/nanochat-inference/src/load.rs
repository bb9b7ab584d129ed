//! Loading a servable model from an artifact directory: a checkpoint (`model.safetensors`,
//! `config.json`, `meta.json`) and the tokenizer it was trained with (`tokenizer.tiktoken`,
//! `tokenizer.json`), either side by side or in sub-directories (a store object's `data/`,
//! `checkpoint/`, `tokenizer/`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanochat_engine::Engine;
use nanochat_model::Gpt;
use nanochat_tokenizer::Tokenizer;
use sha2::{Digest, Sha256};

use crate::engine_backend::EngineModel;
use crate::error::{InferenceError, Result};

/// Directories searched for the checkpoint and tokenizer files: the directory itself, its
/// `data/` (a store object), and the immediate sub-directories of both.
fn candidate_dirs(root: &Path) -> Vec<PathBuf> {
    let mut bases = vec![root.to_path_buf()];
    if root.join("data").is_dir() {
        bases.push(root.join("data"));
    }
    let mut out = bases.clone();
    for base in &bases {
        if let Ok(entries) = std::fs::read_dir(base) {
            let mut subs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            subs.sort();
            out.extend(subs);
        }
    }
    out
}

fn find_dir(root: &Path, files: &[&str]) -> Option<PathBuf> {
    candidate_dirs(root)
        .into_iter()
        .find(|d| files.iter().all(|f| d.join(f).is_file()))
}

/// Load the checkpoint and tokenizer under `root` into an engine-backed servable model.
pub fn load_model_dir(root: &Path) -> Result<EngineModel<Gpt>> {
    load_model(root, None)
}

/// Like [`load_model_dir`], with the tokenizer taken from `tokenizer_dir` when given.
pub fn load_model(root: &Path, tokenizer_dir: Option<&Path>) -> Result<EngineModel<Gpt>> {
    if !root.is_dir() {
        return Err(InferenceError::Model(format!(
            "{}: not a directory",
            root.display()
        )));
    }
    let ckpt_files = [
        nanochat_model::checkpoint::WEIGHTS_FILE,
        nanochat_model::checkpoint::CONFIG_FILE,
        nanochat_model::checkpoint::META_FILE,
    ];
    let ckpt_dir = find_dir(root, &ckpt_files).ok_or_else(|| {
        InferenceError::Model(format!(
            "{}: no checkpoint found (looked for {} here, in data/ and in their sub-directories)",
            root.display(),
            ckpt_files.join(" + ")
        ))
    })?;
    let tok_dir = match tokenizer_dir {
        Some(d) => Some(d.to_path_buf()),
        None => find_dir(root, &[nanochat_tokenizer::RANKS_FILE]),
    };
    let tok_dir = tok_dir.ok_or_else(|| {
        InferenceError::Model(format!(
            "{}: no tokenizer found (looked for {} next to the checkpoint, in data/ and sub-directories); pass --tokenizer <dir>",
            root.display(),
            nanochat_tokenizer::RANKS_FILE
        ))
    })?;
    let tokenizer = Tokenizer::load(&tok_dir)
        .map_err(|e| InferenceError::Model(format!("{}: {e}", tok_dir.display())))?;
    let (gpt, meta) = nanochat_model::load_checkpoint(&ckpt_dir)
        .map_err(|e| InferenceError::Model(format!("{}: {e}", ckpt_dir.display())))?;
    let cfg = gpt.config().clone();
    if (tokenizer.vocab_size() as usize) > cfg.vocab_size {
        return Err(InferenceError::Model(format!(
            "the tokenizer in {} has {} tokens but the model in {} only {}: they do not belong together",
            tok_dir.display(),
            tokenizer.vocab_size(),
            ckpt_dir.display(),
            cfg.vocab_size
        )));
    }
    // Weights are content-hashed by the checkpoint (and verified on load); add the tokenizer's
    // bytes so a different tokenizer next to the same weights gets a different cache namespace.
    let tok_bytes =
        std::fs::read(tok_dir.join(nanochat_tokenizer::RANKS_FILE)).map_err(|source| {
            InferenceError::Io {
                path: tok_dir
                    .join(nanochat_tokenizer::RANKS_FILE)
                    .display()
                    .to_string(),
                source,
            }
        })?;
    let mut h = Sha256::new();
    h.update(meta.weights_sha256.as_bytes());
    h.update(Sha256::digest(&tok_bytes));
    let artifact_id = hex::encode(h.finalize());
    let name = format!("nanochat-d{}", cfg.n_layer);
    tracing::info!(
        checkpoint = %ckpt_dir.display(),
        tokenizer = %tok_dir.display(),
        step = meta.step,
        n_layer = cfg.n_layer,
        n_embd = cfg.n_embd,
        context = cfg.sequence_len,
        artifact_id = &artifact_id[..12],
        "model loaded"
    );
    let tokenizer = Arc::new(tokenizer);
    let engine = Engine::new(Arc::new(gpt), tokenizer.clone());
    Ok(EngineModel::new(engine, tokenizer, artifact_id, name))
}
