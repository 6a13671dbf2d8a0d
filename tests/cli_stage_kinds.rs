//! Stage kinds beyond `sft` and `rlvr` in a run: a `reward_model` stage (a Bradley–Terry model
//! trained from the warmed-up policy on pairs drawn from verifiable environments and a user's
//! file, its held-out pair accuracy recorded before and after, its checkpoint loadable as a
//! policy, the policy itself left unchanged) and a `swe_rl` stage.

mod harness;

use chorus_orchestrator::ledger::{Ledger, StageStatus};
use harness::*;

const RUN: &str = r#"
name = "rm"
seed = 1
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 10
prompts_per_step = 16
lr = 2e-3
environments = [{ name = "arithmetic" }, { name = "needle" }, { name = "multi_hop" }]
[[stages]]
name = "judge"
kind = "reward_model"
steps = 80
prompts_per_step = 16
lr = 1e-3
pairs_from = ["arithmetic", "needle", "multi_hop"]
train_pairs = 128
heldout_pairs = 48
"#;

#[test]
fn a_bradley_terry_stage_learns_to_rank_held_out_pairs() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    // A user's preference rows, next to the environments' pairs.
    let rows: String = (0..60)
        .map(|n| {
            let (yes, no) = if n % 2 == 0 {
                ("yes", "no")
            } else {
                ("no", "yes")
            };
            format!(
                "{{\"prompt\": \"Is {n} even?\", \"chosen\": \"{yes}\", \"rejected\": \"{no}\"}}\n"
            )
        })
        .collect();
    std::fs::write(h.path("prefs.jsonl"), rows).unwrap();
    let run = RUN.replace(
        "train_pairs = 128",
        "train_pairs = 128\ndata = \"prefs.jsonl\"",
    );
    std::fs::write(h.path("run.toml"), run).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "4"]);
    h.audit_clean(&h.ledger_url("rm"));
    let stage: serde_json::Value = h.json("runs/rm/stages/judge/summary.json");
    assert_eq!(stage["kind"], "reward_model");
    assert_eq!(stage["metric"], "pair_accuracy");
    let (start, end) = (
        stage["start"].as_f64().unwrap(),
        stage["end"].as_f64().unwrap(),
    );
    assert!(
        end > start,
        "training improved the held-out pair accuracy: {stage}"
    );
    for env in ["arithmetic", "needle", "multi_hop", "data"] {
        assert!(stage["environments"][env].is_array(), "{stage}");
    }
    // The policy did not move: the stage began and ended at the warm-up's last version.
    assert_eq!(stage["first_version"], 10);
    assert_eq!(stage["last_version"], 10);
    let summary: serde_json::Value = h.json("runs/rm/summary.json");
    assert_eq!(summary["steps"], 10);
    // The reward model's checkpoint is a policy checkpoint plus its score head.
    let checkpoint = h.path("runs/rm/stages/judge/checkpoint");
    assert!(checkpoint.join("score_head.safetensors").is_file());
    let info = h.ok(&["model", "info", "--checkpoint", s(&checkpoint)]);
    assert!(info.contains("parameters"), "{info}");
    let db = h.ledger_url("rm");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let stages = ledger
            .list_stages(summary["run"].as_str().unwrap())
            .await
            .unwrap();
        let judge = &stages[1];
        assert_eq!(judge.stage.kind, "reward_model");
        assert_eq!(judge.status, StageStatus::Succeeded);
        assert_eq!(judge.stage.metric.as_deref(), Some("pair_accuracy"));
        assert_eq!(judge.metric_end, Some(end));
    });
}

