//! The CPU backend: views are slices, every op runs to completion on rayon's pool.
//!
//! Matmuls with a weight go through a [`CpuWeights`] cache: `[in, out]` transposed copies so
//! that `x·Wᵀ` is one NN GEMM on trueno's BLIS kernels (which only multiply NN), and, for bf16
//! matmuls, every weight packed once per optimizer step in both orientations for the AVX-512
//! BF16 kernel (a micro-batch multiplies each weight several times: the lm_head once per row
//! chunk, forward and backward). Up to [`FEW_ROWS`] rows (decoding), projections stream the
//! `[out, in]` weights once instead: the f32 parameters, or with bf16 matmuls a bf16 copy of
//! them (half the bytes; decoding is bound by them).

pub mod bf16;
pub mod kernels;
mod ops;
pub mod select;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::backend::{
    AdamWStep, AttnShape, Backend, DecodeShape, DeviceKind, Gemm, ScratchShape, WeightRef,
    WeightSlot,
};
use crate::error::{ComputeError, Result};
use crate::host::{alloc_f32, alloc_i32, available_memory, check_fits};
use crate::Precision;
use bf16::{gemm_bf16_prepacked_with, gemm_bf16_with, round_bf16, GemmOpts, Op, PackedB, RoundMap};
use kernels::{
    matmul_nn, matmul_tn_acc, matmul_wt_few_rows, matmul_wt_few_rows_bf16, transpose, GemvJob,
    GemvWeights,
};

/// Up to this many rows, f32 projections stream the `[out, in]` weights once (GEMV-like,
/// parallel over output blocks); beyond, they run as GEMMs. Measured at depth 8 / vocab 65,536
/// (`bench_engine`, 2 threads): the streaming path still wins at 12 rows, and a GEMM below
/// one 16-row tile pays for a whole padded tile anyway.
pub const FEW_ROWS: usize = 16;

/// Elements per rayon task in element-wise updates: large enough that scheduling overhead is
/// negligible, small enough to split a d20 embedding (~42M floats) over many cores.
const PAR_CHUNK: usize = 1 << 15;

/// Rows per rayon task of the cross-entropy (a row is a whole vocabulary).
const CE_ROWS_PER_TASK: usize = 8;

/// The host CPU (stateless: scratch is per thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Cpu {
    /// The CPU backend.
    pub fn new() -> Self {
        Cpu
    }
}

/// Derived forms of the weights for the CPU kernels (see the module docs).
///
/// A bf16 cache (rebuilt every optimizer step in training) builds only what the bf16 GEMMs
/// read, the packs; the `[in, out]` f32 copies (for an f32 matmul served by a bf16 cache:
/// sampling during bf16 training) and the bf16 rows (for the few-row decode GEMV) are built on
/// first use, so a training step no longer transposes and converts every weight twice more.
#[derive(Debug, Default)]
pub struct CpuWeights {
    /// `[in, out]` copy of every matmul weight (empty for the embedding): built eagerly by an
    /// f32 cache, lazily by a bf16 one.
    transposed: Vec<OnceLock<Vec<f32>>>,
    /// With bf16 matmuls: each matmul weight packed as `[in, out]` (forward) and `[out, in]`
    /// (backward).
    packs: Vec<Option<(PackedB, PackedB)>>,
    /// With bf16 matmuls: each matmul weight as `[out, in]` bf16 bits, what the few-row
    /// (decode) GEMV streams: half the bytes of the f32 weights, and decoding is bound by
    /// those bytes. Built on first use.
    rows_bf16: Vec<OnceLock<Vec<u16>>>,
}

impl CpuWeights {
    /// The `[in, out]` copy of weight `i` of `params` (empty for a non-matmul slot), built
    /// now if this cache has not built it yet.
    pub fn transposed(&self, i: usize, params: &[f32], slot: WeightSlot) -> Result<&[f32]> {
        let Some(lock) = self.transposed.get(i) else {
            return Ok(&[]);
        };
        if let Some(t) = lock.get() {
            return Ok(t);
        }
        if !slot.matmul {
            return Ok(lock.get_or_init(Vec::new));
        }
        let mut t = alloc_f32(slot.len(), "transposed weight copy")?;
        transpose(slot.out, slot.inp, &params[slot.range()], &mut t);
        // A concurrent caller may have built the same copy first: either one is right.
        Ok(lock.get_or_init(|| t))
    }

