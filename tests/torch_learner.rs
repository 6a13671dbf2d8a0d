//! The PyTorch learner (`learner/python`, `[learner] backend = "torch"`): its objectives agree
//! with Chorus' (`chorus loss`), its trainer keeps Chorus' learner's contracts (gradients reach
//! every parameter, non-finite steps refused, exact resume), and `chorus run` trains with it
//! behind Chorus' workers with a clean audit.
//!
//! Needs `CHORUS_TEST_HF_PYTHON` with torch, transformers, grpcio and this repository's
//! `chorus-learner` installed (`.ci/run` installs them); skipped without, a failure under CI.

mod harness;

use std::collections::BTreeSet;
use std::process::Command;

use harness::*;

#[test]
fn the_torch_objectives_agree_with_chorus_loss() {
    let Some(python) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    let summary = python_json(
        &h,
        &python,
        "torch_objective_agree.py",
        &[env!("CARGO_BIN_EXE_chorus"), "agree"],
    );
    assert_eq!(summary["cases"], 28, "{summary}");
}

#[test]
fn the_torch_trainer_reaches_every_parameter_refuses_non_finite_steps_and_resumes_exactly() {
    let Some(python) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    h.ok(&[
        "model",
        "init",
        "--config",
        "model.json",
        "--out",
        "base",
        "--seed",
        "3",
    ]);
    let summary = python_json(&h, &python, "torch_learner_steps.py", &["base", "work"]);
    assert_eq!(summary["resume_max_diff"], 0.0, "{summary}");
}

#[test]
fn two_fsdp2_processes_on_gloo_train_to_the_weights_of_one() {
    let Some(python) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    h.ok(&[
        "model",
        "init",
        "--config",
        "model.json",
        "--out",
        "base",
        "--seed",
        "3",
    ]);
    let script = repo().join("tests/python/torch_fsdp_agree.py");
    let out = Command::new(&python)
        .args([
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
        ])
        .arg(&script)
        .arg("base")
        .current_dir(h.path(""))
        .output()
        .expect("run torchrun");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .expect("a summary");
    let summary: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(summary["ranks"], 2, "{summary}");
    assert!(
        summary["max_weight_diff"].as_f64().unwrap() <= 1e-5,
        "{summary}"
    );
}

const RUN: &str = r#"
name = "torch"
seed = 5
[model]
init_config = "model.json"
[workers]
count = 1
max_batch = 8
[learner]
# A few sequences a pass: every step of these runs goes through the learner's micro-batches.
micro_batch_tokens = 64
backend = "torch"
[learner.torch]
python = "PYTHON"
args = ["--threads", "1"]
[[stages]]
name = "warmup"
kind = "sft"
steps = 3
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rlvr"
steps = 4
prompts_per_step = 4
group_size = 4
max_new_tokens = 8
max_staleness = 1
environments = [{ name = "arithmetic" }]
"#;

#[test]
fn chorus_run_trains_with_the_torch_learner_behind_chorus_workers() {
    torch_run(1);
}

/// The same run with the learner sharded over two processes (`torchrun`, FSDP2 on gloo).
#[test]
fn chorus_run_trains_with_a_two_process_torch_learner() {
    torch_run(2);
}

