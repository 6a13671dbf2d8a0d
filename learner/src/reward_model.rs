//! A Bradley–Terry reward model on the policy's backbone: a scalar score head
//! (`score_head.weight`, `[1, hidden_size]`) reads the final-normed hidden state of each
//! sequence's last token, and pairs of sequences (chosen, rejected) train backbone and head on
//! `mean(-log sigmoid(s_chosen - s_rejected))`.
//!
//! A reward-model checkpoint is a policy checkpoint plus one file: `config.json` and the
//! backbone's weights exactly as [`checkpoint::save_checkpoint`] writes them, and the head in
//! [`SCORE_HEAD_FILE`]. The head stays out of the policy's weights because
//! [`chorus_model::Params`] keeps every tensor it is given: a head inside `model.safetensors`
//! would ride along as a parameter of any policy loaded from the directory (into a trainer's
//! optimizer, the weight stream to the workers and every checkpoint after). Apart, the directory
//! loads as a policy unchanged.
//!
//! Invariant, as for the policy trainer: a step whose loss or gradient norm is not finite leaves
//! the weights as they were, and its [`RmStepReport`] says why.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use chorus_model::{NemotronH, NemotronHConfig, Params, checkpoint};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result, config_err};
use crate::optim::{AdamW, AdamWConfig};
use crate::trainer::always_frozen;

/// The score head's tensor name.
pub const SCORE_HEAD: &str = "score_head.weight";
/// The file beside the policy's weights that holds the score head.
pub const SCORE_HEAD_FILE: &str = "score_head.safetensors";

/// Standard deviation of the head's initial weights (HF's `initializer_range`): small, so the
/// first scores sit near 0 and the first steps are not dominated by a random ranking, but not
/// zero, or the backbone would get no gradient until the head had moved.
const HEAD_INIT_STD: f64 = 0.02;

/// Pairs scored per forward pass when evaluating, so evaluation memory does not grow with the
/// evaluation set.
const EVAL_PAIRS_PER_BATCH: usize = 32;

/// The tensors the score depends on: everything under `backbone.`. `lm_head` (when untied) and
/// the MTP head (`mtp.*`) take no part in scoring, so they would only ever see zero gradients;
/// they are kept, unchanged, for the policy's use of the same weights.
const BACKBONE_PREFIX: &str = "backbone.";

/// Two sequences for the same prompt, the first preferred. Both hold the prompt's tokens
/// followed by the response's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The preferred sequence.
    pub chosen: Vec<u32>,
    /// The other sequence.
    pub rejected: Vec<u32>,
}

/// A policy backbone with a scalar score head.
pub struct RewardModel {
    cfg: NemotronHConfig,
    params: Params,
    model: NemotronH,
    head: Var,
}

impl RewardModel {
    /// A reward model on the policy `params` with a new head drawn from `seed`.
    pub fn from_policy(cfg: NemotronHConfig, params: Params, seed: u64) -> Result<Self> {
        let model = NemotronH::new(&cfg, &params)?;
        let hidden = cfg.hidden_size;
        let mut rng = StdRng::seed_from_u64(seed);
        // Uniform with the same standard deviation as N(0, HEAD_INIT_STD²), which needs no
        // normal sampler.
        let bound = (HEAD_INIT_STD * 3f64.sqrt()) as f32;
        let values: Vec<f32> = (0..hidden)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let dtype = model.norm_f().weight().dtype();
        let head = Tensor::from_vec(values, (1, hidden), params.device())?.to_dtype(dtype)?;
        Ok(Self {
            head: Var::from_tensor(&head)?,
            cfg,
            params,
            model,
        })
    }

