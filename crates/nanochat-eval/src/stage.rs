//! The `eval` pipeline stage, independent of how the model is loaded: configuration, running
//! every requested evaluation, and writing the artifact (`metrics.json`, `summary.md`,
//! `results/<task>.jsonl`, `skipped.jsonl`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bpb::{evaluate_bpb, pack_rows, BpbAccumulator};
use crate::chat::{
    chatcore, evaluate_categorical, evaluate_generative, load_chat_task, load_spelling_bee,
    read_gsm8k_overlap, task_file, ChatKind, ChatScore, GenerativeOptions, CHAT_TASKS,
    SPELLING_BEE_SIZE,
};
use crate::core::{
    bundle::load_bundle, custom::load_custom_task, evaluate_task, load_task, CoreOptions,
    ScoringPath, TaskScore, TaskSpec,
};
use crate::jsonl::read_jsonl;
use crate::model::{EvalTokenizer, Generator, LogProbModel};
use crate::results::{write_jsonl, FailureSummary, ItemResult, SkippedItem};
use crate::resume::{file_digest, TaskCheckpoints};
use crate::sandbox::{Isolation, ProcessLimit, Sandbox, SandboxConfig};
use crate::{EvalError, Result};
use nanochat_artifacts::write_atomic;
use nanochat_model::Device;

/// Which evaluation suite to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// Base model: CORE (+ custom tasks) and bits per byte.
    Base,
    /// Chat model: ARC-Easy/Challenge, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE.
    Chat,
}

/// Whether to drop the GSM8K test rows that `gsm_symbolic_train` was templated from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlapPolicy {
    /// Exclude them when the model's training data includes `gsm_symbolic_train`.
    #[default]
    Auto,
    /// Always exclude them.
    Always,
    /// Never exclude them.
    Never,
}

/// The eval stage's TOML config. Relative paths are relative to the working directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// `base` or `chat`.
    pub mode: EvalMode,
    /// Column of the report's summary table (`base`, `mid`, `sft`); defaults to the mode.
    #[serde(default)]
    pub label: Option<String>,
    /// CORE bundle directory (`core.yaml`, `eval_meta_data.csv`, task files).
    #[serde(default)]
    pub core_dir: Option<PathBuf>,
    /// Directory with the chat tasks' files (`arc_easy_test.jsonl.gz`, ...).
    #[serde(default)]
    pub eval_dir: Option<PathBuf>,
    /// Task names to run; empty = all of the mode's tasks.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Custom CORE-style tasks (TOML files), base mode.
    #[serde(default)]
    pub custom_tasks: Vec<PathBuf>,
    /// At most this many items per task; 0 = all.
    #[serde(default)]
    pub max_per_task: usize,
    /// Sequences per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Cap on padded tokens per forward pass (bounds logits memory).
    #[serde(default = "default_batch_tokens")]
    pub max_batch_tokens: usize,
    /// CORE scoring path: `padded` (default), `tails`, or `auto` (time both per task, keep
    /// the faster: its per-option losses then depend on timing in the last digits, so the
    /// artifact is not bit-reproducible; the decisions are).
    #[serde(default = "default_scoring")]
    pub scoring: ScoringPath,
    /// Validation text (`{"text": ...}` JSONL) for bits per byte, base mode.
    #[serde(default)]
    pub val_data: Option<PathBuf>,
    /// Target tokens for bits per byte; 0 = skip.
    #[serde(default)]
    pub bpb_tokens: usize,
    /// Row length for bits per byte; default: the model's context.
    #[serde(default)]
    pub bpb_seq_len: Option<usize>,
    /// Generation budget for GSM8K / HumanEval.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// Parallel HumanEval executions.
    #[serde(default = "default_workers")]
    pub exec_workers: usize,
    /// The GSM8K overlap list (`gsm8k_test_gsm_symbolic_overlap.json`); default: in `eval_dir`.
    #[serde(default)]
    pub gsm8k_overlap: Option<PathBuf>,
    /// When to exclude the overlapping GSM8K rows.
    #[serde(default)]
    pub exclude_gsm8k_overlap: OverlapPolicy,
    /// SpellingBee's word list (one word per line, `.gz` ok). Default: `words_alpha.txt`
    /// (nanochat's list) in `eval_dir`, else the shared stand-in
    /// `../extra/english_words_web2_gcide_alpha_lower.txt.gz` next to `eval_dir`.
    #[serde(default)]
    pub spelling_words: Option<PathBuf>,
    /// SpellingBee items (nanochat: 256).
    #[serde(default = "default_spelling_bee_size")]
    pub spelling_bee_size: usize,
    /// HumanEval sandbox limits.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Where the model runs: `"cpu"` (default), `"cuda"` (the GPU `LOCAL_RANK` names, else 0)
    /// or `"cuda:N"`; a GPU needs a build with `--features cuda` (docs/gpu.md). Like every key,
    /// part of the stage's fingerprint: a CPU and a GPU evaluation are different artifacts.
    #[serde(default)]
    pub device: Device,
}

