//! The run configuration (TOML), read in two stages: [`RawRunConfig`] mirrors the file with every
//! field optional and documented, [`RunConfig`] is validated and complete. Defaults live in one
//! place, [`Defaults`] (the environment fault policy's in [`FaultPolicy`]'s `Default`).
//!
//! Every setting with a fixed set of values is a serde enum read through [`Choice`], so the
//! names a file may use and the names an error lists come from the one derive.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, Deserializer, IntoDeserializer, Visitor};
use serde::{Deserialize, Serialize};

pub use crate::advantage::{AdvantageKind, AdvantageShaping};
use crate::faults::FaultPolicy;
pub use chorus_environments::preference::Comparisons;
pub use chorus_proto::objective::{Aggregation, Correction, KlEstimator, Objective};
pub use chorus_proto::schedule::{Decay, LrSchedule};

/// An invalid configuration: names the key and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{file}: `{key}`: {message}")]
pub struct ConfigError {
    /// The file the configuration came from (or `<string>`).
    pub file: String,
    /// The dotted key, e.g. `stages[1].environments[0].weight`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// A setting with a fixed set of values, as written: serde reads it into `T`, and a value
/// outside the set is kept as written. Refusing it here would make the TOML parser report it,
/// and a parser error only knows the line's key, not the dotted key (`stages[1].kind`) that
/// [`ConfigError`] names.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice<T> {
    /// One of `T`'s values.
    Known(T),
    /// Anything else, as written.
    Unknown(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parsed: Result<T, serde::de::value::Error> =
            T::deserialize(text.as_str().into_deserializer());
        Ok(match parsed {
            Ok(v) => Choice::Known(v),
            Err(_) => Choice::Unknown(text),
        })
    }
}

/// The names serde accepts for `T`'s variants, comma-separated in declaration order, read from
/// the derived `Deserialize` itself (it hands its variant list to `deserialize_enum`), so that
/// error messages cannot drift from what parses.
fn allowed<T: DeserializeOwned>() -> String {
    struct Probe;
    #[derive(Debug)]
    struct Variants(&'static [&'static str]);
    impl fmt::Display for Variants {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0.join(", "))
        }
    }
    impl std::error::Error for Variants {}
    impl serde::de::Error for Variants {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Variants(&[])
        }
    }
    impl<'de> Deserializer<'de> for Probe {
        type Error = Variants;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Variants> {
            Err(Variants(&[]))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Variants> {
            Err(Variants(variants))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
            ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(v) => v.to_string(),
        Ok(_) => String::new(),
    }
}

/// How a value of a serde enum is written in the file.
fn written<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The kinds of stage a run can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// Supervised warm-up on environments' reference solutions.
    Sft,
    /// Reinforcement learning with verifiable rewards (`rl` is accepted too).
    #[serde(alias = "rl")]
    Rlvr,
    /// A reward model trained from the current policy on preference pairs (the policy itself
    /// is not changed).
    RewardModel,
    /// RL on multi-turn software-engineering episodes (the `swe` environment): tool
    /// observations masked out of the loss, invalid tool calls penalised, a turn limit.
    SweRl,
    /// RL whose reward is an earlier `reward_model` stage's score of each completion; its
    /// environments give the prompts (and their verifiers the held-out accuracy reported beside).
    Rlhf,
    /// The MTP head trained alone (the backbone frozen) on completions of this run's own
    /// rollouts read back from the ledger, so that it drafts for the policy the earlier stages
    /// made; its environments give the held-out prompts its acceptance rate is measured on.
    MtpHeal,
}

impl StageKind {
    /// The name configs and the ledger write it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Rlvr => "rlvr",
            Self::RewardModel => "reward_model",
            Self::SweRl => "swe_rl",
            Self::Rlhf => "rlhf",
            Self::MtpHeal => "mtp_heal",
        }
    }

    /// Whether the stage samples completions and trains the policy with an RL objective.
    pub fn is_rl(self) -> bool {
        matches!(self, Self::Rlvr | Self::SweRl | Self::Rlhf)
    }

    /// The metrics a stage of this kind measures (the first is the one its summary reports).
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            Self::Sft | Self::Rlvr => &[HELDOUT_ACCURACY],
            Self::RewardModel => &[PAIR_ACCURACY],
            Self::SweRl => &[HELDOUT_PASS_RATE],
            Self::Rlhf => &[HELDOUT_RM_SCORE],
            Self::MtpHeal => &[HELDOUT_MTP_ACCEPTANCE],
        }
    }
}

/// Mean held-out accuracy of a stage's environments.
pub const HELDOUT_ACCURACY: &str = "heldout_accuracy";
/// Fraction of held-out episodes whose tests pass after `submit` (a `swe_rl` stage's mean
/// held-out accuracy, under the name its users know).
pub const HELDOUT_PASS_RATE: &str = "heldout_pass_rate";
/// Mean reward-model score of the policy's held-out completions (an `rlhf` stage's metric).
pub const HELDOUT_RM_SCORE: &str = "heldout_rm_score";
/// Fraction of the MTP head's draft tokens the policy accepts in speculative decoding of
/// held-out prompts (an `mtp_heal` stage's metric).
pub const HELDOUT_MTP_ACCEPTANCE: &str = "heldout_mtp_acceptance";
/// Fraction of held-out preference pairs a reward model ranks the right way.
pub const PAIR_ACCURACY: &str = "pair_accuracy";

/// How a `reward_model` stage's model judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardModelKind {
    /// A scalar score head on the policy's backbone, trained with `-log sigmoid(s_c - s_r)`.
    BradleyTerry,
    /// A generative judge trained with GRPO to write `[[score_1, score_2, ranking]]`.
    Genrm,
}

/// What a `reward_model` stage trains on and how.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardModelSpec {
    /// The kind of model.
    pub rm: RewardModelKind,
    /// A user's preference JSONL (relative to the config file).
    pub preferences: Option<PathBuf>,
    /// Verifiable environments whose reference answers are chosen and wrong answers rejected.
    pub pairs_from: Vec<String>,
    /// Pairs per environment of `pairs_from` drawn for training.
    pub train_pairs: usize,
    /// Held-out pairs per source the metric is measured on.
    pub heldout_pairs: usize,
}

/// The update rule of a stage: `sft`, or one of the RL objectives of
/// [`chorus_proto::objective::Algorithm`] (defined there, with the exact formulas in
/// `chorus_learner::objective`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Next-token cross-entropy on reference solutions.
    Sft,
    /// Clipped surrogate, sequence mean of token means, eps 0.2/0.2.
    Grpo,
    /// Clipped surrogate with clip-higher, token mean, eps 0.2/0.28 (Nemotron 3's RLVR).
    Dapo,
    /// Clipped surrogate, token sum over a constant length.
    DrGrpo,
    /// Clipped sequence-level ratio.
    Gspo,
    /// Clipped stop-gradient importance weight times the log-probability.
    Cispo,
    /// Plain policy gradient (RLOO with `advantage = "leave_one_out"`).
    Reinforce,
}

impl Algorithm {
    /// The RL objective's algorithm; `None` for `sft`.
    pub fn rl(self) -> Option<chorus_proto::objective::Algorithm> {
        use chorus_proto::objective::Algorithm as A;
        Some(match self {
            Self::Sft => return None,
            Self::Grpo => A::Grpo,
            Self::Dapo => A::Dapo,
            Self::DrGrpo => A::DrGrpo,
            Self::Gspo => A::Gspo,
            Self::Cispo => A::Cispo,
            Self::Reinforce => A::Reinforce,
        })
    }
}

/// The order an RL stage draws its prompts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CurriculumKind {
    /// Fresh prompts drawn at random.
    None,
    /// From easy to hard by their pass rate under the stage's starting policy.
    PassRate,
}

/// A pass-rate curriculum's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurriculumSettings {
    /// Candidate prompts estimated.
    pub pool: usize,
    /// Completions per candidate.
    pub samples: usize,
}

/// Whether an RL stage updates the MoE routers' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Router {
    /// `*.gate.weight` is not updated (the load-balancing biases still are).
    Frozen,
    /// The routers train with the rest of the policy.
    Trained,
}

/// How a step's prompts are split among a stage's environments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainRatios {
    /// Each prompt's environment is drawn by weight.
    Sampled,
    /// Every step holds exact per-environment counts from the weights (largest remainders,
    /// the leftover prompts rotating among environments from step to step).
    Fixed,
}

/// A weight format to quantize to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantize {
    /// E2M1 elements with E4M3 block scales and an f32 global scale.
    Nvfp4,
}

/// Where an environment of a stage's mixture comes from, as written in `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentKind {
    /// A built-in environment, by `name`.
    Builtin,
    /// An environment plugin server, by `url`.
    Plugin,
    /// A NeMo Gym resources server at `url` with its `dataset`.
    NemoGym,
}

/// One environment of a stage's mixture, as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvironment {
    /// What kind of environment: `builtin` (default when `name` is given), `plugin` (default
    /// when `url` is given) or `nemo_gym` (a NeMo Gym resources server at `url` with `dataset`).
    pub kind: Option<Choice<EnvironmentKind>>,
    /// Name of a built-in environment (see `chorus env list`); for `nemo_gym`, the name it is
    /// registered and reported under (default `nemo_gym:<dataset file stem>`).
    pub name: Option<String>,
    /// Address of an environment plugin server or NeMo Gym server (`http://host:port`).
    pub url: Option<String>,
    /// For a plugin: the environment variable that holds this plugin's own token (default: the
    /// token given with `--plugin-token`, shared by every plugin without `token_env`). The
    /// config names the variable, never the secret.
    pub token_env: Option<String>,
    /// For `nemo_gym`: the NeMo Gym JSONL data file (relative to the config file).
    pub dataset: Option<PathBuf>,
    /// For `nemo_gym`: policy turns per episode (default 1). Above 1, tool calls go to the
    /// server's tool routes and their results back to the policy until it answers without one.
    pub max_turns: Option<u32>,
    /// Relative sampling weight (> 0).
    pub weight: Option<f64>,
    /// Difficulty level (0 = learnable by a freshly initialised tiny model).
    pub difficulty: Option<u32>,
}

/// Sampling settings of a stage, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSampling {
    /// Softmax temperature (> 0; Nemotron RL uses 1.0).
    pub temperature: Option<f32>,
    /// Nucleus probability in (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: Option<usize>,
    /// At most this many tokens inside `<think>`; then `</think>` is emitted and the model
    /// answers.
    pub think_budget: Option<usize>,
}

/// An early end of a stage, as written: `until = { metric = "heldout_accuracy", at_least = 0.5 }`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUntil {
    /// The stage's metric (it is named in the stage's summary).
    pub metric: Option<String>,
    /// The stage ends at the first check where the metric is at least this.
    pub at_least: Option<f64>,
    /// Steps between checks (default 10); each check waits for the learner and evaluates.
    pub every: Option<u64>,
}

/// One stage, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    /// Stage name, unique within the run.
    pub name: Option<String>,
    /// `sft` or `rl`.
    pub kind: Option<Choice<StageKind>>,
    /// `sft` (for sft stages) or an RL objective (for rlvr stages): `grpo`, `dapo`,
    /// `dr_grpo`, `gspo`, `cispo`, `reinforce`.
    pub algorithm: Option<Choice<Algorithm>>,
    /// Lower clip of the ratio (overrides `learner.eps_low` and the algorithm's default).
    pub eps_low: Option<f64>,
    /// Upper clip of the ratio.
    pub eps_high: Option<f64>,
    /// Off-policy correction: `none`, `tis`, `icepop`, `seq_mask_tis`.
    pub correction: Option<Choice<Correction>>,
    /// Cap of the importance weight (`tis`, `seq_mask_tis`).
    pub tis_cap: Option<f64>,
    /// Lower bound of the importance weight kept by `icepop` and `seq_mask_tis`.
    pub icepop_low: Option<f64>,
    /// Upper bound of the importance weight kept by `icepop` and `seq_mask_tis`.
    pub icepop_high: Option<f64>,
    /// `token_mean`, `seq_mean_token_mean` or `seq_mean_token_sum_norm`.
    pub aggregation: Option<Choice<Aggregation>>,
    /// Constant length of `seq_mean_token_sum_norm` (default: the batch's width).
    pub norm_length: Option<u32>,
    /// Weight of a KL penalty to a reference policy.
    pub kl_coef: Option<f64>,
    /// `k1` or `k3`.
    pub kl_estimator: Option<Choice<KlEstimator>>,
    /// Optimizer steps in the stage.
    pub steps: Option<u64>,
    /// Prompts per step.
    pub prompts_per_step: Option<usize>,
    /// Completions per prompt.
    pub group_size: Option<usize>,
    /// How many policy versions a trajectory may lag the learner (0 = synchronous).
    pub max_staleness: Option<u64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Linear warmup steps of the learning rate, from the stage's first step.
    pub warmup_steps: Option<u64>,
    /// After warmup: `constant`, or `cosine` down to `min_lr` at the stage's last step.
    pub lr_decay: Option<Choice<Decay>>,
    /// Learning rate at the end of a cosine decay (default: a tenth of `lr`).
    pub min_lr: Option<f64>,
    /// Prompt token limit; longer prompts are dropped with a reason.
    pub max_prompt_tokens: Option<usize>,
    /// Generated token limit per turn.
    pub max_new_tokens: Option<usize>,
    /// `group_norm` or `leave_one_out`.
    pub advantage: Option<Choice<AdvantageKind>>,
    /// Divide advantages by the group's reward standard deviation (default: true, false for
    /// `algorithm = "reinforce"`).
    pub advantage_std_normalize: Option<bool>,
    /// Clip advantages to ± this (default 50).
    pub advantage_clip: Option<f64>,
    /// Weight of the group-relative answer-length bonus added to rewards (default 0: off).
    pub length_coef_answer: Option<f64>,
    /// Weight of the group-relative reasoning-length bonus added to rewards (default 0: off).
    pub length_coef_reasoning: Option<f64>,
    /// The fixed advantage of a rollout with a malformed think block or invalid tool calls
    /// (default -5).
    pub invalid_advantage: Option<f64>,
    /// How a step's prompts are split among the environments: `sampled` by weight, or `fixed`
    /// (exact counts from the weights).
    pub domain_ratios: Option<Choice<DomainRatios>>,
    /// End the stage early once its metric reaches a value.
    pub until: Option<RawUntil>,
    /// `pass_rate`: estimate each candidate prompt's pass rate under the stage's starting
    /// policy, drop the always-solved ones and train from easy to hard; `none` (default).
    pub curriculum: Option<Choice<CurriculumKind>>,
    /// Candidate prompts the curriculum estimates (default: 8 steps' worth).
    pub curriculum_pool: Option<usize>,
    /// Completions per candidate in the estimate (default: the group size).
    pub curriculum_samples: Option<usize>,
    /// Most turns of a multi-turn episode (default: the environment's own limit).
    pub max_turns: Option<u32>,
    /// RL stages: `frozen` (default, Nemotron 3's choice) leaves the MoE routers' weights as
    /// they are while their load-balancing biases keep updating; `trained` updates them.
    pub router: Option<Choice<Router>>,
    /// `rlhf` stages: the `reward_model` stage whose model scores the completions (default: the
    /// last one before this stage).
    pub reward_model: Option<String>,
    /// `reward_model` stages: `bradley_terry` (default) or `genrm`.
    pub rm: Option<Choice<RewardModelKind>>,
    /// `rlhf` stages judged by a `genrm` stage: which of a group's completions the judge
    /// compares, `circular` (each against the next: N comparisons; default) or `all_pairs`.
    pub comparisons: Option<Choice<Comparisons>>,
    /// `reward_model` stages: environments whose reference answer is chosen and a wrong answer
    /// rejected (single-turn built-ins).
    pub pairs_from: Option<Vec<String>>,
    /// `reward_model` stages: training pairs drawn per environment of `pairs_from`.
    pub train_pairs: Option<usize>,
    /// `reward_model` stages: held-out pairs per source for the metric.
    pub heldout_pairs: Option<usize>,
    /// Drop groups whose rewards are all equal.
    pub drop_zero_variance: Option<bool>,
    /// The weighted environment mixture.
    pub environments: Option<Vec<RawEnvironment>>,
    /// SFT stages: a JSONL file of chat transcripts (`{"messages": [{"role", "content"}...]}`),
    /// relative to the config file, learned on the assistant's tokens.
    pub data: Option<PathBuf>,
    /// Weight of `data` in the stage's mixture, next to the environments' weights.
    pub data_weight: Option<f64>,
    /// Sampling settings.
    pub sampling: Option<RawSampling>,
}

