//! The stage CLI contract shared by every stage binary and by `nanochat-run`.
//!
//! A stage is invoked as
//! `<stage-bin> --config FILE.toml --input NAME=DIR ... --out DIR --work DIR`:
//! it reads its resolved config, reads its (verified, read-only) inputs, fills `--out`, and may
//! keep checkpoints in `--work` to resume after a crash. Exit 0 publishes `--out`; anything else
//! publishes nothing. On SIGINT/SIGTERM it should save into `--work` and exit with
//! [`interrupt_exit_code`] (130 or 143). See docs/artifacts.md for the full specification.
//!
//! ```no_run
//! use nanochat_artifacts::stage::{self, StageArgs, StageContext};
//! use clap::Parser;
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { steps: u32 }
//!
//! fn main() -> anyhow::Result<()> {
//!     stage::install_signal_handlers()?;
//!     let ctx = StageContext::new(StageArgs::parse())?;
//!     let cfg: Config = ctx.config()?;
//!     for _ in 0..cfg.steps {
//!         if stage::interrupted() {
//!             // save a checkpoint into ctx.work_dir() here, then:
//!             std::process::exit(stage::interrupt_exit_code().unwrap_or(130));
//!         }
//!     }
//!     stage::write_atomic(&ctx.out_dir().join("done.txt"), b"ok")?;
//!     Ok(())
//! }
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;

use crate::error::{Error, IoContext, Result};
pub use crate::fsutil::write_atomic;

/// The command-line arguments of the stage contract.
///
/// Derives `clap::Parser` (use `StageArgs::parse()` directly) and therefore also `clap::Args`,
/// so a stage with extra flags can `#[command(flatten)]` it into its own parser.
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(about = "A nanochat pipeline stage (see docs/artifacts.md for the contract)")]
pub struct StageArgs {
    /// Resolved TOML config for this stage; unknown keys are rejected.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// A verified, read-only input artifact directory, as NAME=DIR; repeat for each input.
    #[arg(long = "input", value_name = "NAME=DIR", value_parser = parse_input_arg)]
    pub inputs: Vec<(String, PathBuf)>,
    /// Empty directory to fill with this stage's output; published only if the stage exits 0.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Persistent scratch directory for this stage's own checkpoints (crash resume).
    #[arg(long, value_name = "DIR")]
    pub work: PathBuf,
}

impl StageArgs {
    /// Renders these arguments back into the argv form of the contract (without the program).
    pub fn to_argv(&self) -> Vec<std::ffi::OsString> {
        let mut argv: Vec<std::ffi::OsString> = vec!["--config".into(), self.config.clone().into()];
        for (name, dir) in &self.inputs {
            argv.push("--input".into());
            let mut v = std::ffi::OsString::from(format!("{name}="));
            v.push(dir);
            argv.push(v);
        }
        argv.push("--out".into());
        argv.push(self.out.clone().into());
        argv.push("--work".into());
        argv.push(self.work.clone().into());
        argv
    }
}

/// Whether `name` is a valid input/stage name: `[A-Za-z0-9_-]+` (no `=`, `/` or spaces).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_input_arg(s: &str) -> std::result::Result<(String, PathBuf), String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=DIR, got {s:?}"))?;
    if !is_valid_name(name) {
        return Err(format!(
            "input name {name:?} must be non-empty and use only letters, digits, '_' or '-'"
        ));
    }
    if dir.is_empty() {
        return Err(format!("input {name:?} has an empty directory"));
    }
    Ok((name.to_string(), PathBuf::from(dir)))
}

/// Environment variable naming the stage's run directory: where telemetry goes (see
/// [`StageContext::run_dir`]). `nanochat-run` always sets it; a stage started by hand may not.
pub const RUN_DIR_ENV: &str = "NANOCHAT_RUN_DIR";

/// The run directory beside an input's `data/` directory (`objects/ab/cdef…/run/`), holding the
/// telemetry of the run that first produced that input (`record.json`, the stage's own files);
/// `None` for inputs without one (not a store object, or published without a run).
pub fn run_dir_of(input_dir: &Path) -> Option<PathBuf> {
    let dir = input_dir.parent()?.join(crate::store::RUN_DIR);
    dir.is_dir().then_some(dir)
}

