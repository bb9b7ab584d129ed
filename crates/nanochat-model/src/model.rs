//! The GPT: parameters, reference initialisation, training forward/backward, full-batch logits.

use rayon::prelude::*;

use crate::config::GptConfig;
use crate::error::{alloc_f32, ModelError, Result};
use crate::kernels::bf16::{gemm_bf16_prepacked_with, GemmOpts, Op, PackedB};
use crate::kernels::{has_avx2, matmul_nn, matmul_tn_acc, transpose, MatmulPrecision};
use crate::ops::{
    attention_bwd, attention_fwd, rmsnorm_bwd, rmsnorm_bwd_inplace, rmsnorm_fwd, rmsnorm_inplace,
    softcapped_ce_row, with_task_scratch, AttnShape, Rope,
};
use crate::params::{
    layer_param, lm_head_index, param_specs, ParamGroup, ParamSpec, FC, K, MLP_PROJ, PROJ, Q, V,
    WTE,
};
use crate::rng::Rng;

/// How per-token losses are combined (as `F.cross_entropy`'s `reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the targets that are not ignored (-1).
    Mean,
    /// Sum over the targets that are not ignored.
    Sum,
}

/// Read access to one parameter.
#[derive(Debug)]
pub struct ParamRef<'a> {
    /// The reference's state_dict name.
    pub name: &'a str,
    /// `[out, in]` (embedding: `[padded_vocab, n_embd]`).
    pub shape: [usize; 2],
    /// Optimizer group.
    pub group: ParamGroup,
    /// Values, row-major.
    pub data: &'a [f32],
    /// Accumulated gradient, same layout (empty after [`Gpt::release_training_state`]).
    pub grad: &'a [f32],
}

/// Write access to one parameter (see [`Gpt::params_mut`]).
#[derive(Debug)]
pub struct ParamMut<'a> {
    /// The reference's state_dict name.
    pub name: &'a str,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Optimizer group.
    pub group: ParamGroup,
    /// Values, row-major.
    pub data: &'a mut [f32],
    /// Accumulated gradient (the optimizer may read or clear it).
    pub grad: &'a mut [f32],
}

/// Rows of the logits matrix materialised at once in the fused lm_head + loss: bounds the
/// logits memory whatever the batch (PyTorch holds all of them, several times over). With
/// gradients, ~128 MB: every chunk streams the whole lm_head weight for `dX` and re-reads and
/// re-writes its whole gradient for `dW`, so 1024 rows instead of 256 at vocab 32768 made the
/// d8 bf16 step 5–9% faster. Forward-only (evaluation, whose buffers are allocated per
/// call), ~32 MB: no weight gradient to amortize, and fresh pages cost page faults.
fn logit_chunk_rows(padded_vocab: usize, rows: usize, with_grad: bool) -> usize {
    let budget = if with_grad { 32 << 20 } else { 8 << 20 };
    (budget / padded_vocab).clamp(64, 1024).min(rows).max(1)
}

struct LayerActs {
    xn1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    rstd_q: Vec<f32>,
    rstd_k: Vec<f32>,
    yatt: Vec<f32>,
    lse: Vec<f32>,
    xn2: Vec<f32>,
    rstd2: Vec<f32>,
    hpre: Vec<f32>,
    act: Vec<f32>,
}

/// Activation and scratch buffers for one (batch, seq) shape, allocated once and reused.
pub(crate) struct Activations {
    b: usize,
    t: usize,
    with_grad: bool,
    x: Vec<f32>,
    xn0: Vec<f32>,
    rstd0: Vec<f32>,
    layers: Vec<LayerActs>,
    xf: Vec<f32>,
    rstdf: Vec<f32>,
    pos: Vec<usize>,
    /// Rows of `logits` per chunk of the fused lm_head + loss.
    logit_rows: usize,
    logits: Vec<f32>,
    // backward only
    dx: Vec<f32>,
    dxn: Vec<f32>,
    dya: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dh: Vec<f32>,
    tscratch: Vec<f32>,
}

/// Float counts of every activation buffer: the single source of truth for allocation and for
/// the memory estimate.
/// Bytes of the bf16 matmul packs for training on micro-batches of `tokens` tokens: every
/// matmul weight packed twice (forward `Wᵀ`, backward `W`), plus per thread the pool of
/// operand packs a GEMM call fills (the largest A, the lm_head's `dlogits` chunk, and the
/// largest B, the MLP activations).
pub(crate) fn bf16_pack_bytes(cfg: &GptConfig, tokens: usize) -> u64 {
    let weights = weight_pack_bytes(&crate::params::param_specs(cfg));
    let vp = cfg.padded_vocab_size();
    let chunk = logit_chunk_rows(vp, tokens, true);
    let per_thread = PackedB::bytes_for(chunk, vp) + PackedB::bytes_for(tokens, 4 * cfg.n_embd);
    weights + rayon::current_num_threads() as u64 * per_thread
}

