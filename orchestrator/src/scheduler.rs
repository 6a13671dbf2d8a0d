//! The RL scheduler: samples environments by weight, expands each prompt into a group, dispatches
//! the group's requests (the rollout side applies backpressure), scores completions, computes
//! group advantages, drops zero-variance groups (sampling a replacement, as dynamic sampling
//! does), streams complete groups to the learner and records every prompt and trajectory in the
//! ledger.
//!
//! Staleness: the prompts of step `s` (counted from the learner version the stage started at) are
//! dispatched only once both the learner and the rollout side hold a version of at least
//! `s - max_staleness`, so no trajectory's lag exceeds the bound. `max_staleness = 0` is the
//! synchronous baseline on the same code path.
//!
//! The scheduler meets generation and training only through the [`Rollouts`] and [`Learning`]
//! traits: in a run they are gRPC clients; in tests and benchmarks, stand-ins.
//!
//! Logs: a stage runs in a `stage` span (`run_id`, `stage`, `stage_index`), each step in a
//! `step` span, each attempt of a prompt slot in a `group` span (`group_id`, `env`) and each
//! rollout in a `rollout` span (`request_id`); the same ids travel in the requests to the
//! workers and the groups to the learner, which log them too.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chorus_environments::{
    EnvInfo, Environment, Registry, Score, Split as EnvSplit, Task, Turns, chat,
};
use chorus_model::tokenizer::Tokenizer;
use chorus_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, ThinkBudget, Trajectory,
    TrajectoryGroup,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tracing::Instrument;

use crate::advantage::{Scored, group_advantages};
use crate::confidence::{self, Interval};
use crate::config::{DomainRatios, HeldoutSampling, Stage};
use crate::curriculum::Curriculum;
use crate::faults::{EnvFault, EnvFaults};
use crate::ledger::{Ledger, NewPrompt, NewTrajectory, Split, Timings, TrajectoryStatus};
use crate::metrics as names;
use crate::transcripts::Transcripts;

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where completions come from (rollout workers, or a stand-in).
pub trait Rollouts: Send + Sync + 'static {
    /// Generates one completion; a failure is reported in the response's `error`.
    fn generate(&self, request: GenerateRequest) -> BoxFuture<GenerateResponse>;
    /// Resolves once every worker holds at least `version`.
    fn wait_version(&self, version: u64) -> BoxFuture<()>;
}

/// Where scored groups go (the learner, or a stand-in).
pub trait Learning: Send + Sync + 'static {
    /// Hands over one scored group.
    fn submit(&self, group: TrajectoryGroup) -> BoxFuture<Result<(), LearningError>>;
    /// The learner's latest policy version.
    fn version(&self) -> u64;
    /// Resolves once the learner has published at least `version`; an error when it never will
    /// (the learner is gone).
    fn wait_version(&self, version: u64) -> BoxFuture<Result<(), LearningError>>;
}

/// A stage's early end (`until`): checked every `every()` steps, on the policy the learner has
/// once every step before the check is trained.
pub trait StageGoal: Send + Sync + 'static {
    /// Steps between checks.
    fn every(&self) -> u64;
    /// Whether policy `version` reaches the goal.
    fn reached(
        &self,
        ctx: Arc<StageContext>,
        version: u64,
    ) -> BoxFuture<Result<bool, SchedulerError>>;
}

/// Why the learner did not take a group or will not reach a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LearningError {
    /// The group did not reach the learner.
    #[error("learner at {learner}: group {group_id} not delivered: {message}")]
    Unreachable {
        /// The learner's address (or a stand-in's name).
        learner: String,
        /// The group.
        group_id: String,
        /// What failed.
        message: String,
    },
    /// The learner refused the group.
    #[error("learner at {learner} rejected group {group_id}: {reason}")]
    Rejected {
        /// The learner's address (or a stand-in's name).
        learner: String,
        /// The group.
        group_id: String,
        /// Its reason.
        reason: String,
    },
    /// The learner is gone and will never publish `version`.
    #[error("the learner at {learner} is gone (its step stream ended) before version {version}")]
    Gone {
        /// The learner's address (or a stand-in's name).
        learner: String,
        /// The version waited for.
        version: u64,
    },
}

