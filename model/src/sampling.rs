//! Turning logits into tokens: greedy, or temperature with optional top-k and top-p (nucleus)
//! truncation, seeded per sequence. The log-probability returned with each token is that of
//! the distribution actually sampled from, as the learner's importance ratios need.
//!
//! A reasoning budget ([`ThinkBudget`]) caps the tokens a sequence spends inside `<think>`: once
//! it has spent them, the sampler emits `</think>` instead of sampling, and the model goes on to
//! its answer (Nemotron 3's budget control at serving time).

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Cap on the tokens spent inside a think block (`None` = no cap).
    pub think_budget: Option<ThinkBudget>,
}

/// At most `tokens` tokens between the think block's `open` and `close` tokens: the sampler
/// emits `close` in place of the next token once a sequence has spent them (a block opened in
/// the prompt counts the prompt's tokens after `open`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThinkBudget {
    /// Tokens allowed inside the block.
    pub tokens: usize,
    /// The token that opens the block (`<think>`).
    pub open: u32,
    /// The token that closes it (`</think>`).
    pub close: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            think_budget: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether sampling always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0 (0 = greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if let Some(b) = &self.think_budget
            && b.open == b.close
        {
            return Err(format!(
                "the think budget's open and close tokens must differ, both are {}",
                b.open
            ));
        }
        Ok(())
    }

    /// The full distribution to sample from (zero outside the kept set). For greedy decoding this
    /// is the untempered softmax, which is what greedy tokens' log-probabilities are reported under.
    pub fn distribution(&self, logits: &[f32]) -> Vec<f32> {
        let t = if self.is_greedy() {
            1.0
        } else {
            self.temperature
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut p: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
        if !self.is_greedy() && (self.top_k > 0 || self.top_p < 1.0) {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let total: f32 = p.iter().sum();
            let mut keep = if self.top_k > 0 {
                self.top_k.min(order.len())
            } else {
                order.len()
            };
            if self.top_p < 1.0 {
                let mut cum = 0.0;
                for (i, &j) in order.iter().enumerate().take(keep) {
                    cum += p[j] / total;
                    if cum >= self.top_p {
                        keep = i + 1;
                        break;
                    }
                }
            }
            for &j in &order[keep..] {
                p[j] = 0.0;
            }
        }
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= sum);
        p
    }
}

/// `log softmax(logits)[i]`, computed stably.
fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits[i] - max - sum.ln()
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// A per-sequence sampler with its own seeded random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Inside a think block, with this many tokens spent in it.
    thinking: Option<usize>,
}

impl Sampler {
    /// A sampler with `params`, its randomness seeded by `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            thinking: None,
        }
    }

    /// Reads the prompt the sequence continues, so that a think block it opens counts toward
    /// the budget.
    pub fn observe_prompt(&mut self, prompt: &[u32]) {
        for &t in prompt {
            self.observe(t);
        }
    }

    fn observe(&mut self, token: u32) {
        let Some(b) = self.params.think_budget else {
            return;
        };
        if token == b.open {
            self.thinking = Some(0);
        } else if token == b.close {
            self.thinking = None;
        } else if let Some(spent) = &mut self.thinking {
            *spent += 1;
        }
    }

    /// The settings it samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token and returns it with its log-probability under the sampling distribution.
    /// A `</think>` forced by the budget is returned with its log-probability under the
    /// untempered softmax (the sampling distribution may give it none).
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        if let (Some(b), Some(spent)) = (self.params.think_budget, self.thinking)
            && spent >= b.tokens
        {
            self.observe(b.close);
            return (b.close, log_softmax_at(logits, b.close as usize));
        }
        let p = self.params.distribution(logits);
        let tok = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(&p)
        };
        self.observe(tok as u32);
        (tok as u32, p[tok].ln())
    }

    /// Draws an index from a normalised distribution.
    pub fn draw(&mut self, p: &[f32]) -> usize {
        let u: f32 = self.rng.random();
        let mut cum = 0.0;
        let mut last_nonzero = 0;
        for (i, &x) in p.iter().enumerate() {
            if x > 0.0 {
                cum += x;
                last_nonzero = i;
                if u < cum {
                    return i;
                }
            }
        }
        last_nonzero
    }

    /// A uniform number in [0, 1) from this sequence's stream.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_truncate() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
            think_budget: None,
        }
        .distribution(&logits);
        assert!(p[2] == 0.0 && p[3] == 0.0 && (p[0] + p[1] - 1.0).abs() < 1e-6);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            think_budget: None,
        }
        .distribution(&logits);
        assert!(p[0] == 1.0, "{p:?}"); // the top token alone holds 0.64 >= 0.5
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let draws = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed);
            (0..4000).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
        let ones = draws(3).iter().filter(|&&t| t == 1).count() as f32 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        let (_, lp) = Sampler::new(SamplingParams::default(), 0).sample(&[0.0, 0.0]);
        assert!((lp - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn the_think_budget_closes_the_block_after_its_tokens() {
        // Token 0 is almost certain, so without a budget the block would never close.
        let logits = [5.0f32, -5.0, -5.0, -5.0];
        let (open, close) = (2, 3);
        let budget = |tokens| SamplingParams {
            think_budget: Some(ThinkBudget {
                tokens,
                open,
                close,
            }),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(budget(4), 0);
        s.observe_prompt(&[1, open, 0]);
        let out: Vec<u32> = (0..6).map(|_| s.sample(&logits).0).collect();
        // One token of the block was in the prompt: three more, then the forced close, then
        // the answer.
        assert_eq!(out, [0, 0, 0, close, 0, 0]);
        let mut s = Sampler::new(budget(4), 0);
        let (t, lp) = {
            s.observe_prompt(&[open, 0, 0, 0, 0]);
            s.sample(&logits)
        };
        assert_eq!(t, close);
        let want = -5.0 - 5.0 - (1.0f32 + 3.0 * (-10.0f32).exp()).ln();
        assert!((lp - want).abs() < 1e-5, "{lp} vs {want}");
        // Outside a block, nothing is forced.
        let mut s = Sampler::new(budget(0), 0);
        assert_eq!(s.sample(&logits).0, 0);
        assert!(
            budget(1).validate().is_ok()
                && SamplingParams {
                    think_budget: Some(ThinkBudget {
                        tokens: 1,
                        open: 2,
                        close: 2
                    }),
                    ..SamplingParams::default()
                }
                .validate()
                .is_err()
        );
    }
}
