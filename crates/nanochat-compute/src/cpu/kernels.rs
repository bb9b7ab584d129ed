//! The CPU backend's dense-math kernels over row-major `f32` slices.
//!
//! GEMMs go to `trueno::blis` (BLIS-style,
//! AVX2/AVX-512 micro-kernels chosen at run time, rayon-parallel over rows of C). trueno only
//! multiplies NN, so `Aᵀ·B` transposes A into caller-owned scratch first: the transpose is
//! O(m·k) memory traffic against an O(m·n·k) product, i.e. noise for our shapes.
//!
//! The small hand-written loops (dot, axpy, exp) are compiled twice — generic and with
//! AVX2+FMA — and picked at run time, because the workspace builds for baseline x86-64.

use rayon::prelude::*;

use super::bf16;
use crate::error::{ComputeError, Result};
use crate::Precision as MatmulPrecision;

/// `c (+)= a·b` (`a: [m, k]`, `b: [k, n]`) at `precision`; `accumulate = false` overwrites `c`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(
    precision: MatmulPrecision,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    match (precision, accumulate) {
        (MatmulPrecision::F32, true) => gemm_acc(m, n, k, a, b, c),
        (MatmulPrecision::F32, false) => gemm_set(m, n, k, a, b, c),
        (MatmulPrecision::Bf16, accumulate) => bf16::gemm_bf16_with(
            bf16::Op::N,
            bf16::Op::N,
            m,
            n,
            k,
            a,
            b,
            c,
            bf16::GemmOpts {
                accumulate,
                parallel: true,
            },
        ),
    }
}

/// `c += aᵀ·b` (`a: [k, m]`, `b: [k, n]`) at `precision`. The f32 path transposes `a` into
/// `scratch` (at least `m·k`); the bf16 path packs `a` transposed directly and ignores it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn_acc(
    precision: MatmulPrecision,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    match precision {
        MatmulPrecision::F32 => gemm_tn_acc(m, n, k, a, b, c, scratch),
        MatmulPrecision::Bf16 => bf16::gemm_bf16(bf16::Op::T, bf16::Op::N, m, n, k, a, b, c),
    }
}

