//! CORE task specs and items, parsed from the bundle's JSONL formats.

use serde::{Deserialize, Serialize};

/// The three in-context-learning task types of the DCLM/llm-foundry eval bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// One query, several continuations (`{query, choices[], gold}`); lowest mean loss wins.
    MultipleChoice,
    /// Several contexts, one continuation (`{context_options[], continuation, gold}`).
    Schema,
    /// Greedy decoding must reproduce the continuation exactly (`{context, continuation}`).
    LanguageModeling,
}

impl TaskType {
    /// Parse the bundle's `icl_task_type` string.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "multiple_choice" => Some(TaskType::MultipleChoice),
            "schema" => Some(TaskType::Schema),
            "language_modeling" => Some(TaskType::LanguageModeling),
            _ => None,
        }
    }

    /// The bundle's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::MultipleChoice => "multiple_choice",
            TaskType::Schema => "schema",
            TaskType::LanguageModeling => "language_modeling",
        }
    }
}

/// Where each field of an item lives in the JSON (custom tasks may rename them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldNames {
    /// Multiple choice: the question text.
    pub query: String,
    /// Multiple choice: the candidate continuations.
    pub choices: String,
    /// Multiple choice / schema: index of the right option.
    pub gold: String,
    /// Schema: the candidate contexts.
    pub context_options: String,
    /// Schema / language modeling: the continuation.
    pub continuation: String,
    /// Language modeling: the context.
    pub context: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            query: "query".into(),
            choices: "choices".into(),
            gold: "gold".into(),
            context_options: "context_options".into(),
            continuation: "continuation".into(),
            context: "context".into(),
        }
    }
}

/// Everything needed to evaluate one CORE-style task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Task label (e.g. `hellaswag_zeroshot`).
    pub label: String,
    /// Task type.
    pub task_type: TaskType,
    /// Number of few-shot examples drawn from the same task.
    pub num_fewshot: usize,
    /// Text between context and continuation (`" "` or `"\nAnswer: "` in the bundle).
    pub continuation_delimiter: String,
    /// Random-guess accuracy in percent (the bundle's `Random baseline` column).
    pub random_baseline: f64,
    /// The data file (JSONL or JSONL.gz).
    pub data_path: std::path::PathBuf,
    /// Field names in the data file.
    #[serde(default)]
    pub fields: FieldNames,
    /// Caveat printed next to the score (e.g. a partial data file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One parsed item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoreItem {
    /// See [`TaskType::MultipleChoice`].
    MultipleChoice {
        /// Question text.
        query: String,
        /// Candidate continuations.
        choices: Vec<String>,
        /// Index of the right choice.
        gold: usize,
    },
    /// See [`TaskType::Schema`].
    Schema {
        /// Candidate contexts.
        context_options: Vec<String>,
        /// Shared continuation.
        continuation: String,
        /// Index of the right context.
        gold: usize,
    },
    /// See [`TaskType::LanguageModeling`].
    LanguageModeling {
        /// Context.
        context: String,
        /// Expected continuation.
        continuation: String,
    },
}

impl CoreItem {
    /// The gold option index (`None` for language modeling).
    pub fn gold(&self) -> Option<usize> {
        match self {
            CoreItem::MultipleChoice { gold, .. } | CoreItem::Schema { gold, .. } => Some(*gold),
            CoreItem::LanguageModeling { .. } => None,
        }
    }

    /// Human-readable expected answer, for per-item results.
    pub fn expected(&self) -> String {
        match self {
            CoreItem::MultipleChoice { choices, gold, .. } => choices[*gold].clone(),
            CoreItem::Schema {
                context_options,
                gold,
                ..
            } => context_options[*gold].clone(),
            CoreItem::LanguageModeling { continuation, .. } => continuation.clone(),
        }
    }

    /// Parse one JSON object as an item of `task_type`, explaining what is wrong if it is not.
    pub fn from_json(
        value: &serde_json::Value,
        task_type: TaskType,
        fields: &FieldNames,
    ) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| "expected a JSON object".to_string())?;
        let get = |name: &str| {
            obj.get(name)
                .ok_or_else(|| format!("missing field `{name}`"))
        };
        let text = |name: &str| -> Result<String, String> { as_text(get(name)?, name) };
        let list = |name: &str| -> Result<Vec<String>, String> {
            let arr = get(name)?
                .as_array()
                .ok_or_else(|| format!("field `{name}` must be a list"))?;
            if arr.is_empty() {
                return Err(format!("field `{name}` is an empty list"));
            }
            arr.iter()
                .enumerate()
                .map(|(i, v)| as_text(v, &format!("{name}[{i}]")))
                .collect()
        };
        let gold = |n: usize| -> Result<usize, String> {
            let g = get(&fields.gold)?;
            let g = g
                .as_u64()
                .or_else(|| g.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| format!("field `{}` must be a non-negative integer", fields.gold))?
                as usize;
            if g >= n {
                return Err(format!(
                    "`{}` = {g} is out of range for {n} options",
                    fields.gold
                ));
            }
            Ok(g)
        };
        match task_type {
            TaskType::MultipleChoice => {
                let choices = list(&fields.choices)?;
                let gold = gold(choices.len())?;
                Ok(CoreItem::MultipleChoice {
                    query: text(&fields.query)?,
                    gold,
                    choices,
                })
            }
            TaskType::Schema => {
                let context_options = list(&fields.context_options)?;
                let gold = gold(context_options.len())?;
                Ok(CoreItem::Schema {
                    continuation: text(&fields.continuation)?,
                    gold,
                    context_options,
                })
            }
            TaskType::LanguageModeling => Ok(CoreItem::LanguageModeling {
                context: text(&fields.context)?,
                continuation: text(&fields.continuation)?,
            }),
        }
    }
}

/// Render a JSON scalar the way Python's `str()` inside a Jinja template would for the
/// values that occur in practice (strings verbatim, numbers in decimal).
fn as_text(v: &serde_json::Value, name: &str) -> Result<String, String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        _ => Err(format!("field `{name}` must be a string")),
    }
}
