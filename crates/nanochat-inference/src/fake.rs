//! A scripted stand-in model for tests, UI work and server-overhead benchmarks.
//!
//! Tokens are bytes (0..=255) plus five specials. The "model" answers `echo: <last user text>`
//! one byte per step; a user text starting with `repeat:` makes it talk until max_tokens. With
//! temperature > 0 it appends ` #<n>` where n comes from the seed (or a fresh random number), so
//! tests can tell deterministic requests from sampled ones.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{
    ChatTurn, DecodeBackend, Finish, Role, Sampling, SeqId, ServedModel, StepOutput,
};
use crate::error::{InferenceError, Result};

/// Special token ids of the fake vocabulary.
pub const BOS: u32 = 256;
const USER_START: u32 = 257;
const USER_END: u32 = 258;
const ASSISTANT_START: u32 = 259;
const ASSISTANT_END: u32 = 260;

/// The scripted model. Cheap to clone; clones share counters.
#[derive(Debug, Clone)]
pub struct FakeModel {
    step_delay: Duration,
    context_len: usize,
    peak_batch: Arc<AtomicUsize>,
    steps: Arc<AtomicU64>,
    prefills: Arc<AtomicU64>,
    entropy: Arc<AtomicU64>,
}

impl FakeModel {
    /// A fake whose every decode step takes `step_delay` (simulated compute).
    pub fn new(step_delay: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        Self {
            step_delay,
            context_len: 4096,
            peak_batch: Arc::new(AtomicUsize::new(0)),
            steps: Arc::new(AtomicU64::new(0)),
            prefills: Arc::new(AtomicU64::new(0)),
            entropy: Arc::new(AtomicU64::new(seed)),
        }
    }

    /// Override the context window (to test context-length errors).
    pub fn with_context_len(mut self, n: usize) -> Self {
        self.context_len = n;
        self
    }

    /// Largest number of sequences any decoder advanced in one step so far.
    pub fn peak_batch(&self) -> usize {
        self.peak_batch.load(Ordering::Relaxed)
    }

    /// Prompt prefills so far: one per `add`, one per `add_samples` group.
    pub fn prefills(&self) -> u64 {
        self.prefills.load(Ordering::Relaxed)
    }

    /// Decode steps run so far over all decoders.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// The reply the fake gives to a prompt, as bytes (None: endless `la ` loop after it).
    pub fn script(prompt: &[u32], sampling: &Sampling, fresh: u64) -> (Vec<u8>, bool) {
        let last_user = match prompt.iter().rposition(|&t| t == USER_START) {
            Some(start) => {
                let end = prompt[start..]
                    .iter()
                    .position(|&t| t == USER_END)
                    .map_or(prompt.len(), |e| start + e);
                &prompt[start + 1..end]
            }
            None => prompt.strip_prefix(&[BOS]).unwrap_or(prompt),
        };
        let text: Vec<u8> = last_user
            .iter()
            .filter(|&&t| t < 256)
            .map(|&t| t as u8)
            .collect();
        let endless = text.starts_with(b"repeat:");
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(&text);
        if sampling.temperature > 0.0 {
            let n = splitmix(sampling.seed.unwrap_or(fresh)) % 10_000;
            reply.extend_from_slice(format!(" #{n}").as_bytes());
        }
        (reply, endless)
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl ServedModel for FakeModel {
    fn artifact_id(&self) -> &str {
        "fake-echo-v1"
    }

    fn default_name(&self) -> &str {
        "nanochat-fake"
    }

    fn context_len(&self) -> usize {
        self.context_len
    }

    fn device(&self) -> &str {
        "none (scripted fake model)"
    }

    fn render_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>> {
        let mut ids = vec![BOS];
        let mut system: Option<&str> = None;
        for turn in turns {
            let (open, close) = match turn.role {
                Role::System => {
                    system = Some(&turn.content);
                    continue;
                }
                Role::User => (USER_START, USER_END),
                Role::Assistant => (ASSISTANT_START, ASSISTANT_END),
            };
            ids.push(open);
            if let (Some(s), Role::User) = (system.take(), turn.role) {
                ids.extend(s.bytes().map(u32::from));
                ids.extend(b"\n\n".iter().map(|&b| u32::from(b)));
            }
            ids.extend(turn.content.bytes().map(u32::from));
            ids.push(close);
        }
        if system.is_some() {
            return Err(InferenceError::Prompt(
                "a system message must be followed by a user message".into(),
            ));
        }
        ids.push(ASSISTANT_START);
        Ok(ids)
    }

    fn render_completion(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![BOS];
        ids.extend(prompt.bytes().map(u32::from));
        Ok(ids)
    }

    fn new_decoder(&self, max_batch: usize) -> Result<Box<dyn DecodeBackend>> {
        Ok(Box::new(FakeDecoder {
            model: self.clone(),
            max_batch,
            next_id: 0,
            seqs: Vec::new(),
        }))
    }
}

struct FakeSeq {
    id: SeqId,
    reply: Vec<u8>,
    endless: bool,
    emitted: usize,
    max_tokens: usize,
    /// Bytes produced but not yet a complete UTF-8 character.
    partial: Vec<u8>,
}

struct FakeDecoder {
    model: FakeModel,
    max_batch: usize,
    next_id: SeqId,
    seqs: Vec<FakeSeq>,
}

impl FakeDecoder {
    fn add_seq(&mut self, prompt: &[u32], sampling: &Sampling) -> Result<SeqId> {
        if prompt.len() >= self.model.context_len {
            return Err(InferenceError::Prompt(
                "prompt does not fit the context".into(),
            ));
        }
        let fresh = self
            .model
            .entropy
            .fetch_add(0x1234_5678_9abc, Ordering::Relaxed);
        let (reply, endless) = FakeModel::script(prompt, sampling, splitmix(fresh));
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.push(FakeSeq {
            id,
            reply,
            endless,
            emitted: 0,
            max_tokens: sampling.max_tokens,
            partial: Vec::new(),
        });
        Ok(id)
    }
}

impl DecodeBackend for FakeDecoder {
    fn add(&mut self, prompt: Vec<u32>, sampling: Sampling) -> Result<SeqId> {
        Ok(self.add_samples(prompt, sampling, 1)?[0])
    }

    /// Like the engine: all `n` or none, one prefill; sample `i` seeded with `seed + i`.
    fn add_samples(
        &mut self,
        prompt: Vec<u32>,
        sampling: Sampling,
        n: usize,
    ) -> Result<Vec<SeqId>> {
        if self.seqs.len() + n > self.max_batch {
            return Err(InferenceError::Backend("batch is full".into()));
        }
        self.model.prefills.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| self.add_seq(&prompt, &sampling.nth_sample(i)))
            .collect()
    }

    fn step(&mut self) -> Result<Vec<StepOutput>> {
        if self.seqs.is_empty() {
            return Ok(Vec::new());
        }
        self.model
            .peak_batch
            .fetch_max(self.seqs.len(), Ordering::Relaxed);
        self.model.steps.fetch_add(1, Ordering::Relaxed);
        if !self.model.step_delay.is_zero() {
            std::thread::sleep(self.model.step_delay);
        }
        let mut outs = Vec::with_capacity(self.seqs.len());
        for seq in &mut self.seqs {
            let byte = if seq.emitted < seq.reply.len() {
                Some(seq.reply[seq.emitted])
            } else if seq.endless {
                Some(b"la "[(seq.emitted - seq.reply.len()) % 3])
            } else {
                None
            };
            let Some(byte) = byte else {
                outs.push(StepOutput {
                    id: seq.id,
                    token: Some((ASSISTANT_END, String::new())),
                    finished: Some(Finish::Stop),
                });
                continue;
            };
            seq.emitted += 1;
            seq.partial.push(byte);
            let text = match std::str::from_utf8(&seq.partial) {
                Ok(s) => {
                    let s = s.to_string();
                    seq.partial.clear();
                    s
                }
                Err(_) => String::new(),
            };
            let finished = (seq.emitted >= seq.max_tokens).then_some(Finish::Length);
            outs.push(StepOutput {
                id: seq.id,
                token: Some((u32::from(byte), text)),
                finished,
            });
        }
        let done: Vec<SeqId> = outs
            .iter()
            .filter(|o| o.finished.is_some())
            .map(|o| o.id)
            .collect();
        self.seqs.retain(|s| !done.contains(&s.id));
        Ok(outs)
    }

    fn cancel(&mut self, id: SeqId) {
        self.seqs.retain(|s| s.id != id);
    }

    fn active(&self) -> usize {
        self.seqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy(max_tokens: usize) -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            max_tokens,
        }
    }

