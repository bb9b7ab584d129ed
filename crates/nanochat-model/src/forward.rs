//! The passes, written once against [`Backend`]: the transformer block (shared by training,
//! full-sequence evaluation and KV-cached decoding), the fused lm_head + softcapped
//! cross-entropy, and the backward pass.

use std::sync::RwLockReadGuard;

use nanochat_compute::{AttnShape, Backend, DecodeShape, Precision, WeightRef};

use crate::error::{ModelError, Result};
use crate::model::{Gpt, WeightState};
use crate::params::{layer_param, lm_head_index, FC, K, MLP_PROJ, PROJ, Q, V, WTE};
use crate::plan::{Activations, LayerActs};

/// A model's parameters with their derived forms, ready for a pass.
pub(crate) struct Weights<'a, B: Backend> {
    pub(crate) model: &'a Gpt<B>,
    guard: RwLockReadGuard<'a, WeightState<B>>,
}

impl<'a, B: Backend> Weights<'a, B> {
    pub(crate) fn new(model: &'a Gpt<B>, guard: RwLockReadGuard<'a, WeightState<B>>) -> Self {
        Weights { model, guard }
    }

    fn be(&self) -> &'a B {
        &self.model.backend
    }

    /// Parameter `i` as a linear layer.
    fn w(&self, i: usize) -> Result<WeightRef<'_, B>> {
        let cache = self
            .guard
            .cache
            .as_ref()
            .ok_or_else(|| ModelError::Kernel("weight cache missing".into()))?;
        Ok(WeightRef {
            params: B::view(&self.model.params),
            cache,
            index: i,
            slot: self.model.layout[i],
        })
    }

    /// Parameter `i`'s raw values.
    fn raw(&self, i: usize) -> B::View<'a> {
        B::slice(B::view(&self.model.params), self.model.layout[i].range())
    }
}

/// The first `len` elements of a buffer.
fn v<B: Backend>(buf: &B::Buf, len: usize) -> B::View<'_> {
    B::slice(B::view(buf), 0..len)
}

/// The first `len` elements of a buffer, writable.
fn vm<B: Backend>(buf: &mut B::Buf, len: usize) -> B::ViewMut<'_> {
    B::slice_mut(B::view_mut(buf), 0..len)
}

/// The first `len` ints of a buffer.
fn iv<B: Backend>(buf: &B::IBuf, len: usize) -> B::IView<'_> {
    B::islice(B::iview(buf), 0..len)
}

/// The gradient range of one parameter, writable.
fn grad_of<B: Backend>(grads: &mut B::Buf, range: std::ops::Range<usize>) -> B::ViewMut<'_> {
    B::slice_mut(B::view_mut(grads), range)
}

/// How a block's attention sees the past.
pub(crate) enum Attn<'a, B: Backend> {
    /// Full causal attention over the pass's own `(b, t)` tokens, saving the log-sum-exp.
    Causal(AttnShape),
    /// New tokens against one layer of a KV cache: their keys and values are written at
    /// `kv_index` (`row·capacity + position`), then each attends to its row's prefix.
    Cached {
        shape: DecodeShape,
        k_cache: B::ViewMut<'a>,
        v_cache: B::ViewMut<'a>,
        kv_index: B::IView<'a>,
        rows: B::IView<'a>,
    },
}

