//! bfloat16 GEMM with f32 accumulation: `C += op(A)·op(B)` where the f32 operands are rounded to
//! bf16 (round to nearest even) while they are packed.
//!
//! # Why
//! On x86 with AVX-512 BF16 (Zen 4, Sapphire Rapids) one `VDPBF16PS` on a zmm register does 16
//! lanes × 2 products × (mul + add) = 64 FLOPs, against 32 for an f32 `VFMADD` on the same
//! register, at the same issue rate. An f32 GEMM on a 2-core Zen 4 tops out near 210 GFLOP/s, so
//! training that needs more than that (3× PyTorch at depth 8 needs ~270) must do its matmuls in
//! bf16: the route the reference takes on GPUs with `torch.autocast(dtype=bfloat16)`, and what
//! its Muon does for Newton–Schulz (bf16 inputs, f32 accumulation).
//!
//! # How (BLIS-style)
//! * Both operands are packed once per call into *pair panels*: `A` into panels of [`MR`] rows,
//!   `B` into panels of [`NR`] columns, with two consecutive `k` entries side by side in one
//!   32-bit word (the operand layout of `VDPBF16PS`). The f32 → bf16 conversion happens in the
//!   packing pass, so every input element is read once and rounded once; the `O(m·n·k)` loop
//!   only ever sees bf16 pairs. Packing reads `A`/`B` whichever way they are stored (`N` or
//!   `T`), so `Aᵀ·B` and `A·Bᵀ` need no transposed copy.
//! * The micro-kernel keeps a 14×32 tile of `C` in 28 zmm accumulators; per pair of `k` it loads
//!   two B vectors (64 bytes each) and broadcasts 14 A pairs straight from memory (folded into
//!   the instruction as `{1to16}`), so it issues 28 `VDPBF16PS` per 16 loads: compute-bound, and
//!   28 independent accumulators hide the instruction latency (≈6 cycles) several times over.
//! * `k` is blocked by [`KC_PAIRS`] pairs. Within a block, one A micro-panel (256 pairs × 56 B
//!   = 14 KiB) stays in L1 while the task's B micro-panels (32 KiB each) stream past it from L2;
//!   the long k block keeps the per-tile load and store of `C` rare. (B held in L1 against
//!   streaming A panels, with 128-pair blocks, measured 181 against 208 GFLOP/s on one core.)
//! * Parallelism: rayon over a grid of `C` blocks ([`MC`] × [`NCB`]); each block is owned by one
//!   task, and every element of `C` is summed in the same order whatever the thread count, so
//!   results are bit-reproducible across thread counts on the same machine.
//!
//! # Portable fallback
//! Without AVX-512 BF16 the same numerics come from rounding the inputs to bf16 (identical bits
//! to the packing pass) and running the f32 GEMM: a product of two bf16 values is exact in f32,
//! so the two paths differ only in the order of the f32 additions.

use std::cell::Cell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{ComputeError, Result};

/// Rows of `C` per micro-kernel tile.
pub const MR: usize = 14;
/// Columns of `C` per micro-kernel tile (two zmm registers of f32).
pub const NR: usize = 32;
/// `k` pairs per block (512 values of `k`): an A micro-panel of 14 KiB, under half of Zen 4's
/// 32 KiB L1D.
pub const KC_PAIRS: usize = 256;
/// Rows of `C` per parallel task (4 micro-tiles).
pub const MC: usize = 4 * MR;
/// Columns of `C` per parallel task (8 micro-tiles).
pub const NCB: usize = 8 * NR;

/// How an operand is stored, BLAS-style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// As the product wants it: `A` is `[m, k]`, `B` is `[k, n]`, row-major.
    N,
    /// Transposed: `A` is stored `[k, m]`, `B` is stored `[n, k]`, row-major.
    T,
}

/// The bf16 bit pattern of `x` as `VCVTNE2PS2BF16` produces it: round to nearest even,
/// subnormal inputs become signed zero, NaNs stay (quiet) NaNs.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    if bits & 0x7f80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// `x` rounded to bf16 (see [`bf16_bits`]) and widened back to f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// Element-wise `x ← rnd(f(x, y))` maps of Muon's bf16 Newton–Schulz, vectorised with
/// `VCVTNEPS2BF16` where the CPU has AVX-512 BF16 (the same rounding as [`bf16_bits`], which
/// emulates that instruction, and the same IEEE products and sums: bit-identical results).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoundMap {
    /// `x ← rnd(x)`.
    Round,
    /// `x ← rnd(s·y)`.
    Scale(f32),
    /// `x ← rnd(x / d)`.
    Div(f32),
    /// `x ← rnd(rnd(beta·y) + rnd(alpha·x))`.
    Axpby {
        /// Scale of `x`.
        alpha: f32,
        /// Scale of `y`.
        beta: f32,
    },
}

impl RoundMap {
    #[inline(always)]
    fn scalar(self, x: f32, y: f32) -> f32 {
        match self {
            RoundMap::Round => round_bf16(x),
            RoundMap::Scale(s) => round_bf16(s * y),
            RoundMap::Div(d) => round_bf16(x / d),
            RoundMap::Axpby { alpha, beta } => {
                round_bf16(round_bf16(beta * y) + round_bf16(alpha * x))
            }
        }
    }

    /// Applies the map to one chunk; `y` (same length as `x`) is read by `Scale` and `Axpby`
    /// only (pass `x`'s length of anything, or an empty slice for the others).
    pub fn apply(self, x: &mut [f32], y: &[f32]) {
        let needs_y = matches!(self, RoundMap::Scale(_) | RoundMap::Axpby { .. });
        assert!(!needs_y || y.len() == x.len(), "RoundMap::apply: lengths");
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            // SAFETY: AVX-512 F/BW/BF16 present; lengths checked.
            unsafe { avx512::round_map(self, x, if needs_y { y } else { &[] }) };
            return;
        }
        if needs_y {
            x.iter_mut()
                .zip(y)
                .for_each(|(v, &w)| *v = self.scalar(*v, w));
        } else {
            x.iter_mut().for_each(|v| *v = self.scalar(*v, 0.0));
        }
    }
}

/// Whether the AVX-512 BF16 kernel runs on this CPU. Detected once; setting
/// `NANOCHAT_PORTABLE_BF16=1` forces the portable path (for testing and benchmarking it).
pub fn has_avx512_bf16() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        if std::env::var_os("NANOCHAT_PORTABLE_BF16").is_some_and(|v| v != "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

fn check_lengths((m, n, k): (usize, usize, usize), a: &[f32], b: &[f32], c: &[f32]) -> Result<()> {
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        return Err(ComputeError::Kernel(format!(
            "bf16 gemm {m}x{n}x{k}: operand lengths {} {} {} (want {} {} {})",
            a.len(),
            b.len(),
            c.len(),
            m * k,
            k * n,
            m * n
        )));
    }
    Ok(())
}