/// The whole file, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRunConfig {
    /// Run name; the ledger and outputs go to `runs/<name>/`.
    pub name: Option<String>,
    /// Seed of prompt sampling and generation.
    pub seed: Option<u64>,
    /// Repeat bit for bit on the same machine, whatever the timing (slower).
    pub deterministic: Option<bool>,
    /// The policy.
    pub model: Option<RawModel>,
    /// Rollout workers.
    pub workers: Option<RawWorkers>,
    /// The learner.
    pub learner: Option<RawLearner>,
    /// Stages, run in order.
    pub stages: Option<Vec<RawStage>>,
    /// How environments that fail are handled.
    pub environment_faults: Option<RawEnvironmentFaults>,
    /// How held-out metrics are measured.
    pub evaluation: Option<RawEvaluation>,
}

/// How held-out metrics are measured, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvaluation {
    /// Episodes per held-out task: 1 (default) answers greedily; more sample at `temperature`.
    pub samples: Option<usize>,
    /// Sampling temperature when `samples` > 1 (default 1.0).
    pub temperature: Option<f32>,
}

/// How each held-out task is played when a metric is measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeldoutSampling {
    /// Episodes per task. 1: one greedy answer (temperature 0), what the policy's most likely
    /// answer does. More: that many at `temperature`, and the metric is the mean over tasks of
    /// each task's solved fraction, the expected success of the sampling policy RL trains.
    pub samples: usize,
    /// The temperature of those samples (unused with one sample).
    pub temperature: f32,
}

impl Default for HeldoutSampling {
    fn default() -> Self {
        Self {
            samples: Defaults::HELDOUT_SAMPLES,
            temperature: Defaults::TEMPERATURE,
        }
    }
}

/// Environment fault handling, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvironmentFaults {
    /// Longest one environment call may take, in seconds.
    pub deadline_seconds: Option<f64>,
    /// Faults an environment may cause before it is paused.
    pub error_budget: Option<u64>,
    /// Seconds a paused environment rests before a call probes it (a probe that succeeds
    /// resumes it); 0 keeps it paused for the rest of the run. Default 30.
    pub probe_seconds: Option<f64>,
}

/// The policy, as written: an existing checkpoint or a new one from a config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Checkpoint directory to start from.
    pub checkpoint: Option<PathBuf>,
    /// HF config.json to initialise a new model from (instead of `checkpoint`).
    pub init_config: Option<PathBuf>,
    /// Seed of the initialisation.
    pub init_seed: Option<u64>,
    /// Tokenizer file; defaults to the checkpoint's `tokenizer.json`, else Chorus' byte-level one.
    pub tokenizer: Option<PathBuf>,
}

/// Rollout workers, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkers {
    /// Number of workers (in-process for `chorus run`).
    pub count: Option<usize>,
    /// Sequences decoded together per worker.
    pub max_batch: Option<usize>,
    /// Requests in flight per worker (backpressure).
    pub max_in_flight: Option<usize>,
    /// `cpu` or `cuda:N`.
    pub device: Option<String>,
    /// Quantize projection weights on load: `nvfp4` (embeddings, lm_head, router gates and norms
    /// stay f32), or absent for f32.
    pub quantize: Option<Choice<Quantize>>,
    /// With `quantize = "nvfp4"`: keep attention projections in f32.
    pub keep_attention_f32: Option<bool>,
    /// With `quantize = "nvfp4"`: the NVFP4 projections round their activations to int8 and
    /// multiply with integer dot products (faster generation; sampling log-probabilities off
    /// by the rounding). With AVX2 or AVX-512 every step rounds, prefill included (the workers keep a
    /// repacked copy of the weights: twice the NVFP4 memory); without either, decode steps of up to
    /// 64 sequences.
    pub int8_activations: Option<bool>,
    /// What generates: `chorus` (Chorus' own engine, default) or `vllm` (each worker fronts a
    /// vLLM server; see `[workers.vllm]`).
    pub backend: Option<Choice<WorkerBackend>>,
    /// The vLLM servers of `backend = "vllm"`.
    pub vllm: Option<RawVllm>,
}

/// What a rollout worker generates with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerBackend {
    /// Chorus' own engine (continuous batching, NVFP4 on load).
    Chorus,
    /// A vLLM server per worker, driven over its HTTP routes.
    Vllm,
}

/// `[workers.vllm]`, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVllm {
    /// How many of the workers front vLLM (default: all); the others run Chorus' engine.
    pub count: Option<usize>,
    /// Python with vLLM installed; Chorus starts `PYTHON -m vllm.entrypoints.openai.api_server`
    /// per worker (default `python3`).
    pub python: Option<String>,
    /// Reach running servers instead, one URL per vLLM worker; they must be able to read
    /// `weights_dir`.
    pub urls: Option<Vec<String>>,
    /// Where published versions are written for the servers to reload (default: the run's
    /// directory, `vllm/<worker>`); with `urls`, a directory the servers can read.
    pub weights_dir: Option<PathBuf>,
    /// Extra server arguments, after Chorus' own (a repeated flag overrides Chorus').
    pub args: Option<Vec<String>>,
    /// Extra environment variables of the servers.
    pub env: Option<BTreeMap<String, String>>,
    /// `--max-model-len` (default 2048).
    pub max_model_len: Option<usize>,
    /// Longest wait for a server to start (default 600 s).
    pub start_timeout_seconds: Option<u64>,
    /// Longest wait for each call of a weight update (default 120 s).
    pub update_timeout_seconds: Option<u64>,
    /// Longest wait for one completion (default 600 s).
    pub request_timeout_seconds: Option<u64>,
    /// Faults injected into weight updates, to drill recovery: `{ version = N, fault =
    /// "corrupt_weights" | "stall_reload" | "kill_server" }`.
    pub inject_faults: Option<Vec<RawVllmFault>>,
}

/// One injected fault, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVllmFault {
    /// The first update to this policy version or a later one fails.
    pub version: u64,
    /// How it fails.
    pub fault: Choice<VllmFaultKind>,
}

/// A fault a vLLM worker can inject into one of its weight updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VllmFaultKind {
    /// The version's weight file is written truncated: the server's reload fails.
    CorruptWeights,
    /// The server is frozen before the reload: the reload times out.
    StallReload,
    /// The server is killed in the middle of the update.
    KillServer,
}

/// `[workers.vllm]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct VllmWorkers {
    /// How many of the workers front vLLM (the first ones: `w0`…).
    pub count: usize,
    /// The interpreter that has vLLM.
    pub python: String,
    /// Running servers to use instead of starting them.
    pub urls: Vec<String>,
    /// Where versions are written for the servers.
    pub weights_dir: Option<PathBuf>,
    /// Extra server arguments.
    pub args: Vec<String>,
    /// Extra server environment.
    pub env: BTreeMap<String, String>,
    /// `--max-model-len`.
    pub max_model_len: usize,
    /// Longest wait for a server to start.
    pub start_timeout: Duration,
    /// Longest wait for each call of an update.
    pub update_timeout: Duration,
    /// Longest wait for one completion.
    pub request_timeout: Duration,
    /// Injected faults: (version, fault).
    pub inject_faults: Vec<(u64, VllmFaultKind)>,
}

/// The learner, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLearner {
    /// `cpu` or `cuda:N`.
    pub device: Option<String>,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Lower clip of the ratio, for every RL stage that does not set its own.
    pub eps_low: Option<f64>,
    /// Upper clip of the ratio, for every RL stage that does not set its own.
    pub eps_high: Option<f64>,
    /// Cap of the importance weight, for every RL stage that does not set its own.
    pub tis_cap: Option<f64>,
    /// `token_mean`, `seq_mean_token_mean` or `seq_mean_token_sum_norm`, for every
    /// RL stage that does not set its own.
    pub aggregation: Option<Choice<Aggregation>>,
    /// `nvfp4`: run the forward pass through the workers' NVFP4 weights (straight-through
    /// gradients); absent: full precision.
    pub quantize_forward: Option<Choice<Quantize>>,
    /// Save the learner (weights, optimizer state, counters) every this many steps, and at
    /// every stage boundary, so `chorus run --resume` can continue after a crash (0: only at
    /// stage boundaries).
    pub checkpoint_every: Option<u64>,
    /// Learner checkpoints kept (the newest; at least 1).
    pub checkpoint_keep: Option<usize>,
    /// Step of the MoE routers' load-balancing biases after every step (aux-loss-free
    /// balancing: `bias += rate * sign(mean load - load)`); 0 turns it off.
    pub router_bias_rate: Option<f64>,
    /// Most padded tokens (sequences times the longest one's length) in one forward and
    /// backward pass of the learner, Chorus' or the PyTorch one (`--micro-batch-tokens`); a
    /// step runs as passes of at most this many, each back-propagated before the next, so
    /// memory follows this rather than the batch (the gradient is the batch's exactly).
    /// Default 8192.
    pub micro_batch_tokens: Option<usize>,
    /// What trains: `chorus` (Chorus' candle learner, default) or `torch` (the `chorus_learner`
    /// Python package on PyTorch; see `[learner.torch]`).
    pub backend: Option<Choice<LearnerBackend>>,
    /// The PyTorch learner of `backend = "torch"`.
    pub torch: Option<RawTorchLearner>,
}

/// What trains the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LearnerBackend {
    /// Chorus' learner (candle, CPU).
    Chorus,
    /// The `chorus_learner` Python package (PyTorch, HF transformers).
    Torch,
}

/// `[learner.torch]`, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTorchLearner {
    /// A Python with torch, transformers and `chorus-learner` installed (default `python3`).
    pub python: Option<String>,
    /// Extra arguments of `python -m chorus_learner` (e.g. `["--threads", "4"]`).
    pub args: Option<Vec<String>>,
    /// Longest wait for it to serve (default 300 s).
    pub start_timeout_seconds: Option<u64>,
    /// Processes to train over with FSDP2 (`torchrun --nproc-per-node N`; default 1).
    pub processes: Option<usize>,
}

/// `[learner.torch]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchLearner {
    /// The interpreter.
    pub python: String,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Longest wait for it to serve.
    pub start_timeout: Duration,
    /// Processes it trains over (FSDP2 when more than 1).
    pub processes: usize,
}

/// A validated environment entry.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvironmentSpec {
    /// Built-in name or the plugin's address.
    pub source: EnvironmentSource,
    /// Relative weight (> 0).
    pub weight: f64,
    /// Difficulty level.
    pub difficulty: u32,
}

impl EnvironmentSpec {
    /// The name the environment is registered under in the run's registry: a built-in's name,
    /// or a plugin's address (the run registers each plugin under its address).
    pub fn key(&self) -> &str {
        match &self.source {
            EnvironmentSource::Builtin(name) => name,
            EnvironmentSource::Remote { url, .. } => url,
            EnvironmentSource::NemoGym { name, .. } => name,
        }
    }
}

/// Where an environment comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum EnvironmentSource {
    /// A built-in environment.
    Builtin(String),
    /// A plugin server implementing the gRPC `Environment` service.
    Remote {
        /// Its address.
        url: String,
        /// The environment variable holding its own token; `None`: the run's plugin token.
        token_env: Option<String>,
    },
    /// A NeMo Gym resources server (`POST /seed_session`, `POST /verify`) and its JSONL data.
    NemoGym {
        /// The registry key: the entry's `name`, or `nemo_gym:<dataset file stem>`.
        name: String,
        /// The server's address.
        url: String,
        /// The data rows.
        dataset: PathBuf,
        /// Policy turns per episode (1 = the answer is verified as it is).
        max_turns: u32,
    },
}

