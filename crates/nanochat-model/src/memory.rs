//! Memory planning: what a configuration needs, what the machine has, and a clear error when
//! the former exceeds the latter (instead of the allocator aborting mid-run).

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use nanochat_compute::{Backend, Cpu, Precision as MatmulPrecision, ScratchShape};

use crate::params::{param_layout, param_specs, ParamGroup};
use crate::plan::{logit_chunk_rows, PassShape};

/// What the memory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Training with micro-batches of `batch × seq` tokens (weights, gradients, optimizer
    /// state, activations).
    Training {
        /// Rows per micro-batch.
        batch: usize,
        /// Tokens per row.
        seq: usize,
        /// Arithmetic of the matmuls: bf16 adds the packed bf16 weights and GEMM pack scratch.
        precision: MatmulPrecision,
    },
    /// Inference with a KV cache of `rows × capacity` positions.
    Inference {
        /// Concurrent sequences.
        rows: usize,
        /// Positions per sequence.
        capacity: usize,
    },
}

/// Bytes needed, by purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    /// f32 master weights.
    pub weights: u64,
    /// The backend's derived forms of the weights: on the CPU the transposed copies the GEMMs
    /// read and, with bf16 matmuls, every weight packed for the bf16 kernel (rebuilt each
    /// optimizer step); on a GPU the bf16 copy the tensor cores read.
    pub weight_cache: u64,
    /// Gradients (training).
    pub grads: u64,
    /// Optimizer state as the reference keeps it: AdamW's two moments for the embedding and
    /// lm_head, Muon's momentum for every block matrix (training).
    pub optimizer_state: u64,
    /// Activations for one micro-batch (training) or one prefill (inference), from the same
    /// table the model allocates from.
    pub activations: u64,
    /// Scratch the ops keep for themselves (GEMM operand packs, attention work buffers).
    pub scratch: u64,
    /// Key/value cache (inference).
    pub kv_cache: u64,
}

impl MemoryEstimate {
    /// Sum of every part.
    pub fn total(&self) -> u64 {
        self.weights
            + self.weight_cache
            + self.grads
            + self.optimizer_state
            + self.activations
            + self.scratch
            + self.kv_cache
    }
}

/// Estimates the bytes a workload needs on the CPU (see [`estimate_memory_on`]).
pub fn estimate_memory(cfg: &GptConfig, workload: Workload) -> MemoryEstimate {
    estimate_memory_on(&Cpu, cfg, workload)
}

/// Estimates the bytes a workload needs on `backend`, from the same buffer tables the model
/// and the backend allocate from.
pub fn estimate_memory_on<B: Backend>(
    backend: &B,
    cfg: &GptConfig,
    workload: Workload,
) -> MemoryEstimate {
    let specs = param_specs(cfg);
    let (layout, flat) = param_layout(&specs);
    let numel = |g: ParamGroup| -> u64 {
        specs
            .iter()
            .filter(|s| s.group == g)
            .map(|s| (s.shape[0] * s.shape[1]) as u64)
            .sum()
    };
    let wte = numel(ParamGroup::Embedding);
    let mut e = MemoryEstimate {
        weights: 4 * flat as u64,
        ..Default::default()
    };
    match workload {
        Workload::Training {
            batch,
            seq,
            precision,
        } => {
            e.weight_cache = backend.weight_cache_bytes(&layout, precision);
            e.grads = 4 * flat as u64;
            e.optimizer_state =
                4 * (2 * (wte + numel(ParamGroup::LmHead)) + numel(ParamGroup::Matrix));
            let pass = PassShape {
                b: batch,
                t: seq,
                layers: cfg.n_layer,
                with_grad: true,
                causal: true,
                device: backend.kind(),
            };
            e.activations = crate::plan::activation_bytes(cfg, pass);
            let vp = cfg.padded_vocab_size();
            e.scratch = backend.scratch_bytes(ScratchShape {
                rows: batch * seq,
                t: seq,
                heads: cfg.n_head,
                head_dim: cfg.head_dim(),
                width: cfg.n_embd,
                vocab: vp,
                logit_rows: logit_chunk_rows(vp, batch * seq, true, backend.kind()),
                precision,
            });
        }
        Workload::Inference { rows, capacity } => {
            e.weight_cache = backend.weight_cache_bytes(&layout, MatmulPrecision::F32);
            e.kv_cache = crate::kv_cache::kv_cache_bytes(cfg, rows, capacity);
            // Prefilling one full row through the decode buffers.
            let pass = PassShape {
                b: 1,
                t: capacity,
                layers: 1,
                with_grad: false,
                causal: false,
                device: backend.kind(),
            };
            e.activations = crate::plan::activation_bytes(cfg, pass);
        }
    }
    e
}

