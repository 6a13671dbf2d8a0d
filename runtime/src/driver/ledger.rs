//! The ledger side of a run's life: recorded as running when it starts, succeeded only once its
//! summary is written, failed when it stops on an error.

use chorus_orchestrator::ledger::{Ledger, NewRun, RunStatus};

use crate::error::{Result, RunError};

/// A run's row in the ledger, from `running` to its final status.
pub(crate) struct RunRecord {
    /// The ledger, shared with the scheduler.
    pub(crate) ledger: Ledger,
    /// Its URL, for messages.
    pub(crate) db: String,
    run_id: String,
}

impl RunRecord {
    /// Opens the ledger at `db` and records run `run_id` as running. A run already in the
    /// ledger (`recorded`: launched, pending, or resumed) gets its status changed; a new one is
    /// inserted, and refused if its id is taken.
    pub(crate) async fn start(
        db: &str,
        run_id: &str,
        name: &str,
        config_toml: &str,
        recorded: bool,
    ) -> Result<Self> {
        let ledger = Ledger::open(db).await.map_err(RunError::ledger(db))?;
        if recorded {
            let found = ledger.get_run(run_id).await.map_err(RunError::ledger(db))?;
            if found.is_none() {
                return Err(RunError::Invalid(format!(
                    "run {run_id} is not in the ledger {db}, which should already hold it"
                )));
            }
        } else {
            ledger
                .insert_run(NewRun {
                    id: run_id.to_string(),
                    name: name.to_string(),
                    config_toml: config_toml.to_string(),
                    status: RunStatus::Running,
                })
                .await
                .map_err(RunError::ledger(db))?;
            ledger.flush().await.map_err(|e| {
                RunError::Invalid(format!(
                    "run {run_id} could not be recorded in the ledger {db} (is a run with this \
                     id already there? give the run another id): {e}"
                ))
            })?;
        }
        ledger
            .set_run_status(run_id, RunStatus::Running)
            .await
            .map_err(RunError::ledger(db))?;
        Ok(Self {
            ledger,
            db: db.to_string(),
            run_id: run_id.to_string(),
        })
    }

    /// Everything written so far is durable.
    pub(crate) async fn flush(&self) -> Result<()> {
        self.ledger
            .flush()
            .await
            .map_err(RunError::ledger(&self.db))
    }

    /// The run succeeded: durable before it returns, so a client told so finds it so.
    pub(crate) async fn succeed(&self) -> Result<()> {
        self.ledger
            .set_run_status(&self.run_id, RunStatus::Succeeded)
            .await
            .map_err(RunError::ledger(&self.db))?;
        self.flush().await
    }

    /// The run stopped on an error; best effort, since the caller reports the error itself.
    pub(crate) async fn fail(&self) {
        if let Err(e) = self
            .ledger
            .set_run_status(&self.run_id, RunStatus::Failed)
            .await
        {
            tracing::warn!(run_id = self.run_id, error = %e, "could not mark the run failed");
        }
        let _ = self
            .ledger
            .drop_in_flight(&self.run_id, "in flight when the run failed")
            .await;
        let _ = self.ledger.flush().await;
    }

    /// Closes the ledger's connections.
    pub(crate) async fn close(&self) -> Result<()> {
        self.ledger
            .close()
            .await
            .map_err(RunError::ledger(&self.db))
    }
}
