//! Memory planning: what a configuration needs, what the machine has, and a clear error when
//! the former exceeds the latter (instead of the allocator aborting mid-run).

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::kernels::MatmulPrecision;
use crate::params::{param_specs, ParamGroup};

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
    /// The transposed weight copies the GEMMs read.
    pub weight_copies: u64,
    /// Gradients (training).
    pub grads: u64,
    /// Optimizer state as the reference keeps it: AdamW's two moments for the embedding and
    /// lm_head, Muon's momentum for every block matrix (training).
    pub optimizer_state: u64,
    /// bf16 matmuls (training): the weights packed once per optimizer step for the forward and
    /// backward GEMMs, plus each thread's pack buffers for the operands packed per call.
    pub bf16_packs: u64,
    /// Activations and scratch for one micro-batch (training) or one prefill (inference).
    pub activations: u64,
    /// Key/value cache (inference).
    pub kv_cache: u64,
}

impl MemoryEstimate {
    /// Sum of every part.
    pub fn total(&self) -> u64 {
        self.weights
            + self.weight_copies
            + self.grads
            + self.optimizer_state
            + self.bf16_packs
            + self.activations
            + self.kv_cache
    }
}

/// Estimates the bytes a workload needs, from the same buffer sizes the model allocates.
pub fn estimate_memory(cfg: &GptConfig, workload: Workload) -> MemoryEstimate {
    let specs = param_specs(cfg);
    let numel = |g: Option<ParamGroup>| -> u64 {
        specs
            .iter()
            .filter(|s| g.is_none_or(|g| s.group == g))
            .map(|s| (s.shape[0] * s.shape[1]) as u64)
            .sum()
    };
    let all = numel(None);
    let wte = numel(Some(ParamGroup::Embedding));
    let mut e = MemoryEstimate {
        weights: 4 * all,
        weight_copies: 4 * (all - wte),
        ..Default::default()
    };
    match workload {
        Workload::Training {
            batch,
            seq,
            precision,
        } => {
            e.grads = 4 * all;
            e.optimizer_state =
                4 * (2 * (wte + numel(Some(ParamGroup::LmHead))) + numel(Some(ParamGroup::Matrix)));
            e.activations = 4 * crate::model::activation_floats(cfg, batch, seq, true) as u64;
            if precision == MatmulPrecision::Bf16 {
                e.bf16_packs = crate::model::bf16_pack_bytes(cfg, batch * seq);
            }
        }
        Workload::Inference { rows, capacity } => {
            e.kv_cache = crate::kv_cache::kv_cache_bytes(cfg, rows, capacity);
            // Prefilling one full row: per-token buffers plus its logits.
            let per_token =
                8 * cfg.n_embd + 2 * cfg.n_kv_head * cfg.head_dim() + cfg.padded_vocab_size();
            e.activations = 4 * (capacity * per_token) as u64;
        }
    }
    e
}

/// Bytes the OS says a new allocation can use: `MemAvailable` from /proc/meminfo, capped by a
/// cgroup v2 limit when one is set. `None` where that is unknown (non-Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        * 1024;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(match (cgroup, used) {
        (Some(max), Some(cur)) => avail.min(max.saturating_sub(cur)),
        _ => avail,
    })
}

/// Errors when `bytes` exceed the available memory.
pub(crate) fn check_fits(bytes: u64, what: &str) -> Result<()> {
    match available_memory() {
        Some(avail) if bytes > avail => Err(ModelError::oom(what, bytes, Some(avail))),
        _ => Ok(()),
    }
}

/// Checks a whole workload up front; the error names the total and its largest part.
pub fn check_workload(cfg: &GptConfig, workload: Workload) -> Result<MemoryEstimate> {
    let e = estimate_memory(cfg, workload);
    check_fits(e.total(), &format!("{workload:?} for this model ({e:?})"))?;
    Ok(e)
}

/// Checks, for a model that is already loaded (its weights and weight copies held), that the
/// rest of a training run fits: gradients, optimizer state, bf16 packs and the activations of a
/// `batch × seq` micro-batch. Training calls this before the first large allocation, so a
/// config that cannot fit fails at once with the whole bill, not mid-step.
pub fn check_training(
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
    let e = estimate_memory(cfg, workload);
    let rest = e.total() - e.weights - e.weight_copies;
    check_fits(
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
        assert_eq!(t.weights, 4 * n);
        assert_eq!(t.grads, 4 * n);
        assert!(t.activations > 0 && t.kv_cache == 0 && t.bf16_packs == 0);
        // bf16: two packed copies of every matmul weight (≥ 2 bytes per element each) on top.
        let t16 = estimate_memory(&cfg, training(MatmulPrecision::Bf16));
        let wte = (cfg.padded_vocab_size() * cfg.n_embd) as u64;
        assert!(t16.bf16_packs >= 4 * (n - wte), "{t16:?}");
        assert_eq!(t16.total(), t.total() + t16.bf16_packs);
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
