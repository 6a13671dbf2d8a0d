//! The learner's losses over a batch of sequences under the policy: the RL objective of a
//! stage (evaluated by [`crate::objective`] on the policy's log-probabilities) and supervised
//! (SFT) next-token cross-entropy on reference solutions.

use candle_core::backprop::GradStore;
use candle_core::{D, Device, Tensor};
use chorus_model::{ExpertLoad, NemotronH, Params};
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use crate::objective::{BatchTotals, Objective, TokenBatch, evaluate_part};

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

/// Checks sequence `b` of a batch against what [`layout`] needs.
fn check_sequence(
    b: usize,
    (tokens, prompt_len, loss_mask): SeqView<'_>,
    vocab: usize,
) -> Result<()> {
    if prompt_len == 0 || prompt_len >= tokens.len() {
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
    Ok(())
}

/// Completion tokens of a (checked) sequence that are in the loss.
fn learned_tokens((tokens, prompt_len, loss_mask): SeqView<'_>) -> usize {
    loss_mask.map_or(tokens.len() - prompt_len, |m| {
        m.iter().filter(|&&x| x).count()
    })
}

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
    for (b, &view) in seqs.iter().enumerate() {
        check_sequence(b, view, vocab)?;
        let (tokens, prompt_len, loss_mask) = view;
        let completion = tokens.len() - prompt_len;
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

/// Where a loss's forward passes go.
pub(crate) enum Sink<'a> {
    /// Summed into one graph: the loss as one tensor, every pass's activations alive until it
    /// is dropped.
    Graph(Option<Tensor>),
    /// Back-propagated as each pass ends, its gradient with respect to `params` times `scale`
    /// added to `grads`: a training step holds one pass's activations at a time. Exact, because
    /// every loss here is a sum over passes whose batch-wide normalisers are known before the
    /// first one runs.
    Backward {
        /// The step's gradients so far, of `params` only.
        grads: &'a mut GradStore,
        /// What every pass's gradient is multiplied by (a part's share of a mixed step).
        scale: f64,
        /// The parameters whose gradients are kept. A backward pass also returns gradients for
        /// the constants of the graph (masks, targets, detached states), as large as the pass;
        /// kept, they would grow with the batch.
        params: &'a Params,
    },
}

impl<'a> Sink<'a> {
    /// [`Sink::Backward`] into `grads`.
    pub(crate) fn backward(grads: &'a mut GradStore, scale: f64, params: &'a Params) -> Self {
        Sink::Backward {
            grads,
            scale,
            params,
        }
    }

    fn add(&mut self, part: Tensor) -> Result<()> {
        match self {
            Sink::Graph(sum) => {
                *sum = Some(match sum.take() {
                    Some(sum) => (sum + part)?,
                    None => part,
                })
            }
            Sink::Backward {
                grads,
                scale,
                params,
            } => {
                let mut pass = (part * *scale)?.backward()?;
                for var in params.vars().values() {
                    let Some(g) = pass.remove(var.as_tensor()) else {
                        continue;
                    };
                    let sum = match grads.remove(var.as_tensor()) {
                        Some(sum) => (sum + g)?,
                        None => g,
                    };
                    grads.insert(var.as_tensor(), sum);
                }
            }
        }
        Ok(())
    }

    fn into_loss(self) -> Option<Tensor> {
        match self {
            Sink::Graph(sum) => sum,
            Sink::Backward { .. } => None,
        }
    }
}

/// The log-probability under `model` of each completion token of each sequence of `batch`
/// (masked or not), computed in the same forward passes and positions as [`rl_loss`]: what a
/// reference policy contributes to the KL penalty. At most `max_tokens` padded tokens run in
/// one pass.
pub fn completion_logprobs(
    model: &NemotronH,
    batch: &[RlSequence],
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let mut out = vec![vec![]; batch.len()];
    let device = model_device(model);
    for rows in forward_passes(&views, max_tokens) {
        let part: Vec<SeqView<'_>> = rows.iter().map(|&i| views[i]).collect();
        let l = layout(&part, model.config().vocab_size, &device)?;
        let (logprobs, _) = token_logprobs(model, &l, None)?;
        let values: Vec<Vec<f32>> = logprobs.detach().to_vec2()?;
        for (&i, row) in rows.iter().zip(values) {
            // Position `p` predicts token `p + 1`: the completion starts at `prompt_len - 1`.
            let s = &batch[i];
            let first = s.prompt_len - 1;
            out[i] = row[first..first + s.tokens.len() - s.prompt_len].to_vec();
        }
    }
    Ok(out)
}

/// The batch's indices in forward passes: length buckets ([`length_buckets`]) cut so that no
/// pass holds more than `max_tokens` padded tokens (a longer sequence runs alone). A sequence's
/// log-probabilities do not depend on the padding after it (every block is causal), so passes
/// give one padded pass's values without computing the padding: an RL batch mixing short
/// answers with long prompts otherwise pads every short one to the longest, and one pass over
/// a batch of long episodes holds all their activations at once.
fn forward_passes(seqs: &[SeqView<'_>], max_tokens: usize) -> Vec<Vec<usize>> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.0.len()).collect();
    let mut passes = vec![];
    for bucket in length_buckets(&lengths) {
        let mut pass: Vec<usize> = vec![];
        // Ascending length: the sequence added last sets the pass's padded width.
        for i in bucket {
            if !pass.is_empty() && (pass.len() + 1) * lengths[i] > max_tokens {
                passes.push(std::mem::take(&mut pass));
            }
            pass.push(i);
        }
        passes.push(pass);
    }
    passes
}

/// The RL loss of `batch` under `model` for `objective`, with statistics, in one graph.
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
    let mut sink = Sink::Graph(None);
    let stats = rl_loss_into(
        model,
        batch,
        objective,
        &mut ExpertLoad::new(),
        usize::MAX,
        &mut sink,
    )?;
    Ok((sink.into_loss().expect("a batch has a pass"), stats))
}

/// [`rl_loss`] in forward passes of at most `max_tokens` padded tokens ([`forward_passes`]),
/// each pass's surrogate given to `sink`, the passes' expert load (over real tokens) added to
/// `load`. Each pass is evaluated with the whole batch's normalisers ([`evaluate_part`]), so
/// the passes' losses and gradients add up to the batch's.
pub(crate) fn rl_loss_into(
    model: &NemotronH,
    batch: &[RlSequence],
    objective: &Objective,
    load: &mut ExpertLoad,
    max_tokens: usize,
    sink: &mut Sink<'_>,
) -> Result<LossStats> {
    let device = model_device(model);
    let vocab = model.config().vocab_size;
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let with_ref = objective.kl_coef > 0.0;
    for (i, (s, &view)) in batch.iter().zip(&views).enumerate() {
        check_sequence(i, view, vocab)?;
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
    }
    let learned: Vec<usize> = views.iter().map(|&v| learned_tokens(v)).collect();
    let totals = BatchTotals {
        sequences: batch.len(),
        sequences_in_loss: learned.iter().filter(|&&n| n > 0).count(),
        masked: learned.iter().sum(),
        width: views.iter().map(|s| s.0.len()).max().unwrap_or(1).max(1) - 1,
    };
    let mut stats = LossStats::default();
    let (mut kl_sum, mut clipped_sum, mut entropy_sum, mut abs_diff) = (0f64, 0f64, 0f64, 0f64);
    for rows in forward_passes(&views, max_tokens) {
        let part: Vec<SeqView<'_>> = rows.iter().map(|&i| views[i]).collect();
        let l = layout(&part, vocab, &device)?;
        let (logprobs, log_softmax) = token_logprobs(model, &l, Some(load))?;
        let (b, w) = (rows.len(), l.width);
        let current: Vec<f32> = logprobs.detach().flatten_all()?.to_vec1()?;
        let mut behaviour = vec![0f32; b * w];
        let mut reference = vec![0f32; b * w];
        for (r, &i) in rows.iter().enumerate() {
            let s = &batch[i];
            let first = r * w + s.prompt_len - 1;
            let n = s.behavior_logprobs.len();
            behaviour[first..first + n].copy_from_slice(&s.behavior_logprobs);
            if let Some(reference_row) = &s.ref_logprobs {
                reference[first..first + n].copy_from_slice(reference_row);
            }
        }
        let advantages: Vec<f32> = rows.iter().map(|&i| batch[i].advantage).collect();
        let mask: Vec<bool> = l.mask.iter().map(|&m| m > 0.0).collect();
        let evaluation = evaluate_part(
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
            &totals,
        )
        .map_err(|e| LearnerError::Batch(e.0))?;
        let tokens = evaluation.tokens as f64;
        stats.loss += evaluation.loss;
        stats.tokens += evaluation.tokens;
        kl_sum += evaluation.kl * tokens;
        clipped_sum += evaluation.clip_fraction * tokens;
        let mask_tensor = Tensor::from_vec(l.mask.clone(), (b, w), &device)?;
        entropy_sum += entropy(&log_softmax, &mask_tensor)? * tokens;
        abs_diff += (0..b * w)
            .filter(|&p| mask[p])
            .map(|p| (current[p] - behaviour[p]).abs() as f64)
            .sum::<f64>();
        let g = Tensor::from_vec(evaluation.grad_logprobs, (b, w), &device)?;
        sink.add((&logprobs * g)?.sum_all()?)?;
    }
    let tokens = (stats.tokens as f64).max(1.0);
    stats.kl = kl_sum / tokens;
    stats.clip_fraction = clipped_sum / tokens;
    stats.entropy = entropy_sum / tokens;
    stats.mean_abs_logprob_diff = abs_diff / tokens;
    Ok(stats)
}

/// Next-token cross-entropy on the completion tokens of `batch` (token mean), in one graph.
pub fn sft_loss(model: &NemotronH, batch: &[SftSequence]) -> Result<(Tensor, LossStats)> {
    let mut sink = Sink::Graph(None);
    let stats = sft_loss_into(model, batch, &mut ExpertLoad::new(), usize::MAX, &mut sink)?;
    Ok((sink.into_loss().expect("a batch has a pass"), stats))
}

/// Sequences in one padded forward pass are within this factor of the shortest one's length:
/// a batch mixing short answers with long episodes would otherwise pad every answer to the
/// longest episode.
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

/// [`sft_loss`] in forward passes of at most `max_tokens` padded tokens ([`in_passes`]), the
/// passes' expert load (over real tokens) added to `load`.
pub(crate) fn sft_loss_into(
    model: &NemotronH,
    batch: &[SftSequence],
    load: &mut ExpertLoad,
    max_tokens: usize,
    sink: &mut Sink<'_>,
) -> Result<LossStats> {
    let views = checked_views(model, batch)?;
    let total: usize = views.iter().map(|&v| learned_tokens(v)).sum();
    in_passes(
        batch,
        &views,
        max_tokens,
        |part| sft_loss_padded(model, part, load, total).map(Some),
        sink,
    )
}

/// `batch` as [`layout`] sees it, every sequence checked.
fn checked_views<'a>(model: &NemotronH, batch: &'a [SftSequence]) -> Result<Vec<SeqView<'a>>> {
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    for (i, &view) in views.iter().enumerate() {
        check_sequence(i, view, model.config().vocab_size)?;
    }
    Ok(views)
}

