//! The one error type of this crate. Malformed *model output* is never an error (it scores 0 with
//! a reason); these errors are about tasks, datasets, configuration and lookups.

use std::path::PathBuf;

use crate::Split;

/// Everything that can go wrong outside of scoring a model's output.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A registry lookup for a name nobody registered.
    #[error("unknown environment `{name}`; known environments: {}", known.join(", "))]
    UnknownEnvironment {
        /// The name asked for.
        name: String,
        /// Every registered name, sorted.
        known: Vec<String>,
    },
    /// Two environments registered under one name.
    #[error("an environment named `{0}` is already registered")]
    DuplicateEnvironment(String),
    /// A split name other than `train` / `heldout`.
    #[error("unknown split `{0}`; expected `train` or `heldout`")]
    UnknownSplit(String),
    /// A task handed to an environment other than the one that made it.
    #[error("environment `{env}` cannot handle task {task_id} of environment `{task_env}`")]
    WrongEnvironment {
        /// The environment asked to handle the task.
        env: String,
        /// The environment named in the task.
        task_env: String,
        /// The task's id.
        task_id: String,
    },
    /// The task's private verification data does not decode to what its environment expects.
    #[error("task {task_id} of `{env}` has malformed verification data: {source}")]
    BadVerification {
        /// The environment.
        env: String,
        /// The task's id.
        task_id: String,
        /// Why decoding failed.
        #[source]
        source: serde_json::Error,
    },
    /// Sampling drew no task that belongs to the requested split (the task space at this
    /// difficulty is too small, or the dataset has no rows in that split).
    #[error(
        "`{env}` found no {split} task at difficulty {difficulty} for seed {seed} after {attempts} attempts"
    )]
    SplitExhausted {
        /// The environment.
        env: String,
        /// The requested split.
        split: Split,
        /// The requested difficulty.
        difficulty: u32,
        /// The seed.
        seed: u64,
        /// How many candidates were drawn.
        attempts: usize,
    },
    /// A task's verification data could not be turned into JSON.
    #[error("`{env}` could not serialise verification data: {source}")]
    Serialize {
        /// The environment.
        env: String,
        /// The serialiser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A dataset file could not be read.
    #[error("reading dataset {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset row is malformed.
    #[error("{source_name} line {line}: {message}")]
    DatasetRow {
        /// The file (or a label for in-memory text).
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// IFEval rows use instruction ids this crate cannot verify.
    #[error(
        "unsupported IFEval instruction ids: {}; supported ids: {}",
        unsupported.join(", "),
        supported.join(", ")
    )]
    UnsupportedInstructions {
        /// The ids found in the data that have no checker here.
        unsupported: Vec<String>,
        /// The ids this crate supports.
        supported: Vec<String>,
    },
    /// The environment cannot produce a reference solution for this task.
    #[error("`{env}` has no reference solution for task {task_id}: {reason}")]
    NoReference {
        /// The environment.
        env: String,
        /// The task's id.
        task_id: String,
        /// Why not.
        reason: String,
    },
    /// `step` was called on an episode that has already ended.
    #[error("episode of task {task_id} has already finished")]
    EpisodeFinished {
        /// The task's id.
        task_id: String,
    },
    /// The episode state does not belong to this environment or is corrupt.
    #[error("episode of task {task_id} has malformed state: {message}")]
    BadEpisodeState {
        /// The task's id.
        task_id: String,
        /// What is wrong.
        message: String,
    },
    /// A call to an environment on the far side of a wire (a gRPC plugin, a NeMo Gym server)
    /// failed: unreachable, timed out, refused the token or answered with an error.
    #[error("environment server {url}: {call}: {message}")]
    Remote {
        /// The server's address.
        url: String,
        /// What was being done (`Sample`, `POST /verify`…).
        call: String,
        /// What went wrong.
        message: String,
    },
    /// An environment was configured with impossible settings.
    #[error("invalid configuration for `{env}`: {message}")]
    InvalidConfig {
        /// The environment.
        env: String,
        /// What is wrong.
        message: String,
    },
}