    /// Weight `i` of `params` as `[out, in]` bf16 rows, for a bf16 cache (built on first use);
    /// `None` for an f32 cache or a non-matmul slot.
    fn rows_bf16(&self, i: usize, params: &[f32], slot: WeightSlot) -> Option<&[u16]> {
        let lock = self.rows_bf16.get(i)?;
        if !slot.matmul || !matches!(self.packs.get(i), Some(Some(_))) {
            return None;
        }
        Some(lock.get_or_init(|| {
            let mut v = vec![0u16; slot.len()];
            v.par_chunks_mut(PAR_CHUNK)
                .zip(params[slot.range()].par_chunks(PAR_CHUNK))
                .for_each(|(d, src)| {
                    d.iter_mut()
                        .zip(src)
                        .for_each(|(d, &x)| *d = bf16::bf16_bits(x))
                });
            v
        }))
    }
}

thread_local! {
    /// `dyᵀ` for the f32 weight gradient (trueno multiplies NN only), reused across calls.
    static TN_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(ComputeError::kernel(format!(
            "{op}: {what} has {got} elements, expected {want}"
        )));
    }
    Ok(())
}

pub(crate) fn check_rows(op: &str, what: &str, got: usize, dim: usize) -> Result<usize> {
    if dim == 0 || !got.is_multiple_of(dim) {
        return Err(ComputeError::kernel(format!(
            "{op}: {what} has {got} elements, not whole rows of {dim}"
        )));
    }
    Ok(got / dim)
}

fn check_index(op: &str, idx: &[i32], rows: usize) -> Result<()> {
    if let Some(&bad) = idx.iter().find(|&&i| i < 0 || i as usize >= rows) {
        return Err(ComputeError::kernel(format!(
            "{op}: row index {bad} outside 0..{rows}"
        )));
    }
    Ok(())
}

