//! Names of the learner's Prometheus metrics (recorded through the `metrics` facade; a process
//! exports them when started with `--metrics ADDR`). docs/metrics.md lists them all.

/// Learner steps, by `outcome` (`trained`, `skipped`).
pub const STEPS: &str = "chorus_learner_steps_total";
/// Seconds a step's update took, from its last group's arrival to the new version.
pub const STEP_SECONDS: &str = "chorus_learner_step_seconds";
/// Sequences (trajectories or SFT examples) trained on.
pub const TRAINED_SEQUENCES: &str = "chorus_learner_trained_sequences_total";
/// Tokens trained on.
pub const TRAINED_TOKENS: &str = "chorus_learner_trained_tokens_total";
/// The last step's loss.
pub const LOSS: &str = "chorus_learner_loss";
/// The learner's policy version.
pub const POLICY_VERSION: &str = "chorus_learner_policy_version";
/// Groups received for the step being gathered.
pub const QUEUED_GROUPS: &str = "chorus_learner_queued_groups";
/// Bytes of weights published (each version once, whoever fetches it).
pub const PUBLISHED_BYTES: &str = "chorus_learner_published_bytes_total";