    /// Loads a directory written by [`RewardModel::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (cfg, params) = checkpoint::load_checkpoint(dir, device)?;
        let path = dir.join(SCORE_HEAD_FILE);
        let checkpoint_err = |message: String| LearnerError::Checkpoint {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(checkpoint_err(
                "no score head here: a policy checkpoint, not a reward model's".into(),
            ));
        }
        let mut tensors = candle_core::safetensors::load(&path, device)
            .map_err(|e| checkpoint_err(e.to_string()))?;
        let head = tensors
            .remove(SCORE_HEAD)
            .ok_or_else(|| checkpoint_err(format!("no tensor `{SCORE_HEAD}`")))?;
        let expected = [1, cfg.hidden_size];
        if head.dims() != expected {
            return Err(checkpoint_err(format!(
                "`{SCORE_HEAD}` has shape {:?}, the model needs {expected:?}",
                head.dims()
            )));
        }
        let model = NemotronH::new(&cfg, &params)?;
        let head = head.to_dtype(model.norm_f().weight().dtype())?;
        Ok(Self {
            head: Var::from_tensor(&head)?,
            cfg,
            params,
            model,
        })
    }

    /// Writes the policy's checkpoint (HF layout) to `dir` and the head beside it in
    /// [`SCORE_HEAD_FILE`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_checkpoint(dir, &self.cfg, &self.params, None)?;
        let path = dir.join(SCORE_HEAD_FILE);
        let head = HashMap::from([(SCORE_HEAD.to_string(), self.head.as_tensor().detach())]);
        candle_core::safetensors::save(&head, &path).map_err(|e| LearnerError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })
    }

    /// The backbone's architecture.
    pub fn config(&self) -> &NemotronHConfig {
        &self.cfg
    }

    /// The backbone's parameters (shared with the model: training them trains it).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The score head `[1, hidden_size]`.
    pub fn head(&self) -> &Var {
        &self.head
    }

    /// The score of each sequence (any lengths, at least one token each).
    pub fn score(&self, sequences: &[Vec<u32>]) -> Result<Vec<f32>> {
        if sequences.is_empty() {
            return Ok(vec![]);
        }
        let views: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        Ok(self
            .scores(&views)?
            .detach()
            .to_dtype(DType::F32)?
            .to_vec1()?)
    }

    /// The fraction of `pairs` whose chosen sequence scores strictly higher (a tie counts as
    /// wrong: the model did not prefer it).
    pub fn pair_accuracy(&self, pairs: &[PreferencePair]) -> Result<f64> {
        if pairs.is_empty() {
            return Err(LearnerError::Batch("no pairs to evaluate".into()));
        }
        let mut right = 0usize;
        for chunk in pairs.chunks(EVAL_PAIRS_PER_BATCH) {
            let (chosen, rejected) = self.pair_scores(chunk)?;
            right += count_preferred(&chosen, &rejected)?;
        }
        Ok(right as f64 / pairs.len() as f64)
    }

    /// The scores `[N]` of the chosen and `[N]` of the rejected sequences of `pairs`, all in
    /// one forward pass; differentiable.
    fn pair_scores(&self, pairs: &[PreferencePair]) -> Result<(Tensor, Tensor)> {
        let n = pairs.len();
        let views: Vec<&[u32]> = pairs
            .iter()
            .map(|p| p.chosen.as_slice())
            .chain(pairs.iter().map(|p| p.rejected.as_slice()))
            .collect();
        let scores = self.scores(&views)?;
        Ok((scores.narrow(0, 0, n)?, scores.narrow(0, n, n)?))
    }

    /// Scores `[N]`, differentiable: the sequences padded on the right into one batch, the
    /// hidden state at each one's last real token, `norm_f`, then the head. The backbone is
    /// causal, so the padding cannot reach the positions read.
    fn scores(&self, sequences: &[&[u32]]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        for (i, s) in sequences.iter().enumerate() {
            if s.is_empty() {
                return Err(LearnerError::Batch(format!("sequence {i} is empty")));
            }
            if let Some(bad) = s.iter().find(|&&t| t as usize >= vocab) {
                return Err(LearnerError::Batch(format!(
                    "sequence {i}: token id {bad} is outside the vocabulary ({vocab})"
                )));
            }
        }
        let n = sequences.len();
        let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        // Any id would do (nothing reads the padded positions); the config's pad token keeps the
        // batch readable.
        let pad = self.cfg.pad_token_id.unwrap_or(0);
        let mut ids = vec![pad; n * width];
        let mut last_rows = Vec::with_capacity(n);
        for (i, s) in sequences.iter().enumerate() {
            ids[i * width..i * width + s.len()].copy_from_slice(s);
            last_rows.push((i * width + s.len() - 1) as u32);
        }
        let device = self.params.device();
        let ids = Tensor::from_vec(ids, (n, width), device)?;
        let hidden = self.model.hidden(&ids)?; // [N, T, H], before norm_f
        let hidden = hidden.reshape((n * width, self.cfg.hidden_size))?;
        let last = hidden.index_select(&Tensor::from_vec(last_rows, n, device)?, 0)?;
        // `norm_f` is per position, so normalising only the rows read is the same as
        // normalising all of them first.
        let normed = self.model.norm_f().forward(&last)?;
        Ok(normed.matmul(&self.head.as_tensor().t()?)?.squeeze(1)?)
    }
}

