//! Process-level pieces shared by `nanochat-pretrain`, `nanochat-midtrain` and `nanochat-sft`
//! (each a `nanochat_artifacts::stage::run_main`): the worker pool, this process's place in a
//! data-parallel job and the collective joining it to the other ranks, and the exit code of a
//! run (0 when finished; 130/143 when a signal stopped it after a checkpoint).

use nanochat_artifacts::stage;
use nanochat_dist::{Collective, DistEnv, Launcher, LocalCollective, TcpCollective, TcpOptions};
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

/// The host collective that joins this rank to the others of `env`: [`LocalCollective`] for
/// a world of one, else a [`TcpCollective`] (rendezvous at `MASTER_ADDR:MASTER_PORT`,
/// timeouts from `NANOCHAT_DIST_*`). CPU ranks reduce everything over it; CUDA ranks use it
/// for the rendezvous, NCCL's unique id and the step's scalars, and NCCL for the gradients
/// (see [`wants_nccl`]).
pub fn collective_for(env: &DistEnv, device: Device) -> Result<Box<dyn Collective>, TrainError> {
    if !env.is_distributed() {
        return Ok(Box::new(LocalCollective));
    }
    tracing::info!(
        rank = env.rank,
        world = env.world_size,
        %device,
        master = %format!("{}:{}", env.master_addr, env.master_port),
        "joining the data-parallel job (TCP collective{})",
        if matches!(device, Device::Cuda(_)) { ", NCCL for the gradients" } else { "" }
    );
    Ok(Box::new(TcpCollective::connect(
        env,
        TcpOptions::from_env()?,
    )?))
}

/// True when gradients go through NCCL: a CUDA device in a job a launcher started (torchrun's
/// or Slurm's variables, or `nanochat-run`'s `ranks:`), a world of one included, so that one
/// GPU under `torchrun --nproc_per_node=1` runs the code path of eight. A plain single-GPU
/// run (no launcher variables) needs no NCCL.
pub fn wants_nccl(env: &DistEnv, device: Device) -> bool {
    matches!(device, Device::Cuda(_)) && env.launcher != Launcher::Single
}

/// The GPU of this rank: `device = "cuda"` (no index) means GPU `LOCAL_RANK` when several
/// ranks share the machine, as torchrun's convention is; an explicit `cuda:N` is kept (for
/// launchers that give each rank one visible GPU through `CUDA_VISIBLE_DEVICES`).
pub fn device_for_rank(device: Device, env: &DistEnv) -> Device {
    match device {
        Device::Cuda(None) if env.local_world_size > 1 => Device::Cuda(Some(env.local_rank)),
        d => d,
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
    fn one_rank_is_local_and_cuda_ranks_under_a_launcher_use_nccl() {
        let single = DistEnv::single();
        let c = collective_for(&single, Device::Cpu).unwrap();
        assert_eq!((c.backend(), c.world_size()), ("local", 1));
        let c = collective_for(&single, Device::Cuda(None)).unwrap();
        assert_eq!(c.backend(), "local");
        // No launcher: one GPU without NCCL; torchrun's world of one: NCCL, as for eight.
        assert!(!wants_nccl(&single, Device::Cuda(None)));
        let torchrun_one = DistEnv {
            launcher: Launcher::Torchrun,
            ..DistEnv::single()
        };
        assert!(wants_nccl(&torchrun_one, Device::Cuda(Some(0))));
        assert!(!wants_nccl(&torchrun_one, Device::Cpu));
        assert_eq!(
            collective_for(&torchrun_one, Device::Cuda(None))
                .unwrap()
                .backend(),
            "local"
        );
    }

    #[test]
    fn each_local_rank_takes_its_own_gpu_unless_one_is_named() {
        let rank3 = DistEnv {
            rank: 11,
            world_size: 16,
            local_rank: 3,
            local_world_size: 8,
            launcher: Launcher::Slurm,
            ..DistEnv::single()
        };
        assert_eq!(
            device_for_rank(Device::Cuda(None), &rank3),
            Device::Cuda(Some(3))
        );
        assert_eq!(
            device_for_rank(Device::Cuda(Some(0)), &rank3),
            Device::Cuda(Some(0))
        );
        assert_eq!(device_for_rank(Device::Cpu, &rank3), Device::Cpu);
        assert_eq!(
            device_for_rank(Device::Cuda(None), &DistEnv::single()),
            Device::Cuda(None)
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