    fn drain(dec: &mut dyn DecodeBackend) -> std::collections::HashMap<SeqId, (String, Finish)> {
        let mut out = std::collections::HashMap::new();
        while dec.active() > 0 {
            for o in dec.step().unwrap() {
                let e = out
                    .entry(o.id)
                    .or_insert((String::new(), Finish::Cancelled));
                if let Some((_, t)) = o.token {
                    e.0.push_str(&t);
                }
                if let Some(f) = o.finished {
                    e.1 = f;
                }
            }
        }
        out
    }

    #[test]
    fn echoes_the_last_user_message_per_sequence() {
        let m = FakeModel::new(Duration::ZERO);
        let mut dec = m.new_decoder(4).unwrap();
        let turn = |r, c: &str| ChatTurn {
            role: r,
            content: c.into(),
        };
        let a = dec
            .add(
                m.render_chat(&[turn(Role::User, "hi")]).unwrap(),
                greedy(100),
            )
            .unwrap();
        let p = m
            .render_chat(&[
                turn(Role::User, "x"),
                turn(Role::Assistant, "y"),
                turn(Role::User, "héllo"),
            ])
            .unwrap();
        let b = dec.add(p, greedy(100)).unwrap();
        let c = dec
            .add(
                m.render_chat(&[turn(Role::User, "long one")]).unwrap(),
                greedy(3),
            )
            .unwrap();
        let out = drain(dec.as_mut());
        assert_eq!(out[&a], ("echo: hi".to_string(), Finish::Stop));
        assert_eq!(out[&b], ("echo: héllo".to_string(), Finish::Stop));
        assert_eq!(out[&c], ("ech".to_string(), Finish::Length));
        assert_eq!(m.peak_batch(), 3);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_unseeded_is_not() {
        let m = FakeModel::new(Duration::ZERO);
        let p = m.render_completion("q").unwrap();
        let mut s = greedy(100);
        s.temperature = 1.0;
        s.seed = Some(42);
        let r1 = FakeModel::script(&p, &s, 1).0;
        let r2 = FakeModel::script(&p, &s, 2).0;
        assert_eq!(r1, r2);
        s.seed = None;
        assert_ne!(
            FakeModel::script(&p, &s, 1).0,
            FakeModel::script(&p, &s, 2).0
        );
    }
}
