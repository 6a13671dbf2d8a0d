//! Test helpers shared by the built-in environments' tests.

use std::collections::BTreeSet;

use crate::check::{CheckOptions, check_environment};
use crate::env::Environment;
use crate::task::{Split, Task};

/// Runs the full self-check at `difficulties` and fails with every failure listed.
pub(crate) fn assert_self_check_passes(
    env: &dyn Environment,
    difficulties: &[u32],
    tasks_per_split: usize,
) {
    let options = CheckOptions {
        tasks_per_split,
        difficulties: Some(difficulties.to_vec()),
        base_seed: 11,
    };
    let report = check_environment(env, &options);
    assert!(
        report.passed,
        "{} failed its self-check: {:#?}",
        report.env, report.failures
    );
    assert_eq!(
        report.tasks_checked,
        2 * tasks_per_split * difficulties.len()
    );
}

/// Samples `count` seeds per split and asserts no prompt appears in both, and that different
/// seeds give some variety.
pub(crate) fn assert_splits_disjoint(env: &dyn Environment, difficulty: u32, count: u64) {
    let prompts = |split: Split| -> BTreeSet<String> {
        (0..count)
            .map(|seed| env.sample(seed, split, difficulty).unwrap().prompt_text())
            .collect()
    };
    let (train, heldout) = (prompts(Split::Train), prompts(Split::Heldout));
    assert!(
        train.is_disjoint(&heldout),
        "{:?}",
        train.intersection(&heldout).next()
    );
    assert!(
        train.len() > 1 && heldout.len() > 1,
        "no variety: {} / {}",
        train.len(),
        heldout.len()
    );
}

/// The task for `seed` in train at `difficulty`.
pub(crate) fn train_task(env: &dyn Environment, seed: u64, difficulty: u32) -> Task {
    env.sample(seed, Split::Train, difficulty).unwrap()
}

/// The reward of `completion` on `task`.
pub(crate) fn reward(env: &dyn Environment, task: &Task, completion: &str) -> f64 {
    env.score(task, completion).unwrap().reward
}

/// Runs a request with the host's `python3` in a temporary directory, without the sandbox:
/// tests generators, tests and runner scripts apart from the sandbox.
pub(crate) fn run_directly(
    request: &crate::sandbox::SandboxRequest,
) -> Result<crate::sandbox::Outcome, String> {
    use std::io::Write;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    for (path, bytes) in &request.files {
        std::fs::write(dir.path().join(path), bytes).map_err(|e| e.to_string())?;
    }
    // The interpreter the sandbox found (no shell shims), else whatever `python3` is.
    let python = crate::sandbox::shared()
        .map(|sandbox| sandbox.python().to_string())
        .unwrap_or_else(|_| "python3".into());
    let mut child = std::process::Command::new(python)
        .args(&request.argv[1..])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(&request.stdin)
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(crate::sandbox::Outcome {
        termination: crate::sandbox::Termination::Exited(output.status.code().unwrap_or(-1)),
        stdout: output.stdout,
        stderr: output.stderr,
        wall: std::time::Duration::ZERO,
        backend: crate::sandbox::Backend::Namespaces,
    })
}
