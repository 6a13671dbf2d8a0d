//! Differentiable building blocks shared by the blocks of the training model.
//!
//! Everything here is written from candle's primitive ops so that backward is recorded: candle
//! 0.11's fused `softmax_last_dim`, `rms_norm` and `RmsNorm::forward` record no gradient.

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};
use crate::params::ParamPath;

/// A linear projection without bias, `y = x Wᵀ` with `W: [out, in]` as HF stores it.
///
/// Every projection of the policy goes through this type (and, for inference, through
/// [`crate::engine::LinearOp`]), so a quantized kernel replaces it in one place.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    /// The weight's name when the forward pass runs through NVFP4 (training through the
    /// rollout workers' quantization).
    nvfp4: Option<String>,
}

impl Linear {
    /// Reads `<path>.weight` with shape `[out_dim, in_dim]`; its forward pass goes through NVFP4
    /// when the path's policy quantizes it.
    pub fn new(path: &ParamPath, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: path.get("weight", &[out_dim, in_dim])?,
            nvfp4: path.nvfp4_weight("weight", in_dim),
        })
    }

    /// Wraps an existing `[out, in]` weight.
    pub fn from_weight(weight: Tensor) -> Self {
        Self {
            weight,
            nvfp4: None,
        }
    }

    /// Runs the forward pass through NVFP4 as the weight `name` (`None`: full precision).
    pub fn with_nvfp4(mut self, name: Option<String>) -> Self {
        self.nvfp4 = name;
        self
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Whether the forward pass runs through NVFP4.
    pub fn is_nvfp4(&self) -> bool {
        self.nvfp4.is_some()
    }

    /// The weight the forward pass multiplies by: [`Linear::weight`], or its NVFP4 rounding
    /// with a straight-through gradient.
    pub fn effective_weight(&self) -> Result<Tensor> {
        match &self.nvfp4 {
            Some(name) => nvfp4_straight_through(name, &self.weight),
            None => Ok(self.weight.clone()),
        }
    }

    /// Applies the projection to `x: [..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        project(x, &self.effective_weight()?)
    }
}

/// `x Wᵀ` for `x: [..., in]` and `weight: [out, in]`, from candle's ops (the reference the
/// fused projection is tested against, and what runs where it does not apply).
pub(crate) fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // As one `[rows, in] x [in, out]` product: a batched `broadcast_matmul` would broadcast
    // the weight over the leading dimensions, and its backward pass would then build the
    // weight's gradient once per batch entry and sum them.
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len() - 1);
    let rows = x.reshape(((), inner[0]))?;
    let mut out = lead.to_vec();
    out.push(weight.dim(0)?);
    Ok(rows.matmul(&weight.t()?)?.reshape(out)?)
}

/// The weight as an NVFP4 rollout worker holds it, with a straight-through gradient: the
/// forward value is `dequantize(quantize(W))` under the same rule and options the workers use,
/// the backward pass treats the rounding as the identity, so the optimizer still updates the
/// full-precision master weight.
pub fn nvfp4_straight_through(name: &str, weight: &Tensor) -> Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let data: Vec<f32> = weight
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let q = chorus_kernels::Nvfp4Tensor::quantize(
        name,
        &data,
        rows,
        cols,
        &chorus_kernels::QuantizeOptions::default(),
    )
    .map_err(|e| ModelError::Input(e.to_string()))?;
    let dequantized = Tensor::from_vec(q.dequantize(), (rows, cols), weight.device())?
        .to_dtype(weight.dtype())?;
    Ok((weight + (dequantized - weight)?.detach())?)
}

/// RMSNorm with a learned scale, `w * x / sqrt(mean(x²) + eps)`, differentiable.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Reads `<path>.weight` with shape `[dim]`.
    pub fn new(path: &ParamPath, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: path.get("weight", &[dim])?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_normalize(x, self.eps)?.broadcast_mul(&self.weight)?)
    }

    /// The scale `[dim]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?)
}

/// Mamba-2's gated RMSNorm: `w * groupnorm(x * silu(z))` with RMS statistics per group of
/// `group_size` channels (HF `Zamba2RMSNormGated`, norm after gate). The training forward pass
/// runs a fused version of it (the crate's `fused` module) where that applies.
pub fn gated_rms_norm(
    x: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group_size: usize,
    eps: f64,
) -> Result<Tensor> {
    let gated = (x * z.silu()?)?;
    let dims = gated.dims().to_vec();
    let last = *dims.last().expect("non-scalar");
    let mut grouped = dims[..dims.len() - 1].to_vec();
    grouped.extend([last / group_size, group_size]);
    let normed = rms_normalize(&gated.reshape(grouped)?, eps)?.reshape(dims)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Squared ReLU, the activation of Nemotron's MLPs and experts.
pub fn relu2(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?.sqr()?)
}

/// `log(1 + exp(x))`, computed stably as `relu(x) + log(1 + exp(-|x|))`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// `1 / (1 + exp(-x))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Causal depthwise convolution over time: `x: [B, T, C]`, `weight: [C, K]`, optional
/// `history: [B, K-1, C]` (the inputs before `x`; zeros when absent). Returns `[B, T, C]`.
pub fn causal_depthwise_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    history: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let k = weight.dim(1)?;
    let padded = match history {
        Some(h) => Tensor::cat(&[h, x], 1)?,
        None if k > 1 => Tensor::cat(
            &[&Tensor::zeros((b, k - 1, c), x.dtype(), x.device())?, x],
            1,
        )?,
        None => x.clone(),
    };
    let mut out: Option<Tensor> = None;
    for j in 0..k {
        let tap = padded
            .narrow(1, j, t)?
            .broadcast_mul(&weight.narrow(1, j, 1)?.squeeze(1)?)?;
        out = Some(match out {
            Some(o) => (o + tap)?,
            None => tap,
        });
    }
    let out = out.expect("kernel width >= 1");
    Ok(match bias {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softplus_is_stable_and_exact() {
        let x = Tensor::new(&[-100f32, -1.0, 0.0, 1.0, 30.0, 100.0], &Device::Cpu).unwrap();
        let got: Vec<f32> = softplus(&x).unwrap().to_vec1().unwrap();
        let want: Vec<f32> = [-100f64, -1.0, 0.0, 1.0, 30.0, 100.0]
            .iter()
            .map(|&v: &f64| {
                if v > 20.0 {
                    v as f32
                } else {
                    (1.0 + v.exp()).ln() as f32
                }
            })
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn rms_norm_records_gradients() {
        let x = Var::new(&[[1.0f32, -2.0, 3.0, 0.5]], &Device::Cpu).unwrap();
        let loss = rms_normalize(x.as_tensor(), 1e-5)
            .unwrap()
            .sqr()
            .unwrap()
            .mul(&Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let gx: Vec<f32> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gx.iter().any(|v| v.abs() > 1e-4), "{gx:?}");
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // indices mirror the convolution's formula
    fn conv_matches_direct_sum() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((1, 6, 2))
            .unwrap();
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [0.5, 0.0, -1.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = causal_depthwise_conv(&x, &w, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let xs: Vec<Vec<f32>> = x.squeeze(0).unwrap().to_vec2().unwrap();
        let wv: Vec<Vec<f32>> = w.to_vec2().unwrap();
        for t in 0..6 {
            for c in 0..2 {
                let mut s = 0.0;
                for j in 0..3 {
                    let src = t as isize - 2 + j as isize;
                    if src >= 0 {
                        s += wv[c][j] * xs[src as usize][c];
                    }
                }
                assert!((y[t][c] - s).abs() < 1e-6);
            }
        }
    }
}
