//! Conversation tasks: datasets of [`Conversation`]s rendered the way nanochat's `tasks/*.py`
//! render them, plus the metadata an evaluator needs (answer letters, reference answer).
//!
//! Every task implements [`Task`]: `len()`, `get(i)` and an [`EvalType`]. Loaders read the
//! upstream record schemas (SmolTalk `{"messages": [...]}`, HF MMLU / ARC / GSM8K rows,
//! nanochat's identity-conversation lines) from `.jsonl` or `.jsonl.gz` files. Conversation
//! datasets are small (thousands to hundreds of thousands of rows) and are held in memory.
//!
//! [`TaskMixture`] interleaves tasks with a seeded shuffle (list a task twice to oversample it),
//! [`TaskSlice`] takes `start..stop` by `step` like the reference's `Task(start, stop, step)`.

pub mod pyrandom;
mod spelling;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use nanochat_tokenizer::chat::{Content, Conversation, Message, Part, PartKind, Role};
use serde::Deserialize;

use crate::DataError;

pub use spelling::{SimpleSpelling, SpellingBee, SpellingSplit};

/// How a task is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalType {
    /// Pick one of the answer letters (compare the letters' logits).
    Categorical,
    /// Generate a completion and check it.
    Generative,
}

/// One item of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The conversation; the last message is the reference assistant answer.
    pub conversation: Conversation,
    /// For multiple choice: the answer letters offered, in order.
    pub letters: Option<Vec<String>>,
    /// The reference answer: the correct letter, or the number after `####`.
    pub answer: Option<String>,
}

impl Example {
    fn plain(conversation: Conversation) -> Self {
        Example {
            conversation,
            letters: None,
            answer: None,
        }
    }
}

/// A dataset of conversations.
pub trait Task: Send + Sync {
    /// Short name for logs and reports.
    fn name(&self) -> &str;
    /// Number of items.
    fn len(&self) -> usize;
    /// True when the task has no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Item `index` (`index < len()`).
    fn get(&self, index: usize) -> Result<Example, DataError>;
    /// How the task is evaluated.
    fn eval_type(&self) -> EvalType;
}

fn out_of_range(name: &str, index: usize, len: usize) -> DataError {
    DataError::Config(format!("{name}: index {index} out of range (len {len})"))
}

/// Reads the non-empty lines of a `.jsonl` or `.jsonl.gz` file, parsing each as `T`;
/// errors name the file and the 1-based line.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| DataError::Invalid {
            path: path.to_path_buf(),
            detail: format!("line {}: {e}", i + 1),
        })?);
    }
    Ok(out)
}

/// Checks the conversation shape the training renderer expects: optional system message first,
/// then user/assistant alternating, starting with user, ending with assistant.
fn validate_conversation(c: &Conversation, path: &Path, line: usize) -> Result<(), DataError> {
    let bad = |detail: String| DataError::Invalid {
        path: path.to_path_buf(),
        detail: format!("conversation {line}: {detail}"),
    };
    let msgs = match c.messages.first() {
        Some(m) if m.role == Role::System => &c.messages[1..],
        _ => &c.messages[..],
    };
    if msgs.len() < 2 {
        return Err(bad("needs at least a user and an assistant message".into()));
    }
    for (i, m) in msgs.iter().enumerate() {
        let want = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role != want {
            return Err(bad(format!(
                "message {i} is {:?}, expected {want:?}",
                m.role
            )));
        }
    }
    if msgs.len() % 2 != 0 {
        return Err(bad("the last message must be the assistant's".into()));
    }
    Ok(())
}

/// Conversations in the SmolTalk schema (`{"messages": [{role, content}, ...]}`).
pub struct SmolTalk {
    name: String,
    rows: Vec<Conversation>,
}

impl SmolTalk {
    /// Loads and validates every conversation of a `.jsonl[.gz]` file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let rows: Vec<Conversation> = read_jsonl(path)?;
        for (i, c) in rows.iter().enumerate() {
            validate_conversation(c, path, i + 1)?;
        }
        Ok(SmolTalk {
            name: stem(path),
            rows,
        })
    }
}

fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("task")
        .to_string();
    name.trim_end_matches(".gz")
        .trim_end_matches(".jsonl")
        .to_string()
}

impl Task for SmolTalk {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        self.rows
            .get(index)
            .cloned()
            .map(Example::plain)
            .ok_or_else(|| out_of_range(&self.name, index, self.rows.len()))
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Generative
    }
}

/// nanochat's identity conversations: each line a JSON array of `{role, content}` messages
/// (the SmolTalk object form is accepted too).
pub struct CustomJson {
    inner: SmolTalk,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CustomLine {
    Bare(Vec<Message>),
    Object(Conversation),
}

impl CustomJson {
    /// Loads and validates a `.jsonl[.gz]` file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let lines: Vec<CustomLine> = read_jsonl(path)?;
        let rows: Vec<Conversation> = lines
            .into_iter()
            .map(|l| match l {
                CustomLine::Bare(messages) => Conversation { messages },
                CustomLine::Object(c) => c,
            })
            .collect();
        for (i, c) in rows.iter().enumerate() {
            validate_conversation(c, path, i + 1)?;
        }
        Ok(CustomJson {
            inner: SmolTalk {
                name: stem(path),
                rows,
            },
        })
    }
}

impl Task for CustomJson {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        self.inner.get(index)
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Generative
    }
}

/// nanochat's multiple-choice prompt: the letter follows each choice with no space after `=`, so
/// the prompt's letter token is the same token as the one-letter answer.
pub fn render_mc(question: &str, letters: &[String], choices: &[String]) -> String {
    let mut q = format!("Multiple Choice question: {question}\n");
    for (letter, choice) in letters.iter().zip(choices) {
        q.push_str(&format!("- {choice}={letter}\n"));
    }
    q.push_str("\nRespond only with the letter of the correct answer.");
    q
}

struct McItem {
    question: String,
    letters: Vec<String>,
    choices: Vec<String>,
    answer: String,
}

fn mc_example(item: &McItem) -> Example {
    let user = render_mc(&item.question, &item.letters, &item.choices);
    Example {
        conversation: Conversation {
            messages: vec![
                Message::text(Role::User, user),
                Message::text(Role::Assistant, item.answer.clone()),
            ],
        },
        letters: Some(item.letters.clone()),
        answer: Some(item.answer.clone()),
    }
}

/// A multiple-choice task (MMLU or ARC rows).
pub struct MultipleChoice {
    name: String,
    items: Vec<McItem>,
}

#[derive(Deserialize)]
struct MmluRow {
    question: String,
    choices: Vec<String>,
    answer: usize,
}

#[derive(Deserialize)]
struct ArcChoices {
    text: Vec<String>,
    label: Vec<String>,
}

#[derive(Deserialize)]
struct ArcRow {
    question: String,
    choices: ArcChoices,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

/// MMLU (`cais/mmlu` rows: `question, subject, choices[4], answer:int`), letters A–D.
pub struct Mmlu;

impl Mmlu {
    /// Loads a `.jsonl[.gz]` file of MMLU rows.
    pub fn load(path: &Path) -> Result<MultipleChoice, DataError> {
        let rows: Vec<MmluRow> = read_jsonl(path)?;
        let letters: Vec<String> = ["A", "B", "C", "D"].iter().map(|s| s.to_string()).collect();
        let mut items = Vec::with_capacity(rows.len());
        for (i, r) in rows.into_iter().enumerate() {
            if r.choices.len() != 4 || r.answer >= 4 {
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!("line {}: MMLU rows need 4 choices and answer 0..=3", i + 1),
                });
            }
            items.push(McItem {
                question: r.question,
                answer: letters[r.answer].clone(),
                letters: letters.clone(),
                choices: r.choices,
            });
        }
        Ok(MultipleChoice {
            name: stem(path),
            items,
        })
    }
}

/// ARC (`allenai/ai2_arc` rows: `question, choices{text[], label[]}, answerKey`).
pub struct Arc;