/// How a GEMM treats `C` and the thread pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmOpts {
    /// `C += A·B` when true; `C = A·B` when false (the kernel then never reads `C`, which saves
    /// the zero-fill pass and the cold loads of `C` that a `+=` on fresh output would cost).
    pub accumulate: bool,
    /// Split the work over rayon's pool when it is large enough. Off for callers that are
    /// already one task of a parallel loop (attention heads), where nesting only adds
    /// fork/join overhead.
    pub parallel: bool,
}

impl Default for GemmOpts {
    fn default() -> Self {
        GemmOpts {
            accumulate: true,
            parallel: true,
        }
    }
}

/// `c += op(a)·op(b)` in bf16 with f32 accumulation; `c` is `[m, n]` row-major. Uses the
/// AVX-512 BF16 kernel when the CPU has it, else [`gemm_bf16_portable`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    op_a: Op,
    op_b: Op,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<()> {
    gemm_bf16_with(op_a, op_b, m, n, k, a, b, c, GemmOpts::default())
}

/// [`gemm_bf16`] with explicit [`GemmOpts`] (overwrite instead of accumulate, serial).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_with(
    op_a: Op,
    op_b: Op,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    opts: GemmOpts,
) -> Result<()> {
    check_lengths((m, n, k), a, b, c)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !opts.accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU supports AVX-512 F/BW/BF16 (checked above); lengths checked.
        return unsafe {
            avx512::gemm_with(op_a, m, n, k, a, avx512::BOperand::Raw(op_b, b), c, opts)
        };
    }
    if !opts.accumulate {
        c.fill(0.0);
    }
    gemm_bf16_portable(op_a, op_b, m, n, k, a, b, c)
}

/// `c = op(a)·op(b)` (`n × n`, or `c +=` with `opts.accumulate`) for a product the caller
/// knows to be symmetric: `X·Xᵀ`, or `S·T` of two symmetric matrices that commute (`A·A`).
/// Only the tiles that touch the upper triangle (`j ≥ i`) are multiplied, about half the
/// FLOPs of [`gemm_bf16_with`] for a large `n`; the strictly lower triangle is then copied from
/// the upper one. Where the product is exactly symmetric in f32 (`X·Xᵀ`: every `c[i,j]` and
/// `c[j,i]` sums the same products in the same order) the result is bit-identical to the full
/// GEMM's; otherwise (`rnd(s·A)·A`) the lower triangle is the upper one's mirror rather than its
/// own rounding.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_symmetric(
    op_a: Op,
    op_b: Op,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    opts: GemmOpts,
) -> Result<()> {
    check_lengths((n, n, k), a, b, c)?;
    if n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !opts.accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU supports AVX-512 F/BW/BF16 (checked above); lengths checked.
        unsafe {
            avx512::gemm_upper(op_a, n, k, a, avx512::BOperand::Raw(op_b, b), c, opts)?;
        }
        mirror_upper(n, c, opts.parallel);
        return Ok(());
    }
    if !opts.accumulate {
        c.fill(0.0);
    }
    gemm_bf16_portable(op_a, op_b, n, n, k, a, b, c)?;
    mirror_upper(n, c, opts.parallel);
    Ok(())
}

/// `c[i, j] = c[j, i]` for every `j < i` of the row-major `n × n` matrix `c` (the strictly
/// lower triangle becomes the mirror of the upper one), in 64 × 64 blocks so that both the rows
/// written and the columns read stay in cache.
pub fn mirror_upper(n: usize, c: &mut [f32], parallel: bool) {
    assert_eq!(
        c.len(),
        n * n,
        "mirror_upper: {} elements for {n}x{n}",
        c.len()
    );
    const BS: usize = 64;
    let out = SharedMut(c.as_mut_ptr());
    let rows = |bi: usize| {
        let (i0, i1) = (bi * BS, ((bi + 1) * BS).min(n));
        for j0 in (0..i1).step_by(BS) {
            for i in i0..i1 {
                let p = out.get();
                for j in j0..(j0 + BS).min(i) {
                    // SAFETY: i, j < n; this task writes only (i, j) with j < i in its own rows
                    // and reads only (j, i) with j < i, the upper triangle, which no task writes.
                    unsafe { *p.add(i * n + j) = *p.add(j * n + i) };
                }
            }
        }
    };
    let blocks = n.div_ceil(BS);
    if parallel && n >= 256 && rayon::current_num_threads() > 1 {
        (0..blocks).into_par_iter().for_each(rows);
    } else {
        (0..blocks).for_each(rows);
    }
}

/// The output of [`mirror_upper`] shared between its tasks (disjoint writes, see there).
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint elements and read only elements nobody writes.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// The portable path of [`gemm_bf16`]: round both operands to bf16 (bit-identical to the
/// packing of the AVX-512 path), lay them out row-major, and run the f32 GEMM. Allocates two
/// temporaries per call: it exists for CPUs without BF16 instructions and as the test oracle.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_portable(
    op_a: Op,
    op_b: Op,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<()> {
    check_lengths((m, n, k), a, b, c)?;
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let ar = rounded_row_major(op_a == Op::T, m, k, a);
    let br = rounded_row_major(op_b == Op::T, k, n, b);
    // Through the f32 kernel interface, not trueno directly: it keeps ragged row tiles off
    // trueno's scalar edge kernel.
    super::kernels::gemm_acc(m, n, k, &ar, &br, c)
}

/// A `B` operand converted and packed once, for GEMMs that reuse it (model weights between
/// optimizer steps): [`gemm_bf16_prepacked`] then skips the packing pass, which for a weight
/// multiplied by a few hundred rows (the lm_head, chunked over rows) costs as much memory
/// traffic as the product itself. Holds `k·n` bf16 values (half the f32 size).
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    repr: PackedRepr,
}

#[derive(Debug, Clone)]
enum PackedRepr {
    /// Pair panels for the AVX-512 kernel, starting at `off` (64-byte aligned).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Panels { words: Vec<u32>, off: usize },
    /// Rounded row-major `[k, n]` copy for the portable path.
    Rounded(Vec<f32>),
}

impl PackedB {
    /// Bytes a pack of a `k × n` operand takes on this CPU (the panels of the AVX-512 path, or
    /// the rounded f32 copy of the portable one); also an upper bound for the per-call packs
    /// of a GEMM operand with `k` and `n` lanes.
    pub fn bytes_for(k: usize, n: usize) -> u64 {
        if has_avx512_bf16() {
            ((n.div_ceil(NR) * k.div_ceil(2) * NR + 16) * 4) as u64
        } else {
            (k * n * 4) as u64
        }
    }

