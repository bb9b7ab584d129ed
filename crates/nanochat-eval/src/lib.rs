//! Evaluation for nanochat-rs: the CORE benchmark (DCLM in-context-learning tasks), bits per
//! byte, chat evaluations (ARC, MMLU, GSM8K, HumanEval) with ChatCORE, a Python sandbox for
//! generated code, and the report card.
//!
//! Everything model-specific sits behind three small traits in [`model`]: an
//! [`EvalTokenizer`], a [`LogProbModel`] (logits for a padded batch) and a [`Generator`]
//! (prompt → completion). The evaluators are plain functions over those traits, so they are
//! tested with scripted models whose right answers are known.
#![warn(missing_docs)]

pub mod adapters;
pub mod bpb;
pub mod chat;
pub mod core;
pub mod error;
pub mod jsonl;
pub mod model;
pub mod report;
pub mod results;
pub mod resume;
pub mod sandbox;
pub mod stage;
pub mod testing;

pub use error::{EvalError, Result};
pub use model::{EvalTokenizer, Generator, LogProbModel, LogitsBatch, SharedPrefix};
/// CPython's `random.Random` (moved to nanochat-data, which the spelling tasks need it in).
pub use nanochat_data::tasks::pyrandom;