impl Arc {
    /// Loads a `.jsonl[.gz]` file of ARC rows.
    pub fn load(path: &Path) -> Result<MultipleChoice, DataError> {
        let rows: Vec<ArcRow> = read_jsonl(path)?;
        let mut items = Vec::with_capacity(rows.len());
        for (i, r) in rows.into_iter().enumerate() {
            if r.choices.text.len() != r.choices.label.len()
                || !r.choices.label.contains(&r.answer_key)
            {
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!("line {}: answerKey is not one of the choice labels", i + 1),
                });
            }
            items.push(McItem {
                question: r.question,
                letters: r.choices.label,
                choices: r.choices.text,
                answer: r.answer_key,
            });
        }
        Ok(MultipleChoice {
            name: stem(path),
            items,
        })
    }
}

impl Task for MultipleChoice {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.items.len()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        self.items
            .get(index)
            .map(mc_example)
            .ok_or_else(|| out_of_range(&self.name, index, self.items.len()))
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Categorical
    }
}

#[derive(Deserialize)]
struct GsmRow {
    question: String,
    answer: String,
}

/// GSM8K (`question, answer` rows): `<<expr=result>>` annotations become python tool-call parts.
pub struct Gsm8k {
    name: String,
    rows: Vec<GsmRow>,
}

impl Gsm8k {
    /// Loads a `.jsonl[.gz]` file of GSM8K rows.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        Ok(Gsm8k {
            name: stem(path),
            rows: read_jsonl(path)?,
        })
    }
}

/// Splits a GSM8K solution into text / python / python_output parts at `<<expr=result>>`.
pub fn gsm8k_parts(answer: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find("<<") {
        let Some(close_rel) = rest[open + 2..].find(">>") else {
            break;
        };
        let inner = &rest[open + 2..open + 2 + close_rel];
        if inner.is_empty() || inner.contains('>') {
            break;
        }
        parts.push(Part::new(PartKind::Text, &rest[..open]));
        let (expr, result) = inner.rsplit_once('=').unwrap_or((inner, ""));
        parts.push(Part::new(PartKind::Python, expr));
        parts.push(Part::new(PartKind::PythonOutput, result));
        rest = &rest[open + 2 + close_rel + 2..];
    }
    parts.push(Part::new(PartKind::Text, rest));
    parts
}

/// The number after `####` with commas removed (GSM8K's answer normalisation).
pub fn extract_gsm_answer(text: &str) -> Option<String> {
    let at = text.find("#### ")?;
    let tail = &text[at + 5..];
    let num: String = tail
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '-' | '.' | ','))
        .collect();
    let num = num.trim().replace(',', "");
    if num.is_empty() {
        None
    } else {
        Some(num)
    }
}

impl Task for Gsm8k {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        let row = self
            .rows
            .get(index)
            .ok_or_else(|| out_of_range(&self.name, index, self.rows.len()))?;
        Ok(Example {
            conversation: Conversation {
                messages: vec![
                    Message::text(Role::User, row.question.clone()),
                    Message {
                        role: Role::Assistant,
                        content: Content::Parts(gsm8k_parts(&row.answer)),
                    },
                ],
            },
            letters: None,
            answer: extract_gsm_answer(&row.answer),
        })
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Generative
    }
}

/// `task[start..stop]` by `step`, like the reference's sliced tasks.
pub struct TaskSlice {
    inner: Box<dyn Task>,
    start: usize,
    step: usize,
    len: usize,
}

impl TaskSlice {
    /// Items `start, start+step, … < stop` (stop clamped to the task's length).
    pub fn new(
        inner: Box<dyn Task>,
        start: usize,
        stop: Option<usize>,
        step: usize,
    ) -> Result<Self, DataError> {
        if step == 0 {
            return Err(DataError::Config("task slice step must be ≥ 1".into()));
        }
        let stop = stop.unwrap_or(inner.len()).min(inner.len());
        let len = stop.saturating_sub(start).div_ceil(step);
        Ok(TaskSlice {
            inner,
            start,
            step,
            len,
        })
    }
}

impl Task for TaskSlice {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        if index >= self.len {
            return Err(out_of_range(self.name(), index, self.len));
        }
        self.inner.get(self.start + index * self.step)
    }
    fn eval_type(&self) -> EvalType {
        self.inner.eval_type()
    }
}

