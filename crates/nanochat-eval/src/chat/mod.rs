//! Chat-model evaluation: ARC-Easy/Challenge and MMLU as categorical tasks (compare the
//! logits of the answer letters), GSM8K, HumanEval and SpellingBee as generative tasks, and
//! ChatCORE over all six.

pub mod gsm8k;
pub mod humaneval;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::jsonl::read_jsonl;
use crate::model::{EvalTokenizer, Generator, LogProbModel};
use crate::pyrandom::PyRandom;
use crate::results::{ItemResult, SkippedItem};
use crate::sandbox::Sandbox;
use crate::{EvalError, Result};

/// Seed of the item shuffle (nanochat shuffles with seed 42 through HF datasets, whose
/// permutation differs; the full-set scores are order independent).
pub const CHAT_SHUFFLE_SEED: u64 = 42;

/// The tasks of nanochat's `chat_eval.py` (48abd7d), in its order, with their ChatCORE
/// baselines: 0.25 for the 4-way multiple choice tasks, 0 for the generative ones.
pub const CHAT_TASKS: [(&str, f64); 6] = [
    ("ARC-Easy", 0.25),
    ("ARC-Challenge", 0.25),
    ("MMLU", 0.25),
    ("GSM8K", 0.0),
    ("HumanEval", 0.0),
    ("SpellingBee", 0.0),
];

/// Items of the SpellingBee evaluation (`SpellingBee(size=256, split="test")` in nanochat).
pub const SPELLING_BEE_SIZE: usize = 256;

/// The random-guess accuracy of a chat task (0 for generative and unknown tasks).
pub fn chat_baseline(task: &str) -> f64 {
    CHAT_TASKS
        .iter()
        .find(|(t, _)| *t == task)
        .map(|(_, b)| *b)
        .unwrap_or(0.0)
}

/// What kind of answer an item expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatKind {
    /// Pick one of `letters`; correct when it equals `answer`.
    Categorical {
        /// Answer letters offered (`A`..`D`, or ARC's `1`..`4`).
        letters: Vec<String>,
        /// The right letter.
        answer: String,
    },
    /// Generate a solution whose `#### N` equals `answer`.
    Gsm8k {
        /// The reference number.
        answer: String,
    },
    /// Generate a letter count whose `#### N` equals `answer` (graded as GSM8K).
    SpellingBee {
        /// The count.
        answer: String,
    },
    /// Generate code that passes `test`.
    HumanEval {
        /// `HumanEval/<n>`.
        task_id: String,
        /// The function prompt (also the user message).
        prompt: String,
        /// The test code defining `check`.
        test: String,
        /// The function `check` is called with.
        entry_point: String,
    },
}

/// One chat evaluation item: the user message and what counts as right.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatItem {
    /// 1-based line in the source file.
    pub line: usize,
    /// The user message.
    pub user: String,
    /// Expected answer.
    pub kind: ChatKind,
}

/// nanochat's multiple-choice user message: choices listed as `- text=L`, letter after the text
/// and with no space before it (so the prompt has the same letter token as the answer).
pub fn render_mc(question: &str, letters: &[String], choices: &[String]) -> String {
    let mut s = format!("Multiple Choice question: {question}\n");
    for (l, c) in letters.iter().zip(choices) {
        s.push_str(&format!("- {c}={l}\n"));
    }
    s.push_str("\nRespond only with the letter of the correct answer.");
    s
}

/// A loaded chat task.
#[derive(Debug, Clone)]
pub struct ChatTask {
    /// Task name (`ARC-Easy`, `MMLU`, ...).
    pub name: String,
    /// Items in evaluation order.
    pub items: Vec<ChatItem>,
    /// Malformed lines.
    pub skipped: Vec<SkippedItem>,
    /// Items removed on purpose (e.g. GSM8K rows overlapping the training data).
    pub excluded: usize,
}

fn str_field<'a>(v: &'a serde_json::Value, name: &str) -> std::result::Result<&'a str, String> {
    v.get(name)
        .and_then(|x| x.as_str())
        .ok_or_else(|| format!("missing string field `{name}`"))
}

