//! The model's fused element-wise and attention operators (forward and backward).
//!
//! Layouts: activations are `[tokens, features]` row-major; attention heads sit side by side in
//! the feature dimension (`[B, T, H, D]`), as the projections produce them, so no transposes.

use rayon::prelude::*;

use super::bf16::{gemm_bf16_with, GemmOpts, Op};
use super::kernels::{
    axpy_generic, dot, dot_generic, fast_exp, gemm_acc, gemm_set, has_avx2, max_lanes, sum_lanes,
    transpose,
};
pub(crate) use crate::backend::AttnShape;
use crate::error::Result;
use crate::Precision as MatmulPrecision;

/// `F.rms_norm`'s default epsilon for float32 inputs.
pub(crate) const RMS_EPS: f32 = f32::EPSILON;

/// Rows per rayon task for cheap row-wise loops.
const ROWS_PER_TASK: usize = 32;

/// `y = x / rms(x)` per row of length `dim`; `rstd` receives `1/rms`.
pub(crate) fn rmsnorm_fwd(x: &[f32], y: &mut [f32], rstd: &mut [f32], dim: usize) {
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter_mut())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((yr, xr), r)| {
            let s = 1.0 / (dot(xr, xr) / dim as f32 + RMS_EPS).sqrt();
            *r = s;
            for (a, b) in yr.iter_mut().zip(xr) {
                *a = b * s;
            }
        });
}

/// In-place variant of [`rmsnorm_fwd`] (per-head QK norm).
pub(crate) fn rmsnorm_inplace(x: &mut [f32], rstd: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim)
        .zip(rstd.par_iter_mut())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(xr, r)| {
            let s = 1.0 / (dot(xr, xr) / dim as f32 + RMS_EPS).sqrt();
            *r = s;
            xr.iter_mut().for_each(|a| *a *= s);
        });
}

/// Backward of the parameter-free RMSNorm: `dx (+)= rstd·(dy − y·mean(dy∘y))`, from the
/// normalized output `y` and `rstd` saved by the forward pass.
pub(crate) fn rmsnorm_bwd(
    dy: &[f32],
    y: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dim: usize,
    accumulate: bool,
) {
    dx.par_chunks_mut(dim)
        .zip(dy.par_chunks(dim).zip(y.par_chunks(dim)))
        .zip(rstd.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((dxr, (dyr, yr)), &r)| {
            let m = dot(dyr, yr) / dim as f32;
            if accumulate {
                for ((o, &g), &yy) in dxr.iter_mut().zip(dyr).zip(yr) {
                    *o += r * (g - yy * m);
                }
            } else {
                for ((o, &g), &yy) in dxr.iter_mut().zip(dyr).zip(yr) {
                    *o = r * (g - yy * m);
                }
            }
        });
}

/// Rotates every head of every token in place (`cos`/`sin`: `[positions, head_dim/2]`);
/// `inverse` applies the transpose rotation (which is the backward pass, rotations being
/// orthogonal).
pub(crate) fn rope_apply(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[i32],
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(heads * head_dim)
        .zip(positions.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, &p)| {
            let p = p as usize;
            let c = &cos[p * half..(p + 1) * half];
            let s = &sin[p * half..(p + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    let si = sign * s[i];
                    x1[i] = a * c[i] + b * si;
                    x2[i] = b * c[i] - a * si;
                }
            }
        });
}

/// A raw pointer that rayon tasks may share when each writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used where tasks write provably disjoint index sets (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    /// SAFETY: caller guarantees `[off, off+len)` is in bounds and not aliased by another task.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, off: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// One GEMM of a single attention task in bf16: `c (+)= op(a)·op(b)`, serial (the task is
/// already one of a parallel loop over heads), transposes folded into the packing.
#[allow(clippy::too_many_arguments)]
fn head_gemm_bf16(
    (op_a, op_b): (Op, Op),
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let opts = GemmOpts {
        accumulate,
        parallel: false,
    };
    gemm_bf16_with(op_a, op_b, m, n, k, a, b, c, opts)
}

/// One query against `n_keys` keys/values (rows `j*stride` of `k`, `v`): writes the attention
/// output into `out` and returns the log-sum-exp of the scaled scores. Max-subtracted softmax:
/// no overflow for any finite input.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n_keys: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) -> f32 {
    let d = q.len();
    let scores = &mut scores[..n_keys];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot_generic(q, &k[j * stride..j * stride + d]) * scale;
    }
    let m = max_lanes(scores);
    for s in scores.iter_mut() {
        *s = fast_exp(*s - m);
    }
    let sum = sum_lanes(scores);
    out.fill(0.0);
    let inv = 1.0 / sum;
    for (j, &p) in scores.iter().enumerate() {
        axpy_generic(p * inv, &v[j * stride..j * stride + d], out);
    }
    m + sum.ln()
}