/// A validated stage invocation: config path, named inputs, output, work and run directories.
#[derive(Debug, Clone)]
pub struct StageContext {
    config_path: PathBuf,
    inputs: BTreeMap<String, PathBuf>,
    out_dir: PathBuf,
    work_dir: PathBuf,
    run_dir: Option<PathBuf>,
}

impl StageContext {
    /// Validates parsed arguments: the config file exists, each input is an existing directory
    /// named once, and the out/work directories exist (they are created if missing).
    pub fn new(args: StageArgs) -> Result<Self> {
        if !args.config.is_file() {
            return Err(Error::Io {
                op: "reading config",
                path: args.config.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file (pass --config FILE.toml)",
                ),
            });
        }
        let mut inputs = BTreeMap::new();
        for (name, dir) in args.inputs {
            if !dir.is_dir() {
                return Err(Error::Input {
                    name,
                    reason: format!("{} is not a directory", dir.display()),
                });
            }
            if inputs.insert(name.clone(), dir).is_some() {
                return Err(Error::Input {
                    name,
                    reason: "given more than once".into(),
                });
            }
        }
        let run_dir = std::env::var_os(RUN_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        for dir in [Some(&args.out), Some(&args.work), run_dir.as_ref()]
            .into_iter()
            .flatten()
        {
            fs::create_dir_all(dir).io("creating directory", dir)?;
        }
        Ok(Self {
            config_path: args.config,
            inputs,
            out_dir: args.out,
            work_dir: args.work,
            run_dir,
        })
    }

    /// Parses the process arguments (exiting with clap's usage message on error) and validates
    /// them; the usual first line of a stage's `main`.
    pub fn from_env() -> Result<Self> {
        use clap::Parser;
        Self::new(StageArgs::parse())
    }

    /// Loads the TOML config into `T`. Use `#[serde(deny_unknown_fields)]` on `T` so typos are
    /// errors; the error names the file, line and column.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        load_toml(&self.config_path)
    }

    /// Path of the resolved config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The directory of input `name`, or an error listing the inputs that were given.
    pub fn input(&self, name: &str) -> Result<&Path> {
        self.inputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::Input {
                name: name.to_string(),
                reason: format!(
                    "not given; this stage received {} (add it under `inputs:` in the pipeline)",
                    if self.inputs.is_empty() {
                        "no inputs".to_string()
                    } else {
                        self.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            })
    }

    /// All inputs by name.
    pub fn inputs(&self) -> &BTreeMap<String, PathBuf> {
        &self.inputs
    }

    /// Directory to write outputs into.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Persistent per-stage-key directory for checkpoints.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Where this run's telemetry goes (`$NANOCHAT_RUN_DIR`): anything that differs between
    /// two runs of the same key — durations, throughput, host names, dates. `--out` holds
    /// results only, so that a deterministic rerun publishes the same object id.
    /// `None` when the stage was started without one.
    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }

    /// Writes `name` into the run directory (atomically). Without a run directory the bytes
    /// are dropped: telemetry is never worth failing a stage for.
    pub fn write_run_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match &self.run_dir {
            Some(dir) => write_atomic(&dir.join(name), bytes),
            None => {
                tracing::debug!(file = name, "no {RUN_DIR_ENV}: telemetry not kept");
                Ok(())
            }
        }
    }
}

/// Reads and deserializes a TOML file; errors carry `file:line:column`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).io("reading config", path)?;
    parse_toml(&text, path)
}

/// Deserializes TOML text; `origin` is used only to label errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        Error::Config {
            path: origin.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

/// 1-based (line, column) of a byte offset; columns count characters.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct SignalState {
    flag: Arc<AtomicBool>,
    last: Arc<AtomicUsize>,
}

static SIGNALS: OnceLock<SignalState> = OnceLock::new();

