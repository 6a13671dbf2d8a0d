//! Orchestrator throughput with a stand-in generator that returns fixed tokens: trajectories/s
//! through environment sampling, tokenisation, dispatch, scoring, advantages, submission and
//! the ledger, for SQLite and (when `CHORUS_TEST_POSTGRES_URL` is set) PostgreSQL.
//!
//! `cargo bench -p chorus-orchestrator --bench scheduler_throughput`

use std::sync::Arc;
use std::time::Instant;

use chorus_environments::builtin_registry;
use chorus_model::tokenizer::Tokenizer;
use chorus_orchestrator::config::RunConfig;
use chorus_orchestrator::ledger::{Ledger, NewRun, RunStatus};
use chorus_orchestrator::scheduler::{StageContext, StageStats, run_rl_stage};
use chorus_orchestrator::standin::{CountingLearner, FixedWorkers};

const CONFIG: &str = r#"
name = "bench"
[model]
init_config = "unused.json"
[[stages]]
name = "rl"
kind = "rl"
steps = 40
prompts_per_step = 64
group_size = 16
max_staleness = 2
drop_zero_variance = false
environments = [{ name = "arithmetic", weight = 1.0 }, { name = "multi_hop", weight = 1.0 }, { name = "needle", weight = 1.0 }]
"#;

async fn measure(url: &str, label: &str) {
    let cfg = RunConfig::from_toml_str(CONFIG, "bench.toml").unwrap();
    let ledger = Ledger::open(url).await.unwrap();
    let run_id = format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    ledger
        .insert_run(NewRun {
            id: run_id.clone(),
            name: "bench".into(),
            config_toml: CONFIG.into(),
            status: RunStatus::Running,
        })
        .await
        .unwrap();
    let tokenizer = Arc::new(Tokenizer::byte_level());
    let stage = Arc::new(cfg.stages[0].clone());
    let learner = Arc::new(CountingLearner::new(stage.prompts_per_step as u64, false));
    let workers = Arc::new(FixedWorkers {
        tokens: tokenizer.encode("42<|end|>").unwrap(),
        version: learner.subscribe(),
    });
    let stats = Arc::new(StageStats::default());
    let ctx = Arc::new(StageContext {
        run_id: run_id.clone(),
        seed: 1,
        stage_index: 0,
        registry: Arc::new(builtin_registry()),
        tokenizer,
        ledger: ledger.clone(),
        rollouts: workers,
        learning: learner,
        stats: stats.clone(),
        faults: Default::default(),
        deterministic: false,
        transcripts: None,
        goal: None,
        first_version: None,
        restart: 0,
    });
    let start = Instant::now();
    run_rl_stage(ctx, stage.clone()).await.unwrap();
    ledger.flush().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    let n = ledger.count_consumed(&run_id).await.unwrap();
    let expected = stage.steps * stage.prompts_per_step as u64 * stage.group_size as u64;
    assert_eq!(n, expected, "every trajectory recorded as consumed");
    println!(
        "{label:<12} {n:>8} trajectories in {secs:>6.2} s = {:>8.0} trajectories/s",
        n as f64 / secs
    );
    ledger.close().await.unwrap();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        measure(
            &format!("sqlite://{}", dir.path().join("bench.sqlite").display()),
            "sqlite",
        )
        .await;
        match std::env::var("CHORUS_TEST_POSTGRES_URL") {
            Ok(url) => measure(&url, "postgresql").await,
            Err(_) => println!("postgresql   skipped: CHORUS_TEST_POSTGRES_URL not set"),
        }
    });
}