#[test]
fn reward_model_settings_are_checked_before_the_run() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    let bad = RUN.replace(
        "pairs_from = [\"arithmetic\", \"needle\", \"multi_hop\"]",
        "",
    );
    std::fs::write(h.path("a.toml"), &bad).unwrap();
    let err = h.fails(&["run", "a.toml"]);
    assert!(
        err.contains("stages[1].pairs_from") && err.contains("needs pairs"),
        "{err}"
    );
    let multi = RUN.replace("\"multi_hop\"]\ntrain", "\"tool_agent\"]\ntrain");
    std::fs::write(h.path("b.toml"), &multi).unwrap();
    let err = h.fails(&["run", "b.toml"]);
    assert!(err.contains("`tool_agent` is multi-turn"), "{err}");
    let data = RUN.replace(
        "train_pairs = 128",
        "train_pairs = 128\ndata = \"prefs.jsonl\"",
    );
    std::fs::write(h.path("d.toml"), &data).unwrap();
    std::fs::write(
        h.path("prefs.jsonl"),
        "{\"prompt\": \"hi\", \"chosen\": \"a\"}\n",
    )
    .unwrap();
    let err = h.fails(&["run", "d.toml"]);
    assert!(
        err.contains("stages[1].data") && err.contains("line 1"),
        "{err}"
    );
}

const SWE_RUN: &str = r#"
name = "swe"
seed = 1
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{ name = "swe" }]
[[stages]]
name = "swe"
kind = "swe_rl"
steps = 2
prompts_per_step = 4
group_size = 4
max_turns = 3
max_new_tokens = 16
max_prompt_tokens = 2048
environments = [{ name = "swe" }]
"#;

#[test]
fn a_swe_rl_stage_plays_episodes_and_reports_its_pass_rate() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), SWE_RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    h.audit_clean(&h.ledger_url("swe"));
    let stage: serde_json::Value = h.json("runs/swe/stages/swe/summary.json");
    assert_eq!(stage["kind"], "swe_rl");
    assert_eq!(stage["metric"], "heldout_pass_rate");
    assert_eq!(stage["steps"], 2);
    assert!(stage["environments"]["swe"].is_array(), "{stage}");
    // A single-turn environment in a swe_rl stage is named before the run starts.
    let wrong = SWE_RUN.replace(
        "max_prompt_tokens = 2048\nenvironments = [{ name = \"swe\" }]",
        "max_prompt_tokens = 2048\nenvironments = [{ name = \"arithmetic\" }]",
    );
    std::fs::write(h.path("wrong.toml"), wrong).unwrap();
    let err = h.fails(&["run", "wrong.toml"]);
    assert!(
        err.contains("stages[1].environments[0]") && err.contains("single-turn"),
        "{err}"
    );
}

#[test]
fn an_rlhf_stage_is_rewarded_by_the_reward_model_and_keeps_its_verifiers() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    let run = RUN.replace("steps = 80", "steps = 20").to_string()
        + r#"
