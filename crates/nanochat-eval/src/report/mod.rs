//! The report card: a page a person reads. The summary table first (CORE, ARC-Easy,
//! ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE × BASE/MID/SFT, as nanochat's), then one
//! short section per input stage (what it trained on, for how long, on which machine, its
//! final loss / bits per byte, its curves as SVG images), then per-task tables. Every raw
//! number stays in `report.json`; plus the side-by-side comparison of two cards.
//!
//! Inputs are artifact directories. From each the report reads its results — `metrics.json`
//! (an eval; any JSON object works), `summary.json` (a training stage, or the data stage's
//! file counts), `train_report.json` + `tok_eval.md` (the tokenizer) — and every top-level
//! `*.jsonl` whose records have a numeric `step` (training logs): each numeric field that looks
//! like a loss, a learning rate or bits per byte becomes a curve. Durations, throughput and
//! machines come from the input's run directory beside its `data/` (docs/artifacts.md, "Run
//! directories"), which is fixed once the object is published: the card is a function of its
//! inputs' ids, so a rerun on the same inputs writes the same bytes. Evaluation artifacts
//! (`metrics.json` with `"kind": "eval"`) fill the summary table in the column named by their
//! `label`.

pub mod plot;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jsonl::read_jsonl;
use crate::{EvalError, Result};
use nanochat_artifacts::write_atomic;

/// The summary table's rows, in order.
pub const SUMMARY_METRICS: [&str; 7] = [
    "CORE",
    "ARC-Easy",
    "ARC-Challenge",
    "MMLU",
    "GSM8K",
    "HumanEval",
    "ChatCORE",
];

/// The summary table's default columns.
pub const SUMMARY_COLUMNS: [&str; 3] = ["BASE", "MID", "SFT"];

/// How one input stage ran, from its run directory (`record.json` written by nanochat-run,
/// `telemetry.json` / `timing.json` written by the stage). Every field is optional: an input
/// that is not a store object has none of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Start of the run that produced the object, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// Wall-clock seconds of that run (the training loop's own time when the stage says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The device: CPU model and logical CPUs, threads used, matmul precision (what is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Mean training throughput, tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tok_per_s: Option<f64>,
    /// Whether the run resumed from an interrupted one.
    #[serde(default)]
    pub resumed: bool,
    /// The run's inputs: name -> object id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
}

/// A small table of a section (per-task scores, compression, data files).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Heading above the table.
    pub title: String,
    /// Column names; a name ending in `:` is right-aligned (the colon is not shown).
    pub header: Vec<String>,
    /// Rows of already formatted cells.
    pub rows: Vec<Vec<String>>,
}

/// One input artifact's section of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSection {
    /// The input's name (e.g. `pretrain`, `base_eval`).
    pub name: String,
    /// `training`, `eval`, `tokenizer`, `data` or `other`.
    #[serde(default)]
    pub kind: String,
    /// Its results, flattened to dotted keys (arrays of objects are indexed by their
    /// `label`/`task`/`name` when they have one): the raw numbers, in report.json only.
    pub metrics: BTreeMap<String, Value>,
    /// How it ran (from its run directory).
    #[serde(default)]
    pub run: RunInfo,
    /// The section's sentences: what it trained on, final loss, scores.
    #[serde(default)]
    pub facts: Vec<String>,
    /// Relative paths of the SVG curves drawn from its logs.
    pub curves: Vec<String>,
    /// Per-task and other tables.
    #[serde(default)]
    pub tables: Vec<Table>,
}

/// The whole report card.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportCard {
    /// Title line.
    pub title: String,
    /// One section per input, in the order given.
    pub stages: Vec<StageSection>,
    /// Summary table: metric → column → value.
    pub summary: BTreeMap<String, BTreeMap<String, f64>>,
    /// Column order of the summary table.
    pub columns: Vec<String>,
    /// Caveats (partial data, missing evals) printed under the table.
    pub notes: Vec<String>,
    /// Version of nanochat-rs that wrote the card.
    #[serde(default)]
    pub nanochat_version: String,
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(a) if a.iter().all(|x| x.is_object()) && !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                let name = ["label", "task", "name"]
                    .iter()
                    .find_map(|n| x.get(n).and_then(|s| s.as_str()))
                    .map(str::to_string)
                    .unwrap_or_else(|| i.to_string());
                flatten(&key(&name), x, out);
            }
        }
        Value::Array(_) => {}
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

