//! `nanochat-run`: runs a pipeline of stage binaries through the content-addressed store.
//!
//! Stages are separate processes speaking the stage CLI contract (docs/artifacts.md); this
//! binary plans which stages need to run (action cache + verification), runs them in
//! topological order (optionally in parallel), captures their logs, publishes their outputs
//! atomically, and records every run.

mod pipeline;
mod plan;
mod runner;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nanochat_artifacts::{ArtifactStore, GcOptions, ObjectId, VerifyMode};

const AFTER_HELP: &str = "\
Examples:
  nanochat-run pipelines/tiny.yaml            run (or resume) the tiny pipeline
  nanochat-run tiny.yaml --dry-run            show what would run and why
  nanochat-run tiny --only pretrain           rerun one stage from cached inputs
  nanochat-run status tiny                    which stages are cached or stale
  nanochat-run gc --delete                    remove unreachable objects
  nanochat-run serve --ref latest/sft -- --port 8000
  nanochat-run serve --pipeline speedrun      the pipeline's serve target (its sft model)
  nanochat-run speedrun --dry-run             every stage explained, and the data to fetch
  nanochat-run report --compare runs/a/report runs/b/report
                                              two report cards side by side, with deltas

A PIPELINE argument that is not an existing file is looked up as pipelines/<NAME> and
pipelines/<NAME>.yaml. Stage binaries are found next to nanochat-run first, then on PATH
(build them with `cargo build --release --bins`). Store layout and the stage contract:
docs/artifacts.md.";

