//! [`Directory`]: who serves one run, and what happened in it.
//!
//! Rollout workers and the learner register and send heartbeats (capacity, load, policy version
//! held); a worker that misses its lease is marked lost. The process that runs the stages waits
//! on the directory for its services ([`Directory::wait_for_workers`],
//! [`Directory::wait_for_learner`]) and appends the run's events to it ([`Directory::emit`]).
//! Events carry gap-free sequence numbers, so a client that reconnects with the last one it saw
//! neither misses nor repeats one; [`record_events`] copies them into the ledger.
//!
//! Membership changes reach the run's worker pool through one channel
//! ([`Directory::membership`]): the directory publishes [`Membership::Joined`] and
//! [`Membership::Lost`], and the pool answers each loss with [`Directory::report_lost`] (how
//! many requests it dispatched again), which is what the `WorkerLost` event reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chorus_proto::v1::{
    HeartbeatResponse, LearnerHeartbeatRequest, RegisterLearnerRequest, RegisterLearnerResponse,
    RegisterWorkerRequest, RegisterWorkerResponse, RunEvent, WorkerHeartbeatRequest, WorkerJoined,
    WorkerLost, run_event,
};
use tokio::sync::{Notify, broadcast, mpsc};

use crate::ledger::{Ledger, LedgerError};

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
    /// Whether it missed its lease or its stream broke.
    pub lost: bool,
    /// The `WorkerLost` event of its current loss has been appended.
    loss_reported: bool,
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

/// A change in the run's set of rollout workers, for the pool that dispatches to them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// The worker registered (or registered again after a loss) and listens at `url`.
    Joined {
        /// Its id.
        id: String,
        /// Where its `RolloutWorker` service listens.
        url: String,
    },
    /// The worker's lease ran out: the pool takes it out and dispatches its requests again,
    /// then answers with [`Directory::report_lost`].
    Lost {
        /// Its id.
        id: String,
    },
}

/// A registration the directory refuses; the gRPC service maps each kind to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// A field of the request is missing or out of range.
    #[error("{0}")]
    Invalid(String),
    /// The request names another run than the one served.
    #[error("this orchestrator runs `{serving}`, not `{asked}`")]
    WrongRun {
        /// The run served.
        serving: String,
        /// The run the request named.
        asked: String,
    },
}

/// A wait for the run's services that ran out of time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WaitError {
    /// Too few rollout workers registered.
    #[error("{registered} of {wanted} rollout workers registered within {waited_s:.0} s")]
    Workers {
        /// Live workers when the time ran out.
        registered: usize,
        /// Workers waited for.
        wanted: usize,
        /// Seconds waited.
        waited_s: f64,
    },
    /// No learner registered.
    #[error("no learner registered within {waited_s:.0} s")]
    Learner {
        /// Seconds waited.
        waited_s: f64,
    },
}

#[derive(Default)]
struct State {
    workers: BTreeMap<String, WorkerInfo>,
    learner: Option<LearnerInfo>,
    events: Vec<RunEvent>,
    /// The run is over: leases are no longer checked.
    closed: bool,
}

