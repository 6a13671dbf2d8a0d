//! The one error type of the runtime: each variant names the part of the run that failed and
//! carries the underlying typed error, so callers can tell a bad config from a lost learner.

use chorus_environments::EnvError;
use chorus_learner::LearnerError;
use chorus_model::ModelError;
use chorus_orchestrator::WaitError;
use chorus_orchestrator::config::ConfigError;
use chorus_orchestrator::ledger::LedgerError;
use chorus_orchestrator::remote::ConnectError;
use chorus_orchestrator::scheduler::{LearningError, SchedulerError};
use chorus_proto::auth::TokenError;
use chorus_rollout_worker::FetchError;

/// Why a run (or one of its services) could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The run config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run's settings contradict each other or the command line.
    #[error("{0}")]
    Invalid(String),
    /// The policy's architecture, checkpoint or tokenizer could not be loaded.
    #[error("the policy: {0}")]
    Model(#[from] ModelError),
    /// The learner could not be built or stopped working.
    #[error("the learner: {0}")]
    Learner(#[from] LearnerError),
    /// The ledger could not be opened, read or written.
    #[error("the ledger {db}: {source}")]
    Ledger {
        /// The ledger's URL.
        db: String,
        /// What went wrong.
        source: LedgerError,
    },
    /// Another service could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A gRPC call to another service failed.
    #[error("{what}: {status}")]
    Rpc {
        /// Which call, to which address.
        what: String,
        /// The status it returned.
        status: Box<chorus_proto::tonic::Status>,
    },
    /// A service address could not be bound or connected.
    #[error("{what}: {source}")]
    Transport {
        /// Which address, for what.
        what: String,
        /// The transport's error.
        source: chorus_proto::tonic::transport::Error,
    },
    /// The shared token is not usable in a gRPC header.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// An environment of the config could not be set up.
    #[error("{at}: {source}")]
    Environment {
        /// Where in the config (`stages[i].environments[j]`).
        at: String,
        /// What went wrong.
        source: EnvError,
    },
    /// A rollout worker could not fetch the learner's weights.
    #[error("rollout worker: {0}")]
    Fetch(#[from] FetchError),
    /// The learner did not take a group, or will not reach a version.
    #[error(transparent)]
    Learning(#[from] LearningError),
    /// The run's learner or workers did not register in time.
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// A stage stopped.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// A service did not register in time, or could not be reached again.
    #[error("{0}")]
    Unavailable(String),
    /// A file or socket could not be used.
    #[error("{what}: {source}")]
    Io {
        /// The file or address, and what was being done with it.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A background task of the run panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Its join error.
        source: tokio::task::JoinError,
    },
}

impl RunError {
    /// An I/O error on `what`.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| RunError::Io { what, source }
    }

    /// A ledger error on the ledger at `db`.
    pub(crate) fn ledger(db: &str) -> impl FnOnce(LedgerError) -> Self + '_ {
        move |source| RunError::Ledger {
            db: db.to_string(),
            source,
        }
    }

    /// A failed gRPC call.
    pub(crate) fn rpc(what: impl Into<String>) -> impl FnOnce(chorus_proto::tonic::Status) -> Self {
        let what = what.into();
        move |status| RunError::Rpc {
            what,
            status: Box::new(status),
        }
    }

    /// A transport error on `what`.
    pub(crate) fn transport(
        what: impl Into<String>,
    ) -> impl FnOnce(chorus_proto::tonic::transport::Error) -> Self {
        let what = what.into();
        move |source| RunError::Transport { what, source }
    }
}

/// The runtime's result type.
pub type Result<T, E = RunError> = std::result::Result<T, E>;