fn default_batch() -> usize {
    16
}
fn default_scoring() -> ScoringPath {
    ScoringPath::Padded
}
fn default_batch_tokens() -> usize {
    16_384
}
fn default_new_tokens() -> usize {
    512
}
fn default_workers() -> usize {
    2
}
fn default_spelling_bee_size() -> usize {
    SPELLING_BEE_SIZE
}

/// The SpellingBee word list `cfg` asks for, or the first default that exists.
fn spelling_words(cfg: &EvalConfig, eval_dir: &Path) -> Result<PathBuf> {
    if let Some(p) = &cfg.spelling_words {
        return Ok(p.clone());
    }
    let candidates = [
        eval_dir.join("words_alpha.txt"),
        eval_dir.join("words_alpha.txt.gz"),
        eval_dir.join("../extra/english_words_web2_gcide_alpha_lower.txt.gz"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            EvalError::Invalid(format!(
                "SpellingBee needs a word list: none of {} exists; set `spelling_words` in the \
                 config, or leave SpellingBee out of `tasks` (ChatCORE then is not computed)",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// What the model is and what it was trained on (from its checkpoint metadata).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Free-form description (path, step, depth...).
    pub description: String,
    /// Names or paths of the datasets it trained on (any stage).
    pub trained_on: Vec<String>,
    /// Identity of the weights and tokenizer (e.g. hashes of their files); keys the task
    /// checkpoints of a resumable run. Empty: checkpoints are not used.
    #[serde(default)]
    pub fingerprint: String,
}

/// CORE results inside `metrics.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CoreSection {
    /// Per-task scores, in bundle order.
    pub tasks: Vec<TaskScore>,
    /// Mean centered accuracy over the evaluated bundle tasks.
    pub core_metric: Option<f64>,
    /// Whether every task of the bundle was evaluated on all its items.
    pub complete: bool,
    /// Custom task scores (not part of CORE).
    pub custom: Vec<TaskScore>,
}

/// Chat results inside `metrics.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatSection {
    /// Per-task scores.
    pub tasks: Vec<ChatScore>,
    /// ChatCORE when all six tasks ran.
    pub chatcore: Option<f64>,
    /// Whether GSM8K overlap rows were excluded.
    pub gsm8k_overlap_excluded: bool,
    /// Whether HumanEval ran without network access.
    pub sandbox_network_isolated: Option<bool>,
    /// Which sandbox ran HumanEval's programs (`bubblewrap` or `seatbelt`).
    #[serde(default)]
    pub sandbox_isolation: Option<Isolation>,
    /// What bounded the process count of HumanEval's programs.
    #[serde(default)]
    pub sandbox_process_limit: Option<ProcessLimit>,
}

/// The `metrics.json` of an eval artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Always `"eval"` (the report recognizes eval artifacts by it).
    pub kind: String,
    /// Mode run.
    pub mode: EvalMode,
    /// Summary-table column.
    pub label: String,
    /// Model description.
    pub model: ModelInfo,
    /// CORE (base mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core: Option<CoreSection>,
    /// Bits per byte on the validation text (base mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpb: Option<BpbAccumulatorReport>,
    /// Chat evals (chat mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatSection>,
    /// Failures by kind.
    pub failures: FailureSummary,
    /// `max_per_task` in effect (0 = all).
    pub max_per_task: usize,
    /// Caveats to print next to the scores.
    pub notes: Vec<String>,
    /// Wall time of the whole stage: telemetry, so not serialized into the artifact (see
    /// [`EvalMetrics::timing`]).
    #[serde(default, skip_serializing)]
    pub seconds: f64,
}

impl EvalMetrics {
    /// The wall times of the run (`timing.json` in the stage's run directory): total seconds
    /// and seconds per task. Kept out of `metrics.json` because they differ on every run.
    pub fn timing(&self) -> serde_json::Value {
        let mut tasks = serde_json::Map::new();
        if let Some(core) = &self.core {
            for t in core.tasks.iter().chain(&core.custom) {
                tasks.insert(t.label.clone(), t.seconds.into());
            }
        }
        if let Some(chat) = &self.chat {
            for t in &chat.tasks {
                tasks.insert(t.task.clone(), t.seconds.into());
            }
        }
        serde_json::json!({ "seconds": self.seconds, "tasks": tasks })
    }
}

/// Bits per byte with its totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BpbAccumulatorReport {
    /// Bits per byte.
    pub bpb: f64,
    /// Totals behind it.
    pub totals: BpbAccumulator,
}

