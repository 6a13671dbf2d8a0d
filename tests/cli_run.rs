//! `chorus run` end to end on a tiny model: every service over gRPC on loopback, the ledger
//! agrees with summary.json, and a bad config is refused with the key named.

mod harness;
#[path = "../orchestrator/tests/support/postgres.rs"]
mod postgres;

use chorus_orchestrator::ledger::{Ledger, RolloutFilter, RunStatus, TrajectoryStatus};
use harness::*;
use postgres::postgres_url_or_skip;

const MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 32,
  "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
  "moe_shared_expert_intermediate_size": 16, "eos_token_id": 2}"#;

const RUN: &str = r#"
name = "tiny"
seed = 3
[model]
init_config = "model.json"
[workers]
count = 2
max_batch = 16
quantize = "nvfp4"
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
environments = [{ name = "arithmetic" }, { name = "needle" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 3
prompts_per_step = 4
group_size = 4
max_staleness = 1
max_new_tokens = 4
lr = 4e-4
warmup_steps = 1
lr_decay = "cosine"
min_lr = 1e-4
environments = [{ name = "arithmetic" }, { name = "needle" }]
"#;

/// `chorus ARGS…` started in `h`'s directory without waiting for it.
fn spawn(h: &Harness, args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .current_dir(h.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chorus")
}

/// Waits for `child`, panicking with its standard error unless it succeeded.
fn succeeded(child: std::process::Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_runs_of_one_config_started_at_once_both_finish_with_their_own_rows() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let args = ["run", "run.toml", "--eval-tasks", "2"];
    let (a, b) = (spawn(&h, &args), spawn(&h, &args));
    succeeded(a, "the first run");
    succeeded(b, "the second run");
    h.audit_clean(&h.ledger_url("tiny"));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&h.ledger_url("tiny")).await.unwrap();
        let runs = ledger.list_runs(10).await.unwrap();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_ne!(runs[0].id, runs[1].id);
        for run in &runs {
            assert_eq!(run.name, "tiny");
            assert_eq!(run.status, RunStatus::Succeeded, "{}", run.id);
            let steps = ledger.list_learner_steps(&run.id).await.unwrap();
            assert_eq!(steps.len(), 6, "run {} has its own six steps", run.id);
            assert!(ledger.count_consumed(&run.id).await.unwrap() > 0);
        }
    });
    // One run wrote its files where a run of this config goes; the other beside it, under its
    // own id, naming its run in its summary.
    let first = h.json("runs/tiny/summary.json");
    let others: Vec<_> = std::fs::read_dir(h.path("runs/tiny"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("summary.json").is_file())
        .collect();
    assert_eq!(others.len(), 1, "{others:?}");
    let second: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(others[0].join("summary.json")).unwrap())
            .unwrap();
    assert_ne!(first["run"], second["run"]);
    assert_eq!(
        others[0].file_name().unwrap().to_str(),
        second["run"].as_str()
    );
}

#[test]
fn four_processes_opening_one_new_sqlite_ledger_at_once_all_succeed() {
    let h = Harness::new();
    let db = format!("sqlite://{}", h.path("fresh/ledger.sqlite").display());
    let children: Vec<_> = (0..4)
        .map(|_| spawn(&h, &["inspect", "--db", &db, "runs"]))
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        succeeded(child, &format!("process {i}"));
    }
}

