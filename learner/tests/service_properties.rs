//! Property tests of what the learner service is sent: any `TrajectoryGroup` (empty or
//! oversized token lists, token ids outside the vocabulary, lengths that disagree, NaN
//! advantages and log-probabilities, absurd step sizes and learning rates, more trajectories than
//! a group may hold, bad objectives, another run's id) is acknowledged or rejected with a reason that names the
//! field, never panics the service or its training thread, and a good group afterwards still
//! trains. `StreamWeights` with any chunk offset answers the version's chunks from there or
//! says the offset is past its end.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Device;
use chorus_learner::{
    LearnerConfig, LearnerHandle, LearnerService, LearnerServiceConfig, Trainer, spawn_learner,
};
use chorus_model::{NemotronHConfig, checkpoint::init_params};
use chorus_proto::limits::{MAX_GROUP_SIZE, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_STEP_GROUPS};
use chorus_proto::objective::Objective;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::learner_server::{Learner, LearnerServer};
use chorus_proto::v1::{StreamWeightsRequest, Trajectory, TrajectoryGroup};
use proptest::prelude::*;
use tokio_stream::StreamExt;

const VOCAB: u32 = 24;

/// One learner for every case: its runtime, the training thread and a gRPC server.
struct Served {
    runtime: tokio::runtime::Runtime,
    handle: LearnerHandle,
    url: String,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let cfg = NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 24, "hidden_size": 16,
            "hybrid_override_pattern": "*-", "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 16}"#,
        )
        .unwrap();
        let params = init_params(&cfg, 2, &Device::Cpu).unwrap();
        let trainer = Trainer::new(cfg, params, LearnerConfig::default()).unwrap();
        let handle = spawn_learner(
            trainer,
            LearnerServiceConfig {
                run_id: "run".into(),
                groups_per_step: 1,
                max_chunk_bytes: 1 << 12,
                keep_versions: 2,
                checkpoints: None,
            },
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let service = LearnerService::new(handle.clone());
        let url = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(LearnerServer::new(service))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            format!("http://{addr}")
        });
        Served {
            runtime,
            handle,
            url,
        }
    })
}

/// A unique group id per submission, so no group is acknowledged as seen before.
fn next_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

fn trajectory(i: usize) -> Trajectory {
    Trajectory {
        trajectory_id: format!("t{i}"),
        prompt_token_ids: vec![3, 4 + i as u32 % 8],
        completion_token_ids: vec![7, 9, 7],
        logprobs: vec![-2.0; 3],
        policy_versions: vec![0; 3],
        advantage: i as f64 - 0.5,
        ..Default::default()
    }
}

fn good_group() -> TrajectoryGroup {
    TrajectoryGroup {
        run_id: "run".into(),
        group_id: next_id("good"),
        trajectories: vec![trajectory(0), trajectory(1)],
        step_groups: 1,
        ..Default::default()
    }
}

/// One defect (or none) applied to a trajectory or to the group.
#[derive(Clone, Debug)]
enum Defect {
    EmptyPrompt(usize),
    EmptyCompletion(usize),
    LongPrompt(usize),
    LongCompletion(usize),
    Token(usize, bool, u32),
    DropLogprob(usize),
    ExtraVersion(usize),
    Logprob(usize, f32),
    Advantage(usize, f64),
    Mask(usize, Vec<bool>),
    NoTrajectories,
    TooManyTrajectories,
    StepGroups(u32),
    LearningRate(f64),
    Objective(String),
    Supervised,
    RunId(String),
}

