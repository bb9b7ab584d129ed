//! Sharded optimizer step (ZeRO-1, nanochat's `DistAdamW` / `DistMuon`): the ranks reduce-scatter
//! the gradients, each rank updates only the parameters it owns, with optimizer state for those
//! alone (≈ 1/world of it per rank), and the ranks all-gather the updated parameters.
//!
//! **Ownership.** Muon's Newton–Schulz needs a whole matrix, so every block matrix has one
//! owner (the reference deals same-shape matrices round-robin; here the largest-first greedy
//! over all matrices, which gives the same deal for groups of equal shapes and balances mixed
//! ones). AdamW is element-wise, so each AdamW parameter (token embedding, lm_head) is cut along
//! dim 0 like the reference's `DistAdamW`: rank `r` owns rows `r·⌈rows/W⌉ ..`, every rank a
//! slice. The AdamW slices are dealt first; the matrices then fill the ranks up evenly.
//!
//! **The communication buffer.** Reduce-scatter and all-gather (NCCL's and the TCP ring's)
//! work on equal contiguous shards of one buffer, but the model's flat gradient buffer keeps
//! the state_dict order, where a rank's matrices are scattered and the matrices are not cut at
//! shard boundaries. So, as llm.c and ZeRO-1 do, the step packs the gradients into a second flat
//! buffer re-laid out by owner: `W` segments of `segment` elements, rank `r`'s owned pieces
//! contiguous in segment `r` (each aligned to 64 elements, gaps zero). One reduce-scatter of it
//! leaves every rank with the averaged gradients of its own pieces; the rank steps them (its
//! parameters in the model's buffer, its gradients in the packed one), packs its updated
//! parameters into its segment, and one all-gather of the same buffer brings everyone's; they
//! are copied back into the model's buffer. The buffer costs one gradient-sized allocation
//! (world·segment ≥ the parameter count, by the balance's slack), and each step two packing
//! copies on the device; in exchange each collective is one call on one buffer. Per rank and
//! step a ring sends `(W−1)/W · world·segment · 4` bytes in the reduce-scatter and as many in
//! the all-gather: the bytes of the ring all-reduce it replaces.
//!
//! **Clipping** uses the global norm: each rank sums the squares of its own reduced shard (f64,
//! on the device), the ranks all-reduce the `f64` sums, and the square root is the norm.
//!
//! **Checkpoints** keep the unsharded format: at save time every rank's state is all-gathered
//! through the packed layout and rank 0 writes whole tensors; on resume each rank takes its
//! pieces from the whole tensors. So a checkpoint of a sharded run of N ranks and one of an
//! unsharded run (or of one rank) are the same files.

use std::ops::Range;
use std::time::Instant;

use nanochat_dist::{Collective, DeviceCollective, ReduceOp};
use nanochat_model::{Backend, Gpt, ModelError};

use crate::grad_sync::region_of;
use crate::optim::{NanochatOptimizer, OptimizerMeta, OptimizerSettings, ParamRole, StateTensor};
use crate::TrainError;

/// Alignment (elements) of every piece in the packed buffer: the model's own parameter
/// alignment, so device kernels see the same operand alignment as on the model's buffers.
const ALIGN: usize = nanochat_model::params::PARAM_ALIGN;

fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// One rank's share of one parameter: rows `rows` of parameter `param`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Index of the parameter (state_dict order).
    pub param: usize,
    /// Its rows this piece covers (all of them for a Muon matrix).
    pub rows: Range<usize>,
    /// The rank that updates it.
    pub owner: usize,
    /// First element in the packed buffer (inside the owner's segment).
    pub packed: usize,
    /// Elements.
    pub len: usize,
}

/// Who owns what, and where it sits in the packed buffer. The same on every rank: it depends
/// only on the parameter shapes and the world size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// Number of ranks.
    pub world: usize,
    /// Elements of each rank's segment of the packed buffer.
    pub segment: usize,
    /// Every piece, sorted by parameter, then rows.
    pub pieces: Vec<Piece>,
}

