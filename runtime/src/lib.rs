//! # chorus-runtime
//!
//! The composition root of Chorus as a library: everything between a validated run config and a
//! finished run, so that `chorus run`, `chorus serve` and any embedding program (or test) start
//! runs the same way.
//!
//! - [`RunPlan`] is built once from a [`RunConfig`](chorus_orchestrator::config::RunConfig): the
//!   policy's architecture and tokenizer, the learner's settings, the workers' engine options,
//!   the evaluation plan and the stages. Nothing downstream reads the raw config again.
//! - [`orchestrate`] drives a run against a learner and workers that already serve: the ledger
//!   lifecycle (`driver/ledger.rs`), live progress (`driver/progress.rs`), held-out evaluation and
//!   the learning curve (`driver/evaluation.rs`) and the stage loop (`driver/stages.rs`). It
//!   returns the typed [`Summary`] that `summary.json` serialises.
//! - [`run_local`] is a whole run in one process: the learner and each worker as gRPC services on
//!   loopback, then [`orchestrate`].
//! - [`serve`] holds each service as its own process (`chorus serve …`): the learner and a worker
//!   (registering with an orchestrator and sending heartbeats), the orchestrator of one run, the
//!   orchestrator daemon that serves launched runs, and standby services.
//! - [`client`] is the launching side: `LaunchRun`, and following a run's events.
//! - [`objective`] evaluates an RL objective on a batch file (`chorus loss`), with the learner's
//!   own code.
//!
//! Logging goes through `tracing`: every run, stage and step is a span or carries its ids as
//! fields, so one run's lines can be picked out of several processes' logs. Installing a
//! subscriber is the embedding program's choice (the `chorus` binary installs one).

#![deny(missing_docs)]

pub mod client;
mod driver;
mod environments;
mod error;
pub mod judge;
pub mod objective;
mod plan;
mod registration;
pub mod serve;
mod services;
mod standby;
mod summary;

pub use driver::{Endpoints, LocalRun, RunOptions, orchestrate, run_local};
pub use environments::environment_registry;
pub use error::RunError;
pub use plan::{EvalPlan, RunPlan, device};
pub use registration::{Reporter, register};
pub use services::{Backend, serve_routes, start_learner, start_worker};
pub use standby::{Role, Standby, stand_by};
pub use summary::{CurvePoint, EnvironmentResult, Outcome, StageSummary, Summary, from_ledger};