/// One transformer block on `n` tokens: `x += attn(norm(x))`, `x += mlp(norm(x))`, keeping in
/// `la` what the backward pass needs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block<B: Backend>(
    w: &Weights<'_, B>,
    l: usize,
    x: &mut B::Buf,
    la: &mut LayerActs<B::Buf>,
    n: usize,
    pos: B::IView<'_>,
    attn: Attn<'_, B>,
    prec: Precision,
) -> Result<()> {
    let be = w.be();
    let m = w.model;
    let cfg = &m.cfg;
    let (c, d, h, hk) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
    let (kd, f) = (hk * d, 4 * c);
    be.rmsnorm(
        v::<B>(x, n * c),
        vm::<B>(&mut la.xn1, n * c),
        vm::<B>(&mut la.rstd1, n),
        c,
    )?;
    let xn1 = v::<B>(&la.xn1, n * c);
    // One call for the three projections of the same input (the CPU fuses them when decoding).
    be.linear3(
        [
            w.w(layer_param(l, Q))?,
            w.w(layer_param(l, K))?,
            w.w(layer_param(l, V))?,
        ],
        xn1,
        [
            vm::<B>(&mut la.q, n * c),
            vm::<B>(&mut la.k, n * kd),
            vm::<B>(&mut la.v, n * kd),
        ],
        n,
        prec,
    )?;
    let (cos, sin) = (B::view(&m.rope_cos), B::view(&m.rope_sin));
    be.rope(vm::<B>(&mut la.q, n * c), h, d, pos, cos, sin, false)?;
    be.rope(vm::<B>(&mut la.k, n * kd), hk, d, pos, cos, sin, false)?;
    be.rmsnorm_inplace(vm::<B>(&mut la.q, n * c), vm::<B>(&mut la.rstd_q, n * h), d)?;
    be.rmsnorm_inplace(
        vm::<B>(&mut la.k, n * kd),
        vm::<B>(&mut la.rstd_k, n * hk),
        d,
    )?;
    let (q, k, val) = (
        v::<B>(&la.q, n * c),
        v::<B>(&la.k, n * kd),
        v::<B>(&la.v, n * kd),
    );
    match attn {
        Attn::Causal(shape) => be.attention(
            shape,
            q,
            k,
            val,
            vm::<B>(&mut la.yatt, n * c),
            vm::<B>(&mut la.lse, n * h),
        )?,
        Attn::Cached {
            shape,
            mut k_cache,
            mut v_cache,
            kv_index,
            rows,
        } => {
            be.scatter_rows(k, kd, kv_index, B::reborrow(&mut k_cache))?;
            be.scatter_rows(val, kd, kv_index, B::reborrow(&mut v_cache))?;
            be.attention_decode(
                shape,
                q,
                pos,
                rows,
                B::as_view(&k_cache),
                B::as_view(&v_cache),
                vm::<B>(&mut la.yatt, n * c),
            )?
        }
    }
    let proj = w.w(layer_param(l, PROJ))?;
    be.linear(
        proj,
        v::<B>(&la.yatt, n * c),
        vm::<B>(x, n * c),
        n,
        true,
        prec,
    )?;
    be.rmsnorm(
        v::<B>(x, n * c),
        vm::<B>(&mut la.xn2, n * c),
        vm::<B>(&mut la.rstd2, n),
        c,
    )?;
    let fc = w.w(layer_param(l, FC))?;
    be.linear(
        fc,
        v::<B>(&la.xn2, n * c),
        vm::<B>(&mut la.hpre, n * f),
        n,
        false,
        prec,
    )?;
    be.relu2(v::<B>(&la.hpre, n * f), vm::<B>(&mut la.act, n * f))?;
    let mlp = w.w(layer_param(l, MLP_PROJ))?;
    be.linear(
        mlp,
        v::<B>(&la.act, n * f),
        vm::<B>(x, n * c),
        n,
        true,
        prec,
    )?;
    Ok(())
}

/// Embedding → norm, the input of the first block: `x = xn0 = norm(wte[idx])`.
pub(crate) fn embed<B: Backend>(
    w: &Weights<'_, B>,
    idx: B::IView<'_>,
    x: &mut B::Buf,
    xn0: &mut B::Buf,
    rstd0: &mut B::Buf,
    n: usize,
) -> Result<()> {
    let be = w.be();
    let c = w.model.cfg.n_embd;
    be.gather_rows(w.raw(WTE), c, idx, vm::<B>(x, n * c))?;
    be.rmsnorm(v::<B>(x, n * c), vm::<B>(xn0, n * c), vm::<B>(rstd0, n), c)?;
    be.copy(v::<B>(xn0, n * c), vm::<B>(x, n * c))?;
    Ok(())
}

