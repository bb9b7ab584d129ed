//! Learning-rate schedule of the reference loop: linear warmup, constant, linear warmdown to a
//! final fraction.

use serde::{Deserialize, Serialize};

/// Shape of the LR multiplier over `num_iterations` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Total optimizer steps.
    pub num_iterations: u64,
    /// Fraction of steps warming up linearly from 1/warmup to 1.
    pub warmup_ratio: f64,
    /// Fraction of steps (at the end) decaying linearly to `final_lr_frac`.
    pub warmdown_ratio: f64,
    /// Multiplier reached at the last step.
    pub final_lr_frac: f64,
}

impl LrSchedule {
    /// LR multiplier at step `it` (0-based), as nanochat's `get_lr_multiplier`.
    pub fn multiplier(&self, it: u64) -> f64 {
        let n = self.num_iterations as f64;
        let warmup = (self.warmup_ratio * n).round() as u64;
        let warmdown = (self.warmdown_ratio * n).round() as u64;
        if it < warmup {
            (it + 1) as f64 / warmup as f64
        } else if it + warmdown <= self.num_iterations {
            1.0
        } else {
            let progress = (self.num_iterations - it) as f64 / warmdown as f64;
            progress + (1.0 - progress) * self.final_lr_frac
        }
    }
}

/// Where a run's step count came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HorizonSource {
    /// `num_iterations` was set.
    Explicit,
    /// Derived from a total FLOPs budget.
    TargetFlops,
    /// Derived from a tokens-per-parameter ratio.
    ParamDataRatio,
}

/// Training horizon in optimizer steps, decided like nanochat's `base_train.py`: an explicit
/// `num_iterations` (> 0) wins; else `round(target_flops / (flops_per_token · total_batch))`;
/// else `⌊ratio · num_params / total_batch⌋` (Chinchilla's 20 tokens per parameter in the
/// speedrun). `total_batch` counts tokens. Returns `None` when no horizon is set or the derived
/// count is 0 (the budget is smaller than one step).
pub fn training_horizon(
    num_iterations: u64,
    target_flops: f64,
    target_param_data_ratio: f64,
    num_params: usize,
    flops_per_token: f64,
    total_batch_tokens: usize,
) -> Option<(u64, HorizonSource)> {
    let (steps, source) = if num_iterations > 0 {
        (num_iterations, HorizonSource::Explicit)
    } else if target_flops > 0.0 {
        let per_step = flops_per_token * total_batch_tokens as f64;
        (
            (target_flops / per_step).round() as u64,
            HorizonSource::TargetFlops,
        )
    } else if target_param_data_ratio > 0.0 {
        // The reference floors a float product (`target_tokens // total_batch_size`).
        let tokens = target_param_data_ratio * num_params as f64;
        (
            (tokens / total_batch_tokens as f64).floor() as u64,
            HorizonSource::ParamDataRatio,
        )
    } else {
        return None;
    };
    (steps > 0).then_some((steps, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_explicit_wins_then_flops_then_ratio() {
        // d20 speedrun: 560,988,160 params, 524,288 tokens per step, ratio 20 -> 21,400 steps.
        let params = 560_988_160;
        assert_eq!(
            training_horizon(0, 0.0, 20.0, params, 1.0, 524_288),
            Some((21_400, HorizonSource::ParamDataRatio))
        );
        assert_eq!(
            training_horizon(7, 1e18, 20.0, params, 1.0, 524_288),
            Some((7, HorizonSource::Explicit))
        );
        // 2.6 steps' worth of FLOPs rounds to 3.
        assert_eq!(
            training_horizon(0, 2.6 * 6.0 * 100.0, 20.0, params, 6.0, 100),
            Some((3, HorizonSource::TargetFlops))
        );
        // Floor, not round: 20 · 1049 / 2048 = 10.24 -> 10; 20 · 1100 / 2048 = 10.74 -> 10.
        assert_eq!(
            training_horizon(0, 0.0, 20.0, 1049, 1.0, 2048).map(|h| h.0),
            Some(10)
        );
        assert_eq!(
            training_horizon(0, 0.0, 20.0, 1100, 1.0, 2048).map(|h| h.0),
            Some(10)
        );
        assert_eq!(training_horizon(0, 0.0, 0.0, params, 1.0, 2048), None);
        assert_eq!(training_horizon(0, 0.0, 20.0, 10, 1.0, 2048), None);
    }

    #[test]
    fn warmup_constant_warmdown() {
        let s = LrSchedule {
            num_iterations: 100,
            warmup_ratio: 0.1,
            warmdown_ratio: 0.2,
            final_lr_frac: 0.0,
        };
        assert!((s.multiplier(0) - 0.1).abs() < 1e-12);
        assert!((s.multiplier(9) - 1.0).abs() < 1e-12);
        assert_eq!(s.multiplier(50), 1.0);
        assert_eq!(s.multiplier(80), 1.0);
        assert!((s.multiplier(90) - 0.5).abs() < 1e-12);
        assert!((s.multiplier(100) - 0.0).abs() < 1e-12);
        let f = LrSchedule {
            final_lr_frac: 0.1,
            ..s
        };
        assert!((f.multiplier(100) - 0.1).abs() < 1e-12);
    }
}
