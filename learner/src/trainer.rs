//! The trainer: one policy, its optimizer and schedule; RL and SFT steps that refuse to apply
//! non-finite updates; checkpoints that resume exactly.
//!
//! Beside the gradient step, the trainer keeps two pieces of stage-level state:
//! - **The KL reference.** An RL stage whose objective has `kl_coef > 0` penalises the KL to the
//!   policy at the stage's start. [`Trainer::enter_stage`] snapshots that policy (a frozen copy
//!   on its own `Var`s) at the stage's first step and drops it when a stage without a penalty
//!   begins; penalised steps get their sequences' `ref_logprobs` from it.
//! - **Router load balancing.** After every applied step, each MoE block's
//!   `e_score_correction_bias` moves by `router_bias_rate` towards balance from the step's expert
//!   counts (aux-loss-free balancing, DeepSeek-V3's rule), whether or not the router's
//!   `gate.weight` is frozen for the step ([`Trainer::set_router_frozen`]).
//!
//! SFT and RL steps never move the MTP head (`mtp.*`): it drafts for speculative decoding and
//! is not the policy their objectives are about. MTP-healing steps ([`Trainer::mtp_step`]) move
//! it alone, on the completions the policy wrote.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use chorus_model::{
    ExpertLoad, ModelError, NemotronH, NemotronHConfig, Nvfp4Policy, Params, checkpoint,
    fuse_experts,
};
use chorus_proto::schedule::LrSchedule;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result, config_err};
use crate::loss::{
    LossStats, RlSequence, SftSequence, Sink, completion_logprobs, mtp_loss_into, rl_loss_into,
    sft_loss_into,
};
use crate::objective::Objective;
use crate::optim::{AdamW, AdamWConfig};

/// File names a learner checkpoint adds to the HF layout.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The step and version counters of a learner checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// The KL reference policy's weights, in a learner checkpoint saved while one is held, so that
/// a KL-penalised stage resumed mid-way keeps the policy of its start as its reference.
pub const REFERENCE_FILE: &str = "reference.safetensors";

/// The default of [`LearnerConfig::router_bias_rate`].
pub const DEFAULT_ROUTER_BIAS_RATE: f64 = 1e-3;

/// The default of [`LearnerConfig::micro_batch_tokens`]: a pass's activations stay within a
/// few hundred MB on the small policies Chorus' learner serves, and GEMMs over this many rows
/// run as fast per row as over more.
pub const DEFAULT_MICRO_BATCH_TOKENS: usize = 8192;

/// Learner settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnerConfig {
    /// The optimizer.
    pub optimizer: AdamWConfig,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// The RL objective of groups that do not name their own.
    pub objective: Objective,
    /// Parameters whose names contain any of these strings are never updated (e.g. `"mtp."`
    /// keeps the MTP head out of MTP-healing steps too, which SFT and RL steps leave alone
    /// regardless; `".gate.weight"` freezes the routers in every step, where a group's
    /// `router_frozen` freezes them in its step only). Routed experts train as one tensor per
    /// block and projection (`….mixer.experts.up_proj`, see `chorus_model::Params`), so a
    /// string can freeze all of a block's experts, not one of them.
    pub freeze: Vec<String>,
    /// Run the forward pass through NVFP4 weights with straight-through gradients, quantizing
    /// the projections NVFP4 rollout workers quantize, so the policy being optimised is the one
    /// the workers sample from; the policy is the workers' own type, so both sides always make
    /// the same choice (`workers.quantize = "nvfp4"`, `workers.keep_attention_f32`). `None`:
    /// full precision.
    pub nvfp4_forward: Option<Nvfp4Policy>,
    /// Aux-loss-free load balancing of MoE routers: after every applied step, each block's
    /// `e_score_correction_bias` (which only chooses experts, never weighs them) moves by this
    /// much per expert, up for experts the step's real tokens chose less often than the block's
    /// mean and down for those chosen more often. 0 turns it off.
    pub router_bias_rate: f64,
    /// Most padded tokens (sequences times the longest one's length) in one forward and
    /// backward pass. A step's batch runs as passes of sequences of similar length, each
    /// back-propagated before the next begins, so the learner's memory follows this rather
    /// than the batch; the gradient is the whole batch's exactly. A sequence longer than this
    /// runs alone.
    pub micro_batch_tokens: usize,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            optimizer: AdamWConfig::default(),
            schedule: LrSchedule::default(),
            objective: Objective::default(),
            freeze: vec![],
            nvfp4_forward: None,
            router_bias_rate: DEFAULT_ROUTER_BIAS_RATE,
            micro_batch_tokens: DEFAULT_MICRO_BATCH_TOKENS,
        }
    }
}