/// Run a nanochat pipeline: a DAG of stage processes exchanging content-addressed artifacts.
#[derive(Debug, Parser)]
#[command(
    name = "nanochat-run",
    version,
    after_long_help = AFTER_HELP,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Artifact store directory.
    #[arg(
        long,
        global = true,
        env = "NANOCHAT_ARTIFACTS",
        default_value = "artifacts",
        value_name = "DIR"
    )]
    store: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Pipeline YAML file, or a name looked up in pipelines/.
    #[arg(value_name = "PIPELINE", required = true)]
    pipeline: Option<String>,

    /// Run up to N independent stages at the same time.
    #[arg(short, long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: u32,

    /// Rerun STAGE even if it is cached (its work dir is discarded). Repeatable.
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,

    /// Rerun only STAGE, taking its inputs from the cache (they must be up to date). Repeatable.
    #[arg(long, value_name = "STAGE", conflicts_with = "from")]
    only: Vec<String>,

    /// Rerun STAGE and then whatever downstream of it needs to run; upstream stages must be
    /// cached.
    #[arg(long, value_name = "STAGE")]
    from: Option<String>,

    /// Print what would run and why (changed config, input or binary; missing output); run
    /// nothing.
    #[arg(long)]
    dry_run: bool,

    /// After a stage fails, keep running stages that do not depend on it.
    #[arg(long)]
    keep_going: bool,

    /// Re-hash every file of cached outputs before trusting them (default: sizes + manifest).
    #[arg(long)]
    verify_full: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show which stages of a pipeline are cached or stale, and why.
    Status {
        /// Pipeline YAML file, or a name looked up in pipelines/.
        pipeline: String,
        /// Re-hash cached outputs instead of the fast size check.
        #[arg(long)]
        verify_full: bool,
    },
    /// Delete objects that no ref or action-cache entry reaches (dry run unless --delete).
    Gc {
        /// Actually delete; without it, only report what would be removed.
        #[arg(long)]
        delete: bool,
        /// Keep unreachable objects and temp dirs younger than this many seconds (protects
        /// concurrent runs).
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        grace: u64,
    },
    /// Check objects against their manifests and name every damaged file.
    Verify {
        /// Refs (e.g. latest/sft) or object ids; default: every object in the store.
        targets: Vec<String>,
        /// Re-hash every file (default: sizes + manifest only).
        #[arg(long)]
        full: bool,
    },
    /// List refs (human names for objects).
    Refs,
    /// Start the inference server (`nanochat-inference`) on a stored model.
    Serve {
        /// Ref or object id of the model artifact (default: latest/sft).
        #[arg(long = "ref", value_name = "REF", conflicts_with = "pipeline")]
        reference: Option<String>,
        /// Serve the pipeline's `serve:` target instead: that stage's output of the pipeline's
        /// last run (runs/<pipeline>/<stage>), with the server config the pipeline names.
        #[arg(long, value_name = "PIPELINE")]
        pipeline: Option<String>,
        /// Extra arguments passed to nanochat-inference (after `--`).
        #[arg(last = true, value_name = "ARGS")]
        passthrough: Vec<String>,
    },
    /// Work with report cards (`nanochat-report`).
    Report {
        /// Print two report cards side by side with deltas. Each of A and B is a ref (e.g.
        /// runs/tiny/report, latest/report), an object id, a report.json file or a directory
        /// holding one.
        #[arg(long, num_args = 2, value_names = ["A", "B"], required = true)]
        compare: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = indicatif::MultiProgress::new();
    init_tracing(progress.clone());
    match real_main(cli, progress) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(cli: Cli, progress: indicatif::MultiProgress) -> Result<ExitCode> {
    let open_store = || {
        // Absolute, so the paths handed to stage processes do not depend on their cwd.
        let root = std::path::absolute(&cli.store)
            .with_context(|| format!("resolving {}", cli.store.display()))?;
        ArtifactStore::open(&root)
            .with_context(|| format!("opening artifact store {}", cli.store.display()))
    };
    match cli.command {
        None => {
            let store = open_store()?;
            let Some(p) = cli.run.pipeline.as_deref() else {
                bail!("missing PIPELINE (see --help)");
            };
            let pipeline = load_pipeline(p)?;
            let opts = runner::RunOptions {
                jobs: cli.run.jobs as usize,
                force: cli.run.force,
                only: cli.run.only,
                from: cli.run.from,
                dry_run: cli.run.dry_run,
                keep_going: cli.run.keep_going,
                verify: if cli.run.verify_full {
                    VerifyMode::Full
                } else {
                    VerifyMode::Fast
                },
            };
            runner::run(&store, &pipeline, &opts, progress)
        }
        Some(Command::Status {
            pipeline,
            verify_full,
        }) => {
            let store = open_store()?;
            let pipeline = load_pipeline(&pipeline)?;
            let mode = if verify_full {
                VerifyMode::Full
            } else {
                VerifyMode::Fast
            };
            runner::status(&store, &pipeline, mode)
        }
        Some(Command::Gc { delete, grace }) => {
            let store = open_store()?;
            let report = store.gc(&GcOptions {
                delete,
                grace: std::time::Duration::from_secs(grace),
            })?;
            let mut out = std::io::stdout().lock();
            for (id, bytes) in &report.unreachable {
                writeln!(
                    out,
                    "{} {id} ({bytes} bytes)",
                    if delete { "deleted" } else { "unreachable" }
                )?;
            }
            for p in &report.stale_tmp {
                writeln!(
                    out,
                    "{} {}",
                    if delete { "deleted" } else { "stale temp" },
                    p.display()
                )?;
            }
            writeln!(
                out,
                "{} reachable, {} unreachable ({} bytes){}, {} too young to collect{}",
                report.reachable,
                report.unreachable.len(),
                report.unreachable_bytes(),
                if delete { " deleted" } else { "" },
                report.young,
                if delete {
                    ""
                } else {
                    "; dry run: pass --delete to remove"
                }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Verify { targets, full }) => {
            let store = open_store()?;
            let mode = if full {
                VerifyMode::Full
            } else {
                VerifyMode::Fast
            };
            let ids: Vec<(String, ObjectId)> = if targets.is_empty() {
                store
                    .list_objects()?
                    .into_iter()
                    .map(|id| (id.to_string(), id))
                    .collect()
            } else {
                targets
                    .iter()
                    .map(|t| Ok((t.clone(), resolve_target(&store, t)?)))
                    .collect::<Result<_>>()?
            };
            let mut bad = 0;
            for (label, id) in &ids {
                match store.verify(id, mode) {
                    Ok(()) => println!("ok      {label}"),
                    Err(nanochat_artifacts::Error::Corrupt { problems, .. }) => {
                        bad += 1;
                        println!("DAMAGED {label} ({id})");
                        for p in problems {
                            println!("    {p}");
                        }
                    }
                    Err(e) => {
                        bad += 1;
                        println!("ERROR   {label}: {e}");
                    }
                }
            }
            println!("{} checked, {bad} damaged", ids.len());
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Some(Command::Refs) => {
            let store = open_store()?;
            for (name, id) in store.list_refs()? {
                println!("{id}  {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Serve {
            reference,
            pipeline,
            passthrough,
        }) => {
            let store = open_store()?;
            let mut args: Vec<std::ffi::OsString> = Vec::new();
            let reference = match &pipeline {
                Some(p) => {
                    let pl = load_pipeline(p)?;
                    let Some(sv) = &pl.serve else {
                        bail!(
                            "pipeline {} has no `serve:` target (add `serve: {{ stage: sft }}`, or use --ref)",
                            pl.file.display()
                        );
                    };
                    if let Some(c) = &sv.config {
                        args.push("--config".into());
                        args.push(c.into());
                    }
                    args.extend(sv.args.iter().map(Into::into));
                    format!("runs/{}/{}", pl.name, sv.stage)
                }
                None => reference.unwrap_or_else(|| "latest/sft".into()),
            };
            let id = resolve_target(&store, &reference).with_context(|| {
                if pipeline.is_some() {
                    "the pipeline's serve target has not been produced yet: run the pipeline first"
                        .to_string()
                } else {
                    format!("--ref {reference}")
                }
            })?;
            store
                .verify(&id, VerifyMode::Fast)
                .with_context(|| format!("model artifact {reference} is damaged"))?;
            let bin = plan::find_binary("nanochat-inference").map_err(|e| {
                anyhow::anyhow!("{e}; the inference server is the `nanochat-inference` binary")
            })?;
            let model = store.object_data(&id);
            tracing::info!(binary = %bin.display(), model = %model.display(), "starting server");
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("--model")
                .arg(&model)
                .args(&args)
                .args(&passthrough);
            use std::os::unix::process::CommandExt;
            let err = cmd.exec();
            Err(err).with_context(|| format!("starting {}", bin.display()))
        }
        Some(Command::Report { compare }) => {
            let mut paths = Vec::with_capacity(2);
            for target in &compare {
                paths.push(resolve_report(target, &open_store)?);
            }
            let bin = plan::find_binary("nanochat-report").map_err(|e| {
                anyhow::anyhow!("{e}; report cards are compared by the `nanochat-report` binary")
            })?;
            let status = std::process::Command::new(&bin)
                .arg("--compare")
                .args(&paths)
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A report argument: an existing file or directory is used as is; anything else is a ref or
/// object id in the store, whose data directory holds `report.json`.
fn resolve_report(target: &str, open_store: &dyn Fn() -> Result<ArtifactStore>) -> Result<PathBuf> {
    let as_path = std::path::Path::new(target);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    let store = open_store()?;
    let id = resolve_target(&store, target).with_context(|| {
        format!("{target:?} is neither a report.json / report directory nor a stored report")
    })?;
    store
        .verify(&id, VerifyMode::Fast)
        .with_context(|| format!("report artifact {target} is damaged"))?;
    Ok(store.object_data(&id))
}

fn load_pipeline(arg: &str) -> Result<pipeline::Pipeline> {
    let path = pipeline::find_pipeline(arg)?;
    Ok(pipeline::load(&path)?)
}

fn resolve_target(store: &ArtifactStore, target: &str) -> Result<ObjectId> {
    if let Ok(id) = target.parse::<ObjectId>() {
        if store.contains(&id) {
            return Ok(id);
        }
    }
    match store.get_ref(target) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => bail!(
            "no ref or object {target:?} in store {} (list refs with `nanochat-run refs`)",
            store.root().display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// Routes tracing output through the progress bars so lines never tear a bar.
#[derive(Clone)]
struct ProgressWriter(indicatif::MultiProgress);

impl Write for ProgressWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_tracing(progress: indicatif::MultiProgress) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("nanochat_run=info,nanochat_artifacts=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(move || ProgressWriter(progress.clone()))
        .try_init();
}