/// Installs SIGINT/SIGTERM handlers that set the [`interrupted`] flag instead of killing the
/// process, so the stage can checkpoint and exit cleanly. A second signal of the same kind while
/// the flag is already set terminates immediately (exit 1), for a user who really means it.
/// Idempotent.
pub fn install_signal_handlers() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if SIGNALS.get().is_some() {
        return Ok(());
    }
    let state = SignalState {
        flag: Arc::new(AtomicBool::new(false)),
        last: Arc::new(AtomicUsize::new(0)),
    };
    for sig in [SIGINT, SIGTERM] {
        // Registered first so it sees the flag *before* this delivery sets it: only a repeat
        // signal exits.
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&state.flag))
            .io("installing signal handler", "<signal>")?;
        signal_hook::flag::register(sig, Arc::clone(&state.flag))
            .io("installing signal handler", "<signal>")?;
        signal_hook::flag::register_usize(sig, Arc::clone(&state.last), sig as usize)
            .io("installing signal handler", "<signal>")?;
    }
    let _ = SIGNALS.set(state);
    Ok(())
}

/// True once SIGINT or SIGTERM has been received (after [`install_signal_handlers`]).
pub fn interrupted() -> bool {
    SIGNALS.get().is_some_and(|s| s.flag.load(Ordering::SeqCst))
}

/// The conventional exit code for the signal received (130 for SIGINT, 143 for SIGTERM), or
/// `None` if no signal arrived.
pub fn interrupt_exit_code() -> Option<i32> {
    let s = SIGNALS.get()?;
    if !s.flag.load(Ordering::SeqCst) {
        return None;
    }
    let sig = s.last.load(Ordering::SeqCst) as i32;
    Some(
        128 + if sig == 0 {
            signal_hook::consts::SIGINT
        } else {
            sig
        },
    )
}

/// The whole `main` of a stage binary: tracing to stderr (`RUST_LOG`, default `info`), the
/// SIGINT/SIGTERM handlers, the contract's arguments, then `body`; exits the process with
/// `body`'s code, or with 1 after printing `<name>: error: <message>` (the error's whole chain,
/// `{:#}` as anyhow formats it). `body` returns [`interrupt_exit_code`] when a signal stopped it.
///
/// ```no_run
/// nanochat_artifacts::stage::run_main("nanochat-example", |ctx| -> anyhow::Result<i32> {
///     let _config_path = ctx.config_path();
///     Ok(0)
/// })
/// ```
pub fn run_main<E: std::fmt::Display>(
    name: &str,
    body: impl FnOnce(&StageContext) -> std::result::Result<i32, E>,
) -> ! {
    init_tracing("info");
    let prepared = install_signal_handlers()
        .and_then(|()| StageContext::from_env())
        .map_err(|e| error_chain(&e));
    let code = match prepared.and_then(|ctx| body(&ctx).map_err(|e| format!("{e:#}"))) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("{name}: error: {message}");
            1
        }
    };
    std::process::exit(code)
}

/// Logs of every nanochat binary: `tracing` to stderr (stdout stays for results), filtered by
/// `RUST_LOG` when set, else `default_filter` (e.g. `"info"`). A second call is a no-op.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

