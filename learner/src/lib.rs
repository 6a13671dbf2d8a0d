//! # chorus-learner
//!
//! Turns scored trajectories into policy updates on candle: the GRPO-family objective (token-level
//! clipped surrogate with the ratio against the rollout worker's log-probabilities, clip-higher,
//! truncated importance sampling for stale tokens, optional KL to a reference, token- or
//! sequence-mean aggregation), supervised warm-up on reference solutions, AdamW with global
//! grad-norm clipping and a warmup/cosine schedule, and checkpoints (HF weights + optimizer state
//! + counters) that resume exactly.
//!
//! Invariant: a step whose loss or gradient norm is not finite changes nothing — the weights and
//! the policy version stay as they were and the [`StepReport`] says why.
//!
//! The learner never depends on the rollout worker; the service wrapping [`Trainer`] meets the
//! rest of Chorus only through `chorus-proto`.
#![deny(missing_docs)]

mod error;
mod loss;
mod optim;
mod service;
mod trainer;

pub use chorus_proto::schedule::{Decay, LrSchedule};
pub use error::{LearnerError, Result};
pub use loss::{Aggregation, GrpoConfig, LossStats, RlSequence, SftSequence, grpo_loss, sft_loss};
pub use optim::{AdamW, AdamWConfig, StepStats};
pub use service::{
    LearnerHandle, LearnerService, LearnerServiceConfig, Published, SubmitError, group_sequences,
    spawn_learner,
};
pub use trainer::{LearnerConfig, OPTIMIZER_FILE, STATE_FILE, StepReport, Trainer};
