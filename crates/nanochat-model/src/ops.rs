//! The model's fused element-wise and attention operators (forward and backward).
//!
//! Layouts: activations are `[tokens, features]` row-major; attention heads sit side by side in
//! the feature dimension (`[B, T, H, D]`), as the projections produce them, so no transposes.

use rayon::prelude::*;

use crate::kernels::{axpy_generic, dot, dot_generic, fast_exp, has_avx2};

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

/// Rotary tables `[positions, head_dim/2]`, computed in f64 then rounded once to f32.
/// (The reference rounds them to bf16 for speed; the fixtures pin the exact math, as do we.)
pub(crate) struct Rope {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    pub(crate) half: usize,
}

impl Rope {
    pub(crate) fn new(positions: usize, head_dim: usize, base: f64) -> Self {
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
        Rope { cos, sin, half }
    }

    /// Rotates every head of every token in place; `inverse` applies the transpose rotation
    /// (which is the backward pass, rotations being orthogonal).
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize, positions: &[usize], inverse: bool) {
        let d = 2 * self.half;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(heads * d)
            .zip(positions.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, &p)| {
                let c = &self.cos[p * self.half..(p + 1) * self.half];
                let s = &self.sin[p * self.half..(p + 1) * self.half];
                for head in row.chunks_exact_mut(d) {
                    let (x1, x2) = head.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (a, b) = (x1[i], x2[i]);
                        let si = sign * s[i];
                        x1[i] = a * c[i] + b * si;
                        x2[i] = b * c[i] - a * si;
                    }
                }
            });
    }
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

/// Attention geometry for a full (training) batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) h: usize,
    pub(crate) hk: usize,
    pub(crate) d: usize,
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
    let mut m = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot_generic(q, &k[j * stride..j * stride + d]) * scale;
        m = m.max(*s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = fast_exp(*s - m);
        sum += *s;
    }
    out.fill(0.0);
    let inv = 1.0 / sum;
    for (j, &p) in scores.iter().enumerate() {
        axpy_generic(p * inv, &v[j * stride..j * stride + d], out);
    }
    m + sum.ln()
}