/// Embedding → norm → blocks → final norm over a whole `(b, t)` batch, saving what the
/// backward pass needs.
pub(crate) fn trunk<B: Backend>(
    w: &Weights<'_, B>,
    a: &mut Activations<B::Buf, B::IBuf>,
    prec: Precision,
) -> Result<()> {
    let cfg = &w.model.cfg;
    let (b, t) = (a.b, a.t);
    let n = b * t;
    let c = cfg.n_embd;
    embed(w, iv::<B>(&a.idx, n), &mut a.x, &mut a.xn0, &mut a.rstd0, n)?;
    let shape = AttnShape {
        b,
        t,
        h: cfg.n_head,
        hk: cfg.n_kv_head,
        d: cfg.head_dim(),
        precision: prec,
    };
    let pos = iv::<B>(&a.pos, n);
    for (l, la) in a.layers.iter_mut().enumerate() {
        block(w, l, &mut a.x, la, n, pos, Attn::Causal(shape), prec)?;
    }
    w.be().rmsnorm(
        v::<B>(&a.x, n * c),
        vm::<B>(&mut a.xf, n * c),
        vm::<B>(&mut a.rstdf, n),
        c,
    )?;
    Ok(())
}

/// Moves rows `sel` (strictly increasing) of `a.xf` to its front (through `a.xn0`, with
/// `a.idx` as the index buffer: both are free once the trunk has run).
pub(crate) fn select_rows<B: Backend>(
    w: &Weights<'_, B>,
    a: &mut Activations<B::Buf, B::IBuf>,
    sel: &[i32],
) -> Result<()> {
    let be = w.be();
    let c = w.model.cfg.n_embd;
    let k = sel.len();
    if k == 0 {
        return Ok(());
    }
    be.upload_ints(sel, &mut a.idx)?;
    let n = a.b * a.t;
    be.gather_rows(
        v::<B>(&a.xf, n * c),
        c,
        iv::<B>(&a.idx, k),
        vm::<B>(&mut a.xn0, k * c),
    )?;
    be.copy(v::<B>(&a.xn0, k * c), vm::<B>(&mut a.xf, k * c))?;
    Ok(())
}

/// lm_head + softcap over the first `n` rows of `a.xf`, chunked over rows so the full logits
/// matrix never exists; the loss against `a.targets` (rows with target -1 count 0). With
/// `out`, the capped logits `[n, vocab]` are copied there.
pub(crate) fn head_eval<B: Backend>(
    w: &Weights<'_, B>,
    a: &mut Activations<B::Buf, B::IBuf>,
    n: usize,
    mut out: Option<&mut [f32]>,
    prec: Precision,
) -> Result<f64> {
    let be = w.be();
    let cfg = &w.model.cfg;
    let (c, vocab, vp) = (cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size());
    let lm = w.w(lm_head_index(cfg))?;
    let chunk = a.logit_rows;
    for r0 in (0..n).step_by(chunk) {
        let r1 = (r0 + chunk).min(n);
        let rc = r1 - r0;
        let xf = B::slice(B::view(&a.xf), r0 * c..r1 * c);
        be.linear(lm, xf, vm::<B>(&mut a.logits, rc * vp), rc, false, prec)?;
        be.softcap_ce(
            vm::<B>(&mut a.logits, rc * vp),
            rc,
            vocab,
            vp,
            B::islice(B::iview(&a.targets), r0..r1),
            cfg.softcap,
            None,
            B::slice_mut(B::view_mut(&mut a.losses), r0..r1),
        )?;
        if let Some(o) = out.as_deref_mut() {
            download_rows(
                be,
                v::<B>(&a.logits, rc * vp),
                vp,
                vocab,
                &mut o[r0 * vocab..r1 * vocab],
            )?;
        }
    }
    Ok(be.sum(v::<B>(&a.losses, n))?)
}

/// Copies `dst.len() / width` rows of `width` from a device matrix of row stride `stride`.
fn download_rows<B: Backend>(
    be: &B,
    src: B::View<'_>,
    stride: usize,
    width: usize,
    dst: &mut [f32],
) -> Result<()> {
    if stride == width {
        return Ok(be.download(src, dst)?);
    }
    be.download_rows(src, stride, width, dst)?;
    Ok(())
}

