//! Squared ReLU, the activation of Nemotron's MLPs, as one op.
//!
//! Composed, `relu(x)²` is two nodes over the MLP's widest activation (`[tokens, 2 d]` in the
//! shared expert): its backward pass compares, converts the mask to f32 and multiplies for the
//! ReLU, scales and multiplies for the square, and candle zero-fills and sums a gradient for
//! each node. Here the forward pass and the backward pass are one pass each.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, contiguous_f32, storage_f32};
use crate::error::Result;

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

/// `max(x, 0)²` element-wise, differentiable; `None` where the fused op does not apply.
pub(crate) fn relu2(x: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SquaredRelu)?))
}

struct SquaredRelu;

impl CustomOp1 for SquaredRelu {
    fn name(&self) -> &'static str {
        "chorus-relu2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "relu2: x")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(out, x)| {
                for (o, &v) in out.iter_mut().zip(x) {
                    let r = v.max(0.0);
                    *o = r * r;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let x_v = storage_f32(&xs, xl, "relu2: x")?;
        let g_v = storage_f32(&gs, gl, "relu2: the output's gradient")?;
        let mut dx = vec![0f32; x_v.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x_v.par_chunks(CHUNK).zip(g_v.par_chunks(CHUNK)))
            .for_each(|(dx, (x, g))| {
                for ((d, &v), &g) in dx.iter_mut().zip(x).zip(g) {
                    *d = 2.0 * v.max(0.0) * g;
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use candle_core::{Device, Var};

    #[test]
    fn fused_relu2_matches_the_composed_one_in_value_and_gradient() {
        let dev = Device::Cpu;
        // Both sides of zero, exact zeros, and a length past one parallel task with a rest.
        for shape in [vec![7], vec![3, 5, 4], vec![2, CHUNK + 9]] {
            let mut x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            if shape == [7] {
                x = Tensor::new(&[-1.5f32, -0.0, 0.0, 0.25, 2.0, -3.0, 1.0], &dev).unwrap();
            }
            let x = Var::from_tensor(&x).unwrap();
            let w = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let fused = relu2(x.as_tensor()).unwrap().expect("f32 on CPU");
            let want = crate::nn::relu2(x.as_tensor()).unwrap();
            let case = format!("{shape:?}");
            assert_same_value_and_gradient(&case, fused, want, &w, &[("x", &x, true)], 1e-6);
        }
    }

    #[test]
    fn a_transposed_input_is_squared_as_its_values() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap().t().unwrap();
        let fused = relu2(&x).unwrap().unwrap();
        let want = crate::nn::relu2(&x).unwrap();
        let diff = (fused - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