/// Causal self-attention over a full batch. `q`, `y`: `[B, T, H, D]`; `k`, `v`: `[B, T, Hk, D]`;
/// `lse`: `[B, H, T]` (saved for the backward pass instead of the T×T probabilities).
///
/// Fused per (batch, kv-head group), parallel over groups: each head's scores `Q·Kᵀ` and output
/// `P·V` are GEMMs on gathered contiguous copies, in causal blocks of query rows (rows
/// `i0..i1` against keys `0..i1`, so most of the masked upper triangle is never computed), with
/// a max-subtracted softmax in between. Probabilities live only in per-task scratch.
pub(crate) fn attention_fwd(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let (yp, lp) = (SharedMut(y.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    (0..s.b * s.hk).into_par_iter().try_for_each(|task| {
        // SAFETY: task (b, g) writes y[b, :, h, :] and lse[b, h, :] only for the query heads h
        // of kv group g; distinct tasks touch disjoint elements.
        unsafe { attn_fwd_task(s, task, q, k, v, yp, lp) }
    })
}

/// Copies head `head` of rows `b*T..(b+1)*T` of a `[B, T, heads, D]` tensor into `[T, D]`.
fn gather_head(x: &[f32], s: AttnShape, heads: usize, b: usize, head: usize, out: &mut [f32]) {
    let d = s.d;
    for (t, o) in out.chunks_exact_mut(d).enumerate() {
        let off = ((b * s.t + t) * heads + head) * d;
        o.copy_from_slice(&x[off..off + d]);
    }
}

/// Row-wise causal softmax of `scores` (rows of `n_keys` raw `Q·Kᵀ` scores for the queries at
/// positions `row0, row0 + 1, ...`; query `i` sees keys `0..=i`) in place with `scale`; fills
/// `lse` (indexed by row) when given, or uses it (backward: `p = exp(s·scale − lse)`).
fn causal_softmax_rows(
    scores: &mut [f32],
    n_keys: usize,
    row0: usize,
    scale: f32,
    lse_out: Option<&mut [f32]>,
    lse_in: Option<&[f32]>,
) {
    let run = |scores: &mut [f32], lse_out: Option<&mut [f32]>| {
        let mut lse_out = lse_out;
        for (i, row) in scores.chunks_exact_mut(n_keys).enumerate() {
            let (live, masked) = row.split_at_mut(row0 + i + 1);
            masked.fill(0.0);
            match lse_in {
                Some(l) => {
                    let li = l[i];
                    for x in live.iter_mut() {
                        *x = fast_exp(*x * scale - li);
                    }
                }
                None => {
                    for x in live.iter_mut() {
                        *x *= scale;
                    }
                    let m = max_lanes(live);
                    for x in live.iter_mut() {
                        *x = fast_exp(*x - m);
                    }
                    let sum = sum_lanes(live);
                    let inv = 1.0 / sum;
                    for x in live.iter_mut() {
                        *x *= inv;
                    }
                    if let Some(lo) = lse_out.as_deref_mut() {
                        lo[i] = m + sum.ln();
                    }
                }
            }
        }
    };
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn go(f: impl FnOnce()) {
            f()
        }
        // SAFETY: AVX2+FMA present. (The closure is inlined into the feature-enabled frame.)
        unsafe { go(|| run(scores, lse_out)) };
        return;
    }
    run(scores, lse_out)
}

unsafe fn attn_fwd_task(
    s: AttnShape,
    task: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: SharedMut,
    lse: SharedMut,
) -> Result<()> {
    let (b, g) = (task / s.hk, task % s.hk);
    let (t, d) = (s.t, s.d);
    with_task_scratch(5 * t * d + t * t, |buf| {
        let (heads, sc) = buf.split_at_mut(5 * t * d);
        let [kh, kt, vh, qh, yh] = carve(heads, t * d);
        attn_fwd_heads(s, b, g, (q, k, v), (kh, kt, vh, qh, yh, sc), y, lse)
    })
}

/// Body of [`attn_fwd_task`] over caller-provided scratch (every slice is overwritten).
#[allow(clippy::type_complexity)]
unsafe fn attn_fwd_heads(
    s: AttnShape,
    b: usize,
    g: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (kh, kt, vh, qh, yh, sc): (
        &mut [f32],
        &mut [f32],
        &mut [f32],
        &mut [f32],
        &mut [f32],
        &mut [f32],
    ),
    y: SharedMut,
    lse: SharedMut,
) -> Result<()> {
    let (t, d) = (s.t, s.d);
    let rep = s.h / s.hk;
    let scale = 1.0 / (d as f32).sqrt();
    gather_head(k, s, s.hk, b, g, kh);
    gather_head(v, s, s.hk, b, g, vh);
    // Causal blocks: query rows i0..i1 only need keys 0..i1, so the masked upper triangle is
    // skipped block by block (5/8 of the square at 4 blocks) instead of computed and discarded.
    // bf16 folds `Kᵀ` into its packing; trueno's f32 GEMM wants it as a contiguous `[D, keys]`
    // operand, so each block transposes its key prefix (O(keys·D) against O(rows·keys·D)).
    let bf16 = s.precision == MatmulPrecision::Bf16;
    let blk = causal_block_rows(t);
    for h in g * rep..(g + 1) * rep {
        gather_head(q, s, s.h, b, h, qh);
        let lrow = lse.slice((b * s.h + h) * t, t);
        for i0 in (0..t).step_by(blk) {
            let i1 = (i0 + blk).min(t);
            let (m, nk) = (i1 - i0, i1);
            let sc = &mut sc[..m * nk];
            let (qb, kb, vb) = (&qh[i0 * d..i1 * d], &kh[..nk * d], &vh[..nk * d]);
            let yb = &mut yh[i0 * d..i1 * d];
            if bf16 {
                head_gemm_bf16((Op::N, Op::T), m, nk, d, qb, kb, sc, false)?;
            } else {
                let ktb = &mut kt[..nk * d];
                transpose(nk, d, kb, ktb);
                gemm_set(m, nk, d, qb, ktb, sc)?;
            }
            causal_softmax_rows(sc, nk, i0, scale, Some(&mut lrow[i0..i1]), None);
            if bf16 {
                head_gemm_bf16((Op::N, Op::N), m, d, nk, sc, vb, yb, false)?;
            } else {
                gemm_set(m, d, nk, sc, vb, yb)?;
            }
        }
        scatter_head(yh, s, b, h, y);
    }
    Ok(())
}

/// `dS = P∘(dP − rowdot(dY, Y))·scale` in place of `dp` (rows of `n_keys`; `dy`, `y`: the
/// rows' `[rows, D]` output gradients and outputs). Masked entries have `p = 0` and vanish.
fn softmax_grad_rows(dp: &mut [f32], p: &[f32], n_keys: usize, dy: &[f32], y: &[f32], scale: f32) {
    let d = dy.len() / (dp.len() / n_keys).max(1);
    for (i, (dpr, pr)) in dp
        .chunks_exact_mut(n_keys)
        .zip(p.chunks_exact(n_keys))
        .enumerate()
    {
        let delta = dot(&dy[i * d..(i + 1) * d], &y[i * d..(i + 1) * d]);
        for (x, &pp) in dpr.iter_mut().zip(pr) {
            *x = pp * (*x - delta) * scale;
        }
    }
}

/// Rows of a causal block of the bf16 attention: about a quarter of the sequence (the GEMMs
/// stay large enough for the micro-kernel), at least one micro-tile's worth.
fn causal_block_rows(t: usize) -> usize {
    t.div_ceil(4).max(32)
}

/// Writes `[T, D]` rows back into head `h` of rows `b*T..(b+1)*T` of a `[B, T, H, D]` tensor.
///
/// # Safety
/// The caller owns those elements of `y` (one task per head).
unsafe fn scatter_head(rows: &[f32], s: AttnShape, b: usize, h: usize, y: SharedMut) {
    let (t, d) = (s.t, s.d);
    for (tt, row) in rows.chunks_exact(d).enumerate().take(t) {
        y.slice(((b * t + tt) * s.h + h) * d, d)
            .copy_from_slice(row);
    }
}

/// Backward of [`attention_fwd`]: writes `dq` and `dk`, `dv` (overwritten, not accumulated),
/// recomputing the probabilities from `lse` (O(T) saved state per head), with GEMMs:
/// `dP = dY·Vᵀ`, `dS = P∘(dP − rowdot(dY, Y))`, `dQ = dS·K`, `dK = dSᵀ·Q`, `dV = Pᵀ·dY`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: &[f32],
    lse: &[f32],
    dy: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    let ptrs = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    let inputs = (q, k, v, y, lse, dy);
    (0..s.b * s.hk).into_par_iter().try_for_each(|task| {
        // SAFETY: task (b, g) writes dq[b, :, h, :] for the heads of group g and dk[b, :, g, :],
        // dv[b, :, g, :]; disjoint across tasks.
        unsafe { attn_bwd_task(s, task, inputs, ptrs) }
    })
}

