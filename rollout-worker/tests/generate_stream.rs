//! The worker over real gRPC on 127.0.0.1: batched requests return what the engine generates
//! alone, malformed requests fail alone, and weights change between decode steps.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use candle_core::Device;
use chorus_model::engine::{Engine, GenerationRequest};
use chorus_model::sampling::SamplingParams;
use chorus_model::{NemotronHConfig, checkpoint};
use chorus_proto::auth::{AttachToken, RequireToken};
use chorus_proto::v1::rollout_worker_client::RolloutWorkerClient;
use chorus_proto::v1::rollout_worker_server::RolloutWorkerServer;
use chorus_proto::v1::{FinishReason, GenerateRequest};
use chorus_rollout_worker::{
    Job, RolloutService, WorkerOptions, spawn_engine_loop, spawn_engine_loop_with,
};
use tokio_stream::StreamExt;

fn config() -> NemotronHConfig {
    NemotronHConfig::from_json_str(
        r#"{"model_type": "nemotron_h", "vocab_size": 50, "hidden_size": 32,
        "hybrid_override_pattern": "M*E-", "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16}"#,
    )
    .unwrap()
}

fn engine(seed: u64) -> Arc<Engine> {
    let cfg = config();
    Arc::new(
        Engine::from_params(
            &cfg,
            &checkpoint::init_params(&cfg, seed, &Device::Cpu).unwrap(),
        )
        .unwrap(),
    )
}

