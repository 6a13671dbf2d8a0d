//! The learner on a tiny policy: updates move probabilities the right way, the sampler's
//! mismatch is corrected as the objective says, bad steps change nothing, and checkpoints resume
//! exactly.

use candle_core::Device;
use chorus_learner::*;
use chorus_model::engine::{Engine, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronHConfig, checkpoint};

fn config() -> NemotronHConfig {
    NemotronHConfig::from_json_str(
        r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 32,
        "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16, "routed_scaling_factor": 1.0}"#,
    )
    .unwrap()
}

fn trainer(lr: f64) -> Trainer {
    let cfg = config();
    let params = checkpoint::init_params(&cfg, 1, &Device::Cpu).unwrap();
    let lc = LearnerConfig {
        schedule: LrSchedule {
            peak_lr: lr,
            ..Default::default()
        },
        ..Default::default()
    };
    Trainer::new(cfg, params, lc).unwrap()
}

/// Samples completions with the current weights, as a rollout worker would.
fn rollouts(t: &Trainer, n: usize) -> Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> {
    let engine = Engine::from_params(t.model_config(), t.params()).unwrap();
    (0..n)
        .map(|i| {
            let prompt = vec![3, 4 + (i % 3) as u32];
            let g = engine
                .generate(&GenerationRequest {
                    prompt: prompt.clone(),
                    max_new_tokens: 6,
                    sampling: SamplingParams::default(),
                    seed: i as u64,
                    stop_tokens: vec![],
                })
                .unwrap();
            (prompt, g.tokens, g.logprobs)
        })
        .collect()
}

fn seq(prompt: &[u32], completion: &[u32], logprobs: &[f32], advantage: f32) -> RlSequence {
    RlSequence {
        tokens: prompt.iter().chain(completion).copied().collect(),
        prompt_len: prompt.len(),
        behavior_logprobs: logprobs.to_vec(),
        advantage,
        ref_logprobs: None,
        loss_mask: None,
    }
}

fn target_count(t: &Trainer, n: usize) -> usize {
    rollouts(t, n)
        .iter()
        .map(|r| r.1.iter().filter(|&&x| x == 7).count())
        .sum()
}

#[test]
fn rewarding_a_token_makes_it_more_likely() {
    let mut t = trainer(1e-2);
    let before = target_count(&t, 64);
    for _ in 0..15 {
        let batch: Vec<RlSequence> = rollouts(&t, 16)
            .iter()
            .map(|(p, c, lp)| {
                let hits = c.iter().filter(|&&x| x == 7).count() as f32;
                seq(p, c, lp, hits - 0.25)
            })
            .collect();
        let r = t.rl_step(&batch).unwrap();
        assert!(r.skipped.is_none(), "{r:?}");
    }
    let after = target_count(&t, 64);
    assert!(
        after > 2 * before + 20,
        "token 7 sampled {before} times before training, {after} after"
    );
}

#[test]
fn on_policy_ratios_are_one_and_nothing_is_clipped() {
    let t = trainer(1e-3);
    let batch: Vec<RlSequence> = rollouts(&t, 4)
        .iter()
        .map(|(p, c, lp)| seq(p, c, lp, 1.0))
        .collect();
    let (_, stats) = rl_loss(t.model(), &batch, &Objective::default()).unwrap();
    // The engine and the candle model agree, so the worker's logprobs are the learner's.
    assert!(stats.mean_abs_logprob_diff < 1e-4, "{stats:?}");
    assert_eq!(stats.clip_fraction, 0.0);
    assert!(stats.kl.abs() < 1e-6);
    assert!(
        (stats.loss + 1.0).abs() < 1e-4,
        "loss = -mean(r * A) = -1, got {}",
        stats.loss
    );
    assert_eq!(stats.tokens, 4 * 6);
}

/// `objective` with `settings` applied by name.
fn objective(settings: &[(&str, &str)]) -> Objective {
    let mut o = Objective::default();
    for (k, v) in settings {
        o.set(k, v).unwrap();
    }
    o
}

#[test]
fn the_samplers_mismatch_is_corrected_as_the_objective_says() {
    let t = trainer(1e-3);
    let (p, c, lp) = rollouts(&t, 1).remove(0);
    // The worker claims a much lower probability than the learner's: rho = e^4 on every token.
    let low: Vec<f32> = lp.iter().map(|x| x - 4.0).collect();
    let loss = |o: &Objective, a: f32| rl_loss(t.model(), &[seq(&p, &c, &low, a)], o).unwrap().1;
    let none = loss(&objective(&[("correction", "none")]), -1.0);
    assert!((none.loss - 1.0).abs() < 1e-4, "{none:?}");
    let tis = loss(&objective(&[("correction", "tis"), ("tis_cap", "2")]), -1.0);
    assert!((tis.loss - 2.0).abs() < 1e-3, "{tis:?}");
    let icepop = loss(&objective(&[("correction", "icepop")]), 1.0);
    assert!(
        icepop.loss.abs() < 1e-6,
        "outside [0.5, 2] every token is dropped: {icepop:?}"
    );
    assert!((tis.mean_abs_logprob_diff - 4.0).abs() < 1e-3, "{tis:?}");
}

