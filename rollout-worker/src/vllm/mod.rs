//! A rollout worker that fronts a vLLM server ([`VllmWorker`]): to the orchestrator an ordinary
//! `RolloutWorker`, to vLLM a client of its OpenAI-compatible completions route and of its RL
//! routes (`/pause`, `/collective_rpc` with `reload_weights`, `/reset_prefix_cache`,
//! `/update_weight_version`, `/resume`).
//!
//! - **Tokens in, tokens out.** Prompts go as token ids, completions come back as token ids with
//!   the sampled token's log-probability under the distribution it was drawn from
//!   (`--logprobs-mode processed_logprobs` on servers Chorus starts). Observation tokens of
//!   multi-turn episodes are appended by the orchestrator; the server never tokenizes.
//! - **One version at a time, exactly.** Requests hold a shared gate while they run; an update
//!   takes it whole, so it waits for the requests in flight (vLLM's `wait` pause, kept on
//!   Chorus' side as well) and every token of a request comes from the version the worker held
//!   when the request started.
//! - **Updates from files.** A version is written as an HF checkpoint under
//!   `WORK_DIR/weights/v<N>/` and the server reloads it in place. A reload that fails takes
//!   vLLM's engine down with it, so a failed, timed-out or interrupted update of a server Chorus
//!   started restarts the server on the version the worker held; requests wait meanwhile. A
//!   server reached at a URL cannot be restarted: the worker then reports itself unavailable
//!   and the orchestrator sends its requests elsewhere.

mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Tensor;
use chorus_model::NemotronHConfig;
use chorus_model::checkpoint;
use chorus_proto::http::{BaseUrl, send_once, snippet};
use serde_json::{Value, json};
use tokio::sync::{RwLock, watch};

use crate::engine_loop::{Job, JobResult};
use crate::service::Generator;
pub use server::VllmLaunch;
use server::{ServerProcess, healthy, version_dir};

/// Where the worker's vLLM server comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum VllmServer {
    /// Chorus starts it, on the first version it fetches, and restarts it after a failed update.
    Launch(VllmLaunch),
    /// It runs already at this URL and can read the worker's `work_dir`.
    Url(String),
}

/// A fault the worker injects into one of its own updates, to drill recovery (tests, chaos
/// drills before a long run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VllmFault {
    /// The version's weight file is written truncated, so the server's reload fails.
    CorruptWeights,
    /// The server is frozen (`SIGSTOP`) before the reload, so it times out.
    StallReload,
    /// The server is killed (`SIGKILL`) once paused, in the middle of the update.
    KillServer,
}

/// How a vLLM worker runs.
#[derive(Clone, Debug, PartialEq)]
pub struct VllmOptions {
    /// The server.
    pub server: VllmServer,
    /// The worker's directory: published versions (`weights/v<N>`), the server's log.
    pub work_dir: PathBuf,
    /// Longest wait for each step of an update (pause, reload, cache reset, resume).
    pub update_timeout: Duration,
    /// Longest wait for one completion.
    pub request_timeout: Duration,
    /// Faults to inject, each once, into the first update to the given version or a later one.
    pub faults: Vec<(u64, VllmFault)>,
}

/// What the worker holds: its version, and why it cannot serve, if it cannot.
#[derive(Clone, Debug, Default, PartialEq)]
struct Held {
    version: u64,
    unavailable: Option<String>,
}

struct Connection {
    url: String,
    base: BaseUrl,
    /// The name the server serves the model under (its `/v1/models`).
    model: String,
    /// The server when Chorus started it.
    process: Option<ServerProcess>,
}

struct Inner {
    worker_id: String,
    cfg: NemotronHConfig,
    options: VllmOptions,
    held: watch::Sender<Held>,
    /// Requests hold it shared while they run; updates and restarts hold it whole.
    gate: RwLock<Connection>,
    faults: Mutex<Vec<(u64, VllmFault)>>,
}

