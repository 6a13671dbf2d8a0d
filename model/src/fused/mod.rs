//! Fused CPU ops of the training forward pass, each with its own backward pass.
//!
//! candle builds these layers from a dozen primitive ops each; on CPU every primitive is a pass
//! over memory and an allocation, and autograd keeps the intermediates. A profile of the
//! `training` bench on `small-d512` put two thirds of a step in the Mamba-2 block, most of it in
//! the backward passes of the causal conv and the gated RMSNorm (reductions over the batch and
//! time dimensions, which candle runs through a strided index) and in the chunked scan's
//! intermediates; most of the rest was the MoE blocks' per-expert gathers and scatters. Each op here makes one pass forward and one or two backward, over all rows in
//! parallel.
//!
//! Projections ([`apply_linear`]) are one node instead of four, so that candle's backward pass
//! zero-fills and sums fewer gradients (10-14% more training tokens/s on `nano-1.5m`, the
//! quickstart's policy; level on `small-d512`, 4-8% on `medium-d1024`).
//!
//! Every op applies to f32 tensors on the CPU and returns `None` otherwise, so the caller falls
//! back to the composed version, which stays the reference its tests compare with (value and
//! gradient, 1e-4).

mod attention;
mod conv;
mod experts;
mod gated_norm;
mod linear;
mod mixer;
mod norm;
mod relu2;
mod ssd_scan;

pub(crate) use attention::causal_attention;
pub(crate) use conv::causal_conv_silu;
pub(crate) use experts::{ExpertRows, routed_experts};
pub(crate) use gated_norm::gated_rms_norm;
pub(crate) use linear::linear;
pub(crate) use mixer::{MixerParams, mamba_mixer};
pub(crate) use norm::{rms_norm, scale_channels};
#[cfg(test)]
pub(crate) use ssd_scan::SEGMENT;
pub(crate) use ssd_scan::ssd_scan;

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};

use crate::error::Result;

/// `norm.forward(x)`, through the fused op where it applies.
pub(crate) fn apply_rms_norm(norm: &crate::nn::RmsNorm, x: &Tensor) -> Result<Tensor> {
    match rms_norm(x, norm.weight(), norm.eps())? {
        Some(y) => Ok(y),
        None => norm.forward(x),
    }
}

/// `nn::relu2(x)`, through the fused op where it applies.
pub(crate) fn apply_relu2(x: &Tensor) -> Result<Tensor> {
    match relu2::relu2(x)? {
        Some(y) => Ok(y),
        None => crate::nn::relu2(x),
    }
}

/// `linear.forward(x)`, through the fused projection where it applies.
pub(crate) fn apply_linear(linear: &crate::nn::Linear, x: &Tensor) -> Result<Tensor> {
    let weight = linear.effective_weight()?;
    match self::linear(x, &weight)? {
        Some(y) => Ok(y),
        None => crate::nn::project(x, &weight),
    }
}

/// Whether the fused ops apply to `tensors`: all f32, all on the CPU.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// The values of a contiguous f32 CPU storage under `layout`.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// [`contiguous_f32`] for a tensor's storage, as a backward pass receives its inputs.
fn storage_f32<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => contiguous_f32(s, layout, what),
        _ => candle_core::bail!("{what} must be on the CPU"),
    }
}

/// `dst[m, n] (+)= sum_k lhs[m, k] rhs[k, n]` over slices described by `(row stride, column
/// stride)`, `dst` row-major; on rayon's threads when `parallel` (otherwise the caller runs
/// several at once, as the experts do).
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() >= m * n);
    if k > 0 {
        assert!(lhs.len() > last(lhs_rs, lhs_cs, m, k));
        assert!(rhs.len() > last(rhs_rs, rhs_cs, k, n));
    }
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices, for
    // the strides given; `dst` is row-major `[m, n]`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// `silu(v)` and its derivative at `v`.
#[inline(always)]
fn silu_and_slope(v: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-v).exp());
    (v * s, s * (1.0 + v * (1.0 - s)))
}

#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{Tensor, Var};

    /// Asserts that `fused` has `want`'s values (within `value_tol` of the larger magnitude,
    /// at least 1) and that a `weights`-weighted sum of each sends every input the same
    /// gradient (1e-4 of the largest), non-zero for the inputs marked so.
    pub(crate) fn assert_same_value_and_gradient(
        case: &str,
        fused: Tensor,
        want: Tensor,
        weights: &Tensor,
        inputs: &[(&str, &Var, bool)],
        value_tol: f32,
    ) {
        let diff = max_diff(&fused, &want);
        assert!(
            diff <= value_tol * max_abs(&want).max(1.0),
            "{case}: values off by {diff}"
        );
        let backward = |t: Tensor| {
            (t * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g_fused, g_want) = (backward(fused), backward(want));
        for &(name, var, must_move) in inputs {
            let got = g_fused.get(var.as_tensor()).expect("fused gradient");
            let exp = g_want.get(var.as_tensor()).expect("reference gradient");
            let diff = max_diff(got, exp);
            assert!(
                diff <= 1e-4 * max_abs(exp).max(1.0),
                "{case}: d{name} off by {diff} (largest {})",
                max_abs(exp)
            );
            if must_move {
                assert!(max_abs(got) > 0.0, "{case}: d{name} is zero");
            }
        }
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    pub(crate) fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
