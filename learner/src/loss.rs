//! The learner's losses over a batch of sequences under the policy: the RL objective of a
//! stage (evaluated by [`crate::objective`] on the policy's log-probabilities) and supervised
//! (SFT) next-token cross-entropy on reference solutions.

use candle_core::{D, Device, Tensor};
use chorus_model::{ExpertLoad, NemotronH};
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
    /// Token mean of the KL estimate to the reference policy (the objective's estimator) when
    /// the objective has a KL penalty; otherwise of k3 between the sampler and the learner.
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
    /// `[B, T]`: which positions of `ids` hold a real token rather than right padding.
    real: Vec<bool>,
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
    let mut real = vec![false; seqs.len() * t];
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
        real[b * t..b * t + tokens.len()].fill(true);
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
        real,
        width,
    })
}

/// Log-probabilities `[B, T-1]` of each next token, and the log-softmax `[B, T-1, V]`. With
/// `load`, the MoE blocks' routing of the batch's real tokens (padding left out) is added to it.
fn token_logprobs(
    model: &NemotronH,
    l: &Layout,
    load: Option<&mut ExpertLoad>,
) -> Result<(Tensor, Tensor)> {
    let logits = match load {
        Some(load) => model.forward_counting_experts(&l.ids, Some(&l.real), load)?,
        None => model.forward(&l.ids)?,
    };
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

/// The log-probability under `model` of each completion token of each sequence of `batch`
/// (masked or not), computed in the same length buckets and positions as [`rl_loss`]: what a
/// reference policy contributes to the KL penalty.
pub fn completion_logprobs(model: &NemotronH, batch: &[RlSequence]) -> Result<Vec<Vec<f32>>> {
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let mut out = vec![vec![]; batch.len()];
    for pass in bucketed_logprobs(model, &views, None)? {
        let rows: Vec<Vec<f32>> = pass.logprobs.detach().to_vec2()?;
        for (&i, row) in pass.rows.iter().zip(rows) {
            // Position `p` predicts token `p + 1`: the completion starts at `prompt_len - 1`.
            let s = &batch[i];
            let first = s.prompt_len - 1;
            out[i] = row[first..first + s.tokens.len() - s.prompt_len].to_vec();
        }
    }
    Ok(out)
}

/// One padded forward pass over a bucket of a batch's sequences of similar length.
struct BucketPass {
    /// The batch's indices of the bucket's sequences, in the pass's row order.
    rows: Vec<usize>,
    layout: Layout,
    /// `[rows, width]` log-probability of each next token (with gradient).
    logprobs: Tensor,
    /// `[rows, width, V]` log-softmax.
    log_softmax: Tensor,
}

/// [`token_logprobs`] of `seqs` in length buckets ([`length_buckets`]), one padded pass each:
/// a sequence's log-probabilities do not depend on the padding after it (every block is
/// causal), so this gives one padded pass's values without computing the padding. An RL batch
/// mixing short answers with long prompts otherwise pads every short one to the longest.
fn bucketed_logprobs(
    model: &NemotronH,
    seqs: &[SeqView<'_>],
    mut load: Option<&mut ExpertLoad>,
) -> Result<Vec<BucketPass>> {
    let device = model_device(model);
    let lengths: Vec<usize> = seqs.iter().map(|s| s.0.len()).collect();
    length_buckets(&lengths)
        .into_iter()
        .map(|rows| {
            let part: Vec<SeqView<'_>> = rows.iter().map(|&i| seqs[i]).collect();
            let layout = layout(&part, model.config().vocab_size, &device)?;
            let (logprobs, log_softmax) = token_logprobs(model, &layout, load.as_deref_mut())?;
            Ok(BucketPass {
                rows,
                layout,
                logprobs,
                log_softmax,
            })
        })
        .collect()
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
    rl_loss_counting(model, batch, objective, &mut ExpertLoad::new())
}

/// [`rl_loss`], adding the forward pass's expert load (over real tokens) to `load`.
pub(crate) fn rl_loss_counting(
    model: &NemotronH,
    batch: &[RlSequence],
    objective: &Objective,
    load: &mut ExpertLoad,
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
    // The objective sees the whole batch in one `[b, w]` layout; the model runs in buckets.
    let passes = bucketed_logprobs(model, &views, Some(load))?;
    let mut current = vec![0f32; b * w];
    for pass in &passes {
        let pw = pass.layout.width;
        let values: Vec<f32> = pass.logprobs.detach().flatten_all()?.to_vec1()?;
        for (r, &i) in pass.rows.iter().enumerate() {
            current[i * w..i * w + pw].copy_from_slice(&values[r * pw..(r + 1) * pw]);
        }
    }
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
    let mut surrogate: Option<Tensor> = None;
    let (mut entropy_sum, mut entropy_tokens) = (0f64, 0f64);
    for pass in &passes {
        let pw = pass.layout.width;
        let mut g = Vec::with_capacity(pass.rows.len() * pw);
        for &i in &pass.rows {
            g.extend_from_slice(&evaluation.grad_logprobs[i * w..i * w + pw]);
        }
        let g = Tensor::from_vec(g, (pass.rows.len(), pw), &device)?;
        let part = (&pass.logprobs * g)?.sum_all()?;
        surrogate = Some(match surrogate {
            Some(sum) => (sum + part)?,
            None => part,
        });
        let tokens: f64 = pass.layout.mask.iter().map(|&m| m as f64).sum();
        let mask_tensor =
            Tensor::from_vec(pass.layout.mask.clone(), (pass.rows.len(), pw), &device)?;
        entropy_sum += entropy(&pass.log_softmax, &mask_tensor)? * tokens;
        entropy_tokens += tokens;
    }
    let surrogate = surrogate.expect("a batch has at least one bucket");
    let masked = mask.iter().filter(|&&m| m).count().max(1) as f64;
    let abs_diff: f64 = (0..b * w)
        .filter(|&p| mask[p])
        .map(|p| (current[p] - behaviour[p]).abs() as f64)
        .sum();
    let stats = LossStats {
        loss: evaluation.loss,
        kl: evaluation.kl,
        entropy: entropy_sum / entropy_tokens.max(1.0),
        clip_fraction: evaluation.clip_fraction,
        mean_abs_logprob_diff: abs_diff / masked,
        tokens: evaluation.tokens,
    };
    Ok((surrogate, stats))
}

/// Next-token cross-entropy on the completion tokens of `batch` (token mean).
pub fn sft_loss(model: &NemotronH, batch: &[SftSequence]) -> Result<(Tensor, LossStats)> {
    sft_loss_counting(model, batch, &mut ExpertLoad::new())
}

/// Sequences in one padded forward pass of [`sft_loss`] are within this factor of the shortest
/// one's length: a batch mixing short answers with long episodes would otherwise pad every
/// answer to the longest episode.
const LENGTH_BUCKET_RATIO: f64 = 1.5;

/// The batch's indices in buckets of similar length (sorted by length, a new bucket once a
/// sequence is more than [`LENGTH_BUCKET_RATIO`] times its bucket's shortest).
fn length_buckets(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut buckets: Vec<Vec<usize>> = vec![];
    for i in order {
        match buckets.last_mut() {
            Some(b) if lengths[i] as f64 <= LENGTH_BUCKET_RATIO * lengths[b[0]] as f64 => b.push(i),
            _ => buckets.push(vec![i]),
        }
    }
    buckets
}

/// [`sft_loss`], adding the forward pass's expert load (over real tokens) to `load`, run in
/// length buckets ([`in_length_buckets`]).
pub(crate) fn sft_loss_counting(
    model: &NemotronH,
    batch: &[SftSequence],
    load: &mut ExpertLoad,
) -> Result<(Tensor, LossStats)> {
    let combined = in_length_buckets(batch, |part| sft_loss_padded(model, part, load).map(Some))?;
    Ok(combined.expect("every SFT bucket has a loss"))
}

/// `loss` of `batch` run as buckets of similar length ([`length_buckets`], one padded pass
/// each), whose token means are weighted by their share of the batch's learned tokens
/// (`LossStats::tokens`). For a token mean that is the token mean over the whole batch, as one
/// padded pass would give, at less padding. A bucket whose `loss` is `None` (nothing to learn in
/// it) is left out; `None` when every bucket is.
fn in_length_buckets(
    batch: &[SftSequence],
    mut loss: impl FnMut(&[SftSequence]) -> Result<Option<(Tensor, LossStats)>>,
) -> Result<Option<(Tensor, LossStats)>> {
    let lengths: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
    let buckets = length_buckets(&lengths);
    if buckets.len() <= 1 {
        return loss(batch);
    }
    let mut parts = vec![];
    for bucket in &buckets {
        let part: Vec<SftSequence> = bucket.iter().map(|&i| batch[i].clone()).collect();
        parts.extend(loss(&part)?);
    }
    let total: usize = parts.iter().map(|(_, s)| s.tokens).sum();
    let mut combined: Option<Tensor> = None;
    let mut stats = LossStats {
        tokens: total,
        ..LossStats::default()
    };
    for (part, s) in parts {
        let share = s.tokens as f64 / total.max(1) as f64;
        stats.loss += share * s.loss;
        stats.entropy += share * s.entropy;
        let weighted = (part * share)?;
        combined = Some(match combined {
            Some(sum) => (sum + weighted)?,
            None => weighted,
        });
    }
    Ok(combined.map(|loss| (loss, stats)))
}

/// [`sft_loss_counting`] as one padded forward pass.
fn sft_loss_padded(
    model: &NemotronH,
    batch: &[SftSequence],
    load: &mut ExpertLoad,
) -> Result<(Tensor, LossStats)> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let mask = Tensor::from_vec(l.mask.clone(), (batch.len(), l.width), &device)?;
    let (lp, logp) = token_logprobs(model, &l, Some(load))?;
    let loss = token_mean(&lp.neg()?, &mask)?;
    let stats = LossStats {
        loss: loss.to_scalar::<f32>()? as f64,
        entropy: entropy(&logp, &mask)?,
        tokens: l.mask.iter().filter(|&&m| m > 0.0).count(),
        ..LossStats::default()
    };
    Ok((loss, stats))
}

/// The MTP head's loss on the completion tokens of `batch`: at each depth `k` in
/// `1..=mtp_depth`, the cross-entropy of the head's prediction of the token `k` places after
/// the next one, token-mean over the positions whose target is a completion token in the loss;
/// the depths' losses averaged. The backbone's hidden state is detached, so the gradient reaches
/// the MTP head alone (healing the head after the backbone moved, Nemotron 3's last stage).
/// `stats.loss` is that mean; `stats.tokens` counts the depth-1 targets. The batch runs in
/// length buckets, each weighted by its share of the depth-1 targets ([`in_length_buckets`]).
pub fn mtp_loss(model: &NemotronH, batch: &[SftSequence]) -> Result<(Tensor, LossStats)> {
    if !model.has_mtp() {
        return Err(LearnerError::Batch(
            "the policy has no MTP head to train (num_nextn_predict_layers = 0)".into(),
        ));
    }
    in_length_buckets(batch, |part| mtp_loss_padded(model, part))?.ok_or_else(|| {
        LearnerError::Batch(
            "no completion token has a target for the MTP head (completions of one token?)".into(),
        )
    })
}

/// [`mtp_loss`] as one padded forward pass; `None` when no completion token has a target.
fn mtp_loss_padded(
    model: &NemotronH,
    batch: &[SftSequence],
) -> Result<Option<(Tensor, LossStats)>> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let (b, t) = l.ids.dims2()?;
    let hidden = model.hidden(&l.ids)?.detach();
    let depth = model.config().chorus.mtp_depth.max(1);
    let mut total: Option<Tensor> = None;
    let (mut depths, mut tokens) = (0usize, 0usize);
    for (i, logits) in model.mtp_logits(&l.ids, &hidden, depth)?.iter().enumerate() {
        let k = i + 1;
        // Position p predicts token p + k + 1: positions 0..t-k-1 have a target.
        let Some(width) = t.checked_sub(k + 1).filter(|&w| w > 0) else {
            break;
        };
        // The layout's mask at position q says whether token q + 1 is learned; here the
        // target of position p is token p + k + 1, so its mask is the layout's at p + k.
        let mut mask = vec![0f32; b * width];
        for row in 0..b {
            for p in 0..width {
                mask[row * width + p] = l.mask[row * l.width + p + k];
            }
        }
        let n = mask.iter().filter(|&&m| m > 0.0).count();
        if n == 0 {
            continue;
        }
        if k == 1 {
            tokens = n;
        }
        let mask = Tensor::from_vec(mask, (b, width), &device)?;
        let targets = l.ids.narrow(1, k + 1, width)?.contiguous()?;
        let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, width)?, D::Minus1)?;
        let lp = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
        let part = token_mean(&lp.neg()?, &mask)?;
        total = Some(match total {
            Some(sum) => (sum + part)?,
            None => part,
        });
        depths += 1;
    }
    let Some(total) = total else {
        return Ok(None);
    };
    let loss = (total / depths as f64)?;
    let stats = LossStats {
        loss: loss.to_scalar::<f32>()? as f64,
        tokens,
        ..LossStats::default()
    };
    Ok(Some((loss, stats)))
}