#[test]
fn a_tiny_run_completes_and_the_ledger_agrees_with_the_summary() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "4", "--token", "secret"]);
    h.audit_clean(&h.ledger_url("tiny"));
    let summary: serde_json::Value = h.json("runs/tiny/summary.json");
    assert_eq!(summary["steps"], 6, "{summary}");
    for env in ["arithmetic", "needle"] {
        assert_eq!(summary["environments"][env]["heldout_n"], 4);
        assert!(summary["environments"][env]["after"].as_f64().unwrap() >= 0.0);
    }
    let run_id = summary["run"].as_str().unwrap().to_string();
    let trajectories = summary["trajectories"].as_u64().unwrap();
    let db = h.ledger_url("tiny");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        assert_eq!(ledger.count_consumed(&run_id).await.unwrap(), trajectories);
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                environment: None,
                min_reward: None,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let consumed: Vec<_> = rows
            .iter()
            .filter(|r| r.consumed_at_step.is_some())
            .collect();
        assert_eq!(consumed.len() as u64, trajectories);
        for r in consumed {
            assert!(r.reward.is_some() && matches!(r.status, TrajectoryStatus::Ok));
            // RL trajectories carry per-token versions; warm-up rows are reference solutions.
            if r.worker_id != "reference" {
                assert!(r.min_policy_version.is_some() && r.num_completion_tokens > 0);
            }
        }
        let steps = ledger.list_learner_steps(&run_id).await.unwrap();
        assert!(steps.len() >= 6);
        // Each stage has its own schedule: the RL stage warms up, then decays to min_lr.
        let rates: Vec<f64> = steps.iter().filter_map(|s| s.step.learning_rate).collect();
        assert_eq!(rates.len(), 6, "{rates:?}");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            close(rates[3], 4e-4) && close(rates[4], 4e-4) && close(rates[5], 1e-4),
            "{rates:?}"
        );
        // RL steps record how far the (NVFP4) workers' logprobs were from the learner's.
        let rl: Vec<_> = steps
            .iter()
            .filter_map(|s| s.step.mean_abs_logprob_diff)
            .collect();
        assert!(
            rl.len() >= 3 && rl.iter().all(|d| *d > 0.0 && d.is_finite()),
            "{rl:?}"
        );
    });

    // The ledger reads back through `chorus inspect`.
    let runs = h.ok(&["inspect", "runs"]);
    assert!(
        runs.contains(&run_id) && runs.contains("succeeded"),
        "{runs}"
    );
    let rollouts = h.ok(&[
        "inspect", "--db", &db, "rollouts", "--run", &run_id, "--env", "needle", "--limit", "5",
    ]);
    let first = rollouts
        .lines()
        .nth(1)
        .expect("a needle rollout")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        rollouts.lines().skip(1).all(|l| l.contains("needle")),
        "{rollouts}"
    );
    let one = h.ok(&["inspect", "--db", &db, "trajectory", &first]);
    assert!(
        one.contains("--- prompt") && one.contains("--- reward") && one.contains("needle"),
        "{one}"
    );
    let steps = h.ok(&["inspect", "--db", &db, "steps", "--run", &run_id]);
    assert!(steps.lines().count() >= 7, "{steps}");

    // Each stage: a row in `inspect stages`, and a checkpoint `chorus generate` loads.
    let stages = h.ok(&["inspect", "--db", &db, "stages", "--run", &run_id]);
    let rows: Vec<&str> = stages.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{stages}");
    assert!(
        rows[0].contains("warmup") && rows[0].contains("sft") && rows[0].contains("1-3"),
        "{stages}"
    );
    assert!(
        rows[1].contains("rlvr") && rows[1].contains("succeeded") && rows[1].contains("4-6"),
        "{stages}"
    );
    for stage in ["warmup", "rl"] {
        let file = h.path(&format!("runs/tiny/stages/{stage}/summary.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(v["steps"], 3, "{v}");
        assert_eq!(v["metric"], "heldout_accuracy", "{v}");
        let checkpoint = h.path(&format!("runs/tiny/stages/{stage}/checkpoint"));
        let out = h.ok(&[
            "generate",
            "--checkpoint",
            s(&checkpoint),
            "--prompt-ids",
            "5,17,42",
            "--max-new-tokens",
            "3",
            "--greedy",
        ]);
        assert!(!out.trim().is_empty(), "{stage}: {out}");
    }
    // Every published version, with its stage and the checkpoint a stage ended with.
    let versions = h.ok(&["inspect", "--db", &db, "versions", "--run", &run_id]);
    let rows: Vec<&str> = versions.lines().skip(1).collect();
    assert_eq!(rows.len(), 6, "{versions}");
    assert!(
        rows[0].contains("warmup") && rows[0].trim_end().ends_with('-'),
        "{versions}"
    );
    assert!(
        rows[2].contains("warmup") && rows[2].contains("stages/warmup/checkpoint"),
        "{versions}"
    );
    assert!(
        rows[5].contains(" rl ") && rows[5].contains("stages/rl/checkpoint"),
        "{versions}"
    );
    // The learning curve from the ledger alone agrees with the summary.
    let evals = h.ok(&["inspect", "--db", &db, "evals", "--run", &run_id]);
    let summary = h.json("runs/tiny/summary.json");
    let last = summary["steps"].as_u64().unwrap();
    for env in ["arithmetic", "needle"] {
        let after = 100.0 * summary["environments"][env]["after"].as_f64().unwrap();
        let row = evals
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&last.to_string()) && l.contains(env))
            .unwrap_or_else(|| panic!("no evaluation of {env} at version {last}: {evals}"));
        assert!(row.contains(&format!("{after:.1}%")), "{row} vs {after}");
    }

    // The trained policy stays: the final version in HF layout, named by the summary, with
    // the files transformers and vLLM read beside the weights.
    let final_dir = h.path("runs/tiny/checkpoint");
    assert_eq!(summary["checkpoint"], "runs/tiny/checkpoint", "{summary}");
    let rl_weights = std::fs::read(h.path("runs/tiny/stages/rl/checkpoint/model.safetensors"));
    assert_eq!(
        std::fs::read(final_dir.join("model.safetensors")).unwrap(),
        rl_weights.unwrap(),
        "the last stage ended with the final policy"
    );
    let file = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(final_dir.join(name)).unwrap()).unwrap()
    };
    assert_eq!(file("tokenizer_config.json")["eos_token"], "</s>");
    assert_eq!(file("generation_config.json")["eos_token_id"], 2);
    assert!(final_dir.join("tokenizer.json").is_file());
    let out = h.ok(&[
        "generate",
        "--checkpoint",
        s(&final_dir),
        "--prompt",
        "2+3=",
        "--max-new-tokens",
        "3",
        "--greedy",
    ]);
    assert!(!out.trim().is_empty(), "{out}");

    let err = h.fails(&["inspect", "--db", &db, "stages", "--run", "nope"]);
    assert!(err.contains("run `nope` has no stages"), "{err}");
}

