//! Names of the rollout worker's Prometheus metrics (recorded through the `metrics` facade; a
//! process exports them when started with `--metrics ADDR`). docs/metrics.md lists them all.

/// Generation requests, by `outcome` (`ok`, `error`).
pub const REQUESTS: &str = "chorus_worker_requests_total";
/// Generation requests being served (queued or decoding).
pub const REQUESTS_IN_FLIGHT: &str = "chorus_worker_requests_in_flight";
/// Tokens generated.
pub const GENERATED_TOKENS: &str = "chorus_worker_generated_tokens_total";
/// Seconds a request spent decoding (queue time excluded).
pub const GENERATE_SECONDS: &str = "chorus_worker_generate_seconds";
/// Seconds the engine thread computed (installing weights, prefilling, decoding) between
/// waits for work; its sum over a run's wall time is the worker's busy fraction.
pub const ENGINE_BUSY_SECONDS: &str = "chorus_worker_engine_busy_seconds";
/// The policy version the worker samples from.
pub const POLICY_VERSION: &str = "chorus_worker_policy_version";
/// Bytes of weights received from the learner.
pub const WEIGHT_SYNC_BYTES: &str = "chorus_weight_sync_bytes_total";
/// Seconds one weight transfer took, from request to a built engine.
pub const WEIGHT_SYNC_SECONDS: &str = "chorus_weight_sync_seconds";
/// Weight transfers that failed.
pub const WEIGHT_SYNC_FAILURES: &str = "chorus_weight_sync_failures_total";
