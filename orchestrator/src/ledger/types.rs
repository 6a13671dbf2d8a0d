//! Rows written to and read from the ledger.

use std::collections::BTreeMap;
use std::fmt;

use chorus_proto::v1::FinishReason;

macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The text stored in the ledger.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Parses the text stored in the ledger.
            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Lifecycle of a run (`runs.status`).
    RunStatus {
        /// Created, not started.
        Pending => "pending",
        /// Generating and training.
        Running => "running",
        /// Finished normally.
        Succeeded => "succeeded",
        /// Stopped by an error.
        Failed => "failed",
        /// Stopped on request.
        Cancelled => "cancelled",
    }
}

impl RunStatus {
    /// True for the statuses a run ends in.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

text_enum! {
    /// Lifecycle of a stage of a run (`stages.status`).
    StageStatus {
        /// Training.
        Running => "running",
        /// Ran its steps (or reached its `until`).
        Succeeded => "succeeded",
        /// Stopped by an error.
        Failed => "failed",
    }
}

/// A stage that begins.
#[derive(Debug, Clone, PartialEq)]
pub struct NewStage {
    /// Run it belongs to (must exist).
    pub run_id: String,
    /// Position in the run's `[[stages]]`; (run, stage_index) is the key.
    pub stage_index: u64,
    /// The stage's name.
    pub name: String,
    /// `sft`, `rlvr`, ...
    pub kind: String,
    /// The learner's policy version when the stage began: its steps are the ones after it.
    pub first_step: u64,
    /// Name of the metric the stage is judged by.
    pub metric: Option<String>,
    /// The metric when the stage began.
    pub metric_start: Option<f64>,
}

/// How a stage ended.
#[derive(Debug, Clone, PartialEq)]
pub struct StageEnd {
    /// Run.
    pub run_id: String,
    /// Position in the run's `[[stages]]`.
    pub stage_index: u64,
    /// `succeeded` or `failed`.
    pub status: StageStatus,
    /// The learner's policy version when it ended (its last step).
    pub last_step: u64,
    /// The metric when it began, for a stage that measures it only once under way (a reward
    /// model's pair accuracy); `None` keeps what [`NewStage::metric_start`] recorded.
    pub metric_start: Option<f64>,
    /// The metric when it ended.
    pub metric_end: Option<f64>,
    /// Trajectories it sent to the learner.
    pub trajectories: u64,
    /// Where its final policy was saved.
    pub checkpoint_path: Option<String>,
    /// Its summary (what `runs/<run>/stages/<stage>/summary.json` holds), as JSON text.
    pub summary_json: Option<String>,
}

/// A row of `stages`.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRecord {
    /// How it began.
    pub stage: NewStage,
    /// Current status.
    pub status: StageStatus,
    /// Its last learner step, once it ended.
    pub last_step: Option<u64>,
    /// The metric when it ended.
    pub metric_end: Option<f64>,
    /// Trajectories it sent to the learner, once it ended.
    pub trajectories: Option<u64>,
    /// Where its final policy was saved.
    pub checkpoint_path: Option<String>,
    /// Its summary as JSON text, once it succeeded.
    pub summary_json: Option<String>,
    /// When it began (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// When it ended.
    pub finished_at_ms: Option<i64>,
}

impl StageRecord {
    /// Whether the policy took learner steps in it (a reward-model stage trains its own
    /// model, not the policy).
    pub fn moved_policy(&self) -> bool {
        self.last_step
            .is_none_or(|last| last > self.stage.first_step)
    }
}

text_enum! {
    /// Task pool a prompt comes from (`prompts.split`).
    Split {
        /// Trained on.
        Train => "train",
        /// Held out for evaluation.
        Heldout => "heldout",
    }
}

text_enum! {
    /// Where a prompt is in its life (`prompts.state`).
    ///
    /// `dispatched -> generated -> scored -> consumed`, or `dropped` from any
    /// state before `consumed`. `consumed` and `dropped` are final.
    PromptState {
        /// Sent to a rollout worker.
        Dispatched => "dispatched",
        /// All its samples came back from the worker.
        Generated => "generated",
        /// The environment scored them.
        Scored => "scored",
        /// A learner step trained on them.
        Consumed => "consumed",
        /// Discarded (too stale, zero-variance group, failure...), see `drop_reason`.
        Dropped => "dropped",
    }
}

