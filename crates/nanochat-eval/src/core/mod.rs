//! CORE (DCLM) in-context-learning evaluation: bundle reading, few-shot rendering, batched
//! scoring, per-task accuracy, centered accuracy and the CORE mean.

pub mod bundle;
pub mod custom;
pub mod items;
pub mod render;

use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use items::{CoreItem, FieldNames, TaskSpec, TaskType};
use render::ScoredSequences;

use crate::jsonl::read_jsonl;
use crate::model::{row_losses_and_argmax, EvalTokenizer, LogProbModel};
use crate::pyrandom::PyRandom;
use crate::results::{ItemResult, SkippedItem};
use crate::{EvalError, Result};

/// Seed of the per-task shuffle (`random.Random(1337)` in the reference).
pub const SHUFFLE_SEED: u64 = 1337;
/// Few-shot examples of item `i` come from `random.Random(FEWSHOT_SEED_BASE + i)`.
pub const FEWSHOT_SEED_BASE: u64 = 1234;

/// A task's items after parsing: valid items with their source line, and the skipped ones.
#[derive(Debug, Clone)]
pub struct LoadedTask {
    /// The task's settings.
    pub spec: TaskSpec,
    /// `(1-based source line, item)` in file order.
    pub items: Vec<(usize, CoreItem)>,
    /// Lines that were reported and skipped.
    pub skipped: Vec<SkippedItem>,
}

/// Read and validate a task's data file. Malformed lines are skipped and reported; a file that
/// cannot be read at all is an error.
pub fn load_task(spec: &TaskSpec) -> Result<LoadedTask> {
    let lines = read_jsonl(&spec.data_path)?;
    let mut items = Vec::with_capacity(lines.len());
    let mut skipped = Vec::new();
    for l in lines {
        let parsed = l
            .value
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| CoreItem::from_json(&v, spec.task_type, &spec.fields));
        match parsed {
            Ok(item) => items.push((l.line, item)),
            Err(reason) => {
                tracing::warn!(task = %spec.label, line = l.line, %reason, "skipping malformed item");
                skipped.push(SkippedItem {
                    task: spec.label.clone(),
                    line: l.line,
                    reason,
                });
            }
        }
    }
    Ok(LoadedTask {
        spec: spec.clone(),
        items,
        skipped,
    })
}

/// Options controlling a CORE run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoreOptions {
    /// Evaluate at most this many items per task (after the shuffle); `None` = all.
    pub max_per_task: Option<usize>,
    /// Target number of sequences per model forward (options of several items are packed).
    pub batch_rows: usize,
    /// Cap on `rows * padded_len` per forward, bounding logits memory.
    pub max_batch_tokens: usize,
    /// How rows are scored (default: measure both, keep the faster).
    #[serde(default)]
    pub scoring: ScoringPath,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            max_per_task: None,
            batch_rows: 16,
            max_batch_tokens: 16_384,
            scoring: ScoringPath::Auto,
        }
    }
}

/// The two ways to get the logits CORE needs; both give the same decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoringPath {
    /// Time one group each way per task, then use the faster.
    #[default]
    Auto,
    /// One right-padded forward per group ([`LogProbModel::logits`]).
    Padded,
    /// Shared prefix once per item, then the tails ([`LogProbModel::tail_logits`]); falls
    /// back to padded when the model does not support it.
    Tails,
}

/// Score of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    /// Task label.
    pub label: String,
    /// Task type.
    pub task_type: TaskType,
    /// Few-shot examples per prompt.
    pub num_fewshot: usize,
    /// Random baseline in percent.
    pub random_baseline: f64,
    /// Items evaluated.
    pub items: usize,
    /// Items answered correctly.
    pub correct: usize,
    /// Items that could not be evaluated (counted as wrong; see `ItemResult::error`).
    pub errors: usize,
    /// Malformed lines skipped before evaluation.
    pub skipped: usize,
    /// `correct / items`.
    pub accuracy: f64,
    /// `(accuracy - b) / (1 - b)` with `b = random_baseline / 100`.
    pub centered: f64,
    /// Wall time of the task in seconds: telemetry, so not serialized into the artifact (the
    /// stage writes it to the run directory).
    #[serde(default, skip_serializing)]
    pub seconds: f64,
    /// Caveat (e.g. partial data) to print next to the score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `(acc - b) / (1 - b)` with the baseline given in percent, as `base_eval.py` computes it.
