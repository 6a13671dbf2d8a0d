//! The RL objectives of [`Objective`], evaluated exactly on per-token arrays: the loss and its
//! gradient with respect to the learner's log-probabilities.
//!
//! The learner's steps and `chorus loss` call the same [`evaluate`]. It works on plain host
//! arrays in `f64`, not on autograd tensors: each corner of the contract (which side of the clip
//! is active, masked tokens, empty sequences, aggregation) is then a line of code with a test,
//! not a property of how a framework breaks ties in `min`. The learner turns the gradient into
//! parameter gradients with one backward pass through `sum(stopgrad(g) * lp)`.
//!
//! Notation, per sequence `i` and completion token `t` with mask `m` (1 = in the loss): `lp` the
//! learner's log-probabilities, `old` the learner's at the start of the step, `beh` the
//! sampler's, `A_i` the sequence's advantage, `r = exp(lp - old)`, `rho = exp(old - beh)`.
//!
//! - Correction weight `w` (no gradient): `none` 1; `tis` `min(rho, tis_cap)`; `icepop` `rho`
//!   inside `[icepop_low, icepop_high]`, else 0; `seq_mask_tis` 0 on every token of a sequence
//!   whose geometric-mean `rho` over its masked tokens leaves `[icepop_low, icepop_high]`, else
//!   `min(rho, tis_cap)`.
//! - Objective `o` per token (maximised): `grpo`, `dapo`, `dr_grpo`:
//!   `w * min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`; `cispo`:
//!   `w * stopgrad(clip(r, ...)) * A * lp`; `reinforce`: `w * A * lp`; `gspo`: with
//!   `s_i = exp(mean_t (lp - old))` over masked tokens, `mean_t(w) * min(s_i*A, clip(s_i)*A)`
//!   on each of the sequence's masked tokens.
//! - KL (when `kl_coef > 0`): `k1 = lp - ref`, `k3 = exp(ref - lp) - (ref - lp) - 1`; the
//!   per-token loss is `-o + kl_coef * kl`.
//! - Aggregation: `token_mean` `sum(loss*m)/sum(m)`; `seq_mean_token_mean` the mean over
//!   sequences with at least one masked token of `sum_t(loss*m)/sum_t(m)`;
//!   `seq_mean_token_sum_norm` `sum(loss*m)/(B * norm_length)`, `norm_length` defaulting to `T`.
//!
//! Where the clipped term is the smaller one its gradient is zero; where both terms are equal
//! (the ratio inside the clip range, or on its edge) the unclipped term's gradient is used.

pub use chorus_proto::objective::{
    Aggregation, Algorithm, Correction, KlEstimator, Objective, ObjectiveError,
};

/// A batch of `batch` sequences of `width` completion positions, row-major `[B, T]`.
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    /// Sequences (`B`).
    pub batch: usize,
    /// Positions per sequence (`T`).
    pub width: usize,
    /// The learner's log-probabilities (`[B, T]`).
    pub logprobs: &'a [f32],
    /// The learner's log-probabilities at the start of the step (`[B, T]`).
    pub old_logprobs: &'a [f32],
    /// The sampler's log-probabilities (`[B, T]`).
    pub behaviour_logprobs: &'a [f32],
    /// One advantage per sequence (`[B]`).
    pub advantages: &'a [f32],
    /// Which positions are in the loss (`[B, T]`).
    pub mask: &'a [bool],
    /// The reference policy's log-probabilities (`[B, T]`); needed when `kl_coef > 0`.
    pub ref_logprobs: Option<&'a [f32]>,
}

/// A batch that does not fit its own shape or the objective's needs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BatchError(pub String);

/// The loss, its gradient and what happened on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The loss (to minimise).
    pub loss: f64,
    /// `d loss / d logprobs`, `[B, T]`; 0 where the mask is 0.
    pub grad_logprobs: Vec<f32>,
    /// Masked tokens whose clipped term was the active one (their sequence's, for `gspo`), as
    /// a fraction of masked tokens.
    pub clip_fraction: f64,
    /// Mean correction weight `w` over masked tokens.
    pub mean_weight: f64,
    /// Token mean of the KL estimate to the reference, when one is given; otherwise of k3
    /// between the sampler and the learner at the start of the step (how far off-policy the
    /// batch is).
    pub kl: f64,
    /// Masked tokens.
    pub tokens: usize,
}

