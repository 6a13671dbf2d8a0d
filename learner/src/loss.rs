//! The learner's losses over a batch of sequences under the policy: the RL objective of a
//! stage (evaluated by [`crate::objective`] on the policy's log-probabilities) and supervised
//! (SFT) next-token cross-entropy on reference solutions.

use candle_core::{D, Device, Tensor};
use chorus_model::NemotronH;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use crate::objective::{Objective, TokenBatch, evaluate};

/// One sampled sequence: prompt then completion, with what the rollout worker recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct RlSequence {
    /// Prompt and completion token ids.
    pub tokens: Vec<u32>,
    /// Number of prompt tokens; the completion follows.
    pub prompt_len: usize,
    /// The worker's log-probability of each completion token.
    pub behavior_logprobs: Vec<f32>,
    /// The sequence's advantage (group-normalised reward).
    pub advantage: f32,
    /// The reference policy's log-probability of each completion token, when KL is on.
    pub ref_logprobs: Option<Vec<f32>>,
    /// Which completion tokens the loss applies to (the policy's own tokens of a multi-turn
    /// episode, not the observations between them); `None` means all of them.
    pub loss_mask: Option<Vec<bool>>,
}

/// One supervised example: only the completion is learned.
#[derive(Clone, Debug, PartialEq)]
pub struct SftSequence {
    /// Prompt followed by completion.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt.
    pub prompt_len: usize,
    /// Which completion tokens are learned; `None` means all of them.
    pub loss_mask: Option<Vec<bool>>,
}

/// Statistics of an objective over a batch (all means over completion tokens unless noted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    /// The objective's value.
    pub loss: f64,
    /// KL estimate to the reference policy, or k3 between the sampler and the learner when
    /// there is no reference.
    pub kl: f64,
    /// Mean entropy of the learner's next-token distribution.
    pub entropy: f64,
    /// Fraction of tokens whose clipped term was the active one.
    pub clip_fraction: f64,
    /// Mean |log π_learner − log π_worker|: how far the learner's view of the samples is from the
    /// worker's (staleness plus numerical mismatch).
    pub mean_abs_logprob_diff: f64,
    /// Completion tokens the statistics are over.
    pub tokens: usize,
}

/// Dense per-position tensors for a padded batch; position `p` predicts token `p + 1`.
struct Layout {
    ids: Tensor,
    targets: Tensor,
    mask: Vec<f32>,
    width: usize,
}

/// One sequence as [`layout`] sees it: tokens, prompt length, optional completion mask.
type SeqView<'a> = (&'a [u32], usize, Option<&'a [bool]>);

