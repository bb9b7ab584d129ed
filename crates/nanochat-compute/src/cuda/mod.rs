//! The CUDA backend: NVIDIA GPUs through aprender-gpu's driver layer (libcuda by dlopen, PTX
//! modules JIT-compiled by the driver), cuBLAS loaded here, and this crate's own PTX kernels
//! ([`ptx`]).
//!
//! Everything is enqueued on one stream and returns at once; read-backs (`download`, `sum`,
//! ...) wait for the queue, and errors of queued kernels surface there. Matmuls at bf16 run on
//! the tensor cores with f32 accumulation (`cublasGemmEx`): weights through a bf16 shadow of
//! the flat parameter buffer rebuilt after each optimizer step, activations converted into
//! scratch on the way in, as torch's autocast does. Attention materialises the causal scores
//! of a chunk of sequences at a time (strided-batched GEMMs on `[B, H, T, D]` copies of the
//! heads), saves only the log-sum-exp for the backward pass, and recomputes the probabilities
//! there.

mod blas;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use trueno_gpu::driver::sys::{cuda_error_string, CudaDriver};
use trueno_gpu::driver::{CudaContext, CudaModule, CudaStream};

use crate::backend::{
    AdamWStep, AttnShape, Backend, DecodeShape, DeviceKind, Gemm, ScratchShape, WeightRef,
    WeightSlot,
};
use crate::cpu::{check_len, check_rows};
use crate::error::{ComputeError, Result};
use crate::ptx::{self, DECODE_THREADS, ELEMENTWISE_THREADS, KERNELS, ROW_THREADS, WARP_ROWS};
use crate::Precision;
use blas::{Batch, Blas, R_16BF, R_32F};

/// cuBLAS workspace (what it needs for its fastest algorithms, and for CUDA-graph capture).
const BLAS_WORKSPACE: usize = 32 << 20;
/// Bytes one attention score matrix (`[chunk·H, T, T]` f32) may take; the backward pass holds
/// two of them plus two half-size ones.
const ATTN_SCORE_BYTES: usize = 1 << 30;
/// Largest KV cache the decode kernel's shared-memory scores hold.
const DECODE_MAX_POSITIONS: usize = 12 * 1024;
/// Grid of the first pass of a reduction.
const REDUCE_BLOCKS: usize = 1024;

const CUDA_ERROR_OUT_OF_MEMORY: i32 = 2;

/// An NVIDIA GPU.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

// Fields drop in declaration order: the stream and the module must go while the context
// still lives (destroying a stream of a released primary context crashes the driver), so the
// context comes last.
struct Inner {
    index: usize,
    name: String,
    memory: u64,
    cc: (i32, i32),
    drv: &'static CudaDriver,
    functions: HashMap<&'static str, usize>,
    blas: Mutex<Option<Blas>>,
    blas_path: String,
    scratch: Mutex<Scratch>,
    workspace: u64,
    profile: Option<Mutex<Profile>>,
    /// Bumped by everything that may write device memory other than cuBLAS (kernels, copies,
    /// frees): a memoised bf16 operand is valid only within the epoch it was made in.
    writes: AtomicU64,
    /// bf16 copies of f32 buffers in the operand slots (see [`Cuda::operand`]).
    memo: Mutex<OperandMemo>,
    /// Whether bf16 attention takes the flash kernel (`NANOCHAT_CUDA_FLASH=0` turns it off).
    flash: AtomicBool,
    stream: CudaStream,
    _module: CudaModule,
    ctx: CudaContext,
}

/// Operand slots: a GEMM takes two; the backward pass of a linear layer reuses its output
/// gradient's copy, and the q/k/v projections share their input's (forward and weight
/// gradients), so four hold what a layer reuses.
const OPERAND_SLOTS: usize = 4;

/// The bf16 copies in the operand slots, and which f32 range each was made from. Between two
/// writes to device memory (any kernel but the conversion itself, any copy), a GEMM that asks
/// for the same range again gets the copy instead of converting anew; GEMM outputs that overlap
/// a source drop its copy. Saves about a third of the conversions of a training step.
#[derive(Default)]
struct OperandMemo {
    entries: Vec<MemoEntry>,
    tick: u64,
}

#[derive(Clone, Copy)]
struct MemoEntry {
    src: u64,
    len: usize,
    slot: u8,
    epoch: u64,
    used: u64,
}

/// Wall time per kernel and GEMM shape, when `NANOCHAT_CUDA_PROFILE` is set: each launch is
/// fenced by stream waits, so the figures add per-launch latency (a few µs) but need no
/// profiler (ncu and nsys are not on every machine). The table prints when the GPU is closed.
#[derive(Default)]
struct Profile {
    ops: HashMap<String, (u64, f64)>,
}

impl Profile {
    fn report(&self) -> String {
        let mut rows: Vec<_> = self.ops.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let total: f64 = rows.iter().map(|r| r.1 .1).sum();
        let mut out = format!(
            "cuda profile: {:.1} ms in {} ops\n{:>10} {:>6} {:>9} {:>10}  op\n",
            total * 1e3,
            rows.len(),
            "total ms",
            "share",
            "calls",
            "µs/call"
        );
        for (name, &(calls, secs)) in rows {
            out.push_str(&format!(
                "{:>10.2} {:>5.1}% {:>9} {:>10.1}  {name}\n",
                secs * 1e3,
                100.0 * secs / total.max(1e-12),
                calls,
                1e6 * secs / calls.max(1) as f64
            ));
        }
        out
    }
}

thread_local! {
    /// The context this thread last made current (CUDA binds contexts per thread).
    static BOUND: Cell<usize> = const { Cell::new(0) };
}

fn driver_err(what: &str, rc: i32) -> ComputeError {
    ComputeError::Driver {
        backend: "cuda",
        what: what.to_string(),
        detail: format!("{} ({rc})", cuda_error_string(rc)),
    }
}

fn ck(rc: i32, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(driver_err(what, rc))
    }
}

fn unavailable(device: String, reason: String) -> ComputeError {
    ComputeError::Unavailable { device, reason }
}

impl Inner {
    /// Runs `enqueue` and, when profiling, charges its time on the GPU to `key()`.
    fn timed(
        &self,
        key: impl FnOnce() -> String,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let Some(profile) = &self.profile else {
            return enqueue();
        };
        self.sync()?;
        let start = std::time::Instant::now();
        enqueue()?;
        self.sync()?;
        let secs = start.elapsed().as_secs_f64();
        if let Ok(mut p) = profile.lock() {
            let e = p.ops.entry(key()).or_default();
            e.0 += 1;
            e.1 += secs;
        }
        Ok(())
    }

    fn bind(&self) -> Result<()> {
        let raw = self.ctx.raw() as usize;
        if BOUND.with(|b| b.get()) != raw {
            // SAFETY: a live primary context.
            ck(
                unsafe { (self.drv.cuCtxSetCurrent)(self.ctx.raw()) },
                "cuCtxSetCurrent",
            )?;
            BOUND.with(|b| b.set(raw));
        }
        Ok(())
    }

    fn raw_alloc(&self, bytes: usize, what: &str) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        self.bind()?;
        let mut ptr = 0u64;
        // SAFETY: valid out-pointer.
        let rc = unsafe { (self.drv.cuMemAlloc)(&mut ptr, bytes) };
        if rc == CUDA_ERROR_OUT_OF_MEMORY {
            return Err(ComputeError::oom(
                format!("{what} on cuda:{}", self.index),
                bytes as u64,
                self.free_memory(),
            ));
        }
        ck(rc, "cuMemAlloc")?;
        // SAFETY: `ptr` holds `bytes` bytes; a multiple of 4 is zeroed as words.
        ck(
            unsafe { (self.drv.cuMemsetD32Async)(ptr, 0, bytes.div_ceil(4), self.stream.raw()) },
            "cuMemsetD32Async",
        )?;
        Ok(ptr)
    }

    fn bump_writes(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn raw_free(&self, ptr: u64) {
        // A later buffer may sit where a memoised source was.
        self.bump_writes();
        if ptr != 0 && self.bind().is_ok() {
            // SAFETY: allocated by raw_alloc, freed once (cuMemFree waits for its users).
            unsafe {
                (self.drv.cuMemFree)(ptr);
            }
        }
    }

    fn free_memory(&self) -> Option<u64> {
        self.bind().ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        let rc = unsafe { (self.drv.cuMemGetInfo)(&mut free, &mut total) };
        (rc == 0).then_some(free as u64)
    }

    fn sync(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: live stream.
        ck(
            unsafe { (self.drv.cuStreamSynchronize)(self.stream.raw()) },
            "synchronize (a queued kernel failed, or this wait did)",
        )
    }
}

/// A buffer on the GPU (`f32` or `i32` elements, or the bf16 shadow's `u16`).
pub struct DeviceBuf<T> {
    ptr: u64,
    len: usize,
    owner: Arc<Inner>,
    _t: PhantomData<T>,
}

