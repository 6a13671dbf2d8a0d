//! Mamba-2's gated RMSNorm, `w * groupnorm(x * silu(z))` with RMS statistics per group of
//! channels, as one op (composed from candle's ops it is eleven, and its backward pass reduces
//! the weight's gradient over every row through a strided index).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, contiguous_f32, silu_and_slope, storage_f32};
use crate::error::Result;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// [`crate::nn::gated_rms_norm`] for f32 CPU tensors (`x`, `z`: `[..., D]`, `weight`: `[D]`),
/// differentiable in all three; `None` where the fused op does not apply.
pub(crate) fn gated_rms_norm(
    x: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group_size: usize,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !applies(&[x, z, weight]) || x.dims() != z.dims() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &z.contiguous()?,
        &weight.contiguous()?,
        GatedRmsNorm {
            group_size,
            eps: eps as f32,
        },
    )?))
}

pub(super) struct GatedRmsNorm {
    pub(super) group_size: usize,
    pub(super) eps: f32,
}

impl GatedRmsNorm {
    /// The width of a row, checked against the weight and the group size.
    fn width(&self, x: &Layout, weight: &Layout) -> candle_core::Result<usize> {
        let width = *x.shape().dims().last().unwrap_or(&0);
        if weight.shape().dims() != [width]
            || self.group_size == 0
            || !width.is_multiple_of(self.group_size)
        {
            candle_core::bail!(
                "gated RMSNorm: rows of {width}, weight {:?}, groups of {}",
                weight.shape(),
                self.group_size
            );
        }
        Ok(width)
    }

    /// The gated values of one group into `g`, returning `1 / rms(g)`.
    #[inline(always)]
    fn gate(&self, x: &[f32], z: &[f32], g: &mut [f32]) -> f32 {
        let mut sum = 0f32;
        for ((o, &xv), &zv) in g.iter_mut().zip(x).zip(z) {
            *o = xv * silu_and_slope(zv).0;
            sum += *o * *o;
        }
        1.0 / (sum / g.len() as f32 + self.eps).sqrt()
    }
}

impl CustomOp3 for GatedRmsNorm {
    fn name(&self) -> &'static str {
        "chorus-gated-rms-norm"
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
        let width = self.width(l1, l3)?;
        let x = contiguous_f32(s1, l1, "gated RMSNorm: x")?;
        let z = contiguous_f32(s2, l2, "gated RMSNorm: z")?;
        let w = contiguous_f32(s3, l3, "gated RMSNorm: weight")?;
        let chunk = (ROWS_PER_TASK * width).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(z.par_chunks(chunk)))
            .for_each(|(out, (x, z))| {
                let gs = self.group_size;
                for ((o, x), z) in out.chunks_mut(gs).zip(x.chunks(gs)).zip(z.chunks(gs)) {
                    let r = self.gate(x, z, o);
                    o.iter_mut().for_each(|v| *v *= r);
                }
                for row in out.chunks_exact_mut(width) {
                    row.iter_mut().zip(w).for_each(|(v, &wv)| *v *= wv);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        z: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (zs, zl) = z.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let width = self.width(xl, wl)?;
        let x_v = storage_f32(&xs, xl, "gated RMSNorm: x")?;
        let z_v = storage_f32(&zs, zl, "gated RMSNorm: z")?;
        let w_v = storage_f32(&ws, wl, "gated RMSNorm: weight")?;
        let dy = storage_f32(&gs, gl, "gated RMSNorm: the output's gradient")?;
        let gsz = self.group_size;
        let chunk = (ROWS_PER_TASK * width).max(1);
        let mut dx = vec![0f32; x_v.len()];
        let mut dz = vec![0f32; x_v.len()];
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(dz.par_chunks_mut(chunk))
            .zip(
                x_v.par_chunks(chunk)
                    .zip(z_v.par_chunks(chunk))
                    .zip(dy.par_chunks(chunk)),
            )
            .map(|((dx, dz), ((x, z), dy))| {
                let mut dw = vec![0f32; width];
                let mut normed = vec![0f32; gsz];
                for (i, start) in (0..x.len()).step_by(gsz).enumerate() {
                    let end = start + gsz;
                    let r = self.gate(&x[start..end], &z[start..end], &mut normed);
                    // normed = g * r; d(normed) = dy * w.
                    let w = &w_v[(i * gsz) % width..][..gsz];
                    let dwg = &mut dw[(i * gsz) % width..][..gsz];
                    let mut dot = 0f32;
                    for (((n, &g), &wv), acc) in
                        normed.iter_mut().zip(&dy[start..end]).zip(w).zip(dwg)
                    {
                        *n *= r;
                        *acc += g * *n;
                        dot += g * wv * *n;
                    }
                    let mean = dot / gsz as f32;
                    for j in 0..gsz {
                        let dn = dy[start + j] * w[j];
                        let dg = r * (dn - normed[j] * mean);
                        let (s, slope) = silu_and_slope(z[start + j]);
                        dx[start + j] = dg * s;
                        dz[start + j] = dg * x[start + j] * slope;
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
            Some(Tensor::from_vec(dz, z.shape(), dev)?),
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use candle_core::{Device, Var};

    #[test]
    fn fused_norm_matches_the_composed_norm_in_value_and_gradient() {
        let dev = Device::Cpu;
        for &(rows, width, group) in &[(1, 4, 4), (3, 12, 4), (130, 16, 8), (65, 6, 2)] {
            let var = |shape: &[usize], scale: f32| {
                Var::from_tensor(&Tensor::randn(0f32, scale, shape, &dev).unwrap()).unwrap()
            };
            let (x, z, w) = (
                var(&[rows, width], 1.0),
                var(&[rows, width], 2.0),
                var(&[width], 1.0),
            );
            let weights = Tensor::randn(0f32, 1.0, (rows, width), &dev).unwrap();
            let fused = gated_rms_norm(x.as_tensor(), z.as_tensor(), w.as_tensor(), group, 1e-5)
                .unwrap()
                .expect("f32 on CPU takes the fused op");
            let want =
                crate::nn::gated_rms_norm(x.as_tensor(), z.as_tensor(), w.as_tensor(), group, 1e-5)
                    .unwrap();
            let case = format!("{rows} rows of {width}, groups of {group}");
            assert_same_value_and_gradient(
                &case,
                fused,
                want,
                &weights,
                &[("x", &x, true), ("z", &z, true), ("weight", &w, true)],
                1e-5,
            );
        }
    }
}
