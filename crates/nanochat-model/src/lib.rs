//! The nanochat GPT in pure Rust: configuration and sizing rule, the reference's
//! initialisation, a hand-written forward and backward pass (llm.c style: buffers allocated
//! once per batch shape), a KV cache for inference, and safetensors checkpoints.
//!
//! Training: [`Gpt::forward_backward`] accumulates gradients; an optimizer walks
//! [`Gpt::params_mut`] (names and [`ParamGroup`]s as the reference's state_dict).
//! Inference: [`KvCache`] + [`Gpt::forward_cached`].
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod kernels;
mod kv_cache;
pub mod memory;
mod model;
mod ops;
pub mod params;
pub mod parity;
mod rng;

pub use checkpoint::{load_checkpoint, save_checkpoint, CheckpointMeta, CHECKPOINT_FORMAT_VERSION};
pub use config::GptConfig;
pub use error::{ModelError, Result};
pub use kernels::MatmulPrecision;
pub use kv_cache::KvCache;
pub use memory::{estimate_memory, MemoryEstimate, Workload};
pub use model::{Gpt, ParamMut, ParamRef, ParamsMut, Reduction};
pub use params::{ParamGroup, ParamSpec};
