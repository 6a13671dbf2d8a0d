//! The message-size limits of `chorus_proto::limits` as the served processes apply them: the
//! learner decodes a group far past tonic's 4 MiB default (long sequences make big groups) and
//! judges it on its content, and refuses one past its own limit before any handler runs.

mod harness;

use chorus_proto::auth::AttachToken;
use chorus_proto::limits::LEARNER_MAX_MESSAGE_BYTES;
use chorus_proto::v1::learner_client::LearnerClient;
use chorus_proto::v1::{Trajectory, TrajectoryGroup};
use harness::*;

const RUN: &str = r#"
name = "limits"
[model]
init_config = "model.json"
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

/// A group of one trajectory whose prompt holds `tokens` ids, every one outside the tiny
/// model's vocabulary (so the learner refuses it on its content, without training).
fn group(id: &str, tokens: usize) -> TrajectoryGroup {
    TrajectoryGroup {
        run_id: "r1".into(),
        group_id: id.into(),
        environment: "arithmetic".into(),
        trajectories: vec![Trajectory {
            trajectory_id: format!("{id}-t0"),
            prompt_token_ids: vec![1_000_000; tokens],
            completion_token_ids: vec![1, 2],
            logprobs: vec![-0.5, -0.5],
            policy_versions: vec![0, 0],
            reward: 1.0,
            advantage: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn the_learner_takes_groups_past_tonics_default_and_refuses_ones_past_its_limit() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let learner = h.service(&[
        "serve", "learner", "--config", "run.toml", "--run-id", "r1", "--token", "tok",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = chorus_proto::tonic::transport::Endpoint::from_shared(learner.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = LearnerClient::with_interceptor(channel, AttachToken::new("tok").unwrap())
            .max_encoding_message_size(usize::MAX);
        // About 9 MiB on the wire (3-byte varints): over tonic's 4 MiB, under the learner's.
        let big = group("big", 3 << 20);
        let ack = client
            .submit_trajectories(chorus_proto::tonic::codegen::tokio_stream::iter(vec![big]))
            .await
            .expect("a 9 MiB group reaches the learner")
            .into_inner();
        let rejected = &ack.rejected[0];
        assert!(
            rejected.reason.contains("prompt_token_ids"),
            "judged on its content: {rejected:?}"
        );
        // Past the learner's own limit: tonic refuses it before any handler runs.
        let huge = group("huge", LEARNER_MAX_MESSAGE_BYTES / 3 + (1 << 20));
        let err = client
            .submit_trajectories(chorus_proto::tonic::codegen::tokio_stream::iter(vec![huge]))
            .await
            .expect_err("a group past the limit is refused");
        assert!(
            err.message().contains("message length too large")
                || err.code() == chorus_proto::tonic::Code::OutOfRange,
            "{err:?}"
        );
    });
}
