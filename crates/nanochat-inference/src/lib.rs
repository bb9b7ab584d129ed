//! nanochat-inference: an OpenAI-compatible chat server for nanochat models.
//!
//! Request flow: [`openai`] validates a body against the configured limits into a normalized
//! generation; deterministic ones are looked up in the [`cache`]; the rest go to the
//! [`scheduler`], whose workers each run a continuous batch on a [`backend::DecodeBackend`];
//! [`server`] streams the events back as OpenAI chunks (or one body).
//!
//! The model side is a trait ([`backend::ServedModel`]) so the whole server runs against the
//! scripted [`fake::FakeModel`] in tests and benchmarks.
#![warn(missing_docs)]

pub mod backend;
pub mod cache;
pub mod config;
pub mod engine_backend;
pub mod error;
pub mod fake;
pub mod load;
pub mod openai;
pub mod scheduler;
pub mod server;
pub mod stop;

pub use backend::{DecodeBackend, ServedModel};
pub use config::ServerConfig;
pub use error::{ApiError, InferenceError, Result};
pub use server::{AppState, Server};
