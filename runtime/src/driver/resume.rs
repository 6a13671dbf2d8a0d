//! Where a run picks up: `chorus run CONFIG --resume` after a crash continues the unfinished run
//! of the config's name from the learner's newest checkpoint (or, when the crash came before the
//! running stage's first one, from the checkpoint of the stage before it). Stages the ledger
//! records as succeeded are not run again; the ledger is rewound to the version the learner
//! continues from, so no prompt stays consumed by an update that was lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chorus_learner::checkpoints;
use chorus_orchestrator::ledger::{Ledger, RunStatus, StageRecord, StageStatus};

use crate::error::{Result, RunError};
use crate::plan::RunPlan;

/// Where the run's learner checkpoints go, under its output directory.
pub(crate) const LEARNER_CHECKPOINTS: &str = "learner-checkpoints";
/// The run's held-out measurements, one JSON line each, under its output directory.
pub(crate) const MEASUREMENTS_FILE: &str = "evaluations.jsonl";
/// The ledger event a resume records.
const RESUMED_EVENT: &str = "resumed";

/// What the learner starts from.
#[derive(Clone, Debug, PartialEq)]
pub enum LearnerFrom {
    /// The plan's model (its checkpoint or a seeded initialisation), at version 0.
    Plan,
    /// A learner checkpoint (weights, optimizer state, counters).
    Checkpoint(PathBuf),
    /// A policy checkpoint in HF layout, numbered as `version`, with a fresh optimizer.
    Weights {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The policy version its weights are.
        version: u64,
    },
}

/// A run picked up where it stopped.
#[derive(Clone, Debug)]
pub struct Resumed {
    /// The run's id in the ledger.
    pub run_id: String,
    /// The stages the ledger recorded, by index.
    pub stages: BTreeMap<usize, StageRecord>,
    /// The policy version the run continues from.
    pub version: u64,
    /// Times the run has been resumed, this one included.
    pub restart: u32,
    /// What the learner starts from.
    pub learner: LearnerFrom,
    /// Where the run's files are: `<runs>/<name>/`, or `<runs>/<name>/<run id>/` for a run
    /// that started while another run of its name was writing to `<runs>/<name>/`.
    pub files: PathBuf,
}

impl Resumed {
    /// Whether stage `i` finished before the crash.
    pub fn finished(&self, i: usize) -> bool {
        self.stages
            .get(&i)
            .is_some_and(|s| s.status == StageStatus::Succeeded)
    }

    /// The version stage `i` began at, when it began before the crash.
    pub fn first_version(&self, i: usize) -> Option<u64> {
        self.stages.get(&i).map(|s| s.stage.first_step)
    }
}

/// Finds the unfinished run of `plan`'s name in the ledger at `db`, decides where it continues
/// (see the module docs) and rewinds the ledger to that version.
/// `first_stage` is where the run began (`--from-stage`, given again).
pub(crate) async fn prepare(
    plan: &RunPlan,
    db: &str,
    out_dir: &Path,
    first_stage: usize,
) -> Result<Resumed> {
    let ledger = Ledger::open(db).await.map_err(RunError::ledger(db))?;
    let resumed = decide(plan, &ledger, db, out_dir, first_stage).await;
    let closed = ledger.close().await.map_err(RunError::ledger(db));
    let resumed = resumed?;
    closed?;
    Ok(resumed)
}

