//! A development hook for `scripts/compare-loss-torch.sh` (and the data-sharding test): with
//! `NANOCHAT_PARITY_DUMP=DIR` set, the stage writes what an independent implementation needs to
//! train on exactly the same tokens from exactly the same weights:
//!
//! - `DIR/init/`: the step-0 checkpoint (reference state_dict names, safetensors),
//! - `DIR/run.json`: micro-batch shape, accumulation steps and the resolved `[train]` table,
//! - `DIR/batches.bin`: every training micro-batch in the order the loop consumes it, each as
//!   `b·t` inputs (u32 little-endian) followed by `b·t` targets (i32 little-endian, −1 = no loss).
//!
//! Use a fresh `--work` dir: a resumed run dumps the batches from the resume point only.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use nanochat_data::{Batch, DataError};
use nanochat_model::{save_checkpoint, CheckpointMeta, Gpt};
use nanochat_train::trainer::{BatchSource, LoopConfig};

/// The environment variable naming the dump directory.
pub const ENV: &str = "NANOCHAT_PARITY_DUMP";

/// Where to dump (absent unless the environment asks for it).
pub struct ParityDump {
    dir: PathBuf,
    batches: Arc<Mutex<BufWriter<File>>>,
}

impl ParityDump {
    /// `Some` when `NANOCHAT_PARITY_DUMP` is set; creates the directory and `batches.bin`.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(dir) = std::env::var_os(ENV).map(PathBuf::from) else {
            return Ok(None);
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("{ENV}={}", dir.display()))?;
        let path = dir.join("batches.bin");
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        tracing::warn!(dir = %dir.display(), "{ENV}: dumping initial weights and training batches");
        Ok(Some(ParityDump {
            dir,
            batches: Arc::new(Mutex::new(BufWriter::new(file))),
        }))
    }

    /// Writes the step-0 weights and the run description.
    pub fn write_start(&self, model: &Gpt, train: &LoopConfig, b: usize, t: usize) -> Result<()> {
        save_checkpoint(model, &self.dir.join("init"), &CheckpointMeta::new(0))?;
        let run = serde_json::json!({
            "device_batch_size": b,
            "sequence_len": t,
            "grad_accum_steps": train.total_batch_size / (b * t).max(1),
            "train": train,
        });
        let path = self.dir.join("run.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&run)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A batch source that records every batch `inner` yields.
    pub fn wrap(&self, inner: Box<dyn BatchSource>) -> Result<Recording, DataError> {
        Ok(Recording {
            inner,
            out: Arc::clone(&self.batches),
            path: self.dir.join("batches.bin"),
        })
    }
}

/// A [`BatchSource`] that appends each batch it passes on to `batches.bin`.
pub struct Recording {
    inner: Box<dyn BatchSource>,
    out: Arc<Mutex<BufWriter<File>>>,
    path: PathBuf,
}

impl BatchSource for Recording {
    fn next_batch(&mut self) -> Result<Batch, DataError> {
        let batch = self.inner.next_batch()?;
        let mut bytes = Vec::with_capacity(8 * batch.inputs.len());
        bytes.extend(batch.inputs.iter().flat_map(|x| x.to_le_bytes()));
        bytes.extend(batch.targets.iter().flat_map(|x| x.to_le_bytes()));
        let io = |source| DataError::Io {
            path: self.path.clone(),
            source,
        };
        let mut out = self
            .out
            .lock()
            .map_err(|_| DataError::Loader("batch dump writer poisoned".into()))?;
        out.write_all(&bytes).map_err(io)?;
        // Flushed per batch so that a run stopped at any point leaves whole batches behind.
        out.flush().map_err(io)?;
        Ok(batch)
    }
}