fn str_list(v: &serde_json::Value, name: &str) -> std::result::Result<Vec<String>, String> {
    v.as_array()
        .ok_or_else(|| format!("`{name}` must be a list"))?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{name}` must hold strings"))
        })
        .collect()
}

fn parse_arc(v: &serde_json::Value) -> std::result::Result<ChatItem, String> {
    let question = str_field(v, "question")?;
    let choices = v.get("choices").ok_or("missing field `choices`")?;
    let texts = str_list(choices.get("text").ok_or("missing `choices.text`")?, "text")?;
    let labels = str_list(
        choices.get("label").ok_or("missing `choices.label`")?,
        "label",
    )?;
    if texts.len() != labels.len() || texts.is_empty() {
        return Err("`choices.text` and `choices.label` differ in length or are empty".into());
    }
    let answer = str_field(v, "answerKey")?.to_string();
    if !labels.contains(&answer) {
        return Err(format!("answerKey {answer:?} is not one of {labels:?}"));
    }
    Ok(ChatItem {
        line: 0,
        user: render_mc(question, &labels, &texts),
        kind: ChatKind::Categorical {
            letters: labels,
            answer,
        },
    })
}

fn parse_mmlu(v: &serde_json::Value) -> std::result::Result<ChatItem, String> {
    let question = str_field(v, "question")?;
    let choices = str_list(
        v.get("choices").ok_or("missing field `choices`")?,
        "choices",
    )?;
    if choices.len() != 4 {
        return Err(format!("MMLU needs 4 choices, got {}", choices.len()));
    }
    let answer = v
        .get("answer")
        .and_then(|a| a.as_u64())
        .filter(|&a| a < 4)
        .ok_or("`answer` must be an integer in 0..4")? as usize;
    let letters: Vec<String> = ["A", "B", "C", "D"].iter().map(|s| s.to_string()).collect();
    Ok(ChatItem {
        line: 0,
        user: render_mc(question, &letters, &choices),
        kind: ChatKind::Categorical {
            answer: letters[answer].clone(),
            letters,
        },
    })
}

fn parse_gsm8k(v: &serde_json::Value) -> std::result::Result<ChatItem, String> {
    let question = str_field(v, "question")?;
    let solution = str_field(v, "answer")?;
    let answer =
        gsm8k::reference_answer(solution).ok_or("the reference solution has no `#### N` answer")?;
    Ok(ChatItem {
        line: 0,
        user: question.to_string(),
        kind: ChatKind::Gsm8k { answer },
    })
}

fn parse_humaneval(v: &serde_json::Value) -> std::result::Result<ChatItem, String> {
    let prompt = str_field(v, "prompt")?.to_string();
    Ok(ChatItem {
        line: 0,
        user: prompt.clone(),
        kind: ChatKind::HumanEval {
            task_id: str_field(v, "task_id")?.to_string(),
            prompt,
            test: str_field(v, "test")?.to_string(),
            entry_point: str_field(v, "entry_point")?.to_string(),
        },
    })
}

/// Questions of the GSM8K test rows to exclude, from the overlap list's `rows[].question`.
pub fn read_gsm8k_overlap(path: &Path) -> Result<HashSet<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EvalError::config(path, format!("invalid JSON: {e}")))?;
    let rows = v
        .get("rows")
        .and_then(|r| r.as_array())
        .ok_or_else(|| EvalError::config(path, "expected an object with a `rows` list"))?;
    rows.iter()
        .map(|r| {
            r.get("question")
                .and_then(|q| q.as_str())
                .map(str::to_string)
                .ok_or_else(|| EvalError::config(path, "every row needs a `question` string"))
        })
        .collect()
}

/// File name (under the eval data dir) of each known chat task.
pub fn task_file(name: &str) -> Option<&'static str> {
    Some(match name {
        "ARC-Easy" => "arc_easy_test.jsonl.gz",
        "ARC-Challenge" => "arc_challenge_test.jsonl.gz",
        "MMLU" => "mmlu_test.jsonl.gz",
        "GSM8K" => "gsm8k_test.jsonl.gz",
        "HumanEval" => "humaneval.jsonl.gz",
        _ => return None,
    })
}

