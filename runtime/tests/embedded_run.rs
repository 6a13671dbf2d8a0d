//! A whole run driven through the library, as an embedding program would: a `RunPlan` from a
//! config, `run_local`, and the typed `Summary`, without the CLI.

use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::{Ledger, RunStatus};
use chorus_runtime::{LocalRun, RunError, RunPlan, run_local};

const MODEL: &str = r#"{"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 32,
  "hybrid_override_pattern": "M*E", "mamba_num_heads": 4, "mamba_head_dim": 8,
  "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
  "moe_shared_expert_intermediate_size": 16, "eos_token_id": 2}"#;

fn config(environments: &str) -> String {
    format!(
        r#"
name = "embedded"
seed = 5
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 8
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 2
environments = {environments}
[[stages]]
name = "rl"
kind = "rl"
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 4
environments = {environments}
"#
    )
}

fn plan(dir: &std::path::Path, text: &str) -> RunPlan {
    std::fs::write(dir.join("model.json"), MODEL).unwrap();
    let cfg = RunConfig::from_toml_relative_to(text, "embedded.toml", dir).unwrap();
    RunPlan::new(cfg, text.to_string(), 2, 1).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_program_runs_a_whole_run_and_gets_the_summary_that_summary_json_holds() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &config(r#"[{ name = "arithmetic" }]"#));
    let evaluated: Vec<&str> = plan
        .evaluation
        .environments
        .iter()
        .map(|(e, _)| e.as_str())
        .collect();
    assert_eq!(evaluated, ["arithmetic"]);
    assert_eq!(plan.evaluation.rl_steps, 2);
    let local = LocalRun {
        db: None,
        runs_dir: dir.path().join("runs"),
        token: None,
        plugin_token: None,
        resume: false,
        from_stage: None,
    };
    let rt = runtime();
    let summary = rt.block_on(run_local(&plan, local)).unwrap();
    assert_eq!(summary.steps, 4, "{summary:?}");
    assert_eq!(summary.environments["arithmetic"].heldout_n, 2);
    // The warm-up's start, before RL (the warm-up's end), after every RL step (--eval-every 1
    // above) and after the run; in version order.
    let versions: Vec<u64> = summary.curve.iter().map(|p| p.version).collect();
    assert_eq!(versions, [0, 2, 3, 4]);
    assert!(
        summary
            .curve
            .windows(2)
            .all(|w| w[0].seconds <= w[1].seconds),
        "{:?}",
        summary.curve
    );
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/embedded/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written, serde_json::to_value(&summary).unwrap());

    // Each stage: its summary file, its metric at both ends, and its final policy as a
    // checkpoint that loads and holds exactly the weights of that version.
    let names: Vec<&str> = summary.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["warmup", "rl"]);
    let (warmup, rl) = (&summary.stages[0], &summary.stages[1]);
    assert_eq!((warmup.kind.as_str(), rl.kind.as_str()), ("sft", "rlvr"));
    assert_eq!((warmup.first_version, warmup.last_version), (0, 2));
    assert_eq!((rl.first_version, rl.last_version), (2, 4));
    assert_eq!(warmup.trajectories, 4, "2 steps x 2 prompts x 1 reference");
    assert!(
        rl.trajectories > 0 && rl.trajectories <= 2 * 2 * 2,
        "at most steps x prompts x group size: {}",
        rl.trajectories
    );
    assert!(
        (rl.start.unwrap() - summary.mean_before).abs() < 1e-12,
        "the RL stage starts where the run's before-RL evaluation measured"
    );
    assert!((rl.end.unwrap() - summary.mean_after).abs() < 1e-12);
    assert_eq!(warmup.end, rl.start, "one stage ends where the next starts");
    for stage in &summary.stages {
        let file = dir
            .path()
            .join(format!("runs/embedded/stages/{}/summary.json", stage.name));
        let on_disk: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(on_disk, serde_json::to_value(stage).unwrap());
        for key in [
            "kind",
            "metric",
            "start",
            "end",
            "steps",
            "trajectories",
            "wall_seconds",
        ] {
            assert!(
                on_disk.get(key).is_some(),
                "{key} missing from {}",
                file.display()
            );
        }
        let (cfg, params) =
            chorus_model::checkpoint::load_checkpoint(&stage.checkpoint, &candle_core::Device::Cpu)
                .unwrap();
        assert_eq!(cfg.vocab_size, 272);
        assert!(params.vars().len() > 5);
    }
    let warm =
        chorus_model::checkpoint::load_checkpoint(&warmup.checkpoint, &candle_core::Device::Cpu)
            .unwrap()
            .1
            .snapshot()
            .unwrap();
    let last = chorus_model::checkpoint::load_checkpoint(&rl.checkpoint, &candle_core::Device::Cpu)
        .unwrap()
        .1
        .snapshot()
        .unwrap();
    let moved = warm.iter().any(|(name, w)| {
        let diff = (w - &last[name]).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() > 0.0
    });
    assert!(
        moved,
        "RL changed the policy, so the two checkpoints differ"
    );

    let db = format!(
        "sqlite://{}",
        dir.path().join("runs/embedded/ledger.sqlite").display()
    );
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let run = ledger.get_run(&summary.run).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
        // The summary is the ledger's: read back after the run, it is the same but for the
        // wall time, which now ends where the run was marked succeeded.
        let mut again =
            chorus_runtime::from_ledger(&ledger, &db, &summary.run, &plan.evaluation.environments)
                .await
                .unwrap();
        assert!((again.wall_seconds - summary.wall_seconds).abs() < 5.0);
        again.wall_seconds = summary.wall_seconds;
        assert_eq!(again, summary);
        assert!(!summary.cpu.is_empty() && summary.checkpoint.ends_with("checkpoint"));
        assert_eq!(
            ledger.count_consumed(&summary.run).await.unwrap(),
            summary.trajectories
        );
        // Every version the learner published, and the run's events, from start to end.
        let records = ledger.list_policy_versions(&summary.run).await.unwrap();
        let versions: Vec<_> = records.iter().map(|r| r.version.clone()).collect();
        assert_eq!(
            versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            (1..=4).collect::<Vec<_>>()
        );
        assert!(
            versions
                .iter()
                .all(|v| v.weights_digest.len() == "blake3:".len() + 64
                    && v.weights_digest.starts_with("blake3:")
                    && v.num_bytes > 0)
        );
        // The ledger's stages agree with the summary, and every step belongs to one.
        let stages = ledger.list_stages(&summary.run).await.unwrap();
        assert_eq!(stages.len(), 2);
        for (row, s) in stages.iter().zip(&summary.stages) {
            assert_eq!(row.stage.name, s.name);
            assert_eq!(
                row.status,
                chorus_orchestrator::ledger::StageStatus::Succeeded
            );
            assert_eq!(
                (row.stage.first_step, row.last_step),
                (s.first_version, Some(s.last_version))
            );
            assert_eq!((row.stage.metric_start, row.metric_end), (s.start, s.end));
            assert_eq!(row.trajectories, Some(s.trajectories));
        }
        let owners: Vec<Option<u64>> = ledger
            .list_learner_steps(&summary.run)
            .await
            .unwrap()
            .iter()
            .map(|s| s.stage_index)
            .collect();
        assert_eq!(owners, [Some(0), Some(0), Some(1), Some(1)]);
        let events = ledger.list_events(&summary.run, 0, 1000).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds.first(), Some(&"status_changed"), "{kinds:?}");
        assert_eq!(
            kinds.iter().filter(|k| **k == "learner_step").count(),
            4,
            "{kinds:?}"
        );
        let last = events.last().unwrap();
        assert!(
            last.kind == "status_changed" && last.payload_json.contains("SUCCEEDED"),
            "{last:?}"
        );
    });
}

