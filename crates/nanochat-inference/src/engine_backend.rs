//! The real decode path: [`nanochat_engine::BatchDecoder`] behind [`DecodeBackend`], and an
//! [`EngineModel`] that pairs an engine with the tokenizer's chat rendering.

use std::sync::Arc;

use nanochat_engine::{BatchDecoder, Engine, FinishReason, SamplingParams, StepModel};
use nanochat_tokenizer::{Content, Conversation, Message, Tokenizer};

use crate::backend::{
    ChatTurn, DecodeBackend, Finish, Role, Sampling, SeqId, ServedModel, StepOutput,
};
use crate::error::{InferenceError, Result};

/// Turns validated requests into prompt tokens.
pub trait PromptRenderer: Send + Sync + 'static {
    /// Tokens priming the assistant to answer `turns`.
    fn render_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>>;
    /// Tokens of a raw completion prompt.
    fn render_completion(&self, text: &str) -> Result<Vec<u32>>;
}

/// A validated turn as the tokenizer's chat message.
fn to_message(t: &ChatTurn) -> Message {
    Message {
        role: match t.role {
            Role::System => nanochat_tokenizer::Role::System,
            Role::User => nanochat_tokenizer::Role::User,
            Role::Assistant => nanochat_tokenizer::Role::Assistant,
        },
        content: Content::Text(t.content.clone()),
    }
}

impl PromptRenderer for Tokenizer {
    /// nanochat's chat format, exactly as in training (system merged into the first user turn,
    /// strict user/assistant alternation), then `<|assistant_start|>`. Unlike
    /// `render_for_completion`, nothing is cut at 2048 tokens: the server checks the context
    /// window itself and says so instead of silently dropping the newest message.
    fn render_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>> {
        let conversation = Conversation {
            messages: turns.iter().map(to_message).collect(),
        };
        let (mut ids, _mask) = self
            .render_conversation(&conversation, usize::MAX)
            .map_err(|e| InferenceError::Prompt(e.to_string()))?;
        let start = self.special_id("<|assistant_start|>").ok_or_else(|| {
            InferenceError::Model("the tokenizer has no <|assistant_start|> token".into())
        })?;
        ids.push(start);
        Ok(ids)
    }

    fn render_completion(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos_id()];
        self.encode_into(text, &mut ids);
        Ok(ids)
    }
}

/// A [`BatchDecoder`] as a [`DecodeBackend`].
pub struct EngineDecoder<M: StepModel>(BatchDecoder<M>);

impl<M: StepModel> EngineDecoder<M> {
    /// Wrap a decoder.
    pub fn new(decoder: BatchDecoder<M>) -> Self {
        Self(decoder)
    }
}

fn engine_err(e: nanochat_engine::EngineError) -> InferenceError {
    use nanochat_engine::EngineError as E;
    match e {
        E::InvalidParams(_) | E::EmptyPrompt | E::InvalidToken { .. } => {
            InferenceError::Prompt(e.to_string())
        }
        other => InferenceError::Backend(other.to_string()),
    }
}

fn engine_params(s: Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed,
        max_tokens: s.max_tokens,
        // Stop strings are matched by the scheduler, identically for every backend.
        stop: Vec::new(),
    }
}

impl<M: StepModel> DecodeBackend for EngineDecoder<M> {
    fn add(&mut self, prompt: Vec<u32>, s: Sampling) -> Result<SeqId> {
        self.0.add(prompt, engine_params(s)).map_err(engine_err)
    }

    /// One prefill for all `n`: the engine copies the prompt's KV-cache row to the others, and
    /// sample `i` draws from stream `i` of the seed.
    fn add_samples(&mut self, prompt: Vec<u32>, s: Sampling, n: usize) -> Result<Vec<SeqId>> {
        self.0
            .add_samples(prompt, engine_params(s), n)
            .map_err(engine_err)
    }

    fn step(&mut self) -> Result<Vec<StepOutput>> {
        let outs = self.0.step().map_err(engine_err)?;
        Ok(outs
            .into_iter()
            .map(|o| StepOutput {
                id: o.id,
                token: o.event.map(|e| (e.token, e.text)),
                finished: o.finished.map(|f| match f {
                    FinishReason::Stop => Finish::Stop,
                    FinishReason::Length => Finish::Length,
                    FinishReason::Cancelled => Finish::Cancelled,
                }),
            })
            .collect())
    }

    fn cancel(&mut self, id: SeqId) {
        self.0.cancel(id);
    }

    fn active(&self) -> usize {
        self.0.active()
    }
}

/// A servable model: an engine plus prompt rendering and an identity.
pub struct EngineModel<M: StepModel + 'static> {
    engine: Engine<M>,
    renderer: Arc<dyn PromptRenderer>,
    artifact_id: String,
    name: String,
    device: String,
}

impl<M: StepModel + 'static> EngineModel<M> {
    /// `artifact_id` must change whenever the weights or tokenizer change (it keys the cache).
    /// The device it reports is `cpu` until [`EngineModel::with_device`] says otherwise.
    pub fn new(
        engine: Engine<M>,
        renderer: Arc<dyn PromptRenderer>,
        artifact_id: String,
        name: String,
    ) -> Self {
        Self {
            engine,
            renderer,
            artifact_id,
            name,
            device: "cpu".into(),
        }
    }

    /// Reports `device` (the backend's description, e.g. `cuda:0 (NVIDIA H100, ...)`) as where
    /// the model runs.
    pub fn with_device(mut self, device: impl Into<String>) -> Self {
        self.device = device.into();
        self
    }
}

