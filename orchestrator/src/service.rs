//! The orchestrator's own gRPC service: rollout workers and the learner register and send
//! heartbeats (capacity, load, policy version held), a worker that misses its lease is marked
//! lost, clients launch, get, list and watch runs, and standby services are handed runs.
//!
//! [`Directory`] is the state of one run, shared with the process that runs its stages: that
//! process waits on it for the workers and learner of the run ([`Directory::wait_for_workers`],
//! [`Directory::wait_for_learner`]) and appends the run's events to it ([`Directory::emit`]).
//! Events carry gap-free sequence numbers, so a client that reconnects with the last one it saw
//! neither misses nor repeats one.
//!
//! [`Fleet`] is the state of the orchestrator process: the run it serves now, the runs launched
//! and waiting for their turn (`LaunchRun`, idempotent by request id), every run's directory for
//! `WatchRun`, and the standby services. A standby service registered without a run; its
//! heartbeats are answered with a [`RunAssignment`] once there is a run for it (one learner is
//! chosen; workers are assigned once that learner serves), and it then registers for that run
//! like any other service.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chorus_proto::tonic::{self, Request, Response, Status};
use chorus_proto::v1::orchestrator_server::Orchestrator;
use chorus_proto::v1::{
    GetRunRequest, HeartbeatResponse, LaunchRunRequest, LaunchRunResponse, LearnerHeartbeatRequest,
    ListRunsRequest, ListRunsResponse, RegisterLearnerRequest, RegisterLearnerResponse,
    RegisterWorkerRequest, RegisterWorkerResponse, Run, RunAssignment, RunEvent,
    RunStatus as ProtoRunStatus, RunStatusChanged, WatchRunRequest, WorkerHeartbeatRequest,
    WorkerJoined, WorkerLost, run_event,
};
use tokio::sync::{Notify, broadcast};
use tokio_stream::Stream;

use crate::config::RunConfig;
use crate::ledger::{Ledger, NewRun, RunRecord, RunStatus};

/// Timing of registrations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Leases {
    /// How often services are asked to send heartbeats.
    pub heartbeat: Duration,
    /// A worker silent this long is lost.
    pub lease: Duration,
}

impl Default for Leases {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(2),
            lease: Duration::from_secs(10),
        }
    }
}

/// A registered rollout worker as the orchestrator last heard of it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerInfo {
    /// Its id.
    pub id: String,
    /// Where its `RolloutWorker` service listens.
    pub endpoint: String,
    /// Sequences it can generate at once.
    pub capacity: u32,
    /// Sequences in flight at the last heartbeat.
    pub in_flight: u32,
    /// Policy version it holds.
    pub policy_version: u64,
    /// Whether it missed its lease.
    pub lost: bool,
    last_sequence: u64,
    last_seen: Instant,
}

/// The registered learner.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnerInfo {
    /// Its id.
    pub id: String,
    /// Where its `Learner` service listens.
    pub endpoint: String,
    /// Last step it reported.
    pub step: u64,
    /// Latest version it published.
    pub policy_version: u64,
    last_sequence: u64,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<String, WorkerInfo>,
    learner: Option<LearnerInfo>,
    events: Vec<RunEvent>,
    /// Oldest policy version the staleness bound still accepts.
    min_policy_version: u64,
    /// The run is over: leases are no longer checked.
    closed: bool,
}

/// Who serves the run, and what happened in it.
pub struct Directory {
    run_id: String,
    leases: Leases,
    state: Mutex<State>,
    changed: Notify,
    live: broadcast::Sender<RunEvent>,
    on_lost: Mutex<Option<LossHandler>>,
}

