//! The ledger's test suite, run against SQLite (a temp file) and, when
//! `CHORUS_TEST_POSTGRES_URL` is set, against PostgreSQL (a fresh schema per test). Without
//! it the PostgreSQL cases print `SKIPPED`, and fail under CI (see `support/postgres.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_orchestrator::ledger::{
    Evaluation, LaunchEval, LearnerStep, Ledger, LedgerError, LedgerOptions, NewPrompt, NewRun,
    NewStage, NewTrajectory, PolicyVersion, PromptState, RolloutFilter, RunStatus, Split, StageEnd,
    StageStatus, Timings, TrajectoryCounts, TrajectoryStatus, WeightTransfer,
};
use chorus_proto::v1::FinishReason;

#[path = "support/postgres.rs"]
mod support_postgres;
use support_postgres::postgres_url_or_skip;
#[path = "support/schema.rs"]
mod support_schema;
use support_schema::{drop_schema, fresh_schema};

/// A ledger under test, with what is needed to reopen it.
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg_cleanup: Option<(String, String)>,
}

impl TestDb {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/nested/dir/ledger.db", dir.path().display());
        Self {
            url,
            _dir: Some(dir),
            pg_cleanup: None,
        }
    }

    /// A fresh schema in the test database, or `None` when `test` is skipped.
    async fn postgres(test: &str) -> Option<Self> {
        let base = postgres_url_or_skip(test)?;
        let (url, schema) = fresh_schema(&base).await;
        Some(Self {
            url,
            _dir: None,
            pg_cleanup: Some((base, schema)),
        })
    }

    async fn open(&self) -> Ledger {
        Ledger::open(&self.url).await.unwrap()
    }

    async fn open_with(&self, options: LedgerOptions) -> Ledger {
        Ledger::open_with(&self.url, options).await.unwrap()
    }

    async fn cleanup(self) {
        if let Some((base, schema)) = self.pg_cleanup {
            drop_schema(&base, &schema).await;
        }
    }
}

/// Declares each case once per backend.
macro_rules! on_both_backends {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let db = super::TestDb::sqlite();
                    super::cases::$case(&db).await;
                    db.cleanup().await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let test = concat!("postgres::", stringify!($case));
                    let Some(db) = super::TestDb::postgres(test).await else {
                        return;
                    };
                    super::cases::$case(&db).await;
                    db.cleanup().await;
                }
            )+
        }
    };
}

on_both_backends!(
    runs_are_inserted_once_listed_and_finished,
    prompts_move_forward_only,
    trajectories_round_trip_and_are_not_duplicated,
    rollouts_are_filtered_and_newest_first,
    consumption_is_counted_per_run,
    learner_steps_round_trip,
    policy_versions_and_events_round_trip,
    a_refused_write_is_reported_and_spares_its_batch,
    batches_commit_by_size_and_by_interval,
    close_makes_everything_durable,
    concurrent_writers_lose_nothing,
    launches_are_found_by_request_and_by_status,
    stages_record_their_span_and_own_their_steps,
    a_rewind_undoes_the_steps_after_a_version,
    evaluations_are_kept_once_per_version_and_versions_know_their_stage,
    the_queries_docs_ledger_md_shows_run,
    the_audit_finds_each_kind_of_breach,
    the_views_answer_the_common_questions,
    weight_transfers_are_summed_per_version_and_rewound,
);

/// The SQL statements of docs/ledger.md's "Example queries", each with the one backend it is
/// for (`SQLite` or `PostgreSQL`) where the document marks one.
fn documented_queries(doc: &str) -> Vec<(Option<&'static str>, String)> {
    let section = doc
        .split("## Example queries")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/ledger.md has example queries");
    let mut out = vec![];
    let (mut in_block, mut block_on, mut on, mut sql) = (false, None, None, String::new());
    let mut prose = "";
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            block_on = prose.contains("PostgreSQL only").then_some("PostgreSQL");
            on = block_on;
            continue;
        }
        if !in_block {
            if !line.trim().is_empty() {
                prose = line;
            }
            continue;
        }
        match line.trim() {
            "-- SQLite" => on = Some("SQLite"),
            "-- PostgreSQL" => on = Some("PostgreSQL"),
            l if l.starts_with("--") => {}
            l => {
                sql.push_str(l);
                sql.push('\n');
                if l.ends_with(';') {
                    out.push((on.or(block_on), std::mem::take(&mut sql)));
                }
            }
        }
    }
    out
}

fn run(id: &str) -> NewRun {
    NewRun {
        id: id.into(),
        name: format!("{id}-name"),
        config_toml: format!("[run]\nid = \"{id}\"\nsteps = 10\n"),
        status: RunStatus::Running,
    }
}

