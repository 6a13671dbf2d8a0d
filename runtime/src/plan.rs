//! [`RunPlan`]: everything a run needs, derived once from its validated config — the policy's
//! architecture and tokenizer, the learner's settings, the workers' engine options, the
//! evaluation plan and the stages. The services and the driver read the plan, never the raw
//! config's strings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_environments::Registry;
use chorus_environments::preference::{PreferenceRow, load_preferences};
use chorus_learner::{AdamWConfig, DEFAULT_MICRO_BATCH_TOKENS, LearnerConfig, LrSchedule};
use chorus_model::Nvfp4Policy;
use chorus_model::engine::EngineOptions;
use chorus_model::tokenizer::Tokenizer;
use chorus_model::{NemotronHConfig, checkpoint};
use chorus_orchestrator::config::{EnvironmentSource, HeldoutSampling, RunConfig, StageKind};
use chorus_orchestrator::transcripts::Transcripts;

use crate::error::{Result, RunError};

/// Held-out evaluation of a run: before RL, after the last stage and, optionally, every
/// `every` RL steps (the learning curve).
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPlan {
    /// Held-out tasks per environment.
    pub tasks: usize,
    /// How each task is played (`[evaluation]`).
    pub sampling: HeldoutSampling,
    /// Evaluate every this many RL steps as well (0: only before and after).
    pub every: u64,
    /// The environments evaluated (those of the RL stages, each once) with their difficulty.
    pub environments: Vec<(String, u32)>,
    /// New tokens per evaluated answer: the largest of any stage.
    pub max_new_tokens: usize,
    /// Prompt tokens allowed: the largest of any stage.
    pub max_prompt_tokens: usize,
    /// RL steps in the whole run (the curve stops there).
    pub rl_steps: u64,
}

impl EvalPlan {
    /// The evaluation of `cfg` with `tasks` held-out tasks per environment, also every `every`
    /// RL steps when it is not 0.
    pub fn new(cfg: &RunConfig, tasks: usize, every: u64) -> Self {
        let mut seen = BTreeMap::new();
        for s in cfg.stages.iter().filter(|s| s.kind.is_rl()) {
            for e in &s.environments {
                seen.entry(e.key().to_string()).or_insert(e.difficulty);
            }
        }
        Self {
            tasks,
            sampling: cfg.heldout_sampling,
            every,
            environments: seen.into_iter().collect(),
            max_new_tokens: cfg
                .stages
                .iter()
                .map(|s| s.max_new_tokens)
                .max()
                .unwrap_or(32),
            max_prompt_tokens: cfg
                .stages
                .iter()
                .map(|s| s.max_prompt_tokens)
                .max()
                .unwrap_or(256),
            rl_steps: cfg
                .stages
                .iter()
                .filter(|s| s.kind.is_rl())
                .map(|s| s.steps)
                .sum(),
        }
    }
}

/// A run, ready to start: built once from its config by [`RunPlan::new`].
#[derive(Clone)]
pub struct RunPlan {
    /// The validated config (stages, environments, scheduling and fault settings).
    pub config: RunConfig,
    /// The config's text, recorded in the ledger with the run.
    pub config_toml: String,
    /// The policy's architecture.
    pub model: NemotronHConfig,
    /// The policy's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The learner's optimizer, objective and frozen parameters.
    pub learner: LearnerConfig,
    /// How the workers store their projections.
    pub engine: EngineOptions,
    /// Held-out evaluation and the learning curve.
    pub evaluation: EvalPlan,
    /// Policy versions the learner and each worker keep for requests pinned to an older one
    /// (deterministic runs); 1 (the newest) otherwise.
    pub keep_versions: usize,
    /// Each stage's transcripts (its `data`), by stage index, read once.
    pub transcripts: BTreeMap<usize, Arc<Transcripts>>,
    /// Each `reward_model` stage's preference rows from its `data`, by stage index, read once.
    pub preferences: BTreeMap<usize, Arc<Vec<PreferenceRow>>>,
    /// Test-only: workers (by id) that sleep this long after every decode step, so a test can
    /// make one worker slower and check that a deterministic run does not notice. Empty from
    /// [`RunPlan::new`]; no config key sets it.
    pub test_decode_delay: BTreeMap<String, Duration>,
}