#[test]
fn an_sft_stage_learns_a_users_transcripts_on_the_assistants_tokens() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("chat.jsonl"),
        concat!(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}"#,
            "\n",
            r#"{"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let text = config(r#"[{ name = "arithmetic" }]"#).replace(
        "kind = \"sft\"\nsteps = 2\nprompts_per_step = 2\nenvironments = [{ name = \"arithmetic\" }]",
        "kind = \"sft\"\nsteps = 2\nprompts_per_step = 2\ndata = \"chat.jsonl\"",
    );
    assert!(text.contains("chat.jsonl"), "{text}");
    let plan = plan(dir.path(), &text);
    let local = LocalRun {
        db: None,
        runs_dir: dir.path().join("runs"),
        token: None,
        plugin_token: None,
        resume: false,
        from_stage: None,
    };
    let rt = runtime();
    let summary = rt.block_on(run_local(&plan, local)).unwrap();
    let warmup = &summary.stages[0];
    assert_eq!(warmup.metric, "none", "transcripts alone have no verifier");
    assert_eq!((warmup.start, warmup.end), (None, None));
    assert_eq!(warmup.trajectories, 4);
    let db = format!(
        "sqlite://{}",
        dir.path().join("runs/embedded/ledger.sqlite").display()
    );
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let rows = ledger
            .list_rollouts(&chorus_orchestrator::ledger::RolloutFilter {
                run_id: Some(summary.run.clone()),
                environment: Some("transcripts:chat".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 4, "every warm-up example came from the file");
        for r in rows {
            let t = ledger
                .get_trajectory(&r.id)
                .await
                .unwrap()
                .unwrap()
                .trajectory;
            assert_eq!(t.stage_index, Some(0));
            assert!(
                t.completion_text == "hello<|end|><|user|>bye<|end|><|assistant|>ciao<|end|>"
                    || t.completion_text == "2<|end|>",
                "{}",
                t.completion_text
            );
        }
    });
}

