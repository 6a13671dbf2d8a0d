//! The KL penalty to the stage's starting policy: the trainer snapshots a frozen reference at a
//! stage's first step, fills the sequences' reference log-probabilities from it, reports the KL
//! to it, keeps it through checkpoints and drops it when a stage without a penalty begins.

mod common;

use candle_core::Device;
use chorus_learner::*;
use common::*;

/// k3 token mean of KL(policy || reference) from per-sequence log-probabilities.
fn k3(policy: &[Vec<f32>], reference: &[Vec<f32>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (p, r) in policy.iter().zip(reference) {
        for (&lp, &rp) in p.iter().zip(r) {
            let x = (rp - lp) as f64;
            sum += x.exp() - x - 1.0;
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn the_first_step_of_a_stage_has_zero_kl_and_every_parameter_a_gradient() {
    for estimator in ["k1", "k3"] {
        let mut t = trainer(1e-2);
        let batch = rollouts(&t, 8);
        let penalised = objective(&[("kl_coef", "0.5"), ("kl_estimator", estimator)]);
        t.enter_stage(0, true).unwrap();
        assert!(t.has_reference());
        let reference = t.reference_logprobs(&batch).unwrap().expect("held");
        assert_eq!(
            reference,
            completion_logprobs(t.model(), &batch, usize::MAX).unwrap(),
            "the reference is the policy, bit for bit"
        );
        let filled: Vec<RlSequence> = batch
            .iter()
            .zip(&reference)
            .map(|(s, r)| RlSequence {
                ref_logprobs: Some(r.clone()),
                ..s.clone()
            })
            .collect();
        let (surrogate, stats) = rl_loss(t.model(), &filled, &penalised).unwrap();
        assert_eq!(stats.kl, 0.0, "{estimator}");
        let grads = surrogate.backward().unwrap();
        for (name, var) in t.params().vars() {
            if name.ends_with("e_score_correction_bias") {
                continue; // moved by load balancing, not by gradients
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient ({estimator})"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient ({estimator})");
        }
        // The trainer fills the reference itself and reports the same zero.
        let report = t.rl_step_mixed(&[(&penalised, &batch)]).unwrap();
        assert!(report.skipped.is_none(), "{report:?}");
        assert_eq!(report.stats.kl, 0.0, "{estimator}: {report:?}");
    }
}

#[test]
fn the_kl_grows_as_the_policy_trains_and_the_reference_stays_put() {
    let mut t = trainer(1e-2);
    let batch = rollouts(&t, 8);
    let penalised = objective(&[("kl_coef", "0.05")]);
    t.enter_stage(0, true).unwrap();
    let reference = t.reference_logprobs(&batch).unwrap().unwrap();
    let mut kls = vec![];
    for _ in 0..4 {
        t.enter_stage(0, true).unwrap();
        let r = t.rl_step_mixed(&[(&penalised, &batch)]).unwrap();
        assert!(r.skipped.is_none(), "{r:?}");
        kls.push(r.stats.kl);
    }
    assert_eq!(kls[0], 0.0);
    assert!(kls[1..].iter().all(|&kl| kl > 0.0), "{kls:?}");
    // The reported KL is the k3 estimate to the reference (the default estimator) at the start
    // of each step: the last report measured the policy before the last update.
    assert_eq!(
        t.reference_logprobs(&batch).unwrap().unwrap(),
        reference,
        "the reference moved"
    );
    let now = completion_logprobs(t.model(), &batch, usize::MAX).unwrap();
    assert_ne!(now, reference, "the policy did not move");
    assert!(k3(&now, &reference) > kls[3], "{kls:?}");
}

#[test]
fn a_heavy_kl_penalty_keeps_the_policy_near_the_reference() {
    let run = |kl_coef: &str| {
        let mut t = trainer(1e-2);
        let batch = rollouts(&t, 8);
        let start = completion_logprobs(t.model(), &batch, usize::MAX).unwrap();
        let o = objective(&[("kl_coef", kl_coef)]);
        for _ in 0..8 {
            t.enter_stage(0, o.kl_coef > 0.0).unwrap();
            let r = t.rl_step_mixed(&[(&o, &batch)]).unwrap();
            assert!(r.skipped.is_none(), "{r:?}");
        }
        k3(
            &completion_logprobs(t.model(), &batch, usize::MAX).unwrap(),
            &start,
        )
    };
    let (free, held) = (run("0"), run("2.0"));
    assert!(
        held < 0.5 * free,
        "KL to the start: {held} with the penalty, {free} without"
    );
}

#[test]
fn the_reference_is_the_policy_at_the_start_of_each_stage() {
    let mut t = trainer(1e-2);
    let batch = rollouts(&t, 6);
    let penalised = objective(&[("kl_coef", "0.1")]);
    t.enter_stage(1, true).unwrap();
    let first = t.reference_logprobs(&batch).unwrap().unwrap();
    for _ in 0..2 {
        t.enter_stage(1, true).unwrap();
        t.rl_step_mixed(&[(&penalised, &batch)]).unwrap();
    }
    let end_of_stage_1 = completion_logprobs(t.model(), &batch, usize::MAX).unwrap();
    t.enter_stage(2, true).unwrap();
    assert_eq!(t.stage(), Some(2));
    let second = t.reference_logprobs(&batch).unwrap().unwrap();
    assert_eq!(
        second, end_of_stage_1,
        "stage 2's reference is its starting policy"
    );
    assert_ne!(second, first);
    let r = t.rl_step_mixed(&[(&penalised, &batch)]).unwrap();
    assert_eq!(
        r.stats.kl, 0.0,
        "the first step of stage 2 is at its reference"
    );
    // A stage without a penalty drops the copy; a penalised step later in it takes one then.
    t.enter_stage(3, false).unwrap();
    assert!(!t.has_reference());
    t.rl_step(&batch).unwrap();
    t.enter_stage(3, true).unwrap();
    assert_eq!(
        t.reference_logprobs(&batch).unwrap().unwrap(),
        completion_logprobs(t.model(), &batch, usize::MAX).unwrap()
    );
}

#[test]
fn a_resumed_trainer_keeps_its_stage_and_reference() {
    let penalised = objective(&[("kl_coef", "0.1")]);
    let mut a = trainer(1e-2);
    let batch = rollouts(&a, 6);
    for _ in 0..2 {
        a.enter_stage(4, true).unwrap();
        a.rl_step_mixed(&[(&penalised, &batch)]).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path()).unwrap();
    assert!(dir.path().join(REFERENCE_FILE).is_file());
    let mut b = Trainer::resume(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(b.stage(), Some(4));
    assert_eq!(
        b.reference_logprobs(&batch).unwrap(),
        a.reference_logprobs(&batch).unwrap()
    );
    // The next step of the stage is the same step on either side.
    let mut reports = vec![];
    for t in [&mut a, &mut b] {
        t.enter_stage(4, true).unwrap();
        reports.push(t.rl_step_mixed(&[(&penalised, &batch)]).unwrap());
    }
    assert!(reports[0].stats.kl > 0.0);
    assert_eq!(reports[0].stats, reports[1].stats);
    assert_eq!(weights(&a), weights(&b));

    // Without a reference, none is written and none comes back.
    a.enter_stage(5, false).unwrap();
    let plain = tempfile::tempdir().unwrap();
    a.save(plain.path()).unwrap();
    assert!(!plain.path().join(REFERENCE_FILE).exists());
    let c = Trainer::resume(plain.path(), &Device::Cpu).unwrap();
    assert!(!c.has_reference());
    assert_eq!(c.stage(), Some(5));
}
