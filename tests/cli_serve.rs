//! The services as separate OS processes on 127.0.0.1: a learner, two workers and an
//! orchestrator complete a small run; a worker with the wrong token is turned away.

mod harness;

use harness::*;

const RUN: &str = r#"
name = "multi"
[model]
init_config = "model.json"
[[stages]]
name = "warmup"
kind = "sft"
steps = 2
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 3
prompts_per_step = 3
group_size = 4
max_new_tokens = 4
environments = [{ name = "arithmetic" }]
"#;

type Client = chorus_proto::v1::orchestrator_client::OrchestratorClient<
    chorus_proto::tonic::codegen::InterceptedService<
        chorus_proto::tonic::transport::Channel,
        chorus_proto::auth::AttachToken,
    >,
>;

/// A client of the orchestrator at `url` that sends `token`.
fn orchestrator_client(rt: &tokio::runtime::Runtime, url: &str, token: &str) -> Client {
    rt.block_on(async {
        let channel = chorus_proto::tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        chorus_proto::v1::orchestrator_client::OrchestratorClient::with_interceptor(
            channel,
            chorus_proto::auth::AttachToken::new(token).unwrap(),
        )
    })
}

/// `chorus launch ARGS… --orchestrator URL --token tok`, which must succeed; returns its stdout
/// (the run id) and its stderr (the run's events).
fn launch(h: &Harness, url: &str, args: &[&str]) -> (String, String) {
    let out = h.chorus(
        &[
            &["launch"][..],
            args,
            &["--orchestrator", url, "--token", "tok"],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "launch {args:?} failed: {stderr}");
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        stderr,
    )
}

/// A standby learner `L` (its runs' checkpoints under `checkpoints/`) and standby workers `w0`
/// and `w1` at the orchestrator `url`.
fn standby_fleet(h: &Harness, url: &str) -> Vec<Service> {
    let checkpoints = h.path("checkpoints").display().to_string();
    [("learner", "L"), ("worker", "w0"), ("worker", "w1")]
        .iter()
        .map(|(role, id)| {
            let mut args = vec![
                "serve",
                role,
                "--orchestrator",
                url,
                "--id",
                id,
                "--token",
                "tok",
            ];
            if *role == "learner" {
                args.extend(["--checkpoints", &checkpoints]);
            }
            h.standby(&args)
        })
        .collect()
}

/// `LONG_RUN` with its learner saving a checkpoint every 4 versions.
fn long_run_with_checkpoints() -> String {
    LONG_RUN.replace("[workers]", "[learner]\ncheckpoint_every = 4\n[workers]")
}

/// The newest learner step `ledger` holds of `run`.
fn last_step(
    rt: &tokio::runtime::Runtime,
    ledger: &chorus_orchestrator::ledger::Ledger,
    run: &str,
) -> u64 {
    rt.block_on(ledger.last_learner_step(run))
        .unwrap()
        .map_or(0, |s| s.step.step)
}

#[test]
fn learner_workers_and_orchestrator_as_processes_complete_a_run() {
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let common = ["--config", "run.toml", "--run-id", "r1", "--token", "tok"];
    let learner = h.service(&[&["serve", "learner"][..], &common].concat());
    let w0 = h.service(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w0"][..],
            &common,
        ]
        .concat(),
    );
    let w1 = h.service(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w1"][..],
            &common,
        ]
        .concat(),
    );
    let out = h.ok(&[
        "serve",
        "orchestrator",
        "--config",
        "run.toml",
        "--run-id",
        "r1",
        "--token",
        "tok",
        "--learner",
        &learner.url,
        "--worker",
        &w0.url,
        "--worker",
        &w1.url,
        "--eval-tasks",
        "3",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 5, "{summary}");
    assert!(summary["trajectories"].as_u64().unwrap() > 0);
    // Both workers served requests.
    let rollouts = h.ok(&["inspect", "rollouts", "--run", "r1", "--limit", "1000"]);
    assert!(
        rollouts.contains(" w0 ") && rollouts.contains(" w1 "),
        "{rollouts}"
    );

    // A worker without the right token cannot fetch weights.
    let bad = h.chorus(
        &[
            &["serve", "worker", "--learner", &learner.url, "--id", "w9"][..],
            &["--config", "run.toml", "--run-id", "r1", "--token", "wrong"],
        ]
        .concat(),
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.to_lowercase().contains("unauthenticated") || err.contains("token"),
        "{err}"
    );
}

