//! `nanochat-data --config FILE.toml --out DIR --work DIR`: the data stage of a pipeline.
//!
//! Copies a dataset directory (`corpus/` shards and optional `chat/` task files) into the stage
//! output after checking that every corpus shard streams and every chat `.jsonl[.gz]` parses, so
//! later stages read a verified, content-addressed artifact. Config:
//! `source = "data/sample"` (relative paths are looked up from the current directory upwards).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nanochat_artifacts::stage::{StageArgs, StageContext};
use nanochat_data::{DocPosition, DocStream};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Directory holding `corpus/` (and optionally `chat/`).
    source: PathBuf,
}

fn find(source: &Path) -> Result<PathBuf> {
    if source.is_absolute() {
        return Ok(source.to_path_buf());
    }
    let mut dir = std::env::current_dir()?;
    loop {
        let cand = dir.join(source);
        if cand.is_dir() {
            return Ok(cand);
        }
        if !dir.pop() {
            bail!(
                "data source {} not found from the current directory or its parents",
                source.display()
            );
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dst).with_context(|| dst.display().to_string())?;
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .with_context(|| src.display().to_string())?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.is_file() {
            let to = dst.join(e.file_name());
            std::fs::copy(&p, &to).with_context(|| format!("copying {}", p.display()))?;
            files.push(to);
        }
    }
    Ok(files)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nanochat-data: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    nanochat_artifacts::stage::init_tracing("info");
    let ctx = StageContext::new(StageArgs::parse())?;
    let cfg: Config = ctx.config()?;
    let src = find(&cfg.source)?;
    let corpus_src = src.join("corpus");
    if !corpus_src.is_dir() {
        bail!("{} has no corpus/ directory", src.display());
    }
    let out = ctx.out_dir();
    let mut summary = serde_json::Map::new();
    let shards = nanochat_data::list_shards(&corpus_src, nanochat_data::Split::Train)?;
    drop(shards);
    for f in copy_dir(&corpus_src, &out.join("corpus"))? {
        if nanochat_data::ShardFormat::of(&f).is_none() {
            continue;
        }
        // Read every document once: a bad record fails here, naming the file.
        let mut s = DocStream::new(vec![f.clone()], 0, 1, DocPosition::default())?;
        let mut n = 0u64;
        while s.position().epoch == 0 {
            s.next_doc()?;
            n += 1;
        }
        tracing::info!(shard = %f.display(), docs = n, "corpus shard ok");
        summary.insert(
            format!(
                "corpus/{}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ),
            n.into(),
        );
    }
    let chat_src = src.join("chat");
    if chat_src.is_dir() {
        for f in copy_dir(&chat_src, &out.join("chat"))? {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
                let rows: Vec<serde_json::Value> = nanochat_data::tasks::read_jsonl(&f)?;
                summary.insert(format!("chat/{name}"), rows.len().into());
            }
        }
    }
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(())
}
