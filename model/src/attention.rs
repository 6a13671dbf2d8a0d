//! Grouped-query causal attention with no positional embeddings (NemotronH `*` blocks),
//! full-sequence and differentiable. The cached decoding path lives in [`crate::engine`].

use candle_core::{D, Device, Tensor};

use crate::config::{AttentionConfig, NemotronHConfig};
use crate::error::Result;
use crate::nn::Linear;
use crate::params::ParamPath;

/// Attention weights of one block (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
#[derive(Clone, Debug)]
pub struct Attention {
    cfg: AttentionConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

impl Attention {
    pub fn new(cfg: &NemotronHConfig, p: &ParamPath) -> Result<Self> {
        let a = cfg.attention().clone();
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(&p.pp("q_proj"), d, a.num_heads * a.head_dim)?,
            k_proj: Linear::new(&p.pp("k_proj"), d, a.num_kv_heads * a.head_dim)?,
            v_proj: Linear::new(&p.pp("v_proj"), d, a.num_kv_heads * a.head_dim)?,
            o_proj: Linear::new(&p.pp("o_proj"), a.num_heads * a.head_dim, d)?,
            cfg: a,
        })
    }

    /// `x: [B, T, d]` → `[B, T, d]`, each position attending to itself and earlier ones. In f32
    /// on CPU through one fused op ([`crate::fused::causal_attention`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = (
            crate::fused::apply_linear(&self.q_proj, x)?,
            crate::fused::apply_linear(&self.k_proj, x)?,
            crate::fused::apply_linear(&self.v_proj, x)?,
        );
        if let Some(out) =
            crate::fused::causal_attention(&q, &k, &v, a.num_heads, a.num_kv_heads, a.head_dim)?
        {
            return crate::fused::apply_linear(&self.o_proj, &out);
        }
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, a.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(&q, a.num_heads)?;
        let k = repeat_kv(&heads(&k, a.num_kv_heads)?, a.group())?;
        let v = repeat_kv(&heads(&v, a.num_kv_heads)?, a.group())?;
        let scale = 1.0 / (a.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?;
        let scores = scores.broadcast_add(&causal_bias(t, x.device())?.to_dtype(x.dtype())?)?;
        // `ops::softmax` (not `softmax_last_dim`): the generic version records backward.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, a.num_heads * a.head_dim))?;
        crate::fused::apply_linear(&self.o_proj, &out)
    }
}

/// `[B, KV, T, Dh]` → `[B, KV*group, T, Dh]`, each KV head serving `group` consecutive query heads.
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, dh) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, group, t, dh))?
        .reshape((b, kv * group, t, dh))?)
}

/// `[T, T]` with 0 on and below the diagonal and -inf above.
fn causal_bias(t: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t <= i / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (t, t), device)?)
}
