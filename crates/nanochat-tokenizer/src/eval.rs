//! Compression evaluation (nanochat's `tok_eval`): bytes per token of several kinds of text,
//! for our tokenizer next to baselines such as GPT-2 (`r50k_base`) and GPT-4 (`cl100k_base`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Tokenizer};

/// Short texts of different kinds, written for this crate (prose, non-Latin script, code,
/// LaTeX, scientific prose with symbols).
pub const BUILTIN_TEXTS: [(&str, &str); 5] = [
    (
        "news",
        "City officials said on Tuesday that the new river bridge, closed since March for \
         repairs, will reopen to traffic on October 14, two weeks ahead of schedule. \"We \
         expected the steel work to take longer,\" the transport director told reporters, \
         adding that the total cost came to $18.4 million, about 6% under budget. Cyclists \
         will get a separate lane for the first time.",
    ),
    (
        "korean",
        "오늘 아침 서울의 기온은 영하 3도까지 내려갔습니다. 기상청은 이번 주말까지 추운 날씨가 \
         이어질 것으로 예상하며, 외출할 때 따뜻한 옷을 준비하라고 당부했습니다. 한편 남부 지방에는 \
         비 소식이 있습니다.",
    ),
    (
        "code",
        "fn merge_counts(a: &mut HashMap<String, u64>, b: HashMap<String, u64>) {\n    for (k, v) in b {\n        *a.entry(k).or_insert(0) += v;\n    }\n}\n\n#[test]\nfn merges() {\n    let mut a = HashMap::from([(\"x\".to_string(), 1)]);\n    merge_counts(&mut a, HashMap::from([(\"x\".to_string(), 2)]));\n    assert_eq!(a[\"x\"], 3);\n}\n",
    ),
    (
        "math",
        "\\begin{lemma}\nFor all $n \\ge 1$, $\\sum_{k=1}^{n} (2k-1) = n^2$.\n\\end{lemma}\n\\begin{proof}\nFor $n=1$ both sides equal $1$. If it holds for $n$, then\n\\[ \\sum_{k=1}^{n+1} (2k-1) = n^2 + 2n + 1 = (n+1)^2. \\]\n\\end{proof}\n",
    ),
    (
        "science",
        "In aerobic respiration, glucose (C₆H₁₂O₆) is oxidised to CO₂ while O₂ is reduced to \
         water; the free energy released, roughly −2870 kJ·mol⁻¹, is captured by oxidative \
         phosphorylation as a proton gradient across the inner mitochondrial membrane that \
         drives ATP synthase.",
    ),
];

/// Token count and ratio of one tokenizer on one text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Compression {
    /// Tokens produced.
    pub tokens: usize,
    /// UTF-8 bytes per token (higher is better).
    pub ratio: f64,
}

/// One text kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalRow {
    /// Kind of text (`news`, `code`, `train`, ...).
    pub name: String,
    /// UTF-8 bytes of the text.
    pub bytes: usize,
    /// Per tokenizer (by the name given to [`evaluate`]).
    pub results: BTreeMap<String, Compression>,
}

/// The whole report (written as `tok_eval.json` by the tokenizer stage).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Vocabulary size of every tokenizer.
    pub vocab_sizes: BTreeMap<String, u32>,
    /// One row per text.
    pub rows: Vec<EvalRow>,
}

/// Encodes every text with every tokenizer, checks that decoding gives the text back, and
/// reports bytes per token.
pub fn evaluate(
    tokenizers: &[(&str, &Tokenizer)],
    texts: &[(String, String)],
) -> Result<EvalReport, Error> {
    let mut rows = Vec::new();
    for (name, text) in texts {
        let mut results = BTreeMap::new();
        for (tname, tok) in tokenizers {
            let ids = tok.encode(text);
            if tok.decode_bytes(&ids) != text.as_bytes() {
                return Err(Error::Vocab(format!(
                    "{tname} does not round-trip the {name} text"
                )));
            }
            let ratio = if ids.is_empty() {
                0.0
            } else {
                text.len() as f64 / ids.len() as f64
            };
            results.insert(
                tname.to_string(),
                Compression {
                    tokens: ids.len(),
                    ratio,
                },
            );
        }
        rows.push(EvalRow {
            name: name.clone(),
            bytes: text.len(),
            results,
        });
    }
    Ok(EvalReport {
        vocab_sizes: tokenizers
            .iter()
            .map(|(n, t)| (n.to_string(), t.vocab_size()))
            .collect(),
        rows,
    })
}

impl EvalReport {
    /// Markdown: `ours`' compression of every text, then a table comparing it with each
    /// other tokenizer, like nanochat's report: relative difference = (baseline tokens - our
    /// tokens) / baseline tokens.
    pub fn markdown(&self, ours: &str) -> String {
        let mut out = format!(
            "### Compression ({ours}, {} tokens)\n\n| Text Type | Bytes | Tokens | Bytes per token |\n|---|---:|---:|---:|\n",
            self.vocab_sizes.get(ours).copied().unwrap_or(0)
        );
        for row in &self.rows {
            if let Some(o) = row.results.get(ours) {
                out.push_str(&format!(
                    "| {} | {} | {} | {:.2} |\n",
                    row.name, row.bytes, o.tokens, o.ratio
                ));
            }
        }
        out.push('\n');
        if self.vocab_sizes.len() < 2 {
            out.push_str(
                "No baseline vocabularies given (the tokenizer stage's `baselines` input or \
                 `baselines_dir`), so no comparison with GPT-2 / GPT-4.\n\n",
            );
        }
        for baseline in self.vocab_sizes.keys().filter(|k| k.as_str() != ours) {
            out.push_str(&format!("### Comparison with {baseline}\n\n"));
            out.push_str(&format!(
                "| Text Type | Bytes | {baseline} Tokens | {baseline} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |\n"
            ));
            out.push_str("|---|---|---|---|---|---|---|\n");
            for row in &self.rows {
                let (Some(b), Some(o)) = (row.results.get(baseline), row.results.get(ours)) else {
                    continue;
                };
                let diff = if b.tokens == 0 {
                    0.0
                } else {
                    (b.tokens as f64 - o.tokens as f64) / b.tokens as f64 * 100.0
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {:.2} | {} | {:.2} | {:+.1}% |\n",
                    row.name, row.bytes, b.tokens, b.ratio, o.tokens, o.ratio, diff
                ));
            }
            out.push('\n');
        }
        out
    }
}

/// The built-in texts as owned `(name, text)` pairs, ready for [`evaluate`].
pub fn builtin_texts() -> Vec<(String, String)> {
    BUILTIN_TEXTS
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

#[cfg(test)]
mod markdown_tests {
    use super::*;

    #[test]
    fn markdown_shows_our_compression_even_without_baselines() {
        let report = EvalReport {
            vocab_sizes: BTreeMap::from([("ours".to_string(), 300)]),
            rows: vec![EvalRow {
                name: "news".into(),
                bytes: 100,
                results: BTreeMap::from([(
                    "ours".to_string(),
                    Compression {
                        tokens: 40,
                        ratio: 2.5,
                    },
                )]),
            }],
        };
        let md = report.markdown("ours");
        assert!(md.contains("| news | 100 | 40 | 2.50 |"), "{md}");
        assert!(md.contains("No baseline vocabularies"), "{md}");
        assert!(!md.contains("Comparison with"), "{md}");
    }
}