/// `c += a·b` with `a: [m, k]`, `b: [k, n]`, `c: [m, n]`, all row-major.
pub fn gemm_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        return Err(ComputeError::Kernel(format!(
            "gemm {m}x{n}x{k}: operand lengths {} {} {}",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if k == 0 {
        return Ok(());
    }
    // trueno's vector micro-kernels cover whole tiles of ROW_TILE rows; a ragged last tile
    // runs a scalar edge kernel over all `n` columns, which at decode sizes (a dozen rows
    // against the lm_head's 65k columns) costs more than the whole vector part. So the ragged
    // rows go through as one zero-padded tile: at most ROW_TILE − 1 rows of wasted FLOPs.
    let tail = m % ROW_TILE;
    let main = m - tail;
    if main > 0 {
        trueno_gemm(main, n, k, &a[..main * k], b, &mut c[..main * n])?;
    }
    if tail > 0 {
        PADDED_TILE.with(|cell| -> Result<()> {
            let mut bufs = cell.borrow_mut();
            let (pa, pc) = &mut *bufs;
            pa.clear();
            pa.extend_from_slice(&a[main * k..]);
            pa.resize(ROW_TILE * k, 0.0);
            pc.clear();
            pc.extend_from_slice(&c[main * n..]);
            pc.resize(ROW_TILE * n, 0.0);
            trueno_gemm(ROW_TILE, n, k, pa, b, pc)?;
            c[main * n..].copy_from_slice(&pc[..tail * n]);
            Ok(())
        })?;
    }
    Ok(())
}

/// Rows per tile that every trueno vector path handles without a scalar edge (its AVX-512
/// small-matrix kernel wants multiples of 16, the large one multiples of 8).
const ROW_TILE: usize = 16;

thread_local! {
    /// Padded `A` and `C` for the ragged last row tile, reused across calls.
    static PADDED_TILE: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

fn trueno_gemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    trueno::blis::gemm(m, n, k, a, b, c).map_err(|e| ComputeError::Kernel(format!("gemm: {e}")))
}

/// `c = a·b` (overwrites `c`).
pub fn gemm_set(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    c.fill(0.0);
    gemm_acc(m, n, k, a, b, c)
}

/// `c += aᵀ·b` with `a: [k, m]`, `b: [k, n]`; `scratch` (at least `m·k`) receives `aᵀ`.
pub fn gemm_tn_acc(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    let at = &mut scratch[..m * k];
    transpose(k, m, a, at);
    gemm_acc(m, n, k, at, b, c)
}

/// `dst[c][r] = src[r][c]` for a `rows × cols` source, cache-blocked and parallel.
///
/// Each 16×16 tile is read as 16 contiguous row segments into a local buffer and written back as
/// 16 contiguous column segments, so both sides stream whole cache lines.
pub fn transpose(rows: usize, cols: usize, src: &[f32], dst: &mut [f32]) {
    const TB: usize = 16;
    assert_eq!(src.len(), rows * cols);
    assert_eq!(dst.len(), rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    // Each task owns TB rows of dst (= TB columns of src).
    dst.par_chunks_mut(TB * rows)
        .enumerate()
        .with_min_len(4)
        .for_each(|(blk, d)| {
            let c0 = blk * TB;
            let cn = d.len() / rows;
            let mut tile = [[0f32; TB]; TB];
            for r0 in (0..rows).step_by(TB) {
                let rn = (rows - r0).min(TB);
                for (r, trow) in tile.iter_mut().enumerate().take(rn) {
                    let s = &src[(r0 + r) * cols + c0..(r0 + r) * cols + c0 + cn];
                    if cn == TB {
                        // Fixed length: an inlined vector copy instead of a memmove call.
                        trow.copy_from_slice(&s[..TB]);
                    } else {
                        trow[..cn].copy_from_slice(s);
                    }
                }
                for c in 0..cn {
                    let drow = &mut d[c * rows + r0..c * rows + r0 + rn];
                    for (r, o) in drow.iter_mut().enumerate() {
                        *o = tile[r][c];
                    }
                }
            }
        });
}

/// `y[r, o] (+)= Σ_i x[r, i]·w[o, i]` for a handful of rows (decoding): streams `w` (`[out, in]`)
/// exactly once, which is what bounds single-token latency. See [`matmul_wt_few_rows_many`].
pub fn matmul_wt_few_rows(
    rows: usize,
    out: usize,
    inp: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    accumulate: bool,
) {
    let job = GemvJob {
        w: GemvWeights::F32(w),
        out,
        y,
    };
    matmul_wt_few_rows_many(rows, inp, x, &mut [job], accumulate);
}

/// [`matmul_wt_few_rows`] against bf16 weights (`w16`: `[out, in]` bf16 bits, as
/// [`super::bf16::bf16_bits`] rounds them): half the bytes streamed per token.
pub fn matmul_wt_few_rows_bf16(
    rows: usize,
    out: usize,
    inp: usize,
    x: &[f32],
    w16: &[u16],
    y: &mut [f32],
    accumulate: bool,
) {
    let job = GemvJob {
        w: GemvWeights::Bf16(w16),
        out,
        y,
    };
    matmul_wt_few_rows_many(rows, inp, x, &mut [job], accumulate);
}

/// The weights of one GEMV, `[out, in]` row-major.
#[derive(Debug, Clone, Copy)]
pub enum GemvWeights<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 bits: the input is rounded to bf16 as well, so the result is the bf16 GEMM's
    /// (products of two bf16 values are exact in f32, accumulated in f32) up to the order of
    /// the additions.
    Bf16(&'a [u16]),
}

/// One GEMV of [`matmul_wt_few_rows_many`]: `y: [rows, out]`.
#[derive(Debug)]
pub struct GemvJob<'a> {
    /// Its weights.
    pub w: GemvWeights<'a>,
    /// Output features.
    pub out: usize,
    /// Its output.
    pub y: &'a mut [f32],
}

/// Several GEMVs of the same input (`x: [rows, inp]`, e.g. a layer's Q, K and V projections)
/// in one parallel loop: one fork/join instead of one per projection, which at decode sizes
/// (a 512×512 f32 weight streams in ~40 µs) is a visible share of the step.
///
/// Each job's output rows are split into contiguous blocks of at least
/// [`GEMV_MIN_BLOCK_BYTES`] of weights (a task must cost far more than its scheduling),
/// several per thread so that a thread slowed by other load is covered by the others. Each
/// task writes its own columns of `y` directly: no per-call buffer.
pub fn matmul_wt_few_rows_many(
    rows: usize,
    inp: usize,
    x: &[f32],
    jobs: &mut [GemvJob<'_>],
    accumulate: bool,
) {
    assert_eq!(x.len(), rows * inp);
    let threads = rayon::current_num_threads();
    // (job, first row, end row) of every task.
    let mut tasks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let (len, bytes) = match job.w {
            GemvWeights::F32(w) => (w.len(), 4),
            GemvWeights::Bf16(w) => (w.len(), 2),
        };
        assert_eq!(len, job.out * inp);
        assert_eq!(job.y.len(), rows * job.out);
        if job.out == 0 || rows == 0 {
            continue;
        }
        let block = gemv_block_rows(job.out, bytes * inp, threads);
        for o0 in (0..job.out).step_by(block) {
            tasks.push((j, o0, (o0 + block).min(job.out)));
        }
    }
    let outs: Vec<(GemvWeights<'_>, usize, SyncPtr)> = jobs
        .iter_mut()
        .map(|j| (j.w, j.out, SyncPtr(j.y.as_mut_ptr())))
        .collect();
    let run = |&(j, o0, o1): &(usize, usize, usize)| {
        let (w, out, yp) = outs[j];
        for r in 0..rows {
            let xr = &x[r * inp..(r + 1) * inp];
            // SAFETY: this task owns columns o0..o1 of every row of job j's `y`, disjoint from
            // every other task's; the `y`s are borrowed mutably for the whole call, which joins
            // every task before returning.
            let yr = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r * out + o0), o1 - o0) };
            match w {
                GemvWeights::F32(w) => gemv_rows(&w[o0 * inp..o1 * inp], inp, xr, yr, accumulate),
                GemvWeights::Bf16(w) => ROUNDED_X.with(|cell| {
                    let mut xb = cell.borrow_mut();
                    xb.clear();
                    xb.extend(xr.iter().map(|&v| bf16::round_bf16(v)));
                    gemv_rows_bf16(&w[o0 * inp..o1 * inp], inp, &xb, yr, accumulate)
                }),
            }
        }
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
}

thread_local! {
    /// One row of `x` rounded to bf16 for the bf16 GEMV, reused across calls.
    static ROUNDED_X: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A raw pointer that may cross into rayon tasks (each task touches a disjoint part).
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used for disjoint writes inside one parallel loop (see its users).
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Below this many bytes of weights a GEMV block is not worth a task of its own.
pub const GEMV_MIN_BLOCK_BYTES: usize = 128 << 10;

/// Output rows per GEMV task for `out` rows of `row_bytes` each: up to eight tasks per
/// thread, none smaller than [`GEMV_MIN_BLOCK_BYTES`], in multiples of 16 rows.
pub fn gemv_block_rows(out: usize, row_bytes: usize, threads: usize) -> usize {
    let tasks = (out * row_bytes / GEMV_MIN_BLOCK_BYTES).clamp(1, 8 * threads.max(1));
    out.div_ceil(tasks).next_multiple_of(16).min(out).max(1)
}

/// `y[o] (+)= w[o, :]·x` for the rows of `w` (`[y.len(), inp]`). One row after the other: the
/// rows are contiguous, so a block is one sequential stream for the hardware prefetcher (four
/// rows at once, and an AVX-512 variant, measured slower on Zen 4; the loop is memory-bound).
pub fn gemv_rows(w: &[f32], inp: usize, x: &[f32], y: &mut [f32], accumulate: bool) {
    debug_assert_eq!(w.len(), y.len() * inp);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gemv_rows_avx2(w, inp, x, y, accumulate) };
        }
    }
    gemv_rows_generic(w, inp, x, y, accumulate)
}