/// Takes a lost worker out of the run and returns how many requests it held.
pub type LossHandler = Box<dyn Fn(&str) -> u32 + Send + Sync>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Directory {
    /// An empty directory for run `run_id`.
    pub fn new(run_id: impl Into<String>, leases: Leases) -> Arc<Self> {
        Arc::new(Self {
            run_id: run_id.into(),
            leases,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            live: broadcast::channel(1024).0,
            on_lost: Mutex::new(None),
        })
    }

    /// Events from now on, as they are appended.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.live.subscribe()
    }

    /// What to do with a worker whose lease runs out (the run's worker pool dispatches its
    /// requests again); its answer is the count reported in the `WorkerLost` event.
    pub fn set_loss_handler(&self, handler: LossHandler) {
        *self.on_lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// Marks worker `id` lost (once; with a `WorkerLost` event reporting `redispatched`
    /// requests), because its stream broke before its lease ran out. Its heartbeats are then
    /// answered `registered = false`, so a worker that still runs registers and joins again.
    pub fn mark_lost(&self, id: &str, redispatched: u32) {
        let mut st = self.lock();
        match st.workers.get_mut(id) {
            Some(w) if !w.lost => w.lost = true,
            _ => return,
        }
        self.emit_locked(
            &mut st,
            run_event::Kind::WorkerLost(WorkerLost {
                worker_id: id.to_string(),
                redispatched_prompts: redispatched,
            }),
        );
        drop(st);
        self.changed.notify_waiters();
    }

    /// The run it serves.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event (its sequence number and time are filled in) and returns its sequence.
    pub fn emit(&self, kind: run_event::Kind) -> u64 {
        let mut st = self.lock();
        self.emit_locked(&mut st, kind)
    }

    fn emit_locked(&self, st: &mut State, kind: run_event::Kind) -> u64 {
        let event = RunEvent {
            run_id: self.run_id.clone(),
            sequence: st.events.len() as u64 + 1,
            timestamp_ms: now_ms(),
            kind: Some(kind),
        };
        st.events.push(event.clone());
        let _ = self.live.send(event.clone());
        event.sequence
    }

    /// Sets the oldest policy version heartbeats report as acceptable.
    pub fn set_min_policy_version(&self, v: u64) {
        self.lock().min_policy_version = v;
    }

    /// Workers currently registered and not lost.
    pub fn live_workers(&self) -> Vec<WorkerInfo> {
        self.lock()
            .workers
            .values()
            .filter(|w| !w.lost)
            .cloned()
            .collect()
    }

    /// The learner, once registered.
    pub fn learner(&self) -> Option<LearnerInfo> {
        self.lock().learner.clone()
    }

    /// Events after `after_sequence`.
    pub fn events_after(&self, after_sequence: u64) -> Vec<RunEvent> {
        self.lock()
            .events
            .iter()
            .skip(after_sequence as usize)
            .cloned()
            .collect()
    }

    /// Waits until `n` workers are registered and live, or `timeout` passes (an error saying
    /// how many came).
    pub async fn wait_for_workers(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<WorkerInfo>, String> {
        self.wait_until(timeout, || {
            let live = self.live_workers();
            (live.len() >= n).then_some(live)
        })
        .await
        .ok_or_else(|| {
            format!(
                "{} of {n} rollout workers registered within {:.0} s",
                self.live_workers().len(),
                timeout.as_secs_f64()
            )
        })
    }

    /// Waits until the learner has registered, or `timeout` passes.
    pub async fn wait_for_learner(&self, timeout: Duration) -> Result<LearnerInfo, String> {
        self.wait_until(timeout, || self.learner())
            .await
            .ok_or_else(|| {
                format!(
                    "no learner registered within {:.0} s",
                    timeout.as_secs_f64()
                )
            })
    }

    /// Re-checks `ready` after every registration change until it gives a value or `timeout`
    /// passes.
    async fn wait_until<T>(&self, timeout: Duration, ready: impl Fn() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before checking, so a change between the check and the wait is seen.
            let notified = self.changed.notified();
            if let Some(v) = ready() {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Marks workers whose lease ran out as lost (each one once, with a `WorkerLost` event);
    /// returns their ids.
    pub fn expire_leases(&self) -> Vec<String> {
        let now = Instant::now();
        let expired: Vec<String> = self
            .lock()
            .workers
            .values()
            .filter(|w| !w.lost && now.duration_since(w.last_seen) > self.leases.lease)
            .map(|w| w.id.clone())
            .collect();
        for id in &expired {
            // Outside the state lock: the handler takes the pool's locks.
            let redispatched = self
                .on_lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map_or(0, |f| f(id));
            self.mark_lost(id, redispatched);
        }
        expired
    }

    /// Checks leases every heartbeat interval until the directory is dropped.
    pub fn spawn_lease_checker(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.leases.heartbeat;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(dir) if !dir.lock().closed => {
                        for id in dir.expire_leases() {
                            eprintln!("worker {id} lost: no heartbeat within its lease");
                        }
                    }
                    _ => return,
                }
            }
        });
    }

    /// Ends the run's lease checks (the run is over).
    pub fn close(&self) {
        self.lock().closed = true;
    }

    pub(crate) fn register_worker(
        &self,
        r: RegisterWorkerRequest,
    ) -> Result<RegisterWorkerResponse, Status> {
        if r.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        if !(r.endpoint.starts_with("http://") || r.endpoint.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "endpoint `{}`: allowed: http://host:port or https://host:port",
                r.endpoint
            )));
        }
        if r.capacity == 0 {
            return Err(Status::invalid_argument(
                "capacity is 0; allowed: at least 1",
            ));
        }
        let mut st = self.lock();
        // Registering again (after a restart or a lost lease) is idempotent by id.
        st.workers.insert(
            r.worker_id.clone(),
            WorkerInfo {
                id: r.worker_id.clone(),
                endpoint: r.endpoint.clone(),
                capacity: r.capacity,
                in_flight: 0,
                policy_version: r.policy_version,
                lost: false,
                last_sequence: 0,
                last_seen: Instant::now(),
            },
        );
        self.emit_locked(
            &mut st,
            run_event::Kind::WorkerJoined(WorkerJoined {
                worker_id: r.worker_id.clone(),
                capacity: r.capacity,
            }),
        );
        drop(st);
        self.changed.notify_waiters();
        Ok(RegisterWorkerResponse {
            worker_id: r.worker_id,
            heartbeat_interval_ms: self.leases.heartbeat.as_millis() as u64,
            lease_ms: self.leases.lease.as_millis() as u64,
            run_id: self.run_id.clone(),
        })
    }

    pub(crate) fn worker_heartbeat(&self, h: WorkerHeartbeatRequest) -> HeartbeatResponse {
        let mut st = self.lock();
        let latest = st.learner.as_ref().map(|l| l.policy_version).unwrap_or(0);
        let min = st.min_policy_version;
        let registered = match st.workers.get_mut(&h.worker_id) {
            // A lost worker must register again, so that it is announced as joined.
            Some(w) if !w.lost => {
                if h.sequence > w.last_sequence {
                    w.last_sequence = h.sequence;
                    w.capacity = h.capacity.max(1);
                    w.in_flight = h.in_flight;
                    w.policy_version = h.policy_version;
                    w.last_seen = Instant::now();
                }
                true
            }
            _ => false,
        };
        HeartbeatResponse {
            registered,
            latest_policy_version: latest,
            min_policy_version: min,
            assignment: None,
        }
    }

    fn register_learner(
        &self,
        r: RegisterLearnerRequest,
    ) -> Result<RegisterLearnerResponse, Status> {
        if r.run_id != self.run_id {
            return Err(Status::failed_precondition(format!(
                "this orchestrator runs `{}`, not `{}`",
                self.run_id, r.run_id
            )));
        }
        if !(r.endpoint.starts_with("http://") || r.endpoint.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "endpoint `{}`: allowed: http://host:port or https://host:port",
                r.endpoint
            )));
        }
        let mut st = self.lock();
        st.learner = Some(LearnerInfo {
            id: r.learner_id.clone(),
            endpoint: r.endpoint,
            step: 0,
            policy_version: r.policy_version,
            last_sequence: 0,
        });
        drop(st);
        self.changed.notify_waiters();
        Ok(RegisterLearnerResponse {
            learner_id: r.learner_id,
            heartbeat_interval_ms: self.leases.heartbeat.as_millis() as u64,
            resume_step: 0,
        })
    }

    fn learner_heartbeat(&self, h: LearnerHeartbeatRequest) -> HeartbeatResponse {
        let mut st = self.lock();
        let min = st.min_policy_version;
        let (registered, latest) = match st.learner.as_mut() {
            Some(l) if l.id == h.learner_id => {
                if h.sequence > l.last_sequence {
                    l.last_sequence = h.sequence;
                    l.step = h.step;
                    l.policy_version = h.policy_version;
                }
                (true, l.policy_version)
            }
            _ => (false, 0),
        };
        HeartbeatResponse {
            registered,
            latest_policy_version: latest,
            min_policy_version: min,
            assignment: None,
        }
    }
}

