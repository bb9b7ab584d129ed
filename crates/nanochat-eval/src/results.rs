//! Per-item results, skipped items and the failure summary saved in the eval artifact.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Result;

/// A data line that was not evaluated because it is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedItem {
    /// Task label.
    pub task: String,
    /// 1-based line in the task's data file.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The outcome of one evaluated item, saved for debugging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// Task label.
    pub task: String,
    /// Position in evaluation order (after the shuffle).
    pub index: usize,
    /// 1-based line in the task's data file.
    pub line: usize,
    /// The item's own prompt text (few-shot examples are listed in `fewshot`, not repeated).
    pub prompt: String,
    /// Evaluation-order indices of the few-shot examples used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fewshot: Vec<usize>,
    /// Expected answer.
    pub expected: String,
    /// What the model produced (chosen option index, letter, extracted answer or completion).
    pub got: String,
    /// Whether it counts as correct.
    pub correct: bool,
    /// Per-option mean losses (CORE) or letter logits (categorical), when meaningful.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<f64>,
    /// Why the item could not be evaluated or failed to run (counted as wrong).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counts of failures by kind, over all tasks of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailureSummary {
    /// Malformed lines skipped, per task.
    pub skipped_by_task: BTreeMap<String, usize>,
    /// Items that errored, per error kind (the error text up to its first `:`).
    pub errors_by_kind: BTreeMap<String, usize>,
    /// Wrong answers (no error) per task.
    pub wrong_by_task: BTreeMap<String, usize>,
}

impl FailureSummary {
    /// Add a task's results and skipped lines.
    pub fn add(&mut self, results: &[ItemResult], skipped: &[SkippedItem]) {
        for s in skipped {
            *self.skipped_by_task.entry(s.task.clone()).or_default() += 1;
        }
        for r in results {
            if let Some(e) = &r.error {
                let kind = e.split(':').next().unwrap_or(e).trim().to_string();
                *self.errors_by_kind.entry(kind).or_default() += 1;
            } else if !r.correct {
                *self.wrong_by_task.entry(r.task.clone()).or_default() += 1;
            }
        }
    }

    /// Total skipped lines plus errored items.
    pub fn total_problems(&self) -> usize {
        self.skipped_by_task.values().sum::<usize>() + self.errors_by_kind.values().sum::<usize>()
    }
}

/// Write records as JSONL, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut buf = Vec::new();
    for r in records {
        serde_json::to_writer(&mut buf, r)?;
        buf.push(b'\n');
    }
    Ok(nanochat_artifacts::write_atomic(path, &buf)?)
}