/// Everything the stage needs besides its config.
pub struct EvalInputs<'a> {
    /// Scores token sequences (all modes).
    pub model: &'a dyn LogProbModel,
    /// Completes chat prompts (chat mode, GSM8K / HumanEval).
    pub generator: Option<&'a dyn Generator>,
    /// The model's tokenizer.
    pub tokenizer: &'a dyn EvalTokenizer,
    /// Bytes per token id (0 = special) for bits per byte.
    pub token_bytes: Option<&'a [u32]>,
    /// What the model is.
    pub model_info: ModelInfo,
    /// Polled between tasks; `true` stops the run with [`EvalError::Invalid`]("interrupted").
    pub interrupted: &'a dyn Fn() -> bool,
}

fn progress(len: usize, label: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>28} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(label.to_string());
    pb
}

/// One CORE-style task (`kind` "core" for the bundle, "custom" for user tasks) through the
/// work dir's checkpoints: restored when the same model already scored the same task data with
/// the same item cap, else evaluated (with a progress bar) and checkpointed.
fn core_task_checkpointed(
    ckpt: &mut TaskCheckpoints,
    kind: &str,
    spec: &TaskSpec,
    inputs: &EvalInputs<'_>,
    opts: &CoreOptions,
) -> Result<(TaskScore, Vec<ItemResult>, Vec<SkippedItem>)> {
    let key = ckpt.key(&serde_json::json!({
        "kind": kind,
        "spec": spec,
        "data": file_digest(&spec.data_path),
        "max_per_task": opts.max_per_task,
    }));
    if let Some(r) = ckpt.restore::<TaskScore>(kind, &spec.label, &key) {
        return Ok((r.score, r.results, r.skipped));
    }
    let task = load_task(spec)?;
    let shown = opts
        .max_per_task
        .map_or(task.items.len(), |m| m.min(task.items.len()));
    let pb = progress(shown, &spec.label);
    let (score, results) = evaluate_task(inputs.model, inputs.tokenizer, &task, opts, Some(&pb))?;
    pb.finish_and_clear();
    tracing::info!(
        kind,
        task = %score.label,
        accuracy = score.accuracy,
        centered = score.centered,
        seconds = score.seconds,
        "task done"
    );
    ckpt.save(
        kind,
        &spec.label,
        &key,
        &score,
        &results,
        &task.skipped,
        serde_json::Value::Null,
    )?;
    Ok((score, results, task.skipped))
}

/// What task checkpoints are keyed by besides the task: the model's fingerprint and, off the
/// CPU, the kind of device (a GPU's sums run in another order, so its scores may differ in the
/// last digits). CPU keys are the model fingerprint alone, as before devices existed.
fn checkpoint_identity(fingerprint: &str, device: Device) -> String {
    match device {
        _ if fingerprint.is_empty() => String::new(),
        Device::Cpu => fingerprint.to_string(),
        Device::Cuda(_) => format!("{fingerprint} on cuda"),
    }
}

fn check_interrupt(inputs: &EvalInputs<'_>) -> Result<()> {
    if (inputs.interrupted)() {
        return Err(EvalError::Invalid("interrupted".into()));
    }
    Ok(())
}

