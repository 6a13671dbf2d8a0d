//! Following the learner: fetch each new policy version over `Learner.StreamWeights`, verify it
//! and install it in the engine thread between decode steps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use chorus_model::NemotronHConfig;
use chorus_model::engine::{Engine, EngineOptions, OwnedTensor};
use chorus_proto::v1::StreamWeightsRequest;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::weights::{HostTensor, ReceiveError, receive_with_progress};
use tonic::codegen::{Body, Bytes, StdError};

use crate::engine_loop::WorkerHandle;
use crate::metrics as names;
use crate::service::Generator;
use crate::vllm::VllmWorker;

/// Why a policy version could not be fetched or built.
#[derive(Debug, thiserror::Error)]
#[error("run `{run_id}`, worker `{worker_id}`, policy version {version}: {kind}")]
pub struct FetchError {
    /// The run.
    pub run_id: String,
    /// The worker that asked.
    pub worker_id: String,
    /// The version asked for (at least), or the one received once it is known.
    pub version: u64,
    /// What failed.
    pub kind: FetchErrorKind,
}

impl FetchError {
    fn new(run_id: &str, worker_id: &str, version: u64, kind: FetchErrorKind) -> Self {
        Self {
            run_id: run_id.to_string(),
            worker_id: worker_id.to_string(),
            version,
            kind,
        }
    }
}

/// What failed while fetching a policy version.
#[derive(Debug, thiserror::Error)]
pub enum FetchErrorKind {
    /// The learner refused or did not answer `StreamWeights`.
    #[error("StreamWeights: {0}")]
    Request(tonic::Status),
    /// The weight stream broke.
    #[error("weight stream: {0}")]
    Stream(tonic::Status),
    /// The chunks do not make a valid version (checksum, shapes).
    #[error(transparent)]
    Assemble(#[from] chorus_proto::weights::AssembleError),
    /// The weights do not fit the model.
    #[error("building the engine: {0}")]
    Engine(String),
    /// The transfer began and then stalled past its deadline; nothing was installed.
    #[error("{0}")]
    Stalled(String),
    /// The backend could not install the version (a vLLM server's reload failed); it keeps the
    /// version it had.
    #[error("installing it: {0}")]
    Install(String),
    /// An exact version was asked for and another one came.
    #[error("the learner sent version {got} instead")]
    WrongVersion {
        /// The version received.
        got: u64,
    },
}

/// How a worker keeps up with the learner's weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncPolicy {
    /// Longest wait for the next chunk once a transfer has begun; a transfer that stalls longer
    /// is abandoned (the worker keeps its version) and tried again.
    pub chunk_deadline: Duration,
    /// The first wait before trying a failed transfer again; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// The longest wait between tries.
    pub max_backoff: Duration,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        Self {
            chunk_deadline: Duration::from_secs(60),
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Fetches policy version `at_least` or newer and returns it as an engine.
pub async fn fetch_version<T>(
    client: &mut LearnerClient<T>,
    cfg: &NemotronHConfig,
    options: &EngineOptions,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
) -> Result<(u64, Engine), FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let deadline = SyncPolicy::default().chunk_deadline;
    fetch(
        client, cfg, options, run_id, worker_id, at_least, false, deadline,
    )
    .await
}

/// Fetches exactly policy version `version` (for requests pinned to it) as an engine.
pub async fn fetch_exact_version<T>(
    client: &mut LearnerClient<T>,
    cfg: &NemotronHConfig,
    options: &EngineOptions,
    run_id: &str,
    worker_id: &str,
    version: u64,
) -> Result<Engine, FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let deadline = SyncPolicy::default().chunk_deadline;
    let (got, engine) = fetch(
        client, cfg, options, run_id, worker_id, version, true, deadline,
    )
    .await?;
    if got != version {
        return Err(FetchError {
            run_id: run_id.to_string(),
            worker_id: worker_id.to_string(),
            version,
            kind: FetchErrorKind::WrongVersion { got },
        });
    }
    Ok(engine)
}

#[allow(clippy::too_many_arguments)]
async fn fetch<T>(
    client: &mut LearnerClient<T>,
    cfg: &NemotronHConfig,
    options: &EngineOptions,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
    exact: bool,
    chunk_deadline: Duration,
) -> Result<(u64, Engine), FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let (version, tensors) =
        fetch_host_tensors(client, run_id, worker_id, at_least, exact, chunk_deadline).await?;
    // The engine takes the received values over: a version is not copied again to install it.
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = OwnedTensor {
                shape: t.shape,
                data: t.data,
            };
            (name, t)
        })
        .collect();
    let engine = Engine::from_owned(cfg, tensors, options).map_err(|e| {
        metrics::counter!(names::WEIGHT_SYNC_FAILURES).increment(1);
        FetchError::new(
            run_id,
            worker_id,
            version,
            FetchErrorKind::Engine(e.to_string()),
        )
    })?;
    Ok((version, engine))
}

