//! Process-level pieces shared by `nanochat-pretrain`, `nanochat-midtrain` and `nanochat-sft`
//! (each a `nanochat_artifacts::stage::run_main`): the worker pool, this process's place in a
//! data-parallel job and the collective joining it to the other ranks, and the exit code of a
//! run (0 when finished; 130/143 when a signal stopped it after a checkpoint).

use nanochat_artifacts::stage;
use nanochat_dist::{Collective, DistEnv, LocalCollective, TcpCollective, TcpOptions};
use nanochat_model::Device;

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

/// Who this process is in the job, from the variables torchrun, Slurm or `nanochat-run`
/// (`ranks: N`) give it; a world of one without them.
pub fn dist_env() -> Result<DistEnv, TrainError> {
    Ok(DistEnv::from_env()?)
}

/// The collective that joins this rank to the others of `env`, for training on `device`:
/// [`LocalCollective`] for a world of one, a [`TcpCollective`] (rendezvous at
/// `MASTER_ADDR:MASTER_PORT`, timeouts from `NANOCHAT_DIST_*`) for CPU ranks. CUDA ranks need
/// NCCL, which is not there yet: a world of several CUDA ranks is refused with that reason.
pub fn collective_for(env: &DistEnv, device: Device) -> Result<Box<dyn Collective>, TrainError> {
    if !env.is_distributed() {
        return Ok(Box::new(LocalCollective));
    }
    match device {
        Device::Cpu => {
            tracing::info!(
                rank = env.rank,
                world = env.world_size,
                master = %format!("{}:{}", env.master_addr, env.master_port),
                "joining the data-parallel job (TCP collective)"
            );
            Ok(Box::new(TcpCollective::connect(env, TcpOptions::from_env()?)?))
        }
        // The hook for the NCCL collective: build it here (unique id through the TCP
        // rendezvous) and the trainer uses it like any other `Collective`.
        Device::Cuda(_) => Err(TrainError::Config(format!(
            "started as rank {} of {} with device = \"{device}\", but the NCCL collective is not yet \
             available for CUDA ranks (issue #14); train on one GPU (drop `ranks:` / `launcher:`, \
             or unset RANK and WORLD_SIZE), or use CPU ranks (device = \"cpu\")",
            env.rank, env.world_size
        ))),
    }
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
    fn one_rank_is_local_and_several_cuda_ranks_wait_for_nccl() {
        let single = DistEnv::single();
        let c = collective_for(&single, Device::Cpu).unwrap();
        assert_eq!((c.backend(), c.world_size()), ("local", 1));
        let c = collective_for(&single, Device::Cuda(None)).unwrap();
        assert_eq!(c.backend(), "local");
        let two = DistEnv {
            rank: 1,
            world_size: 2,
            ..DistEnv::single()
        };
        let e = collective_for(&two, Device::Cuda(None))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("rank 1 of 2") && e.contains("NCCL collective is not yet available"),
            "{e}"
        );
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
