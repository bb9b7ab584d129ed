//! Optimizers of the nanochat recipe: AdamW for the embedding and the unembedding, Muon for every
//! matrix inside the transformer blocks.
//!
//! Both work on flat `f32` slices plus a shape, so they do not depend on how a model stores its
//! tensors. All state (moments, momentum buffers, Newton–Schulz scratch) is allocated when a
//! parameter is registered; a step allocates nothing.
//!
//! Numerics follow the reference (nanochat 48abd7d): AdamW is torch's `AdamW` (decoupled weight
//! decay, bias correction with `sqrt(1-β2^t)` inside the denominator, eps added after), Muon is
//! SGD-momentum with Nesterov blending followed by 5 quintic Newton–Schulz iterations
//! (a, b, c) = (3.4445, −4.7750, 2.0315) and an aspect-ratio scaled step `√max(1, rows/cols)`.
//! The reference orthogonalises in bfloat16 (bf16 operands, f32 accumulation, bf16 results);
//! with `bf16_newton_schulz` so does this one, on nanochat-model's bf16 GEMM (`VDPBF16PS` where
//! the CPU has it: twice the f32 FLOP rate, and Newton–Schulz costs ~60% of the forward+backward
//! FLOPs of a d8 micro-batch of 2048 tokens). Otherwise it runs in f32.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use nanochat_model::kernels::bf16::{gemm_bf16, round_bf16, Op};
use nanochat_model::kernels::transpose;

use crate::TrainError;

/// Elements per rayon task in element-wise updates: large enough that scheduling overhead is
/// negligible, small enough to split a d20 embedding (~42M floats) over many cores.
const PAR_CHUNK: usize = 1 << 15;

/// Quintic Newton–Schulz coefficients (chosen upstream to maximise the slope at zero).
const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// Hyper-parameters shared by every AdamW parameter (the learning rate is per parameter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay β1 (nanochat: 0.8).
    pub beta1: f32,
    /// Second-moment decay β2 (nanochat: 0.95).
    pub beta2: f32,
    /// Added to the bias-corrected √v (nanochat: 1e-10).
    pub eps: f32,
    /// Decoupled weight decay, applied as `p *= 1 - lr·wd` (nanochat: 0.0).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            weight_decay: 0.0,
        }
    }
}

struct AdamWSlot {
    name: String,
    len: usize,
    lr: f32,
    step: u64,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// torch-compatible AdamW over registered flat parameters, each with its own base learning rate.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<AdamWSlot>,
}

impl AdamW {
    /// An optimizer with no parameters yet.
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            slots: Vec::new(),
        }
    }

    /// Registers a parameter of `len` elements with base learning rate `lr`; returns its slot.
    pub fn add_param(&mut self, name: &str, len: usize, lr: f32) -> usize {
        self.slots.push(AdamWSlot {
            name: name.to_string(),
            len,
            lr,
            step: 0,
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![0.0; len],
        });
        self.slots.len() - 1
    }

    /// Base learning rate of a slot (before the schedule multiplier).
    pub fn base_lr(&self, slot: usize) -> f32 {
        self.slots[slot].lr
    }

    /// One AdamW step of slot `slot` with learning rate `base_lr · lr_mult`.
    pub fn update(
        &mut self,
        slot: usize,
        param: &mut [f32],
        grad: &[f32],
        lr_mult: f32,
    ) -> Result<(), TrainError> {
        let cfg = self.cfg;
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| TrainError::Optimizer(format!("AdamW has no slot {slot}")))?;
        if param.len() != s.len || grad.len() != s.len {
            return Err(TrainError::Shape {
                name: s.name.clone(),
                expected: vec![s.len],
                got: vec![param.len(), grad.len()],
            });
        }
        s.step += 1;
        // Scalars in f64 like torch's host-side math; elements in f32.
        let lr = f64::from(s.lr) * f64::from(lr_mult);
        let t = s.step as i32;
        let bc1 = 1.0 - f64::from(cfg.beta1).powi(t);
        let bc2_sqrt = (1.0 - f64::from(cfg.beta2).powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let inv_bc2_sqrt = (1.0 / bc2_sqrt) as f32;
        let decay = (1.0 - lr * f64::from(cfg.weight_decay)) as f32;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let kernel = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
            for i in 0..p.len() {
                let gi = g[i];
                // lerp form, as torch: m += (1-β1)(g-m)
                let mi = m[i] + (1.0 - b1) * (gi - m[i]);
                let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                let denom = vi.sqrt() * inv_bc2_sqrt + eps;
                p[i] = p[i] * decay - step_size * mi / denom;
            }
        };
        if s.len <= PAR_CHUNK {
            kernel(param, &mut s.exp_avg, &mut s.exp_avg_sq, grad);
        } else {
            param
                .par_chunks_mut(PAR_CHUNK)
                .zip(s.exp_avg.par_chunks_mut(PAR_CHUNK))
                .zip(s.exp_avg_sq.par_chunks_mut(PAR_CHUNK))
                .zip(grad.par_chunks(PAR_CHUNK))
                .for_each(|(((p, m), v), g)| kernel(p, m, v, g));
        }
        Ok(())
    }
}