pub fn centered_accuracy(accuracy: f64, random_baseline_percent: f64) -> f64 {
    let b = 0.01 * random_baseline_percent;
    (accuracy - b) / (1.0 - b)
}

/// The option with the lowest mean loss, with Python's `min` semantics: a NaN mean (an empty
/// answer span) wins only when it is the first option, because nothing compares less than NaN
/// and NaN never compares less than the running minimum.
pub fn pick_option(mean_losses: &[f64]) -> usize {
    let mut best = 0;
    for i in 1..mean_losses.len() {
        if mean_losses[i] < mean_losses[best] {
            best = i;
        }
    }
    best
}

/// Prepared work for one item.
struct Prepared {
    index: usize,
    seqs: std::result::Result<ScoredSequences, String>,
    fewshot: Vec<usize>,
    gold: Option<usize>,
}

/// The item order and few-shot choices of a task: shuffle with seed 1337, crop to
/// `max_per_task`, then for item `i` sample `num_fewshot` other items with seed `1234 + i`.
pub fn plan_task(
    items: &[(usize, CoreItem)],
    num_fewshot: usize,
    max_per_task: Option<usize>,
) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut order: Vec<usize> = (0..items.len()).collect();
    PyRandom::new(SHUFFLE_SEED).shuffle(&mut order);
    if let Some(m) = max_per_task {
        order.truncate(m);
    }
    let n = order.len();
    let fewshot = (0..n)
        .map(|idx| {
            if num_fewshot == 0 {
                return Vec::new();
            }
            let available: Vec<usize> = (0..n).filter(|&i| i != idx).collect();
            PyRandom::new(FEWSHOT_SEED_BASE + idx as u64)
                .sample(&available, num_fewshot.min(available.len()))
                .unwrap_or_default()
        })
        .collect();
    (order, fewshot)
}

