//! Helpers shared by the crate's unit tests.

use tempfile::TempDir;

use crate::ledger::{Ledger, NewRun, RunStatus};

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
