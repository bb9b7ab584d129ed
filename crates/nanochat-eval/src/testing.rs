//! Deterministic stand-ins for a tokenizer, a model and a generator, for tests of evaluation
//! logic (here and in other crates). Their answers are scripted, so scores are known exactly.

use crate::model::{EvalTokenizer, Generator, LogProbModel, LogitsBatch};
use crate::Result;

/// Byte-level tokenizer: byte `b` is token `b + 1`; 0 is BOS; 257..=259 are the chat markers
/// `<|user_start|>`, `<|user_end|>`, `<|assistant_start|>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

/// Vocabulary size of [`ByteTokenizer`].
pub const BYTE_VOCAB: usize = 260;

impl EvalTokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(|b| b as u32 + 1).collect()
    }
    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&i| (1..=256).contains(&i))
            .map(|&i| (i - 1) as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn bos_id(&self) -> u32 {
        0
    }
    fn render_chat_prompt(&self, user_message: &str) -> Result<Vec<u32>> {
        let mut ids = vec![0, 257];
        ids.extend(self.encode(user_message));
        ids.extend([258, 259]);
        Ok(ids)
    }
}

/// A "model" that is certain about rows its predicate likes and clueless about the others:
/// for a liked row (decoded, padding removed) every position puts a large logit on the row's
/// actual next token; every other position is uniform (argmax = token 0).
pub struct OracleModel {
    likes: Box<dyn Fn(&str) -> bool + Send + Sync>,
    max_seq_len: Option<usize>,
}

impl std::fmt::Debug for OracleModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OracleModel")
            .field("max_seq_len", &self.max_seq_len)
            .finish()
    }
}

impl OracleModel {
    /// A model that prefers rows for which `likes(text)` is true.
    pub fn new(likes: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        OracleModel {
            likes: Box::new(likes),
            max_seq_len: None,
        }
    }

    /// Report a fixed context length (prompts get cropped from the left).
    pub fn with_max_seq_len(mut self, n: usize) -> Self {
        self.max_seq_len = Some(n);
        self
    }
}

impl LogProbModel for OracleModel {
    fn max_seq_len(&self) -> Option<usize> {
        self.max_seq_len
    }
    fn logits(&self, tokens: &[u32], batch: usize, seq_len: usize) -> Result<LogitsBatch> {
        let mut data = vec![0f32; batch * seq_len * BYTE_VOCAB];
        for r in 0..batch {
            let row = &tokens[r * seq_len..(r + 1) * seq_len];
            let len = row.iter().rposition(|&t| t != 0).map_or(0, |p| p + 1);
            let text = ByteTokenizer.decode(&row[..len]);
            if (self.likes)(&text) {
                for t in 0..len.saturating_sub(1) {
                    data[(r * seq_len + t) * BYTE_VOCAB + row[t + 1] as usize] = 20.0;
                }
            }
        }
        Ok(LogitsBatch {
            batch,
            seq_len,
            vocab: BYTE_VOCAB,
            data,
        })
    }
}

/// A generator that answers with `reply(prompt_text)`, encoded by [`ByteTokenizer`].
pub struct ScriptedGenerator {
    reply: Box<dyn Fn(&str) -> String + Send + Sync>,
}

impl std::fmt::Debug for ScriptedGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptedGenerator")
    }
}

impl ScriptedGenerator {
    /// Reply with `reply(user message decoded from the prompt)`.
    pub fn new(reply: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        ScriptedGenerator {
            reply: Box::new(reply),
        }
    }
}

impl Generator for ScriptedGenerator {
    fn generate(&self, prompt: &[u32], max_new_tokens: usize) -> Result<Vec<u32>> {
        let text = ByteTokenizer.decode(prompt);
        let mut ids = ByteTokenizer.encode(&(self.reply)(&text));
        ids.truncate(max_new_tokens);
        Ok(ids)
    }
}

/// The read-only `shared/` directory (fixtures and data) next to the repository, if present:
/// `$NANOCHAT_SHARED`, else the nearest ancestor of this crate that has `shared/data`.
/// Prints a notice when it is absent so that tests can skip visibly.
pub fn shared_dir() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("NANOCHAT_SHARED") {
        return Some(std::path::PathBuf::from(p));
    }
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in here.ancestors() {
        let cand = dir.join("shared");
        if cand.join("data").is_dir() {
            return Some(cand);
        }
    }
    eprintln!("NOTICE: ../shared (data and fixtures) is absent; skipping this test");
    None
}