fn model_device(model: &NemotronH) -> Device {
    model.device().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_model::{NemotronHConfig, Params, checkpoint::init_params};

    fn moe_model() -> NemotronH {
        moe_model_and_params().0
    }

    fn moe_model_and_params() -> (NemotronH, Params) {
        model_and_params(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "*E", "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8}"#,
            5,
        )
    }

    /// A model of the config `json` with random weights from `seed`, and its parameters.
    fn model_and_params(json: &str, seed: u64) -> (NemotronH, Params) {
        let cfg = NemotronHConfig::from_json_str(json).unwrap();
        let params: Params = init_params(&cfg, seed, &Device::Cpu).unwrap();
        (NemotronH::new(&cfg, &params).unwrap(), params)
    }

    #[test]
    fn length_buckets_group_similar_lengths() {
        assert_eq!(
            length_buckets(&[300, 20, 25, 310, 40, 29]),
            vec![vec![1, 2, 5], vec![4], vec![0, 3]]
        );
        assert_eq!(length_buckets(&[7]), vec![vec![0]]);
    }

    #[test]
    fn bucketed_sft_loss_and_gradient_equal_one_padded_pass() {
        let (model, params) = moe_model_and_params();
        let seq = |n: usize, prompt_len: usize, off: u32| SftSequence {
            tokens: (0..n as u32).map(|i| 3 + (i * 5 + off) % 20).collect(),
            prompt_len,
            loss_mask: None,
        };
        // Three buckets: lengths 4-5, 9 and 30.
        let batch = [
            seq(30, 3, 1),
            seq(4, 2, 2),
            seq(9, 4, 3),
            seq(5, 1, 4),
            SftSequence {
                loss_mask: Some(vec![true, false, true, true, false, true, true]),
                ..seq(9, 2, 5)
            },
        ];
        assert_eq!(
            length_buckets(&batch.iter().map(|s| s.tokens.len()).collect::<Vec<_>>()).len(),
            3
        );
        let (bucketed, bs) = sft_loss_counting(&model, &batch, &mut ExpertLoad::new()).unwrap();
        let (padded, ps) = sft_loss_padded(&model, &batch, &mut ExpertLoad::new()).unwrap();
        assert_eq!(bs.tokens, ps.tokens);
        assert!(
            (bs.loss - ps.loss).abs() < 1e-5,
            "{} vs {}",
            bs.loss,
            ps.loss
        );
        assert!((bs.entropy - ps.entropy).abs() < 1e-4);
        let (gb, gp) = (bucketed.backward().unwrap(), padded.backward().unwrap());
        let mut worst = 0f32;
        for (name, var) in params.vars() {
            let (Some(b), Some(p)) = (gb.get(var.as_tensor()), gp.get(var.as_tensor())) else {
                assert!(
                    name.ends_with("e_score_correction_bias"),
                    "{name} has no gradient"
                );
                continue;
            };
            let (b, p): (Vec<f32>, Vec<f32>) = (
                b.flatten_all().unwrap().to_vec1().unwrap(),
                p.flatten_all().unwrap().to_vec1().unwrap(),
            );
            for (x, y) in b.iter().zip(&p) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 1e-6, "gradients differ by {worst}");
    }

    #[test]
    fn bucketed_mtp_loss_at_depth_one_equals_one_padded_pass_and_skips_empty_buckets() {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "*E", "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8, "num_nextn_predict_layers": 1,
            "chorus": {"mtp_depth": 1}}"#,
        )
        .unwrap();
        let params: Params = init_params(&cfg, 5, &Device::Cpu).unwrap();
        let model = NemotronH::new(&cfg, &params).unwrap();
        let seq = |n: usize, prompt_len: usize, off: u32| SftSequence {
            tokens: (0..n as u32).map(|i| 3 + (i * 7 + off) % 20).collect(),
            prompt_len,
            loss_mask: None,
        };
        let batch = [seq(30, 3, 1), seq(5, 2, 2), seq(9, 4, 3), seq(6, 1, 4)];
        let (bucketed, bs) = mtp_loss(&model, &batch).unwrap();
        let (padded, ps) = mtp_loss_padded(&model, &batch).unwrap().unwrap();
        assert_eq!(
            (bs.tokens, format!("{:.5}", bs.loss)),
            (ps.tokens, format!("{:.5}", ps.loss))
        );
        let (gb, gp) = (bucketed.backward().unwrap(), padded.backward().unwrap());
        let mut compared = 0;
        for (name, var) in params.vars() {
            let (b, p) = (gb.get(var.as_tensor()), gp.get(var.as_tensor()));
            assert_eq!(b.is_some(), p.is_some(), "{name}");
            let (Some(b), Some(p)) = (b, p) else { continue };
            let diff = (b - p).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{name}");
            compared += usize::from(name.starts_with("mtp."));
        }
        assert!(compared > 0, "the MTP head gets gradients");
        // A bucket of one-token completions has no MTP target: it is left out, not an error.
        let with_short = [seq(30, 3, 1), seq(2, 1, 5), seq(2, 1, 6)];
        let (_, short) = mtp_loss(&model, &with_short).unwrap();
        let (_, alone) = mtp_loss(&model, &with_short[..1]).unwrap();
        assert_eq!(short.tokens, alone.tokens);
        assert!(mtp_loss(&model, &with_short[1..]).is_err());
    }

    #[test]
    fn the_expert_load_counts_real_tokens_not_padding() {
        let model = moe_model();
        let seq = |tokens: Vec<u32>| RlSequence {
            behavior_logprobs: vec![-1.0; tokens.len() - 2],
            tokens,
            prompt_len: 2,
            advantage: 1.0,
            ref_logprobs: None,
            loss_mask: None,
        };
        // 7 + 3 real tokens; the shorter sequence is padded by 4.
        let batch = [seq(vec![3, 4, 5, 6, 7, 8, 9]), seq(vec![3, 4, 5])];
        let mut load = ExpertLoad::new();
        rl_loss_counting(&model, &batch, &Objective::default(), &mut load).unwrap();
        let counts = load
            .get("backbone.layers.1.mixer.gate.e_score_correction_bias")
            .expect("the MoE block counted");
        assert_eq!(
            counts.iter().sum::<u64>(),
            2 * 10,
            "top-2 of 10 real tokens"
        );
        let sft: Vec<SftSequence> = batch
            .iter()
            .map(|s| SftSequence {
                tokens: s.tokens.clone(),
                prompt_len: 2,
                loss_mask: None,
            })
            .collect();
        let mut sft_load = ExpertLoad::new();
        sft_loss_counting(&model, &sft, &mut sft_load).unwrap();
        assert_eq!(sft_load, load, "the same tokens route the same way");
    }

    #[test]
    fn completion_logprobs_are_the_losss_own() {
        let model = moe_model();
        let batch = [RlSequence {
            tokens: vec![3, 4, 5, 6],
            prompt_len: 2,
            behavior_logprobs: vec![-1.0, -1.0],
            advantage: 1.0,
            ref_logprobs: None,
            loss_mask: Some(vec![true, false]),
        }];
        let lp = completion_logprobs(&model, &batch).unwrap();
        assert_eq!(lp.len(), 1);
        assert_eq!(lp[0].len(), 2, "masked tokens included");
        // With the policy as its own reference, the KL to it is exactly zero.
        let mut o = Objective::default();
        o.set("kl_coef", "1").unwrap();
        let with_ref = [RlSequence {
            ref_logprobs: Some(lp[0].clone()),
            ..batch[0].clone()
        }];
        let (_, stats) = rl_loss(&model, &with_ref, &o).unwrap();
        assert_eq!(stats.kl, 0.0);
    }

    /// A hybrid with every block kind whose sequence mixing could leak padding (Mamba-2,
    /// attention) and a MoE.
    fn hybrid_model_and_params() -> (NemotronH, Params) {
        model_and_params(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "M*E", "mamba_num_heads": 2, "mamba_head_dim": 8,
            "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8}"#,
            7,
        )
    }

    /// The RL loss runs its forward passes in length buckets; its value and every parameter's
    /// gradient must be those of one padded pass over the whole batch (what it computed before).
    #[test]
    fn bucketed_rl_loss_equals_one_padded_pass() {
        let (model, params) = hybrid_model_and_params();
        let batch: Vec<RlSequence> = [(4, 2), (5, 3), (13, 4), (14, 11), (5, 1)]
            .iter()
            .enumerate()
            .map(|(k, &(len, prompt_len))| RlSequence {
                tokens: (0..len)
                    .map(|j| ((j * 5 + k * 3 + 1) % 23) as u32 + 1)
                    .collect(),
                prompt_len,
                behavior_logprobs: vec![-2.0; len - prompt_len],
                advantage: [1.0, -0.5, 0.25, -1.0, 0.75][k],
                ref_logprobs: None,
                loss_mask: None,
            })
            .collect();
        let lengths: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        assert!(
            length_buckets(&lengths).len() > 1,
            "the batch spans several buckets"
        );
        // Truncated importance sampling makes the gradient depend on the log-probabilities'
        // values (rho = exp(old - behaviour)), not only on where they sit.
        let mut objective = Objective::default();
        objective.set("correction", "tis").unwrap();
        let (surrogate, stats) = rl_loss(&model, &batch, &objective).unwrap();

        // One padded pass, as the loss was computed before it ran in buckets.
        let views: Vec<SeqView<'_>> = batch
            .iter()
            .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
            .collect();
        let l = layout(&views, 24, &Device::Cpu).unwrap();
        let (b, w) = (batch.len(), l.width);
        let (lp, _) = token_logprobs(&model, &l, None).unwrap();
        let current: Vec<f32> = lp.detach().flatten_all().unwrap().to_vec1().unwrap();
        let mut behaviour = vec![0f32; b * w];
        for (i, s) in batch.iter().enumerate() {
            let first = i * w + s.prompt_len - 1;
            behaviour[first..first + s.behavior_logprobs.len()]
                .copy_from_slice(&s.behavior_logprobs);
        }
        let mask: Vec<bool> = l.mask.iter().map(|&m| m > 0.0).collect();
        let advantages: Vec<f32> = batch.iter().map(|s| s.advantage).collect();
        let evaluation = evaluate(
            &objective,
            &TokenBatch {
                batch: b,
                width: w,
                logprobs: &current,
                old_logprobs: &current,
                behaviour_logprobs: &behaviour,
                advantages: &advantages,
                mask: &mask,
                ref_logprobs: None,
            },
        )
        .unwrap();
        assert!((stats.loss - evaluation.loss).abs() <= 1e-6 * evaluation.loss.abs().max(1.0));
        let g = Tensor::from_vec(evaluation.grad_logprobs, (b, w), &Device::Cpu).unwrap();
        let one_pass = (&lp * g).unwrap().sum_all().unwrap();

        let (got, want) = (surrogate.backward().unwrap(), one_pass.backward().unwrap());
        let mut compared = 0;
        for (name, var) in params.vars() {
            let (Some(a), Some(e)) = (got.get(var.as_tensor()), want.get(var.as_tensor())) else {
                continue;
            };
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (a, e) = (flat(a), flat(e));
            let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(&e)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale.max(1e-3),
                "{name}: off by {diff} (largest {scale})"
            );
            compared += 1;
        }
        assert!(compared > 10, "compared {compared} gradients");
    }
}
