//! The Chorus wire protocol.
//!
//! Chorus components meet only through the gRPC services of package `chorus.v1`
//! (the `.proto` files in `proto/chorus/v1/`), generated here with prost and tonic:
//!
//! | service | implemented by | calls |
//! |---|---|---|
//! | [`Orchestrator`](v1::orchestrator_server::Orchestrator) | orchestrator | registration and heartbeats of workers and learners, launch / get / list runs, a stream of run events, a run's summary and rollouts from the ledger |
//! | [`RolloutWorker`](v1::rollout_worker_server::RolloutWorker) | rollout worker | `Generate`: a bidirectional stream of generation requests and token chunks |
//! | [`Learner`](v1::learner_server::Learner) | learner | `SubmitTrajectories` (client stream of scored groups, acknowledged by id), `StreamWeights` (server stream of checksummed weight chunks), `StreamSteps` (server stream of step reports) |
//! | [`Environment`](v1::environment_server::Environment) | environment plugins (client and server adapters in `chorus-environments`' `plugin` module) | `Describe`, `Sample`, `Step`, `Score`; optional `Reference`, `WrongCompletions`, `Start` |
//!
//! Requests carry the ids that make a retry safe (`run_id`, `prompt_id`,
//! `trajectory_id`, `request_id`, `group_id`, heartbeat `sequence`). Registration,
//! heartbeats, `LaunchRun` and `SubmitTrajectories` are idempotent by them; a
//! rollout worker does not deduplicate `Generate` requests, the orchestrator keeps
//! the first answer per `request_id` instead (see `rollout.proto`). The same ids
//! appear in every process's logs, so one rollout can be followed across them.
//!
//! Besides the generated code the crate offers:
//! - [`auth`]: interceptors that attach and check the shared `Bearer` token;
//! - [`checksum`]: the digest carried by the last [`WeightChunk`](v1::WeightChunk)
//!   of a weight stream and a verifier for receivers;
//! - [`tls`]: TLS (rustls) for every service and client: `--tls-cert`, `--tls-key`, `--tls-ca`;
//! - [`http`]: a small HTTP/1.1 JSON client for the non-gRPC services Chorus drives (NeMo Gym
//!   resources servers, vLLM);
//! - [`schedule`]: the learning-rate schedule that the orchestrator and the learner share;
//! - [`objective`]: the RL objective (algorithm, correction, KL, aggregation) a stage names and
//!   the learner evaluates.
//!
//! The protobuf files are compiled at build time with `protox`, so building needs
//! no `protoc`.
#![deny(missing_docs)]

pub mod auth;
pub mod checksum;
pub mod http;
pub mod limits;
pub mod objective;
pub mod schedule;
pub mod tls;
pub mod weights;

/// Messages and services of package `chorus.v1` (generated from `proto/chorus/v1/*.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("chorus.v1");
}

pub use prost;
pub use tonic;
