//! The routed experts of a MoE block as one op: every expert's relu² MLP over the token rows
//! routed to it, in parallel over experts, with its own backward pass.
//!
//! Composed from candle's ops each expert is a gather, two products, the activation and a
//! scatter-add into a fresh copy of the block's output, and the backward pass of each gather
//! zero-fills a gradient the size of all rows: per block and step some two hundred small ops
//! whose fixed costs outweighed the products on `small-d512`. Here each expert gathers its rows
//! once and calls the GEMM kernel directly; the first product's output is kept for the backward
//! pass.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{applies, contiguous_f32, matmul, storage_f32};
use crate::error::Result;

/// Which rows each expert reads and writes: for expert `e`, `(token row, output row)` pairs,
/// where the output row is `token * top_k + slot`.
pub(crate) type ExpertRows = Vec<Vec<(u32, u32)>>;

/// `y[out_row] = down_e(relu(up_e(h[token]))²)` for every pair of `rows`, for `h: [N, L]`,
/// `up: [E, I, L]`, `down: [E, L, I]`; returns `y: [slots, L]` (rows nobody routes to are zero).
/// Differentiable in `h`, `up` and `down`; `None` where the fused op does not apply.
pub(crate) fn routed_experts(
    h: &Tensor,
    up: &Tensor,
    down: &Tensor,
    rows: ExpertRows,
    slots: usize,
) -> Result<Option<Tensor>> {
    if !applies(&[h, up, down]) {
        return Ok(None);
    }
    let op = RoutedExperts {
        rows,
        slots,
        hidden: Mutex::new(Vec::new()),
    };
    Ok(Some(h.contiguous()?.apply_op3(
        &up.contiguous()?,
        &down.contiguous()?,
        op,
    )?))
}

struct RoutedExperts {
    rows: ExpertRows,
    slots: usize,
    /// Each expert's `up` output before the activation, `[rows_e, I]`, kept for backward.
    hidden: Mutex<Vec<Vec<f32>>>,
}

#[derive(Clone, Copy)]
struct Dims {
    tokens: usize,
    width: usize,
    experts: usize,
    inner: usize,
}

impl RoutedExperts {
    fn dims(&self, h: &Layout, up: &Layout, down: &Layout) -> candle_core::Result<Dims> {
        let (tokens, width) = h.shape().dims2()?;
        let (experts, inner, up_width) = up.shape().dims3()?;
        let d = Dims {
            tokens,
            width,
            experts,
            inner,
        };
        if up_width != width
            || down.shape().dims() != [experts, width, inner]
            || self.rows.len() != experts
        {
            candle_core::bail!(
                "routed experts: h {:?}, up {:?}, down {:?} and {} routing lists do not agree",
                h.shape(),
                up.shape(),
                down.shape(),
                self.rows.len()
            );
        }
        let bad = self
            .rows
            .iter()
            .flatten()
            .find(|&&(token, out)| token as usize >= tokens || out as usize >= self.slots);
        if let Some((token, out)) = bad {
            candle_core::bail!(
                "routed experts: row pair ({token}, {out}) outside {tokens} tokens and {} slots",
                self.slots
            );
        }
        Ok(d)
    }
}

/// The rows `pairs` select from `src` (`[_, width]`), by the first or second entry of a pair.
fn gather(src: &[f32], width: usize, pairs: &[(u32, u32)], by_token: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(pairs.len() * width);
    for &(token, slot) in pairs {
        let r = if by_token { token } else { slot } as usize;
        out.extend_from_slice(&src[r * width..(r + 1) * width]);
    }
    out
}