fn defect() -> impl Strategy<Value = Defect> {
    let at = 0usize..2;
    prop_oneof![
        4 => at.clone().prop_map(Defect::EmptyPrompt),
        4 => at.clone().prop_map(Defect::EmptyCompletion),
        1 => at.clone().prop_map(Defect::LongPrompt),
        1 => at.clone().prop_map(Defect::LongCompletion),
        4 => (at.clone(), any::<bool>(), prop_oneof![0..VOCAB, VOCAB..VOCAB + 2, Just(u32::MAX)])
            .prop_map(|(i, p, t)| Defect::Token(i, p, t)),
        4 => at.clone().prop_map(Defect::DropLogprob),
        4 => at.clone().prop_map(Defect::ExtraVersion),
        4 => (
            at.clone(),
            prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY), -5.0f32..0.0]
        )
            .prop_map(|(i, v)| Defect::Logprob(i, v)),
        4 => (at.clone(), prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -3.0f64..3.0])
            .prop_map(|(i, v)| Defect::Advantage(i, v)),
        4 => (at, prop::collection::vec(any::<bool>(), 0..5)).prop_map(|(i, m)| Defect::Mask(i, m)),
        4 => Just(Defect::NoTrajectories),
        1 => Just(Defect::TooManyTrajectories),
        4 => prop_oneof![
            0u32..3,
            Just(MAX_STEP_GROUPS as u32 + 1),
            Just(1_000_000_000),
            Just(u32::MAX)
        ]
        .prop_map(Defect::StepGroups),
        4 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-1e-3), Just(0.0), Just(1e-3)]
            .prop_map(Defect::LearningRate),
        4 => prop_oneof![Just("grpo".to_string()), Just("bogus".to_string()), Just(String::new())]
            .prop_map(Defect::Objective),
        4 => Just(Defect::Supervised),
        2 => prop_oneof![Just("run".to_string()), Just(String::new()), Just("another-run".to_string())]
            .prop_map(Defect::RunId),
    ]
}

fn apply(g: &mut TrajectoryGroup, d: &Defect) {
    match d {
        Defect::NoTrajectories => g.trajectories.clear(),
        Defect::TooManyTrajectories => {
            g.trajectories = (0..=MAX_GROUP_SIZE).map(trajectory).collect();
        }
        Defect::StepGroups(n) => g.step_groups = *n,
        Defect::LearningRate(lr) => g.learning_rate = *lr,
        Defect::Objective(name) => {
            let mut o = Objective::default().to_proto();
            o.algorithm = name.clone();
            g.objective = Some(o);
        }
        Defect::Supervised => g.supervised = true,
        Defect::RunId(id) => g.run_id = id.clone(),
        Defect::EmptyPrompt(i)
        | Defect::EmptyCompletion(i)
        | Defect::LongPrompt(i)
        | Defect::LongCompletion(i)
        | Defect::Token(i, _, _)
        | Defect::DropLogprob(i)
        | Defect::ExtraVersion(i)
        | Defect::Logprob(i, _)
        | Defect::Advantage(i, _)
        | Defect::Mask(i, _) => {
            if let Some(t) = g.trajectories.get_mut(*i) {
                apply_to(t, d);
            }
        }
    }
}

fn apply_to(t: &mut Trajectory, d: &Defect) {
    match d {
        Defect::EmptyPrompt(_) => t.prompt_token_ids.clear(),
        Defect::EmptyCompletion(_) => t.completion_token_ids.clear(),
        Defect::LongPrompt(_) => t.prompt_token_ids = vec![3; MAX_PROMPT_TOKENS + 1],
        Defect::LongCompletion(_) => t.completion_token_ids = vec![3; MAX_NEW_TOKENS + 1],
        Defect::Token(_, prompt, id) => {
            let ids = if *prompt {
                &mut t.prompt_token_ids
            } else {
                &mut t.completion_token_ids
            };
            if let Some(last) = ids.last_mut() {
                *last = *id;
            }
        }
        Defect::DropLogprob(_) => {
            t.logprobs.pop();
        }
        Defect::ExtraVersion(_) => t.policy_versions.push(0),
        Defect::Logprob(_, v) => {
            if let Some(lp) = t.logprobs.first_mut() {
                *lp = *v;
            }
        }
        Defect::Advantage(_, v) => t.advantage = *v,
        Defect::Mask(_, m) => t.completion_mask = m.clone(),
        _ => {}
    }
}

