//! The GPT: parameters in flat backend buffers, the reference initialisation, and the public
//! training and evaluation entry points (the passes themselves are in `forward.rs`).

use std::sync::{Mutex, RwLock, RwLockReadGuard};

use nanochat_compute::{Backend, Cpu, DeviceKind, Precision, WeightSlot};
use rayon::prelude::*;

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::forward::{self, Weights};
use crate::params::{param_layout, param_specs, ParamGroup, ParamSpec};
use crate::plan::{Activations, PassShape};
use crate::rng::Rng;

/// How per-token losses are combined (as `F.cross_entropy`'s `reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the targets that are not ignored (-1).
    Mean,
    /// Sum over the targets that are not ignored.
    Sum,
}

/// Read access to one parameter (CPU models).
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

/// The backend's derived weights and whether they still match the parameters.
pub(crate) struct WeightState<B: Backend> {
    pub(crate) cache: Option<B::WeightCache>,
    /// The cache was built for these weights at this precision.
    pub(crate) fresh: Option<Precision>,
}

type Acts<B> = Activations<<B as Backend>::Buf, <B as Backend>::IBuf>;

/// The nanochat GPT with f32 master weights, on backend `B` (the CPU by default).
pub struct Gpt<B: Backend = Cpu> {
    pub(crate) backend: B,
    pub(crate) cfg: GptConfig,
    pub(crate) specs: Vec<ParamSpec>,
    /// Where each parameter sits in `params` and `grads`.
    pub(crate) layout: Vec<WeightSlot>,
    /// Every parameter, one flat buffer (offsets aligned, gaps zero).
    pub(crate) params: B::Buf,
    /// Accumulated gradients, same layout; `None` after [`Gpt::release_training_state`].
    pub(crate) grads: Option<B::Buf>,
    /// Rotary tables `[max_positions, head_dim/2]`.
    pub(crate) rope_cos: B::Buf,
    pub(crate) rope_sin: B::Buf,
    pub(crate) weights: RwLock<WeightState<B>>,
    pub(crate) precision: Precision,
    /// Buffers of the last `&mut self` pass (training), reused while the shape holds.
    acts: Option<Box<Acts<B>>>,
    /// Buffers of the last `&self` forward pass (evaluation), reused likewise: fresh buffers
    /// per call meant fresh pages, and page faults were a tenth of CORE's time.
    eval_acts: Mutex<Option<Box<Acts<B>>>>,
}

impl<B: Backend> std::fmt::Debug for Gpt<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt")
            .field("cfg", &self.cfg)
            .field("device", &self.backend.describe())
            .finish_non_exhaustive()
    }
}

/// Rotary tables `[positions, head_dim/2]`, computed in f64 then rounded once to f32. (The
/// reference rounds them to bf16 for speed; the fixtures pin the exact math, as do we.)
fn rope_tables(positions: usize, head_dim: usize, base: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for t in 0..positions {
        for i in 0..half {
            let inv_freq = 1.0 / base.powf((2 * i) as f64 / head_dim as f64);
            let f = t as f64 * inv_freq;
            cos.push(f.cos() as f32);
            sin.push(f.sin() as f32);
        }
    }
    (cos, sin)
}

/// The reference initialisation of one tensor from its own stream.
fn init_tensor(spec: &ParamSpec, index: usize, seed: u64, bound: f64) -> Vec<f32> {
    let mut rng = Rng::new(seed, index as u64);
    let len = spec.shape[0] * spec.shape[1];
    match spec.group {
        ParamGroup::Embedding => (0..len).map(|_| rng.normal() as f32).collect(),
        ParamGroup::LmHead => (0..len).map(|_| (0.001 * rng.normal()) as f32).collect(),
        ParamGroup::Matrix if spec.name.ends_with("c_proj.weight") => vec![0.0; len],
        ParamGroup::Matrix => (0..len)
            .map(|_| (bound * (2.0 * rng.uniform() - 1.0)) as f32)
            .collect(),
    }
}

