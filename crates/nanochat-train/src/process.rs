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

/// Fails when the launcher started this stage as one rank of several (`RANK`/`WORLD_SIZE`,
/// or Slurm's variables, as `nanochat-run` sets them for `ranks: N`): the trainer does not
/// average gradients across ranks yet, so N ranks would train N unrelated models into one
/// work dir. Until it does, data-parallel runs are refused rather than silently wrong.
pub fn refuse_multi_rank() -> Result<(), TrainError> {
    refuse_multi_rank_in(nanochat_dist::DistEnv::from_env())
}

fn refuse_multi_rank_in(
    env: Result<nanochat_dist::DistEnv, nanochat_dist::DistError>,
) -> Result<(), TrainError> {
    let env = env.map_err(|e| TrainError::Config(e.to_string()))?;
    if env.is_distributed() {
        return Err(TrainError::Config(format!(
            "started as rank {} of {} ({:?} launcher), but the training stages do not yet average \
             gradients across ranks (issue #14); run this stage with one rank (drop `ranks:` / \
             `launcher:`, or unset RANK and WORLD_SIZE)",
            env.rank, env.world_size, env.launcher
        )));
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
    fn several_ranks_are_refused_until_the_trainer_averages_gradients() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            nanochat_dist::DistEnv::from_vars(move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert!(refuse_multi_rank_in(vars(&[])).is_ok());
        assert!(refuse_multi_rank_in(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).is_ok());
        let e = refuse_multi_rank_in(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank 1 of 2") && e.contains("one rank"), "{e}");
        let e = refuse_multi_rank_in(vars(&[("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK is not set"), "{e}");
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