/// `mean(-log sigmoid(chosen - rejected))` over score tensors `[N]`, differentiable, computed
/// as `softplus(rejected - chosen)` in its stable form (`max(x, 0) + log(1 + exp(-|x|))`), so a
/// large margin either way gives a finite loss and gradient instead of `log(0)` or `exp`
/// overflowing. (candle has no `log1p`: with `y = exp(-|x|) <= 1`, `log(1 + y)` is off by at
/// most about 1e-7 in value, below what f32 resolves, and its back-propagated gradient
/// `y / (1 + y)` carries no such rounding.)
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    let n = chosen.dim(0)?;
    if n == 0 || rejected.dim(0)? != n {
        return Err(LearnerError::Batch(format!(
            "{n} chosen and {} rejected scores: need the same number, at least one",
            rejected.dim(0)?
        )));
    }
    let margin = (chosen - rejected)?;
    Ok(chorus_model::nn::softplus(&margin.neg()?)?.mean_all()?)
}

/// How many pairs have `chosen > rejected`.
fn count_preferred(chosen: &Tensor, rejected: &Tensor) -> Result<usize> {
    let c: Vec<f32> = chosen.detach().to_dtype(DType::F32)?.to_vec1()?;
    let r: Vec<f32> = rejected.detach().to_dtype(DType::F32)?.to_vec1()?;
    Ok(c.iter().zip(&r).filter(|(c, r)| c > r).count())
}

/// What one reward-model step did. `skipped` holds the reason when the update was refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RmStepReport {
    /// Steps attempted so far, this one included.
    pub step: u64,
    /// The Bradley–Terry loss of the batch before the update.
    pub loss: f64,
    /// Fraction of the batch's pairs the model preferred correctly before the update.
    pub accuracy: f64,
    /// Global gradient norm before clipping (NaN when the loss was not finite).
    pub grad_norm: f64,
    /// Why the update was refused, when it was.
    pub skipped: Option<String>,
}

/// The parameters a reward-model step updates: the backbone's, less the buffers the policy
/// trainer never updates, and the head.
fn trainable(model: &RewardModel) -> Vec<(String, Var)> {
    let mut params: Vec<(String, Var)> = model
        .params
        .vars()
        .iter()
        .filter(|(name, _)| name.starts_with(BACKBONE_PREFIX) && !always_frozen(name))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    params.push((SCORE_HEAD.to_string(), model.head.clone()));
    params
}

/// A reward model being trained: AdamW over the backbone (less the buffers the policy trainer
/// never updates) and the head.
pub struct RewardTrainer {
    model: RewardModel,
    optimizer: AdamW,
    step: u64,
}