/// Errors that stop a stage (individual prompts and trajectories fail alone).
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// An environment of the mixture cannot be used.
    #[error("environment `{name}`: {message}")]
    Environment {
        /// Its name.
        name: String,
        /// Why.
        message: String,
    },
    /// The ledger refused a write.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The learner refused a group or went away.
    #[error("learner: {0}")]
    Learner(#[from] LearningError),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Checking the stage's goal (`until`) failed.
    #[error("checking the stage's goal: {0}")]
    Goal(String),
    /// A stage's transcript file cannot be used.
    #[error(transparent)]
    Transcripts(#[from] crate::transcripts::TranscriptError),
    /// A stage has nothing to learn from.
    #[error("no data: {0}")]
    NoData(String),
}

/// Counters of a stage, updated as it runs.
#[derive(Debug, Default)]
pub struct StageStats {
    /// Groups sent to the learner.
    pub groups_submitted: AtomicU64,
    /// Trajectories sent to the learner.
    pub trajectories_submitted: AtomicU64,
    /// Trajectories whose generation or scoring failed.
    pub trajectories_failed: AtomicU64,
    /// Prompts dropped (zero variance, too long, too few usable completions).
    pub prompts_dropped: AtomicU64,
    /// Sum of rewards of submitted trajectories, in millionths.
    pub reward_micros: AtomicU64,
    /// Largest lag (learner version minus oldest token version) seen at submission.
    pub max_lag: AtomicU64,
}

/// Everything a stage needs.
#[derive(Clone)]
pub struct StageContext {
    /// Run id in the ledger.
    pub run_id: String,
    /// Seed of prompt sampling and generation.
    pub seed: u64,
    /// Index of the stage in the run (keeps prompt ids unique across stages).
    pub stage_index: usize,
    /// Built-in environments.
    pub registry: Arc<Registry>,
    /// Tokenizer of the policy.
    pub tokenizer: Arc<Tokenizer>,
    /// The ledger.
    pub ledger: Ledger,
    /// Generation.
    pub rollouts: Arc<dyn Rollouts>,
    /// Training.
    pub learning: Arc<dyn Learning>,
    /// Counters.
    pub stats: Arc<StageStats>,
    /// Environment deadlines and error budgets, shared by every stage of the run.
    pub faults: Arc<EnvFaults>,
    /// Pin every generation request to the exact policy version its step (or evaluation) is
    /// fixed to, so that a run repeats bit for bit (`deterministic = true`).
    pub deterministic: bool,
    /// The running stage's transcripts (its `data`), read and checked once before the run
    /// (`RunPlan`); `None` for a stage without.
    pub transcripts: Option<Arc<Transcripts>>,
    /// The running stage's early end, if it has one.
    pub goal: Option<Arc<dyn StageGoal>>,
    /// When the running stage began before this process (a resumed run): the policy version it
    /// started from. Its steps before the learner's current version are done; the stage goes on
    /// from there. `None`: the stage starts at the learner's current version.
    pub first_version: Option<u64>,
    /// How many times the run was resumed; a resumed run's ids carry it, so that the steps it
    /// repeats (lost with the learner's state after its last checkpoint) get new ids.
    pub restart: u32,
}

/// The id of a prompt slot's group (its prompt's id is this plus `:p`, its requests' ids that
/// plus `:r<i>`): run, stage, step, slot, the attempt of an RL slot, and the restart of a resumed
/// run.
fn group_id(ctx: &StageContext, step: u64, slot: usize, attempt: Option<u32>) -> String {
    let mut id = format!("{}:s{}:{step}:{slot}", ctx.run_id, ctx.stage_index);
    if let Some(a) = attempt {
        id.push_str(&format!(":a{a}"));
    }
    if ctx.restart > 0 {
        id.push_str(&format!(":x{}", ctx.restart));
    }
    id
}

/// The version the running stage started from, and its first step still to run.
fn stage_start(ctx: &StageContext) -> (u64, u64) {
    let now = ctx.learning.version();
    let base = ctx.first_version.unwrap_or(now).min(now);
    (base, now - base)
}

/// Whether the goal is checked before step `step`.
fn checks_goal(ctx: &StageContext, step: u64) -> bool {
    ctx.goal
        .as_ref()
        .is_some_and(|g| step > 0 && step.is_multiple_of(g.every().max(1)))
}

/// Whether the stage stops before step `step` (counted in the stage): at each of the goal's
/// checks, once the learner has trained every earlier step, the goal is asked about that policy.
async fn goal_reached(
    ctx: &Arc<StageContext>,
    base: u64,
    step: u64,
) -> Result<bool, SchedulerError> {
    let Some(goal) = ctx.goal.as_ref().filter(|_| checks_goal(ctx, step)) else {
        return Ok(false);
    };
    ctx.learning.wait_version(base + step).await?;
    let reached = goal.reached(ctx.clone(), base + step).await?;
    if reached {
        tracing::info!(
            step,
            version = base + step,
            "the stage reached its goal; it ends here"
        );
    }
    Ok(reached)
}

/// The score component in which tool-using environments count invalid tool calls.
pub const INVALID_CALLS: &str = "invalid_calls";

/// A rollout's reasoning and answer lengths: the policy's tokens (`mask`, empty when all are)
/// up to and including its last `think_close` token, and after it; observations between turns
/// are not counted.
fn policy_lengths(tokens: &[u32], mask: &[bool], think_close: Option<u32>) -> (usize, usize) {
    let policy = |i: usize| mask.get(i).copied().unwrap_or(true);
    let end = think_close
        .and_then(|c| tokens.iter().rposition(|&t| t == c))
        .map_or(0, |p| p + 1);
    let reasoning = (0..end).filter(|&i| policy(i)).count();
    let answer = (end..tokens.len()).filter(|&i| policy(i)).count();
    (reasoning, answer)
}

/// The component the ledger adds (1.0) to a rollout whose output was invalid.
pub const INVALID_COMPONENT: &str = "invalid";

/// Replacement prompts tried for one slot before its last group is sent as it is.
const MAX_ATTEMPTS: u32 = 8;

/// Picks an environment index by weight.
pub(crate) fn pick(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    // Rounding can leave `u` just past the end: take the last environment that can be drawn.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// The environment of prompt slot `slot` of step `step` when a step holds exact counts: each
/// environment gets the floor of its share of `per_step` slots, and the leftover slots go to the
/// largest remainders, ties rotating with the step so that no environment is always favoured.
/// Slots are laid out environment by environment.
fn fixed_slot_environment(weights: &[f64], per_step: usize, step: u64, slot: usize) -> usize {
    let total: f64 = weights.iter().sum();
    let n = weights.len();
    let quotas: Vec<f64> = weights
        .iter()
        .map(|w| w / total * per_step as f64)
        .collect();
    let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let mut leftover = per_step.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..n).filter(|&i| weights[i] > 0.0).collect();
    let rotation = (step as usize) % n.max(1);
    order.sort_by(|&a, &b| {
        let (ra, rb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
        rb.total_cmp(&ra)
            .then(((a + n - rotation) % n).cmp(&((b + n - rotation) % n)))
    });
    for &i in order.iter().cycle() {
        if leftover == 0 {
            break;
        }
        counts[i] += 1;
        leftover -= 1;
    }
    let mut end = 0;
    for (i, c) in counts.iter().enumerate() {
        end += c;
        if slot < end {
            return i;
        }
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// The span of a stage: every log line of the stage carries the run and the stage.
fn stage_span(ctx: &StageContext, stage: &Stage) -> tracing::Span {
    tracing::info_span!(
        "stage",
        run_id = %ctx.run_id,
        stage = %stage.name,
        stage_index = ctx.stage_index
    )
}

/// Runs the RL stage `stage` to completion (its steps, or its goal) and returns the number of
/// steps it ran.
pub async fn run_rl_stage(
    ctx: Arc<StageContext>,
    stage: Arc<Stage>,
) -> Result<u64, SchedulerError> {
    let span = stage_span(&ctx, &stage);
    run_rl_stage_in(ctx, stage).instrument(span).await
}

async fn run_rl_stage_in(ctx: Arc<StageContext>, stage: Arc<Stage>) -> Result<u64, SchedulerError> {
    let (base, first_step) = stage_start(&ctx);
    tracing::debug!(
        steps = stage.steps,
        prompts_per_step = stage.prompts_per_step,
        group_size = stage.group_size,
        max_staleness = stage.max_staleness,
        base_version = base,
        "RL stage starts"
    );
    let curriculum = match &stage.curriculum {
        // A resumed stage estimates under the policy it resumes with (its starting one is gone).
        Some(settings) => Some(Arc::new(
            Curriculum::estimate(&ctx, &stage, settings, base + first_step).await?,
        )),
        None => None,
    };
    let order = Arc::new(StepOrder::new(base + first_step, stage.prompts_per_step));
    let mut tasks = tokio::task::JoinSet::new();
    let mut steps_run = stage.steps.max(first_step);
    for step in first_step..stage.steps {
        if checks_goal(&ctx, step) {
            // A check sees every earlier step trained: finish the slots in flight first.
            while let Some(done) = tasks.join_next().await {
                done.expect("slot task panicked")?;
            }
            if goal_reached(&ctx, base, step).await? {
                steps_run = step;
                break;
            }
        }
        // The staleness gate: tokens of step `step` come from a version >= base + step - bound.
        let need = (base + step).saturating_sub(stage.max_staleness);
        // Deterministic runs generate the whole step with exactly the gate's version (never
        // older than the stage's first), whichever newer one the workers hold by then.
        let exact_version = ctx.deterministic.then(|| need.max(base));
        let step_span = tracing::info_span!(
            "step",
            step = base + step,
            min_policy_version = need,
            exact_policy_version = exact_version
        );
        // Slots that failed are seen while waiting, so a lost learner stops the stage at once.
        let reached = ctx
            .learning
            .wait_version(need)
            .instrument(step_span.clone());
        tokio::pin!(reached);
        loop {
            tokio::select! {
                r = &mut reached => {
                    r?;
                    break;
                }
                Some(done) = tasks.join_next() => done.expect("slot task panicked")?,
            }
        }
        ctx.rollouts
            .wait_version(need)
            .instrument(step_span.clone())
            .await;
        step_span.in_scope(|| tracing::debug!("dispatching the step's prompts"));
        for slot in 0..stage.prompts_per_step {
            let (ctx, stage, order, curriculum) = (
                ctx.clone(),
                stage.clone(),
                order.clone(),
                curriculum.clone(),
            );
            let slot_at = SlotAt {
                step: base + step,
                progress: step as f64 / stage.steps as f64,
                min_version: need,
                exact_version,
                slot,
                lr: stage.lr_at(step),
            };
            tasks.spawn(
                async move { run_slot(&ctx, &stage, &order, curriculum.as_deref(), slot_at).await }
                    .instrument(step_span.clone()),
            );
        }
        // Keep errors from piling up unseen.
        while let Some(done) = tasks.try_join_next() {
            done.expect("slot task panicked")?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("slot task panicked")?;
    }
    // The stage ends when the learner has taken its last step.
    ctx.learning.wait_version(base + steps_run).await?;
    Ok(steps_run)
}

/// Hands groups to the learner in step order. The learner closes a step after every
/// `prompts_per_step` groups, whichever step they came from; if a fast slot of step `s + 1`
/// could overtake a slow slot of step `s`, the learner would move past `s` before that slot's
/// group arrived and train on it one version later than the staleness bound allows.
struct StepOrder {
    per_step: usize,
    submitted: std::sync::Mutex<BTreeMap<u64, usize>>,
    /// Steps (absolute) whose every group has been handed over: the next step may submit.
    complete: tokio::sync::watch::Sender<u64>,
}

impl StepOrder {
    fn new(base: u64, per_step: usize) -> Self {
        Self {
            per_step,
            submitted: Default::default(),
            complete: tokio::sync::watch::channel(base).0,
        }
    }

    /// Resolves once every group of the steps before `step` has been handed over.
    async fn wait_turn(&self, step: u64) {
        let mut rx = self.complete.subscribe();
        let _ = rx.wait_for(|&c| c >= step).await;
    }

    /// Records that a group of `step` has been handed over.
    fn submitted(&self, step: u64) {
        let mut counts = self.submitted.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(step).or_default() += 1;
        let mut complete = *self.complete.borrow();
        while counts.get(&complete).copied().unwrap_or(0) >= self.per_step {
            counts.remove(&complete);
            complete += 1;
        }
        self.complete.send_replace(complete);
    }
}

/// What a prompt slot draws.
pub(crate) struct Drawn {
    /// Seed of the draw, also the base of the group's sampling seeds.
    pub(crate) seed: u64,
    pub(crate) env_name: String,
    pub(crate) env: Arc<dyn Environment>,
    /// `Some(max_turns)` for a multi-turn environment.
    pub(crate) multi_turn: Option<u32>,
    pub(crate) task: Arc<Task>,
}

/// Why a draw produced no task.
enum DrawError {
    /// The stage cannot go on (every environment paused, one missing from the registry).
    Fatal(SchedulerError),
    /// This environment faulted; the next attempt draws again.
    Fault,
}

/// Picks an environment by weight among those not paused, and samples a training task, both
/// from a seed derived from (run seed, stage, step, slot, attempt), so that a run's prompts are
/// reproducible.
async fn draw(
    ctx: &StageContext,
    stage: &Stage,
    curriculum: Option<(&Curriculum, f64)>,
    step: u64,
    slot: usize,
    attempt: u32,
) -> Result<Drawn, DrawError> {
    let seed = ctx.seed
        ^ ((ctx.stage_index as u64) << 56)
        ^ (step << 32)
        ^ ((slot as u64) << 8)
        ^ attempt as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let weights = loop {
        let weights: Vec<f64> = stage
            .environments
            .iter()
            .map(|e| {
                if ctx.faults.is_paused(e.key()) {
                    0.0
                } else {
                    e.weight
                }
            })
            .collect();
        if weights.iter().any(|&w| w > 0.0) {
            break weights;
        }
        // Every environment rests: wait for the first probe, or give up if none will come.
        let keys = stage.environments.iter().map(|e| e.key());
        match ctx.faults.next_probe_in(keys) {
            Some(wait) => {
                tracing::warn!(
                    stage = %stage.name,
                    "every environment of the stage is paused; probing again in {wait:?}"
                );
                tokio::time::sleep(wait.max(std::time::Duration::from_millis(10))).await;
            }
            None => {
                return Err(DrawError::Fatal(SchedulerError::Environment {
                    name: stage.name.clone(),
                    message: format!(
                        "every environment of the stage is paused after spending its error \
                         budget: {:?}",
                        ctx.faults.report()
                    ),
                }));
            }
        }
    };
    let index = match stage.domain_ratios {
        DomainRatios::Sampled => pick(&weights, &mut rng),
        DomainRatios::Fixed => fixed_slot_environment(&weights, stage.prompts_per_step, step, slot),
    };
    let spec = &stage.environments[index];
    let env_name = spec.key().to_string();
    let env = ctx.registry.get(&env_name).map_err(|e| {
        DrawError::Fatal(SchedulerError::Environment {
            name: env_name.clone(),
            message: e.to_string(),
        })
    })?;
    let (task_seed, difficulty) = (rng.random(), spec.difficulty);
    if let Some(candidate) =
        curriculum.and_then(|(c, progress)| c.draw(&env_name, progress, &mut rng))
    {
        let info = env.info();
        return Ok(Drawn {
            seed,
            env_name,
            env,
            multi_turn: (info.turns == Turns::Multi).then_some(turn_limit(stage, &info)),
            task: candidate.task.clone(),
        });
    }
    let sampled = {
        let env = env.clone();
        ctx.faults
            .call(&env_name, move || {
                let task = env.sample(task_seed, EnvSplit::Train, difficulty)?;
                let info = env.info();
                Ok((task, info))
            })
            .await
    };
    let (task, info) = sampled.map_err(|_| DrawError::Fault)?;
    if let Err(fault) = check_task(&task, &env_name) {
        ctx.faults.record(&env_name, &fault);
        return Err(DrawError::Fault);
    }
    Ok(Drawn {
        seed,
        env_name,
        env,
        multi_turn: (info.turns == Turns::Multi).then_some(turn_limit(stage, &info)),
        task: Arc::new(task),
    })
}

/// The turn limit of a multi-turn episode in `stage`: the stage's `max_turns`, else the
/// environment's own, at least 1.
pub(crate) fn turn_limit(stage: &Stage, info: &EnvInfo) -> u32 {
    stage.max_turns.unwrap_or(info.max_turns).max(1)
}

/// A task that breaks the contract (made by another environment, no prompt) is a fault.
fn check_task(task: &Task, env_name: &str) -> Result<(), EnvFault> {
    if task.prompt.is_empty() {
        return Err(EnvFault::Malformed(format!(
            "task {} has an empty prompt",
            task.id
        )));
    }
    if task.id.is_empty() {
        return Err(EnvFault::Malformed(format!(
            "a task of `{env_name}` has an empty id"
        )));
    }
    Ok(())
}

/// A score that breaks the contract (a non-finite reward or component) is a fault.
fn check_score(score: Score) -> Result<Score, EnvFault> {
    if !score.reward.is_finite() {
        return Err(EnvFault::Malformed(format!(
            "reward {} is not finite",
            score.reward
        )));
    }
    if let Some(c) = score.components.iter().find(|c| !c.value.is_finite()) {
        return Err(EnvFault::Malformed(format!(
            "reward component `{}` is {}",
            c.name, c.value
        )));
    }
    Ok(score)
}

/// One group member's requests: ids, sampling and limits.
pub(crate) struct Member {
    pub(crate) trajectory_id: String,
    pub(crate) request_id: String,
    pub(crate) prompt_id: String,
    pub(crate) sampling: SamplingParams,
    pub(crate) max_new_tokens: usize,
    /// Longest conversation a later turn may be generated from.
    pub(crate) max_context_tokens: usize,
    pub(crate) stop: Vec<u32>,
    pub(crate) min_version: u64,
    /// The one version every token must come from, in deterministic runs.
    pub(crate) exact_version: Option<u64>,
}

/// What one group member's rollout (one completion, or a whole multi-turn episode) produced.
pub(crate) struct Rollout {
    trajectory_id: String,
    request_id: String,
    worker_id: String,
    /// Everything after the prompt: the policy's tokens and, between its turns, observations.
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    versions: Vec<u64>,
    /// Which tokens are the policy's; empty when all of them are (single-turn).
    mask: Vec<bool>,
    finish_reason: i32,
    queue_ms: u64,
    generate_ms: u64,
    score_ms: u64,
    text: String,
    /// The score, or why the trajectory failed.
    pub(crate) verdict: Result<Score, String>,
    /// Why a turn's think block is malformed, if one is.
    malformed_think: Option<String>,
    /// The episode ended because its conversation outgrew `max_prompt_tokens`.
    context_limited: bool,
}

impl Rollout {
    fn new(m: &Member) -> Self {
        Self {
            trajectory_id: m.trajectory_id.clone(),
            request_id: m.request_id.clone(),
            worker_id: String::new(),
            tokens: vec![],
            logprobs: vec![],
            versions: vec![],
            mask: vec![],
            finish_reason: FinishReason::Unspecified as i32,
            queue_ms: 0,
            generate_ms: 0,
            score_ms: 0,
            text: String::new(),
            verdict: Err("not generated".into()),
            malformed_think: None,
            context_limited: false,
        }
    }

    fn reward(&self) -> Option<f64> {
        self.verdict.as_ref().ok().map(|s| s.reward)
    }

    fn lengths(&self, think_close: Option<u32>) -> (usize, usize) {
        policy_lengths(&self.tokens, &self.mask, think_close)
    }

    /// Why the rollout's output is invalid (it then gets the stage's fixed invalid advantage):
    /// a malformed think block, or tool calls the environment reports as invalid (its
    /// `invalid_calls` score component).
    fn invalid_reason(&self) -> Option<String> {
        if let Some(why) = &self.malformed_think {
            return Some(format!("malformed think block: {why}"));
        }
        let calls = self.verdict.as_ref().ok()?.component(INVALID_CALLS)?;
        (calls > 0.0).then(|| format!("{calls} invalid tool call(s)"))
    }
}

/// Why a worker's response cannot be used, if it cannot.
fn generation_failure(response: &GenerateResponse) -> Option<String> {
    if !response.error.is_empty() {
        return Some(format!("generation failed: {}", response.error));
    }
    if response.token_ids.len() != response.logprobs.len()
        || response.token_ids.len() != response.policy_versions.len()
        || response.token_ids.is_empty()
    {
        return Some(format!(
            "malformed worker output: {} tokens, {} logprobs, {} versions",
            response.token_ids.len(),
            response.logprobs.len(),
            response.policy_versions.len()
        ));
    }
    None
}

/// Generates one completion (single-turn) or plays one episode (multi-turn: generate, step the
/// environment, append its observation, generate again…) and scores it. Environment calls go
/// through the fault guard, so a misbehaving environment fails this rollout alone.
pub(crate) async fn play(
    ctx: Arc<StageContext>,
    drawn: Arc<Drawn>,
    prompt_ids: Arc<Vec<u32>>,
    m: Member,
) -> Rollout {
    let Drawn {
        env_name,
        env,
        multi_turn,
        task,
        ..
    } = &*drawn;
    let mut out = Rollout::new(&m);
    let request = |turn: u32, context: Vec<u32>| {
        let mut sampling = m.sampling;
        sampling.seed = sampling
            .seed
            .map(|s| s.wrapping_add(u64::from(turn).wrapping_mul(0x9E37_79B9)));
        GenerateRequest {
            request_id: if turn == 0 {
                m.request_id.clone()
            } else {
                format!("{}:turn{turn}", m.request_id)
            },
            run_id: ctx.run_id.clone(),
            prompt_id: m.prompt_id.clone(),
            trajectory_id: m.trajectory_id.clone(),
            prompt_token_ids: context,
            sampling: Some(sampling),
            max_new_tokens: m.max_new_tokens as u32,
            stop_token_ids: m.stop.clone(),
            min_policy_version: m.min_version,
            exact_policy_version: m.exact_version,
        }
    };
    let decode = |ids: &[u32]| ctx.tokenizer.decode(ids, false).unwrap_or_default();
    let Some(max_turns) = *multi_turn else {
        let response = generate_counted(&ctx, request(0, prompt_ids.to_vec())).await;
        out.worker_id = response.worker_id.clone();
        out.finish_reason = response.finish_reason;
        out.queue_ms = response.queue_ms;
        out.generate_ms = response.generate_ms;
        if let Some(reason) = generation_failure(&response) {
            out.tokens = response.token_ids;
            out.verdict = Err(reason);
            return out;
        }
        out.text = decode(&response.token_ids);
        out.malformed_think = chat::malformed_think(&out.text);
        out.tokens = response.token_ids;
        out.logprobs = response.logprobs;
        out.versions = response.policy_versions;
        let start = Instant::now();
        let (env, task, text) = (env.clone(), task.clone(), out.text.clone());
        out.verdict = score_with(&ctx, env_name, move || env.score(&task, &text)).await;
        out.score_ms = start.elapsed().as_millis() as u64;
        return out;
    };

    let mut episode = {
        let (env, task) = (env.clone(), task.clone());
        match ctx.faults.call(env_name, move || env.start(&task)).await {
            Ok(e) => e,
            Err(fault) => {
                out.verdict = Err(format!("starting the episode: {fault}"));
                return out;
            }
        }
    };
    let mut context = prompt_ids.to_vec();
    let mut verdict = None;
    for turn in 0..max_turns {
        if context.len() > m.max_context_tokens {
            out.context_limited = true;
            verdict = Some(Ok(Score::zero(format!(
                "the conversation reached {} tokens before turn {}, more than max_prompt_tokens = {}",
                context.len(),
                turn + 1,
                m.max_context_tokens
            ))));
            break;
        }
        let response = generate_counted(&ctx, request(turn, context.clone())).await;
        out.worker_id = response.worker_id.clone();
        out.finish_reason = response.finish_reason;
        out.queue_ms += response.queue_ms;
        out.generate_ms += response.generate_ms;
        if let Some(reason) = generation_failure(&response) {
            verdict = Some(Err(format!("turn {}: {reason}", turn + 1)));
            break;
        }
        let closed = response
            .token_ids
            .last()
            .is_some_and(|t| m.stop.contains(t));
        let action = decode(&response.token_ids);
        if out.malformed_think.is_none() {
            out.malformed_think =
                chat::malformed_think(&action).map(|why| format!("turn {}: {why}", turn + 1));
        }
        let last_version = *response.policy_versions.last().expect("checked non-empty");
        context.extend(&response.token_ids);
        out.mask
            .extend(std::iter::repeat_n(true, response.token_ids.len()));
        out.tokens.extend(response.token_ids);
        out.logprobs.extend(response.logprobs);
        out.versions.extend(response.policy_versions);

        let start = Instant::now();
        let stepped = {
            let (env, task) = (env.clone(), task.clone());
            ctx.faults
                .call(env_name, move || {
                    let outcome = env.step(&task, &mut episode, &action)?;
                    Ok((episode, outcome))
                })
                .await
        };
        out.score_ms += start.elapsed().as_millis() as u64;
        let (next, outcome) = match stepped {
            Ok(v) => v,
            Err(fault) => {
                verdict = Some(Err(format!("turn {}: {fault}", turn + 1)));
                break;
            }
        };
        episode = next;
        if outcome.done {
            verdict = Some(match outcome.score.map(check_score) {
                Some(Ok(score)) => Ok(score),
                Some(Err(fault)) => {
                    ctx.faults.record(env_name, &fault);
                    Err(fault.to_string())
                }
                None => {
                    let fault =
                        EnvFault::Malformed("the episode ended without a score".to_string());
                    ctx.faults.record(env_name, &fault);
                    Err(fault.to_string())
                }
            });
            break;
        }
        let between = chat::render_continuation(outcome.observation.as_ref(), closed);
        let ids = match ctx.tokenizer.encode(&between) {
            Ok(ids) => ids,
            Err(e) => {
                verdict = Some(Err(format!("tokenizing the observation: {e}")));
                break;
            }
        };
        context.extend(&ids);
        out.mask.extend(std::iter::repeat_n(false, ids.len()));
        out.logprobs.extend(std::iter::repeat_n(0.0, ids.len()));
        out.versions
            .extend(std::iter::repeat_n(last_version, ids.len()));
        out.tokens.extend(ids);
    }
    out.text = decode(&out.tokens);
    out.verdict = verdict.unwrap_or_else(|| {
        Ok(Score::zero(format!(
            "the episode did not end within {max_turns} turns"
        )))
    });
    out
}

/// One generation request through the rollout pool, counted in the in-flight gauge and the
/// queue-time histogram.
async fn generate_counted(ctx: &StageContext, request: GenerateRequest) -> GenerateResponse {
    let in_flight = metrics::gauge!(names::ROLLOUT_REQUESTS_IN_FLIGHT);
    in_flight.increment(1.0);
    let response = ctx.rollouts.generate(request).await;
    in_flight.decrement(1.0);
    metrics::histogram!(names::ROLLOUT_QUEUE_SECONDS).record(response.queue_ms as f64 / 1e3);
    response
}

/// Scores through the fault guard and checks the score.
async fn score_with<F>(ctx: &StageContext, env_name: &str, f: F) -> Result<Score, String>
where
    F: FnOnce() -> Result<Score, chorus_environments::EnvError> + Send + 'static,
{
    match ctx.faults.call(env_name, f).await.and_then(check_score) {
        Ok(score) => Ok(score),
        Err(fault) => {
            if matches!(fault, EnvFault::Malformed(_)) {
                ctx.faults.record(env_name, &fault);
            }
            Err(format!("scoring failed: {fault}"))
        }
    }
}

/// Where a prompt slot sits: its step (absolute), the staleness gate of that step (and the exact
/// version of a deterministic run), its index in the step and the step's learning rate.
#[derive(Clone, Copy, Debug)]
struct SlotAt {
    step: u64,
    /// How far through the stage the step is, from 0 (its first step) towards 1.
    progress: f64,
    min_version: u64,
    exact_version: Option<u64>,
    slot: usize,
    lr: f64,
}

/// The prompt of one attempt, as recorded in the ledger.
struct Prompt {
    group_id: String,
    id: String,
    token_ids: Arc<Vec<u32>>,
}

/// A generated and scored group, with the learner's view of it.
struct ScoredGroup {
    rollouts: Vec<Rollout>,
    /// The advantage of each usable rollout, by index into `rollouts` (`None`: unusable).
    advantages: Vec<Option<f64>>,
    /// Why the group is dropped instead of submitted.
    drop_reason: Option<String>,
}

/// The tokens that end a turn.
pub fn stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    chat::STOP_SEQUENCES
        .iter()
        .filter_map(|s| tokenizer.token_id(s))
        .collect()
}

/// Fills one prompt slot of a step: draw a task, dispatch its prompt, generate and score a
/// group, record it, submit it; a dropped group is replaced by a new draw. A slot always hands
/// the learner one group (empty when every attempt failed), because the learner counts groups
/// to know when a step is complete.
async fn run_slot(
    ctx: &Arc<StageContext>,
    stage: &Stage,
    order: &StepOrder,
    curriculum: Option<&Curriculum>,
    at: SlotAt,
) -> Result<(), SchedulerError> {
    let stop = stop_tokens(&ctx.tokenizer);
    for attempt in 0..MAX_ATTEMPTS {
        let last_attempt = attempt + 1 == MAX_ATTEMPTS;
        let curriculum = curriculum.map(|c| (c, at.progress));
        let drawn = match draw(ctx, stage, curriculum, at.step, at.slot, attempt).await {
            Ok(d) => Arc::new(d),
            Err(DrawError::Fatal(e)) => return Err(e),
            Err(DrawError::Fault) => continue,
        };
        let group_id = group_id(ctx, at.step, at.slot, Some(attempt));
        let span = tracing::info_span!(
            "group",
            group_id = %group_id,
            env = %drawn.env_name,
            slot = at.slot,
            attempt
        );
        let submitted = async {
            let Some(prompt) = dispatch_prompt(ctx, stage, &drawn, at.step, group_id).await? else {
                return Ok(false);
            };
            let group = generate_group(ctx, stage, &drawn, &prompt, &stop, at).await;
            let group = score_together(ctx, &drawn, group).await;
            ctx.ledger.mark_generated([prompt.id.as_str()]).await?;
            ctx.ledger.mark_scored([prompt.id.as_str()]).await?;
            let think_close = ctx.tokenizer.token_id(chat::THINK_CLOSE);
            let group = score_group(group, stage, think_close, last_attempt);
            let trajectories = record_group(ctx, &drawn.env_name, &prompt, &group).await?;
            if let Some(reason) = &group.drop_reason {
                tracing::debug!(reason = %reason, "group dropped");
                ctx.ledger
                    .mark_dropped([prompt.id.as_str()], reason)
                    .await?;
                ctx.stats.prompts_dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::PROMPTS_DROPPED, "environment" => drawn.env_name.clone())
                    .increment(1);
                return Ok(false);
            }
            submit_group(
                ctx,
                stage,
                order,
                at,
                &drawn.env_name,
                &prompt,
                trajectories,
            )
            .await?;
            Ok::<_, SchedulerError>(true)
        }
        .instrument(span)
        .await?;
        if submitted {
            return Ok(());
        }
    }
    order.wait_turn(at.step).await;
    submit_empty(ctx, stage, at.step, at.slot, false, at.lr).await?;
    order.submitted(at.step);
    Ok(())
}

/// Tokenizes the drawn task's prompt and records it as dispatched; a prompt longer than the
/// stage allows is recorded as dropped and gives `None`.
async fn dispatch_prompt(
    ctx: &StageContext,
    stage: &Stage,
    drawn: &Drawn,
    step: u64,
    group_id: String,
) -> Result<Option<Prompt>, SchedulerError> {
    let id = format!("{group_id}:p");
    metrics::counter!(names::PROMPTS_DISPATCHED, "environment" => drawn.env_name.clone())
        .increment(1);
    let token_ids = ctx
        .tokenizer
        .encode(&chat::render_prompt(&drawn.task.prompt))
        .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
    ctx.ledger
        .record_prompts_dispatched(vec![NewPrompt {
            id: id.clone(),
            run_id: ctx.run_id.clone(),
            group_id: group_id.clone(),
            environment: drawn.env_name.clone(),
            split: Split::Train,
            task_json: serde_json::to_string(&*drawn.task).expect("tasks serialise"),
            step_dispatched: step,
            stage_index: Some(ctx.stage_index as u64),
        }])
        .await?;
    if token_ids.len() > stage.max_prompt_tokens {
        let reason = format!(
            "prompt has {} tokens, more than max_prompt_tokens = {}",
            token_ids.len(),
            stage.max_prompt_tokens
        );
        tracing::debug!(prompt_id = %id, reason = %reason, "prompt dropped");
        ctx.ledger.mark_dropped([id.as_str()], &reason).await?;
        ctx.stats.prompts_dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::PROMPTS_DROPPED, "environment" => drawn.env_name.clone())
            .increment(1);
        return Ok(None);
    }
    Ok(Some(Prompt {
        group_id,
        id,
        token_ids: Arc::new(token_ids),
    }))
}

/// Generates (and, for multi-turn environments, plays) the group's `group_size` rollouts
/// concurrently and scores each.
async fn generate_group(
    ctx: &Arc<StageContext>,
    stage: &Stage,
    drawn: &Arc<Drawn>,
    prompt: &Prompt,
    stop: &[u32],
    at: SlotAt,
) -> Vec<Rollout> {
    let think_budget = think_budget(&ctx.tokenizer, stage);
    let members = (0..stage.group_size).map(|i| {
        let m = Member {
            trajectory_id: format!("{}:t{i}", prompt.id),
            request_id: format!("{}:r{i}", prompt.id),
            prompt_id: prompt.id.clone(),
            sampling: SamplingParams {
                temperature: stage.temperature,
                top_p: stage.top_p,
                top_k: stage.top_k as u32,
                seed: Some(drawn.seed.wrapping_mul(31).wrapping_add(i as u64)),
                think_budget,
            },
            max_new_tokens: stage.max_new_tokens,
            max_context_tokens: stage.max_prompt_tokens,
            stop: stop.to_vec(),
            min_version: at.min_version,
            exact_version: at.exact_version,
        };
        play_in_span(ctx.clone(), drawn.clone(), prompt.token_ids.clone(), m)
    });
    futures_join(members.collect()).await
}

/// [`play`] in a `rollout` span carrying the request id.
fn play_in_span(
    ctx: Arc<StageContext>,
    drawn: Arc<Drawn>,
    prompt_ids: Arc<Vec<u32>>,
    m: Member,
) -> BoxFuture<Rollout> {
    let span = tracing::info_span!(
        "rollout",
        request_id = %m.request_id,
        trajectory_id = %m.trajectory_id,
        env = %drawn.env_name
    );
    Box::pin(
        async move {
            let r = play(ctx, drawn, prompt_ids, m).await;
            match &r.verdict {
                Ok(s) => tracing::debug!(
                    worker_id = %r.worker_id,
                    tokens = r.tokens.len(),
                    reward = s.reward,
                    "rollout scored"
                ),
                Err(why) => {
                    tracing::warn!(worker_id = %r.worker_id, reason = %why, "rollout failed")
                }
            }
            r
        }
        .instrument(span),
    )
}

/// The group's scores from [`Environment::score_group`], for environments that score a
/// prompt's completions together (an rlhf stage's GenRM comparisons); the rollouts that scored
/// are handed over in order, the others keep their failure. Through the fault guard: a failed
/// or malformed group score fails every rollout that had scored, like a failed single score.
async fn score_together(
    ctx: &StageContext,
    drawn: &Drawn,
    mut group: Vec<Rollout>,
) -> Vec<Rollout> {
    let scored: Vec<usize> = (0..group.len())
        .filter(|&i| group[i].verdict.is_ok())
        .collect();
    if scored.len() < 2 {
        return group;
    }
    let completions: Vec<String> = scored.iter().map(|&i| group[i].text.clone()).collect();
    let scores: Vec<Score> = scored
        .iter()
        .filter_map(|&i| group[i].verdict.clone().ok())
        .collect();
    let (env, task, n) = (drawn.env.clone(), drawn.task.clone(), scored.len());
    let start = Instant::now();
    let together = ctx
        .faults
        .call(&drawn.env_name, move || {
            env.score_group(&task, &completions, &scores)
        })
        .await
        .and_then(|new| match new {
            None => Ok(None),
            Some(new) if new.len() != n => Err(EnvFault::Malformed(format!(
                "score_group gave {} scores for {n} completions",
                new.len()
            ))),
            Some(new) => new
                .into_iter()
                .map(check_score)
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        });
    let elapsed = start.elapsed().as_millis() as u64;
    match together {
        Ok(None) => {}
        Ok(Some(new)) => {
            for (&i, score) in scored.iter().zip(new) {
                group[i].verdict = Ok(score);
                group[i].score_ms += elapsed;
            }
        }
        Err(fault) => {
            if matches!(fault, EnvFault::Malformed(_)) {
                ctx.faults.record(&drawn.env_name, &fault);
            }
            tracing::warn!(reason = %fault, "scoring the group together failed");
            for &i in &scored {
                group[i].verdict = Err(format!("scoring the group failed: {fault}"));
            }
        }
    }
    group
}

/// Computes the group's advantages over its usable rollouts (invalid ones get the stage's fixed
/// penalty) and decides whether it is dropped: fewer than two usable, or (unless this is the
/// slot's last attempt) no signal (every rollout valid and scored the same) when the stage drops
/// those.
fn score_group(
    rollouts: Vec<Rollout>,
    stage: &Stage,
    think_close: Option<u32>,
    last_attempt: bool,
) -> ScoredGroup {
    let scored: Vec<Scored> = rollouts
        .iter()
        .filter_map(|r| {
            let (reasoning_tokens, answer_tokens) = r.lengths(think_close);
            Some(Scored {
                reward: r.reward()?,
                invalid: r.invalid_reason().is_some(),
                answer_tokens,
                reasoning_tokens,
            })
        })
        .collect();
    let usable = scored.len();
    let advantages = group_advantages(&scored, &stage.advantage);
    let drop_reason = if usable < 2 {
        Some(format!(
            "{usable} of {} completions usable; a group needs 2",
            rollouts.len()
        ))
    } else if advantages.is_none() && stage.drop_zero_variance && !last_attempt {
        Some("zero reward variance: every completion scored the same".to_string())
    } else {
        None
    };
    let mut usable_advantages = advantages.unwrap_or_else(|| vec![0.0; usable]).into_iter();
    let advantages = rollouts
        .iter()
        .map(|r| {
            r.verdict
                .is_ok()
                .then(|| usable_advantages.next().expect("one per usable"))
        })
        .collect();
    ScoredGroup {
        rollouts,
        advantages,
        drop_reason,
    }
}

/// Records every rollout of the group in the ledger, usable or not, and returns the proto
/// trajectories of the usable ones.
async fn record_group(
    ctx: &StageContext,
    env_name: &str,
    prompt: &Prompt,
    group: &ScoredGroup,
) -> Result<Vec<Trajectory>, SchedulerError> {
    let mut rows = Vec::with_capacity(group.rollouts.len());
    let mut trajectories = vec![];
    for (r, advantage) in group.rollouts.iter().zip(&group.advantages) {
        if r.verdict.is_err() {
            ctx.stats
                .trajectories_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        let status = if r.verdict.is_err() { "failed" } else { "ok" };
        metrics::counter!(names::TRAJECTORIES, "environment" => env_name.to_string(), "status" => status)
            .increment(1);
        // The policy's own tokens: a multi-turn mask leaves the observations out.
        let generated = if r.mask.is_empty() {
            r.tokens.len()
        } else {
            r.mask.iter().filter(|m| **m).count()
        };
        metrics::counter!(names::GENERATED_TOKENS, "environment" => env_name.to_string())
            .increment(generated as u64);
        let (row, trajectory) = rollout_records(ctx, env_name, prompt, r, *advantage);
        rows.push(row);
        trajectories.extend(trajectory);
    }
    ctx.ledger.insert_trajectories(rows).await?;
    Ok(trajectories)
}

/// The ledger row of one rollout and, when it is usable (it has an `advantage`), the proto
/// `Trajectory` the learner trains on: both from the same fields, so they cannot disagree.
fn rollout_records(
    ctx: &StageContext,
    env_name: &str,
    prompt: &Prompt,
    r: &Rollout,
    advantage: Option<f64>,
) -> (NewTrajectory, Option<Trajectory>) {
    let (reward, components, reason, status) = match &r.verdict {
        Ok(s) => {
            let mut components = s.components_map();
            let mut reason = s.reason.clone();
            if let Some(why) = r.invalid_reason() {
                components.insert(INVALID_COMPONENT.to_string(), 1.0);
                reason = format!("invalid ({why}); {reason}");
            }
            (Some(s.reward), components, reason, TrajectoryStatus::Ok)
        }
        Err(reason) => (
            None,
            BTreeMap::new(),
            reason.clone(),
            TrajectoryStatus::Failed {
                reason: reason.clone(),
            },
        ),
    };
    let trajectory = match (reward, advantage) {
        (Some(reward), Some(advantage)) => Some(Trajectory {
            trajectory_id: r.trajectory_id.clone(),
            request_id: r.request_id.clone(),
            prompt_id: prompt.id.clone(),
            prompt_token_ids: prompt.token_ids.to_vec(),
            completion_token_ids: r.tokens.clone(),
            logprobs: r.logprobs.clone(),
            policy_versions: r.versions.clone(),
            completion_mask: r.mask.clone(),
            reward,
            reward_components: components.clone().into_iter().collect(),
            finish_reason: r.finish_reason,
            worker_id: r.worker_id.clone(),
            advantage,
        }),
        _ => None,
    };
    let row = NewTrajectory {
        id: r.trajectory_id.clone(),
        run_id: ctx.run_id.clone(),
        prompt_id: prompt.id.clone(),
        group_id: prompt.group_id.clone(),
        environment: env_name.to_string(),
        worker_id: r.worker_id.clone(),
        prompt_token_ids: prompt.token_ids.to_vec(),
        completion_token_ids: r.tokens.clone(),
        completion_text: r.text.clone(),
        logprobs: r.logprobs.clone(),
        policy_versions: r.versions.clone(),
        finish_reason: FinishReason::try_from(r.finish_reason).unwrap_or(FinishReason::Unspecified),
        reward,
        reward_components: components,
        reason: Some(reason),
        status,
        timings: Timings {
            queue_ms: r.queue_ms,
            generate_ms: r.generate_ms,
            score_ms: r.score_ms,
        },
        stage_index: Some(ctx.stage_index as u64),
    };
    (row, trajectory)
}

/// The stage's reasoning budget as the worker takes it: the tokens of `<think>` and `</think>`
/// in the run's tokenizer (the plan refuses a budget when they are not single tokens).
pub fn think_budget(tokenizer: &Tokenizer, stage: &Stage) -> Option<ThinkBudget> {
    let tokens = stage.think_budget?;
    Some(ThinkBudget {
        tokens: tokens as u32,
        open_token_id: tokenizer.token_id(chat::THINK_OPEN)?,
        close_token_id: tokenizer.token_id(chat::THINK_CLOSE)?,
    })
}

/// Hands the group to the learner in step order (see [`StepOrder`]), marks its prompt
/// consumed and counts it.
async fn submit_group(
    ctx: &StageContext,
    stage: &Stage,
    order: &StepOrder,
    at: SlotAt,
    env_name: &str,
    prompt: &Prompt,
    trajectories: Vec<Trajectory>,
) -> Result<(), SchedulerError> {
    let oldest = trajectories
        .iter()
        .flat_map(|t| t.policy_versions.iter().copied())
        .min()
        .unwrap_or(0);
    let n = trajectories.len() as u64;
    let reward_sum: f64 = trajectories.iter().map(|t| t.reward).sum();
    // The group's rows are durable before the learner can train it: an orchestrator killed
    // after the submit leaves no trained group the ledger never heard of (its successor marks
    // them consumed from the learner's history).
    ctx.ledger.flush().await?;
    // The learner trains on this group at its current version.
    order.wait_turn(at.step).await;
    let lag = ctx.learning.version().saturating_sub(oldest);
    ctx.learning
        .submit(TrajectoryGroup {
            run_id: ctx.run_id.clone(),
            group_id: prompt.group_id.clone(),
            environment: env_name.to_string(),
            trajectories,
            supervised: false,
            step_groups: stage.prompts_per_step as u32,
            learning_rate: at.lr,
            objective: stage.objective.as_ref().map(|o| o.to_proto()),
            stage: ctx.stage_index as u32,
            router_frozen: stage.router_frozen,
            mtp_head: false,
            step: Some(at.step),
        })
        .await?;
    order.submitted(at.step);
    tracing::debug!(trajectories = n, lag, "group submitted");
    metrics::counter!(names::GROUPS_SUBMITTED).increment(1);
    metrics::histogram!(names::TRAJECTORY_LAG).record(lag as f64);
    ctx.ledger
        .mark_consumed([prompt.id.as_str()], at.step)
        .await?;
    ctx.stats.groups_submitted.fetch_add(1, Ordering::Relaxed);
    ctx.stats
        .trajectories_submitted
        .fetch_add(n, Ordering::Relaxed);
    ctx.stats
        .reward_micros
        .fetch_add((reward_sum.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    ctx.stats.max_lag.fetch_max(lag, Ordering::Relaxed);
    Ok(())
}

/// Hands the learner an empty group for a slot whose every attempt failed, so that the step
/// (absolute: the policy version it updates) still completes (the learner counts groups).
async fn submit_empty(
    ctx: &StageContext,
    stage: &Stage,
    step: u64,
    slot: usize,
    supervised: bool,
    lr: f64,
) -> Result<(), SchedulerError> {
    tracing::warn!(
        stage = %stage.name,
        step,
        slot,
        attempts = MAX_ATTEMPTS,
        "no usable group: an empty one goes to the learner"
    );
    metrics::counter!(names::GROUPS_SUBMITTED).increment(1);
    ctx.learning
        .submit(TrajectoryGroup {
            run_id: ctx.run_id.clone(),
            group_id: format!(
                "{}:s{}:{}:{}:empty",
                ctx.run_id, ctx.stage_index, step, slot
            ),
            environment: String::new(),
            trajectories: vec![],
            supervised,
            step_groups: stage.prompts_per_step as u32,
            learning_rate: lr,
            objective: stage.objective.as_ref().map(|o| o.to_proto()),
            stage: ctx.stage_index as u32,
            router_frozen: stage.router_frozen,
            mtp_head: false,
            step: Some(step),
        })
        .await?;
    Ok(())
}

/// Awaits all futures concurrently, keeping their order.
pub(crate) async fn futures_join<T: Send + 'static>(futures: Vec<BoxFuture<T>>) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("generation task panicked"));
    }
    out
}

/// The reference policy's episode as text segments, each marked with whether the policy wrote
/// it: one closed turn for a single-turn environment; actions and the observations between them
/// for a multi-turn one.
fn reference_segments(
    env: &dyn Environment,
    task: &Task,
    multi_turn: Option<u32>,
) -> Result<Vec<(String, bool)>, chorus_environments::EnvError> {
    let end_of_turn = chat::STOP_SEQUENCES[0];
    let Some(max_turns) = multi_turn else {
        return Ok(vec![(
            format!("{}{end_of_turn}", env.reference(task)?),
            true,
        )]);
    };
    let mut segments = vec![];
    let mut episode = env.start(task)?;
    while episode.turn < max_turns {
        let action = env.reference_action(task, &episode)?;
        let outcome = env.step(task, &mut episode, &action)?;
        segments.push((format!("{action}{end_of_turn}"), true));
        if outcome.done {
            return Ok(segments);
        }
        segments.push((
            chat::render_continuation(outcome.observation.as_ref(), true),
            false,
        ));
    }
    Err(chorus_environments::EnvError::BadEpisodeState {
        task_id: task.id.clone(),
        message: format!("the reference policy did not finish within {max_turns} turns"),
    })
}

/// Runs a supervised warm-up stage: each step sends `prompts_per_step` tasks with the
/// environment's reference solution (for a multi-turn environment, the reference policy's whole
/// episode, observations masked out) as the completion, and waits for the learner to apply them.
/// Returns the number of steps run (fewer than `steps` when the stage reaches its goal).
pub async fn run_sft_stage(
    ctx: Arc<StageContext>,
    stage: Arc<Stage>,
) -> Result<u64, SchedulerError> {
    let span = stage_span(&ctx, &stage);
    run_sft_stage_in(ctx, stage).instrument(span).await
}

async fn run_sft_stage_in(
    ctx: Arc<StageContext>,
    stage: Arc<Stage>,
) -> Result<u64, SchedulerError> {
    let (base, first_step) = stage_start(&ctx);
    tracing::debug!(
        steps = stage.steps,
        base_version = base,
        first_step,
        "supervised stage starts"
    );
    let transcripts = match (&stage.data, &ctx.transcripts) {
        (Some(_), Some(t)) => Some(t.clone()),
        (Some(data), None) => {
            return Err(SchedulerError::Environment {
                name: data.path.display().to_string(),
                message: "the stage learns these transcripts, but its context holds none: \
                          load them into `StageContext::transcripts` (a `RunPlan` does)"
                    .into(),
            });
        }
        (None, _) => None,
    };
    for step in first_step..stage.steps {
        if goal_reached(&ctx, base, step).await? {
            return Ok(step);
        }
        let span = tracing::info_span!("step", step = base + step);
        run_sft_step(&ctx, &stage, transcripts.as_deref(), base, step)
            .instrument(span)
            .await?;
    }
    Ok(stage.steps.max(first_step))
}

/// One supervised example: where it came from, its prompt, and its completion as segments
/// (text, learned).
struct SftExample {
    source: String,
    task_json: String,
    prompt: Vec<chat::Message>,
    segments: Vec<(String, bool)>,
}

/// A transcript for slot `slot` of step `step`, when the stage's mixture picks its data there
/// (with probability `data.weight` over the total weight of the data and the environments that
/// are not paused).
fn pick_transcript(
    ctx: &StageContext,
    stage: &Stage,
    transcripts: &Transcripts,
    step: u64,
    slot: usize,
) -> Option<SftExample> {
    let data = stage.data.as_ref()?;
    let seed =
        ctx.seed ^ ((ctx.stage_index as u64) << 56) ^ (step << 32) ^ ((slot as u64) << 8) ^ 0xda7a;
    let mut rng = StdRng::seed_from_u64(seed);
    let environments: f64 = stage
        .environments
        .iter()
        .filter(|e| !ctx.faults.is_paused(e.key()))
        .map(|e| e.weight)
        .sum();
    if rng.random::<f64>() * (data.weight + environments) >= data.weight {
        return None;
    }
    let row = &transcripts.rows[rng.random_range(0..transcripts.rows.len())];
    Some(SftExample {
        source: transcript_source(&transcripts.path),
        task_json: serde_json::json!({
            "transcripts": transcripts.path.display().to_string(),
            "line": row.line,
        })
        .to_string(),
        prompt: row.prompt.clone(),
        segments: row.segments.clone(),
    })
}

/// How a transcript file is named in the ledger's `environment` column.
fn transcript_source(path: &std::path::Path) -> String {
    format!(
        "transcripts:{}",
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    )
}

/// An environment's task with its reference completion, for slot `slot` of step `step`; `None`
/// when every attempt faulted.
async fn reference_example(
    ctx: &Arc<StageContext>,
    stage: &Arc<Stage>,
    step: u64,
    slot: usize,
) -> Result<Option<SftExample>, SchedulerError> {
    for attempt in 0..MAX_ATTEMPTS {
        let drawn = match draw(ctx, stage, None, step, slot, attempt).await {
            Ok(d) => d,
            Err(DrawError::Fatal(e)) => return Err(e),
            Err(DrawError::Fault) => continue,
        };
        let (env, task, multi) = (drawn.env.clone(), drawn.task.clone(), drawn.multi_turn);
        let segments = ctx
            .faults
            .call(&drawn.env_name, move || {
                reference_segments(env.as_ref(), &task, multi)
            })
            .await;
        if let Ok(segments) = segments {
            return Ok(Some(SftExample {
                source: drawn.env_name.clone(),
                task_json: serde_json::to_string(&*drawn.task).expect("tasks serialise"),
                prompt: drawn.task.prompt.clone(),
                segments,
            }));
        }
    }
    Ok(None)
}

/// One step of a supervised stage: draws `prompts_per_step` examples (environments' tasks with
/// their reference completions, or the stage's transcripts), records them, submits one group
/// per example and waits for the learner's step.
async fn run_sft_step(
    ctx: &Arc<StageContext>,
    stage: &Arc<Stage>,
    transcripts: Option<&Transcripts>,
    base: u64,
    step: u64,
) -> Result<(), SchedulerError> {
    let mut prompts = vec![];
    let mut trajectories = vec![];
    let mut groups = vec![];
    for slot in 0..stage.prompts_per_step {
        let example = match transcripts.and_then(|t| pick_transcript(ctx, stage, t, step, slot)) {
            Some(e) => Some(e),
            None => reference_example(ctx, stage, step, slot).await?,
        };
        let Some(example) = example else {
            groups.push(None);
            continue;
        };
        let prompt_ids = ctx
            .tokenizer
            .encode(&chat::render_prompt(&example.prompt))
            .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
        let (mut completion_ids, mut mask) = (vec![], vec![]);
        for (text, policy) in &example.segments {
            let ids = ctx
                .tokenizer
                .encode(text)
                .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
            mask.extend(std::iter::repeat_n(*policy, ids.len()));
            completion_ids.extend(ids);
        }
        if mask.iter().all(|&m| m) {
            mask.clear();
        }
        let completion_text: String = example.segments.iter().map(|s| s.0.as_str()).collect();
        let env_name = &example.source;
        let group_id = group_id(ctx, step, slot, None);
        let prompt_id = format!("{group_id}:p");
        prompts.push(NewPrompt {
            id: prompt_id.clone(),
            run_id: ctx.run_id.clone(),
            group_id: group_id.clone(),
            environment: env_name.clone(),
            split: Split::Train,
            task_json: example.task_json.clone(),
            step_dispatched: base + step,
            stage_index: Some(ctx.stage_index as u64),
        });
        trajectories.push(NewTrajectory {
            id: format!("{prompt_id}:ref"),
            run_id: ctx.run_id.clone(),
            prompt_id: prompt_id.clone(),
            group_id: group_id.clone(),
            environment: env_name.clone(),
            worker_id: "reference".into(),
            prompt_token_ids: prompt_ids.clone(),
            completion_token_ids: completion_ids.clone(),
            completion_text,
            logprobs: vec![],
            policy_versions: vec![],
            finish_reason: FinishReason::Stop,
            reward: Some(1.0),
            reward_components: BTreeMap::new(),
            reason: Some("reference solution (supervised warm-up)".into()),
            status: TrajectoryStatus::Ok,
            timings: Timings::default(),
            stage_index: Some(ctx.stage_index as u64),
        });
        groups.push(Some(TrajectoryGroup {
            run_id: ctx.run_id.clone(),
            group_id,
            environment: env_name.clone(),
            trajectories: vec![Trajectory {
                trajectory_id: format!("{prompt_id}:ref"),
                prompt_id,
                prompt_token_ids: prompt_ids,
                completion_token_ids: completion_ids,
                completion_mask: mask,
                reward: 1.0,
                worker_id: "reference".into(),
                ..Default::default()
            }],
            supervised: true,
            step_groups: stage.prompts_per_step as u32,
            learning_rate: stage.lr_at(step),
            stage: ctx.stage_index as u32,
            router_frozen: false,
            mtp_head: false,
            objective: None,
            step: Some(base + step),
        }));
    }
    let ids: Vec<String> = prompts.iter().map(|p| p.id.clone()).collect();
    let submitted = ids.len() as u64;
    ctx.ledger.record_prompts_dispatched(prompts).await?;
    ctx.ledger.insert_trajectories(trajectories).await?;
    // Durable before the learner can train them (see `submit_group`).
    ctx.ledger.flush().await?;
    for (slot, g) in groups.into_iter().enumerate() {
        match g {
            Some(g) => ctx.learning.submit(g).await?,
            None => submit_empty(ctx, stage, base + step, slot, true, stage.lr_at(step)).await?,
        }
    }
    ctx.ledger.mark_consumed(ids, base + step).await?;
    ctx.stats
        .groups_submitted
        .fetch_add(submitted, Ordering::Relaxed);
    ctx.stats
        .trajectories_submitted
        .fetch_add(submitted, Ordering::Relaxed);
    ctx.learning.wait_version(base + step + 1).await?;
    Ok(())
}

/// The most rollouts an `mtp_heal` stage reads back from the ledger.
pub const MTP_HEAL_ROLLOUTS: u32 = 20_000;

/// Runs the `mtp_heal` stage `stage` (its steps, or its goal) and returns the number of steps
/// it ran: each step trains the MTP head alone on `prompts_per_step` of this run's own
/// rollouts, read back from the ledger (up to [`MTP_HEAL_ROLLOUTS`], by id) and taken in an
/// order shuffled by the run's seed, so a resumed stage continues with the rollouts it had not
/// yet used. The whole completion is learned, tool observations included: a draft is checked
/// against whatever follows.
pub async fn run_mtp_heal_stage(
    ctx: Arc<StageContext>,
    stage: Arc<Stage>,
) -> Result<u64, SchedulerError> {
    let span = stage_span(&ctx, &stage);
    run_mtp_heal_stage_in(ctx, stage).instrument(span).await
}

async fn run_mtp_heal_stage_in(
    ctx: Arc<StageContext>,
    stage: Arc<Stage>,
) -> Result<u64, SchedulerError> {
    use rand::seq::SliceRandom;
    let (base, first_step) = stage_start(&ctx);
    let rollouts = ctx
        .ledger
        .policy_rollouts(&ctx.run_id, MTP_HEAL_ROLLOUTS)
        .await?;
    if rollouts.is_empty() {
        return Err(SchedulerError::NoData(format!(
            "stage {}: run {} has no rollouts of its own in the ledger to heal the MTP head on; \
             an mtp_heal stage goes after an rlvr, swe_rl or rlhf stage of the same run",
            stage.name, ctx.run_id
        )));
    }
    tracing::info!(
        rollouts = rollouts.len(),
        "stage {}: healing the MTP head on {} of the run's rollouts",
        stage.name,
        rollouts.len()
    );
    let mut order: Vec<usize> = (0..rollouts.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        ctx.seed ^ ((ctx.stage_index as u64) << 56) ^ 0x4d54_5048,
    ));
    let per_step = stage.prompts_per_step;
    for step in first_step..stage.steps {
        if goal_reached(&ctx, base, step).await? {
            return Ok(step);
        }
        for slot in 0..per_step {
            let r = &rollouts[order[(step as usize * per_step + slot) % order.len()]].trajectory;
            ctx.learning
                .submit(TrajectoryGroup {
                    run_id: ctx.run_id.clone(),
                    group_id: group_id(&ctx, step, slot, None),
                    environment: r.environment.clone(),
                    trajectories: vec![Trajectory {
                        trajectory_id: r.id.clone(),
                        prompt_id: r.prompt_id.clone(),
                        prompt_token_ids: r.prompt_token_ids.clone(),
                        completion_token_ids: r.completion_token_ids.clone(),
                        worker_id: r.worker_id.clone(),
                        ..Default::default()
                    }],
                    supervised: true,
                    step_groups: per_step as u32,
                    learning_rate: stage.lr_at(step),
                    stage: ctx.stage_index as u32,
                    router_frozen: false,
                    mtp_head: true,
                    objective: None,
                    step: Some(base + step),
                })
                .await?;
        }
        ctx.stats
            .groups_submitted
            .fetch_add(per_step as u64, Ordering::Relaxed);
        ctx.stats
            .trajectories_submitted
            .fetch_add(per_step as u64, Ordering::Relaxed);
        ctx.learning.wait_version(base + step + 1).await?;
        if (step + 1) % 10 == 0 || step + 1 == stage.steps {
            tracing::info!(
                "stage {}: MTP healing step {}/{}",
                stage.name,
                step + 1,
                stage.steps
            );
        }
    }
    Ok(stage.steps.max(first_step))
}

/// Held-out accuracy of one environment: the fraction of tasks answered with full reward, or,
/// with several samples per task, the mean over tasks of each one's fraction of samples solved.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    /// Tasks evaluated.
    pub heldout_n: usize,
    /// Episodes answered with full reward (of `heldout_n x samples_per_task`).
    pub solved: usize,
    /// `solved / (heldout_n x samples_per_task)`.
    pub accuracy: f64,
    /// The accuracy's 95% Wilson interval (over `effective_n` tasks).
    pub interval: Interval,
    /// Mean reward per episode.
    pub mean_reward: f64,
    /// Multi-turn episodes cut short because their conversation outgrew `max_prompt_tokens`
    /// (they count as not solved).
    #[serde(default)]
    pub context_limited: usize,
    /// Episodes per task: 1 is one greedy answer.
    #[serde(default = "one")]
    pub samples_per_task: usize,
    /// The independent tasks the interval counts ([`confidence::effective_tasks`]); `None`:
    /// `heldout_n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_n: Option<f64>,
}

fn one() -> usize {
    1
}

impl Accuracy {
    /// `solved` of `n` tasks (one answer each), with mean reward `mean_reward`.
    pub fn new(solved: usize, n: usize, mean_reward: f64) -> Self {
        Self {
            heldout_n: n,
            solved,
            accuracy: solved as f64 / n.max(1) as f64,
            interval: confidence::wilson(solved, n),
            mean_reward,
            context_limited: 0,
            samples_per_task: 1,
            effective_n: None,
        }
    }

    /// `solved_per_task[i]` of `samples` episodes of task `i` solved, with mean reward per
    /// episode `mean_reward`. One sample per task is [`Accuracy::new`].
    pub fn sampled(solved_per_task: &[usize], samples: usize, mean_reward: f64) -> Self {
        let n = solved_per_task.len();
        let solved = solved_per_task.iter().sum();
        if samples <= 1 {
            return Self::new(solved, n, mean_reward);
        }
        let accuracy = solved as f64 / (n * samples).max(1) as f64;
        let effective = confidence::effective_tasks(solved_per_task, samples);
        Self {
            heldout_n: n,
            solved,
            accuracy,
            interval: confidence::wilson_counts(accuracy * effective, effective),
            mean_reward,
            context_limited: 0,
            samples_per_task: samples,
            effective_n: Some(effective),
        }
    }

    /// The accuracy a ledger row records.
    pub fn from_ledger(e: &crate::ledger::Evaluation) -> Self {
        Self {
            heldout_n: e.tasks as usize,
            solved: e.correct as usize,
            accuracy: e.accuracy,
            interval: Interval(e.accuracy_lo, e.accuracy_hi),
            mean_reward: e.mean_reward,
            context_limited: 0,
            samples_per_task: e.samples_per_task.max(1) as usize,
            effective_n: e.effective_tasks,
        }
    }

    /// `(solved, n)` in effective tasks, what the interval arithmetic takes.
    pub fn counts(&self) -> (f64, f64) {
        let n = self.effective_n.unwrap_or(self.heldout_n as f64);
        (self.accuracy * n, n)
    }
}

/// Seed of the first held-out draw; held-out seeds are counted up from here.
const HELDOUT_SEED_BASE: u64 = 1_000_000;
/// Held-out draws per task asked for, before concluding an environment has no more distinct
/// held-out tasks at its difficulty.
const HELDOUT_DRAWS_PER_TASK: usize = 8;

/// Up to `n` distinct held-out tasks of `env` at `difficulty` (distinct by task id), drawn with
/// seeds counted up from [`HELDOUT_SEED_BASE`], the same on every call. A draw the environment
/// fails is a slot no policy can solve (`None`). Fewer than `n` come back when the environment's
/// held-out split at this difficulty is smaller (single-digit addition has about 20 held-out
/// facts): repeating a task would count one answer many times and make the accuracy's interval
/// look narrower than the evidence is.
pub async fn heldout_tasks(
    ctx: &StageContext,
    name: &str,
    env: &Arc<dyn Environment>,
    difficulty: u32,
    n: usize,
) -> Vec<Option<(Task, EnvInfo)>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut draw = 0;
    while out.len() < n && draw < n * HELDOUT_DRAWS_PER_TASK {
        let (env2, seed) = (env.clone(), HELDOUT_SEED_BASE + draw as u64);
        draw += 1;
        let sampled = ctx
            .faults
            .call(name, move || {
                let task = env2.sample(seed, EnvSplit::Heldout, difficulty)?;
                Ok((task, env2.info()))
            })
            .await;
        match sampled {
            Ok((task, info)) => {
                if seen.insert(task.id.clone()) {
                    out.push(Some((task, info)));
                }
            }
            Err(_) => out.push(None),
        }
    }
    if out.len() < n {
        tracing::warn!(
            env = name,
            difficulty,
            distinct = out.len(),
            asked = n,
            "{name} has only {} distinct held-out tasks at difficulty {difficulty} ({n} asked); \
             its accuracy is measured on those, with a correspondingly wide interval",
            out.len()
        );
    }
    out
}

