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

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chorus_environments::{Registry, Split as EnvSplit, Task, chat};
use chorus_model::tokenizer::Tokenizer;
use chorus_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, Trajectory, TrajectoryGroup,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::advantage::group_advantages;
use crate::config::Stage;
use crate::ledger::{Ledger, NewPrompt, NewTrajectory, Split, Timings, TrajectoryStatus};

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where completions come from (rollout workers, or a stand-in).
pub trait Rollouts: Send + Sync + 'static {
    /// Generates one completion; a failure is reported in the response's `error`.
    fn generate(&self, request: GenerateRequest) -> BoxFuture<GenerateResponse>;
    /// The oldest policy version any worker would generate with now.
    fn policy_version(&self) -> u64;
    /// Resolves once every worker holds at least `version`.
    fn wait_version(&self, version: u64) -> BoxFuture<()>;
}

/// Where scored groups go (the learner, or a stand-in).
pub trait Learning: Send + Sync + 'static {
    /// Hands over one scored group.
    fn submit(&self, group: TrajectoryGroup) -> BoxFuture<Result<(), String>>;
    /// The learner's latest policy version.
    fn version(&self) -> u64;
    /// Resolves once the learner has published at least `version`.
    fn wait_version(&self, version: u64) -> BoxFuture<()>;
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
    /// The learner refused a group.
    #[error("learner: {0}")]
    Learner(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
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
}

/// Replacement prompts tried for one slot before its last group is sent as it is.
const MAX_ATTEMPTS: u32 = 8;

