//! `chorus run --resume` after a `kill -9` of the whole run mid-stage: the finished stage is not
//! repeated, the running one continues from the learner's last checkpoint, and the ledger shows
//! no prompt slot consumed twice.

mod harness;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use chorus_orchestrator::ledger::{Ledger, RolloutFilter, StageStatus};
use harness::*;

const WARMUP_STEPS: u64 = 4;
const RL_STEPS: u64 = 60;
const PROMPTS_PER_STEP: usize = 4;

fn config() -> String {
    format!(
        r#"
name = "crash"
seed = 5
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 16
[learner]
checkpoint_every = 3
[[stages]]
name = "warmup"
kind = "sft"
steps = {WARMUP_STEPS}
prompts_per_step = {PROMPTS_PER_STEP}
environments = [{{ name = "arithmetic" }}]
[[stages]]
name = "rl"
kind = "rlvr"
steps = {RL_STEPS}
prompts_per_step = {PROMPTS_PER_STEP}
group_size = 4
max_new_tokens = 4
environments = [{{ name = "arithmetic" }}]
"#
    )
}

/// The newest learner checkpoint's version, if any.
fn newest_checkpoint(h: &Harness) -> Option<u64> {
    std::fs::read_dir(h.path("runs/crash/learner-checkpoints"))
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_prefix("version-")?.parse::<u64>().ok()
        })
        .max()
}

#[test]
fn a_run_killed_mid_stage_resumes_without_repeating_work() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), config()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["run", "run.toml", "--eval-tasks", "4"])
        .current_dir(h.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the RL stage is a few checkpoints in (where exactly does not matter).
    let in_rl = eventually(600, || {
        newest_checkpoint(&h).is_some_and(|v| v >= WARMUP_STEPS + 6)
            || child.try_wait().unwrap().is_some()
    });
    assert!(in_rl, "the run never reached its RL stage's checkpoints");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before it could be killed; give it more RL steps"
    );
    child.kill().unwrap(); // SIGKILL: no cleanup of any kind.
    child.wait().unwrap();
    let newest_at_kill = newest_checkpoint(&h).expect("a checkpoint before the kill");
    let warmup_summary = std::fs::read_to_string(h.path("runs/crash/stages/warmup/summary.json"))
        .expect("the warm-up finished before the kill");

    h.ok(&["run", "run.toml", "--eval-tasks", "4", "--resume"]);
    h.audit_clean(&h.ledger_url("crash"));

    let summary: serde_json::Value = h.json("runs/crash/summary.json");
    assert_eq!(summary["steps"], WARMUP_STEPS + RL_STEPS, "{summary}");
    assert_eq!(summary["stages"][1]["steps"], RL_STEPS);
    assert_eq!(
        std::fs::read_to_string(h.path("runs/crash/stages/warmup/summary.json")).unwrap(),
        warmup_summary,
        "the finished warm-up was not run again"
    );
    let run_id = summary["run"].as_str().unwrap().to_string();
    let db = h.ledger_url("crash");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let runs = ledger.list_runs(10).await.unwrap();
        assert_eq!(runs.len(), 1, "the resumed run is the same run");
        let stages = ledger.list_stages(&run_id).await.unwrap();
        assert_eq!(stages.len(), 2);
        assert!(stages.iter().all(|s| s.status == StageStatus::Succeeded));
        let events = ledger.list_events(&run_id, 0, 10_000).await.unwrap();
        let resumes: Vec<_> = events.iter().filter(|e| e.kind == "resumed").collect();
        assert_eq!(resumes.len(), 1);
        let payload: serde_json::Value = serde_json::from_str(&resumes[0].payload_json).unwrap();
        let version = payload["version"].as_u64().unwrap();
        // The newest checkpoint, or the one before it when the kill came after the newest was
        // saved but before the ledger recorded its step (checkpoint_every = 3).
        assert!(
            version == newest_at_kill || version + 3 == newest_at_kill,
            "resumed from {payload}; the newest checkpoint was {newest_at_kill}"
        );
        // Every learner step exactly once, none lost to the crash.
        let steps: Vec<u64> = ledger
            .list_learner_steps(&run_id)
            .await
            .unwrap()
            .iter()
            .map(|s| s.step.step)
            .collect();
        let expected: Vec<u64> = (1..=WARMUP_STEPS + RL_STEPS).collect();
        assert_eq!(steps, expected);
        // No prompt slot (stage, step, slot) consumed twice, and consumption matches the steps.
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some(run_id.clone()),
                environment: None,
                min_reward: None,
                limit: 100_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut slots: BTreeMap<(String, String, String), String> = BTreeMap::new();
        let mut consumed = 0u64;
        for r in rows.iter().filter(|r| r.consumed_at_step.is_some()) {
            consumed += 1;
            // `run:s<stage>:<step>:<slot>[:a<attempt>][:x<restart>]`
            let parts: Vec<&str> = r.group_id.split(':').collect();
            let slot = (parts[1].into(), parts[2].into(), parts[3].into());
            let group = slots.entry(slot).or_insert_with(|| r.group_id.clone());
            assert_eq!(*group, r.group_id, "a prompt slot consumed by two groups");
            assert!(r.consumed_at_step.unwrap() < WARMUP_STEPS + RL_STEPS);
        }
        assert_eq!(consumed, summary["trajectories"].as_u64().unwrap());
        assert!(
            slots.len() <= ((WARMUP_STEPS + RL_STEPS) as usize) * PROMPTS_PER_STEP,
            "{} slots",
            slots.len()
        );
        // The steps repeated after the resume carry the restart in their ids.
        assert!(slots.values().any(|g| g.ends_with(":x1")), "{slots:?}");
    });
}

