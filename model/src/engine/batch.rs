//! Continuous batching: the one loop that admits sequences into a running batch, advances all
//! of them with one [`Engine::forward`] call per step, and retires the finished ones.
//!
//! [`Engine::generate_batch`] and the rollout worker's engine thread both drive a
//! [`ContinuousBatch`]; what differs between them (where waiting requests come from, whether
//! new weights are installed between steps, what is recorded per token) stays with the caller:
//! the engine is passed to every [`ContinuousBatch::step`], so a caller may swap it between
//! steps while the sequences keep their caches, and each sequence carries a caller's `tag`
//! that sees every token it gets.
//!
//! ```
//! # use chorus_model::engine::{ContinuousBatch, Engine, GenerationRequest};
//! # fn run(engine: &Engine, mut waiting: Vec<GenerationRequest>) -> chorus_model::Result<()> {
//! let mut batch = ContinuousBatch::new(8);
//! let mut results = vec![];
//! loop {
//!     while batch.has_room() {
//!         let Some(req) = waiting.pop() else { break };
//!         batch.admit(engine, req, ()).map_err(|(_, e)| e)?;
//!     }
//!     if batch.is_empty() {
//!         break;
//!     }
//!     results.extend(batch.step(engine, |_tag, _token, _logprob| {})?);
//! }
//! # Ok(()) }
//! ```

use super::{
    Engine, FinishReason, Generation, GenerationRequest, LogitsFor, SequenceCache, StepInput,
};
use crate::error::{ModelError, Result};
use crate::sampling::Sampler;

/// One sequence of the batch.
struct Slot<T> {
    cache: SequenceCache,
    sampler: Sampler,
    /// What the next step feeds: the whole prompt first, then the last sampled token.
    next_input: Vec<u32>,
    max_new_tokens: usize,
    stop_tokens: Vec<u32>,
    out: Generation,
    tag: T,
}

/// A sequence that left the batch, with the tag it was admitted with.
#[derive(Debug)]
pub struct Finished<T> {
    /// The caller's tag.
    pub tag: T,
    /// The new tokens, their log-probabilities and why the sequence ended (`mtp` is `None`).
    pub generation: Generation,
}

/// Sequences decoding together, each with its own cache, admitted and retired between steps
/// (continuous batching).
pub struct ContinuousBatch<T> {
    active: Vec<Slot<T>>,
    max_batch: usize,
}

impl<T> ContinuousBatch<T> {
    /// An empty batch that holds at most `max_batch` sequences (at least one).
    pub fn new(max_batch: usize) -> Self {
        Self {
            active: vec![],
            max_batch: max_batch.max(1),
        }
    }

    /// The number of sequences decoding.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// Whether no sequence is decoding.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Whether another sequence may join before the next step.
    pub fn has_room(&self) -> bool {
        self.active.len() < self.max_batch
    }

    /// Adds a sequence with a fresh cache from `engine`; its whole prompt goes into the next
    /// step. A request that cannot decode (empty prompt, no token to generate, bad sampling
    /// settings) is handed back with the reason, so the caller can answer it. Admitting beyond
    /// [`ContinuousBatch::has_room`] is allowed; the bound is the caller's to keep.
    pub fn admit(
        &mut self,
        engine: &Engine,
        req: GenerationRequest,
        tag: T,
    ) -> std::result::Result<(), (T, ModelError)> {
        if req.max_new_tokens == 0 {
            return Err((
                tag,
                ModelError::Input("max_new_tokens must be at least 1 to decode".into()),
            ));
        }
        if let Err(e) = super::generate::check(&req) {
            return Err((tag, e));
        }
        let mut sampler = Sampler::new(req.sampling, req.seed);
        sampler.observe_prompt(&req.prompt);
        self.active.push(Slot {
            cache: engine.new_cache(),
            sampler,
            next_input: req.prompt,
            max_new_tokens: req.max_new_tokens,
            stop_tokens: req.stop_tokens,
            out: Generation {
                tokens: vec![],
                logprobs: vec![],
                finish: FinishReason::Length,
                mtp: None,
            },
            tag,
        });
        Ok(())
    }

