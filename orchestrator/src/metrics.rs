//! Names of the orchestrator's Prometheus metrics (recorded through the `metrics` facade; a
//! process exports them when started with `--metrics ADDR`). docs/metrics.md lists every
//! metric of every service.

/// Prompts sent to rollout workers, by `environment`.
pub const PROMPTS_DISPATCHED: &str = "chorus_prompts_dispatched_total";
/// Prompts dropped (no learning signal, too long, every attempt failed), by `environment`.
pub const PROMPTS_DROPPED: &str = "chorus_prompts_dropped_total";
/// Trajectories recorded, by `environment` and `status` (`ok`, `failed`).
pub const TRAJECTORIES: &str = "chorus_trajectories_total";
/// Completion tokens the policy generated in recorded trajectories, by `environment`.
pub const GENERATED_TOKENS: &str = "chorus_generated_tokens_total";
/// Groups handed to the learner (empty ones of failed slots included).
pub const GROUPS_SUBMITTED: &str = "chorus_groups_submitted_total";
/// How many policy versions each submitted trajectory's oldest token lagged when submitted.
pub const TRAJECTORY_LAG: &str = "chorus_trajectory_lag_versions";
/// Generation requests waiting for or running on a rollout worker.
pub const ROLLOUT_REQUESTS_IN_FLIGHT: &str = "chorus_rollout_requests_in_flight";
/// Seconds a generation request waited in a worker's queue.
pub const ROLLOUT_QUEUE_SECONDS: &str = "chorus_rollout_queue_seconds";
/// Environment calls (sample, score, step), by `environment`.
pub const ENVIRONMENT_CALLS: &str = "chorus_environment_calls_total";
/// Environment calls that faulted, by `environment` and `kind`.
pub const ENVIRONMENT_FAULTS: &str = "chorus_environment_faults_total";
/// Seconds an environment call took, by `environment`.
pub const ENVIRONMENT_CALL_SECONDS: &str = "chorus_environment_call_seconds";
/// Ledger writes queued and not yet committed.
pub const LEDGER_PENDING_WRITES: &str = "chorus_ledger_pending_writes";
/// Seconds from a ledger write's enqueueing to its commit (the ledger's write lag).
pub const LEDGER_WRITE_LAG_SECONDS: &str = "chorus_ledger_write_lag_seconds";
/// Ledger batches tried again after a failure that may pass (the database restarting).
pub const LEDGER_WRITE_RETRIES: &str = "chorus_ledger_write_retries_total";
/// The newest policy version the orchestrator knows of.
pub const POLICY_VERSION: &str = "chorus_orchestrator_policy_version";
/// Times the learner came back after its step stream broke and was sent its lost groups again.
pub const LEARNER_RECOVERIES: &str = "chorus_orchestrator_learner_recoveries_total";