/// A rollout worker's generator backed by one vLLM server. Cheap to clone.
#[derive(Clone)]
pub struct VllmWorker {
    inner: Arc<Inner>,
}

/// An HTTP call to the server failed.
fn call_failed(route: &str, e: impl std::fmt::Display) -> String {
    format!("vLLM {route}: {e}")
}

/// A GET of `route` when `body` is `None`, else a POST of `body`.
async fn call(
    base: &BaseUrl,
    route: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Result<Value, String> {
    let body = body.map(|b| Bytes::from(b.to_string()));
    let answer = tokio::time::timeout(timeout, send_once(base, route, body, None))
        .await
        .map_err(|_| call_failed(route, format!("no answer within {timeout:?}")))?
        .map_err(|f| call_failed(route, f.message))?;
    if !(200..300).contains(&answer.status) {
        return Err(call_failed(
            route,
            format!("HTTP {}: {}", answer.status, snippet(&answer.body)),
        ));
    }
    if answer.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&answer.body)
        .map_err(|e| call_failed(route, format!("the answer is not JSON ({e})")))
}

impl VllmWorker {
    /// Starts (or reaches) the server with `tensors` as policy `version` and returns the
    /// worker; `cfg` is the policy's architecture, written beside every version.
    pub async fn start(
        worker_id: &str,
        cfg: NemotronHConfig,
        version: u64,
        tensors: BTreeMap<String, Tensor>,
        options: VllmOptions,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(&options.work_dir)
            .map_err(|e| format!("creating {}: {e}", options.work_dir.display()))?;
        let dir = write_version(&cfg, &options.work_dir, version, tensors, false).await?;
        let connection = match &options.server {
            VllmServer::Launch(launch) => {
                let log = options.work_dir.join("server.log");
                tracing::info!(worker_id, log = %log.display(), "starting a vLLM server on policy version {version}");
                let process = ServerProcess::start(launch, &dir, &log).await?;
                let model = served_model(&process.base).await?;
                Connection {
                    url: process.url.clone(),
                    base: process.base.clone(),
                    model,
                    process: Some(process),
                }
            }
            VllmServer::Url(url) => {
                let base = BaseUrl::parse(url).map_err(|e| format!("`{url}`: {e}"))?;
                if !healthy(&base).await {
                    return Err(format!("no vLLM server answers /health at {url}"));
                }
                let model = served_model(&base).await?;
                Connection {
                    url: url.clone(),
                    base,
                    model,
                    process: None,
                }
            }
        };
        let worker = Self {
            inner: Arc::new(Inner {
                worker_id: worker_id.to_string(),
                cfg,
                faults: Mutex::new(options.faults.clone()),
                options,
                held: watch::channel(Held::default()).0,
                gate: RwLock::new(connection),
            }),
        };
        {
            let conn = worker.inner.gate.write().await;
            let reload = matches!(worker.inner.options.server, VllmServer::Url(_));
            worker.swap(&conn, version, &dir, reload).await?;
        }
        worker.set_held(version, None);
        if let Some(p) = &worker.inner.gate.read().await.process {
            worker.watch_exit(p.exited.clone());
        }
        Ok(worker)
    }

    /// The URL of the server.
    pub async fn server_url(&self) -> String {
        self.inner.gate.read().await.url.clone()
    }

    fn set_held(&self, version: u64, unavailable: Option<String>) {
        self.inner.held.send_replace(Held {
            version,
            unavailable,
        });
    }