/// A launched run waiting for its turn.
#[derive(Clone)]
pub struct Launched {
    /// Its id.
    pub run_id: String,
    /// Its human name.
    pub name: String,
    /// Its configuration, as TOML.
    pub config_toml: String,
    /// Its directory (it already holds the run's first event).
    pub directory: Arc<Directory>,
}

/// Finished runs whose event logs a long-lived orchestrator keeps for `WatchRun`; older ones are
/// in the ledger.
pub const FINISHED_RUNS_KEPT: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Worker,
    Learner,
}

struct Current {
    directory: Arc<Directory>,
    config_toml: String,
    /// The standby learner chosen to serve it.
    learner: Option<String>,
}

#[derive(Default)]
struct FleetState {
    /// Every run this process has served or queued, for `WatchRun` (the oldest finished ones
    /// are forgotten past [`FINISHED_RUNS_KEPT`]).
    runs: BTreeMap<String, Arc<Directory>>,
    /// Finished runs, oldest first.
    finished: VecDeque<String>,
    /// Runs launched by this process so far (part of each new run id).
    launched_count: u64,
    current: Option<Current>,
    /// Standby services, with when they were last heard from.
    standby: BTreeMap<(Kind, String), Instant>,
    /// `LaunchRun` request ids and the runs they created.
    launches: HashMap<String, String>,
    queue: VecDeque<Launched>,
}

