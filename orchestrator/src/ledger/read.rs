//! Queries of the ledger (for `chorus inspect` and the orchestrator's resume).
//!
//! Reads see committed writes only; call [`Ledger::flush`] first to read your own.

use std::collections::BTreeMap;

use super::codec::{self, BadLength};
use super::sql::{Cols, FetchError, Stmt};
use super::types::{parse_finish_reason, *};
use super::{Ledger, LedgerError};

/// Failure to turn a row into a record.
pub(super) enum RowError {
    Sql(sqlx::Error),
    Corrupt {
        table: &'static str,
        column: &'static str,
        id: String,
        reason: String,
    },
}

impl From<sqlx::Error> for RowError {
    fn from(e: sqlx::Error) -> Self {
        RowError::Sql(e)
    }
}

/// A row of a known table and key, with checked conversions.
pub(super) struct Reader<'a> {
    row: &'a dyn Cols,
    table: &'static str,
    id: String,
}

impl<'a> Reader<'a> {
    fn new(row: &'a dyn Cols, table: &'static str, key: &str) -> Result<Self, RowError> {
        let id = row.text(key)?;
        Ok(Self::keyed(row, table, id))
    }

    pub(super) fn keyed(row: &'a dyn Cols, table: &'static str, id: String) -> Self {
        Self { row, table, id }
    }

    fn corrupt(&self, column: &'static str, reason: impl ToString) -> RowError {
        RowError::Corrupt {
            table: self.table,
            column,
            id: self.id.clone(),
            reason: reason.to_string(),
        }
    }

    pub(super) fn u64(&self, col: &'static str) -> Result<u64, RowError> {
        let v = self.row.int(col)?;
        u64::try_from(v).map_err(|_| self.corrupt(col, format!("negative value {v}")))
    }

    fn real(&self, col: &'static str) -> Result<f64, RowError> {
        self.row
            .opt_real(col)?
            .ok_or_else(|| self.corrupt(col, "NULL where a number belongs"))
    }

    pub(super) fn opt_u64(&self, col: &'static str) -> Result<Option<u64>, RowError> {
        match self.row.opt_int(col)? {
            None => Ok(None),
            Some(v) => u64::try_from(v)
                .map(Some)
                .map_err(|_| self.corrupt(col, format!("negative value {v}"))),
        }
    }

    fn parsed<T>(&self, col: &'static str, parse: fn(&str) -> Option<T>) -> Result<T, RowError> {
        let text = self.row.text(col)?;
        parse(&text).ok_or_else(|| self.corrupt(col, format!("unknown value {text:?}")))
    }

    fn blob<T>(
        &self,
        col: &'static str,
        decode: fn(&[u8]) -> Result<T, BadLength>,
    ) -> Result<T, RowError> {
        decode(&self.row.blob(col)?).map_err(|e| self.corrupt(col, e))
    }

    fn status(&self) -> Result<TrajectoryStatus, RowError> {
        match self.row.text("status")?.as_str() {
            "ok" => Ok(TrajectoryStatus::Ok),
            "failed" => Ok(TrajectoryStatus::Failed {
                reason: self.row.opt_text("failure_reason")?.unwrap_or_default(),
            }),
            other => Err(self.corrupt("status", format!("unknown value {other:?}"))),
        }
    }
}

const RUN_COLS: &str = "id, name, config_toml, status, created_at_ms, finished_at_ms, cpu, \
    checkpoint_path, environment_faults";