/// What one step did. `skipped` holds the reason when the update was refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps attempted so far, this one included.
    pub step: u64,
    /// Policy version after the step (advanced even when skipped; the weights are not).
    pub version: u64,
    /// Learning rate of the step (0 when skipped).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Statistics of the objective.
    pub stats: LossStats,
    /// Why the update was refused, when it was.
    pub skipped: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    version: u64,
    optimizer_steps: u64,
    config: LearnerConfig,
    /// The stage of the last step trained (absent in checkpoints older than the field).
    #[serde(default)]
    stage: Option<u32>,
    /// Whether [`REFERENCE_FILE`] holds the KL reference.
    #[serde(default)]
    reference: bool,
}

/// A frozen copy of the policy: its own `Var`s, which no optimizer ever sees.
struct Reference {
    params: Params,
    model: NemotronH,
}

/// What kind of update a step is; it decides which parameters the step may move.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Rl,
    Sft,
    /// MTP healing: the MTP head alone moves.
    Mtp,
}

/// A policy being trained.
pub struct Trainer {
    model_cfg: NemotronHConfig,
    params: Params,
    model: NemotronH,
    optimizer: AdamW,
    config: LearnerConfig,
    step: u64,
    version: u64,
    /// Peak learning rate set by the current stage, replacing the schedule's.
    peak_lr_override: Option<f64>,
    /// The policy at the start of the current stage, held while the stage penalises the KL to it.
    reference: Option<Reference>,
    /// The stage of the last step trained; `None` before the first.
    stage: Option<u32>,
    /// Whether steps leave the routers' `gate.weight` as they are.
    router_frozen: bool,
}

/// Routing biases are buffers adjusted by load balancing, never by gradients.
pub(crate) fn always_frozen(name: &str) -> bool {
    name.ends_with("e_score_correction_bias")
}

/// A MoE router's weight (`….mixer.gate.weight`), frozen by [`Trainer::set_router_frozen`].
fn is_router_weight(name: &str) -> bool {
    name.ends_with(".gate.weight")
}

/// The MTP head's parameters, which RL steps leave alone.
fn is_mtp(name: &str) -> bool {
    name.starts_with("mtp.")
}

/// The policy over `params`, through NVFP4 weights when `nvfp4` says so.
fn build_model(
    cfg: &NemotronHConfig,
    params: &Params,
    nvfp4: Option<&Nvfp4Policy>,
) -> Result<NemotronH> {
    Ok(match nvfp4 {
        Some(policy) => NemotronH::new_nvfp4(cfg, params, policy)?,
        None => NemotronH::new(cfg, params)?,
    })
}