/// Bytes of [`Gpt::bf16_packs`]: both packed forms of every matmul weight (all but the
/// token embedding, which is a lookup).
fn weight_pack_bytes(specs: &[ParamSpec]) -> u64 {
    specs
        .iter()
        .filter(|s| s.group != crate::params::ParamGroup::Embedding)
        .map(|s| {
            let [out, inp] = s.shape;
            PackedB::bytes_for(inp, out) + PackedB::bytes_for(out, inp)
        })
        .sum()
}

pub(crate) fn activation_floats(cfg: &GptConfig, b: usize, t: usize, with_grad: bool) -> usize {
    let (n, c) = (b * t, cfg.n_embd);
    let kd = cfg.n_kv_head * cfg.head_dim();
    let f = 4 * c;
    let vp = cfg.padded_vocab_size();
    let per_layer = n * c
        + n
        + n * c
        + 2 * n * kd
        + n * cfg.n_head
        + n * cfg.n_kv_head
        + n * c
        + b * cfg.n_head * t
        + n * c
        + n
        + 2 * n * f;
    let base =
        3 * n * c + 2 * n + cfg.n_layer * per_layer + logit_chunk_rows(vp, n, with_grad) * vp;
    let pos_floats = n * std::mem::size_of::<usize>() / 4;
    let grad = if with_grad {
        3 * n * c + n * c + 2 * n * kd + n * f + tscratch_len(cfg, n)
    } else {
        0
    };
    base + pos_floats + grad
}

fn tscratch_len(cfg: &GptConfig, n: usize) -> usize {
    let vp = cfg.padded_vocab_size();
    (4 * cfg.n_embd * n).max(vp * logit_chunk_rows(vp, n, true))
}

impl Activations {
    fn new(cfg: &GptConfig, b: usize, t: usize, with_grad: bool) -> Result<Self> {
        let (n, c) = (b * t, cfg.n_embd);
        let kd = cfg.n_kv_head * cfg.head_dim();
        let f = 4 * c;
        let vp = cfg.padded_vocab_size();
        let a = |len: usize, what: &str| alloc_f32(len, what);
        let g = |len: usize, what: &str| {
            if with_grad {
                alloc_f32(len, what)
            } else {
                Ok(Vec::new())
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerActs {
                xn1: a(n * c, "activations")?,
                rstd1: a(n, "activations")?,
                q: a(n * c, "activations")?,
                k: a(n * kd, "activations")?,
                v: a(n * kd, "activations")?,
                rstd_q: a(n * cfg.n_head, "activations")?,
                rstd_k: a(n * cfg.n_kv_head, "activations")?,
                yatt: a(n * c, "activations")?,
                lse: a(b * cfg.n_head * t, "activations")?,
                xn2: a(n * c, "activations")?,
                rstd2: a(n, "activations")?,
                hpre: a(n * f, "activations")?,
                act: a(n * f, "activations")?,
            });
        }
        Ok(Activations {
            b,
            t,
            with_grad,
            x: a(n * c, "activations")?,
            xn0: a(n * c, "activations")?,
            rstd0: a(n, "activations")?,
            layers,
            xf: a(n * c, "activations")?,
            rstdf: a(n, "activations")?,
            pos: (0..n).map(|i| i % t).collect(),
            logit_rows: logit_chunk_rows(vp, n, with_grad),
            logits: a(logit_chunk_rows(vp, n, with_grad) * vp, "logits")?,
            dx: g(n * c, "gradient scratch")?,
            dxn: g(n * c, "gradient scratch")?,
            dya: g(n * c, "gradient scratch")?,
            dq: g(n * c, "gradient scratch")?,
            dk: g(n * kd, "gradient scratch")?,
            dv: g(n * kd, "gradient scratch")?,
            dh: g(n * f, "gradient scratch")?,
            tscratch: g(tscratch_len(cfg, n), "gradient scratch")?,
        })
    }

    fn fits(&self, b: usize, t: usize, with_grad: bool) -> bool {
        self.b == b && self.t == t && (self.with_grad || !with_grad)
    }
}