/// Muon hyper-parameters (the learning rate is per parameter, the momentum is set by the loop).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MuonConfig {
    /// Momentum coefficient; the nanochat loop warms it from 0.85 to 0.95 over 300 steps.
    pub momentum: f32,
    /// Nesterov blending of the gradient with the momentum buffer.
    pub nesterov: bool,
    /// Newton–Schulz iterations (nanochat: 5).
    pub ns_steps: usize,
    /// Round every Newton–Schulz intermediate to bfloat16 like the reference (which runs the
    /// iteration in bf16 on the GPU). The iteration is not contractive, so bf16 and exact
    /// arithmetic end up 3–15% apart; emulating bf16 keeps training dynamics faithful.
    pub bf16_newton_schulz: bool,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self {
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            bf16_newton_schulz: true,
        }
    }
}

struct MuonSlot {
    name: String,
    rows: usize,
    cols: usize,
    lr: f32,
    momentum_buffer: Vec<f32>,
}

/// Work buffers of the Newton–Schulz iteration, sized for the largest registered matrix.
#[derive(Default)]
struct NsScratch {
    x: Vec<f32>,
    x_next: Vec<f32>,
    xt: Vec<f32>,
    gram: Vec<f32>,
    poly: Vec<f32>,
}

impl NsScratch {
    fn reserve(&mut self, rows: usize, cols: usize) {
        let m = rows.min(cols);
        let mn = rows * cols;
        for buf in [&mut self.x, &mut self.x_next, &mut self.xt] {
            if buf.len() < mn {
                buf.resize(mn, 0.0);
            }
        }
        for buf in [&mut self.gram, &mut self.poly] {
            if buf.len() < m * m {
                buf.resize(m * m, 0.0);
            }
        }
    }
}

/// Muon: momentum SGD whose update is orthogonalised by a quintic Newton–Schulz iteration.
pub struct Muon {
    cfg: MuonConfig,
    slots: Vec<MuonSlot>,
    scratch: NsScratch,
}

impl Muon {
    /// An optimizer with no parameters yet.
    pub fn new(cfg: MuonConfig) -> Self {
        Self {
            cfg,
            slots: Vec::new(),
            scratch: NsScratch::default(),
        }
    }

    /// Registers a `rows × cols` matrix (row-major, PyTorch `[out, in]`) with base lr `lr`.
    pub fn add_param(&mut self, name: &str, rows: usize, cols: usize, lr: f32) -> usize {
        self.scratch.reserve(rows, cols);
        self.slots.push(MuonSlot {
            name: name.to_string(),
            rows,
            cols,
            lr,
            momentum_buffer: vec![0.0; rows * cols],
        });
        self.slots.len() - 1
    }

