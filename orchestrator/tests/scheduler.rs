//! The scheduler with stand-in generation and learning: every group reaches the learner with
//! advantages, the ledger agrees, malformed worker output fails only its trajectory, and the
//! staleness bound holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chorus_environments::builtin_registry;
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::{Ledger, NewRun, RolloutFilter, RunStatus, TrajectoryStatus};
use chorus_orchestrator::scheduler::{
    BoxFuture, INVALID_COMPONENT, LearningError, Rollouts, SchedulerError, StageContext, StageGoal,
    StageStats, run_rl_stage,
};
use chorus_orchestrator::standin::CountingLearner;
use chorus_proto::v1::{FinishReason, GenerateRequest, GenerateResponse, TrajectoryGroup};
use tokio::sync::watch;

/// Answers "a+b=" prompts: right for even request indices, wrong for odd ones; request 3 of
/// every fifth group comes back malformed (a logprob missing); request `unclosed_think` (when
/// set) opens a think block it never closes.
struct StandInWorkers {
    tokenizer: Arc<Tokenizer>,
    version: watch::Receiver<u64>,
    calls: AtomicU64,
    unclosed_think: Option<u64>,
    /// Instead of even indices: request `j` is right when `j < (a + b) mod 5`, so a task's pass
    /// rate over 4 samples is `min((a + b) mod 5, 4) / 4`.
    right_below_sum_mod_5: bool,
}

/// The operands of an "a+b=" prompt.
fn operands(tokenizer: &Tokenizer, prompt: &[u32]) -> (i64, i64) {
    let prompt = tokenizer.decode(prompt, true).unwrap();
    let expr = prompt.trim_end_matches('=');
    expr.split_once('+')
        .map(|(a, b)| {
            (
                a.trim().parse::<i64>().unwrap_or(0),
                b.trim().parse::<i64>().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}

impl Rollouts for StandInWorkers {
    fn generate(&self, r: GenerateRequest) -> BoxFuture<GenerateResponse> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let (a, b) = operands(&self.tokenizer, &r.prompt_token_ids);
        let index: u64 = r.request_id.rsplit(":r").next().unwrap().parse().unwrap();
        let right = if self.right_below_sum_mod_5 {
            index < ((a + b).rem_euclid(5)) as u64
        } else {
            index.is_multiple_of(2)
        };
        let answer = if right { a + b } else { a + b + 1 };
        let think = if self.unclosed_think == Some(index) {
            "<think>"
        } else {
            ""
        };
        let tokens = self
            .tokenizer
            .encode(&format!("{think}{answer}<|end|>"))
            .unwrap();
        let version = *self.version.borrow();
        let mut logprobs = vec![-0.5; tokens.len()];
        if index == 3 && n.is_multiple_of(5) {
            logprobs.pop();
        }
        let resp = GenerateResponse {
            request_id: r.request_id,
            run_id: r.run_id,
            prompt_id: r.prompt_id,
            trajectory_id: r.trajectory_id,
            policy_versions: vec![version; tokens.len()],
            logprobs,
            token_ids: tokens,
            finish_reason: FinishReason::Stop as i32,
            worker_id: "stand-in".into(),
            ..Default::default()
        };
        Box::pin(async move { resp })
    }
    fn wait_version(&self, v: u64) -> BoxFuture<()> {
        let mut rx = self.version.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|x| *x >= v).await;
        })
    }
}

const CONFIG: &str = r#"
name = "sched"
[model]
init_config = "unused.json"
[[stages]]
name = "rl"
kind = "rl"
steps = 4
prompts_per_step = 3
group_size = 4
max_staleness = STALENESS
max_new_tokens = 8
environments = [{ name = "arithmetic", difficulty = 0 }]
"#;

type Outcome = (
    Arc<StageStats>,
    Ledger,
    Vec<TrajectoryGroup>,
    tempfile::TempDir,
);

async fn run(staleness: u64) -> Outcome {
    run_config(&CONFIG.replace("STALENESS", &staleness.to_string())).await
}

async fn run_config(config: &str) -> Outcome {
    run_with(config, None, None).await.0
}