impl<T> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        self.owner.raw_free(self.ptr);
    }
}

/// A shared view of a range of a [`DeviceBuf`].
pub struct DView<'a, T> {
    ptr: u64,
    len: usize,
    _p: PhantomData<&'a T>,
}
impl<T> Clone for DView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DView<'_, T> {}

/// An exclusive view of a range of a [`DeviceBuf`].
pub struct DViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _p: PhantomData<&'a mut T>,
}

fn sub_range(len: usize, r: &Range<usize>) -> usize {
    assert!(
        r.start <= r.end && r.end <= len,
        "device view range {r:?} out of 0..{len}"
    );
    r.end - r.start
}

/// The bf16 shadow of the flat parameters (same offsets), present for bf16 matmuls.
pub struct CudaWeights {
    bf16: Option<DeviceBuf<u16>>,
}

/// Grow-only device scratch, one buffer per use (ops hold the lock while they enqueue, and the
/// single stream orders their kernels, so a buffer is never in use by two ops at once).
#[derive(Default)]
struct Scratch {
    slots: HashMap<Slot, (u64, usize)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Slot {
    Operand(u8),
    Partials,
    Scalar,
    Order,
    Scores,
    ScoresGrad,
    Probs,
    ProbsGrad,
    Qt,
    Kt,
    Vt,
    Dyt,
    Dqt,
    Dkt,
    Dvt,
    Drow,
}

impl Scratch {
    fn get(&mut self, inner: &Inner, slot: Slot, bytes: usize) -> Result<u64> {
        if let Some(&(ptr, cap)) = self.slots.get(&slot) {
            if cap >= bytes {
                return Ok(ptr);
            }
            // The old buffer may still be read by queued kernels.
            inner.sync()?;
            inner.raw_free(ptr);
            self.slots.remove(&slot);
        }
        let cap = bytes.next_multiple_of(2 << 20);
        let ptr = inner.raw_alloc(cap, &format!("{slot:?} scratch"))?;
        self.slots.insert(slot, (ptr, cap));
        Ok(ptr)
    }

    fn release(&mut self, inner: &Inner) {
        if !self.slots.is_empty() {
            let _ = inner.sync();
        }
        for (_, (ptr, _)) in self.slots.drain() {
            inner.raw_free(ptr);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.sync();
        if let Some(Ok(p)) = self.profile.as_ref().map(|p| p.lock()) {
            eprint!("{}", p.report());
        }
        if let Ok(mut b) = self.blas.lock() {
            b.take();
        }
        let ws = self.workspace;
        if let Ok(mut s) = self.scratch.lock() {
            let mut s = std::mem::take(&mut *s);
            s.release(self);
        }
        self.raw_free(ws);
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    U(u32),
    F(f32),
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        ComputeError::kernel(format!("{what} = {n} exceeds the kernels' 32-bit indexing"))
    })
}

impl Cuda {
    /// Opens GPU `index`: the driver, a stream, the kernels' module, cuBLAS. Errors say which
    /// library or device is missing and what to do.
    pub fn open(index: usize) -> Result<Self> {
        let device = format!("cuda:{index}");
        let drv = CudaDriver::load().ok_or_else(|| {
            unavailable(
                device.clone(),
                "the NVIDIA driver library (libcuda.so.1) was not found: install the NVIDIA \
                 driver, or, in a container, run with the GPU exposed (e.g. `--gpus all`)"
                    .into(),
            )
        })?;
        let count = trueno_gpu::driver::device_count().map_err(|e| {
            unavailable(
                device.clone(),
                format!("the CUDA driver did not initialise: {e}"),
            )
        })?;
        if index >= count {
            return Err(unavailable(
                device,
                format!(
                    "this machine has {count} CUDA device(s); use cuda:0..cuda:{} (or check \
                     CUDA_VISIBLE_DEVICES)",
                    count.saturating_sub(1)
                ),
            ));
        }
        let ctx = CudaContext::new(index as i32)
            .map_err(|e| unavailable(device.clone(), format!("cannot open the GPU: {e}")))?;
        let gpu = |what: &str, e: trueno_gpu::GpuError| ComputeError::Driver {
            backend: "cuda",
            what: what.into(),
            detail: e.to_string(),
        };
        let name = ctx.device_name().map_err(|e| gpu("device name", e))?;
        let memory = ctx.total_memory().map_err(|e| gpu("device memory", e))? as u64;
        let cc = ctx
            .compute_capability()
            .map_err(|e| gpu("compute capability", e))?;
        if cc.0 < 8 {
            return Err(unavailable(
                device,
                format!(
                    "{name} has compute capability {}.{}; the kernels need 8.0 or newer \
                     (Ampere: bf16)",
                    cc.0, cc.1
                ),
            ));
        }
        let stream = CudaStream::new(&ctx).map_err(|e| gpu("stream", e))?;
        let mut module = CudaModule::from_ptx(&ctx, &ptx::module_source())
            .map_err(|e| gpu("loading the PTX kernels", e))?;
        let mut functions = HashMap::new();
        for &k in KERNELS {
            let f = module.get_function(k).map_err(|e| gpu(k, e))?;
            functions.insert(k, f as usize);
        }
        let inner = Inner {
            index,
            name,
            memory,
            cc,
            drv,
            functions,
            blas: Mutex::new(None),
            blas_path: String::new(),
            scratch: Mutex::new(Scratch::default()),
            workspace: 0,
            writes: AtomicU64::new(0),
            memo: Mutex::new(OperandMemo::default()),
            flash: AtomicBool::new(std::env::var("NANOCHAT_CUDA_FLASH").as_deref() != Ok("0")),
            profile: std::env::var_os("NANOCHAT_CUDA_PROFILE")
                .filter(|v| !v.is_empty() && v != "0")
                .map(|_| Mutex::new(Profile::default())),
            stream,
            _module: module,
            ctx,
        };
        BOUND.with(|b| b.set(inner.ctx.raw() as usize));
        let workspace = inner.raw_alloc(BLAS_WORKSPACE, "cuBLAS workspace")?;
        let blas =
            Blas::load(inner.stream.raw(), workspace, BLAS_WORKSPACE).map_err(|e| match e {
                ComputeError::Unavailable { reason, .. } => unavailable(device.clone(), reason),
                other => other,
            })?;
        let mut inner = inner;
        inner.workspace = workspace;
        inner.blas_path = blas.path.clone();
        inner.blas = Mutex::new(Some(blas));
        Ok(Cuda {
            inner: Arc::new(inner),
        })
    }

    /// Turns the flash-attention kernels (forward and backward) on or off for bf16 attention (on unless
    /// `NANOCHAT_CUDA_FLASH=0`); off, attention goes through score matrices and cuBLAS. For
    /// A/B measurements and tests of one against the other.
    pub fn set_flash_attention(&self, on: bool) {
        self.inner.flash.store(on, Ordering::Relaxed);
    }

    /// The GPU's index.
    pub fn index(&self) -> usize {
        self.inner.index
    }

