//! Shared training library of the nanochat stages: the AdamW + Muon optimizers of the reference
//! recipe, learning-rate schedules, the training loop, checkpoints and exact resume.
#![warn(missing_docs)]

pub mod optim;

/// Errors of the training library.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor had a different size than the optimizer registered for it.
    #[error("parameter `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// Parameter or tensor name.
        name: String,
        /// Registered shape.
        expected: Vec<usize>,
        /// Sizes that were passed.
        got: Vec<usize>,
    },
    /// Misuse of an optimizer or a failure inside one.
    #[error("optimizer: {0}")]
    Optimizer(String),
}
