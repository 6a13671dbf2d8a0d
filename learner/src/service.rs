//! The learner as a service: a training thread that consumes scored groups and publishes each
//! new policy version, and the gRPC `Learner` service in front of it.

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use chorus_proto::v1::learner_server::Learner;
use chorus_proto::v1::{
    RejectedGroup, StreamWeightsRequest, SubmitTrajectoriesResponse, TrajectoryGroup, WeightChunk,
};
use chorus_proto::weights::{HostTensor, encode};
use tokio::sync::{broadcast, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::loss::{RlSequence, SftSequence};
use crate::trainer::{StepReport, Trainer};

/// A published policy version, ready to stream.
pub struct Published {
    pub version: u64,
    pub chunks: Vec<WeightChunk>,
}

enum Work {
    Group(TrajectoryGroup),
    Sft(
        Vec<SftSequence>,
        tokio::sync::oneshot::Sender<Result<StepReport, String>>,
    ),
}

/// Settings of the learner service.
#[derive(Clone, Debug)]
pub struct LearnerServiceConfig {
    pub run_id: String,
    /// Trajectory groups per optimizer step (prompts per step).
    pub groups_per_step: usize,
    /// Largest data payload of one weight chunk.
    pub max_chunk_bytes: usize,
}

/// Handle to the training thread.
#[derive(Clone)]
pub struct LearnerHandle {
    work: std::sync::mpsc::Sender<Work>,
    published: watch::Receiver<Arc<Published>>,
    reports: broadcast::Sender<StepReport>,
    seen_groups: Arc<Mutex<HashSet<String>>>,
}

fn publish(run_id: &str, trainer: &Trainer, max_chunk_bytes: usize) -> Published {
    let mut tensors = BTreeMap::new();
    for (name, t) in trainer
        .params()
        .snapshot()
        .expect("snapshot of live parameters")
    {
        let data = t
            .flatten_all()
            .and_then(|f| f.to_dtype(candle_core::DType::F32))
            .and_then(|f| f.to_vec1::<f32>())
            .expect("f32 parameters");
        tensors.insert(
            name,
            HostTensor {
                shape: t.dims().to_vec(),
                data,
            },
        );
    }
    Published {
        version: trainer.version(),
        chunks: encode(run_id, trainer.version(), &tensors, max_chunk_bytes),
    }
}

/// Turns a scored group into training sequences, or says why it cannot be used.
pub fn group_sequences(g: &TrajectoryGroup) -> Result<Vec<RlSequence>, String> {
    if g.trajectories.is_empty() {
        return Err("the group has no trajectories".into());
    }
    g.trajectories
        .iter()
        .map(|t| {
            let n = t.completion_token_ids.len();
            if t.prompt_token_ids.is_empty() || n == 0 {
                return Err(format!(
                    "trajectory {} needs prompt and completion tokens",
                    t.trajectory_id
                ));
            }
            if t.logprobs.len() != n || t.policy_versions.len() != n {
                return Err(format!(
                    "trajectory {}: {n} tokens but {} logprobs and {} versions",
                    t.trajectory_id,
                    t.logprobs.len(),
                    t.policy_versions.len()
                ));
            }
            if !t.advantage.is_finite() {
                return Err(format!(
                    "trajectory {}: advantage is not finite",
                    t.trajectory_id
                ));
            }
            Ok(RlSequence {
                tokens: t
                    .prompt_token_ids
                    .iter()
                    .chain(&t.completion_token_ids)
                    .copied()
                    .collect(),
                prompt_len: t.prompt_token_ids.len(),
                behavior_logprobs: t.logprobs.clone(),
                versions: t.policy_versions.clone(),
                advantage: t.advantage as f32,
                ref_logprobs: None,
            })
        })
        .collect()
}

/// Starts the training thread over `trainer` and publishes its current weights as the first
/// version.
pub fn spawn_learner(mut trainer: Trainer, cfg: LearnerServiceConfig) -> LearnerHandle {
    let (work_tx, work_rx) = std::sync::mpsc::channel::<Work>();
    let (pub_tx, pub_rx) = watch::channel(Arc::new(publish(
        &cfg.run_id,
        &trainer,
        cfg.max_chunk_bytes,
    )));
    let (reports, _) = broadcast::channel(1024);
    let reports_tx = reports.clone();
    std::thread::Builder::new()
        .name("chorus-learner".into())
        .spawn(move || {
            let mut pending: Vec<RlSequence> = vec![];
            let mut groups = 0;
            while let Ok(w) = work_rx.recv() {
                let report = match w {
                    Work::Sft(batch, reply) => {
                        let r = trainer.sft_step(&batch).map_err(|e| e.to_string());
                        let _ = reply.send(r.clone());
                        match r {
                            Ok(r) => r,
                            Err(_) => continue,
                        }
                    }
                    Work::Group(g) => {
                        match group_sequences(&g) {
                            Ok(seqs) => pending.extend(seqs),
                            Err(_) => continue, // rejected at submission; never reached
                        }
                        groups += 1;
                        if groups < cfg.groups_per_step.max(1) {
                            continue;
                        }
                        groups = 0;
                        let batch = std::mem::take(&mut pending);
                        match trainer.rl_step(&batch) {
                            Ok(r) => r,
                            Err(e) => StepReport {
                                step: trainer.step(),
                                version: trainer.version(),
                                lr: 0.0,
                                grad_norm: f64::NAN,
                                stats: Default::default(),
                                skipped: Some(e.to_string()),
                            },
                        }
                    }
                };
                if report.skipped.is_none() {
                    let _ = pub_tx.send(Arc::new(publish(
                        &cfg.run_id,
                        &trainer,
                        cfg.max_chunk_bytes,
                    )));
                }
                let _ = reports_tx.send(report);
            }
        })
        .expect("spawn the learner thread");
    LearnerHandle {
        work: work_tx,
        published: pub_rx,
        reports,
        seen_groups: Arc::new(Mutex::new(HashSet::new())),
    }
}

impl LearnerHandle {
    /// Queues a scored group; a group id seen before is acknowledged and ignored.
    pub fn submit(&self, g: TrajectoryGroup) -> Result<(), String> {
        group_sequences(&g)?;
        if !self
            .seen_groups
            .lock()
            .expect("not poisoned")
            .insert(g.group_id.clone())
        {
            return Ok(());
        }
        self.work
            .send(Work::Group(g))
            .map_err(|_| "the learner thread has stopped".to_string())
    }

    /// Runs one supervised step and waits for it.
    pub async fn sft_step(&self, batch: Vec<SftSequence>) -> Result<StepReport, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.work
            .send(Work::Sft(batch, tx))
            .map_err(|_| "the learner thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the learner thread has stopped".to_string())?
    }

    /// Reports of every step from now on.
    pub fn reports(&self) -> broadcast::Receiver<StepReport> {
        self.reports.subscribe()
    }

    /// The latest published version.
    pub fn version(&self) -> u64 {
        self.published.borrow().version
    }

    /// Waits until a version of at least `version` is published and returns the latest.
    pub async fn wait_for(&self, version: u64) -> Arc<Published> {
        let mut rx = self.published.clone();
        loop {
            let p = rx.borrow_and_update().clone();
            if p.version >= version {
                return p;
            }
            if rx.changed().await.is_err() {
                return p;
            }
        }
    }
}