/// A fixed, seeded shuffle of several tasks' items (list a task twice to oversample it).
pub struct TaskMixture {
    tasks: Vec<Box<dyn Task>>,
    index: Vec<(u32, u32)>,
}

impl TaskMixture {
    /// Mixes `tasks`, shuffled by `seed` (nanochat uses 42).
    pub fn new(tasks: Vec<Box<dyn Task>>, seed: u64) -> Self {
        let mut index = Vec::new();
        for (t, task) in tasks.iter().enumerate() {
            for i in 0..task.len() {
                index.push((t as u32, i as u32));
            }
        }
        let mut rng = SplitMix64::new(seed);
        // Fisher–Yates
        for i in (1..index.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            index.swap(i, j);
        }
        TaskMixture { tasks, index }
    }

    /// Names and sizes of the mixed tasks.
    pub fn summary(&self) -> Vec<(String, usize)> {
        self.tasks
            .iter()
            .map(|t| (t.name().to_string(), t.len()))
            .collect()
    }
}

impl Task for TaskMixture {
    fn name(&self) -> &str {
        "mixture"
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        let &(t, i) = self
            .index
            .get(index)
            .ok_or_else(|| out_of_range("mixture", index, self.index.len()))?;
        self.tasks[t as usize].get(i as usize)
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Generative
    }
}

/// Small seeded generator (SplitMix64) for shuffles and synthetic tasks: stable across
/// platforms and releases, unlike an external crate's default RNG.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A task described in a config: which loader and which file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskSpec {
    /// SmolTalk-schema conversations.
    Smoltalk {
        /// `.jsonl[.gz]` file.
        path: PathBuf,
        /// Use at most this many rows.
        #[serde(default)]
        stop: Option<usize>,
    },
    /// Identity conversations (arrays of messages).
    CustomJson {
        /// `.jsonl[.gz]` file.
        path: PathBuf,
    },
    /// MMLU rows.
    Mmlu {
        /// `.jsonl[.gz]` file.
        path: PathBuf,
        /// Use at most this many rows.
        #[serde(default)]
        stop: Option<usize>,
    },
    /// ARC rows.
    Arc {
        /// `.jsonl[.gz]` file.
        path: PathBuf,
        /// Use at most this many rows.
        #[serde(default)]
        stop: Option<usize>,
    },
    /// GSM8K rows.
    Gsm8k {
        /// `.jsonl[.gz]` file.
        path: PathBuf,
        /// Use at most this many rows.
        #[serde(default)]
        stop: Option<usize>,
    },
    /// Spell a word letter by letter.
    SimpleSpelling {
        /// Word list (one word per line, `.gz` ok).
        words: PathBuf,
        /// Number of generated items.
        size: usize,
    },
    /// Count a letter in a word, manually and with the python tool.
    SpellingBee {
        /// Word list (one word per line, `.gz` ok).
        words: PathBuf,
        /// Number of generated items.
        size: usize,
    },
}

