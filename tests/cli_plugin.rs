//! Plugin environments in real runs: `chorus run` on a config mixing a built-in with a plugin
//! server — a built-in served by `chorus serve environment`, and the Python SDK's example
//! plugin as a Python process — records the plugin's trajectories in the ledger and evaluates
//! it in the summary; a wrong or missing token stops the run with the plugin's address named.
//!
//! The Python plugins also pass Chorus' self-check through the wire, single- and multi-turn.
//! (Runs against NeMo Gym resources servers are in `nemo_gym_real.rs`, against real servers.)
//!
//! The Python tests need `CHORUS_TEST_PYTHON`: a Python with `pip install ./environments/python`
//! done (`.ci/run` makes one). Without it the test says it was skipped and why.

mod harness;

use std::process::{Command, Stdio};

use chorus_environments::plugin::RemoteEnvironment;
use chorus_environments::{CheckOptions, Environment, Split, check_environment};
use chorus_orchestrator::ledger::{Ledger, RolloutFilter, TrajectoryStatus};
use harness::*;

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
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), run_config(url)).unwrap();
    // The services' token differs from the plugin's: the plugin gets only its own.
    h.ok(&[
        "run",
        "run.toml",
        "--eval-tasks",
        "2",
        "--token",
        "the-services-token",
        "--plugin-token",
        TOKEN,
    ]);
    h.audit_clean(&h.ledger_url("plug"));
    let summary: serde_json::Value = h.json("runs/plug/summary.json");
    assert_eq!(summary["steps"], 4, "{summary}");
    for env in ["arithmetic", url] {
        assert_eq!(summary["environments"][env]["heldout_n"], 2, "{summary}");
    }
    let run_id = summary["run"].as_str().unwrap().to_string();
    let db = h.ledger_url("plug");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                environment: Some(url.to_string()),
                min_reward: None,
                limit: 10_000,
                ..Default::default()
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
    // The self-check runs through the wire too.
    let out = h.ok(&[
        "env",
        "check",
        "--url",
        &plugin.url,
        "--token",
        TOKEN,
        "--tasks",
        "2",
    ]);
    assert!(
        out.starts_with(&plugin.url) && out.contains(" ok "),
        "{out}"
    );
    let err = h.fails(&["env", "check", "--url", &plugin.url, "--token", "wrong"]);
    assert!(err.contains("refused the token"), "{err}");

    // A run the plugin turns away stops, and its ledger row says it failed.
    let err = h.fails(&[
        "run",
        "run.toml",
        "--eval-tasks",
        "2",
        "--plugin-token",
        "wrong",
    ]);
    assert!(err.contains("refused the token"), "{err}");
    // The services' token is never offered to the plugin in its place.
    let err = h.fails(&["run", "run.toml", "--eval-tasks", "2", "--token", TOKEN]);
    assert!(err.contains("--plugin-token"), "{err}");
    let runs = h.ok(&["inspect", "runs"]);
    let newest = runs.lines().nth(1).unwrap_or_default();
    assert!(newest.contains(" failed "), "{runs}");
}

