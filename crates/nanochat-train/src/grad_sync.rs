//! The gradient all-reduce of a data-parallel step: one collective over the model's flat
//! gradient buffer (as llm.c does), where the gradients live.
//!
//! - With a device collective (CUDA + NCCL): on the device, enqueued on the backend's stream
//!   right behind the backward pass; no host round trip.
//! - Otherwise: through a host copy of the buffer (on the CPU backend a memcpy each way,
//!   small beside the TCP ring's transfers).

use nanochat_dist::{Collective, DeviceRegion, ReduceOp};
use nanochat_model::{Backend, Gpt};

use crate::TrainError;

fn dist_err(e: nanochat_dist::DistError) -> TrainError {
    TrainError::Config(format!("gradient all-reduce: {e}"))
}

/// Averages the gradients of `model` across the ranks of `dist` (a no-op for a world of one
/// without a device collective). Every rank ends with the same bits.
pub fn all_reduce_gradients<B: Backend>(
    model: &mut Gpt<B>,
    dist: &mut dyn Collective,
) -> Result<(), TrainError> {
    if dist.world_size() == 1 && dist.device().is_none() {
        return Ok(());
    }
    let backend = model.backend().clone();
    if let Some(dev) = dist.device() {
        let grads = model.grads_view_mut()?;
        let done = backend
            .with_device_memory(grads, |m| {
                let region = DeviceRegion {
                    ptr: m.ptr,
                    len: m.len,
                    stream: m.stream,
                };
                // SAFETY: the region is the live gradient buffer on the backend's stream, which
                // orders the reduction after the backward kernels and before the optimizer's.
                unsafe { dev.all_reduce_device(region, ReduceOp::Avg) }
            })
            .map_err(nanochat_model::ModelError::from)?;
        if let Some(r) = done {
            return r.map_err(dist_err);
        }
    }
    let grads = model.grads_view_mut()?;
    let n = B::len_mut(&grads);
    let mut host = vec![0.0f32; n];
    backend
        .download(B::as_view(&grads), &mut host)
        .map_err(nanochat_model::ModelError::from)?;
    dist.all_reduce(&mut host, ReduceOp::Avg)
        .map_err(dist_err)?;
    backend
        .upload(&host, grads)
        .map_err(nanochat_model::ModelError::from)?;
    Ok(())
}