/// The training head: lm_head + softcap + cross-entropy over all rows, fused and chunked, with
/// `grad_scale`·d loss: writes d loss/d xf into `dxn` and adds the lm_head gradient. Returns
/// the summed loss over non-ignored targets.
pub(crate) fn head_train<B: Backend>(
    w: &Weights<'_, B>,
    a: &mut Activations<B::Buf, B::IBuf>,
    grad_scale: f32,
    grads: &mut B::Buf,
    prec: Precision,
) -> Result<f64> {
    let be = w.be();
    let cfg = &w.model.cfg;
    let (c, vocab, vp) = (cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size());
    let n = a.b * a.t;
    let lmi = lm_head_index(cfg);
    let lm = w.w(lmi)?;
    let lm_range = w.model.layout[lmi].range();
    let g = a
        .grad
        .as_mut()
        .ok_or_else(|| ModelError::Kernel("training pass without gradient buffers".into()))?;
    let chunk = a.logit_rows;
    for r0 in (0..n).step_by(chunk) {
        let r1 = (r0 + chunk).min(n);
        let rc = r1 - r0;
        let xf = B::slice(B::view(&a.xf), r0 * c..r1 * c);
        be.linear(lm, xf, vm::<B>(&mut a.logits, rc * vp), rc, false, prec)?;
        be.softcap_ce(
            vm::<B>(&mut a.logits, rc * vp),
            rc,
            vocab,
            vp,
            B::islice(B::iview(&a.targets), r0..r1),
            cfg.softcap,
            Some(grad_scale),
            B::slice_mut(B::view_mut(&mut a.losses), r0..r1),
        )?;
        let dlogits = v::<B>(&a.logits, rc * vp);
        let dxn = B::slice_mut(B::view_mut(&mut g.dxn), r0 * c..r1 * c);
        be.linear_bwd_input(lm, dlogits, dxn, rc, false, prec)?;
        let dlm = B::slice_mut(B::view_mut(grads), lm_range.clone());
        be.linear_bwd_weight(dlogits, xf, dlm, rc, vp, c, prec)?;
    }
    Ok(be.sum(v::<B>(&a.losses, n))?)
}

