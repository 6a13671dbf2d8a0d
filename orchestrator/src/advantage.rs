//! Group-relative advantages: each completion's reward against the other completions of the same
//! prompt, with Nemotron 3's shaping (a fixed penalty for invalid output, a clip).

use serde::{Deserialize, Serialize};

/// How a group's rewards become advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageKind {
    /// `r - mean` (GRPO).
    GroupNorm,
    /// `r - mean of the others` (the RLOO baseline, Nemotron's choice).
    LeaveOneOut,
}

/// How a stage turns a group's rewards into advantages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdvantageShaping {
    /// The baseline.
    pub kind: AdvantageKind,
    /// Divide by the group's reward standard deviation (`false` for RLOO proper).
    pub std_normalize: bool,
    /// Advantages are clipped to `±clip` (Nemotron 3 clips at 50).
    pub clip: f64,
    /// The fixed advantage of an invalid rollout (a malformed `<think>` block, an invalid tool
    /// call); Nemotron 3 uses -5.
    pub invalid: f64,
    /// Weight of the group-relative answer-length bonus (0: off); see [`length_bonus`].
    pub length_coef_answer: f64,
    /// Weight of the group-relative reasoning-length bonus (0: off).
    pub length_coef_reasoning: f64,
}

/// One usable rollout of a group: its reward, whether its output was invalid, and its lengths.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Scored {
    /// The environment's reward.
    pub reward: f64,
    /// Malformed output: the rollout gets the fixed invalid advantage and stays out of the
    /// baseline of the others.
    pub invalid: bool,
    /// The policy's tokens after its reasoning (all of them without a think block).
    pub answer_tokens: usize,
    /// The policy's tokens up to and including `</think>`.
    pub reasoning_tokens: usize,
}

/// Group-relative length control (Nemotron 3's RLHF): each length's `w_i = 1 - (len_i - min) /
/// (max - min)` (1 for the shortest, 0 for the longest; 0 for all when every length is equal),
/// minus the group's mean of `w`, so the bonus sums to zero over the group.
pub fn length_bonus(lengths: &[usize]) -> Vec<f64> {
    let (Some(&min), Some(&max)) = (lengths.iter().min(), lengths.iter().max()) else {
        return vec![];
    };
    if max == min {
        return vec![0.0; lengths.len()];
    }
    let w: Vec<f64> = lengths
        .iter()
        .map(|&l| 1.0 - (l - min) as f64 / (max - min) as f64)
        .collect();
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    w.into_iter().map(|x| x - mean).collect()
}

