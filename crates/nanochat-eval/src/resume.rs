//! Crash resume for the eval stage: every finished task (a CORE task, a custom task, bits per
//! byte, a chat task) is checkpointed into the stage's `--work` directory, and a rerun of the
//! stage reuses the checkpoints whose key still matches instead of evaluating again.
//!
//! A checkpoint is two files under `<work>/tasks/`: `<slug>.results.jsonl` (the per-item
//! results) and `<slug>.json` (the key, the score, the skipped lines and a little extra state).
//! Both are written atomically, results first, so a `.json` that parses always has complete
//! results beside it. The key is the sha256 of the model's fingerprint (hashes of its weight,
//! config and tokenizer files) and of everything that decides the task's outcome (task settings,
//! the hash of its data file, item limit, generation budget, sandbox limits). Anything else (a
//! different model, a changed config, edited data, another checkpoint format) gives another key,
//! and the task is evaluated again. Batch sizes and thread counts are left out: they do not
//! change results.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::results::{write_jsonl, ItemResult, SkippedItem};
use crate::{EvalError, Result};
use nanochat_artifacts::write_atomic;

/// Bump when the checkpoint format or the meaning of a score changes: old checkpoints are then
/// ignored, never misread.
pub const CHECKPOINT_SCHEMA: u32 = 1;

/// Test hook: after this many tasks have been checkpointed in one run, the stage fails as if
/// it had crashed (used by the resume tests; never set it otherwise).
pub const ABORT_AFTER_TASKS_ENV: &str = "NANOCHAT_EVAL_TEST_ABORT_AFTER_TASKS";

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint<S> {
    schema: u32,
    key: String,
    task: String,
    score: S,
    skipped: Vec<SkippedItem>,
    #[serde(default)]
    extra: serde_json::Value,
}

/// A task restored from its checkpoint.
#[derive(Debug, Clone)]
pub struct Restored<S> {
    /// The task's score as first computed (its wall time is telemetry, not checkpointed: 0).
    pub score: S,
    /// Its per-item results.
    pub results: Vec<ItemResult>,
    /// Its malformed lines.
    pub skipped: Vec<SkippedItem>,
    /// Task-specific state saved with it.
    pub extra: serde_json::Value,
}

/// The checkpoints of one eval stage run.
#[derive(Debug)]
pub struct TaskCheckpoints {
    dir: Option<PathBuf>,
    model_fingerprint: String,
    abort_after: Option<usize>,
    saved: usize,
    /// Tasks restored from checkpoints in this run, in order.
    pub restored: Vec<String>,
}

fn slug(task: &str) -> String {
    task.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl TaskCheckpoints {
    /// Checkpoints under `<work>/tasks`. Without a work dir, or without a model fingerprint
    /// (nothing to tell models apart), nothing is saved or restored.
    pub fn new(work: Option<&Path>, model_fingerprint: &str) -> Result<Self> {
        let dir = match work {
            Some(w) if !model_fingerprint.is_empty() => {
                let d = w.join("tasks");
                std::fs::create_dir_all(&d).map_err(|e| EvalError::io(&d, e))?;
                Some(d)
            }
            _ => None,
        };
        let abort_after = std::env::var(ABORT_AFTER_TASKS_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        Ok(TaskCheckpoints {
            dir,
            model_fingerprint: model_fingerprint.to_string(),
            abort_after,
            saved: 0,
            restored: Vec::new(),
        })
    }

    /// Whether checkpoints are kept at all.
    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// The key of a task: sha256 over the schema, the model and `task_config`.
    pub fn key(&self, task_config: &serde_json::Value) -> String {
        let doc = serde_json::json!({
            "schema": CHECKPOINT_SCHEMA,
            "model": self.model_fingerprint,
            "task": task_config,
        });
        nanochat_artifacts::sha256_hex(doc.to_string().as_bytes())
    }

    fn paths(&self, kind: &str, task: &str) -> Option<(PathBuf, PathBuf)> {
        let dir = self.dir.as_ref()?;
        let base = format!("{kind}-{}", slug(task));
        Some((
            dir.join(format!("{base}.json")),
            dir.join(format!("{base}.results.jsonl")),
        ))
    }

    /// The checkpoint of `task` if it exists, parses and has `key`; anything else (missing,
    /// stale, unreadable) is logged and means "evaluate again".
    pub fn restore<S: DeserializeOwned>(
        &mut self,
        kind: &str,
        task: &str,
        key: &str,
    ) -> Option<Restored<S>> {
        let (meta, results) = self.paths(kind, task)?;
        let text = std::fs::read_to_string(&meta).ok()?;
        let cp: Checkpoint<S> = match serde_json::from_str(&text) {
            Ok(cp) => cp,
            Err(e) => {
                tracing::warn!(task, path = %meta.display(), error = %e, "unreadable checkpoint; evaluating again");
                return None;
            }
        };
        if cp.schema != CHECKPOINT_SCHEMA || cp.key != key {
            tracing::info!(
                task,
                "checkpoint is for another model or task config; evaluating again"
            );
            return None;
        }
        let lines = match std::fs::read_to_string(&results) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(task, path = %results.display(), error = %e, "checkpoint results missing; evaluating again");
                return None;
            }
        };
        let mut items = Vec::new();
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<ItemResult>(line) {
                Ok(r) => items.push(r),
                Err(e) => {
                    tracing::warn!(task, path = %results.display(), error = %e, "corrupt checkpoint results; evaluating again");
                    return None;
                }
            }
        }
        tracing::info!(task, items = items.len(), "restored from the work dir");
        self.restored.push(task.to_string());
        Some(Restored {
            score: cp.score,
            results: items,
            skipped: cp.skipped,
            extra: cp.extra,
        })
    }

    /// Checkpoint a finished task (results first, then the metadata, both atomically).
    #[allow(clippy::too_many_arguments)]
    pub fn save<S: Serialize>(
        &mut self,
        kind: &str,
        task: &str,
        key: &str,
        score: &S,
        results: &[ItemResult],
        skipped: &[SkippedItem],
        extra: serde_json::Value,
    ) -> Result<()> {
        let Some((meta, results_path)) = self.paths(kind, task) else {
            return Ok(());
        };
        write_jsonl(&results_path, results)?;
        let cp = Checkpoint {
            schema: CHECKPOINT_SCHEMA,
            key: key.to_string(),
            task: task.to_string(),
            score,
            skipped: skipped.to_vec(),
            extra,
        };
        write_atomic(&meta, serde_json::to_string_pretty(&cp)?.as_bytes())?;
        self.saved += 1;
        if self.abort_after.is_some_and(|n| self.saved >= n) {
            return Err(EvalError::Invalid(format!(
                "{ABORT_AFTER_TASKS_ENV}: stopping after {} checkpointed task(s) (test hook)",
                self.saved
            )));
        }
        Ok(())
    }
}

/// sha256 of a file, or a marker that makes the key differ when it cannot be read (the task
/// itself then reports the real error).
pub fn file_digest(path: &Path) -> String {
    match nanochat_artifacts::sha256_file(path) {
        Ok((hex, _)) => hex,
        Err(_) => format!("unreadable:{}", path.display()),
    }
}
