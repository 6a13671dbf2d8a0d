//! Following the learner: fetch each new policy version over `Learner.StreamWeights`, verify it
//! and install it in the engine thread between decode steps.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use chorus_model::NemotronHConfig;
use chorus_model::engine::{Engine, EngineOptions};
use chorus_proto::v1::StreamWeightsRequest;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::weights::{ReceiveError, receive};
use tonic::codegen::{Body, Bytes, StdError};

use crate::engine_loop::WorkerHandle;
use crate::metrics as names;

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
    /// An exact version was asked for and another one came.
    #[error("the learner sent version {got} instead")]
    WrongVersion {
        /// The version received.
        got: u64,
    },
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
    fetch(client, cfg, options, run_id, worker_id, at_least, false).await
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
    let (got, engine) = fetch(client, cfg, options, run_id, worker_id, version, true).await?;
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

async fn fetch<T>(
    client: &mut LearnerClient<T>,
    cfg: &NemotronHConfig,
    options: &EngineOptions,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
    exact: bool,
) -> Result<(u64, Engine), FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let started = std::time::Instant::now();
    let fetched =
        fetch_version_untimed(client, cfg, options, run_id, worker_id, at_least, exact).await;
    match &fetched {
        Ok((_, _, bytes)) => {
            metrics::counter!(names::WEIGHT_SYNC_BYTES).increment(*bytes);
            metrics::histogram!(names::WEIGHT_SYNC_SECONDS).record(started.elapsed().as_secs_f64());
        }
        Err(_) => metrics::counter!(names::WEIGHT_SYNC_FAILURES).increment(1),
    }
    fetched.map(|(version, engine, _)| (version, engine))
}

/// [`fetch`] without the metrics; also the bytes received.
async fn fetch_version_untimed<T>(
    client: &mut LearnerClient<T>,
    cfg: &NemotronHConfig,
    options: &EngineOptions,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
    exact: bool,
) -> Result<(u64, Engine, u64), FetchError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let fail = |version: u64, kind: FetchErrorKind| FetchError {
        run_id: run_id.to_string(),
        worker_id: worker_id.to_string(),
        version,
        kind,
    };
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
    let (version, tensors) = receive(&mut stream).await.map_err(|e| match e {
        ReceiveError::Stream(status) => fail(at_least, FetchErrorKind::Stream(status)),
        ReceiveError::Assemble { version, source } => {
            fail(version.unwrap_or(at_least), source.into())
        }
    })?;
    let mut map = BTreeMap::new();
    let mut bytes = 0u64;
    for (name, t) in tensors {
        bytes += (t.data.len() * std::mem::size_of::<f32>()) as u64;
        let tensor = Tensor::from_vec(t.data, t.shape, &Device::Cpu).map_err(|e| {
            fail(
                version,
                FetchErrorKind::Engine(format!("tensor `{name}`: {e}")),
            )
        })?;
        map.insert(name, tensor);
    }
    let engine = Engine::from_tensors_with(cfg, &map, options)
        .map_err(|e| fail(version, FetchErrorKind::Engine(e.to_string())))?;
    tracing::debug!(run_id = %run_id, worker_id = %worker_id, policy_version = version, "policy version fetched");
    Ok((version, engine, bytes))
}

/// Keeps `handle` on the learner's latest version until the learner goes away, building each
/// version with `options` (e.g. NVFP4 on load), and fetches the older versions that requests
/// pinned to them wait for ([`WorkerHandle::wanted_versions`]). Returns why it stopped.
pub async fn follow_learner<T>(
    handle: WorkerHandle,
    mut client: LearnerClient<T>,
    cfg: NemotronHConfig,
    options: EngineOptions,
    run_id: String,
    worker_id: String,
) -> FetchError
where
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
    loop {
        match fetch_version(
            &mut client,
            &cfg,
            &options,
            &run_id,
            &worker_id,
            handle.version() + 1,
        )
        .await
        {
            Ok((version, engine)) if version > handle.version() => {
                tracing::debug!(run_id = %run_id, worker_id = %worker_id, policy_version = version, "installing policy version");
                handle.install_weights(version, Arc::new(engine));
                metrics::gauge!(names::POLICY_VERSION).set(version as f64);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "stopped following the learner");
                return e;
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
