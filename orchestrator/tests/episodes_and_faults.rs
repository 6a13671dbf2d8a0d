//! Multi-turn episodes through the scheduler (observations between the policy's turns, masked
//! out of the loss) and environment faults (panics, errors, hangs, malformed scores) failing
//! only their own trajectories while the run goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chorus_environments::chat::Message;
use chorus_environments::{
    Category, EnvError, EnvInfo, Environment, Episode, Registry, Score, Split, StepOutcome, Task,
    Turns, builtin_registry,
};
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::confidence;
use chorus_orchestrator::config::{HeldoutSampling, RunConfig};
use chorus_orchestrator::faults::{EnvFaults, FaultPolicy};
use chorus_orchestrator::ledger::{Ledger, NewRun, RolloutFilter, RunStatus, TrajectoryStatus};
use chorus_orchestrator::scheduler::{
    BoxFuture, Rollouts, StageContext, StageStats, evaluate, run_rl_stage, run_sft_stage,
};
use chorus_orchestrator::standin::CountingLearner;
use chorus_proto::v1::{FinishReason, GenerateRequest, GenerateResponse, TrajectoryGroup};
use tokio::sync::watch;

/// Three turns: the policy must say `yes` each time; the environment answers `next` between
/// turns. The reward is the fraction of `yes` turns.
struct SayYes;

fn task(env: &str, seed: u64) -> Task {
    Task {
        id: format!("{env}-{seed}"),
        env: env.into(),
        split: Split::Train,
        difficulty: 0,
        seed,
        prompt: vec![Message::user(format!("say yes three times ({seed})"))],
        verification: serde_json::Value::Null,
    }
}

impl Environment for SayYes {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: "say_yes".into(),
            category: Category::Game,
            turns: Turns::Multi,
            max_turns: 5,
            default_weight: 1.0,
            max_difficulty: 0,
            description: "say yes three times".into(),
        }
    }
    fn sample(&self, seed: u64, _: Split, _: u32) -> Result<Task, EnvError> {
        Ok(task("say_yes", seed))
    }
    fn score(&self, _: &Task, completion: &str) -> Result<Score, EnvError> {
        Ok(Score::binary(completion.starts_with("yes"), "final answer"))
    }
    fn reference(&self, _: &Task) -> Result<String, EnvError> {
        Ok("yes".into())
    }
    fn start(&self, task: &Task) -> Result<Episode, EnvError> {
        Ok(Episode::new(task, serde_json::json!({"yes": 0})))
    }
    fn step(&self, _: &Task, episode: &mut Episode, action: &str) -> Result<StepOutcome, EnvError> {
        episode.turn += 1;
        episode.messages.push(Message::assistant(action));
        if action.starts_with("yes") {
            let yes = episode.state["yes"].as_u64().unwrap_or(0) + 1;
            episode.state["yes"] = yes.into();
        }
        if episode.turn == 3 {
            episode.done = true;
            let yes = episode.state["yes"].as_u64().unwrap_or(0);
            let score = Score {
                reward: yes as f64 / 3.0,
                ..Score::zero(format!("{yes} of 3 turns said yes"))
            };
            return Ok(StepOutcome {
                observation: None,
                done: true,
                score: Some(score),
            });
        }
        let observation = Message::user("next");
        episode.messages.push(observation.clone());
        Ok(StepOutcome {
            observation: Some(observation),
            done: false,
            score: None,
        })
    }
}

/// Misbehaves in turn, by the order of its scoring calls (not by task, because which of the
/// concurrent slots scores first is a race, and the error budget counts the first faults):
/// panics, hangs past the deadline, returns a NaN reward, behaves. The deadline (3 s) is far
/// above what a panic costs under load with `RUST_BACKTRACE=1`, and the hang far above the
/// deadline, so which fault each call becomes does not depend on timing.
#[derive(Default)]
struct Faulty {
    scored: std::sync::atomic::AtomicU64,
}

impl Environment for Faulty {
    fn info(&self) -> EnvInfo {
        EnvInfo {
            name: "faulty".into(),
            turns: Turns::Single,
            max_turns: 1,
            ..SayYes.info()
        }
    }
    fn sample(&self, seed: u64, _: Split, _: u32) -> Result<Task, EnvError> {
        if seed.is_multiple_of(7) {
            return Err(EnvError::UnknownSplit("sampling refused".into()));
        }
        Ok(task("faulty", seed))
    }
    fn score(&self, _: &Task, _: &str) -> Result<Score, EnvError> {
        match self
            .scored
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            % 4
        {
            0 => panic!("scorer bug"),
            1 => {
                std::thread::sleep(Duration::from_secs(6));
                Ok(Score::full("late"))
            }
            2 => Ok(Score {
                reward: f64::NAN,
                ..Score::zero("nan")
            }),
            _ => Ok(Score::full("fine")),
        }
    }
    fn reference(&self, _: &Task) -> Result<String, EnvError> {
        Ok("x".into())
    }
}

