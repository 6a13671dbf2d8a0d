//! MTP healing: `mtp_step` moves the MTP head alone (backbone, `lm_head`, embeddings and routing
//! biases bit for bit), its loss falls on the completions it learns, and the loss counts only
//! completion targets.

mod common;

use candle_core::Device;
use chorus_learner::*;
use chorus_model::{NemotronH, checkpoint};
use common::*;

fn healing(lr: f64) -> Trainer {
    trainer_with(
        true,
        LearnerConfig {
            schedule: LrSchedule {
                peak_lr: lr,
                warmup_steps: 0,
                ..Default::default()
            },
            ..Default::default()
        },
    )
}

/// Completions that repeat a short cycle: easy to predict two tokens ahead.
fn batch() -> Vec<SftSequence> {
    (0..6)
        .map(|i| {
            let prompt = [3, 4 + i as u32 % 3];
            let completion: Vec<u32> = (0..12).map(|j| 8 + ((i + j) % 4) as u32).collect();
            SftSequence {
                tokens: prompt.iter().chain(&completion).copied().collect(),
                prompt_len: prompt.len(),
                loss_mask: None,
            }
        })
        .collect()
}

#[test]
fn an_mtp_step_moves_the_head_alone_and_its_loss_falls() {
    let mut t = healing(1e-2);
    let before = weights(&t);
    let data = batch();
    let first = t.mtp_step(&data).unwrap();
    assert!(first.skipped.is_none(), "{:?}", first.skipped);
    assert!(first.stats.loss > 0.0 && first.stats.tokens > 0);
    let mut last = first.clone();
    for _ in 0..40 {
        last = t.mtp_step(&data).unwrap();
    }
    // The random lm_head the head shares gives small logits, so the loss falls slowly from
    // ln(24) = 3.18; half a nat is well beyond noise.
    assert!(
        last.stats.loss < first.stats.loss - 0.5,
        "MTP loss {} -> {}",
        first.stats.loss,
        last.stats.loss
    );
    let after = weights(&t);
    let mut moved = 0;
    for (name, w) in &before {
        if name.starts_with("mtp.") {
            moved += usize::from(after[name] != *w);
        } else {
            assert_eq!(&after[name], w, "{name} moved in an MTP step");
        }
    }
    assert!(moved > 0, "no MTP parameter moved");
    assert_eq!(t.version(), 41);
}

#[test]
fn a_policy_without_a_head_refuses_mtp_steps() {
    let mut t = trainer(1e-3);
    let err = t.mtp_step(&batch()).unwrap_err().to_string();
    assert!(err.contains("no MTP head"), "{err}");
}

#[test]
fn the_mtp_loss_counts_completion_targets_only() {
    let cfg = config(true);
    let params = checkpoint::init_params(&cfg, 2, &Device::Cpu).unwrap();
    let model = NemotronH::new(&cfg, &params).unwrap();
    // 3 prompt tokens and 5 completion tokens; depth 1 predicts token p + 2 from position p,
    // so its targets are tokens 2..8, of which 5 are completion tokens.
    let seq = SftSequence {
        tokens: vec![3, 4, 5, 9, 10, 11, 12, 13],
        prompt_len: 3,
        loss_mask: None,
    };
    let (_, stats) = mtp_loss(&model, std::slice::from_ref(&seq)).unwrap();
    assert_eq!(stats.tokens, 5);
    // Masking two completion tokens out of the loss drops them as targets.
    let masked = SftSequence {
        loss_mask: Some(vec![true, false, true, false, true]),
        ..seq.clone()
    };
    let (_, stats) = mtp_loss(&model, &[masked]).unwrap();
    assert_eq!(stats.tokens, 3);
    // A longer neighbour pads this sequence; padding is never a target.
    let long = SftSequence {
        tokens: vec![3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16],
        prompt_len: 3,
        loss_mask: None,
    };
    let (_, both) = mtp_loss(&model, &[seq, long]).unwrap();
    assert_eq!(both.tokens, 5 + 8);
}

#[test]
fn sft_steps_leave_the_mtp_head_bit_for_bit() {
    let mut t = healing(1e-2);
    let before = weights(&t);
    for _ in 0..3 {
        t.sft_step(&batch()).unwrap();
    }
    let after = weights(&t);
    assert!(before.keys().any(|n| n.starts_with("mtp.")));
    for (name, w) in before.iter().filter(|(n, _)| n.starts_with("mtp.")) {
        assert_eq!(&after[name], w, "{name} moved in an SFT step");
    }
    assert_ne!(
        after["backbone.embeddings.weight"], before["backbone.embeddings.weight"],
        "the SFT steps trained the backbone"
    );
}
