//! `nanochat tok ...`: thin wrappers over nanochat-tokenizer.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::{load, usage};

#[derive(Subcommand)]
pub enum TokCommand {
    /// Train a nanochat BPE tokenizer on text / JSONL(.gz) files, streamed in order.
    Train(TrainArgs),
    /// Text to token ids (special-token names in the text are plain text).
    Encode(EncodeArgs),
    /// Token ids to text.
    Decode(DecodeArgs),
    /// Compression (bytes per token) on text files.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct TokenizerArg {
    /// Tokenizer directory (tokenizer.tiktoken + tokenizer.json).
    #[arg(long, env = "NANOCHAT_TOKENIZER")]
    tokenizer: PathBuf,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Corpus files: .jsonl(.gz) with a "text" field per line, or plain text (documents split
    /// at blank lines).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Directory to write tokenizer.tiktoken + tokenizer.json into.
    #[arg(short, long)]
    out: PathBuf,
    /// Vocabulary size, nanochat's 9 special tokens included.
    #[arg(long, default_value_t = 65536)]
    vocab_size: u32,
    /// Stop after this many characters of text.
    #[arg(long, default_value_t = 10_000_000_000)]
    max_chars: u64,
    /// Cut each document to this many characters.
    #[arg(long, default_value_t = 10_000)]
    doc_cap: usize,
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    tok: TokenizerArg,
    /// Text to encode ("-" or nothing reads stdin).
    text: Option<String>,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    tok: TokenizerArg,
    /// Ids, separated by spaces or commas (nothing reads them from stdin).
    ids: Vec<String>,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    tok: TokenizerArg,
    /// Text files to measure.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn stdin_text() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading stdin")?;
    Ok(s)
}

/// Parses "1 2,3" style id lists.
fn parse_ids(parts: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for word in parts
        .iter()
        .flat_map(|p| p.split(|c: char| c == ',' || c.is_whitespace()))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']'))
        .filter(|w| !w.is_empty())
    {
        match word.parse::<u32>() {
            Ok(id) => ids.push(id),
            Err(_) => usage!("{word:?} is not a token id (ids are non-negative integers)"),
        }
    }
    Ok(ids)
}

pub fn run(cmd: TokCommand, json_out: bool) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cmd {
        TokCommand::Train(a) => {
            if a.out.join("tokenizer.tiktoken").exists() {
                usage!(
                    "{} already holds a tokenizer; choose an empty --out directory",
                    a.out.display()
                );
            }
            let opts = nanochat_tokenizer::TrainOptions {
                vocab_size: a.vocab_size,
                max_chars: a.max_chars,
                doc_cap: a.doc_cap,
                ..Default::default()
            };
            let mut docs = Vec::new();
            for f in &a.files {
                docs.push(
                    nanochat_tokenizer::corpus::documents(f)
                        .with_context(|| format!("opening {}", f.display()))?,
                );
            }
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.set_message("training the tokenizer…");
            spinner.enable_steady_tick(std::time::Duration::from_millis(200));
            let start = std::time::Instant::now();
            let trained = nanochat_tokenizer::train_nanochat(docs.into_iter().flatten(), &opts);
            spinner.finish_and_clear();
            let (tok, stats) = trained.context("training the tokenizer")?;
            tok.save(&a.out)
                .with_context(|| format!("saving the tokenizer to {}", a.out.display()))?;
            let secs = start.elapsed().as_secs_f64();
            if json_out {
                serde_json::to_writer(
                    &mut out,
                    &json!({ "out": a.out.display().to_string(), "vocab_size": tok.vocab_size(),
                             "stats": stats, "seconds": secs }),
                )?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "trained vocab {} ({} merges) on {} documents, {} bytes in {secs:.2} s -> {}",
                    tok.vocab_size(),
                    stats.merges,
                    stats.documents,
                    stats.bytes,
                    a.out.display()
                )?;
            }
        }
        TokCommand::Encode(a) => {
            let tok = load::tokenizer(&a.tok.tokenizer)?;
            let text = match a.text.as_deref() {
                None | Some("-") => stdin_text()?,
                Some(t) => t.to_string(),
            };
            let ids = tok.encode(&text);
            if json_out {
                serde_json::to_writer(&mut out, &json!({ "ids": ids, "bytes": text.len() }))?;
                writeln!(out)?;
            } else {
                let s: Vec<String> = ids.iter().map(u32::to_string).collect();
                writeln!(out, "{}", s.join(" "))?;
            }
        }
        TokCommand::Decode(a) => {
            let tok = load::tokenizer(&a.tok.tokenizer)?;
            let ids = if a.ids.is_empty() {
                parse_ids(&[stdin_text()?])?
            } else {
                parse_ids(&a.ids)?
            };
            let vocab = tok.vocab_size();
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                usage!("token id {bad} is outside the vocabulary (size {vocab})");
            }
            let text = tok.decode(&ids);
            if json_out {
                serde_json::to_writer(&mut out, &json!({ "text": text }))?;
                writeln!(out)?;
            } else {
                out.write_all(text.as_bytes())?;
                writeln!(out)?;
            }
        }
        TokCommand::Eval(a) => {
            let tok = load::tokenizer(&a.tok.tokenizer)?;
            let mut rows = Vec::new();
            for f in &a.files {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let text = String::from_utf8_lossy(&bytes);
                let n = tok.encode(&text).len();
                let ratio = if n == 0 {
                    0.0
                } else {
                    text.len() as f64 / n as f64
                };
                rows.push(json!({
                    "file": f.display().to_string(),
                    "bytes": text.len(),
                    "tokens": n,
                    "bytes_per_token": ratio,
                }));
            }
            if json_out {
                serde_json::to_writer_pretty(&mut out, &rows)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:>12} {:>10} {:>12}  file",
                    "bytes", "tokens", "bytes/token"
                )?;
                for r in &rows {
                    writeln!(
                        out,
                        "{:>12} {:>10} {:>12.3}  {}",
                        r["bytes"],
                        r["tokens"],
                        r["bytes_per_token"].as_f64().unwrap_or(0.0),
                        r["file"].as_str().unwrap_or("")
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lists_parse_in_common_shapes() {
        let got = parse_ids(&["1 2,3".into(), "[4, 5]".into()]).unwrap_or_default();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        assert!(parse_ids(&["1 x".into()]).is_err());
        assert!(parse_ids(&["-1".into()]).is_err());
    }
}
