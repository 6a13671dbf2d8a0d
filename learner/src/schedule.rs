//! Learning-rate schedules: linear warmup, then constant or cosine decay to a floor.

use serde::{Deserialize, Serialize};

/// What the learning rate does after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stays at the peak.
    Constant,
    /// Cosine from the peak to `min_lr` over `total_steps`.
    Cosine,
}

/// A learning-rate schedule over optimizer steps (counted from 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedule {
    /// Rate reached at the end of warmup.
    pub peak_lr: f64,
    /// Steps of linear warmup from 0 to the peak.
    pub warmup_steps: u64,
    /// What the rate does after warmup.
    pub decay: Decay,
    /// Steps the decay spans.
    pub total_steps: u64,
    /// Floor of the decay.
    pub min_lr: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self {
            peak_lr: 1e-3,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: 0,
            min_lr: 0.0,
        }
    }
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based): warmup reaches the peak at step `warmup_steps - 1`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.peak_lr,
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.min_lr
                    + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 4,
            decay: Decay::Cosine,
            total_steps: 14,
            min_lr: 0.1,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.55).abs() < 1e-12);
        assert!((s.lr(14) - 0.1).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
        let c = LrSchedule {
            peak_lr: 2.0,
            ..LrSchedule::default()
        };
        assert_eq!(c.lr(0), 2.0);
    }
}