impl ShardPlan {
    /// The plan for parameters of these names and `[rows, cols]` shapes over `world` ranks.
    pub fn new(params: &[(String, [usize; 2])], world: usize) -> Result<Self, TrainError> {
        if world == 0 {
            return Err(TrainError::Config("a world of 0 ranks".into()));
        }
        let mut loads = vec![0usize; world];
        let mut owned: Vec<(usize, Range<usize>, usize)> = Vec::new();
        let mut matrices = Vec::new();
        for (i, (name, [rows, cols])) in params.iter().enumerate() {
            match ParamRole::of(name) {
                Some(ParamRole::Matrix) => matrices.push(i),
                Some(ParamRole::Embedding | ParamRole::Unembedding) => {
                    let chunk = rows.div_ceil(world).max(1);
                    for (r, load) in loads.iter_mut().enumerate() {
                        let rs = (r * chunk).min(*rows)..((r + 1) * chunk).min(*rows);
                        if !rs.is_empty() {
                            *load += aligned(rs.len() * cols);
                            owned.push((i, rs, r));
                        }
                    }
                }
                None => {
                    return Err(TrainError::Optimizer(format!(
                        "parameter `{name}` has no optimizer role in the nanochat recipe"
                    )))
                }
            }
        }
        // Largest first (stable: equal shapes keep state_dict order), each to the least loaded
        // rank (the lowest on ties): equal-shape groups go round-robin as in the reference.
        matrices.sort_by_key(|&i| std::cmp::Reverse(params[i].1[0] * params[i].1[1]));
        for i in matrices {
            let [rows, cols] = params[i].1;
            let owner = (0..world).min_by_key(|&r| (loads[r], r)).unwrap_or(0);
            loads[owner] += aligned(rows * cols);
            owned.push((i, 0..rows, owner));
        }
        owned.sort_by_key(|(i, rs, _)| (*i, rs.start));
        let segment = loads.iter().copied().max().unwrap_or(0).max(ALIGN);
        let mut fill = vec![0usize; world];
        let pieces = owned
            .into_iter()
            .map(|(param, rows, owner)| {
                let len = rows.len() * params[param].1[1];
                let packed = owner * segment + fill[owner];
                fill[owner] += aligned(len);
                Piece {
                    param,
                    rows,
                    owner,
                    packed,
                    len,
                }
            })
            .collect();
        Ok(Self {
            world,
            segment,
            pieces,
        })
    }

    /// Elements of the packed buffer.
    pub fn packed_len(&self) -> usize {
        self.world * self.segment
    }
}

/// The nanochat optimizers over the pieces one rank owns, and the packed buffer of the step.
pub struct ShardedOptimizer<B: Backend> {
    rank: usize,
    plan: ShardPlan,
    /// Names and `[rows, cols]` of every parameter, state_dict order.
    params: Vec<(String, [usize; 2])>,
    /// Per piece (plan order): its range in the model's buffers, in the packed buffer, owner.
    spans: Vec<(Range<usize>, Range<usize>, usize)>,
    inner: NanochatOptimizer<B>,
    packed: B::Buf,
    host: Vec<f32>,
}

/// What one sharded step measured.
#[derive(Debug, Clone, Copy)]
pub struct ShardedStep {
    /// Global gradient norm before clipping.
    pub norm: f64,
    /// Seconds spent in the reduce-scatter and the all-gather (as the host sees them).
    pub comm_seconds: f64,
}

fn dist_err(what: &'static str) -> impl Fn(nanochat_dist::DistError) -> TrainError {
    move |e| TrainError::Config(format!("sharded optimizer {what}: {e}"))
}

#[derive(Clone, Copy)]
enum Op {
    ReduceScatter,
    AllGather,
}

impl<B: Backend> ShardedOptimizer<B> {
    /// Rank `rank`'s share of the optimizers of `model` in a world of `world` ranks.
    pub fn for_model(
        model: &Gpt<B>,
        settings: OptimizerSettings,
        rank: usize,
        world: usize,
    ) -> Result<Self, TrainError> {
        if rank >= world {
            return Err(TrainError::Config(format!(
                "rank {rank} is not in a world of {world}"
            )));
        }
        let params: Vec<(String, [usize; 2])> = model
            .param_specs()
            .iter()
            .map(|s| (s.name.clone(), s.shape))
            .collect();
        let offsets: Vec<usize> = model.param_layout().iter().map(|s| s.offset).collect();
        let plan = ShardPlan::new(&params, world)?;
        let spans = plan
            .pieces
            .iter()
            .map(|p| {
                let start = offsets[p.param] + p.rows.start * params[p.param].1[1];
                (start..start + p.len, p.packed..p.packed + p.len, p.owner)
            })
            .collect();
        let mine: Vec<(String, Vec<usize>)> = plan
            .pieces
            .iter()
            .filter(|p| p.owner == rank)
            .map(|p| {
                (
                    params[p.param].0.clone(),
                    vec![p.rows.len(), params[p.param].1[1]],
                )
            })
            .collect();
        let backend = model.backend().clone();
        let inner = NanochatOptimizer::new_on(
            backend.clone(),
            mine.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            model.config().n_embd,
            settings,
        )?;
        let packed = backend
            .alloc(plan.packed_len(), "sharded optimizer's packed buffer")
            .map_err(ModelError::from)?;
        Ok(Self {
            rank,
            plan,
            params,
            spans,
            inner,
            packed,
            host: Vec::new(),
        })
    }

