//! The element-wise functions and the RMSNorm every engine block shares.
//!
//! They are `#[inline]` because they sit in the per-token, per-head inner loops of other files,
//! which may land in other codegen units than this one.

/// `x * sigmoid(x)`, the gate of the Mamba-2 output.
#[inline]
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `ln(1 + e^x)`, written so that it neither overflows for large `x` nor loses precision for
/// very negative ones.
#[inline]
pub(super) fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// RMSNorm of each `w.len()`-wide row of `x`, scaled by `w`, into `out`.
#[inline]
pub(super) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}