fn prompt(id: &str, run_id: &str, env: &str) -> NewPrompt {
    NewPrompt {
        id: id.into(),
        run_id: run_id.into(),
        group_id: format!("g-{id}"),
        environment: env.into(),
        split: Split::Train,
        task_json: format!(r#"{{"question":"{id}?","answer":42}}"#),
        step_dispatched: 2,
        stage_index: Some(0),
    }
}

/// Learner step `step` of `run_id` publishing version `step`, trained on `trajectories` (6
/// tokens), with only its loss measured.
fn learner_step(run_id: &str, step: u64, loss: f64, trajectories: u64) -> LearnerStep {
    LearnerStep {
        run_id: run_id.into(),
        step,
        policy_version: step,
        loss: Some(loss),
        kl: None,
        entropy: None,
        grad_norm: None,
        learning_rate: None,
        clip_fraction: None,
        num_tokens: 6,
        num_trajectories: trajectories,
        mean_abs_logprob_diff: None,
        skip_reason: None,
    }
}

fn traj(id: &str, run_id: &str, prompt_id: &str, env: &str, reward: f64) -> NewTrajectory {
    NewTrajectory {
        id: id.into(),
        run_id: run_id.into(),
        prompt_id: prompt_id.into(),
        group_id: format!("g-{prompt_id}"),
        environment: env.into(),
        worker_id: "worker-0".into(),
        prompt_token_ids: vec![1, 2, 3, 151_643],
        completion_token_ids: vec![10, 11, 12, 13, 14],
        completion_text: format!("answer of {id}"),
        logprobs: vec![-0.1, -0.25, -3.5, -0.0, -12.125],
        policy_versions: vec![4, 4, 5, 5, 5],
        finish_reason: FinishReason::Stop,
        reward: Some(reward),
        reward_components: BTreeMap::from([
            ("correct".to_owned(), reward),
            ("format".to_owned(), 0.125),
        ]),
        reason: Some("matched the reference".into()),
        status: TrajectoryStatus::Ok,
        timings: Timings {
            queue_ms: 3,
            generate_ms: 1500,
            score_ms: 20,
        },
        stage_index: None,
    }
}

/// Polls `check` until it holds or 10 s pass.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

mod cases {
    use super::*;

    pub async fn launches_are_found_by_request_and_by_status(db: &TestDb) {
        let ledger = db.open().await;
        let pending = |id: &str| NewRun {
            status: RunStatus::Pending,
            ..run(id)
        };
        let own = LaunchEval {
            tasks: Some(8),
            every: Some(2),
        };
        let daemons = LaunchEval::default();
        ledger
            .record_launch(pending("l-1"), "orch-a", "req-1", own)
            .await
            .unwrap();
        ledger
            .record_launch(pending("l-2"), "orch-a", "req-2", daemons)
            .await
            .unwrap();
        ledger
            .record_launch(pending("l-3"), "orch-b", "req-1", daemons)
            .await
            .unwrap();
        // A repeated launch record changes nothing.
        ledger
            .record_launch(pending("l-9"), "orch-a", "req-1", daemons)
            .await
            .unwrap();
        ledger
            .set_run_status("l-2", RunStatus::Running)
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        let found = ledger
            .launched_run("orch-a", "req-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.id.as_str(), found.status),
            ("l-1", RunStatus::Pending)
        );
        assert_eq!(
            ledger
                .launched_run("orch-b", "req-1")
                .await
                .unwrap()
                .unwrap()
                .id,
            "l-3",
            "request ids are per orchestrator"
        );
        assert!(
            ledger
                .launched_run("orch-a", "req-3")
                .await
                .unwrap()
                .is_none()
        );
        let ids = |v: Vec<(String, LaunchEval, chorus_orchestrator::ledger::RunRecord)>| {
            v.into_iter()
                .map(|(r, eval, run)| (r, eval, run.id))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(ledger
                .launched_runs("orch-a", RunStatus::Pending)
                .await
                .unwrap()),
            [("req-1".to_string(), own, "l-1".to_string())],
            "a launch keeps its own evaluation settings"
        );
        assert_eq!(
            ids(ledger
                .launched_runs("orch-a", RunStatus::Running)
                .await
                .unwrap()),
            [("req-2".to_string(), daemons, "l-2".to_string())]
        );
        assert!(
            ledger.get_run("l-9").await.unwrap().is_none(),
            "a repeated request writes no run"
        );
        assert_eq!(
            ledger
                .launched_runs("orch-c", RunStatus::Pending)
                .await
                .unwrap(),
            []
        );
    }

    pub async fn runs_are_inserted_once_listed_and_finished(db: &TestDb) {
        let ledger = db.open().await;
        assert_eq!(ledger.list_runs(10).await.unwrap(), []);
        ledger.insert_run(run("run-a")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        ledger.insert_run(run("run-b")).await.unwrap();
        ledger.flush().await.unwrap();
        // A second run under a taken id is refused loudly, and the first keeps its row.
        let mut again = run("run-a");
        again.name = "renamed".into();
        ledger.insert_run(again).await.unwrap();
        match ledger.flush().await {
            Err(LedgerError::WriteFailed { failed: 1, first }) => {
                assert!(first.contains("insert_run(run-a)"), "{first}")
            }
            other => panic!("a second run-a must be refused, got {other:?}"),
        }

        let a = ledger.get_run("run-a").await.unwrap().unwrap();
        assert_eq!(
            a.name, "run-a-name",
            "the second insert must change nothing"
        );
        assert_eq!(a.config_toml, run("run-a").config_toml);
        assert_eq!(a.status, RunStatus::Running);
        assert_eq!(a.finished_at_ms, None);
        assert!(ledger.get_run("run-zzz").await.unwrap().is_none());

        let ids = |runs: Vec<chorus_orchestrator::ledger::RunRecord>| {
            runs.into_iter().map(|r| r.id).collect::<Vec<_>>()
        };
        assert_eq!(ids(ledger.list_runs(10).await.unwrap()), ["run-b", "run-a"]);
        assert_eq!(ids(ledger.list_runs(1).await.unwrap()), ["run-b"]);

        ledger
            .set_run_status("run-a", RunStatus::Succeeded)
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        let done = ledger.get_run("run-a").await.unwrap().unwrap();
        assert_eq!(done.status, RunStatus::Succeeded);
        let finished = done
            .finished_at_ms
            .expect("terminal status sets finished_at_ms");
        assert!(finished >= done.created_at_ms);

        tokio::time::sleep(Duration::from_millis(5)).await;
        ledger
            .set_run_status("run-a", RunStatus::Failed)
            .await
            .unwrap();
        ledger
            .set_run_status("run-b", RunStatus::Pending)
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        let a = ledger.get_run("run-a").await.unwrap().unwrap();
        assert_eq!(a.status, RunStatus::Failed);
        assert_eq!(a.finished_at_ms, Some(finished), "first finish time kept");
        let b = ledger.get_run("run-b").await.unwrap().unwrap();
        assert_eq!((b.status, b.finished_at_ms), (RunStatus::Pending, None));
        ledger.close().await.unwrap();
    }

    pub async fn prompts_move_forward_only(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        ledger
            .record_prompts_dispatched(
                ["p1", "p2", "p3", "p4"]
                    .iter()
                    .map(|id| prompt(id, "r", "math"))
                    .collect(),
            )
            .await
            .unwrap();
        ledger.mark_generated(["p1", "p2", "p4"]).await.unwrap();
        ledger.mark_scored(["p1"]).await.unwrap();
        ledger.mark_consumed(["p1"], 3).await.unwrap();
        ledger
            .mark_dropped(["p2", "p3"], "zero-variance group")
            .await
            .unwrap();
        // late or repeated changes are no-ops
        ledger.mark_dropped(["p1"], "too stale").await.unwrap();
        ledger.mark_generated(["p1", "p3"]).await.unwrap();
        ledger.mark_consumed(["p2"], 4).await.unwrap();
        ledger.mark_generated(["p4"]).await.unwrap();
        ledger.mark_generated(Vec::<String>::new()).await.unwrap();
        let mut redispatched = prompt("p1", "r", "code");
        redispatched.step_dispatched = 9;
        ledger
            .record_prompts_dispatched(vec![redispatched])
            .await
            .unwrap();
        ledger.flush().await.unwrap();

        let p1 = ledger.get_prompt("p1").await.unwrap().unwrap();
        assert_eq!(p1.state, PromptState::Consumed);
        assert_eq!(p1.environment, "math");
        assert_eq!(p1.step_dispatched, 2);
        assert_eq!(p1.consumed_at_step, Some(3));
        assert_eq!(p1.drop_reason, None);
        assert_eq!(p1.split, Split::Train);
        assert_eq!(p1.group_id, "g-p1");
        assert_eq!(p1.task_json, prompt("p1", "r", "math").task_json);
        for t in [p1.generated_at_ms, p1.scored_at_ms, p1.consumed_at_ms] {
            assert!(t.unwrap() >= p1.dispatched_at_ms);
        }
        assert_eq!(p1.dropped_at_ms, None);

        let p2 = ledger.get_prompt("p2").await.unwrap().unwrap();
        assert_eq!(p2.state, PromptState::Dropped);
        assert_eq!(p2.drop_reason.as_deref(), Some("zero-variance group"));
        assert!(p2.dropped_at_ms.is_some());
        assert_eq!(p2.consumed_at_step, None);

        let p3 = ledger.get_prompt("p3").await.unwrap().unwrap();
        assert_eq!(p3.state, PromptState::Dropped);
        assert_eq!(p3.generated_at_ms, None);

        let p4 = ledger.get_prompt("p4").await.unwrap().unwrap();
        assert_eq!(p4.state, PromptState::Generated);
        assert!(ledger.get_prompt("p5").await.unwrap().is_none());

        assert_eq!(
            ledger.prompt_state_counts("r").await.unwrap(),
            [
                (PromptState::Dispatched, 0),
                (PromptState::Generated, 1),
                (PromptState::Scored, 0),
                (PromptState::Consumed, 1),
                (PromptState::Dropped, 2),
            ]
        );
        ledger.close().await.unwrap();
    }

    pub async fn trajectories_round_trip_and_are_not_duplicated(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        let ok = traj("t1", "r", "p1", "math", 0.75);
        let mut failed = traj("t2", "r", "p1", "math", 0.0);
        failed.reward = None;
        failed.reward_components.clear();
        failed.reason = None;
        failed.status = TrajectoryStatus::Failed {
            reason: "worker OOM".into(),
        };
        failed.finish_reason = FinishReason::Error;
        failed.completion_token_ids.clear();
        failed.logprobs.clear();
        failed.policy_versions.clear();
        ledger
            .insert_trajectories(vec![ok.clone(), failed.clone()])
            .await
            .unwrap();
        let mut dup = traj("t1", "r", "p1", "math", -1.0);
        dup.completion_text = "a retry".into();
        ledger.insert_trajectories(vec![dup.clone()]).await.unwrap();
        // the same id twice within one call
        ledger
            .insert_trajectories(vec![dup.clone(), dup])
            .await
            .unwrap();
        ledger.flush().await.unwrap();

        let got = ledger.get_trajectory("t1").await.unwrap().unwrap();
        assert_eq!(got.trajectory, ok, "the first insert wins");
        assert_eq!(got.consumed_at_step, None);
        assert!(got.created_at_ms > 0);
        let got = ledger.get_trajectory("t2").await.unwrap().unwrap();
        assert_eq!(got.trajectory, failed);
        assert!(ledger.get_trajectory("t3").await.unwrap().is_none());

        assert_eq!(
            ledger.trajectory_counts().await.unwrap(),
            [TrajectoryCounts {
                run_id: "r".into(),
                total: 2,
                consumed: 0
            }]
        );
        let summary = ledger
            .list_rollouts(&RolloutFilter::default())
            .await
            .unwrap();
        let t1 = summary.iter().find(|s| s.id == "t1").unwrap();
        assert_eq!(t1.num_completion_tokens, 5);
        assert_eq!(
            (t1.min_policy_version, t1.max_policy_version),
            (Some(4), Some(5))
        );
        assert_eq!(t1.finish_reason, FinishReason::Stop);
        let t2 = summary.iter().find(|s| s.id == "t2").unwrap();
        assert_eq!((t2.min_policy_version, t2.reward), (None, None));
        assert_eq!(
            t2.status,
            TrajectoryStatus::Failed {
                reason: "worker OOM".into()
            }
        );
        ledger.close().await.unwrap();
    }

    pub async fn rollouts_are_filtered_and_newest_first(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("ra")).await.unwrap();
        ledger.insert_run(run("rb")).await.unwrap();
        let rows = [
            ("t1", "ra", "math", 0.0),
            ("t2", "ra", "math", 1.0),
            ("t3", "ra", "code", 0.5),
            ("t4", "rb", "math", 0.9),
            ("t5", "rb", "code", 1.0),
        ];
        for (id, r, env, reward) in rows {
            let mut t = traj(id, r, "p", env, reward);
            match id {
                "t1" => t.policy_versions = vec![1, 1, 2, 2, 2],
                "t3" => t.stage_index = Some(1),
                "t4" => t.finish_reason = FinishReason::Length,
                _ => {}
            }
            ledger.insert_trajectories(vec![t]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let mut unscored = traj("t6", "ra", "p", "math", 0.0);
        unscored.reward = None;
        ledger.insert_trajectories(vec![unscored]).await.unwrap();
        ledger.flush().await.unwrap();

        let ids = |f: RolloutFilter| {
            let ledger = ledger.clone();
            async move {
                let got = ledger.list_rollouts(&f).await.unwrap();
                let keys: Vec<_> = got
                    .iter()
                    .map(|s| (s.created_at_ms, s.id.clone()))
                    .collect();
                let mut sorted = keys.clone();
                sorted.sort_by(|a, b| b.cmp(a));
                assert_eq!(keys, sorted, "newest first");
                let mut ids: Vec<String> = got.into_iter().map(|s| s.id).collect();
                ids.sort();
                ids
            }
        };
        assert_eq!(
            ids(RolloutFilter::default()).await,
            ["t1", "t2", "t3", "t4", "t5", "t6"]
        );
        assert_eq!(
            ids(RolloutFilter::default().run("ra")).await,
            ["t1", "t2", "t3", "t6"]
        );
        assert_eq!(
            ids(RolloutFilter::default().environment("code")).await,
            ["t3", "t5"]
        );
        assert_eq!(
            ids(RolloutFilter::default().min_reward(0.9)).await,
            ["t2", "t4", "t5"]
        );
        assert_eq!(
            ids(RolloutFilter::default()
                .run("ra")
                .environment("math")
                .min_reward(0.0))
            .await,
            ["t1", "t2"]
        );
        assert_eq!(
            ids(RolloutFilter::default().run("nope")).await,
            Vec::<String>::new()
        );
        assert_eq!(
            ids(RolloutFilter::default().max_reward(0.5)).await,
            ["t1", "t3"]
        );
        assert_eq!(
            ids(RolloutFilter::default().min_reward(0.5).max_reward(0.9)).await,
            ["t3", "t4"]
        );
        assert_eq!(ids(RolloutFilter::default().stage(1)).await, ["t3"]);
        // Versions 4-5 everywhere but t1 (1-2).
        assert_eq!(
            ids(RolloutFilter::default().policy_version(2)).await,
            ["t1"]
        );
        assert_eq!(
            ids(RolloutFilter::default().run("ra").policy_version(4)).await,
            ["t2", "t3", "t6"]
        );
        assert_eq!(
            ids(RolloutFilter::default().finish_reason(FinishReason::Length)).await,
            ["t4"]
        );
        let newest = ledger
            .list_rollouts(&RolloutFilter::default().run("rb").limit(1))
            .await
            .unwrap();
        assert_eq!(newest.len(), 1);
        assert_eq!(newest[0].id, "t5");
        ledger.close().await.unwrap();
    }

    pub async fn a_rewind_undoes_the_steps_after_a_version(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        ledger.insert_run(run("other")).await.unwrap();
        let ids = ["p0", "p1", "p2", "p3"];
        ledger
            .record_prompts_dispatched(ids.iter().map(|p| prompt(p, "r", "math")).collect())
            .await
            .unwrap();
        ledger
            .record_prompts_dispatched(vec![prompt("q2", "other", "math")])
            .await
            .unwrap();
        ledger
            .insert_trajectories(
                ids.iter()
                    .map(|p| traj(&format!("{p}-t"), "r", p, "math", 1.0))
                    .chain([traj("q2-t", "other", "q2", "math", 1.0)])
                    .collect(),
            )
            .await
            .unwrap();
        // p0, p1, p2 trained at steps 0, 1, 2 (into versions 1, 2, 3); p3 still in flight.
        for (step, p) in ids[..3].iter().enumerate() {
            ledger.mark_consumed([*p], step as u64).await.unwrap();
        }
        ledger.mark_consumed(["q2"], 2).await.unwrap();
        for step in 1..=3u64 {
            ledger
                .insert_learner_step(LearnerStep {
                    run_id: "r".into(),
                    step,
                    policy_version: step,
                    loss: Some(0.5),
                    kl: None,
                    entropy: None,
                    grad_norm: Some(1.0),
                    learning_rate: Some(1e-3),
                    clip_fraction: None,
                    num_tokens: 10,
                    num_trajectories: 1,
                    skip_reason: None,
                    mean_abs_logprob_diff: None,
                })
                .await
                .unwrap();
        }
        ledger.set_run_status("r", RunStatus::Failed).await.unwrap();
        ledger.rewind("r", 2, "lost in a crash").await.unwrap();

        let state = |p: &'static str| {
            let ledger = ledger.clone();
            async move { ledger.get_prompt(p).await.unwrap().unwrap() }
        };
        for p in ["p0", "p1"] {
            let kept = state(p).await;
            assert_eq!(
                kept.state,
                PromptState::Consumed,
                "{p} was trained into version 2"
            );
        }
        let lost = state("p2").await;
        assert_eq!(lost.state, PromptState::Dropped);
        assert_eq!(lost.consumed_at_step, None);
        assert_eq!(lost.drop_reason.as_deref(), Some("lost in a crash"));
        let in_flight = state("p3").await;
        assert_eq!(in_flight.state, PromptState::Dropped);
        assert!(in_flight.drop_reason.unwrap().starts_with("in flight"));
        let traj_step = |t: &'static str| {
            let ledger = ledger.clone();
            async move {
                ledger
                    .get_trajectory(t)
                    .await
                    .unwrap()
                    .unwrap()
                    .consumed_at_step
            }
        };
        assert_eq!(traj_step("p1-t").await, Some(1));
        assert_eq!(traj_step("p2-t").await, None);
        assert_eq!(traj_step("q2-t").await, Some(2), "another run is untouched");
        let steps: Vec<u64> = ledger
            .list_learner_steps("r")
            .await
            .unwrap()
            .iter()
            .map(|s| s.step.step)
            .collect();
        assert_eq!(steps, [1, 2]);
        let r = ledger.get_run("r").await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Running);
        assert_eq!(r.finished_at_ms, None);
    }

    pub async fn consumption_is_counted_per_run(db: &TestDb) {
        let ledger = db.open().await;
        for r in ["ra", "rb", "rc"] {
            ledger.insert_run(run(r)).await.unwrap();
        }
        ledger
            .record_prompts_dispatched(vec![
                prompt("pa1", "ra", "math"),
                prompt("pa2", "ra", "math"),
                prompt("pb1", "rb", "code"),
            ])
            .await
            .unwrap();
        let mut failed = traj("a1-bad", "ra", "pa1", "math", 0.0);
        failed.status = TrajectoryStatus::Failed {
            reason: "scorer timeout".into(),
        };
        ledger
            .insert_trajectories(vec![
                traj("a1-0", "ra", "pa1", "math", 1.0),
                traj("a1-1", "ra", "pa1", "math", 0.0),
                failed,
                traj("a2-0", "ra", "pa2", "math", 1.0),
                traj("b1-0", "rb", "pb1", "code", 1.0),
            ])
            .await
            .unwrap();
        ledger.mark_scored(["pa1", "pa2", "pb1"]).await.unwrap();
        ledger.mark_consumed(["pa1"], 7).await.unwrap();
        ledger.mark_dropped(["pb1"], "too stale").await.unwrap();
        // a dropped prompt is not consumed, nor are its trajectories
        ledger.mark_consumed(["pb1"], 8).await.unwrap();
        ledger.flush().await.unwrap();

        assert_eq!(
            ledger.trajectory_counts().await.unwrap(),
            [
                TrajectoryCounts {
                    run_id: "ra".into(),
                    total: 4,
                    consumed: 2
                },
                TrajectoryCounts {
                    run_id: "rb".into(),
                    total: 1,
                    consumed: 0
                },
                TrajectoryCounts {
                    run_id: "rc".into(),
                    total: 0,
                    consumed: 0
                },
            ]
        );
        assert_eq!(ledger.count_consumed("ra").await.unwrap(), 2);
        assert_eq!(ledger.count_consumed("rc").await.unwrap(), 0);
        assert_eq!(ledger.count_consumed("unknown").await.unwrap(), 0);
        let a = ledger.get_trajectory("a1-0").await.unwrap().unwrap();
        assert_eq!(a.consumed_at_step, Some(7));
        let bad = ledger.get_trajectory("a1-bad").await.unwrap().unwrap();
        assert_eq!(
            bad.consumed_at_step, None,
            "failed trajectories are not trained on"
        );
        let a2 = ledger.get_trajectory("a2-0").await.unwrap().unwrap();
        assert_eq!(a2.consumed_at_step, None);
        ledger.close().await.unwrap();
    }

    pub async fn weight_transfers_are_summed_per_version_and_rewound(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("w")).await.unwrap();
        let transfer =
            |worker: &str, version: u64, seconds: f64, finished_at_ms: i64| WeightTransfer {
                run_id: "w".into(),
                requester_id: worker.into(),
                policy_version: version,
                num_bytes: 1000,
                seconds,
                finished_at_ms,
            };
        ledger
            .record_weight_transfers(vec![
                transfer("w0", 1, 0.5, 10_500),
                transfer("w1", 1, 1.5, 12_000),
                transfer("w0", 2, 0.25, 20_250),
            ])
            .await
            .unwrap();
        // Nothing to record is no write at all.
        ledger.record_weight_transfers(vec![]).await.unwrap();
        ledger.flush().await.unwrap();
        let sync = ledger.weight_sync("w").await.unwrap();
        assert_eq!(sync.len(), 2, "{sync:?}");
        let v1 = &sync[0];
        assert_eq!((v1.policy_version, v1.transfers, v1.bytes), (1, 2, 2000));
        assert_eq!((v1.mean_seconds, v1.max_seconds), (1.0, 1.5));
        // From the first start (10.0 s and 10.5 s) to the last end (12.0 s).
        assert!((v1.seconds_to_last_worker - 2.0).abs() < 1e-9, "{v1:?}");
        assert_eq!((sync[1].policy_version, sync[1].transfers), (2, 1));
        // A rewind to version 1 forgets the transfers of the versions after it.
        ledger.rewind("w", 1, "test").await.unwrap();
        ledger.flush().await.unwrap();
        let sync = ledger.weight_sync("w").await.unwrap();
        assert_eq!(
            sync.iter().map(|s| s.policy_version).collect::<Vec<_>>(),
            [1]
        );
        ledger.close().await.unwrap();
    }

    pub async fn learner_steps_round_trip(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        let trained = LearnerStep {
            run_id: "r".into(),
            step: 1,
            policy_version: 1,
            loss: Some(0.5312),
            kl: Some(1.5e-3),
            entropy: Some(0.42),
            grad_norm: Some(0.9),
            learning_rate: Some(1e-6),
            clip_fraction: Some(0.02),
            num_tokens: 65_536,
            num_trajectories: 64,
            skip_reason: None,
            mean_abs_logprob_diff: Some(0.0125),
        };
        let skipped = LearnerStep {
            run_id: "r".into(),
            step: 2,
            policy_version: 1,
            loss: None,
            kl: None,
            entropy: None,
            grad_norm: None,
            learning_rate: None,
            clip_fraction: None,
            num_tokens: 0,
            num_trajectories: 0,
            skip_reason: Some("every group had zero reward variance".into()),
            mean_abs_logprob_diff: None,
        };
        ledger.insert_learner_step(skipped.clone()).await.unwrap();
        ledger.insert_learner_step(trained.clone()).await.unwrap();
        let mut dup = trained.clone();
        dup.loss = Some(99.0);
        ledger.insert_learner_step(dup).await.unwrap();
        ledger.flush().await.unwrap();

        let steps = ledger.list_learner_steps("r").await.unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].step, trained, "ordered by step, first insert kept");
        assert_eq!(steps[1].step, skipped);
        assert!(steps[0].created_at_ms > 0);
        assert!(ledger.list_learner_steps("other").await.unwrap().is_empty());
        ledger.close().await.unwrap();
    }

    /// Every SQL statement of docs/ledger.md's example queries, on a ledger holding a little of
    /// everything, on the backends the document says it runs on.
    pub async fn the_queries_docs_ledger_md_shows_run(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("run-1")).await.unwrap();
        ledger
            .start_stage(NewStage {
                run_id: "run-1".into(),
                stage_index: 0,
                name: "rl".into(),
                kind: "rlvr".into(),
                first_step: 0,
                metric: Some("heldout_accuracy".into()),
                metric_start: Some(0.25),
            })
            .await
            .unwrap();
        ledger
            .record_prompts_dispatched(vec![prompt("p1", "run-1", "math")])
            .await
            .unwrap();
        ledger
            .insert_trajectories(vec![traj("t1", "run-1", "p1", "math", 1.0)])
            .await
            .unwrap();
        ledger.mark_consumed(&["p1".to_string()], 1).await.unwrap();
        ledger
            .insert_learner_step(LearnerStep {
                run_id: "run-1".into(),
                step: 1,
                policy_version: 1,
                loss: Some(0.5),
                kl: None,
                entropy: Some(1.0),
                grad_norm: Some(0.1),
                learning_rate: Some(1e-4),
                clip_fraction: None,
                num_tokens: 5,
                num_trajectories: 1,
                skip_reason: None,
                mean_abs_logprob_diff: Some(0.01),
            })
            .await
            .unwrap();
        ledger
            .record_evaluation(Evaluation {
                run_id: "run-1".into(),
                policy_version: 1,
                environment: "math".into(),
                difficulty: 0,
                stage_index: Some(0),
                tasks: 2,
                correct: 1,
                accuracy: 0.5,
                accuracy_lo: 0.1,
                accuracy_hi: 0.9,
                mean_reward: 0.5,
                samples_per_task: 1,
                effective_tasks: None,
            })
            .await
            .unwrap();
        ledger.close().await.unwrap();

        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ledger.md"))
                .unwrap();
        let postgres = db.url.starts_with("postgres");
        let queries = documented_queries(&doc);
        assert!(queries.len() >= 15, "{queries:?}");
        let mine: Vec<&String> = queries
            .iter()
            .filter(|(on, _)| on.is_none_or(|on| (on == "PostgreSQL") == postgres))
            .map(|(_, sql)| sql)
            .collect();
        // The same loop over either backend's pool type.
        macro_rules! rows_of_each {
            ($pool:expr) => {{
                let pool = $pool;
                let mut rows = vec![];
                for sql in &mine {
                    let got = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                        .fetch_all(&pool)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}\n{e}"));
                    rows.push(got.len());
                }
                pool.close().await;
                rows
            }};
        }
        let rows = if postgres {
            rows_of_each!(sqlx::PgPool::connect(&db.url).await.unwrap())
        } else {
            rows_of_each!(sqlx::SqlitePool::connect(&db.url).await.unwrap())
        };
        // The learning curve comes first in the document: one version measured.
        assert!(mine[0].contains("FROM evaluations"), "{}", mine[0]);
        assert_eq!(rows[0], 1);
    }

    pub async fn evaluations_are_kept_once_per_version_and_versions_know_their_stage(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        // Version 3 is measured with 4 samples per task, the others greedily.
        let eval = |version: u64, env: &str, correct: u64| {
            let samples = if version == 3 { 4 } else { 1 };
            Evaluation {
                run_id: "r".into(),
                policy_version: version,
                environment: env.into(),
                difficulty: 0,
                stage_index: Some(version / 3),
                tasks: 4,
                correct,
                accuracy: correct as f64 / (4 * samples) as f64,
                accuracy_lo: 0.0625,
                accuracy_hi: 0.9375,
                mean_reward: 0.5,
                samples_per_task: samples,
                effective_tasks: (samples > 1).then_some(9.5),
            }
        };
        for e in [
            eval(3, "needle", 2),
            eval(0, "needle", 1),
            eval(0, "arithmetic", 0),
            // Measured again: the first measurement stays.
            eval(3, "needle", 4),
        ] {
            ledger.record_evaluation(e).await.unwrap();
        }
        let version = |n: u64| PolicyVersion {
            run_id: "r".into(),
            version: n,
            learner_step: n,
            weights_digest: "ab".repeat(32),
            num_bytes: 10,
        };
        ledger.record_policy_version(version(1)).await.unwrap();
        ledger
            .start_stage(NewStage {
                run_id: "r".into(),
                stage_index: 1,
                name: "rl".into(),
                kind: "rlvr".into(),
                first_step: 1,
                metric: None,
                metric_start: None,
            })
            .await
            .unwrap();
        ledger.record_policy_version(version(2)).await.unwrap();
        ledger.flush().await.unwrap();
        assert_eq!(
            ledger.list_evaluations("r").await.unwrap(),
            [
                eval(0, "arithmetic", 0),
                eval(0, "needle", 1),
                eval(3, "needle", 2)
            ]
        );
        assert_eq!(ledger.list_evaluations("other").await.unwrap(), []);
        let stages: Vec<_> = ledger
            .list_policy_versions("r")
            .await
            .unwrap()
            .iter()
            .map(|r| (r.version.version, r.stage_index))
            .collect();
        assert_eq!(stages, [(1, None), (2, Some(1))]);
    }

    pub async fn stages_record_their_span_and_own_their_steps(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        let stage = |index: u64, name: &str, kind: &str, first_step: u64| NewStage {
            run_id: "r".into(),
            stage_index: index,
            name: name.into(),
            kind: kind.into(),
            first_step,
            metric: Some("heldout_accuracy".into()),
            metric_start: Some(0.1 * index as f64),
        };
        let step = |n: u64| LearnerStep {
            run_id: "r".into(),
            step: n,
            policy_version: n,
            loss: Some(1.0),
            kl: None,
            entropy: None,
            grad_norm: None,
            learning_rate: None,
            clip_fraction: None,
            num_tokens: 10,
            num_trajectories: 1,
            skip_reason: None,
            mean_abs_logprob_diff: None,
        };
        // Steps 1-2 belong to the warm-up (begun at version 0), 3-4 to RL (begun at 2).
        ledger
            .start_stage(stage(0, "warmup", "sft", 0))
            .await
            .unwrap();
        ledger.insert_learner_step(step(1)).await.unwrap();
        ledger.insert_learner_step(step(2)).await.unwrap();
        let end = |index: u64, last_step: u64, status: StageStatus| StageEnd {
            run_id: "r".into(),
            stage_index: index,
            status,
            last_step,
            metric_start: None,
            metric_end: Some(0.5),
            trajectories: 2 * (index + 1),
            checkpoint_path: Some(format!("runs/r/stages/{index}/checkpoint")),
            summary_json: Some(format!("{{\"stage\": {index}}}")),
        };
        ledger
            .start_stage(stage(1, "rlvr", "rlvr", 2))
            .await
            .unwrap();
        ledger
            .finish_stage(end(0, 2, StageStatus::Succeeded))
            .await
            .unwrap();
        ledger.insert_learner_step(step(3)).await.unwrap();
        ledger.insert_learner_step(step(4)).await.unwrap();
        let mut p = prompt("p1", "r", "math");
        p.stage_index = Some(1);
        ledger.record_prompts_dispatched(vec![p]).await.unwrap();
        let mut t = traj("t1", "r", "p1", "math", 1.0);
        t.stage_index = Some(1);
        ledger.insert_trajectories(vec![t.clone()]).await.unwrap();
        ledger.flush().await.unwrap();

        let stages = ledger.list_stages("r").await.unwrap();
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0].stage, stage(0, "warmup", "sft", 0));
        assert_eq!(stages[0].status, StageStatus::Succeeded);
        assert_eq!(stages[0].last_step, Some(2));
        assert_eq!(stages[0].trajectories, Some(2));
        assert_eq!(stages[0].metric_end, Some(0.5));
        assert_eq!(stages[0].summary_json.as_deref(), Some("{\"stage\": 0}"));
        assert!(stages[0].finished_at_ms.is_some());
        assert_eq!(stages[1].status, StageStatus::Running);
        assert_eq!(
            (stages[1].last_step, stages[1].finished_at_ms),
            (None, None)
        );
        let owners: Vec<(u64, Option<u64>)> = ledger
            .list_learner_steps("r")
            .await
            .unwrap()
            .iter()
            .map(|s| (s.step.step, s.stage_index))
            .collect();
        assert_eq!(
            owners,
            [(1, Some(0)), (2, Some(0)), (3, Some(1)), (4, Some(1))]
        );
        let back = ledger.get_trajectory("t1").await.unwrap().unwrap();
        assert_eq!(back.trajectory, t, "the stage index round-trips");

        // A failed stage, then the same stage begun again (a resumed run): running again.
        ledger
            .finish_stage(end(1, 3, StageStatus::Failed))
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        assert_eq!(
            ledger.list_stages("r").await.unwrap()[1].status,
            StageStatus::Failed
        );
        ledger
            .start_stage(stage(1, "rlvr", "rlvr", 3))
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        let again = &ledger.list_stages("r").await.unwrap()[1];
        assert_eq!(again.status, StageStatus::Running);
        assert_eq!(again.finished_at_ms, None);
        assert!(ledger.list_stages("other").await.unwrap().is_empty());
        ledger.close().await.unwrap();
    }

    /// Rows of `sql` on `db`'s backend, decoded as the tuple `$t`.
    macro_rules! view_rows {
        ($db:expr, $sql:expr, $t:ty) => {{
            let sql = $sql;
            if $db.url.starts_with("postgres") {
                let pool = sqlx::PgPool::connect(&$db.url).await.unwrap();
                let rows: Vec<$t> = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}\n{e}"));
                pool.close().await;
                rows
            } else {
                let pool = sqlx::SqlitePool::connect(&$db.url).await.unwrap();
                let rows: Vec<$t> = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}\n{e}"));
                pool.close().await;
                rows
            }
        }};
    }

    pub async fn the_views_answer_the_common_questions(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("v")).await.unwrap();
        ledger
            .start_stage(NewStage {
                run_id: "v".into(),
                stage_index: 0,
                name: "rl".into(),
                kind: "rlvr".into(),
                first_step: 0,
                metric: Some("heldout_accuracy".into()),
                metric_start: Some(0.25),
            })
            .await
            .unwrap();
        let mut prompts = vec![];
        for (id, env, step) in [
            ("p1", "arithmetic", 0),
            ("p2", "arithmetic", 1),
            ("p3", "needle", 1),
        ] {
            let mut p = prompt(id, "v", env);
            p.step_dispatched = step;
            prompts.push(p);
        }
        ledger.record_prompts_dispatched(prompts).await.unwrap();
        let mut trajectories = vec![];
        for (id, prompt_id, env, reward, versions) in [
            ("t1", "p1", "arithmetic", 1.0, vec![0, 0, 0]),
            ("t2", "p1", "arithmetic", 0.0, vec![0, 0, 0]),
            ("t3", "p2", "arithmetic", 0.5, vec![0, 1, 1]),
        ] {
            let mut t = traj(id, "v", prompt_id, env, reward);
            t.policy_versions = versions;
            t.completion_token_ids = vec![10, 11, 12];
            t.logprobs = vec![-0.5; 3];
            t.stage_index = Some(0);
            trajectories.push(t);
        }
        let mut failed = traj("t4", "v", "p3", "needle", 0.0);
        failed.reward = None;
        failed.status = TrajectoryStatus::Failed {
            reason: "environment deadline".into(),
        };
        trajectories.push(failed);
        ledger.insert_trajectories(trajectories).await.unwrap();
        ledger.mark_scored(["p1", "p2"]).await.unwrap();
        ledger.mark_consumed(["p1"], 0).await.unwrap();
        ledger.mark_consumed(["p2"], 1).await.unwrap();
        ledger
            .mark_dropped(["p3"], "every attempt failed")
            .await
            .unwrap();
        for (step, loss) in [(1, 0.5), (2, 0.25)] {
            ledger
                .insert_learner_step(learner_step("v", step, loss, 2))
                .await
                .unwrap();
        }
        ledger
            .finish_stage(StageEnd {
                run_id: "v".into(),
                stage_index: 0,
                status: StageStatus::Succeeded,
                last_step: 2,
                metric_start: None,
                metric_end: Some(0.75),
                trajectories: 3,
                checkpoint_path: Some("runs/v/stages/rl/checkpoint".into()),
                summary_json: None,
            })
            .await
            .unwrap();
        ledger.close().await.unwrap();

        let rewards = view_rows!(
            db,
            "SELECT step, environment, trajectories, mean_reward, solved FROM reward_by_step \
             WHERE run_id = 'v' ORDER BY step, environment",
            (i64, String, i64, f64, f64)
        );
        assert_eq!(
            rewards,
            [
                (0, "arithmetic".to_string(), 2, 0.5, 0.5),
                (1, "arithmetic".to_string(), 1, 0.5, 0.0)
            ]
        );
        let hardest = view_rows!(
            db,
            "SELECT environment, prompts, trajectories, mean_reward FROM task_difficulty \
             WHERE run_id = 'v' ORDER BY mean_reward, environment",
            (String, i64, i64, f64)
        );
        // p1 and p2 carry the same task content (the test's prompt() derives it from the id).
        assert_eq!(hardest.len(), 2, "{hardest:?}");
        assert_eq!(hardest[0].3, 0.5);
        let stale = view_rows!(
            db,
            "SELECT lag, trajectories, tokens FROM trained_staleness WHERE run_id = 'v' ORDER BY lag",
            (i64, i64, i64)
        );
        assert_eq!(stale, [(0, 2, 6), (1, 1, 3)]);
        let faults = view_rows!(
            db,
            "SELECT environment, trajectories, failed_trajectories, dropped_prompts, last_failure \
             FROM faults_by_environment WHERE run_id = 'v' ORDER BY environment",
            (String, i64, i64, i64, Option<String>)
        );
        assert_eq!(
            faults,
            [
                ("arithmetic".to_string(), 3, 0, 0, None),
                (
                    "needle".to_string(),
                    1,
                    1,
                    1,
                    Some("environment deadline".to_string())
                )
            ]
        );
        let stages = view_rows!(
            db,
            "SELECT name, kind, steps, metric_gain, trajectories, mean_loss, mean_trained_reward, \
             wall_seconds FROM stage_summary WHERE run_id = 'v'",
            (String, String, i64, f64, i64, f64, f64, f64)
        );
        assert_eq!(stages.len(), 1);
        let (name, kind, steps, gain, trajectories, loss, reward, seconds) = stages[0].clone();
        // The mean reward of the three trained trajectories (1, 0, 0.5).
        assert_eq!(
            (name.as_str(), kind.as_str(), steps, trajectories),
            ("rl", "rlvr", 2, 3)
        );
        assert_eq!((gain, loss, reward), (0.5, 0.375, 0.5));
        assert!(seconds >= 0.0, "{seconds}");

        // The ledger's readers of the views (what the dashboard draws) agree with them.
        let ledger = db.open().await;
        let by_step: Vec<_> = ledger
            .reward_by_step("v")
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.step as i64,
                    r.environment,
                    r.trajectories as i64,
                    r.mean_reward,
                    r.solved,
                )
            })
            .collect();
        assert_eq!(by_step, rewards);
        let lags: Vec<_> = ledger
            .trained_staleness("v")
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.lag, s.trajectories as i64, s.tokens as i64))
            .collect();
        assert_eq!(lags, stale);
        let env_faults: Vec<_> = ledger
            .faults_by_environment("v")
            .await
            .unwrap()
            .into_iter()
            .map(|f| {
                (
                    f.environment,
                    f.trajectories as i64,
                    f.failed_trajectories as i64,
                    f.dropped_prompts as i64,
                    f.last_failure,
                )
            })
            .collect();
        assert_eq!(env_faults, faults);
        ledger.close().await.unwrap();
    }

    /// A run the audit finds clean: two prompts of stage 0, each with one trajectory
    /// sampled at versions 0-1, consumed by steps 1 and 2; `tweak` changes what is written.
    async fn audited_run(ledger: &Ledger, id: &str, tweak: &str) {
        ledger.insert_run(run(id)).await.unwrap();
        let mut prompts = vec![];
        for p in ["p1", "p2", "p3"] {
            let mut np = prompt(&format!("{id}-{p}"), id, "arithmetic");
            np.stage_index = Some(0);
            prompts.push(np);
        }
        if tweak != "in_flight" {
            prompts.pop();
        }
        ledger.record_prompts_dispatched(prompts).await.unwrap();
        for (n, p) in ["p1", "p2"].iter().enumerate() {
            let prompt_id = format!("{id}-{p}");
            let mut t = traj(&format!("{id}-t{n}"), id, &prompt_id, "arithmetic", 1.0);
            t.stage_index = Some(0);
            t.policy_versions = match (tweak, n) {
                (_, 0) => vec![0, 0, 0],
                ("future_version", _) => vec![0, 7],
                _ => vec![0, 0, 1],
            };
            if n == 1 {
                // Sampled after version 1 was published.
                ledger
                    .record_policy_version(PolicyVersion {
                        run_id: id.into(),
                        version: 1,
                        learner_step: 1,
                        weights_digest: "aa".into(),
                        num_bytes: 8,
                    })
                    .await
                    .unwrap();
                ledger.flush().await.unwrap();
            }
            ledger.insert_trajectories(vec![t]).await.unwrap();
            ledger.mark_scored([prompt_id.clone()]).await.unwrap();
            ledger.mark_consumed([prompt_id], n as u64).await.unwrap();
        }
        let steps: &[u64] = if tweak == "gap" { &[1, 3] } else { &[1, 2] };
        for &step in steps {
            // A learner that trained step 2's group a second time reports 2.
            let trained = if tweak == "trained_twice" && step == 2 {
                2
            } else {
                1
            };
            ledger
                .insert_learner_step(learner_step(id, step, 0.5, trained))
                .await
                .unwrap();
        }
        if tweak != "gap" {
            ledger
                .record_policy_version(PolicyVersion {
                    run_id: id.into(),
                    version: 2,
                    learner_step: 2,
                    weights_digest: "bb".into(),
                    num_bytes: 8,
                })
                .await
                .unwrap();
        }
        ledger
            .set_run_status(id, RunStatus::Succeeded)
            .await
            .unwrap();
        ledger.flush().await.unwrap();
    }

    pub async fn the_audit_finds_each_kind_of_breach(db: &TestDb) {
        let ledger = db.open().await;
        let bound = BTreeMap::from([(0, 1)]);
        let breaches =
            |report: &chorus_orchestrator::ledger::AuditReport| -> Vec<(&'static str, u64)> {
                report
                    .checks
                    .iter()
                    .filter(|c| c.breaches > 0)
                    .map(|c| (c.name, c.breaches))
                    .collect()
            };
        audited_run(&ledger, "clean", "").await;
        let report = ledger.audit("clean", &bound).await.unwrap();
        assert!(report.clean(), "{report:#?}");
        let checked: Vec<(&str, u64)> = report.checks.iter().map(|c| (c.name, c.checked)).collect();
        assert_eq!(
            checked,
            [
                ("prompts_final", 2),
                ("consumed_once", 2),
                ("trained_once", 2),
                ("steps_contiguous", 2),
                ("versions_monotone", 2),
                ("lag_bounded", 2),
            ]
        );
        // The trajectory consumed at step 1 was sampled from version 0: a lag of 1, which a
        // bound of 0 refuses.
        let strict = ledger
            .audit("clean", &BTreeMap::from([(0, 0)]))
            .await
            .unwrap();
        assert_eq!(breaches(&strict), [("lag_bounded", 1)]);
        assert!(
            strict.checks[5].detail.contains("clean-t1 lagged 1"),
            "{strict:#?}"
        );

        for (tweak, expected) in [
            ("in_flight", vec![("prompts_final", 1)]),
            ("trained_twice", vec![("trained_once", 1)]),
            // Step 2 missing: step 3 stands where 2 belongs, and consumed nothing of its own.
            ("gap", vec![("trained_once", 1), ("steps_contiguous", 1)]),
            ("future_version", vec![("versions_monotone", 1)]),
        ] {
            audited_run(&ledger, tweak, tweak).await;
            let report = ledger.audit(tweak, &bound).await.unwrap();
            assert_eq!(breaches(&report), expected, "{tweak}: {report:#?}");
        }
        // A prompt still in flight is no breach while its run is running.
        ledger
            .set_run_status("in_flight", RunStatus::Running)
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        let running = ledger.audit("in_flight", &bound).await.unwrap();
        assert!(
            running.clean() && running.checks[0].detail.contains("1 in flight"),
            "{running:#?}"
        );
        // Once it has failed, the prompt in flight is a breach, until the ledger drops it (as
        // a failing run and a restarted orchestrator do).
        ledger
            .set_run_status("in_flight", RunStatus::Failed)
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        let failed = ledger.audit("in_flight", &bound).await.unwrap();
        assert_eq!(breaches(&failed), [("prompts_final", 1)]);
        ledger
            .drop_in_flight("in_flight", "in flight when the run failed")
            .await
            .unwrap();
        ledger.flush().await.unwrap();
        assert!(ledger.audit("in_flight", &bound).await.unwrap().clean());
        let dropped = ledger.get_prompt("in_flight-p3").await.unwrap().unwrap();
        assert_eq!(
            dropped.drop_reason.as_deref(),
            Some("in flight when the run failed")
        );

        // A trajectory whose consumption disagrees with its prompt's (which the writer never
        // does: made here behind its back).
        let sql = "UPDATE trajectories SET consumed_at_step = 1 WHERE id = 'clean-t0'";
        if db.url.starts_with("postgres") {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        } else {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
        let report = ledger.audit("clean", &bound).await.unwrap();
        let found = breaches(&report);
        assert!(found.contains(&("consumed_once", 1)), "{report:#?}");
        // Two trajectories now count against step 2, which trained one.
        assert!(found.contains(&("trained_once", 2)), "{report:#?}");

        let err = ledger.audit("nope", &bound).await.unwrap_err().to_string();
        assert!(err.contains("no run `nope`"), "{err}");
        ledger.close().await.unwrap();
    }

    pub async fn policy_versions_and_events_round_trip(db: &TestDb) {
        let ledger = db.open().await;
        ledger.insert_run(run("r")).await.unwrap();
        ledger.insert_run(run("other")).await.unwrap();
        let v = |version, sha: &str| PolicyVersion {
            run_id: "r".into(),
            version,
            learner_step: version * 2,
            weights_digest: sha.into(),
            num_bytes: 8_000_000_000,
        };
        ledger.record_policy_version(v(2, "bb")).await.unwrap();
        ledger.record_policy_version(v(1, "aa")).await.unwrap();
        ledger.record_policy_version(v(1, "zz")).await.unwrap();
        for i in 0..5 {
            ledger
                .record_event("r", "learner_step", format!(r#"{{"step":{i}}}"#))
                .await
                .unwrap();
            ledger
                .record_event("other", "noise", "{}".into())
                .await
                .unwrap();
        }
        ledger.flush().await.unwrap();

        let versions = ledger.list_policy_versions("r").await.unwrap();
        assert_eq!(
            versions
                .iter()
                .map(|r| r.version.clone())
                .collect::<Vec<_>>(),
            [v(1, "aa"), v(2, "bb")]
        );
        // Recorded before any stage began: no stage; a time.
        assert!(
            versions
                .iter()
                .all(|r| r.stage_index.is_none() && r.created_at_ms > 0)
        );
        let first = ledger.list_events("r", 0, 3).await.unwrap();
        assert_eq!(
            first
                .iter()
                .map(|e| e.payload_json.as_str())
                .collect::<Vec<_>>(),
            [r#"{"step":0}"#, r#"{"step":1}"#, r#"{"step":2}"#]
        );
        assert!(
            first
                .iter()
                .all(|e| e.run_id == "r" && e.kind == "learner_step")
        );
        let rest = ledger
            .list_events("r", first.last().unwrap().id, 100)
            .await
            .unwrap();
        assert_eq!(
            rest.iter()
                .map(|e| e.payload_json.as_str())
                .collect::<Vec<_>>(),
            [r#"{"step":3}"#, r#"{"step":4}"#]
        );
        assert!(rest[0].id > first[2].id);
        ledger.close().await.unwrap();
    }

    pub async fn a_refused_write_is_reported_and_spares_its_batch(db: &TestDb) {
        let ledger = db
            .open_with(LedgerOptions {
                flush_interval: Duration::from_secs(3600),
                ..LedgerOptions::default()
            })
            .await;
        ledger.insert_run(run("r")).await.unwrap();
        ledger
            .insert_trajectories(vec![traj("t1", "r", "p", "math", 1.0)])
            .await
            .unwrap();
        // unknown run: refused by the foreign key
        ledger
            .record_prompts_dispatched(vec![prompt("p-orphan", "no-such-run", "math")])
            .await
            .unwrap();
        ledger
            .insert_trajectories(vec![traj("t2", "r", "p", "math", 1.0)])
            .await
            .unwrap();
        let err = ledger.flush().await.unwrap_err();
        match &err {
            LedgerError::WriteFailed { failed, first } => {
                assert_eq!(*failed, 1);
                assert!(first.contains("p-orphan"), "{first}");
            }
            other => panic!("expected WriteFailed, got {other:?}"),
        }
        assert!(err.is_write_failed());
        assert!(ledger.get_prompt("p-orphan").await.unwrap().is_none());
        assert!(ledger.get_trajectory("t1").await.unwrap().is_some());
        assert!(ledger.get_trajectory("t2").await.unwrap().is_some());
        assert!(ledger.get_run("r").await.unwrap().is_some());
        // reported once
        ledger.flush().await.unwrap();
        ledger.close().await.unwrap();
    }

    pub async fn batches_commit_by_size_and_by_interval(db: &TestDb) {
        // by size: the interval is far away, ten rows fill a batch
        let ledger = db
            .open_with(LedgerOptions {
                max_batch_rows: 10,
                flush_interval: Duration::from_secs(3600),
                ..LedgerOptions::default()
            })
            .await;
        ledger.insert_run(run("r")).await.unwrap();
        let batch: Vec<_> = (0..9)
            .map(|i| traj(&format!("s{i}"), "r", "p", "math", 1.0))
            .collect();
        ledger.insert_trajectories(batch).await.unwrap();
        eventually("a full batch is committed without a flush", || async {
            ledger.count_total("r").await == 9
        })
        .await;
        ledger
            .insert_trajectories(vec![traj("s9", "r", "p", "math", 1.0)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ledger.count_total("r").await, 9, "a partial batch waits");
        ledger.flush().await.unwrap();
        assert_eq!(ledger.count_total("r").await, 10);
        ledger.close().await.unwrap();

        // by interval: a lone write commits on its own shortly after
        let ledger = db
            .open_with(LedgerOptions {
                max_batch_rows: 1_000_000,
                flush_interval: Duration::from_millis(20),
                ..LedgerOptions::default()
            })
            .await;
        ledger
            .insert_trajectories(vec![traj("i0", "r", "p", "math", 1.0)])
            .await
            .unwrap();
        eventually("the interval commits a partial batch", || async {
            ledger.count_total("r").await == 11
        })
        .await;
        ledger.close().await.unwrap();
    }

    pub async fn close_makes_everything_durable(db: &TestDb) {
        let ledger = db
            .open_with(LedgerOptions {
                flush_interval: Duration::from_secs(3600),
                queue_capacity: 8,
                ..LedgerOptions::default()
            })
            .await;
        let clone = ledger.clone();
        ledger.insert_run(run("r")).await.unwrap();
        for i in 0..50 {
            clone
                .insert_trajectories(vec![traj(&format!("d{i}"), "r", "p", "math", 1.0)])
                .await
                .unwrap();
        }
        ledger.close().await.unwrap();
        ledger.close().await.unwrap();
        let err = clone
            .insert_trajectories(vec![traj("late", "r", "p", "math", 1.0)])
            .await
            .unwrap_err();
        assert!(err.is_closed(), "{err:?}");
        assert!(clone.flush().await.unwrap_err().is_closed());

        let reopened = db.open().await;
        assert_eq!(reopened.count_total("r").await, 50);
        assert_eq!(reopened.get_run("r").await.unwrap().unwrap().id, "r");
        reopened.close().await.unwrap();
    }

    pub async fn concurrent_writers_lose_nothing(db: &TestDb) {
        let ledger = db
            .open_with(LedgerOptions {
                queue_capacity: 16,
                max_batch_rows: 64,
                ..LedgerOptions::default()
            })
            .await;
        ledger.insert_run(run("r")).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        let id = format!("w{w}-{i}");
                        ledger
                            .insert_trajectories(vec![traj(&id, "r", "p", "math", 1.0)])
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        ledger.flush().await.unwrap();
        assert_eq!(ledger.count_total("r").await, 800);
        ledger.close().await.unwrap();
    }
}

/// Total trajectories of a run, through the public API.
trait CountTotal {
    async fn count_total(&self, run_id: &str) -> u64;
}

impl CountTotal for Ledger {
    async fn count_total(&self, run_id: &str) -> u64 {
        self.trajectory_counts()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.run_id == run_id)
            .map_or(0, |c| c.total)
    }
}

#[tokio::test]
async fn sqlite_file_and_parents_are_created_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c/ledger.db");
    let ledger = Ledger::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(ledger.backend(), "sqlite");
    assert!(path.is_file());
    ledger.close().await.unwrap();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mode: (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode.0, "wal");
    pool.close().await;
    // reopening runs no migration twice
    let again = Ledger::open(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    again.close().await.unwrap();
}

/// A reader of the ledger of a run in progress (`chorus inspect`, a dashboard: another process
/// with its own connection) that holds a read transaction open neither blocks the run's writes
/// nor sees half of them. WAL gives the reader a snapshot while the writer commits; in SQLite's
/// default rollback journal the writer's commit would wait for the reader and fail.
#[tokio::test]
async fn a_reader_holding_a_snapshot_neither_blocks_the_writer_nor_sees_it_mid_way() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.sqlite").display());
    let writer = Ledger::open(&url).await.unwrap();
    writer.insert_run(run("live")).await.unwrap();
    writer
        .insert_trajectories(vec![traj("t0", "live", "p", "math", 1.0)])
        .await
        .unwrap();
    writer.flush().await.unwrap();

    let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
    async fn count(c: &mut sqlx::SqliteConnection) -> i64 {
        let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM trajectories")
            .fetch_one(c)
            .await
            .unwrap();
        n.0
    }
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    assert_eq!(count(&mut reader).await, 1);
    for i in 1..=20 {
        writer
            .insert_trajectories(vec![traj(&format!("t{i}"), "live", "p", "math", 0.5)])
            .await
            .unwrap();
    }
    // Without WAL the writer waits on the reader for good (it retries a busy database); the
    // bound only turns that hang into a failure, a WAL ledger does not wait at all.
    tokio::time::timeout(std::time::Duration::from_secs(120), writer.flush())
        .await
        .expect("a reader's open snapshot blocked the run's writes")
        .expect("the writes succeed");
    assert_eq!(count(&mut reader).await, 1, "the reader keeps its snapshot");
    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
    assert_eq!(count(&mut reader).await, 21, "and sees the rows afterwards");
    reader.close().await.unwrap();

    // A second ledger handle on the live file, as `chorus inspect` opens it, reads while the
    // run's handle is open and writing.
    let inspect = Ledger::open(&url).await.unwrap();
    writer
        .insert_trajectories(vec![traj("t21", "live", "p", "math", 0.0)])
        .await
        .unwrap();
    writer.flush().await.unwrap();
    assert_eq!(inspect.count_total("live").await, 22);
    inspect.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test]
async fn in_memory_sqlite_works_within_one_handle() {
    let ledger = Ledger::open("sqlite::memory:").await.unwrap();
    ledger.insert_run(run("m")).await.unwrap();
    ledger
        .insert_trajectories(vec![traj("t", "m", "p", "math", 1.0)])
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    assert_eq!(ledger.count_total("m").await, 1);
    ledger.close().await.unwrap();
}

#[tokio::test]
async fn bad_urls_and_paths_are_typed_errors() {
    let err = Ledger::open("mysql://u:secret@h/db").await.unwrap_err();
    assert!(matches!(err, LedgerError::InvalidUrl { .. }), "{err:?}");
    assert!(!err.to_string().contains("secret"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = Ledger::open(&format!(
        "sqlite://{}/ledger.db",
        file.join("sub").display()
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, LedgerError::CreateDir { .. }), "{err:?}");

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let err = Ledger::open(&format!("sqlite://{}", garbage.display()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::Connect { .. } | LedgerError::Migrate { .. }
        ),
        "{err:?}"
    );
}
