//! Rolling learner checkpoints for resuming a run after a crash: the trainer (HF weights,
//! optimizer state, counters and stage, and the KL reference while a KL-penalised stage holds
//! one) saved every `every` policy versions, and at each stage boundary, into
//! `<dir>/version-<N>/`, the newest `keep` kept.
//!
//! A checkpoint is written into `version-<N>.partial/` and renamed into place once complete, so
//! a crash while saving never leaves a directory [`latest`] would pick.
//!
//! Each checkpoint also holds the learner's newest step reports (the one of its own version
//! included, [`KEPT_REPORTS`] at most, in `step_reports.bin`): a learner that dies after saving
//! but before its reports reach the orchestrator replays them once restarted, so the ledger
//! still records every step the restarted learner stands on.

use std::path::{Path, PathBuf};

use chorus_proto::prost::Message;
use chorus_proto::v1::StepReport;

use crate::error::{LearnerError, Result};
use crate::trainer::Trainer;

/// When and where the learner saves itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// The directory of the run's learner checkpoints.
    pub dir: PathBuf,
    /// Save after every `every`-th policy version (0: only at stage boundaries).
    pub every: u64,
    /// Complete checkpoints kept (the oldest are removed; at least 1).
    pub keep: usize,
}

const PREFIX: &str = "version-";
const PARTIAL: &str = ".partial";
/// The file of a checkpoint's step reports: each a little-endian `u32` length, then the
/// encoded `StepReport`.
pub const REPORTS_FILE: &str = "step_reports.bin";
/// Step reports a checkpoint keeps, the newest. Only those still in flight when a learner
/// died are ever missing at the orchestrator; this bounds the file on long runs.
pub const KEPT_REPORTS: usize = 256;

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> LearnerError {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| LearnerError::Checkpoint {
        path,
        message: format!("{what}: {e}"),
    }
}

/// The complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut found = vec![];
    for entry in std::fs::read_dir(dir).map_err(io(dir, "listing checkpoints"))? {
        let entry = entry.map_err(io(dir, "listing checkpoints"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(version) = name
            .strip_prefix(PREFIX)
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(crate::trainer::STATE_FILE).is_file() {
            found.push((version, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint in `dir`: its policy version and directory.
pub fn latest(dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(dir)?.pop())
}

/// Saves `trainer` at its current version (unless that version is saved already), with the
/// newest of `reports` (the learner's step reports up to this version, oldest first), and
/// removes all but the newest `policy.keep` checkpoints. Returns the checkpoint's directory.
pub fn save(
    trainer: &Trainer,
    policy: &CheckpointPolicy,
    reports: &[StepReport],
) -> Result<PathBuf> {
    let version = trainer.version();
    let name = format!("{PREFIX}{version:08}");
    let target = policy.dir.join(&name);
    if target.join(crate::trainer::STATE_FILE).is_file() {
        return Ok(target);
    }
    let partial = policy.dir.join(format!("{name}{PARTIAL}"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial, "removing a partial save"))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial, "creating"))?;
    trainer.save(&partial)?;
    let newest = &reports[reports.len().saturating_sub(KEPT_REPORTS)..];
    let mut bytes = Vec::new();
    for report in newest {
        bytes.extend_from_slice(&(report.encoded_len() as u32).to_le_bytes());
        report
            .encode(&mut bytes)
            .expect("a Vec grows to hold the message");
    }
    let file = partial.join(REPORTS_FILE);
    std::fs::write(&file, bytes).map_err(io(&file, "writing the step reports"))?;
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io(&target, "replacing an incomplete save"))?;
    }
    std::fs::rename(&partial, &target).map_err(io(&target, "moving the save into place"))?;
    let all = list(&policy.dir)?;
    let excess = all.len().saturating_sub(policy.keep.max(1));
    for (_, old) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&old).map_err(io(&old, "removing an old checkpoint"))?;
    }
    Ok(target)
}

/// The step reports saved with the checkpoint in `dir`, oldest first; none for a checkpoint
/// saved before checkpoints held them.
pub fn load_reports(dir: &Path) -> Result<Vec<StepReport>> {
    let file = dir.join(REPORTS_FILE);
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(&file, "reading the step reports")(e)),
    };
    let corrupt = |what: String| LearnerError::Checkpoint {
        path: file.clone(),
        message: format!("corrupt step reports: {what}"),
    };
    let mut reports = vec![];
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let (len, body) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt(format!("{} bytes left, a length takes 4", rest.len())))?;
        let len = u32::from_le_bytes(*len) as usize;
        if body.len() < len {
            return Err(corrupt(format!(
                "a report of {len} bytes, {} left",
                body.len()
            )));
        }
        let report = StepReport::decode(&body[..len]).map_err(|e| corrupt(e.to_string()))?;
        reports.push(report);
        rest = &body[len..];
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::LearnerConfig;
    use candle_core::Device;
    use chorus_model::checkpoint::init_params;

    fn trainer() -> Trainer {
        let cfg = chorus_model::NemotronHConfig::from_json_str(
            r#"{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 16,
            "hybrid_override_pattern": "M*", "mamba_num_heads": 2, "mamba_head_dim": 8,
            "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}"#,
        )
        .unwrap();
        let params = init_params(&cfg, 0, &Device::Cpu).unwrap();
        Trainer::new(cfg, params, LearnerConfig::default()).unwrap()
    }

    #[test]
    fn saves_roll_and_the_newest_complete_one_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy {
            dir: dir.path().join("learner"),
            every: 1,
            keep: 2,
        };
        assert_eq!(latest(&policy.dir).unwrap(), None);
        let mut t = trainer();
        for _ in 0..3 {
            save(&t, &policy, &[]).unwrap();
            t.skip_to_version(t.version() + 1);
        }
        let versions: Vec<u64> = list(&policy.dir).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(versions, [1, 2], "the newest two are kept");
        // A save cut short leaves only a partial directory, which is never picked.
        std::fs::create_dir_all(policy.dir.join("version-00000009.partial")).unwrap();
        std::fs::create_dir_all(policy.dir.join("version-00000008")).unwrap();
        let (v, path) = latest(&policy.dir).unwrap().unwrap();
        assert_eq!(v, 2);
        let resumed = Trainer::resume(&path, &Device::Cpu).unwrap();
        assert_eq!(resumed.version(), 2);
    }

    #[test]
    fn the_newest_step_reports_are_saved_with_a_checkpoint_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy {
            dir: dir.path().join("learner"),
            every: 1,
            keep: 1,
        };
        let reports: Vec<StepReport> = (1..=KEPT_REPORTS as u64 + 10)
            .map(|step| StepReport {
                run_id: "r".into(),
                step,
                policy_version: step,
                loss: step as f64 / 10.0,
                group_ids: vec![format!("g{step}")],
                ..Default::default()
            })
            .collect();
        let path = save(&trainer(), &policy, &reports).unwrap();
        let back = load_reports(&path).unwrap();
        assert_eq!(back.len(), KEPT_REPORTS);
        assert_eq!(back, reports[10..], "the newest, oldest first");
        // A checkpoint from before reports were saved has none; a torn file is an error.
        std::fs::remove_file(path.join(REPORTS_FILE)).unwrap();
        assert!(load_reports(&path).unwrap().is_empty());
        std::fs::write(path.join(REPORTS_FILE), [200, 0, 0, 0, 1, 2]).unwrap();
        let err = load_reports(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt step reports"), "{err}");
    }
}