/// The orchestrator process: the run served now, launched runs waiting, and standby services
/// (see the module docs).
pub struct Fleet {
    leases: Leases,
    /// The name launches are recorded under in the ledger; `None`: launches are refused.
    launcher: Option<String>,
    state: Mutex<FleetState>,
    launched: Notify,
}

impl Fleet {
    /// A fleet. With a `launcher` name, `LaunchRun` queues runs for [`Fleet::next_launched`]
    /// and records them in the ledger under that name (orchestrators sharing a ledger need
    /// different names); without, it is refused (the process serves the run of its config).
    pub fn new(leases: Leases, launcher: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            leases,
            launcher,
            state: Mutex::new(FleetState::default()),
            launched: Notify::new(),
        })
    }

    /// Registration timing of its runs.
    pub fn leases(&self) -> Leases {
        self.leases
    }

    fn lock(&self) -> MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `directory`'s run from now on: its services' registrations and heartbeats go to
    /// it, and standby services are assigned to it (`config_toml` is what they are handed).
    pub fn serve_run(&self, directory: Arc<Directory>, config_toml: String) {
        let mut st = self.lock();
        st.runs
            .insert(directory.run_id().to_string(), directory.clone());
        st.current = Some(Current {
            directory,
            config_toml,
            learner: None,
        });
    }

    /// Ends the current run: its lease checks stop, and standby services serving it are told
    /// there is no run for them (or the next one) at their next heartbeat.
    pub fn finish_run(&self) {
        let mut st = self.lock();
        if let Some(c) = st.current.take() {
            c.directory.close();
            st.finished.push_back(c.directory.run_id().to_string());
        }
        while st.finished.len() > FINISHED_RUNS_KEPT {
            if let Some(old) = st.finished.pop_front() {
                st.runs.remove(&old);
            }
        }
    }

    /// The current run's directory, when it is `run_id`.
    fn current(&self, run_id: &str) -> Option<Arc<Directory>> {
        self.lock()
            .current
            .as_ref()
            .filter(|c| c.directory.run_id() == run_id)
            .map(|c| c.directory.clone())
    }

    fn current_id(&self) -> String {
        self.lock()
            .current
            .as_ref()
            .map(|c| c.directory.run_id().to_string())
            .unwrap_or_default()
    }

    /// The directory of any run this process served or queued.
    pub fn directory(&self, run_id: &str) -> Option<Arc<Directory>> {
        self.lock().runs.get(run_id).cloned()
    }

    /// The run an earlier `LaunchRun` with `request_id` created in this process.
    pub fn launched(&self, request_id: &str) -> Option<String> {
        self.lock().launches.get(request_id).cloned()
    }

    /// Queues a new run (validated by the caller) for `request_id` and returns it; a repeat of
    /// a request this process has seen returns the run the first call created and `false`.
    pub fn launch(&self, request_id: &str, name: &str, config_toml: &str) -> (Launched, bool) {
        let mut st = self.lock();
        if let Some(run_id) = st.launches.get(request_id)
            && let Some(directory) = st.runs.get(run_id)
        {
            let launched = Launched {
                run_id: run_id.clone(),
                name: name.to_string(),
                config_toml: config_toml.to_string(),
                directory: directory.clone(),
            };
            return (launched, false);
        }
        // Names repeat across runs; the launch time and a counter make the id unique.
        let run_id = format!("{name}-{}-{}", now_ms(), st.launched_count);
        st.launched_count += 1;
        (
            self.enqueue(&mut st, request_id, &run_id, name, config_toml),
            true,
        )
    }

    /// Queues again a run launched before this process started (found pending in the ledger).
    pub fn requeue(&self, request_id: &str, run_id: &str, name: &str, config_toml: &str) {
        let mut st = self.lock();
        self.enqueue(&mut st, request_id, run_id, name, config_toml);
    }

    fn enqueue(
        &self,
        st: &mut FleetState,
        request_id: &str,
        run_id: &str,
        name: &str,
        config_toml: &str,
    ) -> Launched {
        let run_id = run_id.to_string();
        let directory = Directory::new(run_id.clone(), self.leases);
        directory.emit(run_event::Kind::StatusChanged(RunStatusChanged {
            status: ProtoRunStatus::Pending as i32,
            reason: String::new(),
        }));
        let launched = Launched {
            run_id: run_id.clone(),
            name: name.to_string(),
            config_toml: config_toml.to_string(),
            directory: directory.clone(),
        };
        st.runs.insert(run_id.clone(), directory);
        st.launches.insert(request_id.to_string(), run_id);
        st.queue.push_back(launched.clone());
        self.launched.notify_one();
        launched
    }

    /// The next launched run, in launch order; waits for one.
    pub async fn next_launched(&self) -> Launched {
        loop {
            let notified = self.launched.notified();
            if let Some(l) = self.lock().queue.pop_front() {
                return l;
            }
            notified.await;
        }
    }

    /// Standby services heard from within their lease.
    pub fn standby(&self) -> (usize, usize) {
        let st = self.lock();
        let live = |kind: Kind| {
            st.standby
                .iter()
                .filter(|((k, _), seen)| *k == kind && seen.elapsed() <= self.leases.lease)
                .count()
        };
        (live(Kind::Learner), live(Kind::Worker))
    }

    /// A standby service checks in; returns the run it should serve now, if any.
    fn standby_heartbeat(&self, kind: Kind, id: &str, register: bool) -> Option<RunAssignment> {
        let mut st = self.lock();
        let key = (kind, id.to_string());
        if !register && !st.standby.contains_key(&key) {
            return None;
        }
        st.standby.insert(key, Instant::now());
        let lease = self.leases.lease;
        let learner_alive = |st: &FleetState, learner: &str| {
            st.standby
                .get(&(Kind::Learner, learner.to_string()))
                .is_some_and(|seen| seen.elapsed() <= lease)
        };
        let claimed = st.current.as_ref().and_then(|c| c.learner.clone());
        let current = st.current.as_ref()?;
        let learner_endpoint = current
            .directory
            .learner()
            .map(|l| l.endpoint)
            .unwrap_or_default();
        match kind {
            Kind::Learner => {
                // One learner serves the run: the first standby learner to ask, unless the
                // chosen one is still alive.
                let mine = match &claimed {
                    Some(c) if c == id => true,
                    Some(c) if learner_alive(&st, c) || !learner_endpoint.is_empty() => false,
                    _ => true,
                };
                if !mine {
                    return None;
                }
                let c = st.current.as_mut().expect("checked");
                c.learner = Some(id.to_string());
                Some(RunAssignment {
                    run_id: c.directory.run_id().to_string(),
                    config_toml: c.config_toml.clone(),
                    learner_endpoint,
                })
            }
            // Workers need the learner's address to fetch weights.
            Kind::Worker if learner_endpoint.is_empty() => None,
            Kind::Worker => Some(RunAssignment {
                run_id: current.directory.run_id().to_string(),
                config_toml: current.config_toml.clone(),
                learner_endpoint,
            }),
        }
    }

    fn standby_known(&self, kind: Kind, id: &str) -> bool {
        self.lock().standby.contains_key(&(kind, id.to_string()))
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        self.leases.heartbeat.as_millis() as u64
    }

    /// A standby service registers (again).
    fn register_standby(&self, kind: Kind, id: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(match kind {
                Kind::Worker => "worker_id is empty",
                Kind::Learner => "learner_id is empty",
            }));
        }
        self.standby_heartbeat(kind, id, true);
        Ok(())
    }

    /// The answer to a standby service's heartbeat.
    fn standby_answer(&self, kind: Kind, id: &str) -> HeartbeatResponse {
        HeartbeatResponse {
            registered: self.standby_known(kind, id),
            assignment: self.standby_heartbeat(kind, id, false),
            ..Default::default()
        }
    }

    /// The directory of `run_id` when it is the run served now; otherwise an error saying
    /// which run is.
    fn serving(&self, run_id: &str) -> Result<Arc<Directory>, Status> {
        self.current(run_id).ok_or_else(|| self.no_run(run_id))
    }

    fn no_run(&self, asked: &str) -> Status {
        match self.current_id() {
            c if c.is_empty() => Status::failed_precondition(format!(
                "run `{asked}`: this orchestrator serves no run now"
            )),
            c => Status::failed_precondition(format!(
                "run `{asked}`: this orchestrator serves `{c}` now"
            )),
        }
    }
}

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