    /// The ownership plan.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// f32 elements of optimizer state this rank holds.
    pub fn state_elements(&self) -> usize {
        self.inner.state_elements()
    }

    /// Sets Muon's momentum for the following steps.
    pub fn set_muon_momentum(&mut self, momentum: f32) {
        self.inner.set_muon_momentum(momentum);
    }

    fn mine(&self) -> impl Iterator<Item = &Piece> {
        self.plan
            .pieces
            .iter()
            .filter(move |p| p.owner == self.rank)
    }

    /// One collective over the packed buffer: on the device with `device`, in place on host
    /// memory, else through a host copy.
    fn collective(
        &mut self,
        be: &B,
        coll: &mut dyn Collective,
        device: Option<&mut (dyn DeviceCollective + '_)>,
        op: Op,
    ) -> Result<(), TrainError> {
        if let Some(dev) = device {
            let done = be
                .with_device_memory(B::view_mut(&mut self.packed), |m| {
                    // SAFETY: the region is the live packed buffer on the backend's stream,
                    // which orders the collective after the packing copies and before the
                    // kernels that read it.
                    unsafe {
                        match op {
                            Op::ReduceScatter => dev
                                .reduce_scatter_device(region_of(m), ReduceOp::Avg)
                                .map(|_| ()),
                            Op::AllGather => dev.all_gather_device(region_of(m)),
                        }
                    }
                })
                .map_err(ModelError::from)?;
            if let Some(r) = done {
                return r.map_err(dist_err("collective"));
            }
        }
        if coll.world_size() == 1 {
            return Ok(());
        }
        let run = |coll: &mut dyn Collective, buf: &mut [f32]| -> Result<(), TrainError> {
            match op {
                Op::ReduceScatter => coll
                    .reduce_scatter(buf, ReduceOp::Avg)
                    .map(|_| ())
                    .map_err(dist_err("reduce-scatter")),
                Op::AllGather => coll.all_gather(buf).map_err(dist_err("all-gather")),
            }
        };
        if let Some(v) = (&mut self.packed as &mut dyn std::any::Any).downcast_mut::<Vec<f32>>() {
            return run(coll, v);
        }
        self.host.resize(self.plan.packed_len(), 0.0);
        be.download(B::view(&self.packed), &mut self.host)
            .map_err(ModelError::from)?;
        run(coll, &mut self.host)?;
        be.upload(&self.host, B::view_mut(&mut self.packed))
            .map_err(ModelError::from)?;
        Ok(())
    }

    /// The whole data-parallel optimizer step from each rank's local mean gradients: reduce-
    /// scatter, global norm (and clipping to `grad_clip` when it is positive), the update of
    /// this rank's pieces at `lr_mult`, all-gather of the parameters. Every rank ends with the
    /// same weights.
    pub fn step(
        &mut self,
        model: &mut Gpt<B>,
        coll: &mut dyn Collective,
        mut device: Option<&mut (dyn DeviceCollective + '_)>,
        lr_mult: f32,
        grad_clip: f32,
    ) -> Result<ShardedStep, TrainError> {
        let be = model.backend().clone();
        let map = |e| TrainError::from(ModelError::from(e));
        // Pack every gradient into its owner's segment.
        {
            let views = model.step_views()?;
            for (src, dst, _) in &self.spans {
                let src = B::slice(views.grads, src.clone());
                let dst = B::slice_mut(B::view_mut(&mut self.packed), dst.clone());
                be.copy(src, dst).map_err(map)?;
            }
        }
        let t = Instant::now();
        self.collective(&be, coll, device.as_deref_mut(), Op::ReduceScatter)?;
        let mut comm_seconds = t.elapsed().as_secs_f64();

        let seg = self.rank * self.plan.segment..(self.rank + 1) * self.plan.segment;
        let mut sq = [be
            .sum_squares(B::slice(B::view(&self.packed), seg.clone()))
            .map_err(map)?];
        if coll.world_size() > 1 {
            coll.all_reduce_f64(&mut sq, ReduceOp::Sum)
                .map_err(dist_err("gradient norm"))?;
        }
        if !sq[0].is_finite() {
            return Err(ModelError::NonFinite {
                what: "gradient norm".into(),
                value: sq[0],
            }
            .into());
        }
        let norm = sq[0].sqrt();
        if grad_clip > 0.0 {
            // torch's clip_grad_norm_ (and the unsharded path's), on the owned shard.
            let coef = f64::from(grad_clip) / (norm + 1e-6);
            if coef < 1.0 {
                be.scale(
                    B::slice_mut(B::view_mut(&mut self.packed), seg),
                    coef as f32,
                )
                .map_err(map)?;
            }
        }

        // Update the owned pieces: parameters in the model's buffer, gradients in the packed
        // one (pieces are sorted by parameter, so their model ranges are ascending).
        {
            let ranges: Vec<(usize, Range<usize>, Range<usize>)> = self
                .plan
                .pieces
                .iter()
                .zip(&self.spans)
                .filter(|(p, _)| p.owner == self.rank)
                .map(|(p, (src, dst, _))| (p.param, src.clone(), dst.clone()))
                .collect();
            let views = model.step_views()?;
            let mut rest = views.params;
            let mut consumed = 0;
            let mut items = Vec::with_capacity(ranges.len());
            for (param, src, dst) in &ranges {
                let (_, tail) = B::split_at_mut(rest, src.start - consumed);
                let (data, tail) = B::split_at_mut(tail, src.len());
                rest = tail;
                consumed = src.end;
                let grad = B::slice(B::view(&self.packed), dst.clone());
                items.push((self.params[*param].0.as_str(), data, grad));
            }
            self.inner.step(lr_mult, items)?;
        }

        // Pack the updated parameters, gather everyone's, unpack the others'.
        {
            let views = model.step_views()?;
            for (src, dst, owner) in &self.spans {
                if *owner == self.rank {
                    let src = B::slice(B::as_view(&views.params), src.clone());
                    let dst = B::slice_mut(B::view_mut(&mut self.packed), dst.clone());
                    be.copy(src, dst).map_err(map)?;
                }
            }
        }
        let t = Instant::now();
        self.collective(&be, coll, device, Op::AllGather)?;
        comm_seconds += t.elapsed().as_secs_f64();
        {
            let views = model.step_views()?;
            let mut params = views.params;
            for (dst, src, owner) in &self.spans {
                if *owner != self.rank {
                    let src = B::slice(B::view(&self.packed), src.clone());
                    let dst = B::slice_mut(B::reborrow(&mut params), dst.clone());
                    be.copy(src, dst).map_err(map)?;
                }
            }
        }
        Ok(ShardedStep { norm, comm_seconds })
    }

    /// The state of every owner gathered into whole tensors, in the unsharded optimizer's
    /// names, shapes and order, and its scalars. A collective call (every rank makes it,
    /// through the host collective); `Some` on rank 0 only.
    pub fn gather_state(
        &mut self,
        coll: &mut dyn Collective,
    ) -> Result<Option<(Vec<StateTensor>, OptimizerMeta)>, TrainError> {
        let n = self.plan.packed_len();
        let mine = self.inner.state_tensors()?;
        let mut moments = [vec![0.0f32; n], vec![0.0f32; n]];
        for p in self.plan.pieces.iter().filter(|p| p.owner == self.rank) {
            let name = &self.params[p.param].0;
            let at = p.packed..p.packed + p.len;
            for (t, data) in mine.iter().map(|(tn, _, d)| (tn, d)) {
                if *t == format!("adamw.{name}.exp_avg")
                    || *t == format!("muon.{name}.momentum_buffer")
                {
                    moments[0][at.clone()].copy_from_slice(data);
                } else if *t == format!("adamw.{name}.exp_avg_sq") {
                    moments[1][at.clone()].copy_from_slice(data);
                }
            }
        }
        if coll.world_size() > 1 {
            for m in &mut moments {
                coll.all_gather(m).map_err(dist_err("checkpoint gather"))?;
            }
        }
        if self.rank != 0 {
            return Ok(None);
        }
        let whole = |i: usize, which: usize| -> Vec<f32> {
            let mut out = Vec::new();
            for p in self.plan.pieces.iter().filter(|p| p.param == i) {
                out.extend_from_slice(&moments[which][p.packed..p.packed + p.len]);
            }
            out
        };
        let mut out = Vec::new();
        let mut muon = Vec::new();
        for (i, (name, [rows, cols])) in self.params.iter().enumerate() {
            if ParamRole::of(name) == Some(ParamRole::Matrix) {
                muon.push((
                    format!("muon.{name}.momentum_buffer"),
                    vec![*rows, *cols],
                    whole(i, 0),
                ));
            } else {
                let len = rows * cols;
                out.push((format!("adamw.{name}.exp_avg"), vec![len], whole(i, 0)));
                out.push((format!("adamw.{name}.exp_avg_sq"), vec![len], whole(i, 1)));
            }
        }
        out.extend(muon);
        // Rank 0 owns the first rows of every AdamW parameter, so its step counts name them
        // all (every slice steps together).
        Ok(Some((out, self.inner.meta())))
    }

    /// Restores this rank's pieces from whole tensors saved in the unsharded format
    /// (`lookup(name)` returns a saved tensor's data).
    pub fn restore(
        &mut self,
        meta: &OptimizerMeta,
        mut lookup: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<(), TrainError> {
        let mut pieces = std::collections::HashMap::new();
        for p in self.mine() {
            let (name, [rows, cols]) = &self.params[p.param];
            pieces.insert(
                name.clone(),
                (p.rows.start * cols..p.rows.end * cols, rows * cols),
            );
        }
        self.inner.restore(meta, |tensor| {
            let param = tensor
                .strip_prefix("adamw.")
                .or_else(|| tensor.strip_prefix("muon."))?;
            let param = param
                .strip_suffix(".exp_avg")
                .or_else(|| param.strip_suffix(".exp_avg_sq"))
                .or_else(|| param.strip_suffix(".momentum_buffer"))?;
            let (range, whole) = pieces.get(param)?;
            let v = lookup(tensor)?;
            // A tensor of the wrong size is passed on whole, for the inner check to name it.
            if v.len() != *whole {
                return Some(v);
            }
            Some(v[range.clone()].to_vec())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(depth: usize) -> Vec<(String, [usize; 2])> {
        let cfg = nanochat_model::GptConfig::from_depth(depth, 300, 32).expect("config");
        nanochat_model::params::param_specs(&cfg)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect()
    }

    #[test]
    fn every_element_has_one_owner_and_matrices_stay_whole() {
        let params = shapes(2);
        for world in [1, 2, 3, 4, 8] {
            let plan = ShardPlan::new(&params, world).unwrap();
            for (i, (name, [rows, cols])) in params.iter().enumerate() {
                let ps: Vec<&Piece> = plan.pieces.iter().filter(|p| p.param == i).collect();
                let covered: usize = ps.iter().map(|p| p.len).sum();
                assert_eq!(covered, rows * cols, "{name} at {world}");
                if ParamRole::of(name) == Some(ParamRole::Matrix) {
                    assert_eq!(ps.len(), 1, "{name} is split");
                }
                // Row ranges follow each other.
                let mut next = 0;
                for p in ps {
                    assert_eq!(p.rows.start, next);
                    next = p.rows.end;
                    assert!(p.packed >= p.owner * plan.segment);
                    assert!(p.packed + p.len <= (p.owner + 1) * plan.segment);
                    assert_eq!(p.packed % ALIGN, 0);
                }
            }
            // No two pieces overlap in the packed buffer.
            let mut spans: Vec<(usize, usize)> = plan
                .pieces
                .iter()
                .map(|p| (p.packed, p.packed + p.len))
                .collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        }
    }

    #[test]
    fn a_world_of_one_owns_everything_in_state_dict_order() {
        let params = shapes(1);
        let plan = ShardPlan::new(&params, 1).unwrap();
        assert_eq!(plan.pieces.len(), params.len());
        assert!(plan.pieces.iter().all(|p| p.owner == 0));
        assert!(ShardPlan::new(&params, 0).is_err());
    }
}