/// The nanochat GPT with f32 master weights.
pub struct Gpt {
    pub(crate) cfg: GptConfig,
    pub(crate) specs: Vec<ParamSpec>,
    pub(crate) data: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    /// `[in, out]` copies of every linear weight (empty for wte), kept in sync by every
    /// mutation path, so that `x·Wᵀ` is one NN GEMM.
    pub(crate) wt: Vec<Vec<f32>>,
    pub(crate) rope: Rope,
    acts: Option<Box<Activations>>,
    precision: MatmulPrecision,
    /// With bf16 matmuls: every linear weight packed once for the bf16 kernel, in its `[in,
    /// out]` form (forward `x·Wᵀ`) and its `[out, in]` form (backward `dY·W`). Weights change
    /// only at optimizer steps, but a micro-batch multiplies each several times (the lm_head
    /// once per row chunk, forward and backward), so packing per call would re-read and
    /// re-convert them each time. Dropped whenever the weights change; costs 4 bytes/weight.
    bf16_packs: Option<Vec<Option<(PackedB, PackedB)>>>,
}

impl std::fmt::Debug for Gpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Gpt {
    /// A model with the reference's initialisation, reproducible from `seed`:
    /// wte ~ N(0, 1), lm_head ~ N(0, 0.001²), c_q/c_k/c_v/c_fc ~ U(±√3/√n_embd),
    /// both output projections zero. Each tensor draws from its own stream.
    pub fn new(cfg: GptConfig, seed: u64) -> Result<Self> {
        let mut model = Self::zeros(cfg)?;
        let bound = (3.0f64).sqrt() / (model.cfg.n_embd as f64).sqrt();
        let specs = model.specs.clone();
        model
            .data
            .par_iter_mut()
            .zip(specs.par_iter())
            .enumerate()
            .for_each(|(i, (d, spec))| {
                let mut rng = Rng::new(seed, i as u64);
                match spec.group {
                    ParamGroup::Embedding => d.iter_mut().for_each(|x| *x = rng.normal() as f32),
                    ParamGroup::LmHead => d
                        .iter_mut()
                        .for_each(|x| *x = (0.001 * rng.normal()) as f32),
                    ParamGroup::Matrix => {
                        if spec.name.ends_with("c_proj.weight") {
                            d.fill(0.0);
                        } else {
                            d.iter_mut()
                                .for_each(|x| *x = (bound * (2.0 * rng.uniform() - 1.0)) as f32);
                        }
                    }
                }
            });
        model.sync_transposed();
        Ok(model)
    }