async fn decide(
    plan: &RunPlan,
    ledger: &Ledger,
    db: &str,
    out_dir: &Path,
    first_stage: usize,
) -> Result<Resumed> {
    let name = &plan.config.name;
    let runs = ledger
        .list_runs(u32::MAX)
        .await
        .map_err(RunError::ledger(db))?;
    let run = runs.into_iter().find(|r| &r.name == name).ok_or_else(|| {
        RunError::Invalid(format!(
            "--resume: the ledger {db} has no run named `{name}`; start it without --resume"
        ))
    })?;
    if run.status == RunStatus::Succeeded {
        return Err(RunError::Invalid(format!(
            "--resume: run {} (`{name}`) already succeeded; start a new run without --resume",
            run.id
        )));
    }
    if run.config_toml != plan.config_toml {
        return Err(RunError::Invalid(format!(
            "--resume: the config differs from the one run {} started with (recorded in the \
             ledger's runs.config_toml); resume with that config, or start a new run",
            run.id
        )));
    }
    let stages: BTreeMap<usize, StageRecord> = ledger
        .list_stages(&run.id)
        .await
        .map_err(RunError::ledger(db))?
        .into_iter()
        .map(|s| (s.stage.stage_index as usize, s))
        .collect();
    // The first stage not finished, and the version it began (or will begin) at.
    let count = plan.config.stages.len();
    let unfinished = (first_stage..count)
        .find(|i| {
            stages
                .get(i)
                .is_none_or(|s| s.status != StageStatus::Succeeded)
        })
        .unwrap_or(count);
    let previous = unfinished
        .checked_sub(1)
        .filter(|&p| p >= first_stage)
        .and_then(|p| stages.get(&p));
    let floor = match (stages.get(&unfinished), previous) {
        (Some(s), _) => s.stage.first_step,
        (None, Some(p)) => p.last_step.unwrap_or(p.stage.first_step),
        (None, None) => 0,
    };
    let files = Some(out_dir.join(&run.id))
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| out_dir.to_path_buf());
    let dir = files.join(LEARNER_CHECKPOINTS);
    // A checkpoint can reach the disk before the ledger's batched rows of its step do (the
    // learner saves, the orchestrator records): resuming from one ahead of the ledger would lose
    // those steps' rows for good. So resume from the newest checkpoint the ledger has recorded
    // every step of, and train the steps after it again.
    let recorded = ledger
        .list_learner_steps(&run.id)
        .await
        .map_err(RunError::ledger(db))?
        .iter()
        .map(|s| s.step.step)
        .max()
        .unwrap_or(0);
    let saved = checkpoints::list(&dir)?;
    let latest = newest_recorded(&saved, recorded);
    if let Some((v, _)) = &latest
        && *v > recorded
    {
        tracing::warn!(
            run_id = run.id,
            checkpoint = v,
            recorded,
            "every learner checkpoint is ahead of the ledger (last step recorded: {recorded}); \
             resuming from version {v} loses the ledger rows of steps {} to {v}",
            recorded + 1
        );
    }
    let (version, learner) = match (latest, previous) {
        (Some((v, path)), _) if v >= floor => (v, LearnerFrom::Checkpoint(path)),
        (_, Some(p)) => {
            let path = p.checkpoint_path.clone().ok_or_else(|| {
                RunError::Invalid(format!(
                    "--resume: stage `{}` succeeded but the ledger has no checkpoint for it",
                    p.stage.name
                ))
            })?;
            (
                floor,
                LearnerFrom::Weights {
                    dir: PathBuf::from(path),
                    version: floor,
                },
            )
        }
        (_, None) => (0, LearnerFrom::Plan),
    };
    let restart = next_restart(ledger, db, &run.id).await?;
    let reason = format!(
        "lost in a crash: the run resumed (restart {restart}) from policy version {version}"
    );
    ledger
        .rewind(&run.id, version, &reason)
        .await
        .map_err(RunError::ledger(db))?;
    let from = match &learner {
        LearnerFrom::Plan => "the config's model".to_string(),
        LearnerFrom::Checkpoint(p) | LearnerFrom::Weights { dir: p, .. } => p.display().to_string(),
    };
    ledger
        .record_event(
            &run.id,
            RESUMED_EVENT,
            serde_json::json!({ "version": version, "from": from, "restart": restart }).to_string(),
        )
        .await
        .map_err(RunError::ledger(db))?;
    tracing::info!(
        run_id = run.id,
        version,
        restart,
        "resuming run {} from version {version} ({from}); stages already done: {}",
        run.id,
        (first_stage..unfinished)
            .map(|i| plan.config.stages[i].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Resumed {
        run_id: run.id,
        stages,
        version,
        restart,
        learner,
        files,
    })
}