fn check_len(name: &str, len: usize, want: usize, shape: &str) -> Result<(), BatchError> {
    if len == want {
        Ok(())
    } else {
        Err(BatchError(format!(
            "{name} has {len} values; the batch needs {want} ({shape})"
        )))
    }
}

impl TokenBatch<'_> {
    fn validate(&self, objective: &Objective) -> Result<(), BatchError> {
        let n = self.batch * self.width;
        let shape = format!("[{}, {}]", self.batch, self.width);
        check_len("logprobs", self.logprobs.len(), n, &shape)?;
        check_len("old_logprobs", self.old_logprobs.len(), n, &shape)?;
        check_len(
            "behaviour_logprobs",
            self.behaviour_logprobs.len(),
            n,
            &shape,
        )?;
        check_len("mask", self.mask.len(), n, &shape)?;
        check_len(
            "advantages",
            self.advantages.len(),
            self.batch,
            &format!("[{}]", self.batch),
        )?;
        match self.ref_logprobs {
            Some(r) => check_len("ref_logprobs", r.len(), n, &shape)?,
            None if objective.kl_coef > 0.0 => {
                return Err(BatchError(
                    "kl_coef > 0 needs ref_logprobs (the reference policy's log-probabilities)"
                        .into(),
                ));
            }
            None => {}
        }
        Ok(())
    }
}

/// The clipped surrogate `min(x*A, clip(x)*A)` and whether the clipped term is the active one
/// (strictly smaller).
fn clipped_surrogate(x: f64, a: f64, lo: f64, hi: f64) -> (f64, bool) {
    let unclipped = x * a;
    let clipped = x.clamp(lo, hi) * a;
    if clipped < unclipped {
        (clipped, true)
    } else {
        (unclipped, false)
    }
}

/// The correction weight of every position (`[B, T]`; meaningful where masked).
fn correction_weights(o: &Objective, b: &TokenBatch<'_>) -> Vec<f64> {
    let rho = |p: usize| ((b.old_logprobs[p] - b.behaviour_logprobs[p]) as f64).exp();
    let n = b.batch * b.width;
    match o.correction {
        Correction::None => vec![1.0; n],
        Correction::Tis => (0..n).map(|p| rho(p).min(o.tis_cap)).collect(),
        Correction::Icepop => (0..n)
            .map(|p| {
                let r = rho(p);
                if (o.icepop_low..=o.icepop_high).contains(&r) {
                    r
                } else {
                    0.0
                }
            })
            .collect(),
        Correction::SeqMaskTis => {
            let mut w = vec![0.0; n];
            for i in 0..b.batch {
                let row = i * b.width..(i + 1) * b.width;
                let (sum, count) =
                    row.clone()
                        .filter(|&p| b.mask[p])
                        .fold((0.0, 0usize), |acc, p| {
                            (
                                acc.0 + (b.old_logprobs[p] - b.behaviour_logprobs[p]) as f64,
                                acc.1 + 1,
                            )
                        });
                let geometric_mean = if count == 0 {
                    1.0
                } else {
                    (sum / count as f64).exp()
                };
                if (o.icepop_low..=o.icepop_high).contains(&geometric_mean) {
                    for p in row {
                        w[p] = rho(p).min(o.tis_cap);
                    }
                }
            }
            w
        }
    }
}

/// What a batch's aggregation divides by. A part of a batch (the sequences of one forward
/// pass) evaluated with its whole batch's totals ([`evaluate_part`]) gets that batch's
/// coefficients, so the parts' losses and gradients add up to the batch's exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchTotals {
    /// Sequences (`B`).
    pub sequences: usize,
    /// Sequences with at least one masked position.
    pub sequences_in_loss: usize,
    /// Masked positions.
    pub masked: usize,
    /// Positions per sequence (`T`, the default `norm_length`).
    pub width: usize,
}

impl BatchTotals {
    /// The totals of `batch` itself.
    pub fn of(batch: &TokenBatch<'_>) -> Self {
        let rows = batch.mask.chunks(batch.width.max(1));
        Self {
            sequences: batch.batch,
            sequences_in_loss: rows.filter(|row| row.iter().any(|&m| m)).count(),
            masked: batch.mask.iter().filter(|&&m| m).count(),
            width: batch.width,
        }
    }
}