/// Evaluate one loaded task. Returns the score and one result per evaluated item.
pub fn evaluate_task(
    model: &dyn LogProbModel,
    tokenizer: &dyn EvalTokenizer,
    task: &LoadedTask,
    opts: &CoreOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(TaskScore, Vec<ItemResult>)> {
    let started = Instant::now();
    let spec = &task.spec;
    if task.items.is_empty() {
        return Err(EvalError::EmptyTask {
            task: spec.label.clone(),
            reason: format!("{} lines skipped", task.skipped.len()),
        });
    }
    let (order, fewshot) = plan_task(&task.items, spec.num_fewshot, opts.max_per_task);
    let data: Vec<&CoreItem> = order.iter().map(|&i| &task.items[i].1).collect();
    let delim = spec.continuation_delimiter.as_str();
    let max_len = model.max_seq_len();

    let prepare = |idx: usize| -> Prepared {
        let shots: Vec<&CoreItem> = fewshot[idx].iter().map(|&j| data[j]).collect();
        let prompts = render::render_prompts(data[idx], delim, &shots);
        let seqs = render::tokenize_spans(tokenizer, data[idx], &prompts).and_then(|mut s| {
            if let Some(m) = max_len {
                render::crop_left(&mut s, m)?;
            }
            Ok(s)
        });
        Prepared {
            index: idx,
            seqs,
            fewshot: fewshot[idx].clone(),
            gold: data[idx].gold(),
        }
    };

    let mut results: Vec<Option<ItemResult>> = (0..data.len()).map(|_| None).collect();
    let mut pending: Vec<Prepared> = Vec::new();
    let mut pending_rows = 0usize;
    let mut pending_max_len = 0usize;

    let mut chooser = PathChooser {
        forced: match opts.scoring {
            ScoringPath::Auto => None,
            ScoringPath::Padded => Some(false),
            ScoringPath::Tails => Some(true),
        },
        ..Default::default()
    };
    let mut flush =
        |pending: &mut Vec<Prepared>, results: &mut Vec<Option<ItemResult>>| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let tokens: usize = pending
                .iter()
                .filter_map(|p| p.seqs.as_ref().ok())
                .flat_map(|s| s.tokens.iter().map(Vec::len))
                .sum();
            let try_tails = chooser.try_tails();
            let t0 = Instant::now();
            let (outcomes, used_tails) = score_group(
                model,
                tokenizer.bos_id(),
                spec.task_type,
                pending,
                try_tails,
            )?;
            chooser.record(
                try_tails,
                used_tails,
                t0.elapsed().as_secs_f64() / tokens.max(1) as f64,
            );
            for (p, outcome) in pending.drain(..).zip(outcomes) {
                let item = data[p.index];
                let (line, _) = &task.items[order[p.index]];
                results[p.index] = Some(ItemResult {
                    task: spec.label.clone(),
                    index: p.index,
                    line: *line,
                    prompt: render::item_text(item, delim),
                    fewshot: p.fewshot,
                    expected: item.expected(),
                    got: outcome.got,
                    correct: outcome.correct,
                    scores: outcome.scores,
                    error: outcome.error,
                });
                if let Some(pb) = progress {
                    pb.inc(1);
                }
            }
            Ok(())
        };

    for idx in 0..data.len() {
        let p = prepare(idx);
        let (rows, len) = match &p.seqs {
            Ok(s) => (
                s.tokens.len(),
                s.tokens.iter().map(Vec::len).max().unwrap_or(0),
            ),
            Err(_) => (0, 0),
        };
        let new_max = pending_max_len.max(len);
        if !pending.is_empty()
            && (pending_rows + rows > opts.batch_rows.max(1)
                || (pending_rows + rows) * new_max > opts.max_batch_tokens)
        {
            flush(&mut pending, &mut results)?;
            pending_rows = 0;
            pending_max_len = 0;
        }
        pending_rows += rows;
        pending_max_len = pending_max_len.max(len);
        pending.push(p);
    }
    flush(&mut pending, &mut results)?;

    let results: Vec<ItemResult> = results.into_iter().flatten().collect();
    let correct = results.iter().filter(|r| r.correct).count();
    let errors = results.iter().filter(|r| r.error.is_some()).count();
    let accuracy = correct as f64 / results.len() as f64;
    let score = TaskScore {
        label: spec.label.clone(),
        task_type: spec.task_type,
        num_fewshot: spec.num_fewshot,
        random_baseline: spec.random_baseline,
        items: results.len(),
        correct,
        errors,
        skipped: task.skipped.len(),
        accuracy,
        centered: centered_accuracy(accuracy, spec.random_baseline),
        seconds: started.elapsed().as_secs_f64(),
        note: spec.note.clone(),
    };
    Ok((score, results))
}

struct Outcome {
    correct: bool,
    got: String,
    scores: Vec<f64>,
    error: Option<String>,
}

/// Where each row's scored tokens come from: one padded forward, or per-row tails after a
/// shared prefix (see [`LogProbModel::tail_logits`]).
enum GroupLogits {
    /// Per row (in group order): the logits of positions `first..` (those the row's scored
    /// tokens need, or everything after a shared prefix) and `first`.
    Tails(Vec<(crate::model::LogitsBatch, usize)>),
}