#[inline(always)]
fn gemv_rows_generic(w: &[f32], inp: usize, x: &[f32], y: &mut [f32], accumulate: bool) {
    for (o, v) in y.iter_mut().enumerate() {
        let d = dot_generic(&w[o * inp..(o + 1) * inp], x);
        *v = if accumulate { *v + d } else { d };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_rows_avx2(w: &[f32], inp: usize, x: &[f32], y: &mut [f32], accumulate: bool) {
    gemv_rows_generic(w, inp, x, y, accumulate)
}

/// `y[o] (+)= w16[o, :]·x` with bf16 weights widened on the fly (a bf16 value is the top half
/// of an f32).
pub fn gemv_rows_bf16(w16: &[u16], inp: usize, x: &[f32], y: &mut [f32], accumulate: bool) {
    debug_assert_eq!(w16.len(), y.len() * inp);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gemv_rows_bf16_avx2(w16, inp, x, y, accumulate) };
        }
    }
    for (o, v) in y.iter_mut().enumerate() {
        let d = dot_bf16_generic(&w16[o * inp..(o + 1) * inp], x);
        *v = if accumulate { *v + d } else { d };
    }
}

#[inline(always)]
fn dot_bf16_generic(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let cw = w.chunks_exact(8);
    let cx = x.chunks_exact(8);
    let tail: f32 = cw
        .remainder()
        .iter()
        .zip(cx.remainder())
        .map(|(&a, &b)| f32::from_bits(u32::from(a) << 16) * b)
        .sum();
    for (a, b) in cw.zip(cx) {
        for i in 0..8 {
            acc[i] += f32::from_bits(u32::from(a[i]) << 16) * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_rows_bf16_avx2(w16: &[u16], inp: usize, x: &[f32], y: &mut [f32], accumulate: bool) {
    use std::arch::x86_64::*;
    let main = inp - inp % 32;
    let xp = x.as_ptr();
    // bf16 → f32: zero-extend each 16-bit value to 32 bits and shift it into the top half.
    let widen = |p: *const u16| {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
            16,
        ))
    };
    for (o, v) in y.iter_mut().enumerate() {
        let wr = &w16[o * inp..(o + 1) * inp];
        let wp = wr.as_ptr();
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        while i < main {
            a0 = _mm256_fmadd_ps(widen(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(widen(wp.add(i + 8)), _mm256_loadu_ps(xp.add(i + 8)), a1);
            a2 = _mm256_fmadd_ps(widen(wp.add(i + 16)), _mm256_loadu_ps(xp.add(i + 16)), a2);
            a3 = _mm256_fmadd_ps(widen(wp.add(i + 24)), _mm256_loadu_ps(xp.add(i + 24)), a3);
            i += 32;
        }
        let acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let d = lanes.iter().sum::<f32>() + dot_bf16_generic(&wr[main..], &x[main..inp]);
        *v = if accumulate { *v + d } else { d };
    }
}

/// Seconds to read every element of `slices` once, all threads at once, each thread streaming
/// its own contiguous share of every slice in order, as the decode GEMV splits its weights,
/// with no barrier between slices: the read floor of one decode step over those weights.
pub fn stream_read_secs(slices: &[&[f32]]) -> f64 {
    let t = std::time::Instant::now();
    let sums = rayon::broadcast(|ctx| {
        let (i, n) = (ctx.index(), ctx.num_threads());
        let mut s = 0f32;
        for w in slices {
            let share = w.len().div_ceil(n);
            let lo = (i * share).min(w.len());
            let hi = ((i + 1) * share).min(w.len());
            s += read_sum(&w[lo..hi]);
        }
        s
    });
    std::hint::black_box(sums);
    t.elapsed().as_secs_f64()
}

/// Sum of a slice with the widest vector loads the CPU has (a read-bandwidth probe).
pub fn read_sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked above).
            return unsafe { read_sum_avx512(x) };
        }
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { read_sum_avx2(x) };
        }
    }
    sum_lanes(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_sum_avx512(x: &[f32]) -> f32 {
    sum_lanes(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn read_sum_avx2(x: &[f32]) -> f32 {
    sum_lanes(x)
}

/// Whether the AVX-512F variants may run (detected once, cached by std).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline(always)]
pub(crate) fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for i in 0..ra.len() {
        s += ra[i] * rb[i];
    }
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = acc[i] + acc[i + 8];
    }
    s + (t[0] + t[4]) + (t[1] + t[5]) + (t[2] + t[6]) + (t[3] + t[7])
}

/// Sum with 16 independent lanes (a sequential f32 sum would block vectorization).
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let rest: f32 = ch.remainder().iter().sum();
    for c in ch {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum with 16 independent lanes.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let ch = x.chunks_exact(16);
    let rest = ch
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in ch {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(rest, |a, &b| a.max(b))
}

/// `y += alpha·x`.
#[inline(always)]
pub(crate) fn axpy_generic(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * *xi;
    }
}

/// Dot product.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_generic(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

/// Whether the AVX2+FMA variants may run (detected once, cached by std).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `e^x` to ~2 ulp for x in [-87, 88] (clamped outside), branch-free so loops vectorize.
/// Cephes' expf polynomial with a Cody–Waite split of ln 2.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 127] after the clamp, so the unchecked conversion (which vectorizes,
    // unlike the saturating `as`) is exact.
    // SAFETY: n is finite and within i32 range.
    let ni: i32 = unsafe { n.to_int_unchecked() };
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    y * scale
}

