//! The crate's one error type.

/// Everything a compute backend can report.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// Not enough memory (host or device) for an allocation.
    #[error("out of memory: {what} needs {needed_bytes} bytes ({:.2} GiB){}", *.needed_bytes as f64 / (1u64 << 30) as f64, available_note(*.available_bytes))]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes needed.
        needed_bytes: u64,
        /// Bytes the device reports as available, when known.
        available_bytes: Option<u64>,
    },
    /// A kernel rejected its arguments (a bug in the caller) or failed.
    #[error("kernel error: {0}")]
    Kernel(String),
    /// The requested device cannot be used here: which library or device is missing and how to
    /// fix it.
    #[error("device {device} is not available: {reason}")]
    Unavailable {
        /// The device as the user named it (`cuda:1`).
        device: String,
        /// What was not found, and what to do about it.
        reason: String,
    },
    /// A device name that is not `cpu`, `cuda` or `cuda:N`.
    #[error(
        "unknown device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\" (N = the GPU's index)"
    )]
    UnknownDevice(String),
    /// The GPU driver or a GPU library returned an error.
    #[error("{backend} driver error in {what}: {detail}")]
    Driver {
        /// Which backend (`cuda`).
        backend: &'static str,
        /// The operation that failed.
        what: String,
        /// The driver's message.
        detail: String,
    },
}

fn available_note(available: Option<u64>) -> String {
    match available {
        Some(a) => format!(
            " but only {a} bytes ({:.2} GiB) are available; use a smaller batch, sequence or model",
            a as f64 / (1u64 << 30) as f64
        ),
        None => String::new(),
    }
}

/// Result with [`ComputeError`].
pub type Result<T, E = ComputeError> = std::result::Result<T, E>;

impl ComputeError {
    /// An out-of-memory error for `bytes` of `what`.
    pub fn oom(what: impl Into<String>, bytes: u64, available: Option<u64>) -> Self {
        ComputeError::OutOfMemory {
            what: what.into(),
            needed_bytes: bytes,
            available_bytes: available,
        }
    }

    pub(crate) fn kernel(msg: impl Into<String>) -> Self {
        ComputeError::Kernel(msg.into())
    }
}