#[test]
fn a_run_uses_the_python_example_plugin() {
    let Some(python) = python_with_sdk() else {
        return;
    };
    let h = Harness::new();
    let plugin = python_plugin(&python, "word_count", &["--token", TOKEN], None);
    run_against(&h, &plugin.url);

    // The wrong token is refused by the plugin; no token at all is refused before starting.
    std::fs::write(h.path("run.toml"), run_config(&plugin.url)).unwrap();
    let err = h.fails(&[
        "run",
        "run.toml",
        "--eval-tasks",
        "2",
        "--plugin-token",
        "wrong",
    ]);
    assert!(
        err.contains(&plugin.url) && err.contains("refused the token"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["run", "run.toml"])
        .current_dir(h.dir.path())
        .env_remove("CHORUS_TOKEN")
        .env_remove("CHORUS_PLUGIN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&plugin.url) && err.contains("--plugin-token"),
        "{err}"
    );
}

#[test]
fn python_plugins_pass_the_self_check_through_the_wire() {
    let Some(python) = python_with_sdk() else {
        return;
    };
    for example in ["word_count", "guess_number"] {
        let plugin = python_plugin(&python, example, &["--token", TOKEN], None);
        let env = RemoteEnvironment::connect(&plugin.url, TOKEN).unwrap();
        assert_eq!(env.plugin_info().name, example);
        let report = check_environment(
            &env,
            &CheckOptions {
                tasks_per_split: 3,
                ..CheckOptions::default()
            },
        );
        assert!(report.passed, "{example}: {:#?}", report.failures);
    }
    // A multi-turn episode: the client keeps the conversation, the plugin its state.
    let plugin = python_plugin(&python, "guess_number", &["--token", TOKEN], None);
    let env = RemoteEnvironment::connect(&plugin.url, TOKEN).unwrap();
    assert_eq!(env.info().max_turns, 6);
    let task = env.sample(3, Split::Train, 2).unwrap();
    let mut episode = env.start(&task).unwrap();
    let mut hints = Vec::new();
    let score = loop {
        let action = env.reference_action(&task, &episode).unwrap();
        let outcome = env.step(&task, &mut episode, &action).unwrap();
        if let Some(score) = outcome.score {
            break score;
        }
        hints.push(outcome.observation.unwrap().content);
    };
    assert!(score.is_full(), "{score:?}");
    assert!(
        !hints.is_empty() && hints.iter().all(|h| h == "higher" || h == "lower"),
        "{hints:?}"
    );
    assert_eq!(episode.messages.len(), 1 + 2 * hints.len() + 1);
    assert_eq!(episode.turn as usize, hints.len() + 1);
    // A wrong first guess gets a hint, not a score.
    let mut episode = env.start(&task).unwrap();
    let secret = env.reference(&task).unwrap();
    let wrong = if secret == "1" { "2" } else { "1" };
    let outcome = env.step(&task, &mut episode, wrong).unwrap();
    assert!(!outcome.done && outcome.score.is_none(), "{outcome:?}");
}

/// `CHORUS_TEST_PYTHON` when it can import the SDK.
fn python_with_sdk() -> Option<String> {
    python_importing(
        "CHORUS_TEST_PYTHON",
        "grpc, chorus_env",
        "a Python with `pip install ./environments/python` done, as .ci/run does",
        Missing::Skips,
    )
}

#[test]
fn a_plugin_killed_mid_run_is_paused_and_used_again_once_it_is_back() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    let plugin_args = |listen: &str| {
        vec![
            "serve".to_string(),
            "environment".into(),
            "countdown".into(),
            "--listen".into(),
            listen.to_string(),
            "--token".into(),
            TOKEN.into(),
        ]
    };
    let plugin = h.service(
        &plugin_args("127.0.0.1:0")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let url = plugin.url.clone();
    let config = format!(
        r#"
name = "revive"
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 16
[environment_faults]
error_budget = 2
probe_seconds = 0.5
[[stages]]
name = "rl"
kind = "rl"
steps = 30
prompts_per_step = 4
group_size = 2
max_new_tokens = 4
drop_zero_variance = false
environments = [{{ url = "{url}" }}]
"#
    );
    // The plugin is the stage's only environment: while it is down every slot fails and the
    // paused environment is probed every 0.5 s, so the stage cannot outrun the restart; the run
    // finishes only through the plugin that came back.
    std::fs::write(h.path("run.toml"), config).unwrap();
    let mut run = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "run",
            "run.toml",
            "--eval-tasks",
            "2",
            "--plugin-token",
            TOKEN,
        ])
        .current_dir(h.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = h.ledger_url("revive");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plugin_rows = |ledger: &Ledger| {
        rt.block_on(ledger.list_rollouts(&RolloutFilter {
            run_id: None,
            environment: Some(url.clone()),
            min_reward: None,
            limit: 100_000,
            ..Default::default()
        }))
        .unwrap()
    };
    // The ledger exists once the run has started.
    assert!(eventually(300, || h
        .path("runs/revive/ledger.sqlite")
        .exists()));
    let ledger = rt.block_on(Ledger::open(&db)).unwrap();
    // Killed (SIGKILL) once the run has used it, then started again at the same address.
    assert!(
        eventually(300, || plugin_rows(&ledger)
            .iter()
            .any(|r| matches!(r.status, TrajectoryStatus::Ok))),
        "the plugin was never used"
    );
    drop(plugin);
    let killed_at = plugin_rows(&ledger).len();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let address = url.trim_start_matches("http://").to_string();
    let _back = h.service(
        &plugin_args(&address)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let status = run.wait().unwrap();
    assert!(
        status.success(),
        "the run failed after the plugin came back"
    );
    h.audit_clean(&db);

    let summary = h.json("runs/revive/summary.json");
    let faults = &summary["environment_faults"][url.as_str()];
    assert!(faults["faults"].as_u64() >= Some(2), "{summary}");
    assert!(faults["resumed"].as_u64() >= Some(1), "{summary}");
    assert_eq!(faults["paused"], false, "{summary}");
    // Scored trajectories of the plugin's environment after it came back.
    let rows = plugin_rows(&ledger);
    let after: Vec<_> = rows[..rows.len() - killed_at]
        .iter()
        .filter(|r| matches!(r.status, TrajectoryStatus::Ok) && r.consumed_at_step.is_some())
        .collect();
    assert!(
        !after.is_empty(),
        "no trajectory of the plugin after it came back"
    );
}

/// Each plugin may check a token of its own: an entry's `token_env` names the variable that
/// holds it (the config never holds the secret); entries without one get `--plugin-token`. A
/// variable that is not set, or holds a token the plugin refuses, stops the run naming the entry.
#[test]
fn each_plugin_checks_its_own_token() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    let serve = |env: &str, token: &str| {
        h.service(&[
            "serve",
            "environment",
            env,
            "--listen",
            "127.0.0.1:0",
            "--token",
            token,
        ])
    };
    let own = serve("countdown", "countdown-token");
    let shared = serve("arithmetic", TOKEN);
    let entries = format!(
        r#"[{{ url = "{}", token_env = "COUNTDOWN_PLUGIN_TOKEN" }}, {{ url = "{}" }}]"#,
        own.url, shared.url
    );
    std::fs::write(
        h.path("run.toml"),
        format!(
            r#"
name = "tokens"
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 1
prompts_per_step = 4
environments = {entries}
[[stages]]
name = "rl"
kind = "rl"
steps = 1
prompts_per_step = 4
group_size = 2
max_new_tokens = 4
environments = {entries}
"#
        ),
    )
    .unwrap();
    let run = |countdown_token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
        cmd.args(["run", "run.toml", "--eval-tasks", "1"])
            .args(["--plugin-token", TOKEN])
            .env_remove("COUNTDOWN_PLUGIN_TOKEN")
            .current_dir(h.path(""));
        if let Some(t) = countdown_token {
            cmd.env("COUNTDOWN_PLUGIN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = run(Some("countdown-token"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = h.json("runs/tokens/summary.json");
    for url in [&own.url, &shared.url] {
        assert_eq!(summary["environments"][url]["heldout_n"], 1, "{summary}");
    }
    h.audit_clean(&h.ledger_url("tokens"));

    let out = run(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("stages[0].environments[0].token_env")
            && err.contains("COUNTDOWN_PLUGIN_TOKEN")
            && err.contains("not set"),
        "{err}"
    );
    let out = run(Some(TOKEN));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&own.url) && err.contains("refused the token"),
        "{err}"
    );
}