    /// Packs `b` (`[k, n]` for [`Op::N`], stored `[n, k]` for [`Op::T`]). An allocation failure
    /// is an [`ComputeError::OutOfMemory`] error, not an abort.
    pub fn new(op_b: Op, k: usize, n: usize, b: &[f32]) -> Result<Self> {
        if b.len() != k * n {
            return Err(ComputeError::Kernel(format!(
                "bf16 pack {k}x{n}: operand length {} (want {})",
                b.len(),
                k * n
            )));
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            let len = n.div_ceil(NR) * k.div_ceil(2) * NR;
            let mut words: Vec<u32> = Vec::new();
            words.try_reserve_exact(len + 16).map_err(|_| {
                ComputeError::oom(
                    format!("bf16 weight pack {k}x{n}"),
                    ((len + 16) * 4) as u64,
                    crate::host::available_memory(),
                )
            })?;
            words.resize(len + 16, 0);
            let off = words.as_ptr().align_offset(64).min(16);
            // SAFETY: AVX-512 BF16 present; `b` holds k·n values; the slice is sized for them.
            unsafe { avx512::pack_b(op_b, k, n, b, &mut words[off..off + len]) };
            return Ok(PackedB {
                k,
                n,
                repr: PackedRepr::Panels { words, off },
            });
        }
        Ok(PackedB {
            k,
            n,
            repr: PackedRepr::Rounded(rounded_row_major(op_b == Op::T, k, n, b)),
        })
    }