impl RunPlan {
    /// Derives the plan of `config` (whose text is `config_toml`), evaluating `eval_tasks`
    /// held-out tasks per environment, also every `eval_every` RL steps when it is not 0.
    /// Reads the model's `config.json` and the tokenizer.
    pub fn new(
        config: RunConfig,
        config_toml: String,
        eval_tasks: usize,
        eval_every: u64,
    ) -> Result<Self> {
        for spec in [&config.worker_device, &config.learner_device] {
            device(spec)?;
        }
        // Read once, now: a bad transcript file is named before anything starts.
        let mut transcripts = BTreeMap::new();
        for (i, stage) in config.stages.iter().enumerate() {
            if let Some(data) = &stage.data {
                let loaded = Transcripts::load(&data.path)
                    .map_err(|e| RunError::Invalid(format!("stages[{i}].data: {e}")))?;
                tracing::info!(
                    path = %data.path.display(),
                    transcripts = loaded.rows.len(),
                    "{} transcripts from {}",
                    loaded.rows.len(),
                    data.path.display()
                );
                transcripts.insert(i, Arc::new(loaded));
            }
        }
        let builtins = chorus_environments::builtin_registry();
        let preferences = reward_model_data(&config, &builtins)?;
        check_swe_rl(&config, &builtins)?;
        let model = model_config(&config)?;
        check_mtp_heal(&config, &model)?;
        let tokenizer = Arc::new(tokenizer(&config, &model)?);
        for (i, stage) in config.stages.iter().enumerate() {
            if stage.think_budget.is_some() {
                for token in ["<think>", "</think>"] {
                    if tokenizer.token_id(token).is_none() {
                        return Err(RunError::Invalid(format!(
                            "stages[{i}].sampling.think_budget: `{token}` is not one token of \
                             the run's tokenizer, so the budget cannot be kept"
                        )));
                    }
                }
            }
        }
        let learner = learner_config(&config);
        let engine = EngineOptions {
            nvfp4: config.worker_nvfp4.then(|| Nvfp4Policy {
                keep_attention: config.worker_keep_attention_f32,
                exclude: vec![],
            }),
            int8_activations: config.worker_int8_activations,
            batch_invariant: config.deterministic,
        };
        let keep_versions = if config.deterministic {
            keep_versions(&config)
        } else {
            1
        };
        let evaluation = EvalPlan::new(&config, eval_tasks, eval_every);
        Ok(Self {
            config,
            config_toml,
            model,
            tokenizer,
            learner,
            engine,
            evaluation,
            keep_versions,
            transcripts,
            preferences,
            test_decode_delay: BTreeMap::new(),
        })
    }

    /// The groups the learner gathers into one step: the first stage's prompts per step.
    pub fn groups_per_step(&self) -> usize {
        self.config.stages[0].prompts_per_step
    }

    /// A plugin environment this run uses that checks the run's plugin token (`--plugin-token`:
    /// one without a `token_env` of its own), if any.
    pub fn plugin_url(&self) -> Option<&str> {
        self.config
            .stages
            .iter()
            .flat_map(|s| &s.environments)
            .find_map(|e| match &e.source {
                EnvironmentSource::Remote {
                    url,
                    token_env: None,
                } => Some(url.as_str()),
                _ => None,
            })
    }
}

/// A `swe_rl` stage trains on multi-turn episodes: a built-in single-turn environment in its
/// mixture is a mistake worth naming before the run starts.
fn check_swe_rl(config: &RunConfig, builtins: &Registry) -> Result<()> {
    for (i, stage) in config.stages.iter().enumerate() {
        if stage.kind != StageKind::SweRl {
            continue;
        }
        for (j, e) in stage.environments.iter().enumerate() {
            if let EnvironmentSource::Builtin(name) = &e.source
                && let Ok(env) = builtins.get(name)
                && env.info().turns != chorus_environments::Turns::Multi
            {
                return Err(RunError::Invalid(format!(
                    "stages[{i}].environments[{j}]: `{name}` is single-turn; a swe_rl stage \
                     plays multi-turn episodes (e.g. `swe`, `tool_agent`); put `{name}` in an \
                     rlvr stage"
                )));
            }
        }
    }
    Ok(())
}

/// An `mtp_heal` stage trains the policy's MTP head on the rollouts of earlier RL stages: a
/// policy without a head, or a stage with no RL stage before it, is named before the run starts.
fn check_mtp_heal(config: &RunConfig, model: &NemotronHConfig) -> Result<()> {
    for (i, stage) in config.stages.iter().enumerate() {
        if stage.kind != StageKind::MtpHeal {
            continue;
        }
        if !model.has_mtp() {
            return Err(RunError::Invalid(format!(
                "stages[{i}] ({}): an mtp_heal stage trains the MTP head, and the policy ({}) \
                 has none (num_nextn_predict_layers = 0 in its config.json); drop the stage or \
                 start from a model with an MTP head",
                stage.name,
                config
                    .checkpoint
                    .as_ref()
                    .or(config.init_config.as_ref())
                    .map_or_else(|| "the model".into(), |p| p.display().to_string())
            )));
        }
        if !config.stages[..i].iter().any(|s| s.kind.is_rl()) {
            return Err(RunError::Invalid(format!(
                "stages[{i}] ({}): an mtp_heal stage learns from this run's rollouts, and no \
                 stage before it samples any; put it after an rlvr, swe_rl or rlhf stage",
                stage.name
            )));
        }
    }
    Ok(())
}

