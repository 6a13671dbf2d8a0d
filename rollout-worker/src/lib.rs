//! # chorus-rollout-worker
//!
//! The rollout worker service of the closed loop: it will serve the `RolloutWorker.Generate`
//! stream of `chorus-proto` over `chorus_model::engine::Engine` (continuous batching over
//! per-sequence caches, seeded sampling, weight installs between decode steps with per-token
//! policy versions). Not built yet: the generation machinery it wraps lives in `chorus-model`.
