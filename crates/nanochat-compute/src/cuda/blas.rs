//! cuBLAS, loaded at run time by this crate (aprender-gpu asks only for `libcublas.so.12`, and
//! has no strided-batched mixed-precision GEMM, which attention needs).

use std::ffi::{c_int, c_longlong, c_void};
use std::path::PathBuf;

use libloading::Library;

use crate::error::{ComputeError, Result};

type Handle = *mut c_void;
type Status = c_int;

type CreateFn = unsafe extern "C" fn(*mut Handle) -> Status;
type DestroyFn = unsafe extern "C" fn(Handle) -> Status;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> Status;
type SetMathModeFn = unsafe extern "C" fn(Handle, c_int) -> Status;
type SetWorkspaceFn = unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status;
#[allow(clippy::type_complexity)]
type GemmExFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_int,
    c_int,
) -> Status;
#[allow(clippy::type_complexity)]
type GemmStridedBatchedExFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    c_longlong,
    *const c_void,
    c_int,
    c_int,
    c_longlong,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_longlong,
    c_int,
    c_int,
    c_int,
) -> Status;

/// `CUDA_R_32F`.
pub const R_32F: c_int = 0;
/// `CUDA_R_16BF`.
pub const R_16BF: c_int = 14;
const OP_N: c_int = 0;
const OP_T: c_int = 1;
/// `CUBLAS_COMPUTE_32F`: f32 accumulation (full f32 for f32 operands under the default math
/// mode; no TF32).
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;
const DEFAULT_MATH: c_int = 0;

/// Names tried first (the dynamic linker's search path), newest first.
const NAMES: &[&str] = &["libcublas.so.13", "libcublas.so.12", "libcublas.so"];
/// Where CUDA installs put cuBLAS when it is not on the linker's path.
const DIRS: &[&str] = &[
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/lib/x86_64-linux-gnu",
];

/// Row-major strides of a batch of matrices (elements).
#[derive(Clone, Copy, Debug)]
pub struct Batch {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

/// A cuBLAS handle bound to the backend's stream.
pub struct Blas {
    handle: Handle,
    gemm_ex: GemmExFn,
    gemm_batched: GemmStridedBatchedExFn,
    destroy: DestroyFn,
    /// Which file was loaded (for `describe`).
    pub path: String,
    _lib: Library,
}

// SAFETY: the handle is used under the backend's lock (one call at a time); cuBLAS handles may
// move between threads.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NANOCHAT_CUBLAS") {
        out.push(PathBuf::from(p));
    }
    out.extend(NAMES.iter().map(PathBuf::from));
    let mut dirs: Vec<PathBuf> = DIRS.iter().map(PathBuf::from).collect();
    if let Ok(rd) = std::fs::read_dir("/usr/local") {
        let mut versioned: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("cuda-"))
            })
            .map(|p| p.join("targets/x86_64-linux/lib"))
            .collect();
        versioned.sort();
        versioned.reverse();
        dirs.extend(versioned);
    }
    for d in dirs {
        for n in NAMES {
            out.push(d.join(n));
        }
    }
    out
}

fn check(st: Status, what: &str) -> Result<()> {
    if st == 0 {
        Ok(())
    } else {
        Err(ComputeError::Driver {
            backend: "cuda",
            what: what.to_string(),
            detail: format!("cuBLAS status {st}"),
        })
    }
}

