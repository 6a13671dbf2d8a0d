//! The background writer: every write of the ledger goes through it.
//!
//! Callers enqueue [`WriteOp`]s on a bounded channel and return as soon as the
//! op is queued (waiting only when the queue is full: backpressure). One task
//! drains the queue and commits ops in batches, one transaction per batch, when
//! the batch holds `max_batch_rows` rows or `flush_interval` after its first op,
//! whichever comes first. The channel is FIFO, so ops commit in the order they
//! were sent, and a flush marker is answered only after everything sent before
//! it is committed.
//!
//! If a batch's transaction fails, each op of the batch is retried in its own
//! transaction, so one bad op (a foreign-key violation, say) loses only itself;
//! failures are counted and reported by the next flush or close.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::error::LedgerError;
use super::sql::{Pools, Stmt, placeholders};
use super::types::{
    Evaluation, LaunchEval, LearnerStep, NewPrompt, NewRun, NewStage, NewTrajectory, PolicyVersion,
    RunOutputs, RunStatus, StageEnd, WeightTransfer, finish_reason_str,
};
use super::{codec, to_i64};
use crate::metrics as names;

/// Rows per multi-row `INSERT` (keeps well under SQLite's 32766 parameters).
const ROWS_PER_INSERT: usize = 100;
/// Ids per `IN (...)` list.
const IDS_PER_UPDATE: usize = 500;

/// A prompt state change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Transition {
    Generated,
    Scored,
    Consumed { step: u64 },
    Dropped { reason: String },
}

/// One write, as requested by one [`Ledger`](super::Ledger) method call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WriteOp {
    InsertRun {
        run: NewRun,
        at_ms: i64,
    },
    /// A run and the launch that created it, together.
    Launch {
        run: NewRun,
        orchestrator: String,
        request_id: String,
        eval: LaunchEval,
        at_ms: i64,
    },
    SetRunStatus {
        run_id: String,
        status: RunStatus,
        at_ms: i64,
    },
    PromptsDispatched {
        prompts: Vec<NewPrompt>,
        at_ms: i64,
    },
    PromptsTransition {
        ids: Vec<String>,
        to: Transition,
        at_ms: i64,
    },
    Trajectories {
        trajectories: Vec<NewTrajectory>,
        at_ms: i64,
    },
    LearnerStep {
        step: LearnerStep,
        at_ms: i64,
    },
    Evaluation {
        evaluation: Evaluation,
        at_ms: i64,
    },
    PolicyVersion {
        version: PolicyVersion,
        at_ms: i64,
    },
    WeightTransfers {
        transfers: Vec<WeightTransfer>,
    },
    Event {
        run_id: String,
        kind: String,
        payload_json: String,
        at_ms: i64,
    },
    StageStarted {
        stage: NewStage,
        at_ms: i64,
    },
    Rewind {
        run_id: String,
        version: u64,
        reason: String,
        at_ms: i64,
    },
    DropInFlight {
        run_id: String,
        reason: String,
        at_ms: i64,
    },
    ForgetLearnerSteps {
        run_id: String,
        version: u64,
    },
    StageFinished {
        end: StageEnd,
        at_ms: i64,
    },
    RunOutputs {
        run_id: String,
        outputs: RunOutputs,
    },
}

