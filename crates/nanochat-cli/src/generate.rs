//! `nanochat generate`: stream a continuation of a prompt.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nanochat_engine::{Engine, FinishReason, SamplingParams, StepModel, Usage};
use nanochat_tokenizer::{Conversation, Message, Role};
use serde::Serialize;

use crate::{load, usage, ModelArgs, SamplingArgs, EXIT_INTERRUPTED};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Sample from `<|bos|>` alone (no prompt needed).
    #[arg(long)]
    unconditional: bool,
    /// Wrap the prompt as a user message and let a chat model answer it.
    #[arg(long)]
    chat: bool,
    /// The prompt ("-" reads stdin). Special-token names in it are plain text.
    prompt: Vec<String>,
}

/// What a finished stream produced.
#[derive(Serialize)]
pub struct Outcome {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub time_to_first_token_s: f64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
}

/// Streams one generation: text deltas to `out` as they come (unless `quiet`), a spinner with
/// tokens/s on stderr when it is a terminal, Ctrl-C cancels the generation (not the process).
pub fn stream<M: StepModel>(
    engine: &Engine<M>,
    prompt: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
    quiet: bool,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut gen = engine.generate(prompt, params)?;
    let cancel = gen.cancel_token();
    install_ctrl_c()?;
    STOP.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let spinner = Spinner::new(!quiet && std::io::stdout().is_terminal());
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut first: Option<Duration> = None;
    let result = (|| -> Result<()> {
        for ev in gen.by_ref() {
            let ev = ev?;
            if STOP.load(Ordering::SeqCst) {
                // The stream ends before its next token.
                cancel.cancel();
            }
            let now = start.elapsed();
            let ttft = *first.get_or_insert(now);
            tokens.push(ev.token);
            spinner.tick(tokens.len(), (now - ttft).as_secs_f64());
            if !ev.text.is_empty() {
                text.push_str(&ev.text);
                if !quiet {
                    spinner.suspend(|| -> std::io::Result<()> {
                        out.write_all(ev.text.as_bytes())?;
                        out.flush()
                    })?;
                }
            }
        }
        Ok(())
    })();
    GENERATING.store(false, Ordering::SeqCst);
    spinner.finish();
    result?;
    let elapsed = start.elapsed().as_secs_f64();
    let ttft = first.map_or(elapsed, |d| d.as_secs_f64());
    let decode_time = elapsed - ttft;
    let finish_reason = gen.finish_reason().unwrap_or(FinishReason::Cancelled);
    if finish_reason == FinishReason::Stop
        && tokens
            .last()
            .is_some_and(|&t| engine.specials().is_terminal(t))
    {
        tokens.pop();
    }
    let usage = gen.usage().unwrap_or_default();
    if usage.dropped_prompt_tokens > 0 {
        eprintln!(
            "note: the prompt did not fit the model's context; its {} oldest tokens were left out",
            usage.dropped_prompt_tokens
        );
    }
    Ok(Outcome {
        tokens_per_s: if decode_time > 0.0 {
            (usage.completion_tokens.saturating_sub(1)) as f64 / decode_time
        } else {
            0.0
        },
        text,
        tokens,
        finish_reason,
        usage,
        time_to_first_token_s: ttft,
        elapsed_s: elapsed,
    })
}

/// Set while a generation runs: Ctrl-C then stops the generation instead of the process.
static GENERATING: AtomicBool = AtomicBool::new(false);
/// Set by Ctrl-C during a generation.
static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the process-wide Ctrl-C handler once: during a generation it asks the stream to
/// stop (the chat REPL keeps going); otherwise it exits with status 130 like the default action.
fn install_ctrl_c() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let handler = || {
                if GENERATING.load(Ordering::SeqCst) {
                    STOP.store(true, Ordering::SeqCst);
                } else {
                    signal_hook::low_level::exit(i32::from(EXIT_INTERRUPTED));
                }
            };
            // SAFETY: the handler only touches atomics and calls `_exit`, both
            // async-signal-safe; it allocates nothing and takes no locks.
            unsafe { signal_hook::low_level::register(signal_hook::consts::SIGINT, handler) }
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("installing the Ctrl-C handler: {e}"))
}

/// Spinner on stderr. While stdout is a terminal too, it only shows until the first token
/// (then the streamed text itself is the progress); the rate goes to the summary line.
struct Spinner {
    bar: Option<ProgressBar>,
    stdout_tty: bool,
}

impl Spinner {
    fn new(stdout_tty: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message("prefilling…");
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Spinner { bar, stdout_tty }
    }

    fn tick(&self, n: usize, decode_s: f64) {
        let Some(bar) = &self.bar else { return };
        if self.stdout_tty {
            if n == 1 {
                bar.finish_and_clear();
            }
        } else if decode_s > 0.0 {
            bar.set_message(format!(
                "{n} tokens, {:.1} tok/s",
                (n - 1) as f64 / decode_s
            ));
        }
    }

    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) if !bar.is_finished() => bar.suspend(f),
            _ => f(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Prints the `N tokens, first token after X s, Y tok/s` line on stderr (terminals only).
pub fn print_stats(o: &Outcome) {
    if std::io::stderr().is_terminal() {
        eprintln!(
            "[{} tokens · first token {:.2} s · {:.1} tok/s · {}]",
            o.usage.completion_tokens,
            o.time_to_first_token_s,
            o.tokens_per_s,
            match o.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::Cancelled => "cancelled",
            }
        );
    }
}

fn read_prompt(parts: &[String]) -> Result<String> {
    if parts.len() == 1 && parts[0] == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the prompt from stdin")?;
        return Ok(s);
    }
    Ok(parts.join(" "))
}

pub fn run(args: GenerateArgs, json: bool) -> Result<ExitCode> {
    let prompt = read_prompt(&args.prompt)?;
    if prompt.trim().is_empty() && !args.unconditional {
        usage!(
            "the prompt is empty; give some text, or --unconditional to sample from <|bos|> alone"
        );
    }
    if args.unconditional && args.chat {
        usage!("--unconditional and --chat cannot be combined");
    }
    let params = args.sampling.params(1.0, 0)?;
    let loaded = load::load(&args.model)?;
    let tok = &loaded.tokenizer;
    let ids = if args.chat {
        let convo = Conversation {
            messages: vec![
                Message::text(Role::User, prompt),
                Message::text(Role::Assistant, "x"),
            ],
        };
        tok.render_for_completion(&convo)
            .context("rendering the prompt as a chat message")?
    } else {
        let mut ids = vec![tok.bos_id()];
        if !args.unconditional || !prompt.is_empty() {
            ids.extend(tok.encode(&prompt));
        }
        ids
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let outcome = stream(&loaded.engine, &ids, &params, &mut out, json)?;
    if json {
        serde_json::to_writer_pretty(&mut out, &outcome)?;
        writeln!(out)?;
    } else {
        if !outcome.text.ends_with('\n') {
            writeln!(out)?;
        }
        out.flush()?;
        print_stats(&outcome);
    }
    Ok(if outcome.finish_reason == FinishReason::Cancelled {
        ExitCode::from(EXIT_INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    })
}
