//! Rolling learner checkpoints for resuming a run after a crash: the trainer (HF weights,
//! optimizer state, counters and stage, and the KL reference while a KL-penalised stage holds
//! one) saved every `every` policy versions, and at each stage boundary, into
//! `<dir>/version-<N>/`, the newest `keep` kept.
//!
//! A checkpoint is written into `version-<N>.partial/` and renamed into place once complete, so
//! a crash while saving never leaves a directory [`latest`] would pick.

use std::path::{Path, PathBuf};

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

/// Saves `trainer` at its current version (unless that version is saved already) and removes
/// all but the newest `policy.keep` checkpoints. Returns the checkpoint's directory.
pub fn save(trainer: &Trainer, policy: &CheckpointPolicy) -> Result<PathBuf> {
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
            save(&t, &policy).unwrap();
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
}