impl RewardTrainer {
    /// Starts training `model` with fresh optimizer moments.
    pub fn new(model: RewardModel, optimizer: AdamWConfig) -> Result<Self> {
        Ok(Self {
            optimizer: AdamW::new(trainable(&model), optimizer)?,
            model,
            step: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &RewardModel {
        &self.model
    }

    /// The trained model.
    pub fn into_model(self) -> RewardModel {
        self.model
    }

    /// Steps attempted.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update on the Bradley–Terry loss of `pairs` at learning rate `lr`, the gradient's
    /// global norm clipped as the optimizer is configured.
    pub fn step(&mut self, pairs: &[PreferencePair], lr: f64) -> Result<RmStepReport> {
        if pairs.is_empty() {
            return Err(LearnerError::Batch("empty batch".into()));
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(config_err(
                "lr",
                format!("must be finite and >= 0, got {lr}"),
            ));
        }
        self.step += 1;
        let (chosen, rejected) = self.model.pair_scores(pairs)?;
        let loss = bradley_terry_loss(&chosen, &rejected)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let accuracy = count_preferred(&chosen, &rejected)? as f64 / pairs.len() as f64;
        let report = |grad_norm, skipped| RmStepReport {
            step: self.step,
            loss: loss_value,
            accuracy,
            grad_norm,
            skipped,
        };
        if !loss_value.is_finite() {
            return Ok(report(
                f64::NAN,
                Some(format!("loss is not finite ({loss_value})")),
            ));
        }
        let grads = loss.backward()?;
        let norm = self.optimizer.grad_norm(&grads)?;
        if !norm.is_finite() {
            return Ok(report(
                norm,
                Some(format!("gradient norm is not finite ({norm})")),
            ));
        }
        let stats = self.optimizer.step(&grads, lr)?;
        Ok(report(stats.grad_norm, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_model::tokenizer::{BYTE_LEVEL_VOCAB, Tokenizer};

    /// A tiny hybrid (Mamba, attention, MoE) over the byte-level vocabulary.
    fn tiny_config() -> NemotronHConfig {
        NemotronHConfig::from_json_str(&format!(
            r#"{{"model_type": "nemotron_h", "vocab_size": {BYTE_LEVEL_VOCAB}, "hidden_size": 32,
            "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
            "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "moe_shared_expert_intermediate_size": 16, "routed_scaling_factor": 1.0}}"#
        ))
        .unwrap()
    }

    fn tiny_model(seed: u64) -> RewardModel {
        let cfg = tiny_config();
        let params = checkpoint::init_params(&cfg, seed, &Device::Cpu).unwrap();
        RewardModel::from_policy(cfg, params, seed).unwrap()
    }

    fn encode(text: &str) -> Vec<u32> {
        Tokenizer::byte_level().encode(text).unwrap()
    }

    fn pair(chosen: &str, rejected: &str) -> PreferencePair {
        PreferencePair {
            chosen: encode(chosen),
            rejected: encode(rejected),
        }
    }

    #[test]
    fn the_loss_and_its_gradient_match_a_hand_computation() {
        let chosen = [2.0f64, -1.0, 40.0, -40.0];
        let rejected = [0.5f64, 1.0, -40.0, 40.0];
        let c = Var::new(&chosen, &Device::Cpu).unwrap();
        let r = Var::new(&rejected, &Device::Cpu).unwrap();
        let loss = bradley_terry_loss(c.as_tensor(), r.as_tensor()).unwrap();
        let n = chosen.len() as f64;
        // -log sigmoid(d) = log(1 + exp(-d)); for d = -80, exp(80) is finite in f64.
        let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
        let want: f64 = margins.iter().map(|d| (-d).exp().ln_1p()).sum::<f64>() / n;
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "loss {got} vs {want}");
        // The -80 margin costs 80, the others about 0.20 + 2.13 + 0.
        assert!(
            (want - 82.33 / n).abs() < 0.01,
            "the -80 margin dominates: {want}"
        );

        let grads = loss.backward().unwrap();
        let gc: Vec<f64> = grads.get(c.as_tensor()).unwrap().to_vec1().unwrap();
        let gr: Vec<f64> = grads.get(r.as_tensor()).unwrap().to_vec1().unwrap();
        for (i, d) in margins.iter().enumerate() {
            // d/dd log(1 + exp(-d)) = -sigmoid(-d).
            let sigmoid_neg = 1.0 / (1.0 + d.exp());
            assert!(
                (gc[i] + sigmoid_neg / n).abs() < 1e-12,
                "chosen {i}: {}",
                gc[i]
            );
            assert!(
                (gr[i] - sigmoid_neg / n).abs() < 1e-12,
                "rejected {i}: {}",
                gr[i]
            );
        }
        // Stable in f32 too, where exp(80) overflows.
        let c32 = Tensor::new(&[-40f32], &Device::Cpu).unwrap();
        let r32 = Tensor::new(&[40f32], &Device::Cpu).unwrap();
        let big = bradley_terry_loss(&c32, &r32).unwrap();
        assert_eq!(big.to_scalar::<f32>().unwrap(), 80.0);
    }

    #[test]
    fn every_trainable_parameter_gets_a_gradient() {
        let model = tiny_model(3);
        let pairs = [
            pair("3+4=7", "3+4=8"),
            pair("12+9=21", "12+9=20"),
            pair("hello there", "go away now!"),
            pair("1+1=2", "1+1=11"),
        ];
        let (chosen, rejected) = model.pair_scores(&pairs).unwrap();
        let grads = bradley_terry_loss(&chosen, &rejected)
            .unwrap()
            .backward()
            .unwrap();
        let mut missing = vec![];
        let trainable = trainable(&model);
        for (name, var) in &trainable {
            let norm = grads
                .get(var.as_tensor())
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .unwrap_or(0.0);
            if norm == 0.0 || !norm.is_finite() {
                missing.push(name.clone());
            }
        }
        assert!(missing.is_empty(), "no gradient reaches {missing:?}");
        let names: Vec<&str> = trainable.iter().map(|p| p.0.as_str()).collect();
        assert!(names.contains(&SCORE_HEAD));
        assert!(
            names.iter().any(|n| n.contains(".mixer.A_log")),
            "Mamba trains"
        );
        assert!(
            names.iter().any(|n| n.contains(".mixer.q_proj.")),
            "attention trains"
        );
        assert!(
            names.iter().any(|n| n.contains(".mixer.gate.weight")),
            "the router trains"
        );
        assert!(
            !names
                .iter()
                .any(|n| always_frozen(n) || n.starts_with("lm_head")),
            "routing biases and lm_head stay out: {names:?}"
        );
    }

    #[test]
    fn right_padding_does_not_change_a_score() {
        let model = tiny_model(5);
        let short = encode("7+8=15");
        // Longer than two SSM chunks, so the short one is padded across chunk boundaries.
        let long = encode("a longer sequence of about thirty bytes");
        let alone = model.score(std::slice::from_ref(&short)).unwrap()[0];
        let padded = model.score(&[short.clone(), long.clone()]).unwrap();
        let long_alone = model.score(std::slice::from_ref(&long)).unwrap()[0];
        assert!((alone - padded[0]).abs() < 1e-5, "{alone} vs {}", padded[0]);
        assert!((long_alone - padded[1]).abs() < 1e-5);
        // Reads the last token, not the first or a pad: a different ending, a different score.
        let other = model.score(&[encode("7+8=16")]).unwrap()[0];
        assert_ne!(alone, other);
    }

    #[test]
    fn the_score_reads_the_final_normed_state_of_the_last_token() {
        let model = tiny_model(5);
        let d = model.config().hidden_size;
        // A norm_f scale that is not all ones, so leaving the scale out would show.
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + 0.05 * i as f32).collect();
        model.params().vars()["backbone.norm_f.weight"]
            .set(&Tensor::new(gamma.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        let sequence = encode("12+30=42");
        let ids = Tensor::new(sequence.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden: Vec<Vec<f32>> = model
            .model
            .hidden(&ids)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let last = hidden.last().unwrap();
        let head: Vec<f32> = model.head().flatten_all().unwrap().to_vec1().unwrap();
        let mean_square = last.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / d as f64;
        let rms = (mean_square + model.config().norm_eps).sqrt();
        let want: f64 = (0..d)
            .map(|i| last[i] as f64 / rms * gamma[i] as f64 * head[i] as f64)
            .sum();
        let got = model.score(&[sequence]).unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// `a+b=` prompts with a, b in 0..5, each with its correct single-digit sum preferred to
    /// each wrong digit, split into training pairs and held-out pairs by a fixed rule. Every
    /// prompt is in both sets, every digit is correct for some prompt and wrong for others, and
    /// held-out pairs put a prompt with a wrong answer it was never trained against: ranking
    /// them takes scoring how an answer fits its prompt, not which answers are good in general.
    /// (Held-out prompts, i.e. learning addition itself, are beyond a model this size in a test's
    /// budget.)
    fn addition_preferences() -> (Vec<PreferencePair>, Vec<PreferencePair>) {
        let (mut train, mut held_out) = (vec![], vec![]);
        for a in 0..5 {
            for b in 0..5 {
                let sum = a + b;
                for wrong in (0..10).filter(|&w| w != sum) {
                    let p = pair(&format!("{a}+{b}={sum}"), &format!("{a}+{b}={wrong}"));
                    if (a * 5 + b + wrong) % 3 == 0 {
                        held_out.push(p);
                    } else {
                        train.push(p);
                    }
                }
            }
        }
        (train, held_out)
    }

    #[test]
    fn learns_to_prefer_correct_sums_on_held_out_pairs() {
        let (train, held_out) = addition_preferences();
        assert!(train.iter().all(|p| !held_out.contains(p)), "disjoint");
        let mut trainer = RewardTrainer::new(tiny_model(11), AdamWConfig::default()).unwrap();
        let before = trainer.model().pair_accuracy(&held_out).unwrap();
        assert!(
            before < 0.8,
            "the untrained model already ranks them: {before}"
        );

        let (steps, batch, peak_lr) = (500, 16, 3e-3);
        let mut rng = StdRng::seed_from_u64(11);
        let mut first_loss = None;
        for i in 0..steps {
            let pairs: Vec<PreferencePair> = (0..batch)
                .map(|_| train[rng.random_range(0..train.len())].clone())
                .collect();
            // Linear decay to 0, so the last steps settle instead of jumping around.
            let lr = peak_lr * (1.0 - i as f64 / steps as f64);
            let report = trainer.step(&pairs, lr).unwrap();
            assert_eq!(report.skipped, None, "step {i}");
            first_loss.get_or_insert(report.loss);
        }
        let train_accuracy = trainer.model().pair_accuracy(&train).unwrap();
        let held_out_accuracy = trainer.model().pair_accuracy(&held_out).unwrap();
        assert!(
            held_out_accuracy >= 0.8,
            "held-out accuracy {held_out_accuracy} (training pairs {train_accuracy}, before {before})"
        );
        let last_loss = bradley_terry_loss_of(trainer.model(), &train);
        assert!(
            last_loss < first_loss.unwrap(),
            "{last_loss} vs {first_loss:?}"
        );
    }

    fn bradley_terry_loss_of(model: &RewardModel, pairs: &[PreferencePair]) -> f64 {
        let (chosen, rejected) = model.pair_scores(pairs).unwrap();
        bradley_terry_loss(&chosen, &rejected)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    #[test]
    fn a_non_finite_loss_changes_nothing() {
        let mut trainer = RewardTrainer::new(tiny_model(7), AdamWConfig::default()).unwrap();
        let before = trainer.model.params.snapshot().unwrap();
        let head = trainer.model.head.as_tensor().detach().copy().unwrap();
        trainer
            .model
            .head
            .set(&head.affine(0.0, f64::NAN).unwrap())
            .unwrap();
        let report = trainer.step(&[pair("1+1=2", "1+1=3")], 1e-2).unwrap();
        assert!(report.skipped.is_some(), "{report:?}");
        for (name, t) in trainer.model.params.snapshot().unwrap() {
            let diff = (&t - &before[&name])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name} moved");
        }
    }

    #[test]
    fn a_saved_model_scores_the_same_and_loads_as_a_policy() {
        let mut trainer = RewardTrainer::new(tiny_model(9), AdamWConfig::default()).unwrap();
        // One step, so the saved backbone and head are not the initial ones.
        trainer.step(&[pair("2+2=4", "2+2=5")], 1e-2).unwrap();
        let model = trainer.into_model();
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();

        let sequences = vec![encode("2+2=4"), encode("2+2=5"), encode("something else")];
        let loaded = RewardModel::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(
            model.score(&sequences).unwrap(),
            loaded.score(&sequences).unwrap()
        );

        let (cfg, policy) = checkpoint::load_checkpoint(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(
            policy.names().collect::<Vec<_>>(),
            model.params().names().collect::<Vec<_>>(),
            "the policy holds exactly the backbone's tensors, no head"
        );
        let ids = Tensor::new(&[[3u32, 40, 41, 42]], &Device::Cpu).unwrap();
        let logits = |m: &NemotronH| -> Vec<f32> {
            m.forward(&ids)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(
            logits(&NemotronH::new(&cfg, &policy).unwrap()),
            logits(&model.model)
        );

        // A policy checkpoint is not a reward model: the error says so.
        let policy_dir = tempfile::tempdir().unwrap();
        checkpoint::save_checkpoint(policy_dir.path(), &cfg, &policy, None).unwrap();
        let err = RewardModel::load(policy_dir.path(), &Device::Cpu)
            .err()
            .expect("no head");
        assert!(err.to_string().contains("no score head"), "{err}");
    }
}