/// `tanh(u)`: odd Taylor series near 0 (where `1 - 2/(e^2u + 1)` would cancel), the exp form
/// elsewhere. Relative error ~3e-7 everywhere.
#[inline(always)]
pub(crate) fn fast_tanh(u: f32) -> f32 {
    let a = u.abs();
    let u2 = u * u;
    let series = u
        * (1.0
            + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))));
    let e = fast_exp(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    let big = if u < 0.0 { -big } else { big };
    if a < 0.2 {
        series
    } else {
        big
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_are_accurate() {
        let mut x = -30.0f32;
        while x < 30.0 {
            let e = fast_exp(x);
            let r = (x as f64).exp();
            assert!(((e as f64 - r) / r).abs() < 5e-7, "exp {x}: {e} vs {r}");
            let t = fast_tanh(x / 7.0);
            let rt = (x as f64 / 7.0).tanh();
            assert!(
                (t as f64 - rt).abs() <= 4e-7 * rt.abs().max(1e-30),
                "tanh {x}: {t} vs {rt}"
            );
            x += 0.0137;
        }
        assert_eq!(fast_exp(-1000.0).min(1e-30), fast_exp(-1000.0));
        assert!(fast_exp(1000.0).is_finite());
        assert_eq!(fast_tanh(0.0), 0.0);
        assert!((fast_tanh(100.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn gemm_acc_with_a_ragged_row_tile_accumulates_every_row() {
        // Rows below, at and across ROW_TILE multiples: the padded tail must add into the
        // existing C exactly like the vector part does, and leave no row untouched.
        for m in [1, 9, 15, 16, 17, 33, 47] {
            let (n, k) = (37, 29);
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.17).cos()).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
            let mut c = c0.clone();
            gemm_acc(m, n, k, &a, &b, &mut c).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let r: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                    let want = c0[i * n + j] + r;
                    assert!((c[i * n + j] - want).abs() < 1e-4, "m={m} [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn gemm_variants_match_naive() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![1.0; m * n];
        gemm_set(m, n, k, &a, &b, &mut c).unwrap();
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                assert!((c[i * n + j] - r).abs() < 1e-5);
            }
        }
        // aᵀ·b with a: [k=m2, m=k2]
        let at_src: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.21).sin()).collect(); // [k, m]
        let mut c2 = vec![0.0; m * n];
        let mut scratch = vec![0.0; m * k];
        gemm_tn_acc(m, n, k, &at_src, &b, &mut c2, &mut scratch).unwrap();
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|p| at_src[p * m + i] * b[p * n + j]).sum();
                assert!((c2[i * n + j] - r).abs() < 1e-5);
            }
        }
        // few-rows path: y = x·wᵀ
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.05).sin()).collect(); // [n, k]
        let mut y = vec![0.0; m * n];
        matmul_wt_few_rows(m, n, k, &a, &w, &mut y, false);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|p| a[i * k + p] * w[j * k + p]).sum();
                assert!((y[i * n + j] - r).abs() < 1e-5);
            }
        }
        let mut t = vec![0.0; m * k];
        transpose(m, k, &a, &mut t);
        assert_eq!(t[3 * m + 2], a[2 * k + 3]);
    }

    #[test]
    fn gemv_blocks_and_kernels_match_naive() {
        // Shapes with ragged row quads, ragged 16-wide chunks, several blocks per thread
        // (out·in·4 bytes over 256 KiB), one and a few rows, overwrite and accumulate.
        for (rows, out, inp) in [
            (1, 1, 3),
            (1, 7, 33),
            (1, 4096, 100),
            (3, 2051, 64),
            (2, 70, 16),
        ] {
            let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.13).sin()).collect();
            let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.07).cos()).collect();
            for accumulate in [false, true] {
                let mut y: Vec<f32> = (0..rows * out).map(|i| (i % 5) as f32).collect();
                let y0 = y.clone();
                matmul_wt_few_rows(rows, out, inp, &x, &w, &mut y, accumulate);
                for r in 0..rows {
                    for o in 0..out {
                        let d: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
                        let want = if accumulate { y0[r * out + o] + d } else { d };
                        let got = y[r * out + o];
                        assert!(
                            (got - want).abs() < 1e-3,
                            "{rows}x{out}x{inp} [{r},{o}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_gemv_is_the_bf16_product() {
        // The reference: both operands rounded to bf16, products summed in f64.
        for (rows, out, inp) in [(1, 5, 7), (1, 3000, 96), (2, 64, 100)] {
            let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.29).sin()).collect();
            let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.011).cos()).collect();
            let w16: Vec<u16> = w.iter().map(|&v| bf16::bf16_bits(v)).collect();
            for accumulate in [false, true] {
                let mut y = vec![0.5f32; rows * out];
                matmul_wt_few_rows_bf16(rows, out, inp, &x, &w16, &mut y, accumulate);
                for r in 0..rows {
                    for o in 0..out {
                        let d: f64 = (0..inp)
                            .map(|i| {
                                f64::from(bf16::round_bf16(x[r * inp + i]))
                                    * f64::from(bf16::round_bf16(w[o * inp + i]))
                            })
                            .sum();
                        let want = d + if accumulate { 0.5 } else { 0.0 };
                        let got = f64::from(y[r * out + o]);
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{rows}x{out}x{inp} [{r},{o}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_blocks_cover_the_rows_in_few_tasks() {
        // A 512x512 f32 weight is 1 MiB: eight blocks of 128 KiB.
        assert_eq!(gemv_block_rows(512, 4 * 512, 2), 64);
        // The 64 MiB lm_head: eight tasks per thread.
        assert_eq!(gemv_block_rows(32768, 4 * 512, 2), 2048);
        // Tiny weights run as one block.
        assert_eq!(gemv_block_rows(10, 40, 8), 10);
    }

    #[test]
    fn stream_probe_reads_everything() {
        let a = vec![1.0f32; 1000];
        let b = vec![2.0f32; 77];
        assert!(stream_read_secs(&[&a, &b]) >= 0.0);
        assert_eq!(read_sum(&a), 1000.0);
        assert_eq!(read_sum(&b), 154.0);
    }
}