fn proto_run(r: RunRecord, learner: Option<&LearnerInfo>) -> Run {
    Run {
        run_id: r.id,
        name: r.name,
        config_toml: r.config_toml,
        status: proto_status(r.status) as i32,
        created_at_ms: r.created_at_ms,
        finished_at_ms: r.finished_at_ms,
        learner_step: learner.map(|l| l.step).unwrap_or(0),
        policy_version: learner.map(|l| l.policy_version).unwrap_or(0),
    }
}

fn ledger_status(e: crate::ledger::LedgerError) -> Status {
    Status::unavailable(format!("ledger: {e}"))
}

/// Whether `e` moves the run to a final status, after which its event stream ends.
fn ends_run(e: &RunEvent) -> bool {
    matches!(&e.kind, Some(run_event::Kind::StatusChanged(c))
        if [ProtoRunStatus::Succeeded, ProtoRunStatus::Failed, ProtoRunStatus::Cancelled]
            .iter()
            .any(|s| *s as i32 == c.status))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Orchestrator for OrchestratorService {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let r = request.into_inner();
        if r.run_id.is_empty() {
            self.fleet.register_standby(Kind::Worker, &r.worker_id)?;
            return Ok(Response::new(RegisterWorkerResponse {
                worker_id: r.worker_id,
                heartbeat_interval_ms: self.fleet.heartbeat_interval_ms(),
                lease_ms: self.fleet.leases.lease.as_millis() as u64,
                run_id: String::new(),
            }));
        }
        let dir = self.fleet.serving(&r.run_id)?;
        dir.register_worker(r).map(Response::new)
    }

    async fn worker_heartbeat(
        &self,
        request: Request<WorkerHeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let h = request.into_inner();
        if h.run_id.is_empty() {
            return Ok(Response::new(
                self.fleet.standby_answer(Kind::Worker, &h.worker_id),
            ));
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
            self.fleet.register_standby(Kind::Learner, &r.learner_id)?;
            return Ok(Response::new(RegisterLearnerResponse {
                learner_id: r.learner_id,
                heartbeat_interval_ms: self.fleet.heartbeat_interval_ms(),
                resume_step: 0,
            }));
        }
        let dir = self.fleet.serving(&r.run_id)?;
        dir.register_learner(r).map(Response::new)
    }

    async fn learner_heartbeat(
        &self,
        request: Request<LearnerHeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let h = request.into_inner();
        if h.run_id.is_empty() {
            return Ok(Response::new(
                self.fleet.standby_answer(Kind::Learner, &h.learner_id),
            ));
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
        let Some(launcher) = self.fleet.launcher.clone() else {
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
                let (launched, created) = self.fleet.launch(&r.request_id, &name, &r.config_toml);
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
            run: Some(proto_run(run, None)),
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
        let learner = self.fleet.directory(&id).and_then(|d| d.learner());
        Ok(Response::new(proto_run(run, learner.as_ref())))
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
        let runs = self
            .ledger
            .list_runs(limit)
            .await
            .map_err(ledger_status)?
            .into_iter()
            .filter(|run| {
                r.status
                    .is_none_or(|s| proto_status(run.status) as i32 == s)
            })
            .map(|run| {
                let learner = self.fleet.directory(&run.id).and_then(|d| d.learner());
                proto_run(run, learner.as_ref())
            })
            .collect();
        Ok(Response::new(ListRunsResponse {
            runs,
            next_page_token: String::new(),
        }))
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
        let mut next = r.after_sequence + backlog.len() as u64 + 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str) -> RegisterWorkerRequest {
        RegisterWorkerRequest {
            worker_id: id.into(),
            endpoint: "http://127.0.0.1:1".into(),
            capacity: 4,
            policy_version: 0,
            model: String::new(),
            run_id: "r".into(),
        }
    }

    #[tokio::test]
    async fn workers_register_heartbeat_and_lose_their_lease() {
        let dir = Directory::new(
            "r",
            Leases {
                heartbeat: Duration::from_millis(10),
                lease: Duration::from_millis(80),
            },
        );
        assert!(
            dir.register_worker(RegisterWorkerRequest {
                capacity: 0,
                ..worker("w")
            })
            .is_err()
        );
        dir.register_worker(worker("a")).unwrap();
        dir.register_worker(worker("b")).unwrap();
        assert_eq!(
            dir.wait_for_workers(2, Duration::from_secs(1))
                .await
                .unwrap()
                .len(),
            2
        );
        let hb = |id: &str, seq: u64, version: u64| WorkerHeartbeatRequest {
            worker_id: id.into(),
            sequence: seq,
            capacity: 4,
            in_flight: 1,
            policy_version: version,
            run_id: "r".into(),
        };
        assert!(dir.worker_heartbeat(hb("a", 1, 3)).registered);
        // A repeated sequence number is a retry: ignored.
        assert!(dir.worker_heartbeat(hb("a", 1, 9)).registered);
        assert_eq!(
            dir.live_workers()
                .iter()
                .find(|w| w.id == "a")
                .unwrap()
                .policy_version,
            3
        );
        assert!(!dir.worker_heartbeat(hb("stranger", 1, 0)).registered);
        // Only `a` keeps beating; `b` runs out of lease.
        for seq in 2..8 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            dir.worker_heartbeat(hb("a", seq, 3));
            dir.expire_leases();
        }
        let live: Vec<String> = dir.live_workers().into_iter().map(|w| w.id).collect();
        assert_eq!(live, vec!["a".to_string()]);
        assert!(
            !dir.worker_heartbeat(hb("b", 9, 0)).registered,
            "lost: register again"
        );
        let kinds: Vec<_> = dir
            .events_after(0)
            .into_iter()
            .map(|e| (e.sequence, e.kind.unwrap()))
            .collect();
        assert_eq!(kinds.len(), 3);
        assert!(matches!(&kinds[2].1, run_event::Kind::WorkerLost(l) if l.worker_id == "b"));
        assert_eq!(
            kinds.iter().map(|k| k.0).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "gap-free"
        );
        assert_eq!(dir.events_after(2).len(), 1);
        let err = dir
            .wait_for_workers(2, Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(err.contains("1 of 2"), "{err}");
    }

    #[tokio::test]
    async fn the_learner_registers_for_its_run_only() {
        let dir = Directory::new("r", Leases::default());
        let req = |run: &str| RegisterLearnerRequest {
            learner_id: "l".into(),
            endpoint: "http://127.0.0.1:2".into(),
            run_id: run.into(),
            policy_version: 0,
            devices: 1,
        };
        assert!(dir.register_learner(req("other")).is_err());
        dir.register_learner(req("r")).unwrap();
        assert_eq!(
            dir.wait_for_learner(Duration::from_secs(1))
                .await
                .unwrap()
                .endpoint,
            "http://127.0.0.1:2"
        );
        let hb = dir.learner_heartbeat(LearnerHeartbeatRequest {
            learner_id: "l".into(),
            sequence: 1,
            run_id: "r".into(),
            step: 4,
            policy_version: 4,
            queued_groups: 0,
        });
        assert!(hb.registered);
        assert_eq!(hb.latest_policy_version, 4);
    }

    #[tokio::test]
    async fn standby_services_are_handed_launched_runs_in_order() {
        let fleet = Fleet::new(Leases::default(), Some("test".into()));
        let (first, created) = fleet.launch("req-1", "a", "name = \"a\"");
        assert!(created);
        let (again, created) = fleet.launch("req-1", "a", "name = \"a\"");
        assert!(!created, "a retry returns the first run");
        assert_eq!(again.run_id, first.run_id);
        let (second, _) = fleet.launch("req-2", "b", "name = \"b\"");
        assert_ne!(second.run_id, first.run_id);

        // Standby services get nothing while no run is served.
        assert!(fleet.standby_heartbeat(Kind::Learner, "L1", true).is_none());
        assert!(fleet.standby_heartbeat(Kind::Worker, "W", true).is_none());
        assert!(!fleet.standby_known(Kind::Worker, "stranger"));

        let run = fleet.next_launched().await;
        assert_eq!(run.run_id, first.run_id);
        fleet.serve_run(run.directory.clone(), run.config_toml.clone());
        // One learner is chosen; workers wait until it serves.
        let to_l1 = fleet.standby_heartbeat(Kind::Learner, "L1", false).unwrap();
        assert_eq!(to_l1.run_id, first.run_id);
        assert!(to_l1.learner_endpoint.is_empty());
        assert!(fleet.standby_heartbeat(Kind::Learner, "L2", true).is_none());
        assert!(fleet.standby_heartbeat(Kind::Worker, "W", false).is_none());
        run.directory
            .register_learner(RegisterLearnerRequest {
                learner_id: "L1".into(),
                endpoint: "http://127.0.0.1:9".into(),
                run_id: first.run_id.clone(),
                policy_version: 0,
                devices: 1,
            })
            .unwrap();
        let to_w = fleet.standby_heartbeat(Kind::Worker, "W", false).unwrap();
        assert_eq!(
            (to_w.run_id.as_str(), to_w.learner_endpoint.as_str()),
            (first.run_id.as_str(), "http://127.0.0.1:9")
        );
        assert_eq!(to_w.config_toml, "name = \"a\"");

        // The run ends: nothing for anyone until the next one is served.
        fleet.finish_run();
        assert!(
            fleet
                .standby_heartbeat(Kind::Learner, "L1", false)
                .is_none()
        );
        let run = fleet.next_launched().await;
        assert_eq!(run.run_id, second.run_id);
        fleet.serve_run(run.directory, run.config_toml);
        assert_eq!(
            fleet
                .standby_heartbeat(Kind::Learner, "L2", false)
                .unwrap()
                .run_id,
            second.run_id
        );
        assert_eq!(fleet.standby(), (2, 1));
        // Both runs keep their event logs for WatchRun; each began pending.
        let events = fleet.directory(&first.run_id).unwrap().events_after(0);
        assert!(
            matches!(&events[0].kind, Some(run_event::Kind::StatusChanged(c))
            if c.status == ProtoRunStatus::Pending as i32)
        );
        // Only the newest finished runs' logs are kept.
        fleet.finish_run();
        for i in 0..FINISHED_RUNS_KEPT {
            let (run, _) = fleet.launch(&format!("more-{i}"), "m", "");
            assert_eq!(fleet.next_launched().await.run_id, run.run_id);
            fleet.serve_run(run.directory, String::new());
            fleet.finish_run();
        }
        let ids: std::collections::BTreeSet<String> = (0..FINISHED_RUNS_KEPT)
            .map(|i| fleet.launched(&format!("more-{i}")).unwrap())
            .collect();
        assert_eq!(ids.len(), FINISHED_RUNS_KEPT, "run ids are unique");
        assert!(fleet.directory(&first.run_id).is_none());
        assert!(fleet.directory(&second.run_id).is_none());
        assert!(
            fleet
                .directory(&fleet.launched("more-0").unwrap())
                .is_some()
        );
    }
}