    /// One decode step: a single forward call over every sequence, one sampled token each.
    /// `on_token(tag, token, logprob)` sees each token as it is sampled; the sequences that
    /// reached a stop token or their budget leave the batch and are returned.
    ///
    /// On an engine error the batch is left as it was before the step's sampling (the caller
    /// may [`ContinuousBatch::drain`] it to answer every sequence).
    pub fn step(
        &mut self,
        engine: &Engine,
        mut on_token: impl FnMut(&mut T, u32, f32),
    ) -> Result<Vec<Finished<T>>> {
        let out = {
            let mut batch: Vec<StepInput> = self
                .active
                .iter_mut()
                .map(|a| StepInput {
                    cache: &mut a.cache,
                    tokens: &a.next_input,
                })
                .collect();
            engine.forward(&mut batch, LogitsFor::Last, false)?
        };
        let v = engine.vocab_size();
        let mut done = vec![];
        for (slot, a) in self.active.iter_mut().enumerate() {
            let row = out.logit_rows[slot].start;
            let (tok, lp) = a.sampler.sample(&out.logits[row * v..(row + 1) * v]);
            a.next_input = vec![tok];
            a.out.tokens.push(tok);
            a.out.logprobs.push(lp);
            on_token(&mut a.tag, tok, lp);
            if a.stop_tokens.contains(&tok) {
                a.out.finish = FinishReason::Stop;
                done.push(slot);
            } else if a.out.tokens.len() >= a.max_new_tokens {
                done.push(slot);
            }
        }
        // In reverse, so each swap_remove leaves the slots still to remove where they were.
        Ok(done
            .into_iter()
            .rev()
            .map(|slot| {
                let a = self.active.swap_remove(slot);
                Finished {
                    tag: a.tag,
                    generation: a.out,
                }
            })
            .collect())
    }

