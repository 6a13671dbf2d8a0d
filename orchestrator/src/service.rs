//! The orchestrator's gRPC service: [`OrchestratorService`] answers rollout workers' and the
//! learner's registrations and heartbeats through the [`Fleet`] (the run served now, or the
//! standby pool for services registered without a run), launches, gets, lists and watches runs,
//! and converts between the proto messages and the orchestrator's own types.

use std::pin::Pin;
use std::sync::Arc;

use chorus_proto::tonic::{self, Request, Response, Status};
use chorus_proto::v1::orchestrator_server::Orchestrator;
use chorus_proto::v1::{
    GetRunRequest, HeartbeatResponse, HeldOutEvaluation, LaunchRunRequest, LaunchRunResponse,
    LearnerHeartbeatRequest, ListRolloutsRequest, ListRolloutsResponse, ListRunsRequest,
    ListRunsResponse, RegisterLearnerRequest, RegisterLearnerResponse, RegisterWorkerRequest,
    RegisterWorkerResponse, RolloutRecord, Run, RunEvent, RunStatus as ProtoRunStatus, RunSummary,
    StageSummary, WatchRunRequest, WorkerHeartbeatRequest,
};
use tokio::sync::broadcast;
use tokio_stream::Stream;

use crate::config::RunConfig;
use crate::directory::{LearnerInfo, RegistrationError, ends_run};
use crate::fleet::{Fleet, FleetError, Kind};
use crate::ledger::{
    LaunchEval, Ledger, NewRun, RolloutFilter, RunRecord, RunStatus, TrajectoryStatus,
};

/// The largest `eval_tasks` (held-out tasks per environment) and `eval_every` (RL steps
/// between evaluations) a `LaunchRun` may ask for. Message sizes are in
/// `chorus_proto::limits`.
pub const MAX_EVAL_SETTING: u64 = 1 << 20;

/// The `Orchestrator` gRPC service over a [`Fleet`] and the ledger.
pub struct OrchestratorService {
    fleet: Arc<Fleet>,
    ledger: Ledger,
}

impl OrchestratorService {
    /// The service for `fleet`, reading and recording runs in `ledger`.
    pub fn new(fleet: Arc<Fleet>, ledger: Ledger) -> Self {
        Self { fleet, ledger }
    }
}

fn proto_status(s: RunStatus) -> ProtoRunStatus {
    match s {
        RunStatus::Pending => ProtoRunStatus::Pending,
        RunStatus::Running => ProtoRunStatus::Running,
        RunStatus::Succeeded => ProtoRunStatus::Succeeded,
        RunStatus::Failed => ProtoRunStatus::Failed,
        RunStatus::Cancelled => ProtoRunStatus::Cancelled,
    }
}

/// A run as the service reports it: its step and version, the newer of what its live learner
/// last reported and the ledger's last learner step (a finished run, or one this process no
/// longer serves, has only the latter).
fn proto_run(r: RunRecord, learner: Option<&LearnerInfo>, recorded: Option<(u64, u64)>) -> Run {
    let live = learner.map(|l| (l.step, l.policy_version));
    let (learner_step, policy_version) = live.max(recorded).unwrap_or((0, 0));
    Run {
        run_id: r.id,
        name: r.name,
        config_toml: r.config_toml,
        status: proto_status(r.status) as i32,
        created_at_ms: r.created_at_ms,
        finished_at_ms: r.finished_at_ms,
        learner_step,
        policy_version,
    }
}

fn ledger_status(e: crate::ledger::LedgerError) -> Status {
    Status::unavailable(format!("ledger: {e}"))
}

