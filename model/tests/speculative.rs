//! MTP speculative decoding: greedy output identical to plain decoding, with the acceptance rate
//! reported; sampling stays seeded and well-formed.

mod common;

use chorus_model::engine::{Engine, GenerationRequest};
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
