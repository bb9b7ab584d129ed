//! Finding and loading a model artifact and its tokenizer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use nanochat_artifacts::layout::{resolve_model, ModelLocation};
use nanochat_artifacts::ArtifactStore;
use nanochat_engine::{DeviceGpt, Engine};
use nanochat_model::{load_checkpoint, CheckpointMeta};
use nanochat_tokenizer::Tokenizer;

use crate::{usage, ModelArgs};

/// A loaded model, on the device `--device` named, with everything the commands show about it.
pub struct Loaded {
    pub engine: Engine<DeviceGpt>,
    pub tokenizer: Arc<Tokenizer>,
    pub model: Arc<DeviceGpt>,
    pub meta: CheckpointMeta,
    pub checkpoint_dir: PathBuf,
    pub tokenizer_dir: PathBuf,
}

/// The artifact store, if `root` holds one (never creates one).
fn store(root: &Path) -> Option<ArtifactStore> {
    if root.join("refs").is_dir() && root.join("objects").is_dir() {
        ArtifactStore::open(root).ok()
    } else {
        None
    }
}

/// The checkpoint and tokenizer directories named by `--model` (and `--tokenizer`), through
/// the one model-reference resolver every stage and the server use
/// ([`nanochat_artifacts::layout::resolve_model`]: a model artifact, a checkpoint directory,
/// a store object directory, or a ref / object id in the store at `store_root`).
pub fn locate(model: &str, tokenizer: Option<&Path>, store_root: &Path) -> Result<ModelLocation> {
    let store = store(store_root);
    match resolve_model(Path::new(model), tokenizer, store.as_ref()) {
        Ok(loc) => Ok(loc),
        Err(e) if store.is_none() && !Path::new(model).exists() => usage!(
            "{e}: none at {} (give a checkpoint directory, or --store DIR)",
            store_root.display()
        ),
        Err(e) => usage!("{e}"),
    }
}

/// Loads a tokenizer directory.
pub fn tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::load(dir).with_context(|| format!("loading the tokenizer from {}", dir.display()))
}

/// Loads the model and its tokenizer, checks they belong together, and moves the model to
/// `--device` (an error says why a device cannot be opened, e.g. a build without the `cuda`
/// feature).
pub fn load(args: &ModelArgs) -> Result<Loaded> {
    let ModelLocation {
        checkpoint: checkpoint_dir,
        tokenizer: tokenizer_dir,
        ..
    } = locate(&args.model, args.tokenizer.as_deref(), &args.store)?;
    let (model, meta) = load_checkpoint(&checkpoint_dir)
        .with_context(|| format!("loading the model from {}", checkpoint_dir.display()))?;
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
    let model = DeviceGpt::on(model, args.device)
        .with_context(|| format!("putting the model on device {}", args.device))?;
    tracing::info!(device = %model.describe(), "model placed");
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
