//! An `mtp_heal` stage in a run: after a warm-up and an RL stage, the MTP head alone is trained
//! on the run's own rollouts read back from the ledger; its speculative acceptance rate on
//! held-out prompts is measured before and after, the backbone stays bit for bit, and the
//! stage's mistakes are named before the run starts.

mod harness;

use std::collections::BTreeMap;

use chorus_orchestrator::ledger::{Ledger, StageStatus};
use harness::*;

/// The tiny test policy with an MTP head (attention + MLP).
fn model_with_head() -> String {
    TINY_DENSE_MODEL.replace(
        "\"eos_token_id\": 2}",
        "\"eos_token_id\": 2, \"num_nextn_predict_layers\": 1, \
         \"mtp_layers_block_type\": [\"full_attention\", \"mlp\"]}",
    )
}

const RUN: &str = r#"
name = "heal"
seed = 3
[model]
init_config = "model.json"
[workers]
count = 1
[[stages]]
name = "warmup"
kind = "sft"
steps = 40
prompts_per_step = 8
lr = 5e-3
data = "chats.jsonl"
[[stages]]
name = "rl"
kind = "rlvr"
steps = 4
prompts_per_step = 4
group_size = 4
max_new_tokens = 24
environments = [{ name = "arithmetic" }]
[[stages]]
name = "heal"
kind = "mtp_heal"
steps = 30
prompts_per_step = 8
lr = 1e-2
max_new_tokens = 24
environments = [{ name = "arithmetic" }]
"#;

/// Transcripts whose answers repeat a pattern: the warmed-up policy writes long, predictable
/// completions, so its acceptance is measured on many drafts.
fn transcripts() -> String {
    (0..64)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {} + {}?", i % 7 + 2, i % 11 + 1)},
                {"role": "assistant", "content": "abcd".repeat(8)},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// The tensors of a checkpoint's `model.safetensors`, as raw bytes by name (read with the
/// `safetensors` crate, not the code under test).
fn tensors(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

#[test]
fn an_mtp_heal_stage_trains_the_head_alone_and_raises_its_acceptance() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), model_with_head()).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    std::fs::write(h.path("chats.jsonl"), transcripts()).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "6"]);
    h.audit_clean(&h.ledger_url("heal"));
    let stage: serde_json::Value = h.json("runs/heal/stages/heal/summary.json");
    assert_eq!(stage["kind"], "mtp_heal");
    assert_eq!(stage["metric"], "heldout_mtp_acceptance");
    assert_eq!(stage["steps"], 30);
    let (start, end) = (
        stage["start"].as_f64().unwrap(),
        stage["end"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&start) && (0.0..=1.0).contains(&end));
    // The head never trained before: it drafts what a random head drafts. Healed on the
    // policy's own completions, it drafts most of what the policy then writes.
    assert!(
        start < 0.2 && end > 0.6,
        "healing raises the acceptance rate: {start} -> {end}"
    );
    assert!(stage["environments"]["arithmetic"].is_array(), "{stage}");
    assert_eq!(stage["trajectories"], 30 * 8);

    // The backbone, embeddings and lm_head are the RL stage's, bit for bit; the head moved.
    let rl = tensors(&h.path("runs/heal/stages/rl/checkpoint"));
    let healed = tensors(&h.path("runs/heal/stages/heal/checkpoint"));
    assert_eq!(
        rl.keys().collect::<Vec<_>>(),
        healed.keys().collect::<Vec<_>>()
    );
    let mut moved = 0;
    for (name, bytes) in &rl {
        if name.starts_with("mtp.") {
            moved += usize::from(healed[name] != *bytes);
        } else {
            assert_eq!(&healed[name], bytes, "{name} changed in the mtp_heal stage");
        }
    }
    assert!(moved > 0, "the MTP head did not move");

    let summary: serde_json::Value = h.json("runs/heal/summary.json");
    let db = h.ledger_url("heal");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let stages = ledger
            .list_stages(summary["run"].as_str().unwrap())
            .await
            .unwrap();
        let row = &stages[2];
        assert_eq!(row.stage.kind, "mtp_heal");
        assert_eq!(row.status, StageStatus::Succeeded);
        assert_eq!(row.stage.metric.as_deref(), Some("heldout_mtp_acceptance"));
        assert_eq!(row.stage.metric_start, Some(start));
        assert_eq!(row.metric_end, Some(end));
        assert_eq!(row.last_step, Some(40 + 4 + 30));
    });
}

#[test]
fn mtp_heal_mistakes_are_named_before_the_run() {
    let h = Harness::new();
    std::fs::write(h.path("chats.jsonl"), transcripts()).unwrap();
    // A policy without an MTP head has nothing to heal.
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let err = h.fails(&["run", "run.toml"]);
    assert!(
        err.contains("stages[2] (heal)") && err.contains("num_nextn_predict_layers = 0"),
        "{err}"
    );
    // Without an RL stage before it there are no rollouts to learn from.
    std::fs::write(h.path("model.json"), model_with_head()).unwrap();
    let no_rl = RUN.replace("kind = \"rlvr\"", "kind = \"sft\"");
    std::fs::write(h.path("no_rl.toml"), no_rl).unwrap();
    let err = h.fails(&["run", "no_rl.toml"]);
    assert!(
        err.contains("stages[2] (heal)") && err.contains("no stage before it samples"),
        "{err}"
    );
    // Its loss is its own, and its data is the ledger's.
    for (key, line) in [
        ("algorithm", "algorithm = \"grpo\"\n"),
        ("data", "data = \"chats.jsonl\"\n"),
    ] {
        let bad = RUN.replace(
            "kind = \"mtp_heal\"\n",
            &format!("kind = \"mtp_heal\"\n{line}"),
        );
        std::fs::write(h.path("bad.toml"), bad).unwrap();
        let err = h.fails(&["run", "bad.toml"]);
        assert!(err.contains(&format!("stages[2].{key}")), "{err}");
    }
}
