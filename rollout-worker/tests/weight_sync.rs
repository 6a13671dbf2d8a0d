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
        },
    );
    let mut reports = learner.reports();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = LearnerServer::with_interceptor(
        LearnerService::new(learner.clone()),
        RequireToken::new("tok").unwrap(),
    );
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
    let mut client = LearnerClient::with_interceptor(channel, AttachToken::new("tok").unwrap());

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
