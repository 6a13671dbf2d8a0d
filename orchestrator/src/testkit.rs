//! Helpers shared by the crate's unit tests.

use tempfile::TempDir;

use crate::ledger::{LearnerStep, Ledger, NewRun, RunStatus};

/// A SQLite ledger in a fresh temporary directory (kept alive by the returned guard) holding
/// one running run, `run_id`.
pub(crate) async fn ledger_with_run(run_id: &str) -> (TempDir, Ledger) {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", tmp.path().join("ledger.sqlite").display());
    let ledger = Ledger::open(&url).await.unwrap();
    ledger
        .insert_run(NewRun {
            id: run_id.into(),
            name: run_id.into(),
            config_toml: String::new(),
            status: RunStatus::Running,
        })
        .await
        .unwrap();
    (tmp, ledger)
}

/// A learner step of run `run_id` publishing version `step`, with no statistics.
pub(crate) fn bare_learner_step(run_id: &str, step: u64) -> LearnerStep {
    LearnerStep {
        run_id: run_id.into(),
        step,
        policy_version: step,
        loss: None,
        kl: None,
        entropy: None,
        grad_norm: None,
        learning_rate: None,
        clip_fraction: None,
        num_tokens: 0,
        num_trajectories: 0,
        mean_abs_logprob_diff: None,
        skip_reason: None,
    }
}