fn is_lr_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "lr" || n.starts_with("lr_") || n.contains("lrm") || n.ends_with("_lr")
}

fn is_curve_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("loss") || is_lr_field(name) || n.contains("bpb")
}

/// Read the training-log curves of one artifact directory: `field -> (step, value)`.
pub fn read_curves(dir: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(curves);
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".jsonl") || n.ends_with(".jsonl.gz")
        })
        .collect();
    files.sort();
    for f in files {
        for line in read_jsonl(&f)? {
            let Ok(Value::Object(rec)) = line.value else {
                continue;
            };
            let Some(step) = rec.get("step").and_then(Value::as_f64) else {
                continue;
            };
            for (k, v) in &rec {
                if let (true, Some(y)) = (is_curve_field(k), v.as_f64()) {
                    curves.entry(k.clone()).or_default().push((step, y));
                }
            }
        }
    }
    Ok(curves)
}

/// Summary-table values of one evaluation `metrics.json`: `(column, metric -> value)`.
pub fn summary_of(metrics: &Value) -> Option<(String, BTreeMap<String, f64>)> {
    if metrics.get("kind").and_then(Value::as_str) != Some("eval") {
        return None;
    }
    let label = metrics
        .get("label")
        .and_then(Value::as_str)?
        .to_ascii_uppercase();
    let mut out = BTreeMap::new();
    if let Some(c) = metrics.pointer("/core/core_metric").and_then(Value::as_f64) {
        out.insert("CORE".to_string(), c);
    }
    if let Some(tasks) = metrics.pointer("/chat/tasks").and_then(Value::as_array) {
        for t in tasks {
            if let (Some(name), Some(acc)) = (
                t.get("task").and_then(Value::as_str),
                t.get("accuracy").and_then(Value::as_f64),
            ) {
                out.insert(name.to_string(), acc);
            }
        }
    }
    if let Some(c) = metrics.pointer("/chat/chatcore").and_then(Value::as_f64) {
        out.insert("ChatCORE".to_string(), c);
    }
    Some((label, out))
}

/// Reads a JSON file when it exists; a file that is not JSON becomes a note.
fn read_json(path: &Path, name: &str, notes: &mut Vec<String>) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            notes.push(format!("{name}: {file} is not valid JSON ({e}); skipped"));
            Ok(None)
        }
    }
}

/// Reads a JSON file of a run directory (telemetry: never worth failing the report for).
fn read_run_json(dir: &Path, file: &str) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(dir.join(file)).ok()?).ok()
}

/// [`RunInfo`] from an input's run directory, when it has one.
pub fn run_info(input_dir: &Path) -> RunInfo {
    let Some(dir) = nanochat_artifacts::stage::run_dir_of(input_dir) else {
        return RunInfo::default();
    };
    let record = read_run_json(&dir, nanochat_artifacts::RUN_RECORD_FILE).unwrap_or(Value::Null);
    let telemetry = read_run_json(&dir, "telemetry.json").unwrap_or(Value::Null);
    let timing = read_run_json(&dir, "timing.json").unwrap_or(Value::Null);
    let str_at = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    let f64_at = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_f64);
    let mut device = Vec::new();
    // The backend that ran the stage (trainers write it): a GPU is named first, with the host's
    // CPU after it.
    let backend = str_at(&telemetry, "/device").filter(|d| !d.is_empty());
    if let Some(gpu) = backend.as_ref().filter(|d| !d.starts_with("cpu")) {
        device.push(gpu.clone());
    }
    if let Some(cpu) = str_at(&record, "/machine/cpu").filter(|c| !c.is_empty()) {
        match record.pointer("/machine/cpus").and_then(Value::as_u64) {
            Some(n) => device.push(format!("{cpu} ({n} CPUs)")),
            None => device.push(cpu),
        }
    }
    if let Some(t) = telemetry.get("threads").and_then(Value::as_u64) {
        device.push(format!("{t} threads"));
    }
    if let Some(p) = str_at(&telemetry, "/matmul_precision") {
        device.push(format!("{p} matmuls"));
    }
    RunInfo {
        started: str_at(&record, "/started"),
        // The stage's own measure of its work when it gives one, else the process's.
        seconds: f64_at(&telemetry, "/train_seconds")
            .or_else(|| f64_at(&timing, "/seconds"))
            .or_else(|| f64_at(&record, "/duration_s")),
        host: str_at(&record, "/machine/host").filter(|h| !h.is_empty()),
        device: (!device.is_empty()).then(|| device.join(", ")),
        tok_per_s: f64_at(&telemetry, "/mean_tok_per_s"),
        resumed: record
            .get("resumed")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        inputs: record
            .get("inputs")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// `1 h 02 min`, `3 min 05 s`, `12.3 s`.
pub fn fmt_duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let total = s.round() as u64;
    let (h, m, sec) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else {
        format!("{m} min {sec:02} s")
    }
}