pub(crate) fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Unspecified => "unspecified",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Aborted => "aborted",
        FinishReason::Error => "error",
    }
}

pub(crate) fn parse_finish_reason(text: &str) -> Option<FinishReason> {
    Some(match text {
        "unspecified" => FinishReason::Unspecified,
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "aborted" => FinishReason::Aborted,
        "error" => FinishReason::Error,
        _ => return None,
    })
}

/// A run to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// Unique id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// The full configuration, as TOML text.
    pub config_toml: String,
    /// Initial status.
    pub status: RunStatus,
}

/// A row of `runs`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Unique id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// The full configuration, as TOML text.
    pub config_toml: String,
    /// Current status.
    pub status: RunStatus,
    /// Creation time (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// Time it reached a terminal status.
    pub finished_at_ms: Option<i64>,
    /// What it left behind, once recorded at its end.
    pub outputs: RunOutputs,
}

/// What a run records at its end besides its rows in the other tables: with them, everything
/// its `summary.json` holds (`chorus_runtime::summary::from_ledger`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOutputs {
    /// The CPU its process ran on (model, threads, kernel backend).
    pub cpu: Option<String>,
    /// The directory of its final policy, in HF layout.
    pub checkpoint_path: Option<String>,
    /// Its environments' fault records as JSON (`{"env": {"faults", "paused", "last_fault"}}`).
    pub environment_faults: Option<String>,
}

/// A launched run's own evaluation settings (`LaunchRunRequest.eval_tasks`, `eval_every`);
/// `None` takes the orchestrator daemon's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchEval {
    /// Held-out tasks per environment.
    pub tasks: Option<u64>,
    /// Evaluate every this many RL steps as well.
    pub every: Option<u64>,
}

/// A prompt sent to a rollout worker.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPrompt {
    /// Unique id.
    pub id: String,
    /// Run it belongs to (must exist).
    pub run_id: String,
    /// Group of samples it is scored with (GRPO group).
    pub group_id: String,
    /// Environment that produced the task.
    pub environment: String,
    /// Task pool.
    pub split: Split,
    /// The environment's opaque task, as JSON text.
    pub task_json: String,
    /// Learner step at the time it was dispatched.
    pub step_dispatched: u64,
    /// The stage it was drawn for (`None` outside stages, e.g. a held-out evaluation).
    pub stage_index: Option<u64>,
}

/// A row of `prompts`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// Unique id.
    pub id: String,
    /// Run it belongs to.
    pub run_id: String,
    /// GRPO group.
    pub group_id: String,
    /// Environment.
    pub environment: String,
    /// Task pool.
    pub split: Split,
    /// Opaque task JSON.
    pub task_json: String,
    /// Current state.
    pub state: PromptState,
    /// Why it was dropped.
    pub drop_reason: Option<String>,
    /// Learner step when dispatched.
    pub step_dispatched: u64,
    /// Learner step that consumed it.
    pub consumed_at_step: Option<u64>,
    /// When it was dispatched (ms since the epoch).
    pub dispatched_at_ms: i64,
    /// When it reached `generated`.
    pub generated_at_ms: Option<i64>,
    /// When it reached `scored`.
    pub scored_at_ms: Option<i64>,
    /// When it reached `consumed`.
    pub consumed_at_ms: Option<i64>,
    /// When it was dropped.
    pub dropped_at_ms: Option<i64>,
}

/// Outcome of a trajectory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrajectoryStatus {
    /// Generated and scored.
    Ok,
    /// Generation or scoring failed.
    Failed {
        /// Why.
        reason: String,
    },
}

impl TrajectoryStatus {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed { .. } => "failed",
        }
    }

    pub(crate) fn reason(&self) -> Option<&str> {
        match self {
            Self::Ok => None,
            Self::Failed { reason } => Some(reason),
        }
    }
}