impl Gpt<Cpu> {
    /// A CPU model with the reference's initialisation, reproducible from `seed` (see
    /// [`Gpt::new_on`]).
    pub fn new(cfg: GptConfig, seed: u64) -> Result<Self> {
        Self::new_on(Cpu, cfg, seed)
    }

    /// Every parameter with its gradient, in state_dict order.
    pub fn params(&self) -> impl Iterator<Item = ParamRef<'_>> {
        let grads = self.grads.as_deref().unwrap_or(&[]);
        self.specs
            .iter()
            .zip(&self.layout)
            .map(move |(s, slot)| ParamRef {
                name: &s.name,
                shape: s.shape,
                group: s.group,
                data: &self.params[slot.range()],
                grad: grads.get(slot.range()).unwrap_or(&[]),
            })
    }

    /// One parameter by name.
    pub fn param(&self, name: &str) -> Option<ParamRef<'_>> {
        self.params().find(|p| p.name == name)
    }

    /// Mutable access to every parameter and its gradient. The weights' derived forms are
    /// rebuilt before the next pass, so updates take effect. (Allocates the gradients if
    /// [`Gpt::release_training_state`] freed them.)
    pub fn params_mut(&mut self) -> ParamsMut<'_> {
        if self.grads.is_none() {
            // Host allocation of a zeroed vector: failure here is the same abort `vec!` would be.
            self.grads = Some(vec![0.0; self.params.len()]);
        }
        self.weights.get_mut().map(|w| w.fresh = None).ok();
        ParamsMut { model: self }
    }

    /// The flat gradient buffer (every parameter's gradient at its layout offset), e.g. for a
    /// collective to average across ranks.
    pub fn grads_flat_mut(&mut self) -> Option<&mut [f32]> {
        self.grads.as_deref_mut()
    }
}

/// Guard from [`Gpt::params_mut`].
pub struct ParamsMut<'a> {
    model: &'a mut Gpt<Cpu>,
}

impl ParamsMut<'_> {
    /// Every parameter, mutable, in state_dict order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = ParamMut<'_>> {
        let m = &mut *self.model;
        let grads = m.grads.as_deref_mut().unwrap_or(&mut []);
        let mut data_rest: &mut [f32] = &mut m.params;
        let mut grad_rest: &mut [f32] = grads;
        let mut consumed = 0;
        let mut out = Vec::with_capacity(m.specs.len());
        for (s, slot) in m.specs.iter().zip(&m.layout) {
            let skip = slot.offset - consumed;
            let (_, d) = std::mem::take(&mut data_rest).split_at_mut(skip);
            let (data, d) = d.split_at_mut(slot.len());
            data_rest = d;
            let (_, g) = std::mem::take(&mut grad_rest).split_at_mut(skip);
            let (grad, g) = g.split_at_mut(slot.len());
            grad_rest = g;
            consumed = slot.offset + slot.len();
            out.push(ParamMut {
                name: &s.name,
                shape: s.shape,
                group: s.group,
                data,
                grad,
            });
        }
        out.into_iter()
    }

    /// One parameter by name.
    pub fn get_mut(&mut self, name: &str) -> Option<ParamMut<'_>> {
        self.iter_mut().find(|p| p.name == name)
    }
}

/// What an optimizer step works on: the parameters (mutable), their gradients, and where each
/// parameter sits. Taking it marks the weights' derived forms stale.
pub struct StepViews<'a, B: Backend> {
    /// The device.
    pub backend: &'a B,
    /// The flat parameter buffer.
    pub params: B::ViewMut<'a>,
    /// The flat gradient buffer.
    pub grads: B::View<'a>,
    /// Each parameter's place in both.
    pub layout: &'a [WeightSlot],
    /// Each parameter's name, shape and group.
    pub specs: &'a [ParamSpec],
}

