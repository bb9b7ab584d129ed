//! Optimizers of the nanochat recipe: AdamW for the embedding and the unembedding, Muon for every
//! matrix inside the transformer blocks.
//!
//! Both run on a compute backend ([`nanochat_model::Backend`]): parameters and gradients are
//! backend views plus a shape, so they do not depend on how a model stores its tensors (on the
//! CPU a view is a slice). All state (moments, momentum buffers, Newton–Schulz scratch) lives on
//! the same device, allocated when a parameter is registered; a step allocates nothing and reads
//! nothing back.
//!
//! Numerics follow the reference (nanochat 48abd7d): AdamW is torch's `AdamW` (decoupled weight
//! decay, bias correction with `sqrt(1-β2^t)` inside the denominator, eps added after), Muon is
//! SGD-momentum with Nesterov blending followed by 5 quintic Newton–Schulz iterations
//! (a, b, c) = (3.4445, −4.7750, 2.0315) and an aspect-ratio scaled step `√max(1, rows/cols)`.
//! The reference orthogonalises in bfloat16 (bf16 operands, f32 accumulation, bf16 results);
//! with `bf16_newton_schulz` so does this one, on the backend's bf16 GEMM (on the CPU
//! `VDPBF16PS` where it exists: twice the f32 FLOP rate, and Newton–Schulz costs ~60% of the
//! forward+backward FLOPs of a d8 micro-batch of 2048 tokens). Otherwise it runs in f32.

use std::collections::HashMap;

use nanochat_model::compute::{prefix, prefix_mut, AdamWStep, Gemm};
use nanochat_model::{Backend, Cpu, Gpt, MatmulPrecision};
use serde::{Deserialize, Serialize};

use crate::TrainError;

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

struct AdamWSlot<B: Backend> {
    name: String,
    len: usize,
    lr: f32,
    step: u64,
    exp_avg: B::Buf,
    exp_avg_sq: B::Buf,
}

/// torch-compatible AdamW over registered flat parameters, each with its own base learning rate.
pub struct AdamW<B: Backend = Cpu> {
    backend: B,
    cfg: AdamWConfig,
    slots: Vec<AdamWSlot<B>>,
}

fn dev_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Optimizer(e.to_string())
}

impl AdamW<Cpu> {
    /// A CPU optimizer with no parameters yet.
    pub fn new(cfg: AdamWConfig) -> Self {
        Self::new_on(Cpu, cfg)
    }
}

impl<B: Backend> AdamW<B> {
    /// An optimizer on `backend` with no parameters yet.
    pub fn new_on(backend: B, cfg: AdamWConfig) -> Self {
        Self {
            backend,
            cfg,
            slots: Vec::new(),
        }
    }

    /// Registers a parameter of `len` elements with base learning rate `lr`; returns its slot.
    pub fn add_param(&mut self, name: &str, len: usize, lr: f32) -> Result<usize, TrainError> {
        let what = format!("AdamW state of {name}");
        self.slots.push(AdamWSlot {
            name: name.to_string(),
            len,
            lr,
            step: 0,
            exp_avg: self.backend.alloc(len, &what).map_err(dev_err)?,
            exp_avg_sq: self.backend.alloc(len, &what).map_err(dev_err)?,
        });
        Ok(self.slots.len() - 1)
    }

    /// Base learning rate of a slot (before the schedule multiplier).
    pub fn base_lr(&self, slot: usize) -> f32 {
        self.slots[slot].lr
    }