fn insert_run(run: &NewRun, at_ms: i64) -> Stmt {
    Stmt::new(
        "INSERT INTO runs (id, name, config_toml, status, created_at_ms, finished_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(run.id.as_str())
    .bind(run.name.as_str())
    .bind(run.config_toml.as_str())
    .bind(run.status.as_str())
    .bind(at_ms)
    .bind(run.status.is_terminal().then_some(at_ms))
}

impl WriteOp {
    /// Rows it writes, for batch sizing.
    fn rows(&self) -> usize {
        match self {
            WriteOp::PromptsDispatched { prompts, .. } => prompts.len().max(1),
            WriteOp::PromptsTransition { ids, .. } => ids.len().max(1),
            WriteOp::Trajectories { trajectories, .. } => trajectories.len().max(1),
            _ => 1,
        }
    }

    /// A short description for error reports.
    fn describe(&self) -> String {
        match self {
            WriteOp::InsertRun { run, .. } => format!("insert_run({})", run.id),
            WriteOp::Launch {
                run, request_id, ..
            } => format!("record_launch({}, request {request_id})", run.id),
            WriteOp::SetRunStatus { run_id, status, .. } => {
                format!("set_run_status({run_id}, {status})")
            }
            WriteOp::PromptsDispatched { prompts, .. } => format!(
                "record_prompts_dispatched({} prompts, first {:?})",
                prompts.len(),
                prompts.first().map(|p| p.id.as_str())
            ),
            WriteOp::PromptsTransition { ids, to, .. } => {
                format!(
                    "mark {to:?} ({} prompts, first {:?})",
                    ids.len(),
                    ids.first()
                )
            }
            WriteOp::Trajectories { trajectories, .. } => format!(
                "insert_trajectories({} trajectories, first {:?})",
                trajectories.len(),
                trajectories.first().map(|t| t.id.as_str())
            ),
            WriteOp::LearnerStep { step, .. } => {
                format!("insert_learner_step({}, step {})", step.run_id, step.step)
            }
            WriteOp::Evaluation { evaluation, .. } => format!(
                "record_evaluation({}, version {}, {})",
                evaluation.run_id, evaluation.policy_version, evaluation.environment
            ),
            WriteOp::PolicyVersion { version, .. } => format!(
                "record_policy_version({}, version {})",
                version.run_id, version.version
            ),
            WriteOp::WeightTransfers { transfers } => {
                format!("record_weight_transfers({} rows)", transfers.len())
            }
            WriteOp::Event { run_id, kind, .. } => format!("record_event({run_id}, {kind})"),
            WriteOp::Rewind {
                run_id, version, ..
            } => format!("rewind({run_id}, {version})"),
            WriteOp::DropInFlight { run_id, .. } => format!("drop_in_flight({run_id})"),
            WriteOp::ForgetLearnerSteps { run_id, version } => {
                format!("forget_learner_steps({run_id}, {version})")
            }
            WriteOp::StageStarted { stage, .. } => {
                format!("start_stage({}, {})", stage.run_id, stage.stage_index)
            }
            WriteOp::StageFinished { end, .. } => {
                format!("finish_stage({}, {})", end.run_id, end.stage_index)
            }
            WriteOp::RunOutputs { run_id, .. } => format!("record_run_outputs({run_id})"),
        }
    }

    /// The statements that perform it.
    pub(crate) fn statements(&self) -> Result<Vec<Stmt>, LedgerError> {
        Ok(match self {
            WriteOp::InsertRun { run, at_ms } => vec![insert_run(run, *at_ms)],
            WriteOp::Launch {
                run,
                orchestrator,
                request_id,
                eval,
                at_ms,
            } => vec![
                // A repeated request writes nothing, not even a run without a launch.
                Stmt::new(
                    "INSERT INTO runs (id, name, config_toml, status, created_at_ms, finished_at_ms) \
                     SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS \
                     (SELECT 1 FROM launches WHERE orchestrator = $7 AND request_id = $8) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(run.id.as_str())
                .bind(run.name.as_str())
                .bind(run.config_toml.as_str())
                .bind(run.status.as_str())
                .bind(*at_ms)
                .bind(run.status.is_terminal().then_some(*at_ms))
                .bind(orchestrator.as_str())
                .bind(request_id.as_str()),
                Stmt::new(
                    "INSERT INTO launches (orchestrator, request_id, run_id, launched_at_ms, \
                     eval_tasks, eval_every) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (orchestrator, request_id) DO NOTHING",
                )
                .bind(orchestrator.as_str())
                .bind(request_id.as_str())
                .bind(run.id.as_str())
                .bind(*at_ms)
                .bind(opt_i64("eval_tasks", eval.tasks)?)
                .bind(opt_i64("eval_every", eval.every)?),
            ],
            WriteOp::SetRunStatus {
                run_id,
                status,
                at_ms,
            } => {
                let stmt = if status.is_terminal() {
                    Stmt::new(
                        "UPDATE runs SET status = $1, \
                         finished_at_ms = COALESCE(finished_at_ms, $2) WHERE id = $3",
                    )
                    .bind(status.as_str())
                    .bind(*at_ms)
                } else {
                    Stmt::new("UPDATE runs SET status = $1, finished_at_ms = NULL WHERE id = $2")
                        .bind(status.as_str())
                };
                vec![stmt.bind(run_id.as_str())]
            }
            WriteOp::PromptsDispatched { prompts, at_ms } => {
                let mut out = Vec::new();
                for chunk in prompts.chunks(ROWS_PER_INSERT) {
                    let mut s = Stmt::new(format!(
                        "INSERT INTO prompts (id, run_id, group_id, environment, split, task_json, \
                         state, step_dispatched, dispatched_at_ms, stage_index) VALUES {} \
                         ON CONFLICT (id) DO NOTHING",
                        placeholders(1, chunk.len(), 10)
                    ));
                    for p in chunk {
                        s = s
                            .bind(p.id.as_str())
                            .bind(p.run_id.as_str())
                            .bind(p.group_id.as_str())
                            .bind(p.environment.as_str())
                            .bind(p.split.as_str())
                            .bind(p.task_json.as_str())
                            .bind("dispatched")
                            .bind(to_i64("step_dispatched", p.step_dispatched)?)
                            .bind(*at_ms)
                            .bind(opt_i64("stage_index", p.stage_index)?);
                    }
                    out.push(s);
                }
                out
            }
            WriteOp::PromptsTransition { ids, to, at_ms } => {
                let mut out = Vec::new();
                for chunk in ids.chunks(IDS_PER_UPDATE) {
                    out.extend(transition_statements(chunk, to, *at_ms)?);
                }
                out
            }
            WriteOp::Trajectories {
                trajectories,
                at_ms,
            } => {
                let mut out = Vec::new();
                for chunk in trajectories.chunks(ROWS_PER_INSERT) {
                    let mut s = Stmt::new(format!(
                        "INSERT INTO trajectories (id, run_id, prompt_id, group_id, environment, \
                         worker_id, prompt_token_ids, completion_token_ids, num_completion_tokens, \
                         completion_text, logprobs, policy_versions, min_policy_version, \
                         max_policy_version, finish_reason, reward, reward_components, reason, \
                         status, failure_reason, queue_ms, generate_ms, score_ms, created_at_ms, \
                         stage_index) VALUES {} ON CONFLICT (id) DO NOTHING",
                        placeholders(1, chunk.len(), 25)
                    ));
                    for t in chunk {
                        s = bind_trajectory(s, t, *at_ms)?;
                    }
                    out.push(s);
                }
                out
            }
            WriteOp::LearnerStep { step, at_ms } => vec![
                Stmt::new(
                    // A step belongs to the last stage that began before it: stages are
                    // recorded before any of their groups reach the learner, and the writer
                    // commits in order.
                    "INSERT INTO learner_steps (run_id, step, policy_version, loss, kl, entropy, \
                     grad_norm, learning_rate, clip_fraction, num_tokens, num_trajectories, \
                     skipped, skip_reason, created_at_ms, mean_abs_logprob_diff, stage_index) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                     (SELECT MAX(stage_index) FROM stages WHERE run_id = $1 AND first_step < $2)) \
                     ON CONFLICT (run_id, step) DO NOTHING",
                )
                .bind(step.run_id.as_str())
                .bind(to_i64("step", step.step)?)
                .bind(to_i64("policy_version", step.policy_version)?)
                .bind(step.loss)
                .bind(step.kl)
                .bind(step.entropy)
                .bind(step.grad_norm)
                .bind(step.learning_rate)
                .bind(step.clip_fraction)
                .bind(to_i64("num_tokens", step.num_tokens)?)
                .bind(to_i64("num_trajectories", step.num_trajectories)?)
                .bind(step.skip_reason.is_some())
                .bind(step.skip_reason.as_deref())
                .bind(*at_ms)
                .bind(step.mean_abs_logprob_diff),
            ],
            WriteOp::PolicyVersion { version, at_ms } => vec![
                Stmt::new(
                    // A version belongs to the stage its step does (see learner steps).
                    "INSERT INTO policy_versions (run_id, version, learner_step, weights_digest, \
                     num_bytes, created_at_ms, stage_index) VALUES ($1, $2, $3, $4, $5, $6, \
                     (SELECT MAX(stage_index) FROM stages WHERE run_id = $1 AND first_step < $3)) \
                     ON CONFLICT (run_id, version) DO NOTHING",
                )
                .bind(version.run_id.as_str())
                .bind(to_i64("version", version.version)?)
                .bind(to_i64("learner_step", version.learner_step)?)
                .bind(version.weights_digest.as_str())
                .bind(to_i64("num_bytes", version.num_bytes)?)
                .bind(*at_ms),
            ],
            WriteOp::WeightTransfers { transfers } => transfers
                .iter()
                .map(|t| {
                    Ok(Stmt::new(
                        "INSERT INTO weight_transfers (run_id, requester_id, policy_version, \
                         num_bytes, seconds, finished_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(t.run_id.as_str())
                    .bind(t.requester_id.as_str())
                    .bind(to_i64("policy_version", t.policy_version)?)
                    .bind(to_i64("num_bytes", t.num_bytes)?)
                    .bind(t.seconds)
                    .bind(t.finished_at_ms))
                })
                .collect::<Result<_, LedgerError>>()?,
            WriteOp::Evaluation { evaluation: e, at_ms } => vec![
                Stmt::new(
                    "INSERT INTO evaluations (run_id, policy_version, environment, difficulty, \
                     stage_index, tasks, correct, accuracy, accuracy_lo, accuracy_hi, \
                     mean_reward, created_at_ms, samples_per_task, effective_tasks) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                     ON CONFLICT (run_id, policy_version, environment, difficulty) DO NOTHING",
                )
                .bind(e.run_id.as_str())
                .bind(to_i64("policy_version", e.policy_version)?)
                .bind(e.environment.as_str())
                .bind(i64::from(e.difficulty))
                .bind(opt_i64("stage_index", e.stage_index)?)
                .bind(to_i64("tasks", e.tasks)?)
                .bind(to_i64("correct", e.correct)?)
                .bind(e.accuracy)
                .bind(e.accuracy_lo)
                .bind(e.accuracy_hi)
                .bind(e.mean_reward)
                .bind(*at_ms)
                .bind(to_i64("samples_per_task", e.samples_per_task)?)
                .bind(e.effective_tasks),
            ],
            WriteOp::StageStarted { stage, at_ms } => vec![
                // A stage begun again (a resumed run) starts over as running.
                Stmt::new(
                    "INSERT INTO stages (run_id, stage_index, name, kind, status, first_step, \
                     metric, metric_start, started_at_ms) \
                     VALUES ($1, $2, $3, $4, 'running', $5, $6, $7, $8) \
                     ON CONFLICT (run_id, stage_index) DO UPDATE SET status = 'running', \
                     finished_at_ms = NULL",
                )
                .bind(stage.run_id.as_str())
                .bind(to_i64("stage_index", stage.stage_index)?)
                .bind(stage.name.as_str())
                .bind(stage.kind.as_str())
                .bind(to_i64("first_step", stage.first_step)?)
                .bind(stage.metric.as_deref())
                .bind(stage.metric_start)
                .bind(*at_ms),
            ],
            WriteOp::StageFinished { end, at_ms } => vec![
                Stmt::new(
                    "UPDATE stages SET status = $1, last_step = $2, metric_end = $3, \
                     trajectories = $4, checkpoint_path = $5, finished_at_ms = $6, \
                     summary_json = $7, metric_start = COALESCE($10, metric_start) \
                     WHERE run_id = $8 AND stage_index = $9",
                )
                .bind(end.status.as_str())
                .bind(to_i64("last_step", end.last_step)?)
                .bind(end.metric_end)
                .bind(to_i64("trajectories", end.trajectories)?)
                .bind(end.checkpoint_path.as_deref())
                .bind(*at_ms)
                .bind(end.summary_json.as_deref())
                .bind(end.run_id.as_str())
                .bind(to_i64("stage_index", end.stage_index)?)
                .bind(end.metric_start),
            ],
            WriteOp::RunOutputs { run_id, outputs } => vec![
                Stmt::new(
                    "UPDATE runs SET cpu = $1, checkpoint_path = $2, environment_faults = $3 \
                     WHERE id = $4",
                )
                .bind(outputs.cpu.as_deref())
                .bind(outputs.checkpoint_path.as_deref())
                .bind(outputs.environment_faults.as_deref())
                .bind(run_id.as_str()),
            ],
            WriteOp::Rewind {
                run_id,
                version,
                reason,
                at_ms,
            } => {
                // Groups of steps `version` and later were trained into state that is gone.
                let v = to_i64("version", *version)?;
                vec![
                    Stmt::new(
                        "UPDATE trajectories SET consumed_at_step = NULL \
                         WHERE run_id = $1 AND consumed_at_step >= $2",
                    )
                    .bind(run_id.as_str())
                    .bind(v),
                    Stmt::new(
                        "UPDATE prompts SET state = 'dropped', drop_reason = $1, \
                         consumed_at_step = NULL, consumed_at_ms = NULL, dropped_at_ms = $2 \
                         WHERE run_id = $3 AND state = 'consumed' AND consumed_at_step >= $4",
                    )
                    .bind(reason.as_str())
                    .bind(*at_ms)
                    .bind(run_id.as_str())
                    .bind(v),
                    drop_in_flight(run_id, &format!("in flight when the run stopped; {reason}"), *at_ms),
                ]
                .into_iter()
                .chain(forget_steps_after(run_id, v))
                .chain([Stmt::new(
                    "UPDATE runs SET status = 'running', finished_at_ms = NULL WHERE id = $1",
                )
                .bind(run_id.as_str())])
                .collect()
            }
            WriteOp::DropInFlight {
                run_id,
                reason,
                at_ms,
            } => vec![drop_in_flight(run_id, reason, *at_ms)],
            WriteOp::ForgetLearnerSteps { run_id, version } => {
                // The learner restarted from `version` and records the later steps again.
                forget_steps_after(run_id, to_i64("version", *version)?).to_vec()
            }
            WriteOp::Event {
                run_id,
                kind,
                payload_json,
                at_ms,
            } => vec![
                Stmt::new(
                    "INSERT INTO events (run_id, kind, payload_json, created_at_ms) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(run_id.as_str())
                .bind(kind.as_str())
                .bind(payload_json.as_str())
                .bind(*at_ms),
            ],
        })
    }
}

/// Drops every prompt of `run_id` still in flight, with `reason`.
/// Deletes run `run_id`'s learner steps, policy versions and weight transfers after version `v`
/// (a rewind, or a learner that came back from a checkpoint at `v`).
fn forget_steps_after(run_id: &str, v: i64) -> [Stmt; 3] {
    [
        Stmt::new("DELETE FROM learner_steps WHERE run_id = $1 AND step > $2")
            .bind(run_id)
            .bind(v),
        Stmt::new("DELETE FROM policy_versions WHERE run_id = $1 AND version > $2")
            .bind(run_id)
            .bind(v),
        Stmt::new("DELETE FROM weight_transfers WHERE run_id = $1 AND policy_version > $2")
            .bind(run_id)
            .bind(v),
    ]
}

fn drop_in_flight(run_id: &str, reason: &str, at_ms: i64) -> Stmt {
    Stmt::new(
        "UPDATE prompts SET state = 'dropped', drop_reason = $1, dropped_at_ms = $2 \
         WHERE run_id = $3 AND state IN ('dispatched', 'generated', 'scored')",
    )
    .bind(reason)
    .bind(at_ms)
    .bind(run_id)
}

fn id_list(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn transition_statements(
    ids: &[String],
    to: &Transition,
    at_ms: i64,
) -> Result<Vec<Stmt>, LedgerError> {
    const LIVE: &str = "('dispatched', 'generated', 'scored')";
    let with_ids = |mut s: Stmt| {
        for id in ids {
            s = s.bind(id.as_str());
        }
        s
    };
    Ok(match to {
        Transition::Generated => vec![with_ids(
            Stmt::new(format!(
                "UPDATE prompts SET state = 'generated', generated_at_ms = $1 \
                 WHERE state = 'dispatched' AND id IN ({})",
                id_list(2, ids.len())
            ))
            .bind(at_ms),
        )],
        Transition::Scored => vec![with_ids(
            Stmt::new(format!(
                "UPDATE prompts SET state = 'scored', scored_at_ms = $1 \
                 WHERE state IN ('dispatched', 'generated') AND id IN ({})",
                id_list(2, ids.len())
            ))
            .bind(at_ms),
        )],
        Transition::Consumed { step } => {
            let step = to_i64("consumed_at_step", *step)?;
            vec![
                with_ids(
                    Stmt::new(format!(
                        "UPDATE prompts SET state = 'consumed', consumed_at_ms = $1, \
                         consumed_at_step = $2 WHERE state IN {LIVE} AND id IN ({})",
                        id_list(3, ids.len())
                    ))
                    .bind(at_ms)
                    .bind(step),
                ),
                with_ids(
                    Stmt::new(format!(
                        "UPDATE trajectories SET consumed_at_step = $1 \
                         WHERE consumed_at_step IS NULL AND status = 'ok' AND prompt_id IN \
                         (SELECT id FROM prompts WHERE state = 'consumed' AND id IN ({}))",
                        id_list(2, ids.len())
                    ))
                    .bind(step),
                ),
            ]
        }
        Transition::Dropped { reason } => vec![with_ids(
            Stmt::new(format!(
                "UPDATE prompts SET state = 'dropped', drop_reason = $1, dropped_at_ms = $2 \
                 WHERE state IN {LIVE} AND id IN ({})",
                id_list(3, ids.len())
            ))
            .bind(reason.as_str())
            .bind(at_ms),
        )],
    })
}

fn bind_trajectory(s: Stmt, t: &NewTrajectory, at_ms: i64) -> Result<Stmt, LedgerError> {
    let min_v = t.policy_versions.iter().min().copied();
    let max_v = t.policy_versions.iter().max().copied();
    let opt = |field, v: Option<u64>| v.map(|v| to_i64(field, v)).transpose();
    let components =
        serde_json::to_string(&t.reward_components).expect("a map of f64 always serialises");
    Ok(s.bind(t.id.as_str())
        .bind(t.run_id.as_str())
        .bind(t.prompt_id.as_str())
        .bind(t.group_id.as_str())
        .bind(t.environment.as_str())
        .bind(t.worker_id.as_str())
        .bind(codec::encode_u32s(&t.prompt_token_ids))
        .bind(codec::encode_u32s(&t.completion_token_ids))
        .bind(to_i64(
            "num_completion_tokens",
            t.completion_token_ids.len() as u64,
        )?)
        .bind(t.completion_text.as_str())
        .bind(codec::encode_f32s(&t.logprobs))
        .bind(codec::encode_versions(&t.policy_versions))
        .bind(opt("min_policy_version", min_v)?)
        .bind(opt("max_policy_version", max_v)?)
        .bind(finish_reason_str(t.finish_reason))
        .bind(t.reward)
        .bind(components)
        .bind(t.reason.as_deref())
        .bind(t.status.as_str())
        .bind(t.status.reason())
        .bind(to_i64("queue_ms", t.timings.queue_ms)?)
        .bind(to_i64("generate_ms", t.timings.generate_ms)?)
        .bind(to_i64("score_ms", t.timings.score_ms)?)
        .bind(at_ms)
        .bind(opt_i64("stage_index", t.stage_index)?))
}

fn opt_i64(field: &'static str, v: Option<u64>) -> Result<Option<i64>, LedgerError> {
    v.map(|v| to_i64(field, v)).transpose()
}

/// What the writer task receives.
pub(crate) enum Command {
    Write(WriteOp),
    /// Commit everything received so far, then answer.
    Flush(oneshot::Sender<Result<(), LedgerError>>),
    /// Commit everything, refuse further writes, answer and stop.
    Close(oneshot::Sender<Result<(), LedgerError>>),
}

/// Failures since the last flush.
#[derive(Default)]
struct Failures {
    count: usize,
    first: Option<String>,
}

impl Failures {
    fn record(&mut self, what: String) {
        self.count += 1;
        self.first.get_or_insert(what);
    }

    fn take(&mut self) -> Result<(), LedgerError> {
        let f = std::mem::take(self);
        match f.first {
            None => Ok(()),
            Some(first) => Err(LedgerError::WriteFailed {
                failed: f.count,
                first,
            }),
        }
    }
}

/// Batch limits of the writer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_rows: usize,
    pub interval: Duration,
    /// How long a batch whose commit fails for a reason that may pass (the database restarting,
    /// a dropped connection) is tried again before its writes count as failed. Meanwhile the
    /// queue fills and writers wait: backpressure, not lost rows.
    pub retry_for: Duration,
}

/// The writes gathered since the last commit.
#[derive(Default)]
struct Batch {
    ops: Vec<WriteOp>,
    rows: usize,
    retry_for: Duration,
    /// When its first write arrived: the batch commits `interval` later at the latest, and
    /// the wait until its commit is the ledger's write lag.
    opened: Option<Instant>,
}

impl Batch {
    fn push(&mut self, op: WriteOp) {
        self.opened.get_or_insert_with(Instant::now);
        self.rows += op.rows();
        self.ops.push(op);
    }

    /// Commits what is gathered (nothing when empty), then records the write lag and the
    /// writes still `queued` behind it.
    async fn commit(&mut self, pools: &Pools, failures: &mut Failures, queued: usize) {
        let Some(opened) = self.opened.take() else {
            return;
        };
        self.rows = 0;
        commit(
            pools,
            std::mem::take(&mut self.ops),
            failures,
            self.retry_for,
        )
        .await;
        metrics::histogram!(names::LEDGER_WRITE_LAG_SECONDS).record(opened.elapsed().as_secs_f64());
        metrics::gauge!(names::LEDGER_PENDING_WRITES).set(queued as f64);
    }
}

/// The writer task: runs until a `Close` command or until every sender is gone.
pub(crate) async fn run(pools: Pools, mut rx: mpsc::Receiver<Command>, limits: BatchLimits) {
    let mut batch = Batch {
        retry_for: limits.retry_for,
        ..Batch::default()
    };
    let mut failures = Failures::default();
    loop {
        let cmd = match batch.opened {
            None => rx.recv().await,
            Some(opened) => {
                match tokio::time::timeout_at(opened + limits.interval, rx.recv()).await {
                    Ok(cmd) => cmd,
                    Err(_elapsed) => {
                        batch.commit(&pools, &mut failures, rx.len()).await;
                        continue;
                    }
                }
            }
        };
        match cmd {
            Some(Command::Write(op)) => {
                batch.push(op);
                metrics::gauge!(names::LEDGER_PENDING_WRITES)
                    .set((batch.ops.len() + rx.len()) as f64);
                if batch.rows >= limits.max_rows {
                    batch.commit(&pools, &mut failures, rx.len()).await;
                }
            }
            Some(Command::Flush(reply)) => {
                batch.commit(&pools, &mut failures, rx.len()).await;
                let _ = reply.send(failures.take());
            }
            Some(Command::Close(reply)) => {
                rx.close();
                // Ops other handles queued before the close still get written.
                let mut flushes = Vec::new();
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Command::Write(op) => batch.push(op),
                        Command::Flush(r) | Command::Close(r) => flushes.push(r),
                    }
                }
                batch.commit(&pools, &mut failures, 0).await;
                let result = failures.take();
                for r in flushes {
                    let _ = r.send(Ok(()));
                }
                let _ = reply.send(result);
                return;
            }
            None => {
                batch.commit(&pools, &mut failures, 0).await;
                return;
            }
        }
    }
}

/// Whether a failed commit may succeed if tried again: the connection or the server went away
/// (a restart, a network blip, a busy SQLite file), as opposed to a write the database refuses.
pub(crate) fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: connection exceptions (08...), shutdown and recovery (57P01-57P03),
            // too many connections (53300), disk full (53100). SQLite: busy (5), locked (6)
            // and disk full (13). A full disk is an operator's to fix, and a run that waits
            // for the space loses nothing; one that gives up loses its unwritten rows.
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "53300" | "53100" | "5" | "6" | "13"
                )
        }
        _ => false,
    }
}

