//! NCCL for CUDA ranks: `libnccl.so.2` opened at run time (nothing links it at build time), a
//! communicator made from a unique id that rank 0 draws and the host collective broadcasts,
//! and the data-plane operations on device memory.
//!
//! The split mirrors what PyTorch does with Gloo beside NCCL: the host collective (TCP, or the
//! local world of one) carries the rendezvous, the few scalars a step reduces (losses, byte
//! counts) and the barriers; NCCL carries the gradient buffer, on the device, on the compute
//! backend's stream, so the reduction is ordered with the backward pass without a host
//! round trip. NCCL's ring and tree algorithms leave every rank with the same bits, as
//! [`Collective`] requires.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;

use libloading::Library;

use crate::collective::{shard_range, Collective, ReduceOp};
use crate::DistError;

/// `ncclUniqueId`: 128 opaque bytes, passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type NcclResult = c_int;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult;
type CommFn = unsafe extern "C" fn(Comm) -> NcclResult;
type AsyncErrorFn = unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult;
type ErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> NcclResult;
type BroadcastFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;

/// `ncclFloat32`.
const FLOAT32: c_int = 7;
/// `ncclSum`, `ncclAvg` (NCCL 2.10 and newer).
const SUM: c_int = 0;
const AVG: c_int = 4;
/// `ncclInProgress`: only non-blocking communicators return it; ours are blocking.
const IN_PROGRESS: NcclResult = 7;
/// NCCL encodes versions as `major·10000 + minor·100 + patch` since 2.9; `ncclAvg` came in 2.10.
const MIN_VERSION: c_int = 21000;

/// The entry points, resolved once per process.
struct NcclLib {
    path: String,
    version: c_int,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    async_error: AsyncErrorFn,
    error_string: ErrorStringFn,
    all_reduce: AllReduceFn,
    reduce_scatter: AllReduceFn,
    all_gather: AllGatherFn,
    broadcast: BroadcastFn,
    _lib: Library,
}

/// Where NCCL is looked for: `NANOCHAT_NCCL` (a file), the dynamic linker's path, then the
/// usual install directories.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("NANOCHAT_NCCL") {
        out.push(PathBuf::from(p));
    }
    out.push(PathBuf::from("libnccl.so.2"));
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/local/nccl/lib",
        "/usr/lib64",
    ] {
        out.push(PathBuf::from(dir).join("libnccl.so.2"));
    }
    out
}

fn unavailable(reason: String) -> DistError {
    DistError::Env(format!(
        "NCCL is needed for CUDA ranks: {reason}; install it (the `nvidia-nccl-cu12` wheel, \
         which PyTorch ships, or the libnccl2 package), put its lib directory on \
         LD_LIBRARY_PATH, or name the file in NANOCHAT_NCCL"
    ))
}

fn load() -> Result<&'static NcclLib, DistError> {
    static LIB: OnceLock<Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        open(&candidates()).map_err(|e| match e {
            DistError::Env(m) => m,
            other => other.to_string(),
        })
    })
    .as_ref()
    .map_err(|m| DistError::Env(m.clone()))
}

fn open(tried: &[PathBuf]) -> Result<NcclLib, DistError> {
    let mut found = None;
    for path in tried {
        // SAFETY: loading NCCL runs only its initialisers.
        if let Ok(lib) = unsafe { Library::new(path) } {
            found = Some((lib, path.display().to_string()));
            break;
        }
    }
    let Some((lib, path)) = found else {
        let names: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        return Err(unavailable(format!(
            "libnccl.so.2 was not found (tried {})",
            names.join(", ")
        )));
    };
    let sym = |name: &str, e: libloading::Error| {
        unavailable(format!(
            "{path} lacks {name} ({e}); NCCL 2.10 or newer is needed"
        ))
    };
    // SAFETY: the signatures are NCCL's documented C API (nccl.h, 2.10+).
    unsafe {
        macro_rules! get {
            ($ty:ty, $name:literal) => {
                *lib.get::<$ty>(concat!($name, "\0").as_bytes())
                    .map_err(|e| sym($name, e))?
            };
        }
        let get_version: GetVersionFn = get!(GetVersionFn, "ncclGetVersion");
        let mut version = 0;
        if get_version(&mut version) != 0 || version < MIN_VERSION {
            return Err(unavailable(format!(
                "{path} is NCCL version code {version}; 2.10 (code {MIN_VERSION}) or newer is needed"
            )));
        }
        Ok(NcclLib {
            version,
            get_unique_id: get!(GetUniqueIdFn, "ncclGetUniqueId"),
            comm_init_rank: get!(CommInitRankFn, "ncclCommInitRank"),
            comm_destroy: get!(CommFn, "ncclCommDestroy"),
            comm_abort: get!(CommFn, "ncclCommAbort"),
            async_error: get!(AsyncErrorFn, "ncclCommGetAsyncError"),
            error_string: get!(ErrorStringFn, "ncclGetErrorString"),
            all_reduce: get!(AllReduceFn, "ncclAllReduce"),
            reduce_scatter: get!(AllReduceFn, "ncclReduceScatter"),
            all_gather: get!(AllGatherFn, "ncclAllGather"),
            broadcast: get!(BroadcastFn, "ncclBroadcast"),
            path,
            _lib: lib,
        })
    }
}

