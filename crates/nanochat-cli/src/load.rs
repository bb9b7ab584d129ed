//! Finding and loading a model artifact and its tokenizer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use nanochat_artifacts::{ArtifactStore, ObjectId};
use nanochat_engine::Engine;
use nanochat_model::{load_checkpoint, CheckpointMeta, Gpt};
use nanochat_tokenizer::Tokenizer;

use crate::{usage, ModelArgs};

/// A loaded model with everything the commands show about it.
pub struct Loaded {
    pub engine: Engine<Gpt>,
    pub tokenizer: Arc<Tokenizer>,
    pub model: Arc<Gpt>,
    pub meta: CheckpointMeta,
    pub checkpoint_dir: PathBuf,
    pub tokenizer_dir: PathBuf,
}

const CHECKPOINT_MARKER: &str = "model.safetensors";
const TOKENIZER_MARKER: &str = "tokenizer.tiktoken";

/// The artifact store, if `root` holds one (never creates one).
fn store(root: &Path) -> Option<ArtifactStore> {
    if root.join("refs").is_dir() && root.join("objects").is_dir() {
        ArtifactStore::open(root).ok()
    } else {
        None
    }
}

/// The checkpoint directory named by `--model`: a directory (the checkpoint itself, or an
/// artifact holding it in `model/` or `checkpoint/`), else a ref in the artifact store such as
/// `latest/sft`.
pub fn checkpoint_dir(model: &str, store_root: &Path) -> Result<PathBuf> {
    let mut dir = PathBuf::from(model);
    if !dir.is_dir() {
        if dir.exists() {
            usage!("--model {model}: not a directory (give the checkpoint's directory)");
        }
        let Some(store) = store(store_root) else {
            usage!(
                "--model {model}: no such directory, and no artifact store at {} to look it up \
                 as a ref (give a checkpoint directory, or --store DIR)",
                store_root.display()
            );
        };
        match store.get_ref(model) {
            Ok(Some(id)) => dir = store.object_data(&id),
            Ok(None) | Err(_) => usage!(
                "--model {model}: no such directory, and not a ref in the artifact store at {} \
                 (`nanochat-run` lists refs; give a checkpoint directory or a ref like latest/sft)",
                store_root.display()
            ),
        }
    }
    for candidate in [dir.clone(), dir.join("model"), dir.join("checkpoint")] {
        if candidate.join(CHECKPOINT_MARKER).is_file() {
            return Ok(candidate);
        }
    }
    usage!(
        "--model {model}: no {CHECKPOINT_MARKER} in it (nor in its model/ or checkpoint/ folder)"
    )
}

/// The tokenizer directory: `--tokenizer`, else next to the checkpoint, else the tokenizer
/// artifact the checkpoint records (`meta.json` `tokenizer_id`) in the store.
pub fn tokenizer_dir(
    explicit: Option<&Path>,
    checkpoint: &Path,
    recorded: Option<&str>,
    store_root: &Path,
) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        if !dir.join(TOKENIZER_MARKER).is_file() {
            usage!("--tokenizer {}: no {TOKENIZER_MARKER} in it", dir.display());
        }
        return Ok(dir.to_path_buf());
    }
    let mut candidates = vec![checkpoint.join("tokenizer"), checkpoint.to_path_buf()];
    if let Some(parent) = checkpoint.parent() {
        candidates.push(parent.join("tokenizer"));
        if let Some(grand) = parent.parent() {
            candidates.push(grand.join("tokenizer"));
        }
    }
    if let (Some(id), Some(store)) = (recorded, store(store_root)) {
        if let Ok(id) = id.parse::<ObjectId>() {
            let data = store.object_data(&id);
            candidates.push(data.join("tokenizer"));
            candidates.push(data);
        }
    }
    for c in &candidates {
        if c.join(TOKENIZER_MARKER).is_file() {
            return Ok(c.clone());
        }
    }
    usage!(
        "no tokenizer found for {} (looked in {}); pass --tokenizer DIR",
        checkpoint.display(),
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Loads a tokenizer directory.
pub fn tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::load(dir).with_context(|| format!("loading the tokenizer from {}", dir.display()))
}

/// Loads the model, its tokenizer, and checks they belong together.
pub fn load(args: &ModelArgs) -> Result<Loaded> {
    let checkpoint_dir = checkpoint_dir(&args.model, &args.store)?;
    let (model, meta) = load_checkpoint(&checkpoint_dir)
        .with_context(|| format!("loading the model from {}", checkpoint_dir.display()))?;
    let tokenizer_dir = tokenizer_dir(
        args.tokenizer.as_deref(),
        &checkpoint_dir,
        meta.tokenizer_id.as_deref(),
        &args.store,
    )?;
    let tok = tokenizer(&tokenizer_dir)?;
    let (model_vocab, tok_vocab) = (model.config().vocab_size, tok.vocab_size() as usize);
    if model_vocab != tok_vocab {
        anyhow::bail!(
            "the tokenizer in {} has {tok_vocab} tokens but the model in {} expects {model_vocab}; \
             pass the tokenizer the model was trained with (--tokenizer DIR)",
            tokenizer_dir.display(),
            checkpoint_dir.display()
        );
    }
    let model = Arc::new(model);
    let tokenizer = Arc::new(tok);
    Ok(Loaded {
        engine: Engine::new(model.clone(), tokenizer.clone()),
        tokenizer,
        model,
        meta,
        checkpoint_dir,
        tokenizer_dir,
    })
}