/// Load a chat task from `path`. `exclude_questions` drops GSM8K rows by question text.
/// Items are shuffled with [`CHAT_SHUFFLE_SEED`] and cropped to `max_items`.
pub fn load_chat_task(
    name: &str,
    path: &Path,
    exclude_questions: Option<&HashSet<String>>,
    max_items: Option<usize>,
) -> Result<ChatTask> {
    let parse: fn(&serde_json::Value) -> std::result::Result<ChatItem, String> = match name {
        "ARC-Easy" | "ARC-Challenge" => parse_arc,
        "MMLU" => parse_mmlu,
        "GSM8K" => parse_gsm8k,
        "HumanEval" => parse_humaneval,
        other => {
            let known = "ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval";
            return Err(EvalError::Invalid(format!(
                "unknown chat task {other:?} (known: {known})"
            )));
        }
    };
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    let mut excluded = 0;
    for l in read_jsonl(path)? {
        let parsed = l
            .value
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| {
                if let Some(ex) = exclude_questions {
                    if v.get("question")
                        .and_then(|q| q.as_str())
                        .is_some_and(|q| ex.contains(q))
                    {
                        return Ok(None);
                    }
                }
                parse(&v).map(Some)
            });
        match parsed {
            Ok(Some(mut item)) => {
                item.line = l.line;
                items.push(item);
            }
            Ok(None) => excluded += 1,
            Err(reason) => {
                tracing::warn!(task = name, line = l.line, %reason, "skipping malformed item");
                skipped.push(SkippedItem {
                    task: name.to_string(),
                    line: l.line,
                    reason,
                });
            }
        }
    }
    PyRandom::new(CHAT_SHUFFLE_SEED).shuffle(&mut items);
    if let Some(m) = max_items {
        items.truncate(m);
    }
    Ok(ChatTask {
        name: name.to_string(),
        items,
        skipped,
        excluded,
    })
}

/// SpellingBee's test split as nanochat evaluates it: items `0..size` of
/// `SpellingBee(split="test")` over the word list at `words`, in index order (the reference
/// does not shuffle it), cropped to `max_items`. The rendering is
/// [`nanochat_data::tasks::SpellingBee`], a bit-exact port of nanochat's generator.
pub fn load_spelling_bee(words: &Path, size: usize, max_items: Option<usize>) -> Result<ChatTask> {
    use nanochat_data::tasks::{SpellingBee, SpellingSplit, Task};
    use nanochat_tokenizer::chat::Content;
    let task = SpellingBee::load(words, size, SpellingSplit::Test)
        .map_err(|e| EvalError::config(words, e.to_string()))?;
    let n = max_items.map_or(size, |m| m.min(size));
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        let ex = task
            .get(i)
            .map_err(|e| EvalError::Invalid(format!("SpellingBee item {i}: {e}")))?;
        let user = match ex.conversation.messages.first().map(|m| &m.content) {
            Some(Content::Text(t)) => t.clone(),
            _ => {
                return Err(EvalError::Invalid(format!(
                    "SpellingBee item {i}: the first message is not plain user text"
                )))
            }
        };
        // The reference grades against the `#### N` of the solution's last text part.
        let answer = match ex.conversation.messages.last().map(|m| &m.content) {
            Some(Content::Parts(parts)) => {
                parts.last().and_then(|p| gsm8k::extract_answer(&p.text))
            }
            _ => None,
        }
        .ok_or_else(|| {
            EvalError::Invalid(format!(
                "SpellingBee item {i}: the solution has no `#### N`"
            ))
        })?;
        items.push(ChatItem {
            line: i + 1,
            user,
            kind: ChatKind::SpellingBee { answer },
        });
    }
    Ok(ChatTask {
        name: "SpellingBee".into(),
        items,
        skipped: Vec::new(),
        excluded: 0,
    })
}

/// Accuracy of one chat task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatScore {
    /// Task name.
    pub task: String,
    /// Items evaluated.
    pub items: usize,
    /// Correct items.
    pub correct: usize,
    /// Items that errored (counted as wrong).
    pub errors: usize,
    /// Malformed lines skipped.
    pub skipped: usize,
    /// Items excluded on purpose (GSM8K overlap).
    pub excluded: usize,
    /// `correct / items`.
    pub accuracy: f64,
    /// `(accuracy - baseline) / (1 - baseline)`.
    pub centered: f64,
    /// Wall time in seconds: telemetry, so not serialized into the artifact (the stage
    /// writes it to the run directory).
    #[serde(default, skip_serializing)]
    pub seconds: f64,
}

