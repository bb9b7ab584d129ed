//! `nanochat-report`: the report-card stage, and `--compare A B` for two report JSONs.
//!
//! Stage use (nanochat-run): `nanochat-report --config report.toml --input NAME=DIR ... --out DIR --work DIR`
//! writes `report.md`, `report.json` and `curves/*.svg` from the inputs' `metrics.json` and
//! training logs. Comparison: `nanochat-report --compare A/report.json B/report.json`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use nanochat_eval::report;

#[derive(Debug, Parser)]
#[command(
    about = "Build the nanochat report card from stage artifacts, or compare two report cards"
)]
struct Cli {
    /// Compare two report.json files (or directories holding one) instead of building a report.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<PathBuf>>,
    /// Stage config (TOML): optional `title`, `sections` (input names in display order).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Input artifact as NAME=DIR (repeatable); sections appear in this order.
    #[arg(long = "input", value_name = "NAME=DIR")]
    inputs: Vec<String>,
    /// Output directory (filled with report.md, report.json, curves/).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Work directory (unused; part of the stage contract).
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportConfig {
    #[serde(default)]
    title: Option<String>,
    /// Section order by input name (nanochat-run passes inputs sorted by name); inputs not
    /// listed follow in the order given.
    #[serde(default)]
    sections: Vec<String>,
}

fn report_path(p: &std::path::Path) -> PathBuf {
    if p.is_dir() {
        p.join("report.json")
    } else {
        p.to_path_buf()
    }
}

fn main() -> anyhow::Result<()> {
    nanochat_artifacts::stage::init_tracing("info");
    let cli = Cli::parse();
    if let Some(pair) = &cli.compare {
        let (a, b) = (report_path(&pair[0]), report_path(&pair[1]));
        let ra = report::load_report(&a)?;
        let rb = report::load_report(&b)?;
        print!(
            "{}",
            report::compare_markdown(&ra, &rb, &a.display().to_string(), &b.display().to_string())
        );
        return Ok(());
    }
    let Some(out) = &cli.out else {
        bail!("--out DIR is required (or use --compare A B)");
    };
    let cfg: ReportConfig = match &cli.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid report config", p.display()))?
        }
        None => ReportConfig::default(),
    };
    let mut inputs = Vec::new();
    for spec in &cli.inputs {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--input {spec:?}: expected NAME=DIR");
        };
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            bail!("--input {name}={}: not a directory", dir.display());
        }
        inputs.push((name.to_string(), dir));
    }
    if let Some(w) = &cli.work {
        std::fs::create_dir_all(w).with_context(|| format!("creating {}", w.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for name in &cfg.sections {
        if !inputs.iter().any(|(n, _)| n == name) {
            bail!(
                "report config: sections names {name:?}, which is not an input (inputs: {})",
                inputs
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    inputs.sort_by_key(|(n, _)| {
        cfg.sections
            .iter()
            .position(|s| s == n)
            .unwrap_or(cfg.sections.len())
    });
    let title = cfg
        .title
        .unwrap_or_else(|| "nanochat-rs report card".into());
    let card = report::build_report(&title, &inputs, out)?;
    report::write_report(&card, out)?;
    eprintln!("{}", report::summary_table(&card));
    eprintln!("wrote {}", out.join("report.md").display());
    Ok(())
}
