//! The report card: system info, every stage's metrics and timing, training curves as SVG, and
//! the summary table (CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE ×
//! BASE/MID/SFT), written as markdown and JSON; plus the side-by-side comparison of two cards.
//!
//! Inputs are artifact directories. From each the report reads `metrics.json` (any JSON object;
//! nested objects are flattened to dotted keys) and every top-level `*.jsonl` whose records have
//! a numeric `step` (training logs): each numeric field that looks like a loss, a learning rate or
//! bits per byte becomes a curve. Evaluation artifacts (`metrics.json` with `"kind": "eval"`)
//! fill the summary table in the column named by their `label`.

pub mod plot;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jsonl::{read_jsonl, write_atomic};
use crate::{EvalError, Result};

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

/// Machine the report was generated on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// Host name.
    pub hostname: String,
    /// `linux-x86_64` etc.
    pub platform: String,
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs available.
    pub cpus: usize,
    /// Total memory in GiB.
    pub memory_gib: f64,
    /// Git commit of the working directory, when available.
    pub git_commit: Option<String>,
    /// Version of this crate.
    pub nanochat_version: String,
    /// UTC timestamp `YYYY-MM-DD HH:MM:SS`.
    pub generated_utc: String,
}

/// Collect [`SystemInfo`] from /proc and the environment (best effort).
pub fn system_info() -> SystemInfo {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let git_commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    SystemInfo {
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib,
        git_commit,
        nanochat_version: env!("CARGO_PKG_VERSION").to_string(),
        generated_utc: utc_now(),
    }
}

/// Current UTC time as `YYYY-MM-DD HH:MM:SS` (civil-from-days, no time-zone database needed).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    format_utc(secs)
}

/// Format Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// One input artifact's section of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSection {
    /// The input's name (e.g. `pretrain`, `base_eval`).
    pub name: String,
    /// Scalars of its `metrics.json`, flattened to dotted keys (arrays of objects are indexed
    /// by their `label`/`task`/`name` when they have one).
    pub metrics: BTreeMap<String, Value>,
    /// Relative paths of the SVG curves drawn from its logs.
    pub curves: Vec<String>,
}

/// The whole report card.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportCard {
    /// Title line.
    pub title: String,
    /// Where it was generated.
    pub system: SystemInfo,
    /// One section per input, in the order given.
    pub stages: Vec<StageSection>,
    /// Summary table: metric → column → value.
    pub summary: BTreeMap<String, BTreeMap<String, f64>>,
    /// Column order of the summary table.
    pub columns: Vec<String>,
    /// Caveats (partial data, missing evals) printed under the table.
    pub notes: Vec<String>,
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

fn is_curve_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("loss") || n == "lr" || n.contains("lrm") || n.ends_with("_lr") || n.contains("bpb")
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

/// Build the report card from named artifact directories, writing curve SVGs under
/// `out_dir/curves/`.
pub fn build_report(
    title: &str,
    inputs: &[(String, std::path::PathBuf)],
    out_dir: &Path,
) -> Result<ReportCard> {
    let mut card = ReportCard {
        title: title.to_string(),
        system: system_info(),
        columns: SUMMARY_COLUMNS.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for (name, dir) in inputs {
        let mut section = StageSection {
            name: name.clone(),
            ..Default::default()
        };
        let mpath = dir.join("metrics.json");
        if mpath.is_file() {
            let text = std::fs::read_to_string(&mpath).map_err(|e| EvalError::io(&mpath, e))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => {
                    flatten("", &v, &mut section.metrics);
                    if let Some((col, vals)) = summary_of(&v) {
                        if !card.columns.contains(&col) {
                            card.columns.push(col.clone());
                        }
                        for (m, x) in vals {
                            card.summary.entry(m).or_default().insert(col.clone(), x);
                        }
                    }
                    if let Some(notes) = v.get("notes").and_then(Value::as_array) {
                        for n in notes.iter().filter_map(Value::as_str) {
                            card.notes.push(format!("{name}: {n}"));
                        }
                    }
                }
                Err(e) => card.notes.push(format!(
                    "{name}: metrics.json is not valid JSON ({e}); skipped"
                )),
            }
        }
        let curves = read_curves(dir)?;
        let groups: [(&str, KeyFilter); 3] = [
            ("loss", |k| k.to_ascii_lowercase().contains("loss")),
            ("lr", |k| {
                let k = k.to_ascii_lowercase();
                k == "lr" || k.contains("lrm") || k.ends_with("_lr")
            }),
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

/// Render the report card as markdown.
pub fn render_markdown(card: &ReportCard) -> String {
    let sys = &card.system;
    let mut s = format!(
        "# {}\n\nGenerated: {} UTC\n\n## Environment\n\n",
        card.title, sys.generated_utc
    );
    s.push_str(&format!(
        "- Host: {} ({})\n- CPU: {} ({} logical CPUs)\n- Memory: {:.1} GiB\n- nanochat-rs: {}{}\n\n",
        sys.hostname,
        sys.platform,
        sys.cpu,
        sys.cpus,
        sys.memory_gib,
        sys.nanochat_version,
        sys.git_commit
            .as_ref()
            .map(|c| format!(" (git {c})"))
            .unwrap_or_default()
    ));
    for st in &card.stages {
        s.push_str(&format!("## {}\n\n", st.name));
        if st.metrics.is_empty() && st.curves.is_empty() {
            s.push_str("(no metrics.json or training log in this artifact)\n\n");
        }
        for (k, v) in &st.metrics {
            s.push_str(&format!("- {k}: {}\n", fmt_value(v)));
        }
        if !st.metrics.is_empty() {
            s.push('\n');
        }
        for c in &st.curves {
            s.push_str(&format!("![{c}]({c})\n\n"));
        }
    }
    s.push_str("## Summary\n\n");
    s.push_str(&summary_table(card));
    if !card.notes.is_empty() {
        s.push('\n');
        for n in &card.notes {
            s.push_str(&format!("- Note: {n}\n"));
        }
    }
    s
}

/// Write `report.md` and `report.json` into `out_dir` (atomically).
pub fn write_report(card: &ReportCard, out_dir: &Path) -> Result<()> {
    write_atomic(&out_dir.join("report.md"), render_markdown(card).as_bytes())?;
    write_atomic(
        &out_dir.join("report.json"),
        serde_json::to_string_pretty(card)?.as_bytes(),
    )
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
        a.system.generated_utc, b.system.generated_utc
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