#[test]
fn an_invalid_config_names_the_key() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(
        h.path("bad.toml"),
        RUN.replace("max_staleness = 1", "max_staleness = -1"),
    )
    .unwrap();
    let err = h.fails(&["run", "bad.toml"]);
    assert!(err.contains("max_staleness"), "{err}");
    std::fs::write(
        h.path("bad2.toml"),
        RUN.replace("kind = \"rl\"", "kind = \"dpo\""),
    )
    .unwrap();
    let err = h.fails(&["run", "bad2.toml"]);
    assert!(
        err.contains("stages[1].kind") && err.contains("sft, rl"),
        "{err}"
    );
}

#[test]
fn the_same_run_records_into_postgresql() {
    let Some(url) = postgres_url_or_skip("the_same_run_records_into_postgresql") else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2", "--db", &url]);
    let summary: serde_json::Value = h.json("runs/tiny/summary.json");
    let run_id = summary["run"].as_str().unwrap().to_string();
    // Other tests share this database: audit this run alone.
    let audit = h.ok(&["audit", &run_id, "--db", &url]);
    assert!(!audit.contains("FAIL"), "{audit}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ledger = Ledger::open(&url).await.unwrap();
        assert_eq!(ledger.backend(), "postgres");
        assert_eq!(
            ledger.count_consumed(&run_id).await.unwrap(),
            summary["trajectories"].as_u64().unwrap()
        );
    });
}

