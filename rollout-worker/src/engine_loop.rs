//! The engine thread: continuous batching over per-sequence caches.
//!
//! The batching itself is the model's [`ContinuousBatch`]; this thread adds what a worker
//! needs around it: jobs arrive over a channel and wait until the worker holds the policy
//! version they ask for, new weights are installed between decode steps (sequences keep their
//! caches), and every token records the version that produced it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chorus_model::engine::{ContinuousBatch, Engine, FinishReason, Finished, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use std::sync::mpsc;

/// One generation to run.
#[derive(Clone, Debug)]
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// How tokens are drawn.
    pub sampling: SamplingParams,
    /// Seed of this job's sampling, so a job reproduces on any worker.
    pub seed: u64,
    /// Most tokens generated.
    pub max_new_tokens: usize,
    /// Tokens that end the generation (kept in the output).
    pub stop_tokens: Vec<u32>,
    /// The job starts only once the worker holds at least this policy version (the
    /// orchestrator's staleness bound).
    pub min_version: u64,
}

/// What a job produced.
#[derive(Clone, Debug, PartialEq)]
pub struct JobResult {
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// The log-probability of each under the distribution it was sampled from.
    pub logprobs: Vec<f32>,
    /// The policy version that produced each token.
    pub versions: Vec<u64>,
    /// True when a stop token ended it, false when the budget did.
    pub stopped: bool,
    /// Why the job could not run, if it could not.
    pub error: Option<String>,
    /// Milliseconds it waited (for a batch slot or its policy version).
    pub queue_ms: u64,
    /// Milliseconds from its start to its end.
    pub generate_ms: u64,
}

struct Submitted {
    job: Job,
    reply: tokio::sync::oneshot::Sender<JobResult>,
    enqueued: Instant,
}

/// What the engine thread keeps of a job while it decodes.
struct Running {
    /// The policy version of each token so far.
    versions: Vec<u64>,
    queue_ms: u64,
    started: Instant,
    reply: tokio::sync::oneshot::Sender<JobResult>,
}

/// Counters of the engine thread.
#[derive(Default, Debug)]
pub struct WorkerStats {
    /// Sequences decoding now.
    pub active: AtomicUsize,
    /// Jobs waiting for a slot or for their policy version.
    pub queued: AtomicUsize,
    /// Tokens generated since the start.
    pub tokens_generated: AtomicU64,
    /// The policy version in use.
    pub version: AtomicU64,
}

enum Msg {
    Job(Submitted),
    /// New weights are pending.
    Wake,
}

/// Weights waiting to be installed between decode steps: their version and engine.
type PendingWeights = Arc<Mutex<Option<(u64, Arc<Engine>)>>>;

/// The handle through which jobs are submitted and weights installed.
#[derive(Clone)]
pub struct WorkerHandle {
    inbox: mpsc::Sender<Msg>,
    pending: PendingWeights,
    stats: Arc<WorkerStats>,
    vocab: usize,
}

impl WorkerHandle {
    /// Runs `job`, returning when it is finished (or rejected).
    pub async fn generate(&self, job: Job) -> JobResult {
        if let Err(e) = self.validate(&job) {
            return JobResult {
                tokens: vec![],
                logprobs: vec![],
                versions: vec![],
                stopped: false,
                error: Some(e),
                queue_ms: 0,
                generate_ms: 0,
            };
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self
            .inbox
            .send(Msg::Job(Submitted {
                job,
                reply: tx,
                enqueued: Instant::now(),
            }))
            .is_err()
        {
            return failed("the worker's engine thread has stopped");
        }
        rx.await
            .unwrap_or_else(|_| failed("the worker's engine thread has stopped"))
    }

    fn validate(&self, job: &Job) -> Result<(), String> {
        if job.prompt.is_empty() {
            return Err("empty prompt: give at least one token id".into());
        }
        if let Some(bad) = job.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(format!(
                "prompt token id {bad} is outside the vocabulary (size {})",
                self.vocab
            ));
        }
        if job.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        job.sampling.validate()
    }

    /// Makes `engine` the policy from the next decode step on, as `version`.
    pub fn install_weights(&self, version: u64, engine: Arc<Engine>) {
        *self.pending.lock().expect("not poisoned") = Some((version, engine));
        let _ = self.inbox.send(Msg::Wake);
    }

    /// The policy version in use.
    pub fn version(&self) -> u64 {
        self.stats.version.load(Ordering::Relaxed)
    }

    /// The engine thread's counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }
}

fn failed(msg: &str) -> JobResult {
    JobResult {
        tokens: vec![],
        logprobs: vec![],
        versions: vec![],
        stopped: false,
        error: Some(msg.into()),
        queue_ms: 0,
        generate_ms: 0,
    }
}