/// `pass_loss` of `batch` run in forward passes ([`forward_passes`] of `views`), each pass's
/// loss given to `sink` and its statistics added up. A pass's loss and statistics are its share
/// of the batch's (its sums divided by the batch's totals, known before any pass runs), so the
/// passes add up to one padded pass over the batch, at less padding. A pass whose loss is `None`
/// (nothing to learn in it) is left out.
fn in_passes(
    batch: &[SftSequence],
    views: &[SeqView<'_>],
    max_tokens: usize,
    mut pass_loss: impl FnMut(&[SftSequence]) -> Result<Option<(Tensor, LossStats)>>,
    sink: &mut Sink<'_>,
) -> Result<LossStats> {
    let mut stats = LossStats::default();
    for rows in forward_passes(views, max_tokens) {
        let part: Vec<SftSequence> = rows.iter().map(|&i| batch[i].clone()).collect();
        let Some((loss, s)) = pass_loss(&part)? else {
            continue;
        };
        stats.loss += s.loss;
        stats.entropy += s.entropy;
        stats.tokens += s.tokens;
        sink.add(loss)?;
    }
    Ok(stats)
}

/// `batch`'s share of an SFT loss over a batch of `total` learned tokens, in one padded
/// forward pass: its summed cross-entropy over `total` (the token mean when `batch` is the
/// whole batch). The statistics are shares the same way; `tokens` is the pass's own.
fn sft_loss_padded(
    model: &NemotronH,
    batch: &[SftSequence],
    load: &mut ExpertLoad,
    total: usize,
) -> Result<(Tensor, LossStats)> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let mask = Tensor::from_vec(l.mask.clone(), (batch.len(), l.width), &device)?;
    let (lp, logp) = token_logprobs(model, &l, Some(load))?;
    let tokens = l.mask.iter().filter(|&&m| m > 0.0).count();
    let share = tokens as f64 / total.max(1) as f64;
    let loss = ((lp.neg()? * &mask)?.sum_all()? / total.max(1) as f64)?;
    let stats = LossStats {
        loss: loss.to_scalar::<f32>()? as f64,
        entropy: entropy(&logp, &mask)? * share,
        tokens,
        ..LossStats::default()
    };
    Ok((loss, stats))
}

