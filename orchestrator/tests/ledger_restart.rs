//! PostgreSQL restarted while a run writes: the ledger writer holds its batch, tries again with
//! backoff, writers wait (the queue is bounded), and no row is lost. A test binary of its own,
//! because restarting the server would break the other suites' connections.
//!
//! Needs `CHORUS_TEST_POSTGRES_URL` and `pg_ctlcluster` (Debian's PostgreSQL, as `.ci/run` starts
//! it); skipped without them, failing under CI.

#[path = "support/postgres.rs"]
mod support_postgres;
#[path = "support/schema.rs"]
mod support_schema;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chorus_orchestrator::ledger::{LearnerStep, Ledger, LedgerOptions, NewRun, RunStatus};
use support_postgres::postgres_url_or_skip;
use support_schema::{drop_schema, fresh_schema};

const STEPS: u64 = 1000;

async fn postmaster_start(url: &str) -> String {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let (t,): (String,) = sqlx::query_as("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_while_a_run_writes_loses_no_row() {
    let Some(base) = postgres_url_or_skip("ledger_restart") else {
        return;
    };
    let cluster = std::process::Command::new("pg_ctlcluster")
        .arg("--help")
        .output();
    if cluster.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "pg_ctlcluster is missing under CI, where .ci/run starts PostgreSQL with it"
        );
        eprintln!("SKIPPED: ledger_restart (no pg_ctlcluster to restart PostgreSQL with)");
        return;
    }
    let (url, schema) = fresh_schema(&base).await;
    let ledger = Ledger::open_with(
        &url,
        LedgerOptions {
            queue_capacity: 8,
            max_batch_rows: 4,
            flush_interval: Duration::from_millis(10),
            max_connections: 2,
            retry_for: Duration::from_secs(120),
            // Shorter than the outage below, so that writes fail and must be held and retried
            // (a pool waits this long for a connection before it gives up).
            acquire_timeout: Duration::from_millis(500),
        },
    )
    .await
    .unwrap();
    ledger
        .insert_run(NewRun {
            id: "r".into(),
            name: "r".into(),
            config_toml: String::new(),
            status: RunStatus::Running,
        })
        .await
        .unwrap();
    ledger.flush().await.unwrap();
    let before = postmaster_start(&base).await;

    let enqueued = Arc::new(AtomicU64::new(0));
    let writer = {
        let (ledger, enqueued) = (ledger.clone(), enqueued.clone());
        tokio::spawn(async move {
            for step in 1..=STEPS {
                ledger
                    .insert_learner_step(LearnerStep {
                        run_id: "r".into(),
                        step,
                        policy_version: step,
                        loss: Some(step as f64),
                        kl: None,
                        entropy: None,
                        grad_norm: None,
                        learning_rate: None,
                        clip_fraction: None,
                        num_tokens: 1,
                        num_trajectories: 1,
                        mean_abs_logprob_diff: None,
                        skip_reason: None,
                    })
                    .await
                    .unwrap();
                enqueued.store(step, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Stop the server once writes are flowing, keep it down for 3 s, start it again.
    while enqueued.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cluster = |action: &'static str| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("pg_ctlcluster")
                .args(["15", "main", action])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "pg_ctlcluster {action}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
    };
    cluster("stop").await.unwrap();
    let at_stop = enqueued.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_down = enqueued.load(Ordering::SeqCst) - at_stop;
    cluster("start").await.unwrap();
    assert!(at_stop < STEPS, "the writes ended before the outage");
    // Backpressure: with the batch held, the bounded queue fills and writers wait.
    assert!(
        while_down <= 16,
        "{while_down} writes were accepted while the database was down"
    );
    writer.await.unwrap();
    ledger.flush().await.expect("every held write committed");
    assert_ne!(
        postmaster_start(&base).await,
        before,
        "PostgreSQL did not restart"
    );
    let steps = ledger.list_learner_steps("r").await.unwrap();
    assert_eq!(steps.len() as u64, STEPS, "rows lost across the restart");
    assert!(
        steps
            .iter()
            .enumerate()
            .all(|(i, s)| s.step.step == i as u64 + 1),
        "steps out of order or duplicated"
    );
    ledger.close().await.unwrap();
    drop_schema(&base, &schema).await;
}