#[test]
fn a_bad_transcript_file_is_named_before_the_run_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chat.jsonl"), "{\"messages\": []}\n").unwrap();
    std::fs::write(dir.path().join("model.json"), MODEL).unwrap();
    let text = config(r#"[{ name = "arithmetic" }]"#).replace(
        "prompts_per_step = 2\nenvironments = [{ name = \"arithmetic\" }]\n[[stages]]",
        "prompts_per_step = 2\nenvironments = [{ name = \"arithmetic\" }]\ndata = \"chat.jsonl\"\n[[stages]]",
    );
    let cfg = RunConfig::from_toml_relative_to(&text, "embedded.toml", dir.path()).unwrap();
    let err = RunPlan::new(cfg, text, 2, 0).err().unwrap().to_string();
    assert!(
        err.contains("stages[0].data") && err.contains("chat.jsonl:1: no assistant message"),
        "{err}"
    );
}

#[test]
fn a_run_whose_environment_cannot_be_reached_fails_naming_it_and_is_marked_failed() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let plan = plan(dir.path(), &config(r#"[{ url = "http://127.0.0.1:1" }]"#));
    let local = LocalRun {
        db: None,
        runs_dir: dir.path().join("runs"),
        token: Some("t".into()),
        plugin_token: Some("p".into()),
        resume: false,
        from_stage: None,
    };
    let rt = runtime();
    let err = rt.block_on(run_local(&plan, local)).unwrap_err();
    assert!(
        matches!(&err, RunError::Environment { at, .. } if at.starts_with("stages[0].environments[0].url")),
        "{err}"
    );
    rt.block_on(async {
        let db = format!(
            "sqlite://{}",
            dir.path().join("runs/embedded/ledger.sqlite").display()
        );
        let ledger = Ledger::open(&db).await.unwrap();
        let runs = ledger.list_runs(10).await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].status, RunStatus::Failed);
        // The failure and its reason are the run's last event.
        let events = ledger.list_events(&runs[0].id, 0, 1000).await.unwrap();
        let last = events.last().unwrap();
        assert!(
            last.payload_json.contains("FAILED") && last.payload_json.contains("127.0.0.1:1"),
            "{events:?}"
        );
    });
}

#[test]
fn a_plugin_run_without_the_plugins_token_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &config(r#"[{ url = "http://127.0.0.1:1" }]"#));
    let local = LocalRun {
        db: None,
        runs_dir: dir.path().join("runs"),
        // The run's own token is no substitute: it is never sent to plugins.
        token: Some("t".into()),
        plugin_token: None,
        resume: false,
        from_stage: None,
    };
    let err = runtime().block_on(run_local(&plan, local)).unwrap_err();
    assert!(
        matches!(&err, RunError::Invalid(m) if m.contains("--plugin-token")),
        "{err}"
    );
    assert!(!dir.path().join("runs/embedded/ledger.sqlite").exists());
}