/// Where the wall-clock time of a trajectory went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Waiting in the worker's queue.
    pub queue_ms: u64,
    /// Generating.
    pub generate_ms: u64,
    /// Being scored by the environment.
    pub score_ms: u64,
}

/// A generated (and usually scored) sample to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTrajectory {
    /// Unique id; inserting the same id twice keeps the first.
    pub id: String,
    /// Run it belongs to (must exist).
    pub run_id: String,
    /// Prompt it answers.
    pub prompt_id: String,
    /// GRPO group.
    pub group_id: String,
    /// Environment that scored it.
    pub environment: String,
    /// Worker that generated it.
    pub worker_id: String,
    /// Tokenised prompt.
    pub prompt_token_ids: Vec<u32>,
    /// Generated tokens.
    pub completion_token_ids: Vec<u32>,
    /// Detokenised completion.
    pub completion_text: String,
    /// Log-probability of each completion token under the sampling policy.
    pub logprobs: Vec<f32>,
    /// Policy version that sampled each completion token.
    pub policy_versions: Vec<u64>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Scalar reward (none when scoring failed).
    pub reward: Option<f64>,
    /// Named parts of the reward.
    pub reward_components: BTreeMap<String, f64>,
    /// The scorer's explanation.
    pub reason: Option<String>,
    /// Ok or failed.
    pub status: TrajectoryStatus,
    /// Time spent queued, generating and scoring.
    pub timings: Timings,
    /// The stage it was generated for (`None` outside stages).
    pub stage_index: Option<u64>,
}

/// A row of `trajectories`, arrays decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct TrajectoryRecord {
    /// Everything that was inserted.
    pub trajectory: NewTrajectory,
    /// When it was recorded (ms since the epoch).
    pub created_at_ms: i64,
    /// Learner step that trained on it.
    pub consumed_at_step: Option<u64>,
}

/// A trajectory without its arrays, as listed by [`Ledger::list_rollouts`](super::Ledger::list_rollouts).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSummary {
    /// Trajectory id.
    pub id: String,
    /// Run.
    pub run_id: String,
    /// Prompt.
    pub prompt_id: String,
    /// GRPO group.
    pub group_id: String,
    /// Environment.
    pub environment: String,
    /// Worker.
    pub worker_id: String,
    /// Completion length in tokens.
    pub num_completion_tokens: u64,
    /// Oldest policy version among its tokens.
    pub min_policy_version: Option<u64>,
    /// Newest policy version among its tokens.
    pub max_policy_version: Option<u64>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Reward.
    pub reward: Option<f64>,
    /// Ok or failed.
    pub status: TrajectoryStatus,
    /// Learner step that trained on it.
    pub consumed_at_step: Option<u64>,
    /// When it was recorded.
    pub created_at_ms: i64,
}

/// Which rollouts [`Ledger::list_rollouts`](super::Ledger::list_rollouts) returns.
///
/// Unset filters match everything; results are newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutFilter {
    /// Only this run.
    pub run_id: Option<String>,
    /// Only this environment.
    pub environment: Option<String>,
    /// Only rewards at least this high (trajectories without a reward are excluded).
    pub min_reward: Option<f64>,
    /// Only rewards at most this high (trajectories without a reward are excluded).
    pub max_reward: Option<f64>,
    /// Only trajectories of this stage (by index).
    pub stage_index: Option<u64>,
    /// Only trajectories with a token sampled by this policy version (between their oldest
    /// and newest token's versions).
    pub policy_version: Option<u64>,
    /// Only trajectories that ended this way.
    pub finish_reason: Option<FinishReason>,
    /// At most this many rows.
    pub limit: u32,
}

impl Default for RolloutFilter {
    fn default() -> Self {
        Self {
            run_id: None,
            environment: None,
            min_reward: None,
            max_reward: None,
            stage_index: None,
            policy_version: None,
            finish_reason: None,
            limit: 100,
        }
    }
}