fn registration_status(e: RegistrationError) -> Status {
    match e {
        RegistrationError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RegistrationError::WrongRun { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn fleet_status(e: FleetError) -> Status {
    match e {
        FleetError::EmptyId(_) => Status::invalid_argument(e.to_string()),
        FleetError::NotServing { .. } => Status::failed_precondition(e.to_string()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<RunEvent, Status>> + Send>>;

impl OrchestratorService {
    /// `r` as reported, with its progress from its live learner or the ledger.
    async fn reported(&self, r: RunRecord) -> Result<Run, Status> {
        let learner = self.fleet.directory(&r.id).and_then(|d| d.learner());
        let recorded = self
            .ledger
            .last_learner_step(&r.id)
            .await
            .map_err(ledger_status)?
            .map(|s| (s.step.step, s.step.policy_version));
        Ok(proto_run(r, learner.as_ref(), recorded))
    }
}

#[tonic::async_trait]
impl Orchestrator for OrchestratorService {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let r = request.into_inner();
        if r.run_id.is_empty() {
            self.fleet
                .register_standby(Kind::Worker, &r.worker_id)
                .map_err(fleet_status)?;
            return Ok(Response::new(RegisterWorkerResponse {
                worker_id: r.worker_id,
                heartbeat_interval_ms: self.fleet.heartbeat_interval_ms(),
                lease_ms: self.fleet.leases().lease.as_millis() as u64,
                run_id: String::new(),
            }));
        }
        let dir = self.fleet.serving(&r.run_id).map_err(fleet_status)?;
        dir.register_worker(r)
            .map(Response::new)
            .map_err(registration_status)
    }

    async fn worker_heartbeat(
        &self,
        request: Request<WorkerHeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let h = request.into_inner();
        if h.run_id.is_empty() {
            return Ok(Response::new(self.fleet.standby_answer(
                Kind::Worker,
                &h.worker_id,
                &h.serving_run_id,
            )));
        }
        Ok(Response::new(match self.fleet.current(&h.run_id) {
            Some(dir) => dir.worker_heartbeat(h),
            None => HeartbeatResponse::default(),
        }))
    }

    async fn register_learner(
        &self,
        request: Request<RegisterLearnerRequest>,
    ) -> Result<Response<RegisterLearnerResponse>, Status> {
        let r = request.into_inner();
        if r.run_id.is_empty() {
            self.fleet
                .register_standby(Kind::Learner, &r.learner_id)
                .map_err(fleet_status)?;
            return Ok(Response::new(RegisterLearnerResponse {
                learner_id: r.learner_id,
                heartbeat_interval_ms: self.fleet.heartbeat_interval_ms(),
                resume_step: 0,
            }));
        }
        if r.learner_id.is_empty() {
            return Err(Status::invalid_argument("learner_id is empty"));
        }
        let dir = self.fleet.serving(&r.run_id).map_err(fleet_status)?;
        dir.register_learner(r)
            .map(Response::new)
            .map_err(registration_status)
    }

    async fn learner_heartbeat(
        &self,
        request: Request<LearnerHeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let h = request.into_inner();
        if h.run_id.is_empty() {
            return Ok(Response::new(self.fleet.standby_answer(
                Kind::Learner,
                &h.learner_id,
                &h.serving_run_id,
            )));
        }
        Ok(Response::new(match self.fleet.current(&h.run_id) {
            Some(dir) => dir.learner_heartbeat(h),
            None => HeartbeatResponse::default(),
        }))
    }

    async fn launch_run(
        &self,
        request: Request<LaunchRunRequest>,
    ) -> Result<Response<LaunchRunResponse>, Status> {
        let r = request.into_inner();
        let Some(launcher) = self.fleet.launcher().map(str::to_string) else {
            return Err(Status::failed_precondition(format!(
                "this orchestrator serves the run of its --config (`{}`); launch runs on one \
                 started without --config (`chorus serve orchestrator --listen ADDR`)",
                self.fleet.current_id()
            )));
        };
        if r.request_id.is_empty() {
            return Err(Status::invalid_argument(
                "request_id is empty; allowed: any client-chosen key, repeated on retries",
            ));
        }
        for (field, value) in [("eval_tasks", r.eval_tasks), ("eval_every", r.eval_every)] {
            if let Some(v) = value
                && v > MAX_EVAL_SETTING
            {
                return Err(Status::invalid_argument(format!(
                    "{field} is {v}; allowed: at most {MAX_EVAL_SETTING}"
                )));
            }
        }
        let cfg = RunConfig::from_toml_str(&r.config_toml, "the launched config")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = if r.name.is_empty() {
            cfg.name.clone()
        } else {
            r.name.clone()
        };
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(Status::invalid_argument(format!(
                "name `{name}`: allowed: letters, digits, '-', '_' (it names a directory)"
            )));
        }
        // A request seen before, by this process or by an earlier one (before a restart),
        // returns the run it created.
        let earlier = match self.fleet.launched(&r.request_id) {
            Some(run_id) => Some(run_id),
            None => self
                .ledger
                .launched_run(&launcher, &r.request_id)
                .await
                .map_err(ledger_status)?
                .map(|run| run.id),
        };
        let (run_id, created) = match earlier {
            Some(run_id) => (run_id, false),
            None => {
                let eval = LaunchEval {
                    tasks: r.eval_tasks,
                    every: r.eval_every,
                };
                let (launched, created) =
                    self.fleet
                        .launch(&r.request_id, &name, &r.config_toml, eval);
                if created {
                    self.ledger
                        .record_launch(
                            NewRun {
                                id: launched.run_id.clone(),
                                name: name.clone(),
                                config_toml: r.config_toml.clone(),
                                status: RunStatus::Pending,
                            },
                            &launcher,
                            &r.request_id,
                            eval,
                        )
                        .await
                        .map_err(ledger_status)?;
                    self.ledger.flush().await.map_err(ledger_status)?;
                }
                (launched.run_id, created)
            }
        };
        let run = self
            .ledger
            .get_run(&run_id)
            .await
            .map_err(ledger_status)?
            .ok_or_else(|| Status::internal("the launched run is missing from the ledger"))?;
        Ok(Response::new(LaunchRunResponse {
            run: Some(proto_run(run, None, None)),
            created,
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let id = request.into_inner().run_id;
        let run = self
            .ledger
            .get_run(&id)
            .await
            .map_err(ledger_status)?
            .ok_or_else(|| Status::not_found(format!("no run `{id}` in the ledger")))?;
        Ok(Response::new(self.reported(run).await?))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let r = request.into_inner();
        if !r.page_token.is_empty() {
            return Err(Status::invalid_argument(
                "page_token: this orchestrator returns one page; pass an empty token and a limit",
            ));
        }
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        };
        let mut runs = vec![];
        for run in self.ledger.list_runs(limit).await.map_err(ledger_status)? {
            if r.status
                .is_none_or(|s| proto_status(run.status) as i32 == s)
            {
                runs.push(self.reported(run).await?);
            }
        }
        Ok(Response::new(ListRunsResponse {
            runs,
            next_page_token: String::new(),
        }))
    }

    async fn get_run_summary(
        &self,
        request: Request<GetRunRequest>,
    ) -> Result<Response<RunSummary>, Status> {
        let id = request.into_inner().run_id;
        let run = self
            .ledger
            .get_run(&id)
            .await
            .map_err(ledger_status)?
            .ok_or_else(|| Status::not_found(format!("no run `{id}` in the ledger")))?;
        let stages = self
            .ledger
            .list_stages(&id)
            .await
            .map_err(ledger_status)?
            .into_iter()
            .map(|st| StageSummary {
                index: st.stage.stage_index as u32,
                name: st.stage.name,
                kind: st.stage.kind,
                status: st.status.as_str().to_string(),
                metric: st.stage.metric.unwrap_or_default(),
                start: st.stage.metric_start,
                end: st.metric_end,
                trajectories: st.trajectories,
                summary_json: st.summary_json.unwrap_or_default(),
                first_step: st.stage.first_step,
                last_step: st.last_step,
            })
            .collect();
        let evaluations = self
            .ledger
            .list_evaluations(&id)
            .await
            .map_err(ledger_status)?
            .into_iter()
            .map(|e| HeldOutEvaluation {
                policy_version: e.policy_version,
                environment: e.environment,
                accuracy: e.accuracy,
                accuracy_lo: e.accuracy_lo,
                accuracy_hi: e.accuracy_hi,
                tasks: e.tasks,
                correct: e.correct,
                samples_per_task: e.samples_per_task,
            })
            .collect();
        let steps = self
            .ledger
            .list_learner_steps(&id)
            .await
            .map_err(ledger_status)?;
        let learner = self.fleet.directory(&id).and_then(|d| d.learner());
        let recorded = steps.last().map(|s| (s.step.step, s.step.policy_version));
        Ok(Response::new(RunSummary {
            run: Some(proto_run(run, learner.as_ref(), recorded)),
            learner_steps: steps.len() as u64,
            stages,
            evaluations,
        }))
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000),
        };
        if let Some(m) = r.min_reward
            && !m.is_finite()
        {
            return Err(Status::invalid_argument(format!(
                "min_reward is {m}; allowed: a finite number, or unset for every reward"
            )));
        }
        if self
            .ledger
            .get_run(&r.run_id)
            .await
            .map_err(ledger_status)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "run_id: no run `{}` in the ledger",
                r.run_id
            )));
        }
        let rows = self
            .ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(r.run_id.clone()),
                environment: (!r.environment.is_empty()).then_some(r.environment),
                min_reward: r.min_reward,
                limit,
                ..Default::default()
            })
            .await
            .map_err(ledger_status)?;
        let mut rollouts = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(t) = self
                .ledger
                .get_trajectory(&row.id)
                .await
                .map_err(ledger_status)?
            else {
                continue;
            };
            let tr = t.trajectory;
            let failure = match &tr.status {
                TrajectoryStatus::Ok => String::new(),
                TrajectoryStatus::Failed { reason } => reason.clone(),
            };
            rollouts.push(RolloutRecord {
                trajectory_id: tr.id,
                prompt_id: tr.prompt_id,
                group_id: tr.group_id,
                environment: tr.environment,
                worker_id: tr.worker_id,
                reward: tr.reward,
                reward_components: tr.reward_components.into_iter().collect(),
                reason: tr.reason.unwrap_or_default(),
                completion_text: tr.completion_text,
                completion_tokens: row.num_completion_tokens,
                min_policy_version: row.min_policy_version,
                max_policy_version: row.max_policy_version,
                finish_reason: tr.finish_reason as i32,
                failure,
                consumed_at_step: t.consumed_at_step,
                stage: tr.stage_index,
            });
        }
        Ok(Response::new(ListRolloutsResponse { rollouts }))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let r = request.into_inner();
        let directory = self.fleet.directory(&r.run_id).ok_or_else(|| {
            Status::not_found(format!(
                "run `{}`: this orchestrator process has not served it; finished runs are in \
                 the ledger (`chorus inspect`)",
                r.run_id
            ))
        })?;
        // Subscribe before reading the backlog, then skip what the backlog already had, so no
        // event falls between the two.
        let mut live = directory.subscribe();
        let backlog = directory.events_after(r.after_sequence);
        // Saturating: any `after_sequence` a client sends, even past every event there will be.
        let mut next = r
            .after_sequence
            .saturating_add(backlog.len() as u64)
            .saturating_add(1);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for e in backlog {
                let last = ends_run(&e);
                if tx.send(Ok(e)).await.is_err() || last {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.sequence >= next => {
                        next = e.sequence + 1;
                        let last = ends_run(&e);
                        if tx.send(Ok(e)).await.is_err() || last {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "the watcher fell {n} events behind; reconnect with after_sequence = {}",
                                next - 1
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let stream: EventStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }
}