fn layout(seqs: &[SeqView<'_>], vocab: usize, device: &Device) -> Result<Layout> {
    let t = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
    if t < 2 {
        return Err(LearnerError::Batch(
            "every sequence needs a prompt token and at least one completion token".into(),
        ));
    }
    let width = t - 1;
    let mut ids = vec![0u32; seqs.len() * t];
    let mut mask = vec![0f32; seqs.len() * width];
    for (b, (tokens, prompt_len, loss_mask)) in seqs.iter().enumerate() {
        if *prompt_len == 0 || *prompt_len >= tokens.len() {
            return Err(LearnerError::Batch(format!(
                "sequence {b}: prompt_len {prompt_len} must be in [1, {})",
                tokens.len()
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&x| x as usize >= vocab) {
            return Err(LearnerError::Batch(format!(
                "sequence {b}: token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let completion = tokens.len() - prompt_len;
        if let Some(m) = loss_mask
            && m.len() != completion
        {
            return Err(LearnerError::Batch(format!(
                "sequence {b}: {completion} completion tokens but a loss mask of {}",
                m.len()
            )));
        }
        ids[b * t..b * t + tokens.len()].copy_from_slice(tokens);
        for j in 0..completion {
            if loss_mask.is_none_or(|m| m[j]) {
                mask[b * width + prompt_len - 1 + j] = 1.0;
            }
        }
    }
    let ids = Tensor::from_vec(ids, (seqs.len(), t), device)?;
    let targets = ids.narrow(1, 1, width)?.contiguous()?;
    Ok(Layout {
        ids,
        targets,
        mask,
        width,
    })
}

/// Log-probabilities `[B, T-1]` of each next token, and the log-softmax `[B, T-1, V]`.
fn token_logprobs(model: &NemotronH, l: &Layout) -> Result<(Tensor, Tensor)> {
    let logits = model.forward(&l.ids)?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, l.width)?, D::Minus1)?;
    let lp = logp.gather(&l.targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    Ok((lp, logp))
}

/// Token mean of `x` over the positions where `mask` is 1.
fn token_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(((x * mask)?.sum_all()? / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?)
}

fn entropy(logp: &Tensor, mask: &Tensor) -> Result<f64> {
    let logp = logp.detach();
    let h = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
    Ok(token_mean(&h, mask)?.to_scalar::<f32>()? as f64)
}

/// The RL loss of `batch` under `model` for `objective`, with statistics.
///
/// Returns a surrogate whose gradient is the loss's (`sum(stopgrad(g) * lp)`, with `g` the
/// exact `d loss / d lp` of [`evaluate`]) and, in the statistics, the loss's value. One
/// optimizer step is taken per batch, so the learner's log-probabilities at the start of the
/// step (`old`) are the ones computed here, and the ratio `r = exp(lp - old)` is 1 in value;
/// the sampler's mismatch enters through the objective's correction (`rho = exp(old - beh)`).
pub fn rl_loss(
    model: &NemotronH,
    batch: &[RlSequence],
    objective: &Objective,
) -> Result<(Tensor, LossStats)> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let (b, w) = (batch.len(), l.width);
    let mut behaviour = vec![0f32; b * w];
    let mut reference = vec![0f32; b * w];
    let with_ref = objective.kl_coef > 0.0;
    for (i, s) in batch.iter().enumerate() {
        let n = s.tokens.len() - s.prompt_len;
        if s.behavior_logprobs.len() != n {
            return Err(LearnerError::Batch(format!(
                "sequence {i}: {n} completion tokens but {} logprobs",
                s.behavior_logprobs.len()
            )));
        }
        if with_ref && s.ref_logprobs.as_ref().map(|r| r.len()) != Some(n) {
            return Err(LearnerError::Batch(format!(
                "sequence {i}: kl_coef > 0 needs one reference logprob per completion token"
            )));
        }
        let first = i * w + s.prompt_len - 1;
        behaviour[first..first + n].copy_from_slice(&s.behavior_logprobs);
        if let Some(r) = &s.ref_logprobs {
            reference[first..first + n].copy_from_slice(r);
        }
    }
    let advantages: Vec<f32> = batch.iter().map(|s| s.advantage).collect();
    let mask: Vec<bool> = l.mask.iter().map(|&m| m > 0.0).collect();
    let (lp, logp) = token_logprobs(model, &l)?;
    let current: Vec<f32> = lp.detach().flatten_all()?.to_vec1()?;
    let evaluation = evaluate(
        objective,
        &TokenBatch {
            batch: b,
            width: w,
            logprobs: &current,
            old_logprobs: &current,
            behaviour_logprobs: &behaviour,
            advantages: &advantages,
            mask: &mask,
            ref_logprobs: with_ref.then_some(reference.as_slice()),
        },
    )
    .map_err(|e| LearnerError::Batch(e.0))?;
    let gradient = Tensor::from_vec(evaluation.grad_logprobs, (b, w), &device)?;
    let surrogate = (&lp * gradient)?.sum_all()?;
    let masked = mask.iter().filter(|&&m| m).count().max(1) as f64;
    let abs_diff: f64 = (0..b * w)
        .filter(|&p| mask[p])
        .map(|p| (current[p] - behaviour[p]).abs() as f64)
        .sum();
    let mask_tensor = Tensor::from_vec(l.mask.clone(), (b, w), &device)?;
    let stats = LossStats {
        loss: evaluation.loss,
        kl: evaluation.kl,
        entropy: entropy(&logp, &mask_tensor)?,
        clip_fraction: evaluation.clip_fraction,
        mean_abs_logprob_diff: abs_diff / masked,
        tokens: evaluation.tokens,
    };
    Ok((surrogate, stats))
}

/// Next-token cross-entropy on the completion tokens of `batch` (token mean).
pub fn sft_loss(model: &NemotronH, batch: &[SftSequence]) -> Result<(Tensor, LossStats)> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let mask = Tensor::from_vec(l.mask.clone(), (batch.len(), l.width), &device)?;
    let (lp, logp) = token_logprobs(model, &l)?;
    let loss = token_mean(&lp.neg()?, &mask)?;
    let stats = LossStats {
        loss: loss.to_scalar::<f32>()? as f64,
        entropy: entropy(&logp, &mask)?,
        tokens: l.mask.iter().filter(|&&m| m > 0.0).count(),
        ..LossStats::default()
    };
    Ok((loss, stats))
}

fn model_device(model: &NemotronH) -> Device {
    model.device().clone()
}