/// The MTP head's loss on the completion tokens of `batch`: at each depth `k` in
/// `1..=mtp_depth`, the cross-entropy of the head's prediction of the token `k` places after
/// the next one, token-mean over the batch's positions whose target is a completion token in
/// the loss; those depths' losses averaged. The backbone's hidden state is detached, so the
/// gradient reaches the MTP head alone (healing the head after the backbone moved, Nemotron 3's
/// last stage). `stats.loss` is that mean; `stats.tokens` counts the depth-1 targets. In one
/// graph.
pub fn mtp_loss(model: &NemotronH, batch: &[SftSequence]) -> Result<(Tensor, LossStats)> {
    let mut sink = Sink::Graph(None);
    let stats = mtp_loss_into(model, batch, usize::MAX, &mut sink)?;
    Ok((
        sink.into_loss().expect("a batch with targets has a pass"),
        stats,
    ))
}

/// [`mtp_loss`] in forward passes of at most `max_tokens` padded tokens ([`in_passes`]).
pub(crate) fn mtp_loss_into(
    model: &NemotronH,
    batch: &[SftSequence],
    max_tokens: usize,
    sink: &mut Sink<'_>,
) -> Result<LossStats> {
    if !model.has_mtp() {
        return Err(LearnerError::Batch(
            "the policy has no MTP head to train (num_nextn_predict_layers = 0)".into(),
        ));
    }
    let views = checked_views(model, batch)?;
    let depth = model.config().chorus.mtp_depth.max(1);
    let totals: Vec<usize> = (1..=depth)
        .map(|k| views.iter().map(|&v| mtp_targets(v, k)).sum())
        .collect();
    if totals[0] == 0 {
        return Err(LearnerError::Batch(
            "no completion token has a target for the MTP head (completions of one token?)".into(),
        ));
    }
    in_passes(
        batch,
        &views,
        max_tokens,
        |part| mtp_loss_padded(model, part, &totals),
        sink,
    )
}

