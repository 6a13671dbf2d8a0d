//! Causal grouped-query attention of the training forward pass as one op, with its backward.
//!
//! Reads queries, keys and values where the projections left them (`[B, T, heads * Dh]`, no
//! transposes or repeated KV heads) and writes the output in the layout `o_proj` reads. Keeps
//! one log-sum-exp per query row for the backward pass, which recomputes each probability from
//! it (as FlashAttention does), so memory grows with `T`, not `T²`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, contiguous_f32, storage_f32};
use crate::error::Result;
use crate::simd;

/// `softmax(q kᵀ / sqrt(Dh) + causal mask) v` per head for `q: [B, T, heads * Dh]`,
/// `k`, `v: [B, T, kv_heads * Dh]`, each KV head serving `heads / kv_heads` consecutive query
/// heads; returns `[B, T, heads * Dh]`. `None` where the fused op does not apply.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Option<Tensor>> {
    if !applies(&[q, k, v]) {
        return Ok(None);
    }
    let op = CausalAttention {
        heads,
        kv_heads,
        head_dim,
        lse: Mutex::new(Vec::new()),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `[B, T, heads]`: each query row's log-sum-exp, for the backward pass.
    lse: Mutex<Vec<f32>>,
}

impl CausalAttention {
    /// `(batch, time)`, checked against the head counts.
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<(usize, usize)> {
        let (b, t, qw) = q.shape().dims3()?;
        let kw = self.kv_heads * self.head_dim;
        if qw != self.heads * self.head_dim
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || k.shape().dims() != [b, t, kw]
            || v.shape().dims() != [b, t, kw]
        {
            candle_core::bail!(
                "causal attention: q {:?}, k {:?}, v {:?} do not hold {} query and {} KV heads of {}",
                q.shape(),
                k.shape(),
                v.shape(),
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        Ok((b, t))
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "chorus-causal-attention"
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
        let (b, t) = self.dims(l1, l2, l3)?;
        let q = contiguous_f32(s1, l1, "causal attention: q")?;
        let k = contiguous_f32(s2, l2, "causal attention: k")?;
        let v = contiguous_f32(s3, l3, "causal attention: v")?;
        let (h, dh) = (self.heads, self.head_dim);
        let (qw, kw, group) = (h * dh, self.kv_heads * dh, h / self.kv_heads);
        let mut out = vec![0f32; b * t * qw];
        let mut lse = vec![0f32; b * t * h];
        out.par_chunks_mut((t * qw).max(1))
            .zip(lse.par_chunks_mut((t * h).max(1)))
            .enumerate()
            .for_each(|(seq, (out, lse))| {
                let (q, k, v) = (
                    &q[seq * t * qw..][..t * qw],
                    &k[seq * t * kw..][..t * kw],
                    &v[seq * t * kw..][..t * kw],
                );
                let mut scores = Vec::with_capacity(t);
                for i in 0..t {
                    for head in 0..h {
                        lse[i * h + head] = simd::attention_row(
                            &q[i * qw + head * dh..][..dh],
                            k,
                            v,
                            kw,
                            (head / group) * dh,
                            i + 1,
                            self.scale(),
                            &mut scores,
                            &mut out[i * qw + head * dh..][..dh],
                        );
                    }
                }
            });
        *self.lse.lock().expect("attention lse") = lse;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (b, t) = self.dims(ql, kl, vl)?;
        let q_v = storage_f32(&qs, ql, "causal attention: q")?;
        let k_v = storage_f32(&ks, kl, "causal attention: k")?;
        let v_v = storage_f32(&vs, vl, "causal attention: v")?;
        let o_v = storage_f32(&os, ol, "causal attention: the output")?;
        let do_v = storage_f32(&gs, gl, "causal attention: the output's gradient")?;
        let lse = self.lse.lock().expect("attention lse");
        let (h, dh) = (self.heads, self.head_dim);
        let (qw, kw, group) = (h * dh, self.kv_heads * dh, h / self.kv_heads);
        if lse.len() != b * t * h {
            candle_core::bail!("causal attention: backward pass without its forward pass");
        }
        let mut dq = vec![0f32; b * t * qw];
        let mut dk = vec![0f32; b * t * kw];
        let mut dv = vec![0f32; b * t * kw];
        dq.par_chunks_mut((t * qw).max(1))
            .zip(
                dk.par_chunks_mut((t * kw).max(1))
                    .zip(dv.par_chunks_mut((t * kw).max(1))),
            )
            .enumerate()
            .for_each(|(seq, (dq, (dk, dv)))| {
                let span = |w: usize| seq * t * w..(seq + 1) * t * w;
                let (q, k, v) = (&q_v[span(qw)], &k_v[span(kw)], &v_v[span(kw)]);
                let (o, d_out) = (&o_v[span(qw)], &do_v[span(qw)]);
                let lse = &lse[seq * t * h..][..t * h];
                for i in 0..t {
                    for head in 0..h {
                        let row = i * qw + head * dh..i * qw + (head + 1) * dh;
                        simd::attention_row_backward(
                            &q[row.clone()],
                            k,
                            v,
                            kw,
                            (head / group) * dh,
                            i + 1,
                            self.scale(),
                            lse[i * h + head],
                            &o[row.clone()],
                            &d_out[row.clone()],
                            &mut dq[row],
                            dk,
                            dv,
                        );
                    }
                }
            });
        drop(lse);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use candle_core::{D, Device, Var};

    /// The composed attention: heads transposed out, KV heads repeated, masked softmax.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, h: usize, kv: usize, dh: usize) -> Tensor {
        let (b, t, _) = q.dims3().unwrap();
        let split = |x: &Tensor, n: usize| {
            x.reshape((b, t, n, dh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let repeat = |x: Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, h / kv, t, dh))
                .unwrap()
                .reshape((b, h, t, dh))
                .unwrap()
        };
        let (q, k, v) = (split(q, h), repeat(split(k, kv)), repeat(split(v, kv)));
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t <= i / t {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device()).unwrap();
        let scores = (q
            .matmul(&k.transpose(2, 3).unwrap().contiguous().unwrap())
            .unwrap()
            * (1.0 / (dh as f64).sqrt()))
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * dh))
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_the_composed_attention_in_value_and_gradient() {
        let dev = Device::Cpu;
        for &(b, t, h, kv, dh) in &[
            (1, 1, 2, 1, 4),
            (2, 5, 4, 2, 8),
            (3, 17, 6, 3, 5),
            (1, 9, 2, 2, 16),
        ] {
            let var = |w: usize| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, w), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var(h * dh), var(kv * dh), var(kv * dh));
            let weights = Tensor::randn(0f32, 1.0, (b, t, h * dh), &dev).unwrap();
            let fused = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), h, kv, dh)
                .unwrap()
                .expect("f32 on CPU takes the fused op");
            let want = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), h, kv, dh);
            let case = format!("B{b} T{t} H{h} KV{kv} Dh{dh}");
            assert_same_value_and_gradient(
                &case,
                fused,
                want,
                &weights,
                &[("q", &q, t > 1), ("k", &k, t > 1), ("v", &v, true)],
                1e-5,
            );
        }
    }
}