/// Accuracy on `n` distinct held-out tasks of each environment (at its given difficulty; fewer
/// when its held-out split is smaller, see [`heldout_tasks`]), with the policy version
/// `min_version` or newer (exactly `min_version` in deterministic runs): one greedy answer per
/// task, or `sampling.samples` episodes per task at its temperature (seeds 0, 1, ...).
/// Multi-turn environments play whole episodes. A task the environment fails to sample or score
/// counts as not solved.
pub async fn evaluate(
    ctx: &Arc<StageContext>,
    envs: &[(String, u32)],
    n: usize,
    sampling: HeldoutSampling,
    max_new_tokens: usize,
    max_prompt_tokens: usize,
    min_version: u64,
) -> Result<BTreeMap<String, Accuracy>, SchedulerError> {
    let samples = sampling.samples.max(1);
    let temperature = if samples == 1 {
        0.0
    } else {
        sampling.temperature
    };
    let stop: Vec<u32> = chat::STOP_SEQUENCES
        .iter()
        .filter_map(|s| ctx.tokenizer.token_id(s))
        .collect();
    let mut out = BTreeMap::new();
    for (name, difficulty) in envs {
        let env = ctx
            .registry
            .get(name)
            .map_err(|e| SchedulerError::Environment {
                name: name.clone(),
                message: e.to_string(),
            })?;
        let tasks = heldout_tasks(ctx, name, &env, *difficulty, n).await;
        let slots = tasks.len();
        let mut futures = vec![];
        let mut task_of = vec![];
        for (i, sampled) in tasks.into_iter().enumerate() {
            let Some((task, info)) = sampled else {
                continue;
            };
            let prompt_ids = ctx
                .tokenizer
                .encode(&chat::render_prompt(&task.prompt))
                .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
            let multi = (info.turns == Turns::Multi).then_some(info.max_turns.max(1));
            let (task, prompt_ids) = (Arc::new(task), Arc::new(prompt_ids));
            for sample in 0..samples {
                let drawn = Arc::new(Drawn {
                    seed: sample as u64,
                    env_name: name.clone(),
                    env: env.clone(),
                    multi_turn: multi,
                    task: task.clone(),
                });
                // One greedy answer keeps the ids it always had.
                let id = if samples == 1 {
                    format!("eval:{name}:{min_version}:{i}")
                } else {
                    format!("eval:{name}:{min_version}:{i}:{sample}")
                };
                let m = Member {
                    trajectory_id: id.clone(),
                    request_id: id,
                    prompt_id: format!("eval:{name}:{i}"),
                    sampling: SamplingParams {
                        temperature,
                        top_p: 1.0,
                        top_k: 0,
                        seed: Some(sample as u64),
                        think_budget: None,
                    },
                    max_new_tokens,
                    max_context_tokens: max_prompt_tokens,
                    stop: stop.clone(),
                    min_version,
                    exact_version: ctx.deterministic.then_some(min_version),
                };
                task_of.push(i);
                futures
                    .push(Box::pin(play(ctx.clone(), drawn, prompt_ids.clone(), m))
                        as BoxFuture<Rollout>);
            }
        }
        let rollouts = futures_join(futures).await;
        let mut solved_per_task = vec![0usize; slots];
        let mut total = 0f64;
        let limited = rollouts.iter().filter(|r| r.context_limited).count();
        if limited > 0 {
            // They count as unsolved, which reads as a weak policy when the limit is the cause.
            tracing::warn!(
                environment = %name,
                episodes = limited,
                of = rollouts.len(),
                max_prompt_tokens,
                "held-out episodes outgrew max_prompt_tokens and count as unsolved; \
                 raise the stage's max_prompt_tokens to measure them"
            );
        }
        for (r, &task) in rollouts.iter().zip(&task_of) {
            if let Ok(s) = &r.verdict {
                total += s.reward;
                if env.is_solved(s) {
                    solved_per_task[task] += 1;
                }
            }
        }
        let episodes = (slots * samples).max(1) as f64;
        out.insert(
            name.clone(),
            Accuracy {
                context_limited: limited,
                ..Accuracy::sampled(&solved_per_task, samples, total / episodes)
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{Accuracy, fixed_slot_environment, policy_lengths};

    #[test]
    fn an_accuracy_measured_before_sampling_existed_reads_as_one_greedy_answer_per_task() {
        // A line of a resumed run's measurements file, written before `samples_per_task`.
        let old = r#"{"heldout_n": 4, "solved": 1, "accuracy": 0.25, "interval": [0.05, 0.7],
                      "mean_reward": 0.25, "context_limited": 0}"#;
        let a: Accuracy = serde_json::from_str(old).unwrap();
        assert_eq!((a.samples_per_task, a.effective_n), (1, None));
        assert_eq!(a.counts(), (1.0, 4.0));
        // And a sampled one survives the round trip.
        let sampled = Accuracy::sampled(&[3, 1, 0, 4], 4, 0.5);
        assert_eq!(sampled.accuracy, 0.5);
        let back: Accuracy =
            serde_json::from_str(&serde_json::to_string(&sampled).unwrap()).unwrap();
        assert_eq!(back, sampled);
        assert!(sampled.effective_n.unwrap() >= 4.0 && sampled.effective_n.unwrap() <= 16.0);
    }

    #[test]
    fn reasoning_and_answer_lengths_count_only_the_policys_tokens() {
        const CLOSE: u32 = 9;
        assert_eq!(
            policy_lengths(&[1, 2, CLOSE, 3, 4], &[], Some(CLOSE)),
            (3, 2)
        );
        assert_eq!(policy_lengths(&[1, 2, 3], &[], Some(CLOSE)), (0, 3));
        assert_eq!(policy_lengths(&[1, CLOSE, 3], &[], None), (0, 3));
        // A tool observation (mask false) between turns counts for neither.
        let mask = [true, true, false, false, true, true];
        assert_eq!(
            policy_lengths(&[1, CLOSE, 5, 5, 2, 3], &mask, Some(CLOSE)),
            (2, 2)
        );
    }

    fn counts(weights: &[f64], per_step: usize, step: u64) -> Vec<usize> {
        let mut c = vec![0; weights.len()];
        for slot in 0..per_step {
            c[fixed_slot_environment(weights, per_step, step, slot)] += 1;
        }
        c
    }

    #[test]
    fn fixed_ratios_give_exact_counts() {
        assert_eq!(counts(&[1.0, 1.0], 8, 0), [4, 4]);
        assert_eq!(counts(&[3.0, 1.0], 8, 5), [6, 2]);
        assert_eq!(counts(&[2.0, 1.0, 1.0], 16, 0), [8, 4, 4]);
        // A paused environment (weight 0) gets nothing; the others share its slots.
        assert_eq!(counts(&[1.0, 0.0, 1.0], 6, 0), [3, 0, 3]);
    }

    #[test]
    fn leftover_slots_rotate_so_totals_follow_the_weights() {
        let weights = [1.0, 1.0, 1.0];
        let mut total = [0; 3];
        for step in 0..30 {
            let c = counts(&weights, 16, step);
            assert_eq!(c.iter().sum::<usize>(), 16);
            assert!(c.iter().all(|&n| n == 5 || n == 6), "{c:?}");
            for (t, n) in total.iter_mut().zip(c) {
                *t += n;
            }
        }
        assert_eq!(total, [160, 160, 160]);
    }
}
