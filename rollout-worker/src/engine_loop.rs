//! The engine thread: continuous batching over per-sequence caches.
//!
//! The batching itself is the model's [`ContinuousBatch`]; this thread adds what a worker
//! needs around it: jobs arrive over a channel and wait until the worker holds the policy
//! version they ask for, new weights are installed between decode steps (sequences keep their
//! caches), and every token records the version that produced it.
//!
//! A job pinned to an exact version ([`Job::exact_version`], deterministic runs) decodes in a
//! batch of its own version with that version's engine from its first token to its last; the
//! thread keeps the few most recent versions for them and asks for an older one it no longer
//! holds ([`WorkerHandle::wanted_versions`]), which the follower of the learner fetches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics as names;
use chorus_model::engine::{ContinuousBatch, Engine, FinishReason, Finished, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use chorus_proto::limits::{MAX_NEW_TOKENS, MAX_PROMPT_TOKENS};
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
    /// Every token of the job comes from exactly this version (`min_version` is then ignored).
    pub exact_version: Option<u64>,
}

impl Job {
    /// Why the job cannot run on a policy of `vocab` tokens, if it cannot: the message names
    /// the field and what is allowed. Lengths are bounded by [`MAX_PROMPT_TOKENS`] and
    /// [`MAX_NEW_TOKENS`], and every token id the job may feed the model (the prompt's, and the
    /// think budget's `</think>`, which the sampler forces) must be in the vocabulary.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        if self.prompt.is_empty() {
            return Err("empty prompt: prompt_token_ids has no token; give at least one".into());
        }
        if self.prompt.len() > MAX_PROMPT_TOKENS {
            return Err(format!(
                "prompt_token_ids has {} tokens; allowed: at most {MAX_PROMPT_TOKENS}",
                self.prompt.len()
            ));
        }
        if let Some(bad) = self.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!(
                "prompt_token_ids: token id {bad} is outside the vocabulary (size {vocab})"
            ));
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return Err(format!(
                "max_new_tokens is {}; allowed: 1 to {MAX_NEW_TOKENS}",
                self.max_new_tokens
            ));
        }
        if let Some(b) = &self.sampling.think_budget {
            for (field, id) in [("open_token_id", b.open), ("close_token_id", b.close)] {
                if id as usize >= vocab {
                    return Err(format!(
                        "think_budget.{field}: token id {id} is outside the vocabulary (size \
                         {vocab})"
                    ));
                }
            }
        }
        self.sampling.validate()
    }
}

/// How the engine thread runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Sequences decoding together, pinned or not.
    pub max_batch: usize,
    /// Policy versions kept for pinned jobs besides those still in use (at least 1).
    pub keep_versions: usize,
    /// Test-only: sleep this long after every decode step, to make one worker slower than the
    /// others in tests of timing independence. `None` in every real run.
    pub decode_step_delay: Option<Duration>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            max_batch: 8,
            keep_versions: 4,
            decode_step_delay: None,
        }
    }
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

/// A policy version handed to the engine thread, or why one asked for could not be had.
enum Delivery {
    Weights(u64, Arc<Engine>),
    Unavailable(u64, String),
}

/// Deliveries waiting to be taken between decode steps.
type Pending = Arc<Mutex<Vec<Delivery>>>;

/// Older versions pinned jobs wait for, and the wake-up of whoever fetches them.
#[derive(Default)]
struct Wanted {
    versions: Mutex<BTreeSet<u64>>,
    notify: tokio::sync::Notify,
}

/// The handle through which jobs are submitted and weights installed.
#[derive(Clone)]
pub struct WorkerHandle {
    inbox: mpsc::Sender<Msg>,
    pending: Pending,
    wanted: Arc<Wanted>,
    stats: Arc<WorkerStats>,
    vocab: usize,
}