/// A validated stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// Unique name.
    pub name: String,
    /// SFT or RL.
    pub kind: StageKind,
    /// Update rule.
    pub algorithm: Algorithm,
    /// The RL objective every group of the stage carries to the learner (`None` for SFT).
    pub objective: Option<Objective>,
    /// Optimizer steps.
    pub steps: u64,
    /// Prompts per step.
    pub prompts_per_step: usize,
    /// Completions per prompt.
    pub group_size: usize,
    /// Staleness bound.
    pub max_staleness: u64,
    /// Learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// What the learning rate does after warmup.
    pub lr_decay: Decay,
    /// Learning rate at the end of a cosine decay.
    pub min_lr: f64,
    /// Prompt token limit.
    pub max_prompt_tokens: usize,
    /// New-token limit per turn.
    pub max_new_tokens: usize,
    /// How rewards become advantages.
    pub advantage: AdvantageShaping,
    /// How a step's prompts are split among the environments.
    pub domain_ratios: DomainRatios,
    /// An early end.
    pub until: Option<Until>,
    /// A pass-rate curriculum (`None`: prompts drawn at random).
    pub curriculum: Option<CurriculumSettings>,
    /// `reward_model` stages: what the model trains on.
    pub reward_model: Option<RewardModelSpec>,
    /// `rlhf` stages: the index of the `reward_model` stage whose model gives the reward.
    pub judge: Option<usize>,
    /// `rlhf` stages judged by a `genrm` stage: which completions of a group are compared
    /// (`None` for every other stage).
    pub comparisons: Option<Comparisons>,
    /// RL stages: the MoE routers' weights stay as they are.
    pub router_frozen: bool,
    /// Most turns of a multi-turn episode (`None`: the environment's own limit).
    pub max_turns: Option<u32>,
    /// Drop zero-variance groups.
    pub drop_zero_variance: bool,
    /// Mixture.
    pub environments: Vec<EnvironmentSpec>,
    /// SFT stages: a user's chat transcripts, drawn next to the environments.
    pub data: Option<TranscriptData>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus probability.
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Reasoning budget in tokens (`None` = no cap).
    pub think_budget: Option<usize>,
}

/// A stage ends early at the first check (every `every` steps) where `metric` is at least
/// `at_least`.
#[derive(Clone, Debug, PartialEq)]
pub struct Until {
    /// The stage's metric.
    pub metric: String,
    /// The goal.
    pub at_least: f64,
    /// Steps between checks.
    pub every: u64,
}

/// A file of chat transcripts in an SFT stage's mixture.
#[derive(Clone, Debug, PartialEq)]
pub struct TranscriptData {
    /// The JSONL file (`{"messages": [...]}` per line).
    pub path: PathBuf,
    /// Its weight in the mixture, next to the environments'.
    pub weight: f64,
}

/// A validated run configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    /// Run name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// The run repeats bit for bit on the same machine: every request generated by exactly the
    /// version its step is fixed to, batch-invariant generation, groups trained in id order.
    pub deterministic: bool,
    /// Starting checkpoint, if any.
    pub checkpoint: Option<PathBuf>,
    /// Config to initialise from, if no checkpoint.
    pub init_config: Option<PathBuf>,
    /// Initialisation seed.
    pub init_seed: u64,
    /// Tokenizer override.
    pub tokenizer: Option<PathBuf>,
    /// Workers.
    pub workers: usize,
    /// Batch per worker.
    pub worker_max_batch: usize,
    /// In-flight requests per worker.
    pub worker_max_in_flight: usize,
    /// Worker device.
    pub worker_device: String,
    /// Workers quantize projections to NVFP4 on load.
    pub worker_nvfp4: bool,
    /// With NVFP4: attention projections stay f32.
    pub worker_keep_attention_f32: bool,
    /// With NVFP4: small decode steps round the projections' activations to int8.
    pub worker_int8_activations: bool,
    /// Workers that front vLLM servers (`[workers] backend = "vllm"`).
    pub vllm: Option<VllmWorkers>,
    /// The PyTorch learner (`[learner] backend = "torch"`), when it trains instead of Chorus'.
    pub torch_learner: Option<TorchLearner>,
    /// Learner device.
    pub learner_device: String,
    /// The learner's forward pass runs through the workers' NVFP4 weights.
    pub learner_nvfp4_forward: bool,
    /// Gradient clip.
    pub max_grad_norm: f64,
    /// The learner saves itself every this many steps (0: only at stage boundaries).
    pub checkpoint_every: u64,
    /// Learner checkpoints kept.
    pub checkpoint_keep: usize,
    /// Step of the routers' load-balancing biases.
    pub router_bias_rate: f64,
    /// Chorus' learner's most padded tokens per forward pass (`None`: the learner's default).
    pub learner_micro_batch_tokens: Option<usize>,
    /// Stages in order.
    pub stages: Vec<Stage>,
    /// Deadline and error budget of environment calls.
    pub environment_faults: FaultPolicy,
    /// How held-out tasks are played when a metric is measured (`[evaluation]`).
    pub heldout_sampling: HeldoutSampling,
}

/// Every default of the run configuration, in one place.
pub struct Defaults;

impl Defaults {
    /// Run seed.
    pub const SEED: u64 = 0;
    /// Deterministic mode costs speed, so it is asked for.
    pub const DETERMINISTIC: bool = false;
    /// Workers.
    pub const WORKERS: usize = 2;
    /// Sequences decoded together.
    pub const WORKER_MAX_BATCH: usize = 64;
    /// Requests in flight per worker.
    pub const WORKER_MAX_IN_FLIGHT: usize = 128;
    /// Device.
    pub const DEVICE: &'static str = "cpu";
    /// The learner saves itself every this many steps.
    pub const CHECKPOINT_EVERY: u64 = 25;
    /// Learner checkpoints kept.
    pub const CHECKPOINT_KEEP: usize = 2;
    /// Step of the routers' load-balancing biases.
    pub const ROUTER_BIAS_RATE: f64 = 1e-3;
    /// RL stages freeze the MoE routers (Nemotron 3's choice); their biases still balance.
    pub const ROUTER: Router = Router::Frozen;
    /// Gradient clip (Nemotron 3 RL).
    pub const MAX_GRAD_NORM: f64 = 1.0;
    /// The off-policy correction of RL stages: truncated importance sampling at the
    /// objective's cap (5), as Nemotron 3 trains.
    pub const CORRECTION: Correction = Correction::Tis;
    /// Initialisation seed of a new model.
    pub const INIT_SEED: u64 = 0;
    /// Worker weight format (`None`: f32).
    pub const WORKER_QUANTIZE: Option<Quantize> = None;
    /// With NVFP4 workers: attention projections are quantized too.
    pub const KEEP_ATTENTION_F32: bool = false;
    /// With NVFP4 workers: activations stay f32, so the learner's NVFP4 forward pass can
    /// match the workers' log-probabilities.
    pub const INT8_ACTIVATIONS: bool = false;
    /// The learner's forward pass format (`None`: full precision).
    pub const LEARNER_QUANTIZE_FORWARD: Option<Quantize> = None;
    /// Prompts per step.
    pub const PROMPTS_PER_STEP: usize = 16;
    /// Group size.
    pub const GROUP_SIZE: usize = 8;
    /// Staleness bound (Nemotron 3: trajectories at most 1 step old).
    pub const MAX_STALENESS: u64 = 1;
    /// Learning rate.
    pub const LR: f64 = 1e-3;
    /// Warmup steps of a stage's learning rate.
    pub const WARMUP_STEPS: u64 = 0;
    /// What the learning rate does after warmup.
    pub const LR_DECAY: Decay = Decay::Constant;
    /// A cosine decay ends at the stage's `lr` divided by this.
    pub const MIN_LR_DIVISOR: f64 = 10.0;
    /// Advantage estimator (Nemotron's RLOO baseline).
    pub const ADVANTAGE: AdvantageKind = AdvantageKind::LeaveOneOut;
    /// Advantages are clipped to ± this (Nemotron 3).
    pub const ADVANTAGE_CLIP: f64 = 50.0;
    /// The advantage of invalid output (Nemotron 3).
    pub const INVALID_ADVANTAGE: f64 = -5.0;
    /// Prompts' environments are drawn by weight.
    pub const DOMAIN_RATIOS: DomainRatios = DomainRatios::Sampled;
    /// The reward model a `reward_model` stage trains.
    pub const REWARD_MODEL: RewardModelKind = RewardModelKind::BradleyTerry;
    /// The RL objective a `genrm` reward-model stage trains its judge with.
    pub const GENRM_ALGORITHM: Algorithm = Algorithm::Grpo;
    /// Which completions of a group a GenRM compares in an `rlhf` stage.
    pub const COMPARISONS: Comparisons = Comparisons::Circular;
    /// Training pairs per environment of `pairs_from`.
    pub const TRAIN_PAIRS: usize = 512;
    /// Held-out pairs per source.
    pub const HELDOUT_PAIRS: usize = 128;
    /// A curriculum estimates this many steps' worth of prompts.
    pub const CURRICULUM_POOL_STEPS: usize = 8;
    /// Steps between checks of a stage's `until`.
    pub const UNTIL_EVERY: u64 = 10;
    /// Groups whose rewards are all equal carry no signal and are dropped.
    pub const DROP_ZERO_VARIANCE: bool = true;
    /// Sampling weight of an environment in its stage's mixture.
    pub const ENVIRONMENT_WEIGHT: f64 = 1.0;
    /// Difficulty level of an environment.
    pub const DIFFICULTY: u32 = 0;
    /// Prompt limit.
    pub const MAX_PROMPT_TOKENS: usize = 256;
    /// New-token limit.
    pub const MAX_NEW_TOKENS: usize = 32;
    /// Temperature.
    pub const TEMPERATURE: f32 = 1.0;
    /// Episodes per held-out task: one greedy answer.
    pub const HELDOUT_SAMPLES: usize = 1;
    /// Nucleus probability (1 = off).
    pub const TOP_P: f32 = 1.0;
    /// Top-k (0 = off).
    pub const TOP_K: usize = 0;

    /// The update rule of a stage of this kind: Nemotron 3's RLVR objective (clip 0.2/0.28,
    /// token mean) for RL.
    pub const fn algorithm(kind: StageKind) -> Algorithm {
        match kind {
            StageKind::Sft | StageKind::RewardModel | StageKind::MtpHeal => Algorithm::Sft,
            StageKind::Rlvr | StageKind::SweRl | StageKind::Rlhf => Algorithm::Dapo,
        }
    }
}

/// The RL objective of stage `i`: the algorithm's defaults, the run's correction, then what
/// `[learner]` sets for every stage, then what the stage sets. An error names the key that
/// was written (the stage's, or `learner.*` when the stage left it to the run).
fn stage_objective(
    ctx: &Ctx<'_>,
    i: usize,
    algorithm: chorus_proto::objective::Algorithm,
    learner: &RawLearner,
    learner_aggregation: Option<Aggregation>,
    s: &RawStage,
) -> Result<Objective, ConfigError> {
    let k = |f: &str| format!("stages[{i}].{f}");
    let mut o = Objective::for_algorithm(algorithm);
    o.correction = Defaults::CORRECTION;
    let mut from_learner = BTreeSet::new();
    let mut number = |field: &mut f64, name: &'static str, stage: Option<f64>, run: Option<f64>| {
        if let Some(v) = stage {
            *field = v;
        } else if let Some(v) = run {
            *field = v;
            from_learner.insert(name);
        }
    };
    number(&mut o.eps_low, "eps_low", s.eps_low, learner.eps_low);
    number(&mut o.eps_high, "eps_high", s.eps_high, learner.eps_high);
    number(&mut o.tis_cap, "tis_cap", s.tis_cap, learner.tis_cap);
    number(&mut o.icepop_low, "icepop_low", s.icepop_low, None);
    number(&mut o.icepop_high, "icepop_high", s.icepop_high, None);
    number(&mut o.kl_coef, "kl_coef", s.kl_coef, None);
    match ctx.choice(&k("aggregation"), s.aggregation.clone())? {
        Some(a) => o.aggregation = a,
        None => {
            if let Some(a) = learner_aggregation {
                o.aggregation = a;
                from_learner.insert("aggregation");
            }
        }
    }
    if let Some(c) = ctx.choice(&k("correction"), s.correction.clone())? {
        o.correction = c;
    }
    if let Some(e) = ctx.choice(&k("kl_estimator"), s.kl_estimator.clone())? {
        o.kl_estimator = e;
    }
    if s.norm_length.is_some() {
        o.norm_length = s.norm_length;
    }
    let key = |setting: &str| {
        if from_learner.contains(setting) {
            format!("learner.{setting}")
        } else {
            k(setting)
        }
    };
    o.validate()
        .map_err(|e| ctx.err(key(&e.setting), e.message))?;
    Ok(o)
}

/// How stage `i` turns rewards into advantages: the baseline, Nemotron's clip and invalid-output
/// penalty, and standard-deviation normalisation (off by default for `reinforce`, which is RLOO
/// with the leave-one-out baseline).
fn advantage_shaping(
    ctx: &Ctx<'_>,
    i: usize,
    algorithm: Algorithm,
    s: &RawStage,
) -> Result<AdvantageShaping, ConfigError> {
    let k = |f: &str| format!("stages[{i}].{f}");
    let kind = ctx
        .choice(&k("advantage"), s.advantage.clone())?
        .unwrap_or(Defaults::ADVANTAGE);
    let clip = s.advantage_clip.unwrap_or(Defaults::ADVANTAGE_CLIP);
    if !(clip > 0.0 && clip.is_finite()) {
        return Err(ctx.err(
            k("advantage_clip"),
            format!("{clip}; allowed: a finite number > 0"),
        ));
    }
    let invalid = s.invalid_advantage.unwrap_or(Defaults::INVALID_ADVANTAGE);
    if !invalid.is_finite() || invalid.abs() > clip {
        return Err(ctx.err(
            k("invalid_advantage"),
            format!("{invalid}; allowed: a finite number within ±advantage_clip ({clip})"),
        ));
    }
    let coef = |key: &str, v: Option<f64>| match v.unwrap_or(0.0) {
        c if c >= 0.0 && c.is_finite() => Ok(c),
        c => Err(ctx.err(k(key), format!("{c}; allowed: a finite number >= 0"))),
    };
    Ok(AdvantageShaping {
        kind,
        std_normalize: s
            .advantage_std_normalize
            .unwrap_or(algorithm != Algorithm::Reinforce),
        clip,
        invalid,
        length_coef_answer: coef("length_coef_answer", s.length_coef_answer)?,
        length_coef_reasoning: coef("length_coef_reasoning", s.length_coef_reasoning)?,
    })
}

