//! What the generation benchmarks share: their requests and how a rate is timed.

use std::time::Instant;

use chorus_model::engine::{Engine, GenerationRequest};
use chorus_model::sampling::SamplingParams;

/// Request `i`: a greedy generation of `new_tokens` after a fixed `prompt_len`-token prompt of
/// its own (ids from the non-special part of the vocabulary).
pub fn request(i: usize, prompt_len: usize, new_tokens: usize, vocab: usize) -> GenerationRequest {
    let prompt = (0..prompt_len)
        .map(|j| ((i * 31 + j * 7 + 3) % (vocab - 3) + 3) as u32)
        .collect();
    GenerationRequest {
        prompt,
        max_new_tokens: new_tokens,
        sampling: SamplingParams::greedy(),
        seed: i as u64,
        stop_tokens: vec![],
    }
}

/// Generated tokens per second of `batch` requests submitted at once (continuous batching with
/// `max_batch = batch`), the best of `repeats` runs.
pub fn tokens_per_second(
    engine: &Engine,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    repeats: usize,
) -> f64 {
    let v = engine.vocab_size();
    let reqs: Vec<_> = (0..batch)
        .map(|i| request(i, prompt_len, new_tokens, v))
        .collect();
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            let tokens: usize = engine
                .generate_batch(&reqs, batch)
                .unwrap()
                .iter()
                .map(|g| g.tokens.len())
                .sum();
            tokens as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}
