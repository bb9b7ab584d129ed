//! The gradient all-reduce of a data-parallel step: one collective over the model's flat
//! gradient buffer (as llm.c does), where the gradients live.
//!
//! - With a device collective (CUDA + NCCL): on the device, enqueued on the backend's stream
//!   right behind the backward pass; no host round trip. A world of one still makes the call,
//!   so one GPU runs the code path of many.
//! - CPU backend: in place on the host buffer, through the host collective.
//! - Another device backend without a device collective: through a host copy of the buffer.
//! - A world of one without a device collective: nothing, so that path stays bit for bit the
//!   single-process one.

use nanochat_dist::{Collective, DeviceCollective, DeviceRegion, ReduceOp};
use nanochat_model::compute::DeviceMemory;
use nanochat_model::{Backend, Cpu, Gpt};

use crate::TrainError;

/// The backend's device memory as the collectives name it (the two crates sit side by side,
/// neither depends on the other).
pub fn region_of(m: DeviceMemory) -> DeviceRegion {
    DeviceRegion {
        ptr: m.ptr,
        len: m.len,
        stream: m.stream,
    }
}

fn dist_err(e: nanochat_dist::DistError) -> TrainError {
    TrainError::Config(format!("gradient all-reduce: {e}"))
}

/// Averages the gradients of `model` across the ranks (see the module docs for which path).
/// `host` is reused scratch for the host-copy path. Every rank ends with the same bits.
pub fn all_reduce_gradients<'d, B: Backend>(
    model: &mut Gpt<B>,
    coll: &mut dyn Collective,
    device: Option<&mut (dyn DeviceCollective + 'd)>,
    host: &mut Vec<f32>,
) -> Result<(), TrainError> {
    if let Some(dev) = device {
        let backend = model.backend().clone();
        let grads = model.grads_view_mut()?;
        let done = backend
            .with_device_memory(grads, |m| {
                // SAFETY: the region is the live gradient buffer on the backend's stream, which
                // orders the reduction after the backward kernels and before the optimizer's.
                unsafe { dev.all_reduce_device(region_of(m), ReduceOp::Avg) }
            })
            .map_err(nanochat_model::ModelError::from)?;
        if let Some(r) = done {
            return r.map_err(dist_err);
        }
        // Host memory after all: fall through to the host collective.
    }
    if coll.world_size() == 1 {
        return Ok(());
    }
    if let Some(cpu) = (model as &mut dyn std::any::Any).downcast_mut::<Gpt<Cpu>>() {
        let grads = cpu
            .grads_flat_mut()
            .ok_or_else(|| TrainError::Optimizer("gradients missing after backward".into()))?;
        return coll.all_reduce(grads, ReduceOp::Avg).map_err(dist_err);
    }
    let backend = model.backend().clone();
    let mut view = model.grads_view_mut()?;
    host.resize(B::len_mut(&view), 0.0);
    backend
        .download(B::as_view(&view), host)
        .map_err(nanochat_model::ModelError::from)?;
    coll.all_reduce(host, ReduceOp::Avg).map_err(dist_err)?;
    backend
        .upload(host, B::reborrow(&mut view))
        .map_err(nanochat_model::ModelError::from)?;
    Ok(())
}