/// Stage `i`'s curriculum: only RL stages have one; its pool and samples default to 8 steps of
/// prompts and a group's completions.
fn stage_curriculum(
    ctx: &Ctx<'_>,
    i: usize,
    kind: StageKind,
    s: &RawStage,
) -> Result<Option<CurriculumSettings>, ConfigError> {
    let k = |f: &str| format!("stages[{i}].{f}");
    let chosen = ctx
        .choice(&k("curriculum"), s.curriculum.clone())?
        .unwrap_or(CurriculumKind::None);
    if chosen == CurriculumKind::None {
        for (key, set) in [
            ("curriculum_pool", s.curriculum_pool.is_some()),
            ("curriculum_samples", s.curriculum_samples.is_some()),
        ] {
            if set {
                return Err(ctx.err(
                    k(key),
                    "only used with curriculum = \"pass_rate\"; set that too",
                ));
            }
        }
        return Ok(None);
    }
    if !kind.is_rl() {
        return Err(ctx.err(
            k("curriculum"),
            "a pass-rate curriculum ranks prompts by sampled rewards; allowed in: rlvr stages",
        ));
    }
    let per_step = s.prompts_per_step.unwrap_or(Defaults::PROMPTS_PER_STEP);
    let pool = s
        .curriculum_pool
        .unwrap_or(per_step.saturating_mul(Defaults::CURRICULUM_POOL_STEPS));
    let samples = s
        .curriculum_samples
        .unwrap_or(s.group_size.unwrap_or(Defaults::GROUP_SIZE));
    for (key, v) in [("curriculum_pool", pool), ("curriculum_samples", samples)] {
        if v == 0 {
            return Err(ctx.err(k(key), "must be at least 1"));
        }
    }
    Ok(Some(CurriculumSettings { pool, samples }))
}

/// Stage `i`'s reward model: only `reward_model` stages have one, and they need data
/// (`data`, `pairs_from` or both).
fn reward_model_spec(
    ctx: &Ctx<'_>,
    i: usize,
    kind: StageKind,
    s: &RawStage,
) -> Result<Option<RewardModelSpec>, ConfigError> {
    let k = |f: &str| format!("stages[{i}].{f}");
    if kind != StageKind::RewardModel {
        for (key, set) in [
            ("rm", s.rm.is_some()),
            ("pairs_from", s.pairs_from.is_some()),
            ("train_pairs", s.train_pairs.is_some()),
            ("heldout_pairs", s.heldout_pairs.is_some()),
        ] {
            if set {
                return Err(ctx.err(k(key), "allowed in: reward_model stages"));
            }
        }
        return Ok(None);
    }
    let rm = ctx
        .choice(&k("rm"), s.rm.clone())?
        .unwrap_or(Defaults::REWARD_MODEL);
    let pairs_from = s.pairs_from.clone().unwrap_or_default();
    if pairs_from.is_empty() && s.data.is_none() {
        return Err(ctx.err(
            k("pairs_from"),
            "missing: a reward_model stage needs pairs: `data = \"prefs.jsonl\"` (a preference \
             JSONL) and/or `pairs_from = [\"arithmetic\", ...]` (verifiable environments)",
        ));
    }
    let count = |key: &str, v: Option<usize>, default: usize| match v.unwrap_or(default) {
        0 => Err(ctx.err(k(key), "must be at least 1")),
        n => Ok(n),
    };
    Ok(Some(RewardModelSpec {
        rm,
        preferences: s.data.clone(),
        pairs_from,
        train_pairs: count("train_pairs", s.train_pairs, Defaults::TRAIN_PAIRS)?,
        heldout_pairs: count("heldout_pairs", s.heldout_pairs, Defaults::HELDOUT_PAIRS)?,
    }))
}

/// The reward-model stage an `rlhf` stage `i` is judged by: the one `reward_model` names, or
/// the last before it; it must come earlier in the run.
fn rlhf_judge(
    ctx: &Ctx<'_>,
    i: usize,
    kind: StageKind,
    s: &RawStage,
    earlier: &[Stage],
) -> Result<Option<usize>, ConfigError> {
    let k = |f: &str| format!("stages[{i}].{f}");
    if kind != StageKind::Rlhf {
        if s.reward_model.is_some() {
            return Err(ctx.err(k("reward_model"), "allowed in: rlhf stages"));
        }
        return Ok(None);
    }
    let models: Vec<(usize, &str)> = earlier
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == StageKind::RewardModel)
        .map(|(j, e)| (j, e.name.as_str()))
        .collect();
    let named = match &s.reward_model {
        Some(name) => models.iter().find(|(_, n)| n == name),
        None => models.last(),
    };
    match named {
        Some((j, _)) => Ok(Some(*j)),
        None => Err(ctx.err(
            k("reward_model"),
            format!(
                "{}; an rlhf stage is judged by an earlier reward_model stage; earlier ones: {}",
                s.reward_model
                    .as_deref()
                    .map_or("missing".to_string(), |n| format!("`{n}`")),
                if models.is_empty() {
                    "none".to_string()
                } else {
                    models.iter().map(|m| m.1).collect::<Vec<_>>().join(", ")
                }
            ),
        )),
    }
}

/// Which completions of a group the GenRM of an `rlhf` stage compares: `comparisons` (default
/// circular) when its judge (`judge`, an index into `earlier`) is a `genrm` stage; the key is
/// refused everywhere else.
fn genrm_comparisons(
    ctx: &Ctx<'_>,
    i: usize,
    judge: Option<usize>,
    s: &RawStage,
    earlier: &[Stage],
) -> Result<Option<Comparisons>, ConfigError> {
    let key = format!("stages[{i}].comparisons");
    let by_genrm = judge
        .and_then(|j| earlier[j].reward_model.as_ref())
        .is_some_and(|spec| spec.rm == RewardModelKind::Genrm);
    let comparisons = ctx.choice(&key, s.comparisons.clone())?;
    if !by_genrm {
        if comparisons.is_some() {
            let judged_by = judge.map_or(String::new(), |j| {
                format!(
                    " (this stage is judged by `{}`, a bradley_terry model)",
                    earlier[j].name
                )
            });
            return Err(ctx.err(
                key,
                format!(
                    "allowed in: rlhf stages judged by a reward_model stage with rm = \"genrm\"\
                     {judged_by}"
                ),
            ));
        }
        return Ok(None);
    }
    Ok(Some(comparisons.unwrap_or(Defaults::COMPARISONS)))
}

/// Stage `i`'s early end, checked against the metrics a stage of `kind` measures.
fn stage_until(
    ctx: &Ctx<'_>,
    i: usize,
    kind: StageKind,
    u: &RawUntil,
) -> Result<Until, ConfigError> {
    let k = |f: &str| format!("stages[{i}].until.{f}");
    let metrics = kind.metrics();
    let metric = u.metric.clone().ok_or_else(|| {
        ctx.err(
            k("metric"),
            format!("missing; allowed: {}", metrics.join(", ")),
        )
    })?;
    if !metrics.contains(&metric.as_str()) {
        return Err(ctx.err(
            k("metric"),
            format!(
                "`{metric}` is not measured by {} stages; allowed: {}",
                kind.name(),
                metrics.join(", ")
            ),
        ));
    }
    let at_least = u
        .at_least
        .ok_or_else(|| ctx.err(k("at_least"), "missing: the value that ends the stage"))?;
    if !at_least.is_finite() {
        return Err(ctx.err(
            k("at_least"),
            format!("{at_least}; allowed: a finite number"),
        ));
    }
    let every = u.every.unwrap_or(Defaults::UNTIL_EVERY);
    if every == 0 {
        return Err(ctx.err(k("every"), "must be at least 1"));
    }
    Ok(Until {
        metric,
        at_least,
        every,
    })
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A choice read into its enum; a value outside it is an error naming `key` and the
    /// allowed values.
    fn known<T: DeserializeOwned>(&self, key: &str, c: Choice<T>) -> Result<T, ConfigError> {
        match c {
            Choice::Known(v) => Ok(v),
            Choice::Unknown(o) => Err(self.err(key, format!("`{o}`; allowed: {}", allowed::<T>()))),
        }
    }

    /// [`Ctx::known`] for a setting that may be left out.
    fn choice<T: DeserializeOwned>(
        &self,
        key: &str,
        c: Option<Choice<T>>,
    ) -> Result<Option<T>, ConfigError> {
        c.map(|c| self.known(key, c)).transpose()
    }
}

/// The source of one `environments` entry; `ek` makes the entry's dotted keys.
fn environment_source(
    ctx: &Ctx,
    ek: &dyn Fn(&str) -> String,
    e: RawEnvironment,
) -> Result<EnvironmentSource, ConfigError> {
    let RawEnvironment {
        kind,
        name,
        url,
        token_env,
        dataset,
        max_turns,
        ..
    } = e;
    let checked_url = |u: String| {
        if u.starts_with("http://") || u.starts_with("https://") {
            Ok(u)
        } else {
            Err(ctx.err(
                ek("url"),
                format!("`{u}`; allowed: http://host:port or https://host:port"),
            ))
        }
    };
    let kind = match (kind, &name, &url) {
        (Some(k), _, _) => k,
        (None, Some(_), None) => Choice::Known(EnvironmentKind::Builtin),
        (None, None, Some(_)) => Choice::Known(EnvironmentKind::Plugin),
        (None, _, _) => {
            return Err(ctx.err(
                ek("name"),
                "give exactly one of `name` (built-in) and `url` (plugin), or `kind = \"nemo_gym\"` with `url` and `dataset`",
            ));
        }
    };
    if kind != Choice::Known(EnvironmentKind::NemoGym) {
        let written_kind = match &kind {
            Choice::Known(k) => written(k),
            Choice::Unknown(o) => o.clone(),
        };
        let only_nemo_gym = |key: &str, value: String| {
            ctx.err(
                ek(key),
                format!(
                    "`{value}` is only read by kind = \"nemo_gym\" (this entry is kind `{written_kind}`)"
                ),
            )
        };
        if let Some(d) = &dataset {
            return Err(only_nemo_gym("dataset", d.display().to_string()));
        }
        if let Some(t) = max_turns {
            return Err(only_nemo_gym("max_turns", t.to_string()));
        }
    }
    if let Some(var) = &token_env {
        if kind != Choice::Known(EnvironmentKind::Plugin) {
            return Err(ctx.err(
                ek("token_env"),
                format!("`{var}` is only read by plugin entries (`url` without `kind`)"),
            ));
        }
        let well_formed = var
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
            && var
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !well_formed {
            return Err(ctx.err(
                ek("token_env"),
                format!(
                    "`{var}`; allowed: the name of an environment variable (A-Z, 0-9, _; not \
                     starting with a digit) that holds the plugin's token"
                ),
            ));
        }
        if var == "CHORUS_TOKEN" {
            return Err(ctx.err(
                ek("token_env"),
                "`CHORUS_TOKEN` is the run's own token, which is never sent to plugins; give the \
                 plugin a token of its own",
            ));
        }
    }
    match ctx.known(&ek("kind"), kind)? {
        EnvironmentKind::Builtin => match (name, url) {
            (Some(n), None) => Ok(EnvironmentSource::Builtin(n)),
            _ => Err(ctx.err(
                ek("name"),
                "a builtin entry gives `name` (see `chorus env list`) and no `url`",
            )),
        },
        EnvironmentKind::Plugin => match (name, url) {
            (None, Some(u)) => Ok(EnvironmentSource::Remote {
                url: checked_url(u)?,
                token_env,
            }),
            _ => Err(ctx.err(
                ek("url"),
                "a plugin entry gives `url` (http://host:port) and no `name`; the plugin names itself",
            )),
        },
        EnvironmentKind::NemoGym => {
            let url = url.ok_or_else(|| {
                ctx.err(
                    ek("url"),
                    "missing: a nemo_gym entry needs the resources server's `url` (http://host:port)",
                )
            })?;
            let dataset = dataset.ok_or_else(|| {
                ctx.err(
                    ek("dataset"),
                    "missing: a nemo_gym entry needs `dataset`, a NeMo Gym JSONL file",
                )
            })?;
            let name = match name {
                Some(n) if !n.is_empty() => n,
                Some(_) => return Err(ctx.err(ek("name"), "empty; give a name or leave it out")),
                None => format!(
                    "nemo_gym:{}",
                    dataset
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
            };
            let max_turns = max_turns.unwrap_or(1);
            let limit = chorus_environments::nemo_gym::MAX_TURNS_LIMIT;
            if !(1..=limit).contains(&max_turns) {
                return Err(ctx.err(
                    ek("max_turns"),
                    format!("{max_turns}; allowed: 1 to {limit}"),
                ));
            }
            Ok(EnvironmentSource::NemoGym {
                name,
                url: checked_url(url)?,
                dataset,
                max_turns,
            })
        }
    }
}

/// `[learner.torch]` checked against the stages (what the PyTorch learner trains).
fn torch_learner(
    ctx: &Ctx,
    backend: LearnerBackend,
    raw: Option<RawTorchLearner>,
    stages: &[Stage],
) -> Result<Option<TorchLearner>, ConfigError> {
    if backend == LearnerBackend::Chorus {
        return match raw {
            Some(_) => Err(ctx.err(
                "learner.torch",
                "[learner.torch] applies to the PyTorch learner only: set learner.backend = \"torch\"",
            )),
            None => Ok(None),
        };
    }
    if let Some((i, s)) = stages
        .iter()
        .enumerate()
        .find(|(_, s)| !matches!(s.kind, StageKind::Sft | StageKind::Rlvr | StageKind::SweRl))
    {
        return Err(ctx.err(
            format!("stages[{i}].kind"),
            format!(
                "`{}` stages are trained by Chorus' learner only; the PyTorch learner trains \
                 sft, rlvr and swe_rl stages (set learner.backend = \"chorus\")",
                s.kind.name()
            ),
        ));
    }
    let t = raw.unwrap_or_default();
    let processes = match t.processes.unwrap_or(1) {
        0 => return Err(ctx.err("learner.torch.processes", "0; allowed: 1 or more")),
        n => n,
    };
    Ok(Some(TorchLearner {
        processes,
        python: t.python.unwrap_or_else(|| "python3".into()),
        args: t.args.unwrap_or_default(),
        start_timeout: match t.start_timeout_seconds.unwrap_or(300) {
            0 => {
                return Err(ctx.err(
                    "learner.torch.start_timeout_seconds",
                    "0; allowed: 1 or more seconds",
                ));
            }
            n => Duration::from_secs(n),
        },
    }))
}

/// `[workers.vllm]` checked against `[workers]`.
fn vllm_workers(
    ctx: &Ctx,
    backend: WorkerBackend,
    raw: Option<RawVllm>,
    workers: usize,
    deterministic: bool,
    quantize: bool,
) -> Result<Option<VllmWorkers>, ConfigError> {
    if backend == WorkerBackend::Chorus {
        return match raw {
            Some(_) => Err(ctx.err(
                "workers.vllm",
                "[workers.vllm] applies to vLLM workers only: set workers.backend = \"vllm\"",
            )),
            None => Ok(None),
        };
    }
    let v = raw.unwrap_or_default();
    let count = v.count.unwrap_or(workers);
    if count == 0 || count > workers {
        return Err(ctx.err(
            "workers.vllm.count",
            format!("{count}; allowed: 1 to workers.count ({workers})"),
        ));
    }
    if deterministic {
        return Err(ctx.err(
            "workers.backend",
            "`vllm` cannot run a deterministic run (a vLLM server holds one policy version and \
             its batches are not bit-reproducible); use backend = \"chorus\" or deterministic = false",
        ));
    }
    if quantize && count == workers {
        return Err(ctx.err(
            "workers.quantize",
            "applies to Chorus' engine; vLLM workers take their precision from \
             workers.vllm.args (e.g. [\"--dtype\", \"bfloat16\"])",
        ));
    }
    let urls = v.urls.unwrap_or_default();
    if !urls.is_empty() {
        if urls.len() != count {
            return Err(ctx.err(
                "workers.vllm.urls",
                format!(
                    "{} URLs for {count} vLLM workers; give one per worker",
                    urls.len()
                ),
            ));
        }
        if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
            return Err(ctx.err(
                "workers.vllm.urls",
                format!("`{bad}` is not an address; allowed: http://host:port"),
            ));
        }
        if v.weights_dir.is_none() {
            return Err(ctx.err(
                "workers.vllm.weights_dir",
                "missing: with `urls`, name a directory the servers can read (published \
                 versions are written there for them to reload)",
            ));
        }
    }
    let seconds = |key: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
        match v.unwrap_or(default) {
            0 => Err(ctx.err(
                format!("workers.vllm.{key}"),
                "0; allowed: 1 or more seconds",
            )),
            n => Ok(Duration::from_secs(n)),
        }
    };
    let inject_faults = v
        .inject_faults
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            Ok((
                f.version,
                ctx.known("workers.vllm.inject_faults.fault", f.fault)?,
            ))
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    if let Some((0, _)) = inject_faults.iter().find(|(v, _)| *v == 0) {
        return Err(ctx.err(
            "workers.vllm.inject_faults.version",
            "0; faults apply to updates, from version 1 on",
        ));
    }
    Ok(Some(VllmWorkers {
        count,
        python: v.python.unwrap_or_else(|| "python3".into()),
        urls,
        weights_dir: v.weights_dir,
        args: v.args.unwrap_or_default(),
        env: v.env.unwrap_or_default(),
        max_model_len: match v.max_model_len.unwrap_or(2048) {
            0 => return Err(ctx.err("workers.vllm.max_model_len", "0; allowed: 1 or more tokens")),
            n => n,
        },
        start_timeout: seconds("start_timeout_seconds", v.start_timeout_seconds, 600)?,
        update_timeout: seconds("update_timeout_seconds", v.update_timeout_seconds, 120)?,
        request_timeout: seconds("request_timeout_seconds", v.request_timeout_seconds, 600)?,
        inject_faults,
    }))
}

