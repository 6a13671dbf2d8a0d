//! The scheduler's view of remote services over gRPC: [`WorkerPool`] dispatches generation to
//! the least-loaded of several rollout workers with a bounded number in flight per worker, and
//! [`RemoteLearner`] submits scored groups and follows the learner's step reports (recording
//! them in the ledger).
//!
//! The pool changes during a run. A worker whose `Generate` stream breaks (its process died, its
//! machine went away) or whose lease the [`Directory`] expires leaves the pool, and every request
//! it held is dispatched again, with the same ids, to another worker: a lost worker loses no
//! prompt, and a late answer from it is dropped, so none is doubled. A worker that registers
//! while the run goes on joins the pool ([`WorkerPool::follow`], which consumes the directory's
//! [`Membership`] changes and reports each loss back with the number of requests dispatched
//! again).

use chorus_proto::limits::{LEARNER_MAX_MESSAGE_BYTES, ROLLOUT_WORKER_MAX_MESSAGE_BYTES};
use chorus_proto::prost::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chorus_proto::auth::AttachToken;
use chorus_proto::tonic::codegen::InterceptedService;
use chorus_proto::tonic::transport::Channel;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::rollout_worker_client::RolloutWorkerClient;
use chorus_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, LearnerStatusRequest, StepReport,
    StreamStepsRequest, StreamWeightsRequest, TrajectoryGroup,
};
use chorus_proto::weights::{HostTensor, receive};
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::directory::{Directory, Membership};
use crate::ledger::{LearnerStep, Ledger, PolicyVersion, WeightTransfer};
use crate::scheduler::{BoxFuture, Learning, LearningError, Rollouts};

/// A connection failure, naming the address.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {message}")]
pub struct ConnectError {
    /// The service's address.
    pub url: String,
    /// What went wrong.
    pub message: String,
}

type Pending = HashMap<String, oneshot::Sender<GenerateResponse>>;

/// How often one request may be dispatched again after losing its worker before it fails.
const MAX_REDISPATCH: usize = 4;

struct RemoteWorker {
    id: String,
    url: String,
    /// Taken when the worker is lost, which ends its request stream (and so, at the worker,
    /// the response stream).
    requests: Mutex<Option<mpsc::Sender<GenerateRequest>>>,
    /// Requests sent and not yet answered. `None` once the worker is lost: nothing more is sent.
    pending: Mutex<Option<Pending>>,
    in_flight: AtomicUsize,
    slots: Arc<Semaphore>,
}

/// Why a request did not get an answer from a worker; it goes to another one.
struct Lost(String);

/// Counts a request waiting on a worker for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RemoteWorker {
    fn pending(&self) -> MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Still in the pool and still taking requests. A worker whose request stream has closed
    /// (its connection died) is not picked again even before its response stream reports the
    /// break and takes it out, or a request could be sent into the closed stream over and over.
    fn alive(&self) -> bool {
        self.pending().is_some()
            && self
                .requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|tx| !tx.is_closed())
    }

    /// Marks the worker lost and returns the answers it still owed (`None` when it was already
    /// lost); dropping them sends each of those requests back to the pool.
    fn lose(&self) -> Option<Pending> {
        let owed = self.pending().take()?;
        self.slots.close();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        Some(owed)
    }

    async fn call(&self, req: &GenerateRequest) -> Result<GenerateResponse, Lost> {
        let _counted = InFlight::new(&self.in_flight);
        let _permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Lost(format!("worker {} left the pool", self.id)))?;
        let (tx, rx) = oneshot::channel();
        // Checked and inserted under the lock `lose` takes, so an answer is either owed by a
        // live worker or never asked for.
        match self.pending().as_mut() {
            Some(p) => p.insert(req.request_id.clone(), tx),
            None => return Err(Lost(format!("worker {} left the pool", self.id))),
        };
        let sender = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sent = match sender {
            Some(tx) => tx.send(req.clone()).await.is_ok(),
            None => false,
        };
        if !sent {
            if let Some(p) = self.pending().as_mut() {
                p.remove(&req.request_id);
            }
            return Err(Lost(format!("worker {} is gone", self.id)));
        }
        rx.await
            .map_err(|_| Lost(format!("worker {} was lost before answering", self.id)))
    }
}

struct PoolInner {
    token: String,
    max_in_flight: usize,
    workers: Mutex<Vec<Arc<RemoteWorker>>>,
    joined: Notify,
    /// How long a request waits for a worker to join when none is left.
    wait_for_worker: Duration,
    /// The run's directory, once the pool follows one: losses are reported there.
    directory: Mutex<Option<Weak<Directory>>>,
}

/// Rollout workers reached over gRPC; see the module docs for how it changes during a run.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<PoolInner>,
}