/// The aggregation coefficient of every position: the loss is `sum(c * loss)`.
fn aggregation_coefficients(o: &Objective, b: &TokenBatch<'_>, totals: &BatchTotals) -> Vec<f64> {
    let n = b.batch * b.width;
    let masked = |p: usize| if b.mask[p] { 1.0 } else { 0.0 };
    match o.aggregation {
        Aggregation::TokenMean => {
            let total = totals.masked;
            let scale = if total == 0 { 0.0 } else { 1.0 / total as f64 };
            (0..n).map(|p| masked(p) * scale).collect()
        }
        Aggregation::SeqMeanTokenMean => {
            let counts: Vec<usize> = (0..b.batch)
                .map(|i| {
                    b.mask[i * b.width..(i + 1) * b.width]
                        .iter()
                        .filter(|&&m| m)
                        .count()
                })
                .collect();
            let sequences = totals.sequences_in_loss;
            (0..n)
                .map(|p| {
                    let c = counts[p / b.width.max(1)];
                    if c == 0 {
                        0.0
                    } else {
                        masked(p) / (c as f64 * sequences as f64)
                    }
                })
                .collect()
        }
        Aggregation::SeqMeanTokenSumNorm => {
            let length = o.norm_length.map_or(totals.width, |l| l as usize).max(1);
            let scale = 1.0 / (totals.sequences.max(1) as f64 * length as f64);
            (0..n).map(|p| masked(p) * scale).collect()
        }
    }
}

/// The loss of `objective` on `batch` and its gradient with respect to `batch.logprobs`.
pub fn evaluate(objective: &Objective, batch: &TokenBatch<'_>) -> Result<Evaluation, BatchError> {
    evaluate_part(objective, batch, &BatchTotals::of(batch))
}