/// Picks up run `run_id` in the ledger at `db` for an orchestrator restarted on it while its
/// learner lived on (`chorus serve orchestrator` started again with the same run id and
/// ledger): the learner, already brought to `version` and its untrained groups dropped
/// (`take_over_learner`), decides where the run continues; the ledger is rewound there, so the
/// prompts that were in flight or held for untrained steps become `dropped` and those steps are
/// sent anew with ids carrying the restart.
pub async fn rejoin(
    plan: &RunPlan,
    ledger: &Ledger,
    db: &str,
    run_id: &str,
    version: u64,
    files: &Path,
) -> Result<Resumed> {
    let run = ledger
        .get_run(run_id)
        .await
        .map_err(RunError::ledger(db))?
        .ok_or_else(|| RunError::Invalid(format!("run {run_id} is not in the ledger {db}")))?;
    if run.status == RunStatus::Succeeded {
        return Err(RunError::Invalid(format!(
            "run {run_id} already succeeded in the ledger {db}; give a new run another --run-id"
        )));
    }
    if run.config_toml != plan.config_toml {
        return Err(RunError::Invalid(format!(
            "run {run_id} started with another config (recorded in the ledger's runs.config_toml); \
             restart its orchestrator with that config, or give a new run another --run-id"
        )));
    }
    let stages: BTreeMap<usize, StageRecord> = ledger
        .list_stages(run_id)
        .await
        .map_err(RunError::ledger(db))?
        .into_iter()
        .map(|s| (s.stage.stage_index as usize, s))
        .collect();
    let restart = next_restart(ledger, db, run_id).await?;
    let reason = format!(
        "lost with the orchestrator: the run was picked up (restart {restart}) at policy version \
         {version}"
    );
    ledger
        .rewind(run_id, version, &reason)
        .await
        .map_err(RunError::ledger(db))?;
    ledger
        .record_event(
            run_id,
            RESUMED_EVENT,
            serde_json::json!({ "version": version, "from": "the learner", "restart": restart })
                .to_string(),
        )
        .await
        .map_err(RunError::ledger(db))?;
    ledger.flush().await.map_err(RunError::ledger(db))?;
    tracing::warn!(
        run_id,
        version,
        restart,
        "picking run {run_id} up at policy version {version}, where its learner is (restart \
         {restart})"
    );
    Ok(Resumed {
        run_id: run_id.to_string(),
        stages,
        version,
        restart,
        learner: LearnerFrom::Plan,
        files: files.to_path_buf(),
    })
}

/// The number of this restart of run `run_id`: one more than the `resumed` events it has.
async fn next_restart(ledger: &Ledger, db: &str, run_id: &str) -> Result<u32> {
    let events = ledger
        .list_events(run_id, 0, u32::MAX)
        .await
        .map_err(RunError::ledger(db))?;
    Ok(1 + events.iter().filter(|e| e.kind == RESUMED_EVENT).count() as u32)
}

/// The checkpoint to resume from: the newest of `saved` (version, directory; oldest first) whose
/// version the ledger has recorded every step of (`recorded`, the last step it holds), else the
/// newest of all.
fn newest_recorded(saved: &[(u64, PathBuf)], recorded: u64) -> Option<(u64, PathBuf)> {
    saved
        .iter()
        .rev()
        .find(|(v, _)| *v <= recorded)
        .or(saved.last())
        .cloned()
}

#[cfg(test)]
mod checkpoint_choice_tests {
    use super::*;

    #[test]
    fn a_checkpoint_ahead_of_the_ledger_is_passed_over_for_one_it_recorded() {
        let saved = |vs: &[u64]| -> Vec<(u64, PathBuf)> {
            vs.iter()
                .map(|v| (*v, PathBuf::from(format!("v{v}"))))
                .collect()
        };
        // Killed after version 12 was saved but before the ledger recorded step 12.
        assert_eq!(newest_recorded(&saved(&[9, 12]), 11).unwrap().0, 9);
        assert_eq!(newest_recorded(&saved(&[9, 12]), 12).unwrap().0, 12);
        assert_eq!(newest_recorded(&saved(&[9, 12]), 14).unwrap().0, 12);
        // Nothing recorded that far: the newest, with the loss warned about.
        assert_eq!(newest_recorded(&saved(&[12]), 11).unwrap().0, 12);
        assert_eq!(newest_recorded(&[], 11), None);
    }
}