    /// Removes every sequence, with what it generated so far.
    pub fn drain(&mut self) -> Vec<Finished<T>> {
        self.active
            .drain(..)
            .map(|a| Finished {
                tag: a.tag,
                generation: a.out,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::init_params;
    use crate::config::NemotronHConfig;
    use crate::sampling::{SamplingParams, ThinkBudget};

    fn tiny_engine() -> Engine {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 40, "hidden_size": 32,
            "hybrid_override_pattern": "M*E-", "mamba_num_heads": 4, "mamba_head_dim": 8,
            "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 3, "chunk_size": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "intermediate_size": 48, "n_routed_experts": 6, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16, "moe_shared_expert_intermediate_size": 24}"#,
        )
        .expect("config");
        let params = init_params(&cfg, 7, &candle_core::Device::Cpu).expect("init");
        Engine::from_params(&cfg, &params).expect("engine")
    }

    fn req(prompt: Vec<u32>, max_new_tokens: usize, seed: u64) -> GenerationRequest {
        GenerationRequest {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            seed,
            stop_tokens: vec![],
        }
    }

    #[test]
    fn sequences_join_between_steps_and_leave_when_done() {
        let engine = tiny_engine();
        let mut batch = ContinuousBatch::new(2);
        assert!(batch.is_empty() && batch.has_room());
        batch
            .admit(&engine, req(vec![1, 2, 3], 1, 0), "a")
            .expect("valid");
        batch
            .admit(&engine, req(vec![4], 3, 1), "b")
            .expect("valid");
        assert!(!batch.has_room());
        let mut seen = vec![];
        let done = batch
            .step(&engine, |t, tok, _| seen.push((*t, tok)))
            .expect("step");
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, "a");
        assert_eq!(done[0].generation.tokens.len(), 1);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), ["a", "b"]);
        // "c" joins while "b" is mid-generation.
        batch
            .admit(&engine, req(vec![5, 6], 1, 2), "c")
            .expect("valid");
        let done = batch.step(&engine, |_, _, _| {}).expect("step");
        assert_eq!(done.iter().map(|d| d.tag).collect::<Vec<_>>(), ["c"]);
        let done = batch.step(&engine, |_, _, _| {}).expect("step");
        assert_eq!(done[0].tag, "b");
        assert_eq!(done[0].generation.tokens.len(), 3);
        assert_eq!(done[0].generation.finish, FinishReason::Length);
        assert!(batch.is_empty());
    }

    /// Logits of `prompt` and of `decode` fed after it, run inside a batch with `mates` (each
    /// bringing its whole prompt, then one token), bit patterns compared.
    fn logits_among(engine: &Engine, prompt: &[u32], decode: u32, mates: &[Vec<u32>]) -> Vec<u32> {
        let mut caches: Vec<SequenceCache> =
            (0..=mates.len()).map(|_| engine.new_cache()).collect();
        let mut out = vec![];
        let first: Vec<&[u32]> = std::iter::once(prompt)
            .chain(mates.iter().map(Vec::as_slice))
            .collect();
        let second: Vec<[u32; 1]> = (0..=mates.len())
            .map(|i| [(decode + i as u32) % 40])
            .collect();
        for tokens in [first, second.iter().map(|t| t.as_slice()).collect()] {
            let mut batch: Vec<StepInput> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, tokens)| StepInput { cache, tokens })
                .collect();
            let o = engine
                .forward(&mut batch, LogitsFor::Last, false)
                .expect("forward");
            let v = engine.vocab_size();
            let row = o.logit_rows[0].start;
            out.extend(o.logits[row * v..(row + 1) * v].iter().map(|x| x.to_bits()));
        }
        out
    }

    #[test]
    fn a_batch_invariant_engine_gives_a_sequence_the_same_bits_alone_and_in_any_batch() {
        let cfg = tiny_engine().config().clone();
        let params = init_params(&cfg, 7, &candle_core::Device::Cpu).expect("init");
        let options = crate::engine::EngineOptions {
            batch_invariant: true,
            ..Default::default()
        };
        let engine =
            Engine::from_tensors_with(&cfg, &params.snapshot().expect("snapshot"), &options)
                .expect("engine");
        assert!(engine.is_batch_invariant());
        let prompt = [1, 2, 3];
        let alone = logits_among(&engine, &prompt, 9, &[]);
        // One mate (2 decode rows: the GEMV path) and many (12 prefill rows, 9 decode rows: the
        // tiled path); prompts of different lengths, so the rows are ragged.
        for mates in [
            vec![vec![4u32]],
            vec![
                vec![5, 6, 7, 8, 9],
                vec![10; 4],
                vec![11],
                vec![12, 13],
                vec![14; 7],
                vec![15],
                vec![16; 3],
                vec![17],
            ],
        ] {
            assert_eq!(
                alone,
                logits_among(&engine, &prompt, 9, &mates),
                "{} mates",
                mates.len()
            );
        }
    }

    #[test]
    fn a_stop_token_ends_a_sequence_and_is_kept() {
        let engine = tiny_engine();
        let greedy = engine.generate(&req(vec![1, 2], 4, 0)).expect("generate");
        let stop = greedy.tokens[1];
        let mut batch = ContinuousBatch::new(1);
        let mut r = req(vec![1, 2], 4, 0);
        r.stop_tokens = vec![stop];
        batch.admit(&engine, r, ()).expect("valid");
        let mut finished = vec![];
        while !batch.is_empty() {
            finished.extend(batch.step(&engine, |_, _, _| {}).expect("step"));
        }
        let g = &finished[0].generation;
        let first_stop = greedy
            .tokens
            .iter()
            .position(|&t| t == stop)
            .expect("in it");
        assert_eq!(g.tokens, greedy.tokens[..=first_stop]);
        assert_eq!(g.finish, FinishReason::Stop);
    }

    #[test]
    fn requests_that_cannot_decode_are_handed_back() {
        let engine = tiny_engine();
        let mut batch = ContinuousBatch::new(4);
        let (tag, _) = batch
            .admit(&engine, req(vec![], 2, 0), 1)
            .expect_err("empty");
        assert_eq!(tag, 1);
        let (tag, _) = batch
            .admit(&engine, req(vec![1], 0, 0), 2)
            .expect_err("no budget");
        assert_eq!(tag, 2);
        assert!(batch.is_empty());
    }

    #[test]
    fn an_engine_error_leaves_the_sequences_to_drain() {
        let engine = tiny_engine();
        let mut batch = ContinuousBatch::new(2);
        let bad = engine.vocab_size() as u32;
        batch
            .admit(&engine, req(vec![1], 2, 0), "ok")
            .expect("valid");
        batch
            .admit(&engine, req(vec![bad], 2, 0), "bad")
            .expect("admitted");
        assert!(batch.step(&engine, |_, _, _| {}).is_err());
        let drained = batch.drain();
        assert_eq!(
            drained.iter().map(|d| d.tag).collect::<Vec<_>>(),
            ["ok", "bad"]
        );
        assert!(batch.is_empty());
    }

    /// The longest run of tokens inside a think block: the prompt opens one, the generation
    /// may close it and open more.
    fn longest_think(tokens: &[u32], open: u32, close: u32) -> usize {
        let (mut inside, mut longest) = (Some(0usize), 0);
        for &t in tokens {
            if t == open {
                inside = Some(0);
            } else if t == close {
                inside = None;
            } else if let Some(n) = &mut inside {
                *n += 1;
                longest = longest.max(*n);
            }
        }
        longest
    }

    #[test]
    fn no_sequence_thinks_longer_than_its_budget() {
        let engine = tiny_engine();
        let (open, close) = (5, 6);
        let requests = |budget: Option<usize>| -> Vec<GenerationRequest> {
            (0..12)
                .map(|seed| GenerationRequest {
                    prompt: vec![1, 2, open],
                    max_new_tokens: 30,
                    sampling: SamplingParams {
                        think_budget: budget.map(|tokens| ThinkBudget {
                            tokens,
                            open,
                            close,
                        }),
                        ..SamplingParams::default()
                    },
                    seed,
                    stop_tokens: vec![],
                })
                .collect()
        };
        let free = engine
            .generate_batch(&requests(None), 4)
            .expect("generates");
        assert!(
            free.iter()
                .any(|g| longest_think(&g.tokens, open, close) > 8),
            "without a budget some sequence should think for more than 8 tokens"
        );
        let capped = engine
            .generate_batch(&requests(Some(8)), 4)
            .expect("generates");
        for g in &capped {
            assert!(
                longest_think(&g.tokens, open, close) <= 8,
                "{:?} thinks longer than 8 tokens",
                g.tokens
            );
            assert!(
                g.logprobs.iter().all(|lp| lp.is_finite()),
                "{:?}",
                g.logprobs
            );
        }
        // The ones that would have gone on are closed on their ninth token.
        assert!(capped.iter().any(|g| g.tokens.get(8) == Some(&close)));
    }
}
