//! A projection `y = x Wᵀ` as one op with its own backward pass.
//!
//! Composed from candle's ops, a projection is four nodes (a reshape of `x` to rows, `Wᵀ`, the
//! product, a reshape back), and candle's backward pass starts every node input's gradient as
//! a zeroed tensor and adds the incoming gradient to it. A profile of the `training` bench put
//! about a sixth of a step in those zero-fills and additions; as one node, a projection sends
//! exactly one gradient to `x` and one to `W`, and `W`'s is computed in `W`'s own layout
//! instead of as a transposed view that is added element by element.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{applies, contiguous_f32, matmul, storage_f32};
use crate::error::Result;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_FROM: usize = 1 << 15;

/// `x Wᵀ` for `x: [..., in]` and `W: [out, in]` through the fused op, or `None` where it does
/// not apply (not f32, not on the CPU), for the caller's composed version.
pub(crate) fn linear(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x, weight]) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    Ok(Some(x.apply_op2(&weight, Projection)?))
}

struct Projection;

/// `(rows, in, out)` of a projection of `x` by `weight`.
fn dims(x: &Layout, weight: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (out, inner) = weight.shape().dims2()?;
    let x_dims = x.shape().dims();
    match x_dims.last() {
        Some(&n) if n == inner => Ok((x.shape().elem_count() / inner.max(1), inner, out)),
        _ => candle_core::bail!(
            "linear: x has shape {:?}, its last dimension must be the weight's {inner} inputs \
             (weight [{out}, {inner}])",
            x_dims
        ),
    }
}

fn parallel(rows: usize, inner: usize, out: usize) -> bool {
    rows * inner * out >= PARALLEL_FROM
}

impl CustomOp2 for Projection {
    fn name(&self) -> &'static str {
        "chorus-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inner, out) = dims(l1, l2)?;
        let x = contiguous_f32(s1, l1, "linear: x")?;
        let w = contiguous_f32(s2, l2, "linear: weight")?;
        let mut y = vec![0f32; rows * out];
        // y [rows, out] = x [rows, in] Wᵀ, Wᵀ read through W's strides.
        let par = parallel(rows, inner, out);
        matmul(
            (rows, out, inner),
            &mut y,
            x,
            (inner, 1),
            w,
            (1, inner),
            false,
            par,
        );
        let mut shape = l1.shape().dims().to_vec();
        *shape.last_mut().expect("x has a last dimension") = out;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
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
        let (rows, inner, out) = dims(xl, wl)?;
        let x_v = storage_f32(&xs, xl, "linear: x")?;
        let w_v = storage_f32(&ws, wl, "linear: weight")?;
        let dy = storage_f32(&gs, gl, "linear: the output's gradient")?;
        let par = parallel(rows, inner, out);
        let dev = x.device();
        // A gradient for an input that tracks nothing would still be stored by candle's
        // backward pass (a constant as large as the input), so none is made for it.
        let dx = if x.track_op() {
            // dx [rows, in] = dy [rows, out] W [out, in].
            let mut dx = vec![0f32; rows * inner];
            matmul(
                (rows, inner, out),
                &mut dx,
                dy,
                (out, 1),
                w_v,
                (inner, 1),
                false,
                par,
            );
            Some(Tensor::from_vec(dx, x.shape(), dev)?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            // dW [out, in] = dyᵀ [out, rows] x [rows, in].
            let mut dw = vec![0f32; out * inner];
            matmul(
                (out, inner, rows),
                &mut dw,
                dy,
                (1, out),
                x_v,
                (inner, 1),
                false,
                par,
            );
            Some(Tensor::from_vec(dw, weight.shape(), dev)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use candle_core::{Device, Var};

    /// Projects `input` (`x` itself or a view of it) by `w` through the fused op and through
    /// the composed [`crate::nn::project`], and compares value and gradient.
    fn check(case: &str, x: &Var, input: &Tensor, w: &Var) {
        let fused = linear(input, w.as_tensor()).unwrap().unwrap();
        let want = crate::nn::project(&input.contiguous().unwrap(), w.as_tensor()).unwrap();
        assert_eq!(fused.dims(), want.dims(), "{case}: shape");
        let weights = Tensor::randn(0f32, 1.0, want.shape(), input.device()).unwrap();
        assert_same_value_and_gradient(
            case,
            fused,
            want,
            &weights,
            &[("x", x, true), ("w", w, true)],
            1e-5,
        );
    }

    fn var(shape: &[usize], std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn fused_linear_matches_the_composed_projection_in_value_and_gradient() {
        // Ragged shapes, one row, leading dimensions of several sizes, and products on both
        // sides of the parallel threshold.
        for (case, x_shape, out) in [
            ("one row", vec![1, 7], 5),
            ("batch x time", vec![3, 5, 13], 9),
            ("large", vec![4, 33, 64], 96),
            ("rank 4", vec![2, 3, 4, 8], 3),
        ] {
            let x = var(&x_shape, 1.0);
            let w = var(&[out, *x_shape.last().unwrap()], 0.5);
            check(case, &x, x.as_tensor(), &w);
        }
    }

    #[test]
    fn a_transposed_input_is_projected_as_its_values() {
        let (x, w) = (var(&[6, 4], 1.0), var(&[5, 6], 1.0));
        check("transposed x", &x, &x.as_tensor().t().unwrap(), &w);
    }

    #[test]
    fn a_constant_input_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap()).unwrap();
        let y = linear(&x, w.as_tensor()).unwrap().unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none(), "the constant x got a gradient");
        assert!(grads.get(w.as_tensor()).is_some());
    }

    #[test]
    fn a_weight_of_the_wrong_width_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(
            err.contains("last dimension must be the weight's 5 inputs"),
            "{err}"
        );
    }
}
