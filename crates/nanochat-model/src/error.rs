//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `nanochat-model`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration that cannot describe a valid GPT.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// Arguments of the wrong size or range (token ids, batch shapes, targets).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A loss or gradient norm that is NaN or infinite.
    #[error("non-finite value in {what}: {value} (lower the learning rate, check the data, or resume from the last good checkpoint)")]
    NonFinite {
        /// Which quantity, e.g. `loss` or `grad norm of transformer.h.3.mlp.c_fc.weight`.
        what: String,
        /// The offending value.
        value: f64,
    },
    /// Not enough memory for the requested configuration, or an allocation failed.
    #[error("out of memory: {what} needs {needed_bytes} bytes ({needed_gib:.2} GiB){}", available_note(*.available_bytes))]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes needed.
        needed_bytes: u64,
        /// The same in GiB, for the message.
        needed_gib: f64,
        /// Bytes the machine reports as available, when known.
        available_bytes: Option<u64>,
    },
    /// The KV cache cannot hold the requested positions.
    #[error("KV cache row {row}: needs {needed} positions but holds {capacity} (create the cache with a larger capacity)")]
    CacheFull {
        /// Row of the cache.
        row: usize,
        /// Positions needed.
        needed: usize,
        /// Positions the row can hold.
        capacity: usize,
    },
    /// A checkpoint that cannot be read or does not match.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and, where possible, how to fix it.
        reason: String,
    },
    /// An I/O error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A compute kernel rejected its arguments (a bug in this crate).
    #[error("kernel error: {0}")]
    Kernel(String),
    /// The compute device failed or cannot be used (driver error, missing library).
    #[error("{0}")]
    Device(String),
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

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn oom(what: impl Into<String>, bytes: u64, available: Option<u64>) -> Self {
        ModelError::OutOfMemory {
            what: what.into(),
            needed_bytes: bytes,
            needed_gib: bytes as f64 / (1u64 << 30) as f64,
            available_bytes: available,
        }
    }
}

impl From<nanochat_compute::ComputeError> for ModelError {
    fn from(e: nanochat_compute::ComputeError) -> Self {
        use nanochat_compute::ComputeError as C;
        match e {
            C::OutOfMemory {
                what,
                needed_bytes,
                available_bytes,
            } => ModelError::oom(what, needed_bytes, available_bytes),
            C::Kernel(msg) => ModelError::Kernel(msg),
            other => ModelError::Device(other.to_string()),
        }
    }
}