    /// Sets the momentum used by the next steps (the loop's warmup schedule).
    pub fn set_momentum(&mut self, momentum: f32) {
        self.cfg.momentum = momentum;
    }

    /// Current momentum.
    pub fn momentum(&self) -> f32 {
        self.cfg.momentum
    }

    /// Base learning rate of a slot (before the schedule multiplier).
    pub fn base_lr(&self, slot: usize) -> f32 {
        self.slots[slot].lr
    }

    /// One Muon step of slot `slot` with learning rate `base_lr · lr_mult`.
    pub fn update(
        &mut self,
        slot: usize,
        param: &mut [f32],
        grad: &[f32],
        lr_mult: f32,
    ) -> Result<(), TrainError> {
        let cfg = self.cfg;
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| TrainError::Optimizer(format!("Muon has no slot {slot}")))?;
        let (rows, cols) = (s.rows, s.cols);
        let n = rows * cols;
        if param.len() != n || grad.len() != n {
            return Err(TrainError::Shape {
                name: s.name.clone(),
                expected: vec![rows, cols],
                got: vec![param.len(), grad.len()],
            });
        }
        let mu = cfg.momentum;
        // Work in the wide orientation (m ≤ n) so the Gram matrix X·Xᵀ is the small one.
        let transposed = rows > cols;
        let (m, k) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let bf16 = cfg.bf16_newton_schulz;
        let rnd = |v: f32| if bf16 { round_bf16(v) } else { v };
        let sc = &mut self.scratch;
        // Momentum buffer update and Nesterov blend (element-wise, parallel); a tall matrix is
        // then transposed into X by the parallel blocked transpose.
        {
            let u = if transposed {
                &mut sc.x_next[..n]
            } else {
                &mut sc.x[..n]
            };
            let nesterov = cfg.nesterov;
            s.momentum_buffer
                .par_chunks_mut(PAR_CHUNK)
                .zip(grad.par_chunks(PAR_CHUNK))
                .zip(u.par_chunks_mut(PAR_CHUNK))
                .for_each(|((buf, g), u)| {
                    for ((b, &g), u) in buf.iter_mut().zip(g).zip(u.iter_mut()) {
                        let nb = *b + (1.0 - mu) * (g - *b);
                        *b = nb;
                        *u = rnd(if nesterov { g + mu * (nb - g) } else { nb });
                    }
                });
            if transposed {
                transpose(rows, cols, &sc.x_next[..n], &mut sc.x[..n]);
            }
        }
        let x = &mut sc.x[..n];
        // Frobenius norm from per-chunk partial sums added in a fixed order: the result does
        // not depend on how rayon splits the work (exact resume).
        let partial: Vec<f64> = x
            .par_chunks(PAR_CHUNK)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .collect();
        let norm = partial.iter().sum::<f64>().sqrt();
        let denom = rnd(rnd(norm as f32) + 1e-7);
        par_map(x, |v| rnd(v / denom));