/// A channel to `url`: `https://` with the process's TLS settings (`chorus_proto::tls`).
async fn channel(url: &str) -> Result<Channel, ConnectError> {
    chorus_proto::tls::endpoint(url)
        .map_err(|e| ConnectError {
            url: url.into(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| ConnectError {
            url: url.into(),
            message: format!("cannot connect: {}", error_chain(&e)),
        })
}

/// An error and its causes, `a: b: c` (a TLS failure is in the causes of a transport error).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// The interceptor that sends `token` to the service at `url`.
fn attach(url: &str, token: &str) -> Result<AttachToken, ConnectError> {
    AttachToken::new(token).map_err(|e| ConnectError {
        url: url.into(),
        message: e.to_string(),
    })
}

fn failed(req: &GenerateRequest, message: String) -> GenerateResponse {
    GenerateResponse {
        request_id: req.request_id.clone(),
        run_id: req.run_id.clone(),
        prompt_id: req.prompt_id.clone(),
        trajectory_id: req.trajectory_id.clone(),
        finish_reason: FinishReason::Error as i32,
        error: message,
        ..Default::default()
    }
}

impl WorkerPool {
    /// An empty pool: at most `max_in_flight` requests wait on a worker at a time (callers
    /// beyond that wait: backpressure); a request finding no worker waits up to
    /// `wait_for_worker` for one to join.
    pub fn new(token: &str, max_in_flight: usize, wait_for_worker: Duration) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                token: token.to_string(),
                max_in_flight: max_in_flight.max(1),
                workers: Mutex::new(vec![]),
                joined: Notify::new(),
                wait_for_worker,
                directory: Mutex::new(None),
            }),
        }
    }

    /// A pool of the workers at `urls` (each known by its address), one `Generate` stream each.
    pub async fn connect(
        urls: &[String],
        token: &str,
        max_in_flight: usize,
    ) -> Result<Self, ConnectError> {
        let pool = Self::new(token, max_in_flight, Duration::from_secs(600));
        for url in urls {
            pool.add(url, url).await?;
        }
        Ok(pool)
    }

    fn workers(&self) -> MutexGuard<'_, Vec<Arc<RemoteWorker>>> {
        self.inner.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a `Generate` stream to the worker `id` at `url` and adds it. A worker of that id
    /// already in the pool at the same address is kept; at another address (it restarted
    /// elsewhere) it is replaced and its requests dispatched again.
    pub async fn add(&self, id: &str, url: &str) -> Result<(), ConnectError> {
        if self.workers().iter().any(|w| w.id == id && w.url == url) {
            return Ok(());
        }
        let attach = attach(url, &self.inner.token)?;
        let mut client = RolloutWorkerClient::with_interceptor(channel(url).await?, attach)
            .max_decoding_message_size(ROLLOUT_WORKER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ROLLOUT_WORKER_MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<GenerateRequest>(1024);
        let mut responses = client
            .generate(ReceiverStream::new(rx))
            .await
            .map_err(|e| ConnectError {
                url: url.into(),
                message: format!("Generate: {e}"),
            })?
            .into_inner();
        let worker = Arc::new(RemoteWorker {
            id: id.to_string(),
            url: url.to_string(),
            requests: Mutex::new(Some(tx)),
            pending: Mutex::new(Some(HashMap::new())),
            in_flight: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(self.inner.max_in_flight)),
        });
        let replaced = {
            let mut workers = self.workers();
            let old = workers
                .iter()
                .position(|w| w.id == id)
                .map(|i| workers.remove(i));
            workers.push(worker.clone());
            old
        };
        if let Some(old) = replaced {
            // Dropping what it owed dispatches those requests again.
            drop(old.lose());
        }
        self.inner.joined.notify_waiters();
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let why = loop {
                match responses.next().await {
                    Some(Ok(r)) => {
                        let tx = worker
                            .pending()
                            .as_mut()
                            .and_then(|p| p.remove(&r.request_id));
                        if let Some(tx) = tx {
                            let _ = tx.send(r);
                        }
                    }
                    Some(Err(e)) => break format!("its stream broke: {e}"),
                    None => break "it closed its stream".to_string(),
                }
            };
            if let Some(inner) = pool.upgrade()
                && let Some(owed) = Self::take_out(&inner, &worker)
            {
                let n = owed.len() as u32;
                tracing::warn!(worker_id = %worker.id, url = %worker.url, redispatched = n, reason = %why, "worker lost; its requests go to other workers");
                let directory = inner
                    .directory
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .and_then(Weak::upgrade);
                // Reported before the requests go back, so the event precedes their answers.
                if let Some(d) = directory {
                    d.report_lost(&worker.id, n);
                }
                drop(owed);
            }
        });
        Ok(())
    }

    /// Takes `worker` out of the pool; returns the answers it owed, or `None` when it was
    /// already lost.
    fn take_out(inner: &PoolInner, worker: &Arc<RemoteWorker>) -> Option<Pending> {
        inner
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| !Arc::ptr_eq(w, worker));
        worker.lose()
    }

    /// Takes the worker `id` out of the pool; the requests it held are dispatched again.
    /// Returns how many, or `None` when it was not in the pool.
    pub fn remove(&self, id: &str) -> Option<u32> {
        self.remove_then(id, |_| {})
    }

    /// [`WorkerPool::remove`], calling `before_redispatch` with the count before the requests
    /// go back to the pool.
    fn remove_then(&self, id: &str, before_redispatch: impl FnOnce(u32)) -> Option<u32> {
        let worker = self.workers().iter().find(|w| w.id == id).cloned()?;
        let owed = Self::take_out(&self.inner, &worker)?;
        let n = owed.len() as u32;
        before_redispatch(n);
        drop(owed);
        Some(n)
    }

    /// Ids of the workers in the pool.
    pub fn ids(&self) -> Vec<String> {
        self.workers().iter().map(|w| w.id.clone()).collect()
    }

    /// Keeps the pool in step with `directory`'s [`Membership`] changes: every live
    /// registered worker is in the pool when this returns, each one that registers later joins,
    /// and one whose lease runs out leaves (its requests dispatched again, their count reported
    /// back with [`Directory::report_lost`]). A worker whose stream breaks is reported lost
    /// there too, so that it registers again if it still runs.
    pub async fn follow(&self, directory: Arc<Directory>) {
        *self
            .inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(&directory));
        let mut changes = directory.membership();
        while let Ok(change) = changes.try_recv() {
            self.apply(&directory, change).await;
        }
        let pool: Weak<PoolInner> = Arc::downgrade(&self.inner);
        let dir = Arc::downgrade(&directory);
        tokio::spawn(async move {
            // Ends when the directory (the sender) is dropped.
            while let Some(change) = changes.recv().await {
                let (Some(inner), Some(dir)) = (pool.upgrade(), dir.upgrade()) else {
                    return;
                };
                WorkerPool { inner }.apply(&dir, change).await;
            }
        });
    }

    async fn apply(&self, directory: &Directory, change: Membership) {
        match change {
            Membership::Joined { id, url } => self.join(&id, &url).await,
            Membership::Lost { id } => {
                let reported = self.remove_then(&id, |n| {
                    tracing::warn!(run_id = %directory.run_id(), worker_id = %id, redispatched = n, "worker left the pool: lease expired");
                    directory.report_lost(&id, n);
                });
                if reported.is_none() {
                    // Never reachable, so it held nothing.
                    directory.report_lost(&id, 0);
                }
            }
        }
    }

    async fn join(&self, id: &str, url: &str) {
        match self.add(id, url).await {
            Ok(()) => tracing::info!(worker_id = %id, url = %url, "worker is in the pool"),
            Err(e) => {
                tracing::warn!(worker_id = %id, url = %url, error = %e, "worker registered but cannot be reached")
            }
        }
    }

    /// The least-loaded worker, waiting for one to join when none is left.
    async fn pick(&self) -> Option<Arc<RemoteWorker>> {
        let deadline = tokio::time::Instant::now() + self.inner.wait_for_worker;
        loop {
            let joined = self.inner.joined.notified();
            let best = self
                .workers()
                .iter()
                .filter(|w| w.alive())
                .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))
                .cloned();
            if best.is_some() {
                return best;
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return None;
            }
        }
    }
}