/// Runs the config's first stage with stand-ins; returns the steps it ran too.
async fn run_with(
    config: &str,
    unclosed_think: Option<u64>,
    goal: Option<Arc<dyn StageGoal>>,
) -> (Outcome, u64) {
    let cfg = RunConfig::from_toml_str(config, "test.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.sqlite").display());
    let ledger = Ledger::open(&url).await.unwrap();
    ledger
        .insert_run(NewRun {
            id: "run".into(),
            name: "sched".into(),
            config_toml: CONFIG.into(),
            status: RunStatus::Running,
        })
        .await
        .unwrap();
    let tokenizer = Arc::new(Tokenizer::byte_level());
    let learner = Arc::new(CountingLearner::new(3, true));
    let workers = Arc::new(StandInWorkers {
        tokenizer: tokenizer.clone(),
        version: learner.subscribe(),
        calls: AtomicU64::new(0),
        unclosed_think,
        right_below_sum_mod_5: config.contains("curriculum"),
    });
    let stats = Arc::new(StageStats::default());
    let ctx = Arc::new(StageContext {
        run_id: "run".into(),
        seed: 7,
        stage_index: 0,
        registry: Arc::new(builtin_registry()),
        tokenizer,
        ledger: ledger.clone(),
        rollouts: workers,
        learning: learner.clone(),
        stats: stats.clone(),
        faults: Default::default(),
        deterministic: false,
        transcripts: None,
        goal,
        first_version: None,
        restart: 0,
    });
    let steps = run_rl_stage(ctx, Arc::new(cfg.stages[0].clone()))
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    let seen = learner.kept.lock().unwrap().clone();
    ((stats, ledger, seen, dir), steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_reach_the_learner_and_the_ledger_agrees() {
    let (stats, ledger, seen, _dir) = run(1).await;
    assert_eq!(seen.len(), 12, "4 steps x 3 prompts");
    assert_eq!(stats.groups_submitted.load(Ordering::Relaxed), 12);
    for g in &seen {
        // Right answers get positive advantages, wrong ones negative.
        for t in &g.trajectories {
            assert_eq!(t.reward > 0.5, t.advantage > 0.0, "{t:?}");
            assert_eq!(t.logprobs.len(), t.completion_token_ids.len());
        }
    }
    let submitted: u64 = seen.iter().map(|g| g.trajectories.len() as u64).sum();
    assert_eq!(ledger.count_consumed("run").await.unwrap(), submitted);
    let rows = ledger
        .list_rollouts(&RolloutFilter {
            run_id: Some("run".into()),
            environment: None,
            min_reward: None,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| matches!(r.status, TrajectoryStatus::Failed { .. }))
        .collect();
    assert!(!failed.is_empty(), "some stand-in outputs were malformed");
    for f in &failed {
        let TrajectoryStatus::Failed { reason } = &f.status else {
            unreachable!()
        };
        assert!(reason.contains("malformed worker output"), "{reason}");
        assert!(f.consumed_at_step.is_none());
    }
    for r in rows.iter().filter(|r| r.consumed_at_step.is_some()) {
        assert!(r.reward.is_some() && r.min_policy_version.is_some());
    }
    assert_eq!(
        stats.trajectories_failed.load(Ordering::Relaxed) as usize,
        failed.len()
    );
    assert!(
        stats.max_lag.load(Ordering::Relaxed) <= 1,
        "staleness bound 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_never_lags() {
    let (stats, _ledger, seen, _dir) = run(0).await;
    assert_eq!(seen.len(), 12);
    assert_eq!(stats.max_lag.load(Ordering::Relaxed), 0);
}

/// A learner that takes `alive_for` groups, then is gone: submissions fail and its version never
/// moves again (it stays silent, as a learner on a dead machine would).
struct DyingLearner {
    inner: CountingLearner,
    alive_for: u64,
    taken: AtomicU64,
}

impl chorus_orchestrator::scheduler::Learning for DyingLearner {
    fn submit(&self, g: TrajectoryGroup) -> BoxFuture<Result<(), LearningError>> {
        if self.taken.fetch_add(1, Ordering::SeqCst) >= self.alive_for {
            return Box::pin(async move {
                Err(LearningError::Unreachable {
                    learner: "the dying stand-in".into(),
                    group_id: g.group_id,
                    message: "the learner is gone".into(),
                })
            });
        }
        self.inner.submit(g)
    }
    fn version(&self) -> u64 {
        self.inner.version()
    }
    fn wait_version(&self, version: u64) -> BoxFuture<Result<(), LearningError>> {
        if self.taken.load(Ordering::SeqCst) >= self.alive_for {
            return Box::pin(std::future::pending());
        }
        self.inner.wait_version(version)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_learner_stops_the_stage_instead_of_hanging_it() {
    let cfg = RunConfig::from_toml_str(
        &CONFIG
            .replace("STALENESS", "1")
            .replace("steps = 4", "steps = 100000"),
        "test.toml",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.sqlite").display());
    let ledger = Ledger::open(&url).await.unwrap();
    ledger
        .insert_run(NewRun {
            id: "run".into(),
            name: "dying".into(),
            config_toml: CONFIG.into(),
            status: RunStatus::Running,
        })
        .await
        .unwrap();
    let tokenizer = Arc::new(Tokenizer::byte_level());
    let learner = Arc::new(DyingLearner {
        inner: CountingLearner::new(3, false),
        alive_for: 6,
        taken: AtomicU64::new(0),
    });
    let workers = Arc::new(StandInWorkers {
        tokenizer: tokenizer.clone(),
        version: learner.inner.subscribe(),
        calls: AtomicU64::new(0),
        unclosed_think: None,
        right_below_sum_mod_5: false,
    });
    let ctx = Arc::new(StageContext {
        run_id: "run".into(),
        seed: 7,
        stage_index: 0,
        registry: Arc::new(builtin_registry()),
        tokenizer,
        ledger,
        rollouts: workers.clone(),
        learning: learner,
        stats: Arc::new(StageStats::default()),
        faults: Default::default(),
        deterministic: false,
        transcripts: None,
        goal: None,
        first_version: None,
        restart: 0,
    });
    // The guard only keeps a regression from hanging the test suite.
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        run_rl_stage(ctx, Arc::new(cfg.stages[0].clone())),
    )
    .await
    .expect("the stage hung after its learner was lost");
    let err = result.unwrap_err().to_string();
    assert!(err.contains("the learner is gone"), "{err}");
    // Only the steps the staleness bound allowed past the learner's last version were started.
    let calls = workers.calls.load(Ordering::Relaxed);
    assert!(
        calls < 500,
        "{calls} generations after the learner was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_carries_its_steps_learning_rate() {
    let config = CONFIG.replace("STALENESS", "1").replace(
        "max_new_tokens = 8",
        "max_new_tokens = 8\nlr = 1e-3\nwarmup_steps = 1\nlr_decay = \"cosine\"\nmin_lr = 0",
    );
    let stage = RunConfig::from_toml_str(&config, "test.toml")
        .unwrap()
        .stages[0]
        .clone();
    let (_stats, _ledger, seen, _dir) = run_config(&config).await;
    assert_eq!(seen.len(), 12);
    for g in &seen {
        // Group ids are `run:s<stage>:<step>:<slot>…`.
        let step: u64 = g.group_id.split(':').nth(2).unwrap().parse().unwrap();
        assert_eq!(g.learning_rate, stage.lr_at(step), "{}", g.group_id);
    }
    let rates: Vec<f64> = (0..4).map(|s| stage.lr_at(s)).collect();
    assert_eq!(rates[0], 1e-3);
    assert!(
        rates[1] == 1e-3 && rates[2] < rates[1] && rates[3] == 0.0,
        "{rates:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_think_block_gets_the_fixed_invalid_advantage() {
    let config = CONFIG.replace("STALENESS", "1").replace(
        "max_new_tokens = 8",
        "max_new_tokens = 8\ninvalid_advantage = -3",
    );
    let ((_, ledger, seen, _dir), _) = run_with(&config, Some(2), None).await;
    let mut invalid = 0;
    for g in &seen {
        for t in &g.trajectories {
            let index: u64 = t.request_id.rsplit(":r").next().unwrap().parse().unwrap();
            if index == 2 {
                // Its answer is right but never leaves the think block: penalised, whatever
                // the others did.
                assert_eq!(t.advantage, -3.0, "{t:?}");
                invalid += 1;
            } else {
                assert_eq!(t.reward > 0.5, t.advantage > 0.0, "{t:?}");
            }
        }
    }
    assert_eq!(invalid, seen.len(), "one invalid rollout per group");
    let rows = ledger
        .list_rollouts(&RolloutFilter {
            run_id: Some("run".into()),
            environment: None,
            min_reward: None,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut marked = 0;
    for row in &rows {
        let t = ledger
            .get_trajectory(&row.id)
            .await
            .unwrap()
            .unwrap()
            .trajectory;
        if t.reward_components.get(INVALID_COMPONENT) == Some(&1.0) {
            marked += 1;
            let reason = t.reason.unwrap_or_default();
            assert!(reason.contains("malformed think block"), "{reason}");
            assert!(
                t.completion_text.starts_with("<think>"),
                "{}",
                t.completion_text
            );
        }
    }
    assert!(marked >= invalid, "{marked} marked, {invalid} sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_domain_ratios_fill_every_step_exactly() {
    let config = CONFIG.replace("STALENESS", "0").replace(
        "environments = [{ name = \"arithmetic\", difficulty = 0 }]",
        "domain_ratios = \"fixed\"\nenvironments = [{ name = \"arithmetic\", weight = 2.0 }, \
         { name = \"countdown\", weight = 1.0 }]",
    );
    let ((_, _, seen, _dir), _) = run_with(&config, None, None).await;
    assert_eq!(seen.len(), 12);
    // The learner takes a step's groups in order (synchronous stage): 2 + 1 in every step.
    let mut by_step = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for g in &seen {
        // `run:s<stage>:<step>:<slot>:a<attempt>`
        let step = g.group_id.split(':').nth(2).unwrap().to_string();
        let e = by_step.entry(step).or_default();
        if g.environment == "arithmetic" {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    assert_eq!(by_step.len(), 4, "{by_step:?}");
    assert!(by_step.values().all(|&c| c == (2, 1)), "{by_step:?}");
}

/// Reached once the policy version is at least `at`; records the versions it was asked about.
struct VersionGoal {
    at: u64,
    asked: std::sync::Mutex<Vec<u64>>,
}

impl StageGoal for VersionGoal {
    fn every(&self) -> u64 {
        2
    }
    fn reached(
        &self,
        _ctx: Arc<StageContext>,
        version: u64,
    ) -> BoxFuture<Result<bool, SchedulerError>> {
        self.asked.lock().unwrap().push(version);
        let reached = version >= self.at;
        Box::pin(async move { Ok(reached) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_ends_at_its_goal() {
    let config = CONFIG
        .replace("STALENESS", "1")
        .replace("steps = 4", "steps = 10");
    let goal = Arc::new(VersionGoal {
        at: 5,
        asked: Default::default(),
    });
    let ((_, _, seen, _dir), steps) = run_with(&config, None, Some(goal.clone())).await;
    // Checked before steps 2, 4 and 6, on the policy after every earlier step.
    assert_eq!(*goal.asked.lock().unwrap(), [2, 4, 6]);
    assert_eq!(steps, 6);
    assert_eq!(seen.len(), 6 * 3, "no group of a step after the goal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_rate_curriculum_drops_solved_prompts_and_goes_from_easy_to_hard() {
    let config = CONFIG
        .replace("STALENESS", "1")
        .replace("steps = 4", "steps = 8")
        .replace(
            "max_new_tokens = 8",
            "max_new_tokens = 8\ndrop_zero_variance = false\ncurriculum = \"pass_rate\"\n\
             curriculum_pool = 60\ncurriculum_samples = 4",
        );
    let ((_, _, seen, _dir), _) = run_with(&config, None, None).await;
    assert_eq!(seen.len(), 24);
    let tokenizer = Tokenizer::byte_level();
    // Solved samples out of 4 by the stand-in's rule, per trained group, by step.
    let mut by_step = std::collections::BTreeMap::<u64, Vec<i64>>::new();
    for g in &seen {
        let (a, b) = operands(&tokenizer, &g.trajectories[0].prompt_token_ids);
        let solved = (a + b).rem_euclid(5).min(4);
        assert!(
            solved < 4,
            "an always-solved prompt was trained on: {a}+{b}"
        );
        let step: u64 = g.group_id.split(':').nth(2).unwrap().parse().unwrap();
        by_step.entry(step).or_default().push(solved);
    }
    let mean = |steps: std::ops::Range<u64>| {
        let v: Vec<i64> = steps.flat_map(|s| by_step[&s].clone()).collect();
        v.iter().sum::<i64>() as f64 / v.len() as f64
    };
    let (early, late) = (mean(0..3), mean(5..8));
    assert!(early > late, "easy first: early {early}, late {late}");
}
