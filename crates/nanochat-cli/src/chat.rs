//! `nanochat chat`: a conversation with history, as nanochat's chat_cli.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use nanochat_engine::{FinishReason, SamplingParams};
use nanochat_tokenizer::Tokenizer;
use serde_json::json;

use crate::generate::{print_stats, stream};
use crate::{load, usage, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Ask one question, print the answer and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// A system prompt (merged into the first user message, as nanochat does).
    #[arg(long)]
    system: Option<String>,
}

const HELP: &str = "\
commands:
  /clear            start a new conversation
  /temperature X    set the sampling temperature (0 = greedy)
  /topk K           sample among the K most likely tokens (0 = off)
  /topp P           nucleus sampling with mass P (1 = off)
  /help             this help
  /quit             leave (or Ctrl-D)
Ctrl-C stops the answer being generated.";

/// The conversation as tokens, like nanochat's chat_cli keeps it.
struct History {
    tokens: Vec<u32>,
    turns: usize,
    ids: ChatIds,
}

#[derive(Clone, Copy)]
struct ChatIds {
    bos: u32,
    user_start: u32,
    user_end: u32,
    assistant_start: u32,
    assistant_end: u32,
}

impl ChatIds {
    fn of(tok: &Tokenizer) -> Result<Self> {
        let id = |name: &str| {
            tok.special_id(name).with_context(|| {
                format!("the tokenizer has no {name} token: this is not a chat tokenizer")
            })
        };
        Ok(ChatIds {
            bos: tok.bos_id(),
            user_start: id("<|user_start|>")?,
            user_end: id("<|user_end|>")?,
            assistant_start: id("<|assistant_start|>")?,
            assistant_end: id("<|assistant_end|>")?,
        })
    }
}

impl History {
    fn new(ids: ChatIds) -> Self {
        History {
            tokens: vec![ids.bos],
            turns: 0,
            ids,
        }
    }

    fn clear(&mut self) {
        *self = History::new(self.ids);
    }

    /// Adds a user turn and opens the assistant's; returns the prompt to generate from.
    fn ask(&mut self, tok: &Tokenizer, text: &str, system: Option<&str>) -> Vec<u32> {
        let text = match (self.turns, system) {
            (0, Some(sys)) => format!("{sys}\n\n{text}"),
            _ => text.to_string(),
        };
        self.tokens.push(self.ids.user_start);
        self.tokens.extend(tok.encode(&text));
        self.tokens.push(self.ids.user_end);
        self.tokens.push(self.ids.assistant_start);
        self.turns += 1;
        self.tokens.clone()
    }

    /// Records the answer; the assistant turn is always closed, even after max_tokens.
    fn answer(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
        if tokens.last() != Some(&self.ids.assistant_end) {
            self.tokens.push(self.ids.assistant_end);
        }
    }
}

fn set<T: std::str::FromStr>(arg: &str, what: &str) -> std::result::Result<T, String> {
    arg.trim()
        .parse()
        .map_err(|_| format!("{what} needs a number, got {arg:?}"))
}

/// Applies a slash command; returns its message, or `None` to quit.
fn command(line: &str, params: &mut SamplingParams, history: &mut History) -> Option<String> {
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let msg = match cmd {
        "/quit" | "/exit" => return None,
        "/clear" => {
            history.clear();
            "conversation cleared".to_string()
        }
        "/help" => HELP.to_string(),
        "/temperature" => match set::<f32>(arg, "/temperature") {
            Ok(t) if t.is_finite() && t >= 0.0 => {
                params.temperature = t;
                format!("temperature = {t}")
            }
            Ok(t) => format!("temperature must be >= 0, got {t}"),
            Err(e) => e,
        },
        "/topk" => match set::<usize>(arg, "/topk") {
            Ok(k) => {
                params.top_k = k;
                format!("top_k = {k}")
            }
            Err(e) => e,
        },
        "/topp" => match set::<f32>(arg, "/topp") {
            Ok(p) if p > 0.0 && p <= 1.0 => {
                params.top_p = p;
                format!("top_p = {p}")
            }
            Ok(p) => format!("top_p must be in (0, 1], got {p}"),
            Err(e) => e,
        },
        other => format!("unknown command {other}; /help lists them"),
    };
    Some(msg)
}