/// A run with a multi-turn environment (tool calls answered by the environment between the
/// policy's turns), a learner that trains through the workers' NVFP4 weights, and a learning
/// curve evaluated every RL step.
#[test]
fn multi_turn_environments_nvfp4_training_and_a_learning_curve() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    let run = RUN
        .replace("name = \"tiny\"", "name = \"multi\"")
        .replace(
            "environments = [{ name = \"arithmetic\" }, { name = \"needle\" }]",
            "environments = [{ name = \"tool_agent\" }, { name = \"arithmetic\" }]",
        )
        .replace("max_new_tokens = 4", "max_new_tokens = 24")
        .replace(
            "[[stages]]\nname = \"warmup\"",
            "[learner]\nquantize_forward = \"nvfp4\"\n[[stages]]\nname = \"warmup\"",
        );
    assert!(run.contains("quantize_forward") && run.contains("tool_agent"));
    std::fs::write(h.path("run.toml"), run).unwrap();
    h.ok(&[
        "run",
        "run.toml",
        "--eval-tasks",
        "3",
        "--eval-every",
        "1",
        "--token",
        "s",
    ]);
    let summary: serde_json::Value = h.json("runs/multi/summary.json");
    assert_eq!(summary["steps"], 6, "{summary}");
    // The warm-up's start, before RL, after each of the first two RL steps, and after the last.
    let curve = summary["curve"].as_array().unwrap();
    let versions: Vec<u64> = curve
        .iter()
        .map(|p| p["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![0, 3, 4, 5, 6], "{summary}");
    assert!(
        curve
            .iter()
            .all(|p| p["environments"]["tool_agent"].is_number())
    );

    let db = h.ledger_url("multi");
    let run_id = summary["run"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                environment: Some("tool_agent".into()),
                min_reward: None,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        // Warm-up demonstrations are whole reference episodes: a tool call, the tool's answer,
        // then the final answer.
        let reference = rows.iter().find(|r| r.worker_id == "reference").unwrap();
        let t = ledger.get_trajectory(&reference.id).await.unwrap().unwrap();
        assert!(
            t.trajectory.completion_text.contains("<tool_call>")
                && t.trajectory.completion_text.contains("<|tool|>"),
            "{}",
            t.trajectory.completion_text
        );
        // RL episodes were generated and scored (whatever the tiny policy said).
        assert!(
            rows.iter()
                .any(|r| r.worker_id != "reference" && r.reward.is_some()),
            "no scored tool_agent episode"
        );
        // Trained through NVFP4, the learner sees what the NVFP4 workers sampled: only
        // staleness is left in the mismatch, so on-policy steps are near zero.
        let steps = ledger.list_learner_steps(&run_id).await.unwrap();
        let rl: Vec<f64> = steps
            .iter()
            .filter_map(|s| s.step.mean_abs_logprob_diff)
            .collect();
        assert!(rl.len() >= 3, "{rl:?}");
        assert!(rl.iter().any(|d| *d < 1e-3), "{rl:?}");
    });
}

/// Each command's `--help` shows how to use it, with an example to copy.
#[test]
fn every_command_shows_an_example_in_its_help() {
    let h = Harness::new();
    for cmd in [
        &["run"][..],
        &["generate"],
        &["serve"],
        &["launch"],
        &["watch"],
        &["inspect"],
        &["quantize"],
        &["model", "init"],
        &["env", "sample"],
        &["env", "score"],
        &["env", "new"],
        &["serve", "environment"],
        &["audit"],
        &["completions"],
        &["man"],
    ] {
        let help = h.ok(&[cmd, &["--help"]].concat());
        assert!(
            help.contains("Example") || help.contains("  chorus "),
            "`chorus {} --help` shows no example:\n{help}",
            cmd.join(" ")
        );
    }
}

const SHORT_RL: &str = r#"
name = "logs"
seed = 4
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 8
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

/// The ids in the spans of one JSON log line (`spans`: outermost first).
fn span_field(line: &serde_json::Value, field: &str) -> Option<String> {
    line["spans"]
        .as_array()?
        .iter()
        .find_map(|s| s.get(field).and_then(|v| v.as_str()).map(str::to_string))
}

