//! The one learning-rate schedule of Chorus: linear warmup, then a constant rate or a half
//! cosine down to a floor that is reached on the last step.
//!
//! It lives in the wire crate because both sides use it without depending on each other: the
//! orchestrator computes each stage's rate for every group it sends (`learning_rate` of a
//! scored group), and the learner has a schedule of its own for training outside a run. One
//! formula here means the two cannot disagree on where a warmup or a decay ends.

use serde::{Deserialize, Serialize};

/// What the learning rate does after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stays at the peak.
    #[default]
    Constant,
    /// Falls along a half cosine from the peak to `min_lr`, reached on the last step.
    Cosine,
}

/// A learning-rate schedule over `total_steps` optimizer steps, counted from 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedule {
    /// The rate warmup climbs to and decay starts from.
    pub peak_lr: f64,
    /// Steps of linear warmup; the peak is reached on step `warmup_steps - 1`.
    pub warmup_steps: u64,
    /// What happens after warmup.
    pub decay: Decay,
    /// Steps in the schedule; a cosine decay reaches `min_lr` on step `total_steps - 1`.
    pub total_steps: u64,
    /// The floor of a cosine decay.
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
    /// The learning rate of step `step` (0-based).
    ///
    /// Warmup starts above zero (`peak / warmup_steps` on step 0) so that no step is wasted at
    /// a zero rate. The decay runs from the first step after warmup (at the peak) to the last
    /// step (at `min_lr`), and stays at `min_lr` beyond it; a schedule too short to hold a
    /// decay step after warmup spends one step on it.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.peak_lr,
            Decay::Cosine => {
                let span = self
                    .total_steps
                    .saturating_sub(self.warmup_steps + 1)
                    .max(1);
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

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_cosine_ends_on_the_last_step() {
        let s = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 4,
            decay: Decay::Cosine,
            total_steps: 15,
            min_lr: 0.1,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert!(close(s.lr(4), 1.0), "the decay starts at the peak");
        assert!(close(s.lr(9), 0.55), "half way down: {}", s.lr(9));
        assert!(close(s.lr(14), 0.1), "the last step is at the floor");
        assert!(close(s.lr(100), 0.1), "and stays there");
        let lrs: Vec<f64> = (4..15).map(|i| s.lr(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]), "{lrs:?}");
    }

    #[test]
    fn constant_holds_the_peak_after_warmup() {
        let s = LrSchedule {
            peak_lr: 2.0,
            warmup_steps: 2,
            min_lr: 0.5,
            total_steps: 10,
            ..LrSchedule::default()
        };
        assert_eq!(s.lr(0), 1.0);
        assert_eq!(s.lr(1), 2.0);
        assert!((2..20).all(|i| s.lr(i) == 2.0));
        let flat = LrSchedule {
            peak_lr: 3.0,
            ..LrSchedule::default()
        };
        assert_eq!(flat.lr(0), 3.0);
    }

    #[test]
    fn schedules_too_short_for_a_decay_still_reach_the_floor() {
        // One step after warmup: the decay takes that step to reach min_lr.
        let s = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 2,
            decay: Decay::Cosine,
            total_steps: 3,
            min_lr: 0.2,
        };
        assert!(close(s.lr(2), 1.0));
        assert!(close(s.lr(3), 0.2));
        // No warmup, no steps: the first step is the peak, the next the floor.
        let z = LrSchedule {
            decay: Decay::Cosine,
            peak_lr: 1.0,
            min_lr: 0.0,
            ..LrSchedule::default()
        };
        assert!(close(z.lr(0), 1.0));
        assert!(close(z.lr(1), 0.0));
    }

    #[test]
    fn decay_names_are_snake_case() {
        let s: LrSchedule =
            serde_json::from_str(r#"{"peak_lr": 0.5, "decay": "cosine", "total_steps": 7}"#)
                .unwrap();
        assert_eq!(s.decay, Decay::Cosine);
        assert_eq!(s.peak_lr, 0.5);
        assert_eq!(s.warmup_steps, 0);
        assert!(serde_json::from_str::<LrSchedule>(r#"{"decay": "linear"}"#).is_err());
    }
}
