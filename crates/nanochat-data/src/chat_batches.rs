//! Batches of rendered conversations for mid-training and SFT.
//!
//! - [`StreamBatches`] (mid-training): conversations rendered with the chat template are
//!   concatenated into one token stream and cut into `B·T + 1` windows, every token trained on —
//!   nanochat's `mid_data_generator`.
//! - [`PaddedBatches`] (SFT): `B` conversations per batch, each row padded to the longest one;
//!   targets are `-1` wherever the renderer's mask is 0 (user turns, tool outputs, padding) —
//!   nanochat's `sft_data_generator`.
//!
//! Both are cheap relative to a training step and run inline; their state (a cursor into the
//! task plus carried tokens) is serializable for exact resume.

use std::sync::Arc;

use nanochat_tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::packer::{Batch, PackerState};
use crate::tasks::Task;
use crate::{DataError, DocPosition};

/// Resumable position in a task for rank `rank` of `world`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskCursor {
    /// Completed passes over the task.
    pub epoch: u64,
    /// Next item index.
    pub index: u64,
    /// Tokens carried to the next batch (stream batches only).
    pub carry: Vec<u32>,
}

impl TaskCursor {
    fn as_packer_state(&self) -> PackerState {
        PackerState {
            next_doc: DocPosition {
                epoch: self.epoch,
                shard: 0,
                unit: self.index,
                offset: 0,
            },
            carry: self.carry.clone(),
        }
    }

    /// Back from the state stored in a [`Batch`].
    pub fn from_packer_state(s: &PackerState) -> Self {
        TaskCursor {
            epoch: s.next_doc.epoch,
            index: s.next_doc.unit,
            carry: s.carry.clone(),
        }
    }
}

fn render(
    tok: &Tokenizer,
    task: &dyn Task,
    index: usize,
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let ex = task.get(index)?;
    tok.render_conversation(&ex.conversation, max_tokens)
        .map_err(|e| DataError::Tokenizer(format!("{} item {index}: {e}", task.name())))
}

/// Mid-training batches: a packed stream of rendered conversations.
pub struct StreamBatches {
    task: Arc<dyn Task>,
    tok: Arc<Tokenizer>,
    b: usize,
    t: usize,
    world: u64,
    cursor: TaskCursor,
    max_tokens: usize,
}

impl StreamBatches {
    /// Batches of shape `(b, t)` over `task`, resuming at `cursor` (default: the start).
    pub fn new(
        task: Arc<dyn Task>,
        tok: Arc<Tokenizer>,
        b: usize,
        t: usize,
        rank: usize,
        world_size: usize,
        cursor: Option<TaskCursor>,
    ) -> Result<Self, DataError> {
        if task.is_empty() {
            return Err(DataError::Config(format!(
                "task `{}` has no items",
                task.name()
            )));
        }
        if b == 0 || t == 0 || world_size == 0 || rank >= world_size {
            return Err(DataError::Config(format!(
                "bad batch ({b}, {t}) or rank {rank}/{world_size}"
            )));
        }
        let cursor = cursor.unwrap_or(TaskCursor {
            index: rank as u64,
            ..TaskCursor::default()
        });
        Ok(StreamBatches {
            task,
            tok,
            b,
            t,
            world: world_size as u64,
            cursor,
            max_tokens: nanochat_tokenizer::chat::DEFAULT_MAX_TOKENS,
        })
    }

    /// Completed passes over the task.
    pub fn epoch(&self) -> u64 {
        self.cursor.epoch
    }

    /// Fraction of the current epoch consumed.
    pub fn progress(&self) -> f64 {
        self.cursor.index as f64 / self.task.len() as f64
    }

    /// The next batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let needed = self.b * self.t + 1;
        let len = self.task.len() as u64;
        while self.cursor.carry.len() < needed {
            let (ids, _) = render(
                &self.tok,
                self.task.as_ref(),
                self.cursor.index as usize,
                self.max_tokens,
            )?;
            self.cursor.carry.extend_from_slice(&ids);
            self.cursor.index += self.world;
            if self.cursor.index >= len {
                // Wrap like the reference (cursor -= len): ranks stay interleaved across epochs.
                self.cursor.index %= len;
                self.cursor.epoch += 1;
            }
        }
        let buf = &self.cursor.carry;
        let inputs = buf[..needed - 1].to_vec();
        let targets = buf[1..needed].iter().map(|&x| x as i32).collect();
        self.cursor.carry.drain(..needed);
        Ok(Batch {
            b: self.b,
            t: self.t,
            inputs,
            targets,
            state: self.cursor.as_packer_state(),
        })
    }
}

/// SFT batches: `b` padded conversations per batch with masked targets.
pub struct PaddedBatches {
    task: Arc<dyn Task>,
    tok: Arc<Tokenizer>,
    b: usize,
    rank: u64,
    world: u64,
    cursor: TaskCursor,
    max_tokens: usize,
    pad: u32,
}

impl PaddedBatches {
    /// Batches of `b` conversations (each cut to `max_tokens`) over `task`.
    pub fn new(
        task: Arc<dyn Task>,
        tok: Arc<Tokenizer>,
        b: usize,
        max_tokens: usize,
        rank: usize,
        world_size: usize,
        cursor: Option<TaskCursor>,
    ) -> Result<Self, DataError> {
        if task.is_empty() {
            return Err(DataError::Config(format!(
                "task `{}` has no items",
                task.name()
            )));
        }
        if b == 0 || max_tokens < 2 || world_size == 0 || rank >= world_size {
            return Err(DataError::Config(format!(
                "bad batch size {b}, max_tokens {max_tokens} or rank {rank}/{world_size}"
            )));
        }
        // Padding positions are masked out of the loss; nanochat pads with <|assistant_end|>.
        let pad = tok
            .special_id("<|assistant_end|>")
            .ok_or_else(|| DataError::Tokenizer("tokenizer lacks <|assistant_end|>".into()))?;
        let cursor = cursor.unwrap_or(TaskCursor {
            index: rank as u64,
            ..TaskCursor::default()
        });
        Ok(PaddedBatches {
            task,
            tok,
            b,
            rank: rank as u64,
            world: world_size as u64,
            cursor,
            max_tokens,
            pad,
        })
    }

    /// Completed passes over the task.
    pub fn epoch(&self) -> u64 {
        self.cursor.epoch
    }

    /// The next batch; its `t` is the longest row minus one.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let len = self.task.len() as u64;
        let mut rows = Vec::with_capacity(self.b);
        while rows.len() < self.b {
            rows.push(render(
                &self.tok,
                self.task.as_ref(),
                self.cursor.index as usize,
                self.max_tokens,
            )?);
            self.cursor.index += self.world;
            if self.cursor.index >= len {
                self.cursor.index = self.rank % len;
                self.cursor.epoch += 1;
            }
        }
        let t = rows
            .iter()
            .map(|(ids, _)| ids.len())
            .max()
            .unwrap_or(2)
            .max(2)
            - 1;
        let mut inputs = vec![self.pad; self.b * t];
        let mut targets = vec![-1i32; self.b * t];
        for (r, (ids, mask)) in rows.iter().enumerate() {
            let n = ids.len();
            for j in 0..n.saturating_sub(1) {
                inputs[r * t + j] = ids[j];
                if mask[j + 1] != 0 {
                    targets[r * t + j] = ids[j + 1] as i32;
                }
            }
        }
        Ok(Batch {
            b: self.b,
            t,
            inputs,
            targets,
            state: self.cursor.as_packer_state(),
        })
    }
}
