//! Reading the DCLM / nanochat `eval_bundle` layout: `core.yaml` (task list), `eval_meta_data.csv`
//! (random baselines) and the per-task JSONL files (plain or gzip).
//!
//! Two layouts are accepted so that users with nanochat's real bundle get the real CORE:
//! - upstream: `<dir>/core.yaml`, `<dir>/eval_meta_data.csv`, `<dir>/eval_data/<dataset_uri>`;
//! - flat (this repo's `../shared/data/core`): files next to `core.yaml`, optionally gzipped,
//!   with `core_tasks.tsv` mapping each label to its file and provenance.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::items::{FieldNames, TaskSpec, TaskType};
use crate::jsonl::first_existing;
use crate::{EvalError, Result};

#[derive(Debug, Deserialize)]
struct CoreYaml {
    icl_tasks: Vec<YamlTask>,
}

#[derive(Debug, Deserialize)]
struct YamlTask {
    label: String,
    dataset_uri: String,
    num_fewshot: Vec<usize>,
    icl_task_type: String,
    #[serde(default)]
    continuation_delimiter: Option<String>,
}

/// Random baselines (percent) from `eval_meta_data.csv`, keyed by `Eval Task`.
pub fn read_baselines(path: &Path) -> Result<HashMap<String, f64>> {
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| EvalError::config(path, format!("cannot read CSV: {e}")))?;
    let headers = reader
        .headers()
        .map_err(|e| EvalError::config(path, format!("cannot read CSV header: {e}")))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                EvalError::config(path, format!("missing column `{name}` in the header"))
            })
    };
    let (task_col, base_col) = (col("Eval Task")?, col("Random baseline")?);
    let mut out = HashMap::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| EvalError::config(path, format!("row {}: {e}", i + 2)))?;
        let (Some(task), Some(base)) = (rec.get(task_col), rec.get(base_col)) else {
            continue;
        };
        let base: f64 = base.trim().parse().map_err(|_| {
            EvalError::config(
                path,
                format!(
                    "row {}: `Random baseline` of {task} is not a number: {base:?}",
                    i + 2
                ),
            )
        })?;
        out.insert(task.trim().to_string(), base);
    }
    Ok(out)
}

/// `label -> (dataset_file, provenance)` from a `core_tasks.tsv`, when present.
fn read_core_tasks_tsv(path: &Path) -> Result<HashMap<String, (String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| EvalError::config(path, format!("missing column `{name}`")))
    };
    let (label, file, prov) = (col("label")?, col("dataset_file")?, col("provenance")?);
    let mut out = HashMap::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if let (Some(l), Some(d)) = (f.get(label), f.get(file)) {
            let p = f.get(prov).copied().unwrap_or("");
            out.insert(l.to_string(), (d.to_string(), p.to_string()));
        }
    }
    Ok(out)
}

/// Load the task list of a bundle directory, resolving each task's data file.
pub fn load_bundle(dir: &Path) -> Result<Vec<TaskSpec>> {
    let yaml_path = dir.join("core.yaml");
    let text = std::fs::read_to_string(&yaml_path).map_err(|e| EvalError::io(&yaml_path, e))?;
    let cfg: CoreYaml = serde_yaml::from_str(&text).map_err(|e| {
        EvalError::config(
            &yaml_path,
            format!("not a valid eval-bundle core.yaml: {e}"),
        )
    })?;
    let baselines = read_baselines(&dir.join("eval_meta_data.csv"))?;
    let tsv_path = dir.join("core_tasks.tsv");
    let tsv = if tsv_path.is_file() {
        read_core_tasks_tsv(&tsv_path)?
    } else {
        HashMap::new()
    };
    let mut specs = Vec::with_capacity(cfg.icl_tasks.len());
    for t in cfg.icl_tasks {
        let task_type = TaskType::parse(&t.icl_task_type).ok_or_else(|| {
            EvalError::config(
                &yaml_path,
                format!(
                    "task {}: unsupported icl_task_type {:?} (expected multiple_choice, schema or language_modeling)",
                    t.label, t.icl_task_type
                ),
            )
        })?;
        let num_fewshot = *t.num_fewshot.first().ok_or_else(|| {
            EvalError::config(&yaml_path, format!("task {}: empty num_fewshot", t.label))
        })?;
        let random_baseline = *baselines.get(&t.label).ok_or_else(|| {
            EvalError::config(
                dir.join("eval_meta_data.csv"),
                format!("no `Random baseline` row for task {}", t.label),
            )
        })?;
        let uri = Path::new(&t.dataset_uri);
        let base = uri.file_name().map(PathBuf::from).unwrap_or_default();
        let gz = |p: PathBuf| {
            let mut s = p.into_os_string();
            s.push(".gz");
            PathBuf::from(s)
        };
        let mut candidates = vec![
            dir.join("eval_data").join(uri),
            gz(dir.join("eval_data").join(uri)),
            dir.join(uri),
            gz(dir.join(uri)),
            dir.join(&base),
            gz(dir.join(&base)),
        ];
        let mut note = None;
        if let Some((file, prov)) = tsv.get(&t.label) {
            candidates.push(dir.join(file));
            if prov.starts_with("PARTIAL") {
                note = Some(prov.clone());
            }
        }
        let data_path = first_existing(&candidates).ok_or_else(|| {
            EvalError::config(
                &yaml_path,
                format!(
                    "task {}: data file {} not found (looked in eval_data/, next to core.yaml, with and without .gz, and core_tasks.tsv)",
                    t.label, t.dataset_uri
                ),
            )
        })?;
        specs.push(TaskSpec {
            label: t.label,
            task_type,
            num_fewshot,
            continuation_delimiter: t.continuation_delimiter.unwrap_or_else(|| " ".into()),
            random_baseline,
            data_path,
            fields: FieldNames::default(),
            note,
        });
    }
    Ok(specs)
}