/// Backward through the blocks and the embedding, from `dxn` = d loss/d xf, adding every
/// parameter's gradient into `grads`.
pub(crate) fn trunk_backward<B: Backend>(
    w: &Weights<'_, B>,
    a: &mut Activations<B::Buf, B::IBuf>,
    grads: &mut B::Buf,
    prec: Precision,
) -> Result<()> {
    let be = w.be();
    let m = w.model;
    let cfg = &m.cfg;
    let (b, t) = (a.b, a.t);
    let n = b * t;
    let (c, d, h, hk) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
    let (kd, f) = (hk * d, 4 * c);
    let shape = AttnShape {
        b,
        t,
        h,
        hk,
        d,
        precision: prec,
    };
    let g = a
        .grad
        .as_mut()
        .ok_or_else(|| ModelError::Kernel("training pass without gradient buffers".into()))?;
    let (cos, sin) = (B::view(&m.rope_cos), B::view(&m.rope_sin));
    let pos = iv::<B>(&a.pos, n);
    be.rmsnorm_bwd(
        v::<B>(&g.dxn, n * c),
        v::<B>(&a.xf, n * c),
        v::<B>(&a.rstdf, n),
        vm::<B>(&mut g.dx, n * c),
        c,
        false,
    )?;
    for l in (0..cfg.n_layer).rev() {
        let la = &a.layers[l];
        // MLP: x += relu(xn2·Wfcᵀ)²·Wprojᵀ
        let (ip, ifc) = (layer_param(l, MLP_PROJ), layer_param(l, FC));
        let dx = v::<B>(&g.dx, n * c);
        be.linear_bwd_input(w.w(ip)?, dx, vm::<B>(&mut g.dh, n * f), n, false, prec)?;
        be.linear_bwd_weight(
            dx,
            v::<B>(&la.act, n * f),
            grad_of::<B>(grads, m.layout[ip].range()),
            n,
            c,
            f,
            prec,
        )?;
        be.relu2_bwd(vm::<B>(&mut g.dh, n * f), v::<B>(&la.hpre, n * f))?;
        let dh = v::<B>(&g.dh, n * f);
        be.linear_bwd_input(w.w(ifc)?, dh, vm::<B>(&mut g.dxn, n * c), n, false, prec)?;
        be.linear_bwd_weight(
            dh,
            v::<B>(&la.xn2, n * c),
            grad_of::<B>(grads, m.layout[ifc].range()),
            n,
            f,
            c,
            prec,
        )?;
        be.rmsnorm_bwd(
            v::<B>(&g.dxn, n * c),
            v::<B>(&la.xn2, n * c),
            v::<B>(&la.rstd2, n),
            vm::<B>(&mut g.dx, n * c),
            c,
            true,
        )?;
        // Attention: x += attn(q, k, v)·Wprojᵀ
        let ipr = layer_param(l, PROJ);
        let dx = v::<B>(&g.dx, n * c);
        be.linear_bwd_input(w.w(ipr)?, dx, vm::<B>(&mut g.dya, n * c), n, false, prec)?;
        be.linear_bwd_weight(
            dx,
            v::<B>(&la.yatt, n * c),
            grad_of::<B>(grads, m.layout[ipr].range()),
            n,
            c,
            c,
            prec,
        )?;
        be.attention_bwd(
            shape,
            v::<B>(&la.q, n * c),
            v::<B>(&la.k, n * kd),
            v::<B>(&la.v, n * kd),
            v::<B>(&la.yatt, n * c),
            v::<B>(&la.lse, n * h),
            v::<B>(&g.dya, n * c),
            vm::<B>(&mut g.dq, n * c),
            vm::<B>(&mut g.dk, n * kd),
            vm::<B>(&mut g.dv, n * kd),
        )?;
        be.rmsnorm_bwd_inplace(
            vm::<B>(&mut g.dq, n * c),
            v::<B>(&la.q, n * c),
            v::<B>(&la.rstd_q, n * h),
            d,
        )?;
        be.rmsnorm_bwd_inplace(
            vm::<B>(&mut g.dk, n * kd),
            v::<B>(&la.k, n * kd),
            v::<B>(&la.rstd_k, n * hk),
            d,
        )?;
        be.rope(vm::<B>(&mut g.dq, n * c), h, d, pos, cos, sin, true)?;
        be.rope(vm::<B>(&mut g.dk, n * kd), hk, d, pos, cos, sin, true)?;
        let (iq, ik, iv_) = (layer_param(l, Q), layer_param(l, K), layer_param(l, V));
        let (dq, dk, dv) = (
            v::<B>(&g.dq, n * c),
            v::<B>(&g.dk, n * kd),
            v::<B>(&g.dv, n * kd),
        );
        be.linear_bwd_input(w.w(iq)?, dq, vm::<B>(&mut g.dxn, n * c), n, false, prec)?;
        be.linear_bwd_input(w.w(ik)?, dk, vm::<B>(&mut g.dxn, n * c), n, true, prec)?;
        be.linear_bwd_input(w.w(iv_)?, dv, vm::<B>(&mut g.dxn, n * c), n, true, prec)?;
        let xn1 = v::<B>(&la.xn1, n * c);
        be.linear_bwd_weight(
            dq,
            xn1,
            grad_of::<B>(grads, m.layout[iq].range()),
            n,
            c,
            c,
            prec,
        )?;
        be.linear_bwd_weight(
            dk,
            xn1,
            grad_of::<B>(grads, m.layout[ik].range()),
            n,
            kd,
            c,
            prec,
        )?;
        be.linear_bwd_weight(
            dv,
            xn1,
            grad_of::<B>(grads, m.layout[iv_].range()),
            n,
            kd,
            c,
            prec,
        )?;
        be.rmsnorm_bwd(
            v::<B>(&g.dxn, n * c),
            v::<B>(&la.xn1, n * c),
            v::<B>(&la.rstd1, n),
            vm::<B>(&mut g.dx, n * c),
            c,
            true,
        )?;
    }
    be.rmsnorm_bwd(
        v::<B>(&g.dx, n * c),
        v::<B>(&a.xn0, n * c),
        v::<B>(&a.rstd0, n),
        vm::<B>(&mut g.dxn, n * c),
        c,
        false,
    )?;
    be.scatter_add_rows(
        v::<B>(&g.dxn, n * c),
        c,
        iv::<B>(&a.idx, n),
        grad_of::<B>(grads, m.layout[WTE].range()),
    )?;
    Ok(())
}