fn device(ctx: &Ctx, key: &str, d: Option<String>) -> Result<String, ConfigError> {
    let d = d.unwrap_or_else(|| Defaults::DEVICE.to_string());
    let ok = d == "cpu"
        || d.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<u32>().is_ok());
    if !ok {
        return Err(ctx.err(key, format!("`{d}` is not a device; allowed: cpu, cuda:N")));
    }
    Ok(d)
}

impl Stage {
    /// The learning rate of the stage's step `step` (0-based): linear warmup to `lr` over
    /// `warmup_steps`, then constant or a cosine down to `min_lr` at the last step. The
    /// scheduler sends it with each group, so every stage has its own schedule.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_schedule().lr(step)
    }

    /// The stage's learning-rate schedule over its own steps.
    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            peak_lr: self.lr,
            warmup_steps: self.warmup_steps,
            decay: self.lr_decay,
            total_steps: self.steps,
            min_lr: self.min_lr,
        }
    }
}

impl RunConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "<file>".into(),
            message: e.to_string(),
        })?;
        // Paths in the file are relative to the file.
        Self::from_toml_relative_to(&text, &file, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates TOML text whose relative paths (model, tokenizer, datasets) are
    /// relative to `base`; `file` names it in errors.
    pub fn from_toml_relative_to(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg = Self::from_toml_str(text, file)?;
        for stage in &mut cfg.stages {
            if let Some(data) = &mut stage.data
                && data.path.is_relative()
            {
                data.path = base.join(&data.path);
            }
            if let Some(rm) = &mut stage.reward_model
                && let Some(path) = &mut rm.preferences
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
            for env in &mut stage.environments {
                if let EnvironmentSource::NemoGym { dataset, .. } = &mut env.source
                    && dataset.is_relative()
                {
                    *dataset = base.join(&*dataset);
                }
            }
        }
        let vllm_weights = cfg.vllm.as_mut().and_then(|v| v.weights_dir.as_mut());
        for p in [
            cfg.checkpoint.as_mut(),
            cfg.init_config.as_mut(),
            cfg.tokenizer.as_mut(),
            vllm_weights,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let ctx = Ctx { file };
        let raw: RawRunConfig = toml::from_str(text).map_err(|e| {
            // Name the offending line, which starts with the key.
            let (key, at) = match e.span() {
                Some(span) => {
                    let line_no = text[..span.start.min(text.len())].matches('\n').count();
                    let line = text.lines().nth(line_no).unwrap_or("").trim();
                    (
                        line.split('=').next().unwrap_or(line).trim().to_string(),
                        format!(" (line {}: `{line}`)", line_no + 1),
                    )
                }
                None => ("<file>".to_string(), String::new()),
            };
            ctx.err(
                if key.is_empty() { "<file>".into() } else { key },
                format!("{}{at}", e.message()),
            )
        })?;
        Self::resolve(raw, &ctx)
    }

    fn resolve(raw: RawRunConfig, ctx: &Ctx) -> Result<Self, ConfigError> {
        let name = raw
            .name
            .ok_or_else(|| ctx.err("name", "missing: give the run a name"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ctx.err(
                "name",
                format!("`{name}`: allowed characters are letters, digits, '-', '_' and '.'"),
            ));
        }
        let model = raw.model.ok_or_else(|| {
            ctx.err(
                "model",
                "missing: give [model] with `checkpoint` or `init_config`",
            )
        })?;
        match (&model.checkpoint, &model.init_config) {
            (Some(_), Some(_)) => {
                return Err(ctx.err(
                    "model",
                    "give either `checkpoint` or `init_config`, not both",
                ));
            }
            (None, None) => {
                return Err(ctx.err(
                    "model",
                    "give `checkpoint` (a directory) or `init_config` (an HF config.json)",
                ));
            }
            _ => {}
        }
        let w = raw.workers.unwrap_or_default();
        let l = raw.learner.unwrap_or_default();
        let positive = |key: &str, v: usize| {
            if v == 0 {
                Err(ctx.err(key, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        let learner_aggregation = ctx.choice("learner.aggregation", l.aggregation.clone())?;
        let raw_stages = raw.stages.unwrap_or_default();
        if raw_stages.is_empty() {
            return Err(ctx.err("stages", "missing: give at least one [[stages]] table"));
        }
        let mut names = BTreeSet::new();
        let mut stages = vec![];
        for (i, s) in raw_stages.into_iter().enumerate() {
            let k = |f: &str| format!("stages[{i}].{f}");
            let name = s
                .name
                .clone()
                .ok_or_else(|| ctx.err(k("name"), "missing"))?;
            if !names.insert(name.clone()) {
                return Err(ctx.err(
                    k("name"),
                    format!("`{name}` is used by an earlier stage; names must be unique"),
                ));
            }
            let kind = ctx.choice(&k("kind"), s.kind.clone())?.ok_or_else(|| {
                ctx.err(
                    k("kind"),
                    format!("missing; allowed: {}", allowed::<StageKind>()),
                )
            })?;
            // A GenRM is trained with an RL objective (GRPO unless the stage names another).
            let genrm = kind == StageKind::RewardModel
                && ctx.choice(&k("rm"), s.rm.clone())? == Some(RewardModelKind::Genrm);
            let algorithm = ctx
                .choice(&k("algorithm"), s.algorithm.clone())?
                .unwrap_or(if genrm {
                    Defaults::GENRM_ALGORITHM
                } else {
                    Defaults::algorithm(kind)
                });
            let objective = match (kind, algorithm.rl()) {
                (StageKind::RewardModel, Some(rl)) if genrm => {
                    Some(stage_objective(ctx, i, rl, &l, learner_aggregation, &s)?)
                }
                (StageKind::RewardModel, _) => {
                    if s.algorithm.is_some() {
                        return Err(ctx.err(
                            k("algorithm"),
                            if genrm {
                                format!(
                                    "`{}` for a genrm stage; allowed: {}",
                                    written(&algorithm),
                                    chorus_proto::objective::Algorithm::NAMES.join(", ")
                                )
                            } else {
                                "reward_model stages choose their loss with `rm`; allowed: \
                                 rm = \"bradley_terry\" (no algorithm) or \"genrm\" (with an \
                                 RL algorithm, default grpo)"
                                    .to_string()
                            },
                        ));
                    }
                    None
                }
                (StageKind::MtpHeal, _) => {
                    if s.algorithm.is_some() {
                        return Err(ctx.err(
                            k("algorithm"),
                            "mtp_heal stages train the MTP head with its own multi-token \
                             prediction loss; drop `algorithm`",
                        ));
                    }
                    None
                }
                (StageKind::Sft, None) => None,
                (StageKind::Rlvr | StageKind::SweRl | StageKind::Rlhf, Some(rl)) => {
                    Some(stage_objective(ctx, i, rl, &l, learner_aggregation, &s)?)
                }
                (StageKind::Sft, Some(_)) => {
                    return Err(ctx.err(
                        k("algorithm"),
                        format!("`{}` for an sft stage; allowed: sft", written(&algorithm)),
                    ));
                }
                (StageKind::Rlvr | StageKind::SweRl | StageKind::Rlhf, None) => {
                    return Err(ctx.err(
                        k("algorithm"),
                        format!(
                            "`sft` for an rlvr stage; allowed: {}",
                            chorus_proto::objective::Algorithm::NAMES.join(", ")
                        ),
                    ));
                }
            };
            let steps = s.steps.ok_or_else(|| ctx.err(k("steps"), "missing"))?;
            if steps == 0 {
                return Err(ctx.err(k("steps"), "must be at least 1"));
            }
            let advantage = advantage_shaping(ctx, i, algorithm, &s)?;
            let until = s
                .until
                .as_ref()
                .map(|u| stage_until(ctx, i, kind, u))
                .transpose()?;
            let curriculum = stage_curriculum(ctx, i, kind, &s)?;
            if s.max_turns == Some(0) {
                return Err(ctx.err(k("max_turns"), "must be at least 1"));
            }
            let data = match (&s.data, kind) {
                (None, _) => {
                    if s.data_weight.is_some() {
                        return Err(
                            ctx.err(k("data_weight"), "only used with `data`; set that too")
                        );
                    }
                    None
                }
                (Some(_), StageKind::Rlvr | StageKind::SweRl | StageKind::Rlhf) => {
                    return Err(ctx.err(
                        k("data"),
                        "transcripts are supervised data; allowed in: sft stages (and preference \
                         JSONL in reward_model stages)",
                    ));
                }
                (Some(_), StageKind::RewardModel) => None,
                (Some(_), StageKind::MtpHeal) => {
                    return Err(ctx.err(
                        k("data"),
                        "mtp_heal stages learn from this run's own rollouts in the ledger; \
                         `data` is allowed in: sft stages (transcripts) and reward_model stages \
                         (preferences)",
                    ));
                }
                (Some(path), StageKind::Sft) => {
                    let weight = s.data_weight.unwrap_or(Defaults::ENVIRONMENT_WEIGHT);
                    if !(weight > 0.0 && weight.is_finite()) {
                        return Err(ctx.err(
                            k("data_weight"),
                            format!("{weight}; allowed: a finite number > 0"),
                        ));
                    }
                    Some(TranscriptData {
                        path: path.clone(),
                        weight,
                    })
                }
            };
            let reward_model = reward_model_spec(ctx, i, kind, &s)?;
            let judge = rlhf_judge(ctx, i, kind, &s, &stages)?;
            let comparisons = genrm_comparisons(ctx, i, judge, &s, &stages)?;
            let router = ctx.choice(&k("router"), s.router.clone())?;
            if router.is_some() && !kind.is_rl() {
                return Err(ctx.err(k("router"), "allowed in: rlvr, swe_rl and rlhf stages"));
            }
            let router_frozen =
                kind.is_rl() && router.unwrap_or(Defaults::ROUTER) == Router::Frozen;
            let envs = s.environments.clone().unwrap_or_default();
            if envs.is_empty() && data.is_none() && reward_model.is_none() {
                return Err(ctx.err(
                    k("environments"),
                    "missing: give at least one { name = \"arithmetic\", weight = 1.0 } (or, \
                     in an sft stage, `data`: a JSONL file of chat transcripts)",
                ));
            }
            let mut environments = vec![];
            for (j, e) in envs.into_iter().enumerate() {
                let ek = |f: &str| format!("stages[{i}].environments[{j}].{f}");
                let (weight, difficulty) = (e.weight, e.difficulty);
                let source = environment_source(ctx, &ek, e)?;
                if kind == StageKind::Sft && matches!(source, EnvironmentSource::NemoGym { .. }) {
                    return Err(ctx.err(
                        ek("kind"),
                        "NeMo Gym rows have no reference solutions to warm up on; allowed in: rl stages",
                    ));
                }
                let weight = weight.unwrap_or(Defaults::ENVIRONMENT_WEIGHT);
                if !(weight > 0.0 && weight.is_finite()) {
                    return Err(ctx.err(
                        ek("weight"),
                        format!("{weight}; allowed: a finite number > 0"),
                    ));
                }
                environments.push(EnvironmentSpec {
                    source,
                    weight,
                    difficulty: difficulty.unwrap_or(Defaults::DIFFICULTY),
                });
            }
            if until.is_some() && environments.is_empty() && kind != StageKind::RewardModel {
                return Err(ctx.err(
                    k("until"),
                    "the stage's metric is the held-out accuracy of its environments, and it has \
                     none; add environments or drop `until`",
                ));
            }
            let sampling = s.sampling.unwrap_or_default();
            let temperature = sampling.temperature.unwrap_or(Defaults::TEMPERATURE);
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(ctx.err(
                    k("sampling.temperature"),
                    format!("{temperature}; allowed: > 0"),
                ));
            }
            let top_p = sampling.top_p.unwrap_or(Defaults::TOP_P);
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(ctx.err(k("sampling.top_p"), format!("{top_p}; allowed: (0, 1]")));
            }
            let lr = s.lr.unwrap_or(Defaults::LR);
            if !(lr > 0.0 && lr.is_finite()) {
                return Err(ctx.err(k("lr"), format!("{lr}; allowed: > 0")));
            }
            let lr_decay = ctx
                .choice(&k("lr_decay"), s.lr_decay)?
                .unwrap_or(Defaults::LR_DECAY);
            let min_lr = s.min_lr.unwrap_or(lr / Defaults::MIN_LR_DIVISOR);
            if !(min_lr >= 0.0 && min_lr <= lr) {
                return Err(ctx.err(
                    k("min_lr"),
                    format!("{min_lr}; allowed: from 0 to the stage's lr ({lr})"),
                ));
            }
            if s.min_lr.is_some() && lr_decay == Decay::Constant {
                return Err(ctx.err(
                    k("min_lr"),
                    "only used with lr_decay = \"cosine\"; set that too, or drop min_lr",
                ));
            }
            let group_size = positive(
                &k("group_size"),
                s.group_size.unwrap_or(Defaults::GROUP_SIZE),
            )?;
            if kind.is_rl() && group_size < 2 {
                return Err(ctx.err(
                    k("group_size"),
                    "rl stages need at least 2 completions per prompt to compare",
                ));
            }
            stages.push(Stage {
                name,
                kind,
                algorithm,
                objective,
                steps,
                prompts_per_step: positive(
                    &k("prompts_per_step"),
                    s.prompts_per_step.unwrap_or(Defaults::PROMPTS_PER_STEP),
                )?,
                group_size,
                max_staleness: s.max_staleness.unwrap_or(Defaults::MAX_STALENESS),
                lr,
                warmup_steps: s.warmup_steps.unwrap_or(Defaults::WARMUP_STEPS),
                lr_decay,
                min_lr,
                max_prompt_tokens: positive(
                    &k("max_prompt_tokens"),
                    s.max_prompt_tokens.unwrap_or(Defaults::MAX_PROMPT_TOKENS),
                )?,
                max_new_tokens: positive(
                    &k("max_new_tokens"),
                    s.max_new_tokens.unwrap_or(Defaults::MAX_NEW_TOKENS),
                )?,
                advantage,
                domain_ratios: ctx
                    .choice(&k("domain_ratios"), s.domain_ratios.clone())?
                    .unwrap_or(Defaults::DOMAIN_RATIOS),
                until,
                curriculum,
                reward_model,
                judge,
                comparisons,
                router_frozen,
                max_turns: s.max_turns,
                drop_zero_variance: s.drop_zero_variance.unwrap_or(Defaults::DROP_ZERO_VARIANCE),
                environments,
                data,
                temperature,
                top_p,
                top_k: sampling.top_k.unwrap_or(Defaults::TOP_K),
                think_budget: sampling.think_budget,
            });
        }
        // Checked in the order the keys appear in the file's tables, so the first error named
        // is the first one a reader meets.
        let workers = positive("workers.count", w.count.unwrap_or(Defaults::WORKERS))?;
        let worker_max_batch = positive(
            "workers.max_batch",
            w.max_batch.unwrap_or(Defaults::WORKER_MAX_BATCH),
        )?;
        let worker_max_in_flight = positive(
            "workers.max_in_flight",
            w.max_in_flight.unwrap_or(Defaults::WORKER_MAX_IN_FLIGHT),
        )?;
        let worker_device = device(ctx, "workers.device", w.device)?;
        let worker_quantize = ctx
            .choice("workers.quantize", w.quantize)?
            .or(Defaults::WORKER_QUANTIZE);
        let backend = ctx
            .choice("workers.backend", w.backend)?
            .unwrap_or(WorkerBackend::Chorus);
        let vllm = vllm_workers(
            ctx,
            backend,
            w.vllm,
            workers,
            raw.deterministic.unwrap_or(Defaults::DETERMINISTIC),
            worker_quantize.is_some(),
        )?;
        let learner_quantize = ctx
            .choice("learner.quantize_forward", l.quantize_forward)?
            .or(Defaults::LEARNER_QUANTIZE_FORWARD);
        let torch_learner = torch_learner(
            ctx,
            ctx.choice("learner.backend", l.backend.clone())?
                .unwrap_or(LearnerBackend::Chorus),
            l.torch.clone(),
            &stages,
        )?;
        let learner_nvfp4_forward = match learner_quantize {
            None => false,
            Some(Quantize::Nvfp4) if worker_quantize == Some(Quantize::Nvfp4) => true,
            Some(Quantize::Nvfp4) => {
                return Err(ctx.err(
                    "learner.quantize_forward",
                    "`nvfp4` trains through the workers' NVFP4 weights, so it needs \
                     workers.quantize = \"nvfp4\" too",
                ));
            }
        };
        let worker_int8_activations = w.int8_activations.unwrap_or(Defaults::INT8_ACTIVATIONS);
        if worker_int8_activations {
            if worker_quantize != Some(Quantize::Nvfp4) || backend != WorkerBackend::Chorus {
                return Err(ctx.err(
                    "workers.int8_activations",
                    "true rounds the activations of Chorus' NVFP4 projections, so it needs \
                     workers.quantize = \"nvfp4\" and the chorus backend",
                ));
            }
            if learner_nvfp4_forward {
                return Err(ctx.err(
                    "workers.int8_activations",
                    "true cannot be mirrored by learner.quantize_forward = \"nvfp4\" (it \
                     rounds weights, not activations): use one or the other",
                ));
            }
        }
        let learner_micro_batch_tokens = match l.micro_batch_tokens {
            Some(0) => {
                return Err(ctx.err(
                    "learner.micro_batch_tokens",
                    "0; allowed: 1 or more (the most padded tokens in one forward pass)",
                ));
            }
            n => n,
        };
        Ok(RunConfig {
            name,
            seed: raw.seed.unwrap_or(Defaults::SEED),
            deterministic: raw.deterministic.unwrap_or(Defaults::DETERMINISTIC),
            checkpoint: model.checkpoint,
            init_config: model.init_config,
            init_seed: model.init_seed.unwrap_or(Defaults::INIT_SEED),
            tokenizer: model.tokenizer,
            workers,
            worker_max_batch,
            worker_max_in_flight,
            worker_device,
            worker_nvfp4: worker_quantize == Some(Quantize::Nvfp4),
            worker_keep_attention_f32: w.keep_attention_f32.unwrap_or(Defaults::KEEP_ATTENTION_F32),
            worker_int8_activations,
            vllm,
            torch_learner,
            learner_nvfp4_forward,
            learner_device: device(ctx, "learner.device", l.device)?,
            max_grad_norm: l.max_grad_norm.unwrap_or(Defaults::MAX_GRAD_NORM),
            checkpoint_every: l.checkpoint_every.unwrap_or(Defaults::CHECKPOINT_EVERY),
            checkpoint_keep: positive(
                "learner.checkpoint_keep",
                l.checkpoint_keep.unwrap_or(Defaults::CHECKPOINT_KEEP),
            )?,
            router_bias_rate: match l.router_bias_rate.unwrap_or(Defaults::ROUTER_BIAS_RATE) {
                r if r >= 0.0 && r.is_finite() => r,
                r => {
                    return Err(ctx.err(
                        "learner.router_bias_rate",
                        format!("{r}; allowed: a finite number >= 0 (0: off)"),
                    ));
                }
            },
            learner_micro_batch_tokens,
            stages,
            environment_faults: fault_policy(ctx, raw.environment_faults.unwrap_or_default())?,
            heldout_sampling: heldout_sampling(ctx, raw.evaluation.unwrap_or_default())?,
        })
    }
}

/// The most episodes per held-out task `[evaluation] samples` allows.
pub const MAX_HELDOUT_SAMPLES: usize = 64;

fn heldout_sampling(ctx: &Ctx<'_>, raw: RawEvaluation) -> Result<HeldoutSampling, ConfigError> {
    let d = HeldoutSampling::default();
    let samples = match raw.samples {
        None => d.samples,
        Some(n) if (1..=MAX_HELDOUT_SAMPLES).contains(&n) => n,
        Some(n) => {
            return Err(ctx.err(
                "evaluation.samples",
                format!(
                    "{n}; allowed: 1 (one greedy answer per task) to {MAX_HELDOUT_SAMPLES} \
                     (that many sampled at evaluation.temperature)"
                ),
            ));
        }
    };
    let temperature = match raw.temperature {
        None => d.temperature,
        Some(_) if samples == 1 => {
            return Err(ctx.err(
                "evaluation.temperature",
                "is set but evaluation.samples is 1, which answers greedily; allowed: a \
                 temperature together with samples >= 2, or no temperature",
            ));
        }
        Some(t) if t > 0.0 && t.is_finite() && t <= 10.0 => t,
        Some(t) => {
            return Err(ctx.err(
                "evaluation.temperature",
                format!("{t}; allowed: a number in (0, 10]"),
            ));
        }
    };
    Ok(HeldoutSampling {
        samples,
        temperature,
    })
}

fn fault_policy(ctx: &Ctx<'_>, raw: RawEnvironmentFaults) -> Result<FaultPolicy, ConfigError> {
    let d = FaultPolicy::default();
    let deadline = match raw.deadline_seconds {
        None => d.deadline,
        Some(s) if s > 0.0 && s.is_finite() && s <= 86_400.0 => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(ctx.err(
                "environment_faults.deadline_seconds",
                format!("{s}; allowed: a number of seconds in (0, 86400]"),
            ));
        }
    };
    let error_budget = match raw.error_budget {
        None => d.error_budget,
        Some(0) => {
            return Err(ctx.err(
                "environment_faults.error_budget",
                "0; allowed: an integer >= 1 (faults before the environment is paused)",
            ));
        }
        Some(n) => n,
    };
    let probe_after = match raw.probe_seconds {
        None => d.probe_after,
        Some(0.0) => None,
        Some(s) if s > 0.0 && s.is_finite() && s <= 86_400.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(ctx.err(
                "environment_faults.probe_seconds",
                format!(
                    "{s}; allowed: 0 (never resume a paused environment) or seconds in (0, 86400]"
                ),
            ));
        }
    };
    Ok(FaultPolicy {
        deadline,
        error_budget,
        probe_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[model]
init_config = "m.json"
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 5
max_staleness = 0
environments = [{ name = "arithmetic", weight = 2.0 }, { url = "http://127.0.0.1:9000", weight = 1.0 }]
sampling = { temperature = 0.9 }
"#;

    #[test]
    fn the_learners_micro_batch_is_read_and_left_to_the_learner_when_unset() {
        let set = GOOD.replace(
            "name = \"t\"",
            "name = \"t\"\n[learner]\nmicro_batch_tokens = 4096",
        );
        let c = RunConfig::from_toml_str(&set, "x.toml").unwrap();
        assert_eq!(c.learner_micro_batch_tokens, Some(4096));
        let c = RunConfig::from_toml_str(GOOD, "x.toml").unwrap();
        assert_eq!(c.learner_micro_batch_tokens, None);
    }

    #[test]
    fn the_torch_learner_is_read_and_refuses_stages_it_cannot_train() {
        let torch = GOOD.replace(
            "name = \"t\"",
            "name = \"t\"\n[learner]\nbackend = \"torch\"\nmicro_batch_tokens = 512\n[learner.torch]\nargs = [\"--threads\", \"4\"]",
        );
        let c = RunConfig::from_toml_str(&torch, "x.toml").unwrap();
        assert_eq!(c.learner_micro_batch_tokens, Some(512));
        let t = c.torch_learner.unwrap();
        assert_eq!(t.python, "python3");
        assert_eq!(t.args, ["--threads", "4"]);
        assert_eq!(t.start_timeout, Duration::from_secs(300));
        assert_eq!(t.processes, 1);
        assert_eq!(
            RunConfig::from_toml_str(GOOD, "x.toml")
                .unwrap()
                .torch_learner,
            None
        );
        let e = RunConfig::from_toml_str(
            &torch.replace("kind = \"rl\"", "kind = \"mtp_heal\""),
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "stages[1].kind", "{e}");
        assert!(
            e.to_string()
                .contains("`mtp_heal` stages are trained by Chorus' learner only"),
            "{e}"
        );
    }

    #[test]
    fn vllm_workers_are_read_with_their_defaults() {
        let c = RunConfig::from_toml_str(
            &GOOD.replace(
                "name = \"t\"",
                "name = \"t\"\n[workers]\ncount = 3\nbackend = \"vllm\"\n[workers.vllm]\n\
                 count = 2\nargs = [\"--dtype\", \"bfloat16\"]\nenv = { VLLM_CPU_KVCACHE_SPACE = \"4\" }\n\
                 inject_faults = [{ version = 4, fault = \"stall_reload\" }]",
            ),
            "x.toml",
        )
        .unwrap();
        let v = c.vllm.unwrap();
        assert_eq!((c.workers, v.count), (3, 2));
        assert_eq!(v.python, "python3");
        assert_eq!(v.args, ["--dtype", "bfloat16"]);
        assert_eq!(v.env["VLLM_CPU_KVCACHE_SPACE"], "4");
        assert_eq!(v.max_model_len, 2048);
        assert_eq!(v.update_timeout, Duration::from_secs(120));
        assert_eq!(v.inject_faults, [(4, VllmFaultKind::StallReload)]);
        assert!(v.urls.is_empty() && v.weights_dir.is_none());
        // Chorus' engine by default, with no vLLM settings.
        assert_eq!(RunConfig::from_toml_str(GOOD, "x.toml").unwrap().vllm, None);
        // A weights directory is relative to the config file, as every path is.
        let text = GOOD.replace(
            "name = \"t\"",
            "name = \"t\"\n[workers]\ncount = 1\nbackend = \"vllm\"\n[workers.vllm]\n\
             urls = [\"http://gpu1:8000\"]\nweights_dir = \"shared/w\"",
        );
        let c = RunConfig::from_toml_relative_to(&text, "x.toml", Path::new("/cfg")).unwrap();
        let v = c.vllm.unwrap();
        assert_eq!(v.weights_dir.unwrap(), Path::new("/cfg/shared/w"));
        assert_eq!(v.urls, ["http://gpu1:8000"]);
    }

    #[test]
    fn advantage_shaping_ratios_and_until_are_read() {
        let c = RunConfig::from_toml_str(
            &GOOD.replace(
                "steps = 5",
                "steps = 5\nalgorithm = \"reinforce\"\nadvantage_clip = 10\ninvalid_advantage = -2\n\
                 domain_ratios = \"fixed\"\nmax_turns = 3\n\
                 until = { metric = \"heldout_accuracy\", at_least = 0.6, every = 4 }",
            ),
            "x.toml",
        )
        .unwrap();
        let rl = &c.stages[1];
        assert_eq!(
            rl.advantage,
            AdvantageShaping {
                kind: Defaults::ADVANTAGE,
                std_normalize: false,
                clip: 10.0,
                invalid: -2.0,
                length_coef_answer: 0.0,
                length_coef_reasoning: 0.0,
            },
            "reinforce is RLOO: no std normalisation unless asked"
        );
        assert_eq!(rl.domain_ratios, DomainRatios::Fixed);
        assert!(rl.router_frozen, "Nemotron 3 freezes the router in RL");
        assert!(!c.stages[0].router_frozen, "an sft stage trains everything");
        assert_eq!(rl.curriculum, None);
        assert_eq!(rl.max_turns, Some(3));
        assert_eq!(
            rl.until,
            Some(Until {
                metric: HELDOUT_ACCURACY.into(),
                at_least: 0.6,
                every: 4,
            })
        );
        let d = RunConfig::from_toml_str(GOOD, "x.toml").unwrap();
        assert_eq!(
            d.stages[1].advantage,
            AdvantageShaping {
                kind: Defaults::ADVANTAGE,
                std_normalize: true,
                clip: Defaults::ADVANTAGE_CLIP,
                invalid: Defaults::INVALID_ADVANTAGE,
                length_coef_answer: 0.0,
                length_coef_reasoning: 0.0,
            },
            "Nemotron 3's shaping by default"
        );
        assert_eq!(d.stages[1].domain_ratios, Defaults::DOMAIN_RATIOS);
        assert_eq!(d.stages[1].until, None);
        // A stage of transcripts alone has no metric to reach.
        let err = RunConfig::from_toml_relative_to(
            &GOOD.replace(
                "steps = 3\nenvironments = [{ name = \"arithmetic\" }]",
                "steps = 3\ndata = \"chat.jsonl\"\nuntil = { metric = \"heldout_accuracy\", at_least = 0.5 }",
            ),
            "x.toml",
            Path::new("/data"),
        )
        .unwrap_err();
        assert_eq!(err.key, "stages[0].until", "{err}");
    }

    #[test]
    fn a_think_budget_and_transcripts_belong_to_their_stage() {
        let c = RunConfig::from_toml_relative_to(
            &GOOD
                .replace(
                    "sampling = { temperature = 0.9 }",
                    "sampling = { temperature = 0.9, think_budget = 8 }",
                )
                .replace(
                    "steps = 3\nenvironments = [{ name = \"arithmetic\" }]",
                    "steps = 3\ndata = \"chat.jsonl\"\ndata_weight = 2.0",
                ),
            "x.toml",
            Path::new("/cfg"),
        )
        .unwrap();
        assert_eq!(c.stages[1].think_budget, Some(8));
        assert_eq!(c.stages[0].think_budget, None);
        assert!(c.stages[0].environments.is_empty());
        assert_eq!(
            c.stages[0].data,
            Some(TranscriptData {
                path: PathBuf::from("/cfg/chat.jsonl"),
                weight: 2.0
            })
        );
        let e = RunConfig::from_toml_str(
            &GOOD.replace(
                "max_staleness = 0",
                "max_staleness = 0\ndata = \"chat.jsonl\"",
            ),
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("stages[1].data") && e.contains("sft stages"),
            "{e}"
        );
    }

    #[test]
    fn deterministic_is_a_top_level_switch() {
        let text = format!("deterministic = true\n{GOOD}");
        assert!(
            RunConfig::from_toml_str(&text, "x.toml")
                .unwrap()
                .deterministic
        );
    }

    #[test]
    fn a_plugin_names_the_variable_of_its_own_token() {
        let with = |entry: &str| {
            RunConfig::from_toml_str(
                &format!(
                    "name = \"t\"\n[model]\ninit_config = \"m.json\"\n[[stages]]\nname = \"rl\"\n\
                     kind = \"rl\"\nsteps = 1\nenvironments = [{entry}]\n"
                ),
                "x.toml",
            )
        };
        let c = with(r#"{ url = "http://127.0.0.1:9", token_env = "MY_PLUGIN_TOKEN" }"#).unwrap();
        assert_eq!(
            c.stages[0].environments[0].source,
            EnvironmentSource::Remote {
                url: "http://127.0.0.1:9".into(),
                token_env: Some("MY_PLUGIN_TOKEN".into()),
            }
        );
        for (entry, says) in [
            (
                r#"{ url = "http://127.0.0.1:9", token_env = "my token" }"#,
                "the name of an environment variable",
            ),
            (
                r#"{ url = "http://127.0.0.1:9", token_env = "CHORUS_TOKEN" }"#,
                "never sent to plugins",
            ),
            (
                r#"{ name = "arithmetic", token_env = "MY_PLUGIN_TOKEN" }"#,
                "only read by plugin entries",
            ),
        ] {
            let e = with(entry).unwrap_err().to_string();
            assert!(
                e.contains("stages[0].environments[0].token_env") && e.contains(says),
                "{entry}: {e}"
            );
        }
    }

    #[test]
    fn defaults_fill_what_is_not_written() {
        let c = RunConfig::from_toml_str(GOOD, "x.toml").unwrap();
        assert_eq!(c.workers, Defaults::WORKERS);
        assert_eq!(c.deterministic, Defaults::DETERMINISTIC);
        assert_eq!(c.stages.len(), 2);
        assert_eq!(c.stages[0].algorithm, Algorithm::Sft);
        assert_eq!(c.stages[1].algorithm, Algorithm::Dapo);
        assert_eq!(c.stages[1].max_staleness, 0);
        assert_eq!(c.stages[0].max_staleness, Defaults::MAX_STALENESS);
        assert_eq!(
            c.stages[1].environments[1].source,
            EnvironmentSource::Remote {
                url: "http://127.0.0.1:9000".into(),
                token_env: None,
            }
        );
        assert_eq!(c.stages[1].temperature, 0.9);
    }

    #[test]
    fn each_stage_has_its_own_warmup_and_decay() {
        let c = RunConfig::from_toml_str(
            &GOOD.replace(
                "steps = 5",
                "steps = 5\nlr = 1e-3\nwarmup_steps = 2\nlr_decay = \"cosine\"\nmin_lr = 1e-4",
            ),
            "x.toml",
        )
        .unwrap();
        let rl = &c.stages[1];
        let lrs: Vec<f64> = (0..5).map(|s| rl.lr_at(s)).collect();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(
            close(lrs[0], 5e-4) && close(lrs[1], 1e-3),
            "warmup: {lrs:?}"
        );
        assert!(close(lrs[2], 1e-3), "the decay starts at the peak: {lrs:?}");
        assert!(close(lrs[3], 5.5e-4), "half way down: {lrs:?}");
        assert!(close(lrs[4], 1e-4), "the last step is at min_lr: {lrs:?}");
        // Without the keys: no warmup, constant, and the default floor is a tenth of lr.
        let sft = &c.stages[0];
        assert_eq!(sft.lr_decay, Decay::Constant);
        assert!((0..3).all(|s| sft.lr_at(s) == sft.lr));
        assert_eq!(sft.min_lr, sft.lr / 10.0);
    }

    #[test]
    fn environment_kinds_parse_and_name_their_errors() {
        let with = |envs: &str| {
            GOOD.replace(
                "environments = [{ name = \"arithmetic\", weight = 2.0 }, { url = \"http://127.0.0.1:9000\", weight = 1.0 }]",
                &format!("environments = [{envs}]"),
            )
        };
        let c = RunConfig::from_toml_str(
            &with(
                "{ kind = \"nemo_gym\", url = \"http://h:8000\", dataset = \"data/mcqa.jsonl\" }, \
                 { kind = \"nemo_gym\", url = \"http://h:8001\", dataset = \"x.jsonl\", name = \"gym_x\", max_turns = 8 }, \
                 { kind = \"plugin\", url = \"http://p:1\" }, { kind = \"builtin\", name = \"needle\" }",
            ),
            "x.toml",
        )
        .unwrap();
        let keys: Vec<_> = c.stages[1].environments.iter().map(|e| e.key()).collect();
        assert_eq!(keys, ["nemo_gym:mcqa", "gym_x", "http://p:1", "needle"]);
        assert_eq!(
            c.stages[1].environments[0].source,
            EnvironmentSource::NemoGym {
                name: "nemo_gym:mcqa".into(),
                url: "http://h:8000".into(),
                dataset: "data/mcqa.jsonl".into(),
                max_turns: 1,
            }
        );
        assert!(matches!(
            c.stages[1].environments[1].source,
            EnvironmentSource::NemoGym { max_turns: 8, .. }
        ));
        for (envs, key, allowed) in [
            (
                "{ kind = \"gym\", url = \"http://h:1\" }",
                "environments[0].kind",
                "builtin, plugin, nemo_gym",
            ),
            (
                "{ kind = \"nemo_gym\", url = \"http://h:1\" }",
                "environments[0].dataset",
                "JSONL",
            ),
            (
                "{ kind = \"nemo_gym\", dataset = \"d.jsonl\" }",
                "environments[0].url",
                "http://host:port",
            ),
            (
                "{ kind = \"nemo_gym\", url = \"h:1\", dataset = \"d.jsonl\" }",
                "environments[0].url",
                "http://host:port",
            ),
            (
                "{ name = \"mcqa\", dataset = \"d.jsonl\" }",
                "environments[0].dataset",
                "nemo_gym",
            ),
            (
                "{ name = \"mcqa\", max_turns = 3 }",
                "environments[0].max_turns",
                "nemo_gym",
            ),
            (
                "{ kind = \"nemo_gym\", url = \"http://h:1\", dataset = \"d.jsonl\", max_turns = 0 }",
                "environments[0].max_turns",
                "1 to 256",
            ),
            (
                "{ kind = \"plugin\", name = \"x\" }",
                "environments[0].url",
                "http://host:port",
            ),
        ] {
            let e = RunConfig::from_toml_str(&with(envs), "x.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(allowed), "{envs}: {e}");
        }
    }

    #[test]
    fn nemo_gym_entries_are_refused_in_sft_stages() {
        let text = GOOD.replace(
            "environments = [{ name = \"arithmetic\" }]",
            "environments = [{ kind = \"nemo_gym\", url = \"http://h:1\", dataset = \"d.jsonl\" }]",
        );
        let e = RunConfig::from_toml_str(&text, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stages[0].environments[0].kind") && e.contains("rl stages"),
            "{e}"
        );
    }

    #[test]
    fn nemo_gym_datasets_are_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("chorus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(
            &path,
            GOOD.replace(
                "{ url = \"http://127.0.0.1:9000\", weight = 1.0 }",
                "{ kind = \"nemo_gym\", url = \"http://h:1\", dataset = \"rows.jsonl\" }",
            ),
        )
        .unwrap();
        let c = RunConfig::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        match &c.stages[1].environments[1].source {
            EnvironmentSource::NemoGym { dataset, .. } => {
                assert_eq!(dataset, &dir.join("rows.jsonl"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn choices_read_into_their_enums() {
        let c = RunConfig::from_toml_str(
            &GOOD
                .replace(
                    "name = \"t\"",
                    "name = \"t\"\n[workers]\nquantize = \"nvfp4\"\n\
                     [learner]\naggregation = \"seq_mean_token_mean\"\nquantize_forward = \"nvfp4\"",
                )
                .replace(
                    "steps = 5",
                    "steps = 5\nadvantage = \"group_norm\"\nalgorithm = \"grpo\"",
                ),
            "x.toml",
        )
        .unwrap();
        let objective = c.stages[1]
            .objective
            .clone()
            .expect("an rl stage has an objective");
        // The stage names grpo; the run-wide aggregation still applies over its default.
        assert_eq!(objective.aggregation, Aggregation::SeqMeanTokenMean);
        assert_eq!((objective.eps_low, objective.eps_high), (0.2, 0.2));
        assert_eq!(c.stages[0].objective, None, "sft stages have none");
        assert!(c.worker_nvfp4 && c.learner_nvfp4_forward);
        assert_eq!(c.stages[1].advantage.kind, AdvantageKind::GroupNorm);
        assert_eq!(c.stages[1].algorithm, Algorithm::Grpo);
        // Unwritten choices take their defaults.
        let d = RunConfig::from_toml_str(GOOD, "x.toml").unwrap();
        assert_eq!(d.stages[1].algorithm, Defaults::algorithm(StageKind::Rlvr));
        let objective = d.stages[1].objective.clone().expect("rl");
        assert_eq!(objective.correction, Defaults::CORRECTION);
        assert_eq!(
            (objective.eps_low, objective.eps_high, objective.aggregation),
            (0.2, 0.28, Aggregation::TokenMean),
            "Nemotron 3's RLVR settings"
        );
        assert!(!d.worker_nvfp4 && !d.learner_nvfp4_forward && !d.worker_int8_activations);
        let int8 = RunConfig::from_toml_str(
            &GOOD.replace(
                "name = \"t\"",
                "name = \"t\"\n[workers]\nquantize = \"nvfp4\"\nint8_activations = true",
            ),
            "x.toml",
        )
        .unwrap();
        assert!(int8.worker_nvfp4 && int8.worker_int8_activations);
        assert_eq!(d.stages[1].advantage.kind, Defaults::ADVANTAGE);
        assert_eq!(d.stages[1].lr_decay, Defaults::LR_DECAY);
        assert_eq!(d.stages[1].top_p, Defaults::TOP_P);
        assert_eq!(d.stages[1].environments[0].difficulty, Defaults::DIFFICULTY);
        assert_eq!(
            d.stages[0].environments[0].weight,
            Defaults::ENVIRONMENT_WEIGHT
        );
        // The lists in errors are serde's own names, in declaration order.
        assert_eq!(
            allowed::<Aggregation>(),
            "token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"
        );
        assert_eq!(
            allowed::<StageKind>(),
            "sft, rl, rlvr, reward_model, swe_rl, rlhf, mtp_heal",
            "rl is the old name of rlvr"
        );
        assert_eq!(allowed::<EnvironmentKind>(), "builtin, plugin, nemo_gym");
        assert_eq!(allowed::<Decay>(), "constant, cosine");
        assert_eq!(written(&EnvironmentKind::NemoGym), "nemo_gym");
    }

    #[test]
    fn a_stage_schedule_is_the_shared_one() {
        let c = RunConfig::from_toml_str(
            &GOOD.replace(
                "steps = 5",
                "steps = 7\nlr = 2e-3\nwarmup_steps = 3\nlr_decay = \"cosine\"\nmin_lr = 1e-4",
            ),
            "x.toml",
        )
        .unwrap();
        let rl = &c.stages[1];
        let s = rl.lr_schedule();
        assert_eq!(
            s,
            LrSchedule {
                peak_lr: 2e-3,
                warmup_steps: 3,
                decay: Decay::Cosine,
                total_steps: 7,
                min_lr: 1e-4,
            }
        );
        for step in 0..10 {
            assert_eq!(rl.lr_at(step), s.lr(step));
        }
    }

    #[test]
    fn errors_name_the_key_and_the_allowed_values() {
        for (from, to, key, allowed) in [
            (
                "kind = \"rl\"",
                "kind = \"ppo\"",
                "stages[1].kind",
                "sft, rl",
            ),
            (
                "weight = 2.0",
                "weight = -1.0",
                "stages[1].environments[0].weight",
                "> 0",
            ),
            (
                "temperature = 0.9",
                "temperature = 0.0",
                "stages[1].sampling.temperature",
                "> 0",
            ),
            (
                "name = \"rl\"",
                "name = \"warmup\"",
                "stages[1].name",
                "unique",
            ),
            (
                "steps = 5",
                "steps = 5\ngroup_size = 1",
                "stages[1].group_size",
                "at least 2",
            ),
            (
                "steps = 5",
                "steps = 5\nbogus = 1",
                "`bogus`",
                "expected one of",
            ),
            (
                "steps = 5",
                "steps = 5\nlr_decay = \"linear\"",
                "stages[1].lr_decay",
                "constant, cosine",
            ),
            (
                "steps = 5",
                "steps = 5\nlr = 1e-3\nlr_decay = \"cosine\"\nmin_lr = 0.1",
                "stages[1].min_lr",
                "from 0 to the stage's lr",
            ),
            (
                "steps = 5",
                "steps = 5\nmin_lr = 1e-5",
                "stages[1].min_lr",
                "lr_decay = \"cosine\"",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[evaluation]\nsamples = 0",
                "evaluation.samples",
                "1 (one greedy answer per task) to 64",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[evaluation]\ntemperature = 0.7",
                "evaluation.temperature",
                "samples >= 2",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[evaluation]\nsamples = 4\ntemperature = 0",
                "evaluation.temperature",
                "(0, 10]",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[environment_faults]\nerror_budget = 0",
                "environment_faults.error_budget",
                ">= 1",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[environment_faults]\ndeadline_seconds = -2",
                "environment_faults.deadline_seconds",
                "(0, 86400]",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\nquantize_forward = \"nvfp4\"",
                "learner.quantize_forward",
                "workers.quantize = \"nvfp4\"",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nint8_activations = true",
                "workers.int8_activations",
                "workers.quantize = \"nvfp4\"",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nquantize = \"nvfp4\"\nint8_activations = true\n\
                 [learner]\nquantize_forward = \"nvfp4\"",
                "workers.int8_activations",
                "learner.quantize_forward",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\nquantize_forward = \"fp8\"",
                "learner.quantize_forward",
                "allowed: nvfp4",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\naggregation = \"sum\"",
                "learner.aggregation",
                "`sum`; allowed: token_mean, seq_mean_token_mean",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\nbackend = \"jax\"",
                "learner.backend",
                "`jax`; allowed: chorus, torch",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner.torch]\npython = \"p\"",
                "learner.torch",
                "set learner.backend = \"torch\"",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nbackend = \"sglang\"",
                "workers.backend",
                "`sglang`; allowed: chorus, vllm",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers.vllm]\npython = \"p\"",
                "workers.vllm",
                "set workers.backend = \"vllm\"",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\ncount = 2\nbackend = \"vllm\"\n[workers.vllm]\ncount = 3",
                "workers.vllm.count",
                "3; allowed: 1 to workers.count (2)",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\ndeterministic = true\n[workers]\nbackend = \"vllm\"",
                "workers.backend",
                "cannot run a deterministic run",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\ncount = 2\nbackend = \"vllm\"\n[workers.vllm]\nurls = [\"http://a:1\"]",
                "workers.vllm.urls",
                "1 URLs for 2 vLLM workers",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\ncount = 1\nbackend = \"vllm\"\n[workers.vllm]\nurls = [\"http://a:1\"]",
                "workers.vllm.weights_dir",
                "a directory the servers can read",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nbackend = \"vllm\"\n[workers.vllm]\nupdate_timeout_seconds = 0",
                "workers.vllm.update_timeout_seconds",
                "allowed: 1 or more seconds",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nbackend = \"vllm\"\n[workers.vllm]\ninject_faults = [{ version = 2, fault = \"oops\" }]",
                "workers.vllm.inject_faults.fault",
                "`oops`; allowed: corrupt_weights, stall_reload, kill_server",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nbackend = \"vllm\"\nquantize = \"nvfp4\"",
                "workers.quantize",
                "vLLM workers take their precision from",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[workers]\nquantize = \"int8\"",
                "workers.quantize",
                "`int8`; allowed: nvfp4",
            ),
            (
                "steps = 5",
                "steps = 5\nadvantage = \"ppo\"",
                "stages[1].advantage",
                "allowed: group_norm, leave_one_out",
            ),
            (
                "steps = 5",
                "steps = 5\nadvantage_clip = 0",
                "stages[1].advantage_clip",
                "0; allowed: a finite number > 0",
            ),
            (
                "steps = 5",
                "steps = 5\ninvalid_advantage = -80",
                "stages[1].invalid_advantage",
                "within ±advantage_clip (50)",
            ),
            (
                "steps = 5",
                "steps = 5\ndomain_ratios = \"exact\"",
                "stages[1].domain_ratios",
                "`exact`; allowed: sampled, fixed",
            ),
            (
                "steps = 5",
                "steps = 5\nuntil = { metric = \"reward\", at_least = 0.5 }",
                "stages[1].until.metric",
                "`reward` is not measured by rlvr stages; allowed: heldout_accuracy",
            ),
            (
                "steps = 5",
                "steps = 5\nuntil = { metric = \"heldout_accuracy\" }",
                "stages[1].until.at_least",
                "missing",
            ),
            (
                "steps = 5",
                "steps = 5\nuntil = { metric = \"heldout_accuracy\", at_least = 0.5, every = 0 }",
                "stages[1].until.every",
                "at least 1",
            ),
            (
                "steps = 5",
                "steps = 5\npairs_from = [\"arithmetic\"]",
                "stages[1].pairs_from",
                "allowed in: reward_model stages",
            ),
            (
                "kind = \"rl\"",
                "kind = \"reward_model\"\npairs_from = [\"arithmetic\"]\nalgorithm = \"grpo\"",
                "stages[1].algorithm",
                "choose their loss with `rm`",
            ),
            (
                "steps = 5",
                "steps = 5\ncurriculum_pool = 10",
                "stages[1].curriculum_pool",
                "only used with curriculum = \"pass_rate\"",
            ),
            (
                "steps = 3",
                "steps = 3\ncurriculum = \"pass_rate\"",
                "stages[0].curriculum",
                "allowed in: rlvr stages",
            ),
            (
                "steps = 5",
                "steps = 5\ncurriculum = \"hardest\"",
                "stages[1].curriculum",
                "`hardest`; allowed: none, pass_rate",
            ),
            (
                "steps = 5",
                "steps = 5\nmax_turns = 0",
                "stages[1].max_turns",
                "at least 1",
            ),
            (
                "steps = 5",
                "steps = 5\nalgorithm = \"sft\"",
                "stages[1].algorithm",
                "`sft` for an rlvr stage; allowed: grpo, dapo, dr_grpo, gspo, cispo, reinforce",
            ),
            (
                "steps = 3",
                "steps = 3\nalgorithm = \"dapo\"",
                "stages[0].algorithm",
                "`dapo` for an sft stage; allowed: sft",
            ),
            (
                "steps = 5",
                "steps = 5\ncorrection = \"is\"",
                "stages[1].correction",
                "`is`; allowed: none, tis, icepop, seq_mask_tis",
            ),
            (
                "steps = 5",
                "steps = 5\neps_low = 1.5",
                "stages[1].eps_low",
                "1.5; allowed: 0 to 1",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\neps_high = -1.0",
                "learner.eps_high",
                "allowed: >= 0",
            ),
            (
                "steps = 5",
                "steps = 5\nkl_coef = -0.1",
                "stages[1].kl_coef",
                ">= 0",
            ),
            (
                "steps = 5",
                "steps = 5\nrouter = \"learned\"",
                "stages[1].router",
                "`learned`; allowed: frozen, trained",
            ),
            (
                "steps = 3",
                "steps = 3\nrouter = \"frozen\"",
                "stages[0].router",
                "allowed in: rlvr, swe_rl and rlhf stages",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\nmicro_batch_tokens = 0",
                "learner.micro_batch_tokens",
                "0; allowed: 1 or more",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\nrouter_bias_rate = -1",
                "learner.router_bias_rate",
                "allowed: a finite number >= 0",
            ),
            (
                "steps = 3",
                "steps = 3\nalgorithm = \"dpo\"",
                "stages[0].algorithm",
                "`dpo`; allowed: sft, grpo, dapo",
            ),
            (
                "kind = \"sft\"\n",
                "",
                "stages[0].kind",
                "missing; allowed: sft, rl, rlvr",
            ),
            (
                "name = \"t\"",
                "name = \"t\"\n[learner]\naggregation = 3",
                "aggregation",
                "invalid type",
            ),
        ] {
            let text = GOOD.replace(from, to);
            let e = RunConfig::from_toml_str(&text, "x.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.contains(allowed),
                "{from} -> {to}: {e}"
            );
        }
    }

    /// A run with a reward-model stage `judge` (with `rm`) and an rlhf stage judged by it.
    fn judged(rm: &str, rlhf_extra: &str) -> String {
        format!(
            "name = \"t\"\n[model]\ninit_config = \"m.json\"\n\
             [[stages]]\nname = \"judge\"\nkind = \"reward_model\"\nsteps = 3\n{rm}\n\
             pairs_from = [\"arithmetic\"]\n\
             [[stages]]\nname = \"rlhf\"\nkind = \"rlhf\"\nsteps = 2\n{rlhf_extra}\n\
             environments = [{{ name = \"arithmetic\" }}]\n"
        )
    }

    #[test]
    fn a_genrm_stage_trains_with_an_rl_objective_and_judges_rlhf_by_comparisons() {
        let c = RunConfig::from_toml_str(&judged("rm = \"genrm\"", ""), "x.toml").unwrap();
        let judge = &c.stages[0];
        assert_eq!(
            judge.reward_model.as_ref().map(|r| r.rm),
            Some(RewardModelKind::Genrm)
        );
        assert_eq!(judge.algorithm, Algorithm::Grpo);
        assert_eq!(
            judge.objective,
            Some({
                let mut o = Objective::for_algorithm(chorus_proto::objective::Algorithm::Grpo);
                o.correction = Defaults::CORRECTION;
                o
            })
        );
        assert_eq!(c.stages[1].judge, Some(0));
        assert_eq!(c.stages[1].comparisons, Some(Comparisons::Circular));
        let c = RunConfig::from_toml_str(
            &judged(
                "rm = \"genrm\"\nalgorithm = \"dapo\"",
                "comparisons = \"all_pairs\"",
            ),
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.stages[0].algorithm, Algorithm::Dapo);
        assert_eq!(c.stages[1].comparisons, Some(Comparisons::AllPairs));
        // A Bradley-Terry judge has no comparisons and no objective.
        let c = RunConfig::from_toml_str(&judged("", ""), "x.toml").unwrap();
        assert_eq!(
            (c.stages[0].objective.as_ref(), c.stages[1].comparisons),
            (None, None)
        );
    }

    #[test]
    fn genrm_settings_name_the_key_and_what_is_allowed() {
        for (rm, extra, key, allowed) in [
            (
                "rm = \"genrm\"",
                "comparisons = \"ring\"",
                "stages[1].comparisons",
                "`ring`; allowed: circular, all_pairs",
            ),
            (
                "",
                "comparisons = \"all_pairs\"",
                "stages[1].comparisons",
                "rm = \"genrm\" (this stage is judged by `judge`, a bradley_terry model)",
            ),
            (
                "rm = \"genrm\"\nalgorithm = \"sft\"",
                "",
                "stages[0].algorithm",
                "`sft` for a genrm stage; allowed: grpo",
            ),
            (
                "rm = \"genrm\"\ncomparisons = \"circular\"",
                "",
                "stages[0].comparisons",
                "allowed in: rlhf stages judged by a reward_model stage with rm = \"genrm\"",
            ),
        ] {
            let e = RunConfig::from_toml_str(&judged(rm, extra), "x.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.contains(allowed),
                "{rm} / {extra}: {e}"
            );
        }
    }
}