/// Starts the engine thread with `engine` as policy `version`; at most `max_batch` sequences
/// decode together.
pub fn spawn_engine_loop(engine: Arc<Engine>, version: u64, max_batch: usize) -> WorkerHandle {
    let (inbox, rx) = mpsc::channel::<Msg>();
    let pending: PendingWeights = Arc::new(Mutex::new(None));
    let stats = Arc::new(WorkerStats::default());
    stats.version.store(version, Ordering::Relaxed);
    let vocab = engine.vocab_size();
    let handle = WorkerHandle {
        inbox,
        pending: pending.clone(),
        stats: stats.clone(),
        vocab,
    };
    std::thread::Builder::new()
        .name("chorus-engine".into())
        .spawn(move || {
            let mut engine = engine;
            let mut version = version;
            let mut batch: ContinuousBatch<Running> = ContinuousBatch::new(max_batch);
            // Jobs that need a newer policy than the one installed.
            let mut waiting: Vec<Submitted> = vec![];
            loop {
                // Install new weights between steps; sequences keep their caches.
                if let Some((v, e)) = pending.lock().expect("not poisoned").take() {
                    engine = e;
                    version = v;
                    stats.version.store(v, Ordering::Relaxed);
                }
                let offer = |s: Submitted,
                             batch: &mut ContinuousBatch<Running>,
                             waiting: &mut Vec<Submitted>| {
                    if s.job.min_version > version {
                        waiting.push(s);
                    } else {
                        admit(&engine, batch, s, &stats);
                    }
                };
                for s in std::mem::take(&mut waiting) {
                    offer(s, &mut batch, &mut waiting);
                }
                if batch.is_empty() {
                    // Idle: block until a job or new weights arrive.
                    match rx.recv() {
                        Ok(Msg::Job(s)) => offer(s, &mut batch, &mut waiting),
                        Ok(Msg::Wake) => continue,
                        Err(_) => return,
                    }
                }
                while batch.has_room() {
                    match rx.try_recv() {
                        Ok(Msg::Job(s)) => offer(s, &mut batch, &mut waiting),
                        Ok(Msg::Wake) => {}
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                step(&engine, version, &mut batch, &stats);
            }
        })
        .expect("spawn the engine thread");
    handle
}

fn admit(engine: &Engine, batch: &mut ContinuousBatch<Running>, s: Submitted, stats: &WorkerStats) {
    stats.queued.fetch_sub(1, Ordering::Relaxed);
    let running = Running {
        versions: vec![],
        queue_ms: s.enqueued.elapsed().as_millis() as u64,
        started: Instant::now(),
        reply: s.reply,
    };
    let job = s.job;
    let req = GenerationRequest {
        prompt: job.prompt,
        max_new_tokens: job.max_new_tokens,
        sampling: job.sampling,
        seed: job.seed,
        stop_tokens: job.stop_tokens,
    };
    match batch.admit(engine, req, running) {
        Ok(()) => {
            stats.active.fetch_add(1, Ordering::Relaxed);
        }
        // Jobs are validated on submission, so this is a fault of the worker, not the job's;
        // answer it rather than drop its reply.
        Err((running, e)) => {
            let mut r = failed(&format!("could not start the job: {e}"));
            r.queue_ms = running.queue_ms;
            let _ = running.reply.send(r);
        }
    }
}

/// The answer to a job that left the batch, with `error` when it did not end normally.
fn answer(done: Finished<Running>, error: Option<String>) {
    let Finished { tag, generation } = done;
    // A failed job keeps generate_ms at 0: its time says nothing about generation.
    let generate_ms = match error {
        None => tag.started.elapsed().as_millis() as u64,
        Some(_) => 0,
    };
    let _ = tag.reply.send(JobResult {
        stopped: error.is_none() && generation.finish == FinishReason::Stop,
        tokens: generation.tokens,
        logprobs: generation.logprobs,
        versions: tag.versions,
        error,
        queue_ms: tag.queue_ms,
        generate_ms,
    });
}

fn step(engine: &Engine, version: u64, batch: &mut ContinuousBatch<Running>, stats: &WorkerStats) {
    let stepped = batch.len() as u64;
    match batch.step(engine, |running, _, _| running.versions.push(version)) {
        Ok(finished) => {
            stats.tokens_generated.fetch_add(stepped, Ordering::Relaxed);
            for done in finished {
                stats.active.fetch_sub(1, Ordering::Relaxed);
                answer(done, None);
            }
        }
        Err(e) => {
            // Inputs were validated on submission, so this is an engine fault: fail the batch's
            // jobs with the reason rather than the whole worker.
            for done in batch.drain() {
                stats.active.fetch_sub(1, Ordering::Relaxed);
                answer(done, Some(format!("engine error: {e}")));
            }
        }
    }
}