impl<B: Backend> Gpt<B> {
    /// A model on `backend` with the reference's initialisation, reproducible from `seed`:
    /// wte ~ N(0, 1), lm_head ~ N(0, 0.001²), c_q/c_k/c_v/c_fc ~ U(±√3/√n_embd), both output
    /// projections zero. Each tensor draws from its own stream, so the weights do not depend
    /// on the device.
    pub fn new_on(backend: B, cfg: GptConfig, seed: u64) -> Result<Self> {
        let mut model = Self::zeros_on(backend, cfg)?;
        let bound = (3.0f64).sqrt() / (model.cfg.n_embd as f64).sqrt();
        let tensors: Vec<Vec<f32>> = model
            .specs
            .par_iter()
            .enumerate()
            .map(|(i, spec)| init_tensor(spec, i, seed, bound))
            .collect();
        for (i, t) in tensors.iter().enumerate() {
            model.upload_param(i, t)?;
        }
        Ok(model)
    }

    /// A model with every weight zero (checkpoint loading fills it in).
    pub(crate) fn zeros_on(backend: B, cfg: GptConfig) -> Result<Self> {
        cfg.validate()?;
        let specs = param_specs(&cfg);
        let (layout, total) = param_layout(&specs);
        // Weights, their derived forms and gradients, checked before the first allocation.
        let cache_bytes = backend.weight_cache_bytes(&layout, Precision::F32);
        let bytes = 8 * total as u64 + cache_bytes;
        if let Some(avail) = backend.available_memory() {
            if bytes > avail {
                return Err(ModelError::oom(
                    format!(
                        "weights, their derived copies and gradients of a {}-layer, {}-wide model on {}",
                        cfg.n_layer,
                        cfg.n_embd,
                        backend.describe()
                    ),
                    bytes,
                    Some(avail),
                ));
            }
        }
        let params = backend.alloc(total, "model weights")?;
        let grads = Some(backend.alloc(total, "gradients")?);
        let (cos, sin) = rope_tables(cfg.max_positions(), cfg.head_dim(), cfg.rope_base);
        let mut rope_cos = backend.alloc(cos.len(), "rotary table")?;
        let mut rope_sin = backend.alloc(sin.len(), "rotary table")?;
        backend.upload(&cos, B::view_mut(&mut rope_cos))?;
        backend.upload(&sin, B::view_mut(&mut rope_sin))?;
        Ok(Gpt {
            backend,
            cfg,
            specs,
            layout,
            params,
            grads,
            rope_cos,
            rope_sin,
            weights: RwLock::new(WeightState {
                cache: None,
                fresh: None,
            }),
            precision: Precision::F32,
            acts: None,
            eval_acts: Mutex::new(None),
        })
    }

    /// The device the model lives on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A copy of this model (weights only) on another backend.
    pub fn to_backend<C: Backend>(&self, backend: C) -> Result<Gpt<C>> {
        let mut other = Gpt::zeros_on(backend, self.cfg.clone())?;
        for i in 0..self.specs.len() {
            other.upload_param(i, &self.download_param(i)?)?;
        }
        other.precision = self.precision;
        Ok(other)
    }

    /// Parameter `i` (state_dict order) copied to the host.
    pub fn download_param(&self, i: usize) -> Result<Vec<f32>> {
        let slot = self.layout[i];
        let mut host = vec![0.0; slot.len()];
        self.backend
            .download(B::slice(B::view(&self.params), slot.range()), &mut host)?;
        Ok(host)
    }

    /// Gradient of parameter `i` copied to the host (zeros after
    /// [`Gpt::release_training_state`]).
    pub fn download_grad(&self, i: usize) -> Result<Vec<f32>> {
        let slot = self.layout[i];
        let mut host = vec![0.0; slot.len()];
        if let Some(g) = &self.grads {
            self.backend
                .download(B::slice(B::view(g), slot.range()), &mut host)?;
        }
        Ok(host)
    }

    /// Overwrites parameter `i` from the host.
    pub fn upload_param(&mut self, i: usize, values: &[f32]) -> Result<()> {
        let slot = self.layout[i];
        if values.len() != slot.len() {
            return Err(ModelError::InvalidInput(format!(
                "{}: {} values for a tensor of {}",
                self.specs[i].name,
                values.len(),
                slot.len()
            )));
        }
        self.backend.upload(
            values,
            B::slice_mut(B::view_mut(&mut self.params), slot.range()),
        )?;
        self.mark_weights_changed();
        Ok(())
    }