/// Bytes the OS says a new host allocation can use (see
/// [`nanochat_compute::host::available_memory`]).
pub fn available_memory() -> Option<u64> {
    nanochat_compute::host::available_memory()
}

fn check_fits_on<B: Backend>(backend: &B, bytes: u64, what: &str) -> Result<()> {
    match backend.available_memory() {
        Some(avail) if bytes > avail => Err(ModelError::oom(what, bytes, Some(avail))),
        _ => Ok(()),
    }
}

/// Checks a whole workload up front; the error names the total and its largest part.
pub fn check_workload(cfg: &GptConfig, workload: Workload) -> Result<MemoryEstimate> {
    let e = estimate_memory(cfg, workload);
    check_fits_on(
        &Cpu,
        e.total(),
        &format!("{workload:?} for this model ({e:?})"),
    )?;
    Ok(e)
}

/// Checks on the CPU (see [`check_training_on`]).
pub fn check_training(
    cfg: &GptConfig,
    batch: usize,
    seq: usize,
    precision: MatmulPrecision,
) -> Result<MemoryEstimate> {
    check_training_on(&Cpu, cfg, batch, seq, precision)
}

/// Checks, for a model that is already loaded on `backend` (its weights held), that the rest of
/// a training run fits there: gradients, optimizer state, the weights' derived forms, the
/// activations of a `batch × seq` micro-batch and the ops' scratch. Training calls this before
/// the first large allocation, so a config that cannot fit fails at once with the whole bill,
/// not mid-step.
pub fn check_training_on<B: Backend>(
    backend: &B,
    cfg: &GptConfig,
    batch: usize,
    seq: usize,
    precision: MatmulPrecision,
) -> Result<MemoryEstimate> {
    let workload = Workload::Training {
        batch,
        seq,
        precision,
    };
    let e = estimate_memory_on(backend, cfg, workload);
    let rest = e.total() - e.weights;
    check_fits_on(
        backend,
        rest,
        &format!("training state for micro-batches of {batch}×{seq} tokens ({e:?})"),
    )?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_counts_parameters_and_states() {
        let cfg = GptConfig::from_depth(2, 300, 32).unwrap();
        let n = cfg.num_params() as u64;
        let training = |precision| Workload::Training {
            batch: 2,
            seq: 16,
            precision,
        };
        let t = estimate_memory(&cfg, training(MatmulPrecision::F32));
        assert!(
            t.weights >= 4 * n && t.weights < 4 * n + 4 * 64 * 64,
            "{t:?}"
        );
        assert_eq!(t.grads, t.weights);
        assert!(t.activations > 0 && t.kv_cache == 0);
        // bf16: two packed copies of every matmul weight (≥ 2 bytes per element each) on top
        // of the transposed copies, and per-thread operand packs.
        let t16 = estimate_memory(&cfg, training(MatmulPrecision::Bf16));
        let wte = (cfg.padded_vocab_size() * cfg.n_embd) as u64;
        assert_eq!(t.weight_cache, 4 * (n - wte));
        assert!(
            t16.weight_cache >= t.weight_cache + 4 * (n - wte),
            "{t16:?}"
        );
        assert!(t16.scratch > t.scratch, "{t16:?}");
        assert_eq!(t16.activations, t.activations);
        let i = estimate_memory(
            &cfg,
            Workload::Inference {
                rows: 3,
                capacity: 10,
            },
        );
        assert_eq!(i.grads, 0);
        // 2 (k, v) × layers × rows × capacity × kv width × 4 bytes
        assert_eq!(i.kv_cache, 2 * 2 * 3 * 10 * 128 * 4); // k+v, layers, rows, positions, kv width 128
        assert!(available_memory().is_none_or(|a| a > 0));
    }

    #[test]
    fn absurd_workload_is_a_clear_error() {
        let cfg = GptConfig::from_depth(2, 300, 32).unwrap();
        if available_memory().is_none() {
            eprintln!("SKIP: available memory unknown on this OS");
            return;
        }
        let err = check_workload(
            &cfg,
            Workload::Training {
                batch: 1 << 20,
                seq: 1 << 12,
                precision: MatmulPrecision::F32,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("out of memory") && err.contains("available"),
            "{err}"
        );
        let err = check_training(&cfg, 1 << 20, 1 << 12, MatmulPrecision::Bf16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("out of memory") && err.contains("1048576×4096"),
            "{err}"
        );
        assert!(check_training(&cfg, 2, 16, MatmulPrecision::Bf16).is_ok());
    }
}