impl CustomOp3 for RoutedExperts {
    fn name(&self) -> &'static str {
        "chorus-routed-experts"
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
        let d = self.dims(l1, l2, l3)?;
        let h = contiguous_f32(s1, l1, "routed experts: h")?;
        let up = contiguous_f32(s2, l2, "routed experts: up")?;
        let down = contiguous_f32(s3, l3, "routed experts: down")?;
        let (w, i) = (d.width, d.inner);
        let per: Vec<(Vec<f32>, Vec<f32>)> = (0..d.experts)
            .into_par_iter()
            .map(|e| {
                let pairs = &self.rows[e];
                let n = pairs.len();
                let x = gather(h, w, pairs, true);
                let mut hidden = vec![0f32; n * i];
                let up_e = &up[e * i * w..(e + 1) * i * w];
                let down_e = &down[e * w * i..(e + 1) * w * i];
                matmul(
                    (n, i, w),
                    &mut hidden,
                    &x,
                    (w, 1),
                    up_e,
                    (1, w),
                    false,
                    false,
                );
                let act: Vec<f32> = hidden.iter().map(|&v| v.max(0.0) * v.max(0.0)).collect();
                let mut y = vec![0f32; n * w];
                matmul(
                    (n, w, i),
                    &mut y,
                    &act,
                    (i, 1),
                    down_e,
                    (1, i),
                    false,
                    false,
                );
                (hidden, y)
            })
            .collect();
        let mut out = vec![0f32; self.slots * w];
        let mut hidden = Vec::with_capacity(d.experts);
        for (e, (hid, y)) in per.into_iter().enumerate() {
            for (&(_, slot), row) in self.rows[e].iter().zip(y.chunks_exact(w.max(1))) {
                out[slot as usize * w..(slot as usize + 1) * w].copy_from_slice(row);
            }
            hidden.push(hid);
        }
        *self.hidden.lock().expect("routed experts hidden") = hidden;
        Ok((CpuStorage::F32(out), Shape::from((self.slots, w))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        up: &Tensor,
        down: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (hs, hl) = h.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (ds, dl) = down.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let d = self.dims(hl, ul, dl)?;
        let h_v = storage_f32(&hs, hl, "routed experts: h")?;
        let up_v = storage_f32(&us, ul, "routed experts: up")?;
        let down_v = storage_f32(&ds, dl, "routed experts: down")?;
        let dy = storage_f32(&gs, gl, "routed experts: the output's gradient")?;
        let hidden = self.hidden.lock().expect("routed experts hidden");
        if hidden.len() != d.experts {
            candle_core::bail!("routed experts: backward pass without its forward pass");
        }
        let (w, i) = (d.width, d.inner);
        let mut d_up = vec![0f32; d.experts * i * w];
        let mut d_down = vec![0f32; d.experts * w * i];
        let dxs: Vec<Vec<f32>> = d_up
            .par_chunks_mut((i * w).max(1))
            .zip(d_down.par_chunks_mut((w * i).max(1)))
            .enumerate()
            .map(|(e, (d_up_e, d_down_e))| {
                let pairs = &self.rows[e];
                let n = pairs.len();
                if n == 0 {
                    return Vec::new();
                }
                let up_e = &up_v[e * i * w..(e + 1) * i * w];
                let down_e = &down_v[e * w * i..(e + 1) * w * i];
                let x = gather(h_v, w, pairs, true);
                let dy_e = gather(dy, w, pairs, false);
                let hid = &hidden[e];
                let act: Vec<f32> = hid.iter().map(|&v| v.max(0.0) * v.max(0.0)).collect();
                // d down_e [W, I] = dy_eᵀ act.
                matmul(
                    (w, i, n),
                    d_down_e,
                    &dy_e,
                    (1, w),
                    &act,
                    (i, 1),
                    false,
                    false,
                );
                // d act [n, I] = dy_e down_e, then through relu²: 2 relu(hidden).
                let mut d_hid = vec![0f32; n * i];
                matmul(
                    (n, i, w),
                    &mut d_hid,
                    &dy_e,
                    (w, 1),
                    down_e,
                    (i, 1),
                    false,
                    false,
                );
                for (g, &v) in d_hid.iter_mut().zip(hid) {
                    *g *= 2.0 * v.max(0.0);
                }
                // d up_e [I, W] = d_hidᵀ x; d x [n, W] = d_hid up_e.
                matmul((i, w, n), d_up_e, &d_hid, (1, i), &x, (w, 1), false, false);
                let mut dx = vec![0f32; n * w];
                matmul(
                    (n, w, i),
                    &mut dx,
                    &d_hid,
                    (i, 1),
                    up_e,
                    (w, 1),
                    false,
                    false,
                );
                dx
            })
            .collect();
        drop(hidden);
        let mut dh = vec![0f32; d.tokens * w];
        for (e, dx) in dxs.iter().enumerate() {
            for (&(token, _), row) in self.rows[e].iter().zip(dx.chunks_exact(w.max(1))) {
                let acc = &mut dh[token as usize * w..(token as usize + 1) * w];
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
        }
        let dev = h.device();
        Ok((
            Some(Tensor::from_vec(dh, h.shape(), dev)?),
            Some(Tensor::from_vec(d_up, up.shape(), dev)?),
            Some(Tensor::from_vec(d_down, down.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use crate::nn::relu2;
    use candle_core::{Device, Var};

    /// Each expert through candle's ops, written into its output rows.
    fn reference(
        h: &Tensor,
        up: &Tensor,
        down: &Tensor,
        rows: &ExpertRows,
        slots: usize,
    ) -> Tensor {
        let w = h.dim(1).unwrap();
        let mut out = Tensor::zeros((slots, w), h.dtype(), h.device()).unwrap();
        for (e, pairs) in rows.iter().enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let idx = |f: fn(&(u32, u32)) -> u32| {
                Tensor::from_vec(
                    pairs.iter().map(f).collect::<Vec<_>>(),
                    pairs.len(),
                    h.device(),
                )
                .unwrap()
            };
            let x = h.index_select(&idx(|p| p.0), 0).unwrap();
            let hid = x.matmul(&up.get(e).unwrap().t().unwrap()).unwrap();
            let y = relu2(&hid)
                .unwrap()
                .matmul(&down.get(e).unwrap().t().unwrap())
                .unwrap();
            out = out.index_add(&idx(|p| p.1), &y, 0).unwrap();
        }
        out
    }

    #[test]
    fn fused_experts_match_the_composed_experts_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (tokens, width, experts, inner, top_k) = (9, 6, 4, 5, 2);
        // Expert 3 gets no rows; expert 0 gets most.
        let choice = [
            (0, 1),
            (0, 2),
            (1, 0),
            (0, 2),
            (2, 0),
            (0, 1),
            (1, 2),
            (0, 1),
            (2, 0),
        ];
        let mut rows: ExpertRows = vec![vec![]; experts];
        for (t, &(a, b)) in choice.iter().enumerate() {
            rows[a].push((t as u32, (t * top_k) as u32));
            rows[b].push((t as u32, (t * top_k + 1) as u32));
        }
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (h, up, down) = (
            var(&[tokens, width]),
            var(&[experts, inner, width]),
            var(&[experts, width, inner]),
        );
        let slots = tokens * top_k;
        let weights = Tensor::randn(0f32, 1.0, (slots, width), &dev).unwrap();
        let fused = routed_experts(
            h.as_tensor(),
            up.as_tensor(),
            down.as_tensor(),
            rows.clone(),
            slots,
        )
        .unwrap()
        .expect("f32 on CPU takes the fused op");
        let want = reference(
            h.as_tensor(),
            up.as_tensor(),
            down.as_tensor(),
            &rows,
            slots,
        );
        assert_same_value_and_gradient(
            "routed experts",
            fused,
            want,
            &weights,
            &[("h", &h, true), ("up", &up, true), ("down", &down, true)],
            1e-5,
        );
    }

    #[test]
    fn routing_outside_the_tensors_is_an_error() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let up = Tensor::zeros((1, 4, 3), candle_core::DType::F32, &dev).unwrap();
        let down = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let err = routed_experts(&h, &up, &down, vec![vec![(2, 0)]], 4).unwrap_err();
        assert!(err.to_string().contains("outside 2 tokens"), "{err}");
    }
}