    fn mark_weights_changed(&mut self) {
        if let Ok(w) = self.weights.get_mut() {
            w.fresh = None;
        }
    }

    /// Arithmetic of the dense matmuls in training and full-sequence forward passes
    /// ([`Gpt::forward_backward`], [`Gpt::loss`], [`Gpt::logits`]): f32 by default; bf16 is
    /// the analogue of the reference's bf16 autocast. A run-time choice, not part of the
    /// checkpoint (weights stay f32 either way). KV-cached decoding runs at the backend's
    /// [`Backend::decode_precision`] (this precision, on the CPU and CUDA: with bf16 the CPU
    /// decodes from bf16 copies of the weights, half the bytes per token).
    pub fn set_matmul_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// See [`Gpt::set_matmul_precision`].
    pub fn matmul_precision(&self) -> Precision {
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

    /// Where each parameter sits in the flat parameter and gradient buffers.
    pub fn param_layout(&self) -> &[WeightSlot] {
        &self.layout
    }

    /// Everything an optimizer step needs, the parameters writable. The weights' derived forms
    /// are rebuilt before the next pass.
    pub fn step_views(&mut self) -> Result<StepViews<'_, B>> {
        self.ensure_grads()?;
        self.mark_weights_changed();
        let grads = self
            .grads
            .as_ref()
            .ok_or_else(|| ModelError::Kernel("gradients missing after allocation".into()))?;
        Ok(StepViews {
            backend: &self.backend,
            params: B::view_mut(&mut self.params),
            grads: B::view(grads),
            layout: &self.layout,
            specs: &self.specs,
        })
    }

