//! Chaos: a run as separate processes (orchestrator, learner, two rollout workers and an
//! environment plugin) in which the learner, a worker, the plugin and the orchestrator are each
//! killed once with SIGKILL, at a moment drawn at random (the seed is printed; `CHORUS_CHAOS_SEED` repeats it),
//! and started again at the same address. The run completes with every step trained once, and
//! `chorus audit` is clean.

mod harness;
#[path = "../orchestrator/tests/support/postgres.rs"]
mod support_postgres;

use std::io::Read;

use harness::*;

const RL_STEPS: u64 = 32;

fn config(plugin: &str) -> String {
    format!(
        r#"
name = "chaos"
[model]
init_config = "model.json"
[workers]
count = 2
max_in_flight = 4
[learner]
checkpoint_every = 3
[environment_faults]
error_budget = 1000
[[stages]]
name = "rl"
kind = "rl"
steps = {RL_STEPS}
prompts_per_step = 3
group_size = 4
max_new_tokens = 8
max_staleness = 1
environments = [{{ url = "{plugin}" }}]
"#
    )
}

/// The seed of this test's kill moments.
fn seed() -> u64 {
    let seed = std::env::var("CHORUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("chaos seed {seed} (CHORUS_CHAOS_SEED={seed} repeats it)");
    seed
}

/// A small generator of kill moments (splitmix64).
struct Moments(u64);

impl Moments {
    /// A number of steps in `lo..=hi`.
    fn steps(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        lo + (z ^ (z >> 31)) % (hi - lo + 1)
    }
}

fn kill(service: &mut Service) {
    service.child.kill().unwrap();
    service.child.wait().unwrap();
}

#[test]
fn a_run_survives_its_learner_a_worker_its_plugin_and_its_orchestrator_killed_mid_run() {
    chaos(None);
}

/// The same on a PostgreSQL ledger, which also crashes once (stopped in immediate mode: no
/// shutdown checkpoint, recovery from its log on the next start) and is started again while
/// the run goes on. Needs `CHORUS_TEST_POSTGRES_URL` and `pg_ctlcluster` (as `.ci/run` starts
/// PostgreSQL); the other tests of this binary do not use PostgreSQL, and cargo runs test
/// binaries one at a time, so the restart breaks no other test's connections.
#[test]
fn a_run_on_postgres_survives_its_database_crashing_too() {
    let Some(base) = support_postgres::postgres_url_or_skip("chaos on PostgreSQL") else {
        return;
    };
    if std::process::Command::new("pg_ctlcluster")
        .arg("--help")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "pg_ctlcluster is missing under CI, where .ci/run starts PostgreSQL with it"
        );
        eprintln!("SKIPPED: chaos on PostgreSQL (no pg_ctlcluster to restart it with)");
        return;
    }
    chaos(Some(&base));
}