/// Causal self-attention over a full batch. `q`, `y`: `[B, T, H, D]`; `k`, `v`: `[B, T, Hk, D]`;
/// `lse`: `[B, H, T]` (saved for the backward pass instead of the T×T probabilities).
/// Parallel over (batch, kv-head) groups.
pub(crate) fn attention_fwd(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: &mut [f32],
    lse: &mut [f32],
) {
    let (yp, lp) = (SharedMut(y.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    let avx = has_avx2();
    (0..s.b * s.hk).into_par_iter().for_each(|task| {
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: AVX2+FMA present; the task writes only its own heads (see below).
            unsafe { attn_fwd_task_avx2(s, task, q, k, v, yp, lp) };
            return;
        }
        let _ = avx;
        // SAFETY: as above.
        unsafe { attn_fwd_task(s, task, q, k, v, yp, lp) };
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attn_fwd_task_avx2(
    s: AttnShape,
    task: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: SharedMut,
    lse: SharedMut,
) {
    attn_fwd_task(s, task, q, k, v, y, lse)
}

/// SAFETY: task (b, g) writes `y[b, :, h, :]` and `lse[b, h, :]` only for the query heads `h`
/// of kv group `g`; distinct tasks touch disjoint elements.
#[inline(always)]
unsafe fn attn_fwd_task(
    s: AttnShape,
    task: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: SharedMut,
    lse: SharedMut,
) {
    let (b, g) = (task / s.hk, task % s.hk);
    let rep = s.h / s.hk;
    let (hd, kd) = (s.h * s.d, s.hk * s.d);
    let scale = 1.0 / (s.d as f32).sqrt();
    let kb = &k[b * s.t * kd + g * s.d..];
    let vb = &v[b * s.t * kd + g * s.d..];
    let mut scores = vec![0f32; s.t];
    for h in g * rep..(g + 1) * rep {
        let lrow = lse.slice((b * s.h + h) * s.t, s.t);
        for (t, l) in lrow.iter_mut().enumerate() {
            let qo = (b * s.t + t) * hd + h * s.d;
            let out = y.slice(qo, s.d);
            *l = attend_one(&q[qo..qo + s.d], kb, vb, kd, t + 1, scale, &mut scores, out);
        }
    }
}

/// Backward of [`attention_fwd`]: writes `dq` and `dk`, `dv` (overwritten, not accumulated),
/// recomputing the probabilities from `lse` (flash-attention style: O(T) memory per head).
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
) {
    let ptrs = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    let avx = has_avx2();
    let inputs = (q, k, v, y, lse, dy);
    (0..s.b * s.hk).into_par_iter().for_each(|task| {
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: AVX2+FMA present; disjoint writes (see attn_bwd_task).
            unsafe { attn_bwd_task_avx2(s, task, inputs, ptrs) };
            return;
        }
        let _ = avx;
        // SAFETY: disjoint writes (see attn_bwd_task).
        unsafe { attn_bwd_task(s, task, inputs, ptrs) };
    });
}

type BwdInputs<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attn_bwd_task_avx2(
    s: AttnShape,
    task: usize,
    inputs: BwdInputs<'_>,
    out: (SharedMut, SharedMut, SharedMut),
) {
    attn_bwd_task(s, task, inputs, out)
}

/// SAFETY: task (b, g) writes `dq[b, :, h, :]` for the heads of group g and `dk[b, :, g, :]`,
/// `dv[b, :, g, :]`; disjoint across tasks.
#[inline(always)]
unsafe fn attn_bwd_task(
    s: AttnShape,
    task: usize,
    (q, k, v, y, lse, dy): BwdInputs<'_>,
    (dqp, dkp, dvp): (SharedMut, SharedMut, SharedMut),
) {
    let (b, g) = (task / s.hk, task % s.hk);
    let rep = s.h / s.hk;
    let (hd, kd, d) = (s.h * s.d, s.hk * s.d, s.d);
    let scale = 1.0 / (d as f32).sqrt();
    let kvo = |j: usize| (b * s.t + j) * kd + g * d;
    for j in 0..s.t {
        dkp.slice(kvo(j), d).fill(0.0);
        dvp.slice(kvo(j), d).fill(0.0);
    }
    let mut p = vec![0f32; s.t];
    for h in g * rep..(g + 1) * rep {
        let lrow = &lse[(b * s.h + h) * s.t..(b * s.h + h + 1) * s.t];
        for t in 0..s.t {
            let qo = (b * s.t + t) * hd + h * d;
            let (qv, dyv, yv) = (&q[qo..qo + d], &dy[qo..qo + d], &y[qo..qo + d]);
            let delta = dot_generic(dyv, yv);
            let l = lrow[t];
            let dqv = dqp.slice(qo, d);
            dqv.fill(0.0);
            for (j, pj) in p[..=t].iter_mut().enumerate() {
                *pj = fast_exp(dot_generic(qv, &k[kvo(j)..kvo(j) + d]) * scale - l);
            }
            for (j, &pj) in p[..=t].iter().enumerate() {
                let dp = dot_generic(dyv, &v[kvo(j)..kvo(j) + d]);
                let ds = pj * (dp - delta) * scale;
                axpy_generic(ds, &k[kvo(j)..kvo(j) + d], dqv);
                axpy_generic(ds, qv, dkp.slice(kvo(j), d));
                axpy_generic(pj, dyv, dvp.slice(kvo(j), d));
            }
        }
    }
}

/// Attention of new tokens against a KV cache. Token `i` (cache row `rows[i]`, position
/// `positions[i]`) attends to cache positions `0..=positions[i]` of its row. `q`, `y`:
/// `[M, H, D]`; `k_rows(r)`/`v_rows(r)` give row `r`'s cache as `[capacity, Hk, D]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_cached<'a>(
    h: usize,
    hk: usize,
    d: usize,
    q: &[f32],
    positions: &[usize],
    rows: &[usize],
    kv_row: &(dyn Fn(usize) -> (&'a [f32], &'a [f32]) + Sync),
    y: &mut [f32],
) {
    let rep = h / hk;
    let scale = 1.0 / (d as f32).sqrt();
    let kd = hk * d;
    // Decode attention is O(positions·D) per head: tiny next to the weight reads, so no SIMD
    // dispatch here.
    y.par_chunks_mut(d).enumerate().for_each(|(idx, out)| {
        let (i, head) = (idx / h, idx % h);
        let g = head / rep;
        let (kc, vc) = kv_row(rows[i]);
        let n = positions[i] + 1;
        let qv = &q[idx * d..(idx + 1) * d];
        let mut scores = vec![0f32; n];
        attend_one(
            qv,
            &kc[g * d..],
            &vc[g * d..],
            kd,
            n,
            scale,
            &mut scores,
            out,
        );
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
            *zi = c * crate::kernels::fast_tanh(*zi * inv);
        }
    }
    if target < 0 && grad_scale.is_none() {
        return 0.0;
    }
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for (e, &zi) in exps.iter_mut().zip(z.iter()) {
        *e = fast_exp(zi - m);
        sum += *e;
    }
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
