//! Checkpoints: one directory holding `model.safetensors` (the reference's tensor names,
//! PyTorch `[out, in]` layout, f32), `config.json` ([`GptConfig`]) and `meta.json`
//! ([`CheckpointMeta`]). Format and compatibility rule: docs/checkpoint-format.md.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::model::Gpt;
use nanochat_compute::{Backend, Cpu};

/// The format this build writes and the only one it reads.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
/// Weights file inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Model config file inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// Metadata file inside a checkpoint directory.
pub const META_FILE: &str = "meta.json";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_FORMAT_VERSION`] at write time.
    pub format_version: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// Last training (or validation) loss, if known.
    pub loss: Option<f64>,
    /// Identity (content address) of the tokenizer the model was trained with.
    pub tokenizer_id: Option<String>,
    /// Artifact this checkpoint was trained from (e.g. the base model of an SFT run).
    pub parent_artifact: Option<String>,
    /// sha256 of `model.safetensors`; filled in by [`save_checkpoint`], checked on load.
    #[serde(default)]
    pub weights_sha256: String,
}

impl CheckpointMeta {
    /// Metadata for a checkpoint taken at `step`.
    pub fn new(step: u64) -> Self {
        CheckpointMeta {
            format_version: CHECKPOINT_FORMAT_VERSION,
            step,
            loss: None,
            tokenizer_id: None,
            parent_artifact: None,
            weights_sha256: String::new(),
        }
    }
}

fn ck_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Gpt<Cpu> {
    /// Builds a CPU model from safetensors bytes (see [`Gpt::from_safetensors_on`]).
    pub fn from_safetensors(cfg: GptConfig, bytes: &[u8], origin: &Path) -> Result<Self> {
        Self::from_safetensors_on(Cpu, cfg, bytes, origin)
    }
}

impl<B: Backend> Gpt<B> {
    /// The weights as safetensors bytes (reference names, `[out, in]`, f32 little-endian).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<Vec<u8>> = (0..self.specs.len())
            .map(|i| {
                self.download_param(i)
                    .map(|d| d.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect::<Result<_>>()?;
        let mut views = Vec::with_capacity(bytes.len());
        for (s, b) in self.specs.iter().zip(&bytes) {
            let view = TensorView::new(Dtype::F32, s.shape.to_vec(), b)
                .map_err(|e| ModelError::Kernel(format!("safetensors view {}: {e}", s.name)))?;
            views.push((s.name.clone(), view));
        }
        let info = Some(HashMap::from([(
            "format".to_string(),
            format!("nanochat-rs checkpoint v{CHECKPOINT_FORMAT_VERSION}"),
        )]));
        safetensors::serialize(views, &info)
            .map_err(|e| ModelError::Kernel(format!("safetensors serialize: {e}")))
    }

    /// Builds a model on `backend` from safetensors bytes, requiring exactly the config's
    /// tensor names, shapes and dtype (f32). `origin` names the source in errors.
    pub fn from_safetensors_on(
        backend: B,
        cfg: GptConfig,
        bytes: &[u8],
        origin: &Path,
    ) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            ck_err(
                origin,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let mut model = Gpt::zeros_on(backend, cfg)?;
        let expected: BTreeSet<&str> = model.specs.iter().map(|s| s.name.as_str()).collect();
        let present: BTreeSet<String> = st.names().into_iter().cloned().collect();
        let missing: Vec<&str> = expected
            .iter()
            .filter(|n| !present.contains(**n))
            .copied()
            .collect();
        let unexpected: Vec<&String> = present
            .iter()
            .filter(|n| !expected.contains(n.as_str()))
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(ck_err(
                origin,
                format!(
                    "tensor names do not match the config: missing {missing:?}, unexpected \
                     {unexpected:?} (was it saved for a different depth or model?)"
                ),
            ));
        }
        for i in 0..model.specs.len() {
            let spec = model.specs[i].clone();
            let mut dst = vec![0f32; spec.shape[0] * spec.shape[1]];
            let t = st
                .tensor(&spec.name)
                .map_err(|e| ck_err(origin, format!("{}: {e}", spec.name)))?;
            if t.dtype() != Dtype::F32 {
                return Err(ck_err(
                    origin,
                    format!("{}: dtype {:?}, expected F32", spec.name, t.dtype()),
                ));
            }
            if t.shape() != spec.shape {
                return Err(ck_err(
                    origin,
                    format!(
                        "{}: shape {:?}, but the config needs {:?}",
                        spec.name,
                        t.shape(),
                        spec.shape
                    ),
                ));
            }
            let raw = t.data();
            if raw.len() != dst.len() * 4 {
                return Err(ck_err(
                    origin,
                    format!("{}: data length mismatch", spec.name),
                ));
            }
            for (o, ch) in dst.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
            }
            if let Some(bad) = dst.iter().position(|x| !x.is_finite()) {
                return Err(ck_err(
                    origin,
                    format!("{}: non-finite value at element {bad}", spec.name),
                ));
            }
            model.upload_param(i, &dst)?;
        }
        Ok(model)
    }

    /// Writes a checkpoint directory (see [`save_checkpoint`]).
    pub fn save_checkpoint(&self, dir: &Path, meta: &CheckpointMeta) -> Result<()> {
        save_checkpoint(self, dir, meta)
    }
}

/// Writes `model`'s checkpoint to `dir` atomically: everything goes to a sibling temporary
/// directory which is then renamed into place, so `dir` is either the old checkpoint or the
/// complete new one, never a mix. `meta.weights_sha256` and `format_version` are filled in.
pub fn save_checkpoint<B: Backend>(
    model: &Gpt<B>,
    dir: &Path,
    meta: &CheckpointMeta,
) -> Result<()> {
    let weights = model.to_safetensors()?;
    let mut meta = meta.clone();
    meta.format_version = CHECKPOINT_FORMAT_VERSION;
    meta.weights_sha256 = hex::encode(Sha256::digest(&weights));
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = dir
        .file_name()
        .ok_or_else(|| ck_err(dir, "checkpoint path has no final component"))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let write = |file: &str, bytes: &[u8]| -> Result<()> {
        let p = tmp.join(file);
        let mut f = std::fs::File::create(&p).map_err(io_err(&p))?;
        std::io::Write::write_all(&mut f, bytes).map_err(io_err(&p))?;
        f.sync_all().map_err(io_err(&p))
    };
    let json = |v: &dyn erased::Json| v.to_json();
    write(WEIGHTS_FILE, &weights)?;
    write(CONFIG_FILE, json(&model.cfg)?.as_bytes())?;
    write(META_FILE, json(&meta)?.as_bytes())?;
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    }
    Ok(())
}

mod erased {
    use crate::error::{ModelError, Result};
    pub(super) trait Json {
        fn to_json(&self) -> Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String> {
            serde_json::to_string_pretty(self)
                .map_err(|e| ModelError::Kernel(format!("json encode: {e}")))
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(io_err(path))
}

/// Reads a checkpoint directory, checking format version, config validity, the weights'
/// checksum, tensor names, shapes and dtypes. Any mismatch is an error naming the file and
/// the problem; nothing is partially loaded.
pub fn load_checkpoint(dir: &Path) -> Result<(Gpt, CheckpointMeta)> {
    load_checkpoint_on(Cpu, dir)
}

/// [`load_checkpoint`] onto `backend`'s device.
pub fn load_checkpoint_on<B: Backend>(backend: B, dir: &Path) -> Result<(Gpt<B>, CheckpointMeta)> {
    let meta_path = dir.join(META_FILE);
    let meta_bytes = read(&meta_path)?;
    let version: serde_json::Value = serde_json::from_slice(&meta_bytes)
        .map_err(|e| ck_err(&meta_path, format!("not valid JSON: {e}")))?;
    match version.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == CHECKPOINT_FORMAT_VERSION as u64 => {}
        Some(v) => {
            return Err(ck_err(
                &meta_path,
                format!(
                    "format version {v} is not supported (this build reads version \
                     {CHECKPOINT_FORMAT_VERSION}); use a matching nanochat-rs release"
                ),
            ))
        }
        None => return Err(ck_err(&meta_path, "missing integer field format_version")),
    }
    let meta: CheckpointMeta = serde_json::from_value(version)
        .map_err(|e| ck_err(&meta_path, format!("invalid metadata: {e}")))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg: GptConfig = serde_json::from_slice(&read(&cfg_path)?)
        .map_err(|e| ck_err(&cfg_path, format!("invalid model config: {e}")))?;
    cfg.validate()
        .map_err(|e| ck_err(&cfg_path, e.to_string()))?;
    let w_path = dir.join(WEIGHTS_FILE);
    nanochat_compute::host::check_fits(
        (cfg.num_params() as u64) * 4,
        "the checkpoint's weights, read into host memory",
    )?;
    let weights = read(&w_path)?;
    let digest = hex::encode(Sha256::digest(&weights));
    if digest != meta.weights_sha256 {
        return Err(ck_err(
            &w_path,
            format!(
                "checksum mismatch: file has sha256 {digest}, meta.json records {} (the file is \
                 truncated, corrupt or from another checkpoint)",
                meta.weights_sha256
            ),
        ));
    }
    let model = Gpt::from_safetensors_on(backend, cfg, &weights, &w_path)?;
    Ok((model, meta))
}
