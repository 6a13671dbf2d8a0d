//! Generation on the engine: one sequence, a continuously batched set of requests, and MTP
//! speculative decoding (draft with the MTP head, verify in one pass of the backbone).

use serde::{Deserialize, Serialize};

use super::batch::ContinuousBatch;
use super::{Engine, LogitsFor, StepInput};
use crate::error::{ModelError, Result};
use crate::sampling::{Sampler, SamplingParams, argmax};

/// One request to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<u32>,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// How tokens are sampled.
    pub sampling: SamplingParams,
    /// Seed of this request's sampler, so results do not depend on the batch.
    pub seed: u64,
    /// Generation ends after any of these tokens (which is kept).
    pub stop_tokens: Vec<u32>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop token was generated.
    Stop,
}

/// Counts of MTP speculative decoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MtpStats {
    /// Draft tokens proposed by the MTP head.
    pub drafted: usize,
    /// Draft tokens the backbone accepted.
    pub accepted: usize,
    /// Verification passes of the backbone.
    pub verify_passes: usize,
}

impl MtpStats {
    /// Accepted over drafted (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// What a request produced: only the new tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens (a stop token that ended it included).
    pub tokens: Vec<u32>,
    /// Log-probability of each token under the distribution it was sampled from.
    pub logprobs: Vec<f32>,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Speculative decoding counts, for [`Engine::generate_speculative`].
    pub mtp: Option<MtpStats>,
}

/// Rejects a request that cannot be generated for, naming why.
pub(super) fn check(req: &GenerationRequest) -> Result<()> {
    if req.prompt.is_empty() {
        return Err(ModelError::Input(
            "the prompt is empty; give at least one token".into(),
        ));
    }
    req.sampling.validate().map_err(ModelError::Input)
}

impl Engine {
    /// Generates for one request through the incremental cache path.
    pub fn generate(&self, req: &GenerationRequest) -> Result<Generation> {
        Ok(self.generate_batch(std::slice::from_ref(req), 1)?.remove(0))
    }

