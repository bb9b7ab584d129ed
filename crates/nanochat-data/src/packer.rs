//! Pretraining batches: documents → tokens (BOS before each) → a flat stream cut into
//! `B·T + 1` tokens per batch, with inputs `[..B·T]` and targets `[1..]` (as nanochat's
//! loader). Tokenization runs on a background thread (its parallel `encode_batch` uses the
//! rayon pool) and batches are prefetched through a bounded channel, so the data path overlaps
//! the model's forward/backward.
//!
//! Every batch carries the [`PackerState`] right after it: the next unread document and the
//! tokens already read but not yet emitted. Saving it in a checkpoint and passing it back gives
//! exactly the batches an uninterrupted run would have seen.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use nanochat_tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::docs::{DocPosition, DocStream};
use crate::DataError;

/// Documents tokenized together: enough to keep every core busy in `encode_batch`, few enough
/// that the carried-over tokens in a checkpoint stay small.
const DOCS_PER_ENCODE: usize = 32;

/// Resumable state of a pretraining loader.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PackerState {
    /// The next document to read.
    pub next_doc: DocPosition,
    /// Tokens read but not yet emitted, in order.
    pub carry: Vec<u32>,
}

/// One `(B, T)` batch: row-major inputs and targets, plus the loader state after it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Rows.
    pub b: usize,
    /// Columns (sequence length).
    pub t: usize,
    /// Input ids, `b·t`.
    pub inputs: Vec<u32>,
    /// Target ids, `b·t`; `-1` marks a position without loss.
    pub targets: Vec<i32>,
    /// State to resume right after this batch.
    pub state: PackerState,
}

impl Batch {
    /// Number of positions that carry a loss.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// Synchronous packer: the core the background thread runs (usable directly in tests).
pub struct Packer {
    docs: DocStream,
    tokenizer: Arc<Tokenizer>,
    b: usize,
    t: usize,
    buffer: Vec<u32>,
    pending: Vec<String>,
}

impl Packer {
    /// A packer over `docs` producing `(b, t)` batches, resuming from `carry` tokens.
    pub fn new(
        docs: DocStream,
        tokenizer: Arc<Tokenizer>,
        b: usize,
        t: usize,
        carry: Vec<u32>,
    ) -> Result<Self, DataError> {
        if b == 0 || t == 0 {
            return Err(DataError::Config(format!(
                "batch shape ({b}, {t}) must be positive"
            )));
        }
        Ok(Packer {
            docs,
            tokenizer,
            b,
            t,
            buffer: carry,
            pending: Vec::with_capacity(DOCS_PER_ENCODE),
        })
    }

    /// The next batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let needed = self.b * self.t + 1;
        let bos = self.tokenizer.bos_id();
        while self.buffer.len() < needed {
            self.pending.clear();
            for _ in 0..DOCS_PER_ENCODE {
                let (_, doc) = self.docs.next_doc()?;
                self.pending.push(doc);
            }
            for ids in self.tokenizer.encode_batch(&self.pending) {
                self.buffer.push(bos);
                self.buffer.extend_from_slice(&ids);
            }
        }
        let inputs = self.buffer[..needed - 1].to_vec();
        let targets = self.buffer[1..needed].iter().map(|&x| x as i32).collect();
        self.buffer.drain(..needed);
        Ok(Batch {
            b: self.b,
            t: self.t,
            inputs,
            targets,
            state: PackerState {
                next_doc: self.docs.position(),
                carry: self.buffer.clone(),
            },
        })
    }
}

/// Background pretraining loader: a thread packs batches ahead of the training loop.
pub struct PretrainLoader {
    rx: Option<Receiver<Result<Batch, DataError>>>,
    handle: Option<JoinHandle<()>>,
}

/// Where and how a [`PretrainLoader`] reads.
#[derive(Debug, Clone)]
pub struct LoaderSpec {
    /// Shards, in order (from [`crate::list_shards`]).
    pub shards: Vec<PathBuf>,
    /// Batch rows.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// This process's rank.
    pub rank: usize,
    /// Number of data-parallel ranks.
    pub world_size: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

impl PretrainLoader {
    /// Starts the loader thread from `state` (`None`: from the beginning).
    pub fn start(
        spec: LoaderSpec,
        tokenizer: Arc<Tokenizer>,
        state: Option<PackerState>,
    ) -> Result<Self, DataError> {
        let state = state.unwrap_or_default();
        let docs = DocStream::new(spec.shards, spec.rank, spec.world_size, state.next_doc)?;
        let mut packer = Packer::new(docs, tokenizer, spec.b, spec.t, state.carry)?;
        let (tx, rx) = sync_channel(spec.prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("nanochat-data-loader".into())
            .spawn(move || loop {
                let item = packer.next_batch();
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            })
            .map_err(|e| DataError::Loader(e.to_string()))?;
        Ok(PretrainLoader {
            rx: Some(rx),
            handle: Some(handle),
        })
    }

    /// The next batch (blocks until the loader thread has it).
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| DataError::Loader("loader already stopped".into()))?;
        match rx.recv() {
            Ok(item) => item,
            Err(_) => Err(DataError::Loader("the loader thread exited".into())),
        }
    }
}

impl Drop for PretrainLoader {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, so it exits.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
