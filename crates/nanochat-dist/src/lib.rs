//! Data-parallel plumbing for nanochat's training stages, below any model or training crate:
//!
//! - [`DistEnv`]: who this process is in the job, from the variables torchrun or Slurm (or
//!   `nanochat-run`, or a user by hand) give it;
//! - [`Collective`]: the operations training needs (all-reduce, reduce-scatter, all-gather,
//!   broadcast, barrier), each leaving every rank with bit-identical results;
//! - [`LocalCollective`] (a world of one) and [`TcpCollective`] (CPU ranks over a TCP ring,
//!   with a rendezvous at `MASTER_ADDR:MASTER_PORT` and fault detection);
//! - [`NcclComm`] for CUDA ranks: `libnccl.so.2` loaded at run time, its unique id exchanged
//!   with [`Collective::broadcast_bytes`] over the host collective, gradients reduced on the
//!   device ([`DeviceCollective`]).
#![warn(missing_docs)]

mod collective;
mod env;
mod error;
mod hostlist;
mod nccl;
mod tcp;

pub use collective::{shard_range, Collective, LocalCollective, ReduceOp};
pub use env::{DistEnv, Launcher, DEFAULT_MASTER_PORT};
pub use error::DistError;
pub use hostlist::{expand_hostlist, expand_tasks_per_node, first_host};
pub use nccl::{DeviceCollective, DeviceRegion, NcclComm};
pub use tcp::{TcpCollective, TcpOptions};

/// The collective for `env`: [`LocalCollective`] for a world of one, else a [`TcpCollective`]
/// with the timeouts of [`TcpOptions::from_env`].
pub fn connect(env: &DistEnv) -> Result<Box<dyn Collective>, DistError> {
    if !env.is_distributed() {
        return Ok(Box::new(LocalCollective));
    }
    Ok(Box::new(TcpCollective::connect(
        env,
        TcpOptions::from_env()?,
    )?))
}