impl RolloutFilter {
    /// Only this run.
    pub fn run(mut self, run_id: impl Into<String>) -> Self {
        self.run_id = Some(run_id.into());
        self
    }

    /// Only this environment.
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = Some(environment.into());
        self
    }

    /// Only rewards at least this high.
    pub fn min_reward(mut self, min_reward: f64) -> Self {
        self.min_reward = Some(min_reward);
        self
    }

    /// Only rewards at most this high.
    pub fn max_reward(mut self, max_reward: f64) -> Self {
        self.max_reward = Some(max_reward);
        self
    }

    /// Only this stage.
    pub fn stage(mut self, stage_index: u64) -> Self {
        self.stage_index = Some(stage_index);
        self
    }

    /// Only trajectories with a token sampled by this policy version.
    pub fn policy_version(mut self, version: u64) -> Self {
        self.policy_version = Some(version);
        self
    }

    /// Only trajectories that ended this way.
    pub fn finish_reason(mut self, reason: FinishReason) -> Self {
        self.finish_reason = Some(reason);
        self
    }

    /// At most this many rows.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }
}

/// Trajectory counts of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrajectoryCounts {
    /// Run.
    pub run_id: String,
    /// Trajectories recorded.
    pub total: u64,
    /// Trajectories a learner step trained on.
    pub consumed: u64,
}

/// One optimizer step of the learner (a row of `learner_steps`).
///
/// Metrics are optional: a skipped step has none, and SQLite stores NaN as NULL,
/// so a NaN loss reads back as `None` there.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerStep {
    /// Run.
    pub run_id: String,
    /// Step number; (run, step) is the key, a second insert is ignored.
    pub step: u64,
    /// Policy version the step produced.
    pub policy_version: u64,
    /// Loss.
    pub loss: Option<f64>,
    /// KL divergence to the reference / behaviour policy.
    pub kl: Option<f64>,
    /// Mean token entropy.
    pub entropy: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Learning rate used.
    pub learning_rate: Option<f64>,
    /// Fraction of tokens whose ratio was clipped.
    pub clip_fraction: Option<f64>,
    /// Tokens trained on.
    pub num_tokens: u64,
    /// Trajectories trained on.
    pub num_trajectories: u64,
    /// Mean |log π_learner − log π_worker| over the step's tokens (sampling mismatch).
    pub mean_abs_logprob_diff: Option<f64>,
    /// Set when the step was skipped, with the reason.
    pub skip_reason: Option<String>,
}

/// A row of `learner_steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerStepRecord {
    /// What was inserted.
    pub step: LearnerStep,
    /// The stage whose policy versions it falls in (the last stage begun before it).
    pub stage_index: Option<u64>,
    /// When it was recorded.
    pub created_at_ms: i64,
}

/// A published policy version (a row of `policy_versions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    /// Run.
    pub run_id: String,
    /// Version number; (run, version) is the key.
    pub version: u64,
    /// Learner step that produced it.
    pub learner_step: u64,
    /// Digest of the weight stream as `<algorithm>:<hex>` (`chorus_proto::checksum::describe`).
    pub weights_digest: String,
    /// Size of the weights in bytes.
    pub num_bytes: u64,
}

/// A weight transfer the learner served (a row of `weight_transfers`).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightTransfer {
    /// Run.
    pub run_id: String,
    /// Who fetched (a worker's id).
    pub requester_id: String,
    /// The version sent.
    pub policy_version: u64,
    /// Bytes of tensor data.
    pub num_bytes: u64,
    /// Seconds from the version being available to the last chunk handed to the transport.
    pub seconds: f64,
    /// When the last chunk went out (ms since the Unix epoch).
    pub finished_at_ms: i64,
}

/// One row of the `weight_sync` view: how a policy version reached the workers.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightSync {
    /// The version.
    pub policy_version: u64,
    /// Transfers of it.
    pub transfers: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Their mean seconds.
    pub mean_seconds: f64,
    /// The slowest one's seconds.
    pub max_seconds: f64,
    /// From the first transfer's start to the last one's end.
    pub seconds_to_last_worker: f64,
}

