//! `chorus loss`: the objective of [`crate::objective`] evaluated on a batch given as tensors in
//! a safetensors file, with the loss and its gradient written to another.
//!
//! Input tensors: `logprobs`, `old_logprobs`, `behaviour_logprobs` (each `[B, T]` f32),
//! `advantages` (`[B]` f32), `mask` (`[B, T]` u8, 0 or 1) and, when `kl_coef > 0`,
//! `ref_logprobs` (`[B, T]` f32). Output: `loss` (f32, shape `[]`) and `grad_logprobs`
//! (`[B, T]` f32, `d loss / d logprobs`, 0 where the mask is 0).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{LearnerError, Result};
use crate::objective::{Evaluation, Objective, TokenBatch, evaluate};

fn file_err(path: &Path, message: impl Into<String>) -> LearnerError {
    LearnerError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A tensor of the input by name, checked for dtype and shape.
fn take<T: candle_core::WithDType>(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    name: &str,
    dtype: DType,
    shape: &[usize],
) -> Result<Vec<T>> {
    let t = tensors.get(name).ok_or_else(|| {
        let mut present: Vec<&str> = tensors.keys().map(String::as_str).collect();
        present.sort_unstable();
        file_err(
            path,
            format!(
                "missing tensor `{name}`; the file has: {}",
                present.join(", ")
            ),
        )
    })?;
    if t.dtype() != dtype {
        return Err(file_err(
            path,
            format!("`{name}` is {:?}; allowed: {dtype:?}", t.dtype()),
        ));
    }
    if t.dims() != shape {
        return Err(file_err(
            path,
            format!(
                "`{name}` has shape {:?}; the batch needs {shape:?}",
                t.dims()
            ),
        ));
    }
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

/// Evaluates `objective` on the batch in `input` and writes `loss` and `grad_logprobs` to
/// `output`.
pub fn evaluate_file(objective: &Objective, input: &Path, output: &Path) -> Result<Evaluation> {
    let tensors = candle_core::safetensors::load(input, &Device::Cpu)
        .map_err(|e| file_err(input, format!("cannot read as safetensors: {e}")))?;
    let shape = tensors
        .get("logprobs")
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| file_err(input, "missing tensor `logprobs` ([B, T] f32)"))?;
    let [b, t] = shape[..] else {
        return Err(file_err(
            input,
            format!("`logprobs` has shape {shape:?}; allowed: [B, T]"),
        ));
    };
    let f32s = |name: &str| take::<f32>(&tensors, input, name, DType::F32, &[b, t]);
    let logprobs = f32s("logprobs")?;
    let old = f32s("old_logprobs")?;
    let behaviour = f32s("behaviour_logprobs")?;
    let advantages = take::<f32>(&tensors, input, "advantages", DType::F32, &[b])?;
    let mask_bytes = take::<u8>(&tensors, input, "mask", DType::U8, &[b, t])?;
    if let Some(bad) = mask_bytes.iter().find(|&&m| m > 1) {
        return Err(file_err(
            input,
            format!("`mask` holds {bad}; allowed: 0 or 1"),
        ));
    }
    let mask: Vec<bool> = mask_bytes.iter().map(|&m| m == 1).collect();
    let reference = match tensors.contains_key("ref_logprobs") {
        true => Some(f32s("ref_logprobs")?),
        false => None,
    };
    let evaluation = evaluate(
        objective,
        &TokenBatch {
            batch: b,
            width: t,
            logprobs: &logprobs,
            old_logprobs: &old,
            behaviour_logprobs: &behaviour,
            advantages: &advantages,
            mask: &mask,
            ref_logprobs: reference.as_deref(),
        },
    )
    .map_err(|e| file_err(input, e.0))?;
    let out: HashMap<String, Tensor> = [
        (
            "loss".to_string(),
            Tensor::new(evaluation.loss as f32, &Device::Cpu)?,
        ),
        (
            "grad_logprobs".to_string(),
            Tensor::from_vec(evaluation.grad_logprobs.clone(), (b, t), &Device::Cpu)?,
        ),
    ]
    .into_iter()
    .collect();
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    }
    candle_core::safetensors::save(&out, output).map_err(|e| file_err(output, e.to_string()))?;
    Ok(evaluation)
}
