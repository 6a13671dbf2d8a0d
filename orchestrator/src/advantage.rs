//! Group-relative advantages: each completion's reward against the other completions of the same
//! prompt.

use serde::{Deserialize, Serialize};

/// How a group's rewards become advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageKind {
    /// `(r - mean) / (std + eps)` (GRPO).
    GroupNorm,
    /// `(r - mean of the others) / (std + eps)` (RLOO baseline, Nemotron's choice).
    LeaveOneOut,
}

/// Advantages are clipped to ±this (Nemotron 3 clips at 50).
pub const ADVANTAGE_CLIP: f64 = 50.0;

/// The advantages of one group's rewards, or `None` when all rewards are equal (a
/// zero-variance group carries no learning signal).
pub fn group_advantages(rewards: &[f64], kind: AdvantageKind) -> Option<Vec<f64>> {
    let n = rewards.len();
    if n == 0 {
        return None;
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n as f64;
    if var <= 1e-12 {
        return None;
    }
    let std = var.sqrt();
    let sum: f64 = rewards.iter().sum();
    Some(
        rewards
            .iter()
            .map(|&r| {
                let baseline = match kind {
                    AdvantageKind::GroupNorm => mean,
                    AdvantageKind::LeaveOneOut if n > 1 => (sum - r) / (n - 1) as f64,
                    AdvantageKind::LeaveOneOut => mean,
                };
                ((r - baseline) / (std + 1e-6)).clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_and_leave_one_out() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], AdvantageKind::GroupNorm).unwrap();
        for (x, w) in a.iter().zip([1.0, -1.0, -1.0, 1.0]) {
            assert!((x - w).abs() < 1e-5, "{a:?}");
        }
        let l = group_advantages(&[1.0, 0.0, 0.0, 0.0], AdvantageKind::LeaveOneOut).unwrap();
        let std = (0.1875f64).sqrt();
        assert!(
            (l[0] - 1.0 / std).abs() < 1e-4 && (l[1] - (-1.0 / 3.0) / std).abs() < 1e-4,
            "{l:?}"
        );
        assert!(group_advantages(&[0.5, 0.5, 0.5], AdvantageKind::GroupNorm).is_none());
        assert!(group_advantages(&[], AdvantageKind::GroupNorm).is_none());
    }
}