impl Rollouts for WorkerPool {
    fn generate(&self, req: GenerateRequest) -> BoxFuture<GenerateResponse> {
        let pool = self.clone();
        Box::pin(async move {
            let mut lost = vec![];
            loop {
                let Some(worker) = pool.pick().await else {
                    return failed(
                        &req,
                        format!(
                            "no rollout worker left, and none joined within {:.0} s",
                            pool.inner.wait_for_worker.as_secs_f64()
                        ),
                    );
                };
                match worker.call(&req).await {
                    Ok(resp) => return resp,
                    Err(Lost(why)) => {
                        lost.push(why);
                        if lost.len() > MAX_REDISPATCH {
                            return failed(
                                &req,
                                format!(
                                    "dispatched {} times, lost each time: {}",
                                    lost.len(),
                                    lost.join("; ")
                                ),
                            );
                        }
                    }
                }
            }
        })
    }

    /// Workers hold back each request until they have its `min_policy_version` (or its
    /// `exact_policy_version`, fetched if need be), so the pool itself never needs to wait.
    fn wait_version(&self, _version: u64) -> BoxFuture<()> {
        Box::pin(async {})
    }
}

/// The learner reached over gRPC.
///
/// It survives the learner's death. Every group submitted is kept until the learner reports a
/// checkpoint at or past its step ([`StepReport::checkpoint_version`]); when the learner's step
/// stream breaks, its follower asks the learner's `Status` again (retrying for the
/// [`LearnerLink::recover_for`] a restart may take), rewinds the ledger's learner steps and
/// policy versions to the version the learner came back at, follows its steps again and sends it
/// every kept group of that step and later. Groups carry their step, so the learner trains none
/// of them twice; a submit that meets a dead learner retries until it is back. A learner that
/// comes back below the oldest kept step (it restarted from older state than the groups kept
/// reach back to) or not at all ends the run's wait with [`LearningError::Gone`].
pub struct RemoteLearner {
    url: String,
    client: LearnerClient<InterceptedService<Channel, AttachToken>>,
    version: watch::Receiver<u64>,
    steps: broadcast::Sender<StepReport>,
    kept: Arc<Mutex<Kept>>,
    link: LearnerLink,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteLearner {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// How the orchestrator keeps its learner.
#[derive(Clone, Debug)]
pub struct LearnerLink {
    /// How long a learner may be gone (restarting) before the run gives up on it.
    pub recover_for: Duration,
    /// Most bytes of groups kept for sending again while the learner saves no checkpoint; past
    /// it the oldest steps are let go (and a restart before them can no longer be recovered).
    pub max_kept_bytes: usize,
}

impl Default for LearnerLink {
    fn default() -> Self {
        Self {
            recover_for: Duration::from_secs(600),
            max_kept_bytes: 1 << 30,
        }
    }
}

/// Groups submitted since the learner's newest checkpoint, by step.
#[derive(Default)]
struct Kept {
    /// The oldest step kept: a learner restarted before it cannot be given what it lost.
    floor: u64,
    groups: BTreeMap<u64, Vec<TrajectoryGroup>>,
    bytes: usize,
    /// Whether the warning about letting groups go was given.
    warned: bool,
}

impl Kept {
    fn keep(&mut self, group: &TrajectoryGroup, max_bytes: usize) {
        let Some(step) = group.step else { return };
        if step < self.floor {
            return;
        }
        self.bytes += group.encoded_len();
        self.groups.entry(step).or_default().push(group.clone());
        while self.bytes > max_bytes && self.groups.len() > 1 {
            let Some((oldest, gone)) = self.groups.pop_first() else {
                break;
            };
            self.bytes -= gone.iter().map(|g| g.encoded_len()).sum::<usize>();
            self.floor = oldest + 1;
            if !std::mem::replace(&mut self.warned, true) {
                tracing::warn!(
                    kept_from_step = self.floor,
                    max_kept_bytes = max_bytes,
                    "the learner has saved no checkpoint for a while: groups before step {} are \
                     no longer kept, so a learner restart from before it cannot be recovered \
                     (set [learner] checkpoint_every)",
                    self.floor
                );
            }
        }
    }

    /// The learner saved version `version`: groups of earlier steps are in it.
    fn checkpointed(&mut self, version: u64) {
        if version <= self.floor {
            return;
        }
        self.floor = version;
        let later = self.groups.split_off(&version);
        let gone = std::mem::replace(&mut self.groups, later);
        self.bytes -= gone
            .values()
            .flatten()
            .map(|g| g.encoded_len())
            .sum::<usize>();
        self.warned = false;
    }

    /// Every kept group of step `from` and later, in step order.
    fn since(&self, from: u64) -> Vec<TrajectoryGroup> {
        self.groups
            .range(from..)
            .flat_map(|(_, g)| g.clone())
            .collect()
    }
}

/// Whether a failed call may succeed once the learner is back (it died, restarts, or the
/// connection broke), as opposed to an answer it gave.
fn learner_down(status: &chorus_proto::tonic::Status) -> bool {
    use chorus_proto::tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    )
}

type Client = LearnerClient<InterceptedService<Channel, AttachToken>>;

/// What the follower needs to record steps and recover the learner.
struct Follower {
    run: String,
    url: String,
    client: Client,
    ledger: Option<Ledger>,
    version: watch::Sender<u64>,
    steps: broadcast::Sender<StepReport>,
    kept: Arc<Mutex<Kept>>,
    link: LearnerLink,
    /// The newest step recorded (step `s` publishes version `s`, so also the newest version in
    /// the ledger's `policy_versions`): a learner replays its reports when its step stream is
    /// opened again (a restarted one, those saved with its checkpoint), and only later ones
    /// are news.
    recorded_step: u64,
}

impl Follower {
    async fn run(mut self, mut stream: chorus_proto::tonic::Streaming<StepReport>) {
        loop {
            while let Some(Ok(r)) = stream.next().await {
                self.record(r).await;
            }
            tracing::warn!(run_id = %self.run, learner = %self.url, "the learner's step stream ended; waiting for it to come back");
            match self.recover().await {
                Some(s) => stream = s,
                None => return,
            }
        }
    }