fn finish(task: &ChatTask, results: &[ItemResult], started: Instant) -> ChatScore {
    let correct = results.iter().filter(|r| r.correct).count();
    let accuracy = if results.is_empty() {
        0.0
    } else {
        correct as f64 / results.len() as f64
    };
    let b = chat_baseline(&task.name);
    ChatScore {
        task: task.name.clone(),
        items: results.len(),
        correct,
        errors: results.iter().filter(|r| r.error.is_some()).count(),
        skipped: task.skipped.len(),
        excluded: task.excluded,
        accuracy,
        centered: (accuracy - b) / (1.0 - b),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Categorical evaluation: one forward per batch of prompts, then, at each prompt's last
/// position, the argmax over the logits of the offered letters only. A prompt longer than
/// [`LogProbModel::max_seq_len`] is cropped from the left.
pub fn evaluate_categorical(
    model: &dyn LogProbModel,
    tokenizer: &dyn EvalTokenizer,
    task: &ChatTask,
    batch_size: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(ChatScore, Vec<ItemResult>)> {
    let started = Instant::now();
    let bos = tokenizer.bos_id();
    let mut letter_ids: std::collections::HashMap<String, std::result::Result<u32, String>> =
        Default::default();
    let mut results = Vec::with_capacity(task.items.len());
    let indexed: Vec<(usize, &ChatItem)> = task.items.iter().enumerate().collect();
    for chunk in indexed.chunks(batch_size.max(1)) {
        // Prompts longer than the model accepts keep their last tokens (where the answer letter
        // is read), as CORE crops its prompts.
        let prompts: Vec<Result<Vec<u32>>> = chunk
            .iter()
            .map(|(_, it)| {
                tokenizer.render_chat_prompt(&it.user).map(|mut p| {
                    if let Some(m) = model.max_seq_len().filter(|&m| p.len() > m) {
                        p.drain(..p.len() - m);
                    }
                    p
                })
            })
            .collect();
        let mut prompts_ok: Vec<Vec<u32>> = Vec::new();
        for p in &prompts {
            match p {
                Ok(t) if !t.is_empty() => prompts_ok.push(t.clone()),
                _ => {}
            }
        }
        let seq_len = prompts_ok.iter().map(Vec::len).max().unwrap_or(0);
        let logits = if prompts_ok.is_empty() {
            None
        } else {
            let mut flat = vec![bos; prompts_ok.len() * seq_len];
            for (i, p) in prompts_ok.iter().enumerate() {
                flat[i * seq_len..i * seq_len + p.len()].copy_from_slice(p);
            }
            let l = model.logits(&flat, prompts_ok.len(), seq_len)?;
            l.validate(prompts_ok.len(), seq_len)?;
            Some(l)
        };
        let mut row = 0;
        for ((index, item), prompt) in chunk.iter().zip(&prompts) {
            let ChatKind::Categorical { letters, answer } = &item.kind else {
                return Err(EvalError::Invalid(format!(
                    "{} is not a categorical task",
                    task.name
                )));
            };
            let mut result = ItemResult {
                task: task.name.clone(),
                index: *index,
                line: item.line,
                prompt: item.user.clone(),
                fewshot: Vec::new(),
                expected: answer.clone(),
                got: String::new(),
                correct: false,
                scores: Vec::new(),
                error: None,
            };
            let prompt = match prompt {
                Ok(p) if !p.is_empty() => p,
                Ok(_) => {
                    result.error = Some("render: empty prompt".into());
                    results.push(result);
                    continue;
                }
                Err(e) => {
                    result.error = Some(format!("render: {e}"));
                    results.push(result);
                    continue;
                }
            };
            let logits = logits
                .as_ref()
                .ok_or_else(|| EvalError::Invalid("no logits".into()))?;
            let pos_logits = logits.at(row, prompt.len() - 1);
            row += 1;
            let mut ids = Vec::with_capacity(letters.len());
            for l in letters {
                let id = letter_ids
                    .entry(l.clone())
                    .or_insert_with(|| match tokenizer.encode(l).as_slice() {
                        [one] => Ok(*one),
                        other => Err(format!(
                            "letter: {l:?} encodes to {} tokens, expected exactly 1",
                            other.len()
                        )),
                    })
                    .clone();
                ids.push(id);
            }
            match ids
                .into_iter()
                .collect::<std::result::Result<Vec<u32>, String>>()
            {
                Err(e) => result.error = Some(e),
                Ok(ids) => {
                    let scores: Vec<f64> = ids
                        .iter()
                        .map(|&i| pos_logits.get(i as usize).copied().unwrap_or(f32::NAN) as f64)
                        .collect();
                    let mut best = 0;
                    for i in 1..scores.len() {
                        if scores[i] > scores[best] {
                            best = i;
                        }
                    }
                    result.got = letters[best].clone();
                    result.correct = &letters[best] == answer;
                    result.scores = scores;
                }
            }
            results.push(result);
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok((finish(task, &results, started), results))
}

/// Options of generative evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerativeOptions {
    /// Token budget per completion (nanochat: 512).
    pub max_new_tokens: usize,
    /// Parallel sandboxed executions for HumanEval.
    pub exec_workers: usize,
    /// Prompts handed to the generator at once.
    pub gen_batch: usize,
}

impl Default for GenerativeOptions {
    fn default() -> Self {
        GenerativeOptions {
            max_new_tokens: 512,
            exec_workers: 2,
            gen_batch: 8,
        }
    }
}

/// Generative evaluation: complete each prompt, then grade the completion (GSM8K answer match,
/// or HumanEval tests run in `sandbox`, several programs at once).
pub fn evaluate_generative(
    generator: &dyn Generator,
    tokenizer: &dyn EvalTokenizer,
    task: &ChatTask,
    opts: &GenerativeOptions,
    sandbox: Option<&Sandbox>,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(ChatScore, Vec<ItemResult>)> {
    let started = Instant::now();
    let mut completions: Vec<std::result::Result<String, String>> =
        Vec::with_capacity(task.items.len());
    for chunk in task.items.chunks(opts.gen_batch.max(1)) {
        let prompts: Vec<Result<Vec<u32>>> = chunk
            .iter()
            .map(|item| tokenizer.render_chat_prompt(&item.user))
            .collect();
        let ok: Vec<Vec<u32>> = prompts
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let mut generated = generator
            .generate_batch(&ok, opts.max_new_tokens)?
            .into_iter();
        for p in prompts {
            completions.push(match p {
                Err(e) => Err(format!("render: {e}")),
                Ok(_) => match generated.next() {
                    Some(Ok(ids)) => Ok(tokenizer.decode(&ids)),
                    Some(Err(e)) => Err(format!("generate: {e}")),
                    None => Err("generate: the generator returned too few completions".into()),
                },
            });
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    grade_completions(task, &completions, opts, sandbox)
        .map(|results| (finish(task, &results, started), results))
}

/// Grade given completions (one per item; `Err` = generation failed). Public so graders can be
/// tested, and reused for completions produced elsewhere.
pub fn grade_completions(
    task: &ChatTask,
    completions: &[std::result::Result<String, String>],
    opts: &GenerativeOptions,
    sandbox: Option<&Sandbox>,
) -> Result<Vec<ItemResult>> {
    if completions.len() != task.items.len() {
        return Err(EvalError::Invalid(format!(
            "{} completions for {} items",
            completions.len(),
            task.items.len()
        )));
    }
    let results: Mutex<Vec<Option<ItemResult>>> =
        Mutex::new((0..task.items.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let fatal: Mutex<Option<EvalError>> = Mutex::new(None);
    let grade_one = |i: usize| -> Result<ItemResult> {
        let item = &task.items[i];
        let mut r = ItemResult {
            task: task.name.clone(),
            index: i,
            line: item.line,
            prompt: item.user.clone(),
            fewshot: Vec::new(),
            expected: String::new(),
            got: String::new(),
            correct: false,
            scores: Vec::new(),
            error: None,
        };
        let completion = match &completions[i] {
            Ok(c) => c,
            Err(e) => {
                r.error = Some(e.clone());
                return Ok(r);
            }
        };
        match &item.kind {
            ChatKind::Gsm8k { answer } | ChatKind::SpellingBee { answer } => {
                r.expected = answer.clone();
                let pred = gsm8k::extract_answer(completion);
                r.correct = pred.as_deref() == Some(answer.as_str());
                r.got = completion.clone();
            }
            ChatKind::HumanEval {
                prompt,
                test,
                entry_point,
                task_id,
            } => {
                r.expected = format!("{task_id} passes its tests");
                r.got = completion.clone();
                let sb = sandbox.ok_or_else(|| {
                    EvalError::Invalid("HumanEval needs a sandbox to run code".into())
                })?;
                let program = humaneval::build_program(prompt, completion, test, entry_point);
                let out = sb.execute(&program)?;
                r.correct = out.success;
                r.error = out.error;
            }
            ChatKind::Categorical { .. } => {
                return Err(EvalError::Invalid(format!(
                    "{} is categorical, not generative",
                    task.name
                )))
            }
        }
        Ok(r)
    };
    let workers = opts.exec_workers.clamp(1, 64);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= task.items.len() {
                    break;
                }
                match grade_one(i) {
                    Ok(r) => {
                        if let Ok(mut v) = results.lock() {
                            v[i] = Some(r);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = fatal.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| EvalError::Invalid("a grading thread panicked".into()))?;
    Ok(results.into_iter().flatten().collect())
}

/// ChatCORE: the mean centered accuracy over the given task scores, computed only when every
/// task of [`CHAT_TASKS`] is present (as nanochat requires all six, SpellingBee included).
pub fn chatcore(scores: &[ChatScore]) -> Option<f64> {
    let all = CHAT_TASKS
        .iter()
        .all(|(t, _)| scores.iter().any(|s| s.task == *t));
    if !all || scores.is_empty() {
        return None;
    }
    Some(scores.iter().map(|s| s.centered).sum::<f64>() / scores.len() as f64)
}