fn f4(v: f64) -> String {
    format!("{v:.4}")
}

fn num(v: &Value, p: &str) -> Option<f64> {
    v.pointer(p).and_then(Value::as_f64)
}

/// The facts and tables of a training stage's `summary.json`.
fn training_section(summary: &Value, section: &mut StageSection) {
    let steps = summary.get("step").and_then(Value::as_u64).unwrap_or(0);
    let batch = summary
        .pointer("/config/total_batch_size")
        .and_then(Value::as_u64);
    section.facts.push(match batch {
        Some(b) => format!(
            "{} optimizer steps × total batch size {}.",
            group_thousands(steps as i64),
            group_thousands(b as i64)
        ),
        None => format!("{} optimizer steps.", group_thousands(steps as i64)),
    });
    let mut fin = Vec::new();
    if let Some(l) = num(summary, "/train_loss") {
        fin.push(format!("train loss {}", f4(l)));
    }
    if let Some(b) = num(summary, "/val_bpb") {
        fin.push(format!("validation bpb {}", f4(b)));
    }
    if let Some(b) = num(summary, "/min_val_bpb") {
        fin.push(format!("best {}", f4(b)));
    }
    if !fin.is_empty() {
        section.facts.push(format!("Final: {}.", fin.join(", ")));
    }
}

/// Adds a table of `records` with one column per `(header, field)` (a header ending in `:` is
/// right-aligned); nothing when there are no records.
fn push_table(
    section: &mut StageSection,
    title: &str,
    records: &[&Value],
    columns: &[(&str, &str)],
) {
    if records.is_empty() {
        return;
    }
    section.tables.push(Table {
        title: title.into(),
        header: columns.iter().map(|(h, _)| h.to_string()).collect(),
        rows: records
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .map(|(_, k)| r.get(k).map(fmt_value).unwrap_or_default())
                    .collect()
            })
            .collect(),
    });
}

/// The facts and per-task tables of an eval's `metrics.json`.
fn eval_section(m: &Value, section: &mut StageSection) {
    if let Some(d) = m.pointer("/model/description").and_then(Value::as_str) {
        section.facts.push(format!("Model: {d}."));
    }
    if let Some(core) = m.get("core") {
        let tasks = core.get("tasks").and_then(Value::as_array);
        let mut line = match num(core, "/core_metric") {
            Some(c) => format!("CORE {}", f4(c)),
            None => "CORE not computed".to_string(),
        };
        if let Some(t) = tasks {
            line.push_str(&format!(" over {} tasks", t.len()));
        }
        if core.get("complete").and_then(Value::as_bool) == Some(false) {
            line.push_str(" (partial: not every task on all its items)");
        }
        section.facts.push(format!("{line}."));
        let rows: Vec<&Value> = tasks
            .into_iter()
            .flatten()
            .chain(
                core.get("custom")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            )
            .collect();
        push_table(
            section,
            "CORE tasks",
            &rows,
            &[
                ("Task", "label"),
                ("Type", "task_type"),
                ("Shots:", "num_fewshot"),
                ("Items:", "items"),
                ("Accuracy:", "accuracy"),
                ("Centered:", "centered"),
            ],
        );
    }
    if let Some(bpb) = num(m, "/bpb/bpb") {
        section
            .facts
            .push(format!("Validation bits per byte {}.", f4(bpb)));
    }
    if let Some(chat) = m.get("chat") {
        if let Some(c) = num(chat, "/chatcore") {
            section.facts.push(format!("ChatCORE {}.", f4(c)));
        }
        let rows: Vec<&Value> = chat
            .get("tasks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        push_table(
            section,
            "Chat tasks",
            &rows,
            &[
                ("Task", "task"),
                ("Items:", "items"),
                ("Correct:", "correct"),
                ("Accuracy:", "accuracy"),
                ("Centered:", "centered"),
            ],
        );
    }
}

