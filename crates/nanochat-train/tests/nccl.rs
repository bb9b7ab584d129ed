//! NCCL on one GPU: a world of one through the same code path as N CUDA ranks (the unique id
//! over the host collective, the communicator, the gradient all-reduce on the device on the
//! backend's stream). Skips with a notice where no GPU or no libnccl.so.2 is found;
//! scripts/gpu-tests.sh runs it on a GPU machine.
#![cfg(feature = "cuda")]

use nanochat_dist::{
    Collective, DeviceCollective, DeviceRegion, LocalCollective, NcclComm, ReduceOp,
};
use nanochat_model::compute::cuda::Cuda;
use nanochat_model::compute::Backend;
use nanochat_model::{Gpt, GptConfig, Reduction};
use nanochat_train::grad_sync::{all_reduce_gradients, region_of};

fn gpu_and_nccl() -> Option<(Cuda, NcclComm)> {
    let g = match Cuda::open(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("NOTICE: no GPU, skipping the NCCL test: {e}");
            return None;
        }
    };
    match NcclComm::connect(&mut LocalCollective) {
        Ok(n) => Some((g, n)),
        Err(e) => {
            eprintln!("NOTICE: no NCCL, skipping the NCCL test: {e}");
            None
        }
    }
}

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.1)
        .collect()
}

/// Runs `op` on the device memory of a buffer holding `values(n)`; returns its result and
/// what the buffer holds after.
fn on_device_result(
    g: &Cuda,
    n: usize,
    op: impl FnOnce(DeviceRegion) -> Result<(), nanochat_dist::DistError>,
) -> (Result<(), nanochat_dist::DistError>, Vec<f32>) {
    let mut buf = g.alloc(n, "nccl test").unwrap();
    g.upload(&values(n), Cuda::view_mut(&mut buf)).unwrap();
    let r = g
        .with_device_memory(Cuda::view_mut(&mut buf), |m| op(region_of(m)))
        .unwrap()
        .expect("CUDA buffers are device memory");
    let mut out = vec![0.0; n];
    g.download(Cuda::view(&buf), &mut out).unwrap();
    (r, out)
}

/// [`on_device_result`] of an operation that must succeed: the buffer after it.
fn on_device(
    g: &Cuda,
    n: usize,
    op: impl FnOnce(DeviceRegion) -> Result<(), nanochat_dist::DistError>,
) -> Vec<f32> {
    let (r, out) = on_device_result(g, n, op);
    r.unwrap();
    out
}

/// [`on_device_result`] of an operation that must fail: its error.
fn on_device_err(
    g: &Cuda,
    op: impl FnOnce(DeviceRegion) -> Result<(), nanochat_dist::DistError>,
) -> String {
    on_device_result(g, 8, op).0.unwrap_err().to_string()
}

#[test]
fn a_world_of_one_reduces_gathers_and_broadcasts_on_the_device() {
    let Some((g, mut nccl)) = gpu_and_nccl() else {
        return;
    };
    let (version, path) = nccl.library();
    eprintln!("NCCL {version} from {path}");
    assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));
    let n = 1 << 20;
    let want = values(n);
    // A world of one: sum and average are the identity, bit for bit.
    for op in [ReduceOp::Sum, ReduceOp::Avg] {
        let got = on_device(&g, n, |r| unsafe { nccl.all_reduce_device(r, op) });
        assert!(got == want, "{op:?} changed the values");
    }
    let got = on_device(&g, n, |r| {
        let shard = unsafe { nccl.reduce_scatter_device(r, ReduceOp::Avg) }?;
        assert_eq!(shard, 0..n);
        unsafe { nccl.all_gather_device(r) }
    });
    assert!(
        got == want,
        "reduce-scatter + all-gather changed the values"
    );
    let got = on_device(&g, n, |r| unsafe { nccl.broadcast_device(r, 0) });
    assert!(got == want);
    let e = on_device_err(&g, |r| unsafe { nccl.broadcast_device(r, 1) });
    assert!(e.contains("root 1"), "{e}");
    // After an abort every operation fails instead of waiting for peers.
    nccl.abort();
    let e = on_device_err(&g, |r| unsafe { nccl.all_reduce_device(r, ReduceOp::Sum) });
    assert!(e.contains("aborted"), "{e}");
}

/// A host collective that is not a world of one in name only: it forces the host-staging path
/// of the gradient all-reduce (download, reduce, upload) on a device backend.
struct StagedOne(LocalCollective);

impl Collective for StagedOne {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        // Claims two so the all-reduce is not skipped; the reduction itself is the identity.
        2
    }
    fn backend(&self) -> &'static str {
        "staged"
    }
    fn all_reduce(&mut self, _: &mut [f32], _: ReduceOp) -> Result<(), nanochat_dist::DistError> {
        Ok(())
    }
    fn all_reduce_f64(
        &mut self,
        b: &mut [f64],
        o: ReduceOp,
    ) -> Result<(), nanochat_dist::DistError> {
        self.0.all_reduce_f64(b, o)
    }
    fn reduce_scatter(
        &mut self,
        b: &mut [f32],
        o: ReduceOp,
    ) -> Result<std::ops::Range<usize>, nanochat_dist::DistError> {
        self.0.reduce_scatter(b, o)
    }
    fn all_gather(&mut self, b: &mut [f32]) -> Result<(), nanochat_dist::DistError> {
        self.0.all_gather(b)
    }
    fn broadcast(&mut self, b: &mut [f32], r: usize) -> Result<(), nanochat_dist::DistError> {
        self.0.broadcast(b, r)
    }
    fn broadcast_bytes(
        &mut self,
        b: &mut Vec<u8>,
        r: usize,
    ) -> Result<(), nanochat_dist::DistError> {
        self.0.broadcast_bytes(b, r)
    }
    fn barrier(&mut self) -> Result<(), nanochat_dist::DistError> {
        Ok(())
    }
}