/// Answers `yes` for even group members and `no` for odd ones, recording every prompt it sees.
/// A held-out episode answers as member 0 when greedy, and as its sample number when sampled.
struct YesNoWorkers {
    tokenizer: Arc<Tokenizer>,
    version: watch::Receiver<u64>,
    prompts: std::sync::Mutex<Vec<String>>,
    calls: AtomicU64,
    /// (request id, temperature, seed) of every held-out request.
    heldout: std::sync::Mutex<Vec<(String, f32, Option<u64>)>>,
}

impl Rollouts for YesNoWorkers {
    fn generate(&self, r: GenerateRequest) -> BoxFuture<GenerateResponse> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let prompt = self.tokenizer.decode(&r.prompt_token_ids, false).unwrap();
        self.prompts.lock().unwrap().push(prompt);
        let sampling = r.sampling.unwrap_or_default();
        let member: u64 = if r.trajectory_id.starts_with("eval:") {
            self.heldout.lock().unwrap().push((
                r.request_id.clone(),
                sampling.temperature,
                sampling.seed,
            ));
            match sampling.temperature {
                0.0 => 0,
                _ => r.trajectory_id.rsplit(':').next().unwrap().parse().unwrap(),
            }
        } else {
            r.trajectory_id
                .rsplit(":t")
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let text = if member.is_multiple_of(2) {
            "yes<|end|>"
        } else {
            "no<|end|>"
        };
        let tokens = self.tokenizer.encode(text).unwrap();
        let version = *self.version.borrow();
        let resp = GenerateResponse {
            request_id: r.request_id,
            run_id: r.run_id,
            prompt_id: r.prompt_id,
            trajectory_id: r.trajectory_id,
            policy_versions: vec![version; tokens.len()],
            logprobs: vec![-0.25; tokens.len()],
            token_ids: tokens,
            finish_reason: FinishReason::Stop as i32,
            worker_id: "yes-no".into(),
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

struct Setup {
    ctx: Arc<StageContext>,
    learner: Arc<CountingLearner>,
    workers: Arc<YesNoWorkers>,
    ledger: Ledger,
    cfg: RunConfig,
    _dir: tempfile::TempDir,
}

async fn setup(config: &str, prompts_per_step: u64) -> Setup {
    let cfg = RunConfig::from_toml_str(config, "test.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.sqlite").display());
    let ledger = Ledger::open(&url).await.unwrap();
    ledger
        .insert_run(NewRun {
            id: "run".into(),
            name: "t".into(),
            config_toml: config.into(),
            status: RunStatus::Running,
        })
        .await
        .unwrap();
    let mut registry: Registry = builtin_registry();
    registry.register(SayYes).unwrap();
    registry.register(Faulty::default()).unwrap();
    let tokenizer = Arc::new(Tokenizer::byte_level());
    let learner = Arc::new(CountingLearner::new(prompts_per_step, true));
    let workers = Arc::new(YesNoWorkers {
        tokenizer: tokenizer.clone(),
        version: learner.subscribe(),
        prompts: Default::default(),
        calls: AtomicU64::new(0),
        heldout: Default::default(),
    });
    let ctx = Arc::new(StageContext {
        run_id: "run".into(),
        seed: 3,
        stage_index: 0,
        registry: Arc::new(registry),
        tokenizer,
        ledger: ledger.clone(),
        rollouts: workers.clone(),
        learning: learner.clone(),
        stats: Arc::new(StageStats::default()),
        faults: Arc::new(EnvFaults::new(cfg.environment_faults)),
        deterministic: cfg.deterministic,
        transcripts: None,
        goal: None,
        first_version: None,
        restart: 0,
    });
    Setup {
        ctx,
        learner,
        workers,
        ledger,
        cfg,
        _dir: dir,
    }
}

const MULTI_TURN: &str = r#"
name = "t"
[model]
init_config = "unused.json"
[[stages]]
name = "warmup"
kind = "sft"
steps = 1
prompts_per_step = 2
environments = [{ name = "say_yes" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 8
environments = [{ name = "say_yes" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_episodes_alternate_actions_and_observations() {
    let s = setup(MULTI_TURN, 2).await;
    let tok = Tokenizer::byte_level();
    run_sft_stage(s.ctx.clone(), Arc::new(s.cfg.stages[0].clone()))
        .await
        .unwrap();
    let sft: Vec<TrajectoryGroup> = s.learner.kept.lock().unwrap().drain(..).collect();
    assert_eq!(sft.len(), 2);
    for g in &sft {
        let t = &g.trajectories[0];
        assert_eq!(t.completion_mask.len(), t.completion_token_ids.len());
        let policy: Vec<u32> = t
            .completion_token_ids
            .iter()
            .zip(&t.completion_mask)
            .filter(|(_, m)| **m)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(
            tok.decode(&policy, false).unwrap(),
            "yes<|end|>yes<|end|>yes<|end|>",
            "the reference policy's three turns, and only they, are learned"
        );
        let all = tok.decode(&t.completion_token_ids, false).unwrap();
        assert_eq!(all.matches("next").count(), 2, "{all}");
    }

    run_rl_stage(s.ctx.clone(), Arc::new(s.cfg.stages[1].clone()))
        .await
        .unwrap();
    let groups = s.learner.kept.lock().unwrap().clone();
    assert_eq!(groups.len(), 4, "2 steps x 2 prompts");
    for g in &groups {
        assert_eq!(g.trajectories.len(), 2);
        for t in &g.trajectories {
            let n = t.completion_token_ids.len();
            assert_eq!(t.completion_mask.len(), n);
            assert_eq!(t.logprobs.len(), n);
            assert_eq!(t.policy_versions.len(), n);
            let text = tok.decode(&t.completion_token_ids, false).unwrap();
            let member_even = t.trajectory_id.ends_with(":t0");
            let expected_turn = if member_even { "yes" } else { "no" };
            assert_eq!(text.matches(expected_turn).count(), 3, "{text}");
            assert_eq!(text.matches("next").count(), 2, "{text}");
            assert_eq!(t.reward, if member_even { 1.0 } else { 0.0 });
            // Observation tokens are masked out and carry no logprob.
            for (m, lp) in t.completion_mask.iter().zip(&t.logprobs) {
                assert_eq!(*lp, if *m { -0.25 } else { 0.0 });
            }
        }
        assert!(g.trajectories[0].advantage > g.trajectories[1].advantage);
    }
    // Later turns were generated from the whole conversation so far.
    let prompts = s.workers.prompts.lock().unwrap().clone();
    assert!(
        prompts
            .iter()
            .any(|p| p.matches("next").count() == 2 && p.ends_with("<|assistant|>")),
        "third turns see both observations"
    );
    assert_eq!(s.workers.calls.load(Ordering::Relaxed), 4 * 2 * 3);
    s.ledger.flush().await.unwrap();
    let rows = s
        .ledger
        .list_rollouts(&RolloutFilter {
            run_id: Some("run".into()),
            environment: Some("say_yes".into()),
            min_reward: Some(1.0),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let full = s.ledger.get_trajectory(&rows[0].id).await.unwrap().unwrap();
    assert_eq!(
        full.trajectory.reason.as_deref(),
        Some("3 of 3 turns said yes")
    );
    assert!(full.trajectory.completion_text.contains("next"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_out_episodes_cut_by_the_prompt_limit_are_counted() {
    let s = setup(MULTI_TURN, 2).await;
    let envs = [("say_yes".to_string(), 0)];
    let greedy = HeldoutSampling::default();
    let roomy = evaluate(&s.ctx, &envs, 4, greedy, 8, 4096, 0)
        .await
        .unwrap();
    assert_eq!(roomy["say_yes"].solved, 4, "{roomy:?}");
    assert_eq!(roomy["say_yes"].context_limited, 0);

    // Room for the prompt and not for the second turn's conversation: every episode ends after
    // its first turn, unsolved, and is counted as cut by the limit.
    let held_out = SayYes.sample(1_000_000, Split::Heldout, 0).unwrap();
    let prompt_tokens = Tokenizer::byte_level()
        .encode(&chorus_environments::chat::render_prompt(&held_out.prompt))
        .unwrap()
        .len();
    let tight = evaluate(&s.ctx, &envs, 4, greedy, 8, prompt_tokens, 0)
        .await
        .unwrap();
    assert_eq!(tight["say_yes"].solved, 0, "{tight:?}");
    assert_eq!(tight["say_yes"].context_limited, 4, "{tight:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_evaluation_plays_each_task_several_times_at_its_temperature() {
    let s = setup(MULTI_TURN, 2).await;
    let envs = [("say_yes".to_string(), 0)];
    let greedy = evaluate(&s.ctx, &envs, 4, HeldoutSampling::default(), 8, 4096, 0)
        .await
        .unwrap();
    let g = &greedy["say_yes"];
    assert_eq!((g.solved, g.heldout_n, g.samples_per_task), (4, 4, 1));
    assert_eq!(g.effective_n, None);
    {
        let heldout = s.workers.heldout.lock().unwrap();
        // Four tasks, three turns each, all greedy with seed 0 on their first turn.
        assert_eq!(heldout.len(), 4 * 3);
        assert!(heldout.iter().all(|(_, t, _)| *t == 0.0), "{heldout:?}");
    }
    s.workers.heldout.lock().unwrap().clear();

    // Even samples say yes, odd ones no: every task is solved by 2 of its 4 samples.
    let sampling = HeldoutSampling {
        samples: 4,
        temperature: 0.7,
    };
    let sampled = evaluate(&s.ctx, &envs, 4, sampling, 8, 4096, 1)
        .await
        .unwrap();
    let a = &sampled["say_yes"];
    assert_eq!(
        (a.solved, a.heldout_n, a.samples_per_task),
        (8, 4, 4),
        "{a:?}"
    );
    assert_eq!(a.accuracy, 0.5);
    // Every task at the same fraction: the samples vary as independent trials would, and the
    // interval counts all 16 episodes.
    assert_eq!(a.effective_n, Some(16.0));
    assert_eq!(a.counts(), (8.0, 16.0));
    assert_eq!(a.interval, confidence::wilson(8, 16));
    // Episodes of 3 turns, with 1/3 of the reward per yes.
    assert!((a.mean_reward - 0.5).abs() < 1e-9, "{a:?}");
    let heldout = s.workers.heldout.lock().unwrap();
    assert_eq!(heldout.len(), 4 * 4 * 3);
    assert!(heldout.iter().all(|(_, t, _)| *t == 0.7), "{heldout:?}");
    // The first task's four episodes begin with seeds 0 to 3.
    let first_turns: std::collections::BTreeSet<_> = heldout
        .iter()
        .filter(|(id, _, _)| id.starts_with("eval:say_yes:1:0:") && !id.contains(":turn"))
        .map(|(_, _, seed)| *seed)
        .collect();
    assert_eq!(first_turns, (0..4).map(Some).collect(), "{heldout:?}");
}

const FAULTS: &str = r#"
name = "t"
[model]
init_config = "unused.json"
[environment_faults]
deadline_seconds = 3.0
error_budget = 6
probe_seconds = 0
[[stages]]
name = "rl"
kind = "rl"
steps = 6
prompts_per_step = 3
group_size = 2
max_new_tokens = 8
drop_zero_variance = false
environments = [{ name = "say_yes" }, { name = "faulty", weight = 3.0 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_environment_fails_alone_and_is_paused_when_its_budget_is_spent() {
    let s = setup(FAULTS, 3).await;
    run_rl_stage(s.ctx.clone(), Arc::new(s.cfg.stages[0].clone()))
        .await
        .unwrap();
    // Every step completed: the learner saw all 6 x 3 groups (some possibly empty).
    let groups = s.learner.kept.lock().unwrap().clone();
    assert_eq!(groups.len(), 18);
    let report = s.ctx.faults.report();
    let faulty = &report["faulty"];
    assert!(faulty.paused, "{report:?}");
    assert!(faulty.faults >= 6);
    assert!(!report.contains_key("say_yes"), "{report:?}");
    // The healthy environment kept being trained on after the pause.
    let last_step: Vec<_> = groups[groups.len() - 3..].to_vec();
    assert!(last_step.iter().all(|g| g.environment == "say_yes"));

    s.ledger.flush().await.unwrap();
    let rows = s
        .ledger
        .list_rollouts(&RolloutFilter {
            run_id: Some("run".into()),
            environment: Some("faulty".into()),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let reasons: Vec<String> = rows
        .iter()
        .filter_map(|r| match &r.status {
            TrajectoryStatus::Failed { reason } => Some(reason.clone()),
            TrajectoryStatus::Ok => None,
        })
        .collect();
    assert!(!reasons.is_empty());
    for r in &reasons {
        assert!(
            r.contains("panicked")
                || r.contains("deadline")
                || r.contains("not finite")
                || r.contains("paused"),
            "{r}"
        );
    }
    assert!(
        reasons.iter().any(|r| r.contains("scorer bug")),
        "{reasons:?}"
    );
}

#[test]
fn the_fault_policy_defaults_and_parses() {
    let cfg = RunConfig::from_toml_str(MULTI_TURN, "t.toml").unwrap();
    assert_eq!(cfg.environment_faults, FaultPolicy::default());
    let cfg = RunConfig::from_toml_str(FAULTS, "t.toml").unwrap();
    assert_eq!(cfg.environment_faults.error_budget, 6);
    assert_eq!(cfg.environment_faults.deadline, Duration::from_secs(3));
    assert_eq!(cfg.environment_faults.probe_after, None);
    for (bad, wanted) in [("-1", "allowed: 0"), ("1e9", "86400")] {
        let text = FAULTS.replace("probe_seconds = 0", &format!("probe_seconds = {bad}"));
        let err = RunConfig::from_toml_str(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("environment_faults.probe_seconds") && err.contains(wanted),
            "{err}"
        );
    }
}