impl TaskSpec {
    /// Loads the task; relative paths are resolved against `base`.
    pub fn load(&self, base: &Path) -> Result<Box<dyn Task>, DataError> {
        let abs = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let sliced = |t: Box<dyn Task>, stop: &Option<usize>| -> Result<Box<dyn Task>, DataError> {
            Ok(match stop {
                Some(s) => Box::new(TaskSlice::new(t, 0, Some(*s), 1)?),
                None => t,
            })
        };
        match self {
            TaskSpec::Smoltalk { path, stop } => {
                sliced(Box::new(SmolTalk::load(&abs(path))?), stop)
            }
            TaskSpec::CustomJson { path } => Ok(Box::new(CustomJson::load(&abs(path))?)),
            TaskSpec::Mmlu { path, stop } => sliced(Box::new(Mmlu::load(&abs(path))?), stop),
            TaskSpec::Arc { path, stop } => sliced(Box::new(Arc::load(&abs(path))?), stop),
            TaskSpec::Gsm8k { path, stop } => sliced(Box::new(Gsm8k::load(&abs(path))?), stop),
            TaskSpec::SimpleSpelling { words, size } => Ok(Box::new(SimpleSpelling::load(
                &abs(words),
                *size,
                SpellingSplit::Train,
            )?)),
            TaskSpec::SpellingBee { words, size } => Ok(Box::new(SpellingBee::load(
                &abs(words),
                *size,
                SpellingSplit::Train,
            )?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_annotations_become_tool_calls() {
        let parts = gsm8k_parts("He has 2*3 = <<2*3=6>>6 apples.\n#### 6");
        let kinds: Vec<PartKind> = parts.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                PartKind::Text,
                PartKind::Python,
                PartKind::PythonOutput,
                PartKind::Text
            ]
        );
        assert_eq!(parts[0].text, "He has 2*3 = ");
        assert_eq!(parts[1].text, "2*3");
        assert_eq!(parts[2].text, "6");
        assert_eq!(parts[3].text, "6 apples.\n#### 6");
        assert_eq!(extract_gsm_answer(&parts[3].text).as_deref(), Some("6"));
        assert_eq!(extract_gsm_answer("#### 1,234").as_deref(), Some("1234"));
        assert_eq!(extract_gsm_answer("no answer"), None);
    }

    #[test]
    fn render_mc_matches_nanochat_layout() {
        let letters: Vec<String> = ["A", "B"].iter().map(|s| s.to_string()).collect();
        let choices: Vec<String> = ["red", "blue"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            render_mc("Sky?", &letters, &choices),
            "Multiple Choice question: Sky?\n- red=A\n- blue=B\n\nRespond only with the letter of the correct answer."
        );
    }

    struct Count(usize, &'static str);
    impl Task for Count {
        fn name(&self) -> &str {
            self.1
        }
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize) -> Result<Example, DataError> {
            Ok(Example::plain(Conversation {
                messages: vec![Message::text(Role::User, format!("{}{index}", self.1))],
            }))
        }
        fn eval_type(&self) -> EvalType {
            EvalType::Generative
        }
    }

    fn text(e: &Example) -> String {
        match &e.conversation.messages[0].content {
            Content::Text(t) => t.clone(),
            Content::Parts(_) => unreachable!(),
        }
    }

    #[test]
    fn mixture_is_a_seeded_permutation() {
        let mk =
            |seed| TaskMixture::new(vec![Box::new(Count(3, "a")), Box::new(Count(2, "b"))], seed);
        let m = mk(42);
        let mut all: Vec<String> = (0..m.len()).map(|i| text(&m.get(i).unwrap())).collect();
        let again: Vec<String> = (0..m.len())
            .map(|i| text(&mk(42).get(i).unwrap()))
            .collect();
        assert_eq!(all, again);
        let other: Vec<String> = (0..5).map(|i| text(&mk(7).get(i).unwrap())).collect();
        assert_ne!(all, other);
        all.sort();
        assert_eq!(all, ["a0", "a1", "a2", "b0", "b1"]);
        assert!(m.get(5).is_err());
    }

    #[test]
    fn slice_takes_every_step() {
        let s = TaskSlice::new(Box::new(Count(10, "x")), 1, Some(8), 3).unwrap();
        assert_eq!(s.len(), 3);
        let got: Vec<String> = (0..3).map(|i| text(&s.get(i).unwrap())).collect();
        assert_eq!(got, ["x1", "x4", "x7"]);
    }

    #[test]
    fn smoltalk_rejects_bad_role_order_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("chat.jsonl");
        std::fs::write(
            &p,
            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n\
             {\"messages\":[{\"role\":\"assistant\",\"content\":\"hi\"},{\"role\":\"user\",\"content\":\"yo\"}]}\n",
        )
        .unwrap();
        let err = SmolTalk::load(&p).err().unwrap().to_string();
        assert!(
            err.contains("chat.jsonl") && err.contains("conversation 2"),
            "{err}"
        );
    }

    #[test]
    fn custom_json_accepts_bare_message_arrays() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("identity.jsonl");
        std::fs::write(
            &p,
            "[{\"role\":\"user\",\"content\":\"who are you\"},{\"role\":\"assistant\",\"content\":\"nanochat\"}]\n",
        )
        .unwrap();
        let t = CustomJson::load(&p).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(0).unwrap().conversation.messages.len(), 2);
    }
}