        let (a, b, c) = NS_COEFFS;
        for _ in 0..cfg.ns_steps {
            let x = &sc.x[..n];
            let gram = &mut sc.gram[..m * m];
            gram.fill(0.0);
            if bf16 {
                // X·Xᵀ straight from X: the bf16 kernel packs the second operand transposed.
                gemm_bf16(Op::N, Op::T, m, m, k, x, x, gram)?;
                par_map(gram, round_bf16);
                // The reference evaluates `c * A @ A` as `(c·A) @ A` (same precedence, left to
                // right); in bf16 the rounding of c·A matters, so reproduce that order.
                let scaled = &mut sc.x_next[..m * m];
                scaled
                    .par_chunks_mut(PAR_CHUNK)
                    .zip(gram.par_chunks(PAR_CHUNK))
                    .for_each(|(d, g)| {
                        d.iter_mut()
                            .zip(g)
                            .for_each(|(d, &g)| *d = round_bf16(c * g))
                    });
                let poly = &mut sc.poly[..m * m];
                poly.fill(0.0);
                gemm_bf16(Op::N, Op::N, m, m, m, scaled, gram, poly)?;
                par_zip(poly, gram, |p, g| {
                    round_bf16(round_bf16(b * g) + round_bf16(p))
                });
                // a·X + B·X: B·X alone first, so it is rounded before the sum.
                let x_next = &mut sc.x_next[..n];
                x_next.fill(0.0);
                gemm_bf16(Op::N, Op::N, m, k, m, poly, x, x_next)?;
                par_zip(x_next, x, |d, s| {
                    round_bf16(round_bf16(a * s) + round_bf16(d))
                });
            } else {
                let xt = &mut sc.xt[..n];
                transpose(m, k, x, xt);
                gemm(m, m, k, x, xt, gram)?;
                let poly = &mut sc.poly[..m * m];
                poly.fill(0.0);
                gemm(m, m, m, gram, gram, poly)?;
                // poly = b·A + c·A²
                par_zip(poly, gram, |p, g| b * g + c * p);
                let x_next = &mut sc.x_next[..n];
                x_next
                    .par_chunks_mut(PAR_CHUNK)
                    .zip(x.par_chunks(PAR_CHUNK))
                    .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = a * s));
                gemm(m, k, m, poly, x, x_next)?;
            }
            std::mem::swap(&mut sc.x, &mut sc.x_next);
        }

        let scale = (rows as f32 / cols as f32).max(1.0).sqrt();
        let alpha = s.lr * lr_mult * scale;
        let update = if transposed {
            // Back to the parameter's [rows, cols] layout.
            transpose(cols, rows, &sc.x[..n], &mut sc.x_next[..n]);
            &sc.x_next[..n]
        } else {
            &sc.x[..n]
        };
        par_zip(param, update, |p, u| p - alpha * u);
        Ok(())
    }
}

