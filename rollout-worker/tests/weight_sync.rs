//! Learner and worker over gRPC: scored groups go to the learner, each new version streams back
//! and the worker installs it; a resent group is not trained twice.

use std::time::Duration;

use candle_core::Device;
use chorus_learner::{
    LearnerConfig, LearnerService, LearnerServiceConfig, LrSchedule, Trainer, spawn_learner,
};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronHConfig, checkpoint};
use chorus_proto::auth::{AttachToken, RequireToken};
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::learner_server::LearnerServer;
use chorus_proto::v1::{Trajectory, TrajectoryGroup};
use chorus_rollout_worker::{Job, fetch_version, follow_learner, spawn_engine_loop};

fn config() -> NemotronHConfig {
    NemotronHConfig::from_json_str(
        r#"{"model_type": "nemotron_h", "vocab_size": 40, "hidden_size": 32,
        "hybrid_override_pattern": "M*-", "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32}"#,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_versions_flow_from_learner_to_worker() {
    let cfg = config();
    let params = checkpoint::init_params(&cfg, 1, &Device::Cpu).unwrap();
    let trainer = Trainer::new(
        cfg.clone(),
        params,
        LearnerConfig {
            schedule: LrSchedule {
                peak_lr: 1e-2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let learner = spawn_learner(
        trainer,
        LearnerServiceConfig {
            run_id: "run".into(),
            groups_per_step: 1,
            max_chunk_bytes: 4096,
            keep_versions: 1,
            checkpoints: None,
        },
    );
    let mut reports = learner.reports();
    let mut client = serve(LearnerService::new(learner.clone())).await;

    // The worker starts from the learner's version 0 and follows it.
    let (v0, engine) = fetch_version(&mut client, &cfg, &Default::default(), "run", "w0", 0)
        .await
        .unwrap();
    assert_eq!(v0, 0);
    let worker = spawn_engine_loop(std::sync::Arc::new(engine), 0, 4);
    tokio::spawn(follow_learner(
        worker.clone(),
        client.clone(),
        cfg.clone(),
        Default::default(),
        "run".into(),
        "w0".into(),
        Default::default(),
    ));

    let mut trajectories = vec![];
    for i in 0..4u64 {
        let prompt = vec![3, 4 + i as u32];
        let r = worker
            .generate(Job {
                prompt: prompt.clone(),
                sampling: SamplingParams::default(),
                seed: i,
                max_new_tokens: 6,
                stop_tokens: vec![],
                min_version: 0,
                exact_version: None,
            })
            .await;
        trajectories.push(Trajectory {
            trajectory_id: format!("t{i}"),
            prompt_token_ids: prompt,
            completion_token_ids: r.tokens,
            logprobs: r.logprobs,
            policy_versions: r.versions,
            reward: i as f64,
            advantage: i as f64 - 1.5,
            ..Default::default()
        });
    }
    let group = TrajectoryGroup {
        run_id: "run".into(),
        group_id: "g0".into(),
        environment: "test".into(),
        trajectories,
        ..Default::default()
    };
    let mut bad = group.clone();
    bad.group_id = "g-bad".into();
    bad.trajectories[0].logprobs.pop();
    let ack = client
        .submit_trajectories(tokio_stream::iter(vec![group.clone(), group.clone(), bad]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted_group_ids, vec!["g0", "g0"]);
    assert_eq!(ack.rejected.len(), 1);
    assert!(
        ack.rejected[0].reason.contains("logprobs"),
        "{:?}",
        ack.rejected
    );

    let report = tokio::time::timeout(Duration::from_secs(20), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        report.skipped.is_none() && report.version == 1,
        "{report:?}"
    );
    tokio::time::timeout(Duration::from_secs(20), async {
        while worker.version() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("worker installs version 1");
    // The resent group did not make a second step.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(learner.version(), 1);
    let r = worker
        .generate(Job {
            prompt: vec![3, 9],
            sampling: SamplingParams::greedy(),
            seed: 0,
            max_new_tokens: 3,
            stop_tokens: vec![],
            min_version: 0,
            exact_version: None,
        })
        .await;
    assert_eq!(r.versions, vec![1, 1, 1]);
}

/// Serves `learner` on a free local port behind the token `tok`; a client of it.
async fn serve<S: chorus_proto::v1::learner_server::Learner>(
    learner: S,
) -> LearnerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AttachToken>,
> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = LearnerServer::with_interceptor(learner, RequireToken::new("tok").unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    LearnerClient::with_interceptor(channel, AttachToken::new("tok").unwrap())
}

fn learner(keep_versions: usize) -> chorus_learner::LearnerHandle {
    let cfg = config();
    let params = checkpoint::init_params(&cfg, 1, &Device::Cpu).unwrap();
    let trainer = Trainer::new(
        cfg,
        params,
        LearnerConfig {
            schedule: LrSchedule {
                peak_lr: 1e-2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    spawn_learner(
        trainer,
        LearnerServiceConfig {
            run_id: "run".into(),
            groups_per_step: 2,
            max_chunk_bytes: 4096,
            keep_versions,
            checkpoints: None,
        },
    )
}

fn scored_group(id: &str, token: u32) -> TrajectoryGroup {
    let trajectory = |i: u32| Trajectory {
        trajectory_id: format!("{id}:t{i}"),
        prompt_token_ids: vec![3, token],
        completion_token_ids: vec![token + i, 7, token],
        logprobs: vec![-1.5, -2.0, -0.5],
        policy_versions: vec![0, 0, 0],
        reward: f64::from(i),
        advantage: f64::from(i) - 0.5,
        ..Default::default()
    };
    TrajectoryGroup {
        run_id: "run".into(),
        group_id: id.into(),
        environment: "test".into(),
        trajectories: vec![trajectory(0), trajectory(1)],
        ..Default::default()
    }
}

fn digest(p: &chorus_learner::Published) -> Vec<u8> {
    p.chunks.last().unwrap().digest.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_groups_train_in_id_order_and_recent_versions_stream_exactly() {
    let (a, b) = (learner(2), learner(2));
    let (g1, g2) = (scored_group("g1", 11), scored_group("g2", 20));
    a.submit(g1.clone()).unwrap();
    a.submit(g2.clone()).unwrap();
    b.submit(g2).unwrap();
    b.submit(g1).unwrap();
    let (va, vb) = (a.wait_for(1).await, b.wait_for(1).await);
    assert_eq!(va.version, 1);
    assert_eq!(digest(&va), digest(&vb), "arrival order changed the step");
    let v0 = a.wait_for_exact(0).await.expect("version 0 is kept");
    assert_ne!(digest(&v0), digest(&va), "the step changed the weights");

    a.submit(scored_group("g3", 12)).unwrap();
    a.submit(scored_group("g4", 13)).unwrap();
    assert_eq!(a.wait_for_exact(2).await.map(|p| p.version), Some(2));
    assert_eq!(
        a.wait_for_exact(1).await.map(|p| digest(&p)),
        Some(digest(&va))
    );
    assert!(
        a.wait_for_exact(0).await.is_none(),
        "only the newest 2 are kept"
    );
}

/// A learner whose first two transfers of a new version go wrong: the first stalls after one
/// chunk, the second ends before its last (checksum) chunk; later ones are whole.
struct FlakyLearner {
    inner: LearnerService,
    bad_transfers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

type ChunkStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<chorus_proto::v1::WeightChunk, tonic::Status>>
            + Send,
    >,
>;

#[tonic::async_trait]
impl chorus_proto::v1::learner_server::Learner for FlakyLearner {
    type StreamWeightsStream = ChunkStream;
    type StreamStepsStream =
        <LearnerService as chorus_proto::v1::learner_server::Learner>::StreamStepsStream;

    async fn submit_trajectories(
        &self,
        request: tonic::Request<tonic::Streaming<TrajectoryGroup>>,
    ) -> Result<tonic::Response<chorus_proto::v1::SubmitTrajectoriesResponse>, tonic::Status> {
        self.inner.submit_trajectories(request).await
    }

    async fn status(
        &self,
        _: tonic::Request<chorus_proto::v1::LearnerStatusRequest>,
    ) -> Result<tonic::Response<chorus_proto::v1::LearnerStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("a stand-in without Status"))
    }

    async fn stream_steps(
        &self,
        request: tonic::Request<chorus_proto::v1::StreamStepsRequest>,
    ) -> Result<tonic::Response<Self::StreamStepsStream>, tonic::Status> {
        self.inner.stream_steps(request).await
    }

    async fn stream_weights(
        &self,
        request: tonic::Request<chorus_proto::v1::StreamWeightsRequest>,
    ) -> Result<tonic::Response<Self::StreamWeightsStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let new_version = request.get_ref().policy_version >= 1;
        let stream = self.inner.stream_weights(request).await?.into_inner();
        let chunks: Vec<_> = stream.collect().await;
        let n = if new_version {
            self.bad_transfers
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        } else {
            usize::MAX
        };
        let out: ChunkStream = match n {
            0 => Box::pin(
                tokio_stream::iter(chunks.into_iter().take(1)).chain(tokio_stream::pending()),
            ),
            1 => {
                let keep = chunks.len() - 1;
                Box::pin(tokio_stream::iter(chunks.into_iter().take(keep)))
            }
            _ => Box::pin(tokio_stream::iter(chunks)),
        };
        Ok(tonic::Response::new(out))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_torn_transfer_installs_nothing_and_the_worker_tries_again() {
    let cfg = config();
    let learner = learner(4);
    let bad_transfers = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut client = serve(FlakyLearner {
        inner: LearnerService::new(learner.clone()),
        bad_transfers: bad_transfers.clone(),
    })
    .await;
    let (v0, engine) = fetch_version(&mut client, &cfg, &Default::default(), "run", "w0", 0)
        .await
        .unwrap();
    let worker = spawn_engine_loop(std::sync::Arc::new(engine), v0, 4);
    tokio::spawn(chorus_rollout_worker::follow_learner(
        worker.clone(),
        client,
        cfg.clone(),
        Default::default(),
        "run".into(),
        "w0".into(),
        chorus_rollout_worker::SyncPolicy {
            // Far beyond a local chunk's time, far below the test's patience.
            chunk_deadline: Duration::from_secs(5),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        },
    ));

    // Version 1: the first transfer stalls, the second is torn; the worker waits on version 0.
    learner.submit(scored_group("g1", 11)).unwrap();
    learner.submit(scored_group("g2", 20)).unwrap();
    let mut installed = false;
    for _ in 0..600 {
        if worker.version() == 1 {
            installed = true;
            break;
        }
        // Nothing is installed before a whole, verified transfer.
        assert!(
            worker.version() == 0 || bad_transfers.load(std::sync::atomic::Ordering::SeqCst) >= 3,
            "a version was installed from a bad transfer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(installed, "the worker never installed version 1");
    assert!(
        bad_transfers.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "version 1 came without going through the two bad transfers"
    );
    // What it installed is the learner's version 1, and it samples from it.
    let r = worker
        .generate(Job {
            prompt: vec![3, 4],
            sampling: SamplingParams::default(),
            seed: 1,
            max_new_tokens: 3,
            stop_tokens: vec![],
            min_version: 1,
            exact_version: None,
        })
        .await;
    assert_eq!(r.versions, vec![1, 1, 1]);
}