impl GroupLogits {
    /// Losses and argmax of `row` for the tokens at `start..end` of `toks`.
    fn score(&self, row: usize, toks: &[u32], start: usize, end: usize) -> (Vec<f64>, Vec<u32>) {
        match self {
            GroupLogits::Tails(tails) => {
                let (l, shared) = &tails[row];
                row_losses_and_argmax(
                    l,
                    0,
                    start - 1 - shared..end - 1 - shared,
                    &toks[start..end],
                )
            }
        }
    }
}

/// How many leading tokens the rows of an item can share without losing a scored position:
/// their common prefix, but never past the position before the first scored token.
fn shareable_prefix(seqs: &ScoredSequences) -> usize {
    let first = &seqs.tokens[0];
    let mut common = first.len();
    for t in &seqs.tokens[1..] {
        common = common.min(first.iter().zip(t).take_while(|(a, b)| a == b).count());
    }
    let first_scored = seqs.starts.iter().copied().min().unwrap_or(0);
    common.min(first_scored.saturating_sub(1))
}

/// One batched model call over the rows of several items, then per-item decisions.
fn score_group(
    model: &dyn LogProbModel,
    pad: u32,
    task_type: TaskType,
    group: &[Prepared],
    try_tails: bool,
) -> Result<(Vec<Outcome>, bool)> {
    let items: Vec<&ScoredSequences> = group.iter().filter_map(|p| p.seqs.as_ref().ok()).collect();
    let rows: Vec<&Vec<u32>> = items.iter().flat_map(|s| s.tokens.iter()).collect();
    let logits = if rows.is_empty() {
        None
    } else {
        let shared: Vec<crate::model::SharedPrefix<'_>> = items
            .iter()
            .map(|s| crate::model::SharedPrefix {
                rows: s.tokens.iter().map(Vec::as_slice).collect(),
                shared: shareable_prefix(s),
            })
            .collect();
        let tails = if try_tails {
            model.tail_logits(&shared)?
        } else {
            None
        };
        match tails {
            Some(per_group) => {
                let mut tails = Vec::with_capacity(rows.len());
                for (g, per_row) in shared.iter().zip(per_group) {
                    for (r, data) in g.rows.iter().zip(per_row) {
                        let n = r.len() - g.shared;
                        if n == 0 || data.len() % n != 0 || data.is_empty() {
                            return Err(EvalError::Model(format!(
                                "tail logits: {} values for {n} positions",
                                data.len()
                            )));
                        }
                        let vocab = data.len() / n;
                        tails.push((
                            crate::model::LogitsBatch {
                                batch: 1,
                                seq_len: n,
                                vocab,
                                data,
                            },
                            g.shared,
                        ));
                    }
                }
                if tails.len() != rows.len() {
                    return Err(EvalError::Model(format!(
                        "tail logits for {} rows, expected {}",
                        tails.len(),
                        rows.len()
                    )));
                }
                Some(GroupLogits::Tails(tails))
            }
            None => {
                let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
                let mut flat = vec![pad; rows.len() * seq_len];
                for (i, r) in rows.iter().enumerate() {
                    flat[i * seq_len..i * seq_len + r.len()].copy_from_slice(r);
                }
                // Only the positions that predict a scored token: row (item, option k) needs
                // starts[k] - 1 .. ends[k] - 1. Scored as tails starting at that position.
                let mut spans: Vec<(usize, usize)> = Vec::with_capacity(rows.len());
                for s in &items {
                    for (&a, &e) in s.starts.iter().zip(&s.ends) {
                        if a == 0 || e < a {
                            return Err(EvalError::Invalid(format!(
                                "scored span {a}..{e}: the first scored token needs a token before it"
                            )));
                        }
                        spans.push((a - 1, e - 1));
                    }
                }
                let positions: Vec<usize> = spans
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &(from, to))| (from..to).map(move |p| i * seq_len + p))
                    .collect();
                let data = model.logits_at(&flat, rows.len(), seq_len, &positions)?;
                let vocab = if positions.is_empty() {
                    0
                } else {
                    data.len() / positions.len()
                };
                if data.len() != positions.len() * vocab || vocab == 0 {
                    return Err(EvalError::Model(format!(
                        "logits_at: {} values for {} positions",
                        data.len(),
                        positions.len()
                    )));
                }
                let mut tails = Vec::with_capacity(rows.len());
                let mut at = 0usize;
                for &(from, to) in &spans {
                    let n = to - from;
                    let batch = crate::model::LogitsBatch {
                        batch: 1,
                        seq_len: n,
                        vocab,
                        data: data[at * vocab..(at + n) * vocab].to_vec(),
                    };
                    tails.push((batch, from));
                    at += n;
                }
                Some(GroupLogits::Tails(tails))
            }
        }
    };
    let mut row = 0usize;
    let mut out = Vec::with_capacity(group.len());
    for p in group {
        let seqs = match &p.seqs {
            Ok(s) => s,
            Err(e) => {
                out.push(Outcome {
                    correct: false,
                    got: String::new(),
                    scores: Vec::new(),
                    error: Some(e.clone()),
                });
                continue;
            }
        };
        let Some(logits) = logits.as_ref() else {
            return Err(EvalError::Invalid("no rows to score".into()));
        };
        let mut mean_losses = Vec::with_capacity(seqs.tokens.len());
        let mut lm_correct = true;
        for (k, toks) in seqs.tokens.iter().enumerate() {
            let (s, e) = (seqs.starts[k], seqs.ends[k]);
            let (losses, argmax) = logits.score(row, toks, s, e);
            let mean = if losses.is_empty() {
                f64::NAN
            } else {
                losses.iter().sum::<f64>() / losses.len() as f64
            };
            mean_losses.push(mean);
            if task_type == TaskType::LanguageModeling {
                lm_correct = argmax.as_slice() == &toks[s..e];
            }
            row += 1;
        }
        let outcome = match task_type {
            TaskType::LanguageModeling => Outcome {
                correct: lm_correct,
                got: if lm_correct { "exact" } else { "mismatch" }.into(),
                scores: mean_losses,
                error: None,
            },
            TaskType::MultipleChoice | TaskType::Schema => {
                let pred = pick_option(&mean_losses);
                Outcome {
                    correct: Some(pred) == p.gold,
                    got: pred.to_string(),
                    scores: mean_losses,
                    error: None,
                }
            }
        };
        out.push(outcome);
    }
    let used_tails = matches!(logits, Some(GroupLogits::Tails(_)));
    Ok((out, used_tails))
}