/// What is wrong with `g`, as words its rejection must use (one of them): empty when the
/// learner must accept it.
fn defects(g: &TrajectoryGroup) -> Vec<&'static str> {
    let mut out = vec![];
    // Another run's group is refused whatever else it holds (an empty id means this run).
    if !g.run_id.is_empty() && g.run_id != "run" {
        return vec!["not `another-run`"];
    }
    if g.trajectories.len() > MAX_GROUP_SIZE {
        out.push("trajectories");
    }
    if g.step_groups as usize > MAX_STEP_GROUPS {
        out.push("step_groups");
    }
    if !(g.learning_rate.is_finite() && g.learning_rate >= 0.0) {
        out.push("learning_rate");
    }
    if !g.supervised
        && let Some(o) = &g.objective
        && Objective::from_proto(o).is_err()
    {
        out.push("objective");
    }
    for t in &g.trajectories {
        let n = t.completion_token_ids.len();
        if t.prompt_token_ids.len() > MAX_PROMPT_TOKENS {
            out.push("prompt_token_ids");
        }
        if n > MAX_NEW_TOKENS {
            out.push("completion_token_ids");
        }
        if t.prompt_token_ids.is_empty() {
            out.push("prompt");
        }
        if n == 0 {
            out.push("completion");
        }
        if t.prompt_token_ids.iter().any(|&id| id >= VOCAB) {
            out.push("prompt_token_ids");
        }
        if t.completion_token_ids.iter().any(|&id| id >= VOCAB) {
            out.push("completion_token_ids");
        }
        let m = t.completion_mask.len();
        if (m != 0 && m != n) || (m == n && n > 0 && !t.completion_mask.iter().any(|&x| x)) {
            out.push("completion mask");
        }
        if !g.supervised {
            if t.logprobs.len() != n || t.policy_versions.len() != n {
                out.push("logprobs");
                out.push("versions");
            }
            if !t.advantage.is_finite() {
                out.push("advantage");
            }
            if t.logprobs.iter().any(|lp| !lp.is_finite()) {
                out.push("logprobs");
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn any_group_is_accepted_or_rejected_by_field(batch in prop::collection::vec(prop::collection::vec(defect(), 0..3), 1..4)) {
        let s = served();
        let groups: Vec<TrajectoryGroup> = batch
            .iter()
            .map(|ds| {
                let mut g = good_group();
                for d in ds {
                    apply(&mut g, d);
                }
                g
            })
            .collect();
        let response = s.runtime.block_on(async {
            let mut client = LearnerClient::connect(s.url.clone()).await.unwrap();
            client.submit_trajectories(tokio_stream::iter(groups.clone())).await
        });
        let response = response.map_err(|e| TestCaseError::fail(format!("{e}")))?.into_inner();
        for g in &groups {
            let wrong = defects(g);
            let rejected = response.rejected.iter().find(|r| r.group_id == g.group_id);
            let accepted = response.accepted_group_ids.contains(&g.group_id);
            prop_assert!(accepted != rejected.is_some(), "{}: accepted and rejected", g.group_id);
            match rejected {
                None => prop_assert!(wrong.is_empty(), "{} accepted, but: {wrong:?}", g.group_id),
                Some(r) => {
                    prop_assert!(!wrong.is_empty(), "a good group was rejected: {}", r.reason);
                    prop_assert!(
                        wrong.iter().any(|w| r.reason.contains(w)),
                        "`{}` names none of {wrong:?}",
                        r.reason
                    );
                }
            }
        }
        // The training thread is alive: a good group trains a step.
        let mut reports = s.handle.reports();
        s.handle.submit(good_group()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let report = s.runtime.block_on(async {
            // A guard against a dead thread, far beyond a step of this model.
            tokio::time::timeout(std::time::Duration::from_secs(300), reports.recv()).await
        });
        prop_assert!(matches!(report, Ok(Ok(_))), "no step after a good group: {report:?}");
    }

    #[test]
    fn stream_weights_answers_any_chunk_offset(start in prop_oneof![0u32..40, Just(u32::MAX)], exact in any::<bool>()) {
        let s = served();
        let service = LearnerService::new(s.handle.clone());
        let version = s.handle.version();
        let answer = s.runtime.block_on(async {
            let request = StreamWeightsRequest {
                run_id: "run".into(),
                policy_version: version,
                start_chunk: start,
                exact,
                ..Default::default()
            };
            match service.stream_weights(tonic::Request::new(request)).await {
                Ok(stream) => Ok(stream.into_inner().collect::<Vec<_>>().await),
                Err(status) => Err(status),
            }
        });
        let published = s.runtime.block_on(s.handle.wait_for(version));
        let total = published.chunks.len();
        match answer {
            Ok(chunks) => {
                prop_assert!(start as usize <= total);
                prop_assert_eq!(chunks.len(), total - start as usize);
                prop_assert!(chunks.iter().all(|c| c.is_ok()));
            }
            Err(status) => {
                // The version may have moved on (other cases train): a newer one has as many
                // chunks, and an exact request for a version no longer kept is NotFound.
                prop_assert!(
                    (status.code() == tonic::Code::OutOfRange && status.message().contains("start_chunk"))
                        || (exact && status.code() == tonic::Code::NotFound),
                    "{status:?}"
                );
                if status.code() == tonic::Code::OutOfRange {
                    prop_assert!(start as usize > total);
                }
            }
        }
    }
}
