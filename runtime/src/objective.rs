//! The learner's RL objectives for programs outside a run: `chorus loss` evaluates one on a batch
//! given as tensors, with exactly the code the learner's steps run.

pub use chorus_learner::loss_file::evaluate_file;
pub use chorus_learner::objective::{Algorithm, Evaluation, Objective, ObjectiveError};
