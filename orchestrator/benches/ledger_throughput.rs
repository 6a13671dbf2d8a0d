//! Ledger write throughput: 20,000 synthetic trajectories (256 prompt tokens,
//! 512 completion tokens each) inserted one per call by 8 concurrent producers
//! through the batched writer, timed until `flush` returns.
//!
//! Runs on SQLite (temp file) and, when `CHORUS_TEST_POSTGRES_URL` is set, on
//! PostgreSQL (in a scratch schema that is dropped afterwards).
//!
//! `cargo bench -p chorus-orchestrator --bench ledger_throughput`

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use chorus_orchestrator::ledger::{
    Ledger, LedgerError, NewRun, NewTrajectory, RunStatus, Timings, TrajectoryStatus,
};
use chorus_proto::v1::FinishReason;

const TRAJECTORIES: usize = 20_000;
const PRODUCERS: usize = 8;
const PROMPT_TOKENS: u32 = 256;
const COMPLETION_TOKENS: u32 = 512;

fn trajectory(run_id: &str, i: usize) -> NewTrajectory {
    NewTrajectory {
        id: format!("{run_id}-t{i}"),
        run_id: run_id.to_owned(),
        prompt_id: format!("{run_id}-p{}", i / 8),
        group_id: format!("{run_id}-g{}", i / 8),
        environment: if i.is_multiple_of(3) { "code" } else { "math" }.to_owned(),
        worker_id: format!("worker-{}", i % 4),
        prompt_token_ids: (0..PROMPT_TOKENS).map(|t| t * 7 + i as u32).collect(),
        completion_token_ids: (0..COMPLETION_TOKENS).map(|t| t * 13 + i as u32).collect(),
        completion_text: "x".repeat(2 * COMPLETION_TOKENS as usize),
        logprobs: (0..COMPLETION_TOKENS)
            .map(|t| -(t as f32) / 512.0)
            .collect(),
        policy_versions: (0..COMPLETION_TOKENS)
            .map(|t| if t < 300 { 7 } else { 8 })
            .collect(),
        finish_reason: FinishReason::Stop,
        reward: Some((i % 2) as f64),
        reward_components: BTreeMap::from([("correct".to_owned(), (i % 2) as f64)]),
        reason: None,
        status: TrajectoryStatus::Ok,
        timings: Timings {
            queue_ms: 1,
            generate_ms: 900,
            score_ms: 5,
        },
        stage_index: None,
    }
}

async fn bench(label: &str, url: &str) -> Result<(), LedgerError> {
    let ledger = Ledger::open(url).await?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let run_id = format!("bench-{stamp}");
    ledger
        .insert_run(NewRun {
            id: run_id.clone(),
            name: "ledger throughput".into(),
            config_toml: String::new(),
            status: RunStatus::Running,
        })
        .await?;
    ledger.flush().await?;

    // Build the rows first so only the ledger is timed.
    let mut per_producer: Vec<Vec<NewTrajectory>> = vec![Vec::new(); PRODUCERS];
    for i in 0..TRAJECTORIES {
        per_producer[i % PRODUCERS].push(trajectory(&run_id, i));
    }

    let start = Instant::now();
    let producers: Vec<_> = per_producer
        .into_iter()
        .map(|rows| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let mut worst = std::time::Duration::ZERO;
                for t in rows {
                    let call = Instant::now();
                    ledger.insert_trajectories(vec![t]).await?;
                    worst = worst.max(call.elapsed());
                }
                Ok::<_, LedgerError>(worst)
            })
        })
        .collect();
    let mut worst_call = std::time::Duration::ZERO;
    for p in producers {
        worst_call = worst_call.max(p.await.expect("producer panicked")?);
    }
    let enqueued = start.elapsed();
    ledger.flush().await?;
    let durable = start.elapsed();

    let stored = ledger
        .trajectory_counts()
        .await?
        .into_iter()
        .find(|c| c.run_id == run_id)
        .map_or(0, |c| c.total);
    assert_eq!(
        stored, TRAJECTORIES as u64,
        "every trajectory must be stored"
    );
    ledger.close().await?;
    println!(
        "{label}: {TRAJECTORIES} trajectories durable in {:.2} s = {:.0} trajectories/s \
         (all enqueued after {:.2} s; slowest insert call {:.1} ms)",
        durable.as_secs_f64(),
        TRAJECTORIES as f64 / durable.as_secs_f64(),
        enqueued.as_secs_f64(),
        worst_call.as_secs_f64() * 1e3,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let dir = tempfile::tempdir()?;
    bench(
        "sqlite",
        &format!("sqlite://{}/ledger.db", dir.path().display()),
    )
    .await?;

    match std::env::var("CHORUS_TEST_POSTGRES_URL") {
        Err(_) => println!("postgres: skipped: CHORUS_TEST_POSTGRES_URL not set"),
        Ok(base) => {
            let schema = format!("chorus_bench_{}", std::process::id());
            let admin = sqlx::PgPool::connect(&base).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&admin)
                .await?;
            let sep = if base.contains('?') { '&' } else { '?' };
            let result = bench(
                "postgres",
                &format!("{base}{sep}options[search_path]={schema}"),
            )
            .await;
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&admin)
                .await?;
            admin.close().await;
            result?;
        }
    }
    Ok(())
}