    /// A model with every weight zero (checkpoint loading fills it in).
    pub(crate) fn zeros(cfg: GptConfig) -> Result<Self> {
        cfg.validate()?;
        // Weights + transposed copies + gradients, checked before the first allocation.
        crate::memory::check_fits(
            cfg.num_params() as u64 * 12,
            &format!(
                "weights, transposed copies and gradients of a {}-layer, {}-wide model",
                cfg.n_layer, cfg.n_embd
            ),
        )?;
        let specs = param_specs(&cfg);
        let mut data = Vec::with_capacity(specs.len());
        let mut grads = Vec::with_capacity(specs.len());
        let mut wt = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            let len = s.shape[0] * s.shape[1];
            data.push(alloc_f32(len, &s.name)?);
            grads.push(alloc_f32(len, &format!("gradient of {}", s.name))?);
            wt.push(if i == WTE {
                Vec::new()
            } else {
                alloc_f32(len, &format!("transposed {}", s.name))?
            });
        }
        let rope = Rope::new(cfg.max_positions(), cfg.head_dim(), cfg.rope_base);
        Ok(Gpt {
            cfg,
            specs,
            data,
            grads,
            wt,
            rope,
            acts: None,
            precision: MatmulPrecision::F32,
            bf16_packs: None,
        })
    }

    /// Arithmetic of the dense matmuls in training and full-sequence forward passes
    /// ([`Gpt::forward_backward`], [`Gpt::loss`], [`Gpt::logits`]): f32 by default; bf16 is
    /// the analogue of the reference's bf16 autocast. A run-time choice, not part of the
    /// checkpoint (weights stay f32 either way). KV-cached decoding always runs in f32.
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) {
        self.precision = precision;
        if precision != MatmulPrecision::Bf16 {
            self.bf16_packs = None;
        }
    }

    /// Builds [`Gpt::bf16_packs`] when bf16 matmuls are on and the packs are stale.
    fn ensure_bf16_packs(&mut self) -> Result<()> {
        if self.precision != MatmulPrecision::Bf16 || self.bf16_packs.is_some() {
            return Ok(());
        }
        crate::memory::check_fits(weight_pack_bytes(&self.specs), "bf16 weight packs")?;
        let mut packs = Vec::with_capacity(self.specs.len());
        for (i, spec) in self.specs.iter().enumerate() {
            if i == WTE {
                packs.push(None);
                continue;
            }
            let [out, inp] = spec.shape;
            packs.push(Some((
                PackedB::new(Op::N, inp, out, &self.wt[i])?,
                PackedB::new(Op::N, out, inp, &self.data[i])?,
            )));
        }
        self.bf16_packs = Some(packs);
        Ok(())
    }

    /// See [`Gpt::set_matmul_precision`].
    pub fn matmul_precision(&self) -> MatmulPrecision {
        self.precision
    }

    /// The model's configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Names, shapes and groups of every parameter, in state_dict order.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Every parameter with its gradient, in state_dict order.
    pub fn params(&self) -> impl Iterator<Item = ParamRef<'_>> {
        self.specs
            .iter()
            .zip(self.data.iter().zip(self.grads.iter()))
            .map(|(s, (d, g))| ParamRef {
                name: &s.name,
                shape: s.shape,
                group: s.group,
                data: d,
                grad: g,
            })
    }

    /// One parameter by name.
    pub fn param(&self, name: &str) -> Option<ParamRef<'_>> {
        self.params().find(|p| p.name == name)
    }

    /// Mutable access to every parameter (for the optimizer). The returned guard re-derives
    /// the model's internal transposed weights when dropped, so updates take effect.
    pub fn params_mut(&mut self) -> ParamsMut<'_> {
        ParamsMut { model: self }
    }

    /// Sets every gradient to zero (reallocating them after [`Gpt::release_training_state`]).
    pub fn zero_grad(&mut self) -> Result<()> {
        self.ensure_grads()?;
        self.grads.par_iter_mut().for_each(|g| g.fill(0.0));
        Ok(())
    }

    /// Frees gradients and training activations (inference-only use). They come back,
    /// zeroed, on the next training call.
    pub fn release_training_state(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = Vec::new());
        self.acts = None;
    }

    fn ensure_grads(&mut self) -> Result<()> {
        for (g, s) in self.grads.iter_mut().zip(&self.specs) {
            if g.is_empty() {
                *g = alloc_f32(s.shape[0] * s.shape[1], &format!("gradient of {}", s.name))?;
            }
        }
        Ok(())
    }

    pub(crate) fn sync_transposed(&mut self) {
        self.bf16_packs = None;
        for i in 0..self.specs.len() {
            if i == WTE {
                continue;
            }
            let [r, c] = self.specs[i].shape;
            transpose(r, c, &self.data[i], &mut self.wt[i]);
        }
    }

    /// Global L2 norm of the gradients; an error names the first tensor whose norm is not
    /// finite.
    pub fn grad_norm(&self) -> Result<f64> {
        let norms: Vec<f64> = self
            .grads
            .par_iter()
            .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        for (sq, s) in norms.iter().zip(&self.specs) {
            if !sq.is_finite() {
                return Err(ModelError::NonFinite {
                    what: format!("gradient norm of {}", s.name),
                    value: *sq,
                });
            }
        }
        Ok(norms.iter().sum::<f64>().sqrt())
    }

    fn check_batch(&self, idx: &[u32], targets: Option<&[i32]>, b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 {
            return Err(ModelError::InvalidInput(format!(
                "empty batch: b={b}, t={t}"
            )));
        }
        if idx.len() != b * t {
            return Err(ModelError::InvalidInput(format!(
                "idx has {} tokens but b·t = {b}·{t} = {}",
                idx.len(),
                b * t
            )));
        }
        if t > self.cfg.max_positions() {
            return Err(ModelError::InvalidInput(format!(
                "sequence length {t} exceeds the rotary table ({} positions = 10 × sequence_len)",
                self.cfg.max_positions()
            )));
        }
        if let Some(&bad) = idx.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        if let Some(tg) = targets {
            if tg.len() != b * t {
                return Err(ModelError::InvalidInput(format!(
                    "targets has {} entries but b·t = {}",
                    tg.len(),
                    b * t
                )));
            }
            if let Some(&bad) = tg
                .iter()
                .find(|&&x| x < -1 || x as i64 >= self.cfg.vocab_size as i64)
            {
                return Err(ModelError::InvalidInput(format!(
                    "target {bad} is neither -1 (ignored) nor a token id below {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }

    fn take_acts(&mut self, b: usize, t: usize, with_grad: bool) -> Result<Box<Activations>> {
        match self.acts.take() {
            Some(a) if a.fits(b, t, with_grad) => Ok(a),
            other => {
                drop(other);
                crate::memory::check_fits(
                    (activation_floats(&self.cfg, b, t, with_grad) * 4) as u64,
                    "activation buffers",
                )?;
                Ok(Box::new(Activations::new(&self.cfg, b, t, with_grad)?))
            }
        }
    }

    /// Loss of a batch (`idx`, `targets`: `[b, t]` row-major; target -1 is ignored), and its
    /// gradient for every parameter *added* to the accumulated gradients.
    pub fn forward_backward(
        &mut self,
        idx: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        reduction: Reduction,
    ) -> Result<f32> {
        self.forward_backward_scaled(idx, targets, b, t, reduction, 1.0)
    }

    /// As [`Gpt::forward_backward`], with the gradient multiplied by `grad_scale` (e.g.
    /// `1/accumulation_steps`); the returned loss is not scaled.
    pub fn forward_backward_scaled(
        &mut self,
        idx: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        reduction: Reduction,
        grad_scale: f32,
    ) -> Result<f32> {
        self.check_batch(idx, Some(targets), b, t)?;
        self.ensure_grads()?;
        self.ensure_bf16_packs()?;
        let n_valid = targets.iter().filter(|&&x| x >= 0).count();
        if n_valid == 0 {
            return Err(ModelError::InvalidInput(
                "every target is -1 (ignored): the loss is undefined".into(),
            ));
        }
        let mut acts = self.take_acts(b, t, true)?;
        let result =
            self.run_forward_backward(&mut acts, idx, targets, reduction, n_valid, grad_scale);
        self.acts = Some(acts);
        let loss = result?;
        if !loss.is_finite() {
            return Err(ModelError::NonFinite {
                what: "loss".into(),
                value: loss as f64,
            });
        }
        self.grad_norm()?;
        Ok(loss)
    }

    /// Loss without gradients (evaluation); reuses the training buffers when shapes match.
    pub fn loss(
        &mut self,
        idx: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        reduction: Reduction,
    ) -> Result<f32> {
        self.check_batch(idx, Some(targets), b, t)?;
        let n_valid = targets.iter().filter(|&&x| x >= 0).count();
        if n_valid == 0 {
            return Err(ModelError::InvalidInput(
                "every target is -1 (ignored): the loss is undefined".into(),
            ));
        }
        self.ensure_bf16_packs()?;
        let with_grad = self
            .acts
            .as_ref()
            .is_some_and(|a| a.with_grad && a.fits(b, t, false));
        let mut acts = self.take_acts(b, t, with_grad)?;
        let result = (|| {
            trunk_forward(self, &mut acts, idx)?;
            let sum = head(self, &mut acts, b * t, targets, None, None)?;
            Ok::<f64, ModelError>(sum)
        })();
        self.acts = Some(acts);
        let sum = result?;
        let loss = match reduction {
            Reduction::Mean => sum / n_valid as f64,
            Reduction::Sum => sum,
        } as f32;
        if !loss.is_finite() {
            return Err(ModelError::NonFinite {
                what: "loss".into(),
                value: loss as f64,
            });
        }
        Ok(loss)
    }

    /// Softcapped logits `[b, t, vocab_size]` for a batch (no cache, no gradients).
    pub fn logits(&self, idx: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        self.check_batch(idx, None, b, t)?;
        let mut acts = Activations::new(&self.cfg, b, t, false)?;
        trunk_forward(self, &mut acts, idx)?;
        let v = self.cfg.vocab_size;
        let mut out = alloc_f32(b * t * v, "logits")?;
        head(self, &mut acts, b * t, &[], None, Some(&mut out))?;
        Ok(out)
    }

    /// Softcapped logits `[positions.len(), vocab_size]` at the flat positions `row·t + pos`
    /// (strictly increasing) of a batch: the blocks run on the whole batch, the lm_head and
    /// softcap only on those positions. What a scorer that reads a few positions per row
    /// (CORE's continuations) needs, without the lm_head work and the `b·t·vocab` output of
    /// [`Gpt::logits`].
    pub fn logits_at(
        &self,
        idx: &[u32],
        b: usize,
        t: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        self.check_batch(idx, None, b, t)?;
        if let Some(w) = positions.windows(2).find(|w| w[0] >= w[1]) {
            return Err(ModelError::InvalidInput(format!(
                "logits_at: positions must be strictly increasing (got {} then {})",
                w[0], w[1]
            )));
        }
        if let Some(&last) = positions.last() {
            if last >= b * t {
                return Err(ModelError::InvalidInput(format!(
                    "logits_at: position {last} is outside the batch ({b}·{t} positions)"
                )));
            }
        }
        let mut acts = Activations::new(&self.cfg, b, t, false)?;
        trunk_forward(self, &mut acts, idx)?;
        // Move the selected rows of the final hidden state to the front (in place: position
        // i is read before any row at or after it is written, as positions[i] ≥ i).
        let c = self.cfg.n_embd;
        for (i, &p) in positions.iter().enumerate() {
            if p != i {
                acts.xf.copy_within(p * c..(p + 1) * c, i * c);
            }
        }
        let v = self.cfg.vocab_size;
        let mut out = alloc_f32(positions.len() * v, "logits")?;
        head(self, &mut acts, positions.len(), &[], None, Some(&mut out))?;
        Ok(out)
    }

    fn run_forward_backward(
        &mut self,
        acts: &mut Activations,
        idx: &[u32],
        targets: &[i32],
        reduction: Reduction,
        n_valid: usize,
        grad_scale: f32,
    ) -> Result<f32> {
        trunk_forward(self, acts, idx)?;
        let scale = match reduction {
            Reduction::Mean => grad_scale / n_valid as f32,
            Reduction::Sum => grad_scale,
        };
        let lm = lm_head_index(&self.cfg);
        let mut dlm = std::mem::take(&mut self.grads[lm]);
        let n = acts.b * acts.t;
        let sum = head(self, acts, n, targets, Some((scale, &mut dlm)), None);
        self.grads[lm] = dlm;
        let sum = sum?;
        trunk_backward(self, acts, idx)?;
        Ok(match reduction {
            Reduction::Mean => sum / n_valid as f64,
            Reduction::Sum => sum,
        } as f32)
    }
}

/// Guard from [`Gpt::params_mut`]; re-syncs internal weight copies on drop.
pub struct ParamsMut<'a> {
    model: &'a mut Gpt,
}

impl ParamsMut<'_> {
    /// Every parameter, mutable, in state_dict order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = ParamMut<'_>> {
        let m = &mut *self.model;
        m.specs
            .iter()
            .zip(m.data.iter_mut().zip(m.grads.iter_mut()))
            .map(|(s, (d, g))| ParamMut {
                name: &s.name,
                shape: s.shape,
                group: s.group,
                data: d,
                grad: g,
            })
    }

    /// One parameter by name.
    pub fn get_mut(&mut self, name: &str) -> Option<ParamMut<'_>> {
        self.iter_mut().find(|p| p.name == name)
    }
}

impl Drop for ParamsMut<'_> {
    fn drop(&mut self) {
        self.model.sync_transposed();
    }
}

