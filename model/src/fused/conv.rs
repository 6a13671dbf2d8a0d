//! Mamba-2's causal depthwise convolution over time followed by SiLU, from a zero history.
//!
//! `out[b, t, c] = silu(bias[c] + sum_j w[c, j] x[b, t - K + 1 + j, c])`, inputs before the
//! sequence read as zeros. Composed from candle's ops the backward pass of the weight and bias
//! reduces `[B, T, C]` gradients over the batch and time dimensions through a strided index,
//! which made it the most expensive op of a training step on `small-d512`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, contiguous_f32, silu_and_slope, storage_f32};
use crate::error::Result;

/// `silu(causal_depthwise_conv(x, weight, bias))` for `x: [B, T, C]`, `weight: [C, K]`,
/// `bias: [C]`, differentiable in all three; `None` where the fused op does not apply (the
/// caller composes [`crate::nn::causal_depthwise_conv`] and SiLU instead).
pub(crate) fn causal_conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    if !applies(&[x, weight, bias]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        CausalConvSilu,
    )?))
}

pub(super) struct CausalConvSilu;

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    time: usize,
    channels: usize,
    taps: usize,
}

fn dims(x: &Layout, w: &Layout, bias: &Layout) -> candle_core::Result<Dims> {
    let (_, time, channels) = x.shape().dims3()?;
    let (wc, taps) = w.shape().dims2()?;
    if wc != channels || bias.shape().dims() != [channels] || taps == 0 {
        candle_core::bail!(
            "causal conv: weight {:?} and bias {:?} do not match {channels} channels",
            w.shape(),
            bias.shape()
        );
    }
    Ok(Dims {
        time,
        channels,
        taps,
    })
}

/// The weight `[C, K]` as `[K, C]`, so that each tap is a contiguous row over channels.
fn taps_major(w: &[f32], d: Dims) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for c in 0..d.channels {
        for j in 0..d.taps {
            out[j * d.channels + c] = w[c * d.taps + j];
        }
    }
    out
}

/// The pre-activation of one sequence `x: [T, C]` into `pre: [T, C]`.
fn convolve(x: &[f32], w_t: &[f32], bias: &[f32], d: Dims, pre: &mut [f32]) {
    let (cn, k) = (d.channels, d.taps);
    for (t, row) in pre.chunks_exact_mut(cn).enumerate() {
        row.copy_from_slice(bias);
        for (j, wj) in w_t.chunks_exact(cn).enumerate() {
            // Tap j reads step t - (K - 1 - j).
            let Some(src) = (t + j).checked_sub(k - 1) else {
                continue;
            };
            for ((o, &w), &v) in row.iter_mut().zip(wj).zip(&x[src * cn..(src + 1) * cn]) {
                *o += w * v;
            }
        }
    }
}

impl CustomOp3 for CausalConvSilu {
    fn name(&self) -> &'static str {
        "chorus-causal-conv-silu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2, l3)?;
        let x = contiguous_f32(s1, l1, "causal conv: x")?;
        let w_t = taps_major(contiguous_f32(s2, l2, "causal conv: weight")?, d);
        let bias = contiguous_f32(s3, l3, "causal conv: bias")?;
        let seq = (d.time * d.channels).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(seq)
            .zip(x.par_chunks(seq))
            .for_each(|(out, x)| {
                convolve(x, &w_t, bias, d, out);
                for v in out.iter_mut() {
                    *v = silu_and_slope(*v).0;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let d = dims(xl, wl, bl)?;
        let x_v = storage_f32(&xs, xl, "causal conv: x")?;
        let w_t = taps_major(storage_f32(&ws, wl, "causal conv: weight")?, d);
        let b_v = storage_f32(&bs, bl, "causal conv: bias")?;
        let dy = storage_f32(&gs, gl, "causal conv: the output's gradient")?;
        let (cn, k) = (d.channels, d.taps);
        let seq = (d.time * cn).max(1);
        let mut dx = vec![0f32; x_v.len()];
        // Per sequence: the gradients of the weight (taps-major) and the bias.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(seq)
            .zip(x_v.par_chunks(seq).zip(dy.par_chunks(seq)))
            .map(|(dx, (x, dy))| {
                let mut dz = vec![0f32; seq];
                convolve(x, &w_t, b_v, d, &mut dz);
                for (z, &g) in dz.iter_mut().zip(dy) {
                    *z = g * silu_and_slope(*z).1;
                }
                let mut dw = vec![0f32; k * cn];
                let mut db = vec![0f32; cn];
                for (t, dz_row) in dz.chunks_exact(cn).enumerate() {
                    for (acc, &g) in db.iter_mut().zip(dz_row) {
                        *acc += g;
                    }
                    for (j, (wj, dwj)) in w_t
                        .chunks_exact(cn)
                        .zip(dw.chunks_exact_mut(cn))
                        .enumerate()
                    {
                        let Some(src) = (t + j).checked_sub(k - 1) else {
                            continue;
                        };
                        let x_row = &x[src * cn..(src + 1) * cn];
                        for ((acc, &g), &v) in dwj.iter_mut().zip(dz_row).zip(x_row) {
                            *acc += g * v;
                        }
                        let dx_row = &mut dx[src * cn..(src + 1) * cn];
                        for ((acc, &g), &w) in dx_row.iter_mut().zip(dz_row).zip(wj) {
                            *acc += g * w;
                        }
                    }
                }
                (dw, db)
            })
            .collect();
        let mut dw = vec![0f32; cn * k];
        let mut db = vec![0f32; cn];
        for (pw, pb) in &partial {
            for c in 0..cn {
                for j in 0..k {
                    dw[c * k + j] += pw[j * cn + c];
                }
            }
            for (acc, v) in db.iter_mut().zip(pb) {
                *acc += v;
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, bias.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use crate::nn::causal_depthwise_conv;
    use candle_core::{Device, Var};

    #[test]
    fn fused_conv_matches_the_composed_conv_in_value_and_gradient() {
        let dev = Device::Cpu;
        for &(batch, time, channels, taps) in
            &[(1, 1, 3, 4), (2, 3, 5, 4), (3, 17, 9, 2), (2, 9, 8, 1)]
        {
            let var = |shape: &[usize]| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
            };
            let (x, w, b) = (
                var(&[batch, time, channels]),
                var(&[channels, taps]),
                var(&[channels]),
            );
            let weights = Tensor::randn(0f32, 1.0, (batch, time, channels), &dev).unwrap();
            let fused = causal_conv_silu(x.as_tensor(), w.as_tensor(), b.as_tensor())
                .unwrap()
                .expect("f32 on CPU takes the fused op");
            let want =
                causal_depthwise_conv(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), None)
                    .unwrap()
                    .silu()
                    .unwrap();
            let case = format!("B{batch} T{time} C{channels} K{taps}");
            assert_same_value_and_gradient(
                &case,
                fused,
                want,
                &weights,
                &[("x", &x, true), ("weight", &w, true), ("bias", &b, true)],
                1e-5,
            );
        }
    }
}
