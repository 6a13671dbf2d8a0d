//! `chorus loss`: evaluate an RL objective on a batch of tensors.

use std::path::PathBuf;

use anyhow::Context;
use chorus_runtime::objective::{Algorithm, Objective, evaluate_file};
use clap::Args;

/// Evaluate an RL objective, and its gradient, on a batch given as tensors: the same code the
/// learner's steps run.
///
/// The input is a safetensors file with `logprobs`, `old_logprobs`, `behaviour_logprobs` (each
/// [B,T] f32), `advantages` ([B] f32), `mask` ([B,T] u8, 1 = in the loss) and, with a KL
/// penalty, `ref_logprobs` ([B,T] f32). The output gets `loss` (f32, shape []) and
/// `grad_logprobs` ([B,T] f32, d loss / d logprobs, 0 where the mask is 0).
///
/// Algorithms: grpo, dapo, dr_grpo, gspo, cispo, reinforce (each with its own defaults for the
/// clip range and the aggregation). Options (--option KEY=VALUE, repeatable): eps_low,
/// eps_high, correction (none, tis, icepop, seq_mask_tis), tis_cap, icepop_low, icepop_high,
/// aggregation (token_mean, seq_mean_token_mean, seq_mean_token_sum_norm), norm_length,
/// kl_coef, kl_estimator (k1, k3).
///
/// Examples:
///   chorus loss --algorithm dapo --input batch.safetensors --output out.safetensors
///   chorus loss --algorithm grpo --option correction=tis --option tis_cap=2 --input b.safetensors --output o.safetensors
///   chorus loss --algorithm reinforce --option kl_coef=0.1 --option kl_estimator=k1 --input b.safetensors --output o.safetensors
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct LossArgs {
    /// grpo, dapo, dr_grpo, gspo, cispo or reinforce.
    #[arg(long, default_value = "grpo")]
    algorithm: String,
    /// A setting as KEY=VALUE (repeatable), applied after the algorithm's defaults.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// The batch (safetensors).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `loss` and `grad_logprobs` (safetensors).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: LossArgs) -> anyhow::Result<()> {
    let algorithm: Algorithm = a.algorithm.parse()?;
    let mut objective = Objective::for_algorithm(algorithm);
    for option in &a.options {
        let (key, value) = option.split_once('=').with_context(|| {
            format!("--option {option:?}: write KEY=VALUE, e.g. --option eps_high=0.28")
        })?;
        objective.set(key.trim(), value)?;
    }
    let e = evaluate_file(&objective, &a.input, &a.output)?;
    outln!(
        "{}: loss {:.6} over {} tokens (clip fraction {:.3}, mean weight {:.3}); wrote {}",
        objective.algorithm,
        e.loss,
        e.tokens,
        e.clip_fraction,
        e.mean_weight,
        a.output.display()
    );
    Ok(())
}
