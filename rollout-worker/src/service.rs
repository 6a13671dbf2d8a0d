//! The gRPC face of the worker: `RolloutWorker.Generate`, a bidirectional stream. Each request
//! runs as its own job on the worker's [`Generator`] (Chorus' engine thread or a vLLM server);
//! responses return in completion order, each carrying its ids.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chorus_model::sampling::{SamplingParams, ThinkBudget};
use chorus_proto::v1::rollout_worker_server::RolloutWorker;
use chorus_proto::v1::{FinishReason, GenerateRequest, GenerateResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::engine_loop::{Job, JobResult, WorkerHandle};
use crate::metrics as names;

/// What generates for a worker: Chorus' engine thread ([`WorkerHandle`]) or a vLLM server
/// ([`VllmWorker`](crate::VllmWorker)).
pub trait Generator: Send + Sync + 'static {
    /// Runs `job`; an error in the result fails this request alone.
    fn generate(&self, job: Job) -> Pin<Box<dyn Future<Output = JobResult> + Send + '_>>;

    /// The policy version in use.
    fn version(&self) -> u64;

    /// Why the backend can serve nothing now, if it cannot (its server is gone): the worker then
    /// ends its `Generate` streams instead of failing requests one by one, so the orchestrator
    /// dispatches them to other workers.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

impl Generator for WorkerHandle {
    fn generate(&self, job: Job) -> Pin<Box<dyn Future<Output = JobResult> + Send + '_>> {
        Box::pin(WorkerHandle::generate(self, job))
    }

    fn version(&self) -> u64 {
        WorkerHandle::version(self)
    }
}

/// The `RolloutWorker` service over a [`Generator`].
#[derive(Clone)]
pub struct RolloutService {
    generator: Arc<dyn Generator>,
    worker_id: String,
}

impl RolloutService {
    /// The service over `generator`, answering as `worker_id`.
    pub fn new(generator: impl Generator, worker_id: impl Into<String>) -> Self {
        Self::shared(Arc::new(generator), worker_id)
    }

    /// The service over a generator shared with others (the follower of the learner).
    pub fn shared(generator: Arc<dyn Generator>, worker_id: impl Into<String>) -> Self {
        Self {
            generator,
            worker_id: worker_id.into(),
        }
    }
}

fn job_of(req: &GenerateRequest) -> Job {
    let s = req.sampling.unwrap_or_default();
    // Unset temperature/top_p arrive as 0: treat 0 temperature as greedy and 0 top_p as off.
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        top_k: s.top_k as usize,
        think_budget: s.think_budget.map(|b| ThinkBudget {
            tokens: b.tokens as usize,
            open: b.open_token_id,
            close: b.close_token_id,
        }),
    };
    Job {
        prompt: req.prompt_token_ids.clone(),
        sampling,
        seed: s.seed.unwrap_or(0),
        max_new_tokens: req.max_new_tokens as usize,
        stop_tokens: req.stop_token_ids.clone(),
        min_version: req.min_policy_version,
        exact_version: req.exact_policy_version,
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RolloutWorker for RolloutService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<Streaming<GenerateRequest>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let handle = self.generator.clone();
        let worker_id = self.worker_id.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let req = match msg {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(worker_id = %worker_id, error = %e, "the Generate request stream broke");
                        break;
                    }
                };
                let (handle, tx, worker_id) = (handle.clone(), tx.clone(), worker_id.clone());
                let span = tracing::info_span!(
                    "generate",
                    request_id = %req.request_id,
                    trajectory_id = %req.trajectory_id,
                    run_id = %req.run_id,
                    worker_id = %worker_id,
                    min_policy_version = req.min_policy_version,
                    exact_policy_version = req.exact_policy_version,
                    policy_version = handle.version()
                );
                tokio::spawn(
                    async move {
                        tracing::debug!(
                            prompt_tokens = req.prompt_token_ids.len(),
                            "request received"
                        );
                        let in_flight = metrics::gauge!(names::REQUESTS_IN_FLIGHT);
                        in_flight.increment(1.0);
                        let r = handle.generate(job_of(&req)).await;
                        in_flight.decrement(1.0);
                        if r.error.is_some()
                            && let Some(why) = handle.unavailable()
                        {
                            tracing::warn!(reason = %why, "the worker cannot generate; ending its Generate stream so its requests go to other workers");
                            let _ = tx.send(Err(Status::unavailable(why))).await;
                            return;
                        }
                        let outcome = if r.error.is_some() { "error" } else { "ok" };
                        metrics::counter!(names::REQUESTS, "outcome" => outcome).increment(1);
                        metrics::counter!(names::GENERATED_TOKENS).increment(r.tokens.len() as u64);
                        metrics::histogram!(names::GENERATE_SECONDS)
                            .record(r.generate_ms as f64 / 1e3);
                        match &r.error {
                            None => tracing::debug!(
                                tokens = r.tokens.len(),
                                last_policy_version = r.versions.last().copied(),
                                queue_ms = r.queue_ms,
                                generate_ms = r.generate_ms,
                                "generated"
                            ),
                            Some(e) => tracing::warn!(error = %e, "generation failed"),
                        }
                        let finish = match (&r.error, r.stopped) {
                            (Some(_), _) => FinishReason::Error,
                            (None, true) => FinishReason::Stop,
                            (None, false) => FinishReason::Length,
                        };
                        let resp = GenerateResponse {
                            request_id: req.request_id,
                            run_id: req.run_id,
                            prompt_id: req.prompt_id,
                            trajectory_id: req.trajectory_id,
                            offset: 0,
                            token_ids: r.tokens,
                            logprobs: r.logprobs,
                            policy_versions: r.versions,
                            finish_reason: finish as i32,
                            worker_id,
                            queue_ms: r.queue_ms,
                            generate_ms: r.generate_ms,
                            error: r.error.unwrap_or_default(),
                        };
                        let _ = tx.send(Ok(resp)).await;
                    }
                    .instrument(span),
                );
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