impl WorkerHandle {
    /// Runs `job`, returning when it is finished (or rejected).
    pub async fn generate(&self, job: Job) -> JobResult {
        if let Err(e) = job.validate(self.vocab) {
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

    /// Makes `engine` the policy from the next decode step on, as `version`; an older version
    /// than the one in use is only kept for the jobs pinned to it.
    pub fn install_weights(&self, version: u64, engine: Arc<Engine>) {
        self.deliver(Delivery::Weights(version, engine));
    }

    /// Fails the jobs pinned to `version`, which could not be fetched, with `reason`.
    pub fn version_unavailable(&self, version: u64, reason: String) {
        self.deliver(Delivery::Unavailable(version, reason));
    }

    fn deliver(&self, d: Delivery) {
        self.pending.lock().expect("not poisoned").push(d);
        let _ = self.inbox.send(Msg::Wake);
    }

    /// Waits until pinned jobs wait for versions older than the one in use that the worker no
    /// longer holds, and returns them (each is asked for once until it is delivered).
    pub async fn wanted_versions(&self) -> Vec<u64> {
        loop {
            let notified = self.wanted.notify.notified();
            let taken: Vec<u64> =
                std::mem::take(&mut *self.wanted.versions.lock().expect("not poisoned"))
                    .into_iter()
                    .collect();
            if !taken.is_empty() {
                return taken;
            }
            notified.await;
        }
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
    spawn_engine_loop_with(
        engine,
        version,
        WorkerOptions {
            max_batch,
            ..Default::default()
        },
    )
}

/// What the engine thread holds between steps.
struct EngineState {
    options: WorkerOptions,
    /// The newest version installed, used by jobs that are not pinned.
    engine: Arc<Engine>,
    version: u64,
    /// Versions kept for pinned jobs (the newest included).
    kept: BTreeMap<u64, Arc<Engine>>,
    /// Jobs that are not pinned: they decode with whatever version is newest at each step.
    floating: ContinuousBatch<Running>,
    /// Pinned jobs, one batch per version.
    pinned: BTreeMap<u64, ContinuousBatch<Running>>,
    /// Jobs waiting for their version.
    waiting: Vec<Submitted>,
    stats: Arc<WorkerStats>,
    wanted: Arc<Wanted>,
}

impl EngineState {
    fn active(&self) -> usize {
        self.floating.len()
            + self
                .pinned
                .values()
                .map(ContinuousBatch::len)
                .sum::<usize>()
    }

    fn has_room(&self) -> bool {
        self.active() < self.options.max_batch.max(1)
    }

    fn take(&mut self, d: Delivery) {
        match d {
            Delivery::Weights(v, e) => {
                if v > self.version {
                    self.engine = e.clone();
                    self.version = v;
                    self.stats.version.store(v, Ordering::Relaxed);
                }
                self.kept.insert(v, e);
            }
            Delivery::Unavailable(v, reason) => {
                for s in std::mem::take(&mut self.waiting) {
                    if s.job.exact_version == Some(v) {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        let _ = s.reply.send(failed(&format!(
                            "policy version {v}, which the request is pinned to: {reason}"
                        )));
                    } else {
                        self.waiting.push(s);
                    }
                }
            }
        }
    }

    /// Drops the oldest kept versions beyond `keep_versions`, except those still in use.
    fn evict(&mut self) {
        let needed: BTreeSet<u64> = self
            .waiting
            .iter()
            .filter_map(|s| s.job.exact_version)
            .chain(self.pinned.keys().copied())
            .chain([self.version])
            .collect();
        let keep = self.options.keep_versions.max(1);
        let old: Vec<u64> = self.kept.keys().rev().skip(keep).copied().collect();
        for v in old {
            if !needed.contains(&v) {
                self.kept.remove(&v);
            }
        }
    }

    fn offer(&mut self, s: Submitted) {
        match s.job.exact_version {
            Some(v) => match self.kept.get(&v).cloned() {
                Some(engine) => {
                    let batch = self
                        .pinned
                        .entry(v)
                        .or_insert_with(|| ContinuousBatch::new(self.options.max_batch));
                    admit(&engine, batch, s, &self.stats);
                }
                None => {
                    if v < self.version {
                        // Installed before this worker held it, or evicted since: fetch it.
                        let mut wanted = self.wanted.versions.lock().expect("not poisoned");
                        if wanted.insert(v) {
                            self.wanted.notify.notify_one();
                        }
                    }
                    self.waiting.push(s);
                }
            },
            None if s.job.min_version > self.version => self.waiting.push(s),
            None => {
                let engine = self.engine.clone();
                admit(&engine, &mut self.floating, s, &self.stats);
            }
        }
    }

    fn step(&mut self) {
        if !self.floating.is_empty() {
            step(&self.engine, self.version, &mut self.floating, &self.stats);
        }
        for (v, batch) in &mut self.pinned {
            if let Some(engine) = self.kept.get(v) {
                step(engine, *v, batch, &self.stats);
            }
        }
        self.pinned.retain(|_, b| !b.is_empty());
        if let Some(d) = self.options.decode_step_delay {
            std::thread::sleep(d);
        }
    }
}

/// Starts the engine thread with `engine` as policy `version`, run as `options` say.
pub fn spawn_engine_loop_with(
    engine: Arc<Engine>,
    version: u64,
    options: WorkerOptions,
) -> WorkerHandle {
    let (inbox, rx) = mpsc::channel::<Msg>();
    let pending: Pending = Arc::new(Mutex::new(vec![]));
    let wanted = Arc::new(Wanted::default());
    let stats = Arc::new(WorkerStats::default());
    stats.version.store(version, Ordering::Relaxed);
    let vocab = engine.vocab_size();
    let handle = WorkerHandle {
        inbox,
        pending: pending.clone(),
        wanted: wanted.clone(),
        stats: stats.clone(),
        vocab,
    };
    let max_batch = options.max_batch;
    let mut state = EngineState {
        options,
        engine: engine.clone(),
        version,
        kept: BTreeMap::from([(version, engine)]),
        floating: ContinuousBatch::new(max_batch),
        pinned: BTreeMap::new(),
        waiting: vec![],
        stats,
        wanted,
    };
    std::thread::Builder::new()
        .name("chorus-engine".into())
        .spawn(move || {
            // Time the thread computes (installs, prefills, decode steps), not blocked waiting
            // for work: `1 - busy / wall` is the worker's idle fraction.
            let busy = metrics::histogram!(names::ENGINE_BUSY_SECONDS);
            let mut since = Instant::now();
            loop {
                // Install new weights between steps; sequences keep their caches.
                let delivered = std::mem::take(&mut *pending.lock().expect("not poisoned"));
                let any = !delivered.is_empty();
                for d in delivered {
                    state.take(d);
                }
                if any {
                    state.evict();
                }
                for s in std::mem::take(&mut state.waiting) {
                    state.offer(s);
                }
                if state.active() == 0 {
                    // Idle: block until a job or new weights arrive.
                    busy.record(since.elapsed().as_secs_f64());
                    let message = rx.recv();
                    since = Instant::now();
                    match message {
                        Ok(Msg::Job(s)) => state.offer(s),
                        Ok(Msg::Wake) => continue,
                        Err(_) => return,
                    }
                }
                while state.has_room() {
                    match rx.try_recv() {
                        Ok(Msg::Job(s)) => state.offer(s),
                        Ok(Msg::Wake) => {}
                        Err(_) => break,
                    }
                }
                if state.active() == 0 {
                    continue;
                }
                state.step();
                busy.record(since.elapsed().as_secs_f64());
                since = Instant::now();
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
