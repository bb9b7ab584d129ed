//! `nanochat-tokenizer`: the tokenizer pipeline stage.
//!
//! `nanochat-tokenizer --config FILE.toml --input corpus=DIR [--input baselines=DIR] --out DIR --work DIR`
//!
//! Trains a nanochat BPE tokenizer on the corpus shards (`*.jsonl`, `*.jsonl.gz`, `*.txt`, in
//! name order) and writes `tokenizer.tiktoken`, `tokenizer.json`, `train_report.json` and
//! `tok_eval.json` (+ `tok_eval.md`) into `--out`; the training time goes to the run dir
//! (`telemetry.json`). Baseline vocabularies for the evaluation
//! (`r50k_base.tiktoken[.gz]`, `cl100k_base.tiktoken[.gz]`) come from the optional `baselines`
//! input or the `baselines_dir` config key.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nanochat_artifacts::stage::{self, StageContext};
use nanochat_tokenizer::{
    corpus, eval, train_nanochat, Error as TokError, OpenAiEncoding, Tokenizer, TrainOptions,
};

/// The stage's TOML config.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Total vocabulary size, nanochat's 9 specials included.
    #[serde(default = "default_vocab")]
    vocab_size: u32,
    /// Stop after this many characters.
    #[serde(default = "default_max_chars")]
    max_chars: u64,
    /// Cut each document to this many characters.
    #[serde(default = "default_doc_cap")]
    doc_cap: usize,
    /// Name of the input holding the corpus.
    #[serde(default = "default_input")]
    input: String,
    /// File-name patterns (`*` and `?`) of the training shards inside the input.
    #[serde(default = "default_files")]
    files: Vec<String>,
    /// File-name patterns never trained on (held-out shards).
    #[serde(default = "default_val")]
    exclude: Vec<String>,
    /// File-name patterns of held-out shards, evaluated as `val` (first file only).
    #[serde(default = "default_val")]
    val_files: Vec<String>,
    /// Directory with baseline `.tiktoken` files when no `baselines` input is given.
    #[serde(default)]
    baselines_dir: Option<PathBuf>,
}

fn default_vocab() -> u32 {
    65536
}
fn default_max_chars() -> u64 {
    10_000_000_000
}
fn default_doc_cap() -> usize {
    10_000
}
fn default_input() -> String {
    "corpus".into()
}
fn default_val() -> Vec<String> {
    vec!["val*".into()]
}
fn default_files() -> Vec<String> {
    vec![
        "*.jsonl".into(),
        "*.jsonl.gz".into(),
        "*.txt".into(),
        "*.txt.gz".into(),
        "*.parquet".into(),
    ]
}

/// `*` (any run) and `?` (one character) on a file name.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// Documents of one shard: parquet (`text` column, read row group by row group through
/// nanochat-data's pure-Rust reader) or anything `corpus::documents` reads (jsonl, text, gzip).
fn shard_documents(path: &Path) -> Result<Box<dyn Iterator<Item = DocResult> + Send>, TokError> {
    if nanochat_data::ShardFormat::of(path) == Some(nanochat_data::ShardFormat::Parquet) {
        let data_err = |e: nanochat_data::DataError| TokError::Format {
            path: path.to_path_buf(),
            line: 0,
            msg: e.to_string(),
        };
        let reader =
            nanochat_data::parquet::ParquetTextReader::open(path, "text").map_err(data_err)?;
        Ok(Box::new(ParquetDocs {
            reader,
            path: path.to_path_buf(),
            next_group: 0,
            buffered: Vec::new().into_iter(),
        }))
    } else {
        Ok(Box::new(corpus::documents(path)?))
    }
}

type DocResult = Result<String, TokError>;

/// Streams a parquet shard's `text` column one row group at a time, so memory stays bounded
/// by the largest row group (nanochat writes 1000 documents per group).
struct ParquetDocs {
    reader: nanochat_data::parquet::ParquetTextReader,
    path: PathBuf,
    next_group: usize,
    buffered: std::vec::IntoIter<String>,
}

impl Iterator for ParquetDocs {
    type Item = DocResult;

    fn next(&mut self) -> Option<DocResult> {
        loop {
            if let Some(doc) = self.buffered.next() {
                return Some(Ok(doc));
            }
            if self.next_group >= self.reader.num_row_groups() {
                return None;
            }
            let group = self.next_group;
            self.next_group += 1;
            match self.reader.read_row_group(group) {
                Ok(docs) => self.buffered = docs.into_iter(),
                Err(e) => {
                    self.next_group = usize::MAX;
                    return Some(Err(TokError::Format {
                        path: self.path.clone(),
                        line: 0,
                        msg: format!("row group {group}: {e}"),
                    }));
                }
            }
        }
    }
}

