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

#[cfg(test)]
mod tests {
    use super::*;

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
