//! Parity with HF transformers on the tiny_a fixture, and agreement between the full-sequence
//! model and the incremental engine.

mod common;

use candle_core::{Device, Tensor};
use chorus_model::NemotronH;
use chorus_model::engine::{Engine, GenerationRequest, LogitsFor, StepInput};
use chorus_model::sampling::SamplingParams;
use common::*;

#[test]
fn full_forward_matches_hf_logits() {
    let (cfg, params, reference) = load_fixture("tiny_a");
    let model = NemotronH::new(&cfg, &params).unwrap();
    let logits = model.forward(&reference["input_ids"]).unwrap();
    let want = &reference["logits"];
    assert_eq!(logits.dims(), want.dims());
    let err = (logits - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn engine_prefill_matches_hf_logits() {
    let (cfg, params, reference) = load_fixture("tiny_a");
    let engine = Engine::from_params(&cfg, &params).unwrap();
    let ids = ids_of(&reference["input_ids"]);
    let want: Vec<f32> = reference["logits"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut caches: Vec<_> = ids.iter().map(|_| engine.new_cache()).collect();
    let mut batch: Vec<StepInput> = caches
        .iter_mut()
        .zip(&ids)
        .map(|(c, t)| StepInput {
            cache: c,
            tokens: t,
        })
        .collect();
    let out = engine.forward(&mut batch, LogitsFor::All, false).unwrap();
    let err = max_abs_diff(&out.logits, &want);
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn greedy_generation_reproduces_hf() {
    let (cfg, params, reference) = load_fixture("tiny_a");
    let engine = Engine::from_params(&cfg, &params).unwrap();
    let prompt = ids_of(&reference["greedy_prompt"]).remove(0);
    let want = ids_of(&reference["greedy_output"]).remove(0);
    let generation = engine
        .generate(&GenerationRequest {
            prompt: prompt.clone(),
            max_new_tokens: want.len() - prompt.len(),
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop_tokens: vec![],
        })
        .unwrap();
    assert_eq!(generation.tokens, want[prompt.len()..]);
}

/// Runs `schedule` (per step, which sequences advance by how many tokens) through the engine
/// and returns how far each sequence got and the largest difference of any logit from the full
/// forward of its sequence alone.
fn run_schedule(
    cfg: &chorus_model::NemotronHConfig,
    params: &chorus_model::Params,
    seqs: &[Vec<u32>],
    schedule: &[Vec<(usize, usize)>],
) -> (Vec<usize>, f32) {
    let model = NemotronH::new(cfg, params).unwrap();
    let engine = Engine::from_params(cfg, params).unwrap();
    let full: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| {
            let ids = Tensor::new(s.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model
                .forward(&ids)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let v = cfg.vocab_size;
    let mut caches: Vec<_> = seqs.iter().map(|_| engine.new_cache()).collect();
    let mut pos = vec![0usize; seqs.len()];
    let mut worst = 0f32;
    for step in schedule {
        let mut cache_refs: Vec<Option<&mut chorus_model::engine::SequenceCache>> =
            caches.iter_mut().map(Some).collect();
        let mut batch = vec![];
        for &(s, n) in step {
            batch.push(StepInput {
                cache: cache_refs[s].take().unwrap(),
                tokens: &seqs[s][pos[s]..pos[s] + n],
            });
        }
        let out = engine.forward(&mut batch, LogitsFor::All, false).unwrap();
        for (slot, &(s, n)) in step.iter().enumerate() {
            for i in 0..n {
                let row = out.logit_rows[slot].start + i;
                let got = &out.logits[row * v..(row + 1) * v];
                let want = &full[s][(pos[s] + i) * v..(pos[s] + i + 1) * v];
                worst = worst.max(max_abs_diff(got, want));
            }
            pos[s] += n;
        }
    }
    (pos, worst)
}

/// Feeds ragged sequences in pieces of varying size (prompt chunks, single tokens), with
/// sequences joining and leaving the batch, and compares every logit with the full forward.
fn check_incremental(cfg: &chorus_model::NemotronHConfig, params: &chorus_model::Params) {
    let seqs: Vec<Vec<u32>> = vec![
        (0..13).map(|i| (i * 7 + 3) % 40).collect(),
        (0..5).map(|i| (i * 11 + 1) % 40).collect(),
        (0..9).map(|i| (i * 5 + 17) % 40).collect(),
    ];
    // Schedule: (sequence, how many tokens) per step; sequence 2 joins late, 1 leaves early.
    let schedule: Vec<Vec<(usize, usize)>> = vec![
        vec![(0, 4), (1, 2)],
        vec![(0, 1), (1, 1)],
        vec![(0, 1), (1, 2), (2, 6)],
        vec![(0, 3), (2, 1)],
        vec![(0, 1), (2, 2)],
        vec![(0, 3)],
    ];
    let (pos, worst) = run_schedule(cfg, params, &seqs, &schedule);
    assert_eq!(pos, vec![13, 5, 9]);
    assert!(worst <= 1e-4, "incremental vs full: max abs error {worst}");
}

#[test]
fn incremental_decoding_matches_full_forward_on_tiny_a() {
    let (cfg, params, _) = load_fixture("tiny_a");
    // tiny_a's vocabulary is 320; the schedule uses ids below 40.
    check_incremental(&cfg, &params);
}

#[test]
fn incremental_decoding_matches_full_forward_on_other_configs() {
    for (pattern, latent) in [("M*EM-", Some(16)), ("EMM*", None), ("*M-E", Some(8))] {
        let cfg = small_config(pattern, latent, false);
        let params = random_params(&cfg, 11);
        check_incremental(&cfg, &params);
    }
}

/// A batch wide enough that the engine spreads its per-sequence work (SSM recurrences,
/// attention over each cache, routed experts) over the thread pool: 24 ragged sequences that
/// start with prompt chunks of different sizes, then advance one to three tokens a step and
/// leave as they finish. Every logit must match the full forward of its sequence alone.
#[test]
fn a_wide_ragged_batch_matches_the_full_forward() {
    let cfg = chorus_model::NemotronHConfig::from_json_str(
        r#"{"model_type": "nemotron_h", "vocab_size": 40, "hidden_size": 64,
        "hybrid_override_pattern": "M*EM", "mamba_num_heads": 8, "mamba_head_dim": 16,
        "ssm_state_size": 32, "n_groups": 2, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
        "intermediate_size": 96, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48,
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0, "eos_token_id": 2}"#,
    )
    .unwrap();
    let params = random_params(&cfg, 5);
    let seqs: Vec<Vec<u32>> = (0..24)
        .map(|s| {
            (0..10 + s % 9)
                .map(|i| ((s * 13 + i * 7 + 3) % 37 + 3) as u32)
                .collect()
        })
        .collect();
    // First a prompt chunk of 1 to 8 tokens, then 1 to 3 tokens per step, until each is done.
    let mut schedule: Vec<Vec<(usize, usize)>> = vec![];
    let mut pos = vec![0usize; seqs.len()];
    while pos.iter().zip(&seqs).any(|(p, s)| *p < s.len()) {
        let steps = schedule.len();
        let step: Vec<(usize, usize)> = (0..seqs.len())
            .filter(|&s| pos[s] < seqs[s].len())
            .map(|s| {
                let want = if pos[s] == 0 {
                    1 + s % 8
                } else {
                    1 + (s + steps) % 3
                };
                (s, want.min(seqs[s].len() - pos[s]))
            })
            .collect();
        for &(s, n) in &step {
            pos[s] += n;
        }
        schedule.push(step);
    }
    let steps = schedule.len();
    let (_, worst) = run_schedule(&cfg, &params, &seqs, &schedule);
    assert!(
        steps >= 6,
        "the schedule decodes over several steps ({steps})"
    );
    assert!(
        worst <= 1e-4,
        "wide ragged batch vs full forward: max abs error {worst}"
    );
}