/// `y = x·Wᵀ` (or `+=`) for parameter `i`, through its `[in, out]` copy.
fn linear(model: &Gpt, i: usize, rows: usize, x: &[f32], y: &mut [f32], acc: bool) -> Result<()> {
    let [out, inp] = model.specs[i].shape;
    let pack = model
        .bf16_packs
        .as_ref()
        .and_then(|p| p[i].as_ref())
        .map(|p| &p.0);
    weight_mm(
        model.precision,
        pack,
        rows,
        out,
        inp,
        x,
        &model.wt[i],
        y,
        acc,
    )
}

/// `y (+)= x·w` (`x: [rows, k]`, `w: [k, n]`) where `w` is a weight, through its bf16 pack
/// when there is one.
#[allow(clippy::too_many_arguments)]
fn weight_mm(
    precision: MatmulPrecision,
    pack: Option<&PackedB>,
    rows: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    acc: bool,
) -> Result<()> {
    match (precision, pack) {
        (MatmulPrecision::Bf16, Some(p)) => gemm_bf16_prepacked_with(
            Op::N,
            rows,
            x,
            p,
            y,
            GemmOpts {
                accumulate: acc,
                parallel: true,
            },
        ),
        _ => matmul_nn(precision, rows, n, k, x, w, y, acc),
    }
}