/// [`RUN_COLS`] prefixed by the table, for joins.
fn qualified_run_cols() -> String {
    RUN_COLS
        .split(", ")
        .map(|c| format!("runs.{c} AS {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn decode_run(row: &dyn Cols) -> Result<RunRecord, RowError> {
    let r = Reader::new(row, "runs", "id")?;
    Ok(RunRecord {
        id: r.id.clone(),
        name: row.text("name")?,
        config_toml: row.text("config_toml")?,
        status: r.parsed("status", RunStatus::parse)?,
        created_at_ms: row.int("created_at_ms")?,
        finished_at_ms: row.opt_int("finished_at_ms")?,
        outputs: RunOutputs {
            cpu: row.opt_text("cpu")?,
            checkpoint_path: row.opt_text("checkpoint_path")?,
            environment_faults: row.opt_text("environment_faults")?,
        },
    })
}

const PROMPT_COLS: &str = "id, run_id, group_id, environment, split, task_json, state, \
    drop_reason, step_dispatched, consumed_at_step, dispatched_at_ms, generated_at_ms, \
    scored_at_ms, consumed_at_ms, dropped_at_ms";

fn decode_prompt(row: &dyn Cols) -> Result<PromptRecord, RowError> {
    let r = Reader::new(row, "prompts", "id")?;
    Ok(PromptRecord {
        id: r.id.clone(),
        run_id: row.text("run_id")?,
        group_id: row.text("group_id")?,
        environment: row.text("environment")?,
        split: r.parsed("split", Split::parse)?,
        task_json: row.text("task_json")?,
        state: r.parsed("state", PromptState::parse)?,
        drop_reason: row.opt_text("drop_reason")?,
        step_dispatched: r.u64("step_dispatched")?,
        consumed_at_step: r.opt_u64("consumed_at_step")?,
        dispatched_at_ms: row.int("dispatched_at_ms")?,
        generated_at_ms: row.opt_int("generated_at_ms")?,
        scored_at_ms: row.opt_int("scored_at_ms")?,
        consumed_at_ms: row.opt_int("consumed_at_ms")?,
        dropped_at_ms: row.opt_int("dropped_at_ms")?,
    })
}

const SUMMARY_COLS: &str = "id, run_id, prompt_id, group_id, environment, worker_id, \
    num_completion_tokens, min_policy_version, max_policy_version, finish_reason, reward, \
    status, failure_reason, consumed_at_step, created_at_ms";

fn decode_summary(row: &dyn Cols) -> Result<RolloutSummary, RowError> {
    let r = Reader::new(row, "trajectories", "id")?;
    Ok(RolloutSummary {
        id: r.id.clone(),
        run_id: row.text("run_id")?,
        prompt_id: row.text("prompt_id")?,
        group_id: row.text("group_id")?,
        environment: row.text("environment")?,
        worker_id: row.text("worker_id")?,
        num_completion_tokens: r.u64("num_completion_tokens")?,
        min_policy_version: r.opt_u64("min_policy_version")?,
        max_policy_version: r.opt_u64("max_policy_version")?,
        finish_reason: r.parsed("finish_reason", parse_finish_reason)?,
        reward: row.opt_real("reward")?,
        status: r.status()?,
        consumed_at_step: r.opt_u64("consumed_at_step")?,
        created_at_ms: row.int("created_at_ms")?,
    })
}

const TRAJECTORY_COLS: &str = "id, run_id, prompt_id, group_id, environment, worker_id, \
    prompt_token_ids, completion_token_ids, completion_text, logprobs, policy_versions, \
    finish_reason, reward, reward_components, reason, status, failure_reason, queue_ms, \
    generate_ms, score_ms, created_at_ms, consumed_at_step, stage_index";

fn decode_trajectory(row: &dyn Cols) -> Result<TrajectoryRecord, RowError> {
    let r = Reader::new(row, "trajectories", "id")?;
    let components = row.text("reward_components")?;
    let reward_components: BTreeMap<String, f64> =
        serde_json::from_str(&components).map_err(|e| r.corrupt("reward_components", e))?;
    Ok(TrajectoryRecord {
        trajectory: NewTrajectory {
            id: r.id.clone(),
            run_id: row.text("run_id")?,
            prompt_id: row.text("prompt_id")?,
            group_id: row.text("group_id")?,
            environment: row.text("environment")?,
            worker_id: row.text("worker_id")?,
            prompt_token_ids: r.blob("prompt_token_ids", codec::decode_u32s)?,
            completion_token_ids: r.blob("completion_token_ids", codec::decode_u32s)?,
            completion_text: row.text("completion_text")?,
            logprobs: r.blob("logprobs", codec::decode_f32s)?,
            policy_versions: r.blob("policy_versions", codec::decode_versions)?,
            finish_reason: r.parsed("finish_reason", parse_finish_reason)?,
            reward: row.opt_real("reward")?,
            reward_components,
            reason: row.opt_text("reason")?,
            status: r.status()?,
            timings: Timings {
                queue_ms: r.u64("queue_ms")?,
                generate_ms: r.u64("generate_ms")?,
                score_ms: r.u64("score_ms")?,
            },
            stage_index: r.opt_u64("stage_index")?,
        },
        created_at_ms: row.int("created_at_ms")?,
        consumed_at_step: r.opt_u64("consumed_at_step")?,
    })
}

fn decode_counts(row: &dyn Cols) -> Result<TrajectoryCounts, RowError> {
    let r = Reader::new(row, "runs", "run_id")?;
    Ok(TrajectoryCounts {
        run_id: r.id.clone(),
        total: r.u64("total")?,
        consumed: r.u64("consumed")?,
    })
}

const STEP_COLS: &str = "run_id, step, policy_version, loss, kl, entropy, grad_norm, \
    learning_rate, clip_fraction, num_tokens, num_trajectories, skipped, skip_reason, \
    created_at_ms, mean_abs_logprob_diff, stage_index";

const STAGE_COLS: &str = "run_id, stage_index, name, kind, status, first_step, last_step, metric, \
    metric_start, metric_end, trajectories, checkpoint_path, started_at_ms, finished_at_ms, \
    summary_json";

fn decode_stage(row: &dyn Cols) -> Result<StageRecord, RowError> {
    let run_id = row.text("run_id")?;
    let r = Reader::keyed(
        row,
        "stages",
        format!("{run_id}/{}", row.int("stage_index")?),
    );
    Ok(StageRecord {
        stage: NewStage {
            run_id,
            stage_index: r.u64("stage_index")?,
            name: row.text("name")?,
            kind: row.text("kind")?,
            first_step: r.u64("first_step")?,
            metric: row.opt_text("metric")?,
            metric_start: row.opt_real("metric_start")?,
        },
        status: r.parsed("status", StageStatus::parse)?,
        last_step: r.opt_u64("last_step")?,
        metric_end: row.opt_real("metric_end")?,
        trajectories: r.opt_u64("trajectories")?,
        checkpoint_path: row.opt_text("checkpoint_path")?,
        summary_json: row.opt_text("summary_json")?,
        started_at_ms: row.int("started_at_ms")?,
        finished_at_ms: row.opt_int("finished_at_ms")?,
    })
}

fn decode_step(row: &dyn Cols) -> Result<LearnerStepRecord, RowError> {
    let run_id = row.text("run_id")?;
    let r = Reader::keyed(
        row,
        "learner_steps",
        format!("{run_id}/{}", row.int("step")?),
    );
    let skipped = row.boolean("skipped")?;
    let skip_reason = row.opt_text("skip_reason")?;
    let skip_reason = match (skipped, skip_reason) {
        (false, _) => None,
        (true, reason) => Some(reason.unwrap_or_default()),
    };
    Ok(LearnerStepRecord {
        step: LearnerStep {
            run_id,
            step: r.u64("step")?,
            policy_version: r.u64("policy_version")?,
            loss: row.opt_real("loss")?,
            kl: row.opt_real("kl")?,
            entropy: row.opt_real("entropy")?,
            grad_norm: row.opt_real("grad_norm")?,
            learning_rate: row.opt_real("learning_rate")?,
            clip_fraction: row.opt_real("clip_fraction")?,
            num_tokens: r.u64("num_tokens")?,
            num_trajectories: r.u64("num_trajectories")?,
            mean_abs_logprob_diff: row.opt_real("mean_abs_logprob_diff")?,
            skip_reason,
        },
        stage_index: r.opt_u64("stage_index")?,
        created_at_ms: row.int("created_at_ms")?,
    })
}

fn decode_version(row: &dyn Cols) -> Result<PolicyVersionRecord, RowError> {
    let r = Reader::new(row, "policy_versions", "run_id")?;
    Ok(PolicyVersionRecord {
        version: PolicyVersion {
            run_id: r.id.clone(),
            version: r.u64("version")?,
            learner_step: r.u64("learner_step")?,
            weights_digest: row.text("weights_digest")?,
            num_bytes: r.u64("num_bytes")?,
        },
        stage_index: r.opt_u64("stage_index")?,
        created_at_ms: row.int("created_at_ms")?,
    })
}

fn decode_evaluation(row: &dyn Cols) -> Result<Evaluation, RowError> {
    let r = Reader::new(row, "evaluations", "run_id")?;
    let difficulty = r.u64("difficulty")?;
    Ok(Evaluation {
        run_id: r.id.clone(),
        policy_version: r.u64("policy_version")?,
        environment: row.text("environment")?,
        difficulty: u32::try_from(difficulty)
            .map_err(|_| r.corrupt("difficulty", format!("{difficulty} is not a level")))?,
        stage_index: r.opt_u64("stage_index")?,
        tasks: r.u64("tasks")?,
        correct: r.u64("correct")?,
        accuracy: r.real("accuracy")?,
        accuracy_lo: r.real("accuracy_lo")?,
        accuracy_hi: r.real("accuracy_hi")?,
        mean_reward: r.real("mean_reward")?,
        samples_per_task: r.u64("samples_per_task")?,
        effective_tasks: row.opt_real("effective_tasks")?,
    })
}

fn decode_event(row: &dyn Cols) -> Result<EventRecord, RowError> {
    Ok(EventRecord {
        id: row.int("id")?,
        run_id: row.text("run_id")?,
        kind: row.text("kind")?,
        payload_json: row.text("payload_json")?,
        created_at_ms: row.int("created_at_ms")?,
    })
}

impl Ledger {
    pub(super) async fn fetch<T>(
        &self,
        operation: &'static str,
        stmt: Stmt,
        decode: fn(&dyn Cols) -> Result<T, RowError>,
    ) -> Result<Vec<T>, LedgerError> {
        let backend = self.backend();
        self.inner
            .pools
            .fetch(stmt, decode)
            .await
            .map_err(|e| match e {
                FetchError::Sql(source) | FetchError::Decode(RowError::Sql(source)) => {
                    LedgerError::Query {
                        operation,
                        backend,
                        source,
                    }
                }
                FetchError::Decode(RowError::Corrupt {
                    table,
                    column,
                    id,
                    reason,
                }) => LedgerError::Corrupt {
                    table,
                    column,
                    id,
                    reason,
                },
            })
    }

    /// One run by id.
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>, LedgerError> {
        let stmt = Stmt::new(format!("SELECT {RUN_COLS} FROM runs WHERE id = $1")).bind(run_id);
        Ok(self.fetch("get_run", stmt, decode_run).await?.pop())
    }

    /// The `limit` most recently created runs, newest first.
    pub async fn list_runs(&self, limit: u32) -> Result<Vec<RunRecord>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT {RUN_COLS} FROM runs ORDER BY created_at_ms DESC, id DESC LIMIT $1"
        ))
        .bind(i64::from(limit));
        self.fetch("list_runs", stmt, decode_run).await
    }

    /// The run `orchestrator` created for `LaunchRun` request `request_id`, if any.
    pub async fn launched_run(
        &self,
        orchestrator: &str,
        request_id: &str,
    ) -> Result<Option<RunRecord>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT {} FROM runs JOIN launches ON launches.run_id = runs.id \
             WHERE launches.orchestrator = $1 AND launches.request_id = $2",
            qualified_run_cols()
        ))
        .bind(orchestrator)
        .bind(request_id);
        Ok(self.fetch("launched_run", stmt, decode_run).await?.pop())
    }

    /// Runs `orchestrator` launched that are in `status`, oldest launch first, with their
    /// request ids.
    pub async fn launched_runs(
        &self,
        orchestrator: &str,
        status: RunStatus,
    ) -> Result<Vec<(String, LaunchEval, RunRecord)>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT launches.request_id AS request_id, launches.eval_tasks AS eval_tasks, \
             launches.eval_every AS eval_every, {} FROM runs \
             JOIN launches ON launches.run_id = runs.id \
             WHERE launches.orchestrator = $1 AND runs.status = $2 \
             ORDER BY launches.launched_at_ms, runs.id",
            qualified_run_cols()
        ))
        .bind(orchestrator)
        .bind(status.as_str());
        self.fetch("launched_runs", stmt, |row| {
            let r = Reader::new(row, "runs", "id")?;
            let eval = LaunchEval {
                tasks: r.opt_u64("eval_tasks")?,
                every: r.opt_u64("eval_every")?,
            };
            Ok((row.text("request_id")?, eval, decode_run(row)?))
        })
        .await
    }

    /// One prompt by id.
    pub async fn get_prompt(&self, prompt_id: &str) -> Result<Option<PromptRecord>, LedgerError> {
        let stmt =
            Stmt::new(format!("SELECT {PROMPT_COLS} FROM prompts WHERE id = $1")).bind(prompt_id);
        Ok(self.fetch("get_prompt", stmt, decode_prompt).await?.pop())
    }

    /// How many prompts of a run are in each state (every state listed, in
    /// lifecycle order, zeros included).
    pub async fn prompt_state_counts(
        &self,
        run_id: &str,
    ) -> Result<Vec<(PromptState, u64)>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT state AS id, COUNT(*) AS n FROM prompts WHERE run_id = $1 GROUP BY state",
        )
        .bind(run_id);
        let found = self
            .fetch("prompt_state_counts", stmt, |row| {
                let r = Reader::new(row, "prompts", "id")?;
                Ok((r.parsed("id", PromptState::parse)?, r.u64("n")?))
            })
            .await?;
        Ok(PromptState::ALL
            .iter()
            .map(|s| {
                let n = found.iter().find(|(f, _)| f == s).map_or(0, |(_, n)| *n);
                (*s, n)
            })
            .collect())
    }

    /// Trajectories matching `filter`, newest first, without their arrays.
    pub async fn list_rollouts(
        &self,
        filter: &RolloutFilter,
    ) -> Result<Vec<RolloutSummary>, LedgerError> {
        let mut sql = format!("SELECT {SUMMARY_COLS} FROM trajectories WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if filter.run_id.is_some() {
            sql.push_str(&format!(" AND run_id = ${}", next()));
        }
        if filter.environment.is_some() {
            sql.push_str(&format!(" AND environment = ${}", next()));
        }
        if filter.min_reward.is_some() {
            sql.push_str(&format!(" AND reward >= ${}", next()));
        }
        if filter.max_reward.is_some() {
            sql.push_str(&format!(" AND reward <= ${}", next()));
        }
        if filter.stage_index.is_some() {
            sql.push_str(&format!(" AND stage_index = ${}", next()));
        }
        if filter.policy_version.is_some() {
            let (low, high) = (next(), next());
            sql.push_str(&format!(
                " AND min_policy_version <= ${low} AND max_policy_version >= ${high}"
            ));
        }
        if filter.finish_reason.is_some() {
            sql.push_str(&format!(" AND finish_reason = ${}", next()));
        }
        sql.push_str(&format!(
            " ORDER BY created_at_ms DESC, id DESC LIMIT ${}",
            next()
        ));
        let mut stmt = Stmt::new(sql);
        if let Some(run_id) = &filter.run_id {
            stmt = stmt.bind(run_id.as_str());
        }
        if let Some(env) = &filter.environment {
            stmt = stmt.bind(env.as_str());
        }
        if let Some(min) = filter.min_reward {
            stmt = stmt.bind(min);
        }
        if let Some(max) = filter.max_reward {
            stmt = stmt.bind(max);
        }
        if let Some(stage) = filter.stage_index {
            stmt = stmt.bind(stage as i64);
        }
        if let Some(version) = filter.policy_version {
            stmt = stmt.bind(version as i64).bind(version as i64);
        }
        if let Some(reason) = filter.finish_reason {
            stmt = stmt.bind(finish_reason_str(reason));
        }
        stmt = stmt.bind(i64::from(filter.limit));
        self.fetch("list_rollouts", stmt, decode_summary).await
    }

    /// One trajectory by id, arrays decoded.
    pub async fn get_trajectory(
        &self,
        trajectory_id: &str,
    ) -> Result<Option<TrajectoryRecord>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT {TRAJECTORY_COLS} FROM trajectories WHERE id = $1"
        ))
        .bind(trajectory_id);
        Ok(self
            .fetch("get_trajectory", stmt, decode_trajectory)
            .await?
            .pop())
    }

    /// Up to `limit` of run `run_id`'s own rollouts, by id: trajectories the workers generated
    /// (not reference solutions) for training prompts (not held-out ones), scored without a
    /// failure, with at least two completion tokens; arrays decoded. What an `mtp_heal` stage
    /// learns to draft.
    pub async fn policy_rollouts(
        &self,
        run_id: &str,
        limit: u32,
    ) -> Result<Vec<TrajectoryRecord>, LedgerError> {
        let cols = TRAJECTORY_COLS
            .split(", ")
            .map(|c| format!("t.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let stmt = Stmt::new(format!(
            "SELECT {cols} FROM trajectories t JOIN prompts p ON p.id = t.prompt_id \
             WHERE t.run_id = $1 AND t.status = 'ok' AND t.worker_id <> 'reference' \
             AND p.split = 'train' AND t.num_completion_tokens >= 2 \
             ORDER BY t.id LIMIT $2"
        ))
        .bind(run_id)
        .bind(i64::from(limit));
        self.fetch("policy_rollouts", stmt, decode_trajectory).await
    }

    /// For every run (runs without trajectories included, ordered by id): its
    /// trajectories, and those a learner step consumed.
    pub async fn trajectory_counts(&self) -> Result<Vec<TrajectoryCounts>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT r.id AS run_id, COUNT(t.id) AS total, COUNT(t.consumed_at_step) AS consumed \
             FROM runs r LEFT JOIN trajectories t ON t.run_id = r.id \
             GROUP BY r.id ORDER BY r.id",
        );
        self.fetch("trajectory_counts", stmt, decode_counts).await
    }

    /// A run's learner steps, by step.
    pub async fn list_learner_steps(
        &self,
        run_id: &str,
    ) -> Result<Vec<LearnerStepRecord>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT {STEP_COLS} FROM learner_steps WHERE run_id = $1 ORDER BY step"
        ))
        .bind(run_id);
        self.fetch("list_learner_steps", stmt, decode_step).await
    }

    /// A run's newest learner step, if it has one.
    pub async fn last_learner_step(
        &self,
        run_id: &str,
    ) -> Result<Option<LearnerStepRecord>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT {STEP_COLS} FROM learner_steps WHERE run_id = $1 ORDER BY step DESC LIMIT 1"
        ))
        .bind(run_id);
        Ok(self
            .fetch("last_learner_step", stmt, decode_step)
            .await?
            .pop())
    }

    /// A run's stages, in order.
    pub async fn list_stages(&self, run_id: &str) -> Result<Vec<StageRecord>, LedgerError> {
        let stmt = Stmt::new(format!(
            "SELECT {STAGE_COLS} FROM stages WHERE run_id = $1 ORDER BY stage_index"
        ))
        .bind(run_id);
        self.fetch("list_stages", stmt, decode_stage).await
    }

    /// A run's published policy versions, by version.
    pub async fn list_policy_versions(
        &self,
        run_id: &str,
    ) -> Result<Vec<PolicyVersionRecord>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT run_id, version, learner_step, weights_digest, num_bytes, stage_index, \
             created_at_ms FROM policy_versions WHERE run_id = $1 ORDER BY version",
        )
        .bind(run_id);
        self.fetch("list_policy_versions", stmt, decode_version)
            .await
    }

    /// A run's mean reward per step and environment (the `reward_by_step` view), by step.
    pub async fn reward_by_step(&self, run_id: &str) -> Result<Vec<RewardByStep>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT run_id, stage_index, step, environment, trajectories, mean_reward, solved \
             FROM reward_by_step WHERE run_id = $1 AND step IS NOT NULL \
             ORDER BY step, environment",
        )
        .bind(run_id);
        self.fetch("reward_by_step", stmt, |row| {
            let r = Reader::new(row, "reward_by_step", "run_id")?;
            Ok(RewardByStep {
                stage_index: r.opt_u64("stage_index")?,
                step: r.u64("step")?,
                environment: row.text("environment")?,
                trajectories: r.u64("trajectories")?,
                mean_reward: r.real("mean_reward")?,
                solved: r.real("solved")?,
            })
        })
        .await
    }

    /// A run's trained trajectories and tokens by lag (the `trained_staleness` view, over all
    /// its stages and environments), by lag.
    pub async fn trained_staleness(
        &self,
        run_id: &str,
    ) -> Result<Vec<StalenessCount>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT run_id, lag, CAST(SUM(trajectories) AS BIGINT) AS trajectories, \
             CAST(SUM(tokens) AS BIGINT) AS tokens FROM trained_staleness \
             WHERE run_id = $1 GROUP BY run_id, lag ORDER BY lag",
        )
        .bind(run_id);
        self.fetch("trained_staleness", stmt, |row| {
            let r = Reader::new(row, "trained_staleness", "run_id")?;
            Ok(StalenessCount {
                lag: row.int("lag")?,
                trajectories: r.u64("trajectories")?,
                tokens: r.u64("tokens")?,
            })
        })
        .await
    }

    /// A run's failures per environment (the `faults_by_environment` view), by environment.
    pub async fn faults_by_environment(
        &self,
        run_id: &str,
    ) -> Result<Vec<EnvironmentFaults>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT run_id, environment, trajectories, failed_trajectories, dropped_prompts, \
             last_failure FROM faults_by_environment WHERE run_id = $1 ORDER BY environment",
        )
        .bind(run_id);
        self.fetch("faults_by_environment", stmt, |row| {
            let r = Reader::new(row, "faults_by_environment", "run_id")?;
            Ok(EnvironmentFaults {
                environment: row.text("environment")?,
                trajectories: r.u64("trajectories")?,
                failed_trajectories: r.u64("failed_trajectories")?,
                dropped_prompts: r.u64("dropped_prompts")?,
                last_failure: row.opt_text("last_failure")?,
            })
        })
        .await
    }

    /// How each of a run's policy versions reached the workers (the `weight_sync` view), by
    /// version.
    pub async fn weight_sync(&self, run_id: &str) -> Result<Vec<WeightSync>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT run_id, policy_version, transfers, bytes, mean_seconds, max_seconds, \
             seconds_to_last_worker FROM weight_sync WHERE run_id = $1 ORDER BY policy_version",
        )
        .bind(run_id);
        self.fetch("weight_sync", stmt, |row| {
            let r = Reader::new(row, "weight_sync", "run_id")?;
            Ok(WeightSync {
                policy_version: r.u64("policy_version")?,
                transfers: r.u64("transfers")?,
                bytes: r.u64("bytes")?,
                mean_seconds: r.real("mean_seconds")?,
                max_seconds: r.real("max_seconds")?,
                seconds_to_last_worker: r.real("seconds_to_last_worker")?,
            })
        })
        .await
    }

    /// A run's held-out evaluations, by policy version, then environment and difficulty: its
    /// learning curve.
    pub async fn list_evaluations(&self, run_id: &str) -> Result<Vec<Evaluation>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT run_id, policy_version, environment, difficulty, stage_index, tasks, \
             correct, accuracy, accuracy_lo, accuracy_hi, mean_reward, samples_per_task, \
             effective_tasks FROM evaluations \
             WHERE run_id = $1 ORDER BY policy_version, environment, difficulty",
        )
        .bind(run_id);
        self.fetch("list_evaluations", stmt, decode_evaluation)
            .await
    }

    /// Up to `limit` events of a run with an id above `after_id` (0 for the
    /// start), oldest first: pass the last id seen to resume.
    pub async fn list_events(
        &self,
        run_id: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, LedgerError> {
        let stmt = Stmt::new(
            "SELECT id, run_id, kind, payload_json, created_at_ms FROM events \
             WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(run_id)
        .bind(after_id)
        .bind(i64::from(limit));
        self.fetch("list_events", stmt, decode_event).await
    }

    /// The largest lag of any trajectory one run trained on: the step that consumed it (the
    /// version of the weights the learner trained it against, into the next version) minus the
    /// oldest policy version among its tokens. 0 when no generated trajectory was trained on.
    pub async fn max_trained_lag(&self, run_id: &str) -> Result<u64, LedgerError> {
        let stmt = Stmt::new(
            "SELECT MAX(consumed_at_step - min_policy_version) AS lag FROM trajectories \
             WHERE run_id = $1 AND consumed_at_step IS NOT NULL \
             AND min_policy_version IS NOT NULL",
        )
        .bind(run_id);
        let lags = self
            .fetch("max_trained_lag", stmt, |row| {
                Ok(row.opt_int("lag")?.unwrap_or(0).max(0) as u64)
            })
            .await?;
        Ok(lags.first().copied().unwrap_or(0))
    }

    /// Trajectories consumed by learner steps of one run (0 for an unknown run).
    pub async fn count_consumed(&self, run_id: &str) -> Result<u64, LedgerError> {
        let stmt = Stmt::new(
            "SELECT COUNT(*) AS n FROM trajectories \
             WHERE run_id = $1 AND consumed_at_step IS NOT NULL",
        )
        .bind(run_id);
        let counts = self
            .fetch("count_consumed", stmt, |row| {
                Reader::keyed(row, "trajectories", String::new()).u64("n")
            })
            .await?;
        Ok(counts.first().copied().unwrap_or(0))
    }
}
