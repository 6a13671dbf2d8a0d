//! The trainer: one policy, its optimizer and schedule; RL and SFT steps that refuse to apply
//! non-finite updates; checkpoints that resume exactly.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use chorus_model::{NemotronH, NemotronHConfig, Nvfp4Policy, Params, checkpoint};
use chorus_proto::schedule::LrSchedule;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use crate::loss::{LossStats, RlSequence, SftSequence, rl_loss, sft_loss};
use crate::objective::Objective;
use crate::optim::{AdamW, AdamWConfig};

/// File names a learner checkpoint adds to the HF layout.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The step and version counters of a learner checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";

/// Learner settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnerConfig {
    /// The optimizer.
    pub optimizer: AdamWConfig,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// The RL objective of groups that do not name their own.
    pub objective: Objective,
    /// Parameters whose names contain any of these strings are not updated (e.g. `"mtp."`
    /// during RL, `".gate.weight"` to freeze routers).
    pub freeze: Vec<String>,
    /// Run the forward pass through NVFP4 weights with straight-through gradients, quantizing
    /// the projections NVFP4 rollout workers quantize, so the policy being optimised is the one
    /// the workers sample from; the policy is the workers' own type, so both sides always make
    /// the same choice (`workers.quantize = "nvfp4"`, `workers.keep_attention_f32`). `None`:
    /// full precision.
    pub nvfp4_forward: Option<Nvfp4Policy>,
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
}

/// Routing biases are buffers adjusted by load balancing, never by gradients.
pub(crate) fn always_frozen(name: &str) -> bool {
    name.ends_with("e_score_correction_bias")
}

impl Trainer {
    /// Starts training `params` at version 0.
    pub fn new(model_cfg: NemotronHConfig, params: Params, config: LearnerConfig) -> Result<Self> {
        config
            .objective
            .validate()
            .map_err(|e| crate::error::config_err(&e.setting, e.message))?;
        let model = match &config.nvfp4_forward {
            Some(policy) => NemotronH::new_nvfp4(&model_cfg, &params, policy)?,
            None => NemotronH::new(&model_cfg, &params)?,
        };
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

    /// One RL update on `batch` with the configured objective.
    pub fn rl_step(&mut self, batch: &[RlSequence]) -> Result<StepReport> {
        let objective = self.config.objective.clone();
        self.rl_step_mixed(&[(&objective, batch)])
    }

    /// One RL update on sequences that follow different objectives (a stage whose
    /// environments name their own): each part's loss weighs by its share of the sequences.
    pub fn rl_step_mixed(&mut self, parts: &[(&Objective, &[RlSequence])]) -> Result<StepReport> {
        let total: usize = parts.iter().map(|(_, b)| b.len()).sum();
        if total == 0 {
            return Err(LearnerError::Batch("empty batch".into()));
        }
        let mut surrogate: Option<Tensor> = None;
        let mut stats = LossStats::default();
        for (objective, batch) in parts.iter().filter(|(_, b)| !b.is_empty()) {
            let (part, s) = rl_loss(&self.model, batch, objective)?;
            let share = batch.len() as f64 / total as f64;
            let part = (part * share)?;
            surrogate = Some(match surrogate {
                Some(sum) => (sum + part)?,
                None => part,
            });
            stats.loss += share * s.loss;
            stats.kl += share * s.kl;
            stats.entropy += share * s.entropy;
            stats.clip_fraction += share * s.clip_fraction;
            stats.mean_abs_logprob_diff += share * s.mean_abs_logprob_diff;
            stats.tokens += s.tokens;
        }
        let surrogate = surrogate.expect("a part is not empty");
        self.apply(surrogate, stats)
    }

    /// One supervised update on reference solutions.
    pub fn sft_step(&mut self, batch: &[SftSequence]) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(LearnerError::Batch("empty batch".into()));
        }
        let (loss, stats) = sft_loss(&self.model, batch)?;
        self.apply(loss, stats)
    }

    /// Steps on the gradient of `loss` (whose value is `stats.loss`).
    fn apply(&mut self, loss: Tensor, stats: LossStats) -> Result<StepReport> {
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
        let grads = loss.backward()?;
        let norm = self.optimizer.grad_norm(&grads)?;
        if !norm.is_finite() {
            self.version += 1;
            return Ok(report(
                norm,
                self.version,
                Some(format!("gradient norm is not finite ({norm})")),
            ));
        }
        let st = self.optimizer.step(&grads, lr)?;
        self.version += 1;
        Ok(report(st.grad_norm, self.version, None))
    }

    /// Writes the weights in HF layout plus optimizer state and step counters to `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_checkpoint(dir, &self.model_cfg, &self.params, None)?;
        let opt_path = dir.join(OPTIMIZER_FILE);
        let state: std::collections::HashMap<String, Tensor> =
            self.optimizer.state_tensors().into_iter().collect();
        candle_core::safetensors::save(&state, &opt_path).map_err(|e| {
            LearnerError::Checkpoint {
                path: opt_path.clone(),
                message: e.to_string(),
            }
        })?;
        let st = TrainerState {
            step: self.step,
            version: self.version,
            optimizer_steps: self.optimizer.steps(),
            config: self.config.clone(),
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

    /// Resumes from a directory written by [`Trainer::save`], with the settings saved there.
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
        let tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load(&opt_path, device)
            .map_err(|e| LearnerError::Checkpoint {
                path: opt_path.clone(),
                message: e.to_string(),
            })?
            .into_iter()
            .collect();
        t.optimizer.load_state(&tensors, st.optimizer_steps)?;
        t.step = st.step;
        t.version = st.version;
        Ok(t)
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
}