fn par_map(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    x.par_chunks_mut(PAR_CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

fn par_zip(x: &mut [f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    x.par_chunks_mut(PAR_CHUNK)
        .zip(y.par_chunks(PAR_CHUNK))
        .for_each(|(xc, yc)| xc.iter_mut().zip(yc).for_each(|(v, &w)| *v = f(*v, w)));
}

/// [`RoundMap::apply`] over `x` (and `y`, empty for the maps that do not read it) in parallel
/// chunks.
fn par_round_map(x: &mut [f32], y: &[f32], f: RoundMap) {
    if x.len() <= PAR_CHUNK {
        return f.apply(x, y);
    }
    if y.is_empty() {
        x.par_chunks_mut(PAR_CHUNK).for_each(|c| f.apply(c, &[]));
    } else {
        x.par_chunks_mut(PAR_CHUNK)
            .zip(y.par_chunks(PAR_CHUNK))
            .for_each(|(c, d)| f.apply(c, d));
    }
}

/// `Σ f(x)` in f64 over fixed chunks added in order: independent of how rayon splits the work.
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64 + Sync) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(PAR_CHUNK)
        .map(|c| c.iter().map(|&v| f(f64::from(v))).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture where that is unreadable.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The f32 GEMM `c = alpha·op(a)·op(b) + beta·c` through trueno (NN only: transposed operands
/// are copied first).
fn gemm_f32(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    let at;
    let a = if g.ta {
        at = {
            let mut t = alloc_f32(g.m * g.k, "gemm operand")?;
            transpose(g.k, g.m, a, &mut t);
            t
        };
        &at[..]
    } else {
        a
    };
    let bt;
    let b = if g.tb {
        bt = {
            let mut t = alloc_f32(g.k * g.n, "gemm operand")?;
            transpose(g.n, g.k, b, &mut t);
            t
        };
        &bt[..]
    } else {
        b
    };
    if g.alpha == 1.0 && (g.beta == 0.0 || g.beta == 1.0) {
        return matmul_nn(Precision::F32, g.m, g.n, g.k, a, b, c, g.beta == 1.0);
    }
    let mut prod = alloc_f32(g.m * g.n, "gemm product")?;
    matmul_nn(Precision::F32, g.m, g.n, g.k, a, b, &mut prod, false)?;
    combine(c, &prod, g.alpha, g.beta);
    Ok(())
}

/// `c = alpha·prod + beta·c` (beta 0 ignores what `c` held).
fn combine(c: &mut [f32], prod: &[f32], alpha: f32, beta: f32) {
    if beta == 0.0 {
        par_zip(c, prod, |_, p| alpha * p);
    } else {
        par_zip(c, prod, |o, p| alpha * p + beta * o);
    }
}

fn gemm_bf16_general(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    let op = |t: bool| if t { Op::T } else { Op::N };
    if g.alpha == 1.0 && (g.beta == 0.0 || g.beta == 1.0) {
        let opts = GemmOpts {
            accumulate: g.beta == 1.0,
            parallel: true,
        };
        return gemm_bf16_with(op(g.ta), op(g.tb), g.m, g.n, g.k, a, b, c, opts);
    }
    let mut prod = alloc_f32(g.m * g.n, "gemm product")?;
    let opts = GemmOpts {
        accumulate: false,
        parallel: true,
    };
    gemm_bf16_with(op(g.ta), op(g.tb), g.m, g.n, g.k, a, b, &mut prod, opts)?;
    combine(c, &prod, g.alpha, g.beta);
    Ok(())
}

fn weight_pack_bytes(layout: &[WeightSlot]) -> u64 {
    layout
        .iter()
        .filter(|s| s.matmul)
        .map(|s| {
            PackedB::bytes_for(s.inp, s.out) + PackedB::bytes_for(s.out, s.inp) + 2 * s.len() as u64
        })
        .sum()
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type IBuf = Vec<i32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];
    type IView<'a> = &'a [i32];
    type WeightCache = CpuWeights;

    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} threads, {})",
            cpu_name(),
            rayon::current_num_threads(),
            select::CpuFeatures::detect().names()
        )
    }

    fn available_memory(&self) -> Option<u64> {
        available_memory()
    }

    fn decode_precision(&self, train: Precision) -> Precision {
        // Decoding streams every weight once per token, so it is bound by their bytes: a model
        // set to bf16 matmuls decodes from the bf16 weight rows (half the bytes), one in f32
        // from the f32 weights, each matching its own full forward within rounding.
        train
    }

    fn matmul_precision_for(&self, requested: Precision) -> Precision {
        select::effective_precision(requested)
    }

    fn alloc(&self, len: usize, what: &str) -> Result<Vec<f32>> {
        alloc_f32(len, what)
    }

    fn alloc_ints(&self, len: usize, what: &str) -> Result<Vec<i32>> {
        alloc_i32(len, what)
    }

    fn view(buf: &Vec<f32>) -> &[f32] {
        buf
    }

    fn view_mut(buf: &mut Vec<f32>) -> &mut [f32] {
        buf
    }

    fn iview(buf: &Vec<i32>) -> &[i32] {
        buf
    }

    fn len(v: &&[f32]) -> usize {
        v.len()
    }

    fn len_mut(v: &&mut [f32]) -> usize {
        v.len()
    }

    fn ilen(v: &&[i32]) -> usize {
        v.len()
    }

    fn slice<'a>(v: Self::View<'a>, range: Range<usize>) -> Self::View<'a> {
        &v[range]
    }

    fn slice_mut<'a>(v: Self::ViewMut<'a>, range: Range<usize>) -> Self::ViewMut<'a> {
        &mut v[range]
    }

    fn islice<'a>(v: Self::IView<'a>, range: Range<usize>) -> Self::IView<'a> {
        &v[range]
    }

    fn split_at_mut<'a>(
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        v.split_at_mut(mid)
    }

    fn reborrow<'a>(v: &'a mut &mut [f32]) -> &'a mut [f32] {
        v
    }

    fn as_view<'a>(v: &'a &mut [f32]) -> &'a [f32] {
        v
    }

    fn upload(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check_len("upload", "destination", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check_len("download", "destination", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn download_rows(
        &self,
        src: &[f32],
        stride: usize,
        width: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        let rows = check_rows("download_rows", "destination", dst.len(), width)?;
        if width > stride || (rows > 0 && src.len() < (rows - 1) * stride + width) {
            return Err(ComputeError::kernel(format!(
                "download_rows: {rows} rows of {width} at stride {stride} from {} elements",
                src.len()
            )));
        }
        for (r, d) in dst.chunks_exact_mut(width).enumerate() {
            d.copy_from_slice(&src[r * stride..r * stride + width]);
        }
        Ok(())
    }

    fn run_step<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| f())
    }

    fn upload_ints(&self, src: &[i32], dst: &mut Vec<i32>) -> Result<()> {
        if src.len() > dst.len() {
            return Err(ComputeError::kernel(format!(
                "upload_ints: {} ints into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn fill(&self, x: &mut [f32], value: f32) -> Result<()> {
        x.par_chunks_mut(PAR_CHUNK).for_each(|c| c.fill(value));
        Ok(())
    }

    fn copy(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check_len("copy", "destination", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn copy_within(
        &self,
        buf: &mut [f32],
        src_off: usize,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        let n = buf.len();
        if src_off + len > n || dst_off + len > n {
            return Err(ComputeError::kernel(format!(
                "copy_within: {len} elements from {src_off} to {dst_off} in a buffer of {n}"
            )));
        }
        buf.copy_within(src_off..src_off + len, dst_off);
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &[f32],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
        width: usize,
        rows: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let need_src = (rows - 1) * src_stride + width;
        let need_dst = (rows - 1) * dst_stride + width;
        if width > src_stride.min(dst_stride) || src.len() < need_src || dst.len() < need_dst {
            return Err(ComputeError::kernel(format!(
                "copy_rows: {rows} rows of {width} with strides {src_stride}/{dst_stride} \
                 from {} into {} elements",
                src.len(),
                dst.len()
            )));
        }
        for r in 0..rows {
            dst[r * dst_stride..r * dst_stride + width]
                .copy_from_slice(&src[r * src_stride..r * src_stride + width]);
        }
        Ok(())
    }

    fn gather_rows(&self, table: &[f32], dim: usize, idx: &[i32], out: &mut [f32]) -> Result<()> {
        let rows = check_rows("gather_rows", "table", table.len(), dim)?;
        check_len("gather_rows", "output", out.len(), idx.len() * dim)?;
        check_index("gather_rows", idx, rows)?;
        for (o, &i) in out.chunks_exact_mut(dim).zip(idx) {
            let i = i as usize;
            o.copy_from_slice(&table[i * dim..(i + 1) * dim]);
        }
        Ok(())
    }

    fn scatter_rows(&self, src: &[f32], dim: usize, idx: &[i32], table: &mut [f32]) -> Result<()> {
        let rows = check_rows("scatter_rows", "table", table.len(), dim)?;
        check_len("scatter_rows", "source", src.len(), idx.len() * dim)?;
        check_index("scatter_rows", idx, rows)?;
        for (s, &i) in src.chunks_exact(dim).zip(idx) {
            let i = i as usize;
            table[i * dim..(i + 1) * dim].copy_from_slice(s);
        }
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        src: &[f32],
        dim: usize,
        idx: &[i32],
        table: &mut [f32],
    ) -> Result<()> {
        let rows = check_rows("scatter_add_rows", "table", table.len(), dim)?;
        check_len("scatter_add_rows", "source", src.len(), idx.len() * dim)?;
        check_index("scatter_add_rows", idx, rows)?;
        for (s, &i) in src.chunks_exact(dim).zip(idx) {
            let i = i as usize;
            for (o, &g) in table[i * dim..(i + 1) * dim].iter_mut().zip(s) {
                *o += g;
            }
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &[f32], y: &mut [f32], rstd: &mut [f32], dim: usize) -> Result<()> {
        let rows = check_rows("rmsnorm", "x", x.len(), dim)?;
        check_len("rmsnorm", "y", y.len(), x.len())?;
        check_len("rmsnorm", "rstd", rstd.len(), rows)?;
        ops::rmsnorm_fwd(x, y, rstd, dim);
        Ok(())
    }

    fn rmsnorm_inplace(&self, x: &mut [f32], rstd: &mut [f32], dim: usize) -> Result<()> {
        let rows = check_rows("rmsnorm_inplace", "x", x.len(), dim)?;
        check_len("rmsnorm_inplace", "rstd", rstd.len(), rows)?;
        ops::rmsnorm_inplace(x, rstd, dim);
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        dy: &[f32],
        y: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        let rows = check_rows("rmsnorm_bwd", "dy", dy.len(), dim)?;
        check_len("rmsnorm_bwd", "y", y.len(), dy.len())?;
        check_len("rmsnorm_bwd", "dx", dx.len(), dy.len())?;
        check_len("rmsnorm_bwd", "rstd", rstd.len(), rows)?;
        ops::rmsnorm_bwd(dy, y, rstd, dx, dim, accumulate);
        Ok(())
    }

    fn rmsnorm_bwd_inplace(
        &self,
        g: &mut [f32],
        y: &[f32],
        rstd: &[f32],
        dim: usize,
    ) -> Result<()> {
        let rows = check_rows("rmsnorm_bwd_inplace", "g", g.len(), dim)?;
        check_len("rmsnorm_bwd_inplace", "y", y.len(), g.len())?;
        check_len("rmsnorm_bwd_inplace", "rstd", rstd.len(), rows)?;
        ops::rmsnorm_bwd_inplace(g, y, rstd, dim);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut [f32],
        heads: usize,
        head_dim: usize,
        positions: &[i32],
        cos: &[f32],
        sin: &[f32],
        inverse: bool,
    ) -> Result<()> {
        let tokens = check_rows("rope", "x", x.len(), heads * head_dim)?;
        check_len("rope", "positions", positions.len(), tokens)?;
        let half = head_dim / 2;
        if !head_dim.is_multiple_of(2) || cos.len() != sin.len() {
            return Err(ComputeError::kernel("rope: odd head_dim or unequal tables"));
        }
        check_index("rope", positions, cos.len() / half.max(1))?;
        ops::rope_apply(x, heads, head_dim, positions, cos, sin, inverse);
        Ok(())
    }

    fn relu2(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        check_len("relu2", "y", y.len(), x.len())?;
        y.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK))
            .for_each(|(o, i)| {
                for (o, &x) in o.iter_mut().zip(i) {
                    let r = x.max(0.0);
                    *o = r * r;
                }
            });
        Ok(())
    }

    fn relu2_bwd(&self, g: &mut [f32], x: &[f32]) -> Result<()> {
        check_len("relu2_bwd", "x", x.len(), g.len())?;
        par_zip(g, x, |g, x| g * (2.0 * x.max(0.0)));
        Ok(())
    }

    fn attention(
        &self,
        s: AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        y: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        check_attn("attention", s, q, k, v)?;
        check_len("attention", "y", y.len(), q.len())?;
        check_len("attention", "lse", lse.len(), s.b * s.h * s.t)?;
        ops::attention_fwd(s, q, k, v, y, lse)
    }

    fn attention_bwd(
        &self,
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
        check_attn("attention_bwd", s, q, k, v)?;
        for (what, len) in [("y", y.len()), ("dy", dy.len()), ("dq", dq.len())] {
            check_len("attention_bwd", what, len, q.len())?;
        }
        check_len("attention_bwd", "dk", dk.len(), k.len())?;
        check_len("attention_bwd", "dv", dv.len(), v.len())?;
        check_len("attention_bwd", "lse", lse.len(), s.b * s.h * s.t)?;
        ops::attention_bwd(s, q, k, v, y, lse, dy, dq, dk, dv)
    }

    fn attention_decode(
        &self,
        s: DecodeShape,
        q: &[f32],
        positions: &[i32],
        rows: &[i32],
        k_cache: &[f32],
        v_cache: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let m = check_rows("attention_decode", "q", q.len(), s.h * s.d)?;
        check_len("attention_decode", "positions", positions.len(), m)?;
        check_len("attention_decode", "rows", rows.len(), m)?;
        check_len("attention_decode", "y", y.len(), q.len())?;
        check_len("attention_decode", "v_cache", v_cache.len(), k_cache.len())?;
        let cache_rows = check_rows(
            "attention_decode",
            "k_cache",
            k_cache.len(),
            s.capacity * s.hk * s.d,
        )?;
        check_index("attention_decode", rows, cache_rows)?;
        check_index("attention_decode", positions, s.capacity)?;
        if s.hk == 0 || !s.h.is_multiple_of(s.hk) {
            return Err(ComputeError::kernel(
                "attention_decode: heads not a multiple of kv heads",
            ));
        }
        ops::attention_cached(s, q, positions, rows, k_cache, v_cache, y);
        Ok(())
    }

    fn gemm(&self, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        check_len("gemm", "a", a.len(), g.m * g.k)?;
        check_len("gemm", "b", b.len(), g.k * g.n)?;
        check_len("gemm", "c", c.len(), g.m * g.n)?;
        match g.precision {
            Precision::F32 => gemm_f32(g, a, b, c),
            Precision::Bf16 => gemm_bf16_general(g, a, b, c),
        }
    }

    fn gemm_symmetric(&self, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        // The bf16 kernel skips the tiles below the diagonal; f32 (trueno, whole matrices only)
        // and scaled products take the full GEMM.
        if g.precision != Precision::Bf16 || g.m != g.n || g.alpha != 1.0 || g.beta != 0.0 {
            return self.gemm(g, a, b, c);
        }
        check_len("gemm_symmetric", "a", a.len(), g.m * g.k)?;
        check_len("gemm_symmetric", "b", b.len(), g.k * g.n)?;
        check_len("gemm_symmetric", "c", c.len(), g.m * g.n)?;
        let op = |t: bool| if t { Op::T } else { Op::N };
        let opts = GemmOpts {
            accumulate: false,
            parallel: true,
        };
        bf16::gemm_bf16_symmetric(op(g.ta), op(g.tb), g.n, g.k, a, b, c, opts)
    }

    fn update_weight_cache(
        &self,
        params: &[f32],
        layout: &[WeightSlot],
        precision: Precision,
        cache: &mut Option<CpuWeights>,
    ) -> Result<()> {
        let w = cache.get_or_insert_with(CpuWeights::default);
        w.transposed.resize_with(layout.len(), OnceLock::new);
        w.rows_bf16.resize_with(layout.len(), OnceLock::new);
        // Everything derived from the old weights goes; the packs are rebuilt from scratch.
        w.packs.clear();
        for r in &mut w.rows_bf16 {
            r.take();
        }
        if precision == Precision::Bf16 {
            for t in &mut w.transposed {
                t.take();
            }
            check_fits(weight_pack_bytes(layout), "bf16 weight packs")?;
            for s in layout {
                let p = &params[s.range()];
                // Forward `x·Wᵀ`: B = Wᵀ, i.e. W `[out, in]` read transposed (the same panels
                // as packing an `[in, out]` copy, without making one).
                w.packs.push(if s.matmul {
                    Some((
                        PackedB::new(Op::T, s.inp, s.out, p)?,
                        PackedB::new(Op::N, s.out, s.inp, p)?,
                    ))
                } else {
                    None
                });
            }
        } else {
            // f32 matmuls read the copies every call: build them now, reusing the allocations.
            for (s, t) in layout.iter().zip(&mut w.transposed) {
                if !s.matmul {
                    t.get_or_init(Vec::new);
                    continue;
                }
                let mut buf = match t.take() {
                    Some(v) if v.len() == s.len() => v,
                    _ => alloc_f32(s.len(), "transposed weight copy")?,
                };
                transpose(s.out, s.inp, &params[s.range()], &mut buf);
                let _ = t.set(buf);
            }
        }
        Ok(())
    }

    fn weight_cache_bytes(&self, layout: &[WeightSlot], precision: Precision) -> u64 {
        let copies: u64 = layout
            .iter()
            .filter(|s| s.matmul)
            .map(|s| 4 * s.len() as u64)
            .sum();
        let packs = if precision == Precision::Bf16 {
            weight_pack_bytes(layout)
        } else {
            0
        };
        copies + packs
    }

    fn scratch_bytes(&self, s: ScratchShape) -> u64 {
        // The f32 weight gradient transposes `dy` (at most the MLP's or the logit chunk's).
        let tn = 4 * (4 * s.width * s.rows).max(s.vocab * s.logit_rows) as u64;
        // bf16: per thread the pool of operand packs a GEMM call fills (the largest A, the
        // lm_head's `dlogits` chunk, and the largest B, the MLP activations).
        let packs = if s.precision == Precision::Bf16 {
            let per_thread =
                PackedB::bytes_for(s.logit_rows, s.vocab) + PackedB::bytes_for(s.rows, 4 * s.width);
            rayon::current_num_threads() as u64 * per_thread
        } else {
            0
        };
        // Attention: per thread, the backward's three T×T matrices and ten T×D head copies.
        let attn = rayon::current_num_threads() as u64
            * 4
            * (10 * s.t * s.head_dim + 3 * s.t * s.t) as u64;
        tn + packs + attn
    }

    fn linear(
        &self,
        w: WeightRef<'_, Self>,
        x: &[f32],
        y: &mut [f32],
        rows: usize,
        accumulate: bool,
        precision: Precision,
    ) -> Result<()> {
        let WeightSlot { out, inp, .. } = w.slot;
        check_len("linear", "x", x.len(), rows * inp)?;
        check_len("linear", "y", y.len(), rows * out)?;
        if rows <= FEW_ROWS {
            match precision {
                Precision::F32 => {
                    let wf = &w.params[w.slot.range()];
                    matmul_wt_few_rows(rows, out, inp, x, wf, y, accumulate);
                    return Ok(());
                }
                Precision::Bf16 => {
                    if let Some(w16) = w.cache.rows_bf16(w.index, w.params, w.slot) {
                        matmul_wt_few_rows_bf16(rows, out, inp, x, w16, y, accumulate);
                        return Ok(());
                    }
                }
            }
        }
        let pack = w.cache.packs.get(w.index).and_then(Option::as_ref);
        match (precision, pack) {
            (Precision::Bf16, Some((fwd, _))) => gemm_bf16_prepacked_with(
                Op::N,
                rows,
                x,
                fwd,
                y,
                GemmOpts {
                    accumulate,
                    parallel: true,
                },
            ),
            _ => matmul_nn(
                precision,
                rows,
                out,
                inp,
                x,
                w.cache.transposed(w.index, w.params, w.slot)?,
                y,
                accumulate,
            ),
        }
    }

    fn linear3(
        &self,
        ws: [WeightRef<'_, Self>; 3],
        x: &[f32],
        ys: [&mut [f32]; 3],
        rows: usize,
        precision: Precision,
    ) -> Result<()> {
        // Decoding: the three GEMVs in one parallel loop, from the weights `linear` would use.
        fn decode_weights(w: WeightRef<'_, Cpu>, precision: Precision) -> Option<GemvWeights<'_>> {
            match precision {
                Precision::F32 => Some(GemvWeights::F32(&w.params[w.slot.range()])),
                Precision::Bf16 => w
                    .cache
                    .rows_bf16(w.index, w.params, w.slot)
                    .map(GemvWeights::Bf16),
            }
        }
        let inp = ws[0].slot.inp;
        let fused: Option<Vec<GemvWeights<'_>>> = ws
            .iter()
            .map(|&w| {
                decode_weights(w, precision).filter(|_| rows <= FEW_ROWS && w.slot.inp == inp)
            })
            .collect();
        let Some(fused) = fused else {
            for (w, y) in ws.into_iter().zip(ys) {
                self.linear(w, x, y, rows, false, precision)?;
            }
            return Ok(());
        };
        check_len("linear3", "x", x.len(), rows * inp)?;
        let mut jobs = Vec::with_capacity(3);
        for ((w, y), gw) in ws.iter().zip(ys).zip(fused) {
            check_len("linear3", "y", y.len(), rows * w.slot.out)?;
            jobs.push(GemvJob {
                w: gw,
                out: w.slot.out,
                y,
            });
        }
        kernels::matmul_wt_few_rows_many(rows, inp, x, &mut jobs, false);
        Ok(())
    }

    fn linear_bwd_input(
        &self,
        w: WeightRef<'_, Self>,
        dy: &[f32],
        dx: &mut [f32],
        rows: usize,
        accumulate: bool,
        precision: Precision,
    ) -> Result<()> {
        let WeightSlot { out, inp, .. } = w.slot;
        check_len("linear_bwd_input", "dy", dy.len(), rows * out)?;
        check_len("linear_bwd_input", "dx", dx.len(), rows * inp)?;
        let pack = w.cache.packs.get(w.index).and_then(Option::as_ref);
        match (precision, pack) {
            (Precision::Bf16, Some((_, bwd))) => gemm_bf16_prepacked_with(
                Op::N,
                rows,
                dy,
                bwd,
                dx,
                GemmOpts {
                    accumulate,
                    parallel: true,
                },
            ),
            _ => matmul_nn(
                precision,
                rows,
                inp,
                out,
                dy,
                &w.params[w.slot.range()],
                dx,
                accumulate,
            ),
        }
    }

    fn linear_bwd_weight(
        &self,
        dy: &[f32],
        x: &[f32],
        dw: &mut [f32],
        rows: usize,
        out: usize,
        inp: usize,
        precision: Precision,
    ) -> Result<()> {
        check_len("linear_bwd_weight", "dy", dy.len(), rows * out)?;
        check_len("linear_bwd_weight", "x", x.len(), rows * inp)?;
        check_len("linear_bwd_weight", "dw", dw.len(), out * inp)?;
        TN_SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if precision == Precision::F32 && scratch.len() < out * rows {
                scratch.resize(out * rows, 0.0);
            }
            matmul_tn_acc(precision, out, inp, rows, dy, x, dw, &mut scratch)
        })
    }

    fn softcap_ce(
        &self,
        logits: &mut [f32],
        rows: usize,
        vocab: usize,
        padded: usize,
        targets: &[i32],
        softcap: Option<f32>,
        grad_scale: Option<f32>,
        losses: &mut [f32],
    ) -> Result<()> {
        check_len("softcap_ce", "logits", logits.len(), rows * padded)?;
        check_len("softcap_ce", "targets", targets.len(), rows)?;
        check_len("softcap_ce", "losses", losses.len(), rows)?;
        if vocab > padded {
            return Err(ComputeError::kernel(
                "softcap_ce: vocab exceeds the padded row",
            ));
        }
        if let Some(&bad) = targets.iter().find(|&&t| t < -1 || t >= vocab as i32) {
            return Err(ComputeError::kernel(format!(
                "softcap_ce: target {bad} outside -1..{vocab}"
            )));
        }
        let avx = kernels::has_avx2();
        logits
            .par_chunks_mut(padded)
            .zip(losses.par_iter_mut())
            .zip(targets.par_iter())
            .with_min_len(CE_ROWS_PER_TASK)
            .for_each(|((row, loss), &t)| {
                *loss = ops::with_task_scratch(vocab, |exps| {
                    ce_row(avx, row, vocab, t, softcap, grad_scale, exps)
                }) as f32;
            });
        Ok(())
    }

    fn sum(&self, x: &[f32]) -> Result<f64> {
        Ok(sum_f64(x, |v| v))
    }

    fn sum_squares(&self, x: &[f32]) -> Result<f64> {
        Ok(sum_f64(x, |v| v * v))
    }

    fn scale(&self, x: &mut [f32], s: f32) -> Result<()> {
        par_map(x, |v| v * s);
        Ok(())
    }

    fn adamw(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        h: AdamWStep,
    ) -> Result<()> {
        for (what, len) in [
            ("grad", g.len()),
            ("exp_avg", m.len()),
            ("exp_avg_sq", v.len()),
        ] {
            check_len("adamw", what, len, p.len())?;
        }
        let kernel = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
            for i in 0..p.len() {
                let gi = g[i];
                // lerp form, as torch: m += (1-β1)(g-m)
                let mi = m[i] + (1.0 - h.beta1) * (gi - m[i]);
                let vi = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                let denom = vi.sqrt() * h.inv_bc2_sqrt + h.eps;
                p[i] = p[i] * h.decay - h.step_size * mi / denom;
            }
        };
        if p.len() <= PAR_CHUNK {
            kernel(p, m, v, g);
        } else {
            p.par_chunks_mut(PAR_CHUNK)
                .zip(m.par_chunks_mut(PAR_CHUNK))
                .zip(v.par_chunks_mut(PAR_CHUNK))
                .zip(g.par_chunks(PAR_CHUNK))
                .for_each(|(((p, m), v), g)| kernel(p, m, v, g));
        }
        Ok(())
    }

    fn muon_momentum(
        &self,
        buf: &mut [f32],
        g: &[f32],
        u: &mut [f32],
        momentum: f32,
        nesterov: bool,
        round: bool,
    ) -> Result<()> {
        check_len("muon_momentum", "grad", g.len(), buf.len())?;
        check_len("muon_momentum", "update", u.len(), buf.len())?;
        let mu = momentum;
        let rnd = |v: f32| if round { round_bf16(v) } else { v };
        buf.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .zip(u.par_chunks_mut(PAR_CHUNK))
            .for_each(|((buf, g), u)| {
                for ((b, &g), u) in buf.iter_mut().zip(g).zip(u.iter_mut()) {
                    let nb = *b + (1.0 - mu) * (g - *b);
                    *b = nb;
                    *u = rnd(if nesterov { g + mu * (nb - g) } else { nb });
                }
            });
        Ok(())
    }

    fn transpose(&self, src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) -> Result<()> {
        check_len("transpose", "source", src.len(), rows * cols)?;
        check_len("transpose", "destination", dst.len(), rows * cols)?;
        transpose(rows, cols, src, dst);
        Ok(())
    }

    fn frobenius_normalize(&self, x: &mut [f32], eps: f32, round: bool) -> Result<()> {
        let rnd = |v: f32| if round { round_bf16(v) } else { v };
        let norm = sum_f64(x, |v| v * v).sqrt();
        let denom = rnd(rnd(norm as f32) + eps);
        if round {
            par_round_map(x, &[], RoundMap::Div(denom));
        } else {
            par_map(x, |v| v / denom);
        }
        Ok(())
    }

    fn scale_copy(&self, src: &[f32], dst: &mut [f32], s: f32, round: bool) -> Result<()> {
        check_len("scale_copy", "destination", dst.len(), src.len())?;
        if round {
            par_round_map(dst, src, RoundMap::Scale(s));
        } else {
            par_zip(dst, src, |_, x| s * x);
        }
        Ok(())
    }

    fn axpby(
        &self,
        dst: &mut [f32],
        alpha: f32,
        src: &[f32],
        beta: f32,
        round: bool,
    ) -> Result<()> {
        check_len("axpby", "source", src.len(), dst.len())?;
        if round {
            par_round_map(dst, src, RoundMap::Axpby { alpha, beta });
        } else {
            par_zip(dst, src, |d, x| beta * x + alpha * d);
        }
        Ok(())
    }

    fn round_bf16(&self, x: &mut [f32]) -> Result<()> {
        par_round_map(x, &[], RoundMap::Round);
        Ok(())
    }
}

pub(crate) fn check_attn(op: &str, s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
    if s.hk == 0 || !s.h.is_multiple_of(s.hk) {
        return Err(ComputeError::kernel(format!(
            "{op}: {} heads are not a multiple of {} kv heads",
            s.h, s.hk
        )));
    }
    check_len(op, "q", q.len(), s.b * s.t * s.h * s.d)?;
    check_len(op, "k", k.len(), s.b * s.t * s.hk * s.d)?;
    check_len(op, "v", v.len(), s.b * s.t * s.hk * s.d)
}

/// One row of [`Backend::softcap_ce`], through the AVX2+FMA build of the row kernel when the
/// CPU has it.
#[inline(always)]
fn ce_row(
    avx: bool,
    row: &mut [f32],
    vocab: usize,
    target: i32,
    softcap: Option<f32>,
    grad_scale: Option<f32>,
    exps: &mut [f32],
) -> f64 {
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
            ops::softcapped_ce_row(row, v, t, s, g, e)
        }
        // SAFETY: AVX2+FMA present.
        return unsafe { row_avx2(row, vocab, target, softcap, grad_scale, exps) };
    }
    let _ = avx;
    ops::softcapped_ce_row(row, vocab, target, softcap, grad_scale, exps)
}