    /// Marks the worker unavailable when a server it started exits outside an update, and
    /// restarts it on the version held (requests wait meanwhile).
    fn watch_exit(&self, mut exited: watch::Receiver<Option<String>>) {
        let worker = self.clone();
        tokio::spawn(async move {
            let Ok(status) = exited.wait_for(Option::is_some).await.map(|s| s.clone()) else {
                return;
            };
            let status = status.unwrap_or_default();
            let mut conn = worker.inner.gate.write().await;
            // Restarted in an update meanwhile: that server is watched by its own task.
            let current = conn.process.as_ref().map(|p| p.exited.borrow().is_some());
            if current != Some(true) {
                return;
            }
            tracing::warn!(worker_id = %worker.inner.worker_id, status = %status, "the vLLM server exited; restarting it");
            let held = worker.inner.held.borrow().version;
            worker
                .restart(
                    &mut conn,
                    held,
                    format!("the vLLM server exited ({status})"),
                )
                .await;
        });
    }

    /// Installs `version`: writes it, waits for the requests in flight, pauses the server,
    /// reloads the weights, resets the prefix cache, sets the server's weight version and
    /// resumes. On failure the worker keeps the version it held (a server it started is
    /// restarted on it) and the error says why.
    pub async fn install(
        &self,
        version: u64,
        tensors: BTreeMap<String, Tensor>,
    ) -> Result<(), String> {
        let fault = {
            let mut faults = self.inner.faults.lock().expect("not poisoned");
            // The follower may skip versions (it installs the newest): a fault planned for a
            // version hits the first update to it or a later one.
            let i = faults.iter().position(|(v, _)| *v <= version);
            i.map(|i| faults.remove(i).1)
        };
        let corrupt = fault == Some(VllmFault::CorruptWeights);
        let dir = write_version(
            &self.inner.cfg,
            &self.inner.options.work_dir,
            version,
            tensors,
            corrupt,
        )
        .await?;
        let started = Instant::now();
        let mut conn = self.inner.gate.write().await;
        let held = self.inner.held.borrow().version;
        let swapped = match fault {
            Some(VllmFault::StallReload) | Some(VllmFault::KillServer) => {
                self.swap_with_fault(&conn, version, &dir, fault.expect("some"))
                    .await
            }
            _ => self.swap(&conn, version, &dir, true).await,
        };
        match swapped {
            Ok(()) => {
                self.set_held(version, None);
                tracing::info!(worker_id = %self.inner.worker_id, policy_version = version, ms = started.elapsed().as_millis() as u64, "vLLM server on policy version {version}");
                prune_versions(&self.inner.options.work_dir, version);
                Ok(())
            }
            Err(why) => {
                let why = format!("updating the vLLM server to version {version}: {why}");
                self.restart(&mut conn, held, why.clone()).await;
                Err(why)
            }
        }
    }

    /// After a failed update: a server Chorus started is restarted on `held`; one reached at a
    /// URL is resumed when it still answers, and otherwise leaves the worker unavailable.
    async fn restart(&self, conn: &mut Connection, held: u64, why: String) {
        let dir = version_dir(&self.inner.options.work_dir, held);
        match &self.inner.options.server {
            VllmServer::Launch(launch) => {
                if let Some(p) = conn.process.take() {
                    p.kill();
                }
                let log = self.inner.options.work_dir.join("server.log");
                tracing::warn!(worker_id = %self.inner.worker_id, reason = %why, "restarting the vLLM server on policy version {held}");
                let restarted = async {
                    let process = ServerProcess::start(launch, &dir, &log).await?;
                    let model = served_model(&process.base).await?;
                    let fresh = Connection {
                        url: process.url.clone(),
                        base: process.base.clone(),
                        model,
                        process: Some(process),
                    };
                    self.swap(&fresh, held, &dir, false).await?;
                    Ok::<_, String>(fresh)
                }
                .await;
                match restarted {
                    Ok(fresh) => {
                        if let Some(p) = &fresh.process {
                            self.watch_exit(p.exited.clone());
                        }
                        *conn = fresh;
                        self.set_held(held, None);
                        tracing::info!(worker_id = %self.inner.worker_id, "the vLLM server is back on policy version {held}");
                    }
                    Err(e) => {
                        tracing::error!(worker_id = %self.inner.worker_id, error = %e, "the vLLM server could not be restarted");
                        self.set_held(held, Some(format!("{why}; restarting it failed: {e}")));
                    }
                }
            }
            VllmServer::Url(url) => {
                let timeout = self.inner.options.update_timeout;
                let back = healthy(&conn.base).await
                    && call(&conn.base, "/resume", Some(json!({})), timeout)
                        .await
                        .is_ok();
                if !back {
                    self.set_held(
                        held,
                        Some(format!("{why}; the server at {url} no longer answers")),
                    );
                }
            }
        }
    }