impl Blas {
    /// Loads cuBLAS, makes a handle on `stream` with `workspace` bytes of workspace at
    /// `workspace_ptr`, default math (tensor cores for bf16, full f32 for f32).
    pub fn load(stream: *mut c_void, workspace_ptr: u64, workspace: usize) -> Result<Self> {
        let tried = candidates();
        let mut found = None;
        for path in &tried {
            // SAFETY: loading cuBLAS runs only its initialisers.
            if let Ok(lib) = unsafe { Library::new(path) } {
                found = Some((lib, path.display().to_string()));
                break;
            }
        }
        let Some((lib, path)) = found else {
            return Err(ComputeError::Unavailable {
                device: "cuda".into(),
                reason: format!(
                    "cuBLAS was not found (tried {} and the usual CUDA directories); install \
                     CUDA's cuBLAS (e.g. `pip install nvidia-cublas-cu12`, or the toolkit), put \
                     its lib directory on LD_LIBRARY_PATH, or name the file in NANOCHAT_CUBLAS",
                    NAMES.join(", ")
                ),
            });
        };
        let sym_err = |name: &str, e: libloading::Error| ComputeError::Unavailable {
            device: "cuda".into(),
            reason: format!("{path} lacks {name}: {e} (cuBLAS 11 or newer is needed)"),
        };
        // SAFETY: the signatures are cuBLAS's documented C API (v2).
        unsafe {
            let create: CreateFn = *lib
                .get::<CreateFn>(b"cublasCreate_v2\0")
                .map_err(|e| sym_err("cublasCreate_v2", e))?;
            let destroy: DestroyFn = *lib
                .get::<DestroyFn>(b"cublasDestroy_v2\0")
                .map_err(|e| sym_err("cublasDestroy_v2", e))?;
            let set_stream: SetStreamFn = *lib
                .get::<SetStreamFn>(b"cublasSetStream_v2\0")
                .map_err(|e| sym_err("cublasSetStream_v2", e))?;
            let set_math: SetMathModeFn = *lib
                .get::<SetMathModeFn>(b"cublasSetMathMode\0")
                .map_err(|e| sym_err("cublasSetMathMode", e))?;
            let set_ws: SetWorkspaceFn = *lib
                .get::<SetWorkspaceFn>(b"cublasSetWorkspace_v2\0")
                .map_err(|e| sym_err("cublasSetWorkspace_v2", e))?;
            let gemm_ex: GemmExFn = *lib
                .get::<GemmExFn>(b"cublasGemmEx\0")
                .map_err(|e| sym_err("cublasGemmEx", e))?;
            let gemm_batched: GemmStridedBatchedExFn = *lib
                .get::<GemmStridedBatchedExFn>(b"cublasGemmStridedBatchedEx\0")
                .map_err(|e| sym_err("cublasGemmStridedBatchedEx", e))?;
            let mut handle: Handle = std::ptr::null_mut();
            check(create(&mut handle), "cublasCreate")?;
            let blas = Blas {
                handle,
                gemm_ex,
                gemm_batched,
                destroy,
                path,
                _lib: lib,
            };
            check(set_stream(handle, stream), "cublasSetStream")?;
            check(set_math(handle, DEFAULT_MATH), "cublasSetMathMode")?;
            check(
                set_ws(handle, workspace_ptr as *mut c_void, workspace),
                "cublasSetWorkspace",
            )?;
            Ok(blas)
        }
    }

    /// Row-major `C = alpha·op(A)·op(B) + beta·C` (`op(A)`: `[m, k]`, stored `[k, m]` when
    /// `ta`; `op(B)`: `[k, n]`, stored `[n, k]` when `tb`), f32 accumulation and f32 `C`,
    /// optionally over a strided batch.
    ///
    /// cuBLAS is column-major: a row-major `X` is its transpose there, so this computes
    /// `Cᵀ = op(B)ᵀ·op(A)ᵀ`, swapping the operands.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, a_type): (u64, c_int),
        (b, b_type): (u64, c_int),
        beta: f32,
        c: u64,
        batch: Option<Batch>,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let lda = if ta { m } else { k };
        let ldb = if tb { k } else { n };
        let dims = [m, n, k, lda, ldb];
        if dims.iter().any(|&d| d > i32::MAX as usize) {
            return Err(ComputeError::kernel(format!(
                "gemm: dimension over 2^31 in {dims:?}"
            )));
        }
        let (op_a, op_b) = (if ta { OP_T } else { OP_N }, if tb { OP_T } else { OP_N });
        let alpha_p = (&alpha as *const f32).cast::<c_void>();
        let beta_p = (&beta as *const f32).cast::<c_void>();
        // SAFETY: the pointers are live device buffers the caller sized for these shapes.
        let st = unsafe {
            match batch {
                None => (self.gemm_ex)(
                    self.handle,
                    op_b,
                    op_a,
                    n as c_int,
                    m as c_int,
                    k as c_int,
                    alpha_p,
                    b as *const c_void,
                    b_type,
                    ldb as c_int,
                    a as *const c_void,
                    a_type,
                    lda as c_int,
                    beta_p,
                    c as *mut c_void,
                    R_32F,
                    n as c_int,
                    COMPUTE_32F,
                    GEMM_DEFAULT,
                ),
                Some(bt) => (self.gemm_batched)(
                    self.handle,
                    op_b,
                    op_a,
                    n as c_int,
                    m as c_int,
                    k as c_int,
                    alpha_p,
                    b as *const c_void,
                    b_type,
                    ldb as c_int,
                    bt.b as c_longlong,
                    a as *const c_void,
                    a_type,
                    lda as c_int,
                    bt.a as c_longlong,
                    beta_p,
                    c as *mut c_void,
                    R_32F,
                    n as c_int,
                    bt.c as c_longlong,
                    bt.count as c_int,
                    COMPUTE_32F,
                    GEMM_DEFAULT,
                ),
            }
        };
        check(
            st,
            &format!("gemm m={m} n={n} k={k} ta={ta} tb={tb} batch={batch:?}"),
        )
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasCreate and is destroyed once.
        unsafe {
            (self.destroy)(self.handle);
        }
    }
}