fn pg_ctlcluster(action: &str, mode: &[&str]) {
    let out = std::process::Command::new("pg_ctlcluster")
        .args(["15", "main", action])
        .args(mode)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_ctlcluster {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One chaotic run, on the PostgreSQL ledger at `postgres` (crashed once too) or on SQLite.
fn chaos(postgres: Option<&str>) {
    let h = Harness::new();
    let mut moments = Moments(seed());
    std::fs::write(h.path("model.json"), TINY_HYBRID_MODEL).unwrap();
    let plugin_listen = format!("127.0.0.1:{}", free_port());
    let plugin_args = [
        "serve",
        "environment",
        "arithmetic",
        "--listen",
        &plugin_listen,
        "--token",
        "plugin-tok",
    ];
    let mut plugin = h.service(&plugin_args);
    std::fs::write(h.path("run.toml"), config(&plugin.url)).unwrap();
    // Unique: a PostgreSQL ledger is shared with other tests and earlier runs of this one.
    let run_id = format!(
        "chaos-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let common = [
        "--config", "run.toml", "--run-id", &run_id, "--token", "tok",
    ];
    let orchestrator_listen = format!("127.0.0.1:{}", free_port());
    let db = postgres.map_or_else(|| h.ledger_url("chaos"), str::to_string);
    let orchestrator_args = [
        &["serve", "orchestrator", "--listen", &orchestrator_listen][..],
        &["--eval-tasks", "2", "--wait-seconds", "120"],
        &["--plugin-token", "plugin-tok", "--db", &db],
        &common,
    ]
    .concat();
    let (mut orchestrator, _) = h.service_logged(
        &orchestrator_args,
        &[("RUST_LOG", "info")],
        "orchestrator-1.log",
    );
    let url = orchestrator.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ledger = rt.block_on(async {
        // The orchestrator creates the ledger as it starts.
        assert!(eventually(30, || postgres.is_some()
            || h.path("runs/chaos/ledger.sqlite").exists()));
        chorus_orchestrator::ledger::Ledger::open(&db)
            .await
            .unwrap()
    });
    // Waits until the ledger holds learner step `step`: the ledger, not an orchestrator's event
    // stream, since the orchestrator is among what gets killed.
    let until_step = |step: u64| {
        let reached = eventually(600, || {
            rt.block_on(ledger.list_learner_steps(&run_id))
                .map(|s| s.iter().any(|s| s.step.step >= step))
                .unwrap_or(false)
        });
        assert!(reached, "the run never reached step {step}");
        step
    };

    let learner_listen = format!("127.0.0.1:{}", free_port());
    let learner_args = [
        &["serve", "learner", "--listen", &learner_listen][..],
        &[
            "--checkpoints",
            "learner-checkpoints",
            "--orchestrator",
            &url,
        ],
        &common,
    ]
    .concat();
    let mut learner = h.service(&learner_args);
    let learner_url = learner.url.clone();
    let worker_args = |id: &'static str| {
        [
            &["serve", "worker", "--learner", &learner_url, "--id", id][..],
            &["--orchestrator", &url],
            &common,
        ]
        .concat()
    };
    let w0_args = worker_args("w0");
    let w1_args = worker_args("w1");
    let _w0 = h.service(&w0_args);
    let mut w1 = h.service(&w1_args);

    // The learner: killed mid-run, after at least one checkpoint, and started again on the same
    // directory; it resumes from its newest checkpoint and is sent the groups it lost.
    let at = until_step(moments.steps(4, 6));
    eprintln!("killing the learner after step {at}");
    kill(&mut learner);
    learner = h.service(&learner_args);
    let at = until_step(at + moments.steps(1, 2));
    eprintln!("killing worker w1 after step {at}");
    kill(&mut w1);
    w1 = h.service(&w1_args);
    let at = until_step(at + moments.steps(1, 2));
    eprintln!("killing the environment plugin after step {at}");
    kill(&mut plugin);
    plugin = h.service(&plugin_args);
    // The orchestrator: started again on the same ledger, run id and address; the services
    // register with it again, and it picks the run up where the learner is.
    let at = until_step(at + moments.steps(1, 2));
    eprintln!("killing the orchestrator after step {at}");
    kill(&mut orchestrator);
    let (orchestrator, mut stdout) = h.service_logged(
        &orchestrator_args,
        &[("RUST_LOG", "info")],
        "orchestrator-2.log",
    );
    // PostgreSQL last, once the second orchestrator writes (the ledger is up to date before
    // each kill above, which the moments are read from).
    if postgres.is_some() {
        let at = until_step(at + moments.steps(1, 2));
        eprintln!("crashing PostgreSQL after step {at}");
        pg_ctlcluster("stop", &["-m", "immediate"]);
        std::thread::sleep(std::time::Duration::from_secs(2));
        pg_ctlcluster("start", &[]);
    }

    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let logs = ["orchestrator-1.log", "orchestrator-2.log"]
        .map(|f| std::fs::read_to_string(h.path(f)).unwrap());
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "no summary ({e}): {out}\nfirst orchestrator:\n{}\nsecond orchestrator:\n{}",
            logs[0], logs[1]
        )
    });
    assert_eq!(summary["steps"], RL_STEPS, "{summary}");
    assert!(
        logs[0].contains("the learner is back at version"),
        "the orchestrator never saw the learner come back:\n{}",
        logs[0]
    );
    assert!(
        logs[1].contains(&format!("picking run {run_id} up at policy version")),
        "the second orchestrator did not pick the run up:\n{}",
        logs[1]
    );

    // This run alone: a PostgreSQL ledger holds other tests' runs too.
    let audit = h.ok(&["audit", &run_id, "--db", &db]);
    assert!(
        audit.contains("ok   lag_bounded") && !audit.contains("FAIL"),
        "{audit}"
    );
    eprintln!("{audit}");
    rt.block_on(async {
        let steps = ledger.list_learner_steps(&run_id).await.unwrap();
        let numbers: Vec<u64> = steps.iter().map(|s| s.step.step).collect();
        assert_eq!(numbers, (1..=RL_STEPS).collect::<Vec<_>>());
        let versions = ledger.list_policy_versions(&run_id).await.unwrap();
        assert_eq!(versions.len() as u64, RL_STEPS, "{versions:?}");
        // Nothing lost, nothing counted twice: the trajectories the ledger has consumed are
        // exactly the ones the learner reports having trained.
        let trained: u64 = steps.iter().map(|s| s.step.num_trajectories).sum();
        let rows = ledger
            .list_rollouts(&chorus_orchestrator::ledger::RolloutFilter {
                run_id: Some(run_id.clone()),
                limit: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let consumed = rows.iter().filter(|r| r.consumed_at_step.is_some()).count() as u64;
        assert_eq!(
            consumed, trained,
            "consumed in the ledger vs trained by the learner"
        );
        ledger.close().await.unwrap();
    });
    drop((orchestrator, learner, w1, plugin));
}
