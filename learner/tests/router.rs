//! MoE routers during training: aux-loss-free load balancing moves each block's
//! `e_score_correction_bias` towards balance after every step, a frozen router keeps its
//! `gate.weight` bit for bit while the bias still moves, and RL steps leave the MTP head alone.

mod common;

use chorus_learner::*;
use chorus_model::ExpertLoad;
use common::*;

fn config_with(lr: f64, router_bias_rate: f64, weight_decay: f64) -> LearnerConfig {
    LearnerConfig {
        schedule: LrSchedule {
            peak_lr: lr,
            ..Default::default()
        },
        optimizer: AdamWConfig {
            weight_decay,
            ..Default::default()
        },
        router_bias_rate,
        ..Default::default()
    }
}

/// How many of `batch`'s real tokens the backbone's MoE block sends to each expert.
fn load(t: &Trainer, batch: &[RlSequence]) -> Vec<u64> {
    let mut total = ExpertLoad::new();
    for s in batch {
        let ids = candle_core::Tensor::new(s.tokens.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        t.model()
            .forward_counting_experts(&ids, None, &mut total)
            .unwrap();
    }
    total.get(BIAS).unwrap().to_vec()
}

#[test]
fn load_balancing_lifts_idle_experts_and_lowers_busy_ones() {
    let rate = 0.05f32;
    // Learning rate 0: only the bias rule moves anything.
    let mut t = trainer_with(false, config_with(0.0, rate as f64, 0.0));
    let batch = rollouts(&t, 8);
    // A skewed router: experts 0 and 1 win every token.
    let skewed = [0.5f32, 0.5, 0.0, 0.0];
    set_param(&t, BIAS, &skewed);
    let before = load(&t, &batch);
    let tokens: u64 = batch.iter().map(|s| s.tokens.len() as u64).sum();
    assert_eq!(before, [tokens, tokens, 0, 0]);
    t.rl_step(&batch).unwrap();
    let bias = weights(&t)[BIAS].clone();
    let expected: Vec<f32> = [0.5 - rate, 0.5 - rate, rate, rate].to_vec();
    assert_eq!(
        bias, expected,
        "each expert moves by the rate towards the mean"
    );
    for _ in 0..4 {
        t.rl_step(&batch).unwrap();
    }
    let after = load(&t, &batch);
    let spread = |l: &[u64]| l.iter().max().unwrap() - l.iter().min().unwrap();
    assert!(
        spread(&after) < spread(&before),
        "load {before:?} before balancing, {after:?} after"
    );
    assert_eq!(after.iter().sum::<u64>(), 2 * tokens);

    // Rate 0 turns it off.
    let mut off = trainer_with(false, config_with(0.0, 0.0, 0.0));
    set_param(&off, BIAS, &skewed);
    off.rl_step(&batch).unwrap();
    assert_eq!(weights(&off)[BIAS], skewed);
}

#[test]
fn a_frozen_router_keeps_its_weights_while_its_bias_balances() {
    let mut t = trainer_with(false, config_with(1e-2, 0.01, 0.1));
    let batch = rollouts(&t, 8);
    let before = weights(&t);
    t.set_router_frozen(true);
    let r = t.rl_step(&batch).unwrap();
    assert!(r.skipped.is_none(), "{r:?}");
    let after = weights(&t);
    assert_eq!(after[GATE], before[GATE], "the frozen router moved");
    assert_ne!(after[BIAS], before[BIAS], "load balancing stopped");
    for name in [
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.2.mixer.experts.0.up_proj.weight",
        "lm_head.weight",
    ] {
        assert_ne!(after[name], before[name], "{name} did not train");
    }
    t.set_router_frozen(false);
    t.rl_step(&batch).unwrap();
    assert_ne!(
        weights(&t)[GATE],
        after[GATE],
        "the unfrozen router did not train"
    );
}

#[test]
fn rl_steps_leave_the_mtp_head_bit_for_bit() {
    // Weight decay would shrink every parameter the optimizer touches, gradient or not.
    let mut t = trainer_with(true, config_with(1e-2, 0.01, 0.1));
    assert!(t.model().has_mtp());
    let batch = rollouts(&t, 8);
    let before = weights(&t);
    for _ in 0..2 {
        let r = t.rl_step(&batch).unwrap();
        assert!(r.skipped.is_none(), "{r:?}");
    }
    let after = weights(&t);
    let mtp: Vec<&String> = before.keys().filter(|n| n.starts_with("mtp.")).collect();
    assert!(mtp.iter().any(|n| n.ends_with("gate.weight")), "{mtp:?}");
    for name in mtp {
        assert_eq!(after[name], before[name], "{name} moved in an RL step");
    }
    assert_ne!(after["lm_head.weight"], before["lm_head.weight"]);
}