/// Embedding → norm → blocks → final norm, saving what the backward pass needs.
fn trunk_forward(model: &Gpt, a: &mut Activations, idx: &[u32]) -> Result<()> {
    let cfg = &model.cfg;
    let (b, t) = (a.b, a.t);
    let n = b * t;
    let (c, d) = (cfg.n_embd, cfg.head_dim());
    let (h, hk) = (cfg.n_head, cfg.n_kv_head);
    let f = 4 * c;
    let wte = &model.data[WTE];
    for (row, &tok) in a.x.chunks_exact_mut(c).zip(idx) {
        row.copy_from_slice(&wte[tok as usize * c..(tok as usize + 1) * c]);
    }
    rmsnorm_fwd(&a.x, &mut a.xn0, &mut a.rstd0, c);
    a.x.copy_from_slice(&a.xn0);
    let shape = AttnShape {
        b,
        t,
        h,
        hk,
        d,
        precision: model.precision,
    };
    for (l, la) in a.layers.iter_mut().enumerate() {
        rmsnorm_fwd(&a.x, &mut la.xn1, &mut la.rstd1, c);
        linear(model, layer_param(l, Q), n, &la.xn1, &mut la.q, false)?;
        linear(model, layer_param(l, K), n, &la.xn1, &mut la.k, false)?;
        linear(model, layer_param(l, V), n, &la.xn1, &mut la.v, false)?;
        model.rope.apply(&mut la.q, h, &a.pos, false);
        model.rope.apply(&mut la.k, hk, &a.pos, false);
        rmsnorm_inplace(&mut la.q, &mut la.rstd_q, d);
        rmsnorm_inplace(&mut la.k, &mut la.rstd_k, d);
        attention_fwd(shape, &la.q, &la.k, &la.v, &mut la.yatt, &mut la.lse)?;
        linear(model, layer_param(l, PROJ), n, &la.yatt, &mut a.x, true)?;
        rmsnorm_fwd(&a.x, &mut la.xn2, &mut la.rstd2, c);
        linear(model, layer_param(l, FC), n, &la.xn2, &mut la.hpre, false)?;
        la.act
            .par_chunks_mut(f)
            .zip(la.hpre.par_chunks(f))
            .for_each(|(o, i)| {
                for (o, &x) in o.iter_mut().zip(i) {
                    let r = x.max(0.0);
                    *o = r * r;
                }
            });
        linear(model, layer_param(l, MLP_PROJ), n, &la.act, &mut a.x, true)?;
    }
    rmsnorm_fwd(&a.x, &mut a.xf, &mut a.rstdf, c);
    Ok(())
}

