//! # chorus-rollout-worker
//!
//! Serves `RolloutWorker.Generate` (see `chorus-proto`) over the policy engine of
//! `chorus-model`:
//!
//! - **Continuous batching.** One engine thread advances every active sequence together, one
//!   forward call per step; requests join with their whole prompt and leave when done, so a long
//!   generation never holds a short one back.
//! - **In-flight weight updates.** [`WorkerHandle::install_weights`] hands over a new policy
//!   version; the engine thread switches between two decode steps, sequences keep their caches,
//!   and every token records the version that produced it. A request pinned to an exact version
//!   (deterministic runs) decodes with that version alone, fetched again if need be.
//! - **Or vLLM.** [`VllmWorker`] fronts a vLLM server instead (the [`vllm`] module): same
//!   service, same ids and versions per token, weights reloaded from files.
//! - **Faults stay local.** A malformed request (empty prompt, token out of range, bad sampling
//!   settings) is answered with `FINISH_REASON_ERROR` and its reason; the others go on.
//!
//! Each request is handled in a `generate` span carrying its `request_id`, `trajectory_id`,
//! `run_id` and the `worker_id`, the same ids the orchestrator and the learner log.
#![deny(missing_docs)]

mod engine_loop;
pub mod metrics;
mod service;
mod sync;
pub mod vllm;

pub use engine_loop::{
    Job, JobResult, WorkerHandle, WorkerOptions, WorkerStats, spawn_engine_loop,
    spawn_engine_loop_with,
};
pub use service::{Generator, RolloutService};
pub use sync::{
    FetchError, FetchErrorKind, SyncPolicy, fetch_exact_version, fetch_host_tensors, fetch_tensors,
    fetch_version, follow_learner, follow_learner_vllm,
};
pub use vllm::VllmWorker;