pub fn run(args: ChatArgs, json: bool) -> Result<ExitCode> {
    if let Some(p) = &args.prompt {
        if p.trim().is_empty() {
            usage!("--prompt is empty; give a question");
        }
    }
    let mut params = args.sampling.params(0.6, 50)?;
    let loaded = load::load(&args.model)?;
    let tok = loaded.tokenizer.clone();
    let mut history = History::new(ChatIds::of(&tok)?);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();

    if let Some(question) = &args.prompt {
        let prompt = history.ask(&tok, question, args.system.as_deref());
        let outcome = stream(&loaded.engine, &prompt, &params, &mut out, json)?;
        if json {
            serde_json::to_writer_pretty(&mut out, &outcome)?;
        }
        writeln!(out)?;
        if !json {
            print_stats(&outcome);
        }
        return Ok(ExitCode::SUCCESS);
    }

    let interactive = std::io::stdin().is_terminal();
    if interactive && !json {
        writeln!(
            out,
            "nanochat — {} (type /help for commands, Ctrl-D to quit)",
            loaded.checkpoint_dir.display()
        )?;
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if !json {
            write!(out, "\nUser: ")?;
            out.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading from stdin")?;
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        if input.starts_with('/') {
            match command(input, &mut params, &mut history) {
                Some(msg) if json => {
                    serde_json::to_writer(&mut out, &json!({ "command": input, "message": msg }))?;
                    writeln!(out)?;
                }
                Some(msg) => writeln!(out, "{msg}")?,
                None => break,
            }
            continue;
        }
        let prompt = history.ask(&tok, input, args.system.as_deref());
        if !json {
            write!(out, "\nAssistant: ")?;
            out.flush()?;
        }
        let outcome = stream(&loaded.engine, &prompt, &params, &mut out, json)?;
        history.answer(&outcome.tokens);
        if json {
            serde_json::to_writer(&mut out, &outcome)?;
            writeln!(out)?;
        } else {
            writeln!(out)?;
            if outcome.finish_reason == FinishReason::Cancelled {
                writeln!(out, "(stopped)")?;
            }
            print_stats(&outcome);
        }
    }
    if !json {
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> ChatIds {
        ChatIds {
            bos: 0,
            user_start: 1,
            user_end: 2,
            assistant_start: 3,
            assistant_end: 4,
        }
    }

    #[test]
    fn slash_commands_update_params_and_history() {
        let mut p = SamplingParams::default();
        let mut h = History::new(ids());
        h.tokens.extend([1, 9, 2]);
        assert!(command("/temperature 0.3", &mut p, &mut h).is_some());
        assert_eq!(p.temperature, 0.3);
        assert!(command("/topk 7", &mut p, &mut h).is_some());
        assert_eq!(p.top_k, 7);
        assert!(command("/topp 0.9", &mut p, &mut h).is_some());
        assert_eq!(p.top_p, 0.9);
        let msg = command("/topp 2", &mut p, &mut h).unwrap_or_default();
        assert!(msg.contains("(0, 1]"), "{msg}");
        assert_eq!(p.top_p, 0.9);
        let msg = command("/temperature hot", &mut p, &mut h).unwrap_or_default();
        assert!(msg.contains("number"), "{msg}");
        assert!(command("/clear", &mut p, &mut h).is_some());
        assert_eq!(h.tokens, vec![0]);
        assert!(command("/bogus", &mut p, &mut h)
            .unwrap_or_default()
            .contains("/help"));
        assert!(command("/quit", &mut p, &mut h).is_none());
    }

    #[test]
    fn answers_are_closed_with_assistant_end() {
        let mut h = History::new(ids());
        h.answer(&[7, 8]);
        assert_eq!(h.tokens, vec![0, 7, 8, 4]);
        h.answer(&[9, 4]);
        assert_eq!(h.tokens, vec![0, 7, 8, 4, 9, 4]);
    }
}