    /// The update's calls; `reload` false skips the reload (a server just started on `dir`).
    async fn swap(
        &self,
        conn: &Connection,
        version: u64,
        dir: &Path,
        reload: bool,
    ) -> Result<(), String> {
        let t = self.inner.options.update_timeout;
        let base = &conn.base;
        call(base, "/pause?mode=wait", Some(json!({})), t).await?;
        if reload {
            let body = json!({"method": "reload_weights",
                              "kwargs": {"weights_path": dir.to_string_lossy()}});
            call(base, "/collective_rpc", Some(body), t).await?;
        }
        call(base, "/reset_prefix_cache", Some(json!({})), t).await?;
        let body = json!({"new_version": version.to_string()});
        call(base, "/update_weight_version", Some(body), t).await?;
        call(base, "/resume", Some(json!({})), t).await?;
        Ok(())
    }

    async fn swap_with_fault(
        &self,
        conn: &Connection,
        version: u64,
        dir: &Path,
        fault: VllmFault,
    ) -> Result<(), String> {
        let t = self.inner.options.update_timeout;
        call(&conn.base, "/pause?mode=wait", Some(json!({})), t).await?;
        if let Some(p) = &conn.process {
            tracing::warn!(worker_id = %self.inner.worker_id, ?fault, "injecting a fault into the update to version {version}");
            match fault {
                VllmFault::KillServer => p.kill(),
                VllmFault::StallReload => p.freeze(),
                VllmFault::CorruptWeights => {}
            }
        }
        self.swap(conn, version, dir, true).await
    }

    async fn run(&self, job: Job) -> Result<JobResult, String> {
        let enqueued = Instant::now();
        validate(&job, self.inner.cfg.vocab_size)?;
        let want = job.exact_version.unwrap_or(job.min_version);
        let mut held = self.inner.held.subscribe();
        let ready = held
            .wait_for(|h| h.version >= want || h.unavailable.is_some())
            .await
            .map_err(|_| "the worker has stopped".to_string())?
            .clone();
        if let Some(why) = ready.unavailable {
            return Err(why);
        }
        // A server that dies under a request is restarted by its watcher (requests wait for
        // the gate meanwhile); the request then runs once more on the new server.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = self.inner.gate.read().await;
            let Held {
                version,
                unavailable,
            } = self.inner.held.borrow().clone();
            if let Some(why) = unavailable {
                return Err(why);
            }
            if let Some(exact) = job.exact_version
                && exact != version
            {
                return Err(format!(
                    "the request is pinned to policy version {exact}, but a vLLM server holds \
                     one version at a time and this one holds {version}"
                ));
            }
            let queue_ms = enqueued.elapsed().as_millis() as u64;
            let started = Instant::now();
            let body = completion_request(&conn.model, &job);
            let answer = call(
                &conn.base,
                "/v1/completions",
                Some(body),
                self.inner.options.request_timeout,
            )
            .await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    let died = conn
                        .process
                        .as_ref()
                        .is_some_and(|p| p.exited.borrow().is_some() || !p.alive());
                    if died && attempts < 2 {
                        drop(conn);
                        // Let the watcher see the exit and take the gate first.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    return Err(e);
                }
            };
            let (tokens, logprobs, stopped) = parse_completion(&answer)?;
            return Ok(JobResult {
                versions: vec![version; tokens.len()],
                tokens,
                logprobs,
                stopped,
                error: None,
                queue_ms,
                generate_ms: started.elapsed().as_millis() as u64,
            });
        }
    }
}