/// The depth-`k` targets of a (checked) sequence in [`mtp_loss`]: its learned completion
/// tokens at least `k` positions into the layout (the head at position `p` drafts token
/// `p + k + 1`, so the first `k` positions' tokens have no depth-`k` prediction).
fn mtp_targets((tokens, prompt_len, loss_mask): SeqView<'_>, k: usize) -> usize {
    (0..tokens.len() - prompt_len)
        .filter(|&j| prompt_len - 1 + j >= k && loss_mask.is_none_or(|m| m[j]))
        .count()
}

/// `batch`'s share of [`mtp_loss`] over a batch whose depth-`k` targets number `totals[k-1]`,
/// in one padded forward pass; `None` when no completion token of `batch` has a target.
fn mtp_loss_padded(
    model: &NemotronH,
    batch: &[SftSequence],
    totals: &[usize],
) -> Result<Option<(Tensor, LossStats)>> {
    let device = model_device(model);
    let views: Vec<SeqView<'_>> = batch
        .iter()
        .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
        .collect();
    let l = layout(&views, model.config().vocab_size, &device)?;
    let (b, t) = l.ids.dims2()?;
    let hidden = model.hidden(&l.ids)?.detach();
    let depths = totals.iter().filter(|&&n| n > 0).count().max(1) as f64;
    let mut loss: Option<Tensor> = None;
    let mut tokens = 0;
    for (i, logits) in model
        .mtp_logits(&l.ids, &hidden, totals.len())?
        .iter()
        .enumerate()
    {
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
        let part = ((lp.neg()? * mask)?.sum_all()? / (totals[i] as f64 * depths))?;
        loss = Some(match loss {
            Some(sum) => (sum + part)?,
            None => part,
        });
    }
    let Some(loss) = loss else {
        return Ok(None);
    };
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
    use crate::objective::evaluate;
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

    /// SFT examples of lengths 30, 4, 9, 5 and 9 (the last with a loss mask), then `extra`
    /// `(length, prompt_len, offset)` ones, of tokens in 3..23.
    fn sft_batch(extra: &[(usize, usize, u32)]) -> Vec<SftSequence> {
        let seq = |n: usize, prompt_len: usize, off: u32| SftSequence {
            tokens: (0..n as u32).map(|i| 3 + (i * 5 + off) % 20).collect(),
            prompt_len,
            loss_mask: None,
        };
        let mut batch = vec![
            seq(30, 3, 1),
            seq(4, 2, 2),
            seq(9, 4, 3),
            seq(5, 1, 4),
            SftSequence {
                loss_mask: Some(vec![true, false, true, true, false, true, true]),
                ..seq(9, 2, 5)
            },
        ];
        batch.extend(extra.iter().map(|&(n, p, off)| seq(n, p, off)));
        batch
    }

    #[test]
    fn bucketed_sft_loss_and_gradient_equal_one_padded_pass() {
        let (model, params) = moe_model_and_params();
        // Three buckets: lengths 4-5, 9 and 30.
        let batch = sft_batch(&[]);
        assert_eq!(
            length_buckets(&batch.iter().map(|s| s.tokens.len()).collect::<Vec<_>>()).len(),
            3
        );
        let (bucketed, bs) = sft_loss(&model, &batch).unwrap();
        let total = batch
            .iter()
            .map(|s| learned_tokens((&s.tokens, s.prompt_len, s.loss_mask.as_deref())))
            .sum();
        let (padded, ps) = sft_loss_padded(&model, &batch, &mut ExpertLoad::new(), total).unwrap();
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
    fn bucketed_mtp_loss_equals_one_padded_pass_and_skips_empty_buckets() {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "*E", "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8, "num_nextn_predict_layers": 1,
            "chorus": {"mtp_depth": 2}}"#,
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
        let totals: Vec<usize> = (1..=2)
            .map(|k| {
                batch
                    .iter()
                    .map(|s| mtp_targets((&s.tokens, s.prompt_len, None), k))
                    .sum()
            })
            .collect();
        let (padded, ps) = mtp_loss_padded(&model, &batch, &totals).unwrap().unwrap();
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
        rl_loss_into(
            &model,
            &batch,
            &Objective::default(),
            &mut load,
            usize::MAX,
            &mut Sink::Graph(None),
        )
        .unwrap();
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
        sft_loss_into(
            &model,
            &sft,
            &mut sft_load,
            usize::MAX,
            &mut Sink::Graph(None),
        )
        .unwrap();
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
        let lp = completion_logprobs(&model, &batch, usize::MAX).unwrap();
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

    /// Largest difference between `got` and `want`'s gradients of `params` (every parameter
    /// with a gradient in `want` must have one in `got`), as a fraction of the largest value.
    fn gradient_mismatch(params: &Params, got: &GradStore, want: &GradStore) -> f32 {
        let mut compared = 0;
        let mut worst = 0f32;
        for (name, var) in params.vars() {
            let Some(e) = want.get(var.as_tensor()) else {
                continue;
            };
            let a = got
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (a, e) = (flat(a), flat(e));
            let scale = e.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            let diff = a
                .iter()
                .zip(&e)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(diff / scale);
            compared += 1;
        }
        assert!(compared > 10, "compared {compared} gradients");
        worst
    }

    #[test]
    fn forward_passes_cover_the_batch_within_the_token_limit() {
        let lengths = [4usize, 5, 13, 14, 5, 40];
        // `forward_passes` reads only the lengths; the views stand in for sequences of them.
        let tokens = [1u32; 40];
        let views: Vec<SeqView<'_>> = lengths.iter().map(|&n| (&tokens[..n], 1, None)).collect();
        for limit in [1, 12, 30, usize::MAX] {
            let passes = forward_passes(&views, limit);
            let mut seen: Vec<usize> = passes.concat();
            seen.sort();
            assert_eq!(
                seen,
                (0..lengths.len()).collect::<Vec<_>>(),
                "limit {limit}"
            );
            for pass in &passes {
                let width = pass.iter().map(|&i| lengths[i]).max().unwrap();
                assert!(
                    pass.len() == 1 || pass.len() * width <= limit,
                    "limit {limit}: {pass:?}"
                );
            }
        }
        assert_eq!(forward_passes(&views, usize::MAX), length_buckets(&lengths));
        assert_eq!(
            forward_passes(&views, 12),
            vec![vec![0, 1], vec![4], vec![2], vec![3], vec![5]]
        );
    }

    /// The RL loss runs its forward passes in length buckets cut to a token limit, each
    /// back-propagated on its own in a training step; its value and every parameter's gradient
    /// must be those of one padded pass over the whole batch, for every aggregation (each
    /// normalises by a different batch total).
    #[test]
    fn rl_loss_in_passes_equals_one_padded_pass() {
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
                ref_logprobs: Some(vec![-3.0; len - prompt_len]),
                loss_mask: (k == 3).then(|| vec![true, false, true]),
            })
            .collect();
        let views: Vec<SeqView<'_>> = batch
            .iter()
            .map(|s| (s.tokens.as_slice(), s.prompt_len, s.loss_mask.as_deref()))
            .collect();
        assert!(
            forward_passes(&views, usize::MAX).len() > 1,
            "several buckets"
        );
        assert_eq!(
            forward_passes(&views, 12).len(),
            4,
            "buckets cut by the limit"
        );

        // One padded pass, as the loss was computed before it ran in buckets.
        let l = layout(&views, 24, &Device::Cpu).unwrap();
        let (b, w) = (batch.len(), l.width);
        let (lp, _) = token_logprobs(&model, &l, None).unwrap();
        let current: Vec<f32> = lp.detach().flatten_all().unwrap().to_vec1().unwrap();
        let (mut behaviour, mut reference) = (vec![0f32; b * w], vec![0f32; b * w]);
        for (i, s) in batch.iter().enumerate() {
            let first = i * w + s.prompt_len - 1;
            let n = s.behavior_logprobs.len();
            behaviour[first..first + n].copy_from_slice(&s.behavior_logprobs);
            reference[first..first + n].copy_from_slice(s.ref_logprobs.as_ref().unwrap());
        }
        let mask: Vec<bool> = l.mask.iter().map(|&m| m > 0.0).collect();
        let advantages: Vec<f32> = batch.iter().map(|s| s.advantage).collect();
        for aggregation in crate::objective::Aggregation::NAMES {
            // Truncated importance sampling and the KL make the gradient depend on the
            // log-probabilities' values, not only on where they sit.
            let mut objective = Objective::default();
            for (key, value) in [
                ("correction", "tis"),
                ("aggregation", aggregation),
                ("kl_coef", "0.2"),
            ] {
                objective.set(key, value).unwrap();
            }
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
                    ref_logprobs: Some(&reference),
                },
            )
            .unwrap();
            let g =
                Tensor::from_vec(evaluation.grad_logprobs.clone(), (b, w), &Device::Cpu).unwrap();
            let want = (&lp * g).unwrap().sum_all().unwrap().backward().unwrap();

            let (surrogate, stats) = rl_loss(&model, &batch, &objective).unwrap();
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * y.abs().max(1.0);
            assert!(close(stats.loss, evaluation.loss), "{aggregation}");
            assert!(close(stats.kl, evaluation.kl), "{aggregation}");
            let got = surrogate.backward().unwrap();
            let off = gradient_mismatch(&params, &got, &want);
            assert!(off <= 1e-4, "{aggregation}, one graph: off by {off}");

            let mut grads = GradStore::default();
            let mut sink = Sink::backward(&mut grads, 0.5, &params);
            let mut load = ExpertLoad::new();
            let cut = rl_loss_into(&model, &batch, &objective, &mut load, 12, &mut sink).unwrap();
            assert!(close(cut.loss, evaluation.loss), "{aggregation}");
            assert_eq!(cut.tokens, evaluation.tokens);
            // Only the parameters' gradients are kept, not those of each pass's constants.
            assert!(grads.get_ids().count() <= params.vars().len());
            for var in params.vars().values() {
                if let Some(g) = grads.remove(var.as_tensor()) {
                    grads.insert(var.as_tensor(), (g * 2.0).unwrap());
                }
            }
            let off = gradient_mismatch(&params, &grads, &want);
            assert!(
                off <= 1e-4,
                "{aggregation}, passes of 12 tokens: off by {off}"
            );
        }
    }

    /// SFT and MTP steps back-propagate pass by pass too: the same gradient as one graph.
    #[test]
    fn sft_and_mtp_losses_in_passes_equal_one_graph() {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "M*E", "mamba_num_heads": 2, "mamba_head_dim": 8,
            "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "moe_shared_expert_intermediate_size": 8, "num_nextn_predict_layers": 1,
            "chorus": {"mtp_depth": 2}}"#,
        )
        .unwrap();
        let params = init_params(&cfg, 5, &Device::Cpu).unwrap();
        let model = NemotronH::new(&cfg, &params).unwrap();
        let batch = sft_batch(&[(6, 1, 6)]);
        let backward = |limit: usize, mtp: bool| {
            let mut grads = GradStore::default();
            let mut sink = Sink::backward(&mut grads, 1.0, &params);
            let stats = if mtp {
                mtp_loss_into(&model, &batch, limit, &mut sink).unwrap()
            } else {
                sft_loss_into(&model, &batch, &mut ExpertLoad::new(), limit, &mut sink).unwrap()
            };
            (grads, stats)
        };
        let (sft, sft_stats) = sft_loss(&model, &batch).unwrap();
        let want = sft.backward().unwrap();
        let (got, stats) = backward(10, false);
        assert!((stats.loss - sft_stats.loss).abs() < 1e-6);
        assert_eq!(stats.tokens, sft_stats.tokens);
        let off = gradient_mismatch(&params, &got, &want);
        assert!(off <= 1e-5, "sft: off by {off}");

        let (mtp, mtp_stats) = mtp_loss(&model, &batch).unwrap();
        // A mean over the two depths of cross-entropies near ln(vocab) for random weights, not
        // their sum.
        let uniform = (24f64).ln();
        assert!(
            (0.5 * uniform..1.5 * uniform).contains(&mtp_stats.loss),
            "{}",
            mtp_stats.loss
        );
        let want = mtp.backward().unwrap();
        let (got, stats) = backward(10, true);
        assert_eq!(stats.tokens, mtp_stats.tokens);
        assert!((stats.loss - mtp_stats.loss).abs() < 1e-6);
        let off = gradient_mismatch(&params, &got, &want);
        assert!(off <= 1e-5, "mtp: off by {off}");
    }
}