/// lm_head + softcap + cross-entropy over the first `n` rows of `a.xf`, fused and chunked over
/// rows so the full logits matrix never exists. With `grad = (scale, dlm)`: writes d loss/d xf
/// into `a.dxn` and adds the lm_head gradient to `dlm`. With `out`: copies the capped logits
/// there. Returns the summed loss over non-ignored targets.
fn head(
    model: &Gpt,
    a: &mut Activations,
    n: usize,
    targets: &[i32],
    mut grad: Option<(f32, &mut Vec<f32>)>,
    mut out: Option<&mut Vec<f32>>,
) -> Result<f64> {
    let cfg = &model.cfg;
    let (c, v, vp) = (cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size());
    let lm = lm_head_index(cfg);
    // The buffer's own chunk: training activations may serve a forward-only call.
    let chunk = a.logit_rows;
    let softcap = cfg.softcap;
    let avx = has_avx2();
    let prec = model.precision;
    let mut total = 0.0f64;
    for r0 in (0..n).step_by(chunk) {
        let r1 = (r0 + chunk).min(n);
        let rc = r1 - r0;
        let logits = &mut a.logits[..rc * vp];
        let xf = &a.xf[r0 * c..r1 * c];
        let lm_pack = model.bf16_packs.as_ref().and_then(|p| p[lm].as_ref());
        let wt_lm = &model.wt[lm];
        weight_mm(
            prec,
            lm_pack.map(|p| &p.0),
            rc,
            vp,
            c,
            xf,
            wt_lm,
            logits,
            false,
        )?;
        let grad_scale = grad.as_ref().map(|g| g.0);
        let tg = |r: usize| {
            if targets.is_empty() {
                -1
            } else {
                targets[r0 + r]
            }
        };
        total += logits
            .par_chunks_mut(vp)
            .enumerate()
            .with_min_len(8)
            .map(|(r, row)| {
                // Per-thread scratch: a fresh `vec![0; v]` per rayon job was a 128 KB
                // allocation, i.e. new pages and page faults, dozens of times per chunk.
                with_task_scratch(v, |exps| {
                    #[cfg(target_arch = "x86_64")]
                    if avx {
                        #[target_feature(enable = "avx2,fma")]
                        unsafe fn row_avx2(
                            row: &mut [f32],
                            v: usize,
                            t: i32,
                            s: Option<f32>,
                            g: Option<f32>,
                            e: &mut [f32],
                        ) -> f64 {
                            softcapped_ce_row(row, v, t, s, g, e)
                        }
                        // SAFETY: AVX2+FMA present.
                        return unsafe { row_avx2(row, v, tg(r), softcap, grad_scale, exps) };
                    }
                    let _ = avx;
                    softcapped_ce_row(row, v, tg(r), softcap, grad_scale, exps)
                })
            })
            .sum::<f64>();
        if let Some(o) = out.as_deref_mut() {
            for (r, row) in logits.chunks_exact(vp).enumerate() {
                o[(r0 + r) * v..(r0 + r + 1) * v].copy_from_slice(&row[..v]);
            }
        }
        if let Some((_, dlm)) = grad.as_mut() {
            let dxn = &mut a.dxn[r0 * c..r1 * c];
            let data_lm = &model.data[lm];
            weight_mm(
                prec,
                lm_pack.map(|p| &p.1),
                rc,
                c,
                vp,
                logits,
                data_lm,
                dxn,
                false,
            )?;
            matmul_tn_acc(
                prec,
                vp,
                c,
                rc,
                logits,
                &a.xf[r0 * c..r1 * c],
                dlm,
                &mut a.tscratch,
            )?;
        }
    }
    Ok(total)
}