/// Run the stage and write its artifact into `out_dir`, without checkpoints.
pub fn run_eval(cfg: &EvalConfig, inputs: &EvalInputs<'_>, out_dir: &Path) -> Result<EvalMetrics> {
    run_eval_resumable(cfg, inputs, out_dir, None)
}

/// Run the stage and write its artifact into `out_dir`, checkpointing every finished task into
/// `work_dir` and reusing the checkpoints a previous (interrupted) run left there when they are
/// for the same model and task settings (see [`crate::resume`]). The artifact is the same as
/// an uninterrupted run's (wall times are not part of it).
pub fn run_eval_resumable(
    cfg: &EvalConfig,
    inputs: &EvalInputs<'_>,
    out_dir: &Path,
    work_dir: Option<&Path>,
) -> Result<EvalMetrics> {
    let started = Instant::now();
    let mut ckpt = TaskCheckpoints::new(
        work_dir,
        &checkpoint_identity(&inputs.model_info.fingerprint, cfg.device),
    )?;
    let max = (cfg.max_per_task > 0).then_some(cfg.max_per_task);
    let mut failures = FailureSummary::default();
    let mut skipped_all: Vec<SkippedItem> = Vec::new();
    let mut notes = Vec::new();
    let results_dir = out_dir.join("results");
    let mut metrics = EvalMetrics {
        kind: "eval".into(),
        mode: cfg.mode,
        label: cfg.label.clone().unwrap_or_else(|| match cfg.mode {
            EvalMode::Base => "base".into(),
            EvalMode::Chat => "chat".into(),
        }),
        model: inputs.model_info.clone(),
        core: None,
        bpb: None,
        chat: None,
        failures: FailureSummary::default(),
        max_per_task: cfg.max_per_task,
        notes: Vec::new(),
        seconds: 0.0,
    };
    if max.is_some() {
        notes.push(format!(
            "max_per_task = {}: scores are on a subset, not comparable with full runs",
            cfg.max_per_task
        ));
    }
    match cfg.mode {
        EvalMode::Base => {
            let core_opts = CoreOptions {
                max_per_task: max,
                batch_rows: cfg.batch_size,
                max_batch_tokens: cfg.max_batch_tokens,
                scoring: cfg.scoring,
            };
            let mut section = CoreSection::default();
            if let Some(dir) = &cfg.core_dir {
                let specs = load_bundle(dir)?;
                for t in &cfg.tasks {
                    if !specs.iter().any(|s| &s.label == t) {
                        return Err(EvalError::Invalid(format!(
                            "task {t:?} is not in {}",
                            dir.join("core.yaml").display()
                        )));
                    }
                }
                let run_all = cfg.tasks.is_empty();
                let mut complete = run_all && max.is_none();
                let mut centered = Vec::new();
                for spec in specs
                    .iter()
                    .filter(|s| run_all || cfg.tasks.contains(&s.label))
                {
                    check_interrupt(inputs)?;
                    let (score, results, skipped) =
                        core_task_checkpointed(&mut ckpt, "core", spec, inputs, &core_opts)?;
                    if let Some(n) = &score.note {
                        notes.push(format!("{}: {n}", score.label));
                    }
                    complete &= skipped.is_empty();
                    write_jsonl(&results_dir.join(format!("{}.jsonl", spec.label)), &results)?;
                    failures.add(&results, &skipped);
                    skipped_all.extend(skipped.iter().cloned());
                    centered.push(score.centered);
                    section.tasks.push(score);
                }
                if !centered.is_empty() {
                    section.core_metric =
                        Some(centered.iter().sum::<f64>() / centered.len() as f64);
                }
                section.complete = complete;
                if !complete {
                    notes.push(
                        "CORE was computed on a subset of the bundle's tasks or items".into(),
                    );
                }
            }
            for path in &cfg.custom_tasks {
                check_interrupt(inputs)?;
                let spec = load_custom_task(path)?;
                let (score, results, skipped) =
                    core_task_checkpointed(&mut ckpt, "custom", &spec, inputs, &core_opts)?;
                write_jsonl(&results_dir.join(format!("{}.jsonl", spec.label)), &results)?;
                failures.add(&results, &skipped);
                skipped_all.extend(skipped.iter().cloned());
                section.custom.push(score);
            }
            metrics.core = Some(section);
            if cfg.bpb_tokens > 0 {
                check_interrupt(inputs)?;
                let (Some(val), Some(tb)) = (&cfg.val_data, inputs.token_bytes) else {
                    return Err(EvalError::Invalid(
                        "bpb_tokens > 0 needs val_data and the tokenizer's token_bytes".into(),
                    ));
                };
                let seq_len = cfg
                    .bpb_seq_len
                    .or(inputs.model.context_len())
                    .unwrap_or(1024);
                let key = ckpt.key(&serde_json::json!({
                    "kind": "bpb",
                    "val_data": file_digest(val),
                    "bpb_tokens": cfg.bpb_tokens,
                    "seq_len": seq_len,
                }));
                let report = match ckpt.restore::<BpbAccumulatorReport>("bpb", "val", &key) {
                    Some(r) => r.score,
                    None => {
                        let mut docs = Vec::new();
                        let mut total = 0usize;
                        for l in read_jsonl(val)? {
                            if total >= cfg.bpb_tokens + seq_len {
                                break;
                            }
                            if let Some(t) = l
                                .value
                                .ok()
                                .as_ref()
                                .and_then(|v| v.get("text"))
                                .and_then(|t| t.as_str())
                            {
                                let ids = inputs.tokenizer.encode(t);
                                total += ids.len() + 1;
                                docs.push(ids);
                            }
                        }
                        let rows = pack_rows(
                            &docs,
                            inputs.tokenizer.bos_id(),
                            seq_len,
                            cfg.bpb_tokens.div_ceil(seq_len).max(1),
                        );
                        let acc =
                            evaluate_bpb(inputs.model, &rows, cfg.batch_size.clamp(1, 8), tb)?;
                        tracing::info!(bpb = acc.bpb(), tokens = acc.tokens, "bits per byte");
                        let report = BpbAccumulatorReport {
                            bpb: acc.bpb(),
                            totals: acc,
                        };
                        ckpt.save(
                            "bpb",
                            "val",
                            &key,
                            &report,
                            &[],
                            &[],
                            serde_json::Value::Null,
                        )?;
                        report
                    }
                };
                metrics.bpb = Some(report);
            }
        }
        EvalMode::Chat => {
            let eval_dir = cfg.eval_dir.as_ref().ok_or_else(|| {
                EvalError::Invalid(
                    "chat mode needs eval_dir (the ARC/MMLU/GSM8K/HumanEval files)".into(),
                )
            })?;
            let names: Vec<String> = if cfg.tasks.is_empty() {
                CHAT_TASKS.iter().map(|(t, _)| t.to_string()).collect()
            } else {
                cfg.tasks.clone()
            };
            let exclude = match cfg.exclude_gsm8k_overlap {
                OverlapPolicy::Always => true,
                OverlapPolicy::Never => false,
                OverlapPolicy::Auto => inputs
                    .model_info
                    .trained_on
                    .iter()
                    .any(|d| d.contains("gsm_symbolic")),
            };
            let mut section = ChatSection {
                gsm8k_overlap_excluded: exclude && names.iter().any(|n| n == "GSM8K"),
                ..Default::default()
            };
            let gen_opts = GenerativeOptions {
                max_new_tokens: cfg.max_new_tokens,
                exec_workers: cfg.exec_workers,
                gen_batch: cfg.batch_size,
            };
            let mut sandbox = None;
            for name in &names {
                check_interrupt(inputs)?;
                // Where the items come from, and the key of everything that decides the result.
                let generative = matches!(name.as_str(), "GSM8K" | "HumanEval" | "SpellingBee");
                let mut key_doc = serde_json::json!({
                    "kind": "chat",
                    "task": name,
                    "max_per_task": max,
                    "max_new_tokens": generative.then_some(cfg.max_new_tokens),
                    "sandbox": (name == "HumanEval").then_some(&cfg.sandbox),
                });
                let source = if name == "SpellingBee" {
                    let words = spelling_words(cfg, eval_dir)?;
                    if words
                        .file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| !f.starts_with("words_alpha"))
                    {
                        notes.push(format!(
                            "SpellingBee: words from {} (not nanochat's words_alpha.txt): same generator, different words",
                            words.display()
                        ));
                    }
                    key_doc["words"] = file_digest(&words).into();
                    key_doc["size"] = cfg.spelling_bee_size.into();
                    ChatSource::SpellingBee(words)
                } else {
                    let file = task_file(name).ok_or_else(|| {
                        EvalError::Invalid(format!(
                            "unknown chat task {name:?} (known: {})",
                            CHAT_TASKS.map(|(t, _)| t).join(", ")
                        ))
                    })?;
                    let overlap = (name == "GSM8K" && exclude).then(|| {
                        cfg.gsm8k_overlap.clone().unwrap_or_else(|| {
                            eval_dir.join("gsm8k_test_gsm_symbolic_overlap.json")
                        })
                    });
                    key_doc["data"] = file_digest(&eval_dir.join(file)).into();
                    key_doc["overlap"] = overlap.as_deref().map(file_digest).into();
                    ChatSource::File(eval_dir.join(file), overlap)
                };
                let key = ckpt.key(&key_doc);
                let (score, results, skipped) = match ckpt.restore::<ChatScore>("chat", name, &key)
                {
                    Some(r) => {
                        if let Some(isolated) =
                            r.extra.get("network_isolated").and_then(|v| v.as_bool())
                        {
                            section.sandbox_network_isolated = Some(isolated);
                            if !isolated {
                                notes.push(NOT_ISOLATED_NOTE.into());
                            }
                        }
                        if let Some(isolation) = r
                            .extra
                            .get("isolation")
                            .and_then(|v| serde_json::from_value::<Isolation>(v.clone()).ok())
                        {
                            section.sandbox_isolation = Some(isolation);
                            if isolation == Isolation::Seatbelt {
                                notes.push(SEATBELT_NOTE.into());
                            }
                        }
                        section.sandbox_process_limit = r
                            .extra
                            .get("process_limit")
                            .and_then(|v| serde_json::from_value(v.clone()).ok());
                        (r.score, r.results, r.skipped)
                    }
                    None => {
                        let task = match &source {
                            ChatSource::SpellingBee(words) => {
                                load_spelling_bee(words, cfg.spelling_bee_size, max)?
                            }
                            ChatSource::File(path, overlap) => {
                                let overlap = match overlap {
                                    Some(p) => Some(read_gsm8k_overlap(p)?),
                                    None => None,
                                };
                                load_chat_task(name, path, overlap.as_ref(), max)?
                            }
                        };
                        let pb = progress(task.items.len(), name);
                        let categorical = matches!(
                            task.items.first().map(|i| &i.kind),
                            Some(ChatKind::Categorical { .. })
                        );
                        let mut extra = serde_json::Value::Null;
                        let (score, results) = if categorical {
                            evaluate_categorical(
                                inputs.model,
                                inputs.tokenizer,
                                &task,
                                cfg.batch_size,
                                Some(&pb),
                            )?
                        } else {
                            let generator = inputs.generator.ok_or_else(|| {
                                EvalError::Invalid(format!(
                                    "{name} is generative: a generator is required"
                                ))
                            })?;
                            if name == "HumanEval" && sandbox.is_none() {
                                let sb = Sandbox::new(cfg.sandbox.clone())?;
                                section.sandbox_network_isolated = Some(sb.network_isolated());
                                section.sandbox_isolation = Some(sb.isolation());
                                section.sandbox_process_limit = Some(sb.process_limit());
                                if !sb.network_isolated() {
                                    notes.push(NOT_ISOLATED_NOTE.into());
                                }
                                if sb.isolation() == Isolation::Seatbelt {
                                    notes.push(SEATBELT_NOTE.into());
                                }
                                sandbox = Some(sb);
                            }
                            if name == "HumanEval" {
                                extra = serde_json::json!({
                                    "network_isolated": section.sandbox_network_isolated,
                                    "isolation": section.sandbox_isolation,
                                    "process_limit": section.sandbox_process_limit,
                                });
                            }
                            evaluate_generative(
                                generator,
                                inputs.tokenizer,
                                &task,
                                &gen_opts,
                                sandbox.as_ref(),
                                Some(&pb),
                            )?
                        };
                        pb.finish_and_clear();
                        tracing::info!(task = %name, accuracy = score.accuracy, seconds = score.seconds, "chat task done");
                        ckpt.save("chat", name, &key, &score, &results, &task.skipped, extra)?;
                        (score, results, task.skipped)
                    }
                };
                if score.excluded > 0 {
                    notes.push(format!(
                        "{name}: {} test items overlapping gsm_symbolic_train excluded",
                        score.excluded
                    ));
                }
                write_jsonl(&results_dir.join(format!("{name}.jsonl")), &results)?;
                failures.add(&results, &skipped);
                skipped_all.extend(skipped.iter().cloned());
                section.tasks.push(score);
            }
            section.chatcore = chatcore(&section.tasks);
            metrics.chat = Some(section);
        }
    }
    if !ckpt.restored.is_empty() {
        tracing::info!(tasks = ?ckpt.restored, "reused task checkpoints from the work dir");
    }
    write_jsonl(&out_dir.join("skipped.jsonl"), &skipped_all)?;
    metrics.failures = failures;
    metrics.notes = notes;
    metrics.seconds = started.elapsed().as_secs_f64();
    write_atomic(
        &out_dir.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    write_atomic(
        &out_dir.join("summary.md"),
        summary_markdown(&metrics).as_bytes(),
    )?;
    Ok(metrics)
}

