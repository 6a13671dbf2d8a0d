//! The learner's objectives over a batch of sequences: a GRPO-family clipped surrogate with the
//! importance ratio against the rollout worker's log-probabilities, and supervised (SFT)
//! next-token cross-entropy on reference solutions.

use candle_core::{D, Device, Tensor};
use chorus_model::NemotronH;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result, config_err};

/// How per-token losses are averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean over all completion tokens of the batch (long answers weigh more; DAPO, Nemotron).
    TokenMean,
    /// Mean over each sequence's tokens, then over sequences (GRPO as published).
    SeqMean,
}

/// GRPO-family settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Lower clip: the ratio may fall to `1 - eps_low` before the surrogate stops rewarding it.
    pub eps_low: f64,
    /// Upper clip ("clip-higher"): `1 + eps_high`.
    pub eps_high: f64,
    /// Truncated importance sampling: for tokens sampled by an older policy version than the
    /// learner's, the ratio is capped at this value.
    pub tis_cap: f64,
    /// Weight of the k3 KL estimate to the reference policy (0 = off).
    pub kl_coef: f64,
    /// How token terms are averaged into the loss.
    pub aggregation: Aggregation,
}

impl Default for GrpoConfig {
    /// Nemotron 3's RLVR settings: eps 0.2 / 0.28, TIS cap 5, no KL, token-level averaging.
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.28,
            tis_cap: 5.0,
            kl_coef: 0.0,
            aggregation: Aggregation::TokenMean,
        }
    }
}

impl GrpoConfig {
    /// Checks every setting's range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.eps_low) {
            return Err(config_err(
                "eps_low",
                format!("must be in [0, 1), got {}", self.eps_low),
            ));
        }
        if self.eps_high < 0.0 {
            return Err(config_err(
                "eps_high",
                format!("must be >= 0, got {}", self.eps_high),
            ));
        }
        if self.tis_cap < 1.0 {
            return Err(config_err(
                "tis_cap",
                format!("must be >= 1, got {}", self.tis_cap),
            ));
        }
        if self.kl_coef < 0.0 {
            return Err(config_err(
                "kl_coef",
                format!("must be >= 0, got {}", self.kl_coef),
            ));
        }
        Ok(())
    }
}

/// One sampled sequence: prompt then completion, with what the rollout worker recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct RlSequence {
    /// Prompt and completion token ids.
    pub tokens: Vec<u32>,
    /// Number of prompt tokens; the completion follows.
    pub prompt_len: usize,
    /// The worker's log-probability of each completion token.
    pub behavior_logprobs: Vec<f32>,
    /// The policy version that produced each completion token.
    pub versions: Vec<u64>,
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
    /// k3 estimate of KL to the reference policy, or to the behaviour policy when no reference.
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

fn masked_mean(x: &Tensor, mask: &Tensor, agg: Aggregation) -> Result<Tensor> {
    Ok(match agg {
        Aggregation::TokenMean => {
            ((x * mask)?.sum_all()? / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?
        }
        Aggregation::SeqMean => {
            let per_row = (x * mask)?.sum(1)?;
            let counts = mask.sum(1)?;
            let rows_with_tokens = counts.ge(1f32)?.to_dtype(x.dtype())?;
            let row_mean = (per_row / counts.maximum(1f32)?)?;
            let n = rows_with_tokens.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
            ((row_mean * rows_with_tokens)?.sum_all()? / n)?
        }
    })
}

fn entropy(logp: &Tensor, mask: &Tensor) -> Result<f64> {
    let logp = logp.detach();
    let h = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
    Ok(masked_mean(&h, mask, Aggregation::TokenMean)?.to_scalar::<f32>()? as f64)
}

/// The GRPO-family loss of `batch` under `model` at learner version `version`, with statistics.
///
/// Per completion token with advantage `A`, ratio `r = π(a)/μ(a)` against the worker's
/// log-probability μ, truncated to `min(r, tis_cap)` for tokens of an older policy version:
/// `−min(r·A, clip(r, 1−eps_low, 1+eps_high)·A)`, plus `kl_coef · k3(π_ref ‖ π)` when a
/// reference is given; averaged per [`Aggregation`].
pub fn grpo_loss(
    model: &NemotronH,
    batch: &[RlSequence],
    version: u64,
    cfg: &GrpoConfig,
) -> Result<(Tensor, LossStats)> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let (b, w) = (batch.len(), l.width);
    let mut behav = vec![0f32; b * w];
    let mut stale = vec![0f32; b * w];
    let mut adv = vec![0f32; b * w];
    let mut reference = vec![0f32; b * w];
    let with_ref = cfg.kl_coef > 0.0;
    for (i, s) in batch.iter().enumerate() {
        let n = s.tokens.len() - s.prompt_len;
        if s.behavior_logprobs.len() != n || s.versions.len() != n {
            return Err(LearnerError::Batch(format!(
                "sequence {i}: {n} completion tokens but {} logprobs and {} versions",
                s.behavior_logprobs.len(),
                s.versions.len()
            )));
        }
        if with_ref && s.ref_logprobs.as_ref().map(|r| r.len()) != Some(n) {
            return Err(LearnerError::Batch(format!(
                "sequence {i}: kl_coef > 0 needs one reference logprob per completion token"
            )));
        }
        for j in 0..n {
            let p = i * w + s.prompt_len - 1 + j;
            behav[p] = s.behavior_logprobs[j];
            stale[p] = if s.versions[j] < version { 1.0 } else { 0.0 };
            adv[p] = s.advantage;
            if let Some(r) = &s.ref_logprobs {
                reference[p] = r[j];
            }
        }
    }
    let t = |v: Vec<f32>| Tensor::from_vec(v, (b, w), &device);
    let (mask, behav, stale, adv) = (t(l.mask.clone())?, t(behav)?, t(stale)?, t(adv)?);
    let (lp, logp) = token_logprobs(model, &l)?;
    let lp_masked = (&lp * &mask)?;

    let ratio = (&lp_masked - &behav)?.exp()?;
    let ratio = (&ratio - (&stale * (&ratio - cfg.tis_cap)?.relu()?)?)?;
    let surrogate = (&ratio * &adv)?;
    let clipped = (ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)? * &adv)?;
    let objective = surrogate.minimum(&clipped)?;
    let mut per_token = objective.neg()?;
    let kl_tensor = if with_ref {
        let d = (t(reference)? - &lp_masked)?;
        (d.exp()? - d)? - 1.0
    } else {
        let d = (&behav - &lp_masked)?.detach();
        (d.exp()? - d)? - 1.0
    }?;
    if with_ref {
        per_token = (per_token + (&kl_tensor * cfg.kl_coef)?)?;
    }
    let loss = masked_mean(&per_token, &mask, cfg.aggregation)?;

    let clip_active = surrogate.gt(&clipped)?.to_dtype(candle_core::DType::F32)?;
    let mean = |x: &Tensor| -> Result<f64> {
        Ok(masked_mean(&x.detach(), &mask, Aggregation::TokenMean)?.to_scalar::<f32>()? as f64)
    };
    let stats = LossStats {
        loss: loss.to_scalar::<f32>()? as f64,
        kl: mean(&kl_tensor)?,
        entropy: entropy(&logp, &mask)?,
        clip_fraction: mean(&clip_active)?,
        mean_abs_logprob_diff: mean(&(&lp_masked - &behav)?.abs()?)?,
        tokens: l.mask.iter().filter(|&&m| m > 0.0).count(),
    };
    Ok((loss, stats))
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
    let loss = masked_mean(&lp.neg()?, &mask, Aggregation::TokenMean)?;
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