/// Backward through the blocks and the embedding, from `a.dxn` = d loss/d xf.
fn trunk_backward(model: &mut Gpt, a: &mut Activations, idx: &[u32]) -> Result<()> {
    let cfg = model.cfg.clone();
    let (b, t) = (a.b, a.t);
    let n = b * t;
    let (c, d) = (cfg.n_embd, cfg.head_dim());
    let (h, hk) = (cfg.n_head, cfg.n_kv_head);
    let kd = hk * d;
    let f = 4 * c;
    let shape = AttnShape {
        b,
        t,
        h,
        hk,
        d,
        precision: model.precision,
    };
    rmsnorm_bwd(&a.dxn, &a.xf, &a.rstdf, &mut a.dx, c, false);
    let (data, grads) = (&model.data, &mut model.grads);
    let p = model.precision;
    let packs = model.bf16_packs.as_ref();
    // dY·W for weight `i` (its `[out, in]` form).
    let dmm = |i: usize, rows: usize, n: usize, k: usize, x: &[f32], y: &mut [f32], acc: bool| {
        let pack = packs.and_then(|v| v[i].as_ref()).map(|pk| &pk.1);
        weight_mm(p, pack, rows, n, k, x, &data[i], y, acc)
    };
    for l in (0..cfg.n_layer).rev() {
        let la = &a.layers[l];
        // MLP: x += relu(xn2·Wfcᵀ)²·Wprojᵀ
        let (ip, ifc) = (layer_param(l, MLP_PROJ), layer_param(l, FC));
        dmm(ip, n, f, c, &a.dx, &mut a.dh, false)?;
        matmul_tn_acc(p, c, f, n, &a.dx, &la.act, &mut grads[ip], &mut a.tscratch)?;
        a.dh.par_chunks_mut(f)
            .zip(la.hpre.par_chunks(f))
            .for_each(|(g, hp)| {
                for (g, &x) in g.iter_mut().zip(hp) {
                    *g *= 2.0 * x.max(0.0);
                }
            });
        dmm(ifc, n, c, f, &a.dh, &mut a.dxn, false)?;
        matmul_tn_acc(p, f, c, n, &a.dh, &la.xn2, &mut grads[ifc], &mut a.tscratch)?;
        rmsnorm_bwd(&a.dxn, &la.xn2, &la.rstd2, &mut a.dx, c, true);
        // Attention: x += attn(q, k, v)·Wprojᵀ
        let ipr = layer_param(l, PROJ);
        dmm(ipr, n, c, c, &a.dx, &mut a.dya, false)?;
        matmul_tn_acc(
            p,
            c,
            c,
            n,
            &a.dx,
            &la.yatt,
            &mut grads[ipr],
            &mut a.tscratch,
        )?;
        attention_bwd(
            shape, &la.q, &la.k, &la.v, &la.yatt, &la.lse, &a.dya, &mut a.dq, &mut a.dk, &mut a.dv,
        )?;
        rmsnorm_bwd_inplace(&mut a.dq, &la.q, &la.rstd_q, d);
        rmsnorm_bwd_inplace(&mut a.dk, &la.k, &la.rstd_k, d);
        model.rope.apply(&mut a.dq, h, &a.pos, true);
        model.rope.apply(&mut a.dk, hk, &a.pos, true);
        let (iq, ik, iv) = (layer_param(l, Q), layer_param(l, K), layer_param(l, V));
        dmm(iq, n, c, c, &a.dq, &mut a.dxn, false)?;
        dmm(ik, n, c, kd, &a.dk, &mut a.dxn, true)?;
        dmm(iv, n, c, kd, &a.dv, &mut a.dxn, true)?;
        matmul_tn_acc(p, c, c, n, &a.dq, &la.xn1, &mut grads[iq], &mut a.tscratch)?;
        matmul_tn_acc(p, kd, c, n, &a.dk, &la.xn1, &mut grads[ik], &mut a.tscratch)?;
        matmul_tn_acc(p, kd, c, n, &a.dv, &la.xn1, &mut grads[iv], &mut a.tscratch)?;
        rmsnorm_bwd(&a.dxn, &la.xn1, &la.rstd1, &mut a.dx, c, true);
    }
    rmsnorm_bwd(&a.dx, &a.xn0, &a.rstd0, &mut a.dxn, c, false);
    let gw = &mut grads[WTE];
    for (row, &tok) in a.dxn.chunks_exact(c).zip(idx) {
        let dst = &mut gw[tok as usize * c..(tok as usize + 1) * c];
        for (o, &g) in dst.iter_mut().zip(row) {
            *o += g;
        }
    }
    Ok(())
}