/// Bytes between two progress events of a weight transfer.
const PROGRESS_EVERY: u64 = 4 << 20;

/// Fetches policy version `at_least` or newer (exactly `at_least` when `exact`) and returns its
/// tensors by their HF names as candle tensors, verified against the stream's checksum.
pub async fn fetch_tensors<T>(
    client: &mut LearnerClient<T>,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
    exact: bool,
    chunk_deadline: Duration,
) -> Result<(u64, BTreeMap<String, Tensor>), FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let (version, tensors) =
        fetch_host_tensors(client, run_id, worker_id, at_least, exact, chunk_deadline).await?;
    let mut map = BTreeMap::new();
    for (name, t) in tensors {
        let tensor = Tensor::from_vec(t.data, t.shape, &Device::Cpu).map_err(|e| {
            let kind = FetchErrorKind::Engine(format!("tensor `{name}`: {e}"));
            FetchError::new(run_id, worker_id, version, kind)
        })?;
        map.insert(name, tensor);
    }
    Ok((version, map))
}

/// [`fetch_tensors`], the tensors as the stream carried them (row-major f32 values).
pub async fn fetch_host_tensors<T>(
    client: &mut LearnerClient<T>,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
    exact: bool,
    chunk_deadline: Duration,
) -> Result<(u64, BTreeMap<String, HostTensor>), FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let started = std::time::Instant::now();
    let fetched: Result<(u64, BTreeMap<String, HostTensor>, u64), FetchError> = async {
        let fail =
            |version: u64, kind: FetchErrorKind| FetchError::new(run_id, worker_id, version, kind);
        let req = StreamWeightsRequest {
            run_id: run_id.into(),
            policy_version: at_least,
            requester_id: worker_id.into(),
            start_chunk: 0,
            exact,
        };
        let mut stream = client
            .stream_weights(req)
            .await
            .map_err(|e| fail(at_least, FetchErrorKind::Request(e)))?
            .into_inner();
        // Progress events for a terminal's transfer bar (`chorus serve worker`), one per
        // PROGRESS_EVERY bytes; the CLI's bars read the `chorus_progress` target.
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let (reported, total) = (AtomicU64::new(0), AtomicU64::new(0));
        let progress = |version: u64, bytes: u64| {
            total.store(bytes, Relaxed);
            if bytes >= reported.load(Relaxed) + PROGRESS_EVERY {
                reported.store(bytes, Relaxed);
                tracing::trace!(target: "chorus_progress::weights", worker_id = %worker_id, policy_version = version, received_bytes = bytes, "receiving weights");
            }
        };
        let received = receive_with_progress(&mut stream, Some(chunk_deadline), progress).await;
        if let Ok((version, _)) = &received {
            tracing::trace!(target: "chorus_progress::weights", worker_id = %worker_id, policy_version = *version, received_bytes = total.load(Relaxed), done = true, "weights received");
        }
        let (version, tensors) = received
            .map_err(|e| match e {
                ReceiveError::Stream(status) => fail(at_least, FetchErrorKind::Stream(status)),
                stalled @ ReceiveError::Stalled { .. } => {
                    fail(at_least, FetchErrorKind::Stalled(stalled.to_string()))
                }
                ReceiveError::Assemble { version, source } => {
                    fail(version.unwrap_or(at_least), source.into())
                }
            })?;
        let bytes = tensors
            .values()
            .map(|t| (t.data.len() * std::mem::size_of::<f32>()) as u64)
            .sum();
        tracing::debug!(run_id = %run_id, worker_id = %worker_id, policy_version = version, "policy version fetched");
        Ok((version, tensors, bytes))
    }
    .await;
    match &fetched {
        Ok((_, _, bytes)) => {
            metrics::counter!(names::WEIGHT_SYNC_BYTES).increment(*bytes);
            metrics::histogram!(names::WEIGHT_SYNC_SECONDS).record(started.elapsed().as_secs_f64());
        }
        Err(_) => metrics::counter!(names::WEIGHT_SYNC_FAILURES).increment(1),
    }
    fetched.map(|(version, tensors, _)| (version, tensors))
}

