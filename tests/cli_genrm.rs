//! A `reward_model` stage with `rm = "genrm"` in a run: a generative judge trained with RL from
//! the warmed-up policy on pairs from a verifiable environment and a user's file, its held-out
//! pair accuracy recorded before and after, its checkpoint loadable by `chorus generate`, the
//! policy itself left unchanged; then an `rlhf` stage whose groups it judges by comparing their
//! completions (`comparisons = "all_pairs"`).

mod harness;

use chorus_orchestrator::ledger::{Ledger, RolloutFilter, StageStatus};
use harness::*;

const RUN: &str = r#"
name = "genrm"
seed = 1
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 8
lr = 2e-3
environments = [{ name = "arithmetic" }]
[[stages]]
name = "judge"
kind = "reward_model"
rm = "genrm"
steps = 3
prompts_per_step = 3
group_size = 3
max_new_tokens = 6
lr = 1e-3
pairs_from = ["arithmetic"]
train_pairs = 12
heldout_pairs = 6
data = "prefs.jsonl"
[[stages]]
name = "rlhf"
kind = "rlhf"
steps = 2
prompts_per_step = 2
group_size = 4
max_new_tokens = 4
drop_zero_variance = false
comparisons = "all_pairs"
environments = [{ name = "arithmetic" }]
"#;

/// A user's preference rows: 40 distinct prompts, so some land in heldout.
fn preference_rows() -> String {
    (0..40)
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
        .collect()
}

#[test]
fn a_genrm_stage_trains_a_judge_and_an_rlhf_stage_compares_groups_with_it() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("prefs.jsonl"), preference_rows()).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    h.audit_clean(&h.ledger_url("genrm"));
    let judge = h.json("runs/genrm/stages/judge/summary.json");
    assert_eq!(judge["kind"], "reward_model");
    assert_eq!(judge["metric"], "pair_accuracy");
    for at in ["start", "end"] {
        let accuracy = judge[at].as_f64().expect("measured");
        assert!((0.0..=1.0).contains(&accuracy), "{at}: {judge}");
    }
    for source in ["arithmetic", "data"] {
        assert!(judge["environments"][source].is_array(), "{judge}");
    }
    assert_eq!(judge["steps"], 3);
    // The policy did not move: the stage began and ended at the warm-up's last version, and
    // the rlhf stage starts there.
    assert_eq!(judge["first_version"], 3);
    assert_eq!(judge["last_version"], 3);
    // The judge is a policy checkpoint with its tokenizer (no score head), and generates.
    let checkpoint = h.path("runs/genrm/stages/judge/checkpoint");
    assert!(!checkpoint.join("score_head.safetensors").exists());
    let out = h.ok(&[
        "generate",
        "--checkpoint",
        s(&checkpoint),
        "--prompt",
        "Response 1: yes",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert!(out.contains("\"tokens\""), "{out}");

    let rlhf = h.json("runs/genrm/stages/rlhf/summary.json");
    assert_eq!(rlhf["kind"], "rlhf");
    assert_eq!(rlhf["metric"], "heldout_rm_score");
    assert_eq!(rlhf["first_version"], 3);
    assert_eq!(rlhf["steps"], 2);
    // The GenRM's mean helpfulness of held-out answers next to the references: 1 to 5, or a
    // tie-break away from it.
    for at in ["start", "end"] {
        let score = rlhf[at].as_f64().expect("measured");
        assert!((-1.5..=7.5).contains(&score), "{at}: {rlhf}");
    }
    let accuracy = rlhf["environments"]["arithmetic@judge"]
        .as_array()
        .expect("the verifier's held-out accuracy is measured");
    assert!(
        accuracy
            .iter()
            .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap()))
    );

    let summary = h.json("runs/genrm/summary.json");
    let run = summary["run"].as_str().unwrap().to_string();
    let db = h.ledger_url("genrm");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let stages = ledger.list_stages(&run).await.unwrap();
        assert_eq!(stages[1].stage.kind, "reward_model");
        assert_eq!(stages[1].status, StageStatus::Succeeded);
        assert_eq!(stages[1].metric_end, judge["end"].as_f64());
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run.clone()),
                environment: Some("arithmetic@judge".into()),
                min_reward: None,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        // Two steps of two groups of four, every rollout recorded.
        assert!(rows.len() >= 16, "{} rollouts", rows.len());
        for row in &rows {
            let t = ledger
                .get_trajectory(&row.id)
                .await
                .unwrap()
                .unwrap()
                .trajectory;
            let reason = t.reason.clone().unwrap_or_default();
            assert!(
                reason.starts_with("genrm") && reason.contains("from 6 comparisons"),
                "all_pairs judges each group of four on its six pairs (circular: four): {reason}"
            );
            for component in ["verifier", "verified", "vs_reference"] {
                assert!(
                    t.reward_components.contains_key(component),
                    "{component}: {:?}",
                    t.reward_components
                );
            }
        }
    });
}

#[test]
fn comparisons_are_only_for_rlhf_stages_judged_by_a_genrm() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("prefs.jsonl"), preference_rows()).unwrap();
    let bradley_terry = RUN.replace("rm = \"genrm\"\n", "");
    std::fs::write(h.path("bt.toml"), bradley_terry).unwrap();
    let err = h.fails(&["run", "bt.toml"]);
    assert!(
        err.contains("stages[2].comparisons") && err.contains("rm = \"genrm\""),
        "{err}"
    );
    let unknown = RUN.replace("\"all_pairs\"", "\"round_robin\"");
    std::fs::write(h.path("unknown.toml"), unknown).unwrap();
    let err = h.fails(&["run", "unknown.toml"]);
    assert!(err.contains("allowed: circular, all_pairs"), "{err}");
}
