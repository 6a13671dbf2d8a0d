//! The services as separate OS processes on 127.0.0.1: a learner, two workers and an
//! orchestrator complete a small run; a worker with the wrong token is turned away.

mod harness;

use harness::*;

const MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 32,
  "hybrid_override_pattern": "M*-", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32}"#;

const RUN: &str = r#"
name = "multi"
[model]
init_config = "model.json"
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 3
prompts_per_step = 3
group_size = 4
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

#[test]
fn learner_workers_and_orchestrator_as_processes_complete_a_run() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let common = ["--config", "run.toml", "--run-id", "r1", "--token", "tok"];
    let learner = h.service(&[&["serve", "learner"][..], &common].concat());
    let w0 = h.service(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w0"][..],
            &common,
        ]
        .concat(),
    );
    let w1 = h.service(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w1"][..],
            &common,
        ]
        .concat(),
    );
    let out = h.ok(&[
        "serve",
        "orchestrator",
        "--config",
        "run.toml",
        "--run-id",
        "r1",
        "--token",
        "tok",
        "--learner",
        &learner.url,
        "--worker",
        &w0.url,
        "--worker",
        &w1.url,
        "--eval-tasks",
        "3",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 5, "{summary}");
    assert!(summary["trajectories"].as_u64().unwrap() > 0);
    // Both workers served requests.
    let rollouts = h.ok(&["inspect", "rollouts", "--run", "r1", "--limit", "1000"]);
    assert!(
        rollouts.contains(" w0 ") && rollouts.contains(" w1 "),
        "{rollouts}"
    );

    // A worker without the right token cannot fetch weights.
    let bad = h.chorus(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w9"][..],
            &["--config", "run.toml", "--run-id", "r1", "--token", "wrong"],
        ]
        .concat(),
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.to_lowercase().contains("unauthenticated") || err.contains("token"),
        "{err}"
    );
}