fn grads_after(
    g: &Cuda,
    dist: Option<(&mut dyn Collective, Option<&mut dyn DeviceCollective>)>,
) -> Vec<f32> {
    let (b, t, vocab) = (2, 16, 128);
    let mut model = Gpt::new(GptConfig::from_depth(2, vocab, t).unwrap(), 5)
        .unwrap()
        .to_backend(g.clone())
        .unwrap();
    let idx: Vec<u32> = (0..b * t).map(|i| (i * 7 % vocab) as u32).collect();
    let tg: Vec<i32> = (0..b * t).map(|i| ((i * 7 + 3) % vocab) as i32).collect();
    model.zero_grad().unwrap();
    model
        .forward_backward(&idx, &tg, b, t, Reduction::Mean)
        .unwrap();
    if let Some((host, dev)) = dist {
        all_reduce_gradients(&mut model, host, dev, &mut Vec::new()).unwrap();
    }
    let grads = model.grads_view_mut().unwrap();
    let mut out = vec![0.0; Cuda::len_mut(&grads)];
    g.download(Cuda::as_view(&grads), &mut out).unwrap();
    out
}

#[test]
fn the_gradient_all_reduce_runs_on_the_device_and_keeps_a_world_of_ones_bits() {
    let Some((g, mut nccl)) = gpu_and_nccl() else {
        return;
    };
    let plain = grads_after(&g, None);
    assert!(
        plain.iter().any(|&x| x != 0.0),
        "the backward pass wrote gradients"
    );
    let through_nccl = grads_after(&g, Some((&mut LocalCollective, Some(&mut nccl))));
    assert!(
        through_nccl == plain,
        "NCCL's average over one rank changed the gradients"
    );
    let staged = grads_after(&g, Some((&mut StagedOne(LocalCollective), None)));
    assert!(
        staged == plain,
        "the host-staged path changed the gradients"
    );
}

/// The weights after one optimizer step from the gradients of one batch: replicated
/// (`dist` `None`), or sharded over a world of one through `dist`'s collectives.
fn weights_after_step(
    g: &Cuda,
    dist: Option<(&mut dyn Collective, Option<&mut dyn DeviceCollective>)>,
) -> Vec<f32> {
    use nanochat_train::optim::{NanochatOptimizer, OptimizerSettings};
    use nanochat_train::shard::ShardedOptimizer;
    let (b, t, vocab) = (2, 16, 128);
    let mut model = Gpt::new(GptConfig::from_depth(2, vocab, t).unwrap(), 5)
        .unwrap()
        .to_backend(g.clone())
        .unwrap();
    let idx: Vec<u32> = (0..b * t).map(|i| (i * 7 % vocab) as u32).collect();
    let tg: Vec<i32> = (0..b * t).map(|i| ((i * 7 + 3) % vocab) as i32).collect();
    model.zero_grad().unwrap();
    model
        .forward_backward(&idx, &tg, b, t, Reduction::Mean)
        .unwrap();
    let settings = OptimizerSettings::default();
    match dist {
        None => {
            let mut opt = NanochatOptimizer::for_model(&model, settings).unwrap();
            opt.step_model(&mut model, 1.0).unwrap();
        }
        Some((host, dev)) => {
            let mut opt = ShardedOptimizer::for_model(&model, settings, 0, 1).unwrap();
            let s = opt.step(&mut model, host, dev, 1.0, 0.0).unwrap();
            assert!(s.norm > 0.0 && s.norm.is_finite(), "{s:?}");
        }
    }
    (0..model.param_specs().len())
        .flat_map(|i| model.download_param(i).unwrap())
        .collect()
}

#[test]
fn a_sharded_step_on_an_nccl_world_of_one_matches_the_replicated_step() {
    let Some((g, mut nccl)) = gpu_and_nccl() else {
        return;
    };
    let plain = weights_after_step(&g, None);
    let max_diff = |w: &[f32]| {
        w.iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    // Reduce-scatter and all-gather of the packed buffer on the device (NCCL), then through
    // the host-staged path. The same kernels on the same gradients (no clipping: the norm is
    // only summed in another order), so the same weights are expected; the bound allows
    // for nothing but rounding.
    let sharded = weights_after_step(&g, Some((&mut LocalCollective, Some(&mut nccl))));
    let d = max_diff(&sharded);
    eprintln!("NCCL sharded vs replicated: max |Δw| {d:.2e}");
    assert!(d < 1e-6, "the sharded step over NCCL differs by {d:.2e}");
    let staged = weights_after_step(&g, Some((&mut StagedOne(LocalCollective), None)));
    let d = max_diff(&staged);
    assert!(d < 1e-6, "the host-staged sharded step differs by {d:.2e}");
}