#[test]
fn token_mean_and_sequence_mean_differ_as_they_should() {
    let t = trainer(1e-3);
    let r = rollouts(&t, 2);
    // Same ratio 1 everywhere; advantages 1 (6 tokens) and -1 (3 tokens).
    let a = seq(&r[0].0, &r[0].1, &r[0].2, 1.0);
    let b = seq(&r[1].0, &r[1].1[..3], &r[1].2[..3], -1.0);
    let tok = rl_loss(
        t.model(),
        &[a.clone(), b.clone()],
        &objective(&[("aggregation", "token_mean")]),
    )
    .unwrap()
    .1;
    let seqm = rl_loss(
        t.model(),
        &[a, b],
        &objective(&[("aggregation", "seq_mean_token_mean")]),
    )
    .unwrap()
    .1;
    assert!((tok.loss - (-(6.0 - 3.0) / 9.0)).abs() < 1e-4, "{tok:?}");
    assert!(seqm.loss.abs() < 1e-4, "{seqm:?}");
}

#[test]
fn groups_with_different_objectives_share_one_step() {
    let mut t = trainer(1e-2);
    let r = rollouts(&t, 2);
    let a = [seq(&r[0].0, &r[0].1, &r[0].2, 1.0)];
    let b = [seq(&r[1].0, &r[1].1, &r[1].2, -1.0)];
    let reinforce = objective(&[("algorithm", "reinforce")]);
    let dapo = objective(&[("algorithm", "dapo")]);
    let (_, sa) = rl_loss(t.model(), &a, &reinforce).unwrap();
    let (_, sb) = rl_loss(t.model(), &b, &dapo).unwrap();
    let report = t.rl_step_mixed(&[(&reinforce, &a), (&dapo, &b)]).unwrap();
    assert!(report.skipped.is_none(), "{report:?}");
    // Each part weighs by its share of the sequences (one each here).
    assert!(
        (report.stats.loss - (sa.loss + sb.loss) / 2.0).abs() < 1e-5,
        "{report:?} vs {sa:?} and {sb:?}"
    );
    assert_eq!(report.stats.tokens, sa.tokens + sb.tokens);
}

#[test]
fn a_non_finite_step_is_skipped_and_changes_nothing() {
    let mut t = trainer(1e-2);
    let before = t.params().snapshot().unwrap();
    let (p, c, lp) = rollouts(&t, 1).remove(0);
    let r = t.rl_step(&[seq(&p, &c, &lp, f32::NAN)]).unwrap();
    assert!(
        r.skipped.as_deref().unwrap_or("").contains("not finite"),
        "{r:?}"
    );
    // The version clock advances; the weights stay as they were.
    assert_eq!(r.version, 1);
    assert_eq!(t.version(), 1);
    let after = t.params().snapshot().unwrap();
    for (name, w) in &before {
        let diff = max_abs_diff(w, &after[name]);
        assert_eq!(diff, 0.0, "{name} changed");
    }
    // A good step afterwards applies.
    let r = t.rl_step(&[seq(&p, &c, &lp, 1.0)]).unwrap();
    assert!(r.skipped.is_none() && t.version() == 2);
}

#[test]
fn sft_learns_a_reference_solution() {
    let mut t = trainer(1e-2);
    let ex = SftSequence {
        tokens: vec![3, 4, 5, 9, 11, 13, 2],
        prompt_len: 3,
        loss_mask: None,
    };
    let first = t.sft_step(std::slice::from_ref(&ex)).unwrap().stats.loss;
    let mut last = first;
    for _ in 0..30 {
        last = t.sft_step(std::slice::from_ref(&ex)).unwrap().stats.loss;
    }
    assert!(last < first * 0.2, "loss {first} -> {last}");
    let engine = Engine::from_params(t.model_config(), t.params()).unwrap();
    let g = engine
        .generate(&GenerationRequest {
            prompt: vec![3, 4, 5],
            max_new_tokens: 4,
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop_tokens: vec![],
        })
        .unwrap();
    assert_eq!(g.tokens, vec![9, 11, 13, 2]);
}