    fn scratch(&self) -> Result<MutexGuard<'_, Scratch>> {
        self.inner
            .scratch
            .lock()
            .map_err(|_| ComputeError::kernel("cuda scratch lock poisoned by a panic"))
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        self.inner.bind()?;
        if !name.starts_with("k_to_bf16") {
            // Only the conversion writes nowhere a memoised source can be (operand slots and
            // the weights' bf16 shadow).
            self.inner.bump_writes();
        }
        let f = *self
            .inner
            .functions
            .get(name)
            .ok_or_else(|| ComputeError::kernel(format!("no kernel {name}")))?;
        let mut vals: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p,
                Arg::U(u) => u64::from(u),
                Arg::F(x) => u64::from(x.to_bits()),
            })
            .collect();
        // Each parameter is read from its slot's first bytes (little-endian x86/ARM hosts).
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|v| (v as *mut u64).cast::<c_void>())
            .collect();
        self.inner.timed(
            || {
                let threads =
                    u64::from(grid.0) * u64::from(grid.1) * u64::from(grid.2) * u64::from(block);
                format!("{name} (2^{} threads)", 63 - threads.max(1).leading_zeros())
            },
            || {
                // SAFETY: `f` is a kernel of the loaded module and `args` follow its parameter
                // list (ptx.rs); every pointer argument is a live device buffer sized by the
                // caller's checks.
                let rc = unsafe {
                    (self.inner.drv.cuLaunchKernel)(
                        f as *mut c_void,
                        grid.0,
                        grid.1,
                        grid.2,
                        block,
                        1,
                        1,
                        shared,
                        self.inner.stream.raw(),
                        ptrs.as_mut_ptr(),
                        std::ptr::null_mut(),
                    )
                };
                ck(rc, name)
            },
        )
    }

    /// An element-wise kernel over `n` elements: `(ptrs…, n, scalars…)`.
    fn ew(&self, name: &str, n: usize, ptrs: &[u64], scalars: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n32 = u32_of(n, name)?;
        let mut args: Vec<Arg> = ptrs.iter().map(|&p| Arg::P(p)).collect();
        args.push(Arg::U(n32));
        args.extend_from_slice(scalars);
        let grid = u32_of(n.div_ceil(ELEMENTWISE_THREADS as usize), name)?;
        self.launch(name, (grid, 1, 1), ELEMENTWISE_THREADS, 0, &args)
    }

    fn rows(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        let grid = u32_of(rows, name)?;
        self.launch(name, (grid, 1, 1), ROW_THREADS, 0, args)
    }

    /// A warp-per-row kernel over `rows` rows: `args` then the row count.
    fn warp_rows(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        let n = u32_of(rows, name)?;
        let grid = u32_of(rows.div_ceil(WARP_ROWS as usize), name)?;
        let mut all = args.to_vec();
        all.push(Arg::U(n));
        self.launch(name, (grid, 1, 1), ROW_THREADS, 0, &all)
    }

    #[allow(clippy::too_many_arguments)]
    fn blas_gemm(
        &self,
        t: (bool, bool),
        mnk: (usize, usize, usize),
        alpha: f32,
        a: (u64, i32),
        b: (u64, i32),
        beta: f32,
        c: u64,
        batch: Option<Batch>,
    ) -> Result<()> {
        self.inner.bind()?;
        // C is f32 `[m, n]` (per batch item, at its stride): copies of what it overwrites go.
        let c_elems = match &batch {
            Some(bt) => (bt.count.saturating_sub(1)) * bt.c + mnk.0 * mnk.1,
            None => mnk.0 * mnk.1,
        };
        let c_end = c + 4 * c_elems as u64;
        if let Ok(mut memo) = self.inner.memo.lock() {
            memo.entries
                .retain(|e| e.src + 4 * e.len as u64 <= c || e.src >= c_end);
        }
        let guard = self
            .inner
            .blas
            .lock()
            .map_err(|_| ComputeError::kernel("cuBLAS lock poisoned by a panic"))?;
        let blas = guard
            .as_ref()
            .ok_or_else(|| ComputeError::kernel("cuBLAS was released"))?;
        self.inner.timed(
            || {
                let count = batch.as_ref().map_or(1, |b| b.count);
                let ty = if a.1 == R_16BF { "bf16" } else { "f32" };
                format!(
                    "gemm {}x{}x{} x{count} t{}{} {ty} beta{beta}",
                    mnk.0, mnk.1, mnk.2, t.0 as u8, t.1 as u8
                )
            },
            || blas.gemm(t, mnk, alpha, a, b, beta, c, batch),
        )
    }

    /// `v` as a GEMM operand at `precision`: itself (f32), or a bf16 copy in an operand slot,
    /// reused when the same range was converted since the last write ([`OperandMemo`]).
    fn operand(
        &self,
        sc: &mut Scratch,
        v: u64,
        len: usize,
        precision: Precision,
    ) -> Result<(u64, i32)> {
        if precision == Precision::F32 {
            return Ok((v, R_32F));
        }
        let epoch = self.inner.writes.load(Ordering::Relaxed);
        let mut memo = self
            .inner
            .memo
            .lock()
            .map_err(|_| ComputeError::kernel("operand memo lock poisoned by a panic"))?;
        memo.tick += 1;
        let tick = memo.tick;
        memo.entries.retain(|e| e.epoch == epoch);
        if let Some(e) = memo.entries.iter_mut().find(|e| e.src == v && e.len == len) {
            e.used = tick;
            let slot = Slot::Operand(e.slot);
            let ptr = sc.get(&self.inner, slot, 2 * len)?;
            return Ok((ptr, R_16BF));
        }
        // A free slot, else the least recently used one (never the other operand of this
        // GEMM: it was used a tick ago).
        let slot = (0..OPERAND_SLOTS as u8)
            .find(|i| memo.entries.iter().all(|e| e.slot != *i))
            .unwrap_or_else(|| {
                memo.entries
                    .iter()
                    .min_by_key(|e| e.used)
                    .map_or(0, |e| e.slot)
            });
        memo.entries.retain(|e| e.slot != slot);
        drop(memo);
        let dst = sc.get(&self.inner, Slot::Operand(slot), 2 * len)?;
        self.to_bf16(v, dst, len)?;
        // Epoch after the conversion: growing the slot (a free) bumps it.
        let epoch = self.inner.writes.load(Ordering::Relaxed);
        if let Ok(mut memo) = self.inner.memo.lock() {
            memo.entries.push(MemoEntry {
                src: v,
                len,
                slot,
                epoch,
                used: tick,
            });
        }
        Ok((dst, R_16BF))
    }

    /// `len` f32 at `src` rounded to bf16 at `dst`: quads by vector loads where the addresses
    /// allow, the rest one by one.
    fn to_bf16(&self, src: u64, dst: u64, len: usize) -> Result<()> {
        let quads = if src.is_multiple_of(16) && dst.is_multiple_of(8) {
            len / 4
        } else {
            0
        };
        self.ew("k_to_bf16_x4", quads, &[src, dst], &[])?;
        let done = 4 * quads;
        self.ew(
            "k_to_bf16",
            len - done,
            &[src + 4 * done as u64, dst + 2 * done as u64],
            &[],
        )
    }

    /// A weight of the flat buffer as a GEMM operand: f32 in place, or its bf16 shadow.
    fn weight_operand(&self, w: &WeightRef<'_, Self>, precision: Precision) -> Result<(u64, i32)> {
        if w.params.len < w.slot.offset + w.slot.len() {
            return Err(ComputeError::kernel(format!(
                "linear: weight {} at {}..{} outside parameters of {}",
                w.index,
                w.slot.offset,
                w.slot.offset + w.slot.len(),
                w.params.len
            )));
        }
        match precision {
            Precision::F32 => Ok((w.params.ptr + 4 * w.slot.offset as u64, R_32F)),
            Precision::Bf16 => {
                let shadow = w.cache.bf16.as_ref().ok_or_else(|| {
                    ComputeError::kernel("bf16 matmul without a bf16 weight cache (update_weight_cache at bf16 first)")
                })?;
                Ok((shadow.ptr + 2 * w.slot.offset as u64, R_16BF))
            }
        }
    }

    /// Σ f(x) (f64) into a device scalar in scratch; returns its address.
    fn reduce_into(&self, sc: &mut Scratch, x: DView<'_, f32>, squares: bool) -> Result<u64> {
        let n = u32_of(x.len, "reduction length")?;
        let blocks = x.len.div_ceil(ROW_THREADS as usize).clamp(1, REDUCE_BLOCKS);
        let partials = sc.get(&self.inner, Slot::Partials, 8 * REDUCE_BLOCKS)?;
        let out = sc.get(&self.inner, Slot::Scalar, 8)?;
        self.rows(
            "k_reduce_partial",
            blocks,
            &[
                Arg::P(x.ptr),
                Arg::P(partials),
                Arg::U(n),
                Arg::U(squares as u32),
            ],
        )?;
        self.rows(
            "k_reduce_final",
            1,
            &[Arg::P(partials), Arg::P(out), Arg::U(blocks as u32)],
        )?;
        Ok(out)
    }

    fn read_f64(&self, ptr: u64) -> Result<f64> {
        let mut v = 0f64;
        self.inner.bind()?;
        // SAFETY: `ptr` holds one f64; the host target is a live local.
        ck(
            unsafe {
                (self.inner.drv.cuMemcpyDtoHAsync)(
                    (&mut v as *mut f64).cast::<c_void>(),
                    ptr,
                    8,
                    self.inner.stream.raw(),
                )
            },
            "read back",
        )?;
        self.inner.sync()?;
        Ok(v)
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.inner.bind()?;
        self.inner.bump_writes();
        self.inner.timed(
            || "device copy".into(),
            || {
                // SAFETY: both ranges are live device memory of `bytes` bytes (checked by
                // callers).
                ck(
                    unsafe {
                        (self.inner.drv.cuMemcpyDtoDAsync)(dst, src, bytes, self.inner.stream.raw())
                    },
                    "device copy",
                )
            },
        )
    }

    fn htod(&self, dst: u64, src: *const c_void, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.inner.bind()?;
        self.inner.bump_writes();
        // SAFETY: `src` is a live host range and `dst` device memory of `bytes` bytes. From
        // pageable memory the copy is staged before this returns, so `src` may be freed after.
        ck(
            unsafe { (self.inner.drv.cuMemcpyHtoDAsync)(dst, src, bytes, self.inner.stream.raw()) },
            "upload",
        )
    }

    fn dtoh(&self, dst: *mut c_void, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.inner.bind()?;
        // SAFETY: as `htod`, the other way; the wait below completes it before `dst` is used.
        ck(
            unsafe { (self.inner.drv.cuMemcpyDtoHAsync)(dst, src, bytes, self.inner.stream.raw()) },
            "download",
        )?;
        self.inner.sync()
    }

    /// Batch rows per attention chunk: the score matrices of a chunk stay under
    /// [`ATTN_SCORE_BYTES`] and 2³¹ elements.
    fn attn_chunk(s: &AttnShape) -> usize {
        let per_row = (s.h * s.t * s.t).max(1);
        let by_bytes = ATTN_SCORE_BYTES / (4 * per_row);
        let by_index = (i32::MAX as usize) / per_row;
        by_bytes.min(by_index).clamp(1, s.b.max(1))
    }

    /// `[B,T,Hsrc,D]` rows `b0..b0+nb` into a `[nb,H,T,D]` copy (f32 or bf16) in `slot`.
    #[allow(clippy::too_many_arguments)]
    fn heads_into_bhtd(
        &self,
        sc: &mut Scratch,
        slot: Slot,
        x: u64,
        s: &AttnShape,
        heads_src: usize,
        nb: usize,
        bf: bool,
    ) -> Result<u64> {
        let n = nb * s.h * s.t * s.d;
        let out = sc.get(&self.inner, slot, n * if bf { 2 } else { 4 })?;
        let g = s.h / heads_src;
        let name = if bf {
            "k_heads_to_bhtd_bf16"
        } else {
            "k_heads_to_bhtd_f32"
        };
        self.ew(
            name,
            n,
            &[x, out],
            &[
                Arg::U(s.t as u32),
                Arg::U(s.h as u32),
                Arg::U(g as u32),
                Arg::U(s.d as u32),
            ],
        )?;
        Ok(out)
    }

    /// `[nb,H,T,D]` f32 back to `[nb,T,Hk,D]` at `out`, summing each KV head's query heads.
    fn bhtd_into_heads(
        &self,
        x: u64,
        out: u64,
        s: &AttnShape,
        heads_dst: usize,
        nb: usize,
    ) -> Result<()> {
        let n = nb * s.t * heads_dst * s.d;
        self.ew(
            "k_bhtd_to_heads",
            n,
            &[x, out],
            &[
                Arg::U(s.t as u32),
                Arg::U(heads_dst as u32),
                Arg::U((s.h / heads_dst) as u32),
                Arg::U(s.d as u32),
            ],
        )
    }

    /// Whether bf16 attention of shape `s` takes the flash kernel: a head dim it is generated
    /// for, a grid it fits, and not turned off with `NANOCHAT_CUDA_FLASH=0` (kept for A/B
    /// measurements against the score-matrix path).
    fn flash_attention(&self, s: &AttnShape) -> bool {
        ptx::FLASH_HEAD_DIMS.contains(&s.d)
            && s.b * s.h <= 65_535
            && s.b * s.t * s.h.max(s.hk) * s.d < u32::MAX as usize
            && self.inner.flash.load(Ordering::Relaxed)
    }

    /// [`ptx`]'s `k_flash_fwd_d{D}`: causal attention straight from `[B,T,H,D]` q/k/v to y and
    /// lse, no score matrix, no head-layout copies.
    #[allow(clippy::too_many_arguments)]
    fn flash_forward(
        &self,
        s: &AttnShape,
        q: &DView<'_, f32>,
        k: &DView<'_, f32>,
        v: &DView<'_, f32>,
        y: &DViewMut<'_, f32>,
        lse: &DViewMut<'_, f32>,
        scale: f32,
    ) -> Result<()> {
        let name = format!("k_flash_fwd_d{}", s.d);
        let blocks = u32_of(s.t.div_ceil(ptx::FLASH_ROWS as usize), &name)?;
        let heads = u32_of(s.b * s.h, &name)?;
        self.launch(
            &name,
            (blocks, heads, 1),
            ptx::FLASH_THREADS,
            0,
            &[
                Arg::P(q.ptr),
                Arg::P(k.ptr),
                Arg::P(v.ptr),
                Arg::P(y.ptr),
                Arg::P(lse.ptr),
                Arg::U(u32_of(s.t, &name)?),
                Arg::U(u32_of(s.h, &name)?),
                Arg::U(u32_of(s.hk, &name)?),
                Arg::F(scale * std::f32::consts::LOG2_E),
            ],
        )
    }

    /// [`crate::flash`]'s backward kernels: δ = rowsum(dy∘y), then dK/dV per key block and dQ
    /// per query block, recomputing the probabilities from q, k and lse.
    fn flash_backward(
        &self,
        s: &AttnShape,
        [q, k, v, y, lse, dy]: [&DView<'_, f32>; 6],
        [dq, dk, dv]: [&DViewMut<'_, f32>; 3],
        scale: f32,
    ) -> Result<()> {
        let kv = format!("k_flash_bwd_kv_d{}", s.d);
        let qn = format!("k_flash_bwd_q_d{}", s.d);
        let mut sc = self.scratch()?;
        let drow = sc.get(&self.inner, Slot::Drow, 4 * s.b * s.h * s.t)?;
        self.ew(
            "k_attn_row_dot",
            s.b * s.t * s.h,
            &[dy.ptr, y.ptr, drow],
            &[Arg::U(s.t as u32), Arg::U(s.h as u32), Arg::U(s.d as u32)],
        )?;
        let blocks = u32_of(s.t.div_ceil(ptx::FLASH_ROWS as usize), &kv)?;
        let dims = [
            Arg::U(u32_of(s.t, &kv)?),
            Arg::U(u32_of(s.h, &kv)?),
            Arg::U(u32_of(s.hk, &kv)?),
            Arg::F(scale * std::f32::consts::LOG2_E),
            Arg::F(scale),
        ];
        let inputs = [q.ptr, k.ptr, v.ptr, dy.ptr, lse.ptr, drow].map(Arg::P);
        let mut args = inputs.to_vec();
        args.extend([Arg::P(dk.ptr), Arg::P(dv.ptr)]);
        args.extend(dims);
        self.launch(
            &kv,
            (blocks, u32_of(s.b * s.hk, &kv)?, 1),
            ptx::FLASH_THREADS,
            0,
            &args,
        )?;
        let mut args = inputs.to_vec();
        args.push(Arg::P(dq.ptr));
        args.extend(dims);
        self.launch(
            &qn,
            (blocks, u32_of(s.b * s.h, &qn)?, 1),
            ptx::FLASH_THREADS,
            0,
            &args,
        )
    }

    fn check_attn(op: &str, s: &AttnShape, q: usize, k: usize, v: usize) -> Result<()> {
        if s.hk == 0 || !s.h.is_multiple_of(s.hk) {
            return Err(ComputeError::kernel(format!(
                "{op}: {} heads are not a multiple of {} kv heads",
                s.h, s.hk
            )));
        }
        check_len(op, "q", q, s.b * s.t * s.h * s.d)?;
        check_len(op, "k", k, s.b * s.t * s.hk * s.d)?;
        check_len(op, "v", v, s.b * s.t * s.hk * s.d)
    }
}

fn dtype(p: Precision) -> (bool, usize, i32) {
    match p {
        Precision::F32 => (false, 4, R_32F),
        Precision::Bf16 => (true, 2, R_16BF),
    }
}

impl Backend for Cuda {
    type Buf = DeviceBuf<f32>;
    type IBuf = DeviceBuf<i32>;
    type View<'a> = DView<'a, f32>;
    type ViewMut<'a> = DViewMut<'a, f32>;
    type IView<'a> = DView<'a, i32>;
    type WeightCache = CudaWeights;

    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }

    fn describe(&self) -> String {
        let i = &self.inner;
        format!(
            "cuda:{} ({}, {:.0} GiB, sm_{}{}, cuBLAS {})",
            i.index,
            i.name,
            i.memory as f64 / (1u64 << 30) as f64,
            i.cc.0,
            i.cc.1,
            i.blas_path
        )
    }

    fn available_memory(&self) -> Option<u64> {
        self.inner.free_memory()
    }

    fn decode_precision(&self, train: Precision) -> Precision {
        train
    }

    fn alloc(&self, len: usize, what: &str) -> Result<DeviceBuf<f32>> {
        let ptr = self.inner.raw_alloc(4 * len, what)?;
        Ok(DeviceBuf {
            ptr,
            len,
            owner: self.inner.clone(),
            _t: PhantomData,
        })
    }

    fn alloc_ints(&self, len: usize, what: &str) -> Result<DeviceBuf<i32>> {
        let ptr = self.inner.raw_alloc(4 * len, what)?;
        Ok(DeviceBuf {
            ptr,
            len,
            owner: self.inner.clone(),
            _t: PhantomData,
        })
    }

    fn view(buf: &DeviceBuf<f32>) -> DView<'_, f32> {
        DView {
            ptr: buf.ptr,
            len: buf.len,
            _p: PhantomData,
        }
    }

    fn view_mut(buf: &mut DeviceBuf<f32>) -> DViewMut<'_, f32> {
        DViewMut {
            ptr: buf.ptr,
            len: buf.len,
            _p: PhantomData,
        }
    }

    fn iview(buf: &DeviceBuf<i32>) -> DView<'_, i32> {
        DView {
            ptr: buf.ptr,
            len: buf.len,
            _p: PhantomData,
        }
    }

    fn len(v: &DView<'_, f32>) -> usize {
        v.len
    }

    fn len_mut(v: &DViewMut<'_, f32>) -> usize {
        v.len
    }

    fn ilen(v: &DView<'_, i32>) -> usize {
        v.len
    }

    fn slice<'a>(v: Self::View<'a>, r: Range<usize>) -> Self::View<'a> {
        let len = sub_range(v.len, &r);
        DView {
            ptr: v.ptr + 4 * r.start as u64,
            len,
            _p: PhantomData,
        }
    }

    fn slice_mut<'a>(v: Self::ViewMut<'a>, r: Range<usize>) -> Self::ViewMut<'a> {
        let len = sub_range(v.len, &r);
        DViewMut {
            ptr: v.ptr + 4 * r.start as u64,
            len,
            _p: PhantomData,
        }
    }

    fn islice<'a>(v: Self::IView<'a>, r: Range<usize>) -> Self::IView<'a> {
        let len = sub_range(v.len, &r);
        DView {
            ptr: v.ptr + 4 * r.start as u64,
            len,
            _p: PhantomData,
        }
    }

    fn split_at_mut<'a>(
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        assert!(mid <= v.len, "split at {mid} of a view of {}", v.len);
        (
            DViewMut {
                ptr: v.ptr,
                len: mid,
                _p: PhantomData,
            },
            DViewMut {
                ptr: v.ptr + 4 * mid as u64,
                len: v.len - mid,
                _p: PhantomData,
            },
        )
    }

    fn reborrow<'a>(v: &'a mut Self::ViewMut<'_>) -> Self::ViewMut<'a> {
        DViewMut {
            ptr: v.ptr,
            len: v.len,
            _p: PhantomData,
        }
    }

    fn as_view<'a>(v: &'a Self::ViewMut<'_>) -> Self::View<'a> {
        DView {
            ptr: v.ptr,
            len: v.len,
            _p: PhantomData,
        }
    }

    fn upload(&self, src: &[f32], dst: DViewMut<'_, f32>) -> Result<()> {
        check_len("upload", "destination", dst.len, src.len())?;
        self.htod(dst.ptr, src.as_ptr().cast(), 4 * src.len())
    }

    fn download(&self, src: DView<'_, f32>, dst: &mut [f32]) -> Result<()> {
        check_len("download", "destination", dst.len(), src.len)?;
        self.dtoh(dst.as_mut_ptr().cast(), src.ptr, 4 * src.len)
    }

    fn download_rows(
        &self,
        src: DView<'_, f32>,
        stride: usize,
        width: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        let rows = check_rows("download_rows", "destination", dst.len(), width)?;
        if rows == 0 {
            return Ok(());
        }
        let span = (rows - 1) * stride + width;
        if width > stride || src.len < span {
            return Err(ComputeError::kernel(format!(
                "download_rows: {rows} rows of {width} at stride {stride} from {} elements",
                src.len
            )));
        }
        if stride == width {
            return self.dtoh(dst.as_mut_ptr().cast(), src.ptr, 4 * dst.len());
        }
        let mut all = vec![0f32; span];
        self.dtoh(all.as_mut_ptr().cast(), src.ptr, 4 * span)?;
        for (r, d) in dst.chunks_exact_mut(width).enumerate() {
            d.copy_from_slice(&all[r * stride..r * stride + width]);
        }
        Ok(())
    }

    fn upload_ints(&self, src: &[i32], dst: &mut DeviceBuf<i32>) -> Result<()> {
        if src.len() > dst.len {
            return Err(ComputeError::kernel(format!(
                "upload_ints: {} ints into a buffer of {}",
                src.len(),
                dst.len
            )));
        }
        self.htod(dst.ptr, src.as_ptr().cast(), 4 * src.len())
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.sync()
    }

    fn with_device_memory<R>(
        &self,
        x: DViewMut<'_, f32>,
        f: impl FnOnce(crate::DeviceMemory) -> R,
    ) -> Result<Option<R>> {
        self.inner.bind()?;
        let out = f(crate::DeviceMemory {
            ptr: x.ptr,
            len: x.len,
            stream: self.inner.stream.raw() as u64,
        });
        // Whatever `f` enqueued may have written `x`: memoised bf16 copies are stale.
        self.inner.bump_writes();
        Ok(Some(out))
    }

    fn fill(&self, x: DViewMut<'_, f32>, value: f32) -> Result<()> {
        self.ew("k_fill", x.len, &[x.ptr], &[Arg::F(value)])
    }

    fn copy(&self, src: DView<'_, f32>, dst: DViewMut<'_, f32>) -> Result<()> {
        check_len("copy", "destination", dst.len, src.len)?;
        self.dtod(dst.ptr, src.ptr, 4 * src.len)
    }

    fn copy_within(
        &self,
        buf: DViewMut<'_, f32>,
        src_off: usize,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        if src_off + len > buf.len || dst_off + len > buf.len {
            return Err(ComputeError::kernel(format!(
                "copy_within: {len} elements from {src_off} to {dst_off} in a buffer of {}",
                buf.len
            )));
        }
        self.dtod(
            buf.ptr + 4 * dst_off as u64,
            buf.ptr + 4 * src_off as u64,
            4 * len,
        )
    }

    fn copy_rows(
        &self,
        src: DView<'_, f32>,
        src_stride: usize,
        dst: DViewMut<'_, f32>,
        dst_stride: usize,
        width: usize,
        rows: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if width > src_stride.min(dst_stride)
            || src.len < (rows - 1) * src_stride + width
            || dst.len < (rows - 1) * dst_stride + width
        {
            return Err(ComputeError::kernel(format!(
                "copy_rows: {rows} rows of {width} with strides {src_stride}/{dst_stride} from {} into {} elements",
                src.len, dst.len
            )));
        }
        self.ew(
            "k_copy_rows",
            rows * width,
            &[src.ptr, dst.ptr],
            &[
                Arg::U(src_stride as u32),
                Arg::U(dst_stride as u32),
                Arg::U(width as u32),
            ],
        )
    }

    fn gather_rows(
        &self,
        table: DView<'_, f32>,
        dim: usize,
        idx: DView<'_, i32>,
        out: DViewMut<'_, f32>,
    ) -> Result<()> {
        check_rows("gather_rows", "table", table.len, dim)?;
        check_len("gather_rows", "output", out.len, idx.len * dim)?;
        self.ew(
            "k_gather_rows",
            out.len,
            &[table.ptr, idx.ptr, out.ptr],
            &[Arg::U(dim as u32)],
        )
    }

    fn scatter_rows(
        &self,
        src: DView<'_, f32>,
        dim: usize,
        idx: DView<'_, i32>,
        table: DViewMut<'_, f32>,
    ) -> Result<()> {
        check_rows("scatter_rows", "table", table.len, dim)?;
        check_len("scatter_rows", "source", src.len, idx.len * dim)?;
        self.ew(
            "k_scatter_rows",
            src.len,
            &[src.ptr, idx.ptr, table.ptr],
            &[Arg::U(dim as u32)],
        )
    }

    fn scatter_add_rows(
        &self,
        src: DView<'_, f32>,
        dim: usize,
        idx: DView<'_, i32>,
        table: DViewMut<'_, f32>,
    ) -> Result<()> {
        let rows = check_rows("scatter_add_rows", "table", table.len, dim)?;
        check_len("scatter_add_rows", "source", src.len, idx.len * dim)?;
        if idx.len == 0 {
            return Ok(());
        }
        // Deterministic: the indices come back to the host (a few hundred KB), are sorted
        // stably there, and one block per distinct row sums its sources in increasing order,
        // the CPU's order, with no atomics.
        let mut host = vec![0i32; idx.len];
        self.dtoh(host.as_mut_ptr().cast(), idx.ptr, 4 * idx.len)?;
        if let Some(&bad) = host.iter().find(|&&i| i < 0 || i as usize >= rows) {
            return Err(ComputeError::kernel(format!(
                "scatter_add_rows: row index {bad} outside 0..{rows}"
            )));
        }
        let mut order: Vec<i32> = (0..idx.len as i32).collect();
        order.sort_by_key(|&i| host[i as usize]);
        let mut seg_start: Vec<i32> = Vec::new();
        let mut seg_row: Vec<i32> = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let r = host[i as usize];
            if seg_row.last() != Some(&r) {
                seg_row.push(r);
                seg_start.push(k as i32);
            }
        }
        seg_start.push(order.len() as i32);
        let nseg = seg_row.len();
        let mut packed = order;
        packed.extend_from_slice(&seg_start);
        packed.extend_from_slice(&seg_row);
        let mut sc = self.scratch()?;
        let dev = sc.get(&self.inner, Slot::Order, 4 * packed.len())?;
        self.htod(dev, packed.as_ptr().cast(), 4 * packed.len())?;
        let seg_start_ptr = dev + 4 * idx.len as u64;
        let seg_row_ptr = seg_start_ptr + 4 * (nseg as u64 + 1);
        self.rows(
            "k_scatter_add_sorted",
            nseg,
            &[
                Arg::P(src.ptr),
                Arg::P(dev),
                Arg::P(seg_start_ptr),
                Arg::P(seg_row_ptr),
                Arg::P(table.ptr),
                Arg::U(dim as u32),
            ],
        )?;
        // `packed` is a pageable host buffer: the upload was staged before htod returned.
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: DView<'_, f32>,
        y: DViewMut<'_, f32>,
        rstd: DViewMut<'_, f32>,
        dim: usize,
    ) -> Result<()> {
        let rows = check_rows("rmsnorm", "x", x.len, dim)?;
        check_len("rmsnorm", "y", y.len, x.len)?;
        check_len("rmsnorm", "rstd", rstd.len, rows)?;
        self.warp_rows(
            "k_rmsnorm",
            rows,
            &[
                Arg::P(x.ptr),
                Arg::P(y.ptr),
                Arg::P(rstd.ptr),
                Arg::U(dim as u32),
            ],
        )
    }

    fn rmsnorm_inplace(
        &self,
        x: DViewMut<'_, f32>,
        rstd: DViewMut<'_, f32>,
        dim: usize,
    ) -> Result<()> {
        let rows = check_rows("rmsnorm_inplace", "x", x.len, dim)?;
        check_len("rmsnorm_inplace", "rstd", rstd.len, rows)?;
        self.warp_rows(
            "k_rmsnorm",
            rows,
            &[
                Arg::P(x.ptr),
                Arg::P(x.ptr),
                Arg::P(rstd.ptr),
                Arg::U(dim as u32),
            ],
        )
    }

    fn rmsnorm_bwd(
        &self,
        dy: DView<'_, f32>,
        y: DView<'_, f32>,
        rstd: DView<'_, f32>,
        dx: DViewMut<'_, f32>,
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        let rows = check_rows("rmsnorm_bwd", "dy", dy.len, dim)?;
        check_len("rmsnorm_bwd", "y", y.len, dy.len)?;
        check_len("rmsnorm_bwd", "dx", dx.len, dy.len)?;
        check_len("rmsnorm_bwd", "rstd", rstd.len, rows)?;
        self.warp_rows(
            "k_rmsnorm_bwd",
            rows,
            &[
                Arg::P(dy.ptr),
                Arg::P(y.ptr),
                Arg::P(rstd.ptr),
                Arg::P(dx.ptr),
                Arg::U(dim as u32),
                Arg::U(accumulate as u32),
            ],
        )
    }

    fn rmsnorm_bwd_inplace(
        &self,
        g: DViewMut<'_, f32>,
        y: DView<'_, f32>,
        rstd: DView<'_, f32>,
        dim: usize,
    ) -> Result<()> {
        let rows = check_rows("rmsnorm_bwd_inplace", "g", g.len, dim)?;
        check_len("rmsnorm_bwd_inplace", "y", y.len, g.len)?;
        check_len("rmsnorm_bwd_inplace", "rstd", rstd.len, rows)?;
        self.warp_rows(
            "k_rmsnorm_bwd",
            rows,
            &[
                Arg::P(g.ptr),
                Arg::P(y.ptr),
                Arg::P(rstd.ptr),
                Arg::P(g.ptr),
                Arg::U(dim as u32),
                Arg::U(0),
            ],
        )
    }

    fn rope(
        &self,
        x: DViewMut<'_, f32>,
        heads: usize,
        head_dim: usize,
        positions: DView<'_, i32>,
        cos: DView<'_, f32>,
        sin: DView<'_, f32>,
        inverse: bool,
    ) -> Result<()> {
        let tokens = check_rows("rope", "x", x.len, heads * head_dim)?;
        check_len("rope", "positions", positions.len, tokens)?;
        if !head_dim.is_multiple_of(2) || cos.len != sin.len {
            return Err(ComputeError::kernel("rope: odd head_dim or unequal tables"));
        }
        let half = head_dim / 2;
        self.ew(
            "k_rope",
            tokens * heads * half,
            &[x.ptr, positions.ptr, cos.ptr, sin.ptr],
            &[
                Arg::U(heads as u32),
                Arg::U(half as u32),
                Arg::F(if inverse { -1.0 } else { 1.0 }),
            ],
        )
    }

    fn relu2(&self, x: DView<'_, f32>, y: DViewMut<'_, f32>) -> Result<()> {
        check_len("relu2", "y", y.len, x.len)?;
        self.ew("k_relu2", x.len, &[x.ptr, y.ptr], &[])
    }

    fn relu2_bwd(&self, g: DViewMut<'_, f32>, x: DView<'_, f32>) -> Result<()> {
        check_len("relu2_bwd", "x", x.len, g.len)?;
        self.ew("k_relu2_bwd", g.len, &[g.ptr, x.ptr], &[])
    }

    fn attention(
        &self,
        s: AttnShape,
        q: DView<'_, f32>,
        k: DView<'_, f32>,
        v: DView<'_, f32>,
        y: DViewMut<'_, f32>,
        lse: DViewMut<'_, f32>,
    ) -> Result<()> {
        Self::check_attn("attention", &s, q.len, k.len, v.len)?;
        check_len("attention", "y", y.len, q.len)?;
        check_len("attention", "lse", lse.len, s.b * s.h * s.t)?;
        let (bf, esz, dt) = dtype(s.precision);
        let scale = 1.0 / (s.d as f32).sqrt();
        if bf && self.flash_attention(&s) {
            return self.flash_forward(&s, &q, &k, &v, &y, &lse, scale);
        }
        let (t, d, h) = (s.t, s.d, s.h);
        let mut sc = self.scratch()?;
        let chunk = Self::attn_chunk(&s);
        let mut b0 = 0;
        while b0 < s.b {
            let nb = chunk.min(s.b - b0);
            let qo = (b0 * t * h * d) as u64 * 4;
            let ko = (b0 * t * s.hk * d) as u64 * 4;
            let qt = self.heads_into_bhtd(&mut sc, Slot::Qt, q.ptr + qo, &s, h, nb, bf)?;
            let kt = self.heads_into_bhtd(&mut sc, Slot::Kt, k.ptr + ko, &s, s.hk, nb, bf)?;
            let vt = self.heads_into_bhtd(&mut sc, Slot::Vt, v.ptr + ko, &s, s.hk, nb, bf)?;
            let heads = nb * h;
            let scores = sc.get(&self.inner, Slot::Scores, 4 * heads * t * t)?;
            self.blas_gemm(
                (false, true),
                (t, t, d),
                1.0,
                (qt, dt),
                (kt, dt),
                0.0,
                scores,
                Some(Batch {
                    count: heads,
                    a: t * d,
                    b: t * d,
                    c: t * t,
                }),
            )?;
            let probs = if bf {
                sc.get(&self.inner, Slot::Probs, esz * heads * t * t)?
            } else {
                scores
            };
            let lse_ptr = lse.ptr + 4 * (b0 * h * t) as u64;
            self.launch(
                "k_attn_softmax",
                (t as u32, heads as u32, 1),
                ROW_THREADS,
                0,
                &[
                    Arg::P(scores),
                    Arg::P(probs),
                    Arg::P(lse_ptr),
                    Arg::U(t as u32),
                    Arg::F(scale),
                    Arg::U(bf as u32),
                ],
            )?;
            let yt = sc.get(&self.inner, Slot::Dqt, 4 * heads * t * d)?;
            self.blas_gemm(
                (false, false),
                (t, d, t),
                1.0,
                (probs, dt),
                (vt, dt),
                0.0,
                yt,
                Some(Batch {
                    count: heads,
                    a: t * t,
                    b: t * d,
                    c: t * d,
                }),
            )?;
            self.bhtd_into_heads(yt, y.ptr + qo, &s, h, nb)?;
            b0 += nb;
        }
        Ok(())
    }

    fn attention_bwd(
        &self,
        s: AttnShape,
        q: DView<'_, f32>,
        k: DView<'_, f32>,
        v: DView<'_, f32>,
        y: DView<'_, f32>,
        lse: DView<'_, f32>,
        dy: DView<'_, f32>,
        dq: DViewMut<'_, f32>,
        dk: DViewMut<'_, f32>,
        dv: DViewMut<'_, f32>,
    ) -> Result<()> {
        Self::check_attn("attention_bwd", &s, q.len, k.len, v.len)?;
        for (what, len) in [("y", y.len), ("dy", dy.len), ("dq", dq.len)] {
            check_len("attention_bwd", what, len, q.len)?;
        }
        check_len("attention_bwd", "dk", dk.len, k.len)?;
        check_len("attention_bwd", "dv", dv.len, v.len)?;
        check_len("attention_bwd", "lse", lse.len, s.b * s.h * s.t)?;
        let (bf, esz, dt) = dtype(s.precision);
        let scale = 1.0 / (s.d as f32).sqrt();
        if bf && self.flash_attention(&s) {
            return self.flash_backward(&s, [&q, &k, &v, &y, &lse, &dy], [&dq, &dk, &dv], scale);
        }
        let (t, d, h) = (s.t, s.d, s.h);
        let mut sc = self.scratch()?;
        let chunk = Self::attn_chunk(&s);
        let mut b0 = 0;
        while b0 < s.b {
            let nb = chunk.min(s.b - b0);
            let heads = nb * h;
            let qo = (b0 * t * h * d) as u64 * 4;
            let ko = (b0 * t * s.hk * d) as u64 * 4;
            let qt = self.heads_into_bhtd(&mut sc, Slot::Qt, q.ptr + qo, &s, h, nb, bf)?;
            let kt = self.heads_into_bhtd(&mut sc, Slot::Kt, k.ptr + ko, &s, s.hk, nb, bf)?;
            let vt = self.heads_into_bhtd(&mut sc, Slot::Vt, v.ptr + ko, &s, s.hk, nb, bf)?;
            let dyt = self.heads_into_bhtd(&mut sc, Slot::Dyt, dy.ptr + qo, &s, h, nb, bf)?;
            let drow = sc.get(&self.inner, Slot::Drow, 4 * heads * t)?;
            self.ew(
                "k_attn_row_dot",
                nb * t * h,
                &[dy.ptr + qo, y.ptr + qo, drow],
                &[Arg::U(t as u32), Arg::U(h as u32), Arg::U(d as u32)],
            )?;
            let tt = Batch {
                count: heads,
                a: t * d,
                b: t * d,
                c: t * t,
            };
            let scores = sc.get(&self.inner, Slot::Scores, 4 * heads * t * t)?;
            self.blas_gemm(
                (false, true),
                (t, t, d),
                1.0,
                (qt, dt),
                (kt, dt),
                0.0,
                scores,
                Some(tt),
            )?;
            let dp = sc.get(&self.inner, Slot::ScoresGrad, 4 * heads * t * t)?;
            self.blas_gemm(
                (false, true),
                (t, t, d),
                1.0,
                (dyt, dt),
                (vt, dt),
                0.0,
                dp,
                Some(tt),
            )?;
            let (probs, dscores) = if bf {
                (
                    sc.get(&self.inner, Slot::Probs, esz * heads * t * t)?,
                    sc.get(&self.inner, Slot::ProbsGrad, esz * heads * t * t)?,
                )
            } else {
                (scores, dp)
            };
            let lse_ptr = lse.ptr + 4 * (b0 * h * t) as u64;
            self.ew(
                "k_attn_softmax_bwd",
                heads * t * t,
                &[scores, dp, lse_ptr, drow, probs, dscores],
                &[Arg::U(t as u32), Arg::F(scale), Arg::U(bf as u32)],
            )?;
            let td = Batch {
                count: heads,
                a: t * t,
                b: t * d,
                c: t * d,
            };
            let dvt = sc.get(&self.inner, Slot::Dvt, 4 * heads * t * d)?;
            self.blas_gemm(
                (true, false),
                (t, d, t),
                1.0,
                (probs, dt),
                (dyt, dt),
                0.0,
                dvt,
                Some(td),
            )?;
            let dqt = sc.get(&self.inner, Slot::Dqt, 4 * heads * t * d)?;
            self.blas_gemm(
                (false, false),
                (t, d, t),
                scale,
                (dscores, dt),
                (kt, dt),
                0.0,
                dqt,
                Some(td),
            )?;
            let dkt = sc.get(&self.inner, Slot::Dkt, 4 * heads * t * d)?;
            self.blas_gemm(
                (true, false),
                (t, d, t),
                scale,
                (dscores, dt),
                (qt, dt),
                0.0,
                dkt,
                Some(td),
            )?;
            self.bhtd_into_heads(dqt, dq.ptr + qo, &s, h, nb)?;
            self.bhtd_into_heads(dkt, dk.ptr + ko, &s, s.hk, nb)?;
            self.bhtd_into_heads(dvt, dv.ptr + ko, &s, s.hk, nb)?;
            b0 += nb;
        }
        Ok(())
    }

    fn attention_decode(
        &self,
        s: DecodeShape,
        q: DView<'_, f32>,
        positions: DView<'_, i32>,
        rows: DView<'_, i32>,
        k_cache: DView<'_, f32>,
        v_cache: DView<'_, f32>,
        y: DViewMut<'_, f32>,
    ) -> Result<()> {
        let m = check_rows("attention_decode", "q", q.len, s.h * s.d)?;
        check_len("attention_decode", "y", y.len, q.len)?;
        check_len("attention_decode", "positions", positions.len, m)?;
        check_len("attention_decode", "rows", rows.len, m)?;
        if s.hk == 0 || !s.h.is_multiple_of(s.hk) || s.d > 512 {
            return Err(ComputeError::kernel(format!(
                "attention_decode: {} heads over {} kv heads of dim {} (dim at most 512)",
                s.h, s.hk, s.d
            )));
        }
        if s.capacity > DECODE_MAX_POSITIONS {
            return Err(ComputeError::kernel(format!(
                "attention_decode: a KV cache of {} positions exceeds the kernel's {DECODE_MAX_POSITIONS}",
                s.capacity
            )));
        }
        check_rows(
            "attention_decode",
            "k_cache",
            k_cache.len,
            s.capacity * s.hk * s.d,
        )?;
        check_len("attention_decode", "v_cache", v_cache.len, k_cache.len)?;
        self.launch(
            "k_attn_decode",
            (u32_of(m, "decode tokens")?, s.h as u32, 1),
            DECODE_THREADS,
            (4 * s.capacity) as u32,
            &[
                Arg::P(q.ptr),
                Arg::P(positions.ptr),
                Arg::P(rows.ptr),
                Arg::P(k_cache.ptr),
                Arg::P(v_cache.ptr),
                Arg::P(y.ptr),
                Arg::U(s.h as u32),
                Arg::U(s.hk as u32),
                Arg::U(s.d as u32),
                Arg::U(s.capacity as u32),
                Arg::F(1.0 / (s.d as f32).sqrt()),
            ],
        )
    }

    fn gemm(
        &self,
        g: Gemm,
        a: DView<'_, f32>,
        b: DView<'_, f32>,
        c: DViewMut<'_, f32>,
    ) -> Result<()> {
        check_len("gemm", "a", a.len, g.m * g.k)?;
        check_len("gemm", "b", b.len, g.k * g.n)?;
        check_len("gemm", "c", c.len, g.m * g.n)?;
        let mut sc = self.scratch()?;
        let ao = self.operand(&mut sc, a.ptr, a.len, g.precision)?;
        let bo = self.operand(&mut sc, b.ptr, b.len, g.precision)?;
        self.blas_gemm(
            (g.ta, g.tb),
            (g.m, g.n, g.k),
            g.alpha,
            ao,
            bo,
            g.beta,
            c.ptr,
            None,
        )
    }

    fn update_weight_cache(
        &self,
        params: DView<'_, f32>,
        layout: &[WeightSlot],
        precision: Precision,
        cache: &mut Option<CudaWeights>,
    ) -> Result<()> {
        let w = cache.get_or_insert_with(|| CudaWeights { bf16: None });
        match precision {
            Precision::F32 => w.bf16 = None,
            Precision::Bf16 => {
                let need = layout.iter().map(|s| s.offset + s.len()).max().unwrap_or(0);
                if need > params.len {
                    return Err(ComputeError::kernel(format!(
                        "weight cache: the layout spans {need} elements, the parameters {}",
                        params.len
                    )));
                }
                if w.bf16.as_ref().map(|b| b.len) != Some(need) {
                    w.bf16 = None;
                    let ptr = self.inner.raw_alloc(2 * need, "bf16 weight shadow")?;
                    w.bf16 = Some(DeviceBuf {
                        ptr,
                        len: need,
                        owner: self.inner.clone(),
                        _t: PhantomData,
                    });
                }
                let dst = w.bf16.as_ref().map(|b| b.ptr).unwrap_or(0);
                self.to_bf16(params.ptr, dst, need)?;
            }
        }
        Ok(())
    }

    fn weight_cache_bytes(&self, layout: &[WeightSlot], precision: Precision) -> u64 {
        match precision {
            Precision::F32 => 0,
            Precision::Bf16 => {
                2 * layout.iter().map(|s| s.offset + s.len()).max().unwrap_or(0) as u64
            }
        }
    }

    fn scratch_bytes(&self, s: ScratchShape) -> u64 {
        let (bf, esz, _) = dtype(s.precision);
        // bf16 operand copies, each slot at most the largest activation (the MLP's) or the logit
        // chunk.
        let operands = if bf {
            (OPERAND_SLOTS * (4 * s.width * s.rows).max(s.vocab * s.logit_rows)) as u64 * 2
        } else {
            0
        };
        let shape = AttnShape {
            b: (s.rows / s.t.max(1)).max(1),
            t: s.t,
            h: s.heads,
            hk: s.heads,
            d: s.head_dim,
            precision: s.precision,
        };
        let nb = Self::attn_chunk(&shape);
        let tt = (nb * s.heads * s.t * s.t) as u64;
        let td = (nb * s.heads * s.t * s.head_dim) as u64;
        let attn =
            tt * 4 * 2 + if bf { tt * esz as u64 * 2 } else { 0 } + td * (4 * esz as u64 + 3 * 4);
        operands + attn + BLAS_WORKSPACE as u64
    }

    fn linear(
        &self,
        w: WeightRef<'_, Self>,
        x: DView<'_, f32>,
        y: DViewMut<'_, f32>,
        rows: usize,
        accumulate: bool,
        precision: Precision,
    ) -> Result<()> {
        let (out, inp) = (w.slot.out, w.slot.inp);
        check_len("linear", "x", x.len, rows * inp)?;
        check_len("linear", "y", y.len, rows * out)?;
        let wo = self.weight_operand(&w, precision)?;
        let mut sc = self.scratch()?;
        let xo = self.operand(&mut sc, x.ptr, x.len, precision)?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.blas_gemm(
            (false, true),
            (rows, out, inp),
            1.0,
            xo,
            wo,
            beta,
            y.ptr,
            None,
        )
    }

    fn linear_bwd_input(
        &self,
        w: WeightRef<'_, Self>,
        dy: DView<'_, f32>,
        dx: DViewMut<'_, f32>,
        rows: usize,
        accumulate: bool,
        precision: Precision,
    ) -> Result<()> {
        let (out, inp) = (w.slot.out, w.slot.inp);
        check_len("linear_bwd_input", "dy", dy.len, rows * out)?;
        check_len("linear_bwd_input", "dx", dx.len, rows * inp)?;
        let wo = self.weight_operand(&w, precision)?;
        let mut sc = self.scratch()?;
        let go = self.operand(&mut sc, dy.ptr, dy.len, precision)?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.blas_gemm(
            (false, false),
            (rows, inp, out),
            1.0,
            go,
            wo,
            beta,
            dx.ptr,
            None,
        )
    }

    fn linear_bwd_weight(
        &self,
        dy: DView<'_, f32>,
        x: DView<'_, f32>,
        dw: DViewMut<'_, f32>,
        rows: usize,
        out: usize,
        inp: usize,
        precision: Precision,
    ) -> Result<()> {
        check_len("linear_bwd_weight", "dy", dy.len, rows * out)?;
        check_len("linear_bwd_weight", "x", x.len, rows * inp)?;
        check_len("linear_bwd_weight", "dw", dw.len, out * inp)?;
        let mut sc = self.scratch()?;
        let go = self.operand(&mut sc, dy.ptr, dy.len, precision)?;
        let xo = self.operand(&mut sc, x.ptr, x.len, precision)?;
        self.blas_gemm(
            (true, false),
            (out, inp, rows),
            1.0,
            go,
            xo,
            1.0,
            dw.ptr,
            None,
        )
    }

    fn softcap_ce(
        &self,
        logits: DViewMut<'_, f32>,
        rows: usize,
        vocab: usize,
        padded: usize,
        targets: DView<'_, i32>,
        softcap: Option<f32>,
        grad_scale: Option<f32>,
        losses: DViewMut<'_, f32>,
    ) -> Result<()> {
        check_len("softcap_ce", "logits", logits.len, rows * padded)?;
        check_len("softcap_ce", "targets", targets.len, rows)?;
        check_len("softcap_ce", "losses", losses.len, rows)?;
        if vocab > padded {
            return Err(ComputeError::kernel(
                "softcap_ce: vocab exceeds the padded row",
            ));
        }
        self.rows(
            "k_softcap_ce",
            rows,
            &[
                Arg::P(logits.ptr),
                Arg::P(targets.ptr),
                Arg::P(losses.ptr),
                Arg::U(vocab as u32),
                Arg::U(padded as u32),
                Arg::F(softcap.unwrap_or(0.0)),
                Arg::U(grad_scale.is_some() as u32),
                Arg::F(grad_scale.unwrap_or(0.0)),
            ],
        )
    }

    fn sum(&self, x: DView<'_, f32>) -> Result<f64> {
        if x.len == 0 {
            return Ok(0.0);
        }
        let mut sc = self.scratch()?;
        let out = self.reduce_into(&mut sc, x, false)?;
        self.read_f64(out)
    }

    fn sum_squares(&self, x: DView<'_, f32>) -> Result<f64> {
        if x.len == 0 {
            return Ok(0.0);
        }
        let mut sc = self.scratch()?;
        let out = self.reduce_into(&mut sc, x, true)?;
        self.read_f64(out)
    }

    fn scale(&self, x: DViewMut<'_, f32>, s: f32) -> Result<()> {
        self.ew("k_scale", x.len, &[x.ptr], &[Arg::F(s)])
    }

    fn adamw(
        &self,
        p: DViewMut<'_, f32>,
        g: DView<'_, f32>,
        m: DViewMut<'_, f32>,
        v: DViewMut<'_, f32>,
        h: AdamWStep,
    ) -> Result<()> {
        for (what, len) in [("grad", g.len), ("exp_avg", m.len), ("exp_avg_sq", v.len)] {
            check_len("adamw", what, len, p.len)?;
        }
        self.ew(
            "k_adamw",
            p.len,
            &[p.ptr, g.ptr, m.ptr, v.ptr],
            &[
                Arg::F(h.beta1),
                Arg::F(h.beta2),
                Arg::F(h.eps),
                Arg::F(h.step_size),
                Arg::F(h.inv_bc2_sqrt),
                Arg::F(h.decay),
            ],
        )
    }

    fn muon_momentum(
        &self,
        buf: DViewMut<'_, f32>,
        g: DView<'_, f32>,
        u: DViewMut<'_, f32>,
        momentum: f32,
        nesterov: bool,
        round_bf16: bool,
    ) -> Result<()> {
        check_len("muon_momentum", "grad", g.len, buf.len)?;
        check_len("muon_momentum", "update", u.len, buf.len)?;
        self.ew(
            "k_muon_momentum",
            buf.len,
            &[buf.ptr, g.ptr, u.ptr],
            &[
                Arg::F(momentum),
                Arg::U(nesterov as u32),
                Arg::U(round_bf16 as u32),
            ],
        )
    }

    fn transpose(
        &self,
        src: DView<'_, f32>,
        rows: usize,
        cols: usize,
        dst: DViewMut<'_, f32>,
    ) -> Result<()> {
        check_len("transpose", "source", src.len, rows * cols)?;
        check_len("transpose", "destination", dst.len, rows * cols)?;
        self.ew(
            "k_transpose",
            src.len,
            &[src.ptr, dst.ptr],
            &[Arg::U(rows as u32), Arg::U(cols as u32)],
        )
    }

    fn frobenius_normalize(&self, x: DViewMut<'_, f32>, eps: f32, round_bf16: bool) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        let mut sc = self.scratch()?;
        let view = DView {
            ptr: x.ptr,
            len: x.len,
            _p: PhantomData,
        };
        let nsq = self.reduce_into(&mut sc, view, true)?;
        self.ew(
            "k_frob_scale",
            x.len,
            &[x.ptr, nsq],
            &[Arg::F(eps), Arg::U(round_bf16 as u32)],
        )
    }

    fn scale_copy(
        &self,
        src: DView<'_, f32>,
        dst: DViewMut<'_, f32>,
        s: f32,
        round_bf16: bool,
    ) -> Result<()> {
        check_len("scale_copy", "destination", dst.len, src.len)?;
        self.ew(
            "k_scale_copy",
            src.len,
            &[src.ptr, dst.ptr],
            &[Arg::F(s), Arg::U(round_bf16 as u32)],
        )
    }

    fn axpby(
        &self,
        dst: DViewMut<'_, f32>,
        alpha: f32,
        src: DView<'_, f32>,
        beta: f32,
        round_bf16: bool,
    ) -> Result<()> {
        check_len("axpby", "source", src.len, dst.len)?;
        self.ew(
            "k_axpby",
            dst.len,
            &[dst.ptr, src.ptr],
            &[Arg::F(alpha), Arg::F(beta), Arg::U(round_bf16 as u32)],
        )
    }

    fn round_bf16(&self, x: DViewMut<'_, f32>) -> Result<()> {
        self.ew("k_round_bf16", x.len, &[x.ptr], &[])
    }
}