/// `error: cause: cause …`, the way anyhow's alternate form prints a chain, except that a cause
/// the message already ends with (`"{path}: {source}"` errors) is not repeated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        steps: u32,
        #[serde(default)]
        name: String,
    }

    fn args(v: &[&str]) -> std::result::Result<StageArgs, clap::Error> {
        StageArgs::try_parse_from(std::iter::once("stage").chain(v.iter().copied()))
    }

    #[test]
    fn parses_the_full_contract_and_round_trips_argv() {
        let a = args(&[
            "--config",
            "c.toml",
            "--input",
            "tok=/a/b",
            "--input",
            "data=rel/d",
            "--out",
            "o",
            "--work",
            "w",
        ])
        .unwrap();
        assert_eq!(a.config, PathBuf::from("c.toml"));
        assert_eq!(
            a.inputs,
            vec![
                ("tok".to_string(), PathBuf::from("/a/b")),
                ("data".to_string(), PathBuf::from("rel/d"))
            ]
        );
        let again =
            StageArgs::try_parse_from(std::iter::once("s".into()).chain(a.to_argv())).unwrap();
        assert_eq!(again, a);
    }

    #[test]
    fn rejects_malformed_inputs_and_missing_flags() {
        let e = args(&[
            "--config", "c", "--input", "noequals", "--out", "o", "--work", "w",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("NAME=DIR"), "{e}");
        let e = args(&[
            "--config", "c", "--input", "a b=x", "--out", "o", "--work", "w",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("letters, digits"), "{e}");
        let e = args(&[
            "--config", "c", "--input", "a=", "--out", "o", "--work", "w",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("empty directory"), "{e}");
        assert!(args(&["--config", "c", "--out", "o"]).is_err());
    }

    fn setup(config: &str) -> (tempfile::TempDir, StageArgs) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("stage.toml");
        fs::write(&cfg, config).unwrap();
        let input = dir.path().join("in");
        fs::create_dir(&input).unwrap();
        let a = StageArgs {
            config: cfg,
            inputs: vec![("tok".into(), input)],
            out: dir.path().join("out"),
            work: dir.path().join("work/nested"),
        };
        (dir, a)
    }

    #[test]
    fn context_loads_config_and_exposes_dirs() {
        let (_d, a) = setup("steps = 3\nname = \"x\"\n");
        let ctx = StageContext::new(a.clone()).unwrap();
        let cfg: Cfg = ctx.config().unwrap();
        assert_eq!(
            cfg,
            Cfg {
                steps: 3,
                name: "x".into()
            }
        );
        assert!(ctx.out_dir().is_dir() && ctx.work_dir().is_dir());
        assert_eq!(ctx.input("tok").unwrap(), a.inputs[0].1.as_path());
        assert_eq!(ctx.inputs().len(), 1);
        assert_eq!(ctx.config_path(), a.config.as_path());
        let e = ctx.input("model").unwrap_err().to_string();
        assert!(e.contains("\"model\"") && e.contains("tok"), "{e}");
    }

    #[test]
    fn config_errors_name_file_line_and_column() {
        let (_d, a) = setup("steps = 3\n\nstepz = 4\n");
        let ctx = StageContext::new(a.clone()).unwrap();
        let e = ctx.config::<Cfg>().unwrap_err();
        let Error::Config {
            line,
            column,
            ref path,
            ref message,
        } = e
        else {
            panic!("wrong error {e:?}")
        };
        assert_eq!((line, column), (3, 1), "{message}");
        assert_eq!(path, &a.config);
        assert!(message.contains("stepz"), "{message}");
        assert!(e
            .to_string()
            .starts_with(&format!("{}:3:1:", a.config.display())));

        let (_d, a) = setup("steps = \"three\"\n");
        let e = StageContext::new(a).unwrap().config::<Cfg>().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Config {
                    line: 1,
                    column: 9,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn context_rejects_missing_config_missing_input_and_duplicates() {
        let (_d, mut a) = setup("steps = 1\n");
        a.inputs.push(("tok".into(), a.inputs[0].1.clone()));
        let e = StageContext::new(a).unwrap_err().to_string();
        assert!(e.contains("more than once"), "{e}");

        let (d, mut a) = setup("steps = 1\n");
        a.inputs[0].1 = d.path().join("nope");
        let e = StageContext::new(a).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");

        let (d, mut a) = setup("steps = 1\n");
        a.config = d.path().join("missing.toml");
        let e = StageContext::new(a).unwrap_err().to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }

    #[test]
    fn names_are_restricted() {
        assert!(is_valid_name("sft_2-b"));
        for bad in ["", "a/b", "a=b", "a b", "é"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn signal_sets_interrupted_flag_and_exit_code() {
        install_signal_handlers().unwrap();
        install_signal_handlers().unwrap(); // idempotent
        assert!(!interrupted());
        assert_eq!(interrupt_exit_code(), None);
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        assert!(interrupted());
        assert_eq!(interrupt_exit_code(), Some(143));
    }

    #[test]
    fn error_chain_lists_every_cause() {
        let e = Error::Io {
            op: "reading",
            path: PathBuf::from("x.toml"),
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(error_chain(&e), "reading x.toml: disk on fire");
        // A cause the message does not already state is appended.
        #[derive(Debug, thiserror::Error)]
        #[error("loading the stage config")]
        struct Outer(#[source] Error);
        assert_eq!(
            error_chain(&Outer(e)),
            "loading the stage config: reading x.toml: disk on fire"
        );
    }
}