/// The file counts of the data stage's `summary.json` (`"corpus/x.jsonl": documents`).
fn data_section(summary: &Value, section: &mut StageSection) {
    let Some(map) = summary.as_object() else {
        return;
    };
    let rows: Vec<Vec<String>> = map
        .iter()
        .map(|(k, v)| vec![k.clone(), fmt_value(v)])
        .collect();
    section.facts.push(format!("{} files.", rows.len()));
    section.tables.push(Table {
        title: "Files".into(),
        header: vec!["File".into(), "Records:".into()],
        rows,
    });
}

/// The tokenizer's `train_report.json` and `tok_eval.json`.
fn tokenizer_section(report: &Value, tok_eval: Option<&Value>, section: &mut StageSection) {
    if let Some(v) = report.get("vocab_size").and_then(Value::as_u64) {
        let specials = report
            .get("num_special_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        section.facts.push(format!(
            "Vocabulary of {} tokens ({specials} special).",
            group_thousands(v as i64)
        ));
    }
    let Some(rows) = tok_eval
        .and_then(|t| t.get("rows"))
        .and_then(Value::as_array)
    else {
        return;
    };
    // Our tokenizer is the one with the report's vocabulary size; fall back to the first.
    let ours = tok_eval
        .and_then(|t| t.get("vocab_sizes"))
        .and_then(Value::as_object)
        .and_then(|m| {
            let want = report.get("vocab_size");
            m.iter()
                .find(|(_, v)| Some(*v) == want)
                .or_else(|| m.iter().next())
                .map(|(k, _)| k.clone())
        });
    let Some(ours) = ours else { return };
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|r| {
            let res = r.pointer(&format!("/results/{ours}"))?;
            Some(vec![
                r.get("name").map(fmt_value).unwrap_or_default(),
                r.get("bytes").map(fmt_value).unwrap_or_default(),
                res.get("tokens").map(fmt_value).unwrap_or_default(),
                res.get("ratio")
                    .and_then(Value::as_f64)
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_default(),
            ])
        })
        .collect();
    if !table_rows.is_empty() {
        section.tables.push(Table {
            title: "Compression".into(),
            header: ["Text", "Bytes:", "Tokens:", "Bytes per token:"]
                .map(String::from)
                .to_vec(),
            rows: table_rows,
        });
    }
}