/// Picks an environment index by weight.
fn pick(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

/// Runs the RL stage `stage` to completion.
pub async fn run_rl_stage(ctx: Arc<StageContext>, stage: Arc<Stage>) -> Result<(), SchedulerError> {
    check_single_turn(&ctx, &stage)?;
    let base = ctx.learning.version();
    let mut tasks = tokio::task::JoinSet::new();
    for step in 0..stage.steps {
        // The staleness gate: tokens of step `step` come from a version >= base + step - bound.
        let need = (base + step).saturating_sub(stage.max_staleness);
        ctx.learning.wait_version(need).await;
        ctx.rollouts.wait_version(need).await;
        for slot in 0..stage.prompts_per_step {
            let (ctx, stage) = (ctx.clone(), stage.clone());
            tasks.spawn(async move { run_slot(&ctx, &stage, base + step, need, slot).await });
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
    ctx.learning.wait_version(base + stage.steps).await;
    Ok(())
}

struct Scored {
    response: GenerateResponse,
    text: String,
    reward: Option<f64>,
    components: BTreeMap<String, f64>,
    reason: String,
    score_ms: u64,
}

/// What a prompt slot draws.
struct Drawn {
    /// Seed of the draw, also the base of the group's sampling seeds.
    seed: u64,
    env_name: String,
    env: Arc<dyn chorus_environments::Environment>,
    task: Task,
}

/// Picks an environment by weight and samples a training task, both from a seed derived from
/// (run seed, stage, step, slot, attempt), so that a run's prompts are reproducible.
fn draw(
    ctx: &StageContext,
    stage: &Stage,
    weights: &[f64],
    step: u64,
    slot: usize,
    attempt: u32,
) -> Result<Drawn, SchedulerError> {
    let seed = ctx.seed
        ^ ((ctx.stage_index as u64) << 56)
        ^ (step << 32)
        ^ ((slot as u64) << 8)
        ^ attempt as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = &stage.environments[pick(weights, &mut rng)];
    let env_name = &spec.key().to_string();
    let env_err = |message: String| SchedulerError::Environment {
        name: env_name.clone(),
        message,
    };
    let env = ctx
        .registry
        .get(env_name)
        .map_err(|e| env_err(e.to_string()))?;
    let task = env
        .sample(rng.random(), EnvSplit::Train, spec.difficulty)
        .map_err(|e| env_err(format!("sampling failed: {e}")))?;
    Ok(Drawn {
        seed,
        env_name: env_name.clone(),
        env,
        task,
    })
}

/// Fills one prompt slot of a step: sample, generate a group, score; retry on a dropped group.
async fn run_slot(
    ctx: &StageContext,
    stage: &Stage,
    step: u64,
    min_version: u64,
    slot: usize,
) -> Result<(), SchedulerError> {
    let weights: Vec<f64> = stage.environments.iter().map(|e| e.weight).collect();
    let stop: Vec<u32> = chat::STOP_SEQUENCES
        .iter()
        .filter_map(|s| ctx.tokenizer.token_id(s))
        .collect();
    for attempt in 0..MAX_ATTEMPTS {
        let Drawn {
            seed,
            env_name,
            env,
            task,
            ..
        } = draw(ctx, stage, &weights, step, slot, attempt)?;
        let env_name = &env_name;
        let group_id = format!(
            "{}:s{}:{}:{}:a{}",
            ctx.run_id, ctx.stage_index, step, slot, attempt
        );
        let prompt_id = format!("{group_id}:p");
        let prompt_text = chat::render_prompt(&task.prompt);
        let prompt_ids = ctx
            .tokenizer
            .encode(&prompt_text)
            .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
        let task_json = serde_json::to_string(&task).expect("tasks serialise");
        ctx.ledger
            .record_prompts_dispatched(vec![NewPrompt {
                id: prompt_id.clone(),
                run_id: ctx.run_id.clone(),
                group_id: group_id.clone(),
                environment: env_name.clone(),
                split: Split::Train,
                task_json,
                step_dispatched: step,
            }])
            .await?;
        if prompt_ids.len() > stage.max_prompt_tokens {
            ctx.ledger
                .mark_dropped(
                    [prompt_id.as_str()],
                    &format!(
                        "prompt has {} tokens, more than max_prompt_tokens = {}",
                        prompt_ids.len(),
                        stage.max_prompt_tokens
                    ),
                )
                .await?;
            ctx.stats.prompts_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }

        // Generate the group.
        let requests = (0..stage.group_size).map(|i| GenerateRequest {
            request_id: format!("{prompt_id}:r{i}"),
            run_id: ctx.run_id.clone(),
            prompt_id: prompt_id.clone(),
            trajectory_id: format!("{prompt_id}:t{i}"),
            prompt_token_ids: prompt_ids.clone(),
            sampling: Some(SamplingParams {
                temperature: stage.temperature,
                top_p: stage.top_p,
                top_k: stage.top_k as u32,
                seed: Some(seed.wrapping_mul(31).wrapping_add(i as u64)),
            }),
            max_new_tokens: stage.max_new_tokens as u32,
            stop_token_ids: stop.clone(),
            min_policy_version: min_version,
        });
        let responses = futures_join(requests.map(|r| ctx.rollouts.generate(r)).collect()).await;
        ctx.ledger.mark_generated([prompt_id.as_str()]).await?;

        // Score.
        let mut scored = Vec::with_capacity(responses.len());
        for response in responses {
            let start = Instant::now();
            if !response.error.is_empty() {
                scored.push(Scored {
                    reason: format!("generation failed: {}", response.error),
                    response,
                    text: String::new(),
                    reward: None,
                    components: BTreeMap::new(),
                    score_ms: 0,
                });
                continue;
            }
            if response.token_ids.len() != response.logprobs.len()
                || response.token_ids.len() != response.policy_versions.len()
                || response.token_ids.is_empty()
            {
                let reason = format!(
                    "malformed worker output: {} tokens, {} logprobs, {} versions",
                    response.token_ids.len(),
                    response.logprobs.len(),
                    response.policy_versions.len()
                );
                scored.push(Scored {
                    reason,
                    response,
                    text: String::new(),
                    reward: None,
                    components: BTreeMap::new(),
                    score_ms: 0,
                });
                continue;
            }
            let text = ctx
                .tokenizer
                .decode(&response.token_ids, false)
                .unwrap_or_default();
            let (reward, components, reason) = match env.score(&task, &text) {
                Ok(s) => (Some(s.reward), s.components_map(), s.reason),
                Err(e) => (None, BTreeMap::new(), format!("scoring failed: {e}")),
            };
            scored.push(Scored {
                response,
                text,
                reward,
                components,
                reason,
                score_ms: start.elapsed().as_millis() as u64,
            });
        }
        ctx.ledger.mark_scored([prompt_id.as_str()]).await?;

        let usable: Vec<usize> = (0..scored.len())
            .filter(|&i| scored[i].reward.is_some())
            .collect();
        let rewards: Vec<f64> = usable
            .iter()
            .map(|&i| scored[i].reward.expect("usable"))
            .collect();
        let advantages = group_advantages(&rewards, stage.advantage);
        let last_attempt = attempt + 1 == MAX_ATTEMPTS;
        let drop_reason = if usable.len() < 2 {
            Some(format!(
                "{} of {} completions usable; a group needs 2",
                usable.len(),
                scored.len()
            ))
        } else if advantages.is_none() && stage.drop_zero_variance && !last_attempt {
            Some("zero reward variance: every completion scored the same".to_string())
        } else {
            None
        };
        let advantages = advantages.unwrap_or_else(|| vec![0.0; rewards.len()]);

        // Record every trajectory, usable or not.
        let mut rows = Vec::with_capacity(scored.len());
        for s in &scored {
            let failed = s.reward.is_none();
            rows.push(NewTrajectory {
                id: s.response.trajectory_id.clone(),
                run_id: ctx.run_id.clone(),
                prompt_id: prompt_id.clone(),
                group_id: group_id.clone(),
                environment: env_name.clone(),
                worker_id: s.response.worker_id.clone(),
                prompt_token_ids: prompt_ids.clone(),
                completion_token_ids: s.response.token_ids.clone(),
                completion_text: s.text.clone(),
                logprobs: s.response.logprobs.clone(),
                policy_versions: s.response.policy_versions.clone(),
                finish_reason: FinishReason::try_from(s.response.finish_reason)
                    .unwrap_or(FinishReason::Unspecified),
                reward: s.reward,
                reward_components: s.components.clone(),
                reason: Some(s.reason.clone()),
                status: if failed {
                    TrajectoryStatus::Failed {
                        reason: s.reason.clone(),
                    }
                } else {
                    TrajectoryStatus::Ok
                },
                timings: Timings {
                    queue_ms: s.response.queue_ms,
                    generate_ms: s.response.generate_ms,
                    score_ms: s.score_ms,
                },
            });
            if failed {
                ctx.stats
                    .trajectories_failed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        ctx.ledger.insert_trajectories(rows).await?;
        if let Some(reason) = drop_reason {
            ctx.ledger
                .mark_dropped([prompt_id.as_str()], &reason)
                .await?;
            ctx.stats.prompts_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }

        let trajectories: Vec<Trajectory> = usable
            .iter()
            .zip(&advantages)
            .map(|(&i, &adv)| {
                let s = &scored[i];
                Trajectory {
                    trajectory_id: s.response.trajectory_id.clone(),
                    request_id: s.response.request_id.clone(),
                    prompt_id: prompt_id.clone(),
                    prompt_token_ids: prompt_ids.clone(),
                    completion_token_ids: s.response.token_ids.clone(),
                    logprobs: s.response.logprobs.clone(),
                    policy_versions: s.response.policy_versions.clone(),
                    completion_mask: vec![],
                    reward: s.reward.expect("usable"),
                    reward_components: s.components.clone().into_iter().collect(),
                    finish_reason: s.response.finish_reason,
                    worker_id: s.response.worker_id.clone(),
                    advantage: adv,
                }
            })
            .collect();
        let oldest = trajectories
            .iter()
            .flat_map(|t| t.policy_versions.iter().copied())
            .min()
            .unwrap_or(0);
        let n = trajectories.len() as u64;
        let reward_sum: f64 = trajectories.iter().map(|t| t.reward).sum();
        // The learner trains on this group at its current version.
        let lag = ctx.learning.version().saturating_sub(oldest);
        ctx.learning
            .submit(TrajectoryGroup {
                run_id: ctx.run_id.clone(),
                group_id: group_id.clone(),
                environment: env_name.clone(),
                trajectories,
                supervised: false,
                step_groups: stage.prompts_per_step as u32,
                learning_rate: stage.lr,
            })
            .await
            .map_err(SchedulerError::Learner)?;
        ctx.ledger.mark_consumed([prompt_id.as_str()], step).await?;
        ctx.stats.groups_submitted.fetch_add(1, Ordering::Relaxed);
        ctx.stats
            .trajectories_submitted
            .fetch_add(n, Ordering::Relaxed);
        ctx.stats
            .reward_micros
            .fetch_add((reward_sum.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        ctx.stats.max_lag.fetch_max(lag, Ordering::Relaxed);
        return Ok(());
    }
    Ok(())
}

/// Awaits all futures concurrently, keeping their order.
async fn futures_join<T: Send + 'static>(futures: Vec<BoxFuture<T>>) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("generation task panicked"));
    }
    out
}

fn check_single_turn(ctx: &StageContext, stage: &Stage) -> Result<(), SchedulerError> {
    for e in &stage.environments {
        let name = e.key();
        let env = ctx
            .registry
            .get(name)
            .map_err(|err| SchedulerError::Environment {
                name: name.to_string(),
                message: err.to_string(),
            })?;
        if env.info().turns == chorus_environments::Turns::Multi {
            return Err(SchedulerError::Environment {
                name: name.to_string(),
                message: "multi-turn environments are not scheduled yet; use single-turn ones"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Runs a supervised warm-up stage: each step sends `prompts_per_step` tasks with the
/// environment's reference solution as the completion, and waits for the learner to apply them.
pub async fn run_sft_stage(
    ctx: Arc<StageContext>,
    stage: Arc<Stage>,
) -> Result<(), SchedulerError> {
    check_single_turn(&ctx, &stage)?;
    let weights: Vec<f64> = stage.environments.iter().map(|e| e.weight).collect();
    let end_of_turn = chat::STOP_SEQUENCES[0];
    let base = ctx.learning.version();
    for step in 0..stage.steps {
        let mut prompts = vec![];
        let mut trajectories = vec![];
        let mut groups = vec![];
        for slot in 0..stage.prompts_per_step {
            let Drawn {
                env_name,
                env,
                task,
                ..
            } = draw(&ctx, &stage, &weights, step, slot, 0)?;
            let env_name = &env_name;
            let err = |e: chorus_environments::EnvError| SchedulerError::Environment {
                name: env_name.clone(),
                message: e.to_string(),
            };
            let reference = env.reference(&task).map_err(err)?;
            let prompt_ids = ctx
                .tokenizer
                .encode(&chat::render_prompt(&task.prompt))
                .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
            let completion_ids = ctx
                .tokenizer
                .encode(&format!("{reference}{end_of_turn}"))
                .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
            let group_id = format!("{}:s{}:{}:{}", ctx.run_id, ctx.stage_index, step, slot);
            let prompt_id = format!("{group_id}:p");
            prompts.push(NewPrompt {
                id: prompt_id.clone(),
                run_id: ctx.run_id.clone(),
                group_id: group_id.clone(),
                environment: env_name.clone(),
                split: Split::Train,
                task_json: serde_json::to_string(&task).expect("tasks serialise"),
                step_dispatched: base + step,
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
                completion_text: reference.clone(),
                logprobs: vec![],
                policy_versions: vec![],
                finish_reason: FinishReason::Stop,
                reward: Some(1.0),
                reward_components: BTreeMap::new(),
                reason: Some("reference solution (supervised warm-up)".into()),
                status: TrajectoryStatus::Ok,
                timings: Timings::default(),
            });
            groups.push(TrajectoryGroup {
                run_id: ctx.run_id.clone(),
                group_id,
                environment: env_name.clone(),
                trajectories: vec![Trajectory {
                    trajectory_id: format!("{prompt_id}:ref"),
                    prompt_id,
                    prompt_token_ids: prompt_ids,
                    completion_token_ids: completion_ids,
                    reward: 1.0,
                    worker_id: "reference".into(),
                    ..Default::default()
                }],
                supervised: true,
                step_groups: stage.prompts_per_step as u32,
                learning_rate: stage.lr,
            });
        }
        let ids: Vec<String> = prompts.iter().map(|p| p.id.clone()).collect();
        ctx.ledger.record_prompts_dispatched(prompts).await?;
        ctx.ledger.insert_trajectories(trajectories).await?;
        for g in groups {
            ctx.learning
                .submit(g)
                .await
                .map_err(SchedulerError::Learner)?;
        }
        ctx.ledger.mark_consumed(ids, base + step).await?;
        ctx.stats
            .groups_submitted
            .fetch_add(stage.prompts_per_step as u64, Ordering::Relaxed);
        ctx.stats
            .trajectories_submitted
            .fetch_add(stage.prompts_per_step as u64, Ordering::Relaxed);
        ctx.learning.wait_version(base + step + 1).await;
    }
    Ok(())
}

/// Held-out accuracy of one environment: the fraction of tasks answered with full reward.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Accuracy {
    /// Tasks evaluated.
    pub heldout_n: usize,
    /// Fraction with full reward.
    pub accuracy: f64,
    /// Mean reward.
    pub mean_reward: f64,
}

/// Greedy accuracy on `n` held-out tasks of each environment (at its given difficulty), with
/// the policy version `min_version` or newer.
pub async fn evaluate(
    ctx: &StageContext,
    envs: &[(String, u32)],
    n: usize,
    max_new_tokens: usize,
    min_version: u64,
) -> Result<BTreeMap<String, Accuracy>, SchedulerError> {
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
        let mut tasks = vec![];
        let mut futures = vec![];
        for i in 0..n {
            let task = env
                .sample(1_000_000 + i as u64, EnvSplit::Heldout, *difficulty)
                .map_err(|e| SchedulerError::Environment {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
            let prompt_ids = ctx
                .tokenizer
                .encode(&chat::render_prompt(&task.prompt))
                .map_err(|e| SchedulerError::Tokenizer(e.to_string()))?;
            futures.push(ctx.rollouts.generate(GenerateRequest {
                request_id: format!("eval:{name}:{min_version}:{i}"),
                run_id: ctx.run_id.clone(),
                prompt_id: format!("eval:{name}:{i}"),
                trajectory_id: format!("eval:{name}:{min_version}:{i}"),
                prompt_token_ids: prompt_ids,
                sampling: Some(SamplingParams {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: Some(0),
                }),
                max_new_tokens: max_new_tokens as u32,
                stop_token_ids: stop.clone(),
                min_policy_version: min_version,
            }));
            tasks.push(task);
        }
        let responses = futures_join(futures).await;
        let (mut full, mut total) = (0usize, 0f64);
        for (task, r) in tasks.iter().zip(responses) {
            if !r.error.is_empty() {
                continue;
            }
            let text = ctx
                .tokenizer
                .decode(&r.token_ids, false)
                .unwrap_or_default();
            if let Ok(s) = env.score(task, &text) {
                total += s.reward;
                if s.is_full() {
                    full += 1;
                }
            }
        }
        out.insert(
            name.clone(),
            Accuracy {
                heldout_n: n,
                accuracy: full as f64 / n.max(1) as f64,
                mean_reward: total / n.max(1) as f64,
            },
        );
    }
    Ok(out)
}
