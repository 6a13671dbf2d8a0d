//! Following the learner: fetch each new policy version over `Learner.StreamWeights`, verify it
//! and install it in the engine thread between decode steps.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use chorus_model::NemotronHConfig;
use chorus_model::engine::{Engine, EngineOptions};
use chorus_proto::v1::StreamWeightsRequest;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::weights::WeightAssembler;
use tokio_stream::StreamExt;
use tonic::codegen::{Body, Bytes, StdError};

use crate::engine_loop::WorkerHandle;

/// Fetches policy version `at_least` or newer and returns it as an engine.
pub async fn fetch_version<T>(
    client: &mut LearnerClient<T>,
    cfg: &NemotronHConfig,
    options: &EngineOptions,
    run_id: &str,
    worker_id: &str,
    at_least: u64,
) -> Result<(u64, Engine), String>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let req = StreamWeightsRequest {
        run_id: run_id.into(),
        policy_version: at_least,
        requester_id: worker_id.into(),
        start_chunk: 0,
    };
    let mut stream = client
        .stream_weights(req)
        .await
        .map_err(|e| format!("StreamWeights: {e}"))?
        .into_inner();
    let mut asm = WeightAssembler::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("weight stream: {e}"))?;
        if asm.push(&chunk).map_err(|e| e.to_string())? {
            break;
        }
    }
    let (version, tensors) = asm.finish().map_err(|e| e.to_string())?;
    let mut map = BTreeMap::new();
    for (name, t) in tensors {
        let tensor = Tensor::from_vec(t.data, t.shape, &Device::Cpu).map_err(|e| e.to_string())?;
        map.insert(name, tensor);
    }
    let engine = Engine::from_tensors_with(cfg, &map, options)
        .map_err(|e| format!("policy version {version}: {e}"))?;
    Ok((version, engine))
}

/// Keeps `handle` on the learner's latest version until the learner goes away, building each
/// version with `options` (e.g. NVFP4 on load). Returns the reason it stopped.
pub async fn follow_learner<T>(
    handle: WorkerHandle,
    mut client: LearnerClient<T>,
    cfg: NemotronHConfig,
    options: EngineOptions,
    run_id: String,
    worker_id: String,
) -> String
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
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
                handle.install_weights(version, Arc::new(engine))
            }
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}
