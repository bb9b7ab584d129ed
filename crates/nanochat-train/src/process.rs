//! The process around a training stage, shared by `nanochat-pretrain`, `nanochat-midtrain` and
//! `nanochat-sft`: tracing to stderr (`RUST_LOG`, default `info`), SIGINT/SIGTERM handlers, the
//! stage arguments, the worker pool, and the exit code (0 when finished; 130/143 when a signal
//! stopped the run after a checkpoint; 1 with `<stage>: error: …` on stderr on failure).
//!
//! ```no_run
//! nanochat_train::process::run_stage("nanochat-example", |ctx| -> Result<i32, String> {
//!     let _config_path = ctx.config_path();
//!     Ok(0)
//! });
//! ```

use std::fmt::Display;

use nanochat_artifacts::stage::{self, StageContext};

use crate::trainer::Outcome;
use crate::TrainError;

/// Runs a stage's `body` under the stage contract and exits the process with its code.
/// `body` is called with the parsed arguments once logging and signal handlers are in place;
/// its error is printed with its whole chain (`{:#}`, as anyhow formats it).
pub fn run_stage<E: Display>(name: &str, body: impl FnOnce(&StageContext) -> Result<i32, E>) -> ! {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let code = match prepare().and_then(|ctx| body(&ctx).map_err(|e| format!("{e:#}"))) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("{name}: error: {message}");
            1
        }
    };
    std::process::exit(code)
}

fn prepare() -> Result<StageContext, String> {
    stage::install_signal_handlers().map_err(|e| chain(&e))?;
    StageContext::from_env().map_err(|e| chain(&e))
}

/// `error: cause: cause …`, the way anyhow's alternate form prints a chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Sizes the global worker pool (`threads` = 0: one worker per core). Resume is bit-identical
/// only with the same count, so stages take it from their config.
pub fn set_threads(threads: usize) -> Result<(), TrainError> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| TrainError::Config(format!("thread pool of {threads}: {e}")))?;
    }
    Ok(())
}

/// Logs how a run ended and returns the stage's exit code: 0 when it finished, 130 (SIGINT) or
/// 143 (SIGTERM) when a signal stopped it after a checkpoint.
pub fn exit_code(outcome: Outcome, what: &str) -> i32 {
    match outcome {
        Outcome::Finished {
            val_bpb,
            train_loss,
        } => {
            tracing::info!(?val_bpb, train_loss, "{what} done");
            0
        }
        Outcome::Interrupted { step } => {
            tracing::warn!(step, "stopped by signal; rerun to resume");
            stage::interrupt_exit_code().unwrap_or(130)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_lists_every_cause() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn finished_is_zero_and_an_unsignalled_interrupt_is_130() {
        let done = Outcome::Finished {
            val_bpb: None,
            train_loss: 1.0,
        };
        assert_eq!(exit_code(done, "test"), 0);
        assert_eq!(exit_code(Outcome::Interrupted { step: 3 }, "test"), 130);
    }
}