impl Trainer {
    /// Starts training `params` at version 0.
    pub fn new(model_cfg: NemotronHConfig, params: Params, config: LearnerConfig) -> Result<Self> {
        config
            .objective
            .validate()
            .map_err(|e| config_err(&e.setting, e.message))?;
        if !(config.router_bias_rate >= 0.0 && config.router_bias_rate.is_finite()) {
            return Err(config_err(
                "router_bias_rate",
                format!(
                    "must be a finite number >= 0, got {}",
                    config.router_bias_rate
                ),
            ));
        }
        if config.micro_batch_tokens == 0 {
            return Err(config_err(
                "micro_batch_tokens",
                "must be at least 1 (the most padded tokens in one forward pass)",
            ));
        }
        let model = build_model(&model_cfg, &params, config.nvfp4_forward.as_ref())?;
        let trainable = params
            .vars()
            .iter()
            .filter(|(n, _)| {
                !always_frozen(n) && !config.freeze.iter().any(|f| n.contains(f.as_str()))
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let optimizer = AdamW::new(trainable, config.optimizer.clone())?;
        Ok(Self {
            model_cfg,
            params,
            model,
            optimizer,
            config,
            step: 0,
            version: 0,
            peak_lr_override: None,
            reference: None,
            stage: None,
            router_frozen: false,
        })
    }

    /// Numbers the current weights as policy `version` (and the steps taken as that many): a
    /// run resumed from a stage's checkpoint, which holds weights but no learner counters,
    /// continues from the version the stage ended at. Never goes back.
    pub fn skip_to_version(&mut self, version: u64) {
        if version > self.version {
            self.step += version - self.version;
            self.version = version;
        }
    }

    /// Counts a step that could not be taken at all (an empty batch, an error before the
    /// update): the clock advances as for any skipped step (see [`Trainer::version`]), the
    /// weights stay.
    pub fn skip_step(&mut self) {
        self.step += 1;
        self.version += 1;
    }

    /// Replaces the schedule's peak learning rate (a stage's own rate); `None` restores it.
    pub fn set_peak_lr(&mut self, peak: Option<f64>) {
        self.peak_lr_override = peak.filter(|p| *p > 0.0 && p.is_finite());
    }

    /// The policy version: the number of steps taken. A skipped step leaves the weights as they
    /// were but still advances the version (the same weights under the next number), so that the
    /// orchestrator's staleness clock never stalls on a refused update.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Steps attempted.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The parameters being trained.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The policy.
    pub fn model(&self) -> &NemotronH {
        &self.model
    }

    /// The objective of RL steps whose groups name none.
    pub fn default_objective(&self) -> &Objective {
        &self.config.objective
    }

    /// The policy's architecture.
    pub fn model_config(&self) -> &NemotronHConfig {
        &self.model_cfg
    }

    /// The stage of the last step trained (`None` before the first, and for a trainer resumed
    /// from a checkpoint that did not record it).
    pub fn stage(&self) -> Option<u32> {
        self.stage
    }

    /// Prepares a step of `stage`; `kl_penalty` says whether any part of the step has
    /// `kl_coef > 0`. Called before every step (the service does, with the stage its groups
    /// carry).
    ///
    /// The first step of a new stage (or the first step this trainer sees) finds the weights the
    /// previous stage ended with, which are the new stage's starting policy: with a penalty they
    /// become the reference ([`Trainer::set_reference`]); without one any reference is dropped,
    /// so a second copy of the weights is held only during KL-penalised stages. Within a stage
    /// the reference stays, except that a penalised step finding none (the stage's first steps
    /// had no penalty: its environments name different objectives) snapshots the current
    /// weights then, a later start than the stage's, with a warning.
    pub fn enter_stage(&mut self, stage: u32, kl_penalty: bool) -> Result<()> {
        if self.stage != Some(stage) {
            self.stage = Some(stage);
            if kl_penalty {
                self.set_reference()?;
            } else {
                self.clear_reference();
            }
        } else if kl_penalty && self.reference.is_none() {
            tracing::warn!(
                stage,
                policy_version = self.version,
                "a KL-penalised step in a stage that began without a reference: the policy of \
                 version {} is the reference from now on",
                self.version
            );
            self.set_reference()?;
        }
        Ok(())
    }

    /// Takes the current weights as the reference policy of the KL penalty, replacing any: a
    /// frozen copy on its own `Var`s (the same NVFP4 forward pass as the policy's), so that
    /// training does not move it and the first step's KL is exactly 0.
    pub fn set_reference(&mut self) -> Result<()> {
        // Dropped first, so that two old copies are never held at once.
        self.reference = None;
        let params = self.params.detached_copy()?;
        let model = build_model(&self.model_cfg, &params, self.config.nvfp4_forward.as_ref())?;
        self.reference = Some(Reference { params, model });
        Ok(())
    }

    /// Drops the reference policy and the memory it holds.
    pub fn clear_reference(&mut self) {
        self.reference = None;
    }

    /// Whether a reference policy is held.
    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// The reference policy's log-probability of each completion token of each sequence of
    /// `batch` (no gradient), or `None` without a reference.
    pub fn reference_logprobs(&self, batch: &[RlSequence]) -> Result<Option<Vec<Vec<f32>>>> {
        self.reference
            .as_ref()
            .map(|r| completion_logprobs(&r.model, batch, self.config.micro_batch_tokens))
            .transpose()
    }

    /// `batch` with the reference's log-probabilities filled in when `objective` penalises the KL
    /// and a reference is held (replacing any the sequences carry); otherwise `batch` as it is,
    /// so that a caller without a reference may still bring its own `ref_logprobs`.
    fn with_reference_logprobs<'a>(
        &self,
        objective: &Objective,
        batch: &'a [RlSequence],
    ) -> Result<Cow<'a, [RlSequence]>> {
        if objective.kl_coef <= 0.0 || batch.is_empty() {
            return Ok(Cow::Borrowed(batch));
        }
        let Some(reference) = self.reference_logprobs(batch)? else {
            return Ok(Cow::Borrowed(batch));
        };
        Ok(Cow::Owned(
            batch
                .iter()
                .zip(reference)
                .map(|(s, r)| RlSequence {
                    ref_logprobs: Some(r),
                    ..s.clone()
                })
                .collect(),
        ))
    }