fn torch_run(processes: usize) {
    let Some(python) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    let run = RUN.replace("PYTHON", &python).replace(
        "args = [\"--threads\", \"1\"]",
        &format!("args = [\"--threads\", \"1\"]\nprocesses = {processes}"),
    );
    assert!(run.contains("processes = "));
    std::fs::write(h.path("run.toml"), run).unwrap();
    let out = h.chorus(&[
        "run",
        "run.toml",
        "--eval-tasks",
        "2",
        "--token",
        "secret-token",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("PyTorch learner serving at"), "{stderr}");
    assert!(
        !stderr.contains("secret-token"),
        "the token was logged: {stderr}"
    );
    let summary = h.json("runs/torch/summary.json");
    assert_eq!(summary["steps"], 7, "{summary}");
    let db = h.ledger_url("torch");
    h.audit_clean(&db);
    let run_id = summary["run"].as_str().unwrap().to_string();
    let rows = rollouts_of(&db, &run_id);
    // The worker followed the PyTorch learner's versions (it verified each one's checksum).
    let versions: BTreeSet<u64> = rows
        .iter()
        .filter(|r| r.worker_id == "w0")
        .filter_map(|r| r.max_policy_version)
        .collect();
    assert!(
        versions.iter().any(|&v| v > 3),
        "the worker never sampled from an RL version: {versions:?}"
    );
    // Its weight transfers reached the ledger with its step reports, as Chorus' learner's do.
    let syncs = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = chorus_orchestrator::ledger::Ledger::open(&db)
            .await
            .unwrap();
        ledger.weight_sync(&run_id).await.unwrap()
    });
    assert!(
        syncs.iter().any(|s| s.transfers > 0 && s.bytes > 0),
        "no weight transfer recorded: {syncs:?}"
    );
    // The stage boundary saved a learner checkpoint (with optimizer state in one process).
    let saved = h.path("runs/torch/torch-learner/checkpoints/step-00000003");
    assert!(
        saved.join("trainer_state.json").exists()
            && (processes > 1 || saved.join("optimizer.pt").exists()),
        "no learner checkpoint at the stage boundary"
    );
    assert!(
        !left_running(&h, &["-m", "chorus_learner"]),
        "the PyTorch learner outlived the run"
    );
}

/// `chorus serve` with the PyTorch learner started by hand: it registers with the orchestrator
/// and sends heartbeats like Chorus' learner, a Chorus worker follows it, and the run completes.
/// Every service speaks mutual TLS, the PyTorch learner's server and its client of the
/// orchestrator included.
#[test]
fn a_hand_started_torch_learner_registers_with_the_orchestrator() {
    use std::io::{BufRead, Read};

    let Some(python) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    let tls = Pki::write(&h).node_flags();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    h.ok(&[
        "model",
        "init",
        "--config",
        "model.json",
        "--out",
        "base",
        "--seed",
        "3",
    ]);
    let run = RUN
        .replace(
            "[learner]\n# A few sequences a pass: every step of these runs goes through the learner's micro-batches.\nmicro_batch_tokens = 64\nbackend = \"torch\"\n[learner.torch]\npython = \"PYTHON\"\n",
            "",
        )
        .replace("args = [\"--threads\", \"1\"]\n", "");
    assert!(
        !run.contains("backend") && !run.contains("micro_batch"),
        "{run}"
    );
    std::fs::write(h.path("run.toml"), run).unwrap();
    let common = ["--config", "run.toml", "--run-id", "r1", "--token", "tok"];
    let (mut orchestrator, mut stdout) = h.service_with_stdout(
        &[
            &["serve", "orchestrator", "--listen", "127.0.0.1:0"][..],
            &["--eval-tasks", "2", "--wait-seconds", "120"],
            &common,
            &tls,
        ]
        .concat(),
    );
    assert!(orchestrator.url.starts_with("https://"));
    let mut learner = Command::new(&python)
        .args(["-m", "chorus_learner", "--model", "base", "--run-id", "r1"])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--orchestrator",
            &orchestrator.url,
        ])
        .args(["--threads", "1", "--groups-per-step", "4"])
        .args(tls)
        .env("CHORUS_TOKEN", "tok")
        .current_dir(h.path(""))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the PyTorch learner");
    let mut first = String::new();
    std::io::BufReader::new(learner.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let learner_url = listening_url(&first, "the PyTorch learner");
    assert!(learner_url.starts_with("https://"), "{learner_url}");
    let _worker = h.service(
        &[
            &["serve", "worker", "--learner", &learner_url, "--id", "w0"][..],
            &["--orchestrator", &orchestrator.url],
            &common,
            &tls,
        ]
        .concat(),
    );
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let finished = orchestrator.child.wait().unwrap();
    // It refuses a group of another run, naming both runs (over mutual TLS, as this process's
    // client).
    let files = chorus_proto::tls::TlsFiles {
        cert: Some(h.path("node.pem")),
        key: Some(h.path("node.key")),
        ca: Some(h.path("ca.pem")),
        server_name: None,
    };
    chorus_proto::tls::install(files.load().unwrap().unwrap()).unwrap();
    let answer = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use chorus_proto::v1::{TrajectoryGroup, learner_client::LearnerClient};
        let channel = chorus_proto::tls::endpoint(&learner_url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = chorus_proto::auth::AttachToken::new("tok").unwrap();
        let other = TrajectoryGroup {
            run_id: "another-run".into(),
            group_id: "g-other".into(),
            ..Default::default()
        };
        LearnerClient::with_interceptor(channel, token)
            .submit_trajectories(chorus_proto::tonic::codegen::tokio_stream::iter(vec![
                other,
            ]))
            .await
            .unwrap()
            .into_inner()
    });
    let _ = learner.kill();
    let _ = learner.wait();
    assert!(finished.success(), "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 7, "{summary}");
    let learners = h.ok(&["inspect", "runs"]);
    assert!(learners.contains("r1"), "{learners}");
    assert!(answer.accepted_group_ids.is_empty(), "{answer:?}");
    let reason = &answer.rejected[0].reason;
    assert!(
        reason.contains("`r1`") && reason.contains("`another-run`"),
        "{reason}"
    );
}

