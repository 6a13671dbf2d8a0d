//! The learner's error type.

use std::path::PathBuf;

/// Errors from training steps, optimizer state and learner checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// A batch is malformed (lengths disagree, token ids out of range, …).
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A learner setting is out of range; names the setting.
    #[error("learner setting `{key}`: {message}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with its value.
        message: String,
    },
    /// A learner checkpoint is missing a file or holds something unexpected.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is missing or unexpected.
        message: String,
    },
    /// The model failed (building the policy, loading or saving its weights).
    #[error(transparent)]
    Model(#[from] chorus_model::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub(crate) fn config_err(key: &str, message: impl Into<String>) -> LearnerError {
    LearnerError::Config {
        key: key.into(),
        message: message.into(),
    }
}

/// Result with [`LearnerError`].
pub type Result<T> = std::result::Result<T, LearnerError>;
