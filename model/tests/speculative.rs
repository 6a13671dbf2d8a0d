//! MTP speculative decoding: greedy output identical to plain decoding, with the acceptance rate
//! reported; sampling stays seeded and well-formed.

mod common;

use chorus_model::engine::{Engine, GenerationRequest, LogitsFor, StepInput};
use chorus_model::sampling::SamplingParams;
use common::*;

fn request(sampling: SamplingParams, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: vec![5, 17, 3, 9, 22],
        max_new_tokens: n,
        sampling,
        seed: 42,
        stop_tokens: vec![],
    }
}

#[test]
fn greedy_speculation_changes_nothing_but_speed() {
    for (pattern, seed) in [("MEM*-E", 1u64), ("M*E", 2), ("EM*M", 3)] {
        let cfg = small_config(pattern, Some(16), true);
        let params = random_params(&cfg, seed);
        let engine = Engine::from_params(&cfg, &params).unwrap();
        let plain = engine
            .generate(&request(SamplingParams::greedy(), 30))
            .unwrap();
        for k in 1..=4 {
            let spec = engine
                .generate_speculative(&request(SamplingParams::greedy(), 30), k)
                .unwrap();
            assert_eq!(spec.tokens, plain.tokens, "{pattern} k={k}");
            for (a, b) in spec.logprobs.iter().zip(&plain.logprobs) {
                assert!((a - b).abs() < 1e-4, "{pattern} k={k}: logprob {a} vs {b}");
            }
            let stats = spec.mtp.unwrap();
            assert!(stats.drafted > 0 && stats.accepted <= stats.drafted);
            assert!((0.0..=1.0).contains(&stats.acceptance_rate()));
        }
    }
}

#[test]
fn sampled_speculation_is_seeded_and_respects_the_budget() {
    let cfg = small_config("MEM*-E", Some(16), true);
    let params = random_params(&cfg, 4);
    let engine = Engine::from_params(&cfg, &params).unwrap();
    let s = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 0,
        think_budget: None,
    };
    let a = engine
        .generate_speculative(&request(s.clone(), 25), 3)
        .unwrap();
    let b = engine.generate_speculative(&request(s, 25), 3).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens.len(), 25);
    assert!(a.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
}

/// Speculative verification records a call and drops the rejected drafts: a Mamba block goes
/// back to its state before the call and replays the tokens kept, an attention block cuts its
/// cache. Whatever is dropped, the sequence must go on exactly as one that never saw the
/// dropped tokens.
#[test]
fn a_rewound_cache_goes_on_as_if_the_dropped_tokens_never_came() {
    for (pattern, seed) in [("MEM*-E", 4u64), ("M*M", 5)] {
        let cfg = small_config(pattern, None, false);
        let params = random_params(&cfg, seed);
        let engine = Engine::from_params(&cfg, &params).unwrap();
        let (prompt, extra, next) = ([5u32, 17, 3, 9], [22u32, 8, 30, 11], [14u32]);
        let step = |cache: &mut chorus_model::engine::SequenceCache, tokens: &[u32], record| {
            engine
                .forward(&mut [StepInput { cache, tokens }], LogitsFor::Last, record)
                .unwrap()
                .logits
        };
        for drop in 0..extra.len() {
            let mut rewound = engine.new_cache();
            step(&mut rewound, &prompt, false);
            step(&mut rewound, &extra, true);
            engine.rewind(&mut rewound, drop);
            let mut direct = engine.new_cache();
            step(&mut direct, &prompt, false);
            step(&mut direct, &extra[..extra.len() - drop], false);
            assert_eq!(rewound.len(), direct.len());
            let (a, b) = (
                step(&mut rewound, &next, false),
                step(&mut direct, &next, false),
            );
            let worst = max_abs_diff(&a, &b);
            assert!(
                worst < 1e-5,
                "{pattern}, drop {drop}: logits differ by {worst}"
            );
        }
    }
}