/// Human-readable table of an eval artifact (also printed by the binary).
pub fn summary_markdown(m: &EvalMetrics) -> String {
    let mut s = format!(
        "# Evaluation ({:?}, {})\n\nModel: {}\n\n",
        m.mode, m.label, m.model.description
    );
    if let Some(core) = &m.core {
        if !core.tasks.is_empty() || !core.custom.is_empty() {
            s.push_str("| Task | Type | Shots | Items | Accuracy | Centered |\n|---|---|---:|---:|---:|---:|\n");
            for t in core.tasks.iter().chain(&core.custom) {
                s.push_str(&format!(
                    "| {}{} | {} | {} | {} | {:.4} | {:.4} |\n",
                    t.label,
                    if t.note.is_some() { " *" } else { "" },
                    t.task_type.as_str(),
                    t.num_fewshot,
                    t.items,
                    t.accuracy,
                    t.centered,
                ));
            }
            if let Some(c) = core.core_metric {
                s.push_str(&format!(
                    "\nCORE: {c:.4}{}\n",
                    if core.complete { "" } else { " (partial)" }
                ));
            }
        }
    }
    if let Some(b) = &m.bpb {
        s.push_str(&format!(
            "\nBits per byte: {:.4} ({} tokens)\n",
            b.bpb, b.totals.tokens
        ));
    }
    if let Some(chat) = &m.chat {
        s.push_str("| Task | Items | Accuracy | Centered |\n|---|---:|---:|---:|\n");
        for t in &chat.tasks {
            s.push_str(&format!(
                "| {} | {} | {:.4} | {:.4} |\n",
                t.task, t.items, t.accuracy, t.centered
            ));
        }
        if let Some(c) = chat.chatcore {
            s.push_str(&format!("\nChatCORE: {c:.4}\n"));
        }
    }
    let f = &m.failures;
    if f.total_problems() > 0 {
        s.push_str("\n## Failures\n\n");
        for (t, n) in &f.skipped_by_task {
            s.push_str(&format!(
                "- {t}: {n} malformed lines skipped (see skipped.jsonl)\n"
            ));
        }
        for (k, n) in &f.errors_by_kind {
            s.push_str(&format!(
                "- {n} items failed with `{k}` (see results/*.jsonl)\n"
            ));
        }
    }
    for n in &m.notes {
        s.push_str(&format!("\nNote: {n}\n"));
    }
    s
}

/// Where a chat task's items come from.
enum ChatSource {
    /// SpellingBee over this word list.
    SpellingBee(PathBuf),
    /// A task file, and the GSM8K overlap list when rows are excluded.
    File(PathBuf, Option<PathBuf>),
}

const NOT_ISOLATED_NOTE: &str =
    "HumanEval ran WITHOUT network isolation (the kernel refused a network namespace)";

const SEATBELT_NOTE: &str = "HumanEval ran in the seatbelt sandbox, not bubblewrap (missing, \
     turned off or refused): generated code could read and write the user's files \
     (docs/eval.md, \"The HumanEval sandbox\")";

/// Resolve a possibly relative path against `base`.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}