/// Picks, per task, the faster of the two scoring paths (padded forward or cached tails): the
/// first [`PathChooser::TRIALS`] groups of each path alternate (padded first), then the rest go
/// to the path with the lower best time per row token (the minimum, because other load on
/// the machine only ever adds time). Which path wins depends on the model and the task
/// (prefix length vs. number of options vs. vocabulary size), and both give the same decisions
/// (`cached_tails_match_the_padded_forward`), so measuring is simplest.
#[derive(Debug, Default)]
struct PathChooser {
    forced: Option<bool>,
    padded: Vec<f64>,
    tails: Vec<f64>,
    tails_unsupported: bool,
}

impl PathChooser {
    const TRIALS: usize = 2;

    fn try_tails(&self) -> bool {
        if self.tails_unsupported {
            return false;
        }
        if let Some(f) = self.forced {
            return f;
        }
        if self.padded.len() < Self::TRIALS || self.tails.len() < Self::TRIALS {
            return self.tails.len() < self.padded.len();
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        best(&self.tails) < best(&self.padded)
    }

    fn record(&mut self, tried_tails: bool, used_tails: bool, secs_per_token: f64) {
        if tried_tails && !used_tails {
            self.tails_unsupported = true;
        }
        let v = if used_tails {
            &mut self.tails
        } else {
            &mut self.padded
        };
        if v.len() < Self::TRIALS {
            v.push(secs_per_token);
        }
    }
}
