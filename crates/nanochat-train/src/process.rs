//! Process-level pieces shared by `nanochat-pretrain`, `nanochat-midtrain` and `nanochat-sft`
//! (each a `nanochat_artifacts::stage::run_main`): the worker pool, and the exit code of a run
//! (0 when finished; 130/143 when a signal stopped it after a checkpoint).

use nanochat_artifacts::stage;

use crate::trainer::Outcome;
use crate::TrainError;

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
