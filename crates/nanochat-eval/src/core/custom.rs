//! User-defined CORE-style tasks: a JSONL file plus a small TOML, no Rust needed.
//!
//! ```toml
//! label = "capitals"
//! type = "multiple_choice"        # multiple_choice | schema | language_modeling
//! data = "capitals.jsonl"         # relative to this TOML; .gz is fine
//! num_fewshot = 3
//! continuation_delimiter = "\nAnswer: "   # default " "
//! random_baseline = 25.0          # percent
//! [fields]                        # optional: where the fields live in each JSON line
//! query = "question"
//! choices = "options"
//! gold = "answer"
//! ```

use std::path::Path;

use serde::Deserialize;

use super::items::{FieldNames, TaskSpec, TaskType};
use crate::{EvalError, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomToml {
    label: String,
    #[serde(rename = "type")]
    task_type: String,
    data: String,
    #[serde(default)]
    num_fewshot: usize,
    #[serde(default = "default_delimiter")]
    continuation_delimiter: String,
    random_baseline: f64,
    #[serde(default)]
    fields: FieldNames,
    #[serde(default)]
    note: Option<String>,
}

fn default_delimiter() -> String {
    " ".into()
}

/// Parse a custom task TOML into a [`TaskSpec`].
pub fn load_custom_task(path: &Path) -> Result<TaskSpec> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let t: CustomToml =
        toml::from_str(&text).map_err(|e| EvalError::config(path, e.to_string()))?;
    let task_type = TaskType::parse(&t.task_type).ok_or_else(|| {
        EvalError::config(
            path,
            format!(
                "type = {:?}: expected multiple_choice, schema or language_modeling",
                t.task_type
            ),
        )
    })?;
    if !(0.0..100.0).contains(&t.random_baseline) {
        return Err(EvalError::config(
            path,
            format!(
                "random_baseline = {} must be a percentage in [0, 100)",
                t.random_baseline
            ),
        ));
    }
    let data_path = path.parent().unwrap_or(Path::new(".")).join(&t.data);
    if !data_path.is_file() {
        return Err(EvalError::config(
            path,
            format!("data file {} does not exist", data_path.display()),
        ));
    }
    Ok(TaskSpec {
        label: t.label,
        task_type,
        num_fewshot: t.num_fewshot,
        continuation_delimiter: t.continuation_delimiter,
        random_baseline: t.random_baseline,
        data_path,
        fields: t.fields,
        note: t.note,
    })
}