fn request(i: usize, prompt: Vec<u32>, n: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("r{i}"),
        run_id: "run".into(),
        prompt_id: format!("p{i}"),
        trajectory_id: format!("t{i}"),
        prompt_token_ids: prompt,
        sampling: Some(chorus_proto::v1::SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: Some(i as u64),
            think_budget: None,
        }),
        max_new_tokens: n,
        stop_token_ids: vec![],
        min_policy_version: 0,
        exact_policy_version: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_generation_over_grpc_matches_the_engine_and_isolates_bad_requests() {
    let e = engine(1);
    let handle = spawn_engine_loop(e.clone(), 0, 8);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = RolloutWorkerServer::with_interceptor(
        RolloutService::new(handle, "w0"),
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
    let mut client =
        RolloutWorkerClient::with_interceptor(channel, AttachToken::new("tok").unwrap());
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            (0..(2 + i * 3))
                .map(|j| ((i * 7 + j * 3) % 47 + 3) as u32)
                .collect()
        })
        .collect();
    let mut reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(i, p.clone(), 5 + i as u32 * 2))
        .collect();
    reqs.push(request(99, vec![3, 4000], 4)); // token out of range
    reqs.push(request(98, vec![], 4)); // empty prompt
    let mut responses = client
        .generate(tokio_stream::iter(reqs.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut got = std::collections::HashMap::new();
    while let Some(r) = responses.next().await {
        let r = r.unwrap();
        got.insert(r.request_id.clone(), r);
        if got.len() == reqs.len() {
            break;
        }
    }
    for (i, p) in prompts.iter().enumerate() {
        let r = &got[&format!("r{i}")];
        let want = e
            .generate(&GenerationRequest {
                prompt: p.clone(),
                max_new_tokens: 5 + i * 2,
                sampling: SamplingParams::greedy(),
                seed: 0,
                stop_tokens: vec![],
            })
            .unwrap();
        assert_eq!(r.token_ids, want.tokens, "request {i}");
        assert_eq!(r.finish_reason, FinishReason::Length as i32);
        assert_eq!(
            (r.trajectory_id.as_str(), r.worker_id.as_str()),
            (format!("t{i}").as_str(), "w0")
        );
        assert!(r.policy_versions.iter().all(|&v| v == 0) && r.logprobs.len() == r.token_ids.len());
    }
    assert!(
        got["r99"].error.contains("4000") && got["r99"].finish_reason == FinishReason::Error as i32
    );
    assert!(got["r98"].error.contains("empty prompt"));

    // A reasoning budget travels with the request: prompts that open a think block (token 7)
    // spend at most 2 tokens in it before the worker closes it (token 8).
    let budgeted: Vec<GenerateRequest> = (0..6)
        .map(|i| {
            let mut r = request(50 + i, vec![3, 4, 7], 12);
            let s = r.sampling.as_mut().unwrap();
            s.temperature = 1.0;
            s.think_budget = Some(chorus_proto::v1::ThinkBudget {
                tokens: 2,
                open_token_id: 7,
                close_token_id: 8,
            });
            r
        })
        .collect();
    let mut responses = client
        .generate(tokio_stream::iter(budgeted.clone()))
        .await
        .unwrap()
        .into_inner();
    let (mut seen, mut forced) = (0, 0);
    while let Some(r) = responses.next().await {
        let r = r.unwrap();
        assert!(r.error.is_empty(), "{}", r.error);
        forced += usize::from(r.token_ids.get(2) == Some(&8));
        let mut inside = Some(0);
        for &t in &r.token_ids {
            if t == 7 {
                inside = Some(0);
            } else if t == 8 {
                inside = None;
            } else if let Some(n) = &mut inside {
                *n += 1;
                assert!(*n <= 2, "{:?} thinks longer than 2 tokens", r.token_ids);
            }
        }
        seen += 1;
        if seen == budgeted.len() {
            break;
        }
    }
    assert!(
        forced > 0,
        "the budget closed no block: it was never reached"
    );

    // Without the token the call is rejected.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = RolloutWorkerClient::new(channel)
        .generate(tokio_stream::iter(vec![request(0, vec![3], 2)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_change_between_decode_steps_without_dropping_sequences() {
    let handle = spawn_engine_loop(engine(1), 0, 4);
    let job = Job {
        prompt: vec![5, 6, 7],
        sampling: SamplingParams::default(),
        seed: 3,
        max_new_tokens: 400,
        stop_tokens: vec![],
        min_version: 0,
        exact_version: None,
    };
    let h2 = handle.clone();
    let running = tokio::spawn(async move { h2.generate(job).await });
    while handle.stats().tokens_generated.load(Ordering::Relaxed) < 5 {
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
    handle.install_weights(1, engine(2));
    let r = running.await.unwrap();
    assert!(r.error.is_none());
    assert_eq!(r.tokens.len(), 400);
    assert_eq!(r.versions.first(), Some(&0));
    assert_eq!(
        r.versions.last(),
        Some(&1),
        "the new version took over mid-sequence"
    );
    assert!(r.versions.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(handle.version(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_for_the_policy_version_it_needs() {
    let handle = spawn_engine_loop(engine(1), 0, 4);
    let h2 = handle.clone();
    let job = Job {
        prompt: vec![5, 6],
        sampling: SamplingParams::greedy(),
        seed: 0,
        max_new_tokens: 3,
        stop_tokens: vec![],
        min_version: 1,
        exact_version: None,
    };
    let waiting = tokio::spawn(async move { h2.generate(job).await });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the job must not run on version 0");
    handle.install_weights(1, engine(2));
    let r = waiting.await.unwrap();
    assert_eq!(r.versions, vec![1, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_job_decodes_with_its_version_alone_fetching_it_again_when_gone() {
    let handle = spawn_engine_loop_with(
        engine(1),
        0,
        WorkerOptions {
            max_batch: 4,
            keep_versions: 1,
            decode_step_delay: None,
        },
    );
    let job = |exact_version| Job {
        prompt: vec![5, 6, 7],
        sampling: SamplingParams::default(),
        seed: 3,
        max_new_tokens: 40,
        stop_tokens: vec![],
        min_version: 0,
        exact_version,
    };
    let reference = handle.generate(job(Some(0))).await;
    assert!(reference.error.is_none(), "{:?}", reference.error);
    assert_eq!(reference.versions, vec![0; 40]);

    handle.install_weights(1, engine(2));
    let newer = handle.generate(job(None)).await;
    assert_eq!(newer.versions, vec![1; 40]);
    assert_ne!(
        newer.tokens, reference.tokens,
        "version 1 samples other tokens"
    );

    // Keeping one version, the worker dropped version 0: the pinned job asks for it and waits.
    let h2 = handle.clone();
    let pinned = tokio::spawn(async move { h2.generate(job(Some(0))).await });
    assert_eq!(handle.wanted_versions().await, vec![0]);
    handle.install_weights(0, engine(1));
    let pinned = pinned.await.unwrap();
    assert_eq!(pinned.versions, reference.versions);
    assert_eq!(pinned.tokens, reference.tokens);
    let bits = |r: &chorus_rollout_worker::JobResult| {
        r.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(bits(&pinned), bits(&reference));
    assert_eq!(
        handle.version(),
        1,
        "an older version never replaces the newest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_version_that_cannot_be_had_fails_its_jobs_with_the_reason() {
    let handle = spawn_engine_loop(engine(1), 3, 4);
    let h2 = handle.clone();
    let waiting = tokio::spawn(async move {
        h2.generate(Job {
            prompt: vec![5],
            sampling: SamplingParams::greedy(),
            seed: 0,
            max_new_tokens: 2,
            stop_tokens: vec![],
            min_version: 0,
            exact_version: Some(1),
        })
        .await
    });
    assert_eq!(handle.wanted_versions().await, vec![1]);
    handle.version_unavailable(1, "no longer kept by the learner".into());
    let r = waiting.await.unwrap();
    let error = r.error.expect("failed");
    assert!(
        error.contains("policy version 1") && error.contains("no longer kept"),
        "{error}"
    );
}