    async fn record(&mut self, r: StepReport) {
        if r.step <= self.recorded_step {
            return;
        }
        self.recorded_step = r.step;
        tracing::debug!(run_id = %self.run, step = r.step, policy_version = r.policy_version, loss = r.loss, trajectories = r.trajectories, skip_reason = %r.skip_reason, "learner step");
        let run = &self.run;
        if let Some(ledger) = &self.ledger {
            // A skipped step publishes the same weights under the next version, so it
            // is a version too.
            let recorded = ledger
                .record_policy_version(PolicyVersion {
                    run_id: run.clone(),
                    version: r.policy_version,
                    learner_step: r.step,
                    weights_digest: chorus_proto::checksum::describe(
                        r.weights_digest_algorithm(),
                        &r.weights_digest,
                    ),
                    num_bytes: r.weights_bytes,
                })
                .await;
            if let Err(e) = recorded {
                tracing::error!(run_id = %run, policy_version = r.policy_version, error = %e, "the ledger refused a policy version");
            }
            let opt = |v: f64| v.is_finite().then_some(v);
            let _ = ledger
                .insert_learner_step(LearnerStep {
                    run_id: run.clone(),
                    step: r.step,
                    policy_version: r.policy_version,
                    loss: opt(r.loss),
                    kl: opt(r.kl),
                    entropy: opt(r.entropy),
                    grad_norm: opt(r.grad_norm),
                    learning_rate: opt(r.learning_rate),
                    clip_fraction: opt(r.clip_fraction),
                    num_tokens: r.tokens,
                    num_trajectories: r.trajectories as u64,
                    skip_reason: (!r.skip_reason.is_empty()).then(|| r.skip_reason.clone()),
                    // Supervised steps have no sampled tokens to compare.
                    mean_abs_logprob_diff: (!r.supervised)
                        .then_some(r.mean_abs_logprob_diff)
                        .and_then(opt),
                })
                .await
                .inspect_err(|e| {
                    tracing::error!(run_id = %run, step = r.step, error = %e, "the ledger refused a learner step");
                });
            let transfers = r
                .transfers
                .iter()
                .map(|t| WeightTransfer {
                    run_id: run.clone(),
                    requester_id: t.requester_id.clone(),
                    policy_version: t.policy_version,
                    num_bytes: t.bytes,
                    seconds: t.seconds,
                    finished_at_ms: t.finished_at_ms,
                })
                .collect();
            let _ = ledger
                .record_weight_transfers(transfers)
                .await
                .inspect_err(|e| {
                    tracing::error!(run_id = %run, step = r.step, error = %e, "the ledger refused weight transfers");
                });
        }
        if let Some(c) = r.checkpoint_version {
            self.kept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .checkpointed(c);
        }
        self.version
            .send_modify(|v| *v = (*v).max(r.policy_version));
        metrics::gauge!(crate::metrics::POLICY_VERSION).set(r.policy_version as f64);
        let _ = self.steps.send(r);
    }