impl NcclLib {
    fn check(
        &self,
        rc: NcclResult,
        what: &str,
        rank: usize,
        world: usize,
    ) -> Result<(), DistError> {
        if rc == 0 || rc == IN_PROGRESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let text = unsafe {
            let p = (self.error_string)(rc);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(DistError::Peer {
            rank,
            world,
            reason: format!("{what}: NCCL error {rc} ({text}); NCCL_DEBUG=WARN says more"),
        })
    }
}

/// f32 device memory for an NCCL operation: `len` elements at device address `ptr`, ordered
/// on `stream` (a `cudaStream_t`; the compute backend's, see its `with_device_memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRegion {
    /// Device address of the first element.
    pub ptr: u64,
    /// Number of f32 elements.
    pub len: usize,
    /// The stream the operation is enqueued on.
    pub stream: u64,
}

/// Collective operations on device memory (NCCL), enqueued on the region's stream: they return
/// once enqueued, and the stream orders them with the kernels around them.
pub trait DeviceCollective: Send {
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In-place all-reduce of `region`.
    ///
    /// # Safety
    /// `region` must be live device memory of the current CUDA context, valid for `len` f32
    /// until the stream has run the operation, and not used by other streams meanwhile.
    unsafe fn all_reduce_device(
        &mut self,
        region: DeviceRegion,
        op: ReduceOp,
    ) -> Result<(), DistError>;
    /// In-place reduce-scatter: this rank's shard ([`shard_range`]) of `region` ends reduced.
    ///
    /// # Safety
    /// As for [`DeviceCollective::all_reduce_device`].
    unsafe fn reduce_scatter_device(
        &mut self,
        region: DeviceRegion,
        op: ReduceOp,
    ) -> Result<Range<usize>, DistError>;
    /// In-place all-gather of every rank's shard of `region`.
    ///
    /// # Safety
    /// As for [`DeviceCollective::all_reduce_device`].
    unsafe fn all_gather_device(&mut self, region: DeviceRegion) -> Result<(), DistError>;
    /// Copies `root`'s `region` to every rank.
    ///
    /// # Safety
    /// As for [`DeviceCollective::all_reduce_device`].
    unsafe fn broadcast_device(
        &mut self,
        region: DeviceRegion,
        root: usize,
    ) -> Result<(), DistError>;
}

/// A CUDA rank's NCCL communicator: the device-memory side of its collective. The host side
/// (rendezvous, scalars, barriers) stays with the [`Collective`] it was made through.
pub struct NcclComm {
    lib: &'static NcclLib,
    comm: Comm,
    rank: usize,
    world: usize,
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (`&mut self`).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Makes this rank's communicator: rank 0 draws the unique id, `host` broadcasts it, every
    /// rank joins. Call with the CUDA context of this rank's GPU current on the thread (the
    /// compute backend's), as NCCL binds the communicator to the current device. On failure
    /// the host collective is aborted, so the other ranks stop too.
    pub fn connect(host: &mut dyn Collective) -> Result<NcclComm, DistError> {
        let (rank, world) = (host.rank(), host.world_size());
        let lib = match load() {
            Ok(lib) => lib,
            Err(e) => {
                host.abort(&format!("rank {rank} cannot load NCCL"));
                return Err(e);
            }
        };
        let mut id = UniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: `id` is a valid ncclUniqueId to fill.
            let rc = unsafe { (lib.get_unique_id)(&mut id) };
            if let Err(e) = lib.check(rc, "ncclGetUniqueId", rank, world) {
                host.abort("rank 0 could not draw the NCCL unique id");
                return Err(e);
            }
        }
        let mut bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        host.broadcast_bytes(&mut bytes, 0)?;
        if bytes.len() != 128 {
            return Err(DistError::Mismatch {
                rank,
                detail: format!(
                    "the NCCL unique id arrived as {} bytes, not 128",
                    bytes.len()
                ),
            });
        }
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as c_char;
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the communicator; `id` is the job's id.
        let rc = unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        if let Err(e) = lib.check(rc, "ncclCommInitRank", rank, world) {
            host.abort(&format!("rank {rank} could not join the NCCL communicator"));
            return Err(e);
        }
        tracing::info!(rank, world, nccl = lib.version, path = %lib.path, "NCCL communicator up");
        Ok(NcclComm {
            lib,
            comm,
            rank,
            world,
            aborted: false,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// NCCL's version code (`major·10000 + minor·100 + patch`) and the file it came from.
    pub fn library(&self) -> (i32, &str) {
        (self.lib.version, &self.lib.path)
    }

    /// Aborts the communicator: operations in flight return, later ones fail. For a rank that
    /// is failing, so that no other rank waits in NCCL for it.
    pub fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: live communicator; abort makes pending operations return.
            unsafe { (self.lib.comm_abort)(self.comm) };
        }
    }