/// The preference files of the run's `reward_model` stages, read and checked now, and their
/// `pairs_from` environments checked to be single-turn built-ins.
fn reward_model_data(
    config: &RunConfig,
    builtins: &Registry,
) -> Result<BTreeMap<usize, Arc<Vec<PreferenceRow>>>> {
    let mut out = BTreeMap::new();
    for (i, stage) in config.stages.iter().enumerate() {
        let Some(spec) = &stage.reward_model else {
            continue;
        };
        for name in &spec.pairs_from {
            let env = builtins
                .get(name)
                .map_err(|e| RunError::Invalid(format!("stages[{i}].pairs_from: {e}")))?;
            if env.info().turns == chorus_environments::Turns::Multi {
                return Err(RunError::Invalid(format!(
                    "stages[{i}].pairs_from: `{name}` is multi-turn, and its reference is only a \
                     first action; allowed: single-turn environments"
                )));
            }
        }
        if let Some(path) = &spec.preferences {
            let rows = load_preferences(path)
                .map_err(|e| RunError::Invalid(format!("stages[{i}].data: {e}")))?;
            tracing::info!(
                path = %path.display(),
                rows = rows.len(),
                "{} preference rows from {}",
                rows.len(),
                path.display()
            );
            out.insert(i, Arc::new(rows));
        }
    }
    Ok(out)
}

/// The device `spec` names (`cpu`, `cuda:N`). Only the CPU exists in builds without CUDA; a
/// CUDA device fails here, naming the fix.
pub fn device(spec: &str) -> Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s.starts_with("cuda") => Err(RunError::Invalid(format!(
            "device `{s}`: this build of chorus has no CUDA support (rebuild with `--features \
             cuda` on a machine with the CUDA toolkit); allowed here: cpu"
        ))),
        s => Err(RunError::Invalid(format!(
            "unknown device `{s}`; allowed: cpu, cuda:N"
        ))),
    }
}

/// Versions kept for pinned requests in a deterministic run. A step's requests are pinned to
/// the learner's version `max_staleness` steps back and the learner cannot step past a step
/// whose groups are out, so `max_staleness + 1` versions cover training; the rest is slack for
/// held-out evaluations, pinned to a version the learner may have left by the time a worker
/// takes them.
fn keep_versions(cfg: &RunConfig) -> usize {
    let staleness = cfg
        .stages
        .iter()
        .map(|s| s.max_staleness)
        .max()
        .unwrap_or(0);
    staleness as usize + 4
}

/// The policy's architecture, from the checkpoint's config.json or the init config.
fn model_config(cfg: &RunConfig) -> Result<NemotronHConfig> {
    Ok(match (&cfg.checkpoint, &cfg.init_config) {
        (Some(dir), _) => checkpoint::load_config(dir)?,
        (None, Some(c)) => NemotronHConfig::from_file(c)?,
        (None, None) => {
            return Err(RunError::Invalid(
                "the config has no model: give `model.checkpoint` or `model.init_config`".into(),
            ));
        }
    })
}

/// The policy's tokenizer: the configured file, the checkpoint's, or the byte-level one.
fn tokenizer(cfg: &RunConfig, model: &NemotronHConfig) -> Result<Tokenizer> {
    let t = match (&cfg.tokenizer, &cfg.checkpoint) {
        (Some(t), _) => Tokenizer::from_file(t)?,
        (None, Some(dir)) if dir.join("tokenizer.json").exists() => {
            Tokenizer::from_file(&dir.join("tokenizer.json"))?
        }
        _ => Tokenizer::byte_level(),
    };
    if t.vocab_size() > model.vocab_size {
        return Err(RunError::Invalid(format!(
            "the tokenizer has {} ids but the model's vocab_size is {}",
            t.vocab_size(),
            model.vocab_size
        )));
    }
    Ok(t)
}

/// The learner's settings for `cfg`.
fn learner_config(cfg: &RunConfig) -> LearnerConfig {
    LearnerConfig {
        optimizer: AdamWConfig {
            max_grad_norm: cfg.max_grad_norm,
            ..Default::default()
        },
        // Each group carries its stage's rate for its step (warmup and decay per stage, see
        // `Stage::lr_at`), so the learner's own schedule stays flat.
        schedule: LrSchedule {
            peak_lr: cfg.stages[0].lr,
            ..Default::default()
        },
        // Every RL group carries its stage's objective; this one serves groups that name none.
        objective: cfg
            .stages
            .iter()
            .find_map(|s| s.objective.clone())
            .unwrap_or_default(),
        // Nothing is frozen for good: SFT and RL steps leave the MTP head alone by themselves,
        // and `mtp_heal` stages train it alone.
        freeze: vec![],
        nvfp4_forward: cfg.learner_nvfp4_forward.then(|| Nvfp4Policy {
            keep_attention: cfg.worker_keep_attention_f32,
            exclude: vec![],
        }),
        router_bias_rate: cfg.router_bias_rate,
        micro_batch_tokens: cfg
            .learner_micro_batch_tokens
            .unwrap_or(DEFAULT_MICRO_BATCH_TOKENS),
    }
}