/// Keeps `handle` on the learner's latest version, building each version with `options`
/// (e.g. NVFP4 on load), and fetches the older versions that requests pinned to them wait for
/// ([`WorkerHandle::wanted_versions`]). A transfer that fails, breaks off, stalls past
/// `policy.chunk_deadline` or does not verify installs nothing: the worker keeps sampling from
/// the version it has, says why, and tries again after a backoff that doubles up to
/// `policy.max_backoff` (a learner that restarts is followed again). Runs until its task is
/// dropped.
pub async fn follow_learner<T>(
    handle: WorkerHandle,
    client: LearnerClient<T>,
    cfg: NemotronHConfig,
    options: EngineOptions,
    run_id: String,
    worker_id: String,
    policy: SyncPolicy,
) where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    T: Clone + Send + 'static,
    T::Future: Send,
{
    let older = tokio::spawn(fetch_wanted(
        handle.clone(),
        client.clone(),
        cfg.clone(),
        options.clone(),
        run_id.clone(),
        worker_id.clone(),
    ));
    let _stop_older = AbortOnDrop(older);
    let version = {
        let handle = handle.clone();
        move || handle.version()
    };
    follow(
        client,
        &run_id,
        &worker_id,
        policy,
        version,
        |version, tensors| {
            let engine = Engine::from_tensors_with(&cfg, &tensors, &options)
                .map_err(|e| FetchErrorKind::Engine(e.to_string()));
            let handle = handle.clone();
            async move {
                handle.install_weights(version, Arc::new(engine?));
                Ok(())
            }
        },
    )
    .await
}

/// Keeps a vLLM worker on the learner's latest version: each new version is fetched, written as
/// an HF checkpoint and reloaded by the server ([`VllmWorker::install`]). A failed fetch or
/// update leaves the worker on its version and is tried again after a backoff, as in
/// [`follow_learner`]. Runs until its task is dropped.
pub async fn follow_learner_vllm<T>(
    worker: VllmWorker,
    client: LearnerClient<T>,
    run_id: String,
    worker_id: String,
    policy: SyncPolicy,
) where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let version = {
        let worker = worker.clone();
        move || Generator::version(&worker)
    };
    follow(
        client,
        &run_id,
        &worker_id,
        policy,
        version,
        |version, tensors| {
            let worker = worker.clone();
            async move {
                worker
                    .install(version, tensors)
                    .await
                    .map_err(FetchErrorKind::Install)
            }
        },
    )
    .await
}

/// Keeps a backend on the learner's latest version: fetches the version after the one
/// `version()` reports and hands it to `install`. A fetch or an install that fails keeps the
/// backend on its version: the failure is logged and tried again after a backoff that doubles
/// from `policy.first_backoff` up to `policy.max_backoff`. Runs until its task is dropped.
pub(crate) async fn follow<T, F, Fut>(
    mut client: LearnerClient<T>,
    run_id: &str,
    worker_id: &str,
    policy: SyncPolicy,
    version: impl Fn() -> u64,
    mut install: F,
) where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    F: FnMut(u64, BTreeMap<String, Tensor>) -> Fut,
    Fut: std::future::Future<Output = Result<(), FetchErrorKind>>,
{
    let mut backoff = policy.first_backoff;
    loop {
        let held = version();
        let outcome = match fetch_tensors(
            &mut client,
            run_id,
            worker_id,
            held + 1,
            false,
            policy.chunk_deadline,
        )
        .await
        {
            Ok((got, _)) if got <= version() => Ok(()),
            Ok((got, tensors)) => {
                tracing::debug!(run_id = %run_id, worker_id = %worker_id, policy_version = got, "installing policy version");
                match install(got, tensors).await {
                    Ok(()) => {
                        metrics::gauge!(names::POLICY_VERSION).set(got as f64);
                        Ok(())
                    }
                    Err(kind) => {
                        metrics::counter!(names::WEIGHT_SYNC_FAILURES).increment(1);
                        Err(FetchError {
                            run_id: run_id.to_string(),
                            worker_id: worker_id.to_string(),
                            version: got,
                            kind,
                        })
                    }
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => backoff = policy.first_backoff,
            Err(e) => {
                let held = version();
                tracing::warn!(
                    error = %e,
                    policy_version = held,
                    retry_in = ?backoff,
                    "weight sync failed; the worker stays on version {held} and tries again in {backoff:?}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
    }
}

/// Aborts the task when dropped, so the fetcher of older versions ends with its follower.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fetches each older version pinned requests wait for; one that cannot be had fails them.
async fn fetch_wanted<T>(
    handle: WorkerHandle,
    mut client: LearnerClient<T>,
    cfg: NemotronHConfig,
    options: EngineOptions,
    run_id: String,
    worker_id: String,
) where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    loop {
        for version in handle.wanted_versions().await {
            match fetch_exact_version(&mut client, &cfg, &options, &run_id, &worker_id, version)
                .await
            {
                Ok(engine) => {
                    tracing::debug!(run_id = %run_id, worker_id = %worker_id, policy_version = version, "older policy version fetched for pinned requests");
                    handle.install_weights(version, Arc::new(engine));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an older policy version could not be fetched");
                    handle.version_unavailable(version, e.to_string());
                }
            }
        }
    }
}