/// Who serves the run, and what happened in it (see the module docs).
pub struct Directory {
    run_id: String,
    leases: Leases,
    state: Mutex<State>,
    changed: Notify,
    live: broadcast::Sender<RunEvent>,
    /// The follower of membership changes (the run's worker pool), once one asked.
    members: Mutex<Option<mpsc::UnboundedSender<Membership>>>,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn valid_endpoint(endpoint: &str) -> Result<(), RegistrationError> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        Ok(())
    } else {
        Err(RegistrationError::Invalid(format!(
            "endpoint `{endpoint}`: allowed: http://host:port or https://host:port"
        )))
    }
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
            members: Mutex::new(None),
        })
    }

    /// The run it serves.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Registration timing.
    pub fn leases(&self) -> Leases {
        self.leases
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events from now on, as they are appended.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.live.subscribe()
    }

    /// Membership changes from now on, starting with a [`Membership::Joined`] for every live
    /// worker, so that no join falls between a snapshot and the subscription. There is one
    /// follower: a second call replaces the first. A follower must answer every
    /// [`Membership::Lost`] with [`Directory::report_lost`]; while there is none, a lost
    /// worker's event reports no request dispatched again.
    pub fn membership(&self) -> mpsc::UnboundedReceiver<Membership> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Under the state lock, so a registration is either in the snapshot or sent after it.
        let st = self.lock();
        for w in st.workers.values().filter(|w| !w.lost) {
            let _ = tx.send(Membership::Joined {
                id: w.id.clone(),
                url: w.endpoint.clone(),
            });
        }
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        drop(st);
        rx
    }

    /// Sends `change` to the follower; false when there is none (or it went away).
    fn publish(&self, change: Membership) -> bool {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        match members.as_ref().map(|tx| tx.send(change)) {
            Some(Ok(())) => true,
            Some(Err(_)) => {
                *members = None;
                false
            }
            None => false,
        }
    }

    /// Worker `id` is out of the run and `redispatched` requests it held went to other
    /// workers: the pool's answer to [`Membership::Lost`], or its own report when the
    /// worker's stream broke before its lease ran out. Appends one `WorkerLost` event per
    /// loss; the worker's heartbeats are then answered `registered = false`, so a worker that
    /// still runs registers and joins again.
    pub fn report_lost(&self, id: &str, redispatched: u32) {
        let mut st = self.lock();
        match st.workers.get_mut(id) {
            Some(w) if !w.loss_reported => {
                w.lost = true;
                w.loss_reported = true;
            }
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

    /// Waits until `n` workers are registered and live, or `timeout` passes.
    pub async fn wait_for_workers(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<WorkerInfo>, WaitError> {
        self.wait_until(timeout, || {
            let live = self.live_workers();
            (live.len() >= n).then_some(live)
        })
        .await
        .ok_or_else(|| WaitError::Workers {
            registered: self.live_workers().len(),
            wanted: n,
            waited_s: timeout.as_secs_f64(),
        })
    }

    /// Waits until the learner has registered, or `timeout` passes.
    pub async fn wait_for_learner(&self, timeout: Duration) -> Result<LearnerInfo, WaitError> {
        self.wait_until(timeout, || self.learner())
            .await
            .ok_or(WaitError::Learner {
                waited_s: timeout.as_secs_f64(),
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

    /// Marks workers whose lease ran out as lost (each one once) and returns their ids. Each
    /// goes to the follower as [`Membership::Lost`], whose answer appends the `WorkerLost`
    /// event; without a follower the event is appended at once.
    pub fn expire_leases(&self) -> Vec<String> {
        let now = Instant::now();
        let expired: Vec<String> = {
            let mut st = self.lock();
            let lease = self.leases.lease;
            st.workers
                .values_mut()
                .filter(|w| !w.lost && now.duration_since(w.last_seen) > lease)
                .map(|w| {
                    w.lost = true;
                    w.id.clone()
                })
                .collect()
        };
        if !expired.is_empty() {
            self.changed.notify_waiters();
        }
        for id in &expired {
            tracing::warn!(run_id = %self.run_id, worker_id = %id, "worker lost: no heartbeat within its lease");
            // Outside the state lock: the follower may answer at once.
            if !self.publish(Membership::Lost { id: id.clone() }) {
                self.report_lost(id, 0);
            }
        }
        expired
    }

    /// Checks leases every heartbeat interval until the directory is dropped or closed.
    pub fn spawn_lease_checker(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.leases.heartbeat;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(dir) if !dir.lock().closed => {
                        dir.expire_leases();
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

    /// Registers (again: idempotent by id) a rollout worker of this run.
    pub fn register_worker(
        &self,
        r: RegisterWorkerRequest,
    ) -> Result<RegisterWorkerResponse, RegistrationError> {
        if r.worker_id.is_empty() {
            return Err(RegistrationError::Invalid("worker_id is empty".into()));
        }
        valid_endpoint(&r.endpoint)?;
        if r.capacity == 0 {
            return Err(RegistrationError::Invalid(
                "capacity is 0; allowed: at least 1".into(),
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
                loss_reported: false,
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
        // Under the state lock, so `membership` sees it either in its snapshot or here.
        self.publish(Membership::Joined {
            id: r.worker_id.clone(),
            url: r.endpoint.clone(),
        });
        drop(st);
        self.changed.notify_waiters();
        tracing::info!(run_id = %self.run_id, worker_id = %r.worker_id, endpoint = %r.endpoint, capacity = r.capacity, "worker registered");
        Ok(RegisterWorkerResponse {
            worker_id: r.worker_id,
            heartbeat_interval_ms: self.leases.heartbeat.as_millis() as u64,
            lease_ms: self.leases.lease.as_millis() as u64,
            run_id: self.run_id.clone(),
        })
    }

    /// A worker's heartbeat; `registered = false` tells an unknown or lost worker to register
    /// again.
    pub fn worker_heartbeat(&self, h: WorkerHeartbeatRequest) -> HeartbeatResponse {
        let mut st = self.lock();
        let latest = st.learner.as_ref().map(|l| l.policy_version).unwrap_or(0);
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
            // The staleness bound travels with each request (`GenerateRequest`), not here.
            min_policy_version: 0,
            assignment: None,
        }
    }

    /// Registers the learner of this run (again: the last registration wins).
    pub fn register_learner(
        &self,
        r: RegisterLearnerRequest,
    ) -> Result<RegisterLearnerResponse, RegistrationError> {
        if r.run_id != self.run_id {
            return Err(RegistrationError::WrongRun {
                serving: self.run_id.clone(),
                asked: r.run_id,
            });
        }
        valid_endpoint(&r.endpoint)?;
        let mut st = self.lock();
        st.learner = Some(LearnerInfo {
            id: r.learner_id.clone(),
            endpoint: r.endpoint.clone(),
            step: 0,
            policy_version: r.policy_version,
            last_sequence: 0,
        });
        drop(st);
        self.changed.notify_waiters();
        tracing::info!(run_id = %self.run_id, learner_id = %r.learner_id, endpoint = %r.endpoint, "learner registered");
        Ok(RegisterLearnerResponse {
            learner_id: r.learner_id,
            heartbeat_interval_ms: self.leases.heartbeat.as_millis() as u64,
            resume_step: 0,
        })
    }

    /// The learner's heartbeat.
    pub fn learner_heartbeat(&self, h: LearnerHeartbeatRequest) -> HeartbeatResponse {
        let mut st = self.lock();
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
            min_policy_version: 0,
            assignment: None,
        }
    }
}

/// The ledger's `events` row of a run event: its kind and a JSON payload.
pub fn event_row(event: &RunEvent) -> (&'static str, serde_json::Value) {
    use run_event::Kind;
    let (kind, mut payload) = match &event.kind {
        Some(Kind::StatusChanged(c)) => (
            "status_changed",
            serde_json::json!({
                "status": chorus_proto::v1::RunStatus::try_from(c.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("RUN_STATUS_UNSPECIFIED"),
                "reason": c.reason,
            }),
        ),
        Some(Kind::PolicyPublished(p)) => (
            "policy_published",
            serde_json::json!({
                "policy_version": p.policy_version,
                "learner_step": p.learner_step,
                "digest": chorus_proto::checksum::describe(p.digest_algorithm(), &p.digest),
            }),
        ),
        Some(Kind::LearnerStep(s)) => (
            "learner_step",
            serde_json::json!({
                "step": s.step,
                // JSON has no NaN: a skipped step's loss is null.
                "loss": s.loss.is_finite().then_some(s.loss),
                "trajectories": s.trajectories,
                "skipped": s.skipped,
            }),
        ),
        Some(Kind::WorkerJoined(j)) => (
            "worker_joined",
            serde_json::json!({"worker_id": j.worker_id, "capacity": j.capacity}),
        ),
        Some(Kind::WorkerLost(l)) => (
            "worker_lost",
            serde_json::json!({
                "worker_id": l.worker_id,
                "redispatched_prompts": l.redispatched_prompts,
            }),
        ),
        None => ("unknown", serde_json::json!({})),
    };
    payload["sequence"] = event.sequence.into();
    payload["timestamp_ms"] = event.timestamp_ms.into();
    (kind, payload)
}

/// Whether `e` moves the run to a final status, after which its event log ends.
pub fn ends_run(e: &RunEvent) -> bool {
    use chorus_proto::v1::RunStatus as S;
    matches!(&e.kind, Some(run_event::Kind::StatusChanged(c))
        if [S::Succeeded, S::Failed, S::Cancelled]
            .iter()
            .any(|s| *s as i32 == c.status))
}

/// Copies `directory`'s event log into the ledger's `events` table: every event appended so
/// far, then each new one, until the run reaches a final status or the directory is dropped.
/// Returns the number of events recorded; stops at the first write the ledger refuses.
pub async fn record_events(directory: Arc<Directory>, ledger: Ledger) -> Result<u64, LedgerError> {
    let run_id = directory.run_id().to_string();
    let record = |e: RunEvent| {
        let (ledger, run_id) = (ledger.clone(), run_id.clone());
        async move {
            let (kind, payload) = event_row(&e);
            ledger
                .record_event(&run_id, kind, payload.to_string())
                .await
        }
    };
    // Subscribed before reading the backlog; what the backlog had is skipped in the live part.
    let mut live = directory.subscribe();
    let weak = Arc::downgrade(&directory);
    let backlog = directory.events_after(0);
    // Holding the directory would keep its event stream open forever.
    drop(directory);
    let mut recorded = 0u64;
    let mut pending: std::collections::VecDeque<RunEvent> = backlog.into();
    loop {
        while let Some(e) = pending.pop_front() {
            if e.sequence <= recorded {
                continue;
            }
            let last = ends_run(&e);
            recorded = e.sequence;
            record(e).await?;
            if last {
                return Ok(recorded);
            }
        }
        match live.recv().await {
            Ok(e) => pending.push_back(e),
            // The log itself still has what the stream dropped.
            Err(broadcast::error::RecvError::Lagged(_)) => match weak.upgrade() {
                Some(d) => pending.extend(d.events_after(recorded)),
                None => return Ok(recorded),
            },
            Err(broadcast::error::RecvError::Closed) => return Ok(recorded),
        }
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
            serving_run_id: String::new(),
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
        assert!(err.to_string().contains("1 of 2"), "{err}");
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
            serving_run_id: String::new(),
        });
        assert!(hb.registered);
        assert_eq!(hb.latest_policy_version, 4);
    }

    #[tokio::test]
    async fn membership_changes_reach_the_follower_and_its_answer_is_the_loss_event() {
        let dir = Directory::new(
            "r",
            Leases {
                heartbeat: Duration::from_millis(10),
                lease: Duration::from_millis(1),
            },
        );
        dir.register_worker(worker("early")).unwrap();
        let mut changes = dir.membership();
        assert_eq!(
            changes.try_recv().unwrap(),
            Membership::Joined {
                id: "early".into(),
                url: "http://127.0.0.1:1".into()
            },
            "workers registered before the follower came are announced first"
        );
        dir.register_worker(worker("late")).unwrap();
        assert!(
            matches!(changes.try_recv().unwrap(), Membership::Joined { id, .. } if id == "late")
        );
        let lost = |dir: &Directory| {
            dir.events_after(0)
                .into_iter()
                .filter_map(|e| match e.kind {
                    Some(run_event::Kind::WorkerLost(l)) => Some(l),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        std::thread::sleep(Duration::from_millis(5));
        let mut expired = dir.expire_leases();
        expired.sort();
        assert_eq!(expired, ["early", "late"]);
        assert!(dir.live_workers().is_empty(), "lost at once");
        assert_eq!(
            [changes.try_recv().unwrap(), changes.try_recv().unwrap()],
            [
                Membership::Lost { id: "early".into() },
                Membership::Lost { id: "late".into() }
            ]
        );
        assert!(
            lost(&dir).is_empty(),
            "the event waits for the follower's count"
        );
        dir.report_lost("early", 3);
        dir.report_lost("early", 9);
        assert_eq!(lost(&dir).len(), 1, "one event per loss");
        assert_eq!(lost(&dir)[0].redispatched_prompts, 3);

        // Without a follower, the event is appended at once.
        drop(changes);
        dir.register_worker(worker("alone")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(dir.expire_leases(), ["alone"]);
        let events = lost(&dir);
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[1].worker_id.as_str(), events[1].redispatched_prompts),
            ("alone", 0)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn record_events_copies_the_log_into_the_ledger_until_the_run_ends() {
        use chorus_proto::v1::{RunStatus as ProtoRunStatus, RunStatusChanged};

        let (_tmp, ledger) = crate::testkit::ledger_with_run("r").await;
        let dir = Directory::new("r", Leases::default());
        let status = |s: ProtoRunStatus| {
            run_event::Kind::StatusChanged(RunStatusChanged {
                status: s as i32,
                reason: String::new(),
            })
        };
        dir.emit(status(ProtoRunStatus::Running));
        dir.register_worker(worker("w")).unwrap();
        let recorder = tokio::spawn(record_events(dir.clone(), ledger.clone()));
        dir.emit(run_event::Kind::LearnerStep(
            chorus_proto::v1::LearnerStepCompleted {
                step: 1,
                loss: f64::NAN,
                trajectories: 4,
                skipped: true,
            },
        ));
        dir.emit(status(ProtoRunStatus::Succeeded));
        assert_eq!(recorder.await.unwrap().unwrap(), 4);
        ledger.flush().await.unwrap();
        let rows = ledger.list_events("r", 0, 100).await.unwrap();
        let kinds: Vec<&str> = rows.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "status_changed",
                "worker_joined",
                "learner_step",
                "status_changed"
            ]
        );
        let payload = |i: usize| -> serde_json::Value {
            serde_json::from_str(&rows[i].payload_json).unwrap()
        };
        assert_eq!(payload(0)["status"], "RUN_STATUS_RUNNING");
        assert_eq!(payload(1)["worker_id"], "w");
        assert_eq!(payload(2)["loss"], serde_json::Value::Null, "NaN is null");
        assert_eq!(payload(2)["sequence"], 3);
        assert_eq!(payload(3)["status"], "RUN_STATUS_SUCCEEDED");
    }
}