    /// Generates for many requests with continuous batching: up to `max_batch` sequences advance
    /// together, one forward call per step; a finished sequence leaves and the next waiting one
    /// joins with its whole prompt in the same call. Results are in request order.
    pub fn generate_batch(
        &self,
        reqs: &[GenerationRequest],
        max_batch: usize,
    ) -> Result<Vec<Generation>> {
        for r in reqs {
            check(r)?;
        }
        let mut results: Vec<Option<Generation>> = vec![None; reqs.len()];
        let mut waiting = (0..reqs.len()).rev().collect::<Vec<_>>();
        let mut batch = ContinuousBatch::new(max_batch);
        loop {
            while batch.has_room() {
                let Some(i) = waiting.pop() else { break };
                if reqs[i].max_new_tokens == 0 {
                    // Nothing to decode: answered without taking a slot.
                    results[i] = Some(Generation {
                        tokens: vec![],
                        logprobs: vec![],
                        finish: FinishReason::Length,
                        mtp: None,
                    });
                    continue;
                }
                batch.admit(self, reqs[i].clone(), i).map_err(|(_, e)| e)?;
            }
            if batch.is_empty() {
                break;
            }
            for done in batch.step(self, |_, _, _| {})? {
                results[done.tag] = Some(done.generation);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request finishes"))
            .collect())
    }

    /// Generates with MTP speculative decoding: each round the MTP head drafts `drafts` tokens
    /// (recursively), the backbone scores the last token plus the drafts in one pass, and the
    /// longest acceptable prefix is kept plus one token from the backbone. Acceptance follows
    /// speculative sampling (accept a draft with probability min(1, p/q), otherwise sample from
    /// the normalised max(0, p - q)), which for greedy decoding means "the draft equals the
    /// backbone's argmax" — so greedy output is identical to [`Engine::generate`].
    pub fn generate_speculative(
        &self,
        req: &GenerationRequest,
        drafts: usize,
    ) -> Result<Generation> {
        check(req)?;
        if !self.has_mtp() {
            return Err(ModelError::Input("speculative decoding needs an MTP head; this checkpoint has none (num_nextn_predict_layers = 0)".into()));
        }
        if drafts == 0 {
            return self.generate(req);
        }
        if req.sampling.think_budget.is_some() {
            return Err(ModelError::Input(
                "a think budget is not supported with speculative decoding; drop one of them"
                    .into(),
            ));
        }
        let v = self.vocab;
        let d = self.d;
        let params = &req.sampling;
        let mut sampler = Sampler::new(params.clone(), req.seed);
        let mut cache = self.new_cache();
        let mut out = Generation {
            tokens: vec![],
            logprobs: vec![],
            finish: FinishReason::Length,
            mtp: Some(MtpStats::default()),
        };
        if req.max_new_tokens == 0 {
            return Ok(out);
        }
        let mut stats = MtpStats::default();

        // Prefill, then feed the MTP head every prompt position with the token that follows it.
        let pre = self.forward(
            &mut [StepInput {
                cache: &mut cache,
                tokens: &req.prompt,
            }],
            LogitsFor::Last,
            false,
        )?;
        let (mut tok, lp) = sampler.sample(&pre.logits[..v]);
        let mut done = {
            out.tokens.push(tok);
            out.logprobs.push(lp);
            req.stop_tokens.contains(&tok) || out.tokens.len() >= req.max_new_tokens
        };
        let mut next: Vec<u32> = req.prompt[1..].to_vec();
        next.push(tok);
        let (mut mtp_hidden, mut mtp_logits) =
            self.mtp_forward(&mut cache, &pre.hidden, &next, false)?;

        while !done {
            let k = drafts.min(req.max_new_tokens - out.tokens.len());
            // Draft k tokens, recursively on the head's own hidden state.
            // Drafting extends the head's caches; they are cut back afterwards, not copied.
            let mark = self.mtp_mark(&cache);
            let mut draft_tokens = Vec::with_capacity(k);
            let mut draft_dists = Vec::with_capacity(k);
            let mut h = mtp_hidden[mtp_hidden.len() - d..].to_vec();
            let mut logits = mtp_logits.clone();
            for j in 0..k {
                let q = params.distribution(&logits);
                let t = if params.is_greedy() {
                    argmax(&logits)
                } else {
                    sampler.draw(&q)
                } as u32;
                draft_tokens.push(t);
                draft_dists.push(q);
                if j + 1 < k {
                    let (h2, l2) = self.mtp_forward(&mut cache, &h, &[t], false)?;
                    h = h2;
                    logits = l2;
                }
            }
            self.mtp_restore(&mut cache, mark);

            // Verify [tok, drafts...] in one backbone pass.
            let mut inputs = vec![tok];
            inputs.extend(&draft_tokens);
            let ver = self.forward(
                &mut [StepInput {
                    cache: &mut cache,
                    tokens: &inputs,
                }],
                LogitsFor::All,
                true,
            )?;
            stats.verify_passes += 1;
            stats.drafted += k;
            let mut new_tokens: Vec<(u32, f32)> = vec![];
            let mut accepted = 0;
            for i in 0..=k {
                let row = &ver.logits[i * v..(i + 1) * v];
                let p = params.distribution(row);
                if i == k {
                    let (t, lp) = if params.is_greedy() {
                        let t = argmax(row);
                        (t as u32, p[t].ln())
                    } else {
                        let t = sampler.draw(&p);
                        (t as u32, p[t].ln())
                    };
                    new_tokens.push((t, lp));
                    break;
                }
                let dt = draft_tokens[i] as usize;
                let q = &draft_dists[i];
                let ok = if params.is_greedy() {
                    argmax(row) == dt
                } else {
                    sampler.uniform() < (p[dt] / q[dt]).min(1.0)
                };
                if ok {
                    new_tokens.push((dt as u32, p[dt].ln()));
                    accepted += 1;
                    continue;
                }
                let t = if params.is_greedy() {
                    argmax(row)
                } else {
                    let mut residual: Vec<f32> =
                        p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
                    let s: f32 = residual.iter().sum();
                    if s > 0.0 {
                        residual.iter_mut().for_each(|x| *x /= s);
                        sampler.draw(&residual)
                    } else {
                        sampler.draw(&p)
                    }
                };
                new_tokens.push((t as u32, p[t].ln()));
                break;
            }
            stats.accepted += accepted;
            self.rewind(&mut cache, k - accepted);

            // Emit, stopping at a stop token or the budget.
            let mut emitted = 0;
            for &(t, lp) in &new_tokens {
                out.tokens.push(t);
                out.logprobs.push(lp);
                emitted += 1;
                if req.stop_tokens.contains(&t) || out.tokens.len() >= req.max_new_tokens {
                    done = true;
                    break;
                }
            }
            if done {
                break;
            }
            debug_assert_eq!(emitted, accepted + 1);
            // The backbone has now seen [tok, accepted drafts]; feed their hidden states to the
            // head, each with the token that followed it.
            let confirmed = accepted + 1;
            let next: Vec<u32> = new_tokens.iter().map(|x| x.0).collect();
            let (mh, ml) = self.mtp_forward(
                &mut cache,
                &ver.hidden[..confirmed * d],
                &next[..confirmed],
                false,
            )?;
            mtp_hidden = mh;
            mtp_logits = ml;
            tok = *next.last().expect("at least one new token");
        }
        if let Some(&last) = out.tokens.last()
            && req.stop_tokens.contains(&last)
        {
            out.finish = FinishReason::Stop;
        }
        out.mtp = Some(stats);
        Ok(out)
    }
}