/// `x[i] = f(x[i])`, in parallel chunks.
fn par_map(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    x.par_chunks_mut(PAR_CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

/// `x[i] = f(x[i], y[i])`, in parallel chunks.
fn par_zip(x: &mut [f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    x.par_chunks_mut(PAR_CHUNK)
        .zip(y.par_chunks(PAR_CHUNK))
        .for_each(|(xc, yc)| xc.iter_mut().zip(yc).for_each(|(v, &w)| *v = f(*v, w)));
}

/// C (m×n) += A (m×k) · B (k×n), row-major, f32.
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<(), TrainError> {
    trueno::blis::gemm(m, n, k, a, b, c).map_err(|e| TrainError::Optimizer(format!("gemm: {e}")))
}

/// Which optimizer (and which learning rate) a parameter gets in the nanochat recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// `transformer.wte.weight`: AdamW at `embedding_lr`.
    Embedding,
    /// `lm_head.weight`: AdamW at `unembedding_lr`.
    Unembedding,
    /// Any 2-D matrix under `transformer.h.`: Muon at `matrix_lr`.
    Matrix,
}

impl ParamRole {
    /// Role of a parameter from its reference state_dict name.
    pub fn of(name: &str) -> Option<ParamRole> {
        if name == "transformer.wte.weight" {
            Some(ParamRole::Embedding)
        } else if name == "lm_head.weight" {
            Some(ParamRole::Unembedding)
        } else if name.starts_with("transformer.h.") {
            Some(ParamRole::Matrix)
        } else {
            None
        }
    }
}

/// Learning rates and AdamW settings of `setup_optimizers`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSettings {
    /// AdamW lr of the token embedding before the d_model scaling (nanochat: 0.2).
    pub embedding_lr: f32,
    /// AdamW lr of the lm_head before the d_model scaling (nanochat: 0.004).
    pub unembedding_lr: f32,
    /// Muon lr of the block matrices (nanochat: 0.02).
    pub matrix_lr: f32,
    /// AdamW weight decay (nanochat: 0.0).
    pub weight_decay: f32,
    /// Emulate the reference's bfloat16 Newton–Schulz (see [`MuonConfig::bf16_newton_schulz`]).
    pub muon_bf16: bool,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        Self {
            embedding_lr: 0.2,
            unembedding_lr: 0.004,
            matrix_lr: 0.02,
            weight_decay: 0.0,
            muon_bf16: true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    AdamW(usize),
    Muon(usize),
}

/// Both optimizers of the nanochat recipe behind one name-addressed step.
pub struct NanochatOptimizer {
    adamw: AdamW,
    muon: Muon,
    slots: HashMap<String, Slot>,
    order: Vec<String>,
}

/// Serializable scalar state of [`NanochatOptimizer`] (the vectors go to a tensor file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerMeta {
    /// AdamW step count per parameter name.
    pub adamw_steps: Vec<(String, u64)>,
    /// Current Muon momentum.
    pub muon_momentum: f32,
}

impl NanochatOptimizer {
    /// Builds the optimizers like `GPT.setup_optimizers`: AdamW lrs scaled by `1/√(d_model/768)`,
    /// Muon for the block matrices. `params` lists every parameter's name and shape.
    pub fn new<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        model_dim: usize,
        settings: OptimizerSettings,
    ) -> Result<Self, TrainError> {
        let dmodel_lr_scale = (model_dim as f64 / 768.0).powf(-0.5);
        let mut adamw = AdamW::new(AdamWConfig {
            weight_decay: settings.weight_decay,
            ..AdamWConfig::default()
        });
        let mut muon = Muon::new(MuonConfig {
            bf16_newton_schulz: settings.muon_bf16,
            ..MuonConfig::default()
        });
        let mut slots = HashMap::new();
        let mut order = Vec::new();
        for (name, shape) in params {
            let len: usize = shape.iter().product();
            let slot = match ParamRole::of(name) {
                Some(ParamRole::Embedding) => Slot::AdamW(adamw.add_param(
                    name,
                    len,
                    (f64::from(settings.embedding_lr) * dmodel_lr_scale) as f32,
                )),
                Some(ParamRole::Unembedding) => Slot::AdamW(adamw.add_param(
                    name,
                    len,
                    (f64::from(settings.unembedding_lr) * dmodel_lr_scale) as f32,
                )),
                Some(ParamRole::Matrix) => {
                    if shape.len() != 2 {
                        return Err(TrainError::Optimizer(format!(
                            "Muon needs 2-D matrices, `{name}` has shape {shape:?}"
                        )));
                    }
                    Slot::Muon(muon.add_param(name, shape[0], shape[1], settings.matrix_lr))
                }
                None => {
                    return Err(TrainError::Optimizer(format!(
                        "parameter `{name}` has no optimizer role in the nanochat recipe"
                    )))
                }
            };
            if slots.insert(name.to_string(), slot).is_some() {
                return Err(TrainError::Optimizer(format!(
                    "duplicate parameter `{name}`"
                )));
            }
            order.push(name.to_string());
        }
        Ok(Self {
            adamw,
            muon,
            slots,
            order,
        })
    }

    /// Number of registered parameters.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when no parameter is registered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Base (unscheduled) learning rate of a parameter.
    pub fn base_lr(&self, name: &str) -> Option<f32> {
        self.slots.get(name).map(|s| match *s {
            Slot::AdamW(i) => self.adamw.base_lr(i),
            Slot::Muon(i) => self.muon.base_lr(i),
        })
    }

    /// Sets Muon's momentum for the following steps.
    pub fn set_muon_momentum(&mut self, momentum: f32) {
        self.muon.set_momentum(momentum);
    }

    /// Steps every parameter once: `params` yields (name, data, grad) for each registered name.
    pub fn step<'a>(
        &mut self,
        lr_mult: f32,
        params: impl IntoIterator<Item = (&'a str, &'a mut [f32], &'a [f32])>,
    ) -> Result<(), TrainError> {
        let mut seen = 0usize;
        for (name, data, grad) in params {
            let slot = *self
                .slots
                .get(name)
                .ok_or_else(|| TrainError::Optimizer(format!("unknown parameter `{name}`")))?;
            match slot {
                Slot::AdamW(i) => self.adamw.update(i, data, grad, lr_mult)?,
                Slot::Muon(i) => self.muon.update(i, data, grad, lr_mult)?,
            }
            seen += 1;
        }
        if seen != self.order.len() {
            return Err(TrainError::Optimizer(format!(
                "step got {seen} parameters, the optimizer has {}",
                self.order.len()
            )));
        }
        Ok(())
    }

    /// Every state vector as (tensor name, shape, data): `adamw.<p>.exp_avg`,
    /// `adamw.<p>.exp_avg_sq`, `muon.<p>.momentum_buffer`.
    pub fn state_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut out = Vec::new();
        for s in &self.adamw.slots {
            out.push((
                format!("adamw.{}.exp_avg", s.name),
                vec![s.len],
                &s.exp_avg[..],
            ));
            out.push((
                format!("adamw.{}.exp_avg_sq", s.name),
                vec![s.len],
                &s.exp_avg_sq[..],
            ));
        }
        for s in &self.muon.slots {
            out.push((
                format!("muon.{}.momentum_buffer", s.name),
                vec![s.rows, s.cols],
                &s.momentum_buffer[..],
            ));
        }
        out
    }

    /// Scalar state (step counts, momentum).
    pub fn meta(&self) -> OptimizerMeta {
        OptimizerMeta {
            adamw_steps: self
                .adamw
                .slots
                .iter()
                .map(|s| (s.name.clone(), s.step))
                .collect(),
            muon_momentum: self.muon.momentum(),
        }
    }

    /// Restores state saved by [`state_tensors`](Self::state_tensors) and [`meta`](Self::meta);
    /// `lookup(name)` returns a saved tensor's data. Every tensor must be present and sized right.
    pub fn restore(
        &mut self,
        meta: &OptimizerMeta,
        mut lookup: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<(), TrainError> {
        let mut fetch = |name: String, len: usize| -> Result<Vec<f32>, TrainError> {
            let v = lookup(&name)
                .ok_or_else(|| TrainError::Optimizer(format!("optimizer state lacks `{name}`")))?;
            if v.len() != len {
                return Err(TrainError::Shape {
                    name,
                    expected: vec![len],
                    got: vec![v.len()],
                });
            }
            Ok(v)
        };
        for s in &mut self.adamw.slots {
            s.exp_avg = fetch(format!("adamw.{}.exp_avg", s.name), s.len)?;
            s.exp_avg_sq = fetch(format!("adamw.{}.exp_avg_sq", s.name), s.len)?;
            s.step = meta
                .adamw_steps
                .iter()
                .find(|(n, _)| *n == s.name)
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    TrainError::Optimizer(format!("optimizer meta lacks the step of `{}`", s.name))
                })?;
        }
        for s in &mut self.muon.slots {
            s.momentum_buffer = fetch(format!("muon.{}.momentum_buffer", s.name), s.rows * s.cols)?;
        }
        self.muon.set_momentum(meta.muon_momentum);
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`, with its 1e-6 guard); returns the norm before clipping.
pub fn clip_grad_norm<'a>(grads: impl IntoIterator<Item = &'a mut [f32]>, max_norm: f32) -> f32 {
    let grads: Vec<&mut [f32]> = grads.into_iter().collect();
    let total = grad_norm(grads.iter().map(|g| &**g));
    let coef = f64::from(max_norm) / (f64::from(total) + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        for g in grads {
            g.iter_mut().for_each(|v| *v *= coef);
        }
    }
    total
}

/// Global L2 norm of a set of gradient slices (accumulated in f64).
pub fn grad_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    grads
        .into_iter()
        .map(|g| g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .sum::<f64>()
        .sqrt() as f32
}

/// Muon momentum warmup of the reference loop: 0.85 → 0.95 linearly over the first 300 steps.
pub fn muon_momentum_at(step: u64) -> f32 {
    let frac = (step as f64 / 300.0).min(1.0);
    ((1.0 - frac) * 0.85 + frac * 0.95) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // After one bias-corrected step, m̂ = g and √v̂ = |g|, so Δp = −lr·sign(g).
        let mut opt = AdamW::new(AdamWConfig::default());
        let slot = opt.add_param("w", 4, 0.1);
        let mut p = vec![1.0, 1.0, 1.0, 1.0];
        let g = vec![0.5, -2.0, 1e-3, -1e-3];
        opt.update(slot, &mut p, &g, 1.0).unwrap();
        let want = [0.9, 1.1, 0.9, 1.1];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn adamw_weight_decay_shrinks_weights_with_zero_grad() {
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        });
        let slot = opt.add_param("w", 2, 0.1);
        let mut p = vec![2.0, -4.0];
        opt.update(slot, &mut p, &[0.0, 0.0], 1.0).unwrap();
        assert!((p[0] - 2.0 * 0.95).abs() < 1e-6 && (p[1] + 4.0 * 0.95).abs() < 1e-6);
    }

    #[test]
    fn adamw_rejects_wrong_length() {
        let mut opt = AdamW::new(AdamWConfig::default());
        let slot = opt.add_param("w", 3, 0.1);
        let err = opt.update(slot, &mut [0.0; 2], &[0.0; 2], 1.0).unwrap_err();
        assert!(err.to_string().contains('w'));
    }

    fn singular_values_near_one(rows: usize, cols: usize) {
        // Newton–Schulz of a random matrix: the update U should satisfy U·Uᵀ ≈ diag in
        // [0.5, 1.5] (the quintic iteration does not converge exactly to 1).
        let mut muon = Muon::new(MuonConfig {
            momentum: 0.0,
            nesterov: false,
            ns_steps: 5,
            bf16_newton_schulz: false,
        });
        let slot = muon.add_param("m", rows, cols, 1.0);
        let mut state = 12345u64;
        let g: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        let mut p = vec![0.0; rows * cols];
        muon.update(slot, &mut p, &g, 1.0).unwrap();
        let scale = (rows as f32 / cols as f32).max(1.0).sqrt();
        let u: Vec<f32> = p.iter().map(|v| -v / scale).collect();
        // Gram of the short side.
        let (m, k, tall) = if rows > cols {
            (cols, rows, true)
        } else {
            (rows, cols, false)
        };
        let at = |i: usize, j: usize| {
            if tall {
                u[j * cols + i]
            } else {
                u[i * cols + j]
            }
        };
        for i in 0..m {
            let d: f32 = (0..k).map(|j| at(i, j) * at(i, j)).sum();
            assert!((0.3..1.7).contains(&d), "diag {i} = {d}");
        }
    }

    #[test]
    fn newton_schulz_orthogonalises_wide_and_tall() {
        singular_values_near_one(8, 24);
        singular_values_near_one(24, 8);
        singular_values_near_one(16, 16);
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-1.23456), -1.234375);
    }

    #[test]
    fn clip_scales_to_max_norm() {
        let mut a = [3.0f32];
        let mut b = [4.0f32];
        let n = clip_grad_norm([&mut a[..], &mut b[..]], 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        assert!((a[0] - 0.6).abs() < 1e-5 && (b[0] - 0.8).abs() < 1e-5);
        let n2 = clip_grad_norm([&mut a[..], &mut b[..]], 10.0);
        assert!((n2 - 1.0).abs() < 1e-4 && (a[0] - 0.6).abs() < 1e-5);
    }

    #[test]
    fn momentum_warmup_endpoints() {
        assert!((muon_momentum_at(0) - 0.85).abs() < 1e-7);
        assert!((muon_momentum_at(150) - 0.90).abs() < 1e-6);
        assert!((muon_momentum_at(300) - 0.95).abs() < 1e-7);
        assert!((muon_momentum_at(10_000) - 0.95).abs() < 1e-7);
    }
}