[[stages]]
name = "rlhf"
kind = "rlhf"
steps = 3
prompts_per_step = 4
group_size = 4
max_new_tokens = 4
length_coef_answer = 0.1
kl_coef = 0.05
kl_estimator = "k3"
environments = [{ name = "arithmetic" }, { name = "needle" }]
"#;
    std::fs::write(h.path("run.toml"), run).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "4"]);
    h.audit_clean(&h.ledger_url("rm"));
    let stage: serde_json::Value = h.json("runs/rm/stages/rlhf/summary.json");
    assert_eq!(stage["kind"], "rlhf");
    assert_eq!(stage["metric"], "heldout_rm_score");
    assert!(stage["start"].as_f64().is_some() && stage["end"].as_f64().is_some());
    // The verifiers' held-out accuracy, per environment, beside the reward-model score.
    for env in ["arithmetic@judge", "needle@judge"] {
        let pair = stage["environments"][env].as_array().expect("measured");
        assert!(
            pair.iter()
                .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap()))
        );
    }
    assert_eq!(stage["steps"], 3);
    let kl = stage["mean_kl"]
        .as_f64()
        .expect("an rl stage reports its mean KL");
    assert!(kl.is_finite() && kl >= 0.0, "{kl}");
    let summary: serde_json::Value = h.json("runs/rm/summary.json");
    let db = h.ledger_url("rm");
    // `inspect stages` prints the reward model's start (measured after the stage began) and
    // the rlhf stage's mean score as a score, not a percentage.
    let run_id = summary["run"].as_str().unwrap();
    let table = h.ok(&["inspect", "--db", &db, "stages", "--run", run_id]);
    let row = |name: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} row: {table}"));
        line.split_whitespace().map(String::from).collect()
    };
    let judge: serde_json::Value = h.json("runs/rm/stages/judge/summary.json");
    let judge_row = row("judge");
    assert_eq!(judge_row[4], "-", "no policy steps: {table}");
    assert_eq!(
        judge_row[6],
        format!("{:.1}%", 100.0 * judge["start"].as_f64().unwrap()),
        "{table}"
    );
    let rlhf_row = row("rlhf");
    assert_eq!(
        rlhf_row[6],
        format!("{:.3}", stage["start"].as_f64().unwrap()),
        "{table}"
    );
    assert_eq!(
        rlhf_row[7],
        format!("{:.3}", stage["end"].as_f64().unwrap()),
        "{table}"
    );
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let rows = ledger
            .list_rollouts(&chorus_orchestrator::ledger::RolloutFilter {
                run_id: Some(summary["run"].as_str().unwrap().into()),
                environment: Some("arithmetic@judge".into()),
                min_reward: None,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            !rows.is_empty(),
            "the rlhf stage's rollouts are recorded under the judged name"
        );
        let t = ledger
            .get_trajectory(&rows[0].id)
            .await
            .unwrap()
            .unwrap()
            .trajectory;
        assert!(
            t.reward_components.contains_key("verifier"),
            "{:?}",
            t.reward_components
        );
        assert!(t.reason.unwrap_or_default().starts_with("reward model"));
        // The KL to the stage's starting policy: 0 on its first step, then measured.
        let kl: Vec<f64> = ledger
            .list_learner_steps(summary["run"].as_str().unwrap())
            .await
            .unwrap()
            .iter()
            .filter(|s| s.stage_index == Some(2))
            .map(|s| s.step.kl.expect("a KL estimate"))
            .collect();
        assert_eq!(kl.len(), 3, "{kl:?}");
        assert_eq!(
            kl[0], 0.0,
            "the policy is its own reference at the stage's start"
        );
        assert!(kl[1..].iter().all(|k| k.is_finite() && *k >= 0.0), "{kl:?}");
    });
    // An rlhf stage needs an earlier reward model.
    let alone = RUN
        .split("[[stages]]\nname = \"judge\"")
        .next()
        .unwrap()
        .to_string()
        + "[[stages]]\nname = \"rlhf\"\nkind = \"rlhf\"\nsteps = 2\n\
           environments = [{ name = \"arithmetic\" }]\n";
    std::fs::write(h.path("alone.toml"), alone).unwrap();
    let err = h.fails(&["run", "alone.toml"]);
    assert!(
        err.contains("stages[1].reward_model") && err.contains("earlier ones: none"),
        "{err}"
    );
}

#[test]
fn an_rlhf_stage_ends_early_once_its_held_out_score_reaches_the_goal() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    // Any score is at least -1000: the first check, after one step, ends the stage.
    let run = RUN.replace("steps = 80", "steps = 10").to_string()
        + r#"
[[stages]]
name = "rlhf"
kind = "rlhf"
steps = 6
prompts_per_step = 4
group_size = 4
max_new_tokens = 4
until = { metric = "heldout_rm_score", at_least = -1000.0, every = 1 }
environments = [{ name = "arithmetic" }]
"#;
    std::fs::write(h.path("run.toml"), run).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "4"]);
    h.audit_clean(&h.ledger_url("rm"));
    let stage: serde_json::Value = h.json("runs/rm/stages/rlhf/summary.json");
    assert_eq!(stage["steps"], 1, "{stage}");
    assert_eq!(stage["planned_steps"], 6);
    assert_eq!(stage["reached_goal"], true);
    // A goal on a metric the stage does not measure is refused, naming the one it does.
    let wrong = RUN.replace("steps = 80", "steps = 10").to_string()
        + "[[stages]]\nname = \"rlhf\"\nkind = \"rlhf\"\nsteps = 2\n\
           until = { metric = \"heldout_accuracy\", at_least = 0.5 }\n\
           environments = [{ name = \"arithmetic\" }]\n";
    std::fs::write(h.path("wrong.toml"), wrong).unwrap();
    let err = h.fails(&["run", "wrong.toml"]);
    assert!(
        err.contains("stages[2].until.metric") && err.contains("heldout_rm_score"),
        "{err}"
    );
}
