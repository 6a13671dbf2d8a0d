//! The Chorus orchestrator.
//!
//! The orchestrator drives the closed loop: it draws prompts from environments,
//! dispatches them to rollout workers, has the completions scored, streams scored
//! groups to the learner and keeps workers within the staleness bound of the
//! learner's newest policy. Everything it decides is recorded in the [`ledger`],
//! the only module of Chorus that speaks SQL.
//!
//! Who serves a run is kept in its [`Directory`]; the process's runs and standby services in
//! the [`Fleet`]; [`OrchestratorService`] is the gRPC face of both.
#![deny(missing_docs)]

pub mod advantage;
pub mod confidence;
pub mod config;
pub mod curriculum;
pub mod directory;
pub mod faults;
pub mod fleet;
pub mod ledger;
pub mod metrics;
pub mod remote;
pub mod scheduler;
pub mod service;
pub mod standin;
#[cfg(test)]
mod testkit;
pub mod transcripts;

pub use directory::{
    Directory, LearnerInfo, Leases, Membership, RegistrationError, WaitError, WorkerInfo,
    record_events,
};
pub use fleet::{FINISHED_RUNS_KEPT, Fleet, FleetError, Launched};
pub use remote::{LearnerLink, RemoteLearner, WorkerPool, take_over_learner};
pub use service::OrchestratorService;
