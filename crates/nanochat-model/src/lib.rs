//! The nanochat GPT in pure Rust: configuration and sizing rule, the reference's
//! initialisation, a hand-written forward and backward pass (llm.c style: buffers allocated
//! once per batch shape), a KV cache for inference, and safetensors checkpoints.
//!
//! The model is written once against [`nanochat_compute::Backend`]: `Gpt<B>` holds its
//! parameters and gradients in two flat device buffers and runs every pass through the
//! backend's ops, so the same code trains on the CPU ([`Gpt`] = `Gpt<Cpu>`) or a GPU.
//!
//! Training: [`Gpt::forward_backward`] accumulates gradients; an optimizer updates the flat
//! buffers through [`Gpt::step_views`] (names and [`ParamGroup`]s as the reference's
//! state_dict). Inference: [`KvCache`] + [`Gpt::forward_cached`].
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
mod forward;
mod kv_cache;
pub mod memory;
mod model;
pub mod params;
pub mod parity;
mod plan;
mod rng;

pub use checkpoint::{
    load_checkpoint, load_checkpoint_on, save_checkpoint, CheckpointMeta, CHECKPOINT_FORMAT_VERSION,
};
pub use config::GptConfig;
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use memory::{estimate_memory, estimate_memory_on, MemoryEstimate, Workload};
pub use model::{Gpt, ParamMut, ParamRef, ParamsMut, Reduction, StepViews};
pub use nanochat_compute as compute;
pub use nanochat_compute::{Backend, Cpu, Device, Precision as MatmulPrecision};
pub use params::{ParamGroup, ParamSpec};
