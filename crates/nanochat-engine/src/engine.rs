//! The user-facing engine: streaming single-prompt generation and non-streaming batches, both
//! built on [`BatchDecoder`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::batch::{BatchDecoder, FinishReason, SeqId, TokenEvent, Usage};
use crate::model::{Specials, StepModel, TokenCodec};
use crate::sampling::SamplingParams;
use crate::EngineError;

/// A model plus the codec it was trained with. Cheap to clone (shared handles).
pub struct Engine<M: StepModel> {
    model: Arc<M>,
    codec: Arc<dyn TokenCodec>,
    specials: Specials,
}

impl<M: StepModel> Clone for Engine<M> {
    fn clone(&self) -> Self {
        Engine {
            model: self.model.clone(),
            codec: self.codec.clone(),
            specials: self.specials,
        }
    }
}

impl<M: StepModel> Engine<M> {
    /// An engine for `model`, decoding text and special tokens with `codec`.
    pub fn new<C: TokenCodec + 'static>(model: Arc<M>, codec: Arc<C>) -> Self {
        let codec: Arc<dyn TokenCodec> = codec;
        let specials = Specials::from_codec(codec.as_ref());
        Engine {
            model,
            codec,
            specials,
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<M> {
        &self.model
    }

    /// The codec.
    pub fn codec(&self) -> &Arc<dyn TokenCodec> {
        &self.codec
    }

    /// The special tokens that steer generation.
    pub fn specials(&self) -> &Specials {
        &self.specials
    }

    /// A continuous-batching decoder with room for `max_batch` concurrent sequences.
    pub fn batch_decoder(&self, max_batch: usize) -> Result<BatchDecoder<M>, EngineError> {
        BatchDecoder::new(self.clone(), max_batch)
    }

    /// Streams the continuation of `prompt`: an iterator of token events; afterwards
    /// [`Generation::finish_reason`] and [`Generation::usage`] say how it ended.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation<M>, EngineError> {
        let mut decoder = self.batch_decoder(1)?;
        let id = decoder.add(prompt.to_vec(), params.clone())?;
        Ok(Generation {
            decoder,
            id,
            queue: VecDeque::new(),
            finish: None,
            usage: None,
            cancel: CancelToken::default(),
        })
    }

    /// Generates every prompt to completion in shared batches of up to `max_batch` rows, each
    /// prompt sampled `n` times from one prefill. Results are in prompt order, samples of one
    /// prompt adjacent.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        n: usize,
        max_batch: usize,
    ) -> Result<Vec<Completion>, EngineError> {
        if n > max_batch {
            return Err(EngineError::InvalidParams(format!(
                "n ({n}) must not exceed max_batch ({max_batch})"
            )));
        }
        let mut decoder = self.batch_decoder(max_batch)?;
        let mut slots: Vec<Option<Completion>> = vec![None; prompts.len() * n];
        let mut building: std::collections::HashMap<SeqId, (usize, Completion)> =
            Default::default();
        let mut next_prompt = 0;
        while next_prompt < prompts.len() || decoder.active() > 0 {
            while next_prompt < prompts.len() && decoder.free_rows() >= n {
                let ids = decoder.add_samples(prompts[next_prompt].clone(), params.clone(), n)?;
                for (i, id) in ids.into_iter().enumerate() {
                    building.insert(id, (next_prompt * n + i, Completion::default()));
                }
                next_prompt += 1;
            }
            for out in decoder.step()? {
                let Some((_, c)) = building.get_mut(&out.id) else {
                    continue;
                };
                if let Some(ev) = out.event {
                    c.tokens.push(ev.token);
                    c.text.push_str(&ev.text);
                }
                if let Some(reason) = out.finished {
                    if let Some((slot, mut c)) = building.remove(&out.id) {
                        if reason == FinishReason::Stop
                            && c.tokens
                                .last()
                                .is_some_and(|&t| self.specials.is_terminal(t))
                        {
                            c.tokens.pop();
                        }
                        c.finish = Some(reason);
                        c.usage = out.usage.unwrap_or_default();
                        slots[slot] = Some(c);
                    }
                }
            }
        }
        slots
            .into_iter()
            .map(|c| c.ok_or_else(|| EngineError::Internal("a sequence never finished".into())))
            .collect()
    }
}

/// A finished generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Generated tokens, forced tool output included, without a final `<|assistant_end|>` or
    /// `<|bos|>`.
    pub tokens: Vec<u32>,
    /// The streamed text, concatenated.
    pub text: String,
    /// Why it ended.
    pub finish: Option<FinishReason>,
    /// Token accounting.
    pub usage: Usage,
}

/// Stops a [`Generation`] from another thread (e.g. a Ctrl-C handler).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Requests cancellation; the stream ends before its next token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// The underlying flag, for signal handlers that set it directly (e.g. on Ctrl-C).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A streaming generation for one prompt: yields one [`TokenEvent`] per generated token.
pub struct Generation<M: StepModel> {
    decoder: BatchDecoder<M>,
    id: SeqId,
    queue: VecDeque<TokenEvent>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    cancel: CancelToken,
}

impl<M: StepModel> Generation<M> {
    /// A token that cancels this stream.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Why the stream ended (`None` while it is running).
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Token accounting, once finished.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

impl<M: StepModel> Iterator for Generation<M> {
    type Item = Result<TokenEvent, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(Ok(ev));
            }
            if self.finish.is_some() {
                return None;
            }
            if self.cancel.is_cancelled() {
                self.decoder.cancel(self.id);
            }
            match self.decoder.step() {
                Err(e) => {
                    self.finish = Some(FinishReason::Cancelled);
                    return Some(Err(e));
                }
                Ok(outs) => {
                    for out in outs.into_iter().filter(|o| o.id == self.id) {
                        self.queue.extend(out.event);
                        if out.finished.is_some() {
                            self.finish = out.finished;
                            self.usage = out.usage;
                        }
                    }
                }
            }
        }
    }
}