/// The advantages of one group's usable rollouts, or `None` when the group carries no learning
/// signal: every rollout valid and every reward equal.
///
/// Valid rollouts are compared only with each other (baseline and standard deviation over the
/// valid rewards; a lone valid rollout, or valid rewards that are all equal, gets 0); invalid
/// ones get `shaping.invalid` whatever their reward.
pub fn group_advantages(group: &[Scored], shaping: &AdvantageShaping) -> Option<Vec<f64>> {
    let valid_rollouts: Vec<&Scored> = group.iter().filter(|s| !s.invalid).collect();
    let mut valid: Vec<f64> = valid_rollouts.iter().map(|s| s.reward).collect();
    // Length control shapes the valid rollouts' rewards before the baseline is taken.
    let answers: Vec<usize> = valid_rollouts.iter().map(|s| s.answer_tokens).collect();
    let reasoning: Vec<usize> = valid_rollouts.iter().map(|s| s.reasoning_tokens).collect();
    for (coef, lengths) in [
        (shaping.length_coef_answer, answers),
        (shaping.length_coef_reasoning, reasoning),
    ] {
        if coef != 0.0 {
            for (r, b) in valid.iter_mut().zip(length_bonus(&lengths)) {
                *r += coef * b;
            }
        }
    }
    let mut shaped = valid.clone().into_iter();
    let n = valid.len();
    let any_invalid = n < group.len();
    let mean = valid.iter().sum::<f64>() / n.max(1) as f64;
    let var = valid.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    let flat = n < 2 || var <= 1e-12;
    if group.is_empty() || (flat && !any_invalid) {
        return None;
    }
    let sum: f64 = valid.iter().sum();
    let scale = if shaping.std_normalize {
        var.sqrt() + 1e-6
    } else {
        1.0
    };
    Some(
        group
            .iter()
            .map(|s| {
                if s.invalid {
                    return shaping.invalid;
                }
                let reward = shaped.next().expect("one shaped reward per valid rollout");
                if flat {
                    return 0.0;
                }
                let baseline = match shaping.kind {
                    AdvantageKind::GroupNorm => mean,
                    AdvantageKind::LeaveOneOut => (sum - reward) / (n - 1) as f64,
                };
                ((reward - baseline) / scale).clamp(-shaping.clip, shaping.clip)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nemotron 3's shaping (the run config's defaults) with the given baseline.
    fn nemotron(kind: AdvantageKind) -> AdvantageShaping {
        AdvantageShaping {
            kind,
            std_normalize: true,
            clip: 50.0,
            invalid: -5.0,
            length_coef_answer: 0.0,
            length_coef_reasoning: 0.0,
        }
    }

    fn valid(rewards: &[f64]) -> Vec<Scored> {
        rewards
            .iter()
            .map(|&reward| Scored {
                reward,
                invalid: false,
                ..Scored::default()
            })
            .collect()
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn group_norm_and_leave_one_out() {
        let norm = nemotron(AdvantageKind::GroupNorm);
        let a = group_advantages(&valid(&[1.0, 0.0, 0.0, 1.0]), &norm).unwrap();
        close(&a, &[1.0, -1.0, -1.0, 1.0]);
        let loo = nemotron(AdvantageKind::LeaveOneOut);
        let l = group_advantages(&valid(&[1.0, 0.0, 0.0, 0.0]), &loo).unwrap();
        let std = 0.1875f64.sqrt();
        close(
            &l,
            &[
                1.0 / std,
                -1.0 / 3.0 / std,
                -1.0 / 3.0 / std,
                -1.0 / 3.0 / std,
            ],
        );
        assert!(group_advantages(&valid(&[0.5, 0.5, 0.5]), &norm).is_none());
        assert!(group_advantages(&[], &norm).is_none());
    }

    #[test]
    fn without_std_normalisation_the_advantage_is_the_reward_gap() {
        let rloo = AdvantageShaping {
            std_normalize: false,
            ..nemotron(AdvantageKind::LeaveOneOut)
        };
        let a = group_advantages(&valid(&[1.0, 0.0, 0.5]), &rloo).unwrap();
        close(&a, &[0.75, -0.75, 0.0]);
    }

    #[test]
    fn advantages_are_clipped_on_both_sides() {
        let shaping = AdvantageShaping {
            std_normalize: false,
            clip: 0.5,
            ..nemotron(AdvantageKind::GroupNorm)
        };
        let a = group_advantages(&valid(&[3.0, 0.0, 1.5]), &shaping).unwrap();
        close(&a, &[0.5, -0.5, 0.0]);
    }

    #[test]
    fn invalid_rollouts_get_the_fixed_advantage_and_leave_the_baseline() {
        let shaping = nemotron(AdvantageKind::LeaveOneOut);
        let group = [
            Scored {
                reward: 1.0,
                invalid: false,
                ..Scored::default()
            },
            Scored {
                reward: 1.0,
                invalid: true,
                ..Scored::default()
            },
            Scored {
                reward: 0.0,
                invalid: false,
                ..Scored::default()
            },
        ];
        // The valid pair alone: LOO baselines 0 and 1, std 0.5.
        let a = group_advantages(&group, &shaping).unwrap();
        close(&a, &[2.0, -5.0, -2.0]);
        // Valid rewards all equal: no signal among them, but the invalid one still has its own.
        let group = [
            Scored {
                reward: 0.0,
                invalid: false,
                ..Scored::default()
            },
            Scored {
                reward: 0.0,
                invalid: true,
                ..Scored::default()
            },
            Scored {
                reward: 0.0,
                invalid: false,
                ..Scored::default()
            },
        ];
        close(
            &group_advantages(&group, &shaping).unwrap(),
            &[0.0, -5.0, 0.0],
        );
        // Every rollout invalid.
        let all = [Scored {
            reward: 0.0,
            invalid: true,
            ..Scored::default()
        }; 2];
        close(&group_advantages(&all, &shaping).unwrap(), &[-5.0, -5.0]);
    }

    #[test]
    fn length_bonus_favours_the_shorter_and_sums_to_zero() {
        let b = length_bonus(&[10, 20, 30, 30]);
        // w = 1, 0.5, 0, 0; mean 0.375.
        close(&b, &[0.625, 0.125, -0.375, -0.375]);
        assert!(b.iter().sum::<f64>().abs() < 1e-12);
        close(&length_bonus(&[7, 7, 7]), &[0.0, 0.0, 0.0]);
        assert!(length_bonus(&[]).is_empty());
    }

    #[test]
    fn length_control_shapes_the_rewards_before_the_baseline() {
        let shaping = AdvantageShaping {
            std_normalize: false,
            length_coef_answer: 0.5,
            length_coef_reasoning: 0.25,
            ..nemotron(AdvantageKind::GroupNorm)
        };
        let rollout = |reward, answer_tokens, reasoning_tokens| Scored {
            reward,
            answer_tokens,
            reasoning_tokens,
            ..Scored::default()
        };
        // Equal rewards: only the lengths differ. Answers 10 and 30 give bonuses +0.5 and
        // -0.5; reasoning 40 and 20 gives -0.5 and +0.5.
        let group = [rollout(1.0, 10, 40), rollout(1.0, 30, 20)];
        // Shaped rewards 1 + 0.25 - 0.125 and 1 - 0.25 + 0.125; mean 1.
        close(
            &group_advantages(&group, &shaping).unwrap(),
            &[0.125, -0.125],
        );
        // An invalid rollout takes no part in the lengths.
        let with_invalid = [
            rollout(1.0, 10, 40),
            Scored {
                invalid: true,
                ..rollout(0.0, 1000, 0)
            },
            rollout(1.0, 30, 20),
        ];
        close(
            &group_advantages(&with_invalid, &shaping).unwrap(),
            &[0.125, -5.0, -0.125],
        );
    }
}