impl Generator for VllmWorker {
    fn generate(
        &self,
        job: Job,
    ) -> Pin<Box<dyn std::future::Future<Output = JobResult> + Send + '_>> {
        Box::pin(async move {
            self.run(job).await.unwrap_or_else(|e| JobResult {
                tokens: vec![],
                logprobs: vec![],
                versions: vec![],
                stopped: false,
                error: Some(e),
                queue_ms: 0,
                generate_ms: 0,
            })
        })
    }

    fn version(&self) -> u64 {
        self.inner.held.borrow().version
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.held.borrow().unavailable.clone()
    }
}

/// The first model the server lists.
async fn served_model(base: &BaseUrl) -> Result<String, String> {
    let models = call(base, "/v1/models", None, Duration::from_secs(30)).await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("vLLM /v1/models lists no model: {models}"))
}

/// Writes `version` as an HF checkpoint (config and weights) under `work_dir`; `corrupt` cuts
/// the weight file short (a fault drill).
async fn write_version(
    cfg: &NemotronHConfig,
    work_dir: &Path,
    version: u64,
    tensors: BTreeMap<String, Tensor>,
    corrupt: bool,
) -> Result<PathBuf, String> {
    let dir = version_dir(work_dir, version);
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .map_err(|e| format!("creating {}: {e}", partial.display()))?;
        let config = serde_json::to_string_pretty(&cfg.to_json()).expect("JSON serialises");
        std::fs::write(partial.join("config.json"), config)
            .map_err(|e| format!("writing {}: {e}", partial.display()))?;
        checkpoint::save_tensors(&partial, &tensors, None)
            .map_err(|e| format!("writing version {version}: {e}"))?;
        if corrupt {
            let file = partial.join("model.safetensors");
            let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|f| f.set_len(len / 2))
                .map_err(|e| format!("truncating {}: {e}", file.display()))?;
        }
        // Renamed whole, so the server never reads a version half written.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&partial, &dir)
            .map_err(|e| format!("moving {} into place: {e}", dir.display()))?;
        Ok(dir)
    })
    .await
    .map_err(|e| format!("writing version {version}: {e}"))?
}