/// The other way to connect the services: the orchestrator serves first, the learner and the
/// workers register with it and send heartbeats, and a client watching the run sees the
/// workers join, every learner step and the run succeed.
#[test]
fn services_register_with_the_orchestrator_and_the_run_can_be_watched() {
    use std::io::Read;

    use chorus_proto::v1::{GetRunRequest, WatchRunRequest, run_event};

    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let common = ["--config", "run.toml", "--run-id", "r2", "--token", "tok"];
    let (mut orchestrator, mut stdout) = h.service_with_stdout(
        &[
            &["serve", "orchestrator", "--listen", "127.0.0.1:0"][..],
            &["--eval-tasks", "3", "--wait-seconds", "120"],
            &common,
        ]
        .concat(),
    );
    let url = orchestrator.url.clone();

    let rt = tokio::runtime::Runtime::new().unwrap();
    // The orchestrator checks the token too.
    let denied = rt
        .block_on(
            orchestrator_client(&rt, &url, "wrong").get_run(GetRunRequest {
                run_id: "r2".into(),
            }),
        )
        .unwrap_err();
    assert_eq!(denied.code(), chorus_proto::tonic::Code::Unauthenticated);
    let mut watcher = orchestrator_client(&rt, &url, "tok");
    let watch = rt.spawn(async move {
        let mut stream = watcher
            .watch_run(WatchRunRequest {
                run_id: "r2".into(),
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut events = vec![];
        while let Ok(Some(e)) = stream.message().await {
            events.push(e);
        }
        events
    });

    let learner = h.service(&[&["serve", "learner", "--orchestrator", &url][..], &common].concat());
    let _workers: Vec<Service> = ["w0", "w1"]
        .iter()
        .map(|id| {
            h.service(
                &[
                    &["serve", "worker", "--learner", &learner.url, "--id", id][..],
                    &["--orchestrator", &url],
                    &common,
                ]
                .concat(),
            )
        })
        .collect();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(orchestrator.child.wait().unwrap().success(), "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 5, "{summary}");
    let rollouts = h.ok(&["inspect", "rollouts", "--run", "r2", "--limit", "1000"]);
    assert!(
        rollouts.contains(" w0 ") && rollouts.contains(" w1 "),
        "{rollouts}"
    );

    let events = rt.block_on(watch).unwrap();
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "gap-free"
    );
    let kinds: Vec<run_event::Kind> = events.into_iter().filter_map(|e| e.kind).collect();
    let joined = kinds
        .iter()
        .filter(|k| matches!(k, run_event::Kind::WorkerJoined(_)))
        .count();
    let steps = kinds
        .iter()
        .filter(|k| matches!(k, run_event::Kind::LearnerStep(_)))
        .count();
    assert_eq!(joined, 2, "{kinds:?}");
    assert_eq!(steps, 5, "{kinds:?}");
    assert!(
        matches!(kinds.last(), Some(run_event::Kind::StatusChanged(s)) if s.status == chorus_proto::v1::RunStatus::Succeeded as i32),
        "{kinds:?}"
    );
}

const LONG_RUN: &str = r#"
name = "churn"
[model]
init_config = "model.json"
[workers]
count = 2
max_in_flight = 4
[[stages]]
name = "warmup"
kind = "sft"
steps = 1
prompts_per_step = 4
environments = [{ name = "arithmetic" }]
[[stages]]
name = "rl"
kind = "rl"
steps = 40
prompts_per_step = 3
group_size = 4
max_new_tokens = 16
environments = [{ name = "arithmetic" }]
"#;

/// Workers come and go during a run: one is killed (SIGKILL) in the middle of the RL stage, a
/// new one registers and joins, then the other first worker is killed too. The requests the
/// killed workers held go to the others, so the run completes with no trajectory failed, and
/// the newcomer serves part of it.
#[test]
fn killed_workers_lose_no_prompt_and_a_worker_that_registers_mid_run_joins() {
    use std::io::Read;

    use chorus_orchestrator::ledger::{Ledger, RolloutFilter, TrajectoryStatus};
    use chorus_proto::v1::{WatchRunRequest, run_event};

    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), LONG_RUN).unwrap();
    let common = ["--config", "run.toml", "--run-id", "r3", "--token", "tok"];
    let (mut orchestrator, mut stdout) = h.service_with_stdout(
        &[
            &["serve", "orchestrator", "--listen", "127.0.0.1:0"][..],
            &["--eval-tasks", "2", "--wait-seconds", "120"],
            &common,
        ]
        .concat(),
    );
    let url = orchestrator.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut events = rt
        .block_on(
            orchestrator_client(&rt, &url, "tok").watch_run(WatchRunRequest {
                run_id: "r3".into(),
                after_sequence: 0,
            }),
        )
        .unwrap()
        .into_inner();
    // The stream ends (with an error when the orchestrator exits first) after the run's end.
    let mut next_event = || {
        rt.block_on(events.message())
            .ok()
            .flatten()
            .and_then(|e| e.kind)
    };

    let learner = h.service(&[&["serve", "learner", "--orchestrator", &url][..], &common].concat());
    let worker = |id: &str| {
        h.service(
            &[
                &["serve", "worker", "--learner", &learner.url, "--id", id][..],
                &["--orchestrator", &url],
                &common,
            ]
            .concat(),
        )
    };
    let mut w0 = worker("w0");
    let mut w1 = worker("w1");
    let mut seen = vec![];
    // The warm-up is step 1; kill w1 once the second RL step is done.
    while !seen
        .iter()
        .any(|k| matches!(k, run_event::Kind::LearnerStep(s) if s.step == 3))
    {
        seen.push(next_event().expect("the run goes on"));
    }
    w1.child.kill().unwrap();
    w1.child.wait().unwrap();
    let _w2 = worker("w2");
    while !seen
        .iter()
        .any(|k| matches!(k, run_event::Kind::WorkerJoined(j) if j.worker_id == "w2"))
    {
        seen.push(next_event().expect("the run goes on"));
    }
    // Let w2 take part in a step before w0 goes too.
    let steps_so_far = seen
        .iter()
        .filter(|k| matches!(k, run_event::Kind::LearnerStep(_)))
        .count();
    while seen
        .iter()
        .filter(|k| matches!(k, run_event::Kind::LearnerStep(_)))
        .count()
        < steps_so_far + 2
    {
        seen.push(next_event().expect("the run goes on"));
    }
    w0.child.kill().unwrap();
    w0.child.wait().unwrap();
    while let Some(k) = next_event() {
        seen.push(k);
    }
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(orchestrator.child.wait().unwrap().success(), "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 41, "{summary}");

    let lost: Vec<&str> = seen
        .iter()
        .filter_map(|k| match k {
            run_event::Kind::WorkerLost(l) => Some(l.worker_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(lost, vec!["w1", "w0"], "{seen:?}");
    assert!(
        matches!(seen.last(), Some(run_event::Kind::StatusChanged(s)) if s.status == chorus_proto::v1::RunStatus::Succeeded as i32),
        "{seen:?}"
    );

    let db = h.ledger_url("churn");
    // Workers lost mid-run left nothing half-done in the ledger.
    h.audit_clean(&db);
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        let rows = ledger
            .list_rollouts(&RolloutFilter {
                run_id: Some("r3".into()),
                environment: None,
                min_reward: None,
                limit: 100_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let failed: Vec<_> = rows
            .iter()
            .filter(|r| !matches!(r.status, TrajectoryStatus::Ok))
            .collect();
        assert!(
            failed.is_empty(),
            "{} failed, e.g. {:?}",
            failed.len(),
            failed.first()
        );
        let consumed = rows.iter().filter(|r| r.consumed_at_step.is_some()).count() as u64;
        assert_eq!(consumed, summary["trajectories"].as_u64().unwrap());
        let by = |w: &str| rows.iter().filter(|r| r.worker_id == w).count();
        assert!(
            by("w2") > 0,
            "the worker that joined mid-run served nothing"
        );
        assert!(by("w0") > 0 && by("w1") > 0);
        eprintln!("served: w0 {} w1 {} w2 {}", by("w0"), by("w1"), by("w2"));
    });
}

/// A standing fleet: an orchestrator started without a config, a standby learner and two
/// standby workers. `chorus launch` hands it runs; they run one after another on the same
/// services, a repeated launch with the same request id returns the first run, a bad config is
/// refused naming its key, a run whose learner dies fails without stopping the fleet, and a
/// run's service processes die with the standby process that started them.
#[test]
fn a_standing_fleet_serves_launched_runs_one_after_another() {
    use chorus_orchestrator::ledger::{Ledger, RolloutFilter, RunStatus};
    use chorus_proto::v1::LaunchRunRequest;

    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let orchestrator = h.service(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--eval-tasks",
        "2",
        "--wait-seconds",
        "60",
        "--token",
        "tok",
    ]);
    let url = orchestrator.url.clone();
    let mut fleet = standby_fleet(&h, &url);
    let launch = |extra: &[&str]| launch(&h, &url, &[&["run.toml"][..], extra].concat());

    let (first, log) = launch(&[]);
    assert!(log.contains("succeeded"), "{log}");
    assert!(
        log.contains("worker w0 joined") && log.contains("worker w1 joined"),
        "{log}"
    );
    // This launch brings its own evaluation: 3 tasks, every RL step (the daemon's: 2, none).
    let (second, _) = launch(&[
        "--name",
        "second",
        "--request-id",
        "k2",
        "--detach",
        "--eval-every",
        "1",
        "--eval-tasks",
        "3",
    ]);
    assert_ne!(first, second);
    assert!(second.starts_with("second-"), "{second}");
    // The same request id again: the same run, followed to its end.
    let (again, log) = launch(&["--name", "second", "--request-id", "k2"]);
    assert_eq!(again, second);
    assert!(
        log.contains("already launched") && log.contains("succeeded"),
        "{log}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = format!("sqlite://{}", h.path("runs/ledger.sqlite").display());
    h.audit_clean(&db);
    let mut client = orchestrator_client(&rt, &url, "tok");
    rt.block_on(async {
        let ledger = Ledger::open(&db).await.unwrap();
        for run in [&first, &second] {
            let record = ledger.get_run(run).await.unwrap().unwrap();
            assert!(matches!(record.status, RunStatus::Succeeded), "{run}");
            let rows = ledger
                .list_rollouts(&RolloutFilter {
                    run_id: Some(run.to_string()),
                    environment: None,
                    min_reward: None,
                    limit: 100_000,
                    ..Default::default()
                })
                .await
                .unwrap();
            for w in ["w0", "w1"] {
                assert!(
                    rows.iter().any(|r| r.worker_id == w),
                    "{w} served nothing in {run}"
                );
            }
        }
        assert!(h.path(&format!("runs/{second}/summary.json")).exists());
        // Each run evaluated as launched: the first by the daemon's settings (before RL at
        // version 2 and at the end, 5), the second also at every RL step in between.
        for (run, tasks, curve) in [(&first, 2, false), (&second, 3, true)] {
            let evals = ledger.list_evaluations(run).await.unwrap();
            assert!(evals.iter().all(|e| e.tasks == tasks), "{run}: {evals:?}");
            let at = |v: u64| evals.iter().any(|e| e.policy_version == v);
            assert!(at(2) && at(5), "{run}: {evals:?}");
            assert_eq!((at(3), at(4)), (curve, curve), "{run}: {evals:?}");
        }

        // The orchestrator checks configs too, naming the key.
        let refused = client
            .launch_run(LaunchRunRequest {
                request_id: "bad".into(),
                name: String::new(),
                config_toml: RUN.replace("group_size = 4", "group_size = 0"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), chorus_proto::tonic::Code::InvalidArgument);
        assert!(
            refused.message().contains("group_size"),
            "{}",
            refused.message()
        );
    });

    // A run whose learner is killed (SIGKILL) goes on: its standby learner starts it again at
    // the same address from its newest checkpoint, the orchestrator sends it the groups of the
    // later steps again, and the run finishes with every step trained once.
    std::fs::write(h.path("revived.toml"), long_run_with_checkpoints()).unwrap();
    let revived = crate::launch(&h, &url, &["revived.toml", "--name", "revived", "--detach"]).0;
    let ledger = rt.block_on(Ledger::open(&db)).unwrap();
    assert!(
        eventually(120, || last_step(&rt, &ledger, &revived) >= 6),
        "run {revived} did not reach step 6"
    );
    let learner = pids_with_args(&["--run-id", &revived, "learner"]);
    assert_eq!(learner.len(), 1);
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &learner[0].to_string()])
            .status()
            .unwrap()
            .success()
    );
    let watched = h.chorus(&["watch", &revived, "--orchestrator", &url, "--token", "tok"]);
    let log = String::from_utf8_lossy(&watched.stderr);
    assert!(watched.status.success(), "{log}");
    assert!(log.contains("succeeded"), "{log}");
    let record = rt.block_on(ledger.get_run(&revived)).unwrap().unwrap();
    assert!(matches!(record.status, RunStatus::Succeeded));
    // 1 SFT step and 40 RL steps, each once (the audit checks they are contiguous).
    assert_eq!(last_step(&rt, &ledger, &revived), 41);
    h.audit_clean(&db);
    assert!(
        h.path(&format!("checkpoints/{revived}")).is_dir(),
        "the standby learner kept no checkpoints for {revived}"
    );
    let (after, log) = launch(&["--name", "after"]);
    assert!(log.contains("succeeded"), "{log}");
    assert!(after.starts_with("after-"));

    // The standby services' children die with them.
    std::fs::write(
        h.path("long.toml"),
        LONG_RUN.replace("steps = 40", "steps = 100000"),
    )
    .unwrap();
    let last = crate::launch(&h, &url, &["long.toml", "--name", "last", "--detach"]).0;
    let serving = |run: &str, n: usize| {
        assert!(
            eventually(30, || pids_with_args(&["--run-id", run]).len() >= n),
            "fewer than {n} processes serve {run}"
        );
    };
    serving(&last, 3);
    fleet.clear();
    eventually(5, || pids_with_args(&["--run-id", &last]).is_empty());
    assert_eq!(
        pids_with_args(&["--run-id", &last]),
        Vec::<u32>::new(),
        "children outlived their standby parent"
    );
}

/// The orchestrator of a standing fleet is killed (SIGKILL) while it runs one launched run and
/// holds another in its queue. Restarted on the same ledger and address, it picks the cut-off
/// run up where its learner is, handing it back to the standby services still serving it (the
/// same learner process goes on), and queues the waiting one again (a launch retried with the
/// same request id finds it). Both runs finish, with every step once and a clean audit.
#[test]
fn a_restarted_orchestrator_picks_up_the_runs_launched_before_it_stopped() {
    use chorus_orchestrator::ledger::{Ledger, RunStatus};

    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    std::fs::write(
        h.path("long.toml"),
        long_run_with_checkpoints().replace("steps = 40", "steps = 80"),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let orchestrator = || {
        h.service(&[
            "serve",
            "orchestrator",
            "--listen",
            &listen,
            "--eval-tasks",
            "2",
            "--token",
            "tok",
        ])
    };
    let first = orchestrator();
    let url = first.url.clone();
    let _fleet = standby_fleet(&h, &url);
    let launch = |config: &str, request_id: &str| {
        launch(&h, &url, &[config, "--request-id", request_id, "--detach"])
    };
    let (cut_off, _) = launch("long.toml", "k-long");
    let (waiting, _) = launch("run.toml", "k-short");
    let db = format!("sqlite://{}", h.path("runs/ledger.sqlite").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ledger = rt.block_on(Ledger::open(&db)).unwrap();
    let status = |id: &str| rt.block_on(ledger.get_run(id)).unwrap().map(|r| r.status);
    // Killed part-way through the long run's RL stage.
    assert!(
        eventually(120, || last_step(&rt, &ledger, &cut_off) >= 6),
        "run {cut_off} did not reach step 6"
    );
    assert_eq!(status(&cut_off), Some(RunStatus::Running));
    let learner = pids_with_args(&["--run-id", &cut_off, "learner"]);
    assert_eq!(learner.len(), 1);
    let killed_at = last_step(&rt, &ledger, &cut_off);
    drop(first);

    let _second = orchestrator();
    // The run goes on with the learner that served it before: its standby kept it.
    assert!(
        eventually(120, || last_step(&rt, &ledger, &cut_off) >= killed_at + 4),
        "run {cut_off} did not go on past step {killed_at}"
    );
    assert_eq!(pids_with_args(&["--run-id", &cut_off, "learner"]), learner);
    let (again, log) = launch("run.toml", "k-short");
    assert_eq!(again, waiting, "{log}");
    assert!(log.contains("already launched"), "{log}");
    for run in [&cut_off, &waiting] {
        let watched = h.chorus(&["watch", run, "--orchestrator", &url, "--token", "tok"]);
        let log = String::from_utf8_lossy(&watched.stderr);
        assert!(watched.status.success(), "{run}: {log}");
        assert!(log.contains("succeeded"), "{run}: {log}");
    }
    assert_eq!(status(&cut_off), Some(RunStatus::Succeeded));
    assert_eq!(status(&waiting), Some(RunStatus::Succeeded));
    assert_eq!(last_step(&rt, &ledger, &cut_off), 81);
    h.audit_clean(&db);
    assert_eq!(pids_with_args(&["--run-id", &cut_off]), Vec::<u32>::new());
}

/// The Python client (`chorus_env.client`) against a real orchestrator and standing fleet:
/// it launches a run, follows its events, and reads its summary and rollouts.
#[test]
fn the_python_client_launches_follows_and_reads_a_run() {
    let Some(python) = python_importing(
        "CHORUS_TEST_PYTHON",
        "chorus_env.client",
        "a Python with the chorus-env SDK: pip install ./environments/python",
        Missing::FailsUnderCi,
    ) else {
        return;
    };
    let h = Harness::new();
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    std::fs::write(h.path("run.toml"), RUN).unwrap();
    let orchestrator = h.service(&[
        "serve",
        "orchestrator",
        "--listen",
        "127.0.0.1:0",
        "--wait-seconds",
        "60",
        "--token",
        "tok",
    ]);
    let _fleet = standby_fleet(&h, &orchestrator.url);
    let seen = python_json(
        &h,
        &python,
        "orchestrator_client.py",
        &[&orchestrator.url, "tok", "run.toml"],
    );
    let run_id = seen["run_id"].as_str().unwrap();
    assert!(run_id.starts_with("from-python-"), "{seen}");
    assert_eq!(seen["created"], true);
    assert_eq!(seen["status"], "succeeded", "{seen}");
    assert_eq!(
        (seen["again"].as_str(), &seen["again_created"]),
        (Some(run_id), &serde_json::json!(false))
    );
    assert_eq!(seen["learner_step"], 5, "{seen}");
    let kinds: Vec<&str> = seen["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "learner_step").count(),
        5,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"status_changed"), "{kinds:?}");
    assert!(
        seen["listed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == run_id)
    );
    assert_eq!(
        seen["stages"],
        serde_json::json!([
            ["warmup", "sft", "succeeded", true],
            ["rl", "rlvr", "succeeded", true]
        ]),
        "{seen}"
    );
    assert_eq!(seen["learner_steps"], 5);
    assert!(seen["evaluations"].as_u64().unwrap() >= 2, "{seen}");
    // The rollouts are the ledger's.
    let rows = seen["rollouts"].as_array().unwrap();
    assert_eq!(rows.len(), 20);
    let first = &rows[0];
    let id = first["trajectory_id"].as_str().unwrap();
    let db = format!("sqlite://{}", h.path("runs/ledger.sqlite").display());
    let shown = h.ok(&["inspect", "trajectory", id, "--db", &db]);
    assert!(
        shown.contains(first["completion_text"].as_str().unwrap()),
        "{first}\n{shown}"
    );
    assert!(seen["min_scored_reward"].as_f64().unwrap() >= 0.0);
    if !seen["frame_rows"].is_null() {
        assert_eq!(seen["frame_rows"], 20);
    }
}
