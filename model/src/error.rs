//! The crate's error type: every variant names what was wrong (a config key, a tensor, a file).

use std::path::PathBuf;

/// Errors from loading, building, running or saving a policy model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A `config.json` key is missing, malformed or has a value Chorus does not support.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The key, as written in `config.json`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("checkpoint has no tensor `{name}`")]
    MissingTensor {
        /// The tensor's HF name.
        name: String,
    },
    /// A checkpoint tensor has the wrong shape for the config.
    #[error("tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    Shape {
        /// The tensor's HF name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A file exists but its contents are not what they should be.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        message: String,
    },
    /// A tokenizer could not be loaded, built or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request to the model is invalid (a token id out of range, an empty prompt, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the error is about the model configuration.
    pub fn is_config(&self) -> bool {
        matches!(self, ModelError::Config { .. })
    }
}

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
