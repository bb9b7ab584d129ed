//! The op trait the GPT is written against.
//!
//! Sized to this model, not a tensor library: each method is one of the model's or the
//! optimizers' kernels (norms, rotary embedding, causal attention and its backward, the fused
//! softcapped cross-entropy, AdamW, the pieces of Muon's Newton–Schulz, ...), with explicit
//! shapes. Buffers are opaque: the model allocates them through the backend, addresses ranges of
//! them through views, and reads back only what it must (the loss, the gradient norm, logits for
//! sampling). On the CPU a view is a slice and every op runs to completion; a GPU backend
//! enqueues on its stream and returns, and errors from a queued kernel surface at the next
//! read-back.
//!
//! Layouts: activations are `[tokens, features]` row-major; attention heads sit side by side
//! in the feature dimension (`[B, T, H, D]`), as the projections produce them. Weights are the
//! reference's `[out, in]` row-major matrices inside one flat parameter buffer; their derived
//! forms (the CPU's transposed copies and bf16 packs, a GPU's bf16 shadow) live in the
//! backend's [`Backend::WeightCache`], rebuilt by [`Backend::update_weight_cache`] whenever the
//! weights change.

use std::ops::Range;

use crate::error::Result;
use crate::Precision;

/// Which kind of device a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

/// Geometry of a full-sequence (training) attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch rows.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (`h` is a multiple).
    pub hk: usize,
    /// Head dimension.
    pub d: usize,
    /// Arithmetic of the score and output GEMMs; the softmax and its log-sum-exp stay f32.
    pub precision: Precision,
}

/// Geometry of a KV-cached attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// Query heads.
    pub h: usize,
    /// Key/value heads.
    pub hk: usize,
    /// Head dimension.
    pub d: usize,
    /// Positions per cache row.
    pub capacity: usize,
}

/// One general matrix product `C = alpha·op(A)·op(B) + beta·C`, row-major. `op(A)` is
/// `[m, k]` (stored `[k, m]` when `ta`), `op(B)` is `[k, n]` (stored `[n, k]` when `tb`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// `A` is stored transposed.
    pub ta: bool,
    /// `B` is stored transposed.
    pub tb: bool,
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old `C` (0 overwrites it, whatever it held).
    pub beta: f32,
    /// Operand precision (accumulation is f32 either way).
    pub precision: Precision,
}

/// Where one weight matrix sits in the flat parameter buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightSlot {
    /// First element.
    pub offset: usize,
    /// Rows (`out_features`).
    pub out: usize,
    /// Columns (`in_features`).
    pub inp: usize,
    /// Whether it is ever multiplied (every parameter but the token embedding, a lookup).
    pub matmul: bool,
}

impl WeightSlot {
    /// Elements.
    pub fn len(&self) -> usize {
        self.out * self.inp
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// One weight matrix as a linear layer sees it: the flat parameters, the backend's derived
/// forms, and which slot.
pub struct WeightRef<'a, B: Backend> {
    /// The whole flat parameter buffer.
    pub params: B::View<'a>,
    /// The backend's derived forms of every weight.
    pub cache: &'a B::WeightCache,
    /// Index of this weight in the layout the cache was built from.
    pub index: usize,
    /// Its place and shape.
    pub slot: WeightSlot,
}

impl<B: Backend> Clone for WeightRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for WeightRef<'_, B> {}

/// Scalars of one AdamW step (torch's numerics: `m ← m + (1−β1)(g−m)`,
/// `v ← β2·v + (1−β2)·g²`, `p ← p·decay − step_size·m / (√v·inv_bc2_sqrt + eps)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// Added to the bias-corrected √v.
    pub eps: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `1 / √(1 − β2^t)`.
    pub inv_bc2_sqrt: f32,
    /// `1 − lr·weight_decay`.
    pub decay: f32,
}

