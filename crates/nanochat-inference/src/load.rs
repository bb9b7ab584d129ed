//! Loading a servable model from a model reference: a model artifact (`model/` +
//! `tokenizer/`, a store object's `data/`), a store object directory or a checkpoint
//! directory, found by the one resolver every stage and the CLI use
//! ([`nanochat_artifacts::layout::resolve_model`], docs/artifacts.md "Artifact layout").
//!
//! Weights are always read on the host: [`load_model`] serves them there, [`load_model_on`]
//! first moves them to the device the server was asked for (`--device`, docs/gpu.md).

use std::path::Path;
use std::sync::Arc;

use nanochat_artifacts::layout::resolve_model;
use nanochat_engine::{DeviceGpt, Engine, StepModel};
use nanochat_model::{Backend, Device, Gpt};
use nanochat_tokenizer::Tokenizer;
use sha2::{Digest, Sha256};

use crate::engine_backend::EngineModel;
use crate::error::{InferenceError, Result};

/// Load the checkpoint and tokenizer of the model artifact at `root` into an engine-backed
/// servable model on the CPU.
pub fn load_model_dir(root: &Path) -> Result<EngineModel<Gpt>> {
    load_model(root, None)
}

/// Like [`load_model_dir`], with the tokenizer taken from `tokenizer_dir` when given.
pub fn load_model(root: &Path, tokenizer_dir: Option<&Path>) -> Result<EngineModel<Gpt>> {
    let loaded = Loaded::read(root, tokenizer_dir)?;
    let device = loaded.gpt.backend().describe();
    let gpt = loaded.gpt;
    Ok(loaded.rest.serve(gpt, device))
}

/// Like [`load_model`], with the model moved to `device` (`cpu`, `cuda`, `cuda:N`) and served
/// there. Errors when the device cannot be opened, saying why: no GPU, driver or cuBLAS
/// missing, or a build without `--features cuda`.
pub fn load_model_on(
    root: &Path,
    tokenizer_dir: Option<&Path>,
    device: Device,
) -> Result<EngineModel<DeviceGpt>> {
    let loaded = Loaded::read(root, tokenizer_dir)?;
    let model = DeviceGpt::on(loaded.gpt, device)
        .map_err(|e| InferenceError::Model(format!("putting the model on device {device}: {e}")))?;
    let described = model.describe();
    tracing::info!(device = %described, "model placed");
    Ok(loaded.rest.serve(model, described))
}

/// The checkpoint and tokenizer as read from disk, checked to belong together.
struct Loaded {
    gpt: Gpt,
    rest: Identity,
}

/// Everything a servable model needs besides the weights.
struct Identity {
    tokenizer: Arc<Tokenizer>,
    artifact_id: String,
    name: String,
}

impl Identity {
    /// The servable model over `model` (the GPT where it runs), reported as on `device`.
    fn serve<M: StepModel + 'static>(self, model: M, device: String) -> EngineModel<M> {
        let engine = Engine::new(Arc::new(model), self.tokenizer.clone());
        EngineModel::new(engine, self.tokenizer, self.artifact_id, self.name).with_device(device)
    }
}

impl Loaded {
    fn read(root: &Path, tokenizer_dir: Option<&Path>) -> Result<Self> {
        let loc = resolve_model(root, tokenizer_dir, None)
            .map_err(|e| InferenceError::Model(e.to_string()))?;
        let (ckpt_dir, tok_dir) = (loc.checkpoint, loc.tokenizer);
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
        // Weights are content-hashed by the checkpoint (and verified on load); add the
        // tokenizer's bytes so a different tokenizer next to the same weights gets a different
        // cache namespace.
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
        Ok(Loaded {
            gpt,
            rest: Identity {
                tokenizer: Arc::new(tokenizer),
                artifact_id,
                name,
            },
        })
    }
}