fn matching_files(dir: &Path, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && patterns.iter().any(|p| glob_match(p, &name)) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn find_vocab(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.tiktoken"), format!("{stem}.tiktoken.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

fn main() {
    stage::run_main("nanochat-tokenizer", |ctx| {
        run(ctx)
            .map(|()| 0)
            .or_else(|e| match stage::interrupt_exit_code() {
                Some(code) => {
                    eprintln!("nanochat-tokenizer: error: {e:#}");
                    Ok(code)
                }
                None => Err(e),
            })
    })
}

fn run(ctx: &StageContext) -> Result<()> {
    let cfg: Config = ctx.config()?;
    // The data stage's artifact keeps its shards under `corpus/`; a bare directory of shards
    // works too.
    let input_dir = ctx.input(&cfg.input)?.to_path_buf();
    let corpus_dir = if input_dir.join("corpus").is_dir() {
        input_dir.join("corpus")
    } else {
        input_dir
    };
    let mut files = matching_files(&corpus_dir, &cfg.files)?;
    files.retain(|f| {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        !cfg.exclude.iter().any(|p| glob_match(p, &name))
    });
    if files.is_empty() {
        bail!(
            "no corpus files matching {:?} in {} (input {:?}); set `files` in the config",
            cfg.files,
            corpus_dir.display(),
            cfg.input
        );
    }
    tracing::info!(
        files = files.len(),
        vocab_size = cfg.vocab_size,
        "training tokenizer"
    );
    let opts = TrainOptions {
        vocab_size: cfg.vocab_size,
        max_chars: cfg.max_chars,
        doc_cap: cfg.doc_cap,
        ..TrainOptions::default()
    };
    let progress = indicatif::ProgressBar::new(files.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut first_docs: Vec<String> = Vec::new();
    let mut interrupted = false;
    let docs = files.iter().enumerate().flat_map(|(i, path)| {
        progress.set_position(i as u64);
        progress.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        match shard_documents(path) {
            Ok(d) => d,
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    });
    // Keep the first shard's first documents for the `train` row of the evaluation, and stop
    // early (with an error) on SIGINT/SIGTERM.
    let docs = docs
        .inspect(|d| {
            if let Ok(d) = d {
                if first_docs.len() < 256 {
                    first_docs.push(d.clone());
                }
            }
        })
        .take_while(|_| {
            interrupted = stage::interrupted();
            !interrupted
        });
    let t0 = Instant::now();
    let result = train_nanochat(docs, &opts);
    progress.finish_and_clear();
    if interrupted || stage::interrupted() {
        bail!("interrupted; nothing written (training restarts from scratch)");
    }
    let (tok, stats) = result.context("training the tokenizer")?;
    let train_seconds = t0.elapsed().as_secs_f64();
    tracing::info!(?stats, train_seconds, "trained");

    let out = ctx.out_dir();
    tok.save(out).context("saving the tokenizer")?;

    let nonzero: Vec<f64> = tok
        .token_bytes()
        .iter()
        .filter(|&&b| b > 0)
        .map(|&b| b as f64)
        .collect();
    let mean = nonzero.iter().sum::<f64>() / nonzero.len().max(1) as f64;
    let var = nonzero.iter().map(|b| (b - mean).powi(2)).sum::<f64>()
        / (nonzero.len().saturating_sub(1)).max(1) as f64;
    let report = serde_json::json!({
        "options": opts,
        "stats": stats,
        "vocab_size": tok.vocab_size(),
        "num_special_tokens": tok.specials().len(),
        "token_bytes_min": nonzero.iter().cloned().fold(f64::INFINITY, f64::min),
        "token_bytes_max": nonzero.iter().cloned().fold(0.0, f64::max),
        "token_bytes_mean": mean,
        "token_bytes_std": var.sqrt(),
    });
    stage::write_atomic(
        &out.join("train_report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    // The duration differs on every run: it goes to the run dir, not into the artifact.
    ctx.write_run_file(
        "telemetry.json",
        serde_json::to_string_pretty(&serde_json::json!({ "train_seconds": train_seconds }))?
            .as_bytes(),
    )?;

    // Compression report.
    let mut texts = eval::builtin_texts();
    texts.push(("train".into(), first_docs.join("\n")));
    let val_files = if cfg.val_files.is_empty() {
        Vec::new()
    } else {
        matching_files(&corpus_dir, &cfg.val_files)?
    };
    if let Some(v) = val_files.first() {
        let docs: Vec<String> = shard_documents(v)?.take(256).collect::<Result<_, _>>()?;
        texts.push(("val".into(), docs.join("\n")));
    }
    let baselines_dir = match ctx.inputs().get("baselines") {
        Some(d) => Some(d.clone()),
        None => cfg.baselines_dir.clone(),
    };
    let mut baselines = Vec::new();
    if let Some(dir) = &baselines_dir {
        for (label, enc) in [
            ("GPT-2", OpenAiEncoding::R50kBase),
            ("GPT-4", OpenAiEncoding::Cl100kBase),
        ] {
            match find_vocab(dir, enc.name()) {
                Some(p) => baselines.push((label, Tokenizer::from_openai_file(&p, enc)?)),
                None => tracing::warn!(
                    "{} has no {}.tiktoken; skipping {label}",
                    dir.display(),
                    enc.name()
                ),
            }
        }
    }
    let mut all: Vec<(&str, &Tokenizer)> = vec![("ours", &tok)];
    all.extend(baselines.iter().map(|(l, t)| (*l, t)));
    let report = eval::evaluate(&all, &texts)?;
    let markdown = report.markdown("ours");
    eprintln!("{markdown}");
    stage::write_atomic(
        &out.join("tok_eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    stage::write_atomic(&out.join("tok_eval.md"), markdown.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*.jsonl.gz", "shard_00000.jsonl.gz"));
        assert!(!glob_match("*.jsonl", "shard_00000.jsonl.gz"));
        assert!(glob_match("shard_0000?.*", "shard_00001.txt"));
        assert!(!glob_match("val*", "shard_00000.jsonl.gz"));
    }
}
