//! Continuous batching: sequences join and leave between decode steps, each with its own
//! sampling parameters, length, random stream, tool state and text stream.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::calculator::{use_calculator, MAX_EXPR_BYTES};
use crate::context::fit_prompt;
use crate::engine::Engine;
use crate::model::StepModel;
use crate::sampling::{fresh_seed, Sampler, SamplingParams, SeqRng};
use crate::stream::DeltaDecoder;
use crate::EngineError;

/// Handle of a sequence inside one [`BatchDecoder`].
pub type SeqId = u64;

/// One generated token and the text it made available.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// The token id (for a sequence ended by `<|assistant_end|>`/`<|bos|>`, that token).
    pub token: u32,
    /// UTF-8-safe text delta: may be empty while a multi-byte character or a possible stop
    /// string is incomplete; never contains a stop string or a terminal special token's name.
    pub text: String,
    /// The token was injected (calculator output), not sampled.
    pub forced: bool,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `<|assistant_end|>`, `<|bos|>` or a stop string.
    Stop,
    /// `max_tokens` reached or the context window is full.
    Length,
    /// [`BatchDecoder::cancel`] (or a cancelled stream).
    Cancelled,
}

/// Token accounting of a finished sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens actually prefilled (after fitting into the context).
    pub prompt_tokens: usize,
    /// Prompt tokens dropped to fit the context window.
    pub dropped_prompt_tokens: usize,
    /// Tokens generated, forced tool-output tokens and the final stop token included.
    pub completion_tokens: usize,
}

/// What one sequence did during a [`BatchDecoder::step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutput {
    /// The sequence.
    pub id: SeqId,
    /// The token of this step (`None` only for a cancellation report).
    pub event: Option<TokenEvent>,
    /// Set on the sequence's last output; the id is free afterwards.
    pub finished: Option<FinishReason>,
    /// Set together with `finished`.
    pub usage: Option<Usage>,
}

enum Phase {
    /// Waiting for its prompt to be prefilled; members of one group share a single prefill.
    Prefill { prompt: Arc<[u32]>, group: u64 },
    /// `last` was sampled but is not yet in the cache.
    Decode { last: u32 },
}

struct Seq {
    row: usize,
    params: SamplingParams,
    sampler: Sampler,
    phase: Phase,
    prompt_len: usize,
    dropped: usize,
    generated: usize,
    forced: VecDeque<u32>,
    in_python: bool,
    expr: Vec<u32>,
    text: DeltaDecoder,
}

impl Seq {
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            dropped_prompt_tokens: self.dropped,
            completion_tokens: self.generated,
        }
    }
}

/// Drives up to `max_batch` sequences through shared decode steps.
///
/// Typical server loop: `add` requests as they arrive (fails with [`EngineError::BatchFull`]
/// when every row is taken), call `step` while `active() > 0`, route each [`StepOutput`] to its
/// request, `cancel` a sequence whose client went away (its row is free at once).
pub struct BatchDecoder<M: StepModel> {
    engine: Engine<M>,
    cache: M::Cache,
    rows: Vec<Option<SeqId>>,
    seqs: BTreeMap<SeqId, Seq>,
    reports: Vec<StepOutput>,
    next_id: SeqId,
    next_group: u64,
}

impl<M: StepModel> BatchDecoder<M> {
    pub(crate) fn new(engine: Engine<M>, max_batch: usize) -> Result<Self, EngineError> {
        if max_batch == 0 {
            return Err(EngineError::InvalidParams(
                "max_batch must be at least 1".into(),
            ));
        }
        let cache = engine.model().new_cache(max_batch)?;
        Ok(BatchDecoder {
            engine,
            cache,
            rows: vec![None; max_batch],
            seqs: BTreeMap::new(),
            reports: Vec::new(),
            next_id: 0,
            next_group: 0,
        })
    }