    /// The flat gradient buffer, writable (collectives average it across ranks in place).
    pub fn grads_view_mut(&mut self) -> Result<B::ViewMut<'_>> {
        self.ensure_grads()?;
        let grads = self
            .grads
            .as_mut()
            .ok_or_else(|| ModelError::Kernel("gradients missing after allocation".into()))?;
        Ok(B::view_mut(grads))
    }

    /// Sets every gradient to zero (reallocating them after [`Gpt::release_training_state`]).
    pub fn zero_grad(&mut self) -> Result<()> {
        self.ensure_grads()?;
        if let Some(g) = self.grads.as_mut() {
            self.backend.fill(B::view_mut(g), 0.0)?;
        }
        Ok(())
    }

    /// Frees gradients and training activations (inference-only use). They come back,
    /// zeroed, on the next training call.
    pub fn release_training_state(&mut self) {
        self.grads = None;
        self.acts = None;
    }

    fn ensure_grads(&mut self) -> Result<()> {
        if self.grads.is_none() {
            self.grads = Some(
                self.backend
                    .alloc(B::len(&B::view(&self.params)), "gradients")?,
            );
        }
        Ok(())
    }

    /// Global L2 norm of the gradients (one read-back); an error names the first tensor whose
    /// norm is not finite.
    pub fn grad_norm(&self) -> Result<f64> {
        let Some(g) = &self.grads else {
            return Ok(0.0);
        };
        let sq = self.backend.sum_squares(B::view(g))?;
        if sq.is_finite() {
            return Ok(sq.sqrt());
        }
        for (slot, spec) in self.layout.iter().zip(&self.specs) {
            let s = self
                .backend
                .sum_squares(B::slice(B::view(g), slot.range()))?;
            if !s.is_finite() {
                return Err(ModelError::NonFinite {
                    what: format!("gradient norm of {}", spec.name),
                    value: s,
                });
            }
        }
        Err(ModelError::NonFinite {
            what: "gradient norm".into(),
            value: sq,
        })
    }

    /// Scales the gradients so their global norm is at most `max_norm` (torch's
    /// `clip_grad_norm_`, with its 1e-6 guard); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            if let Some(g) = self.grads.as_mut() {
                self.backend.scale(B::view_mut(g), coef as f32)?;
            }
        }
        Ok(norm)
    }

    /// The derived weights, brought up to date first if the parameters or the precision
    /// changed.
    pub(crate) fn weights(&self, precision: Precision) -> Result<Weights<'_, B>> {
        {
            let w = self.read_weights()?;
            // A bf16 cache also serves f32 matmuls (it holds everything an f32 one does):
            // sampling at f32 during bf16 training must not rebuild it back and forth.
            let usable =
                w.fresh == Some(precision) || (precision == Precision::F32 && w.fresh.is_some());
            if usable && w.cache.is_some() {
                return Ok(Weights::new(self, w));
            }
        }
        {
            let mut w = self
                .weights
                .write()
                .map_err(|_| ModelError::Kernel("weight cache lock poisoned".into()))?;
            let usable =
                w.fresh == Some(precision) || (precision == Precision::F32 && w.fresh.is_some());
            if !usable || w.cache.is_none() {
                self.backend.update_weight_cache(
                    B::view(&self.params),
                    &self.layout,
                    precision,
                    &mut w.cache,
                )?;
                w.fresh = Some(precision);
            }
        }
        Ok(Weights::new(self, self.read_weights()?))
    }

    fn read_weights(&self) -> Result<RwLockReadGuard<'_, WeightState<B>>> {
        self.weights
            .read()
            .map_err(|_| ModelError::Kernel("weight cache lock poisoned".into()))
    }

    pub(crate) fn check_batch(
        &self,
        idx: &[u32],
        targets: Option<&[i32]>,
        b: usize,
        t: usize,
    ) -> Result<()> {
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

    /// Buffers for a `(b, t)` pass, allocated on the backend (after checking they fit).
    pub(crate) fn new_acts(&self, s: PassShape) -> Result<Box<Acts<B>>> {
        let bytes = crate::plan::activation_bytes(&self.cfg, s);
        if let Some(avail) = self.backend.available_memory() {
            if bytes > avail {
                return Err(ModelError::oom("activation buffers", bytes, Some(avail)));
            }
        }
        let be = &self.backend;
        let mut acts = Activations::build(
            &self.cfg,
            s,
            |what, len| be.alloc(len, what).map_err(ModelError::from),
            |what, len| be.alloc_ints(len, what).map_err(ModelError::from),
        )?;
        let pos: Vec<i32> = (0..s.b * s.t).map(|i| (i % s.t) as i32).collect();
        be.upload_ints(&pos, &mut acts.pos)?;
        Ok(Box::new(acts))
    }

    fn take_acts(&mut self, b: usize, t: usize, with_grad: bool) -> Result<Box<Acts<B>>> {
        match self.acts.take() {
            Some(a) if a.fits(b, t, with_grad) => Ok(a),
            other => {
                drop(other);
                self.new_acts(full_pass(
                    self.backend.kind(),
                    self.cfg.n_layer,
                    b,
                    t,
                    with_grad,
                ))
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
        let n_valid = count_valid(targets)?;
        self.ensure_grads()?;
        let mut acts = self.take_acts(b, t, true)?;
        let result = (|| {
            upload_batch(&self.backend, &mut acts, idx, targets)?;
            let scale = match reduction {
                Reduction::Mean => grad_scale / n_valid as f32,
                Reduction::Sum => grad_scale,
            };
            let mut grads = self
                .grads
                .take()
                .ok_or_else(|| ModelError::Kernel("gradients missing after allocation".into()))?;
            let sum = (|| {
                let w = self.weights(self.precision)?;
                forward::trunk(&w, &mut acts, self.precision)?;
                let sum = forward::head_train(&w, &mut acts, scale, &mut grads, self.precision)?;
                forward::trunk_backward(&w, &mut acts, &mut grads, self.precision)?;
                Ok::<f64, ModelError>(sum)
            })();
            self.grads = Some(grads);
            sum
        })();
        self.acts = Some(acts);
        finish_loss(result?, reduction, n_valid)
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
        let n_valid = count_valid(targets)?;
        let with_grad = self
            .acts
            .as_ref()
            .is_some_and(|a| a.with_grad && a.fits(b, t, false));
        let mut acts = self.take_acts(b, t, with_grad)?;
        let result = (|| {
            upload_batch(&self.backend, &mut acts, idx, targets)?;
            let w = self.weights(self.precision)?;
            forward::trunk(&w, &mut acts, self.precision)?;
            forward::head_eval(&w, &mut acts, b * t, None, self.precision)
        })();
        self.acts = Some(acts);
        finish_loss(result?, reduction, n_valid)
    }

    /// Runs `f` on forward-only buffers for `(b, t)`: the cached ones when the shape matches and
    /// no other call holds them, else fresh ones.
    fn with_eval_acts<R>(
        &self,
        b: usize,
        t: usize,
        f: impl FnOnce(&mut Acts<B>) -> Result<R>,
    ) -> Result<R> {
        let cached = self
            .eval_acts
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .filter(|a| a.fits(b, t, false) && !a.with_grad);
        let mut acts = match cached {
            Some(a) => a,
            None => self.new_acts(full_pass(
                self.backend.kind(),
                self.cfg.n_layer,
                b,
                t,
                false,
            ))?,
        };
        let out = f(&mut acts);
        if let Ok(mut slot) = self.eval_acts.lock() {
            *slot = Some(acts);
        }
        out
    }

    /// Softcapped logits `[b, t, vocab_size]` for a batch (no cache, no gradients).
    pub fn logits(&self, idx: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        self.check_batch(idx, None, b, t)?;
        self.with_eval_acts(b, t, |acts| {
            upload_batch(&self.backend, acts, idx, &[])?;
            let w = self.weights(self.precision)?;
            forward::trunk(&w, acts, self.precision)?;
            let mut out = vec![0.0; b * t * self.cfg.vocab_size];
            forward::head_eval(&w, acts, b * t, Some(&mut out), self.precision)?;
            Ok(out)
        })
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
        self.with_eval_acts(b, t, |acts| {
            upload_batch(&self.backend, acts, idx, &[])?;
            let w = self.weights(self.precision)?;
            forward::trunk(&w, acts, self.precision)?;
            // The selected rows of the final hidden state move to the front of `xf` (positions
            // are strictly increasing, so row i is read before any row at or after it is
            // written), through the targets buffer as the index list.
            let sel: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
            forward::select_rows(&w, acts, &sel)?;
            let mut out = vec![0.0; positions.len() * self.cfg.vocab_size];
            forward::head_eval(&w, acts, positions.len(), Some(&mut out), self.precision)?;
            Ok(out)
        })
    }
}

/// The buffers of a full-sequence pass over every layer.
pub(crate) fn full_pass(
    device: DeviceKind,
    layers: usize,
    b: usize,
    t: usize,
    with_grad: bool,
) -> PassShape {
    PassShape {
        b,
        t,
        layers,
        with_grad,
        causal: true,
        device,
    }
}

fn count_valid(targets: &[i32]) -> Result<usize> {
    let n = targets.iter().filter(|&&x| x >= 0).count();
    if n == 0 {
        return Err(ModelError::InvalidInput(
            "every target is -1 (ignored): the loss is undefined".into(),
        ));
    }
    Ok(n)
}

/// Uploads token ids and targets (`[]`: every target ignored) into a pass's int buffers.
pub(crate) fn upload_batch<B: Backend>(
    backend: &B,
    acts: &mut Acts<B>,
    idx: &[u32],
    targets: &[i32],
) -> Result<()> {
    let ids: Vec<i32> = idx.iter().map(|&x| x as i32).collect();
    backend.upload_ints(&ids, &mut acts.idx)?;
    if targets.is_empty() {
        backend.upload_ints(&vec![-1; idx.len()], &mut acts.targets)?;
    } else {
        backend.upload_ints(targets, &mut acts.targets)?;
    }
    Ok(())
}

fn finish_loss(sum: f64, reduction: Reduction, n_valid: usize) -> Result<f32> {
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