/// The gRPC `Learner` service.
#[derive(Clone)]
pub struct LearnerService {
    handle: LearnerHandle,
}

impl LearnerService {
    pub fn new(handle: LearnerHandle) -> Self {
        Self { handle }
    }
}

type WeightStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for LearnerService {
    type StreamWeightsStream = WeightStream;

    async fn submit_trajectories(
        &self,
        request: Request<Streaming<TrajectoryGroup>>,
    ) -> Result<Response<SubmitTrajectoriesResponse>, Status> {
        let mut inbound = request.into_inner();
        let mut resp = SubmitTrajectoriesResponse::default();
        while let Some(g) = inbound.next().await {
            let g = g?;
            let id = g.group_id.clone();
            match self.handle.submit(g) {
                Ok(()) => resp.accepted_group_ids.push(id),
                Err(reason) => resp.rejected.push(RejectedGroup {
                    group_id: id,
                    reason,
                }),
            }
        }
        Ok(Response::new(resp))
    }

    /// Streams the latest version once it is at least the requested one (waiting for it).
    async fn stream_weights(
        &self,
        request: Request<StreamWeightsRequest>,
    ) -> Result<Response<Self::StreamWeightsStream>, Status> {
        let req = request.into_inner();
        let published = self.handle.wait_for(req.policy_version).await;
        let start = req.start_chunk as usize;
        let chunks: Vec<Result<WeightChunk, Status>> = published
            .chunks
            .iter()
            .skip(start)
            .cloned()
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}