    fn check(&mut self, rc: NcclResult, what: &str) -> Result<(), DistError> {
        let (rank, world) = (self.rank, self.world);
        if self.aborted {
            return Err(DistError::Peer {
                rank,
                world,
                reason: "the NCCL communicator was aborted".into(),
            });
        }
        self.lib.check(rc, what, rank, world)?;
        // Errors of operations already enqueued (a peer's network failure) surface here.
        let mut pending: NcclResult = 0;
        // SAFETY: live communicator.
        let rc = unsafe { (self.lib.async_error)(self.comm, &mut pending) };
        self.lib.check(rc, "ncclCommGetAsyncError", rank, world)?;
        self.lib.check(pending, what, rank, world)
    }

    fn op(op: ReduceOp) -> c_int {
        match op {
            ReduceOp::Sum => SUM,
            ReduceOp::Avg => AVG,
        }
    }
}

impl DeviceCollective for NcclComm {
    fn world_size(&self) -> usize {
        self.world
    }

    unsafe fn all_reduce_device(&mut self, r: DeviceRegion, op: ReduceOp) -> Result<(), DistError> {
        let p = r.ptr as *mut c_void;
        let rc = (self.lib.all_reduce)(
            p,
            p,
            r.len,
            FLOAT32,
            Self::op(op),
            self.comm,
            r.stream as *mut c_void,
        );
        self.check(rc, "ncclAllReduce")
    }

    unsafe fn reduce_scatter_device(
        &mut self,
        r: DeviceRegion,
        op: ReduceOp,
    ) -> Result<Range<usize>, DistError> {
        let shard = shard_range(r.len, self.world, self.rank)?;
        // In place, as NCCL defines it: the output is this rank's shard of the input.
        let send = r.ptr as *const c_void;
        let recv = (r.ptr + 4 * shard.start as u64) as *mut c_void;
        let rc = (self.lib.reduce_scatter)(
            send,
            recv,
            shard.len(),
            FLOAT32,
            Self::op(op),
            self.comm,
            r.stream as *mut c_void,
        );
        self.check(rc, "ncclReduceScatter")?;
        Ok(shard)
    }

    unsafe fn all_gather_device(&mut self, r: DeviceRegion) -> Result<(), DistError> {
        let shard = shard_range(r.len, self.world, self.rank)?;
        let send = (r.ptr + 4 * shard.start as u64) as *const c_void;
        let rc = (self.lib.all_gather)(
            send,
            r.ptr as *mut c_void,
            shard.len(),
            FLOAT32,
            self.comm,
            r.stream as *mut c_void,
        );
        self.check(rc, "ncclAllGather")
    }

    unsafe fn broadcast_device(&mut self, r: DeviceRegion, root: usize) -> Result<(), DistError> {
        crate::collective::check_root(root, self.world)?;
        let p = r.ptr as *mut c_void;
        let rc = (self.lib.broadcast)(
            p,
            p,
            r.len,
            FLOAT32,
            root as c_int,
            self.comm,
            r.stream as *mut c_void,
        );
        self.check(rc, "ncclBroadcast")
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: live communicator, destroyed once.
            unsafe { (self.lib.comm_destroy)(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_names_what_was_tried_and_how_to_fix_it() {
        let tried = [PathBuf::from("/nonexistent/libnccl.so.2")];
        let e = open(&tried).err().expect("no such file").to_string();
        assert!(e.contains("/nonexistent/libnccl.so.2"), "{e}");
        assert!(
            e.contains("NANOCHAT_NCCL") && e.contains("LD_LIBRARY_PATH"),
            "{e}"
        );
    }

    #[test]
    fn a_library_without_nccl_symbols_is_refused_by_name() {
        // Any shared object that is not NCCL: the C library is on every Linux machine.
        let libc = ["libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"].map(PathBuf::from);
        let e = open(&libc).err().expect("libc is not NCCL").to_string();
        assert!(e.contains("lacks ncclGetVersion"), "{e}");
    }

    #[test]
    fn connect_without_nccl_fails_cleanly_where_it_is_absent() {
        if open(&candidates()).is_ok() {
            eprintln!(
                "NOTICE: libnccl.so.2 is installed here; the missing-library path is covered above"
            );
            return;
        }
        let e = NcclComm::connect(&mut crate::LocalCollective)
            .err()
            .expect("no NCCL here")
            .to_string();
        assert!(e.contains("NCCL is needed for CUDA ranks"), "{e}");
    }
}