    /// Queues a prompt; it is prefilled during the next `step`, which also yields its first token.
    pub fn add(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<SeqId, EngineError> {
        Ok(self.add_samples(prompt, params, 1)?[0])
    }

    /// Queues `n` samples of one prompt: one prefill, then the cache row is copied. Sample `i`
    /// draws from stream `i` of the seed, so results are reproducible whatever the batch holds.
    pub fn add_samples(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        n: usize,
    ) -> Result<Vec<SeqId>, EngineError> {
        params.validate()?;
        if n == 0 {
            return Err(EngineError::InvalidParams("n must be at least 1".into()));
        }
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let model = self.engine.model();
        let vocab = model.vocab_size();
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidToken {
                token: bad,
                vocab_size: vocab,
            });
        }
        let free: Vec<usize> = (0..self.rows.len())
            .filter(|&r| self.rows[r].is_none())
            .take(n)
            .collect();
        if free.len() < n {
            return Err(EngineError::BatchFull {
                capacity: self.rows.len(),
            });
        }
        let context = model.context_len();
        // Leave room to generate: up to max_tokens, but never more than half the window.
        let reserve = params.max_tokens.min(context / 2).max(1);
        let fitted = fit_prompt(
            &prompt,
            context.saturating_sub(reserve).max(1),
            self.engine.specials(),
        );
        if fitted.dropped > 0 {
            tracing::warn!(
                prompt_tokens = prompt.len(),
                kept = fitted.tokens.len(),
                context,
                strategy = ?fitted.strategy,
                "prompt longer than the context window allows; shortened"
            );
        }
        let prompt: Arc<[u32]> = fitted.tokens.into();
        let seed = params.seed.unwrap_or_else(fresh_seed);
        let group = self.next_group;
        self.next_group += 1;
        let mut ids = Vec::with_capacity(n);
        for (i, row) in free.into_iter().enumerate() {
            let id = self.next_id;
            self.next_id += 1;
            self.rows[row] = Some(id);
            let seq = Seq {
                row,
                sampler: Sampler::new(SeqRng::new(seed, i as u64)),
                text: DeltaDecoder::new(&params.stop),
                params: params.clone(),
                phase: Phase::Prefill {
                    prompt: prompt.clone(),
                    group,
                },
                prompt_len: prompt.len(),
                dropped: fitted.dropped,
                generated: 0,
                forced: VecDeque::new(),
                in_python: false,
                expr: Vec::new(),
            };
            self.seqs.insert(id, seq);
            ids.push(id);
        }
        Ok(ids)
    }

    /// Stops a sequence now and frees its row; the next `step` reports it as
    /// [`FinishReason::Cancelled`]. Returns false for an unknown or finished id.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.free_row(seq.row);
        self.reports.push(StepOutput {
            id,
            event: None,
            finished: Some(FinishReason::Cancelled),
            usage: Some(seq.usage()),
        });
        true
    }

    /// Sequences in the decoder (waiting for prefill or decoding).
    pub fn active(&self) -> usize {
        self.seqs.len()
    }

    /// Rows not taken by a sequence.
    pub fn free_rows(&self) -> usize {
        self.rows.iter().filter(|r| r.is_none()).count()
    }

    /// The `max_batch` this decoder was made with.
    pub fn capacity(&self) -> usize {
        self.rows.len()
    }

    /// The engine this decoder runs on.
    pub fn engine(&self) -> &Engine<M> {
        &self.engine
    }

    /// One step: a single batched forward of every decoding sequence, the prefill of every
    /// newly added prompt, and one token (or finish) per sequence.
    ///
    /// A model error is fatal to every sequence in the decoder (they are dropped and the
    /// decoder is empty afterwards, but still usable).
    pub fn step(&mut self) -> Result<Vec<StepOutput>, EngineError> {
        let result = self.step_inner();
        if result.is_err() {
            let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
            for id in ids {
                if let Some(seq) = self.seqs.remove(&id) {
                    self.free_row(seq.row);
                }
            }
        }
        result
    }

    fn step_inner(&mut self) -> Result<Vec<StepOutput>, EngineError> {
        let mut outputs = std::mem::take(&mut self.reports);
        let model = self.engine.model().clone();
        let vocab = model.vocab_size();

        // One forward for the whole step: the pending token of every decoding sequence plus
        // the prompt of every new group (its first member's row; the others copy it after).
        let mut decode_tokens = Vec::new();
        let mut entries: Vec<(SeqId, usize)> = Vec::new();
        let mut groups: BTreeMap<u64, (Arc<[u32]>, Vec<SeqId>)> = BTreeMap::new();
        for (&id, seq) in &self.seqs {
            match &seq.phase {
                Phase::Decode { last } => {
                    entries.push((id, seq.row));
                    decode_tokens.push(*last);
                }
                Phase::Prefill { prompt, group } => {
                    groups
                        .entry(*group)
                        .or_insert_with(|| (prompt.clone(), Vec::new()))
                        .1
                        .push(id);
                }
            }
        }
        let n_decode = entries.len();
        for (_, members) in groups.values() {
            let row = self.seqs[&members[0]].row;
            model.reset_row(&mut self.cache, row)?;
            entries.push((members[0], row));
        }
        if entries.is_empty() {
            return Ok(outputs);
        }
        let mut batch: Vec<(usize, &[u32])> = Vec::with_capacity(entries.len());
        for (&(_, row), token) in entries[..n_decode].iter().zip(&decode_tokens) {
            batch.push((row, std::slice::from_ref(token)));
        }
        for (&(_, row), (prompt, _)) in entries[n_decode..].iter().zip(groups.values()) {
            batch.push((row, prompt));
        }
        let logits = model.forward(&mut self.cache, &batch)?;
        drop(batch);
        if logits.len() != entries.len() * vocab {
            return Err(EngineError::Internal(format!(
                "model returned {} logits, expected {}",
                logits.len(),
                entries.len() * vocab
            )));
        }
        let row_logits = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        for (i, &(id, _)) in entries[..n_decode].iter().enumerate() {
            outputs.push(self.advance(id, row_logits(i))?);
        }
        for (g, (_, members)) in groups.values().enumerate() {
            let leader_row = self.seqs[&members[0]].row;
            for id in &members[1..] {
                let row = self.seqs[id].row;
                model.copy_row(&mut self.cache, leader_row, row)?;
            }
            for &id in members {
                outputs.push(self.advance(id, row_logits(n_decode + g))?);
            }
        }
        Ok(outputs)
    }

    /// Chooses the next token of `id` from its logits and updates its state.
    fn advance(&mut self, id: SeqId, logits: &[f32]) -> Result<StepOutput, EngineError> {
        let engine = self.engine.clone();
        let specials = *engine.specials();
        let context = engine.model().context_len();
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or_else(|| EngineError::Internal(format!("sequence {id} vanished mid-step")))?;
        let (token, forced) = match seq.forced.pop_front() {
            Some(t) => (t, true),
            None => (seq.sampler.sample(logits, &seq.params), false),
        };
        seq.generated += 1;

        let mut finished = None;
        let text;
        if !forced && specials.is_terminal(token) {
            text = seq.text.finish();
            finished = Some(FinishReason::Stop);
        } else {
            update_tool_state(seq, token, &engine);
            let delta = seq.text.push(&engine.codec().decode_bytes(&[token]));
            if delta.stopped {
                text = delta.text;
                finished = Some(FinishReason::Stop);
            } else if seq.generated >= seq.params.max_tokens
                || seq.prompt_len + seq.generated >= context
            {
                let mut t = delta.text;
                t.push_str(&seq.text.finish());
                text = t;
                finished = Some(FinishReason::Length);
            } else {
                text = delta.text;
            }
        }
        seq.phase = Phase::Decode { last: token };
        let usage = finished.map(|_| seq.usage());
        if finished.is_some() {
            let row = seq.row;
            self.seqs.remove(&id);
            self.free_row(row);
        }
        Ok(StepOutput {
            id,
            event: Some(TokenEvent {
                token,
                text,
                forced,
            }),
            finished,
            usage,
        })
    }

    fn free_row(&mut self, row: usize) {
        self.rows[row] = None;
        // A failed reset only wastes memory until the row is prefilled again (which resets it).
        if let Err(e) = self.engine.model().reset_row(&mut self.cache, row) {
            tracing::warn!(row, error = %e, "could not reset a KV-cache row");
        }
    }
}

/// nanochat's tool protocol: tokens between `<|python_start|>` and `<|python_end|>` form an
/// expression; if the calculator accepts it, `<|output_start|>result<|output_end|>` is forced.
fn update_tool_state<M: StepModel>(seq: &mut Seq, token: u32, engine: &Engine<M>) {
    let sp = engine.specials();
    if Some(token) == sp.python_start {
        seq.in_python = true;
        seq.expr.clear();
    } else if Some(token) == sp.python_end && seq.in_python {
        seq.in_python = false;
        let expr = std::mem::take(&mut seq.expr);
        let (Some(out_start), Some(out_end)) = (sp.output_start, sp.output_end) else {
            return;
        };
        if expr.is_empty() || expr.len() > MAX_EXPR_BYTES {
            return;
        }
        let bytes = engine.codec().decode_bytes(&expr);
        if let Some(result) = use_calculator(&String::from_utf8_lossy(&bytes)) {
            seq.forced.push_back(out_start);
            seq.forced.extend(engine.codec().encode(&result));
            seq.forced.push_back(out_end);
        }
    } else if seq.in_python && seq.expr.len() <= MAX_EXPR_BYTES {
        // One past the cap marks the call as too long without growing further.
        seq.expr.push(token);
    }
}