/// A row of `policy_versions`, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersionRecord {
    /// What was recorded.
    pub version: PolicyVersion,
    /// The stage it was trained in (the last stage begun before it); `None` before any stage.
    pub stage_index: Option<u64>,
    /// When it was recorded.
    pub created_at_ms: i64,
}

/// A held-out evaluation of one policy version on one environment (a row of `evaluations`).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Run.
    pub run_id: String,
    /// The policy version evaluated.
    pub policy_version: u64,
    /// The environment (as registered in the run, e.g. `needle` or `needle@judge`).
    pub environment: String,
    /// Its difficulty level.
    pub difficulty: u32,
    /// The stage the run was in when it measured.
    pub stage_index: Option<u64>,
    /// Distinct held-out tasks answered.
    pub tasks: u64,
    /// Episodes solved, of `tasks x samples_per_task`.
    pub correct: u64,
    /// `correct / (tasks x samples_per_task)`: with one sample per task the fraction of tasks
    /// solved, with more the mean over tasks of each one's solved fraction.
    pub accuracy: f64,
    /// Episodes played per task: 1 answers greedily, more sample at the run's evaluation
    /// temperature.
    pub samples_per_task: u64,
    /// The number of independent tasks the interval counts (between `tasks` and `tasks x
    /// samples_per_task`, from how much a task's samples agree); `None`: `tasks`.
    pub effective_tasks: Option<f64>,
    /// Lower end of its 95% (Wilson) interval.
    pub accuracy_lo: f64,
    /// Upper end of its 95% interval.
    pub accuracy_hi: f64,
    /// Mean reward over the tasks.
    pub mean_reward: f64,
}

/// A row of `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the ledger's event log (increasing, not gap-free across runs).
    pub id: i64,
    /// Run.
    pub run_id: String,
    /// Short kind, e.g. `worker_lost`.
    pub kind: String,
    /// Payload as JSON text.
    pub payload_json: String,
    /// When it was recorded.
    pub created_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_texts_round_trip() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(*s));
        }
        for s in PromptState::ALL {
            assert_eq!(PromptState::parse(&s.to_string()), Some(*s));
        }
        for s in Split::ALL {
            assert_eq!(Split::parse(s.as_str()), Some(*s));
        }
        for r in [
            FinishReason::Unspecified,
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Aborted,
            FinishReason::Error,
        ] {
            assert_eq!(parse_finish_reason(finish_reason_str(r)), Some(r));
        }
        assert_eq!(RunStatus::parse("Running"), None);
        assert_eq!(parse_finish_reason("eos"), None);
        assert!(RunStatus::Cancelled.is_terminal() && !RunStatus::Running.is_terminal());
    }
}

/// One row of the `reward_by_step` view: a step's scored trajectories of one environment
/// (by the step their prompts were dispatched at).
#[derive(Debug, Clone, PartialEq)]
pub struct RewardByStep {
    /// The stage the prompts belong to.
    pub stage_index: Option<u64>,
    /// The learner step the prompts were dispatched at.
    pub step: u64,
    /// The environment.
    pub environment: String,
    /// Scored trajectories.
    pub trajectories: u64,
    /// Their mean reward.
    pub mean_reward: f64,
    /// The fraction with full reward.
    pub solved: f64,
}

/// Trained trajectories by lag (the `trained_staleness` view, summed over stages and
/// environments): how many versions their oldest token lagged the weights that trained on them.
#[derive(Debug, Clone, PartialEq)]
pub struct StalenessCount {
    /// Versions of lag (0: sampled by the weights that trained on it).
    pub lag: i64,
    /// Trajectories with that lag.
    pub trajectories: u64,
    /// Their completion tokens.
    pub tokens: u64,
}

/// One row of the `faults_by_environment` view.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentFaults {
    /// The environment.
    pub environment: String,
    /// Its trajectories.
    pub trajectories: u64,
    /// Those that failed.
    pub failed_trajectories: u64,
    /// Its prompts dropped.
    pub dropped_prompts: u64,
    /// The newest failure's reason.
    pub last_failure: Option<String>,
}