#[test]
fn json_logs_follow_one_request_from_the_scheduler_to_the_worker_and_text_stays_plain() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), SHORT_RL).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "--log-format",
            "json",
            "run",
            "run.toml",
            "--eval-tasks",
            "2",
        ])
        .env(
            "RUST_LOG",
            "info,chorus_orchestrator=debug,chorus_rollout_worker=debug",
        )
        .current_dir(h.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // A request the worker generated for, found again in the orchestrator's rollout span.
    let worker_requests: Vec<String> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .unwrap_or("")
                .starts_with("chorus_rollout_worker")
        })
        .filter_map(|l| span_field(l, "request_id"))
        .collect();
    assert!(!worker_requests.is_empty(), "{stderr}");
    let followed = worker_requests.iter().any(|id| {
        lines.iter().any(|l| {
            l["target"]
                .as_str()
                .unwrap_or("")
                .starts_with("chorus_orchestrator")
                && span_field(l, "request_id").as_ref() == Some(id)
        })
    });
    assert!(
        followed,
        "no request id is in both the worker's and the scheduler's spans"
    );
    // The progress lines carry their run and the step's numbers as fields.
    let step = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("step ")
        })
        .expect("a progress line");
    assert!(
        span_field(step, "run_id").is_some_and(|r| r.starts_with("logs-")),
        "{step}"
    );
    assert!(step["fields"]["loss"].is_number(), "{step}");

    // The default text format: the same progress as plain lines, nothing per request.
    let out = h.chorus(&["run", "run.toml", "--eval-tasks", "2"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("step ")).count(),
        2,
        "{text}"
    );
    assert!(
        !text.contains("request_id") && !text.contains('{'),
        "{text}"
    );
}

#[test]
fn slots_whose_every_attempt_fails_reach_the_real_learner_as_empty_groups_and_steps_complete() {
    // Every prompt is longer than max_prompt_tokens, so every attempt of every slot is dropped
    // and each slot hands the learner an empty group: the real learner service (not a stand-in)
    // must take them, skip the steps with nothing to train, and the run must finish.
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    let config = r#"
name = "empty"
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 16
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 4
max_prompt_tokens = 4
environments = [{ name = "arithmetic" }]
"#;
    std::fs::write(h.path("run.toml"), config).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    h.audit_clean(&h.ledger_url("empty"));
    let summary: serde_json::Value = h.json("runs/empty/summary.json");
    let run_id = summary["run"].as_str().unwrap().to_string();
    let steps = tokio::runtime::Runtime::new().unwrap().block_on(async {
        Ledger::open(&h.ledger_url("empty"))
            .await
            .unwrap()
            .list_learner_steps(&run_id)
            .await
            .unwrap()
    });
    let seen: Vec<(u64, u64, Option<String>)> = steps
        .iter()
        .map(|s| {
            (
                s.step.step,
                s.step.num_trajectories,
                s.step.skip_reason.clone(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (i, (step, trained, reason)) in seen.iter().enumerate() {
        assert_eq!((*step, *trained), (i as u64 + 1, 0), "{seen:?}");
        assert!(
            reason.as_deref().is_some_and(|r| r.contains("empty batch")),
            "{seen:?}"
        );
    }
}

#[test]
fn the_shared_token_is_never_logged_nor_written_to_the_runs_files() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let secret = "tok-3f9a1c-never-print-me";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "run",
            "run.toml",
            "--eval-tasks",
            "2",
            "--log-format",
            "json",
        ])
        .env("CHORUS_TOKEN", secret)
        .env("RUST_LOG", "debug")
        .current_dir(h.dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    // Debug logs of every service, with request spans, were written: the test looks at a lot.
    assert!(stderr.lines().count() > 50, "{stderr}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    // Nor any file the run left: summaries, configs, checkpoints, the ledger.
    let mut stack = vec![h.path("runs")];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds the token",
                path.display()
            );
        }
    }
    assert!(files > 5, "{files} files");
}
