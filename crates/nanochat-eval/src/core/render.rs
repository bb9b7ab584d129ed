//! Few-shot prompt rendering and token spans, reproducing nanochat's `core_eval.py` templates.
//!
//! The reference renders Jinja templates; their output is simple enough to build by string
//! concatenation: every few-shot example becomes `<context><delimiter><answer>\n\n`, then the
//! item itself follows with each option. Language-modeling contexts are whitespace-trimmed and
//! the "prompt without continuation" is stripped, so that it tokenizes to an exact prefix of the
//! prompt with the continuation.

use super::items::CoreItem;
use crate::model::EvalTokenizer;

/// Python's `str.isspace` for one character (Rust's `char::is_whitespace` lacks U+001C..U+001F).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// The text of one few-shot example, including the blank line that separates it from the next.
fn fewshot_block(example: &CoreItem, delimiter: &str) -> String {
    match example {
        CoreItem::MultipleChoice {
            query,
            choices,
            gold,
        } => format!("{query}{delimiter}{}\n\n", choices[*gold]),
        CoreItem::Schema {
            context_options,
            continuation,
            gold,
        } => format!("{}{delimiter}{continuation}\n\n", context_options[*gold]),
        CoreItem::LanguageModeling {
            context,
            continuation,
        } => format!("{}{delimiter}{continuation}\n\n", py_strip(context)),
    }
}

/// Rendered prompts of one item: one per option for multiple choice and schema, two
/// (without / with the continuation) for language modeling.
pub fn render_prompts(item: &CoreItem, delimiter: &str, fewshot: &[&CoreItem]) -> Vec<String> {
    let prefix: String = fewshot
        .iter()
        .map(|e| fewshot_block(e, delimiter))
        .collect();
    match item {
        CoreItem::MultipleChoice { query, choices, .. } => choices
            .iter()
            .map(|c| format!("{prefix}{query}{delimiter}{c}"))
            .collect(),
        CoreItem::Schema {
            context_options,
            continuation,
            ..
        } => context_options
            .iter()
            .map(|ctx| format!("{prefix}{ctx}{delimiter}{continuation}"))
            .collect(),
        CoreItem::LanguageModeling {
            context,
            continuation,
        } => {
            let base = format!("{prefix}{}{delimiter}", py_strip(context));
            let with = format!("{base}{continuation}");
            vec![py_strip(&base).to_string(), with]
        }
    }
}

/// The part of the rendered prompt that belongs to the item itself (for per-item results).
pub fn item_text(item: &CoreItem, delimiter: &str) -> String {
    match item {
        CoreItem::MultipleChoice { query, .. } => format!("{query}{delimiter}"),
        CoreItem::Schema { continuation, .. } => format!("<context>{delimiter}{continuation}"),
        CoreItem::LanguageModeling { context, .. } => format!("{}{delimiter}", py_strip(context)),
    }
}

/// Length of the common prefix (`from_left`) or suffix of all sequences.
pub fn common_length(seqs: &[Vec<u32>], from_left: bool) -> usize {
    let min_len = seqs.iter().map(Vec::len).min().unwrap_or(0);
    let first = &seqs[0];
    for i in 0..min_len {
        let at = |s: &Vec<u32>| {
            if from_left {
                s[i]
            } else {
                s[s.len() - 1 - i]
            }
        };
        let tok = at(first);
        if !seqs.iter().all(|s| at(s) == tok) {
            return i;
        }
    }
    min_len
}

/// Token sequences to score and, per sequence, the `[start, end)` span whose tokens are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoredSequences {
    /// BOS + prompt tokens, one row per option (one row for language modeling).
    pub tokens: Vec<Vec<u32>>,
    /// First scored token of each row.
    pub starts: Vec<usize>,
    /// One past the last scored token of each row.
    pub ends: Vec<usize>,
}

/// Tokenize prompts (BOS first) and locate the answer spans:
/// multiple choice scores everything after the options' common prefix (which is empty for an
/// option that is a token-prefix of another, as in 4 piqa items: its mean loss is then NaN, and
/// the reference's `min` semantics decide what happens — see [`super::pick_option`]);
/// schema scores the common suffix; language modeling scores the continuation tokens, which
/// must extend the context tokens exactly.
pub fn tokenize_spans(
    tokenizer: &dyn EvalTokenizer,
    item: &CoreItem,
    prompts: &[String],
) -> Result<ScoredSequences, String> {
    let bos = tokenizer.bos_id();
    let tokens: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut t = Vec::with_capacity(p.len() / 3 + 2);
            t.push(bos);
            t.extend(tokenizer.encode(p));
            t
        })
        .collect();
    match item {
        CoreItem::MultipleChoice { .. } => {
            let start = common_length(&tokens, true);
            let ends: Vec<usize> = tokens.iter().map(Vec::len).collect();
            Ok(ScoredSequences {
                starts: vec![start; tokens.len()],
                ends,
                tokens,
            })
        }
        CoreItem::Schema { .. } => {
            let suffix = common_length(&tokens, false);
            let ends: Vec<usize> = tokens.iter().map(Vec::len).collect();
            let starts = ends.iter().map(|e| e - suffix).collect();
            Ok(ScoredSequences {
                starts,
                ends,
                tokens,
            })
        }
        CoreItem::LanguageModeling { .. } => {
            let (without, with) = (&tokens[0], &tokens[1]);
            let (start, end) = (without.len(), with.len());
            if start >= end || with[..start] != without[..] {
                return Err(
                    "context tokens are not a strict prefix of context+continuation tokens"
                        .to_string(),
                );
            }
            Ok(ScoredSequences {
                tokens: vec![with.clone()],
                starts: vec![start],
                ends: vec![end],
            })
        }
    }
}

/// Crop rows longer than `max_len` from the left and shift their spans, as the reference does
/// for models with a fixed context. Fails when a span would no longer have a predicting position.
pub fn crop_left(seqs: &mut ScoredSequences, max_len: usize) -> Result<(), String> {
    for i in 0..seqs.tokens.len() {
        let len = seqs.tokens[i].len();
        if len > max_len {
            let crop = len - max_len;
            if seqs.starts[i] < crop + 1 {
                return Err(format!(
                    "answer span does not fit the model's {max_len}-token context"
                ));
            }
            seqs.tokens[i].drain(..crop);
            seqs.starts[i] -= crop;
            seqs.ends[i] -= crop;
        }
    }
    Ok(())
}