    /// Waits for the learner to answer again, and brings it up to date: returns its step stream,
    /// or `None` when it did not come back in time or cannot be given what it lost.
    async fn recover(&mut self) -> Option<chorus_proto::tonic::Streaming<StepReport>> {
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        let status = loop {
            if started.elapsed() >= self.link.recover_for {
                tracing::error!(run_id = %self.run, learner = %self.url, waited_s = started.elapsed().as_secs_f64(), "the learner did not come back within {:.0} s; the run stops waiting for it", self.link.recover_for.as_secs_f64());
                return None;
            }
            let asked = self
                .client
                .status(LearnerStatusRequest {
                    run_id: self.run.clone(),
                    discard_pending: false,
                })
                .await;
            match asked {
                Ok(s) => break s.into_inner(),
                Err(e) if learner_down(&e) => {}
                Err(e) => {
                    tracing::error!(run_id = %self.run, learner = %self.url, error = %e, "the learner answered, but not where it stands: it cannot be brought up to date");
                    return None;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        let at = status.policy_version;
        let (floor, resend) = {
            let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            (kept.floor, kept.since(at))
        };
        if at < floor {
            tracing::error!(run_id = %self.run, learner = %self.url, policy_version = at, kept_from_step = floor, "the learner came back at version {at}, but the groups of steps before {floor} are no longer kept (it checkpointed later, or saves none): the run cannot go on with it");
            return None;
        }
        let held = *self.version.borrow();
        if at < self.recorded_step
            && let Some(ledger) = &self.ledger
            && let Err(e) = ledger.forget_learner_steps(&self.run, at).await
        {
            tracing::error!(run_id = %self.run, error = %e, "the ledger did not forget the steps the learner lost");
        }
        // Its reports up to `at` are replayed: those of steps the run never heard of (sent
        // while it died) are recorded then; later steps it trains anew.
        self.recorded_step = self.recorded_step.min(at);
        let stream = loop {
            match self
                .client
                .stream_steps(StreamStepsRequest {
                    run_id: self.run.clone(),
                    after_step: 0,
                })
                .await
            {
                Ok(s) => break s.into_inner(),
                Err(e) if learner_down(&e) && started.elapsed() < self.link.recover_for => {
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => {
                    tracing::error!(run_id = %self.run, learner = %self.url, error = %e, "StreamSteps failed after the learner came back");
                    return None;
                }
            }
        };
        tracing::warn!(
            run_id = %self.run,
            learner = %self.url,
            policy_version = at,
            checkpoint_version = status.checkpoint_version,
            run_version = held,
            groups = resend.len(),
            down_s = started.elapsed().as_secs_f64(),
            "the learner is back at version {at} (the run had reached {held}); sending it the {} groups of steps {at} and later again",
            resend.len()
        );
        metrics::counter!(crate::metrics::LEARNER_RECOVERIES).increment(1);
        // In step order, in one stream: the learner gathers groups by their step, so these and
        // the scheduler's new ones (retrying meanwhile) never mix across steps.
        if !resend.is_empty() {
            let sent = self
                .client
                .submit_trajectories(tokio_stream::iter(resend))
                .await;
            match sent {
                Ok(ack) => {
                    for r in ack.into_inner().rejected {
                        tracing::error!(run_id = %self.run, group_id = %r.group_id, reason = %r.reason, "the restarted learner refused a group sent again");
                    }
                }
                // The learner died again: its step stream breaks too, and the next recovery
                // sends them.
                Err(e) => {
                    tracing::warn!(run_id = %self.run, error = %e, "sending the kept groups again failed")
                }
            }
        }
        Some(stream)
    }
}

/// For an orchestrator restarted on a run whose learner lived on: has the learner drop the
/// groups it held for steps not yet trained (the run sends those steps anew), records in
/// `ledger` every step the learner's history holds (the steps trained while no orchestrator
/// recorded them, with their policy versions) and marks the prompts of the groups each trained
/// consumed at its step. Returns the learner's version, where the run continues. Waits up to
/// `wait` for the learner to answer.
pub async fn take_over_learner(
    url: &str,
    token: &str,
    run_id: &str,
    ledger: &Ledger,
    wait: Duration,
) -> Result<u64, ConnectError> {
    let fail = |message: String| ConnectError {
        url: url.into(),
        message,
    };
    let attach = attach(url, token)?;
    let client = LearnerClient::with_interceptor(channel(url).await?, attach)
        .max_decoding_message_size(LEARNER_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(LEARNER_MAX_MESSAGE_BYTES);
    let started = std::time::Instant::now();
    let status = loop {
        let asked = client
            .clone()
            .status(LearnerStatusRequest {
                run_id: run_id.into(),
                discard_pending: true,
            })
            .await;
        match asked {
            Ok(s) => break s.into_inner(),
            Err(e) if learner_down(&e) && started.elapsed() < wait => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(fail(format!("Status: {e}"))),
        }
    };
    let version = status.policy_version;
    if version > status.start_version {
        let mut stream = client
            .clone()
            .stream_steps(StreamStepsRequest {
                run_id: run_id.into(),
                after_step: 0,
            })
            .await
            .map_err(|e| fail(format!("StreamSteps: {e}")))?
            .into_inner();
        let (version_tx, _) = watch::channel(0);
        let (steps, _) = broadcast::channel(1);
        let mut follower = Follower {
            run: run_id.into(),
            url: url.into(),
            client,
            ledger: Some(ledger.clone()),
            version: version_tx,
            steps,
            kept: Arc::default(),
            link: LearnerLink::default(),
            recorded_step: 0,
        };
        loop {
            let next = tokio::time::timeout(wait, stream.next())
                .await
                .map_err(|_| fail(format!("its step history stopped before version {version}")))?;
            let r = match next {
                Some(Ok(r)) => r,
                Some(Err(e)) => return Err(fail(format!("StreamSteps: {e}"))),
                None => {
                    return Err(fail(format!(
                        "its step history ended before version {version}"
                    )));
                }
            };
            let at = r.policy_version;
            let prompts: Vec<String> = r
                .group_ids
                .iter()
                .filter(|g| !g.ends_with(":empty"))
                .map(|g| format!("{g}:p"))
                .collect();
            follower.record(r).await;
            ledger
                .mark_consumed(prompts, at.saturating_sub(1))
                .await
                .map_err(|e| fail(format!("recording the groups it trained: {e}")))?;
            if at >= version {
                break;
            }
        }
    }
    ledger
        .flush()
        .await
        .map_err(|e| fail(format!("recording its steps: {e}")))?;
    Ok(version)
}

impl RemoteLearner {
    /// Connects and follows the learner's steps from `initial_version` on, recording each step
    /// and each policy version it publishes in `ledger` when given, and keeping the learner as
    /// `link` says (see the type's docs).
    pub async fn connect(
        url: &str,
        token: &str,
        run_id: &str,
        initial_version: u64,
        ledger: Option<Ledger>,
        link: LearnerLink,
    ) -> Result<Self, ConnectError> {
        let attach = attach(url, token)?;
        let client = LearnerClient::with_interceptor(channel(url).await?, attach)
            .max_decoding_message_size(LEARNER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(LEARNER_MAX_MESSAGE_BYTES);
        let stream = client
            .clone()
            .stream_steps(StreamStepsRequest {
                run_id: run_id.into(),
                after_step: 0,
            })
            .await
            .map_err(|e| ConnectError {
                url: url.into(),
                message: format!("StreamSteps: {e}"),
            })?
            .into_inner();
        // A learner resumed from a checkpoint replays the reports saved there; those of steps
        // the ledger lacks (a crashed run trained them but had not written them yet) are
        // recorded now, the others are not repeated.
        let recorded = match &ledger {
            Some(ledger) => match ledger.last_learner_step(run_id).await {
                Ok(last) => last.map_or(0, |r| r.step.step).min(initial_version),
                Err(e) => {
                    tracing::warn!(run_id, error = %e, "the ledger's newest learner step is unknown; the learner's earlier reports are not recorded again");
                    initial_version
                }
            },
            None => initial_version,
        };
        let (tx, rx) = watch::channel(initial_version);
        let (steps, _) = broadcast::channel(1024);
        let kept = Arc::new(Mutex::new(Kept {
            floor: initial_version,
            ..Default::default()
        }));
        let follower = Follower {
            run: run_id.to_string(),
            url: url.to_string(),
            client: client.clone(),
            ledger,
            version: tx,
            steps: steps.clone(),
            kept: kept.clone(),
            link: link.clone(),
            recorded_step: recorded,
        };
        let follower = tokio::spawn(follower.run(stream));
        Ok(Self {
            url: url.to_string(),
            client,
            version: rx,
            steps,
            kept,
            link,
            follower,
        })
    }

    /// Step reports from now on.
    pub fn steps(&self) -> broadcast::Receiver<StepReport> {
        self.steps.subscribe()
    }

    /// The weights of exactly policy `version` of run `run_id`, verified, by name (a stage's
    /// final policy, to save as its checkpoint). The learner must still hold that version: its
    /// newest, or one it keeps for pinned requests.
    pub async fn fetch_weights(
        &self,
        run_id: &str,
        version: u64,
    ) -> Result<std::collections::BTreeMap<String, HostTensor>, ConnectError> {
        let fail = |message: String| ConnectError {
            url: self.url.clone(),
            message,
        };
        let mut stream = self
            .client
            .clone()
            .stream_weights(StreamWeightsRequest {
                run_id: run_id.into(),
                policy_version: version,
                requester_id: "orchestrator".into(),
                start_chunk: 0,
                exact: true,
            })
            .await
            .map_err(|e| fail(format!("StreamWeights (version {version}): {e}")))?
            .into_inner();
        let (got, tensors) = receive(&mut stream)
            .await
            .map_err(|e| fail(format!("weights of version {version}: {e}")))?;
        if got != version {
            return Err(fail(format!("asked for version {version}, got {got}")));
        }
        Ok(tensors)
    }
}

impl Learning for RemoteLearner {
    fn submit(&self, group: TrajectoryGroup) -> BoxFuture<Result<(), LearningError>> {
        let client = self.client.clone();
        let learner = self.url.clone();
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keep(&group, self.link.max_kept_bytes);
        let recover_for = self.link.recover_for;
        let version = self.version.clone();
        Box::pin(async move {
            let group_id = group.group_id.clone();
            let started = std::time::Instant::now();
            let mut backoff = Duration::from_millis(100);
            loop {
                let sent = client
                    .clone()
                    .submit_trajectories(tokio_stream::iter(vec![group.clone()]))
                    .await;
                let ack = match sent {
                    Ok(ack) => ack.into_inner(),
                    // The learner is down: it gets the group again once it is back (kept above),
                    // and this one is tried until then, so a step's groups all reach it.
                    Err(e)
                        if learner_down(&e)
                            && started.elapsed() < recover_for
                            && version.has_changed().is_ok() =>
                    {
                        tracing::debug!(group_id, error = %e, "the learner is unreachable; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                    Err(e) => {
                        return Err(LearningError::Unreachable {
                            learner: learner.clone(),
                            group_id: group_id.clone(),
                            message: format!("SubmitTrajectories: {e}"),
                        });
                    }
                };
                return match ack.rejected.into_iter().next() {
                    Some(r) => Err(LearningError::Rejected {
                        learner,
                        group_id: r.group_id,
                        reason: r.reason,
                    }),
                    None => Ok(()),
                };
            }
        })
    }

    fn version(&self) -> u64 {
        *self.version.borrow()
    }

    fn wait_version(&self, version: u64) -> BoxFuture<Result<(), LearningError>> {
        let mut rx = self.version.clone();
        let learner = self.url.clone();
        Box::pin(async move {
            rx.wait_for(|v| *v >= version)
                .await
                .map(|_| ())
                .map_err(|_| LearningError::Gone { learner, version })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::AtomicU32;

    use chorus_proto::tonic::{self, Request, Response, Status, Streaming};
    use chorus_proto::v1::rollout_worker_server::{RolloutWorker, RolloutWorkerServer};
    use chorus_proto::v1::{
        RegisterWorkerRequest, RunEvent, WorkerHeartbeatRequest, WorkerLost, run_event,
    };
    use tokio_stream::Stream;

    use super::*;
    use crate::directory::Leases;

    /// A stand-in rollout worker: answers every request with one token when `answers`, else
    /// holds it until its stream is broken through `breaker`.
    struct StandIn {
        id: String,
        answers: bool,
        received: Arc<AtomicU32>,
        breaker: Arc<Notify>,
    }

    type Out = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl RolloutWorker for StandIn {
        type GenerateStream = Out;

        async fn generate(
            &self,
            request: Request<Streaming<GenerateRequest>>,
        ) -> Result<Response<Out>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(256);
            let (id, answers, received, breaker) = (
                self.id.clone(),
                self.answers,
                self.received.clone(),
                self.breaker.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        msg = inbound.next() => {
                            let Some(Ok(req)) = msg else { return };
                            received.fetch_add(1, Ordering::SeqCst);
                            if answers {
                                let _ = tx.send(Ok(GenerateResponse {
                                    request_id: req.request_id,
                                    token_ids: vec![7],
                                    logprobs: vec![-0.5],
                                    policy_versions: vec![0],
                                    finish_reason: FinishReason::Length as i32,
                                    worker_id: id.clone(),
                                    ..Default::default()
                                })).await;
                            }
                        }
                        _ = breaker.notified() => {
                            let _ = tx.send(Err(Status::unavailable("stand-in killed"))).await;
                            return;
                        }
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    struct Served {
        url: String,
        received: Arc<AtomicU32>,
        breaker: Arc<Notify>,
    }

    async fn serve(id: &str, answers: bool) -> Served {
        let received = Arc::new(AtomicU32::new(0));
        let breaker = Arc::new(Notify::new());
        let svc = RolloutWorkerServer::new(StandIn {
            id: id.into(),
            answers,
            received: received.clone(),
            breaker: breaker.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Served {
            url,
            received,
            breaker,
        }
    }

    fn request(i: usize) -> GenerateRequest {
        GenerateRequest {
            request_id: format!("req-{i}"),
            max_new_tokens: 1,
            ..Default::default()
        }
    }

    async fn until(mut ready: impl FnMut() -> bool) {
        for _ in 0..500 {
            if ready() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached within 5 s");
    }

    fn register(dir: &Directory, id: &str, url: &str) {
        dir.register_worker(RegisterWorkerRequest {
            worker_id: id.into(),
            endpoint: url.into(),
            capacity: 4,
            policy_version: 0,
            model: String::new(),
            run_id: "r".into(),
        })
        .unwrap();
    }

    fn lost_events(events: &[RunEvent]) -> Vec<WorkerLost> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(run_event::Kind::WorkerLost(l)) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_held_by_a_worker_whose_stream_breaks_go_to_another_worker() {
        let (doomed, steady) = (serve("doomed", false).await, serve("steady", true).await);
        let dir = Directory::new("r", Leases::default());
        register(&dir, "doomed", &doomed.url);
        let pool = WorkerPool::new("tok", 2, Duration::from_secs(5));
        pool.follow(dir.clone()).await;
        assert_eq!(pool.ids(), vec!["doomed".to_string()]);
        let calls: Vec<_> = (0..6)
            .map(|i| tokio::spawn(pool.generate(request(i))))
            .collect();
        // Two in flight on the only worker, the rest waiting behind them (backpressure).
        until(|| doomed.received.load(Ordering::SeqCst) == 2).await;
        register(&dir, "steady", &steady.url);
        until(|| pool.ids().len() == 2).await;
        doomed.breaker.notify_one();
        let mut answered_by = vec![];
        for c in calls {
            let r = c.await.unwrap();
            assert!(r.error.is_empty(), "{}", r.error);
            answered_by.push(r.worker_id);
        }
        assert!(answered_by.iter().all(|w| w == "steady"), "{answered_by:?}");
        assert_eq!(pool.ids(), vec!["steady".to_string()]);
        let lost = lost_events(&dir.events_after(0));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(
            (lost[0].worker_id.as_str(), lost[0].redispatched_prompts),
            ("doomed", 2)
        );
        // Its heartbeats now say it is unknown, so a live one would register again.
        assert!(
            !dir.worker_heartbeat(WorkerHeartbeatRequest {
                worker_id: "doomed".into(),
                sequence: 1,
                capacity: 4,
                ..Default::default()
            })
            .registered
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_past_its_lease_leaves_the_pool_and_its_requests_are_dispatched_again() {
        let (silent, steady) = (serve("silent", false).await, serve("steady", true).await);
        let dir = Directory::new(
            "r",
            Leases {
                heartbeat: Duration::from_millis(10),
                lease: Duration::from_millis(200),
            },
        );
        register(&dir, "silent", &silent.url);
        register(&dir, "steady", &steady.url);
        let pool = WorkerPool::new("tok", 8, Duration::from_secs(5));
        pool.follow(dir.clone()).await;
        // Load the silent worker first: it is picked while it has fewer requests.
        let calls: Vec<_> = (0..4)
            .map(|i| tokio::spawn(pool.generate(request(i))))
            .collect();
        until(|| {
            silent.received.load(Ordering::SeqCst) + steady.received.load(Ordering::SeqCst) == 4
        })
        .await;
        let held = silent.received.load(Ordering::SeqCst);
        assert!(held >= 1);
        // Only `steady` keeps beating.
        let mut seq = 0;
        while dir.live_workers().len() == 2 {
            seq += 1;
            dir.worker_heartbeat(WorkerHeartbeatRequest {
                worker_id: "steady".into(),
                sequence: seq,
                capacity: 8,
                ..Default::default()
            });
            dir.expire_leases();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for c in calls {
            let r = c.await.unwrap();
            assert!(r.error.is_empty(), "{}", r.error);
            assert_eq!(r.worker_id, "steady");
        }
        let lost = lost_events(&dir.events_after(0));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(lost[0].worker_id, "silent");
        assert_eq!(lost[0].redispatched_prompts, held);
        assert_eq!(pool.ids(), vec!["steady".to_string()]);
    }

    #[test]
    fn a_worker_whose_request_stream_closed_is_not_picked_before_its_loss_is_noticed() {
        let worker = |open: bool| {
            let (tx, rx) = mpsc::channel(1);
            if !open {
                drop(rx);
            } else {
                std::mem::forget(rx);
            }
            RemoteWorker {
                id: "w".into(),
                url: "http://127.0.0.1:1".into(),
                requests: Mutex::new(Some(tx)),
                pending: Mutex::new(Some(HashMap::new())),
                in_flight: AtomicUsize::new(0),
                slots: Arc::new(Semaphore::new(1)),
            }
        };
        assert!(worker(true).alive());
        // Its connection died: the response side has not said so yet, but nothing can be sent.
        assert!(!worker(false).alive());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_waits_for_a_worker_to_join_or_fails_saying_none_came() {
        let dir = Directory::new("r", Leases::default());
        let pool = WorkerPool::new("tok", 2, Duration::from_secs(5));
        pool.follow(dir.clone()).await;
        let call = tokio::spawn(pool.generate(request(0)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let late = serve("late", true).await;
        register(&dir, "late", &late.url);
        assert_eq!(call.await.unwrap().worker_id, "late");

        let empty = WorkerPool::new("tok", 2, Duration::from_millis(50));
        let r = empty.generate(request(1)).await;
        assert_eq!(r.finish_reason, FinishReason::Error as i32);
        assert!(r.error.contains("no rollout worker"), "{}", r.error);
    }

    /// A stand-in learner that serves its step stream: the first `StreamSteps` replays `steps`
    /// and ends. With `back_at = Some((v, replay))` it has come back from a checkpoint at
    /// version `v`: `Status` says so and later streams replay `replay` (what the checkpoint
    /// saved) and stay open. Nothing else is served.
    struct StepsOnly {
        steps: Vec<StepReport>,
        back_at: Option<(u64, Vec<StepReport>)>,
        streams: std::sync::atomic::AtomicUsize,
    }

    /// Serves `learner` on a free loopback port; returns its URL.
    async fn serve_stand_in(learner: StepsOnly) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(chorus_proto::v1::learner_server::LearnerServer::new(
                    learner,
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        url
    }

    type Steps = Pin<Box<dyn Stream<Item = Result<StepReport, Status>> + Send>>;
    type Weights =
        Pin<Box<dyn Stream<Item = Result<chorus_proto::v1::WeightChunk, Status>> + Send>>;

    #[tonic::async_trait]
    impl chorus_proto::v1::learner_server::Learner for StepsOnly {
        type StreamWeightsStream = Weights;
        type StreamStepsStream = Steps;

        async fn submit_trajectories(
            &self,
            _: Request<Streaming<TrajectoryGroup>>,
        ) -> Result<Response<chorus_proto::v1::SubmitTrajectoriesResponse>, Status> {
            Err(Status::unimplemented("stand-in"))
        }

        async fn stream_weights(
            &self,
            _: Request<chorus_proto::v1::StreamWeightsRequest>,
        ) -> Result<Response<Weights>, Status> {
            Err(Status::unimplemented("stand-in"))
        }

        async fn status(
            &self,
            _: tonic::Request<chorus_proto::v1::LearnerStatusRequest>,
        ) -> Result<tonic::Response<chorus_proto::v1::LearnerStatus>, tonic::Status> {
            match &self.back_at {
                Some((version, _)) => Ok(tonic::Response::new(chorus_proto::v1::LearnerStatus {
                    run_id: "r".into(),
                    policy_version: *version,
                    checkpoint_version: Some(*version),
                    start_version: *version,
                })),
                None => Err(tonic::Status::unimplemented("a stand-in without Status")),
            }
        }

        async fn stream_steps(
            &self,
            _: Request<StreamStepsRequest>,
        ) -> Result<Response<Steps>, Status> {
            let first = self.streams.fetch_add(1, Ordering::SeqCst) == 0;
            let replay = |steps: &[StepReport]| tokio_stream::iter(steps.to_vec()).map(Ok);
            Ok(Response::new(match (&self.back_at, first) {
                (Some((_, again)), false) => Box::pin(replay(again).chain(tokio_stream::pending())),
                _ => Box::pin(replay(&self.steps)),
            }))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_remote_learner_records_each_published_version_once() {
        let report = |step: u64, version: u64, sha: u8| StepReport {
            run_id: "r".into(),
            step,
            policy_version: version,
            weights_digest: vec![sha; 32],
            weights_digest_algorithm: chorus_proto::v1::DigestAlgorithm::Blake3 as i32,
            weights_bytes: 1000 + step,
            skip_reason: if step == 2 {
                "not finite".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        // Step 2 was skipped (a version all the same); the repeated report adds nothing.
        let steps = vec![report(1, 1, 0xaa), report(2, 2, 0xbb), report(2, 2, 0xcc)];
        let url = serve_stand_in(StepsOnly {
            steps,
            back_at: None,
            streams: Default::default(),
        })
        .await;
        let (_tmp, ledger) = crate::testkit::ledger_with_run("r").await;
        let link = LearnerLink {
            recover_for: Duration::ZERO,
            ..Default::default()
        };
        let learner = RemoteLearner::connect(&url, "tok", "r", 0, Some(ledger.clone()), link)
            .await
            .unwrap();
        // The stream ends after its last report: waiting for a version past it fails, once
        // every report has been recorded.
        let gone = learner.wait_version(3).await.unwrap_err();
        assert_eq!(
            gone,
            LearningError::Gone {
                learner: url.clone(),
                version: 3
            }
        );
        ledger.flush().await.unwrap();
        let versions = ledger.list_policy_versions("r").await.unwrap();
        assert_eq!(
            versions.into_iter().map(|r| r.version).collect::<Vec<_>>(),
            [
                PolicyVersion {
                    run_id: "r".into(),
                    version: 1,
                    learner_step: 1,
                    weights_digest: format!("blake3:{}", "aa".repeat(32)),
                    num_bytes: 1001,
                },
                PolicyVersion {
                    run_id: "r".into(),
                    version: 2,
                    learner_step: 2,
                    weights_digest: format!("blake3:{}", "bb".repeat(32)),
                    num_bytes: 1002,
                },
            ]
        );
        assert_eq!(ledger.list_learner_steps("r").await.unwrap().len(), 2);
    }

    fn step_report(step: u64) -> StepReport {
        StepReport {
            run_id: "r".into(),
            step,
            policy_version: step,
            weights_digest: vec![step as u8; 32],
            weights_digest_algorithm: chorus_proto::v1::DigestAlgorithm::Blake3 as i32,
            weights_bytes: 1000,
            transfers: vec![chorus_proto::v1::WeightTransfer {
                requester_id: "w0".into(),
                policy_version: step - 1,
                bytes: 1000,
                seconds: 0.5,
                finished_at_ms: 1_000 * step as i64,
            }],
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_the_learner_saved_but_never_reported_is_recorded_once_it_is_back() {
        // It died after saving version 8 but before its report of step 8 went out: its first
        // stream ends after step 7, and once back it replays steps 1 to 8.
        let url = serve_stand_in(StepsOnly {
            steps: (1..=7).map(step_report).collect(),
            back_at: Some((8, (1..=8).map(step_report).collect())),
            streams: Default::default(),
        })
        .await;
        let (_tmp, ledger) = crate::testkit::ledger_with_run("r").await;
        let link = LearnerLink {
            recover_for: Duration::from_secs(60),
            ..Default::default()
        };
        let learner = RemoteLearner::connect(&url, "tok", "r", 0, Some(ledger.clone()), link)
            .await
            .unwrap();
        learner.wait_version(8).await.unwrap();
        ledger.flush().await.unwrap();
        let steps: Vec<u64> = ledger
            .list_learner_steps("r")
            .await
            .unwrap()
            .iter()
            .map(|s| s.step.step)
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>());
        let versions = ledger.list_policy_versions("r").await.unwrap();
        assert_eq!(versions.len(), 8);
        // The replayed reports of steps 1 to 7 record nothing twice: one transfer a version.
        let sync = ledger.weight_sync("r").await.unwrap();
        assert_eq!(sync.len(), 8);
        assert!(sync.iter().all(|v| v.transfers == 1), "{sync:?}");
    }

    /// A run resumed at version 3 whose ledger recorded only steps 1 and 2: the learner's
    /// replayed report of step 3 is recorded, those of 1 and 2 are not repeated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_run_records_the_replayed_steps_its_ledger_lacks_and_no_others() {
        let url = serve_stand_in(StepsOnly {
            steps: (1..=3).map(step_report).collect(),
            back_at: None,
            streams: Default::default(),
        })
        .await;
        let (_tmp, ledger) = crate::testkit::ledger_with_run("r").await;
        for step in 1..=2 {
            ledger
                .insert_learner_step(crate::testkit::bare_learner_step("r", step))
                .await
                .unwrap();
            let t = &step_report(step).transfers[0];
            ledger
                .record_weight_transfers(vec![WeightTransfer {
                    run_id: "r".into(),
                    requester_id: t.requester_id.clone(),
                    policy_version: t.policy_version,
                    num_bytes: t.bytes,
                    seconds: t.seconds,
                    finished_at_ms: t.finished_at_ms,
                }])
                .await
                .unwrap();
        }
        ledger.flush().await.unwrap();
        let link = LearnerLink {
            recover_for: Duration::ZERO,
            ..Default::default()
        };
        let learner = RemoteLearner::connect(&url, "tok", "r", 3, Some(ledger.clone()), link)
            .await
            .unwrap();
        // The stream ends after step 3; waiting past it returns once all of it is recorded.
        learner.wait_version(4).await.unwrap_err();
        ledger.flush().await.unwrap();
        let steps: Vec<u64> = ledger
            .list_learner_steps("r")
            .await
            .unwrap()
            .iter()
            .map(|s| s.step.step)
            .collect();
        assert_eq!(steps, [1, 2, 3]);
        let sync = ledger.weight_sync("r").await.unwrap();
        assert_eq!(sync.len(), 3);
        assert!(sync.iter().all(|v| v.transfers == 1), "{sync:?}");
    }
}