/// Removes every version directory but `keep`'s.
fn prune_versions(work_dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(work_dir.join("weights")) else {
        return;
    };
    let keep = format!("v{keep}");
    for e in entries.flatten() {
        if e.file_name().to_string_lossy() != keep {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// [`Job::validate`], and what vLLM cannot do.
fn validate(job: &Job, vocab: usize) -> Result<(), String> {
    if job.sampling.think_budget.is_some() {
        return Err(
            "a thinking budget is not supported by vLLM workers; allowed there: temperature, \
             top_p, top_k, seed, stop tokens, max tokens"
                .into(),
        );
    }
    job.validate(vocab)
}

/// The `/v1/completions` body of `job`: token ids in, token ids and log-probabilities out,
/// only the job's stop tokens ending it.
fn completion_request(model: &str, job: &Job) -> Value {
    let s = &job.sampling;
    json!({
        "model": model,
        "prompt": job.prompt,
        "max_tokens": job.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": if s.top_k == 0 { -1 } else { s.top_k as i64 },
        "seed": job.seed,
        "stop_token_ids": job.stop_tokens,
        "ignore_eos": true,
        "logprobs": 1,
        "return_tokens_as_token_ids": true,
        "return_token_ids": true,
        "skip_special_tokens": false,
    })
}

/// Tokens, their log-probabilities and whether a stop token ended the completion.
fn parse_completion(answer: &Value) -> Result<(Vec<u32>, Vec<f32>, bool), String> {
    let bad = |what: &str| {
        format!(
            "vLLM's completion lacks {what}: {}",
            snippet(answer.to_string().as_bytes())
        )
    };
    let choice = &answer["choices"][0];
    let tokens: Vec<u32> = choice["token_ids"]
        .as_array()
        .ok_or_else(|| bad("`token_ids` (a server older than vLLM 0.10?)"))?
        .iter()
        .map(|t| t.as_u64().map(|t| t as u32))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("integer token ids"))?;
    let logprobs: Vec<f32> = choice["logprobs"]["token_logprobs"]
        .as_array()
        .ok_or_else(|| bad("`logprobs.token_logprobs`"))?
        .iter()
        .map(|l| l.as_f64().map(|l| l as f32))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("numeric log-probabilities"))?;
    if tokens.len() != logprobs.len() {
        return Err(format!(
            "vLLM returned {} tokens and {} log-probabilities",
            tokens.len(),
            logprobs.len()
        ));
    }
    match choice["finish_reason"].as_str() {
        Some("stop") => Ok((tokens, logprobs, true)),
        Some("length") => Ok((tokens, logprobs, false)),
        other => Err(format!(
            "vLLM ended the completion with finish_reason {other:?} (expected stop or length)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_model::sampling::SamplingParams;

    fn job() -> Job {
        Job {
            prompt: vec![1, 5, 9],
            sampling: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 0,
                think_budget: None,
            },
            seed: 11,
            max_new_tokens: 4,
            stop_tokens: vec![2],
            min_version: 0,
            exact_version: None,
        }
    }

    #[test]
    fn a_job_maps_one_to_one_onto_a_completion_request() {
        let body = completion_request("m", &job());
        assert_eq!(body["prompt"], json!([1, 5, 9]));
        assert_eq!(body["max_tokens"], 4);
        assert_eq!(body["seed"], 11);
        assert_eq!(body["stop_token_ids"], json!([2]));
        assert_eq!(body["top_k"], -1, "0 (no top-k) is vLLM's -1");
        assert_eq!(body["ignore_eos"], true);
        let mut k = job();
        k.sampling.top_k = 5;
        assert_eq!(completion_request("m", &k)["top_k"], 5);
    }

    #[test]
    fn completions_parse_into_tokens_logprobs_and_stop() {
        let answer = json!({"choices": [{"token_ids": [4, 2], "finish_reason": "stop",
            "logprobs": {"token_logprobs": [-0.5, -1.25], "tokens": ["token_id:4", "token_id:2"]}}]});
        assert_eq!(
            parse_completion(&answer).unwrap(),
            (vec![4, 2], vec![-0.5, -1.25], true)
        );
        let length = json!({"choices": [{"token_ids": [4], "finish_reason": "length",
            "logprobs": {"token_logprobs": [-0.5]}}]});
        assert!(!parse_completion(&length).unwrap().2);
        let aborted = json!({"choices": [{"token_ids": [4], "finish_reason": "abort",
            "logprobs": {"token_logprobs": [-0.5]}}]});
        assert!(parse_completion(&aborted).unwrap_err().contains("abort"));
        let ragged = json!({"choices": [{"token_ids": [4, 5], "finish_reason": "stop",
            "logprobs": {"token_logprobs": [-0.5]}}]});
        assert!(parse_completion(&ragged).unwrap_err().contains("2 tokens"));
        assert!(parse_completion(&json!({"choices": []})).is_err());
    }

    #[test]
    fn jobs_vllm_cannot_run_are_refused_with_the_reason() {
        let mut j = job();
        j.sampling.think_budget = Some(chorus_model::sampling::ThinkBudget {
            tokens: 4,
            open: 3,
            close: 4,
        });
        assert!(validate(&j, 16).unwrap_err().contains("thinking budget"));
        let mut j = job();
        j.prompt = vec![99];
        assert!(
            validate(&j, 16)
                .unwrap_err()
                .contains("outside the vocabulary")
        );
        assert!(validate(&job(), 16).is_ok());
    }
}