    /// One AdamW step of slot `slot` with learning rate `base_lr · lr_mult`.
    pub fn update(
        &mut self,
        slot: usize,
        param: B::ViewMut<'_>,
        grad: B::View<'_>,
        lr_mult: f32,
    ) -> Result<(), TrainError> {
        let cfg = self.cfg;
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| TrainError::Optimizer(format!("AdamW has no slot {slot}")))?;
        if B::len_mut(&param) != s.len || B::len(&grad) != s.len {
            return Err(TrainError::Shape {
                name: s.name.clone(),
                expected: vec![s.len],
                got: vec![B::len_mut(&param), B::len(&grad)],
            });
        }
        s.step += 1;
        // Scalars in f64 like torch's host-side math; elements in f32.
        let lr = f64::from(s.lr) * f64::from(lr_mult);
        let t = s.step as i32;
        let bc1 = 1.0 - f64::from(cfg.beta1).powi(t);
        let bc2_sqrt = (1.0 - f64::from(cfg.beta2).powi(t)).sqrt();
        let h = AdamWStep {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step_size: (lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            decay: (1.0 - lr * f64::from(cfg.weight_decay)) as f32,
        };
        self.backend
            .adamw(
                param,
                grad,
                B::view_mut(&mut s.exp_avg),
                B::view_mut(&mut s.exp_avg_sq),
                h,
            )
            .map_err(dev_err)
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

struct MuonSlot<B: Backend> {
    name: String,
    rows: usize,
    cols: usize,
    lr: f32,
    momentum_buffer: B::Buf,
}

/// Work buffers of the Newton–Schulz iteration, sized for the largest registered matrix.
struct NsScratch<B: Backend> {
    x: B::Buf,
    x_next: B::Buf,
    gram: B::Buf,
    poly: B::Buf,
    /// Elements of `x`/`x_next` and of `gram`/`poly`.
    sizes: (usize, usize),
}

/// Muon: momentum SGD whose update is orthogonalised by a quintic Newton–Schulz iteration.
pub struct Muon<B: Backend = Cpu> {
    backend: B,
    cfg: MuonConfig,
    slots: Vec<MuonSlot<B>>,
    scratch: Option<NsScratch<B>>,
}

impl Muon<Cpu> {
    /// A CPU optimizer with no parameters yet.
    pub fn new(cfg: MuonConfig) -> Self {
        Self::new_on(Cpu, cfg)
    }
}

impl<B: Backend> Muon<B> {
    /// An optimizer on `backend` with no parameters yet.
    pub fn new_on(backend: B, cfg: MuonConfig) -> Self {
        Self {
            backend,
            cfg,
            slots: Vec::new(),
            scratch: None,
        }
    }

    fn reserve(&mut self, rows: usize, cols: usize) -> Result<(), TrainError> {
        let m = rows.min(cols);
        let (mn, mm) = (rows * cols, m * m);
        let (have_mn, have_mm) = self.scratch.as_ref().map_or((0, 0), |s| s.sizes);
        if have_mn >= mn && have_mm >= mm {
            return Ok(());
        }
        let (mn, mm) = (mn.max(have_mn), mm.max(have_mm));
        let be = &self.backend;
        let what = "Newton–Schulz scratch";
        self.scratch = Some(NsScratch {
            x: be.alloc(mn, what).map_err(dev_err)?,
            x_next: be.alloc(mn, what).map_err(dev_err)?,
            gram: be.alloc(mm, what).map_err(dev_err)?,
            poly: be.alloc(mm, what).map_err(dev_err)?,
            sizes: (mn, mm),
        });
        Ok(())
    }

    /// Registers a `rows × cols` matrix (row-major, PyTorch `[out, in]`) with base lr `lr`.
    pub fn add_param(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        lr: f32,
    ) -> Result<usize, TrainError> {
        self.reserve(rows, cols)?;
        let buf = self
            .backend
            .alloc(rows * cols, &format!("Muon momentum of {name}"))
            .map_err(dev_err)?;
        self.slots.push(MuonSlot {
            name: name.to_string(),
            rows,
            cols,
            lr,
            momentum_buffer: buf,
        });
        Ok(self.slots.len() - 1)
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
        param: B::ViewMut<'_>,
        grad: B::View<'_>,
        lr_mult: f32,
    ) -> Result<(), TrainError> {
        let cfg = self.cfg;
        let be = &self.backend;
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| TrainError::Optimizer(format!("Muon has no slot {slot}")))?;
        let (rows, cols) = (s.rows, s.cols);
        let n = rows * cols;
        if B::len_mut(&param) != n || B::len(&grad) != n {
            return Err(TrainError::Shape {
                name: s.name.clone(),
                expected: vec![rows, cols],
                got: vec![B::len_mut(&param), B::len(&grad)],
            });
        }
        let sc = self
            .scratch
            .as_mut()
            .ok_or_else(|| TrainError::Optimizer("Muon scratch missing".into()))?;
        // Work in the wide orientation (m ≤ n) so the Gram matrix X·Xᵀ is the small one.
        let transposed = rows > cols;
        let (m, k) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let bf16 = cfg.bf16_newton_schulz;
        // Momentum buffer update and Nesterov blend; a tall matrix is then transposed into X.
        {
            let u = if transposed {
                prefix_mut::<B>(&mut sc.x_next, n)
            } else {
                prefix_mut::<B>(&mut sc.x, n)
            };
            be.muon_momentum(
                B::view_mut(&mut s.momentum_buffer),
                grad,
                u,
                cfg.momentum,
                cfg.nesterov,
                bf16,
            )
            .map_err(dev_err)?;
            if transposed {
                be.transpose(
                    prefix::<B>(&sc.x_next, n),
                    rows,
                    cols,
                    prefix_mut::<B>(&mut sc.x, n),
                )
                .map_err(dev_err)?;
            }
        }
        // Frobenius norm summed in f64 in a fixed order (exact resume), on the device.
        be.frobenius_normalize(prefix_mut::<B>(&mut sc.x, n), 1e-7, bf16)
            .map_err(dev_err)?;
        for _ in 0..cfg.ns_steps {
            newton_schulz_step(be, sc, m, k, bf16).map_err(dev_err)?;
            std::mem::swap(&mut sc.x, &mut sc.x_next);
        }
        let scale = (rows as f32 / cols as f32).max(1.0).sqrt();
        let alpha = s.lr * lr_mult * scale;
        let update = if transposed {
            // Back to the parameter's [rows, cols] layout.
            be.transpose(
                prefix::<B>(&sc.x, n),
                cols,
                rows,
                prefix_mut::<B>(&mut sc.x_next, n),
            )
            .map_err(dev_err)?;
            prefix::<B>(&sc.x_next, n)
        } else {
            prefix::<B>(&sc.x, n)
        };
        // p − α·u, written as (−α)·u + 1·p (the same IEEE result).
        be.axpby(param, 1.0, update, -alpha, false).map_err(dev_err)
    }
}

/// One quintic Newton–Schulz iteration `X' = a·X + (b·A + c·A²)·X` with `A = X·Xᵀ` (`X` is
/// `m × k`, m ≤ k), from `sc.x` into `sc.x_next`.
fn newton_schulz_step<B: Backend>(
    be: &B,
    sc: &mut NsScratch<B>,
    m: usize,
    k: usize,
    bf16: bool,
) -> nanochat_model::compute::Result<()> {
    let (a, b, c) = NS_COEFFS;
    let n = m * k;
    let prec = if bf16 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    };
    let g = |ta, tb, m, n, k, beta| Gemm {
        ta,
        tb,
        m,
        n,
        k,
        alpha: 1.0,
        beta,
        precision: prec,
    };
    let x = B::slice(B::view(&sc.x), 0..n);
    let gram = B::slice_mut(B::view_mut(&mut sc.gram), 0..m * m);
    // A = X·Xᵀ (the bf16 kernel packs the second operand transposed): symmetric bit for bit,
    // so the backend may compute one triangle and mirror it.
    be.gemm_symmetric(g(false, true, m, m, k, 0.0), x, x, gram)?;
    let gram_v = B::slice(B::view(&sc.gram), 0..m * m);
    let poly = B::slice_mut(B::view_mut(&mut sc.poly), 0..m * m);
    if bf16 {
        be.round_bf16(B::slice_mut(B::view_mut(&mut sc.gram), 0..m * m))?;
        let gram_v = B::slice(B::view(&sc.gram), 0..m * m);
        // The reference evaluates `c * A @ A` as `(c·A) @ A` (same precedence, left to right);
        // in bf16 the rounding of c·A matters, so reproduce that order.
        let scaled = B::slice_mut(B::view_mut(&mut sc.x_next), 0..m * m);
        be.scale_copy(gram_v, scaled, c, true)?;
        let scaled = B::slice(B::view(&sc.x_next), 0..m * m);
        // rnd(c·A)·A is symmetric only up to rounding, and mirroring one triangle moves the
        // result away from the reference's (the fixture test's Muon error grows past its
        // 5e-2): the full product.
        be.gemm(g(false, false, m, m, m, 0.0), scaled, gram_v, poly)?;
        let poly = B::slice_mut(B::view_mut(&mut sc.poly), 0..m * m);
        be.axpby(poly, 1.0, gram_v, b, true)?;
        // a·X + B·X: B·X alone first, so it is rounded before the sum.
        let poly = B::slice(B::view(&sc.poly), 0..m * m);
        let x_next = B::slice_mut(B::view_mut(&mut sc.x_next), 0..n);
        be.gemm(g(false, false, m, k, m, 0.0), poly, x, x_next)?;
        let x_next = B::slice_mut(B::view_mut(&mut sc.x_next), 0..n);
        be.axpby(x_next, 1.0, x, a, true)
    } else {
        be.gemm_symmetric(g(false, false, m, m, m, 0.0), gram_v, gram_v, poly)?;
        // poly = b·A + c·A²
        let poly = B::slice_mut(B::view_mut(&mut sc.poly), 0..m * m);
        be.axpby(poly, c, gram_v, b, false)?;
        let x_next = B::slice_mut(B::view_mut(&mut sc.x_next), 0..n);
        be.scale_copy(x, x_next, a, false)?;
        let poly = B::slice(B::view(&sc.poly), 0..m * m);
        let x_next = B::slice_mut(B::view_mut(&mut sc.x_next), 0..n);
        be.gemm(g(false, false, m, k, m, 1.0), poly, x, x_next)
    }
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
pub struct NanochatOptimizer<B: Backend = Cpu> {
    adamw: AdamW<B>,
    muon: Muon<B>,
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

/// One optimizer state tensor copied to the host: (name, shape, data).
pub type StateTensor = (String, Vec<usize>, Vec<f32>);

impl NanochatOptimizer<Cpu> {
    /// Builds the CPU optimizers (see [`NanochatOptimizer::new_on`]).
    pub fn new<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        model_dim: usize,
        settings: OptimizerSettings,
    ) -> Result<Self, TrainError> {
        Self::new_on(Cpu, params, model_dim, settings)
    }
}

impl<B: Backend> NanochatOptimizer<B> {
    /// Builds the optimizers like `GPT.setup_optimizers`: AdamW lrs scaled by `1/√(d_model/768)`,
    /// Muon for the block matrices, every state buffer on `backend`. `params` lists every
    /// parameter's name and shape.
    pub fn new_on<'a>(
        backend: B,
        params: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        model_dim: usize,
        settings: OptimizerSettings,
    ) -> Result<Self, TrainError> {
        let dmodel_lr_scale = (model_dim as f64 / 768.0).powf(-0.5);
        let mut adamw = AdamW::new_on(
            backend.clone(),
            AdamWConfig {
                weight_decay: settings.weight_decay,
                ..AdamWConfig::default()
            },
        );
        let mut muon = Muon::new_on(
            backend,
            MuonConfig {
                bf16_newton_schulz: settings.muon_bf16,
                ..MuonConfig::default()
            },
        );
        let mut slots = HashMap::new();
        let mut order = Vec::new();
        for (name, shape) in params {
            let len: usize = shape.iter().product();
            let scaled = |lr: f32| (f64::from(lr) * dmodel_lr_scale) as f32;
            let slot = match ParamRole::of(name) {
                Some(ParamRole::Embedding) => {
                    Slot::AdamW(adamw.add_param(name, len, scaled(settings.embedding_lr))?)
                }
                Some(ParamRole::Unembedding) => {
                    Slot::AdamW(adamw.add_param(name, len, scaled(settings.unembedding_lr))?)
                }
                Some(ParamRole::Matrix) => {
                    if shape.len() != 2 {
                        return Err(TrainError::Optimizer(format!(
                            "Muon needs 2-D matrices, `{name}` has shape {shape:?}"
                        )));
                    }
                    Slot::Muon(muon.add_param(name, shape[0], shape[1], settings.matrix_lr)?)
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

    /// The optimizers for every parameter of `model`, on its device.
    pub fn for_model(model: &Gpt<B>, settings: OptimizerSettings) -> Result<Self, TrainError> {
        let shapes: Vec<(String, Vec<usize>)> = model
            .param_specs()
            .iter()
            .map(|s| (s.name.clone(), s.shape.to_vec()))
            .collect();
        Self::new_on(
            model.backend().clone(),
            shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            model.config().n_embd,
            settings,
        )
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
        params: impl IntoIterator<Item = (&'a str, B::ViewMut<'a>, B::View<'a>)>,
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

    /// Steps every parameter of `model` from its accumulated gradients.
    pub fn step_model(&mut self, model: &mut Gpt<B>, lr_mult: f32) -> Result<(), TrainError> {
        let views = model.step_views().map_err(dev_err)?;
        let mut rest = views.params;
        let mut consumed = 0;
        let mut items = Vec::with_capacity(views.layout.len());
        for (spec, slot) in views.specs.iter().zip(views.layout) {
            let (_, tail) = B::split_at_mut(rest, slot.offset - consumed);
            let (data, tail) = B::split_at_mut(tail, slot.len());
            rest = tail;
            consumed = slot.offset + slot.len();
            let grad = B::slice(views.grads, slot.range());
            items.push((spec.name.as_str(), data, grad));
        }
        self.step(lr_mult, items)
    }

    /// Every state vector copied to the host as (tensor name, shape, data):
    /// `adamw.<p>.exp_avg`, `adamw.<p>.exp_avg_sq`, `muon.<p>.momentum_buffer`.
    pub fn state_tensors(&self) -> Result<Vec<StateTensor>, TrainError> {
        let be = &self.adamw.backend;
        let host = |buf: &B::Buf, len: usize| -> Result<Vec<f32>, TrainError> {
            let mut v = vec![0.0; len];
            be.download(B::view(buf), &mut v).map_err(dev_err)?;
            Ok(v)
        };
        let mut out = Vec::new();
        for s in &self.adamw.slots {
            out.push((
                format!("adamw.{}.exp_avg", s.name),
                vec![s.len],
                host(&s.exp_avg, s.len)?,
            ));
            out.push((
                format!("adamw.{}.exp_avg_sq", s.name),
                vec![s.len],
                host(&s.exp_avg_sq, s.len)?,
            ));
        }
        for s in &self.muon.slots {
            out.push((
                format!("muon.{}.momentum_buffer", s.name),
                vec![s.rows, s.cols],
                host(&s.momentum_buffer, s.rows * s.cols)?,
            ));
        }
        Ok(out)
    }

    /// f32 elements of optimizer state held on the device: both AdamW moments and every Muon
    /// momentum buffer (the Newton–Schulz scratch, sized by the largest matrix, not counted).
    pub fn state_elements(&self) -> usize {
        self.adamw.slots.iter().map(|s| 2 * s.len).sum::<usize>()
            + self
                .muon
                .slots
                .iter()
                .map(|s| s.rows * s.cols)
                .sum::<usize>()
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
        let be = self.adamw.backend.clone();
        let put = |buf: &mut B::Buf, v: &[f32]| be.upload(v, B::view_mut(buf)).map_err(dev_err);
        for s in &mut self.adamw.slots {
            put(
                &mut s.exp_avg,
                &fetch(format!("adamw.{}.exp_avg", s.name), s.len)?,
            )?;
            put(
                &mut s.exp_avg_sq,
                &fetch(format!("adamw.{}.exp_avg_sq", s.name), s.len)?,
            )?;
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
            let v = fetch(format!("muon.{}.momentum_buffer", s.name), s.rows * s.cols)?;
            put(&mut s.momentum_buffer, &v)?;
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
    use nanochat_model::compute::round_bf16;

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // After one bias-corrected step, m̂ = g and √v̂ = |g|, so Δp = −lr·sign(g).
        let mut opt = AdamW::new(AdamWConfig::default());
        let slot = opt.add_param("w", 4, 0.1).unwrap();
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
        let slot = opt.add_param("w", 2, 0.1).unwrap();
        let mut p = vec![2.0, -4.0];
        opt.update(slot, &mut p, &[0.0, 0.0], 1.0).unwrap();
        assert!((p[0] - 2.0 * 0.95).abs() < 1e-6 && (p[1] + 4.0 * 0.95).abs() < 1e-6);
    }

    #[test]
    fn adamw_rejects_wrong_length() {
        let mut opt = AdamW::new(AdamWConfig::default());
        let slot = opt.add_param("w", 3, 0.1).unwrap();
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
        let slot = muon.add_param("m", rows, cols, 1.0).unwrap();
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