/// Build the report card from named artifact directories, writing curve SVGs under
/// `out_dir/curves/`.
pub fn build_report(
    title: &str,
    inputs: &[(String, std::path::PathBuf)],
    out_dir: &Path,
) -> Result<ReportCard> {
    let mut card = ReportCard {
        title: title.to_string(),
        columns: SUMMARY_COLUMNS.iter().map(|s| s.to_string()).collect(),
        nanochat_version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    for (name, dir) in inputs {
        let mut section = StageSection {
            name: name.clone(),
            kind: "other".into(),
            run: run_info(dir),
            ..Default::default()
        };
        let metrics = read_json(&dir.join("metrics.json"), name, &mut card.notes)?;
        let summary = read_json(&dir.join("summary.json"), name, &mut card.notes)?;
        let tok_report = read_json(&dir.join("train_report.json"), name, &mut card.notes)?;
        if let Some(v) = &metrics {
            flatten("", v, &mut section.metrics);
            if let Some((col, vals)) = summary_of(v) {
                section.kind = "eval".into();
                if !card.columns.contains(&col) {
                    card.columns.push(col.clone());
                }
                for (m, x) in vals {
                    card.summary.entry(m).or_default().insert(col.clone(), x);
                }
                eval_section(v, &mut section);
            }
            if let Some(notes) = v.get("notes").and_then(Value::as_array) {
                for n in notes.iter().filter_map(Value::as_str) {
                    card.notes.push(format!("{name}: {n}"));
                }
            }
        }
        if let Some(v) = &summary {
            if metrics.is_none() {
                flatten("", v, &mut section.metrics);
            }
            if v.get("step").is_some() {
                section.kind = "training".into();
                training_section(v, &mut section);
            } else if section.kind == "other" {
                section.kind = "data".into();
                data_section(v, &mut section);
            }
        }
        if let Some(v) = &tok_report {
            section.kind = "tokenizer".into();
            flatten("", v, &mut section.metrics);
            let tok_eval = read_json(&dir.join("tok_eval.json"), name, &mut card.notes)?;
            tokenizer_section(v, tok_eval.as_ref(), &mut section);
        }
        let curves = read_curves(dir)?;
        let groups: [(&str, KeyFilter); 3] = [
            ("loss", |k| k.to_ascii_lowercase().contains("loss")),
            ("lr", is_lr_field),
            ("bpb", |k| k.to_ascii_lowercase().contains("bpb")),
        ];
        for (group, pick) in groups {
            let series: Vec<plot::Series> = curves
                .iter()
                .filter(|(k, _)| pick(k))
                .map(|(k, pts)| plot::Series {
                    name: k.clone(),
                    points: pts.clone(),
                })
                .collect();
            if series.is_empty() {
                continue;
            }
            let svg = plot::line_chart_svg(&format!("{name}: {group}"), "step", &series)?;
            let rel = format!("curves/{}_{group}.svg", sanitize(name));
            write_atomic(&out_dir.join(&rel), svg.as_bytes())?;
            section.curves.push(rel);
        }
        card.stages.push(section);
    }
    Ok(card)
}

/// Chooses the log fields drawn in one chart.
type KeyFilter = fn(&str) -> bool;

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) if i.abs() >= 10_000 => group_thousands(i),
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => format!("{f:.4}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn group_thousands(i: i64) -> String {
    let s = i.unsigned_abs().to_string();
    let mut out = String::new();
    for (k, c) in s.chars().enumerate() {
        if k > 0 && (s.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if i < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The summary table as markdown.
pub fn summary_table(card: &ReportCard) -> String {
    let mut s = String::from("| Metric |");
    for c in &card.columns {
        s.push_str(&format!(" {c} |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(card.columns.len()));
    s.push('\n');
    for m in SUMMARY_METRICS {
        s.push_str(&format!("| {m} |"));
        for c in &card.columns {
            match card.summary.get(m).and_then(|r| r.get(c)) {
                Some(v) => s.push_str(&format!(" {v:.4} |")),
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// A [`Table`] as markdown.
fn table_markdown(t: &Table) -> String {
    let mut s = format!("**{}**\n\n|", t.title);
    for h in &t.header {
        s.push_str(&format!(" {} |", h.trim_end_matches(':')));
    }
    s.push_str("\n|");
    for h in &t.header {
        s.push_str(if h.ends_with(':') { "---:|" } else { "---|" });
    }
    s.push('\n');
    for r in &t.rows {
        s.push('|');
        for c in r {
            s.push_str(&format!(" {c} |"));
        }
        s.push('\n');
    }
    s.push('\n');
    s
}

/// The "how it ran" sentence of a section.
fn run_sentence(r: &RunInfo) -> Option<String> {
    let mut s = match r.seconds {
        Some(t) => format!("Took {}", fmt_duration(t)),
        None if r.host.is_some() || r.device.is_some() => "Ran".to_string(),
        None => return None,
    };
    if let Some(h) = &r.host {
        s.push_str(&format!(" on {h}"));
    }
    if let Some(d) = &r.device {
        s.push_str(&format!(" ({d})"));
    }
    if let Some(t) = r.tok_per_s {
        s.push_str(&format!(", {} tokens/s", group_thousands(t.round() as i64)));
    }
    if let Some(st) = &r.started {
        s.push_str(&format!(", started {st}"));
    }
    if r.resumed {
        s.push_str(", resumed after an interruption");
    }
    s.push('.');
    Some(s)
}

/// Render the report card as markdown: summary table, one section per stage, tables.
pub fn render_markdown(card: &ReportCard) -> String {
    let mut s = format!("# {}\n\n", card.title);
    s.push_str(&summary_table(card));
    s.push('\n');
    let total: f64 = card.stages.iter().filter_map(|st| st.run.seconds).sum();
    if total > 0.0 {
        s.push_str(&format!(
            "Total time of the stages below: {}.\n\n",
            fmt_duration(total)
        ));
    }
    for n in &card.notes {
        s.push_str(&format!("- Note: {n}\n"));
    }
    if !card.notes.is_empty() {
        s.push('\n');
    }
    for st in &card.stages {
        s.push_str(&format!("## {}\n\n", st.name));
        if !st.run.inputs.is_empty() {
            let ins: Vec<String> = st
                .run
                .inputs
                .iter()
                .map(|(k, id)| format!("{k} (`{}`)", &id[..id.len().min(12)]))
                .collect();
            s.push_str(&format!("Inputs: {}.\n", ins.join(", ")));
        }
        for f in &st.facts {
            s.push_str(&format!("{f}\n"));
        }
        if let Some(r) = run_sentence(&st.run) {
            s.push_str(&format!("{r}\n"));
        }
        if st.facts.is_empty() && st.curves.is_empty() && st.tables.is_empty() {
            s.push_str("(no results this report knows how to read; raw numbers in report.json)\n");
        }
        s.push('\n');
        for c in &st.curves {
            s.push_str(&format!("![{c}]({c})\n"));
        }
        if !st.curves.is_empty() {
            s.push('\n');
        }
        for t in &st.tables {
            s.push_str(&table_markdown(t));
        }
    }
    s.push_str(&format!(
        "---\nWritten by nanochat-rs {}; every number above and more is in report.json.\n",
        card.nanochat_version
    ));
    s
}

/// Write `report.md` and `report.json` into `out_dir` (atomically).
pub fn write_report(card: &ReportCard, out_dir: &Path) -> Result<()> {
    write_atomic(&out_dir.join("report.md"), render_markdown(card).as_bytes())?;
    write_atomic(
        &out_dir.join("report.json"),
        serde_json::to_string_pretty(card)?.as_bytes(),
    )?;
    Ok(())
}

/// Load a `report.json`.
pub fn load_report(path: &Path) -> Result<ReportCard> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| EvalError::config(path, format!("not a nanochat report.json: {e}")))
}

/// Two report cards side by side: the summary table with `A`, `B` and `B - A` per cell, then
/// every numeric stage metric present in both with its delta.
pub fn compare_markdown(a: &ReportCard, b: &ReportCard, a_name: &str, b_name: &str) -> String {
    let mut cols: Vec<String> = a.columns.clone();
    for c in &b.columns {
        if !cols.contains(c) {
            cols.push(c.clone());
        }
    }
    let mut s = format!(
        "# Report comparison\n\nA = {a_name} ({})\nB = {b_name} ({})\n\n## Summary\n\n| Metric |",
        a.title, b.title
    );
    for c in &cols {
        s.push_str(&format!(" {c} A | {c} B | {c} Δ |"));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|---:|---:|".repeat(cols.len()));
    s.push('\n');
    let cell =
        |card: &ReportCard, m: &str, c: &str| card.summary.get(m).and_then(|r| r.get(c)).copied();
    for m in SUMMARY_METRICS {
        s.push_str(&format!("| {m} |"));
        for c in &cols {
            let (x, y) = (cell(a, m, c), cell(b, m, c));
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            let d = match (x, y) {
                (Some(x), Some(y)) => format!("{:+.4}", y - x),
                _ => "-".into(),
            };
            s.push_str(&format!(" {} | {} | {d} |", f(x), f(y)));
        }
        s.push('\n');
    }
    s.push_str("\n## Stage metrics (numeric, present in both)\n\n| Stage | Metric | A | B | Δ |\n|---|---|---:|---:|---:|\n");
    for sa in &a.stages {
        let Some(sb) = b.stages.iter().find(|x| x.name == sa.name) else {
            continue;
        };
        for (k, va) in &sa.metrics {
            if let (Some(x), Some(y)) = (va.as_f64(), sb.metrics.get(k).and_then(Value::as_f64)) {
                s.push_str(&format!(
                    "| {} | {k} | {x:.4} | {y:.4} | {:+.4} |\n",
                    sa.name,
                    y - x
                ));
            }
        }
    }
    s
}