#[test]
fn resuming_a_checkpoint_continues_exactly() {
    let ex = |i: u32| SftSequence {
        tokens: vec![3, 4, 5 + i, 9, 11],
        prompt_len: 2,
        loss_mask: None,
    };
    let mut a = trainer(1e-2);
    for i in 0..3 {
        a.sft_step(&[ex(i)]).unwrap();
    }
    let mut b = trainer(1e-2);
    for i in 0..2 {
        b.sft_step(&[ex(i)]).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    b.save(dir.path()).unwrap();
    // As saved, and as a learner saved it before the routed experts were one tensor per
    // projection: their optimizer moments one per expert.
    for per_expert in [false, true] {
        if per_expert {
            split_expert_moments(&dir.path().join(OPTIMIZER_FILE));
        }
        let mut c = Trainer::resume(dir.path(), &Device::Cpu).unwrap();
        assert_eq!((c.step(), c.version()), (2, 2));
        c.sft_step(&[ex(2)]).unwrap();
        let resumed = c.params().snapshot().unwrap();
        for (name, w) in a.params().snapshot().unwrap() {
            let diff = max_abs_diff(&w, &resumed[&name]);
            assert!(
                diff < 1e-6,
                "per expert {per_expert}: {name} differs by {diff}"
            );
        }
    }
}

/// The largest absolute difference between two tensors of one shape.
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Rewrites a saved optimizer state's fused expert moments (`….experts.up_proj`) one tensor per
/// expert (`….experts.N.up_proj.weight`).
fn split_expert_moments(path: &std::path::Path) {
    let saved = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut out = std::collections::HashMap::new();
    let mut split = 0;
    for (name, t) in saved {
        match name.rsplit_once(".experts.") {
            Some((block, proj)) => {
                for e in 0..t.dim(0).unwrap() {
                    out.insert(
                        format!("{block}.experts.{e}.{proj}.weight"),
                        t.get(e).unwrap(),
                    );
                }
                split += 1;
            }
            None => {
                out.insert(name, t);
            }
        }
    }
    assert_eq!(split, 4, "exp_avg and exp_avg_sq of up_proj and down_proj");
    candle_core::safetensors::save(&out, path).unwrap();
}

#[test]
fn bad_settings_and_batches_are_named() {
    let cfg = config();
    let params = checkpoint::init_params(&cfg, 1, &Device::Cpu).unwrap();
    let lc = LearnerConfig {
        objective: Objective {
            eps_low: 1.5,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = Trainer::new(cfg, params, lc).err().unwrap().to_string();
    assert!(e.contains("eps_low"), "{e}");
    let mut t = trainer(1e-3);
    let bad = RlSequence {
        tokens: vec![3, 4, 5],
        prompt_len: 1,
        behavior_logprobs: vec![-1.0],
        advantage: 1.0,
        ref_logprobs: None,
        loss_mask: None,
    };
    let e = t.rl_step(&[bad]).unwrap_err().to_string();
    assert!(e.contains("2 completion tokens"), "{e}");
    let e = t
        .sft_step(&[SftSequence {
            tokens: vec![3, 99],
            prompt_len: 1,
            loss_mask: None,
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("99"), "{e}");
}

/// Multi-turn episodes mask out the observation tokens between the policy's turns: a masked
/// token contributes nothing, an unmasked one does.
#[test]
fn loss_mask_excludes_observation_tokens() {
    let t = trainer(1e-3);
    let sft = |last: u32, mask: Option<Vec<bool>>| {
        let ex = SftSequence {
            tokens: vec![3, 4, 5, 9, 11, last],
            prompt_len: 2,
            loss_mask: mask,
        };
        sft_loss(t.model(), &[ex]).unwrap().1
    };
    let masked = Some(vec![true, true, true, false]);
    let (a, b) = (sft(13, masked.clone()), sft(17, masked));
    assert_eq!(a.tokens, 3);
    assert_eq!(a.loss, b.loss, "a masked-out token changed the loss");
    let (c, d) = (sft(13, None), sft(17, None));
    assert_eq!(c.tokens, 4);
    assert_ne!(c.loss, d.loss);

    let rl = |last: u32, mask: Option<Vec<bool>>| {
        let mut s = seq(&[3, 4], &[5, 9, last], &[-1.0, -2.0, -3.0], 1.0);
        s.loss_mask = mask;
        // With `tis` the token's own probability weighs it, so its identity shows in the loss.
        rl_loss(t.model(), &[s], &objective(&[("correction", "tis")]))
            .unwrap()
            .1
    };
    let masked = Some(vec![true, false, false]);
    assert_eq!(rl(13, masked.clone()).loss, rl(17, masked).loss);
    assert_eq!(rl(13, Some(vec![true, false, true])).tokens, 2);
    assert_ne!(rl(13, None).loss, rl(17, None).loss);

    let bad = SftSequence {
        tokens: vec![3, 4, 5],
        prompt_len: 2,
        loss_mask: Some(vec![true, true]),
    };
    let e = sft_loss(t.model(), &[bad]).unwrap_err().to_string();
    assert!(e.contains("loss mask of 2"), "{e}");
}