    /// `(k, n)` of the product this operand was packed for.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// `c += op(a)·B` with `B` packed by [`PackedB::new`]; same numerics as [`gemm_bf16`].
pub fn gemm_bf16_prepacked(
    op_a: Op,
    m: usize,
    a: &[f32],
    b: &PackedB,
    c: &mut [f32],
) -> Result<()> {
    gemm_bf16_prepacked_with(op_a, m, a, b, c, GemmOpts::default())
}

/// [`gemm_bf16_prepacked`] with explicit [`GemmOpts`].
pub fn gemm_bf16_prepacked_with(
    op_a: Op,
    m: usize,
    a: &[f32],
    b: &PackedB,
    c: &mut [f32],
    opts: GemmOpts,
) -> Result<()> {
    let (k, n) = (b.k, b.n);
    if a.len() != m * k || c.len() != m * n {
        return Err(ComputeError::Kernel(format!(
            "bf16 gemm {m}x{n}x{k} (prepacked B): operand lengths {} {} (want {} {})",
            a.len(),
            c.len(),
            m * k,
            m * n
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 || !matches!(b.repr, PackedRepr::Panels { .. }) {
        if !opts.accumulate {
            c.fill(0.0);
        }
        if k == 0 {
            return Ok(());
        }
    }
    match &b.repr {
        #[cfg(target_arch = "x86_64")]
        PackedRepr::Panels { words, off } => {
            let len = n.div_ceil(NR) * k.div_ceil(2) * NR;
            let panels = &words[*off..*off + len];
            // SAFETY: panels exist only when the CPU has AVX-512 BF16; lengths checked.
            unsafe {
                avx512::gemm_with(op_a, m, n, k, a, avx512::BOperand::Packed(panels), c, opts)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        PackedRepr::Panels { .. } => unreachable!("panels are only built on x86_64"),
        PackedRepr::Rounded(br) => {
            let ar = rounded_row_major(op_a == Op::T, m, k, a);
            trueno::blis::gemm(m, n, k, &ar, br, c)
                .map_err(|e| ComputeError::Kernel(format!("bf16 gemm (portable): {e}")))
        }
    }
}

/// `rows × cols` row-major copy of `x` (stored transposed when `transposed`), rounded to bf16.
fn rounded_row_major(transposed: bool, rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    if transposed {
        let mut out = vec![0f32; rows * cols];
        super::kernels::transpose(cols, rows, x, &mut out);
        out.par_iter_mut().for_each(|v| *v = round_bf16(*v));
        out
    } else {
        x.par_iter().map(|&v| round_bf16(v)).collect()
    }
}

/// Packed bf16 pairs of one operand: `panels` panels of `width` lanes, each `kp` pairs deep
/// (`[panel][pair][lane]`, one `u32` = two bf16 along `k`, the even `k` in the low half).
/// Reused through a thread-local pool so a GEMM allocates nothing in steady state.
struct PackBuf {
    buf: Vec<u32>,
    off: usize,
    len: usize,
}

thread_local! {
    static POOL: Cell<Vec<Vec<u32>>> = const { Cell::new(Vec::new()) };
}

impl PackBuf {
    /// A buffer of `len` words whose start is 64-byte aligned (every B pair row is then two
    /// whole cache lines). Contents are unspecified: packing writes every word, padding included.
    fn take(len: usize) -> Result<Self> {
        // Best fit from the pool: the smallest buffer that is large enough, else the largest
        // (grown once). After the first step of a training loop the pool holds buffers for the
        // largest operands and no call allocates or page-faults again.
        let need = len + 16;
        let mut buf = POOL.with(|p| {
            let mut v = p.take();
            let pick = v
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= need)
                .min_by_key(|(_, b)| b.len())
                .or_else(|| v.iter().enumerate().max_by_key(|(_, b)| b.len()))
                .map(|(i, _)| i);
            let b = pick.map(|i| v.swap_remove(i)).unwrap_or_default();
            p.set(v);
            b
        });
        if buf.len() < need {
            // Operand packs reach tens of MB (the lm_head's dlogits chunk): a failed allocation
            // is an error for the caller, not an abort.
            buf.try_reserve_exact(need - buf.len()).map_err(|_| {
                ComputeError::oom(
                    "bf16 GEMM operand pack",
                    (need * 4) as u64,
                    crate::host::available_memory(),
                )
            })?;
            buf.resize(need, 0);
        }
        let off = buf.as_ptr().align_offset(64).min(16);
        Ok(PackBuf { buf, off, len })
    }

    fn slice(&self) -> &[u32] {
        &self.buf[self.off..self.off + self.len]
    }

    fn slice_mut(&mut self) -> &mut [u32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl Drop for PackBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        POOL.with(|p| {
            let mut v = p.take();
            // Two operands per GEMM; a nested GEMM (rayon work stealing) may briefly hold more.
            if v.len() < 4 {
                v.push(buf);
            }
            p.set(v);
        });
    }
}

/// Scalar packing of one panel (test oracle for the vector packers and the tail-free
/// reference of the layout): lane `j` of pair `q` holds `x(2q, j)` (low) and `x(2q+1, j)`.
#[cfg(test)]
fn pack_panel_scalar(
    get: impl Fn(usize, usize) -> f32,
    k: usize,
    lanes: usize,
    width: usize,
    out: &mut [u32],
) {
    let kp = k.div_ceil(2);
    for q in 0..kp {
        for j in 0..width {
            let v = |kk: usize| {
                if kk < k && j < lanes {
                    u32::from(bf16_bits(get(kk, j)))
                } else {
                    0
                }
            };
            out[q * width + j] = v(2 * q) | (v(2 * q + 1) << 16);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Op, PackBuf, KC_PAIRS, MC, MR, NCB, NR};

    /// Shares the output pointer between tasks that write disjoint blocks of `C`.
    #[derive(Clone, Copy)]
    struct OutPtr(*mut f32);
    // SAFETY: every task writes a distinct block of C (see `gemm`).
    unsafe impl Send for OutPtr {}
    unsafe impl Sync for OutPtr {}
    impl OutPtr {
        /// A method (not field access), so closures capture the `Sync` wrapper, not the pointer.
        fn get(&self) -> *mut f32 {
            self.0
        }
    }

    /// The packed-panel buffer shared between packing tasks that write disjoint pair ranges.
    #[derive(Clone, Copy)]
    struct OutPtr32(*mut u32);
    // SAFETY: every task writes a distinct range of pairs (see `pack`).
    unsafe impl Send for OutPtr32 {}
    unsafe impl Sync for OutPtr32 {}
    impl OutPtr32 {
        fn get(&self) -> *mut u32 {
            self.0
        }
    }

    #[inline(always)]
    fn lane_mask(count: usize) -> u16 {
        if count >= 16 {
            0xffff
        } else {
            ((1u32 << count) - 1) as u16
        }
    }

    /// Packs pairs `q_lo..q_hi` of *every* panel of an operand whose `k` index is the *row* of
    /// its storage (`B` as `[k, n]`, or `A` stored `[k, m]`): element `(kk, j)` is
    /// `src[kk·ld + j]`, and panel `p` starts at `out + p·per_panel`. Two rows are loaded,
    /// converted by one `VCVTNE2PS2BF16` and interleaved into pairs by one `VPERMW`.
    ///
    /// The loop runs along the rows (all panels of one pair of rows, then the next pair), not
    /// down one panel at a time: a panel is only 14 or 32 values wide, so walking one down the
    /// rows touched a new page per row (a TLB miss each for rows of a few KB) and, for
    /// 14-wide A panels, read every cache line twice. Along the rows the reads are sequential
    /// and each panel receives a contiguous run of pairs.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_k_rows(
        src: &[f32],
        ld: usize,
        k: usize,
        lanes: usize,
        width: usize,
        (q_lo, q_hi): (usize, usize),
        out: *mut u32,
        per_panel: usize,
    ) {
        let panels = lanes.div_ceil(width);
        // Word i of the result takes bf16 i (row 2q) and bf16 16+i (row 2q+1).
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        let p = src.as_ptr();
        for q in q_lo..q_hi {
            let (r0, r1) = (2 * q, 2 * q + 1);
            for panel in 0..panels {
                let j0 = panel * width;
                let jn = (lanes - j0).min(width);
                let o = out.add(panel * per_panel + q * width);
                for c0 in (0..width).step_by(16) {
                    let cnt = jn.saturating_sub(c0).min(16);
                    let lm = lane_mask(cnt);
                    let x0 = if cnt > 0 {
                        _mm512_maskz_loadu_ps(lm, p.add(r0 * ld + j0 + c0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let x1 = if cnt > 0 && r1 < k {
                        _mm512_maskz_loadu_ps(lm, p.add(r1 * ld + j0 + c0))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let bh: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                    let pairs = _mm512_permutexvar_epi16(idx, bh);
                    let store_mask = lane_mask(width - c0);
                    _mm512_mask_storeu_epi32(o.add(c0) as *mut i32, store_mask, pairs);
                }
            }
        }
    }

    /// Packs panel `panel` of an operand whose `k` index is the *column* of its storage (`A` as
    /// `[m, k]`, or `B` stored `[n, k]`): element `(kk, j)` is `src[j·ld + kk]`. 16 consecutive
    /// `k` of one lane convert to 8 ready-made pairs, which are then scattered down the panel
    /// (stride `width`); the 8 target rows of the panel stay in L1 while all lanes fill them.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_k_cols(
        src: &[f32],
        ld: usize,
        k: usize,
        lanes: usize,
        width: usize,
        panel: usize,
        out: &mut [u32],
    ) {
        let kp = k.div_ceil(2);
        let j0 = panel * width;
        let jn = lanes.saturating_sub(j0).min(width);
        let p = src.as_ptr();
        let mut tmp = [0u32; 8];
        for q0 in (0..kp).step_by(8) {
            let k0 = 2 * q0;
            let lm = lane_mask(k - k0);
            let qn = (kp - q0).min(8);
            for j in 0..width {
                if j < jn {
                    let x = _mm512_maskz_loadu_ps(lm, p.add((j0 + j) * ld + k0));
                    let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
                    _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, h);
                    for (t, &w) in tmp.iter().enumerate().take(qn) {
                        *out.get_unchecked_mut((q0 + t) * width + j) = w;
                    }
                } else {
                    for t in 0..qn {
                        *out.get_unchecked_mut((q0 + t) * width + j) = 0;
                    }
                }
            }
        }
    }

    /// Packs every panel of one operand into `out` (`[panel][pair][lane]`), in parallel.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack(
        k_is_row: bool,
        src: &[f32],
        ld: usize,
        k: usize,
        lanes: usize,
        width: usize,
        out: &mut [u32],
        parallel: bool,
    ) {
        let per_panel = k.div_ceil(2) * width;
        if k_is_row {
            // Tasks own ranges of pairs (rows of the source), across all panels.
            let kp = k.div_ceil(2);
            let dst = OutPtr32(out.as_mut_ptr());
            // SAFETY: the caller checked the CPU features and that `src` holds k × lanes values
            // and `out` all panels; tasks write disjoint pair ranges of every panel.
            let rows = |(q_lo, q_hi): (usize, usize)| unsafe {
                pack_k_rows(src, ld, k, lanes, width, (q_lo, q_hi), dst.get(), per_panel)
            };
            const PAIRS_PER_TASK: usize = 16;
            if parallel && kp > PAIRS_PER_TASK {
                (0..kp.div_ceil(PAIRS_PER_TASK))
                    .into_par_iter()
                    .for_each(|t| rows((t * PAIRS_PER_TASK, ((t + 1) * PAIRS_PER_TASK).min(kp))));
            } else {
                rows((0, kp));
            }
            return;
        }
        let one = |(panel, dst): (usize, &mut [u32])| {
            // SAFETY: the caller checked the CPU features and that `src` holds k × lanes values.
            unsafe { pack_k_cols(src, ld, k, lanes, width, panel, dst) }
        };
        if parallel {
            out.par_chunks_mut(per_panel).enumerate().for_each(one);
        } else {
            out.chunks_mut(per_panel).enumerate().for_each(one);
        }
    }

    /// `C[0..mr, 0..nr] += A_panel · B_panel` over `kp` pairs; `c` has row stride `ldc`.
    /// `a`: `kp × MR` words, `b`: `kp × NR` words (both 64-byte aligned for `b`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn micro_kernel(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
    ) {
        let m0 = lane_mask(nr);
        let m1 = lane_mask(nr.saturating_sub(16));
        // The rows are spelled out as literals so every accumulator index is a constant and
        // the 28 accumulators live in registers (an array indexed in a loop might not).
        macro_rules! tile {
            ($($i:literal),*) => {{
                // acc[i] = (C[i, 0..16], C[i, 16..32]), loaded so the kernel accumulates in place
                // (or zero when C is being overwritten and this is the first k block).
                let mut acc: [(__m512, __m512); MR] = [(_mm512_setzero_ps(), _mm512_setzero_ps()); MR];
                $(
                    if load_c && $i < mr {
                        let row = c.add($i * ldc);
                        acc[$i] = (
                            _mm512_maskz_loadu_ps(m0, row),
                            _mm512_maskz_loadu_ps(m1, row.add(16)),
                        );
                    }
                )*
                let (mut ap, mut bp) = (a, b);
                for _ in 0..kp {
                    let b0: __m512bh = std::mem::transmute(_mm512_load_si512(bp as *const __m512i));
                    let b1: __m512bh =
                        std::mem::transmute(_mm512_load_si512(bp.add(16) as *const __m512i));
                    $(
                        let av: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(*ap.add($i) as i32));
                        acc[$i].0 = _mm512_dpbf16_ps(acc[$i].0, b0, av);
                        acc[$i].1 = _mm512_dpbf16_ps(acc[$i].1, b1, av);
                    )*
                    ap = ap.add(MR);
                    bp = bp.add(NR);
                }
                $(
                    if $i < mr {
                        let row = c.add($i * ldc);
                        _mm512_mask_storeu_ps(row, m0, acc[$i].0);
                        _mm512_mask_storeu_ps(row.add(16), m1, acc[$i].1);
                    }
                )*
            }};
        }
        tile!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13);
    }

    /// `v` rounded to bf16 and widened back, 16 lanes (`VCVTNEPS2BF16`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn rnd16(v: __m512) -> __m512 {
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }

    /// See [`super::RoundMap::apply`]; `y` is empty for the maps that do not read it.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_map(f: super::RoundMap, x: &mut [f32], y: &[f32]) {
        use super::RoundMap;
        let n = x.len();
        let (px, py) = (x.as_mut_ptr(), y.as_ptr());
        for i in (0..n).step_by(16) {
            let m = lane_mask(n - i);
            let xv = _mm512_maskz_loadu_ps(m, px.add(i));
            let r = match f {
                RoundMap::Round => rnd16(xv),
                RoundMap::Scale(s) => rnd16(_mm512_mul_ps(
                    _mm512_set1_ps(s),
                    _mm512_maskz_loadu_ps(m, py.add(i)),
                )),
                RoundMap::Div(d) => rnd16(_mm512_div_ps(xv, _mm512_set1_ps(d))),
                RoundMap::Axpby { alpha, beta } => {
                    let yv = _mm512_maskz_loadu_ps(m, py.add(i));
                    let by = rnd16(_mm512_mul_ps(_mm512_set1_ps(beta), yv));
                    let ax = rnd16(_mm512_mul_ps(_mm512_set1_ps(alpha), xv));
                    rnd16(_mm512_add_ps(by, ax))
                }
            };
            _mm512_mask_storeu_ps(px.add(i), m, r);
        }
    }

    /// `B` as given (packed inside the call) or already packed by [`pack_b`].
    pub(super) enum BOperand<'a> {
        Raw(Op, &'a [f32]),
        Packed(&'a [u32]),
    }

    /// Packs a whole `B` operand (`[k, n]` for `N`, `[n, k]` for `T`) into `out`
    /// (`n.div_ceil(NR)` panels of `k.div_ceil(2)·NR` words).
    pub(super) unsafe fn pack_b(op_b: Op, k: usize, n: usize, b: &[f32], out: &mut [u32]) {
        let ldb = if op_b == Op::N { n } else { k };
        let parallel = k * n >= 1 << 16 && rayon::current_num_threads() > 1;
        pack(op_b == Op::N, b, ldb, k, n, NR, out, parallel)
    }

    /// See [`super::gemm_bf16_with`]; the caller has checked features, lengths and non-empty
    /// sizes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_with(
        op_a: Op,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: BOperand<'_>,
        c: &mut [f32],
        opts: super::GemmOpts,
    ) -> crate::error::Result<()> {
        gemm_impl(op_a, m, n, k, a, b, c, opts, false)
    }

    /// See [`super::gemm_bf16_symmetric`]: the `n × n` product, only the micro-tiles that
    /// reach the upper triangle (the caller mirrors it).
    pub(super) unsafe fn gemm_upper(
        op_a: Op,
        n: usize,
        k: usize,
        a: &[f32],
        b: BOperand<'_>,
        c: &mut [f32],
        opts: super::GemmOpts,
    ) -> crate::error::Result<()> {
        gemm_impl(op_a, n, n, k, a, b, c, opts, true)
    }

    /// The GEMM of [`gemm_with`]; with `upper`, tiles strictly below the diagonal are skipped.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_impl(
        op_a: Op,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: BOperand<'_>,
        c: &mut [f32],
        opts: super::GemmOpts,
        upper: bool,
    ) -> crate::error::Result<()> {
        let kp = k.div_ceil(2);
        let (pa, pb) = (m.div_ceil(MR), n.div_ceil(NR));
        // Below ~4 MFLOP the fork/join costs more than it saves.
        let parallel = opts.parallel && m * n * k >= 1 << 21 && rayon::current_num_threads() > 1;
        let mut apack = PackBuf::take(pa * kp * MR)?;
        let mut bpack = match b {
            BOperand::Raw(..) => Some(PackBuf::take(pb * kp * NR)?),
            BOperand::Packed(_) => None,
        };
        {
            // A is [m, k] (k along columns) for N, [k, m] (k along rows) for T; B the reverse.
            let ad = apack.slice_mut();
            let lda = if op_a == Op::T { m } else { k };
            // SAFETY (both closures): features checked by the caller, lengths checked.
            let mut pack_a = move || unsafe { pack(op_a == Op::T, a, lda, k, m, MR, ad, parallel) };
            match (&b, bpack.as_mut()) {
                (BOperand::Raw(op_b, b), Some(bp)) => {
                    let (op_b, b, bd) = (*op_b, *b, bp.slice_mut());
                    let ldb = if op_b == Op::N { n } else { k };
                    let mut pack_b =
                        move || unsafe { pack(op_b == Op::N, b, ldb, k, n, NR, bd, parallel) };
                    if parallel {
                        rayon::join(pack_a, pack_b);
                    } else {
                        pack_a();
                        pack_b();
                    }
                }
                _ => pack_a(),
            }
        }
        let ad = apack.slice();
        let bd = match (&b, bpack.as_ref()) {
            (BOperand::Packed(d), _) => *d,
            (_, Some(bp)) => bp.slice(),
            _ => unreachable!("a raw B operand always has a pack buffer"),
        };
        let (tm, tn) = (m.div_ceil(MC), n.div_ceil(NCB));
        let out = OutPtr(c.as_mut_ptr());
        // Consecutive tasks (what one thread runs in a row under rayon's range splitting) share
        // a block of the *larger* operand, so it is fetched from memory about once per thread
        // while the smaller one is re-read from cache: for the lm_head (256 rows against a 32 MB
        // weight) that is the difference between streaming the weight once and once per row block.
        let a_inner = m <= n;
        let task = |t: usize| {
            let (ti, tj) = if a_inner {
                (t % tm, t / tm)
            } else {
                (t / tn, t % tn)
            };
            let (p_lo, p_hi) = (ti * MC / MR, ((ti + 1) * MC / MR).min(pa));
            let (q_lo, q_hi) = (tj * NCB / NR, ((tj + 1) * NCB / NR).min(pb));
            for k0 in (0..kp).step_by(KC_PAIRS) {
                let kc = (kp - k0).min(KC_PAIRS);
                for ip in p_lo..p_hi {
                    let i0 = ip * MR;
                    let aptr = ad.as_ptr().add((ip * kp + k0) * MR);
                    // Upper only: the first panel whose last column reaches row i0.
                    let q_first = if upper {
                        q_lo.max((i0 + 1).saturating_sub(NR).div_ceil(NR))
                    } else {
                        q_lo
                    };
                    for jp in q_first..q_hi {
                        let j0 = jp * NR;
                        let bptr = bd.as_ptr().add((jp * kp + k0) * NR);
                        // SAFETY: tile (i0.., j0..) lies inside this task's block of C, which no
                        // other task touches; mr/nr clip it to the matrix.
                        micro_kernel(
                            kc,
                            aptr,
                            bptr,
                            out.get().add(i0 * n + j0),
                            n,
                            (m - i0).min(MR),
                            (n - j0).min(NR),
                            opts.accumulate || k0 > 0,
                        );
                    }
                }
            }
        };
        if parallel {
            (0..tm * tn).into_par_iter().for_each(task);
        } else {
            (0..tm * tn).for_each(task);
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) unsafe fn pack_for_test(
        k_is_row: bool,
        src: &[f32],
        ld: usize,
        k: usize,
        lanes: usize,
        width: usize,
        out: &mut [u32],
    ) {
        pack(k_is_row, src, ld, k, lanes, width, out, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.618 + seed as f32 * 1.7).sin() * 3.0)
            .collect()
    }

    /// f64 products: of the *rounded* operands (what the kernel computes, up to f32
    /// summation), of the unrounded ones, and Σ|a·b| per element (the error scale).
    #[allow(clippy::type_complexity)]
    fn reference(
        op_a: Op,
        op_b: Op,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let ga = |i: usize, p: usize| match op_a {
            Op::N => a[i * k + p],
            Op::T => a[p * m + i],
        };
        let gb = |p: usize, j: usize| match op_b {
            Op::N => b[p * n + j],
            Op::T => b[j * k + p],
        };
        let (mut rounded, mut exact, mut scale) =
            (vec![0f64; m * n], vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let (x, y) = (ga(i, p), gb(p, j));
                    rounded[i * n + j] += f64::from(round_bf16(x)) * f64::from(round_bf16(y));
                    exact[i * n + j] += f64::from(x) * f64::from(y);
                    scale[i * n + j] += (f64::from(x) * f64::from(y)).abs();
                }
            }
        }
        (rounded, exact, scale)
    }

    fn check(op_a: Op, op_b: Op, m: usize, n: usize, k: usize) {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let c0 = data(m * n, 3);
        let mut fast = c0.clone();
        let mut slow = c0.clone();
        gemm_bf16(op_a, op_b, m, n, k, &a, &b, &mut fast).unwrap();
        gemm_bf16_portable(op_a, op_b, m, n, k, &a, &b, &mut slow).unwrap();
        let (r, exact, scale) = reference(op_a, op_b, m, n, k, &a, &b);
        for i in 0..m * n {
            let c = f64::from(c0[i]);
            let want = r[i] + c;
            // f32 accumulation of k terms: a few ulps of Σ|terms| times √k (random-walk).
            let mag = scale[i] + c.abs();
            let tol = mag * 4.0 * f64::from(f32::EPSILON) * (k as f64).sqrt().max(1.0) + 1e-30;
            // Against the unrounded product: bf16 keeps 8 significant bits, so each operand
            // carries up to 2^-8 relative error and each product up to 2·2^-8.
            let bf16_tol = scale[i] * 2.0 * 2f64.powi(-8) + tol;
            assert!(
                (f64::from(fast[i]) - (exact[i] + c)).abs() <= bf16_tol,
                "{op_a:?}{op_b:?} {m}x{n}x{k} [{i}]: fast {} exact {} rounded {want} portable {}",
                fast[i],
                exact[i] + c,
                slow[i]
            );
            assert!(
                (f64::from(fast[i]) - want).abs() <= tol,
                "{op_a:?}{op_b:?} {m}x{n}x{k} [{i}]: fast {} want {want}",
                fast[i]
            );
            assert!(
                (f64::from(fast[i]) - f64::from(slow[i])).abs() <= 2.0 * tol,
                "{op_a:?}{op_b:?} {m}x{n}x{k} [{i}]: fast {} portable {}",
                fast[i],
                slow[i]
            );
        }
    }

    #[test]
    fn rounding_matches_the_instruction_semantics() {
        assert_eq!(round_bf16(1.0), 1.0);
        // Exactly halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-1.23456), -1.234375);
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        // Subnormals flush to a signed zero, like the hardware conversion.
        assert_eq!(round_bf16(1e-40).to_bits(), 0);
        assert_eq!(round_bf16(-1e-40).to_bits(), 0x8000_0000);
    }

    #[test]
    fn bf16_gemm_matches_reference_on_odd_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 1, 2),
            (3, 5, 7),
            (14, 32, 2),
            (15, 33, 3),
            (13, 31, 257),
            (29, 70, 300),
            (60, 270, 513),
            (130, 300, 64),
        ] {
            for op_a in [Op::N, Op::T] {
                for op_b in [Op::N, Op::T] {
                    check(op_a, op_b, m, n, k);
                }
            }
        }
    }

    #[test]
    fn prepacked_b_gives_identical_results() {
        for &(m, n, k) in &[(1, 1, 1), (15, 33, 3), (60, 270, 513), (300, 64, 40)] {
            for op_a in [Op::N, Op::T] {
                for op_b in [Op::N, Op::T] {
                    let a = data(m * k, 6);
                    let b = data(k * n, 7);
                    let mut direct = data(m * n, 8);
                    let mut packed = direct.clone();
                    gemm_bf16(op_a, op_b, m, n, k, &a, &b, &mut direct).unwrap();
                    let pb = PackedB::new(op_b, k, n, &b).unwrap();
                    assert_eq!(pb.shape(), (k, n));
                    gemm_bf16_prepacked(op_a, m, &a, &pb, &mut packed).unwrap();
                    assert_eq!(direct, packed, "{op_a:?}{op_b:?} {m}x{n}x{k}");
                }
            }
        }
        let pb = PackedB::new(Op::N, 3, 4, &[0.0; 12]).unwrap();
        assert!(gemm_bf16_prepacked(Op::N, 2, &[0.0; 5], &pb, &mut [0.0; 8]).is_err());
        assert!(PackedB::new(Op::N, 3, 4, &[0.0; 11]).is_err());
    }

    #[test]
    fn overwrite_and_serial_modes_match_accumulating_into_zero() {
        // Shapes with several k blocks (k > 2·KC_PAIRS) and ragged tiles; C starts as NaN so
        // an overwrite that still read C would show.
        for &(m, n, k) in &[(1, 1, 1), (15, 33, 3), (60, 270, 1030), (300, 64, 40)] {
            for (op_a, op_b) in [(Op::N, Op::N), (Op::T, Op::N), (Op::N, Op::T)] {
                let a = data(m * k, 9);
                let b = data(k * n, 10);
                let mut want = vec![0f32; m * n];
                gemm_bf16(op_a, op_b, m, n, k, &a, &b, &mut want).unwrap();
                for parallel in [true, false] {
                    let opts = GemmOpts {
                        accumulate: false,
                        parallel,
                    };
                    let mut got = vec![f32::NAN; m * n];
                    gemm_bf16_with(op_a, op_b, m, n, k, &a, &b, &mut got, opts).unwrap();
                    assert_eq!(
                        want, got,
                        "{op_a:?}{op_b:?} {m}x{n}x{k} parallel {parallel}"
                    );
                    let pb = PackedB::new(op_b, k, n, &b).unwrap();
                    let mut got = vec![f32::NAN; m * n];
                    gemm_bf16_prepacked_with(op_a, m, &a, &pb, &mut got, opts).unwrap();
                    assert_eq!(want, got, "prepacked {op_a:?}{op_b:?} {m}x{n}x{k}");
                }
                // Serial accumulation is bit-identical to the parallel one.
                let mut serial = data(m * n, 11);
                let mut par = serial.clone();
                let opts = GemmOpts {
                    accumulate: true,
                    parallel: false,
                };
                gemm_bf16_with(op_a, op_b, m, n, k, &a, &b, &mut serial, opts).unwrap();
                gemm_bf16(op_a, op_b, m, n, k, &a, &b, &mut par).unwrap();
                assert_eq!(serial, par, "{op_a:?}{op_b:?} {m}x{n}x{k}");
            }
        }
        // k = 0 overwrites with zeros, accumulating leaves C alone.
        let mut c = vec![f32::NAN; 6];
        let opts = GemmOpts {
            accumulate: false,
            parallel: true,
        };
        gemm_bf16_with(Op::N, Op::N, 2, 3, 0, &[], &[], &mut c, opts).unwrap();
        assert_eq!(c, vec![0.0; 6]);
    }

    /// A random-ish `n × n` symmetric matrix.
    fn symmetric(n: usize, seed: u32) -> Vec<f32> {
        let x = data(n * n, seed);
        let mut s = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                s[i * n + j] = x[i.min(j) * n + i.max(j)];
            }
        }
        s
    }

    #[test]
    fn symmetric_gemm_of_x_xt_is_bit_identical_to_the_full_gemm() {
        // Shapes around the tile sizes (MR 14, NR 32, MC 56, NCB 256), several k blocks.
        for &(n, k) in &[
            (1, 1),
            (2, 3),
            (13, 5),
            (14, 32),
            (15, 33),
            (31, 7),
            (33, 64),
            (57, 100),
            (100, 513),
            (257, 40),
            (300, 1030),
        ] {
            let x = data(n * k, 12);
            let mut full = vec![0f32; n * n];
            gemm_bf16(Op::N, Op::T, n, n, k, &x, &x, &mut full).unwrap();
            for parallel in [true, false] {
                let opts = GemmOpts {
                    accumulate: false,
                    parallel,
                };
                let mut sym = vec![f32::NAN; n * n];
                gemm_bf16_symmetric(Op::N, Op::T, n, k, &x, &x, &mut sym, opts).unwrap();
                assert_eq!(full, sym, "X·Xᵀ {n}x{k} parallel {parallel}");
                // Xᵀ·X of the stored [k, n] matrix.
                let mut full_t = vec![0f32; n * n];
                gemm_bf16(Op::T, Op::N, n, n, k, &x, &x, &mut full_t).unwrap();
                let mut sym_t = vec![f32::NAN; n * n];
                gemm_bf16_symmetric(Op::T, Op::N, n, k, &x, &x, &mut sym_t, opts).unwrap();
                assert_eq!(full_t, sym_t, "Xᵀ·X {n}x{k} parallel {parallel}");
            }
            // Accumulating adds the (mirrored) product to a symmetric C.
            let c0 = symmetric(n, 13);
            let mut acc_full = c0.clone();
            gemm_bf16(Op::N, Op::T, n, n, k, &x, &x, &mut acc_full).unwrap();
            let mut acc_sym = c0;
            gemm_bf16_symmetric(
                Op::N,
                Op::T,
                n,
                k,
                &x,
                &x,
                &mut acc_sym,
                GemmOpts::default(),
            )
            .unwrap();
            assert_eq!(acc_full, acc_sym, "accumulate {n}x{k}");
        }
    }

    #[test]
    fn symmetric_gemm_of_a_scaled_square_mirrors_the_upper_triangle() {
        for &n in &[1usize, 5, 14, 33, 70, 129, 300] {
            let a = symmetric(n, 14);
            // rnd(c·A)·A: symmetric in exact arithmetic, not bit for bit after the rounding.
            let ca: Vec<f32> = a.iter().map(|&v| round_bf16(2.0315 * v)).collect();
            let mut full = vec![0f32; n * n];
            gemm_bf16(Op::N, Op::N, n, n, n, &ca, &a, &mut full).unwrap();
            let opts = GemmOpts {
                accumulate: false,
                parallel: true,
            };
            let mut sym = vec![f32::NAN; n * n];
            gemm_bf16_symmetric(Op::N, Op::N, n, n, &ca, &a, &mut sym, opts).unwrap();
            let (r, _, scale) = reference(Op::N, Op::N, n, n, n, &ca, &a);
            for i in 0..n {
                for j in 0..n {
                    let (u, l) = (i.min(j), i.max(j));
                    // Exactly the full GEMM's upper triangle, mirrored.
                    assert_eq!(sym[i * n + j], full[u * n + l], "{n}: [{i},{j}]");
                    // And within bf16 rounding of the product's own element: the mirrored one
                    // sums rnd(c·a[k,j])·a[i,k] where the element's own sums rnd(c·a[i,k])·a[k,j].
                    let s = scale[i * n + j];
                    let tol = s * 4.0 * f64::from(f32::EPSILON) * (n as f64).sqrt() + 1e-30;
                    let tol = if i <= j {
                        tol
                    } else {
                        tol + s * 2.0 * 2f64.powi(-8)
                    };
                    assert!(
                        (f64::from(sym[i * n + j]) - r[i * n + j]).abs() <= tol,
                        "{n}: [{i},{j}] {} vs {}",
                        sym[i * n + j],
                        r[i * n + j]
                    );
                }
            }
        }
        // Bad lengths are errors, not panics.
        let opts = GemmOpts::default();
        assert!(gemm_bf16_symmetric(
            Op::N,
            Op::T,
            3,
            2,
            &[0.0; 5],
            &[0.0; 6],
            &mut [0.0; 9],
            opts
        )
        .is_err());
    }

    #[test]
    fn vector_round_maps_are_bit_identical_to_scalar() {
        let mut x = data(1000, 15);
        let y = data(1000, 16);
        // Ties, subnormals, infinities, NaN, signed zero; 1000 is not a multiple of 16.
        for (i, v) in [
            1.0 + 1.0 / 256.0,
            1e-40,
            -1e-40,
            f32::INFINITY,
            f32::NAN,
            -0.0,
            f32::MAX,
        ]
        .into_iter()
        .enumerate()
        {
            x[i] = v;
        }
        for f in [
            RoundMap::Round,
            RoundMap::Scale(2.0315),
            RoundMap::Div(3.7),
            RoundMap::Axpby {
                alpha: 3.4445,
                beta: -4.775,
            },
        ] {
            let mut fast = x.clone();
            f.apply(&mut fast, &y);
            let want: Vec<u32> = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| f.scalar(a, b).to_bits())
                .collect();
            let got: Vec<u32> = fast.iter().map(|v| v.to_bits()).collect();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // NaN payloads may differ; every other bit pattern must match.
                let nan = f32::from_bits(*w).is_nan() && f32::from_bits(*g).is_nan();
                assert!(nan || g == w, "{f:?} [{i}]: {g:#x} vs {w:#x} (x {})", x[i]);
            }
        }
    }

    #[test]
    fn mirror_upper_copies_the_upper_triangle_down() {
        for &n in &[1usize, 2, 63, 64, 65, 300] {
            let mut c: Vec<f32> = (0..n * n).map(|i| i as f32).collect();
            let orig = c.clone();
            mirror_upper(n, &mut c, true);
            for i in 0..n {
                for j in 0..n {
                    let want = orig[i.min(j) * n + i.max(j)];
                    assert_eq!(c[i * n + j], want, "{n}: [{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn empty_shapes_and_bad_lengths() {
        let mut c = vec![1.0f32; 6];
        gemm_bf16(Op::N, Op::N, 2, 3, 0, &[], &[], &mut c).unwrap();
        assert_eq!(c, vec![1.0; 6]);
        gemm_bf16(Op::N, Op::N, 0, 3, 4, &[], &[0.0; 12], &mut []).unwrap();
        assert!(gemm_bf16(Op::N, Op::N, 2, 3, 4, &[0.0; 7], &[0.0; 12], &mut c).is_err());
        assert!(gemm_bf16_portable(Op::T, Op::N, 2, 3, 4, &[0.0; 8], &[0.0; 11], &mut c).is_err());
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let (m, n, k) = (150, 300, 260);
        let a = data(m * k, 4);
        let b = data(k * n, 5);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0f32; m * n];
            pool.install(|| gemm_bf16(Op::N, Op::T, m, n, k, &a, &b, &mut c).unwrap());
            c
        };
        assert_eq!(run(1), run(3));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_packing_is_bit_identical_to_scalar() {
        if !has_avx512_bf16() {
            eprintln!("SKIPPED: no AVX-512 BF16 on this CPU");
            return;
        }
        // Include values that exercise ties, subnormals, infinities and NaN.
        let mut src = data(37 * 23, 9);
        src[3] = 1.0 + 1.0 / 256.0;
        src[4] = 1e-40;
        src[5] = f32::INFINITY;
        src[6] = f32::NAN;
        src[7] = -0.0;
        for &(k_is_row, k, lanes, width) in &[
            (true, 37usize, 23usize, NR),
            (true, 37, 23, MR),
            (false, 23, 37, MR),
            (false, 23, 37, NR),
        ] {
            let ld = if k_is_row { lanes } else { k };
            let panels = lanes.div_ceil(width);
            let per = k.div_ceil(2) * width;
            let mut fast = vec![0xdead_beefu32; panels * per];
            // SAFETY: AVX-512 BF16 checked above.
            unsafe { avx512::pack_for_test(k_is_row, &src, ld, k, lanes, width, &mut fast) };
            let mut slow = vec![0u32; panels * per];
            for (p, dst) in slow.chunks_mut(per).enumerate() {
                let get = |kk: usize, j: usize| {
                    let j = p * width + j;
                    if k_is_row {
                        src[kk * ld + j]
                    } else {
                        src[j * ld + kk]
                    }
                };
                pack_panel_scalar(
                    get,
                    k,
                    lanes.saturating_sub(p * width).min(width),
                    width,
                    dst,
                );
            }
            assert_eq!(fast, slow, "k_is_row={k_is_row} width={width}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn bf16_gemm_any_shape(m in 0usize..40, n in 0usize..70, k in 0usize..40, ta: bool, tb: bool) {
            let op = |t: bool| if t { Op::T } else { Op::N };
            check(op(ta), op(tb), m, n, k);
        }
    }
}
