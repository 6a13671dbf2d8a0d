//! Property tests of what a rollout worker is sent: any `GenerateRequest` (empty, oversized or
//! out-of-vocabulary prompts, absurd `max_new_tokens`, non-finite sampling settings, think
//! budgets with any token ids) is answered, either with tokens or with an error that names the
//! field, and never stops the engine thread: a good request afterwards still generates.

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use chorus_model::engine::Engine;
use chorus_model::{NemotronHConfig, checkpoint};
use chorus_proto::limits::{MAX_NEW_TOKENS, MAX_PROMPT_TOKENS};
use chorus_proto::v1::rollout_worker_client::RolloutWorkerClient;
use chorus_proto::v1::rollout_worker_server::RolloutWorkerServer;
use chorus_proto::v1::{FinishReason, GenerateRequest, SamplingParams, ThinkBudget};
use chorus_rollout_worker::{RolloutService, WorkerHandle, spawn_engine_loop};
use proptest::prelude::*;
use tokio_stream::StreamExt;

const VOCAB: u32 = 50;

fn engine() -> Arc<Engine> {
    let cfg = NemotronHConfig::from_json_str(
        r#"{"model_type": "nemotron_h", "vocab_size": 50, "hidden_size": 16,
        "hybrid_override_pattern": "M*", "mamba_num_heads": 2, "mamba_head_dim": 8,
        "ssm_state_size": 4, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}"#,
    )
    .unwrap();
    Arc::new(
        Engine::from_params(
            &cfg,
            &checkpoint::init_params(&cfg, 1, &Device::Cpu).unwrap(),
        )
        .unwrap(),
    )
}

/// One worker for every case: a runtime, its engine thread and the gRPC server in front of it.
struct Worker {
    runtime: tokio::runtime::Runtime,
    handle: WorkerHandle,
    url: String,
}

fn worker() -> &'static Worker {
    static WORKER: OnceLock<Worker> = OnceLock::new();
    WORKER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = spawn_engine_loop(engine(), 0, 4);
        let service = RolloutService::new(handle.clone(), "w0");
        let url = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(RolloutWorkerServer::new(service))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            format!("http://{addr}")
        });
        Worker {
            runtime,
            handle,
            url,
        }
    })
}

fn token() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0..VOCAB,
        1 => Just(VOCAB),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => 0.0f32..2.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(-1.0f32),
        1 => Just(f32::MIN_POSITIVE),
        1 => any::<f32>(),
    ]
}

fn request() -> impl Strategy<Value = GenerateRequest> {
    let sampling = (
        float(),
        float(),
        prop_oneof![0u32..60, any::<u32>()],
        prop::option::of(any::<u64>()),
        prop::option::of((prop_oneof![0u32..4, any::<u32>()], token(), token())),
    )
        .prop_map(|(temperature, top_p, top_k, seed, budget)| SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            think_budget: budget.map(|(tokens, open_token_id, close_token_id)| ThinkBudget {
                tokens,
                open_token_id,
                close_token_id,
            }),
        });
    (
        prop_oneof![
            6 => prop::collection::vec(token(), 0..12),
            1 => Just(vec![]),
            1 => Just(vec![3; MAX_PROMPT_TOKENS + 1]),
        ],
        prop::option::of(sampling),
        prop_oneof![
            6 => 0u32..6,
            1 => Just(MAX_NEW_TOKENS as u32 + 1),
            1 => Just(u32::MAX),
        ],
        prop::collection::vec(token(), 0..3),
        "\\PC{0,8}",
    )
        .prop_map(
            |(prompt, sampling, max_new_tokens, stop, run_id)| GenerateRequest {
                request_id: String::new(),
                run_id,
                prompt_id: "p".into(),
                trajectory_id: "t".into(),
                prompt_token_ids: prompt,
                sampling,
                max_new_tokens,
                stop_token_ids: stop,
                // The version the worker holds: a later one would (rightly) wait for it.
                min_policy_version: 0,
                exact_policy_version: None,
            },
        )
}

/// The field an error must name, for a request the worker must refuse; `None` for one it may
/// serve.
fn refusal(r: &GenerateRequest) -> Option<&'static str> {
    let s = r.sampling.unwrap_or_default();
    let top_p = if s.top_p == 0.0 { 1.0 } else { s.top_p };
    if r.prompt_token_ids.is_empty() || r.prompt_token_ids.len() > MAX_PROMPT_TOKENS {
        Some("prompt")
    } else if r.prompt_token_ids.iter().any(|&t| t >= VOCAB) {
        Some("prompt_token_ids")
    } else if r.max_new_tokens == 0 || r.max_new_tokens as usize > MAX_NEW_TOKENS {
        Some("max_new_tokens")
    } else if s
        .think_budget
        .is_some_and(|b| b.open_token_id >= VOCAB || b.close_token_id >= VOCAB)
    {
        Some("think_budget")
    } else if !s.temperature.is_finite() || s.temperature < 0.0 {
        Some("temperature")
    } else if !(top_p > 0.0 && top_p <= 1.0) {
        Some("top_p")
    } else if s
        .think_budget
        .is_some_and(|b| b.open_token_id == b.close_token_id)
    {
        Some("think budget")
    } else {
        None
    }
}

fn good(id: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_token_ids: vec![3, 4, 5],
        max_new_tokens: 2,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, .. ProptestConfig::default() })]

    /// Over gRPC: every request of a stream is answered, and the engine thread survives it.
    #[test]
    fn any_request_is_answered_and_names_what_it_refuses(mut reqs in prop::collection::vec(request(), 1..4)) {
        let w = worker();
        for (i, r) in reqs.iter_mut().enumerate() {
            r.request_id = format!("r{i}");
        }
        reqs.push(good("after"));
        let answers = w.runtime.block_on(async {
            let mut client = RolloutWorkerClient::connect(w.url.clone()).await.unwrap();
            let mut stream = client
                .generate(tokio_stream::iter(reqs.clone()))
                .await
                .unwrap()
                .into_inner();
            let mut answers = std::collections::HashMap::new();
            while answers.len() < reqs.len() {
                match stream.next().await {
                    Some(Ok(a)) => {
                        answers.insert(a.request_id.clone(), a);
                    }
                    Some(Err(e)) => return Err(format!("the stream failed: {e}")),
                    None => return Err(format!("the stream ended after {} answers", answers.len())),
                }
            }
            Ok(answers)
        });
        let answers = answers.map_err(TestCaseError::fail)?;
        for r in &reqs {
            let a = &answers[&r.request_id];
            match refusal(r) {
                Some(field) => {
                    prop_assert_eq!(a.finish_reason, FinishReason::Error as i32, "{:?}", a);
                    prop_assert!(a.error.contains(field), "`{}` does not name {field}", a.error);
                    prop_assert!(a.token_ids.is_empty());
                }
                None => {
                    prop_assert!(a.error.is_empty(), "{r:?} refused: {}", a.error);
                    prop_assert!(!a.token_ids.is_empty());
                    prop_assert!(a.token_ids.len() <= r.max_new_tokens as usize);
                    prop_assert_eq!(a.logprobs.len(), a.token_ids.len());
                    prop_assert_eq!(a.policy_versions.len(), a.token_ids.len());
                    prop_assert!(a.token_ids.iter().all(|&t| t < VOCAB));
                }
            }
        }
        // The engine thread is still there.
        prop_assert_eq!(w.handle.version(), 0);
    }
}
