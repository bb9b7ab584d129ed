//! Compute backends for the nanochat GPT.
//!
//! The model (`nanochat-model`) and the optimizers (`nanochat-train`) are written once against
//! [`Backend`], a trait of the model's own kernels (norms, rotary embedding, causal attention and
//! its backward, the fused softcapped cross-entropy, AdamW, Muon's Newton–Schulz pieces) over
//! opaque device buffers. Implementations:
//!
//! - [`Cpu`]: the host, with hand-written AVX2 / AVX-512 BF16 kernels over trueno's BLIS-style
//!   f32 GEMM and rayon ([`cpu`]).
//! - `Cuda` (feature `cuda`): NVIDIA GPUs through aprender-gpu — libcuda, cuBLAS and PTX kernels
//!   generated here, all loaded at run time.
//!
//! [`Device`] names a device the way users write it (`cpu`, `cuda`, `cuda:1`), and
//! [`with_backend`] opens it and runs generic code on it: the one place a run-time choice
//! becomes a type.
#![warn(missing_docs)]

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
pub mod error;
#[path = "cuda/flash.rs"]
mod flash;
pub mod host;
/// The CUDA backend's PTX kernels (text only: generated and checked without a GPU or the
/// `cuda` feature).
#[path = "cuda/ptx.rs"]
pub mod ptx;

pub use backend::{
    prefix, prefix_mut, AdamWStep, AttnShape, Backend, DecodeShape, DeviceKind, DeviceMemory, Gemm,
    ScratchShape, WeightRef, WeightSlot,
};
pub use cpu::Cpu;
pub use device::{with_backend, BackendTask, Device};
pub use error::{ComputeError, Result};

/// Arithmetic of the dense matmuls: linear layers, lm_head and the attention GEMMs (`Q·Kᵀ`,
/// `P·V` and their gradients). Softmax, norms and every element-wise op stay f32.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and accumulation (the reference's numerics on CPU; parity tests use it).
    #[default]
    F32,
    /// bf16 operands (rounded to nearest even), f32 accumulation: the analogue of the
    /// reference's `torch.autocast(dtype=bfloat16)` training. Weights, gradients and optimizer
    /// state stay f32.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = ComputeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(ComputeError::Kernel(format!(
                "matmul precision must be \"f32\" or \"bf16\", got {other:?}"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// bf16 round-to-nearest-even of `x`, kept in f32 (what a bf16 operand of a GEMM sees).
pub use cpu::bf16::round_bf16;