impl<M: StepModel + 'static> ServedModel for EngineModel<M> {
    fn artifact_id(&self) -> &str {
        &self.artifact_id
    }

    fn default_name(&self) -> &str {
        &self.name
    }

    fn context_len(&self) -> usize {
        self.engine.model().context_len()
    }

    fn device(&self) -> &str {
        &self.device
    }

    fn render_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>> {
        self.renderer.render_chat(turns)
    }

    fn render_completion(&self, prompt: &str) -> Result<Vec<u32>> {
        self.renderer.render_completion(prompt)
    }

    fn new_decoder(&self, max_batch: usize) -> Result<Box<dyn DecodeBackend>> {
        let decoder = self.engine.batch_decoder(max_batch).map_err(engine_err)?;
        Ok(Box::new(EngineDecoder::new(decoder)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanochat_engine::testing::{ByteCodec, FakeModel};

    /// Byte-level chat rendering matching the engine's `ByteCodec` ids.
    struct ByteRenderer;

    impl PromptRenderer for ByteRenderer {
        fn render_chat(&self, turns: &[ChatTurn]) -> Result<Vec<u32>> {
            let mut ids = vec![ByteCodec::special("<|bos|>")];
            for t in turns {
                let (a, b) = match t.role {
                    Role::Assistant => ("<|assistant_start|>", "<|assistant_end|>"),
                    _ => ("<|user_start|>", "<|user_end|>"),
                };
                ids.push(ByteCodec::special(a));
                ids.extend(t.content.bytes().map(u32::from));
                ids.push(ByteCodec::special(b));
            }
            ids.push(ByteCodec::special("<|assistant_start|>"));
            Ok(ids)
        }

        fn render_completion(&self, text: &str) -> Result<Vec<u32>> {
            let mut ids = vec![ByteCodec::special("<|bos|>")];
            ids.extend(text.bytes().map(u32::from));
            Ok(ids)
        }
    }

    fn served() -> EngineModel<FakeModel> {
        // After the prompt, spell "ok" and end the turn.
        let end = ByteCodec::special("<|assistant_end|>");
        let start = ByteCodec::special("<|assistant_start|>");
        let model = FakeModel::new(ByteCodec::VOCAB, 64).with_script(move |h| {
            let at = h.iter().rposition(|&t| t == start)?;
            Some(match h.len() - at - 1 {
                0 => u32::from(b'o'),
                1 => u32::from(b'k'),
                _ => end,
            })
        });
        let engine = Engine::new(Arc::new(model), Arc::new(ByteCodec));
        EngineModel::new(
            engine,
            Arc::new(ByteRenderer),
            "fake-engine".into(),
            "fake".into(),
        )
    }

    #[test]
    fn engine_decoder_streams_text_and_stops_at_assistant_end() {
        let m = served();
        let mut dec = m.new_decoder(4).unwrap();
        let prompt = m
            .render_chat(&[ChatTurn {
                role: Role::User,
                content: "hi".into(),
            }])
            .unwrap();
        let greedy = Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            max_tokens: 10,
        };
        let a = dec.add(prompt.clone(), greedy.clone()).unwrap();
        let b = dec
            .add(
                prompt,
                Sampling {
                    max_tokens: 1,
                    ..greedy
                },
            )
            .unwrap();
        let (mut ta, mut tb, mut fa, mut fb) = (String::new(), String::new(), None, None);
        while dec.active() > 0 {
            for o in dec.step().unwrap() {
                let (t, f) = if o.id == a {
                    (&mut ta, &mut fa)
                } else {
                    (&mut tb, &mut fb)
                };
                if let Some((_, text)) = o.token {
                    t.push_str(&text);
                }
                if o.finished.is_some() {
                    *f = o.finished;
                }
            }
        }
        assert_eq!((ta.as_str(), fa), ("ok", Some(Finish::Stop)));
        assert_eq!((tb.as_str(), fb), ("o", Some(Finish::Length)));
        assert_eq!(b, a + 1);
    }

    fn byte_tokenizer() -> Tokenizer {
        Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect()).unwrap()
    }

    #[test]
    fn tokenizer_chat_rendering_matches_render_for_completion() {
        let tok = byte_tokenizer();
        let turn = |role, c: &str| ChatTurn {
            role,
            content: c.into(),
        };
        let turns = [
            turn(Role::System, "be kind"),
            turn(Role::User, "hi"),
            turn(Role::Assistant, "hello"),
            turn(Role::User, "how are you?"),
        ];
        let ours = PromptRenderer::render_chat(&tok, &turns).unwrap();
        let mut conv: Vec<Message> = turns.iter().map(to_message).collect();
        conv.push(Message {
            role: nanochat_tokenizer::Role::Assistant,
            content: Content::Text("x".into()),
        });
        let reference = tok
            .render_for_completion(&Conversation { messages: conv })
            .unwrap();
        assert_eq!(ours, reference);
        assert_eq!(tok.decode(&ours[..1]), "<|bos|>");

        // Non-alternating turns are a prompt error (answered 400), not a panic.
        let bad = [turn(Role::User, "a"), turn(Role::User, "b")];
        assert!(matches!(
            PromptRenderer::render_chat(&tok, &bad),
            Err(InferenceError::Prompt(_))
        ));
        // Completions are BOS + text.
        let ids = PromptRenderer::render_completion(&tok, "ab").unwrap();
        assert_eq!(ids, vec![tok.bos_id(), u32::from(b'a'), u32::from(b'b')]);
    }

    #[test]
    fn invalid_prompt_is_a_prompt_error() {
        let m = served();
        let mut dec = m.new_decoder(1).unwrap();
        let greedy = Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            max_tokens: 1,
        };
        assert!(matches!(
            dec.add(vec![99_999], greedy),
            Err(InferenceError::Prompt(_))
        ));
    }
}