/// [`evaluate`] on `part`, a part of a batch whose [`BatchTotals`] are `totals`: its share of
/// the batch's loss and the batch loss's gradient with respect to `part.logprobs` (every term
/// but the aggregation is per token or per sequence). The statistics (`clip_fraction`,
/// `mean_weight`, `kl`) are over the part's own masked tokens.
pub fn evaluate_part(
    objective: &Objective,
    part: &TokenBatch<'_>,
    totals: &BatchTotals,
) -> Result<Evaluation, BatchError> {
    let batch = part;
    batch.validate(objective)?;
    if totals.width < batch.width {
        return Err(BatchError(format!(
            "a part {} positions wide cannot belong to a batch {} wide",
            batch.width, totals.width
        )));
    }
    let (bsz, width) = (batch.batch, batch.width);
    let n = bsz * width;
    let o = objective;
    let w = correction_weights(o, batch);
    let c = aggregation_coefficients(o, batch, totals);
    let (lo, hi) = (1.0 - o.eps_low, 1.0 + o.eps_high);
    let lp = |p: usize| batch.logprobs[p] as f64;
    let old = |p: usize| batch.old_logprobs[p] as f64;

    // Per position: the objective `o`, and the objective's part of `d loss / d lp`.
    let mut value = vec![0.0f64; n];
    let mut grad = vec![0.0f64; n];
    let mut clipped_tokens = 0usize;
    for i in 0..bsz {
        let a = batch.advantages[i] as f64;
        let row = i * width..(i + 1) * width;
        if o.algorithm == Algorithm::Gspo {
            let masked: Vec<usize> = row.filter(|&p| batch.mask[p]).collect();
            if masked.is_empty() {
                continue;
            }
            let k = masked.len() as f64;
            let s = (masked.iter().map(|&p| lp(p) - old(p)).sum::<f64>() / k).exp();
            let mean_w = masked.iter().map(|&p| w[p]).sum::<f64>() / k;
            let (surrogate, clipped) = clipped_surrogate(s, a, lo, hi);
            // Every masked token carries the sequence's value, so the loss holds it with the
            // summed coefficient of those tokens; d s / d lp_t = s / k.
            let weight: f64 = masked.iter().map(|&p| c[p]).sum();
            for &p in &masked {
                value[p] = mean_w * surrogate;
                if !clipped {
                    grad[p] = -weight * mean_w * a * s / k;
                }
            }
            if clipped {
                clipped_tokens += masked.len();
            }
            continue;
        }
        for p in row.filter(|&p| batch.mask[p]) {
            let r = (lp(p) - old(p)).exp();
            match o.algorithm {
                Algorithm::Grpo | Algorithm::Dapo | Algorithm::DrGrpo => {
                    let (surrogate, clipped) = clipped_surrogate(r, a, lo, hi);
                    value[p] = w[p] * surrogate;
                    if clipped {
                        clipped_tokens += 1;
                    } else {
                        grad[p] = -c[p] * w[p] * a * r;
                    }
                }
                Algorithm::Cispo => {
                    let weight = r.clamp(lo, hi);
                    if weight != r {
                        clipped_tokens += 1;
                    }
                    value[p] = w[p] * weight * a * lp(p);
                    grad[p] = -c[p] * w[p] * weight * a;
                }
                Algorithm::Reinforce => {
                    value[p] = w[p] * a * lp(p);
                    grad[p] = -c[p] * w[p] * a;
                }
                Algorithm::Gspo => unreachable!("handled per sequence above"),
            }
        }
    }

    let mut loss = 0.0f64;
    let mut grad_logprobs = vec![0.0f32; n];
    let mut kl_sum = 0.0f64;
    let tokens = batch.mask.iter().filter(|&&m| m).count();
    for p in (0..n).filter(|&p| batch.mask[p]) {
        let (kl, dkl) = match batch.ref_logprobs {
            Some(reference) => {
                let x = reference[p] as f64 - lp(p);
                match o.kl_estimator {
                    KlEstimator::K1 => (-x, 1.0),
                    KlEstimator::K3 => (x.exp() - x - 1.0, 1.0 - x.exp()),
                }
            }
            None => (0.0, 0.0),
        };
        kl_sum += match batch.ref_logprobs {
            Some(_) => kl,
            None => {
                let x = batch.behaviour_logprobs[p] as f64 - old(p);
                x.exp() - x - 1.0
            }
        };
        loss += c[p] * (-value[p] + o.kl_coef * kl);
        grad_logprobs[p] = (grad[p] + c[p] * o.kl_coef * dkl) as f32;
    }
    let per_token = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };
    Ok(Evaluation {
        loss,
        grad_logprobs,
        clip_fraction: per_token(clipped_tokens as f64),
        mean_weight: per_token((0..n).filter(|&p| batch.mask[p]).map(|p| w[p]).sum()),
        kl: per_token(kl_sum),
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch owning its arrays; `old` defaults to `lp` and `beh` to `old`.
    #[derive(Clone)]
    struct Case {
        width: usize,
        lp: Vec<f32>,
        old: Vec<f32>,
        beh: Vec<f32>,
        adv: Vec<f32>,
        mask: Vec<bool>,
        reference: Option<Vec<f32>>,
    }

    impl Case {
        fn new(width: usize, lp: &[f32], adv: &[f32]) -> Self {
            Self {
                width,
                lp: lp.to_vec(),
                old: lp.to_vec(),
                beh: lp.to_vec(),
                adv: adv.to_vec(),
                mask: vec![true; lp.len()],
                reference: None,
            }
        }

        fn run(&self, o: &Objective) -> Evaluation {
            evaluate(
                o,
                &TokenBatch {
                    batch: self.adv.len(),
                    width: self.width,
                    logprobs: &self.lp,
                    old_logprobs: &self.old,
                    behaviour_logprobs: &self.beh,
                    advantages: &self.adv,
                    mask: &self.mask,
                    ref_logprobs: self.reference.as_deref(),
                },
            )
            .expect("valid batch")
        }
    }

    fn objective(settings: &[(&str, &str)]) -> Objective {
        let mut o = Objective::default();
        for (k, v) in settings {
            o.set(k, v).expect("valid setting");
        }
        o
    }

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-5, "got {got}, want {want}");
    }

    fn close_all(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "got {got:?}, want {want:?}");
        }
    }

    /// `lp = old + ln(ratio)` for each ratio.
    fn with_ratios(old: &[f32], ratios: &[f64]) -> Vec<f32> {
        old.iter()
            .zip(ratios)
            .map(|(o, r)| (*o as f64 + r.ln()) as f32)
            .collect()
    }

    #[test]
    fn grpo_clips_the_side_the_advantage_points_to() {
        let o = objective(&[("algorithm", "grpo")]);
        let old = [-1.0f32, -2.0];
        let mut case = Case::new(2, &old, &[1.0]);
        case.lp = with_ratios(&old, &[1.5, 0.9]);
        // A = 1: r = 1.5 is clipped to 1.2 (no gradient), r = 0.9 is inside the range.
        let e = case.run(&o);
        close(e.loss, -(1.2 + 0.9) / 2.0);
        close_all(&e.grad_logprobs, &[0.0, -0.5 * 0.9]);
        close(e.clip_fraction, 0.5);
        // A = -1: min(-1.5, -1.2) is the unclipped term; r = 0.9 ties and keeps its gradient.
        case.adv = vec![-1.0];
        let e = case.run(&o);
        close(e.loss, (1.5 + 0.9) / 2.0);
        close_all(&e.grad_logprobs, &[0.5 * 1.5, 0.5 * 0.9]);
        close(e.clip_fraction, 0.0);
        // A = -1 and r = 0.5: clipped at 0.8 from below.
        case.lp = with_ratios(&old, &[0.5, 1.0]);
        let e = case.run(&o);
        close(e.loss, (0.8 + 1.0) / 2.0);
        close_all(&e.grad_logprobs, &[0.0, 0.5]);
    }

    #[test]
    fn the_three_aggregations_weigh_sequences_as_defined() {
        // Ratio 1 everywhere; sequence 0 has two tokens (A = 1), sequence 1 one (A = -1).
        let mut case = Case::new(2, &[-1.0, -1.0, -1.0, -1.0], &[1.0, -1.0]);
        case.mask = vec![true, true, true, false];
        let e = case.run(&objective(&[("algorithm", "dapo")]));
        close(e.loss, -(1.0 + 1.0 - 1.0) / 3.0);
        close_all(&e.grad_logprobs, &[-1.0 / 3.0, -1.0 / 3.0, 1.0 / 3.0, 0.0]);
        let e = case.run(&objective(&[("algorithm", "grpo")]));
        close(e.loss, -((1.0 + 1.0) / 2.0 - 1.0) / 2.0);
        close_all(&e.grad_logprobs, &[-0.25, -0.25, 0.5, 0.0]);
        let e = case.run(&objective(&[("algorithm", "dr_grpo")]));
        close(e.loss, -(1.0 + 1.0 - 1.0) / (2.0 * 2.0));
        close_all(&e.grad_logprobs, &[-0.25, -0.25, 0.25, 0.0]);
        let e = case.run(&objective(&[
            ("algorithm", "dr_grpo"),
            ("norm_length", "4"),
        ]));
        close(e.loss, -1.0 / 8.0);
        // A sequence with no masked token is left out of the sequence mean.
        case.mask = vec![true, true, false, false];
        let e = case.run(&objective(&[("algorithm", "grpo")]));
        close(e.loss, -1.0);
        close_all(&e.grad_logprobs, &[-0.5, -0.5, 0.0, 0.0]);
    }

    #[test]
    fn corrections_weigh_tokens_by_the_samplers_mismatch() {
        let old = [-1.0f32, -1.0, -1.0, -1.0];
        let mut case = Case::new(2, &old, &[1.0, 1.0]);
        // rho = old / beh: 8 and 1.5 in sequence 0, e^0.1 and e^2 in sequence 1.
        case.beh = vec![-1.0 - 8f32.ln(), -1.0 - 1.5f32.ln(), -1.0 - 0.1, -1.0 - 2.0];
        let rho = [8.0, 1.5, 0.1f64.exp(), 2.0f64.exp()];
        let dapo = [("algorithm", "dapo")];
        let e = case.run(&objective(&[dapo[0], ("correction", "none")]));
        close(e.loss, -1.0);
        let tis: Vec<f64> = rho.iter().map(|r| r.min(5.0)).collect();
        let e = case.run(&objective(&[dapo[0], ("correction", "tis")]));
        close(e.loss, -tis.iter().sum::<f64>() / 4.0);
        close_all(
            &e.grad_logprobs,
            &tis.iter().map(|w| -w / 4.0).collect::<Vec<_>>(),
        );
        close(e.mean_weight, tis.iter().sum::<f64>() / 4.0);
        let icepop: Vec<f64> = rho
            .iter()
            .map(|&r| if (0.5..=2.0).contains(&r) { r } else { 0.0 })
            .collect();
        let e = case.run(&objective(&[dapo[0], ("correction", "icepop")]));
        close(e.loss, -icepop.iter().sum::<f64>() / 4.0);
        close_all(
            &e.grad_logprobs,
            &icepop.iter().map(|w| -w / 4.0).collect::<Vec<_>>(),
        );
        // Geometric means: sqrt(12) = 3.46 (outside [0.5, 2]) and e^1.05 = 2.86 (outside).
        let e = case.run(&objective(&[dapo[0], ("correction", "seq_mask_tis")]));
        close(e.loss, 0.0);
        // With the upper bound at 4, sequence 0 stays masked and sequence 1 is kept.
        let e = case.run(&objective(&[
            dapo[0],
            ("correction", "seq_mask_tis"),
            ("icepop_high", "3"),
        ]));
        let kept = [0.0, 0.0, rho[2], rho[3].min(5.0)];
        close(e.loss, -kept.iter().sum::<f64>() / 4.0);
        close_all(
            &e.grad_logprobs,
            &kept.iter().map(|w| -w / 4.0).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn cispo_and_reinforce_differentiate_the_log_probability() {
        let old = [-1.0f32];
        let mut case = Case::new(1, &old, &[2.0]);
        case.lp = with_ratios(&old, &[1.5]);
        let lp = case.lp[0] as f64;
        let e = case.run(&objective(&[
            ("algorithm", "cispo"),
            ("eps_low", "0.2"),
            ("eps_high", "0.28"),
        ]));
        close(e.loss, -(1.28 * 2.0 * lp));
        close_all(&e.grad_logprobs, &[-1.28 * 2.0]);
        close(e.clip_fraction, 1.0);
        let e = case.run(&objective(&[("algorithm", "reinforce")]));
        close(e.loss, -(2.0 * lp));
        close_all(&e.grad_logprobs, &[-2.0]);
    }

    #[test]
    fn gspo_clips_the_sequence_ratio() {
        let old = [-1.0f32, -2.0];
        let mut case = Case::new(2, &old, &[1.0]);
        case.lp = vec![-0.9, -2.3];
        let s = (-0.1f64).exp();
        let o = objective(&[("algorithm", "gspo")]);
        // A = 1: s = e^-0.1 lies below the range, so min(s, clip(s)) is s itself.
        let e = case.run(&o);
        close(e.loss, -s);
        close_all(&e.grad_logprobs, &[-s / 2.0, -s / 2.0]);
        // A = -1: the clipped term (-(1 - 3e-4)) is the smaller one: no gradient.
        case.adv = vec![-1.0];
        let e = case.run(&o);
        close(e.loss, 1.0 - 3e-4);
        close_all(&e.grad_logprobs, &[0.0, 0.0]);
        close(e.clip_fraction, 1.0);
    }

    #[test]
    fn kl_estimators_add_their_penalty() {
        let mut case = Case::new(1, &[-1.0], &[0.0]);
        case.reference = Some(vec![-1.5]);
        let e = case.run(&objective(&[
            ("algorithm", "reinforce"),
            ("kl_coef", "0.1"),
            ("kl_estimator", "k1"),
        ]));
        close(e.loss, 0.1 * 0.5);
        close_all(&e.grad_logprobs, &[0.1]);
        let e = case.run(&objective(&[
            ("algorithm", "reinforce"),
            ("kl_coef", "0.1"),
        ]));
        let x = -0.5f64;
        close(e.loss, 0.1 * (x.exp() - x - 1.0));
        close_all(&e.grad_logprobs, &[0.1 * (1.0 - x.exp())]);
        close(e.kl, x.exp() - x - 1.0);
        case.reference = None;
        let missing = evaluate(
            &objective(&[("kl_coef", "0.1")]),
            &TokenBatch {
                batch: 1,
                width: 1,
                logprobs: &case.lp,
                old_logprobs: &case.old,
                behaviour_logprobs: &case.beh,
                advantages: &case.adv,
                mask: &case.mask,
                ref_logprobs: None,
            },
        );
        assert!(missing.expect_err("needs ref").0.contains("ref_logprobs"));
    }

    #[test]
    fn masked_positions_neither_count_nor_poison() {
        let mut case = Case::new(2, &[-1.0, f32::NAN], &[1.0]);
        case.mask = vec![true, false];
        for a in Algorithm::NAMES {
            let e = case.run(&objective(&[("algorithm", a), ("correction", "tis")]));
            assert!(e.loss.is_finite(), "{a}: {e:?}");
            assert_eq!(e.grad_logprobs[1], 0.0, "{a}");
            assert_eq!(e.tokens, 1);
        }
    }

    /// Uniform numbers in [0, 1) from a xorshift generator seeded with `state`.
    fn uniform_from(mut state: u64) -> impl FnMut() -> f64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// The learner evaluates a batch one forward pass at a time: each pass's rows, cut to the
    /// pass's own width, with the whole batch's totals. Their losses and gradients must add up
    /// to the whole batch's, for every setting, an empty sequence and a narrow part included.
    #[test]
    fn a_batch_evaluated_in_parts_adds_up_to_the_whole() {
        let (b, t) = (4usize, 5usize);
        let mut uniform = uniform_from(0x9e37_79b9_7f4a_7c15);
        let old: Vec<f32> = (0..b * t).map(|_| (-3.0 * uniform()) as f32).collect();
        let mut case = Case::new(t, &old, &[1.3, -0.7, 0.4, 2.0]);
        let mut jitter = |scale: f64| -> Vec<f32> {
            old.iter()
                .map(|o| o + (scale * uniform() - scale / 2.0) as f32)
                .collect()
        };
        case.lp = jitter(0.8);
        case.beh = jitter(1.2);
        case.reference = Some(jitter(0.5));
        // Row 0 is short (3 positions), row 3 has nothing in the loss.
        case.mask = (0..b * t)
            .map(|p| match p / t {
                0 => p % t < 3,
                3 => false,
                _ => p % 4 != 3,
            })
            .collect();
        let whole_batch = TokenBatch {
            batch: b,
            width: t,
            logprobs: &case.lp,
            old_logprobs: &case.old,
            behaviour_logprobs: &case.beh,
            advantages: &case.adv,
            mask: &case.mask,
            ref_logprobs: case.reference.as_deref(),
        };
        let totals = BatchTotals::of(&whole_batch);
        assert_eq!((totals.sequences, totals.sequences_in_loss), (4, 3));
        // (rows, width): row 0 alone at its own width, rows 1-3 at the batch's.
        let parts = [(0..1, 3usize), (1..4, t)];
        let cut = |v: &[f32], rows: &std::ops::Range<usize>, w: usize| -> Vec<f32> {
            rows.clone()
                .flat_map(|i| v[i * t..i * t + w].to_vec())
                .collect()
        };
        for algorithm in Algorithm::NAMES {
            for correction in Correction::NAMES {
                for aggregation in Aggregation::NAMES {
                    let o = objective(&[
                        ("algorithm", algorithm),
                        ("correction", correction),
                        ("aggregation", aggregation),
                        ("kl_coef", "0.3"),
                        ("icepop_low", "0.7"),
                        ("icepop_high", "1.4"),
                    ]);
                    let whole = evaluate(&o, &whole_batch).unwrap();
                    let (mut loss, mut kl, mut tokens) = (0.0, 0.0, 0);
                    for (rows, w) in &parts {
                        let lp = cut(&case.lp, rows, *w);
                        let old = cut(&case.old, rows, *w);
                        let beh = cut(&case.beh, rows, *w);
                        let reference = cut(case.reference.as_ref().unwrap(), rows, *w);
                        let mask: Vec<bool> = rows
                            .clone()
                            .flat_map(|i| case.mask[i * t..i * t + w].to_vec())
                            .collect();
                        let part = evaluate_part(
                            &o,
                            &TokenBatch {
                                batch: rows.len(),
                                width: *w,
                                logprobs: &lp,
                                old_logprobs: &old,
                                behaviour_logprobs: &beh,
                                advantages: &case.adv[rows.clone()],
                                mask: &mask,
                                ref_logprobs: Some(&reference),
                            },
                            &totals,
                        )
                        .unwrap();
                        loss += part.loss;
                        kl += part.kl * part.tokens as f64;
                        tokens += part.tokens;
                        for (r, i) in rows.clone().enumerate() {
                            for j in 0..*w {
                                let (got, want) = (
                                    part.grad_logprobs[r * w + j],
                                    whole.grad_logprobs[i * t + j],
                                );
                                assert!(
                                    (got - want).abs() <= 1e-6,
                                    "{algorithm}/{correction}/{aggregation} [{i}, {j}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                    let setting = format!("{algorithm}/{correction}/{aggregation}");
                    assert!(
                        (loss - whole.loss).abs() < 1e-9,
                        "{setting}: {loss} vs {}",
                        whole.loss
                    );
                    assert_eq!(tokens, whole.tokens, "{setting}");
                    assert!((kl / tokens as f64 - whole.kl).abs() < 1e-9, "{setting}");
                }
            }
        }
        let too_wide = TokenBatch {
            width: t + 1,
            batch: 0,
            logprobs: &[],
            old_logprobs: &[],
            behaviour_logprobs: &[],
            advantages: &[],
            mask: &[],
            ref_logprobs: None,
        };
        let e = evaluate_part(&Objective::default(), &too_wide, &totals).unwrap_err();
        assert!(e.0.contains("cannot belong"), "{e:?}");
    }

    #[test]
    fn gradients_match_finite_differences_for_every_setting() {
        // A small pseudo-random batch; ratios spread over and beyond every clip range.
        let (b, t) = (3usize, 5usize);
        let mut uniform = uniform_from(0x2545_f491_4f6c_dd1d);
        let old: Vec<f32> = (0..b * t).map(|_| (-3.0 * uniform()) as f32).collect();
        let mut case = Case::new(t, &old, &[1.3, -0.7, 0.4]);
        case.lp = old
            .iter()
            .map(|o| o + (0.8 * uniform() - 0.4) as f32)
            .collect();
        case.beh = old
            .iter()
            .map(|o| o + (1.2 * uniform() - 0.6) as f32)
            .collect();
        case.reference = Some(
            old.iter()
                .map(|o| o + (0.5 * uniform() - 0.25) as f32)
                .collect(),
        );
        case.mask = (0..b * t).map(|p| p % 4 != 3).collect();
        for algorithm in Algorithm::NAMES {
            for correction in Correction::NAMES {
                for aggregation in Aggregation::NAMES {
                    for estimator in KlEstimator::NAMES {
                        let mut o = objective(&[
                            ("algorithm", algorithm),
                            ("correction", correction),
                            ("aggregation", aggregation),
                            ("kl_coef", "0.3"),
                            ("kl_estimator", estimator),
                            ("icepop_low", "0.7"),
                            ("icepop_high", "1.4"),
                        ]);
                        if *algorithm == "gspo" {
                            // Wide enough that some sequences are inside the range.
                            o.set("eps_low", "0.2").unwrap();
                            o.set("eps_high", "0.2").unwrap();
                        }
                        let e = case.run(&o);
                        for p in 0..b * t {
                            let h = 1e-3f32;
                            // CISPO's weight is a stop-gradient: its derivative holds r and
                            // rho fixed, so `old` and `beh` move with `lp`.
                            let shift = |c: &mut Case, d: f32| {
                                c.lp[p] += d;
                                if *algorithm == "cispo" {
                                    c.old[p] += d;
                                    c.beh[p] += d;
                                }
                            };
                            let mut plus = case.clone();
                            shift(&mut plus, h);
                            let mut minus = case.clone();
                            shift(&mut minus, -h);
                            let numeric =
                                (plus.run(&o).loss - minus.run(&o).loss) / (2.0 * h as f64);
                            let analytic = e.grad_logprobs[p] as f64;
                            assert!(
                                (numeric - analytic).abs() < 2e-3,
                                "{algorithm}/{correction}/{aggregation}/{estimator} position {p}: \
                                 numeric {numeric}, analytic {analytic}"
                            );
                        }
                    }
                }
            }
        }
    }
}