type BwdInputs<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

unsafe fn attn_bwd_task(
    s: AttnShape,
    task: usize,
    (q, k, v, y, lse, dy): BwdInputs<'_>,
    (dqp, dkp, dvp): (SharedMut, SharedMut, SharedMut),
) -> Result<()> {
    let (b, g) = (task / s.hk, task % s.hk);
    let (t, d) = (s.t, s.d);
    let rep = s.h / s.hk;
    let scale = 1.0 / (d as f32).sqrt();
    with_task_scratch(10 * t * d + 3 * t * t, |buf| {
        let (heads, squares) = buf.split_at_mut(10 * t * d);
        let [kh, kt, vh, vt, qh, dyh, yh, dqh, dkg, dvg] = carve(heads, t * d);
        let [p, dp, tt] = carve(squares, t * t);
        // The scratch is reused: the two accumulators must start at zero.
        dkg.fill(0.0);
        dvg.fill(0.0);
        gather_head(k, s, s.hk, b, g, kh);
        gather_head(v, s, s.hk, b, g, vh);
        let bf16 = s.precision == MatmulPrecision::Bf16;
        if !bf16 {
            transpose(t, d, kh, kt);
            transpose(t, d, vh, vt);
        }
        for h in g * rep..(g + 1) * rep {
            gather_head(q, s, s.h, b, h, qh);
            gather_head(dy, s, s.h, b, h, dyh);
            gather_head(y, s, s.h, b, h, yh);
            let lrow = &lse[(b * s.h + h) * t..(b * s.h + h + 1) * t];
            if bf16 {
                // The forward pass's causal blocks: rows i0..i1 against keys 0..i1.
                let blk = causal_block_rows(t);
                for i0 in (0..t).step_by(blk) {
                    let i1 = (i0 + blk).min(t);
                    let (m, nk) = (i1 - i0, i1);
                    let (p, dp) = (&mut p[..m * nk], &mut dp[..m * nk]);
                    let (qb, dyb) = (&qh[i0 * d..i1 * d], &dyh[i0 * d..i1 * d]);
                    let (kb, vb) = (&kh[..nk * d], &vh[..nk * d]);
                    head_gemm_bf16((Op::N, Op::T), m, nk, d, qb, kb, p, false)?;
                    causal_softmax_rows(p, nk, i0, scale, None, Some(&lrow[i0..i1]));
                    head_gemm_bf16((Op::N, Op::T), m, nk, d, dyb, vb, dp, false)?;
                    softmax_grad_rows(dp, p, nk, dyb, &yh[i0 * d..i1 * d], scale);
                    let dqb = &mut dqh[i0 * d..i1 * d];
                    head_gemm_bf16((Op::N, Op::N), m, d, nk, dp, kb, dqb, false)?;
                    let (dkb, dvb) = (&mut dkg[..nk * d], &mut dvg[..nk * d]);
                    head_gemm_bf16((Op::T, Op::N), nk, d, m, dp, qb, dkb, true)?;
                    head_gemm_bf16((Op::T, Op::N), nk, d, m, p, dyb, dvb, true)?;
                }
            } else {
                gemm_set(t, t, d, qh, kt, p)?;
                causal_softmax_rows(p, t, 0, scale, None, Some(lrow));
                gemm_set(t, t, d, dyh, vt, dp)?;
                softmax_grad_rows(dp, p, t, dyh, yh, scale);
                gemm_set(t, d, t, dp, kh, dqh)?;
                transpose(t, t, dp, tt);
                gemm_acc(t, d, t, tt, qh, dkg)?;
                transpose(t, t, p, tt);
                gemm_acc(t, d, t, tt, dyh, dvg)?;
            }
            scatter_head(dqh, s, b, h, dqp);
        }
        for ti in 0..t {
            let off = ((b * t + ti) * s.hk + g) * d;
            dkp.slice(off, d)
                .copy_from_slice(&dkg[ti * d..(ti + 1) * d]);
            dvp.slice(off, d)
                .copy_from_slice(&dvg[ti * d..(ti + 1) * d]);
        }
        Ok(())
    })
}