/// Commits `batch` in one transaction, trying again with backoff for up to `retry_for` while
/// the failure is [`transient`], then falling back to one transaction per op.
async fn commit(pools: &Pools, batch: Vec<WriteOp>, failures: &mut Failures, retry_for: Duration) {
    if batch.is_empty() {
        return;
    }
    let mut ops = Vec::with_capacity(batch.len());
    for op in batch {
        match op.statements() {
            Ok(stmts) => ops.push((op, stmts)),
            Err(e) => failures.record(format!("{}: {e}", op.describe())),
        }
    }
    if ops.is_empty() {
        return;
    }
    let all: Vec<Stmt> = ops.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut held = false;
    let err = loop {
        match pools.execute_in_transaction(all.clone()).await {
            Ok(()) => {
                // Only after a failed try: a first try that is merely slow (a large batch
                // synced to disk) has nothing to report.
                if held {
                    tracing::info!(
                        seconds = started.elapsed().as_secs_f64(),
                        "the ledger is writable again; the held batch is committed"
                    );
                }
                return;
            }
            Err(e) if transient(&e) && started.elapsed() < retry_for => {
                held = true;
                tracing::warn!(error = %error_chain(&e), retry_in = ?backoff, rows = ops.iter().map(|(o, _)| o.rows()).sum::<usize>(), "the ledger cannot be written now; holding the batch (writers wait) and trying again");
                metrics::counter!(names::LEDGER_WRITE_RETRIES).increment(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => break e,
        }
    };
    if ops.len() == 1 {
        failures.record(format!("{}: {}", ops[0].0.describe(), error_chain(&err)));
        return;
    }
    for (op, stmts) in ops {
        if let Err(e) = pools.execute_in_transaction(stmts).await {
            failures.record(format!("{}: {}", op.describe(), error_chain(&e)));
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_are_split_into_bounded_statements() {
        let ids: Vec<String> = (0..1234).map(|i| format!("p{i}")).collect();
        let op = WriteOp::PromptsTransition {
            ids,
            to: Transition::Consumed { step: 3 },
            at_ms: 1,
        };
        let stmts = op.statements().unwrap();
        // 3 chunks of ids, two statements (prompts, trajectories) each
        assert_eq!(stmts.len(), 6);
        assert_eq!(stmts[0].params.len(), 2 + 500);
        assert!(stmts[0].sql.contains("$502)"));
        assert_eq!(stmts[5].params.len(), 1 + 234);
        assert_eq!(op.rows(), 1234);
    }

    #[test]
    fn out_of_range_numbers_fail_the_op_not_the_process() {
        let op = WriteOp::LearnerStep {
            step: LearnerStep {
                policy_version: 0,
                ..crate::testkit::bare_learner_step("r", u64::MAX)
            },
            at_ms: 0,
        };
        assert!(matches!(
            op.statements(),
            Err(LedgerError::OutOfRange { field: "step", .. })
        ));
    }
}
