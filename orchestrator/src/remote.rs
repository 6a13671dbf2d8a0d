//! The scheduler's view of remote services over gRPC: [`WorkerPool`] dispatches generation to
//! the least-loaded of several rollout workers with a bounded number in flight per worker, and
//! [`RemoteLearner`] submits scored groups and follows the learner's step reports (recording
//! them in the ledger).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chorus_proto::auth::AttachToken;
use chorus_proto::tonic::codegen::InterceptedService;
use chorus_proto::tonic::transport::{Channel, Endpoint};
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::rollout_worker_client::RolloutWorkerClient;
use chorus_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, StepReport, StreamStepsRequest,
    TrajectoryGroup,
};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::ledger::{LearnerStep, Ledger};
use crate::scheduler::{BoxFuture, Learning, Rollouts};

/// A connection failure, naming the address.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {message}")]
pub struct ConnectError {
    /// The service's address.
    pub url: String,
    /// What went wrong.
    pub message: String,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<GenerateResponse>>>>;

struct RemoteWorker {
    url: String,
    requests: mpsc::Sender<GenerateRequest>,
    pending: Pending,
    in_flight: AtomicUsize,
    slots: Arc<Semaphore>,
}

/// Rollout workers reached over gRPC.
pub struct WorkerPool {
    workers: Vec<Arc<RemoteWorker>>,
}

async fn channel(url: &str) -> Result<Channel, ConnectError> {
    Endpoint::from_shared(url.to_string())
        .map_err(|e| ConnectError {
            url: url.into(),
            message: format!("not a valid address: {e}"),
        })?
        .connect()
        .await
        .map_err(|e| ConnectError {
            url: url.into(),
            message: format!("cannot connect: {e}"),
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
    /// Opens one `Generate` stream to each worker; at most `max_in_flight` requests wait on a
    /// worker at a time (callers beyond that wait: backpressure).
    pub async fn connect(
        urls: &[String],
        token: &str,
        max_in_flight: usize,
    ) -> Result<Self, ConnectError> {
        let mut workers = vec![];
        for url in urls {
            let attach = AttachToken::new(token).map_err(|e| ConnectError {
                url: url.clone(),
                message: e.to_string(),
            })?;
            let mut client = RolloutWorkerClient::with_interceptor(channel(url).await?, attach);
            let (tx, rx) = mpsc::channel::<GenerateRequest>(1024);
            let mut responses = client
                .generate(ReceiverStream::new(rx))
                .await
                .map_err(|e| ConnectError {
                    url: url.clone(),
                    message: format!("Generate: {e}"),
                })?
                .into_inner();
            let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
            let p = pending.clone();
            let u = url.clone();
            tokio::spawn(async move {
                while let Some(msg) = responses.next().await {
                    match msg {
                        Ok(r) => {
                            if let Some(tx) = p.lock().expect("not poisoned").remove(&r.request_id)
                            {
                                let _ = tx.send(r);
                            }
                        }
                        Err(e) => {
                            eprintln!("worker {u}: stream ended: {e}");
                            break;
                        }
                    }
                }
                // Fail whatever was still waiting on this worker.
                p.lock().expect("not poisoned").clear();
            });
            workers.push(Arc::new(RemoteWorker {
                url: url.clone(),
                requests: tx,
                pending,
                in_flight: AtomicUsize::new(0),
                slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            }));
        }
        Ok(Self { workers })
    }

    /// Requests waiting on each worker.
    pub fn loads(&self) -> Vec<(String, usize)> {
        self.workers
            .iter()
            .map(|w| (w.url.clone(), w.in_flight.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Rollouts for WorkerPool {
    fn generate(&self, req: GenerateRequest) -> BoxFuture<GenerateResponse> {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))
            .expect("at least one worker")
            .clone();
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let _permit = worker
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let (tx, rx) = oneshot::channel();
            worker
                .pending
                .lock()
                .expect("not poisoned")
                .insert(req.request_id.clone(), tx);
            let resp = if worker.requests.send(req.clone()).await.is_err() {
                failed(&req, format!("worker {} is gone", worker.url))
            } else {
                rx.await.unwrap_or_else(|_| {
                    failed(
                        &req,
                        format!("worker {} disconnected before answering", worker.url),
                    )
                })
            };
            worker.in_flight.fetch_sub(1, Ordering::Relaxed);
            resp
        })
    }

    /// Workers hold back each request until they have its `min_policy_version`, so the pool
    /// itself never needs to wait.
    fn policy_version(&self) -> u64 {
        0
    }

    fn wait_version(&self, _version: u64) -> BoxFuture<()> {
        Box::pin(async {})
    }
}

/// The learner reached over gRPC.
pub struct RemoteLearner {
    client: LearnerClient<InterceptedService<Channel, AttachToken>>,
    version: watch::Receiver<u64>,
    steps: broadcast::Sender<StepReport>,
}

impl RemoteLearner {
    /// Connects and follows the learner's steps from `initial_version` on, recording each in
    /// `ledger` when given.
    pub async fn connect(
        url: &str,
        token: &str,
        run_id: &str,
        initial_version: u64,
        ledger: Option<Ledger>,
    ) -> Result<Self, ConnectError> {
        let attach = AttachToken::new(token).map_err(|e| ConnectError {
            url: url.into(),
            message: e.to_string(),
        })?;
        let client = LearnerClient::with_interceptor(channel(url).await?, attach);
        let mut stream = client
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
        let (tx, rx) = watch::channel(initial_version);
        let (steps, _) = broadcast::channel(1024);
        let steps_tx = steps.clone();
        let run = run_id.to_string();
        tokio::spawn(async move {
            while let Some(Ok(r)) = stream.next().await {
                if let Some(ledger) = &ledger {
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
                        .await;
                }
                tx.send_modify(|v| *v = (*v).max(r.policy_version));
                let _ = steps_tx.send(r);
            }
        });
        Ok(Self {
            client,
            version: rx,
            steps,
        })
    }

    /// Step reports from now on.
    pub fn steps(&self) -> broadcast::Receiver<StepReport> {
        self.steps.subscribe()
    }
}

impl Learning for RemoteLearner {
    fn submit(&self, group: TrajectoryGroup) -> BoxFuture<Result<(), String>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let ack = client
                .submit_trajectories(tokio_stream::iter(vec![group]))
                .await
                .map_err(|e| format!("SubmitTrajectories: {e}"))?
                .into_inner();
            match ack.rejected.first() {
                Some(r) => Err(format!("group {} rejected: {}", r.group_id, r.reason)),
                None => Ok(()),
            }
        })
    }

    fn version(&self) -> u64 {
        *self.version.borrow()
    }

    fn wait_version(&self, version: u64) -> BoxFuture<()> {
        let mut rx = self.version.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|v| *v >= version).await;
        })
    }
}
