//! `nanochat`: generate text, chat, inspect models and work with tokenizers from the shell.
//!
//! Exit codes: 0 success, 1 failure (unreadable model, I/O, ...), 2 bad usage or input (clap's
//! own errors included), 130 interrupted.

mod chat;
mod generate;
mod info;
mod load;
mod serve;
mod tok;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nanochat_engine::SamplingParams;

/// Exit status for bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status after Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

/// An error caused by how the command was called (exit status 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Returns early with a [`UsageError`].
#[macro_export]
macro_rules! usage {
    ($($t:tt)*) => { return Err(anyhow::Error::new($crate::UsageError(format!($($t)*)))) };
}

#[derive(Parser)]
#[command(
    name = "nanochat",
    version,
    about = "Generate, chat and inspect nanochat models"
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming the text to stdout.
    Generate(generate::GenerateArgs),
    /// Talk to a chat model (interactive; `--prompt` for a single answer).
    Chat(chat::ChatArgs),
    /// Tokenizer tools: train, encode, decode, eval.
    #[command(subcommand)]
    Tok(tok::TokCommand),
    /// Show a model's configuration, size, memory needs and provenance.
    Info(info::InfoArgs),
    /// Serve a model over the OpenAI-compatible HTTP API (nanochat-inference), with a chat page.
    Serve(serve::ServeArgs),
}

/// Where the model comes from.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a checkpoint directory (model.safetensors, config.json, meta.json), an artifact
    /// directory holding one, or a ref in the artifact store (e.g. latest/sft).
    #[arg(short, long, env = "NANOCHAT_MODEL")]
    pub model: String,
    /// Artifact store used to resolve refs.
    #[arg(long, env = "NANOCHAT_STORE", default_value = "artifacts")]
    pub store: std::path::PathBuf,
    /// Tokenizer directory (default: the model's `tokenizer/` folder, the model directory
    /// itself, or a sibling `tokenizer/`).
    #[arg(long, env = "NANOCHAT_TOKENIZER")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Device to run the model on: `cpu`, `cuda` (GPU 0, or the one LOCAL_RANK names), `gpu`
    /// (same as `cuda`) or `cuda:N`. A GPU needs a build with `--features cuda` (docs/gpu.md).
    #[arg(long, env = "NANOCHAT_DEVICE", default_value = "cpu")]
    pub device: nanochat_model::Device,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Softmax temperature; 0 is greedy.
    #[arg(short, long)]
    pub temperature: Option<f32>,
    /// Sample only among the k most likely tokens (0 = off).
    #[arg(short = 'k', long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with this much probability (1 = off).
    #[arg(short = 'p', long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Random seed (default: a fresh one each run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// Sampling parameters with the command's own defaults for unset flags.
    pub fn params(&self, temperature: f32, top_k: usize) -> anyhow::Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(temperature),
            top_k: self.top_k.unwrap_or(top_k),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
        };
        if let Err(e) = p.validate() {
            usage!("{e}");
        }
        Ok(p)
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Generate(a) => generate::run(a, cli.json),
        Command::Chat(a) => chat::run(a, cli.json),
        Command::Tok(c) => tok::run(c, cli.json),
        Command::Info(a) => info::run(a, cli.json),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // `nanochat generate ... | head` closing the pipe is not a failure.
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
