//! # chorus-learner
//!
//! Turns scored trajectories into policy updates on candle: the RL objectives of
//! [`objective`] (GRPO, DAPO, Dr. GRPO, GSPO, CISPO, REINFORCE; off-policy corrections TIS,
//! IcePop and sequence-masked TIS; k1/k3 KL; three aggregations), evaluated exactly on the
//! policy's log-probabilities and back-propagated through it, supervised warm-up on reference
//! solutions, AdamW with global grad-norm clipping and a warmup/cosine schedule, a KL penalty to
//! the policy at the start of each stage (a frozen reference the [`Trainer`] snapshots), the
//! MoE routers' aux-loss-free load balancing, and checkpoints (HF weights + optimizer state +
//! counters + the KL reference) that resume exactly. [`reward_model`] trains a
//! Bradley–Terry reward model (a scalar head on the policy's backbone) on preference pairs.
//!
//! Invariant: a step whose loss or gradient norm is not finite leaves the weights as they were;
//! the policy version still advances (the same weights under the next number, so the
//! orchestrator's staleness clock never stalls) and the [`StepReport`] says why.
//!
//! The learner never depends on the rollout worker; the service wrapping [`Trainer`] meets the
//! rest of Chorus only through `chorus-proto`.
#![deny(missing_docs)]

pub mod checkpoints;
mod error;
mod loss;
pub mod loss_file;
pub mod metrics;
pub mod objective;
mod optim;
pub mod reward_model;
mod service;
mod trainer;

pub use checkpoints::CheckpointPolicy;
pub use chorus_proto::schedule::{Decay, LrSchedule};
pub use error::{LearnerError, Result};
pub use loss::{
    LossStats, RlSequence, SftSequence, completion_logprobs, mtp_loss, rl_loss, sft_loss,
};
pub use objective::Objective;
pub use optim::{AdamW, AdamWConfig, StepStats};
pub use reward_model::{
    PreferencePair, RewardModel, RewardTrainer, RmStepReport, bradley_terry_loss,
};
pub use service::{
    LearnerHandle, LearnerService, LearnerServiceConfig, Published, SubmitError, group_sequences,
    spawn_learner,
};
pub use trainer::{
    DEFAULT_MICRO_BATCH_TOKENS, DEFAULT_ROUTER_BIAS_RATE, LearnerConfig, OPTIMIZER_FILE,
    REFERENCE_FILE, STATE_FILE, StepReport, Trainer,
};