#[test]
fn a_recipe_starts_part_way_from_a_checkpoint_a_user_brings() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_DENSE_MODEL).unwrap();
    let short = config()
        .replace(&format!("steps = {RL_STEPS}"), "steps = 2")
        .replace(&format!("steps = {WARMUP_STEPS}"), "steps = 2");
    std::fs::write(h.path("run.toml"), &short).unwrap();
    h.ok(&["run", "run.toml", "--eval-tasks", "2"]);
    h.audit_clean(&h.ledger_url("crash"));
    let checkpoint = h.path("runs/crash/stages/warmup/checkpoint");
    let part = short
        .replace("\"crash\"", "\"part\"")
        .replace("max_new_tokens = 4", "max_new_tokens = 4\nlr = 1e-9");
    std::fs::write(h.path("part.toml"), part).unwrap();

    let err = h.fails(&["run", "part.toml", "--from-stage", "sft"]);
    assert!(
        err.contains("--from-stage `sft`") && err.contains("its stages: warmup, rl"),
        "{err}"
    );
    let err = h.fails(&["run", "part.toml", "--checkpoint", "nowhere"]);
    assert!(
        err.contains("--checkpoint nowhere: not a policy checkpoint"),
        "{err}"
    );

    h.ok(&[
        "run",
        "part.toml",
        "--eval-tasks",
        "2",
        "--from-stage",
        "rl",
        "--checkpoint",
        s(&checkpoint),
    ]);
    let summary: serde_json::Value = h.json("runs/part/summary.json");
    let stages = summary["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1, "{summary}");
    assert_eq!(stages[0]["name"], "rl");
    assert_eq!(summary["steps"], 2);
    assert!(!h.path("runs/part/stages/warmup").exists());
    // The rl stage started from the brought policy: with a learning rate of 1e-9 its final
    // weights are the brought ones, not the config's initialisation.
    let load = |dir: &std::path::Path| {
        chorus_model::checkpoint::load_checkpoint(dir, &candle_core::Device::Cpu)
            .unwrap()
            .1
            .vars()
            .clone()
    };
    let brought = load(&checkpoint);
    let ended = load(&h.path("runs/part/stages/rl/checkpoint"));
    let name = "backbone.embeddings.weight";
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (b, e) = (brought[name].as_tensor(), ended[name].as_tensor());
    assert!(diff(b, e) < 1e-6, "{}", diff(b, e));
    let init = chorus_model::checkpoint::init_params(
        &chorus_model::NemotronHConfig::from_json_str(TINY_DENSE_MODEL).unwrap(),
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .vars()
    .clone();
    assert!(
        diff(init[name].as_tensor(), e) > 1e-3,
        "the warm-up moved the weights"
    );
}
