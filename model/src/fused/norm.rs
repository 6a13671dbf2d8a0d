//! RMSNorm and per-channel scaling, the two places a learned `[C]` vector multiplies every row.
//!
//! Composed from candle's ops, the backward pass of `x * w` reduces the gradient of `w` over
//! every leading dimension through a strided index, which costs more than the rest of the
//! layer; here each task of rows reduces its own rows and the tasks' sums are added.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, contiguous_f32, storage_f32};
use crate::error::Result;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `w * x / sqrt(mean(x²) + eps)` over the last dimension, differentiable in `x` and `w`;
/// `None` where the fused op does not apply.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !applies(&[x, weight]) {
        return Ok(None);
    }
    let op = RmsNorm {
        eps: Some(eps as f32),
    };
    Ok(Some(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?))
}

/// `x * w` with `w: [C]` scaling the last dimension of `x: [..., C]`, differentiable in both;
/// `None` where the fused op does not apply.
pub(crate) fn scale_channels(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x, weight]) {
        return Ok(None);
    }
    let op = RmsNorm { eps: None };
    Ok(Some(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?))
}

/// With `eps`, RMSNorm then scaling; without, the scaling alone.
struct RmsNorm {
    eps: Option<f32>,
}

impl RmsNorm {
    fn width(&self, x: &Layout, w: &Layout) -> candle_core::Result<usize> {
        let width = *x.shape().dims().last().unwrap_or(&0);
        if w.shape().dims() != [width] || width == 0 {
            candle_core::bail!(
                "{}: weight {:?} does not match rows of {width}",
                self.name(),
                w.shape()
            );
        }
        Ok(width)
    }

    /// `1 / rms(row)`, or 1 without normalisation.
    #[inline(always)]
    fn inverse_rms(&self, row: &[f32]) -> f32 {
        match self.eps {
            Some(eps) => {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
                1.0 / (ms + eps).sqrt()
            }
            None => 1.0,
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        match self.eps {
            Some(_) => "chorus-rms-norm",
            None => "chorus-scale-channels",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = self.width(l1, l2)?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        let chunk = ROWS_PER_TASK * width;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(out, x)| {
                for (o, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                    let r = self.inverse_rms(x);
                    for ((o, &xv), &wv) in o.iter_mut().zip(x).zip(w) {
                        *o = xv * r * wv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let width = self.width(xl, wl)?;
        let x_v = storage_f32(&xs, xl, self.name())?;
        let w_v = storage_f32(&ws, wl, self.name())?;
        let dy = storage_f32(&gs, gl, self.name())?;
        let chunk = ROWS_PER_TASK * width;
        let mut dx = vec![0f32; x_v.len()];
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(x_v.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; width];
                let rows = dx
                    .chunks_exact_mut(width)
                    .zip(x.chunks_exact(width).zip(dy.chunks_exact(width)));
                for (dx, (x, dy)) in rows {
                    let r = self.inverse_rms(x);
                    // n = x r; dn = dy w; dx = r (dn - n mean(dn n)).
                    let mut dot = 0f32;
                    for (((acc, &xv), &g), &wv) in dw.iter_mut().zip(x).zip(dy).zip(w_v) {
                        *acc += g * xv * r;
                        dot += g * wv * xv * r;
                    }
                    let mean = if self.eps.is_some() {
                        dot / width as f32
                    } else {
                        0.0
                    };
                    for (((d, &xv), &g), &wv) in dx.iter_mut().zip(x).zip(dy).zip(w_v) {
                        *d = r * (g * wv - xv * r * mean);
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; width];
        for p in &partial {
            dw.iter_mut().zip(p).for_each(|(acc, v)| *acc += v);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use crate::nn::rms_normalize;
    use candle_core::{Device, Var};

    #[test]
    fn fused_norm_and_scaling_match_the_composed_ones_in_value_and_gradient() {
        let dev = Device::Cpu;
        for &(rows, width) in &[(1, 3), (5, 8), (130, 17)] {
            let var = |shape: &[usize]| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
            };
            let (x, w) = (var(&[2, rows, width]), var(&[width]));
            let weights = Tensor::randn(0f32, 1.0, (2, rows, width), &dev).unwrap();
            let cases = [
                (
                    "rms_norm",
                    rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
                    rms_normalize(x.as_tensor(), 1e-5)
                        .unwrap()
                        .broadcast_mul(w.as_tensor())
                        .unwrap(),
                ),
                (
                    "scale_channels",
                    scale_channels(x.as_tensor(), w.as_tensor()).unwrap(),
                    x.as_tensor().broadcast_mul(w.as_tensor()).unwrap(),
                ),
            ];
            for (op, fused, want) in cases {
                let fused = fused.expect("f32 on CPU takes the fused op");
                let case = format!("{op}: {rows} rows of {width}");
                assert_same_value_and_gradient(
                    &case,
                    fused,
                    want,
                    &weights,
                    &[("x", &x, true), ("weight", &w, true)],
                    1e-5,
                );
            }
        }
    }
}
