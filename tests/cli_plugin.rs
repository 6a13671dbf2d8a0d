//! Plugin environments in real runs: `chorus run` on a config mixing a built-in with a plugin
//! server — a built-in served by `chorus serve environment`, and the Python SDK's example
//! plugin as a Python process — records the plugin's trajectories in the ledger and evaluates
//! it in the summary; a wrong or missing token stops the run with the plugin's address named.
//!
//! The Python test needs `CHORUS_TEST_PYTHON`: a Python with `pip install ./environments/python`
//! done (`.ci/run` makes one). Without it the test says it was skipped and why.

mod harness;

use std::io::BufRead;
use std::process::{Command, Stdio};

use chorus_orchestrator::ledger::{Ledger, RolloutFilter, TrajectoryStatus};
use harness::*;

const MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 32,
  "hybrid_override_pattern": "M*-", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32}"#;

const TOKEN: &str = "plugin-run-token";

fn run_config(url: &str) -> String {
    format!(
        r#"
name = "plug"
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 16
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{{ name = "arithmetic" }}, {{ url = "{url}", weight = 3.0 }}]
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 4
group_size = 2
max_new_tokens = 4
environments = [{{ name = "arithmetic" }}, {{ url = "{url}", weight = 3.0 }}]
"#
    )
}

/// Runs the tiny config against the plugin at `url` and checks that the plugin's trajectories
/// were trained on (warm-up references and RL samples) and it was evaluated.
fn run_against(h: &Harness, url: &str) {
    std::fs::write(h.path("model.json"), MODEL).unwrap();
    std::fs::write(h.path("run.toml"), run_config(url)).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2", "--token", TOKEN]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(h.path("runs/plug/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 4, "{summary}");
    for env in ["arithmetic", url] {
        assert_eq!(summary["environments"][env]["heldout_n"], 2, "{summary}");
    }
    let run_id = summary["run"].as_str().unwrap().to_string();
    let db = format!("sqlite://{}", h.path("runs/plug/ledger.sqlite").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                environment: Some(url.to_string()),
                min_reward: None,
                limit: 10_000,
            })
            .await
            .unwrap()
    });
    let consumed: Vec<_> = rows
        .iter()
        .filter(|r| r.consumed_at_step.is_some())
        .collect();
    assert!(
        consumed.iter().any(|r| r.worker_id == "reference"),
        "no warm-up trajectory from the plugin: {rows:#?}"
    );
    assert!(
        consumed.iter().any(|r| r.worker_id != "reference"),
        "no RL trajectory from the plugin: {rows:#?}"
    );
    for r in consumed {
        assert_eq!(r.environment, url);
        assert!(
            r.reward.is_some() && matches!(r.status, TrajectoryStatus::Ok),
            "{r:?}"
        );
    }
}

#[test]
fn a_run_uses_a_builtin_served_as_a_plugin() {
    let h = Harness::new();
    let plugin = h.service(&[
        "serve",
        "environment",
        "countdown",
        "--listen",
        "127.0.0.1:0",
        "--token",
        TOKEN,
    ]);
    run_against(&h, &plugin.url);
}

#[test]
fn a_run_uses_the_python_example_plugin() {
    let Some(python) = python_with_sdk() else {
        return;
    };
    let h = Harness::new();
    let mut child = Command::new(&python)
        .args([
            "-m",
            "chorus_env.examples.word_count",
            "--port",
            "0",
            "--token",
            TOKEN,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python plugin");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the plugin printed {line:?} instead of `listening on URL`"))
        .to_string();
    let plugin = Service { child, url };
    run_against(&h, &plugin.url);

    // The wrong token is refused by the plugin; no token at all is refused before starting.
    std::fs::write(h.path("run.toml"), run_config(&plugin.url)).unwrap();
    let err = h.fails(&["run", "run.toml", "--eval-tasks", "2", "--token", "wrong"]);
    assert!(
        err.contains(&plugin.url) && err.contains("refused the token"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["run", "run.toml"])
        .current_dir(h.dir.path())
        .env_remove("CHORUS_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&plugin.url) && err.contains("--token"),
        "{err}"
    );
}

/// `CHORUS_TEST_PYTHON` when it can import the SDK; otherwise says why the test is skipped.
fn python_with_sdk() -> Option<String> {
    let Ok(python) = std::env::var("CHORUS_TEST_PYTHON") else {
        println!(
            "skipped: CHORUS_TEST_PYTHON is not set (point it at a Python with \
             `pip install ./environments/python` done, as .ci/run does)"
        );
        return None;
    };
    match Command::new(&python)
        .args(["-c", "import grpc, chorus_env"])
        .output()
    {
        Ok(out) if out.status.success() => Some(python),
        Ok(out) => {
            println!(
                "skipped: {python} cannot import grpc and chorus_env (run `{python} -m pip install ./environments/python`): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            println!("skipped: CHORUS_TEST_PYTHON={python} cannot be run: {e}");
            None
        }
    }
}