thread_local! {
    static TASK_SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's attention scratch of `len` floats (contents unspecified). The
/// per-task buffers are megabytes (three T×T matrices in the backward pass); allocating them
/// fresh per task meant new zeroed pages, i.e. page faults, for every (batch, head, layer).
/// A nested call on the same thread (rayon work stealing inside a GEMM) finds the slot empty
/// and allocates its own.
pub(crate) fn with_task_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = TASK_SCRATCH.with(|c| c.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    TASK_SCRATCH.with(|c| {
        let held = c.take();
        c.set(if held.len() > buf.len() { held } else { buf });
    });
    out
}

/// Splits `buf` into `N` consecutive slices of `len`.
fn carve<const N: usize>(buf: &mut [f32], len: usize) -> [&mut [f32]; N] {
    let mut rest = buf;
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        head
    })
}

/// Attention of new tokens against a KV cache. Token `i` (cache row `rows[i]`, position
/// `positions[i]`) attends to cache positions `0..=positions[i]` of its row. `q`, `y`:
/// `[M, H, D]`; `k_cache`, `v_cache`: one layer's `[rows, capacity, Hk, D]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_cached(
    s: crate::backend::DecodeShape,
    q: &[f32],
    positions: &[i32],
    rows: &[i32],
    k_cache: &[f32],
    v_cache: &[f32],
    y: &mut [f32],
) {
    let (h, hk, d) = (s.h, s.hk, s.d);
    let rep = h / hk;
    let scale = 1.0 / (d as f32).sqrt();
    let kd = hk * d;
    let row_len = s.capacity * kd;
    // Decode attention is O(positions·D) per head: tiny next to the weight reads, so no SIMD
    // dispatch here.
    y.par_chunks_mut(d).enumerate().for_each(|(idx, out)| {
        let (i, head) = (idx / h, idx % h);
        let g = head / rep;
        let r = rows[i] as usize;
        let kc = &k_cache[r * row_len..(r + 1) * row_len];
        let vc = &v_cache[r * row_len..(r + 1) * row_len];
        let n = positions[i] as usize + 1;
        let qv = &q[idx * d..(idx + 1) * d];
        with_task_scratch(n, |scores| {
            attend_one(qv, &kc[g * d..], &vc[g * d..], kd, n, scale, scores, out)
        });
    });
}