    /// Freezes (or unfreezes) the MoE routers' `gate.weight` for the following steps: their
    /// gradients are left out of the update (and of the clipped norm). Load balancing still
    /// moves `e_score_correction_bias`.
    pub fn set_router_frozen(&mut self, frozen: bool) {
        self.router_frozen = frozen;
    }

    /// One RL update on `batch` with the configured objective.
    pub fn rl_step(&mut self, batch: &[RlSequence]) -> Result<StepReport> {
        let objective = self.config.objective.clone();
        self.rl_step_mixed(&[(&objective, batch)])
    }

    /// One RL update on sequences that follow different objectives (a stage whose
    /// environments name their own): each part's loss weighs by its share of the sequences.
    ///
    /// Parts with `kl_coef > 0` get their `ref_logprobs` from the reference policy when one is
    /// held. The reported `kl` is then the KL estimate to the reference over those parts;
    /// without any penalised part, it is the k3 divergence between sampler and learner.
    pub fn rl_step_mixed(&mut self, parts: &[(&Objective, &[RlSequence])]) -> Result<StepReport> {
        let total: usize = parts.iter().map(|(_, b)| b.len()).sum();
        if total == 0 {
            return Err(LearnerError::Batch("empty batch".into()));
        }
        let parts = parts
            .iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(o, b)| Ok((*o, self.with_reference_logprobs(o, b)?)))
            .collect::<Result<Vec<_>>>()?;
        let penalised_share: f64 = parts
            .iter()
            .filter(|(o, _)| o.kl_coef > 0.0)
            .map(|(_, b)| b.len() as f64 / total as f64)
            .sum();
        let mut grads = GradStore::default();
        let mut stats = LossStats::default();
        let mut load = ExpertLoad::new();
        for (objective, batch) in &parts {
            let share = batch.len() as f64 / total as f64;
            let s = rl_loss_into(
                &self.model,
                batch,
                objective,
                &mut load,
                self.config.micro_batch_tokens,
                &mut Sink::backward(&mut grads, share, &self.params),
            )?;
            stats.loss += share * s.loss;
            // One meaning per step: the KL to the reference where the step has a penalty.
            if penalised_share == 0.0 {
                stats.kl += share * s.kl;
            } else if objective.kl_coef > 0.0 {
                stats.kl += share / penalised_share * s.kl;
            }
            stats.entropy += share * s.entropy;
            stats.clip_fraction += share * s.clip_fraction;
            stats.mean_abs_logprob_diff += share * s.mean_abs_logprob_diff;
            stats.tokens += s.tokens;
        }
        self.apply(grads, stats, &load, StepKind::Rl)
    }

    /// One supervised update on reference solutions.
    pub fn sft_step(&mut self, batch: &[SftSequence]) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(LearnerError::Batch("empty batch".into()));
        }
        let mut load = ExpertLoad::new();
        let mut grads = GradStore::default();
        let stats = sft_loss_into(
            &self.model,
            batch,
            &mut load,
            self.config.micro_batch_tokens,
            &mut Sink::backward(&mut grads, 1.0, &self.params),
        )?;
        self.apply(grads, stats, &load, StepKind::Sft)
    }

    /// One update of the MTP head alone on `batch` ([`mtp_loss`]): the backbone, `lm_head` and
    /// the embeddings the head shares stay as they are, and the routers' biases are not
    /// balanced (the backbone's routing did not train).
    pub fn mtp_step(&mut self, batch: &[SftSequence]) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(LearnerError::Batch("empty batch".into()));
        }
        let mut grads = GradStore::default();
        let stats = mtp_loss_into(
            &self.model,
            batch,
            self.config.micro_batch_tokens,
            &mut Sink::backward(&mut grads, 1.0, &self.params),
        )?;
        self.apply(grads, stats, &ExpertLoad::new(), StepKind::Mtp)
    }

    /// Aux-loss-free load balancing (DeepSeek-V3): every MoE block's `e_score_correction_bias`
    /// moves by `router_bias_rate` per expert towards balance,
    /// `bias_i += rate * sign(mean_load - load_i)`, from the step's counts. Exact in integers:
    /// `load_i` against the mean is `load_i * experts` against the total. A bias that
    /// `freeze` names stays as it is.
    fn balance_routers(&self, load: &ExpertLoad) -> Result<()> {
        let rate = self.config.router_bias_rate;
        if rate == 0.0 {
            return Ok(());
        }
        let frozen = |name: &str| self.config.freeze.iter().any(|f| name.contains(f.as_str()));
        for (name, counts) in load.blocks().filter(|(name, _)| !frozen(name)) {
            let var = self.params.vars().get(name).ok_or_else(|| {
                LearnerError::Model(ModelError::MissingTensor {
                    name: name.to_string(),
                })
            })?;
            let total: u64 = counts.iter().sum();
            let experts = counts.len() as u64;
            let delta: Vec<f32> = counts
                .iter()
                .map(|&c| match total.cmp(&(c * experts)) {
                    // Chosen less often than the mean: make it easier to choose.
                    Ordering::Greater => rate as f32,
                    Ordering::Less => -rate as f32,
                    Ordering::Equal => 0.0,
                })
                .collect();
            let delta =
                Tensor::from_vec(delta, counts.len(), var.device())?.to_dtype(var.dtype())?;
            var.set(&(var.as_tensor().detach() + delta)?)?;
        }
        Ok(())
    }

    /// Steps on `grads`, the gradient of the loss whose value is `stats.loss`, then balances the
    /// routers by the step's expert `load`.
    fn apply(
        &mut self,
        grads: GradStore,
        stats: LossStats,
        load: &ExpertLoad,
        kind: StepKind,
    ) -> Result<StepReport> {
        // Which of the optimised parameters this step may move. The MTP head gets no gradient
        // from the SFT or RL loss today; excluding it by name keeps it untouched should that
        // change, and the MTP loss reaches only the head (the backbone's state is detached).
        let router_frozen = self.router_frozen;
        let updated = move |name: &str| match kind {
            StepKind::Mtp => is_mtp(name),
            StepKind::Rl | StepKind::Sft => {
                !(is_mtp(name) || (router_frozen && is_router_weight(name)))
            }
        };
        self.step += 1;
        let lr = match self.peak_lr_override {
            Some(peak) => LrSchedule {
                peak_lr: peak,
                ..self.config.schedule.clone()
            }
            .lr(self.optimizer.steps()),
            None => self.config.schedule.lr(self.optimizer.steps()),
        };
        let report = |grad_norm, version, skipped| StepReport {
            step: self.step,
            version,
            lr,
            grad_norm,
            stats,
            skipped,
        };
        if !stats.loss.is_finite() {
            // The clock advances, the weights do not (see `version`).
            self.version += 1;
            return Ok(report(
                f64::NAN,
                self.version,
                Some(format!("loss is not finite ({})", stats.loss)),
            ));
        }
        let norm = self.optimizer.grad_norm_where(&grads, &updated)?;
        if !norm.is_finite() {
            self.version += 1;
            return Ok(report(
                norm,
                self.version,
                Some(format!("gradient norm is not finite ({norm})")),
            ));
        }
        let st = self.optimizer.step_with_norm(&grads, lr, &updated, norm)?;
        if kind != StepKind::Mtp {
            self.balance_routers(load)?;
        }
        self.version += 1;
        Ok(report(st.grad_norm, self.version, None))
    }

    /// Writes the weights in HF layout plus optimizer state and step counters to `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_checkpoint(dir, &self.model_cfg, &self.params, None)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let state: std::collections::HashMap<String, Tensor> =
            self.optimizer.state_tensors()?.into_iter().collect();
        candle_core::safetensors::save(&state, &opt_path).map_err(|e| {
            LearnerError::Checkpoint {
                path: opt_path.clone(),
                message: e.to_string(),
            }
        })?;
        if let Some(reference) = &self.reference {
            let path = dir.join(REFERENCE_FILE);
            // The reference's `Var`s never change, so they are saved as they are, uncopied.
            let tensors: std::collections::HashMap<String, Tensor> = reference
                .params
                .vars()
                .iter()
                .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
                .collect();
            candle_core::safetensors::save(&tensors, &path).map_err(|e| {
                LearnerError::Checkpoint {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
        }
        let st = TrainerState {
            step: self.step,
            version: self.version,
            optimizer_steps: self.optimizer.steps(),
            config: self.config.clone(),
            stage: self.stage,
            reference: self.reference.is_some(),
        };
        let path = dir.join(STATE_FILE);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&st).expect("serialises"),
        )
        .map_err(|e| LearnerError::Checkpoint {
            path,
            message: e.to_string(),
        })
    }

    /// Resumes from a directory written by [`Trainer::save`], with the settings saved there,
    /// the stage it was in and its KL reference, if it held one.
    ///
    /// A checkpoint written before the stage was recorded resumes without either: its first
    /// step counts as a stage's first, so a KL-penalised stage takes the policy at the resume
    /// point as its reference.
    pub fn resume(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| LearnerError::Checkpoint {
            path: path.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let st: TrainerState =
            serde_json::from_str(&text).map_err(|e| LearnerError::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let (model_cfg, params) = checkpoint::load_checkpoint(dir, device)?;
        let mut t = Self::new(model_cfg, params, st.config)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let mut tensors: BTreeMap<String, Tensor> =
            candle_core::safetensors::load(&opt_path, device)
                .map_err(|e| LearnerError::Checkpoint {
                    path: opt_path.clone(),
                    message: e.to_string(),
                })?
                .into_iter()
                .collect();
        // Saved before the store fused the routed experts: their moments one per expert.
        fuse_experts(&mut tensors)?;
        t.optimizer.load_state(&tensors, st.optimizer_steps)?;
        t.step = st.step;
        t.version = st.version;
        t.stage = st.stage;
        if st.reference {
            t.reference = Some(t.load_reference(&dir.join(REFERENCE_FILE), device)?);
        }
        Ok(t)
    }

    /// Reads a reference saved by [`Trainer::save`]; it must hold exactly the policy's tensors.
    fn load_reference(&self, path: &Path, device: &Device) -> Result<Reference> {
        let bad = |message: String| LearnerError::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let tensors = checkpoint::load_tensors(path, device)
            .map_err(|e| bad(format!("cannot read the KL reference: {e}")))?;
        // Saved one tensor per expert before the store fused them, or fused since.
        let params = Params::from_tensors(tensors, device)?;
        let saved: BTreeSet<&str> = params.names().collect();
        let policy: BTreeSet<&str> = self.params.names().collect();
        if saved != policy {
            let missing: Vec<_> = policy.difference(&saved).take(3).collect();
            let extra: Vec<_> = saved.difference(&policy).take(3).collect();
            return Err(bad(format!(
                "the KL reference's tensors are not the policy's (missing {missing:?}, extra \
                 {extra:?})"
            )));
        }
        let model = build_model(&self.model_cfg, &params, self.config.nvfp4_forward.as_ref())?;
        Ok(Reference { params, model })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nvfp4_forward_setting_reads_as_the_models_policy() {
        let cfg: LearnerConfig = serde_json::from_str(
            r#"{"nvfp4_forward": {"keep_attention": true, "exclude": ["mtp.*"]}}"#,
        )
        .expect("parses");
        let policy = cfg.nvfp4_forward.expect("set");
        assert!(policy.keep_attention);
        assert!(!policy.quantizes("mtp.eh_proj.weight", 64));
        let partial: LearnerConfig =
            serde_json::from_str(r#"{"nvfp4_forward": {}}"#).expect("defaults fill in");
        assert_eq!(partial.nvfp4_forward, Some(Nvfp4Policy::default()));
        assert!(
            serde_json::from_str::<LearnerConfig>(r#"{"nvfp4_forward": {"keep": true}}"#).is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn the_router_bias_rate_defaults_on_and_must_be_a_rate() {
        let cfg: LearnerConfig = serde_json::from_str("{}").expect("defaults fill in");
        assert_eq!(cfg.router_bias_rate, DEFAULT_ROUTER_BIAS_RATE);
        let model = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 16, "hidden_size": 8,
            "hybrid_override_pattern": "E", "n_routed_experts": 2, "num_experts_per_tok": 1,
            "moe_intermediate_size": 4, "moe_shared_expert_intermediate_size": 4}"#,
        )
        .expect("config");
        for bad in [-1e-3, f64::NAN, f64::INFINITY] {
            let params = checkpoint::init_params(&model, 0, &Device::Cpu).expect("init");
            let config = LearnerConfig {
                router_bias_rate: bad,
                ..Default::default()
            };
            let e = Trainer::new(model.clone(), params, config)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("router_bias_rate"), "{e}");
        }
    }
}
