//! The Chorus orchestrator.
//!
//! The orchestrator drives the closed loop: it draws prompts from environments,
//! dispatches them to rollout workers, has the completions scored, streams scored
//! groups to the learner and keeps workers within the staleness bound of the
//! learner's newest policy. Everything it decides is recorded in the [`ledger`],
//! the only module of Chorus that speaks SQL.
#![warn(missing_docs)]

pub mod advantage;
pub mod config;
pub mod faults;
pub mod ledger;
pub mod remote;
pub mod scheduler;
pub mod service;
pub mod standin;