/// In-place [`rmsnorm_bwd`]: `g` holds `dy` on entry and `dx` on exit.
pub(crate) fn rmsnorm_bwd_inplace(g: &mut [f32], y: &[f32], rstd: &[f32], dim: usize) {
    g.par_chunks_mut(dim)
        .zip(y.par_chunks(dim))
        .zip(rstd.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((gr, yr), &r)| {
            let m = dot(gr, yr) / dim as f32;
            for (o, &yy) in gr.iter_mut().zip(yr) {
                *o = r * (*o - yy * m);
            }
        });
}

/// Softcapped cross-entropy for one row of logits (`row.len()` = padded vocab; the first
/// `vocab` entries are real). On return `row[..vocab]` holds the capped logits, or, when
/// `grad_scale` is given, `d loss / d raw logit` times `grad_scale` (padding columns zeroed).
/// Returns the row's loss (0 for an ignored target). `exps` is scratch of length `vocab`.
#[inline(always)]
pub(crate) fn softcapped_ce_row(
    row: &mut [f32],
    vocab: usize,
    target: i32,
    softcap: Option<f32>,
    grad_scale: Option<f32>,
    exps: &mut [f32],
) -> f64 {
    let z = &mut row[..vocab];
    if let Some(c) = softcap {
        let inv = 1.0 / c;
        for zi in z.iter_mut() {
            *zi = c * super::kernels::fast_tanh(*zi * inv);
        }
    }
    if target < 0 && grad_scale.is_none() {
        return 0.0;
    }
    let m = max_lanes(z);
    for (e, &zi) in exps.iter_mut().zip(z.iter()) {
        *e = fast_exp(zi - m);
    }
    let sum = sum_lanes(exps);
    let loss = if target >= 0 {
        let lse = m as f64 + (sum as f64).ln();
        lse - z[target as usize] as f64
    } else {
        0.0
    };
    if let Some(scale) = grad_scale {
        if target < 0 {
            row.fill(0.0);
            return 0.0;
        }
        let tgt = target as usize;
        let inv_sum = 1.0 / sum;
        // d loss/d c_i = softmax_i − [i = target]; the cap contributes c'(z) = 1 − (c/cap)².
        match softcap {
            Some(c) => {
                let inv_c = 1.0 / c;
                let t_tgt = z[tgt] * inv_c;
                for (zi, &e) in z.iter_mut().zip(exps.iter()) {
                    let t = *zi * inv_c;
                    *zi = e * inv_sum * scale * (1.0 - t * t);
                }
                z[tgt] -= scale * (1.0 - t_tgt * t_tgt);
            }
            None => {
                for (zi, &e) in z.iter_mut().zip(exps.iter()) {
                    *zi = e * inv_sum * scale;
                }
                z[tgt] -= scale;
            }
        }
        row[vocab..].fill(0.0);
    }
    loss
}