/// A compute device: buffers, views of them, and the model's and optimizers' kernels.
///
/// Views are borrowed ranges of buffers (`View` shared, `ViewMut` exclusive): on the CPU
/// plain slices. Every op checks that its views have the lengths its shape implies and returns
/// [`crate::ComputeError::Kernel`] otherwise. Outputs never alias inputs unless the op says
/// "in place".
pub trait Backend: Clone + Send + Sync + Sized + 'static {
    /// A buffer of f32 on the device.
    type Buf: Send + Sync;
    /// A buffer of i32 on the device (token ids, targets, positions, row indices).
    type IBuf: Send + Sync;
    /// A shared view of a range of a [`Backend::Buf`].
    type View<'a>: Copy + Send + Sync;
    /// An exclusive view of a range of a [`Backend::Buf`].
    type ViewMut<'a>: Send;
    /// A shared view of a range of a [`Backend::IBuf`].
    type IView<'a>: Copy + Send + Sync;
    /// Derived forms of the weights (see the module docs).
    type WeightCache: Send + Sync;

    // ---- identity ----

    /// Which kind of device this is.
    fn kind(&self) -> DeviceKind;
    /// A description for logs and reports (`cpu (AMD EPYC, 2 threads, avx512_bf16)`).
    fn describe(&self) -> String;
    /// Bytes a new allocation on the device can use, when known.
    fn available_memory(&self) -> Option<u64>;
    /// The precision KV-cached decoding runs at for a model set to `train` matmuls (the CPU
    /// and CUDA backends keep it: bf16 decoding streams half the weight bytes).
    fn decode_precision(&self, train: Precision) -> Precision;
    /// The precision matmuls run at when a config asks for `requested`: the CPU keeps bf16 only
    /// where its bf16 GEMM beats f32 (and logs the fallback once); devices whose bf16 is
    /// never slower keep the request.
    fn matmul_precision_for(&self, requested: Precision) -> Precision {
        requested
    }

    // ---- buffers and views ----

    /// A zeroed buffer of `len` floats; `what` names it in an out-of-memory error.
    fn alloc(&self, len: usize, what: &str) -> Result<Self::Buf>;
    /// A zeroed buffer of `len` ints.
    fn alloc_ints(&self, len: usize, what: &str) -> Result<Self::IBuf>;
    /// The whole buffer.
    fn view(buf: &Self::Buf) -> Self::View<'_>;
    /// The whole buffer, exclusively.
    fn view_mut(buf: &mut Self::Buf) -> Self::ViewMut<'_>;
    /// The whole int buffer.
    fn iview(buf: &Self::IBuf) -> Self::IView<'_>;
    /// Elements of a view.
    fn len(v: &Self::View<'_>) -> usize;
    /// Elements of an exclusive view.
    fn len_mut(v: &Self::ViewMut<'_>) -> usize;
    /// Elements of an int view.
    fn ilen(v: &Self::IView<'_>) -> usize;
    /// A sub-range of a view (panics when out of range, like slice indexing).
    fn slice<'a>(v: Self::View<'a>, range: Range<usize>) -> Self::View<'a>;
    /// A sub-range of an exclusive view.
    fn slice_mut<'a>(v: Self::ViewMut<'a>, range: Range<usize>) -> Self::ViewMut<'a>;
    /// A sub-range of an int view.
    fn islice<'a>(v: Self::IView<'a>, range: Range<usize>) -> Self::IView<'a>;
    /// Splits an exclusive view at `mid` into `[0, mid)` and `[mid, len)`.
    fn split_at_mut<'a>(v: Self::ViewMut<'a>, mid: usize)
        -> (Self::ViewMut<'a>, Self::ViewMut<'a>);
    /// A shorter-lived copy of an exclusive view.
    fn reborrow<'a>(v: &'a mut Self::ViewMut<'_>) -> Self::ViewMut<'a>;
    /// A shared view of an exclusive one.
    fn as_view<'a>(v: &'a Self::ViewMut<'_>) -> Self::View<'a>;

    /// Host → device.
    fn upload(&self, src: &[f32], dst: Self::ViewMut<'_>) -> Result<()>;
    /// Device → host (waits for queued work).
    fn download(&self, src: Self::View<'_>, dst: &mut [f32]) -> Result<()>;
    /// Device → host of `dst.len() / width` rows of `width` elements from a matrix of row
    /// stride `stride` (the real columns of padded logits).
    fn download_rows(
        &self,
        src: Self::View<'_>,
        stride: usize,
        width: usize,
        dst: &mut [f32],
    ) -> Result<()>;
    /// Host → device into the first `src.len()` ints of `dst`.
    fn upload_ints(&self, src: &[i32], dst: &mut Self::IBuf) -> Result<()>;
    /// Waits for every queued op.
    fn synchronize(&self) -> Result<()>;
    /// Runs one latency-bound step (a decode call: dozens of small ops) where the backend
    /// runs it best. The CPU moves it onto a pool worker, so each small parallel loop starts
    /// in-pool instead of paying a cross-thread injection.
    fn run_step<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    // ---- memory ops ----

    /// `x[i] = value`.
    fn fill(&self, x: Self::ViewMut<'_>, value: f32) -> Result<()>;
    /// `dst = src` (same length).
    fn copy(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>) -> Result<()>;
    /// Copies `len` elements from `src_off` to `dst_off` inside one buffer (ranges may not
    /// overlap).
    fn copy_within(
        &self,
        buf: Self::ViewMut<'_>,
        src_off: usize,
        dst_off: usize,
        len: usize,
    ) -> Result<()>;
    /// `dst[r, :width] = src[r, :width]` for `rows` rows of strides `src_stride` / `dst_stride`.
    fn copy_rows(
        &self,
        src: Self::View<'_>,
        src_stride: usize,
        dst: Self::ViewMut<'_>,
        dst_stride: usize,
        width: usize,
        rows: usize,
    ) -> Result<()>;
    /// `out[i, :] = table[idx[i], :]` (rows of `dim`).
    fn gather_rows(
        &self,
        table: Self::View<'_>,
        dim: usize,
        idx: Self::IView<'_>,
        out: Self::ViewMut<'_>,
    ) -> Result<()>;
    /// `table[idx[i], :] = src[i, :]` (indices distinct).
    fn scatter_rows(
        &self,
        src: Self::View<'_>,
        dim: usize,
        idx: Self::IView<'_>,
        table: Self::ViewMut<'_>,
    ) -> Result<()>;
    /// `table[idx[i], :] += src[i, :]`, each table row summed in increasing `i` (deterministic:
    /// repeated indices are the embedding gradient's common case).
    fn scatter_add_rows(
        &self,
        src: Self::View<'_>,
        dim: usize,
        idx: Self::IView<'_>,
        table: Self::ViewMut<'_>,
    ) -> Result<()>;

    // ---- normalisation, rotary embedding, activation ----

    /// Parameter-free RMSNorm of rows of `dim`: `y = x·rstd`, `rstd = 1/√(mean(x²) + ε)` with
    /// `ε = f32::EPSILON` (`F.rms_norm`'s default for f32).
    fn rmsnorm(
        &self,
        x: Self::View<'_>,
        y: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        dim: usize,
    ) -> Result<()>;
    /// [`Backend::rmsnorm`] in place (the per-head QK norm).
    fn rmsnorm_inplace(
        &self,
        x: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        dim: usize,
    ) -> Result<()>;
    /// Backward from the normalised output `y`: `dx (+)= rstd·(dy − y·mean(dy∘y))`.
    fn rmsnorm_bwd(
        &self,
        dy: Self::View<'_>,
        y: Self::View<'_>,
        rstd: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dim: usize,
        accumulate: bool,
    ) -> Result<()>;
    /// [`Backend::rmsnorm_bwd`] in place: `g` holds `dy` on entry and `dx` on exit.
    fn rmsnorm_bwd_inplace(
        &self,
        g: Self::ViewMut<'_>,
        y: Self::View<'_>,
        rstd: Self::View<'_>,
        dim: usize,
    ) -> Result<()>;
    /// Rotates every head of every token in place, nanochat's convention (halves `x1`, `x2`
    /// of each head: `x1' = x1·cos + x2·sin`, `x2' = x2·cos − x1·sin`); `inverse` applies the
    /// transpose rotation (the backward pass). `cos`/`sin` are `[positions, head_dim/2]`;
    /// `positions[i]` is token `i`'s position.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: Self::ViewMut<'_>,
        heads: usize,
        head_dim: usize,
        positions: Self::IView<'_>,
        cos: Self::View<'_>,
        sin: Self::View<'_>,
        inverse: bool,
    ) -> Result<()>;
    /// `y = relu(x)²`.
    fn relu2(&self, x: Self::View<'_>, y: Self::ViewMut<'_>) -> Result<()>;
    /// `g *= 2·relu(x)` (the ReLU² backward, in place).
    fn relu2_bwd(&self, g: Self::ViewMut<'_>, x: Self::View<'_>) -> Result<()>;

    // ---- attention ----

    /// Causal self-attention with grouped KV heads, scale `1/√D`. `q`, `y`: `[B, T, H, D]`;
    /// `k`, `v`: `[B, T, Hk, D]`; `lse`: `[B, H, T]`, the log-sum-exp of each query's scaled
    /// scores, saved for the backward pass instead of the probabilities.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: AttnShape,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        y: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
    ) -> Result<()>;
    /// Backward of [`Backend::attention`]: writes (overwrites) `dq`, `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        s: AttnShape,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        y: Self::View<'_>,
        lse: Self::View<'_>,
        dy: Self::View<'_>,
        dq: Self::ViewMut<'_>,
        dk: Self::ViewMut<'_>,
        dv: Self::ViewMut<'_>,
    ) -> Result<()>;
    /// Attention of `M` new tokens against a KV cache. Token `i` (cache row `rows[i]`, position
    /// `positions[i]`) attends to positions `0..=positions[i]` of its row. `q`, `y`: `[M, H, D]`;
    /// `k_cache`, `v_cache`: one layer's `[rows, capacity, Hk, D]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        s: DecodeShape,
        q: Self::View<'_>,
        positions: Self::IView<'_>,
        rows: Self::IView<'_>,
        k_cache: Self::View<'_>,
        v_cache: Self::View<'_>,
        y: Self::ViewMut<'_>,
    ) -> Result<()>;

    // ---- matrix products ----

    /// A general matrix product (see [`Gemm`]).
    fn gemm(
        &self,
        g: Gemm,
        a: Self::View<'_>,
        b: Self::View<'_>,
        c: Self::ViewMut<'_>,
    ) -> Result<()>;
    /// [`Backend::gemm`] of a product the caller knows to be symmetric (`g.m == g.n`): `X·Xᵀ`,
    /// or `S·T` of two commuting symmetric matrices (`A·A`), as Newton–Schulz multiplies. A
    /// backend may compute one triangle and mirror it (the CPU's bf16 path does: about half
    /// the FLOPs), so where the product is symmetric only up to rounding the result is the
    /// mirror of one triangle. By default the full [`Backend::gemm`].
    fn gemm_symmetric(
        &self,
        g: Gemm,
        a: Self::View<'_>,
        b: Self::View<'_>,
        c: Self::ViewMut<'_>,
    ) -> Result<()> {
        self.gemm(g, a, b, c)
    }
    /// Brings the derived forms of every weight in `layout` up to date with the flat `params`,
    /// for matmuls at `precision`, reusing `cache`'s allocations where it can (it is `None`
    /// the first time).
    fn update_weight_cache(
        &self,
        params: Self::View<'_>,
        layout: &[WeightSlot],
        precision: Precision,
        cache: &mut Option<Self::WeightCache>,
    ) -> Result<()>;
    /// Bytes [`Backend::update_weight_cache`] allocates for `layout` at `precision`.
    fn weight_cache_bytes(&self, layout: &[WeightSlot], precision: Precision) -> u64;
    /// Bytes of scratch the ops allocate for themselves (GEMM packing, attention scores) for
    /// training on micro-batches of `rows` tokens of a model of width `width` and padded vocabulary
    /// `vocab`, sequence `t` and `heads` query heads.
    fn scratch_bytes(&self, shape: ScratchShape) -> u64;
    /// Linear layer `y (+)= x·Wᵀ`: `x: [rows, inp]`, `y: [rows, out]`.
    fn linear(
        &self,
        w: WeightRef<'_, Self>,
        x: Self::View<'_>,
        y: Self::ViewMut<'_>,
        rows: usize,
        accumulate: bool,
        precision: Precision,
    ) -> Result<()>;
    /// Three linear layers of the same input, `ys[i] = x·Wᵢᵀ` (a layer's Q, K and V
    /// projections). By default three [`Backend::linear`] calls; the CPU runs them as one
    /// parallel loop when decoding (one fork/join instead of three).
    fn linear3(
        &self,
        ws: [WeightRef<'_, Self>; 3],
        x: Self::View<'_>,
        ys: [Self::ViewMut<'_>; 3],
        rows: usize,
        precision: Precision,
    ) -> Result<()> {
        for (w, y) in ws.into_iter().zip(ys) {
            self.linear(w, x, y, rows, false, precision)?;
        }
        Ok(())
    }
    /// Its input gradient `dx (+)= dy·W`: `dy: [rows, out]`, `dx: [rows, inp]`.
    fn linear_bwd_input(
        &self,
        w: WeightRef<'_, Self>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        rows: usize,
        accumulate: bool,
        precision: Precision,
    ) -> Result<()>;
    /// Its weight gradient `dW += dyᵀ·x`: `dy: [rows, out]`, `x: [rows, inp]`, `dw: [out, inp]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_weight(
        &self,
        dy: Self::View<'_>,
        x: Self::View<'_>,
        dw: Self::ViewMut<'_>,
        rows: usize,
        out: usize,
        inp: usize,
        precision: Precision,
    ) -> Result<()>;

    // ---- loss ----

    /// Softcapped cross-entropy of `rows` rows of logits (row stride `padded`, the first `vocab`
    /// columns real; `softcap` c maps z to `c·tanh(z/c)`), fused with its gradient. Writes each
    /// row's loss into `losses` (0 where `targets[r] = -1`). Afterwards `logits` holds, per row,
    /// the capped logits, or, with `grad_scale`, `d loss/d raw logit · grad_scale` (padding and
    /// ignored rows zeroed).
    #[allow(clippy::too_many_arguments)]
    fn softcap_ce(
        &self,
        logits: Self::ViewMut<'_>,
        rows: usize,
        vocab: usize,
        padded: usize,
        targets: Self::IView<'_>,
        softcap: Option<f32>,
        grad_scale: Option<f32>,
        losses: Self::ViewMut<'_>,
    ) -> Result<()>;

    // ---- reductions (read back to the host) ----

    /// `Σ x` in f64 (waits for queued work).
    fn sum(&self, x: Self::View<'_>) -> Result<f64>;
    /// `Σ x²` in f64 (waits for queued work).
    fn sum_squares(&self, x: Self::View<'_>) -> Result<f64>;

    // ---- optimizer element-wise ops ----

    /// `x *= s`.
    fn scale(&self, x: Self::ViewMut<'_>, s: f32) -> Result<()>;
    /// One AdamW step over a parameter, its gradient and its two moments.
    fn adamw(
        &self,
        p: Self::ViewMut<'_>,
        g: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        h: AdamWStep,
    ) -> Result<()>;
    /// Muon's momentum: `buf ← buf + (1−μ)(g − buf)`, then `u = g + μ(buf − g)` (Nesterov) or
    /// `u = buf`, rounded to bf16 when `round_bf16`.
    fn muon_momentum(
        &self,
        buf: Self::ViewMut<'_>,
        g: Self::View<'_>,
        u: Self::ViewMut<'_>,
        momentum: f32,
        nesterov: bool,
        round_bf16: bool,
    ) -> Result<()>;
    /// `dst[c, r] = src[r, c]` for a `rows × cols` source.
    fn transpose(
        &self,
        src: Self::View<'_>,
        rows: usize,
        cols: usize,
        dst: Self::ViewMut<'_>,
    ) -> Result<()>;
    /// `x ← x / (‖x‖_F + eps)` with the rounding Muon's bf16 Newton–Schulz applies when
    /// `round_bf16` (`x ← rnd(x / rnd(rnd(‖x‖) + eps))`). The norm is summed in f64 in a fixed
    /// order, and never leaves the device.
    fn frobenius_normalize(&self, x: Self::ViewMut<'_>, eps: f32, round_bf16: bool) -> Result<()>;
    /// `dst = rnd(s·src)`.
    fn scale_copy(
        &self,
        src: Self::View<'_>,
        dst: Self::ViewMut<'_>,
        s: f32,
        round_bf16: bool,
    ) -> Result<()>;
    /// `dst = rnd(rnd(beta·src) + rnd(alpha·dst))` (no rounding when `round_bf16` is false:
    /// `beta·src + alpha·dst`, evaluated in that order).
    fn axpby(
        &self,
        dst: Self::ViewMut<'_>,
        alpha: f32,
        src: Self::View<'_>,
        beta: f32,
        round_bf16: bool,
    ) -> Result<()>;
    /// `x = rnd(x)` (round to nearest-even bf16, kept in f32).
    fn round_bf16(&self, x: Self::ViewMut<'_>) -> Result<()>;

    // ---- interop ----

    /// Hands the device memory behind `x` to `f` (for libraries that read and write device
    /// memory themselves: NCCL), with this backend's context current on the thread and its
    /// stream named, so that what `f` enqueues there is ordered with the backend's own work.
    /// Returns `None` without calling `f` where buffers are host memory (the caller then uses
    /// the view directly). The backend treats `x` as written afterwards.
    fn with_device_memory<R>(
        &self,
        x: Self::ViewMut<'_>,
        f: impl FnOnce(DeviceMemory) -> R,
    ) -> Result<Option<R>> {
        let _ = (x, f);
        Ok(None)
    }
}

/// A range of f32 in device memory and the stream that orders its use (see
/// [`Backend::with_device_memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Device address of the first element.
    pub ptr: u64,
    /// Number of f32 elements.
    pub len: usize,
    /// The backend's stream (`CUstream`, which is also a `cudaStream_t`).
    pub stream: u64,
}

/// What the op scratch of a training micro-batch depends on (see [`Backend::scratch_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchShape {
    /// Tokens per micro-batch.
    pub rows: usize,
    /// Sequence length.
    pub t: usize,
    /// Query heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Model width.
    pub width: usize,
    /// Padded vocabulary.
    pub vocab: usize,
    /// Rows of logits per chunk of the fused head.
    pub logit_rows: usize,
    /// Matmul precision.
    pub precision: Precision,
}

/// The first `len` elements of a buffer.
pub fn prefix<B: Backend>(buf: &B::Buf, len: usize) -> B::View<'_> {
    B::slice(B::view(buf), 0..len)
}

/// The first `len` elements of a buffer, writable.
pub fn prefix_mut<B: Backend>(buf: &mut B::Buf, len: usize) -> B::ViewMut<'_> {
    B::slice_mut(B::view_mut(buf), 0..len)
}