/// `chorus run`'s PyTorch learner killed (SIGKILL) mid-run: its supervisor starts it again at
/// the same address from its newest learner checkpoint, the orchestrator sends it the groups of
/// the later steps again (the PyTorch learner answers `Status` and gathers groups by step as
/// Chorus' does), and the run finishes with every step once and a clean audit.
#[test]
fn a_killed_torch_learner_is_started_again_and_the_run_finishes() {
    let Some(python) = torch_learner_python() else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), VLLM_DENSE_MODEL).unwrap();
    let run = RUN
        .replace("PYTHON", &python)
        .replace(
            "backend = \"torch\"\n",
            "backend = \"torch\"\ncheckpoint_every = 2\n",
        )
        .replace("steps = 4\n", "steps = 12\n");
    assert!(run.contains("checkpoint_every = 2") && run.contains("steps = 12"));
    std::fs::write(h.path("run.toml"), run).unwrap();
    let mut chorus = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["run", "run.toml", "--eval-tasks", "2"])
        .current_dir(h.path(""))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(h.path("run.log")).unwrap())
        .spawn()
        .unwrap();
    // This run's learner: a chorus_learner process working in this test's directory.
    let here = h.path("").canonicalize().unwrap();
    let learner = || {
        pids_with_args(&["-m", "chorus_learner"])
            .into_iter()
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).ok() == Some(here.clone()))
            .collect::<Vec<_>>()
    };
    let checkpoints = h.path("runs/torch/torch-learner/checkpoints");
    let saved_at_least = |step: u32| {
        std::fs::read_dir(&checkpoints)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("step-")
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n >= step)
                    && e.path().join("trainer_state.json").is_file()
            })
    };
    assert!(
        eventually(600, || saved_at_least(7)),
        "the learner saved no checkpoint past step 7: {}",
        std::fs::read_to_string(h.path("run.log")).unwrap_or_default()
    );
    let killed = learner();
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert!(
        Command::new("kill")
            .args(["-9", &killed[0].to_string()])
            .status()
            .unwrap()
            .success()
    );
    // A guard against a run that never finishes (far beyond this run's minute or so).
    let ended = eventually(900, || chorus.try_wait().unwrap().is_some());
    let log = std::fs::read_to_string(h.path("run.log")).unwrap();
    if !ended {
        let _ = chorus.kill();
        panic!("the run did not finish after its learner was killed: {log}");
    }
    assert!(chorus.wait().unwrap().success(), "{log}");
    assert!(log.contains("starting it again"), "{log}");
    assert!(log.contains("the learner is back at version"), "{log}");
    let summary = h.json("runs/torch/summary.json");
    // 3 SFT steps and 12 RL steps, each once (the audit checks they are contiguous and that
    // the learner trained exactly the trajectories the ledger consumed).
    assert_eq!(summary["steps"], 15, "{summary}");
    h.audit_clean(&h.ledger_url("torch"));
    assert!(
        !left_running(&h, &["-m", "chorus_learner"]) && learner().is_empty(),
        "the PyTorch learner outlived the run"
    );
}
